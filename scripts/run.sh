#!/usr/bin/env bash
# The main job: set up .venv, then compare AdamW, GaLore, Fira, SubTrack++, GrassWalk and GrassJump
# on the `tiny` LLaMA trained on the embedded SOTU corpus (about 10 minutes on 2 CPU cores),
# print the table and where the report is. Extra arguments go to `grassopt bench`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh"
cd "$ROOT"
exec grassopt bench --model tiny --presets adamw-torch galore fira subtrack++ grasswalk grassjump --no-refs \
  --steps 80 --batch-size 8 --seq-len 256 --rank 64 --update-interval 20 --eval-every 40 --seeds 0 \
  --lrs adamw-torch=0.003 galore=0.01 fira=0.01 subtrack++=0.01 grasswalk=0.01 grassjump=0.01 \
  --out runs/quick --title "Quick comparison on tiny (SOTU)" "$@"
