"""Correspondence: DiscoBox solve / appearance OT goldens, and the paper's ICM with Sinkhorn."""
from __future__ import annotations


import numpy as np
import pytest
import torch

import teacher.correspondence as corr
from teacher.config import CorrespondenceConfig
from teacher.correspondence import (
    T_reweighted,
    appearance_similarityOT,
    corr_loss,
    correspond,
    cross_image_unary,
    geometric_term,
    mask_marginal,
    official_solve,
    pass_message,
    relu_and_l2_norm_feat,
    superres_T,
)
from goldens import golden_tensors





F32 = dict(rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("case", ["k5_7x7_c32", "k5_14x14_c16"])
def test_official_solve_matches_discobox(case):
    z = golden_tensors(f"discobox_corrsolve_{case}")
    meta = z["meta"]
    g = meta["feat_hw"]
    torch.testing.assert_close(relu_and_l2_norm_feat(z["f0_raw"]), z["f0"], **F32)
    torch.testing.assert_close(relu_and_l2_norm_feat(z["f1_raw"]), z["f1"], **F32)
    cu, T = official_solve(z["f0"], z["f1"], meta["num_iter"], meta["num_smooth_iter"], meta["dist_kernel"])
    torch.testing.assert_close(cu, z["Cu"], **F32)
    torch.testing.assert_close(T, z["T"], **F32)
    torch.testing.assert_close(pass_message(z["T"], g), z["pass_message_T"], **F32)
    assert torch.equal(T.argmax(2).reshape(-1), z["assignment"])
    torch.testing.assert_close(corr_loss(z["Cu"], z["T"]), z["corr_loss"], **F32)
    torch.testing.assert_close(T_reweighted(z["T"], z["Cu"]), z["T_reweighted"], **F32)
    unary = cross_image_unary(z["T_reweighted"], z["qmask"][0], z["kmask"])
    torch.testing.assert_close(unary[1], z["fg_ci"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(unary[0], z["bg_ci"], rtol=1e-5, atol=1e-6)

    # The public entry point, from raw features: normalises, solves, and carries T_reweighted as the transfer.
    cfg = CorrespondenceConfig(mode="official", grid=g)
    c = correspond(z["f0_raw"][0], z["f1_raw"], z["qmask"][0], z["kmask"], cfg)
    torch.testing.assert_close(c.plan, z["T"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(c.transfer, z["T_reweighted"], rtol=1e-4, atol=1e-6)
    assert torch.equal(c.match.reshape(-1), z["assignment"])
    rows = z["T"] / z["T"].sum(2, keepdim=True)
    torch.testing.assert_close(c.weight, rows.amax(2), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("case", ["n49_b5", "n196_b2"])
def test_appearance_ot_matches_discobox(case):
    z = golden_tensors(f"discobox_sinkhorn_{case}")
    pi = appearance_similarityOT(z["m0"], z["m1"], z["sim"], eps=z["meta"]["reg"], low_score=z["meta"]["low_score"],
                                 exp=z["meta"]["ot_exp"])
    torch.testing.assert_close(pi, z["PI_appearanceOT_f32"], rtol=1e-5, atol=1e-7)
    n = z["sim"].shape[1]
    # 100 fixed iterations end on a row update, so rows carry exactly n * mu (the README's "rows sum to 1" holds
    # only for uniform mu).
    torch.testing.assert_close(pi.sum(2), n * z["mu"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(pi / n, z["T_pot_f64"].float(), rtol=1e-4, atol=1e-9)


def test_appearance_ot_retries_with_doubled_epsilon(monkeypatch):
    calls = []
    real = corr.sinkhorn_official

    def flaky(cost, a, b, reg=0.05, iters=100):
        calls.append(reg)
        plan = real(cost, a, b, reg=reg, iters=iters)
        return torch.full_like(plan, float("nan")) if len(calls) < 3 else plan

    monkeypatch.setattr(corr, "sinkhorn_official", flaky)
    g = torch.Generator().manual_seed(0)
    sim = torch.rand(2, 9, 9, generator=g)
    m = torch.rand(2, 9, generator=g)
    pi = appearance_similarityOT(m, m, sim, eps=0.05)
    assert calls == [0.05, 0.1, 0.2]
    assert bool(torch.isfinite(pi).all())

    monkeypatch.setattr(corr, "sinkhorn_official", lambda c, a, b, reg=0.05, iters=100: c.new_full(c.shape, np.nan))
    with pytest.raises(ValueError, match="NaN"):
        appearance_similarityOT(m, m, sim)


@pytest.mark.parametrize("hard", [False, True])
def test_cross_image_unary_equals_the_superres_formula(hard):
    gen = torch.Generator().manual_seed(7)
    k, g, r = 3, 5, 12
    T = torch.rand(k, g * g, g * g, generator=gen, dtype=torch.float64)
    T = T / T.sum(2, keepdim=True)
    q = torch.rand(r, r, generator=gen, dtype=torch.float64)
    km = torch.rand(k, r, r, generator=gen, dtype=torch.float64)
    if hard:   # binary masks and values on the thresholds' edges
        q, km = (q > 0.5).double(), torch.where(km > 0.6, 1.0, torch.where(km > 0.3, 0.5, 0.0)).double()
    t_sr = superres_T(T, r)
    qf, kf = q.reshape(1, -1, 1), km.reshape(k, 1, -1)
    fg = ((t_sr * ((qf * kf) > 0.5)) @ km.reshape(k, -1, 1).clamp(0.1, 0.9)).mean(0).reshape(r, r)
    bg = ((t_sr * (((1 - qf) * (1 - kf)) > 0.5)) @ (1 - km).reshape(k, -1, 1).clamp(0.1, 0.9)).mean(0).reshape(r, r)
    out = cross_image_unary(T, q, km)
    torch.testing.assert_close(out[1], fg, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out[0], bg, rtol=1e-10, atol=1e-12)


def test_geometric_term_equals_the_literal_sum():
    g, gamma = 4, 1.7
    T = torch.rand(2, g * g, g * g, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    pos = torch.stack(torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij"), -1).reshape(-1, 2).double()
    off = pos[None, :, :] - pos[:, None, :]                      # off[i, k] = pos_k - pos_i
    d2 = ((off[:, :, None, None, :] - off[None, None, :, :, :]) ** 2).sum(-1)   # (i,k,j,l)
    literal = torch.einsum("ikjl,bjl->bik", torch.exp(-d2 / (2 * gamma)), T)
    torch.testing.assert_close(geometric_term(T, g, gamma), literal, rtol=1e-10, atol=1e-12)


def _shifted_pair(g=10, c=24, shift=(1, -2), noise=0.05, k=3, seed=0):
    """Smooth random query features and K partners holding the same content moved by `shift` (dy, dx)."""
    gen = torch.Generator().manual_seed(seed)
    big = torch.randn(1, c, g + 8, g + 8, generator=gen)
    big = torch.nn.functional.avg_pool2d(big, 3, 1, 1)
    q = big[0, :, 4 : 4 + g, 4 : 4 + g]
    dy, dx = shift
    parts = big[:, :, 4 - dy : 4 - dy + g, 4 - dx : 4 - dx + g].expand(k, -1, -1, -1)
    parts = parts + noise * torch.randn(k, c, g, g, generator=gen)
    return q, parts


def test_icm_recovers_a_known_shift():
    g, shift = 10, (1, -2)
    fq, fk = _shifted_pair(g=g, shift=shift)
    mq = torch.ones(28, 28)
    mk = torch.ones(3, 28, 28)
    cfg = CorrespondenceConfig(mode="icm", grid=g, icm_iters=2, sinkhorn_max_iter=200)
    c = correspond(fq, fk, mq, mk, cfg)
    ys, xs = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
    ty, tx = ys + shift[0], xs + shift[1]
    inside = ((ty >= 0) & (ty < g) & (tx >= 0) & (tx < g)).reshape(-1)
    expected = (ty * g + tx).reshape(-1)
    hits = (c.match[:, inside] == expected[inside]).float().mean()
    assert hits > 0.9, float(hits)
    # Sparse output is consistent with the dense plan.
    rows = c.plan / c.plan.sum(2, keepdim=True)
    torch.testing.assert_close(c.weight, rows.amax(2))
    torch.testing.assert_close(c.transfer.sum(2), torch.ones(3, g * g))
    assert c.match.dtype == torch.int64 and c.match.shape == (3, g * g)


def test_icm_geometric_term_beats_appearance_alone_on_noisy_features():
    g, shift = 10, (1, -2)
    fq, fk = _shifted_pair(g=g, shift=shift, noise=0.5, seed=1)
    ones = torch.ones(28, 28)
    ys, xs = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
    ty, tx = ys + shift[0], xs + shift[1]
    inside = ((ty >= 0) & (ty < g) & (tx >= 0) & (tx < g)).reshape(-1)
    expected = (ty * g + tx).reshape(-1)

    def hits(iters):
        cfg = CorrespondenceConfig(grid=g, icm_iters=iters, geometric_weight=1.0, sinkhorn_max_iter=200)
        c = correspond(fq, fk, ones, ones.expand(3, -1, -1), cfg)
        return float((c.match[:, inside] == expected[inside]).float().mean())

    # Appearance alone (one Sinkhorn) gets about 30% right here; one geometric update brings it above 90%.
    appearance_only, with_geometry = hits(1), hits(2)
    assert appearance_only < 0.5 and with_geometry > 0.85, (appearance_only, with_geometry)


def test_icm_plan_meets_the_mask_marginals():
    g = 7
    fq, fk = _shifted_pair(g=g, c=16, shift=(0, 1))
    gen = torch.Generator().manual_seed(4)
    mq = torch.rand(g, g, generator=gen)
    mk = torch.rand(3, g, g, generator=gen)
    cfg = CorrespondenceConfig(grid=g, icm_iters=1, sinkhorn_tol=1e-7, sinkhorn_max_iter=2000)
    c = correspond(fq, fk, mq, mk, cfg)
    a = mask_marginal(mq.reshape(1, -1)).expand(3, -1)
    b = mask_marginal(mk.reshape(3, -1))
    err = (c.plan.sum(2) - a).abs().sum(1) + (c.plan.sum(1) - b).abs().sum(1)
    assert bool((err < 1e-5).all()), err
    torch.testing.assert_close(a[0].max() / a[0].min(), torch.tensor(1 / 0.6))


def test_correspond_rejects_bad_input():
    fq, fk = _shifted_pair(g=5, c=8)
    m = torch.ones(5, 5)
    mk = torch.ones(3, 5, 5)
    with pytest.raises(ValueError, match="mode"):
        correspond(fq, fk, m, mk, CorrespondenceConfig(mode="hungarian"))
    with pytest.raises(ValueError, match="f_partners"):
        correspond(fq, fk[:, :4], m, mk, CorrespondenceConfig())
    with pytest.raises(ValueError, match="m_partners"):
        correspond(fq, fk, m, mk[:2], CorrespondenceConfig())
    with pytest.raises(ValueError, match="cross_image_unary"):
        cross_image_unary(torch.rand(3, 25, 25), torch.ones(28, 28), torch.ones(2, 28, 28))
