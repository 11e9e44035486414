"""Evaluation: the only module that reads ground-truth masks.

Three yardsticks:

* pseudo-label quality (``PseudoLabelEvaluator``): each box's predicted mask against the ground-truth mask of
  the same instance; mean IoU overall, per class and per COCO size bucket (by ground-truth mask area);
* instance-segmentation quality (``CocoMaskEvaluator``): COCO mask AP, AP50, AP75 and per-class AP computed
  by pycocotools' ``COCOeval`` (iouType "segm"), crowd / ignore regions handled as COCO does;
* ``cityscapes_table``: a ``CocoMaskResult`` in the layout of AsyInst's Table 2.

``evaluate_shards`` streams: one shard at a time is scored into running sums (``IoUSums``), with bounded
galleries (``Extremes``) and a bounded sample for the score's rank correlation (``Reservoir``).

Labeling and training code must never import this module (``tests/test_no_mask_leak.py`` checks it).

The "box as mask" baseline every labeler must beat fills every pixel a box touches
(``pipeline.datasets.base.box_to_mask``).
"""
from __future__ import annotations

import contextlib
import io
import math
import os
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from .datasets.base import Dataset, Sample, box_to_mask

# COCO size buckets by area in pixels: small < 32^2 <= medium < 96^2 <= large.
SIZE_BUCKETS: tuple[tuple[str, float, float], ...] = (
    ("small", 0.0, 32.0 ** 2),
    ("medium", 32.0 ** 2, 96.0 ** 2),
    ("large", 96.0 ** 2, math.inf),
)

# AsyInst Table 2: AP, AP50, then per-class AP in this order.
CITYSCAPES_TABLE_CLASSES = ("person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle")

# Upper bound on (N + M) x pixels converted to float32 at a time by ``mask_iou``; also keeps every
# float32 partial sum below 2^24, where float32 still counts pixels exactly.
_IOU_CHUNK = 1 << 24


# --------------------------------------------------------------------------------------------- GT access

def gt_masks(dataset: Dataset, sample: Sample) -> dict[int, np.ndarray]:
    """Ground-truth instance masks of ``sample`` by instance id: {instance_id: (H, W) bool}.

    The one public way to reach ground-truth masks. Instances without a mask (e.g. a box-only COCO file)
    have no entry; evaluators leave them out and count them.
    """
    masks = dataset._gt_masks(sample)
    for instance_id, mask in masks.items():
        if mask.shape != (sample.height, sample.width) or mask.dtype != bool:
            raise ValueError(f"{dataset.name} image {sample.image_id}: GT mask of instance {instance_id} is "
                             f"{mask.dtype} {mask.shape}, expected bool ({sample.height}, {sample.width})")
    return masks


def gt_ignore_masks(dataset: Dataset, sample: Sample) -> list[np.ndarray]:
    """Masks of the sample's ignore regions (COCO crowd, Cityscapes groups), in ``ignore_boxes`` order,
    each (H, W) bool."""
    return dataset._gt_ignore_masks(sample)


# --------------------------------------------------------------------------------------------- mask maths

def _is_rle(masks: Any) -> bool:
    if isinstance(masks, dict):
        return True
    return isinstance(masks, (list, tuple)) and len(masks) > 0 and isinstance(masks[0], dict)


def _as_stack(masks: Any) -> np.ndarray:
    masks = np.asarray(masks)
    if masks.ndim == 2:
        masks = masks[None]
    if masks.ndim != 3:
        raise ValueError(f"expected masks of shape (N, H, W) or (H, W), got {masks.shape}")
    return masks.astype(bool, copy=False)


def _as_rles(masks: Any) -> list[dict]:
    if isinstance(masks, dict):
        return [masks]
    if _is_rle(masks):
        return list(masks)
    stack = _as_stack(masks)
    return mask_utils.encode(np.asfortranarray(stack.transpose(1, 2, 0).astype(np.uint8)))


def mask_iou(a: Any, b: Any) -> np.ndarray:
    """Pairwise IoU of two sets of masks.

    Args:
        a: (N, H, W) or (H, W) bool-like array, or a list of COCO RLE dicts (``size`` + ``counts``).
        b: (M, H, W) or (H, W) array, or a list of RLEs, of the same image size.
    Returns:
        (N, M) float64; 0 where the union is empty (as pycocotools).
    """
    if _is_rle(a) or _is_rle(b):
        ra, rb = _as_rles(a), _as_rles(b)
        if not ra or not rb:
            return np.zeros((len(ra), len(rb)))
        return np.asarray(mask_utils.iou(ra, rb, [0] * len(rb)), np.float64).reshape(len(ra), len(rb))
    sa, sb = _as_stack(a), _as_stack(b)
    if sa.shape[1:] != sb.shape[1:]:
        raise ValueError(f"mask sizes differ: {sa.shape[1:]} vs {sb.shape[1:]}")
    fa, fb = sa.reshape(len(sa), -1), sb.reshape(len(sb), -1)
    area_a = fa.sum(1, dtype=np.int64).astype(np.float64)
    area_b = fb.sum(1, dtype=np.int64).astype(np.float64)
    inter = np.zeros((len(sa), len(sb)))
    step = max(1, _IOU_CHUNK // max(1, len(sa) + len(sb)))
    for start in range(0, fa.shape[1], step):
        inter += fa[:, start:start + step].astype(np.float32) @ fb[:, start:start + step].astype(np.float32).T
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def paired_mask_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of ``a[i]`` with ``b[i]``: (N, H, W), (N, H, W) bool -> (N,) float64, 0 where the union is empty."""
    sa, sb = _as_stack(a), _as_stack(b)
    if sa.shape != sb.shape:
        raise ValueError(f"paired masks differ in shape: {sa.shape} vs {sb.shape}")
    inter = (sa & sb).reshape(len(sa), -1).sum(1, dtype=np.int64).astype(np.float64)
    union = (sa | sb).reshape(len(sa), -1).sum(1, dtype=np.int64).astype(np.float64)
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def _decode_one(mask: Any, height: int, width: int, where: str) -> np.ndarray:
    """One predicted mask as (H, W) bool: an array, an RLE dict, an RLE counts string (size = the image) or
    an object with a ``mask`` attribute (e.g. the teacher's ``InstanceLabel``)."""
    mask = getattr(mask, "mask", mask)
    if isinstance(mask, (str, bytes)):
        mask = {"size": [height, width], "counts": mask}
    if isinstance(mask, dict):
        if isinstance(mask.get("counts"), list):
            mask = mask_utils.frPyObjects(mask, height, width)
        mask = mask_utils.decode(mask)
    mask = np.asarray(mask)
    if mask.shape != (height, width):
        raise ValueError(f"{where}: mask shape {mask.shape} does not match the image ({height}, {width})")
    return mask.astype(bool, copy=False)


def _resolve(dataset: Dataset, sample_or_image_id: Sample | str) -> Sample:
    if isinstance(sample_or_image_id, Sample):
        return sample_or_image_id
    return dataset.get(str(sample_or_image_id))


def _bucket(area: float) -> str:
    for name, lo, hi in SIZE_BUCKETS:
        if lo <= area < hi:
            return name
    raise AssertionError(area)


# --------------------------------------------------------------------------------- pseudo-label quality

@dataclass(frozen=True)
class InstanceIoU:
    """One ground-truth instance and the IoU of its predicted mask (0 when it had no prediction)."""

    image_id: str
    instance_id: int
    category_id: int
    area: int                 # ground-truth mask area in pixels
    box_width: float
    box_height: float
    iou: float
    predicted: bool


@dataclass(frozen=True)
class IoUStats:
    count: int
    mean_iou: float           # nan when count == 0


@dataclass
class PseudoLabelResult:
    min_box_side: float
    overall: IoUStats
    per_class: dict[str, IoUStats]
    per_size: dict[str, IoUStats]
    missing: int              # instances without a predicted mask (scored IoU 0)
    excluded: int             # instances left out because a box side < min_box_side
    no_gt_mask: int           # instances left out because the dataset has no mask for them
    instances: list[InstanceIoU] = field(repr=False, default_factory=list)

    def to_dict(self, with_instances: bool = False) -> dict:
        out = asdict(self)
        if not with_instances:
            out.pop("instances")
        return out


class IoUSums:
    """Running sums of per-instance IoUs, overall, per class and per size bucket: a ``PseudoLabelResult`` without
    its instances, in memory that does not grow with the dataset."""

    def __init__(self):
        self.count: dict = defaultdict(int)      # "all", ("class", category id) or ("size", bucket) -> instances
        self.total: dict = defaultdict(float)    # the same keys -> sum of IoUs
        self.missing = 0

    def add(self, record: InstanceIoU) -> None:
        for key in ("all", ("class", record.category_id), ("size", _bucket(record.area))):
            self.count[key] += 1
            self.total[key] += record.iou
        self.missing += not record.predicted

    def stats(self, key) -> IoUStats:
        n = self.count.get(key, 0)
        return IoUStats(n, self.total[key] / n if n else float("nan"))

    def result(self, dataset: Dataset, min_box_side: float, excluded: int, no_gt_mask: int,
               instances: Sequence[InstanceIoU] = ()) -> PseudoLabelResult:
        """The figures: classes in the dataset's category order, then unknown category ids in id order."""
        seen = sorted(k[1] for k in self.count if isinstance(k, tuple) and k[0] == "class")
        known = [c.id for c in dataset.categories]
        ids = [c for c in known if c in seen] + sorted(set(seen) - set(known))
        return PseudoLabelResult(
            min_box_side=float(min_box_side),
            overall=self.stats("all"),
            per_class={dataset.category_name(c): self.stats(("class", c)) for c in ids},
            per_size={name: self.stats(("size", name)) for name, _, _ in SIZE_BUCKETS},
            missing=self.missing, excluded=excluded, no_gt_mask=no_gt_mask, instances=list(instances))


def summarize_ious(records: Sequence[InstanceIoU], dataset: Dataset, min_box_side: float = 0.0,
                   no_gt_mask: int = 0) -> PseudoLabelResult:
    """Aggregate per-instance IoUs, keeping instances whose box sides are both >= ``min_box_side``."""
    kept = [r for r in records if min(r.box_width, r.box_height) >= min_box_side]
    sums = IoUSums()
    for r in kept:
        sums.add(r)
    return sums.result(dataset, min_box_side, len(records) - len(kept), no_gt_mask, kept)


class PseudoLabelEvaluator:
    """Per-instance mask IoU of pseudo labels against ground truth (detectron2-style protocol).

    ``process(sample_or_image_id, predictions)`` takes one image's predicted masks keyed by instance id
    (a mapping ``{instance_id: mask}``) or aligned with ``sample.instance_ids`` (a sequence); a mask is an
    (H, W) bool array, a COCO RLE dict, an RLE counts string (the shard's ``mask_rle``) or an object with a
    ``mask`` attribute. Ground-truth instances without a prediction score IoU 0 and are counted as missing;
    instances without a ground-truth mask are left out and counted as ``no_gt_mask``. After ``process``,
    ``processed`` holds the image's ``InstanceIoU`` records.

    ``keep_instances=False`` keeps running sums only (for ``min_box_side``): memory stays flat over any number of
    images, the result has no ``instances`` and ``evaluate`` takes no other side.
    """

    def __init__(self, dataset: Dataset, min_box_side: float = 0.0, keep_instances: bool = True):
        self.dataset = dataset
        self.min_box_side = float(min_box_side)
        self.keep_instances = keep_instances
        self.reset()

    def reset(self) -> None:
        self._records: list[InstanceIoU] = []
        self._sums = IoUSums()
        self._excluded = 0
        self._seen: set[str] = set()
        self._no_gt = 0
        self.processed: list[InstanceIoU] = []

    def process(self, sample_or_image_id: Sample | str, predictions: Mapping[int, Any] | Sequence[Any]
                ) -> np.ndarray:
        """Score one image; returns the (N,) IoUs in ``sample.instance_ids`` order (nan: no GT mask)."""
        sample = _resolve(self.dataset, sample_or_image_id)
        if sample.image_id in self._seen:
            raise ValueError(f"image {sample.image_id} was already processed")
        ids = [int(i) for i in sample.instance_ids]
        if isinstance(predictions, Mapping):
            by_id = {int(k): v for k, v in predictions.items()}
            unknown = sorted(set(by_id) - set(ids))
            if unknown:
                raise ValueError(f"image {sample.image_id}: predictions for unknown instance ids {unknown}")
        else:
            if len(predictions) != len(ids):
                raise ValueError(f"image {sample.image_id}: {len(predictions)} predictions for {len(ids)} boxes")
            by_id = dict(zip(ids, predictions))
        gt = gt_masks(self.dataset, sample)
        h, w = sample.height, sample.width
        ious = np.full(len(ids), np.nan)
        ious[[k for k, iid in enumerate(ids) if iid in gt]] = 0.0
        have = [k for k, iid in enumerate(ids) if iid in gt and by_id.get(iid) is not None]
        if have:
            pred = np.stack([_decode_one(by_id[ids[k]], h, w, f"image {sample.image_id} instance {ids[k]}")
                             for k in have])
            ious[have] = paired_mask_iou(pred, np.stack([gt[ids[k]] for k in have]))
        self.processed = []
        for k, iid in enumerate(ids):
            if iid not in gt:
                self._no_gt += 1
                continue
            x1, y1, x2, y2 = (float(v) for v in sample.boxes[k])
            record = InstanceIoU(
                image_id=sample.image_id, instance_id=iid, category_id=int(sample.classes[k]),
                area=int(gt[iid].sum()), box_width=x2 - x1, box_height=y2 - y1,
                iou=float(ious[k]), predicted=iid in by_id and by_id[iid] is not None)
            self.processed.append(record)
            if self.keep_instances:
                self._records.append(record)
            elif min(record.box_width, record.box_height) >= self.min_box_side:
                self._sums.add(record)
            else:
                self._excluded += 1
        self._seen.add(sample.image_id)
        return ious

    def evaluate(self, min_box_side: float | None = None) -> PseudoLabelResult:
        side = self.min_box_side if min_box_side is None else float(min_box_side)
        if self.keep_instances:
            return summarize_ious(self._records, self.dataset, side, no_gt_mask=self._no_gt)
        if side != self.min_box_side:
            raise ValueError(f"this evaluator kept sums for min_box_side {self.min_box_side:g} only, not {side:g} "
                             f"(keep_instances=False)")
        return self._sums.result(self.dataset, side, self._excluded, self._no_gt)


class Extremes:
    """The ``count`` lowest and highest items of a stream by a key, in memory bounded by ``count``."""

    def __init__(self, count: int, key: Callable[[Any], Any]):
        self.count = max(0, int(count))
        self.key = key
        self._low: list = []
        self._high: list = []

    def add(self, item: Any) -> None:
        if not self.count:
            return
        self._low.append(item)
        self._high.append(item)
        if len(self._low) > 4 * self.count + 1024:
            self._prune()

    def _prune(self) -> None:
        self._low = sorted(self._low, key=self.key)[:self.count]
        self._high = sorted(self._high, key=self.key, reverse=True)[:self.count]

    def lowest(self) -> list:
        self._prune()
        return list(self._low)

    def highest(self) -> list:
        self._prune()
        return list(self._high)


class Reservoir:
    """A uniform sample of at most ``size`` items of a stream (algorithm R, seeded): every item while the stream
    is no longer than ``size``."""

    def __init__(self, size: int, seed: int = 0):
        self.size = int(size)
        self.items: list = []
        self.seen = 0
        self._rng = np.random.default_rng(seed)

    def add(self, item: Any) -> None:
        self.seen += 1
        if len(self.items) < self.size:
            self.items.append(item)
            return
        j = int(self._rng.integers(self.seen))
        if j < self.size:
            self.items[j] = item


# Pairs of (score, IoU) the score's rank correlation is computed over: exact up to this many predicted instances,
# a uniform sample of them beyond (its standard error is then about 1 / sqrt(this)).
SPEARMAN_SAMPLE = 200_000


@dataclass
class ShardQuality:
    """Pseudo labels of a shard directory against ground truth (``evaluate_shards``)."""

    labels: PseudoLabelResult         # the shards' masks (an instance without a row scores IoU 0); no instances
    box_as_mask: PseudoLabelResult    # the filled boxes, the baseline every labeler must beat
    score_spearman: float             # rank correlation of the rows' score with their IoU (nan under 3 rows)
    spearman_pairs: int               # the (score, IoU) pairs it was computed over (a sample beyond SPEARMAN_SAMPLE)
    best: list[tuple[InstanceIoU, float]]   # the ``gallery`` highest-IoU predicted instances with their scores
    worst: list[tuple[InstanceIoU, float]]  # and the lowest, ordered by (IoU, image id, instance id)

    def to_dict(self) -> dict:
        return {"labels": self.labels.to_dict(), "box_as_mask": self.box_as_mask.to_dict(),
                "score_spearman": self.score_spearman}


def evaluate_shards(dataset: Dataset, shard_dir: str | os.PathLike, min_box_side: float = 0.0,
                    gallery: int = 0) -> ShardQuality:
    """Every image of ``dataset`` against the finished shards of ``shard_dir``, streaming: one shard at a time is
    read and scored into running sums, and then the images no shard holds (their instances score 0). Memory holds
    one shard, the ids of the images scored, the ``gallery`` best and worst instances and at most
    ``SPEARMAN_SAMPLE`` (score, IoU) pairs; never the masks of more than one shard."""
    from scipy.stats import spearmanr

    from .shards import iter_shard_tables

    labels = PseudoLabelEvaluator(dataset, min_box_side, keep_instances=False)
    boxes = PseudoLabelEvaluator(dataset, min_box_side, keep_instances=False)
    rank = Reservoir(SPEARMAN_SAMPLE)
    extremes = Extremes(gallery, key=lambda item: (item[0].iou, item[0].image_id, item[0].instance_id))

    def score(sample: Sample, rows: dict[int, tuple[str, float]]) -> None:
        labels.process(sample, {iid: rle for iid, (rle, _) in rows.items()})
        boxes.process(sample, box_mask_predictions(sample))
        for r in labels.processed:
            if r.predicted and min(r.box_width, r.box_height) >= min_box_side:
                rank.add((rows[r.instance_id][1], r.iou))
                extremes.add((r, rows[r.instance_id][1]))

    scored: set[str] = set()
    for table in iter_shard_tables(shard_dir, columns=["image_id", "instance_id", "mask_rle", "score"]):
        per_image: dict[str, dict[int, tuple[str, float]]] = {}
        for image_id, iid, rle, value in zip(*(table.column(c).to_pylist() for c in table.column_names)):
            per_image.setdefault(image_id, {})[int(iid)] = (rle, float(value))
        for image_id, rows in per_image.items():
            try:
                sample = dataset.get(image_id)
            except KeyError:
                continue                    # not an image of the dataset (rows of another split, say)
            if image_id in scored:
                raise ValueError(f"{shard_dir}: image {image_id} has rows in more than one shard")
            scored.add(image_id)
            score(sample, rows)
    for sample in dataset:
        if sample.image_id not in scored:
            score(sample, {})
    pairs = rank.items
    varied = len(pairs) > 2 and all(len(set(v)) > 1 for v in zip(*pairs))  # else the rank correlation is undefined
    rho = float(spearmanr(*zip(*pairs)).statistic) if varied else float("nan")
    return ShardQuality(labels.evaluate(), boxes.evaluate(), rho, len(pairs), extremes.highest(), extremes.lowest())


def box_mask_predictions(sample: Sample) -> dict[int, np.ndarray]:
    """The box-as-mask baseline for one image: {instance_id: (H, W) bool filled box}."""
    return {int(iid): box_to_mask(box, sample.height, sample.width)
            for iid, box in zip(sample.instance_ids, sample.boxes)}


# ------------------------------------------------------------------------------------------ COCO mask AP

@dataclass
class CocoMaskResult:
    """COCO mask AP figures as fractions in [0, 1] (nan where undefined, e.g. no ground truth)."""

    ap: float
    ap50: float
    ap75: float
    ap_small: float
    ap_medium: float
    ap_large: float
    per_class: dict[str, float]       # every dataset category; nan when it has no GT in the evaluated images
    num_images: int
    num_predictions: int

    def to_dict(self) -> dict:
        return asdict(self)


def _coco_object(images: list[dict], categories: list[dict], annotations: list[dict]) -> COCO:
    coco = COCO()
    coco.dataset = {"images": images, "categories": categories, "annotations": annotations}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _rle_entry(rle: dict) -> dict:
    return {"segmentation": rle, "area": float(mask_utils.area(rle)),
            "bbox": [float(v) for v in mask_utils.toBbox(rle)]}


def _box_entry(box) -> dict:
    x1, y1, x2, y2 = (float(v) for v in box)
    return {"bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1)}


class CocoMaskEvaluator:
    """COCO instance-segmentation AP of predictions, by pycocotools' ``COCOeval`` (iouType "segm"), or box AP
    with ``iou_type="bbox"`` (predictions then carry ``boxes`` (K,4) x1,y1,x2,y2 instead of ``masks``, and the
    ground truth is the annotated boxes).

    ``process(sample_or_image_id, predictions)`` takes a mapping with ``masks`` ((K, H, W) bool array or a
    list of K RLE dicts), ``scores`` (K,) and ``classes`` (K,) dataset category ids. Ground truth is the
    sample's instance masks (area = mask area) plus its ignore regions as ``iscrowd=1`` entries, so
    detections on crowds and groups are neither true nor false positives, exactly as COCO treats crowds
    (an instance without a GT mask is treated as an ignore region too).
    Only processed images are evaluated.
    """

    def __init__(self, dataset: Dataset, iou_type: str = "segm"):
        if iou_type not in ("segm", "bbox"):
            raise ValueError(f"iou_type must be 'segm' or 'bbox', got {iou_type!r}")
        self.dataset = dataset
        self.iou_type = iou_type
        self.reset()

    def reset(self) -> None:
        self._images: list[dict] = []
        self._gt: list[dict] = []
        self._dt: list[dict] = []
        self._index: dict[str, int] = {}

    def process(self, sample_or_image_id: Sample | str, predictions: Mapping[str, Any]) -> None:
        sample = _resolve(self.dataset, sample_or_image_id)
        if sample.image_id in self._index:
            raise ValueError(f"image {sample.image_id} was already processed")
        img = len(self._images) + 1
        self._index[sample.image_id] = img
        h, w = sample.height, sample.width
        self._images.append({"id": img, "height": h, "width": w})

        gt = gt_masks(self.dataset, sample)
        # An instance without a GT mask cannot be scored: its box becomes an ignore region, so detections
        # on it count neither way.
        regions = [(int(c), gt[int(i)], 0) if int(i) in gt else (int(c), box_to_mask(b, h, w), 1)
                   for i, c, b in zip(sample.instance_ids, sample.classes, sample.boxes)]
        regions += [(int(c), m, 1) for c, m in zip(sample.ignore_classes, gt_ignore_masks(self.dataset, sample))]
        boxes_gt = {int(i): b for i, b in zip(sample.instance_ids, sample.boxes)}
        for k, (cat, mask, crowd) in enumerate(regions):
            entry = _rle_entry(_as_rles(mask)[0])
            if self.iou_type == "bbox" and k < len(sample.instance_ids):
                # Box AP scores against the annotated box (an instance without a mask is a normal box here); the
                # area stays the mask's, which is what COCO's size ranges use.
                entry = {**_box_entry(boxes_gt[int(sample.instance_ids[k])]), "area": entry["area"]}
                crowd = 0
            self._gt.append({"id": len(self._gt) + 1, "image_id": img, "category_id": cat, "iscrowd": crowd,
                             **entry})

        scores = np.asarray(predictions.get("scores", []), np.float64).reshape(-1)
        classes = np.asarray(predictions.get("classes", []), np.int64).reshape(-1)
        if self.iou_type == "bbox":
            boxes = np.asarray(predictions.get("boxes", np.zeros((0, 4))), np.float64).reshape(-1, 4)
            entries = [_box_entry(b) for b in boxes]
        else:
            masks = predictions.get("masks", [])
            rles = _as_rles(masks) if len(masks) else []
            for rle in rles:
                if list(rle["size"]) != [h, w]:
                    raise ValueError(f"image {sample.image_id}: mask size {rle['size']} does not match ({h}, {w})")
            entries = [_rle_entry(rle) for rle in rles]
        if not (len(entries) == len(scores) == len(classes)):
            raise ValueError(f"image {sample.image_id}: {len(entries)} {'boxes' if self.iou_type == 'bbox' else 'masks'}"
                             f", {len(scores)} scores and {len(classes)} classes")
        for entry, score, cat in zip(entries, scores, classes):
            self._dt.append({"id": len(self._dt) + 1, "image_id": img, "category_id": int(cat),
                             "score": float(score), "iscrowd": 0, **entry})

    def evaluate(self) -> CocoMaskResult:
        cats = [{"id": c.id, "name": c.name} for c in self.dataset.categories]
        nan = float("nan")
        if not self._images:
            return CocoMaskResult(nan, nan, nan, nan, nan, nan, {c.name: nan for c in self.dataset.categories},
                                  0, 0)
        coco_gt = _coco_object(self._images, cats, self._gt)
        coco_dt = _coco_object(self._images, cats, self._dt)
        ev = COCOeval(coco_gt, coco_dt, iouType=self.iou_type)
        with contextlib.redirect_stdout(io.StringIO()):
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        stats = [float(s) if s >= 0 else nan for s in ev.stats[:6]]
        # precision: [iou threshold, recall, category, area range ("all" first), max dets (100 last)]
        precision = ev.eval["precision"]
        per_class = {}
        for k, cat_id in enumerate(ev.params.catIds):
            p = precision[:, :, k, 0, -1]
            per_class[self.dataset.category_name(cat_id)] = float(p[p > -1].mean()) if (p > -1).any() else nan
        return CocoMaskResult(*stats, per_class=per_class, num_images=len(self._images),
                              num_predictions=len(self._dt))


def cityscapes_table(results: CocoMaskResult | Mapping[str, CocoMaskResult], name: str = "ours") -> str:
    """AsyInst Table 2 layout: a row per result with AP, AP50 and the 8 Cityscapes classes' AP, in % with
    one decimal ("-" where undefined). ``results`` is one result (row ``name``) or {row name: result}."""
    rows = {name: results} if isinstance(results, CocoMaskResult) else dict(results)
    header = ["Method", "AP", "AP50", *CITYSCAPES_TABLE_CLASSES]

    def pct(v: float) -> str:
        return "-" if v is None or not math.isfinite(v) else f"{100.0 * v:.1f}"

    body = [[row, pct(r.ap), pct(r.ap50), *(pct(r.per_class.get(c, float("nan"))) for c in CITYSCAPES_TABLE_CLASSES)]
            for row, r in rows.items()]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(widths[0]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(line))
             for line in [header, *body]]
    return "\n".join(lines)
