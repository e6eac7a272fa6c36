#!/usr/bin/env bash
# The Ackley demo of benchmarks/ackley.md: the SubTrack++ paper's Figure 5 setup (100 steps, a basis
# update every 10, scale factors 1 and 3, `track` vs `svd`), then its sensitivity to what the paper
# leaves open. Deterministic (float64, no random numbers); about a minute on one core.
# Usage: bash benchmarks/ackley.sh   (from the repository root, with the package installed)
set -euo pipefail
OUT=${OUT:-benchmarks/ackley}
mkdir -p "$OUT"
run() {  # run NAME ARGS...: one configuration, its table kept beside its PNG and JSON
  local name=$1; shift
  echo "== $name: grassopt ackley $*" | tee "$OUT/$name.txt"
  grassopt ackley "$@" --out "$OUT/$name" | tee -a "$OUT/$name.txt"
}
# the figure: defaults (Adam lr 0.5 inside the subspace, keep transport, track eta 0.5 normalized)
run default --rules track svd full --grid
run default_radius2 --rules track svd full --grid --grid-radius 2
# the track rule's step size (normalized eta bounds the turn per update, in radians) and the paper's raw form
run track_eta0.1 --rules track --step-size 0.1 --grid
run track_eta1.0 --rules track --step-size 1.0 --grid
run track_eta1.5 --rules track --step-size 1.5 --grid
run track_raw10 --rules track --step-mode raw --step-size 10 --grid
# projection-aware Adam (rotate the moments at each basis update) instead of GaLore's keep
run rotate --rules track svd full --transport rotate --grid
# plain SGD inside the subspace
run sgd --rules track svd full --inner sgd --lr 0.1 --grid
