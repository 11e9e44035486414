"""The C++/OpenMP and CUDA extensions in `kernels/csrc`: built at install, loaded at run time.

`pip install` (which `scripts/setup.sh` runs) compiles every CPU extension, and the CUDA one where a CUDA toolkit
is present and a GPU or `TORCH_CUDA_ARCH_LIST` says what to build for, into this package as `kernels.<name>`
(`setup.py` takes the list and flags from `SPECS` here). Each build carries the digest of its sources, flags, torch
version and CPU kind (`source_digest`), and the `load_*` functions use it only while it matches. Otherwise (not
built at install, csrc/ edited since, another torch or CPU) the extension is compiled on first use, after one
warning saying why, with `torch.utils.cpp_extension.load` into a per-user directory (`$BOXMASK_EXTENSIONS_DIR`,
else `$XDG_CACHE_HOME/boxmask/torch_extensions/<python>-<torch>-<cpu>`, else `~/.cache/...`); torch's file lock
makes concurrent first uses safe, and a label worker does this while starting, not inside a batch. When a build
fails (no compiler, no CUDA toolkit), the loader warns once and returns None, and callers fall back to the
PyTorch reference.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import os
import platform
import shlex
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

CSRC = Path(__file__).resolve().parent / "csrc"
CPU_MODULE = "boxmask_message_passing_cpu"
CUDA_MODULE = "boxmask_message_passing_cuda"
MEANFIELD_CPU_MODULE = "boxmask_meanfield_cpu"
SINKHORN_CPU_MODULE = "boxmask_sinkhorn_cpu"
CUDA_EMULATION_MODULE = "boxmask_message_passing_cuda_emulation"


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


@dataclass(frozen=True)
class Spec:
    """One extension: its sources under csrc/, whether nvcc builds part of it, and its own host-compiler flags."""

    name: str
    sources: tuple[str, ...]
    cuda: bool = False
    cflags: tuple[str, ...] = ()
    installed: bool = True              # built by an install (the CUDA emulation is for tests only)


SPECS = {spec.name: spec for spec in (
    Spec(CPU_MODULE, ("message_passing_cpu.cpp",)),
    # -fno-trapping-math lets their exp and selects vectorise (nothing reads the floating-point exception flags).
    Spec(MEANFIELD_CPU_MODULE, ("meanfield_cpu.cpp",), cflags=("-fno-trapping-math",)),
    Spec(SINKHORN_CPU_MODULE, ("sinkhorn_cpu.cpp",), cflags=("-fno-trapping-math",)),
    Spec(CUDA_MODULE, ("message_passing_cuda.cpp", "message_passing_cuda.cu"), cuda=True),
    Spec(CUDA_EMULATION_MODULE, ("message_passing_cuda_emulation.cpp",), installed=False),
)}
# Built on the machine that runs it: -march=native lets the loops use its widest vectors.
BASE_CFLAGS = ("-O3", "-march=native", "-fopenmp")


def source_digest(spec: Spec) -> str:
    """Digest (16 hex) of what a build of ``spec`` depends on: its sources, the shared headers, its flags, torch's
    version and this CPU's kind (-march=native). Compiled into the module (``source_digest``), so an installed
    build that no longer matches is not used, and in the fallback build's flags, so torch rebuilds it."""
    h = hashlib.sha256(repr((spec.sources, spec.cflags, BASE_CFLAGS, torch.__version__, _cpu_tag())).encode())
    for path in [CSRC / s for s in spec.sources] + sorted(CSRC.glob("*.h")):
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _flags(spec: Spec) -> tuple[list[str], list[str], list[str] | None]:
    """(host-compiler flags, linker flags, nvcc flags): the same for the install build and the fallback build."""
    from torch.utils import cpp_extension

    cflags = [*BASE_CFLAGS, *spec.cflags, f"-DBOXMASK_SOURCE_DIGEST=d{source_digest(spec)}"]
    ldflags = ["-fopenmp"]
    if spec.cuda:
        ldflags += [f"-L{d}" for d in _nvcc_library_dirs(cpp_extension.CUDA_HOME)]
    return cflags, ldflags, (["-O3"] if spec.cuda else None)


def _installed(spec: Spec) -> tuple[ModuleType | None, str]:
    """The build an install put in this package (``kernels.<name>``), or None and why it cannot be used."""
    try:
        module = importlib.import_module(f"{__package__ or 'kernels'}.{spec.name}")
    except ModuleNotFoundError:
        return None, "was not built at install"
    except Exception as exc:  # noqa: BLE001 - e.g. built against another torch: undefined symbols
        return None, f"has an install build that does not load ({_first_error_line(exc)})"
    if getattr(module, "source_digest", "") != f"d{source_digest(spec)}":
        return None, "has an install build older than its sources, torch or this CPU"
    return module, ""


def _cached(spec: Spec) -> bool:
    """Whether the fallback build directory holds a build of the current sources and flags."""
    build_dir = build_root() / spec.name
    ninja = build_dir / "build.ninja"
    return ((build_dir / f"{spec.name}.so").exists() and ninja.exists()
            and f"d{source_digest(spec)}" in ninja.read_text(errors="replace"))


def _build(name: str) -> ModuleType:
    """The install build of one extension when it matches its sources, else the fallback build (compiled, with one
    warning, when missing or out of date); raises when the build fails."""
    from torch.utils import cpp_extension

    spec = SPECS[name]
    module, why = _installed(spec) if spec.installed else (None, "")
    if module is not None:
        return module
    build_dir = build_root() / name
    if spec.installed and not _cached(spec):
        warnings.warn(f"kernels: the {name} extension {why}; compiling it now into {build_dir} (about a minute; "
                      f"./scripts/setup.sh or pip install builds it once)", RuntimeWarning, stacklevel=4)
    build_dir.mkdir(parents=True, exist_ok=True)
    cflags, ldflags, nvcc = _flags(spec)
    return cpp_extension.load(
        name=name,
        sources=[str(CSRC / s) for s in spec.sources],
        extra_cflags=cflags,
        extra_ldflags=ldflags,
        extra_cuda_cflags=nvcc,
        with_cuda=spec.cuda,
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
    return _build(CPU_MODULE)


def build_meanfield_cpu() -> ModuleType:
    """Compile (or reuse) the fused C++/OpenMP soft mean-field extension; raises when it cannot be built."""
    return _build(MEANFIELD_CPU_MODULE)


def build_sinkhorn_cpu() -> ModuleType:
    """Compile (or reuse) the C++/OpenMP Sinkhorn extension (absorbed kernel, scaling iterations); raises when it
    cannot be built."""
    return _build(SINKHORN_CPU_MODULE)


def build_cuda() -> ModuleType:
    """Compile (or reuse) the CUDA message-passing extension; raises when it cannot be built (no nvcc...).

    Without a visible GPU, torch compiles for every architecture it knows unless TORCH_CUDA_ARCH_LIST is set.
    """
    return _build(CUDA_MODULE)


def build_cuda_emulation() -> ModuleType:
    """Compile (or reuse) the CPU emulation of the CUDA message-passing kernel (tests only: it checks the
    kernel's per-thread code without a GPU); raises when it cannot be built."""
    return _build(CUDA_EMULATION_MODULE)


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


def _install_names(cuda: bool) -> list[str]:
    """The extensions an install builds: the CPU ones, and with ``cuda`` the CUDA one."""
    return [spec.name for spec in SPECS.values() if spec.installed and (cuda or not spec.cuda)]


def missing_builds(device: str = "cpu") -> list[str]:
    """The extensions ``device`` uses that neither the install nor the fallback directory has a current build of."""
    return [name for name in _install_names(device.startswith("cuda"))
            if _installed(SPECS[name])[0] is None and not _cached(SPECS[name])]


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


def setuptools_extensions() -> tuple[list, dict]:
    """``ext_modules`` and ``cmdclass`` for setup.py: every installed extension this machine can build, as
    ``kernels.<name>``, with the flags of the fallback build. A build that fails leaves its extension out of the
    install (compiled on first use, or the PyTorch reference runs) instead of failing the install."""
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    class BuildOptional(BuildExtension):
        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # noqa: BLE001 - setuptools skips copying an optional extension not built
                self.warn(f"kernels: {ext.name} not built ({_first_error_line(exc)}); it is compiled on first use, "
                          f"or the PyTorch reference runs")

    modules = []
    for spec in (SPECS[name] for name in _install_names(bool(_cuda_targets()))):
        cflags, ldflags, nvcc = _flags(spec)
        sources = [f"kernels/csrc/{s}" for s in spec.sources]
        if spec.cuda:
            modules.append(CUDAExtension(f"kernels.{spec.name}", sources, extra_link_args=ldflags, optional=True,
                                         extra_compile_args={"cxx": cflags, "nvcc": nvcc}))
        else:
            modules.append(CppExtension(f"kernels.{spec.name}", sources, extra_compile_args=cflags,
                                        extra_link_args=ldflags, optional=True))
    return modules, {"build_ext": BuildOptional}


def main() -> int:
    """``python -m kernels.extension``: say which extensions are ready, and build any this machine can use that
    the install did not (e.g. after an edit of csrc/) into the fallback directory. A failed build is reported and
    is not an error: the PyTorch reference runs instead."""
    import time

    targets = _cuda_targets()
    for name in _install_names(bool(targets)):
        t0 = time.monotonic()
        module, why = _installed(SPECS[name])
        if module is not None:
            print(f"kernels: {name} ready (installed in {Path(module.__file__).parent})", file=sys.stderr)
            continue
        try:
            done = "ready in" if _cached(SPECS[name]) else "built into"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # said here, once
                _build(name)
            print(f"kernels: {name} {why}: {done} {build_root() / name} ({time.monotonic() - t0:.0f} s)",
                  file=sys.stderr)
        except Exception as exc:  # noqa: BLE001 - reported; the reference is the fallback
            print(f"kernels: {name} not built ({_first_error_line(exc)}); the PyTorch reference will run",
                  file=sys.stderr)
    if not targets:
        print("kernels: CUDA extension not built (no CUDA toolkit, or no GPU and no TORCH_CUDA_ARCH_LIST); it is "
              "built on first use on a GPU node", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
