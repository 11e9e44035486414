"""Build-on-first-use loader for the C++/OpenMP and CUDA extensions in `kernels/csrc`.

Each extension is compiled by `torch.utils.cpp_extension.load` the first time it is needed and cached in a per-user
build directory (`$BOXMASK_EXTENSIONS_DIR`, else `$XDG_CACHE_HOME/boxmask/torch_extensions/<python>-<torch>`, else
`~/.cache/...`); torch rebuilds only when the sources or flags change, and its file lock makes concurrent first uses
safe. When a build fails (no compiler, no CUDA toolkit), the loader warns once and returns None, and callers fall
back to the PyTorch reference.
"""

from __future__ import annotations

import functools
import os
import sys
import warnings
from pathlib import Path
from types import ModuleType

import torch

CSRC = Path(__file__).resolve().parent / "csrc"
CPU_MODULE = "boxmask_message_passing_cpu"
CUDA_MODULE = "boxmask_message_passing_cuda"


def build_root() -> Path:
    """The per-user directory that holds one build folder per extension."""
    override = os.environ.get("BOXMASK_EXTENSIONS_DIR")
    if override:
        return Path(override)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    tag = f"py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__.replace('+', '_')}"
    return cache / "boxmask" / "torch_extensions" / tag


def _build(name: str, sources: list[Path], cuda: bool) -> ModuleType:
    """Compile (or reuse the cached build of) one extension and import it; raises when the build fails."""
    from torch.utils import cpp_extension

    build_dir = build_root() / name
    build_dir.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(
        name=name,
        sources=[str(s) for s in sources],
        extra_cflags=["-O3", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        extra_cuda_cflags=["-O3"] if cuda else None,
        with_cuda=cuda,
        build_directory=str(build_dir),
        verbose=False,
    )


def _load_or_warn(name: str, sources: list[Path], cuda: bool) -> ModuleType | None:
    try:
        return _build(name, sources, cuda)
    except Exception as exc:  # noqa: BLE001 - any build failure means "use the reference"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        warnings.warn(
            f"kernels: cannot build the {name} extension ({reason}); using the PyTorch reference instead",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


@functools.cache
def load_cpu() -> ModuleType | None:
    """The C++/OpenMP message-passing module, or None (after one warning) when it cannot be built."""
    return _load_or_warn(CPU_MODULE, [CSRC / "message_passing_cpu.cpp"], cuda=False)


@functools.cache
def load_cuda() -> ModuleType | None:
    """The CUDA message-passing module, or None (after one warning) when it cannot be built."""
    return _load_or_warn(
        CUDA_MODULE, [CSRC / "message_passing_cuda.cpp", CSRC / "message_passing_cuda.cu"], cuda=True
    )
