#!/usr/bin/env bash
# benchmarks/contest.md: every method against an AdamW tuned as well as they are (benchmarks/contest.py
# says the protocol). Resumable: finished runs under benchmarks/contest/ are reused; run it in parts
# with --stage 1, --stage 2 [--methods ...], --stage 3, then `python benchmarks/contest_report.py`.
#
#   bash benchmarks/contest.sh            # everything, two one-thread runs at a time
#   bash benchmarks/contest.sh --smoke    # the pipeline on a few steps of nano (into /tmp/contest-smoke)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh" bench
cd "$ROOT"
exec python benchmarks/contest.py "$@"
