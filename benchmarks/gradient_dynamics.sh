#!/usr/bin/env bash
# The gradient-dynamics measurements of benchmarks/gradient_dynamics.md: one `tiny` run on SOTU with
# SubTrack++ (rank 64, a basis update every 50 steps) recorded every 10 steps by `grassopt analyze`.
# About 10 minutes on a quiet 2-core CPU (one thread), 20 on a busy one.
# Usage: bash benchmarks/gradient_dynamics.sh   (from the repository root)
set -euo pipefail
OUT=${OUT:-runs/gradient_dynamics}
DEST=${DEST:-benchmarks/gradient_dynamics}
grassopt analyze --model tiny --seq-len 256 --batch-size 8 --steps "${STEPS:-300}" --lr 0.01 --rank 64 \
  --update-interval 50 --every 10 --energy-ranks 16 32 128 --eval-every 100 --threads "${THREADS:-1}" \
  --no-progress --out "$OUT"
mkdir -p "$DEST"
cp "$OUT"/*.png "$OUT"/analysis.md "$OUT"/analysis_summary.json "$OUT"/summary.json "$DEST"/
gzip -c "$OUT"/analysis.jsonl > "$DEST"/analysis.jsonl.gz
