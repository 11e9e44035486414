"""StructuredTeacher end to end on generated images: API as issue 5 writes it, quality on a separable object,
masks inside boxes, memory bank and partners, degenerate boxes, determinism, bad input."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from teacher import InstanceLabel, Match, StructuredTeacher
from teacher.box_prior import colour_log_ratio, colour_bins, superellipse_logits
from teacher.config import FusionConfig, TeacherConfig
from teacher.roi import crop, paste, roi_grid
from teacher.score import agreement, certainty, mask_score


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def blob_scene(seed: int, height: int = 120, width: int = 160, shapes: int = 2):
    """Textured background with `shapes` flat-coloured ellipses; returns image, boxes, classes, gt masks."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 60, size=(height, width, 3)).astype(np.uint8)
    img[..., 2] = rng.integers(120, 160, size=(height, width))
    ys, xs = np.mgrid[:height, :width] + 0.5
    boxes, gts = [], []
    for k in range(shapes):
        cx, cy = 40 + 80 * k + rng.uniform(-5, 5), 60 + rng.uniform(-5, 5)
        ax, ay = rng.uniform(18, 28), rng.uniform(25, 35)
        m = ((xs - cx) / ax) ** 2 + ((ys - cy) / ay) ** 2 <= 1
        img[m] = (220, 200 - 60 * k, 40)
        gts.append(m)
        boxes.append([cx - ax, cy - ay, cx + ax, cy + ay])
    return img, np.asarray(boxes, np.float32), np.arange(shapes, dtype=np.int64) % 2, gts


def rectangle_scene(height: int = 100, width: int = 140):
    img = np.full((height, width, 3), (30, 90, 30), np.uint8)
    img[20:80, 30:110] = (230, 60, 200)
    gt = np.zeros((height, width), bool)
    gt[20:80, 30:110] = True
    return img, np.array([[30, 20, 110, 80]], np.float32), np.array([3]), gt


def test_api_exactly_as_issue_writes_it():
    img, boxes, classes, _ = blob_scene(0)
    teacher = StructuredTeacher.box_prior(config=None)
    labels = teacher.label(img, boxes, classes, depth=None)
    assert isinstance(labels, list) and len(labels) == len(boxes)
    for lab in labels:
        assert isinstance(lab, InstanceLabel)
        assert lab.mask.shape == img.shape[:2] and lab.mask.dtype == bool
        assert isinstance(lab.score, float) and 0.0 <= lab.score <= 1.0
        assert isinstance(lab.correspondences, list)
    depth = np.full(img.shape[:2], 5.0, np.float32)
    assert len(teacher.label(img, boxes, classes, depth=depth)) == len(boxes)
    bgr_view = np.ascontiguousarray(img[:, :, ::-1])[:, :, ::-1]  # negative strides
    assert np.array_equal(teacher.label(bgr_view, boxes, classes)[0].mask, teacher.label(img, boxes, classes)[0].mask)
    batch = teacher.label_batch([img, img], [boxes, boxes[:1]], [classes, classes[:1]])
    assert [len(b) for b in batch] == [2, 1]


def test_separable_object_recovered_and_masks_inside_boxes():
    img, boxes, classes, gts = blob_scene(1)
    labels = StructuredTeacher.box_prior().label(img, boxes, classes)
    for lab, gt, box in zip(labels, gts, boxes):
        assert iou(lab.mask, gt) >= 0.9
        ys, xs = np.nonzero(lab.mask)
        assert xs.min() + 0.5 >= box[0] and xs.max() + 0.5 <= box[2]
        assert ys.min() + 0.5 >= box[1] and ys.max() + 0.5 <= box[3]


def test_image_evidence_beats_the_shape_prior_on_a_rectangle():
    """The ellipse alone misses the corners of a box-filling object; colour model, CRF and refinement recover them."""
    img, boxes, classes, gt = rectangle_scene()
    cfg = TeacherConfig()
    prior_only = dataclasses.replace(cfg, box_prior=dataclasses.replace(cfg.box_prior, color_weight=0.0),
                                     crf=dataclasses.replace(cfg.crf, iters=0),
                                     refine=dataclasses.replace(cfg.refine, steps=0))
    full = StructuredTeacher.box_prior(cfg).label(img, boxes, classes)[0]
    prior = StructuredTeacher.box_prior(prior_only).label(img, boxes, classes)[0]
    assert iou(full.mask, gt) >= 0.9
    assert iou(full.mask, gt) > iou(prior.mask, gt) + 0.1
    assert full.score > prior.score


def test_score_ranks_clear_objects_above_camouflaged_ones():
    img, boxes, classes, _ = rectangle_scene()
    flat = np.full_like(img, 90)
    clear = StructuredTeacher.box_prior().label(img, boxes, classes)[0]
    camouflaged = StructuredTeacher.box_prior().label(flat, boxes, classes)[0]
    assert clear.score > camouflaged.score


# The partner tests use the official (message-passing) correspondence: it needs no Sinkhorn and is ~10x faster;
# the ICM mode's maths is tested with the correspondence module.
OFFICIAL = dataclasses.replace(TeacherConfig().correspondence, mode="official")


def test_memory_bank_fills_and_partners_are_used():
    cfg = TeacherConfig(use_correspondence=True, correspondence=OFFICIAL)
    teacher = StructuredTeacher.box_prior(cfg)
    for seed in range(6):
        img, boxes, classes, _ = blob_scene(seed)
        labels = teacher.label(img, boxes, np.zeros(2, np.int64), image_id=f"img{seed}")
    assert teacher.bank.fill() == {0: 12}
    # 10 objects from 5 other images are stored by the sixth call: every query got partners.
    for lab in labels:
        assert len(lab.correspondences) == cfg.bank.max_partners
        for m in lab.correspondences:
            assert isinstance(m, Match) and m.partner_image_id != "img5"
            assert m.grid == cfg.correspondence.grid and len(m.src) > 0
            assert m.src.shape == m.dst.shape == m.weight.shape
            assert ((m.dst >= 0) & (m.dst < m.grid**2)).all() and ((m.weight >= 0) & (m.weight <= 1 + 1e-6)).all()
    assert teacher.timings["correspondence"] > 0
    # The partners change the labels: without the cross-image term (weight 0) the last masks differ.
    off = dataclasses.replace(cfg, crf=dataclasses.replace(cfg.crf, cross_image_weight=0.0))
    teacher_off = StructuredTeacher.box_prior(off)
    for seed in range(6):
        img, boxes, _, _ = blob_scene(seed)
        labels_off = teacher_off.label(img, boxes, np.zeros(2, np.int64), image_id=f"img{seed}")
    assert any((a.mask != b.mask).any() for a, b in zip(labels, labels_off))


def test_correspondence_off_skips_the_bank(monkeypatch):
    import teacher.structured_teacher as st

    def never(*args, **kwargs):
        raise AssertionError("correspondence ran with use_correspondence=False")

    monkeypatch.setattr(st, "correspond", never)
    monkeypatch.setattr(st, "lowlevel_features", never)
    teacher = StructuredTeacher.box_prior(TeacherConfig(use_correspondence=False))
    for seed in range(6):
        img, boxes, _, _ = blob_scene(seed)
        labels = teacher.label(img, boxes, np.zeros(2, np.int64), image_id=f"img{seed}")
    assert teacher.bank.fill() == {} or sum(teacher.bank.fill().values()) == 0
    assert all(lab.correspondences == [] for lab in labels)


def test_no_partners_below_min_partners():
    teacher = StructuredTeacher.box_prior(TeacherConfig(use_correspondence=True, correspondence=OFFICIAL))
    for seed in range(2):
        img, boxes, _, _ = blob_scene(seed)
        labels = teacher.label(img, boxes, np.zeros(2, np.int64), image_id=seed)
    assert all(lab.correspondences == [] for lab in labels)


def test_empty_tiny_and_border_boxes():
    img, _, _, _ = blob_scene(2)
    h, w = img.shape[:2]
    teacher = StructuredTeacher.box_prior()
    assert teacher.label(img, np.zeros((0, 4), np.float32), np.zeros(0, np.int64)) == []
    boxes = np.array([[10, 10, 11.5, 30],        # tiny (< 2 px wide)
                      [50, 50, 50, 50],          # zero area
                      [-30, -20, 40, 50],        # beyond the top-left corner
                      [w - 30, h - 40, w + 50, h + 10],
                      [w + 5, 0, w + 40, 20]],   # fully outside
                     np.float32)
    labels = teacher.label(img, boxes, np.arange(5))
    assert len(labels) == 5
    assert labels[0].mask.sum() <= 2 * 20 and labels[0].score == 0.0
    assert labels[1].mask.sum() == 0 and labels[4].mask.sum() == 0
    assert labels[2].mask[:50, :40].sum() == labels[2].mask.sum() > 0
    assert labels[3].mask[h - 40 :, w - 30 :].sum() == labels[3].mask.sum() > 0


def test_deterministic_for_a_seed():
    def run():
        teacher = StructuredTeacher.box_prior(TeacherConfig(seed=3, use_correspondence=True, correspondence=OFFICIAL))
        out = []
        for seed in range(6):
            img, boxes, _, _ = blob_scene(seed)
            out += teacher.label(img, boxes, np.zeros(2, np.int64), image_id=seed)
        return out

    a, b = run(), run()
    for x, y in zip(a, b):
        assert np.array_equal(x.mask, y.mask) and x.score == y.score
        assert [(m.partner_image_id, m.partner_instance_id) for m in x.correspondences] == \
            [(m.partner_image_id, m.partner_instance_id) for m in y.correspondences]


@pytest.mark.parametrize(
    "args, message",
    [
        ((np.zeros((10, 10), np.uint8), np.zeros((0, 4)), np.zeros(0)), "image must be"),
        ((np.zeros((10, 10, 3), np.float32), np.zeros((0, 4)), np.zeros(0)), "uint8"),
        ((np.zeros((10, 10, 3), np.uint8), np.zeros((2, 3)), np.zeros(2)), "boxes must be"),
        ((np.zeros((10, 10, 3), np.uint8), np.array([[1, 1, np.nan, 4]]), np.zeros(1)), "NaN"),
        ((np.zeros((10, 10, 3), np.uint8), np.array([[5, 1, 2, 4]]), np.zeros(1)), "x2 >= x1"),
        ((np.zeros((10, 10, 3), np.uint8), np.array([[1, 1, 5, 4]]), np.zeros(2)), "classes must be"),
        ((np.zeros((10, 10, 3), np.uint8), np.array([[1, 1, 5, 4]]), np.array([0.5])), "integers"),
    ],
)
def test_bad_input_is_a_clear_value_error(args, message):
    with pytest.raises(ValueError, match=message):
        StructuredTeacher.box_prior().label(*args)


def test_bad_depth_is_a_clear_value_error():
    img = np.zeros((10, 10, 3), np.uint8)
    box, cls = np.array([[1, 1, 8, 8]], np.float32), np.array([0])
    with pytest.raises(ValueError, match="depth must be"):
        StructuredTeacher.box_prior().label(img, box, cls, depth=np.zeros((5, 5), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        StructuredTeacher.box_prior().label(img, box, cls, depth=np.full((10, 10), np.nan, np.float32))


class PriorNetwork:
    """Deterministic test network (`teacher.network.TeacherNetwork`): box ellipse with seeded noise as the mask,
    image colour as the feature."""

    def __init__(self, grid: int = 14, seed: int = 0):
        self.grid, self.gen = grid, torch.Generator().manual_seed(seed)
        self.calls = 0
        self.classes = [0, 1]
        self.training = True

    def eval(self):
        self.training = False
        return self

    def to(self, device):
        return self

    def __call__(self, images, boxes, classes):
        self.calls += 1
        assert not self.training and not torch.is_grad_enabled()
        out = []
        for image, b, c in zip(images, boxes, classes):
            assert image.shape[0] == 3 and image.dtype == torch.float32 and float(image.max()) <= 1.0
            assert len(b) == len(c) and set(c.tolist()) <= set(self.classes)
            t = (torch.arange(self.grid) + 0.5) / self.grid * 2 - 1
            ell = ((t[None, :] ** 2 + t[:, None] ** 2) <= 1).float()
            noise = torch.rand((len(b), self.grid, self.grid), generator=self.gen) * 0.2
            probs = (0.1 + 0.8 * ell)[None] + noise - 0.1
            feats, _ = crop(image, roi_grid(b, 7, 0.0))
            out.append((probs.clamp(0, 1), feats))
        return out


def _run(teacher, seeds=range(6), batch=False):
    scenes = [blob_scene(seed) for seed in seeds]
    args = ([s[0] for s in scenes], [s[1] for s in scenes], [np.zeros(len(s[1]), np.int64) for s in scenes])
    if batch:
        return teacher.label_batch(*args, image_ids=list(seeds)), scenes
    return [teacher.label(img, b, c, image_id=seed) for img, b, c, seed in zip(*args, seeds)], scenes


def _same(a, b):
    for la, lb in zip(a, b):
        for x, y in zip(la, lb):
            assert np.array_equal(x.mask, y.mask) and x.score == pytest.approx(y.score, abs=1e-6)
            assert [(m.partner_image_id, m.partner_instance_id) for m in x.correspondences] == \
                [(m.partner_image_id, m.partner_instance_id) for m in y.correspondences]


def test_network_mode_uses_the_network_and_correspondence():
    net = PriorNetwork()
    teacher = StructuredTeacher(net, TeacherConfig(correspondence=OFFICIAL, unary="network"))
    assert teacher.uses_correspondence and not net.training
    labels, scenes = _run(teacher)
    assert net.calls == 6
    for lab, gt in zip(labels[-1], scenes[-1][3]):
        assert iou(lab.mask, gt) > 0.8 and lab.correspondences


def test_label_batch_runs_the_network_on_several_images_at_once_with_the_same_labels():
    one = PriorNetwork()
    singles, _ = _run(StructuredTeacher(one, TeacherConfig(network_batch=4)))
    many = PriorNetwork()
    batched, _ = _run(StructuredTeacher(many, TeacherConfig(network_batch=4)), batch=True)
    assert one.calls == 6 and many.calls == 2
    _same(singles, batched)


def test_fused_unary_reduces_to_each_mode_when_the_other_weight_is_zero():
    prior, _ = _run(StructuredTeacher.box_prior(TeacherConfig()))
    net = PriorNetwork()
    no_net, _ = _run(StructuredTeacher(net, TeacherConfig(fusion=FusionConfig(network_weight=0.0, prior_weight=1.0))))
    _same(prior, no_net)
    assert net.calls == 0
    network, _ = _run(StructuredTeacher(PriorNetwork(), TeacherConfig(unary="network")))
    no_prior, _ = _run(StructuredTeacher(PriorNetwork(), TeacherConfig(fusion=FusionConfig(network_weight=1.0,
                                                                                        prior_weight=0.0))))
    _same(network, no_prior)
    fused, _ = _run(StructuredTeacher(PriorNetwork(), TeacherConfig()))
    with pytest.raises(ValueError, match="not both 0"):
        StructuredTeacher(PriorNetwork(), TeacherConfig(fusion=FusionConfig(network_weight=0.0, prior_weight=0.0)))
    assert any(not np.array_equal(a.mask, b.mask) for la, lb in zip(fused, prior) for a, b in zip(la, lb))


def test_box_prior_unary_never_runs_the_network():
    net = PriorNetwork()
    labels, _ = _run(StructuredTeacher(net, TeacherConfig(unary="box_prior")))
    prior, _ = _run(StructuredTeacher.box_prior(TeacherConfig()))
    assert net.calls == 0
    _same(labels, prior)


def test_network_with_wrong_outputs_is_rejected():
    img, boxes, classes, _ = blob_scene(0)
    bad = StructuredTeacher(lambda images, b, c: [(torch.zeros(len(b[0]), 5), torch.zeros(len(b[0]), 3, 7, 7))])
    with pytest.raises(ValueError, match="network returned"):
        bad.label(img, boxes, classes)
    short = StructuredTeacher(lambda images, b, c: [])
    with pytest.raises(ValueError, match="one .mask_probs, features. pair per image"):
        short.label(img, boxes, classes)
    with pytest.raises(ValueError, match="TeacherConfig.unary"):
        StructuredTeacher(PriorNetwork(), TeacherConfig(unary="prior"))


def test_paste_matches_a_brute_force_box_clip():
    """A probability of 1 everywhere pastes exactly the pixels whose centres lie in the (clipped) box."""
    boxes = torch.tensor([[3.2, 4.7, 17.5, 9.1], [-4.0, 2.0, 6.0, 30.0]])
    grid = roi_grid(boxes, 16, 0.4)
    masks = paste(torch.ones(2, 16, 16), grid, 20, 25)
    ys, xs = np.mgrid[:20, :25] + 0.5
    for m, b in zip(masks, boxes.numpy()):
        ref = (xs >= b[0]) & (xs <= b[2]) & (ys >= b[1]) & (ys <= b[3])
        assert np.array_equal(m.numpy(), ref)


def test_superellipse_prior_is_the_inscribed_ellipse_at_p2():
    grid = roi_grid(torch.tensor([[0.0, 0.0, 40.0, 20.0]]), 32, 0.25)
    logits = superellipse_logits(grid, 2.0, 0.25)[0, 0]
    r = grid.u[0][None, :] ** 2 + grid.v[0][:, None] ** 2
    assert torch.equal(logits > 0, r < 1)


def test_score_pieces():
    p = torch.tensor([[[[1.0, 0.0], [0.5, 0.5]]]])
    inside = torch.tensor([[[[True, True], [True, False]]]])
    assert torch.allclose(certainty(p, inside), torch.tensor([2 / 3]))
    q = torch.tensor([[[[0.5, 0.5], [0.5, 1.0]]]])
    # inside pixels: min 0.5, 0, 0.5 = 1.0; max 1, 0.5, 0.5 = 2.0 (the outside pixel does not count)
    assert torch.allclose(agreement(p, q, inside), torch.tensor([0.5]))
    assert torch.allclose(mask_score(p, q, inside), torch.tensor([1 / 3]))
    assert torch.equal(agreement(torch.zeros_like(p), torch.zeros_like(p), inside), torch.tensor([1.0]))
    # The score ranks: a firm mask that the CRF agrees with beats a firm one it disagrees with, and a vague one.
    firm, vague = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]]), torch.full((1, 1, 2, 2), 0.6)
    all_in = torch.ones_like(inside)
    assert mask_score(firm, firm, all_in) > mask_score(firm, 1 - firm, all_in)
    assert mask_score(firm, firm, all_in) > mask_score(vague, vague, all_in)


def test_colour_log_ratio_against_brute_force_histograms():
    """Global background only: llr = log of the ratio of smoothed weighted histograms, computed by hand."""
    cfg = TeacherConfig().box_prior
    cfg = dataclasses.replace(cfg, local_background=0.0, color_bins=4, color_alpha=0.5, color_clip=50.0)
    grid = roi_grid(torch.tensor([[0.0, 0.0, 10.0, 10.0]]), 12, 0.25)
    gen = torch.Generator().manual_seed(0)
    lab = torch.stack([torch.rand(12, 12, generator=gen) * 100, torch.rand(12, 12, generator=gen) * 200 - 100,
                       torch.rand(12, 12, generator=gen) * 200 - 100])[None]
    valid = torch.ones(1, 1, 12, 12, dtype=torch.bool)
    q = torch.rand(1, 1, 12, 12, generator=gen)
    cells = colour_bins(lab, 4)
    llr = colour_log_ratio(cells, valid, grid, q, cfg)[0, 0].flatten()
    inside = grid.inside.flatten().numpy()
    qf, c = q.flatten().numpy(), cells[0].numpy()
    fg, bg = np.full(64, 0.5), np.full(64, 0.5)
    for k in range(144):
        fg[c[k]] += qf[k] * inside[k]
        bg[c[k]] += (1.0 - qf[k]) if inside[k] else cfg.ring_weight
    ref = np.log(fg[c] / fg.sum()) - np.log(bg[c] / bg.sum())
    assert np.allclose(llr.numpy(), ref, atol=1e-4)


def test_depth_gradient_term_helps_where_colour_cannot():
    """Object and ground share one texture; only depth (a plane vs a ground ramp) tells them apart."""
    h, w = 100, 140
    img = np.random.default_rng(0).integers(100, 140, size=(h, w, 3)).astype(np.uint8)
    ys, xs = np.mgrid[:h, :w] + 0.5
    depth = (20.0 - 0.1 * ys).astype(np.float32)
    gt = (np.abs(xs - 70) / 40 + np.abs(ys - 50) / 30) <= 1
    depth[gt] = 6.0
    depth[:5] = 0.0  # invalid pixels are allowed
    boxes, classes = np.array([[30, 20, 110, 80]], np.float32), np.array([0])
    teacher = StructuredTeacher.box_prior()
    without = teacher.label(img, boxes, classes)[0].mask
    with_depth = teacher.label(img, boxes, classes, depth=depth)[0].mask
    assert iou(with_depth, gt) > iou(without, gt) + 0.04


def test_label_batch_can_hand_back_one_images_failure_in_its_place():
    scenes = [blob_scene(seed) for seed in range(3)]
    images = [s[0] for s in scenes]
    images[1] = images[1][:, :, :2]  # not RGB
    boxes = [s[1] for s in scenes]
    classes = [np.zeros(len(b), np.int64) for b in boxes]
    teacher = StructuredTeacher.box_prior(TeacherConfig())
    with pytest.raises(ValueError, match="must be .H,W,3. RGB"):
        teacher.label_batch(images, boxes, classes)
    out = StructuredTeacher.box_prior(TeacherConfig()).label_batch(images, boxes, classes, return_exceptions=True)
    assert isinstance(out[1], ValueError) and "RGB" in str(out[1])
    assert all(len(o) == len(b) and all(isinstance(lab, InstanceLabel) for lab in o)
               for o, b in ((out[0], boxes[0]), (out[2], boxes[2])))
    # A network that fails fails its chunk only.
    calls = []
    healthy = PriorNetwork().eval()

    def flaky(imgs, b, c):
        calls.append(len(imgs))
        if len(calls) == 1:
            raise RuntimeError("out of memory")
        return healthy(imgs, b, c)

    net = StructuredTeacher(flaky, TeacherConfig(network_batch=2))
    out = net.label_batch([s[0] for s in scenes], boxes, classes, return_exceptions=True)
    assert calls == [2, 1] and [type(o).__name__ for o in out[:2]] == ["RuntimeError"] * 2
    assert isinstance(out[2], list) and len(out[2]) == len(boxes[2])
