"""``pipeline eval``: a student checkpoint (student.pt or teacher.pt) on a dataset split.

Prints COCO mask AP and box AP (AP, AP50, AP75, AP by size, AP per class), the Cityscapes table, and the
box-as-mask AP of the same detections (each predicted box filled as its mask): when the mask AP does not beat
it, the mask head has not learned shape. Writes the predictions as COCO results json (RLE masks).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_utils
from tqdm import tqdm

from student.checkpoint import load_model
from student.model import StudentError
from student.predict import predict

from ..datasets import build_dataset
from ..datasets.base import box_to_mask
from ..errors import InputError, PipelineError
from ..evaluation import CocoMaskEvaluator, CocoMaskResult, cityscapes_table
from .common import add_config_args, add_dataset_args, at_least_one, config_from_args

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="mask AP, box AP and box-as-mask AP of a student checkpoint",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataset_args(p, split_default="val")
    p.add_argument("--checkpoint", required=True, metavar="FILE", help="student.pt or teacher.pt")
    p.add_argument("--out", metavar="FILE", help="predictions json (default: <checkpoint>.<split>.predictions.json)")
    p.add_argument("--json", metavar="FILE", help="also write the figures as json")
    p.add_argument("--limit", type=int, metavar="N", help="evaluate only the first N images")
    add_config_args(p)
    p.set_defaults(func=run)


def _fmt(v: float) -> str:
    return "-" if v is None or not math.isfinite(v) else f"{100 * v:5.1f}"


def table(results: dict[str, CocoMaskResult]) -> str:
    head = f"{'':12s} {'AP':>5s} {'AP50':>5s} {'AP75':>5s} {'APs':>5s} {'APm':>5s} {'APl':>5s}"
    rows = [f"{name:12s} {_fmt(r.ap)} {_fmt(r.ap50)} {_fmt(r.ap75)} {_fmt(r.ap_small)} {_fmt(r.ap_medium)} "
            f"{_fmt(r.ap_large)}" for name, r in results.items()]
    return "\n".join([head, *rows])


def per_class(results: dict[str, CocoMaskResult]) -> str:
    names = list(next(iter(results.values())).per_class)
    width = max([5, *map(len, names)])
    head = f"{'class':{width}s} " + " ".join(f"{k:>11s}" for k in results)
    rows = [f"{n:{width}s} " + " ".join(f"{_fmt(r.per_class[n]):>11s}" for r in results.values()) for n in names]
    return "\n".join([head, *rows])


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    at_least_one("--limit", args.limit)
    if args.split is None and cfg.dataset.split == "train":
        cfg.dataset.split = "val"  # evaluation defaults to the held-out split
    try:
        model, meta = load_model(args.checkpoint)
    except StudentError as exc:
        raise PipelineError(exc.where, exc.problem) from None
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    dataset = build_dataset(cfg.dataset)
    ids = [int(c["id"]) for c in meta["classes"]]
    known = {c.id for c in dataset.categories}
    if not set(ids) <= known:
        raise PipelineError(args.checkpoint, f"checkpoint classes {sorted(set(ids) - known)} are not categories "
                                             f"of {dataset.name}")
    samples = list(dataset)[: args.limit] if args.limit else list(dataset)
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
    print(f"{args.checkpoint} ({meta.get('kind', '?')}, iteration {meta['iteration']}) on {cfg.dataset.name} "
          f"{dataset.split}: {results['mask'].num_images} images, {len(records)} detections")
    print(table(results))
    print()
    print(per_class(results))
    print()
    print(cityscapes_table({"mask": results["mask"], "box-as-mask": results["box-as-mask"]}))
    out = Path(args.out or f"{args.checkpoint}.{dataset.split}.predictions.json")
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(records))
    os.replace(tmp, out)
    print(f"predictions: {out}")
    if args.json:
        Path(args.json).write_text(json.dumps({k: r.to_dict() for k, r in results.items()}, indent=1))
    return 0
