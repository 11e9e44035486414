"""Soft mean-field sweeps: the fused C++/OpenMP kernel against the PyTorch reference, per-RoI convergence, the
no-compiler fallback and bad input."""

from __future__ import annotations

import pytest
import torch

from kernels import extension
from kernels.meanfield import colour_classes, masked_softmax, meanfield_sweeps, meanfield_sweeps_reference
from kernels.message_passing import neighbour_offsets


def random_problem(n, h, w, dtype, seed=0, broadcast=False, strength=1.5):
    g = torch.Generator().manual_seed(seed)
    theta = (2.0 * torch.randn(n, 2, h, w, generator=g, dtype=torch.float64)).to(dtype)
    kernel = (strength * torch.rand(1 if broadcast else n, 8, h, w, generator=g, dtype=torch.float64)).to(dtype)
    allowed = torch.rand(n, 1, h, w, generator=g) < 0.8
    return theta, kernel, allowed


def sweep_bruteforce(theta, kernel, allowed, d, iters):
    """Per-pixel loop of the colour-class schedule (no tol), float64: the maths written out once more."""
    theta, kernel = theta.double(), kernel.double()
    n, _, h, w = theta.shape
    offsets = neighbour_offsets(3, d)
    q = masked_softmax(-theta, allowed)
    order = [(0, 0), (0, 1), (1, 0), (1, 1)]
    for _ in range(iters):
        for cy, cx in order:
            new = q.clone()
            for b in range(n):
                kb = kernel[b if kernel.shape[0] > 1 else 0]
                for y in range(h):
                    for x in range(w):
                        if ((y // d) % 2, (x // d) % 2) != (cy, cx):
                            continue
                        msg = torch.zeros(2, dtype=torch.float64)
                        for k, (dy, dx) in enumerate(offsets):
                            yy, xx = y + dy, x + dx
                            if 0 <= yy < h and 0 <= xx < w:
                                msg += kb[k, y, x] * q[b, :, yy, xx]
                        logits = msg - theta[b, :, y, x]
                        if not allowed[b, 0, y, x]:
                            logits[1] = float("-inf")
                        new[b, :, y, x] = torch.softmax(logits, 0)
            q = new
    return q


@pytest.mark.parametrize("d", [1, 2])
def test_reference_and_fused_match_a_per_pixel_loop(d):
    theta, kernel, allowed = random_problem(2, 7, 9, torch.float64, seed=d)
    expected = sweep_bruteforce(theta, kernel, allowed, d, iters=3)
    ref = meanfield_sweeps_reference(theta, kernel, allowed, d, 3, 0.0)
    fused = meanfield_sweeps(theta, kernel, allowed, d, 3, 0.0, backend="cpu")
    torch.testing.assert_close(ref, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(fused, expected, rtol=0, atol=1e-12)


CASES = [
    # n, h, w, dilation, broadcast
    (1, 1, 1, 1, False),
    (3, 1, 7, 2, True),    # height below the dilation
    (2, 9, 1, 2, False),   # width below the dilation
    (2, 2, 2, 2, False),   # every neighbour outside the image
    (4, 13, 17, 1, True),
    (5, 16, 31, 2, False),
    (3, 20, 23, 3, False),
    (2, 64, 64, 1, False),
]


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("n,h,w,d,broadcast", CASES)
@pytest.mark.parametrize("iters", [0, 1, 6])
def test_fused_agrees_with_reference(n, h, w, d, broadcast, iters, dtype, atol):
    theta, kernel, allowed = random_problem(n, h, w, dtype, seed=n * 31 + h, broadcast=broadcast)
    ref = meanfield_sweeps_reference(theta, kernel, allowed, d, iters, 0.0)
    fused = meanfield_sweeps(theta, kernel, allowed, d, iters, 0.0, backend="cpu")
    assert fused.dtype == dtype and fused.shape == (n, 2, h, w) and not fused.requires_grad
    torch.testing.assert_close(fused, ref, rtol=0, atol=atol)
    assert bool((fused[:, 1:][~allowed] == 0).all())
    torch.testing.assert_close(fused.sum(1), torch.ones(n, h, w, dtype=dtype), rtol=0, atol=4 * torch.finfo(dtype).eps)


def test_fused_marginals_keep_tiny_probabilities_accurate():
    # Very confident unaries: the small marginal must come out as sigmoid(-|z|), not as 1 - (1 - tiny) = 0.
    theta, kernel, allowed = random_problem(2, 12, 12, torch.float64, seed=3)
    theta = 20 * theta
    allowed[:] = True
    ref = meanfield_sweeps_reference(theta, kernel, allowed, 1, 4, 0.0)
    fused = meanfield_sweeps(theta, kernel, allowed, 1, 4, 0.0, backend="cpu")
    small = ref < 1e-8
    assert bool(small.any())
    torch.testing.assert_close(fused[small], ref[small], rtol=1e-9, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_convergence_is_per_roi_and_matches_reference(dtype):
    # Weak couplings converge in a few sweeps, strong ones take many: each RoI stops on its own.
    theta, kernel, allowed = random_problem(4, 24, 24, dtype, seed=7)
    kernel = kernel * torch.tensor([0.05, 2.0, 0.05, 1.0], dtype=dtype)[:, None, None, None]
    tol = 1e-4
    ref = meanfield_sweeps_reference(theta, kernel, allowed, 1, 200, tol)
    fused = meanfield_sweeps(theta, kernel, allowed, 1, 200, tol, backend="cpu")
    torch.testing.assert_close(fused, ref, rtol=0, atol=1e-5 if dtype == torch.float32 else 1e-10)
    for b in range(4):
        alone = meanfield_sweeps(theta[b : b + 1], kernel[b : b + 1], allowed[b : b + 1], 1, 200, tol, backend="cpu")
        torch.testing.assert_close(alone, fused[b : b + 1], rtol=0, atol=0)
    # A converged RoI is a fixed point to the tolerance: one more sweep moves it by at most ~tol.
    more = meanfield_sweeps_reference(theta, kernel, allowed, 1, 201, 0.0)
    assert float((more - ref).abs().max()) < 10 * tol


def test_sweeps_count_is_reported_by_the_extension():
    module = extension.load_meanfield_cpu()
    if module is None:
        pytest.skip("no C++ compiler")
    theta, kernel, allowed = random_problem(3, 16, 16, torch.float64, seed=2, strength=0.1)
    _, sweeps = module.meanfield_sweeps(theta, kernel, allowed[:, 0].to(torch.uint8), 1, 50, 1e-6, 1)
    assert sweeps.tolist() == [int(s) for s in sweeps] and bool((sweeps >= 1).all() and (sweeps < 50).all())
    _, capped = module.meanfield_sweeps(theta, kernel, allowed[:, 0].to(torch.uint8), 1, 2, 0.0, 2)
    assert capped.tolist() == [2, 2, 2]


def test_thread_count_does_not_change_the_result():
    theta, kernel, allowed = random_problem(6, 20, 18, torch.float32, seed=4)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = meanfield_sweeps(theta, kernel, allowed, 2, 5, 1e-6, backend="cpu")
        torch.set_num_threads(2)
        two = meanfield_sweeps(theta, kernel, allowed, 2, 5, 1e-6, backend="cpu")
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(one, two)


def test_the_reference_backend_never_loads_the_extension_and_matches_a_per_pixel_loop(monkeypatch):
    def no_extension():
        raise AssertionError("backend='reference' loaded the C++ extension")

    monkeypatch.setattr(extension, "load_meanfield_cpu", no_extension)
    theta, kernel, allowed = random_problem(2, 10, 11, torch.float64, seed=5)
    got = meanfield_sweeps(theta, kernel, allowed, 1, 3, 0.0, backend="reference")
    torch.testing.assert_close(got, sweep_bruteforce(theta, kernel, allowed, 1, 3), rtol=1e-10, atol=1e-10)


def test_fallback_without_compiler_warns_once_and_stays_correct(monkeypatch):
    def no_compiler():
        raise RuntimeError("Ninja is required to load C++ extensions\nerror: g++: command not found")

    monkeypatch.setattr(extension, "build_meanfield_cpu", no_compiler)
    extension.load_meanfield_cpu.cache_clear()
    try:
        theta, kernel, allowed = random_problem(2, 9, 8, torch.float64, seed=6)
        expected = meanfield_sweeps_reference(theta, kernel, allowed, 1, 4, 0.0)
        with pytest.warns(RuntimeWarning, match="cannot build .*meanfield.*reference") as record:
            first = meanfield_sweeps(theta, kernel, allowed, 1, 4, 0.0)
            second = meanfield_sweeps(theta, kernel, allowed, 1, 4, 0.0, backend="cpu")
        assert len([w for w in record if issubclass(w.category, RuntimeWarning)]) == 1
        # The fallback's message passing may run on the C++ message-passing backend: rounding-level differences.
        torch.testing.assert_close(first, expected, rtol=0, atol=1e-12)
        torch.testing.assert_close(second, expected, rtol=0, atol=1e-12)
    finally:
        extension.load_meanfield_cpu.cache_clear()


def test_colour_classes_partition_without_neighbours_in_a_class():
    for d in (1, 2, 3):
        classes = colour_classes(9, 11, d, torch.device("cpu"))
        assert torch.equal(sum(c.int() for c in classes), torch.ones(9, 11, dtype=torch.int))
        for c in classes:
            ys, xs = torch.nonzero(c, as_tuple=True)
            for dy, dx in neighbour_offsets(3, d):
                yy, xx = ys + dy, xs + dx
                ok = (yy >= 0) & (yy < 9) & (xx >= 0) & (xx < 11)
                assert not bool(c[yy[ok], xx[ok]].any())


def test_bad_input_is_rejected_with_clear_messages():
    theta, kernel, allowed = random_problem(2, 6, 7, torch.float32)
    with pytest.raises(ValueError, match="theta must be a \\(N,2,h,w\\)"):
        meanfield_sweeps(theta[:, :1], kernel, allowed)
    with pytest.raises(ValueError, match="float32 or float64"):
        meanfield_sweeps(theta.half(), kernel.half(), allowed)
    with pytest.raises(ValueError, match="kernel must be"):
        meanfield_sweeps(theta, kernel[:, :7], allowed)
    with pytest.raises(ValueError, match="kernel dtype"):
        meanfield_sweeps(theta, kernel.double(), allowed)
    with pytest.raises(ValueError, match="fg_allowed must be"):
        meanfield_sweeps(theta, kernel, allowed.float())
    with pytest.raises(ValueError, match="dilation"):
        meanfield_sweeps(theta, kernel, allowed, dilation=0)
    with pytest.raises(ValueError, match="iters"):
        meanfield_sweeps(theta, kernel, allowed, iters=-1)
    with pytest.raises(ValueError, match="tol"):
        meanfield_sweeps(theta, kernel, allowed, tol=float("nan"))
    with pytest.raises(ValueError, match="backend must be one of"):
        meanfield_sweeps(theta, kernel, allowed, backend="gpu")
