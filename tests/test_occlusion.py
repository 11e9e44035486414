"""Joint resolution of overlapping boxes (`teacher.occlusion`, ``teacher.occlusion: joint | off``).

Synthetic scenes of flat-coloured ellipses with noise, whose true masks are known: where two boxes overlap, the
resolved labels are disjoint, depth puts the nearer object in front, colour decides without depth, a box inside
another keeps a mask, and ``off`` gives the masks of the teacher before joint resolution existed, bit for bit,
while its score still sees the overlaps (a label that is mostly another object scores low in both modes).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from teacher import StructuredTeacher
from teacher.config import JointConfig, TeacherConfig
from teacher.occlusion import _winner_map, order_evidence, own_pixels, owned_by_others, pair_overlaps, resolve
from teacher.roi import Window, roi_grid
from teacher.score import overlap_score

DATA = Path(__file__).parent / "data"
BACKGROUND = (90, 110, 80)


def ellipse(shape: tuple[int, int], box: tuple[float, float, float, float]) -> np.ndarray:
    """(H,W) bool: the ellipse inscribed in box x1, y1, x2, y2 (pixel centres)."""
    x1, y1, x2, y2 = box
    yy, xx = np.mgrid[: shape[0], : shape[1]] + 0.5
    return ((xx - (x1 + x2) / 2) / ((x2 - x1) / 2)) ** 2 + ((yy - (y1 + y2) / 2) / ((y2 - y1) / 2)) ** 2 <= 1


def scene(objects, shape=(96, 128), seed=0):
    """Paint objects far to near: each (box, rgb, depth metres). Returns image (H,W,3) uint8, depth (H,W) float32,
    boxes (N,4) float32 (each object's tight box grown by 1 px) and the visible true masks (N,H,W) bool."""
    rng = np.random.default_rng(seed)
    image = np.empty(shape + (3,), np.float64)
    image[:] = BACKGROUND
    depth = np.full(shape, 40.0, np.float32)
    visible = []
    for box, colour, d in sorted(objects, key=lambda o: -o[2]):
        m = ellipse(shape, box)
        image[m] = colour
        depth[m] = d
        visible = [v & ~m for v in visible] + [m]
    order = sorted(range(len(objects)), key=lambda k: -objects[k][2])
    masks = np.stack([visible[order.index(k)] for k in range(len(objects))])
    image = (image + rng.normal(0, 5, image.shape)).clip(0, 255).astype(np.uint8)
    boxes = np.array([o[0] for o in objects], np.float32) + np.array([-1, -1, 1, 1], np.float32)
    return image, depth, boxes, masks


def label(image, boxes, depth=None, occlusion="joint", **joint):
    cfg = TeacherConfig(device="cpu", roi_size=40, occlusion=occlusion, use_correspondence=False,
                        joint=dataclasses.replace(JointConfig(), **joint))
    return StructuredTeacher.box_prior(cfg).label(image, boxes, np.ones(len(boxes), np.int64), depth)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def assert_disjoint(masks) -> None:
    stack = np.stack(masks).astype(np.int32)
    assert stack.sum(0).max() <= 1, "two labels of one image claim the same pixel"


@pytest.mark.parametrize("max_pixels", [65536, 200])
def test_the_nearer_object_keeps_the_overlap_and_both_labels_improve(max_pixels):
    # Similar colours, and the nearer object has the larger box, so neither colour nor containment can tell:
    # depth must. max_pixels 200 decides on a grid of every 4th pixel, as on large images.
    image, depth, boxes, truth = scene([((20, 20, 70, 80), (160, 90, 80), 20.0),
                                        ((50, 15, 115, 85), (150, 100, 90), 6.0)])
    off = label(image, boxes, depth, occlusion="off")
    joint = label(image, boxes, depth, max_pixels=max_pixels)
    assert_disjoint([lab.mask for lab in joint])
    overlap = ellipse(image.shape[:2], (20, 20, 70, 80)) & ellipse(image.shape[:2], (50, 15, 115, 85))
    assert off[0].mask[overlap].mean() > 0.5                            # the far label took in its occluder
    # On the coarse grid the pixels next to the objects' edges follow their grid point: a few go astray.
    slack = 0.0 if max_pixels > 10000 else 0.05
    assert joint[1].mask[overlap].mean() > 0.9 - slack and joint[0].mask[overlap].mean() < 0.05 + slack
    for k in range(2):
        assert iou(joint[k].mask, truth[k]) > iou(off[k].mask, truth[k]) - slack / 5
    assert iou(joint[0].mask, truth[0]) - iou(off[0].mask, truth[0]) > 0.1
    # The far label is scored over what it kept, and lowered for the pixels it lost: a contested label scores lower
    # than the same label uncontested would.
    assert joint[0].score < label(image, boxes, depth, score_weight=0.0, max_pixels=max_pixels)[0].score


@pytest.mark.parametrize("front", [0, 1])
def test_without_depth_the_colour_decides(front):
    # Two boxes of one size side by side: containment and the distance from the box centres are symmetric over
    # the overlap, so only the colour of the overlap can say who is in front.
    depth_of = {front: 5.0, 1 - front: 20.0}
    objects = [((10, 20, 70, 80), (200, 50, 40), depth_of[0]), ((45, 20, 105, 80), (40, 60, 200), depth_of[1])]
    image, _, boxes, truth = scene(objects)
    joint = label(image, boxes)
    assert_disjoint([lab.mask for lab in joint])
    overlap = truth.any(0) & ellipse(image.shape[:2], objects[0][0]) & ellipse(image.shape[:2], objects[1][0])
    assert joint[front].mask[overlap].mean() > 0.9
    assert joint[1 - front].mask[overlap].mean() < 0.05
    off = label(image, boxes, occlusion="off")
    assert iou(joint[1 - front].mask, truth[1 - front]) > iou(off[1 - front].mask, truth[1 - front]) + 0.05


def test_a_box_inside_another_keeps_a_mask():
    image, _, boxes, truth = scene([((10, 10, 118, 86), (200, 60, 50), 20.0), ((50, 35, 75, 60), (200, 70, 60), 8.0)])
    joint = label(image, boxes)
    assert_disjoint([lab.mask for lab in joint])
    assert joint[1].mask.sum() > 0.5 * truth[1].sum()
    assert iou(joint[1].mask, truth[1]) > 0.6


def test_off_reproduces_the_labels_before_joint_resolution_bit_for_bit():
    """tests/data/occlusion_off_golden.npz: masks and scores of the teacher at e071c47 (before `teacher.occlusion`)
    on a 3-object scene, labelled twice so the memory bank fills, without and with depth. The masks are the same
    with the score-only resolution (the default); the scores are the same without it."""
    ref = np.load(DATA / "occlusion_off_golden.npz")
    for name, depth in (("nodepth", None), ("depth", ref["depth"])):
        scored = {}
        for score_when_off in (True, False):
            cfg = TeacherConfig(device="cpu", roi_size=32, occlusion="off",
                                joint=JointConfig(score_when_off=score_when_off))
            teacher = StructuredTeacher.box_prior(cfg)
            labels = [lab for k in range(2)
                      for lab in teacher.label(ref["image"], ref["boxes"], ref["classes"], depth, image_id=f"im{k}")]
            masks = np.stack([np.packbits(lab.mask) for lab in labels])
            assert np.array_equal(masks, ref[f"masks_{name}"])
            scored[score_when_off] = np.array([lab.score for lab in labels])
        # Scores are float32 sums: the CPU's vector width changes the last bit (seen: 1.2e-7 on one machine).
        assert np.allclose(scored[False], ref[f"scores_{name}"], rtol=0, atol=1e-6)
        # The boxes overlap, so the score-only pass has something to say, and the scores stay in [0, 1].
        assert not np.array_equal(scored[True], scored[False])
        assert ((scored[True] >= 0) & (scored[True] <= 1)).all()
    # The same scene resolved jointly: disjoint, and different from the overlapping labels.
    teacher = StructuredTeacher.box_prior(TeacherConfig(device="cpu", roi_size=32))
    joint = teacher.label(ref["image"], ref["boxes"], ref["classes"], ref["depth"], image_id="im0")
    assert_disjoint([lab.mask for lab in joint])
    first = np.unpackbits(ref["masks_depth"][:3], axis=1)[:, : ref["image"].shape[0] * ref["image"].shape[1]]
    assert (first.sum(0) > 1).any() and not np.array_equal(np.stack([lab.mask.ravel() for lab in joint]), first)


@pytest.mark.parametrize("with_depth", [False, True])
def test_a_label_that_is_mostly_another_object_scores_below_the_correct_ones(with_depth):
    # A large far object almost hidden behind a near one inside its box: labelled on its own, A's box mostly holds
    # B, so A's per-box mask is mostly B. C stands apart. With occlusion "off" the masks stay per box, and A's label
    # must score below B's and C's; resolved jointly, A keeps only what it won, and is scored as that.
    image, depth, boxes, truth = scene([((8, 8, 120, 88), (170, 80, 70), 30.0),
                                        ((14, 10, 114, 86), (60, 90, 170), 8.0),
                                        ((124, 30, 158, 70), (200, 190, 60), 12.0)], shape=(96, 160))
    d = depth if with_depth else None
    before = label(image, boxes, d, occlusion="off", score_when_off=False)
    assert iou(before[0].mask, truth[0]) < 0.2
    assert (before[0].mask & truth[1]).sum() > 0.75 * before[0].mask.sum()
    off = label(image, boxes, d, occlusion="off")
    scores = [lab.score for lab in off]
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert scores[0] < min(scores[1], scores[2]) - 0.2, scores
    # Without the score-only pass, "off" was blind to it: the wrong label scored as high as the right ones.
    assert before[0].score > min(before[1].score, before[2].score) > scores[0] + 0.2
    for a, b in zip(before, off):
        assert np.array_equal(a.mask, b.mask)
    joint = label(image, boxes, d)
    assert (joint[0].mask & truth[1]).sum() < 0.25 * joint[0].mask.sum()
    assert iou(joint[0].mask, truth[0]) > iou(before[0].mask, truth[0]) + 0.3
    assert all(0.0 <= lab.score <= 1.0 for lab in joint)
    # Nobody lost every pixel, so the lost gate leaves the resolved labels' scores as they were.
    assert [lab.score for lab in joint] == [lab.score for lab in label(image, boxes, d, lost_power=0.0)]


def test_a_resolved_label_that_lost_every_pixel_is_flagged_and_its_gate_closes():
    # Instance 0's box lies inside instance 1's, and instance 1 is surer of every pixel of it and holds the pixel
    # colours: instance 0 loses all it claimed and gets its own mask back (so the rows stay one per box): the mask
    # written for it is what instance 1 won, its lost share is 1, and the lost gate takes its score to 0.
    image = torch.full((40, 60, 3), 100, dtype=torch.uint8)
    inner = Window(torch.full((10, 10), 0.51), 15, 24, 25, 34)
    outer = Window(torch.full((36, 56), 0.99), 2, 37, 2, 57)
    boxes = torch.tensor([[25.0, 15.0, 35.0, 25.0], [2.0, 2.0, 58.0, 38.0]])
    bins = 8
    hist = torch.full((2, bins**3), 1e-3)
    hist[1] = 1.0                                           # only instance 1's colour model explains the image
    hist = hist / hist.sum(1, keepdim=True)
    cfg = JointConfig(containment_weight=0.0, centre_weight=0.0, bottom_weight=0.0)
    res = resolve([inner, outer], boxes, image, None, hist, None, cfg, 20.0, 0.5)
    assert res.lost.tolist() == [1.0, 0.0]
    assert res.masks[0][15:25, 25:35].all() and not res.masks[1][15:25, 25:35].any()
    assert overlap_score(torch.tensor([0.95]), res.contested[:1], res.margin[:1], res.lost[:1], 0.1, 6.0) == 0.0


def test_overlap_score_gates_on_the_lost_share_and_stays_in_range():
    score = torch.tensor([0.9, 0.9, 0.9, 0.9, 1.0, 0.0])
    contested = torch.tensor([0.0, 0.5, 0.5, 1.0, 1.0, 1.0])
    margin = torch.tensor([1.0, 0.2, 0.2, 0.0, 0.0, 0.0])
    lost = torch.tensor([0.0, 0.1, 0.9, 1.0, 1.0, 1.0])
    out = overlap_score(score, contested, margin, lost, 0.1, 6.0)
    assert out[0] == 0.9                                                  # nothing contested: unchanged
    assert torch.isclose(out[1], torch.tensor(0.9 * (1 - 0.1 * 0.5 * 0.8) * (1 - 0.1**6)))
    assert out[2] < 0.5 * out[1]                                          # lost most of its mask
    assert out[3] == out[4] == out[5] == 0.0 and ((out >= 0) & (out <= 1)).all()
    ungated = overlap_score(score, contested, margin, lost, 0.1, 0.0)
    assert torch.allclose(ungated, score * (1 - 0.1 * contested * (1 - margin)))


def test_a_negative_lost_power_is_refused():
    with pytest.raises(ValueError, match="lost_power"):
        StructuredTeacher.box_prior(TeacherConfig(joint=JointConfig(lost_power=-1.0)))


def test_boxes_that_do_not_overlap_are_left_as_they_are():
    image, depth, boxes, _ = scene([((5, 10, 50, 60), (200, 50, 40), 10.0), ((70, 20, 120, 80), (40, 60, 200), 12.0)])
    off = label(image, boxes, depth, occlusion="off")
    joint = label(image, boxes, depth)
    for a, b in zip(off, joint):
        assert np.array_equal(a.mask, b.mask) and a.score == b.score


def test_tiny_boxes_keep_the_box_minus_what_others_own():
    image, _, boxes, _ = scene([((20, 20, 90, 80), (200, 50, 40), 10.0)])
    boxes = np.concatenate([boxes, [[50.0, 40.0, 51.5, 41.5]]]).astype(np.float32)   # 1.5 px: not run
    joint = label(image, boxes)
    assert_disjoint([lab.mask for lab in joint])
    assert joint[1].score == 0.0


def test_order_evidence_is_antisymmetric_and_points_the_right_way():
    boxes = torch.tensor([[0.0, 0.0, 100.0, 100.0], [20.0, 20.0, 40.0, 40.0], [60.0, 50.0, 120.0, 110.0]])
    cfg = JointConfig(containment_weight=1.0, bottom_weight=1.0, depth_order_weight=1.0)
    o = order_evidence(boxes, torch.tensor([20.0, 10.0, float("nan")]), cfg)
    assert torch.allclose(o, -o.T)
    assert o[1, 0] > 0                     # inside the other box, lower? no, but contained and nearer
    assert o[2, 0] > 0                     # lower bottom edge and mostly outside: in front of box 0
    off = order_evidence(boxes, None, dataclasses.replace(cfg, containment_weight=0.0, bottom_weight=0.0))
    assert torch.count_nonzero(off) == 0


def test_own_pixels_leave_out_the_other_boxes():
    boxes = torch.tensor([[0.0, 0.0, 40.0, 40.0], [20.0, 0.0, 60.0, 40.0]])
    grid = roi_grid(boxes, 16, 0.25)
    own = own_pixels(grid, boxes)
    assert own[0, 0].any() and own[1, 0].any()
    assert not (own & ~grid.inside).any()
    # RoI 0 spans x in [-10, 50]: its own pixels lie left of x = 20, where box 1 starts.
    cols = torch.nonzero(own[0, 0].any(0))[:, 0]
    xs = -10 + (cols.float() + 0.5) / 16 * 60
    assert (xs < 20).all()


def test_owned_by_others_marks_the_crop_pixels_another_mask_holds():
    boxes = torch.tensor([[0.0, 0.0, 40.0, 40.0], [20.0, 0.0, 60.0, 40.0]])
    grid = roi_grid(boxes, 16, 0.25)
    a = torch.zeros(40, 64, dtype=torch.bool)
    a[:, :30] = True
    b = torch.zeros_like(a)
    b[:, 30:60] = True
    owned = owned_by_others(grid, [a, b])[:, 0]
    # RoI 0 spans x in [-10, 50] (3.75 px per column): b holds x in [30, 60).
    xs0 = -10 + (torch.arange(16) + 0.5) * 3.75
    assert torch.equal(owned[0].any(0), (xs0 >= 30) & (xs0 < 60))
    xs1 = 10 + (torch.arange(16) + 0.5) * 3.75
    assert torch.equal(owned[1].any(0), (xs1 >= 0) & (xs1 < 30))


def test_pair_overlaps_counts_pixels():
    prob = torch.zeros(1, 1)
    windows = [Window(prob, 0, 9, 0, 9), Window(prob, 5, 14, 5, 14), Window(prob, 20, 25, 20, 25), Window(prob, 3, 2, 0, 1)]
    inter = pair_overlaps(windows)
    assert inter[0, 1] == inter[1, 0] == 25 and inter[0, 2] == 0 and inter[3].sum() == 0 and np.all(np.diag(inter) == 0)


def test_resolve_without_overlap_returns_the_thresholded_masks():
    prob = torch.tensor([[0.2, 0.7], [0.9, 0.4]])
    res = resolve([Window(prob, 0, 1, 0, 1), Window(prob, 2, 3, 2, 3)], torch.tensor([[0.0, 0, 2, 2], [2.0, 2, 4, 4]]),
                  torch.zeros(4, 4, 3, dtype=torch.uint8), None, torch.full((2, 512), 1 / 512), None, JointConfig(),
                  20.0, 0.5)
    assert res.masks[0][:2, :2].tolist() == [[False, True], [True, False]]
    assert res.contested.tolist() == [0.0, 0.0] and res.margin.tolist() == [1.0, 1.0]


def test_bad_occlusion_setting_is_refused():
    with pytest.raises(ValueError, match="occlusion"):
        StructuredTeacher.box_prior(TeacherConfig(occlusion="maybe"))


def test_bench_disjoint_oracle_gives_contested_pixels_to_the_smallest_true_owner():
    """bench/teacher.py's ceiling of joint resolution, on a table holding a cup (COCO's convention: the table's
    mask includes the cup) and a stray pixel both boxes hold that no ground truth does."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.teacher import disjoint_oracle_ious

    shape = (20, 20)
    table_gt = np.zeros(shape, bool)
    table_gt[2:18, 2:18] = True
    cup_gt = np.zeros(shape, bool)
    cup_gt[5:9, 5:9] = True
    boxes = np.array([[2, 2, 18, 18], [4, 4, 10, 10]], np.float32)
    table = table_gt.copy()
    cup = np.zeros(shape, bool)
    cup[4:10, 4:10] = True                       # spills one pixel ring onto the table
    stray = np.zeros(shape, bool)
    stray[4, 4] = True
    table_gt[4, 4] = False                       # nobody's pixel, claimed by both labels
    out = disjoint_oracle_ious([table, cup], [table_gt, cup_gt], boxes)
    # The cup keeps only its true pixels; the table keeps the ring it owns and loses the cup and the stray pixel.
    table_best = table & ~cup_gt & ~stray
    assert out[1] == 1.0
    assert out[0] == pytest.approx((table_best & table_gt).sum() / (table_best | table_gt).sum())
    assert disjoint_oracle_ious([cup], [cup_gt], boxes[1:]) == [16 / 36]


def test_the_grid_winners_spread_to_their_cells_and_the_pasted_odds_decide_where_no_grid_point_is_contested():
    # A holds columns 0-2 at 0.9, B columns 1-3 at 0.6; columns 1-2 are contested. On the grid of every 2nd pixel
    # only the points of column 2 are contested, and B won them: column 2 (and its cell's column 3, which is not
    # contested) follows them, while column 1's grid points (column 0) are not contested, so A's higher pasted
    # probability takes it.
    a = Window(torch.full((4, 3), 0.9), 0, 3, 0, 2)
    b = Window(torch.full((4, 3), 0.6), 0, 3, 1, 3)
    contested = torch.zeros((4, 4), dtype=torch.bool)
    contested[:, 1:3] = True
    cell = torch.tensor([[0, 1], [1, 1]])
    winners = _winner_map(torch.tensor([1, 1]), cell, contested, (0, 3, 0, 3), 2, [a, b])
    expected = torch.full((4, 4), -1, dtype=torch.int16)
    expected[:, 1] = 0
    expected[:, 2] = 1
    assert torch.equal(winners, expected)
    # Had A won column 2's grid points, column 2 would be A's too; stride 1 is the grid itself.
    winners = _winner_map(torch.tensor([0, 0]), cell, contested, (0, 3, 0, 3), 2, [a, b])
    assert (winners[:, 1:3] == 0).all() and (winners[:, [0, 3]] == -1).all()
    full = torch.nonzero(contested)
    one = _winner_map(torch.arange(len(full)) % 2, full, contested, (0, 3, 0, 3), 1, [a, b])
    assert torch.equal(one[contested], (torch.arange(len(full)) % 2).to(torch.int16))
