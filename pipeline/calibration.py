"""The fused unary's network weight for one round, from how well the round's student reproduces the labels it was
trained on (no ground truth).

Before round r labels, the round's teacher labels ``fusion.calibration_images`` training images in network mode,
and each label is compared with round r-1's label of the same instance, the one the student learned from:

- *fit*: the mean IoU of the network's labels with those labels;
- *box fit*: the same for the filled boxes, what a student that learned no shape at all would score;
- *gain*: (fit - box fit) / (1 - box fit), the share of the way from the boxes to the labels the student went.

The network weight is ``fusion.network_weight`` x min(1, gain / ``fusion.gain_full``), 0 for a negative gain; the
box prior's weight stays, so a network that learned nothing leaves the box prior's labels. On coco_tiny a
random-init ResNet-18 student (300 steps) reproduces its labels worse than the boxes (gain -0.29 to -0.08), an
ImageNet MobileNetV2 one goes a third of the way or more (0.31 to 0.61); bench/NOTEBOOK.md, "coco_tiny: a
pretrained student and adaptive fusion".

The result is written to ``round-r/fusion.json`` and read back by a resumed run, so that the weight, which the
labels' digest covers, is the one the round started with.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from tqdm import tqdm

from boxmask_common.files import atomic_write_bytes
from teacher import StructuredTeacher
from teacher.config import FusionConfig, TeacherConfig

from .config import DatasetConfig
from .datasets import build_dataset
from .datasets.base import Dataset, Sample, box_to_mask
from .errors import InputError, UserError
from .evaluation import paired_mask_iou
from .label_service import load_checkpoint
from .shards import decode_rle, iter_shard_tables

log = logging.getLogger(__name__)


def fit_gain(fit: float, box_fit: float) -> float:
    """The share of the way from the filled boxes (``box_fit``) to a perfect reproduction (1) that ``fit`` went;
    negative when the network reproduces its labels worse than the boxes do."""
    return (fit - box_fit) / max(1.0 - box_fit, 1e-6)


def weight_factor(gain: float, gain_full: float) -> float:
    """0 for a gain <= 0, 1 from ``gain_full`` on, linear between."""
    return float(np.clip(gain / gain_full, 0.0, 1.0)) if gain_full > 0 else float(gain > 0)


@dataclass
class Calibration:
    """One round's calibration: the fit, the instances and images it was measured on, the weights it set."""

    fit: float
    box_fit: float
    gain: float
    instances: int
    images: int
    network_weight: float
    prior_weight: float

    def fusion(self, base: FusionConfig) -> FusionConfig:
        return dataclasses.replace(base, network_weight=self.network_weight, prior_weight=self.prior_weight)


def calibration_samples(dataset: Dataset, count: int) -> list[Sample]:
    """``count`` training images spread evenly over the split (all of them when it has fewer)."""
    samples = list(dataset)
    if len(samples) <= count:
        return samples
    picks = np.linspace(0, len(samples) - 1, count).round().astype(int)
    return [samples[k] for k in sorted(set(picks.tolist()))]


def previous_labels(labels_dir: str | os.PathLike, image_ids: set[str]) -> dict[tuple[str, int], str]:
    """(image id, instance id) -> RLE of the labels in ``labels_dir``, for ``image_ids`` only."""
    out = {}
    for table in iter_shard_tables(labels_dir, columns=["image_id", "instance_id", "mask_rle"]):
        for image_id, iid, rle in zip(*(table.column(c).to_pylist() for c in table.column_names)):
            if image_id in image_ids:
                out[(image_id, int(iid))] = rle
    return out


def measure_fit(network, teacher_cfg: TeacherConfig, samples: list[Sample], labels_dir: str | os.PathLike,
                min_box_side: float) -> tuple[float, float, int]:
    """Mean IoU of the network-mode labels of ``samples``, and of their filled boxes, with their labels in
    ``labels_dir``, over the instances with both box sides >= ``min_box_side`` -> (fit, box fit, instances).
    NaN when no instance counts."""
    teacher = StructuredTeacher(network, dataclasses.replace(teacher_cfg, unary="network"))
    prev = previous_labels(labels_dir, {s.image_id for s in samples})
    ious, box_ious = [], []
    for sample in tqdm(samples, unit="img", desc="calibrate fusion", dynamic_ncols=True):
        try:
            image = sample.load_image()
        except InputError as exc:
            log.warning("calibration skipped %s", exc)
            continue
        labels = teacher.label_batch([image], [sample.boxes], [sample.classes], None, [sample.image_id])[0]
        triples = [(lab.mask.astype(bool), box_to_mask(box, sample.height, sample.width),
                    decode_rle(prev[(sample.image_id, int(iid))], sample.height, sample.width).astype(bool))
                   for box, iid, lab in zip(sample.boxes, sample.instance_ids, labels)
                   if (sample.image_id, int(iid)) in prev and min(box[2] - box[0], box[3] - box[1]) >= min_box_side]
        if triples:
            mine, filled, theirs = (np.stack(m) for m in zip(*triples))
            ious.extend(paired_mask_iou(mine, theirs).tolist())
            box_ious.extend(paired_mask_iou(filled, theirs).tolist())
    if not ious:
        return float("nan"), float("nan"), 0
    return float(np.mean(ious)), float(np.mean(box_ious)), len(ious)


def calibrate(teacher_cfg: TeacherConfig, dataset_cfg: DatasetConfig, checkpoint: str | os.PathLike,
              labels_dir: str | os.PathLike, min_box_side: float) -> Calibration:
    """The round's fused weights from the fit of ``checkpoint``'s network to the labels in ``labels_dir`` on the
    training split ``dataset_cfg``."""
    fusion = teacher_cfg.fusion
    network, _ = load_checkpoint(checkpoint)
    samples = calibration_samples(build_dataset(dataset_cfg), fusion.calibration_images)
    fit, box_fit, count = measure_fit(network, dataclasses.replace(teacher_cfg, device="cpu"), samples, labels_dir,
                                      min_box_side)
    if count == 0:
        raise UserError(labels_dir, "no previous label matches an instance of the calibration images; the "
                                    "fused weights cannot be calibrated")
    gain = fit_gain(fit, box_fit)
    weight = round(fusion.network_weight * weight_factor(gain, fusion.gain_full), 3)
    return Calibration(round(fit, 4), round(box_fit, 4), round(gain, 4), count, len(samples), weight,
                       fusion.prior_weight)


def load_or_calibrate(path: Path, *args, **kwargs) -> Calibration:
    """``path``'s stored calibration, or a new one (`calibrate`) written there atomically."""
    try:
        return Calibration(**json.loads(path.read_text()))
    except FileNotFoundError:
        pass
    except (ValueError, TypeError) as exc:
        raise UserError(path, f"unreadable calibration ({exc}); delete it to calibrate again") from None
    result = calibrate(*args, **kwargs)
    atomic_write_bytes(path, json.dumps(dataclasses.asdict(result), indent=1).encode())
    return result


__all__ = ["Calibration", "calibrate", "calibration_samples", "fit_gain", "load_or_calibrate", "measure_fit",
           "weight_factor"]
