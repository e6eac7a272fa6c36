#!/usr/bin/env bash
# benchmarks/sotu_tiny.md: every preset side by side on the `tiny` LLaMA and the SOTU corpus.
#
# One `grassopt bench` process: a learning-rate sweep per preset (40 steps of tiny, scored on the
# first 32k validation tokens), then every preset at its best rate for 245 steps of 8 x 256
# tokens (501,760 tokens), seeds 0 and 1, rank 64 (apollo-mini: 1), basis update every 50 steps
# (ldadam: every step, its own rule), eval on the whole validation split at steps 123 and 245.
# The reference packages run at the rate swept for the preset they implement (ref-galore at
# galore's, ref-apollo at apollo's): the same algorithm, so the same rate is the fair choice.
# AdamW also runs at 3e-3 and 1e-2 for the whole horizon: a 40-step sweep favours a small rate for
# Adam, and the subspace methods must be compared with the best AdamW, not a handicapped one.
#
#   bash benchmarks/sotu_tiny.sh            # about 2.5 hours on 2 idle cores (fp32)
#   OUT=/tmp/x bash benchmarks/sotu_tiny.sh --steps 8 --sweep-steps 2   # a smoke run of the pipeline
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh" bench
cd "$ROOT"
OUT="${OUT:-runs/sotu_tiny}"
ADAM="1e-3,3e-3,1e-2"
SUBSPACE="3e-3,1e-2,3e-2"
grassopt bench --model tiny --no-refs --no-progress \
  --presets adamw-torch galore ref-galore fira subtrack++ grasswalk grassjump \
            apollo ref-apollo apollo-mini:rank=1 ldadam:update_interval=1 \
            adamw-torch:lr=0.003 adamw-torch:lr=0.01 \
  --tokens 501760 --batch-size 8 --seq-len 256 --rank 64 --update-interval 50 --eval-every 123 --seeds 0 1 \
  --sweep-steps 40 --sweep-eval-tokens 32768 \
  --sweep-lrs adamw-torch=$ADAM galore=$SUBSPACE fira=$SUBSPACE subtrack++=$SUBSPACE grasswalk=$SUBSPACE \
              grassjump=$SUBSPACE apollo=$ADAM apollo-mini:rank=1=$ADAM ldadam:update_interval=1=$ADAM \
  --lrs-from ref-galore=galore ref-apollo=apollo \
  --title "Every preset on tiny and SOTU (500k tokens, 2 seeds)" --out "$OUT" "$@"
if [ "$OUT" = "runs/sotu_tiny" ]; then
  mkdir -p benchmarks/sotu_tiny
  cp "$OUT/report.md" benchmarks/sotu_tiny.md
  cp "$OUT/results.json" "$OUT"/*.png benchmarks/sotu_tiny/
fi
