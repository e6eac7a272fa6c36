#!/usr/bin/env bash
# The main job: set up .venv, then compare AdamW, GaLore, Fira, SubTrack++, GrassWalk and GrassJump
# on the `tiny` LLaMA trained on the embedded SOTU corpus (about 10 minutes on 2 CPU cores),
# print the table and where the report is. Extra arguments go to `grassopt bench`.
# Every method trains the parts no method projects (embedding, head, norms) the same way: AdamW with
# eps 1e-6 at --plain-lr 0.01; the rates below are those of the hidden matrices only.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh" ""
cd "$ROOT"
exec grassopt bench --model tiny --presets adamw-torch:eps=1e-06 galore fira subtrack++ grasswalk grassjump --no-refs \
  --steps 80 --batch-size 8 --seq-len 256 --rank 64 --update-interval 20 --eval-every 40 --seeds 0 --plain-lr 0.01 \
  --lrs adamw-torch:eps=1e-06=0.003 galore=0.01 fira=0.01 subtrack++=0.01 grasswalk=0.01 grassjump=0.01 \
  --out runs/quick --title "Quick comparison on tiny (SOTU)" "$@"
