"""Message passing: offsets, the three backends against each other and a per-pixel loop, autograd of the reference,
the no-compiler fallback, and the CUDA extension build."""

from __future__ import annotations

import os
import types
import warnings
from pathlib import Path

import pytest
import torch

from kernels import extension
from kernels.message_passing import (
    message_passing,
    message_passing_reference,
    neighbour_offsets,
)


def brute_force(q: torch.Tensor, kernel: torch.Tensor, offsets) -> torch.Tensor:
    B, L, H, W = q.shape
    out = torch.zeros_like(q)
    for b in range(B):
        kb = kernel[b if kernel.shape[0] > 1 else 0]
        for l in range(L):
            for y in range(H):
                for x in range(W):
                    acc = 0.0
                    for k, (dy, dx) in enumerate(offsets):
                        yy, xx = y + dy, x + dx
                        if 0 <= yy < H and 0 <= xx < W:
                            acc += float(kb[k, y, x]) * float(q[b, l, yy, xx])
                    out[b, l, y, x] = acc
    return out


def random_problem(B, L, H, W, K, broadcast, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.rand(B, L, H, W, generator=g, dtype=torch.float64).to(dtype)
    kernel = torch.rand(1 if broadcast else B, K, H, W, generator=g, dtype=torch.float64).to(dtype)
    return q, kernel


def test_neighbour_offsets_follow_unfold_order():
    assert neighbour_offsets(3, 2) == ((-2, -2), (-2, 0), (-2, 2), (0, -2), (0, 2), (2, -2), (2, 0), (2, 2))
    with_centre = neighbour_offsets(3, 1, centre=True)
    assert len(with_centre) == 9 and with_centre[4] == (0, 0)
    # F.unfold's patch order, read off directly from an index image.
    H, W, d = 7, 8, 2
    idx = torch.arange(H * W, dtype=torch.float64).reshape(1, 1, H, W)
    cols = torch.nn.functional.unfold(idx, 3, dilation=d, padding=d).reshape(9, H, W)
    for k, (dy, dx) in enumerate(neighbour_offsets(3, d, centre=True)):
        assert int(cols[k, 3, 3]) == (3 + dy) * W + (3 + dx)
    assert len(neighbour_offsets(5, 1)) == 24


@pytest.mark.parametrize("size,dilation", [(2, 1), (0, 1), (3, 0), (3, 1.5), (True, 1)])
def test_neighbour_offsets_rejects_bad_arguments(size, dilation):
    with pytest.raises(ValueError, match="neighbour_offsets"):
        neighbour_offsets(size, dilation)


@pytest.mark.parametrize("centre", [False, True])
@pytest.mark.parametrize("dilation", [1, 2])
def test_reference_and_cpu_match_per_pixel_loop(dilation, centre):
    offsets = neighbour_offsets(3, dilation, centre)
    q, kernel = random_problem(2, 2, 5, 6, len(offsets), broadcast=False, dtype=torch.float64, seed=dilation)
    expected = brute_force(q, kernel, offsets)
    torch.testing.assert_close(message_passing(q, kernel, offsets, backend="reference"), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(message_passing(q, kernel, offsets, backend="cpu"), expected, rtol=1e-12, atol=1e-12)


CASES = [
    # B, L, H, W, dilation, centre, broadcast
    (1, 1, 1, 1, 1, False, False),
    (3, 2, 1, 7, 2, False, True),  # H smaller than the dilation
    (2, 2, 9, 1, 2, True, False),  # W smaller than the dilation
    (2, 3, 2, 2, 2, False, False),  # every neighbour outside the image
    (4, 2, 13, 17, 1, True, True),
    (5, 2, 16, 31, 2, False, False),
    (2, 1, 33, 40, 1, False, True),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B,L,H,W,dilation,centre,broadcast", CASES)
def test_cpu_backend_agrees_with_reference(B, L, H, W, dilation, centre, broadcast, dtype):
    offsets = neighbour_offsets(3, dilation, centre)
    q, kernel = random_problem(B, L, H, W, len(offsets), broadcast, dtype, seed=B * 100 + H)
    ref = message_passing(q, kernel, offsets, backend="reference")
    fast = message_passing(q, kernel, offsets, backend="cpu")
    assert fast.dtype == dtype and fast.shape == (B, L, H, W)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(message_passing(q, kernel, offsets), fast, rtol=0, atol=0)  # auto on CPU = cpu


def test_cpu_backend_handles_non_contiguous_inputs_and_arbitrary_offsets():
    offsets = ((0, 3), (-1, -4), (2, 0))
    q, kernel = random_problem(3, 2, 6, 9, len(offsets), broadcast=False, dtype=torch.float32)
    q_t = q.transpose(2, 3).contiguous().transpose(2, 3)
    assert not q_t.is_contiguous()
    torch.testing.assert_close(
        message_passing(q_t, kernel, offsets, backend="cpu"), brute_force(q, kernel, offsets), rtol=1e-5, atol=1e-6
    )


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B,L,H,W,dilation,centre,broadcast", CASES)
def test_cuda_backend_agrees_with_reference(B, L, H, W, dilation, centre, broadcast, dtype):
    offsets = neighbour_offsets(3, dilation, centre)
    q, kernel = random_problem(B, L, H, W, len(offsets), broadcast, dtype, seed=B * 100 + H)
    ref = message_passing(q, kernel, offsets, backend="reference")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a silent fallback to the reference would make this test vacuous
        fast = message_passing(q.cuda(), kernel.cuda(), offsets)
    assert fast.is_cuda and fast.dtype == dtype
    torch.testing.assert_close(fast.cpu(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B,L,H,W,dilation,centre,broadcast", CASES)
@pytest.mark.parametrize("blocks,threads", [(1, 1), (3, 7), (2, 256), (65, 32)])
def test_cuda_kernel_code_emulated_on_cpu_agrees_with_reference(B, L, H, W, dilation, centre, broadcast, dtype,
                                                                 blocks, threads):
    """The CUDA kernel's per-thread code (message_passing_element.h) run for every thread of launches smaller
    and larger than the work, so its index arithmetic and grid-stride coverage are checked without a GPU."""
    try:
        module = extension.build_cuda_emulation()
    except Exception as exc:  # noqa: BLE001 - no compiler: nothing to emulate with
        pytest.skip(f"cannot build the CUDA emulation ({exc})")
    offsets = neighbour_offsets(3, dilation, centre)
    q, kernel = random_problem(B, L, H, W, len(offsets), broadcast, dtype, seed=B * 100 + H)
    ref = message_passing(q, kernel, offsets, backend="reference")
    out = module.message_passing_emulated(q, kernel, torch.tensor(offsets, dtype=torch.int64), blocks, threads)
    assert not bool(torch.isnan(out).any())  # every element written by some thread
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_reference_is_differentiable():
    offsets = neighbour_offsets(3, 2)
    q, kernel = random_problem(2, 2, 5, 6, len(offsets), broadcast=True, dtype=torch.float64)
    q.requires_grad_(True)
    kernel.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, k: message_passing_reference(a, k, offsets), (q, kernel))
    # "auto" routes tensors that need gradients to the reference.
    message_passing(q, kernel, offsets).sum().backward()
    assert q.grad is not None and kernel.grad is not None
    with pytest.raises(ValueError, match="not differentiable"):
        message_passing(q, kernel, offsets, backend="cpu")
    with torch.no_grad():
        torch.testing.assert_close(
            message_passing(q, kernel, offsets, backend="cpu"), message_passing_reference(q, kernel, offsets)
        )


def test_fallback_without_compiler_warns_once_and_stays_correct(monkeypatch):
    def no_compiler():
        raise RuntimeError("Ninja is required to load C++ extensions\nerror: g++: command not found")

    monkeypatch.setattr(extension, "build_cpu", no_compiler)
    extension.load_cpu.cache_clear()
    try:
        offsets = neighbour_offsets(3, 1)
        q, kernel = random_problem(2, 2, 6, 7, len(offsets), broadcast=False, dtype=torch.float32)
        with pytest.warns(RuntimeWarning, match="cannot build .*g\\+\\+: command not found.*reference") as record:
            first = message_passing(q, kernel, offsets, backend="cpu")
            second = message_passing(q, kernel, offsets)
        assert len([w for w in record if issubclass(w.category, RuntimeWarning)]) == 1
        expected = brute_force(q, kernel, offsets)
        torch.testing.assert_close(first, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(second, expected, rtol=1e-5, atol=1e-6)
    finally:
        extension.load_cpu.cache_clear()


def test_bad_input_is_rejected_with_clear_messages():
    offsets = neighbour_offsets(3, 1)
    q, kernel = random_problem(2, 2, 4, 5, 8, broadcast=False, dtype=torch.float32)
    with pytest.raises(ValueError, match="q must be a \\(B,L,H,W\\)"):
        message_passing(q[0], kernel, offsets)
    with pytest.raises(ValueError, match="kernel shape"):
        message_passing(q, kernel[:, :, :3], offsets)
    with pytest.raises(ValueError, match="kernel shape"):
        message_passing(q, torch.cat([kernel, kernel]), offsets)
    with pytest.raises(ValueError, match="8 channels but 9 offsets"):
        message_passing(q, kernel, neighbour_offsets(3, 1, centre=True))
    with pytest.raises(ValueError, match="dtype"):
        message_passing(q.double(), kernel, offsets)
    with pytest.raises(ValueError, match="dtype"):
        message_passing(q.half(), kernel.half(), offsets)
    with pytest.raises(ValueError, match="backend must be one of"):
        message_passing(q, kernel, offsets, backend="gpu")
    with pytest.raises(ValueError, match="backend 'cuda' needs CUDA tensors"):
        message_passing(q, kernel, offsets, backend="cuda")


@pytest.mark.nvcc
def test_cuda_extension_compiles(monkeypatch):
    """The CUDA source builds and exposes `message_passing` (compiling is the check on machines without a GPU).

    Cached in the per-user build directory, so only the first run (or a source change) pays the ~1-3 min build.
    """
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None:
        pytest.skip("nvcc / CUDA toolkit not found")
    if not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")  # otherwise torch builds for every architecture it knows
    module = extension.build_cuda()
    assert callable(module.message_passing)


def test_the_install_build_is_used_while_it_matches_its_sources(capsys):
    """pip install (run by scripts/setup.sh) builds each CPU extension into the package as kernels.<name>, with the
    digest of its sources and flags inside; the loader uses it without a word, and so does the setup's check."""
    for name in (extension.CPU_MODULE, extension.MEANFIELD_CPU_MODULE, extension.SINKHORN_CPU_MODULE):
        spec = extension.SPECS[name]
        module, why = extension._installed(spec)
        if module is None:
            pytest.skip(f"{name} {why}: ./scripts/setup.sh builds it")
        assert module.__name__ == f"kernels.{name}" and module.source_digest == f"d{extension.source_digest(spec)}"
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert extension._build(name) is module
    assert extension.missing_builds("cpu") == []
    assert extension.main() == 0
    err = capsys.readouterr().err
    assert f"kernels: {extension.CPU_MODULE} ready (installed in" in err


@pytest.mark.parametrize("installed", ["missing", "stale"])
def test_an_extension_without_a_current_install_build_warns_once_and_is_compiled_on_first_use(
        tmp_path, monkeypatch, capsys, installed):
    """No install build, or one older than its sources (csrc/ edited since the install): the first load says why,
    once, and compiles into the fallback directory; the next load reuses that build. torch's compiler is replaced by
    a stand-in that writes the module file and the build file as torch does."""
    import importlib

    from torch.utils import cpp_extension

    builds = []

    def fake_load(name, sources, build_directory, extra_cflags, **kwargs):
        builds.append(name)
        Path(build_directory, f"{name}.so").write_bytes(b"")
        Path(build_directory, "build.ninja").write_text("cflags = " + " ".join(extra_cflags))
        return types.SimpleNamespace(name=name)

    real_import = importlib.import_module

    def import_module(name, *args):
        if name.startswith("kernels.boxmask_"):
            if installed == "missing":
                raise ModuleNotFoundError(name)
            return types.SimpleNamespace(source_digest="d0000000000000000")   # built from older sources
        return real_import(name, *args)

    monkeypatch.setenv("BOXMASK_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(cpp_extension, "load", fake_load)
    monkeypatch.setattr(importlib, "import_module", import_module)
    why = ("was not built at install" if installed == "missing"
           else "has an install build older than its sources, torch or this CPU")
    assert extension.missing_builds("cpu") == [extension.CPU_MODULE, extension.MEANFIELD_CPU_MODULE,
                                               extension.SINKHORN_CPU_MODULE]
    with pytest.warns(RuntimeWarning, match=f"boxmask_message_passing_cpu extension {why}.*compiling it now"):
        extension.build_cpu()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        extension.build_cpu()                         # built: loaded without a word
        extension.build_cuda_emulation()              # tests-only module: never announced
    assert extension.missing_builds("cpu") == [extension.MEANFIELD_CPU_MODULE, extension.SINKHORN_CPU_MODULE]
    assert extension.main() == 0                      # what setup.sh runs: builds what the install did not
    err = capsys.readouterr().err
    assert builds.count(extension.MEANFIELD_CPU_MODULE) == 1 and builds.count(extension.SINKHORN_CPU_MODULE) == 1
    for name in (extension.MEANFIELD_CPU_MODULE, extension.SINKHORN_CPU_MODULE):
        assert f"kernels: {name} {why}: built into {tmp_path / name}" in err
    assert extension.missing_builds("cpu") == []
    # A source edit (another digest in the flags) makes the fallback build out of date again.
    monkeypatch.setattr(extension, "source_digest", lambda spec: "f" * 16)
    assert extension.missing_builds("cpu") == [extension.CPU_MODULE, extension.MEANFIELD_CPU_MODULE,
                                               extension.SINKHORN_CPU_MODULE]
