"""Evaluation: mask IoU against a brute-force reference, pseudo-label IoU aggregation, COCO mask AP against
pycocotools' COCOeval run directly, and the Cityscapes table layout."""
from __future__ import annotations

import contextlib
import io
import math

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import pipeline.evaluation as evaluation
from pipeline.datasets.base import Category, Dataset, Sample
from pipeline.evaluation import (CocoMaskEvaluator, CocoMaskResult, PseudoLabelEvaluator, box_mask_predictions,
                                 cityscapes_table, gt_masks, mask_iou, paired_mask_iou)


def brute_iou(a: np.ndarray, b: np.ndarray) -> float:
    inter = union = 0
    for y in range(a.shape[0]):
        for x in range(a.shape[1]):
            inter += bool(a[y, x]) and bool(b[y, x])
            union += bool(a[y, x]) or bool(b[y, x])
    return inter / union if union else 0.0


def random_masks(rng: np.random.Generator, n: int, h: int, w: int) -> np.ndarray:
    return rng.random((n, h, w)) < rng.random((n, 1, 1))


def rle(mask: np.ndarray) -> dict:
    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))


def test_mask_iou_matches_brute_force():
    rng = np.random.default_rng(0)
    a, b = random_masks(rng, 5, 9, 13), random_masks(rng, 4, 9, 13)
    b[0] = a[2]                 # identical pair
    b[1] = False                # empty mask: IoU 0 with everything
    a[4] = False
    expected = np.array([[brute_iou(x, y) for y in b] for x in a])
    got = mask_iou(a, b)
    assert got.shape == (5, 4) and got[2, 0] == 1.0
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(mask_iou([rle(m) for m in a], [rle(m) for m in b]), expected, atol=1e-12)
    np.testing.assert_allclose(mask_iou(a, [rle(m) for m in b]), expected, atol=1e-12)
    np.testing.assert_allclose(mask_iou(a[0], b), expected[:1], atol=1e-12)
    np.testing.assert_allclose(paired_mask_iou(a[:4], b), np.diag(expected[:4]), atol=1e-12)


def test_mask_iou_chunked_accumulation(monkeypatch):
    # Tiny chunks force many partial sums; the result must not change.
    rng = np.random.default_rng(1)
    a, b = random_masks(rng, 3, 17, 11), random_masks(rng, 2, 17, 11)
    expected = mask_iou(a, b)
    monkeypatch.setattr(evaluation, "_IOU_CHUNK", 7)
    np.testing.assert_array_equal(mask_iou(a, b), expected)
    np.testing.assert_allclose(expected, [[brute_iou(x, y) for y in b] for x in a], atol=1e-12)


def test_mask_iou_rejects_size_mismatch():
    with pytest.raises(ValueError, match="mask sizes differ"):
        mask_iou(np.zeros((1, 4, 4), bool), np.zeros((1, 4, 5), bool))


class ToyMaskDataset(Dataset):
    """In-memory dataset with known masks: {image_id: (boxes, classes, masks, ignore boxes, ignore masks)}."""

    name = "memory"

    def __init__(self, images: dict, height: int = 128, width: int = 128):
        super().__init__("", "val")
        self.categories = [Category(1, "person"), Category(2, "car"), Category(3, "bus")]
        self._masks, self._ignore = {}, {}
        for image_id, (boxes, classes, masks, ignore_boxes, ignore_masks) in images.items():
            self._samples.append(Sample(
                image_id=image_id, file_name=f"{image_id}.png", height=height, width=width,
                boxes=np.asarray(boxes, np.float32).reshape(-1, 4), classes=np.asarray(classes, np.int32),
                instance_ids=np.arange(len(classes), dtype=np.int32),
                ignore_boxes=np.asarray(ignore_boxes, np.float32).reshape(-1, 4),
                ignore_classes=np.ones(len(ignore_boxes), np.int32)))
            self._masks[image_id] = dict(enumerate(masks))
            self._ignore[image_id] = list(ignore_masks)

    def _gt_masks(self, sample):
        return self._masks[sample.image_id]

    def _gt_ignore_masks(self, sample):
        return self._ignore[sample.image_id]


def rect(y0, y1, x0, x1, h=128, w=128):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def disc(cy, cx, r, h=128, w=128):
    yy, xx = np.mgrid[:h, :w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


@pytest.fixture
def iou_dataset():
    # Image "a": a small person (6x8 = 48 px), a medium car (40x40 = 1600 px), a large bus (100x110).
    # Image "b": a disc person inside its box.
    a_masks = [rect(2, 8, 2, 10), rect(20, 60, 20, 60), rect(20, 120, 10, 120)]
    b_masks = [disc(64, 64, 20)]
    return ToyMaskDataset({
        "a": ([[2, 2, 10, 8], [20, 20, 60, 60], [10, 20, 120, 120]], [1, 2, 3], a_masks, [], []),
        "b": ([[44, 44, 85, 85]], [1], b_masks, [], []),
    })


def test_pseudo_label_evaluator_aggregates(iou_dataset):
    ds = iou_dataset
    a_gt = gt_masks(ds, ds.get("a"))
    ev = PseudoLabelEvaluator(ds)
    # Person exact (1.0); car: top half only (0.5); bus: no prediction (0, missing).
    ious = ev.process("a", {0: a_gt[0], 1: rle(rect(20, 40, 20, 60))})
    np.testing.assert_allclose(ious, [1.0, 0.5, 0.0])
    disc_area = int(disc(64, 64, 20).sum())
    ev.process(ds.get("b"), box_mask_predictions(ds.get("b")))
    box_iou = disc_area / (41 * 41)
    res = ev.evaluate()
    assert res.overall.count == 4 and res.missing == 1 and res.excluded == 0 and res.no_gt_mask == 0
    assert res.overall.mean_iou == pytest.approx((1.0 + 0.5 + 0.0 + box_iou) / 4)
    assert res.per_class["person"].count == 2
    assert res.per_class["person"].mean_iou == pytest.approx((1.0 + box_iou) / 2)
    assert res.per_class["car"].mean_iou == pytest.approx(0.5)
    assert res.per_class["bus"].mean_iou == 0.0
    assert res.per_size["small"].count == 1 and res.per_size["small"].mean_iou == 1.0
    assert res.per_size["medium"].count == 2          # the car and the disc (1257 px)
    assert res.per_size["large"].count == 1 and res.per_size["large"].mean_iou == 0.0
    # Only boxes with both sides >= 9 px: the 8x6 person drops out.
    res9 = ev.evaluate(min_box_side=9)
    assert res9.excluded == 1 and res9.overall.count == 3 and "small" in res9.per_size
    assert res9.per_size["small"].count == 0 and math.isnan(res9.per_size["small"].mean_iou)
    ev.reset()
    assert ev.evaluate().overall.count == 0


def test_pseudo_label_prediction_formats(iou_dataset):
    ds = iou_dataset
    gt = gt_masks(ds, ds.get("a"))

    class Label:
        def __init__(self, mask):
            self.mask = mask

    counts = rle(gt[1])["counts"].decode()
    ev = PseudoLabelEvaluator(ds)
    ious = ev.process("a", [Label(gt[0]), counts, {"size": [128, 128], "counts": counts}])
    np.testing.assert_allclose(ious, [1.0, 1.0, gt[1].sum() / (gt[1] | gt[2]).sum()])
    with pytest.raises(ValueError, match="already processed"):
        ev.process("a", [gt[0], gt[1], gt[2]])
    with pytest.raises(ValueError, match="unknown instance ids \\[7\\]"):
        ev.process("b", {7: gt[0]})
    with pytest.raises(ValueError, match="2 predictions for 1 boxes"):
        ev.process("b", [gt[0], gt[0]])
    with pytest.raises(ValueError, match="does not match the image"):
        ev.process("b", [np.zeros((4, 4), bool)])


# ----------------------------------------------------------------------------------------------- COCO AP

def run_cocoeval_directly(gt_images: list[dict], gt_anns: list[dict], dets: list[dict], cat_ids: list[int]):
    gt = COCO()
    gt.dataset = {"images": gt_images, "annotations": gt_anns, "categories": [{"id": c} for c in cat_ids]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        dt = gt.loadRes(dets)
        ev = COCOeval(gt, dt, iouType="segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


@pytest.fixture
def ap_dataset():
    # Two images; "a": a person, a car and a crowd of persons; "b": two persons.
    return ToyMaskDataset({
        "a": ([[10, 10, 40, 50], [60, 60, 120, 100]], [1, 2], [rect(10, 50, 10, 40), rect(60, 100, 60, 120)],
              [[0, 100, 50, 128]], [rect(100, 128, 0, 50)]),
        "b": ([[5, 5, 25, 45], [70, 20, 100, 60]], [1, 1], [rect(5, 45, 5, 25), rect(20, 60, 70, 100)], [], []),
    })


def predict_gt(ds, image_id, score=0.9):
    sample = ds.get(image_id)
    gt = gt_masks(ds, sample)
    return {"masks": np.stack([gt[int(i)] for i in sample.instance_ids]), "scores": np.full(len(gt), score),
            "classes": sample.classes}


def test_perfect_predictions_give_ap_one(ap_dataset):
    ev = CocoMaskEvaluator(ap_dataset)
    for image_id in ("a", "b"):
        ev.process(image_id, predict_gt(ap_dataset, image_id))
    res = ev.evaluate()
    assert (res.ap, res.ap50, res.ap75) == pytest.approx((1.0, 1.0, 1.0))
    assert res.per_class["person"] == pytest.approx(1.0) and res.per_class["car"] == pytest.approx(1.0)
    assert math.isnan(res.per_class["bus"])
    assert res.num_images == 2 and res.num_predictions == 4


def test_false_positive_above_the_true_positive_halves_ap(ap_dataset):
    # Only image "a": one car GT, a higher-scored car FP then the exact TP. Precision at every recall
    # point is 1/2 -> car AP 0.5; person is perfect -> AP = mean(0.5, 1.0) = 0.75 at every threshold.
    ds = ap_dataset
    pred = predict_gt(ds, "a", score=0.8)
    fp = rect(0, 8, 80, 128)
    pred = {"masks": np.concatenate([pred["masks"], fp[None]]), "scores": np.append(pred["scores"], 0.95),
            "classes": np.append(pred["classes"], 2)}
    ev = CocoMaskEvaluator(ds)
    ev.process("a", pred)
    res = ev.evaluate()
    assert res.per_class["car"] == pytest.approx(0.5)
    assert res.per_class["person"] == pytest.approx(1.0)
    assert (res.ap, res.ap50, res.ap75) == pytest.approx((0.75, 0.75, 0.75))


def test_detection_on_crowd_is_ignored(ap_dataset):
    ds = ap_dataset
    pred = predict_gt(ds, "a", score=0.5)
    pred = {"masks": np.concatenate([pred["masks"], rect(102, 128, 0, 48)[None]]),
            "scores": np.append(pred["scores"], 0.99), "classes": np.append(pred["classes"], 1)}
    ev = CocoMaskEvaluator(ds)
    ev.process("a", pred)
    assert ev.evaluate().ap == pytest.approx(1.0)


def test_matches_cocoeval_run_directly(ap_dataset):
    """A mix of partial overlaps, FPs, a miss and a crowd hit: our figures equal COCOeval's own."""
    ds = ap_dataset
    preds = {
        "a": [(rect(10, 44, 10, 40), 0.9, 1),     # person, IoU 34/40 = 0.85
              (rect(60, 100, 60, 90), 0.7, 2),    # car, IoU 0.5
              (rect(100, 128, 0, 50), 0.95, 1),   # on the crowd: ignored
              (rect(0, 20, 100, 128), 0.8, 2)],   # car FP
        "b": [(rect(5, 45, 5, 25), 0.6, 1),       # person exact
              (rect(0, 10, 0, 10), 0.65, 1)],     # person FP above it; the second person is missed
    }
    ev = CocoMaskEvaluator(ds)
    gt_images, gt_anns, dets = [], [], []
    for k, image_id in enumerate(("a", "b"), start=1):
        sample = ds.get(image_id)
        items = preds[image_id]
        ev.process(image_id, {"masks": np.stack([m for m, _, _ in items]), "scores": [s for _, s, _ in items],
                              "classes": [c for _, _, c in items]})
        gt_images.append({"id": k, "height": 128, "width": 128})
        gt = gt_masks(ds, sample)
        regions = [(gt[int(i)], int(c), 0) for i, c in zip(sample.instance_ids, sample.classes)]
        regions += [(m, 1, 1) for m in ds._gt_ignore_masks(sample)]
        for mask, cat, crowd in regions:
            r = rle(mask)
            gt_anns.append({"id": len(gt_anns) + 1, "image_id": k, "category_id": cat, "iscrowd": crowd,
                            "segmentation": r, "area": float(mask.sum()), "bbox": list(mask_utils.toBbox(r))})
        dets += [{"image_id": k, "category_id": c, "segmentation": rle(m), "score": s} for m, s, c in items]
    ours = ev.evaluate()
    theirs = run_cocoeval_directly(gt_images, gt_anns, dets, [1, 2, 3])
    assert [ours.ap, ours.ap50, ours.ap75, ours.ap_small, ours.ap_medium, ours.ap_large] == pytest.approx(
        [s if s >= 0 else math.nan for s in theirs.stats[:6]], nan_ok=True)
    assert ours.ap50 > ours.ap75 > 0          # the case exercises the IoU thresholds
    prec = theirs.eval["precision"]
    assert ours.per_class["person"] == pytest.approx(prec[:, :, 0, 0, -1].mean())
    assert ours.per_class["car"] == pytest.approx(prec[:, :, 1, 0, -1].mean())


def test_empty_predictions_and_mismatched_lengths(ap_dataset):
    ev = CocoMaskEvaluator(ap_dataset)
    ev.process("a", {"masks": np.zeros((0, 128, 128), bool), "scores": [], "classes": []})
    res = ev.evaluate()
    assert res.ap == 0.0 and res.num_predictions == 0
    with pytest.raises(ValueError, match="1 masks, 2 scores and 1 classes"):
        ev.process("b", {"masks": np.zeros((1, 128, 128), bool), "scores": [0.1, 0.2], "classes": [1]})
    assert math.isnan(CocoMaskEvaluator(ap_dataset).evaluate().ap)


def test_cityscapes_table_layout():
    nan = float("nan")
    per_class = {"person": 0.2291, "rider": 0.0989, "car": 0.3924, "truck": 0.2638, "bus": 0.4662,
                 "train": 0.3189, "motorcycle": 0.1252, "bicycle": nan}
    res = CocoMaskResult(0.2469, 0.5301, 0.2, nan, nan, nan, per_class, 500, 9000)
    lines = cityscapes_table({"AsyInst": res, "box": res}).splitlines()
    assert lines[0].split() == ["Method", "AP", "AP50", "person", "rider", "car", "truck", "bus", "train",
                                "motorcycle", "bicycle"]
    assert lines[1].split() == ["AsyInst", "24.7", "53.0", "22.9", "9.9", "39.2", "26.4", "46.6", "31.9",
                                "12.5", "-"]
    assert len(lines) == 3 and len({len(line) for line in lines}) == 1
    assert cityscapes_table(res, name="ours").splitlines()[1].startswith("ours")


def test_box_ap_scores_boxes_against_the_annotated_boxes(ap_dataset):
    ev = CocoMaskEvaluator(ap_dataset, "bbox")
    for image_id in ("a", "b"):
        sample = ap_dataset.get(image_id)
        ev.process(image_id, {"boxes": sample.boxes, "scores": np.full(len(sample.boxes), 0.9),
                              "classes": sample.classes})
    assert ev.evaluate().ap == pytest.approx(1.0)
    shifted = CocoMaskEvaluator(ap_dataset, "bbox")
    for image_id in ("a", "b"):
        sample = ap_dataset.get(image_id)
        boxes = sample.boxes.copy()
        w = boxes[:, 2] - boxes[:, 0]
        boxes[:, [0, 2]] += w[:, None] * 0.3           # IoU about 0.54: counts at 0.5, not at 0.75
        shifted.process(image_id, {"boxes": boxes, "scores": np.full(len(boxes), 0.9), "classes": sample.classes})
    res = shifted.evaluate()
    assert res.ap50 == pytest.approx(1.0) and res.ap75 == pytest.approx(0.0)
    with pytest.raises(ValueError):
        CocoMaskEvaluator(ap_dataset, "keypoints")
