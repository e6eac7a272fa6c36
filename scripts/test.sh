#!/usr/bin/env bash
# Set up .venv with the test extras (pytest, hypothesis, and the reference package galore-torch with
# transformers and bitsandbytes), then run the default test suite (slow tests deselected; add
# `-m slow` to run those). Extra arguments go to pytest. No tests collected (exit code 5) fails.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh" test
cd "$ROOT"
exec python -m pytest -q "$@"
