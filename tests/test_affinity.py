"""teacher.affinity against the BoxInst / DiscoBox / AsyInst goldens and brute-force per-edge references."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from teacher.affinity import (asymmetric_affinity_loss, box_bitmasks, color_edges, depth_edges, depth_gradient_diff,
                              dice_coefficient, dice_loss, mask_loss, mil_loss, projection_loss, warmup_weight)
from teacher.color import neighbour_offsets
from teacher.config import ObjectiveConfig
from goldens import load_golden

CASES = ["seed0_stride4", "seed1_stride4", "seed1_stride2", "seed0_stride1"]
ASY_COLOR = ["d0.0_g0.0", "d1.5_g0.0", "d2.5_g1.5", "d3.5_g2.5"]
DTYPES = {"f32": torch.float32, "f64": torch.float64}




def assert_close(actual: torch.Tensor, expected, dtype: torch.dtype):
    """float32 against the f64 reference: rtol 1e-4, atol 1e-6; float64: rtol 1e-9 (atol at round-off level)."""
    rtol, atol = (1e-4, 1e-6) if dtype == torch.float32 else (1e-9, 1e-15)
    np.testing.assert_allclose(actual.detach().double().numpy(), np.asarray(expected, np.float64), rtol=rtol, atol=atol)


def loss_and_grad(fn, logits: np.ndarray, dtype: torch.dtype, *args, **kwargs):
    x = torch.tensor(logits, dtype=dtype, requires_grad=True)
    loss = fn(x, *args, **kwargs)
    loss.backward()
    assert loss.dtype == dtype and x.grad.dtype == dtype
    return loss, x.grad


# --------------------------------------------------------------------------------------------- box bitmasks
@pytest.mark.parametrize("name", [f"boxinst_colorsim_seed{s}_stride{k}.npz" for s in (0, 1) for k in (1, 2, 4)])
def test_box_bitmasks_match_boxinst(name):
    z = load_golden(name)
    stride = int(name.split("stride")[1][0])
    height, width = z["image_rgb"].shape[:2]
    boxes = torch.from_numpy(z["boxes"])
    assert np.array_equal(box_bitmasks(boxes, height, width).numpy(), z["gt_bitmasks_full"])
    masks = box_bitmasks(boxes, height, width, stride)
    assert masks.dtype == torch.float32
    assert np.array_equal(masks.numpy(), z["gt_bitmasks"])


def test_box_bitmasks_brute_force_border_and_fractional():
    height, width = 13, 17
    boxes = torch.tensor([[0.0, 0.0, 16.0, 12.0],      # the whole image
                          [-3.7, 2.2, 4.9, 30.5],      # leaves the image on the left and at the bottom
                          [5.999, 6.5, 6.2, 6.999],    # sub-pixel box
                          [12.5, 0.1, 16.9, 3.0]])     # touches the right border
    for stride in (1, 2, 3):
        masks = box_bitmasks(boxes, height, width, stride).numpy()
        ref = np.zeros((len(boxes), height, width))
        for n, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
            ref[n, max(int(y1), 0):int(y2 + 1), max(int(x1), 0):int(x2 + 1)] = 1
        assert np.array_equal(masks, ref[:, stride // 2::stride, stride // 2::stride])
    assert box_bitmasks(torch.zeros(0, 4), 8, 8).shape == (0, 8, 8)
    with pytest.raises(ValueError, match=r"\(N,4\)"):
        box_bitmasks(torch.zeros(3), 8, 8)


# ----------------------------------------------------------------------------------- projection, Dice, MIL
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("tag", ["f32", "f64"])
def test_projection_loss_matches_boxinst(case, tag):
    z = load_golden(f"boxinst_project_{case}.npz")
    dtype = DTYPES[tag]
    loss, grad = loss_and_grad(projection_loss, z["mask_logits"], dtype, torch.from_numpy(z["gt_bitmasks"]))
    assert_close(loss, z["loss_prj_f64"], dtype)
    assert_close(grad, z["grad_logits_f64"], dtype)
    scores = torch.tensor(z["mask_logits"], dtype=torch.float64).sigmoid()
    boxes = torch.from_numpy(z["gt_bitmasks"]).double()
    assert_close(dice_coefficient(scores.amax(2), boxes.amax(2)), z["dice_y_f64"], torch.float64)
    assert_close(dice_coefficient(scores.amax(3), boxes.amax(3)), z["dice_x_f64"], torch.float64)


def test_dice_and_mil_match_discobox():
    z = load_golden("discobox_dice_mil.npz")
    prob, target = torch.from_numpy(z["prob"]), torch.from_numpy(z["target"])
    np.testing.assert_allclose(dice_loss(prob, target).numpy(), z["dice"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mil_loss(prob, target).numpy(), z["mil"], rtol=1e-5, atol=1e-6)
    # eps 1e-3 on each squared sum: an empty prediction against an empty target is a perfect match, not 0/0
    assert dice_loss(torch.zeros(1, 4), torch.zeros(1, 4)).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="mil_loss"):
        mil_loss(prob[0], target[0])


def test_projection_loss_edge_cases():
    x = torch.zeros(0, 1, 5, 5, requires_grad=True)
    loss = projection_loss(x, torch.zeros(0, 1, 5, 5))
    loss.backward()
    assert loss.item() == 0.0 and x.grad.shape == x.shape
    with pytest.raises(ValueError, match="box_masks shape"):
        projection_loss(torch.zeros(2, 1, 5, 5), torch.zeros(2, 1, 5, 4))
    with pytest.raises(ValueError, match=r"\(N,1,h,w\)"):
        projection_loss(torch.zeros(2, 5, 5), torch.zeros(2, 5, 5))


# ------------------------------------------------------------------------------------ colour edges + loss
@pytest.mark.parametrize("case", CASES)
def test_color_edges_match_boxinst_weights(case):
    z = load_golden(f"boxinst_pairwise_{case}.npz")
    edges = color_edges(torch.from_numpy(z["image_color_similarity"]), torch.from_numpy(z["gt_bitmasks"]))
    assert edges.dtype == torch.bool
    assert np.array_equal(edges.numpy(), z["weights"].astype(bool))
    # an (8,h,w) similarity broadcasts the same way
    assert torch.equal(color_edges(torch.from_numpy(z["image_color_similarity"][0]),
                                   torch.from_numpy(z["gt_bitmasks"])), edges)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("tag", ["f32", "f64"])
def test_symmetric_loss_matches_boxinst_pairwise(case, tag):
    z = load_golden(f"boxinst_pairwise_{case}.npz")
    dtype = DTYPES[tag]
    loss, grad = loss_and_grad(asymmetric_affinity_loss, z["mask_logits"], dtype, torch.from_numpy(z["weights"]))
    assert_close(loss, z["loss_pairwise_f64"], dtype)
    assert_close(grad, z["grad_logits_f64"], dtype)
    if dtype == torch.float32:  # and the float32 reference run itself
        np.testing.assert_allclose(loss.item(), z["loss_pairwise_f32"], rtol=1e-5)


@pytest.mark.parametrize("setting", ASY_COLOR)
@pytest.mark.parametrize("tag", ["f32", "f64"])
def test_asymmetric_color_loss_matches_asyinst(setting, tag):
    z = load_golden(f"asyinst_color_seed1_stride2_{setting}.npz")
    meta = json.loads(str(z["meta_json"]))
    dtype = DTYPES[tag]
    loss, grad = loss_and_grad(asymmetric_affinity_loss, z["mask_logits"], dtype, torch.from_numpy(z["weights"]),
                               delta=meta["delta"], gamma=meta["gamma"], dilation=meta["dilation"])
    assert_close(loss, z["loss"], dtype)
    assert_close(grad, z["grad_logits"], dtype)


def one_edge_losses(logits: np.ndarray, shape, picks, dtype, **kwargs) -> np.ndarray:
    """The loss with a single edge switched on, for each picked (n, k, y, x): the loss is the mean over the
    edge set, so this is that edge's own term."""
    out = []
    for n, k, y, x in picks:
        edges = torch.zeros(shape, dtype=torch.bool)
        edges[n, k, y, x] = True
        out.append(asymmetric_affinity_loss(torch.tensor(logits, dtype=dtype), edges, **kwargs).item())
    return np.asarray(out)


def picked_edges(weights: np.ndarray, count: int = 40, seed: int = 0) -> list[tuple[int, ...]]:
    """A seeded sample of the golden's edges, image-border ones included when there are any."""
    on = np.argwhere(weights > 0)
    rng = np.random.default_rng(seed)
    return [tuple(int(v) for v in e) for e in on[rng.choice(len(on), size=min(count, len(on)), replace=False)]]


@pytest.mark.parametrize("case", CASES)
def test_per_edge_terms_match_boxinst_pairwise_losses(case):
    z = load_golden(f"boxinst_pairwise_{case}.npz")
    picks = picked_edges(z["weights"])
    for tag, dtype in DTYPES.items():
        got = one_edge_losses(z["mask_logits"], z["weights"].shape, picks, dtype)
        want = np.asarray([z["pairwise_losses"][e] for e in picks], np.float64)
        rtol, atol = (1e-4, 1e-6) if dtype == torch.float32 else (1e-6, 1e-7)  # golden stored as float32
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)


@pytest.mark.parametrize("setting", ASY_COLOR)
def test_per_edge_terms_match_asyinst_edge_loss(setting):
    z = load_golden(f"asyinst_color_seed1_stride2_{setting}.npz")
    meta = json.loads(str(z["meta_json"]))
    picks = picked_edges(z["weights"])
    kw = dict(delta=meta["delta"], gamma=meta["gamma"], dilation=meta["dilation"])
    for tag, dtype in DTYPES.items():
        got = one_edge_losses(z["mask_logits"], z["weights"].shape, picks, dtype, **kw)
        want = np.asarray([z["edge_loss"][e] for e in picks])
        # P is the edge's probability of agreeing: edge_loss = -exp(gamma (P - 0.5)) log P, checked on the golden.
        p = np.asarray([z["P"][e] for e in picks])
        np.testing.assert_allclose(-np.exp(meta["gamma"] * (p - 0.5)) * np.log(p), want, rtol=1e-12)
        rtol, atol = (1e-4, 1e-6) if dtype == torch.float32 else (1e-9, 1e-15)
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)


# -------------------------------------------------------------------------------------- depth edges + loss
@pytest.mark.parametrize("name", ["asyinst_depth_seed0_64x96.npz", "asyinst_depth_seed1_96x160.npz"])
def test_depth_edges_and_loss_match_asyinst(name):
    z = load_golden(name)
    meta = json.loads(str(z["meta_json"]))
    depth = torch.from_numpy(z["depth"])
    diff = depth_gradient_diff(depth, meta["dilation"]).numpy()
    assert np.array_equal(np.isinf(diff), np.isinf(z["diff"]))
    finite = np.isfinite(diff)
    np.testing.assert_allclose(diff[finite], z["diff"][finite], rtol=1e-12, atol=0)
    box_masks = torch.from_numpy(z["box_masks"])
    edges = depth_edges(depth, box_masks, meta["tau_d"], meta["dilation"])
    assert np.array_equal(edges.numpy(), z["edges"])
    # boxes given as integer corners rasterise to the same masks as the golden's box[y1:y2, x1:x2]
    boxes = torch.from_numpy(z["boxes"]) - torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    assert np.array_equal(box_bitmasks(boxes, *depth.shape).bool().numpy(), z["box_masks"][:, 0])
    for tag, dtype in DTYPES.items():
        for kind, (delta, gamma) in dict(sym=(0.0, 0.0), asym=(meta["delta"], meta["gamma"])).items():
            loss, grad = loss_and_grad(asymmetric_affinity_loss, z["mask_logits"], dtype, edges, delta, gamma)
            assert_close(loss, z[f"loss_{kind}"], dtype)
            assert_close(grad, z[f"grad_logits_{kind}"], dtype)


def brute_force_depth(depth: np.ndarray, box: np.ndarray, tau: float, dilation: int):
    """Per-edge loop over AsyInst Eq. 1-3: (diff (8,H,W) with inf where invalid, edges (N,8,H,W))."""
    height, width = depth.shape
    diff = np.full((8, height, width), np.inf)
    edges = np.zeros((box.shape[0], 8, height, width), bool)
    ok = lambda y, x: 0 <= y < height and 0 <= x < width and depth[y, x] > 0  # noqa: E731
    for e, (dy, dx) in enumerate(neighbour_offsets(dilation)):
        for y in range(height):
            for x in range(width):
                y1, x1, y2, x2 = y + dy // 2, x + dx // 2, y + dy, x + dx
                if ok(y, x) and ok(y1, x1) and ok(y2, x2):
                    diff[e, y, x] = abs(depth[y, x] + depth[y2, x2] - 2 * depth[y1, x1])
                    for n in range(box.shape[0]):
                        edges[n, e, y, x] = diff[e, y, x] <= tau and (box[n, y, x] or box[n, y2, x2])
    return diff, edges


@pytest.mark.parametrize("height,width,dilation", [(9, 11, 2), (6, 7, 4), (2, 9, 2), (1, 1, 2)])
def test_depth_edges_brute_force(height, width, dilation):
    rng = np.random.default_rng(height * 100 + width)
    # a plane plus small noise, so that roughly half of the valid edges pass tau
    yy, xx = np.mgrid[:height, :width]
    depth = 10.0 + 0.1 * yy + 0.05 * xx + 0.01 * rng.standard_normal((height, width))
    depth[rng.random((height, width)) < 0.1] = 0.0
    box = np.zeros((2, height, width), bool)
    box[0, : height // 2 + 1, : width // 2 + 1] = True    # touches the top-left border
    box[1, -1:, -2:] = True                                 # bottom-right corner
    ref_diff, ref_edges = brute_force_depth(depth, box, 0.01, dilation)
    diff = depth_gradient_diff(torch.from_numpy(depth), dilation).numpy()
    assert np.array_equal(np.isinf(diff), np.isinf(ref_diff))
    np.testing.assert_allclose(diff[np.isfinite(diff)], ref_diff[np.isfinite(ref_diff)], rtol=1e-12)
    edges = depth_edges(torch.from_numpy(depth), torch.from_numpy(box)[:, None], 0.01, dilation)
    assert np.array_equal(edges.numpy(), ref_edges)
    if max(height, width) <= dilation:
        assert not edges.any()


def test_depth_edges_bad_input():
    with pytest.raises(ValueError, match="even"):
        depth_gradient_diff(torch.ones(5, 5), dilation=3)
    with pytest.raises(ValueError, match=r"\(H,W\)"):
        depth_gradient_diff(torch.ones(1, 5, 5))
    with pytest.raises(ValueError, match=r"\(N,1,H,W\)"):
        depth_edges(torch.ones(5, 5), torch.ones(2, 1, 5, 4, dtype=torch.bool))


# ---------------------------------------------------------------- asymmetric loss vs a per-edge reference
def brute_force_loss(logits: torch.Tensor, edges: torch.Tensor, delta: float, gamma: float, dilation: int):
    """Loop over the kept edges, then Eq. 9 + 11 with plain autograd; far ends outside the image are dropped."""
    n_inst, _, height, width = logits.shape
    offsets = neighbour_offsets(dilation)
    centre, far = [], []
    for n, e, y, x in edges.nonzero().tolist():
        qy, qx = y + offsets[e][0], x + offsets[e][1]
        if 0 <= qy < height and 0 <= qx < width:
            centre.append((n, y, x))
            far.append((n, qy, qx))
    if not centre:
        return logits.sum() * 0.0
    flat = logits[:, 0]
    yp = flat[tuple(torch.tensor(centre).T)] - delta
    yq = flat[tuple(torch.tensor(far).T)] - delta
    log_p = torch.logaddexp(F.logsigmoid(yp) + F.logsigmoid(yq), F.logsigmoid(-yp) + F.logsigmoid(-yq))
    return -(torch.exp(gamma * (log_p.exp() - 0.5)) * log_p).sum() / len(centre)


def random_case(n: int, height: int, width: int, seed: int, density: float = 0.5, scale: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(n, 1, height, width, generator=g, dtype=torch.float64)
    edges = torch.rand(n, 8, height, width, generator=g) < density
    return logits, edges


@pytest.mark.parametrize("delta,gamma", [(0.0, 0.0), (1.5, 0.0), (2.5, 1.5), (3.5, 2.5), (-1.0, 0.7)])
@pytest.mark.parametrize("n,height,width,dilation", [(3, 7, 9, 2), (2, 5, 4, 1), (1, 3, 8, 2), (2, 2, 2, 2)])
def test_asymmetric_loss_brute_force(delta, gamma, n, height, width, dilation):
    logits, edges = random_case(n, height, width, seed=height * width + n)
    edges[0] = False  # an instance without edges contributes nothing
    for dtype in (torch.float64, torch.float32):
        x_ref = logits.to(dtype).clone().requires_grad_(True)
        ref = brute_force_loss(x_ref, edges, delta, gamma, dilation)
        ref.backward()
        loss, grad = loss_and_grad(asymmetric_affinity_loss, logits.numpy(), dtype, edges, delta, gamma, dilation)
        tol = dict(rtol=1e-10, atol=1e-14) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(loss, ref.detach(), **tol)
        torch.testing.assert_close(grad, x_ref.grad, **tol)
        assert torch.all(grad[0] == 0) or n == 1
    if max(height, width) <= dilation:  # image smaller than the dilation: no pairs at all
        assert loss.item() == 0.0 and torch.all(grad == 0)


def test_asymmetric_loss_instance_crops_and_float_weights():
    """Small edge regions in a large image take the per-instance crop path; 0/1 float weights equal bools."""
    logits = 2.0 * torch.randn(3, 1, 60, 80, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    edges = torch.zeros(3, 8, 60, 80, dtype=torch.bool)
    edges[0, :, 0:5, 0:6] = True         # top-left corner: many far ends fall outside the image
    edges[1, :, 55:60, 70:80] = True     # bottom-right corner
    edges[2, 3, 30, 40] = True           # a single edge
    for delta, gamma in [(0.0, 0.0), (3.5, 2.5)]:
        x_ref = logits.clone().requires_grad_(True)
        ref = brute_force_loss(x_ref, edges, delta, gamma, 2)
        ref.backward()
        loss, grad = loss_and_grad(asymmetric_affinity_loss, logits.numpy(), torch.float64, edges, delta, gamma)
        torch.testing.assert_close(loss, ref.detach(), rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(grad, x_ref.grad, rtol=1e-10, atol=1e-14)
        loss_w, grad_w = loss_and_grad(asymmetric_affinity_loss, logits.numpy(), torch.float64, edges.double(),
                                       delta, gamma)
        torch.testing.assert_close(loss_w, loss)
        torch.testing.assert_close(grad_w, grad)


def test_asymmetric_loss_gradcheck():
    logits, edges = random_case(1, 5, 5, seed=11, density=0.8)
    x = logits.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: asymmetric_affinity_loss(t, edges, 2.5, 1.5), (x,))


def test_asymmetric_loss_no_edges_and_extreme_logits():
    x = torch.randn(2, 1, 8, 8, requires_grad=True)
    loss = asymmetric_affinity_loss(x, torch.zeros(2, 8, 8, 8, dtype=torch.bool), 3.5, 2.5)
    loss.backward()
    assert loss.item() == 0.0 and torch.all(x.grad == 0)
    empty = torch.zeros(0, 1, 8, 8, requires_grad=True)
    loss = asymmetric_affinity_loss(empty, torch.zeros(0, 8, 8, 8, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0
    # saturated, disagreeing logits: log P ~ -200 must stay finite in float32 (P itself underflows)
    yy, xx = torch.meshgrid(torch.arange(6), torch.arange(6), indexing="ij")
    sign = (1.0 - 2.0 * ((yy // 2 + xx // 2) % 2)).expand(1, 1, 6, 6)  # flips across every non-diagonal edge
    for dtype in (torch.float32, torch.float64):
        x = (200.0 * sign).to(dtype).requires_grad_(True)
        loss = asymmetric_affinity_loss(x, torch.ones(1, 8, 6, 6, dtype=torch.bool), 2.5, 1.5)
        loss.backward()
        assert torch.isfinite(loss) and loss.item() > 10 and torch.isfinite(x.grad).all()


def test_asymmetric_loss_without_grad_and_bad_input():
    logits, edges = random_case(2, 6, 7, seed=5)
    with torch.no_grad():
        value = asymmetric_affinity_loss(logits, edges, 1.0, 1.0)
    torch.testing.assert_close(value, brute_force_loss(logits, edges, 1.0, 1.0, 2))
    with pytest.raises(ValueError, match=r"edges must be \(2,8,6,7\)"):
        asymmetric_affinity_loss(logits, edges[:, :4])
    with pytest.raises(ValueError, match="dilation"):
        asymmetric_affinity_loss(logits, edges, dilation=0)
    with pytest.raises(ValueError, match="floating point"):
        asymmetric_affinity_loss(logits.long(), edges)


# ------------------------------------------------------------------------------------ weights and Eq. 13
def test_warmup_weight():
    assert warmup_weight(0, 10000, 1.0) == 0.0
    assert warmup_weight(2500, 10000, 0.1) == pytest.approx(0.025)
    assert warmup_weight(10000, 10000, 0.1) == pytest.approx(0.1)
    assert warmup_weight(50000, 10000, 0.1) == pytest.approx(0.1)
    assert warmup_weight(5, 0, 0.3) == 0.3


def test_mask_loss_combines_the_terms():
    cfg = ObjectiveConfig()
    logits, col = random_case(2, 12, 14, seed=7)
    _, dep = random_case(2, 12, 14, seed=8, density=0.3)
    box = torch.zeros(2, 1, 12, 14)
    box[0, :, 2:9, 3:10] = 1
    box[1, :, 5:12, 0:8] = 1
    x = logits.requires_grad_(True)
    total, terms = mask_loss(x, box, col, dep, cfg, iteration=5000)
    assert set(terms) >= {"proj", "color", "depth"}
    torch.testing.assert_close(terms["proj"], projection_loss(x, box))
    torch.testing.assert_close(terms["color"], asymmetric_affinity_loss(x, col, cfg.delta_color, cfg.gamma_color))
    torch.testing.assert_close(terms["depth"], asymmetric_affinity_loss(x, dep, cfg.delta_depth, cfg.gamma_depth))
    expected = terms["proj"] + 0.5 * cfg.lambda_color * terms["color"] + 0.5 * cfg.lambda_depth * terms["depth"]
    torch.testing.assert_close(total, expected)
    assert terms["lambda_color"].item() == pytest.approx(0.5 * cfg.lambda_color)
    total.backward()
    assert torch.isfinite(x.grad).all()
    # fully warmed up by default; a missing depth map drops the term
    total, terms = mask_loss(x, box, col, None, cfg)
    assert terms["depth"].item() == 0.0
    torch.testing.assert_close(total, terms["proj"] + cfg.lambda_color * terms["color"])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_objectives_cuda_match_cpu():
    logits, edges = random_case(3, 20, 24, seed=1)
    depth = 10.0 + 0.01 * torch.randn(20, 24, dtype=torch.float64)
    box = torch.zeros(3, 1, 20, 24, dtype=torch.bool)
    box[:, :, 4:15, 5:20] = True
    for dtype in (torch.float32, torch.float64):
        cpu = loss_and_grad(asymmetric_affinity_loss, logits.numpy(), dtype, edges, 2.5, 1.5)
        xg = logits.to(dtype).cuda().requires_grad_(True)
        loss = asymmetric_affinity_loss(xg, edges.cuda(), 2.5, 1.5)
        loss.backward()
        torch.testing.assert_close(loss.cpu(), cpu[0])
        torch.testing.assert_close(xg.grad.cpu(), cpu[1])
    assert torch.equal(depth_edges(depth.cuda(), box.cuda()).cpu(), depth_edges(depth, box))
    assert torch.equal(box_bitmasks(torch.tensor([[1.5, 2.0, 9.2, 7.9]]).cuda(), 12, 12).cpu(),
                       box_bitmasks(torch.tensor([[1.5, 2.0, 9.2, 7.9]]), 12, 12))
