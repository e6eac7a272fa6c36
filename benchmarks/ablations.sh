#!/usr/bin/env bash
# The ablations of benchmarks/ablations.md, reproduced at small scale: `tiny` on SOTU, 2 seeds, the
# same tokens for every run. Every configuration is a `grassopt bench` variant of the subtrack++
# preset (rule, transport, recovery and rule options overridden), so nothing here is special code.
#
#   (i)   rule in {track, walk, jump, hybrid, svd, frozen} x transport {rotate, keep} x recovery {on, off}
#         (frozen never changes its basis, so rotate = keep: run once, as keep), plus torch AdamW;
#   (ii)  track: update interval T in {25, 50, 100, 200, 500}, update rank q in {1, 2, 4, 8};
#   (iii) walk: step size (radians) in {0.03, 0.1, 0.3, 1.0}.
#   (i)-(iii) pin walk and hybrid to update_rank=1 and step_size=0.1, the defaults when they were
#   measured (now "full" and 1.5 rad); every walk and hybrid below names its step size.
#   (iv)  walkfull: walk with the full tangent (update_rank=full) at step sizes {0.03, 0.1, 0.3, 1.0, 1.5}, with
#         keep at 0.1, and hybrid with it;
#   (v)   reset: transport=reset for jump, walk (full), track, svd (recovery on), beside rotate and keep;
#         control: frozen again (keep + recovery), to check that today's code reproduces (i)'s number.
# 33 distinct configurations x 2 seeds = 66 runs of 196,608 tokens (384 steps of 4 x 128 tokens) for
# (i)-(iii); 12 more x 2 seeds for (iv)-(v). PARTS="walkfull reset control" runs only those parts.
# The two seeds run as two processes side by side, one thread each (on 2 cores, two 1-thread runs
# beat one 2-thread run, and both streams see the same load, so wall times stay comparable).
# fp32, not bf16 autocast: at 4 x 128 tokens per step on this CPU, autocast is slower (measured with
# two streams on an idle machine: 1.35k tokens/s per stream with bf16, 2.05k in fp32).
# Time, measured on 2026-12-02 with nothing else running: 4.2-5 min per run and stream (184-200 s of
# training at ~1,000 tokens/s per stream, two evaluations of 105k validation tokens, start-up); the last
# 62 runs took 137 min, so all 66 take about 2.4 hours.
# Finished runs are reused when the script is started again (Ctrl-C and rerun to resume).
# Then: python benchmarks/ablations_report.py "$OUT"  writes benchmarks/ablations.md and its PNGs.
#
# Usage: bash benchmarks/ablations.sh          (from the repository root)
#        SMOKE=1 bash benchmarks/ablations.sh  (nano, 16 steps: checks the pipeline in a few minutes)
set -euo pipefail
OUT=${OUT:-runs/ablations}
if [[ "${SMOKE:-0}" == 1 ]]; then
  OUT=${OUT%/}-smoke
  SIZE=(--model nano --vocab-size 1024 --seq-len 64 --batch-size 4 --tokens 4096 --eval-every 8 --log-every 2
        --rank 8 --update-interval 4)
else
  SIZE=(--model tiny --seq-len 128 --batch-size 4 --tokens 196608 --eval-every 192 --log-every 8 --rank 64
        --update-interval 50)
fi
COMMON=("${SIZE[@]}" --lr 0.01 --no-refs --no-progress --threads 1)
V=subtrack++  # the base preset of every variant: Adam in the subspace, alpha 0.25, zeta 1.01

rules=()
for rule in track walk jump hybrid svd; do
  q=""; [[ $rule == walk || $rule == hybrid ]] && q=",update_rank=1,step_size=0.1"
  for tr in rotate keep; do
    for rs in True False; do rules+=("$V:rule=$rule,transport=$tr,recovery=$rs$q"); done
  done
done
rules+=("$V:rule=frozen,transport=keep,recovery=True" "$V:rule=frozen,transport=keep,recovery=False" adamw-torch)

TRACK="$V:rule=track,transport=rotate,recovery=True"   # = SubTrack++ at T = 50, q = 1 (shared with (i))
interval=("$TRACK")
for T in 25 100 200 500; do interval+=("$TRACK,update_interval=$T"); done
qrank=("$TRACK")
for q in 2 4 8; do qrank+=("$TRACK,update_rank=$q"); done
WALK="$V:rule=walk,transport=rotate,recovery=True,update_rank=1"  # the rank-1 walk of (i) and (iii)
walk=("$WALK,step_size=0.1")  # shared with (i)
for eta in 0.03 0.3 1.0; do walk+=("$WALK,step_size=$eta"); done
FULL="$V:rule=walk,transport=rotate,recovery=True,update_rank=full"  # the full-tangent walk (step sizes below)
walkfull=("$FULL,step_size=0.1" "$V:rule=walk,transport=keep,recovery=True,update_rank=full,step_size=0.1"
          "$V:rule=hybrid,transport=rotate,recovery=True,update_rank=full,step_size=0.1")
for eta in 0.03 0.3 1.0 1.5; do walkfull+=("$FULL,step_size=$eta"); done
reset=()
for rule in jump track svd; do reset+=("$V:rule=$rule,transport=reset,recovery=True"); done
reset+=("$V:rule=walk,transport=reset,recovery=True,update_rank=full,step_size=0.1")
control=("$V:rule=frozen,transport=keep,recovery=True")

stream() {  # stream SEED: every part for one seed, in one output folder (shared runs are reused)
  local seed=$1 dir="$OUT/s$1"
  local parts=(${PARTS:-rules interval qrank walk walkfull reset control})
  for part in "${parts[@]}"; do
    local -n presets=$part
    local lrs=()
    [[ $part == rules ]] && lrs=(--lrs adamw-torch=0.003)  # torch AdamW (part (i)) at its own rate
    grassopt bench "${COMMON[@]}" "${lrs[@]}" --seeds "$seed" --out "$dir" --title "ablation $part, seed $seed" \
      --presets "${presets[@]}"
    cp "$dir/report.md" "$dir/report_$part.md"
  done
}

mkdir -p "$OUT"
start=$(date +%s)
stream 0 > "$OUT/stream0.log" 2>&1 &
p0=$!
stream 1 > "$OUT/stream1.log" 2>&1 &
p1=$!
trap 'kill $p0 $p1 2>/dev/null' INT TERM
wait $p0
wait $p1
echo "all runs done in $(( ($(date +%s) - start) / 60 )) min; logs in $OUT/stream*.log"
if [[ "${SMOKE:-0}" == 1 ]]; then
  python benchmarks/ablations_report.py "$OUT" --dest "$OUT/report"
else
  python benchmarks/ablations_report.py "$OUT"
fi
