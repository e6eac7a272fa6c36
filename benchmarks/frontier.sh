#!/usr/bin/env bash
# benchmarks/frontier.md: optimizer-state bytes against eval loss, the Pareto front drawn, on the contest's
# protocol (benchmarks/contest.py: every method's embedding, head and norms at AdamW's tuned plain_lr, each
# hidden-matrix rate swept to an interior optimum) at a quarter of its horizon (512k tokens), seeds 0 and 1:
# the contest's methods (their stage-2 sweeps reused) beside the peers and grassopt's lean configurations
# (contest.py FRONTIER). Resumable; needs the contest's stage 1 (common.json).
#
#   bash benchmarks/frontier.sh            # stage 4, then the report
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh" bench
cd "$ROOT"
python benchmarks/contest.py --stage 4 "$@"
python benchmarks/frontier_report.py --contest benchmarks/contest --dest benchmarks
