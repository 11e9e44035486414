"""The student's mask losses: each against a brute-force loop on a small case, finite with gradients on a tiny
model (issue 9, item 2)."""
from __future__ import annotations

import math

import pytest
import torch

from boxmask_common.errors import UserError
from student.config import StudentConfig
from student.losses import (color_term, consistency_loss, dense_nce_loss, depth_term, projection_bce_loss,
                            roi_box_masks, roi_depth, roi_in_image, roi_sample)
from student.model import build_model
from student.roi_heads import PROJECTIONS
from teacher.affinity import projection_loss
from teacher.color import rgb_to_lab
from teacher.config import ObjectiveConfig

OFFSETS = [(dy * 2, dx * 2) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


def test_roi_box_masks_match_a_cell_loop():
    rois = torch.tensor([[10.0, 20.0, 50.0, 60.0], [0.0, 0.0, 8.0, 16.0]])
    boxes = torch.tensor([[15.0, 22.0, 40.0, 70.0], [2.0, 4.0, 6.0, 12.0]])
    m = 8
    got = roi_box_masks(rois, boxes, m)
    for p in range(2):
        x1, y1, x2, y2 = rois[p].tolist()
        for i in range(m):
            for j in range(m):
                cx = x1 + (j + 0.5) * (x2 - x1) / m
                cy = y1 + (i + 0.5) * (y2 - y1) / m
                bx1, by1, bx2, by2 = boxes[p].tolist()
                assert got[p, 0, i, j] == float(bx1 <= cx < bx2 and by1 <= cy < by2)


def test_roi_sample_reads_the_cell_centres():
    # A linear ramp: bilinear sampling at the cell centre returns the ramp's value there.
    h, w = 40, 60
    ramp = torch.arange(w, dtype=torch.float32)[None, None, None].expand(1, 1, h, w) + 0.5
    rois = torch.tensor([[10.0, 5.0, 30.0, 25.0]])
    got = roi_sample(ramp.contiguous(), rois, 4)[0, 0]
    centres = 10 + (torch.arange(4) + 0.5) * 5
    assert torch.allclose(got, centres[None].expand(4, 4) + 0.0, atol=1e-4)


def test_roi_depth_never_blends_invalid_pixels():
    depth = torch.full((32, 32), 5.0)
    depth[:, 16:] = 0.0
    out = roi_depth(depth, torch.tensor([[0.0, 0.0, 32.0, 32.0]]), 8)[0, 0]
    assert torch.all((out == 0) | ((out - 5.0).abs() < 1e-5))
    assert (out[:, :3] == 5.0).all() and (out[:, 5:] == 0).all()


def asym_loss_loop(logits: torch.Tensor, edges: torch.Tensor, delta: float, gamma: float) -> float:
    """AsyInst Eq. 9-11 one edge at a time: -(1/N) sum exp(gamma (P - 0.5)) log P."""
    s = lambda v: 1.0 / (1.0 + math.exp(-v))  # noqa: E731
    n, _, h, w = logits.shape
    total, count = 0.0, 0
    for k in range(n):
        for e, (dy, dx) in enumerate(OFFSETS):
            for y in range(h):
                for x in range(w):
                    if not edges[k, e, y, x] or not (0 <= y + dy < h and 0 <= x + dx < w):
                        continue
                    yp, yq = float(logits[k, 0, y, x]), float(logits[k, 0, y + dy, x + dx])
                    p = s(yp - delta) * s(yq - delta) + s(-yp + delta) * s(-yq + delta)
                    total += -math.exp(gamma * (p - 0.5)) * math.log(p)
                    count += 1
    return total / max(count, 1)


def test_color_term_matches_a_brute_force_loop():
    g = torch.Generator().manual_seed(0)
    m = 8
    rgb = (torch.rand(2, 3, m, m, generator=g) * 60 + 100).round()
    rgb[0, :, :, 4:] = 20.0                        # a colour edge inside RoI 0
    logits = torch.randn(2, 1, m, m, generator=g, dtype=torch.float64)
    inside = torch.zeros(2, 1, m, m)
    inside[:, :, 1:7, 1:7] = 1
    valid = torch.ones(2, 1, m, m, dtype=torch.bool)
    valid[1, :, :, 7] = False
    cfg = ObjectiveConfig()
    got = float(color_term(logits, rgb, valid, inside, cfg))
    lab = rgb_to_lab(rgb.permute(0, 2, 3, 1).double()).permute(0, 3, 1, 2)
    edges = torch.zeros(2, 8, m, m, dtype=torch.bool)
    for k in range(2):
        for e, (dy, dx) in enumerate(OFFSETS):
            for y in range(m):
                for x in range(m):
                    if 0 <= y + dy < m and 0 <= x + dx < m and inside[k, 0, y, x] and valid[k, 0, y + dy, x + dx]:
                        sim = math.exp(-float(torch.linalg.norm(lab[k, :, y, x] - lab[k, :, y + dy, x + dx])) / 2.0)
                        edges[k, e, y, x] = sim >= cfg.color_thresh
    assert edges.any() and not edges.all()
    want = asym_loss_loop(logits, edges, cfg.delta_color, cfg.gamma_color)
    assert got == pytest.approx(want, rel=1e-6)


def test_depth_term_matches_a_brute_force_loop():
    g = torch.Generator().manual_seed(1)
    m = 8
    depth = torch.linspace(5, 6, m)[None].expand(m, m).clone()[None, None].repeat(2, 1, 1, 1)
    depth[0, 0, 3:, :] = 9.0                       # a depth step: no edge across it
    depth[1, 0, 0, 0] = 0.0                        # an invalid pixel
    logits = torch.randn(2, 1, m, m, generator=g, dtype=torch.float64)
    inside = torch.zeros(2, 1, m, m)
    inside[:, :, 2:6, 2:6] = 1
    cfg = ObjectiveConfig()
    got = float(depth_term(logits, depth.double(), inside, cfg))
    edges = torch.zeros(2, 8, m, m, dtype=torch.bool)
    for k in range(2):
        d = depth[k, 0]
        for e, (dy, dx) in enumerate(OFFSETS):
            for y in range(m):
                for x in range(m):
                    y2, x2, y1, x1 = y + dy, x + dx, y + dy // 2, x + dx // 2
                    if not (0 <= y2 < m and 0 <= x2 < m):
                        continue
                    if min(float(d[y, x]), float(d[y1, x1]), float(d[y2, x2])) <= 0:
                        continue
                    diff = abs(float(d[y, x] + d[y2, x2] - 2 * d[y1, x1]))
                    edges[k, e, y, x] = diff <= cfg.depth_thresh and bool(inside[k, 0, y, x] or inside[k, 0, y2, x2])
    assert edges.any()
    want = asym_loss_loop(logits, edges, cfg.delta_depth, cfg.gamma_depth)
    assert got == pytest.approx(want, rel=1e-6)


def test_consistency_loss_matches_a_loop():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64)
    pseudo = torch.rand(3, 1, 4, 4, generator=g, dtype=torch.float64)
    weight = torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64)
    got = float(consistency_loss(logits, pseudo, weight))
    total = 0.0
    for k in range(3):
        p = torch.sigmoid(logits[k]).flatten()
        t = pseudo[k].flatten()
        bce = float(-(t * torch.log(p) + (1 - t) * torch.log(1 - p)).mean())
        dice = 1 - 2 * float((p * t).sum()) / ((float((p * p).sum()) + 1e-3) + (float((t * t).sum()) + 1e-3))
        total += float(weight[k]) * (bce + dice)
    assert got == pytest.approx(total / 3, rel=1e-9)


def test_projection_bce_loss_matches_a_loop():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 1, 5, 5, generator=g, dtype=torch.float64) * 3
    boxes = torch.zeros(3, 1, 5, 5, dtype=torch.float64)
    boxes[0, 0, 1:4, 2:5] = 1
    boxes[1, 0, :, :] = 1
    boxes[2, 0, 4, 0] = 1
    got = float(projection_bce_loss(logits, boxes))

    def bce(x, t):
        p = 1 / (1 + math.exp(-x))
        return -(t * math.log(p) + (1 - t) * math.log(1 - p))

    columns = rows = 0.0
    for k in range(3):
        for j in range(5):  # column j: its maximum over rows, against "the box covers column j"
            columns += bce(float(logits[k, 0, :, j].max()), float(boxes[k, 0, :, j].max()))
            rows += bce(float(logits[k, 0, j, :].max()), float(boxes[k, 0, j, :].max()))
    assert got == pytest.approx(columns / 15 + rows / 15, rel=1e-9)
    assert float(projection_bce_loss(logits[:0], boxes[:0])) == 0.0
    with pytest.raises(ValueError, match="projection_bce_loss"):
        projection_bce_loss(logits, boxes[:, :, :4])
    with pytest.raises(ValueError, match=r"projection_bce_loss: mask_logits must be \(N,1,h,w\)"):
        projection_bce_loss(logits.expand(3, 2, 5, 5), boxes.expand(3, 2, 5, 5))


def test_the_log_projection_keeps_a_gradient_where_the_dice_projection_saturates():
    # Logits near +40 everywhere: the mask is the whole RoI, wrong outside the box. The Dice projection's gradient
    # there is sigmoid'(40), nil in float32; the log loss puts (sigmoid(40) - 0) / (P * M) on the maximum of each
    # of the 12 projected rows and columns outside the box (3 + 3 per RoI), and nothing inside it.
    boxes = torch.zeros(2, 1, 6, 6)
    boxes[:, :, 1:4, 1:4] = 1
    noise = torch.rand(2, 1, 6, 6, generator=torch.Generator().manual_seed(0))  # unique maxima
    grads = {}
    for name, fn in (("dice", projection_loss), ("bce", projection_bce_loss)):
        logits = (40.0 + noise).requires_grad_()
        fn(logits, boxes).backward()
        grads[name] = logits.grad
    assert float(grads["dice"].abs().max()) < 1e-12
    bce = grads["bce"]
    assert float(bce.sum()) == pytest.approx(12 / 12, rel=1e-6)
    assert (bce[boxes.bool()] == 0).all() and (bce >= 0).all()


def test_projection_choices_are_dice_bce_and_their_sum():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(4, 1, 8, 8, generator=g)
    boxes = torch.zeros(4, 1, 8, 8)
    boxes[:, :, 2:6, 1:7] = 1
    dice, bce = projection_loss(logits, boxes), projection_bce_loss(logits, boxes)
    assert float(PROJECTIONS["dice"](logits, boxes)) == float(dice)
    assert float(PROJECTIONS["bce"](logits, boxes)) == float(bce)
    assert float(PROJECTIONS["dice+bce"](logits, boxes)) == pytest.approx(float(dice + bce), rel=1e-6)


def test_dense_nce_loss_matches_a_loop():
    g = torch.Generator().manual_seed(3)
    k, cells, c = 5, 9, 4
    q = torch.nn.functional.normalize(torch.randn(k, c, generator=g, dtype=torch.float64), dim=1)
    keys = torch.nn.functional.normalize(torch.randn(k, cells, c, generator=g, dtype=torch.float64), dim=2)
    pos = torch.tensor([0, 3, 8, 2, 2])
    w = torch.tensor([1.0, 0.2, 0.7, 0.0, 1.0], dtype=torch.float64)
    got = float(dense_nce_loss(q, keys, pos, w, 0.1))
    num = 0.0
    for i in range(k):
        sims = [float(q[i] @ keys[i, j]) / 0.1 for j in range(cells)]
        lse = math.log(sum(math.exp(s) for s in sims))
        num += float(w[i]) * (lse - sims[int(pos[i])])
    assert got == pytest.approx(num / float(w.sum()), rel=1e-9)
    assert float(dense_nce_loss(q[:0], keys[:0], pos[:0], w[:0], 0.1)) == 0.0


def tiny_cfg(**kw) -> StudentConfig:
    cfg = StudentConfig(backbone="small", fpn_channels=32, box_head_dim=64, rpn_proposals=100, rois_per_image=32,
                        mask_rois_per_image=8, mask_size=16, **kw)
    cfg.objectives.warmup_iters = 0
    return cfg


def tiny_batch(h: int = 96, w: int = 128, corr_partner=("a", 1)):
    torch.manual_seed(0)
    images, targets = [], []
    for b, image_id in enumerate(("a", "b")):
        img = torch.rand(3, h, w)
        img[:, 20:60, 30:80] = 0.9
        boxes = torch.tensor([[30.0, 20.0, 80.0, 60.0], [5.0, 50.0, 40.0, 90.0]])
        pseudo = torch.zeros(2, h, w)
        pseudo[0, 25:55, 35:75] = 1.0
        depth = torch.full((h, w), 10.0)
        depth[20:60, 30:80] = 4.0
        corr = [[(corr_partner, 7, torch.tensor([0, 24, 48]), torch.tensor([0, 24, 40]), torch.ones(3))], []]
        images.append(img)
        targets.append({"boxes": boxes, "labels": torch.tensor([1, 2]), "depth": depth, "pseudo_masks": pseudo,
                        "pseudo_weight": torch.tensor([0.8, 0.0]), "image_id": image_id,
                        "instance_ids": torch.tensor([0, 1]), "flipped": bool(b), "queue_ok": torch.tensor([True, True]),
                        "correspondences": corr})
    return images, targets


def test_every_term_is_finite_and_has_gradients_on_a_tiny_model():
    model = build_model(tiny_cfg(), 2).train()
    images, targets = tiny_batch()
    model(images, targets)                         # stages this batch's features in the feature queue
    assert ("a", 1) not in model.roi_heads.queue    # not visible before the training loop commits the step
    model.roi_heads.queue.commit()                 # so image "b" finds partner ("a", 1)
    assert ("a", 1) in model.roi_heads.queue
    losses = model(*tiny_batch())
    for name in ("loss_proj", "loss_color", "loss_depth", "loss_con", "loss_nce"):
        value = losses[name]
        assert torch.isfinite(value) and float(value.detach()) > 0, name
        model.zero_grad()
        value.backward(retain_graph=True)
        grads = [p.grad.abs().sum() for p in model.roi_heads.mask_head.parameters() if p.grad is not None]
        assert grads and float(sum(grads)) > 0, f"{name} gives the mask head no gradient"


@pytest.mark.parametrize("projection", ["bce", "dice+bce"])
def test_each_projection_trains_the_mask_head(projection):
    model = build_model(tiny_cfg(projection=projection), 2).train()
    losses = model(*tiny_batch())
    value = losses["loss_proj"]
    assert torch.isfinite(value) and float(value.detach()) > 0
    value.backward()
    grads = [p.grad.abs().sum() for p in model.roi_heads.mask_head.parameters() if p.grad is not None]
    assert grads and float(sum(grads)) > 0


def test_the_projection_setting_picks_the_box_term(monkeypatch):
    seen = []

    def marker(logits, boxes):
        seen.append(logits.shape)
        return logits.sum() * 0.0 + 123.0

    monkeypatch.setitem(PROJECTIONS, "bce", marker)
    assert float(build_model(tiny_cfg(projection="bce"), 2).train()(*tiny_batch())["loss_proj"]) == 123.0
    assert seen and seen[0][1:] == (1, 16, 16)
    assert float(build_model(tiny_cfg(projection="dice"), 2).train()(*tiny_batch())["loss_proj"]) != 123.0


def test_an_unknown_projection_is_refused_naming_the_setting():
    with pytest.raises(UserError, match=r"student.projection: unknown projection 'mil'; expected dice, bce"):
        build_model(tiny_cfg(projection="mil"), 2)
    with pytest.raises(UserError, match=r"student.min_size: needs at least one positive short side"):
        build_model(tiny_cfg(min_size=[]), 2)


def test_a_partner_missing_from_the_queue_adds_nothing():
    model = build_model(tiny_cfg(), 2).train()
    losses = model(*tiny_batch(corr_partner=("nobody", 0)))
    assert float(losses["loss_nce"]) == 0.0


def test_without_pseudo_labels_only_box_terms_train_the_mask():
    model = build_model(tiny_cfg(), 2).train()
    images, targets = tiny_batch()
    for t in targets:
        for key in ("pseudo_masks", "pseudo_weight", "correspondences", "depth"):
            t.pop(key)
    losses = model(images, targets)
    assert float(losses["loss_con"]) == 0 and float(losses["loss_nce"]) == 0 and float(losses["loss_depth"]) == 0
    assert float(losses["loss_proj"]) > 0 and float(losses["loss_color"]) > 0


def test_roi_in_image_marks_cells_outside():
    inside = roi_in_image(torch.tensor([[-8.0, 0.0, 8.0, 16.0]]), 16, 16, 4)[0, 0]
    assert inside[:, :2].logical_not().all() and inside[:, 2:].all()


def test_batched_roi_edges_equal_the_per_crop_teacher_functions():
    from teacher.affinity import depth_edges
    from teacher.color import image_color_similarity
    from teacher.refine import roi_color_edges, roi_depth_edges

    g = torch.Generator().manual_seed(5)
    cfg = ObjectiveConfig()
    rgb = (torch.rand(3, 3, 12, 12, generator=g) * 255).round()
    rgb[1] = 80.0
    valid = torch.rand(3, 1, 12, 12, generator=g) > 0.1
    inside = torch.rand(3, 1, 12, 12, generator=g) > 0.3
    want = torch.stack([(image_color_similarity(c.permute(1, 2, 0).to(torch.uint8), 1, cfg.color_theta,
                                                valid=v[0]) >= cfg.color_thresh) & m.bool()
                        for c, v, m in zip(rgb, valid, inside)])
    assert torch.equal(roi_color_edges(rgb, valid, inside, cfg), want)
    depth = torch.rand(3, 1, 12, 12, generator=g) * 0.004 + 5.0
    depth[0, 0, 4:, :] = 0.0
    want = torch.stack([depth_edges(d[0], m[None], cfg.depth_thresh, cfg.pairwise_dilation)[0]
                        for d, m in zip(depth, inside)])
    got = roi_depth_edges(depth, inside, cfg)
    assert want.any() and torch.equal(got, want)
