"""Mean-field CRF: DiscoBox MeanField goldens (mode official) and the soft mean-field's behaviour."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from kernels.message_passing import message_passing, neighbour_offsets
from teacher.config import CRFConfig
from teacher.crf import colour_potts_kernel, crf_energy, loss_ts, meanfield_official, meanfield_soft, soft_unary
from goldens import golden_tensors

MEANFIELD_CASES = ["A_seed0_32x48", "B_seed0_32x48_iiu", "C_seed1_64x96", "D_rois16_28x28"]




@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("case", MEANFIELD_CASES)
def test_meanfield_official_matches_discobox(case, backend):
    z = golden_tensors(f"discobox_meanfield_{case}")
    p = z["meta"]["params"]
    colour = z["color_feat"] if z["color_feat"].dim() == 4 else z["color_feat"][None]
    out = meanfield_official(
        z["x"], z["targets"], colour, z.get("inter_img_mask"), iters=p["iter"], kernel_size=p["kernel_size"],
        alpha0=p["alpha0"], theta0=p["theta0"], theta1=p["theta1"], base=p["base"], gamma=p["gamma"],
        backend=backend,
    )
    kernel = z["kernel"] if z["kernel"].dim() == 4 else z["kernel"][None]
    torch.testing.assert_close(out["kernel"], kernel, rtol=1e-5, atol=1e-6)
    if "unary_init" in z:
        torch.testing.assert_close(out["unary_init"], z["unary_init"], rtol=0, atol=1e-6)
    for key in ("state_iter1", "state_final"):
        assert int(((out[key] > 0.5) != (z[key] > 0.5)).sum()) == 0, key
        torch.testing.assert_close(out[key], z[key], rtol=0, atol=1e-6)
    assert torch.equal(out["pseudo_label"], z["pseudo_label"])
    assert torch.equal(out["valid"], z["valid"])
    if "loss_ts" in z:
        torch.testing.assert_close(loss_ts(z["s_prob"], z["targets"], out["pseudo_label"]), z["loss_ts"],
                                   rtol=1e-5, atol=1e-6)


def test_meanfield_official_rejects_bad_input():
    x = torch.rand(2, 1, 8, 8)
    with pytest.raises(ValueError, match="color_feat"):
        meanfield_official(x, torch.ones_like(x), torch.rand(2, 2, 8, 8))
    with pytest.raises(ValueError, match="iters"):
        meanfield_official(x, torch.ones_like(x), torch.rand(1, 3, 8, 8), iters=0)
    with pytest.raises(ValueError, match="inter_img_mask"):
        meanfield_official(x, torch.ones_like(x), torch.rand(1, 3, 8, 8), torch.rand(2, 1, 8, 8))


# ----------------------------------------------------------------------------------------------------------------
# Soft mean-field


def _random_problem(seed: int, n=3, h=18, w=22, cross=True):
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(n, 1, h, w, generator=g)
    unary = torch.cat([1 - p, p], 1)
    image = torch.randn(n, 3, h, w, generator=g) * 0.6
    box = torch.zeros(n, 1, h, w)
    box[:, :, 2 : h - 3, 3 : w - 2] = 1
    cross_unary = torch.rand(n, 2, h, w, generator=g) if cross else None
    return unary, image, box, cross_unary


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("dilation", [1, 2])
def test_soft_meanfield_never_increases_free_energy(seed, dilation):
    unary, image, box, cross = _random_problem(seed, cross=seed % 2 == 0)
    # Strong couplings make the parallel update oscillate; the colour-class schedule must still descend.
    cfg = CRFConfig(w1=4.0, zeta=0.8, dilation=dilation, tol=0.0, cross_image_weight=1.0)
    energies = [crf_energy(meanfield_soft(unary, image, box, cross, dataclasses.replace(cfg, iters=k)),
                           unary, image, box, cross, cfg) for k in range(7)]
    energies = torch.stack(energies)
    steps = energies[1:] - energies[:-1]
    assert bool((steps <= 1e-9 * energies[:-1].abs()).all()), steps
    assert bool((energies[-1] < energies[0]).all())


def test_parallel_update_can_increase_the_energy_but_the_schedule_does_not():
    # Column stripes with strong coupling: 6 of 8 neighbours disagree, so the fully parallel update flips every
    # pixel at once -- same pairwise cost, worse unary, higher F. The colour-class schedule must not do that.
    h, w = 8, 10
    fg = torch.where(torch.arange(w) % 2 == 0, 0.8, 0.2).expand(1, 1, h, w)
    unary = torch.cat([1 - fg, fg], 1).double()
    image = torch.zeros(1, 3, h, w, dtype=torch.float64)
    box = torch.ones(1, 1, h, w)
    cfg = CRFConfig(w1=3.0, zeta=1.0, tol=0.0)
    theta = soft_unary(unary, None, cfg)
    q0 = torch.softmax(-theta, 1)
    kernel = colour_potts_kernel(image, cfg.w1, cfg.zeta)
    q_parallel = torch.softmax(message_passing(q0, kernel, neighbour_offsets(3)) - theta, 1)
    e0, e_parallel = crf_energy(q0, unary, image, box, None, cfg), crf_energy(q_parallel, unary, image, box, None, cfg)
    assert float(e_parallel) > float(e0) + 1.0
    e_sweep = crf_energy(meanfield_soft(unary, image, box, None, dataclasses.replace(cfg, iters=1)),
                         unary, image, box, None, cfg)
    assert float(e_sweep) < float(e0)


def _neighbour_messages_bruteforce(q, image, cfg):
    """Independent loop reference of sum_j w_ij Q_j(l) over the dilated 8-neighbourhood (numpy, float64)."""
    q, image = q.double().numpy(), image.double().numpy()
    n, _, h, w = q.shape
    d = cfg.dilation
    out = np.zeros_like(q)
    for b in range(n):
        for y in range(h):
            for x in range(w):
                for dy in (-d, 0, d):
                    for dx in (-d, 0, d):
                        yy, xx = y + dy, x + dx
                        if (dy, dx) == (0, 0) or not (0 <= yy < h and 0 <= xx < w):
                            continue
                        diff = image[b, :, y, x] - image[b, :, yy, xx]
                        wij = cfg.w1 * np.exp(-(diff @ diff) / (2 * cfg.zeta**2))
                        out[b, :, y, x] += wij * q[b, :, yy, xx]
    return out


@pytest.mark.parametrize("dilation", [1, 2])
def test_soft_meanfield_converges_to_a_mean_field_fixed_point(dilation):
    unary, image, box, cross = _random_problem(5, n=2, h=10, w=12)
    cfg = CRFConfig(w1=1.0, zeta=0.7, dilation=dilation, iters=200, tol=1e-7, cross_image_weight=0.5)
    q = meanfield_soft(unary.double(), image.double(), box, cross.double(), cfg)
    msg = torch.from_numpy(_neighbour_messages_bruteforce(q, image, cfg))
    logits = msg + torch.log(unary.double().clamp(min=cfg.unary_floor)) + cfg.cross_image_weight * cross.double()
    logits[:, 1:][box <= 0.5] = float("-inf")
    torch.testing.assert_close(q, torch.softmax(logits, 1), rtol=0, atol=1e-5)
    assert bool((q[:, 1:][box <= 0.5] == 0).all())
    torch.testing.assert_close(q.sum(1), torch.ones_like(q[:, 0]))


def test_soft_crf_recovers_a_separable_object():
    h, w = 48, 64
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    obj = (((yy - 24) / 14.0) ** 2 + ((xx - 30) / 20.0) ** 2) <= 1
    image = torch.where(obj, 1.0, -1.0)[None, None].expand(1, 3, h, w) + 0.1 * torch.randn(1, 3, h, w, generator=g)
    # A weak, noisy unary: 30% of the pixels vote for the wrong label.
    flip = torch.rand(h, w, generator=g) < 0.3
    fg = torch.where(obj ^ flip, 0.65, 0.35)[None, None]
    unary = torch.cat([1 - fg, fg], 1)
    box = torch.zeros(1, 1, h, w)
    box[:, :, 8:42, 8:53] = 1
    q = meanfield_soft(unary, image, box, None, CRFConfig(w1=1.0, zeta=0.5, iters=50))

    def iou(a, b):
        return float((a & b).sum()) / float((a | b).sum())

    assert iou(fg[0, 0] > 0.5, obj) < 0.6
    assert iou(q[0, 1] > 0.5, obj) > 0.97


def test_soft_meanfield_rejects_bad_input():
    unary, image, box, cross = _random_problem(0)
    cfg = CRFConfig()
    with pytest.raises(ValueError, match="unary"):
        meanfield_soft(unary[:, :1], image, box, cross, cfg)
    with pytest.raises(ValueError, match="probabilities"):
        meanfield_soft(unary * 2, image, box, cross, cfg)
    with pytest.raises(ValueError, match="box_mask"):
        meanfield_soft(unary, image, box[:1], cross, cfg)
    with pytest.raises(ValueError, match="cross_unary"):
        meanfield_soft(unary, image, box, cross[:, :1], cfg)
