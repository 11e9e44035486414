"""A student checkpoint over a dataset split, shared by ``pipeline eval`` and the evaluate stage of
``pipeline run``: COCO mask AP, box AP and the box-as-mask AP of the same detections (each detection's box filled
as its mask: a mask head that does not beat it has not learned shape).
"""
from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from pycocotools import mask as mask_utils
from tqdm import tqdm

from student.checkpoint import load_model

from student.predict import predict

from .config import Config
from .datasets import build_dataset
from .datasets.base import Dataset, box_to_mask
from .datasets.coco import HOLDOUT_SPLIT
from .errors import InputError, UserError
from .evaluation import CocoMaskEvaluator, CocoMaskResult

log = logging.getLogger(__name__)


@dataclass
class StudentEvaluation:
    """A checkpoint's detections on one split, scored three ways."""

    results: dict[str, CocoMaskResult]   # "mask", "box", "box-as-mask" (each detection's box filled as its mask)
    records: list[dict]                  # COCO results json entries (RLE masks)
    meta: dict                           # the export's fields (kind, iteration, classes, ...)
    dataset: Dataset


def eval_dataset_config(cfg: Config) -> Config:
    """``cfg`` with the dataset switched to the evaluation split (``evaluation.split``; for COCO the
    ``evaluation.ann`` file when one is named, else the training file's held-out images with
    ``dataset.holdout``, else the training file itself)."""
    out = copy.deepcopy(cfg)
    out.dataset.split = cfg.evaluation.split
    if cfg.dataset.name == "coco" and cfg.evaluation.ann:
        out.dataset.ann = cfg.evaluation.ann
        out.dataset.holdout = 0.0
    elif cfg.dataset.name == "coco" and cfg.dataset.holdout:
        out.dataset.split = HOLDOUT_SPLIT
    return out


def evaluate_checkpoint(cfg: Config, checkpoint: str | os.PathLike, limit: Optional[int] = None
                        ) -> StudentEvaluation:
    """Run a student export over ``cfg.dataset`` (first ``limit`` images) with a progress bar: COCO mask AP, box
    AP and box-as-mask AP of the same detections, and the detections as COCO results."""
    model, meta = load_model(checkpoint)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    dataset = build_dataset(cfg.dataset)
    ids = [int(c["id"]) for c in meta["classes"]]
    known = {c.id for c in dataset.categories}
    if not set(ids) <= known:
        raise UserError(checkpoint, f"checkpoint classes {sorted(set(ids) - known)} are not categories "
                                    f"of {dataset.name}")
    samples = list(dataset)[:limit] if limit else list(dataset)
    evaluators = {"mask": CocoMaskEvaluator(dataset), "box": CocoMaskEvaluator(dataset, "bbox"),
                  "box-as-mask": CocoMaskEvaluator(dataset)}
    records = []
    for sample in tqdm(samples, unit="img", desc="eval", dynamic_ncols=True):
        try:
            image = sample.load_image()
        except InputError as exc:
            log.warning("skipped %s", exc)
            continue
        pred = predict(model, image, ids)
        evaluators["mask"].process(sample, pred)
        evaluators["box"].process(sample, pred)
        filled = np.stack([box_to_mask(b, sample.height, sample.width) for b in pred["boxes"]]) \
            if len(pred["boxes"]) else np.zeros((0, sample.height, sample.width), bool)
        evaluators["box-as-mask"].process(sample, {**pred, "masks": filled})
        for box, score, cat, mask in zip(pred["boxes"], pred["scores"], pred["classes"], pred["masks"]):
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            x1, y1, x2, y2 = (float(v) for v in box)
            image_id = int(sample.image_id) if sample.image_id.isdigit() else sample.image_id
            records.append({"image_id": image_id, "file_name": sample.file_name, "category_id": int(cat),
                            "score": float(score), "bbox": [x1, y1, x2 - x1, y2 - y1],
                            "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")}})
    results = {name: ev.evaluate() for name, ev in evaluators.items()}
    return StudentEvaluation(results, records, meta, dataset)
