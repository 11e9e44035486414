"""Loader for the C++/OpenMP and CUDA extensions in `kernels/csrc`, built at install and loaded at run time.

`scripts/setup.sh` runs `python -m kernels.extension`, which compiles every CPU extension (and the CUDA one where a
CUDA toolkit is present and a GPU, or `TORCH_CUDA_ARCH_LIST`, says what to build for) with
`torch.utils.cpp_extension.load` into a per-user build directory (`$BOXMASK_EXTENSIONS_DIR`, else
`$XDG_CACHE_HOME/boxmask/torch_extensions/<python>-<torch>-<cpu>`, else `~/.cache/...`). At run time the `load_*`
functions import those builds; torch rebuilds only when the sources or flags change, and its file lock makes
concurrent first uses safe. An extension not built at install is compiled on first use, after one warning saying
so (a label worker does this while starting, not inside a batch). When a build fails (no compiler, no CUDA
toolkit), the loader warns once and returns None, and callers fall back to the PyTorch reference.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shlex
import subprocess
import sys
import warnings
from pathlib import Path
from types import ModuleType

import torch

CSRC = Path(__file__).resolve().parent / "csrc"
CPU_MODULE = "boxmask_message_passing_cpu"
CUDA_MODULE = "boxmask_message_passing_cuda"
MEANFIELD_CPU_MODULE = "boxmask_meanfield_cpu"
SINKHORN_CPU_MODULE = "boxmask_sinkhorn_cpu"
CUDA_EMULATION_MODULE = "boxmask_message_passing_cuda_emulation"
# What an install builds (the CUDA emulation is for tests only).
INSTALLED = (CPU_MODULE, MEANFIELD_CPU_MODULE, SINKHORN_CPU_MODULE, CUDA_MODULE)


def _cpu_tag() -> str:
    """A short digest of this CPU's instruction-set flags: the CPU extensions are built with -march=native, so a
    build must not be reused on another kind of CPU (e.g. a home directory shared across machines)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            flags = next((line for line in fh if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    flags = flags or platform.machine() + platform.processor()
    return hashlib.sha256(flags.encode()).hexdigest()[:8]


def build_root() -> Path:
    """The per-user directory that holds one build folder per extension."""
    override = os.environ.get("BOXMASK_EXTENSIONS_DIR")
    if override:
        return Path(override)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    tag = (f"py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__.replace('+', '_')}"
           f"-cpu{_cpu_tag()}")
    return cache / "boxmask" / "torch_extensions" / tag


def _nvcc_library_dirs(cuda_home: str | None) -> list[str]:
    """Where nvcc itself links libcudart from, asked from `nvcc -dryrun`.

    torch links with -L$CUDA_HOME/lib64, and guesses CUDA_HOME from the nvcc on PATH; when that nvcc is a wrapper
    script outside the toolkit (e.g. /usr/local/bin/nvcc), the guess has no libcudart and the link fails.
    """
    if not cuda_home:
        return []
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    try:
        dry = subprocess.run(
            [nvcc, "-dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
            capture_output=True, text=True, timeout=60, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return []
    dirs = []
    for line in (dry.stdout + dry.stderr).splitlines():
        if "LIBRARIES=" in line:
            dirs += [os.path.normpath(tok[2:]) for tok in shlex.split(line.split("LIBRARIES=", 1)[1]) if tok.startswith("-L")]
    return [d for d in dirs if any(Path(d).glob("libcudart.so*"))]


def _build(name: str, sources: list[Path], cuda: bool, cflags: tuple[str, ...] = ()) -> ModuleType:
    """Compile (or reuse the cached build of) one extension and import it; raises when the build fails.

    cflags: extra host-compiler flags for this extension only."""
    from torch.utils import cpp_extension

    build_dir = build_root() / name
    if name in INSTALLED and not _built(name):
        warnings.warn(f"kernels: the {name} extension was not built at install (./scripts/setup.sh, or python -m "
                      f"kernels.extension, builds it into {build_root()}); compiling it now", RuntimeWarning,
                      stacklevel=4)
    build_dir.mkdir(parents=True, exist_ok=True)
    # torch decides whether to rebuild from the sources and flags alone: a digest of the shared headers in the
    # flags makes a header change rebuild every extension that may include it.
    headers = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(CSRC.glob("*.h")))).hexdigest()[:16]
    cflags = (*cflags, f"-DBOXMASK_HEADERS_{headers}")
    ldflags = ["-fopenmp"]
    if cuda:
        ldflags += [f"-L{d}" for d in _nvcc_library_dirs(cpp_extension.CUDA_HOME)]
    return cpp_extension.load(
        name=name,
        sources=[str(s) for s in sources],
        # Built on first use on the machine that runs it: -march=native lets the loops use its widest vectors.
        extra_cflags=["-O3", "-march=native", "-fopenmp", *cflags],
        extra_ldflags=ldflags,
        extra_cuda_cflags=["-O3"] if cuda else None,
        with_cuda=cuda,
        build_directory=str(build_dir),
        verbose=False,
    )


def _first_error_line(exc: BaseException) -> str:
    """The most telling line of a build failure: the first compiler 'error' line, else the message's first line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    hits = [line for line in lines[1:] if "error" in line.lower()]
    line = (hits or lines or [type(exc).__name__])[0]
    return line if len(line) <= 300 else line[:297] + "..."


def build_cpu() -> ModuleType:
    """Compile (or reuse) the C++/OpenMP message-passing extension; raises when it cannot be built."""
    return _build(CPU_MODULE, [CSRC / "message_passing_cpu.cpp"], cuda=False)


def build_meanfield_cpu() -> ModuleType:
    """Compile (or reuse) the fused C++/OpenMP soft mean-field extension; raises when it cannot be built.

    -fno-trapping-math lets its exp and selects vectorise (nothing reads the floating-point exception flags).
    """
    return _build(MEANFIELD_CPU_MODULE, [CSRC / "meanfield_cpu.cpp"], cuda=False, cflags=("-fno-trapping-math",))


def build_sinkhorn_cpu() -> ModuleType:
    """Compile (or reuse) the C++/OpenMP Sinkhorn extension (absorbed kernel, scaling iterations); raises when it
    cannot be built. -fno-trapping-math: see `build_meanfield_cpu`."""
    return _build(SINKHORN_CPU_MODULE, [CSRC / "sinkhorn_cpu.cpp"], cuda=False, cflags=("-fno-trapping-math",))


def build_cuda() -> ModuleType:
    """Compile (or reuse) the CUDA message-passing extension; raises when it cannot be built (no nvcc...).

    Without a visible GPU, torch compiles for every architecture it knows unless TORCH_CUDA_ARCH_LIST is set.
    """
    return _build(CUDA_MODULE, [CSRC / "message_passing_cuda.cpp", CSRC / "message_passing_cuda.cu"], cuda=True)


def build_cuda_emulation() -> ModuleType:
    """Compile (or reuse) the CPU emulation of the CUDA message-passing kernel (tests only: it checks the
    kernel's per-thread code without a GPU); raises when it cannot be built."""
    return _build(CUDA_EMULATION_MODULE, [CSRC / "message_passing_cuda_emulation.cpp"], cuda=False)


def _load_or_warn(name: str, build) -> ModuleType | None:
    try:
        return build()
    except Exception as exc:  # noqa: BLE001 - any build failure means "use the reference"
        warnings.warn(
            f"kernels: cannot build the {name} extension ({_first_error_line(exc)}); "
            "using the PyTorch reference instead",
            RuntimeWarning,
            stacklevel=4,
        )
        return None


@functools.cache
def load_cpu() -> ModuleType | None:
    """The C++/OpenMP message-passing module, or None (after one warning) when it cannot be built."""
    return _load_or_warn(CPU_MODULE, build_cpu)


@functools.cache
def load_meanfield_cpu() -> ModuleType | None:
    """The fused C++/OpenMP soft mean-field module, or None (after one warning) when it cannot be built."""
    return _load_or_warn(MEANFIELD_CPU_MODULE, build_meanfield_cpu)


@functools.cache
def load_sinkhorn_cpu() -> ModuleType | None:
    """The C++/OpenMP Sinkhorn scaling module, or None (after one warning) when it cannot be built."""
    return _load_or_warn(SINKHORN_CPU_MODULE, build_sinkhorn_cpu)


@functools.cache
def load_cuda() -> ModuleType | None:
    """The CUDA message-passing module, or None (after one warning) when it cannot be built."""
    return _load_or_warn(CUDA_MODULE, build_cuda)


def _built(name: str) -> bool:
    return (build_root() / name / f"{name}.so").exists()


def missing_builds(device: str = "cpu") -> list[str]:
    """The extensions ``device`` uses that this machine has no build of (an install builds them all)."""
    names = [CPU_MODULE, MEANFIELD_CPU_MODULE, SINKHORN_CPU_MODULE] + ([CUDA_MODULE] if device.startswith("cuda")
                                                                       else [])
    return [n for n in names if not _built(n)]


def load_all(device: str = "cpu") -> dict[str, bool]:
    """Load (building when needed) every extension ``device`` uses ("cpu", or "cuda" for the CUDA one too);
    returns {module name: loaded}. Label workers call it while starting, so that no batch pays for a build."""
    loaded = {CPU_MODULE: load_cpu(), MEANFIELD_CPU_MODULE: load_meanfield_cpu(),
              SINKHORN_CPU_MODULE: load_sinkhorn_cpu()}
    if device.startswith("cuda"):
        loaded[CUDA_MODULE] = load_cuda()
    return {name: module is not None for name, module in loaded.items()}


def _cuda_targets() -> str:
    """Why the CUDA extension can be built here ("" when it cannot): a toolkit and something to build for."""
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None:
        return ""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}"
    return "the visible GPU" if torch.cuda.is_available() else ""


def main() -> int:
    """``python -m kernels.extension``: build every extension this machine can use (what scripts/setup.sh runs).
    A failed build is reported and is not an error: the PyTorch reference runs instead."""
    import time

    targets = _cuda_targets()
    jobs = [(CPU_MODULE, build_cpu), (MEANFIELD_CPU_MODULE, build_meanfield_cpu),
            (SINKHORN_CPU_MODULE, build_sinkhorn_cpu)] + ([(CUDA_MODULE, build_cuda)] if targets else [])
    print(f"kernels: C++ extensions in {build_root()} (built when missing or out of date)", file=sys.stderr)
    for name, build in jobs:
        t0 = time.monotonic()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # "not built at install": this is the install
                build()
            print(f"kernels: {name} ready ({time.monotonic() - t0:.0f} s)", file=sys.stderr)
        except Exception as exc:  # noqa: BLE001 - reported; the reference is the fallback
            print(f"kernels: {name} not built ({_first_error_line(exc)}); the PyTorch reference will run",
                  file=sys.stderr)
    if not targets:
        print("kernels: CUDA extension not built (no CUDA toolkit, or no GPU and no TORCH_CUDA_ARCH_LIST); it is "
              "built on first use on a GPU node", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
