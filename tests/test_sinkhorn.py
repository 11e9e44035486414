"""Sinkhorn: DiscoBox / POT goldens, marginals, small epsilon, POT on random problems, per-pair bookkeeping."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from kernels import extension
from kernels.sinkhorn import ABSORB, CAPPED, CONVERGED, UNDERFLOW, scale_reference, sinkhorn, sinkhorn_official
from goldens import load_golden





def random_problem(B, n, m, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    cost = torch.rand(B, n, m, generator=g, dtype=torch.float64)
    a = torch.rand(B, n, generator=g, dtype=torch.float64) + 0.1
    b = torch.rand(B, m, generator=g, dtype=torch.float64) + 0.1
    a = a / a.sum(-1, keepdim=True) * 2.0  # arbitrary (non-unit) total mass
    b = b / b.sum(-1, keepdim=True) * 2.0
    return cost.to(dtype), a.to(dtype), b.to(dtype)


def plan_violation(plan, a, b):
    return (plan.sum(-1) - a).abs().sum(-1) + (plan.sum(-2) - b).abs().sum(-1)


@pytest.mark.parametrize("name", ["discobox_sinkhorn_n49_b5", "discobox_sinkhorn_n196_b2"])
def test_official_matches_discobox_and_pot_goldens(name):
    z = load_golden(name)
    sim, mu, nu = (torch.from_numpy(z[k]) for k in ("sim", "mu", "nu"))
    # appearance_similarityOT's cost and marginals, in float32 as the reference computes them
    cost = 1 - sim.clamp(0.3, 0.7)
    m0, m1 = (torch.from_numpy(z[k]).clamp(0.3, 0.7) for k in ("m0", "m1"))
    torch.testing.assert_close(m0 / m0.sum(-1, keepdim=True), mu, rtol=0, atol=0)
    torch.testing.assert_close(m1 / m1.sum(-1, keepdim=True), nu, rtol=0, atol=0)

    t32 = sinkhorn_official(cost, mu, nu, reg=0.05)
    torch.testing.assert_close(t32, torch.from_numpy(z["T_ref_f32"]), rtol=1e-5, atol=1e-9)
    t64 = sinkhorn_official(cost.double(), mu.double(), nu.double(), reg=0.05)
    torch.testing.assert_close(t64, torch.from_numpy(z["T_ref_f64"]), rtol=1e-9, atol=1e-15)
    torch.testing.assert_close(t64, torch.from_numpy(z["T_pot_f64"]), rtol=1e-9, atol=1e-15)
    torch.testing.assert_close(t32.double(), torch.from_numpy(z["T_ref_f64"]), rtol=1e-4, atol=1e-6)

    # The convergent solver runs the same iteration: capped at 100 iterations it lands on the same plan.
    capped = sinkhorn(cost.double(), mu.double(), nu.double(), epsilon=0.05, tol=0.0, max_iter=100)
    assert capped.iters.tolist() == [100] * cost.shape[0]
    torch.testing.assert_close(capped.plan, torch.from_numpy(z["T_ref_f64"]), rtol=1e-9, atol=1e-15)
    converged = sinkhorn(cost, mu, nu, epsilon=0.05, tol=1e-6)
    assert bool((converged.err <= 1e-6).all()) and bool((converged.iters < 1000).all())
    torch.testing.assert_close(converged.plan.double(), torch.from_numpy(z["T_ref_f64"]), rtol=1e-3, atol=1e-6)


def test_rectangular_golden_including_converged_pot_plan():
    z = load_golden("discobox_sinkhorn_rect30x45")
    cost, a, b = (torch.from_numpy(z[k]) for k in ("cost", "a", "b"))
    reg = 0.1
    torch.testing.assert_close(sinkhorn_official(cost, a, b, reg), torch.from_numpy(z["T_ref_f64"]), rtol=1e-9, atol=0)
    torch.testing.assert_close(sinkhorn_official(cost, a, b, reg), torch.from_numpy(z["T_pot_f64"]), rtol=1e-9, atol=0)
    t32 = sinkhorn_official(cost.float(), a.float(), b.float(), reg)
    torch.testing.assert_close(t32, torch.from_numpy(z["T_ref_f32"]), rtol=1e-5, atol=1e-9)

    res = sinkhorn(cost, a, b, epsilon=reg, tol=1e-12, max_iter=10000)
    assert float(res.err[0]) <= 1e-12 and int(res.iters[0]) < 100
    torch.testing.assert_close(res.plan, torch.from_numpy(z["T_pot_converged_f64"]), rtol=1e-9, atol=1e-15)
    res32 = sinkhorn(cost.float(), a.float(), b.float(), epsilon=reg, tol=1e-6)
    torch.testing.assert_close(res32.plan.double(), torch.from_numpy(z["T_pot_converged_f64"]), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-5)])
@pytest.mark.parametrize("epsilon", [0.5, 0.05, 0.01])
def test_plan_meets_its_marginals(dtype, tol, epsilon):
    cost, a, b = random_problem(4, 17, 23, dtype, seed=int(epsilon * 1000))
    res = sinkhorn(cost, a, b, epsilon, tol=tol, max_iter=5000)
    assert res.plan.shape == (4, 17, 23) and res.plan.dtype == dtype and res.iters.dtype == torch.int64
    assert bool(torch.isfinite(res.plan).all()) and bool((res.plan >= 0).all())
    assert bool((res.err <= tol).all()) and bool((res.iters < 5000).all())
    rounding = 1e-6 if dtype == torch.float32 else 1e-12
    assert bool((plan_violation(res.plan, a, b) <= tol + rounding).all())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_small_epsilon_is_finite_and_converges(dtype):
    ot = pytest.importorskip("ot")
    cost, a, b = random_problem(2, 12, 9, dtype, seed=3)
    a, b = a / 2, b / 2
    if dtype == torch.float32:
        # exp(-C/eps) underflows to 0 for C > 0.09, so the unstabilised Sinkhorn gives NaN
        assert bool(torch.isnan(sinkhorn_official(cost, a, b, reg=1e-3)).any())
    res = sinkhorn(cost, a, b, epsilon=1e-3, tol=1e-4, max_iter=20000)
    assert bool(torch.isfinite(res.plan).all())
    assert bool((res.err <= 1e-4).all()) and bool((res.iters < 20000).all())
    # near-zero entropy: the transport cost approaches the exact OT cost
    for k in range(2):
        exact = ot.emd2(a[k].double().numpy(), b[k].double().numpy(), cost[k].double().numpy())
        assert abs(float((res.plan[k].double() * cost[k].double()).sum()) - exact) < 5e-3


def test_agrees_with_pot_on_random_problems():
    ot = pytest.importorskip("ot")
    cost, a, b = random_problem(3, 25, 31, torch.float64, seed=7)
    a, b = a / 2, b / 2
    res = sinkhorn(cost, a, b, epsilon=0.02, tol=1e-11, max_iter=20000)
    for k in range(3):
        pot = ot.sinkhorn(a[k].numpy(), b[k].numpy(), cost[k].numpy(), 0.02, numItermax=20000, stopThr=1e-13)
        np.testing.assert_allclose(res.plan[k].numpy(), pot, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("eps_scaling", [False, True])
def test_pairs_are_independent_and_stop_at_their_own_iteration(eps_scaling):
    cost, a, b = random_problem(3, 10, 14, torch.float64, seed=11)
    cost[1] *= 0.05  # nearly uniform cost converges much faster than the others (and needs no epsilon ladder)
    cost[2] *= 3.0  # a wider range: a longer ladder
    batch = sinkhorn(cost, a, b, epsilon=0.02, tol=1e-8, max_iter=5000, eps_scaling=eps_scaling)
    assert len(set(batch.iters.tolist())) == 3
    for k in range(3):
        alone = sinkhorn(
            cost[k : k + 1], a[k : k + 1], b[k : k + 1], epsilon=0.02, tol=1e-8, max_iter=5000, eps_scaling=eps_scaling
        )
        assert int(alone.iters[0]) == int(batch.iters[k])
        torch.testing.assert_close(alone.plan[0], batch.plan[k], rtol=1e-12, atol=1e-15)


def _scale_problem(B, n, m, dtype, seed, spread):
    g = torch.Generator().manual_seed(seed)
    cost = torch.rand(B, n, m, generator=g, dtype=torch.float64) * spread
    a = torch.rand(B, n, generator=g, dtype=torch.float64) + 0.2
    b = torch.rand(B, m, generator=g, dtype=torch.float64) + 0.2
    a, b = a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)
    return torch.exp(-cost).to(dtype), a.to(dtype), b.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_scaling_loop_matches_the_reference_outcome_by_outcome(dtype):
    module = extension.load_sinkhorn_cpu()
    if module is None:
        pytest.skip("no C++ compiler")
    # spread 1: converges; spread 60 (float32) / 400 (float64): leaves the safe range; tiny max_iters: capped.
    big = 60.0 if dtype == torch.float32 else 400.0
    for spread, max_iters, tol in [(1.0, 500, 1e-5), (3.0, 2, 1e-9), (big, 500, 1e-5)]:
        kern, a, b = _scale_problem(4, 17, 23, dtype, seed=int(spread), spread=spread)
        if spread == big:
            kern[1:, :, 0] = kern[1:, :, 0] * 1e-30 if dtype == torch.float64 else kern[1:, :, 0] * 1e-12
        tol_t = torch.full((4,), tol, dtype=dtype)
        iters_t = torch.full((4,), max_iters, dtype=torch.int64)
        log_tau = 0.25 * float(np.log(torch.finfo(dtype).max))
        ref = scale_reference(kern, a, b, tol_t, iters_t, log_tau)
        fast = module.sinkhorn_scale(kern, a, b, tol_t, iters_t, log_tau, 2)
        assert fast[4].tolist() == ref[4].tolist()  # status
        assert fast[2].tolist() == ref[2].tolist()  # iterations
        rtol = 1e-4 if dtype == torch.float32 else 1e-10
        torch.testing.assert_close(fast[0], ref[0], rtol=rtol, atol=0)
        torch.testing.assert_close(fast[1], ref[1], rtol=rtol, atol=0)
        stopped = ref[4] <= CAPPED
        torch.testing.assert_close(fast[3][stopped], ref[3][stopped], rtol=1e-3 if dtype == torch.float32 else 1e-8,
                                   atol=1e-7)
    assert set(ref[4].tolist()) <= {CONVERGED, CAPPED, ABSORB, UNDERFLOW}


def test_scaling_loop_reports_every_outcome():
    kern, a, b = _scale_problem(4, 9, 9, torch.float64, seed=0, spread=1.0)
    kern[2, :, 0] = 1e-250  # v_0 = b_0 / (K^T u)_0 ~ 1e249: finite but beyond the safe range
    kern[3, :, 0] = 0.0  # v_0 = inf: underflow
    tol = torch.tensor([1e-6, 1e-14, 1e-6, 1e-6], dtype=torch.float64)
    max_iters = torch.tensor([500, 3, 500, 500])
    log_tau = 0.25 * float(np.log(torch.finfo(torch.float64).max))
    runs = {"reference": scale_reference(kern, a, b, tol, max_iters, log_tau)}
    module = extension.load_sinkhorn_cpu()
    if module is not None:
        runs["cpu"] = module.sinkhorn_scale(kern, a, b, tol, max_iters, log_tau, 1)
    for name, (u, _, iters, viol, status) in runs.items():
        assert status.tolist() == [CONVERGED, CAPPED, ABSORB, UNDERFLOW], name
        assert iters.tolist()[1:] == [3, 1, 0], name
        assert float(viol[0]) <= 1e-6, name
        assert torch.equal(u[3], torch.ones(9, dtype=torch.float64)), name  # underflow: the last safe scalings


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("epsilon", [0.5, 0.05, 0.005])
def test_backends_agree(dtype, epsilon):
    cost, a, b = random_problem(4, 30, 26, dtype, seed=13)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    ref = sinkhorn(cost, a, b, epsilon, tol=tol, max_iter=3000, backend="reference")
    fast = sinkhorn(cost, a, b, epsilon, tol=tol, max_iter=3000, backend="cpu")
    assert bool((fast.err <= tol).all()) and bool((ref.err <= tol).all())
    # float32 rounding may shift a stop by an iteration; the plans agree to the tolerance either way.
    assert (fast.iters - ref.iters).abs().max() <= (0 if dtype == torch.float64 else 2)
    torch.testing.assert_close(fast.plan, ref.plan, rtol=0, atol=10 * tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_first_scaling_beyond_the_safe_range_still_progresses(dtype):
    # One column far more costly than the rest: the very first v = b / (K^T u) after building K~ leaves the safe
    # range while finite. Absorbing the previous (all-ones) scalings there made no progress and looped for ever.
    n = 6
    cost = torch.rand(1, n, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(dtype)
    cost[:, :, 0] = 30.0 if dtype == torch.float32 else 200.0
    a = torch.full((1, n), 1.0 / n, dtype=dtype)
    res = sinkhorn(cost, a, a.clone(), 1.0, tol=1e-5, max_iter=500, eps_scaling=False)
    assert int(res.iters[0]) < 500 and float(res.err[0]) <= 1e-5
    torch.testing.assert_close(res.plan.sum(1), a, rtol=0, atol=1e-5)
    torch.testing.assert_close(res.plan.sum(2), a, rtol=0, atol=1e-5)


def test_iteration_cap_is_reported():
    cost, a, b = random_problem(2, 10, 10, torch.float64, seed=5)
    for max_iter in (1, 3, 7, 40):
        res = sinkhorn(cost, a, b, epsilon=0.002, tol=1e-12, max_iter=max_iter)
        assert res.iters.tolist() == [max_iter, max_iter]
        assert bool((res.err > 1e-12).all()) and bool(torch.isfinite(res.plan).all())
        torch.testing.assert_close(res.err, plan_violation(res.plan, a, b), rtol=1e-6, atol=1e-12)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    cost, a, b = random_problem(3, 40, 30, torch.float32, seed=2)
    cpu = sinkhorn(cost, a, b, epsilon=0.02, tol=1e-5)
    gpu = sinkhorn(cost.cuda(), a.cuda(), b.cuda(), epsilon=0.02, tol=1e-5)
    assert gpu.plan.is_cuda
    torch.testing.assert_close(gpu.plan.cpu(), cpu.plan, rtol=1e-3, atol=1e-6)


def test_bad_input_is_rejected_with_clear_messages():
    cost, a, b = random_problem(2, 5, 6)
    with pytest.raises(ValueError, match="cost must be a \\(B,n,m\\)"):
        sinkhorn(cost[0], a, b, 0.1)
    with pytest.raises(ValueError, match="a must have shape \\(2, 5\\)"):
        sinkhorn(cost, a[:, :4], b, 0.1)
    with pytest.raises(ValueError, match="b must have shape"):
        sinkhorn_official(cost, a, b[:1])
    with pytest.raises(ValueError, match="dtype"):
        sinkhorn(cost.float(), a, b, 0.1)
    with pytest.raises(ValueError, match="epsilon"):
        sinkhorn(cost, a, b, 0.0)
    with pytest.raises(ValueError, match="backend must be one of"):
        sinkhorn(cost, a, b, 0.1, backend="gpu")
    with pytest.raises(ValueError, match="max_iter"):
        sinkhorn(cost, a, b, 0.1, max_iter=0)
    with pytest.raises(ValueError, match="strictly positive"):
        sinkhorn(cost, a.clone().index_fill_(1, torch.tensor([0]), 0.0), b, 0.1)
    with pytest.raises(ValueError, match="equal mass.*pair 1"):
        sinkhorn(cost, a, b * torch.tensor([[1.0], [1.5]], dtype=torch.float64), 0.1)
    with pytest.raises(ValueError, match="NaN"):
        sinkhorn(cost.clone().fill_(float("nan")), a, b, 0.1)
    with pytest.raises(ValueError, match="reg"):
        sinkhorn_official(cost, a, b, reg=-1.0)
    with pytest.raises(ValueError, match="at least one point"):
        sinkhorn(cost[:, :0], a[:, :0], b, 0.1)
    empty = sinkhorn(cost[:0], a[:0], b[:0], 0.1)
    assert empty.plan.shape == (0, 5, 6) and empty.iters.shape == (0,) and empty.err.shape == (0,)
