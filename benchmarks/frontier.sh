#!/usr/bin/env bash
# benchmarks/frontier.md: grassopt's presets against the optimizers practitioners pick today for little
# memory (torch's Muon and Adafactor, Adam-mini, bitsandbytes' and torchao's 8-bit AdamW, SOAP), at
# equal footing: optimizer-state bytes against final eval loss, the Pareto front drawn.
#
# The sotu_tiny protocol (benchmarks/sotu_tiny.sh): `tiny` on SOTU, 245 steps of 8 x 256 tokens (501,760),
# rank 64 (apollo-mini: 1), basis update every 50 steps, seeds 0 and 1, eval on the whole validation split
# at steps 123 and 245, fp32. Each method runs at the best rate of a 40-step sweep (scored on 32k
# validation tokens) that starts from a 3-point grid around its authors' usual rate and is widened
# (`--widen 3`) while its best point is at an edge: every chosen rate is an interior optimum of its sweep.
# Every method gets the same grid width and the same widening; nothing of ours is tuned further.
#
# Three stages, each reusing what the earlier ones (or an interrupted invocation) finished:
#   1. the sweep, the methods split over two processes (one thread each);
#   2. the runs at the chosen rates, seed 0 and seed 1 as two processes side by side (one thread each);
#   3. one report over both seeds (every run reused), then benchmarks/frontier_report.py.
# Cost on this 2-core machine (measured, 2026-12-03): 45 min of sweep and about 2 h of runs, two at a
# time: 5-6 min per run, except ref-muon's 37 min (torch's Muon orthogonalizes in bfloat16, slow on a CPU).
#
#   bash benchmarks/frontier.sh                                  # from the repository root
#   OUT=/tmp/f SMOKE=1 bash benchmarks/frontier.sh               # nano, a few steps: the pipeline only
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-runs/frontier}"
if [[ "${SMOKE:-0}" == 1 ]]; then
  SIZE=(--model nano --vocab-size 1024 --seq-len 64 --batch-size 4 --steps 8 --eval-every 4 --eval-tokens 4096
        --rank 8 --update-interval 4 --sweep-steps 3 --sweep-eval-tokens 2048)
else
  SIZE=(--model tiny --tokens 501760 --batch-size 8 --seq-len 256 --rank 64 --update-interval 50 --eval-every 123
        --sweep-steps 40 --sweep-eval-tokens 32768)
fi
ADAM=3e-4,1e-3,3e-3      # AdamW and its memory-saving variants: Adam's usual rates at this size
SUB=3e-3,1e-2,3e-2       # GaLore-family presets (alpha 0.25 scales their projected step)
MID=1e-3,3e-3,1e-2       # Muon (match_rms_adamw), SOAP, APOLLO
FACT=3e-3,1e-2,3e-2      # Adafactor (torch's default rate 1e-2, relative steps off)
A=(adamw-torch ref-adamw8bit ref-torchao-adamw8bit ref-adam-mini adamw:state_dtype=int8 ref-muon ref-soap)
B=(ref-adafactor galore fira subtrack++ subtrack++:state_dtype=int8 grassjump apollo apollo-mini:rank=1)
declare -A GRID=([adamw-torch]=$ADAM [ref-adamw8bit]=$ADAM [ref-torchao-adamw8bit]=$ADAM [ref-adam-mini]=$ADAM
                 [adamw:state_dtype=int8]=$ADAM [ref-muon]=$MID [ref-soap]=$MID [ref-adafactor]=$FACT
                 [galore]=$SUB [fira]=$SUB [subtrack++]=$SUB [subtrack++:state_dtype=int8]=$SUB [grassjump]=$SUB
                 [apollo]=$MID [apollo-mini:rank=1]=$MID)
sweep_args() { local p; for p in "$@"; do printf '%s\n' "$p=${GRID[$p]}"; done; }
COMMON=("${SIZE[@]}" --no-refs --no-progress --threads 1 --widen 3 --sweep-seed 0 --out "$OUT")
mkdir -p "$OUT"
start=$(date +%s)

# 1. the sweep
mapfile -t SA < <(sweep_args "${A[@]}")
mapfile -t SB < <(sweep_args "${B[@]}")
grassopt bench "${COMMON[@]}" --presets "${A[@]}" --sweep-lrs "${SA[@]}" --seeds 0 --sweep-only \
  --report-dir "$OUT/sweep_a" > "$OUT/sweep_a.log" 2>&1 &
pa=$!
grassopt bench "${COMMON[@]}" --presets "${B[@]}" --sweep-lrs "${SB[@]}" --seeds 0 --sweep-only \
  --report-dir "$OUT/sweep_b" > "$OUT/sweep_b.log" 2>&1 &
pb=$!
trap 'kill $pa $pb 2>/dev/null' INT TERM
wait $pa
wait $pb
echo "sweep done after $(( ($(date +%s) - start) / 60 )) min"

# 2. the runs, one seed per process
ALL=("${A[@]}" "${B[@]}")
mapfile -t SALL < <(sweep_args "${ALL[@]}")
pids=()
for seed in 0 1; do
  grassopt bench "${COMMON[@]}" --presets "${ALL[@]}" --sweep-lrs "${SALL[@]}" --seeds "$seed" \
    --report-dir "$OUT/seed$seed" > "$OUT/seed$seed.log" 2>&1 &
  pids+=($!)
done
trap 'kill "${pids[@]}" 2>/dev/null' INT TERM
for p in "${pids[@]}"; do wait "$p"; done
echo "runs done after $(( ($(date +%s) - start) / 60 )) min"

# 3. the report over both seeds (every run reused), then the frontier
grassopt bench "${COMMON[@]}" --presets "${ALL[@]}" --sweep-lrs "${SALL[@]}" --seeds 0 1 \
  --title "The memory frontier on tiny and SOTU (500k tokens, 2 seeds)" > "$OUT/report.log" 2>&1
if [[ "${SMOKE:-0}" == 1 ]]; then
  python benchmarks/frontier_report.py "$OUT" --dest "$OUT/frontier"
else
  python benchmarks/frontier_report.py "$OUT"
fi
