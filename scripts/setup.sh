#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv.
# The environment is rebuilt only when pyproject.toml or this script changes, so a second run is instant.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for cand in python3.11 python3; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
      PY=$cand; break
    fi
  done
fi
[ -n "$PY" ] || { echo "setup: Python 3.11 is required (set PYTHON=/path/to/python3.11)" >&2; exit 2; }

want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if ! [ -x .venv/bin/python ] || [ "$(cat .venv/.deps-hash 2>/dev/null)" != "$want" ]; then
  echo "setup: installing dependencies into .venv (first run takes a few minutes)" >&2
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  .venv/bin/python -m pip install -q -e ".[test]"
  echo "$want" > .venv/.deps-hash
fi

# The C++ (and, with a CUDA toolkit and a GPU or TORCH_CUDA_ARCH_LIST, CUDA) extensions, built here rather than
# inside the first labeling batch. They live in a per-user cache keyed by Python, torch and CPU, so this runs every
# time: a build that is up to date costs about a second per extension.
.venv/bin/python -m kernels.extension
