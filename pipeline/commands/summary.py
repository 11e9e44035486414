"""pipeline summary: what a dataset holds, and the box-as-mask baseline every labeler must beat.

Per split: images, instances per class, ignored regions (COCO crowd, Cityscapes groups), rejected inputs
with their reasons, whether depth is available, and the mean IoU of each box taken as its mask (every pixel
the box touches) against the ground-truth mask, overall, per class and per COCO size bucket.

The IoU is reported twice: over all instances, and over instances whose box sides are both at least
--min-box-side px (default 8). A box a few pixels wide scores mostly rasterisation noise, whichever labeler
made the mask; the filtered figure is the one the labeling anchors quote. Instances without a ground-truth
mask (a box-only COCO file) are counted but not scored. --json FILE writes the same figures as JSON (nan
as null).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..config import Config
from ..datasets import build_dataset, dataset_root, dataset_splits
from ..datasets.base import Dataset
from ..errors import InputError, UserError
from ..evaluation import PseudoLabelEvaluator, PseudoLabelResult, box_mask_predictions
from .common import add_config_args, add_dataset_args, config_from_args

MAX_LISTED_REJECTS = 20


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "summary", help="images, instances, rejects, depth and the box-as-mask IoU baseline of a dataset",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataset_args(parser, split_default=None)
    add_config_args(parser)
    parser.add_argument("--min-box-side", type=float, default=8.0, metavar="PX",
                        help="second IoU figure over instances whose box sides are both >= PX (default: 8)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON to FILE")
    parser.add_argument("--check-images", action="store_true",
                        help="decode every image and depth map, rejecting unreadable ones (default: none is "
                             "decoded, so a corrupt image body goes unnoticed)")
    parser.set_defaults(func=run)


def summarize_split(dataset: Dataset, min_box_side: float, name: str | None = None, progress: bool = True,
                    check_images: bool = False) -> dict[str, Any]:
    """The summary figures of one loaded split (``box_iou``: all instances; ``box_iou_min_side``: both box
    sides >= ``min_box_side``). ``name``: the dataset kind to report (default ``dataset.name``; the toy data
    is read by the Cityscapes loader).

    ``check_images``: decode every image and depth map. An unreadable image becomes a reject and is left out
    of every figure; an unreadable depth map becomes a reject and its image counts as one without depth.
    A strict dataset raises the ``InputError`` instead (``Dataset.record_reject``)."""
    instances: Counter[str] = Counter()
    ignored: Counter[str] = Counter()
    images = with_depth = 0
    evaluator = PseudoLabelEvaluator(dataset)
    # A context manager, so that a --strict error clears the bar before its one line is printed.
    with tqdm(dataset, desc=f"{name or dataset.name}/{dataset.split}", unit="img", disable=not progress,
              leave=False) as bar:
        for sample in bar:
            has_depth = sample.has_depth
            if check_images:
                try:
                    sample.load_image()
                except InputError as exc:
                    dataset.record_reject(exc)
                    continue
                try:
                    if has_depth:
                        sample.load_depth()
                except InputError as exc:
                    dataset.record_depth_reject(exc)
                    has_depth = False
            images += 1
            with_depth += has_depth
            instances.update(dataset.category_name(c) for c in sample.classes)
            ignored.update(dataset.category_name(c) for c in sample.ignore_classes)
            evaluator.process(sample, box_mask_predictions(sample))
    return {
        "dataset": name or dataset.name,
        "split": dataset.split,
        "root": str(dataset.root),
        "images": images,
        "images_with_depth": with_depth,
        "images_checked": check_images,
        "instances": sum(instances.values()),
        "instances_per_class": _in_category_order(dataset, instances),
        "ignored_regions": sum(ignored.values()),
        "ignored_per_class": _in_category_order(dataset, ignored),
        "rejects": [{"where": r.where, "problem": r.problem} for r in dataset.rejects],
        "box_iou": _iou_dict(evaluator.evaluate(0.0)),
        "box_iou_min_side": _iou_dict(evaluator.evaluate(min_box_side)),
    }


def _in_category_order(dataset: Dataset, counts: Counter[str]) -> dict[str, int]:
    names = [c.name for c in dataset.categories]
    return {n: counts[n] for n in names if counts[n]} | {n: c for n, c in counts.items() if n not in names}


def _iou_dict(result: PseudoLabelResult) -> dict[str, Any]:
    return _finite(result.to_dict())


def _finite(value: Any) -> Any:
    """nan -> None, recursively, so the JSON is standard."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _iou(stats: dict | None) -> str:
    return "-" if not stats or stats["mean_iou"] is None else f"{stats['mean_iou']:.3f}"


def format_split(fig: dict[str, Any]) -> str:
    """The readable, aligned table of one split's figures."""
    side = fig["box_iou_min_side"]["min_box_side"]
    all_iou, min_iou = fig["box_iou"], fig["box_iou_min_side"]
    depth = fig["images_with_depth"]
    lines = [
        f"== {fig['dataset']} / {fig['split']}  ({fig['root']})",
        f"  images            {fig['images']}"
        f"{' (all decoded)' if fig.get('images_checked') else ' (not decoded; --check-images decodes them)'}",
        f"  depth             {'yes' if depth == fig['images'] and depth else 'partly' if depth else 'no'}"
        f" ({depth} of {fig['images']} images)",
        f"  instances         {fig['instances']} in {len(fig['instances_per_class'])} classes",
        f"  ignored regions   {fig['ignored_regions']}",
        f"  rejects           {len(fig['rejects'])}",
        "",
    ]
    names = list(fig["instances_per_class"]) + [n for n in fig["ignored_per_class"]
                                                if n not in fig["instances_per_class"]]
    header = ["class", "instances", "ignored", "box IoU (all)", f"n (sides >= {side:g} px)",
              f"box IoU (sides >= {side:g} px)"]
    rows: list[list[str] | None] = [
        [n, str(fig["instances_per_class"].get(n, 0)), str(fig["ignored_per_class"].get(n, 0)),
         _iou(all_iou["per_class"].get(n)), str((min_iou["per_class"].get(n) or {}).get("count", 0)),
         _iou(min_iou["per_class"].get(n))] for n in names]
    rows += [None, ["all", str(fig["instances"]), str(fig["ignored_regions"]), _iou(all_iou["overall"]),
                    str(min_iou["overall"]["count"]), _iou(min_iou["overall"])], None]
    rows += [[f"size {b}", str(all_iou["per_size"][b]["count"]), "", _iou(all_iou["per_size"][b]),
              str(min_iou["per_size"][b]["count"]), _iou(min_iou["per_size"][b])] for b in all_iou["per_size"]]
    table = [header, *(r for r in rows if r is not None)]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for row in [header, None, *rows]:
        if row is None:
            lines.append("  " + "  ".join("-" * w for w in widths))
        else:
            lines.append("  " + "  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i])
                                          for i, c in enumerate(row)))
    lines.append("")
    if all_iou["no_gt_mask"]:
        lines.append(f"  {all_iou['no_gt_mask']} instances have no ground-truth mask and are not scored")
    lines.append(f"  baseline every labeler must beat: box-as-mask mean IoU {_iou(min_iou['overall'])} over "
                 f"{min_iou['overall']['count']} instances with box sides >= {side:g} px "
                 f"({_iou(all_iou['overall'])} over all {all_iou['overall']['count']})")
    if fig["rejects"]:
        lines.append("  rejects:")
        lines += [f"    {r['where']}: {r['problem']}" for r in fig["rejects"][:MAX_LISTED_REJECTS]]
        if len(fig["rejects"]) > MAX_LISTED_REJECTS:
            lines.append(f"    ... and {len(fig['rejects']) - MAX_LISTED_REJECTS} more (all of them in --json)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    cfg: Config = config_from_args(args)
    if args.min_box_side < 0:
        raise UserError("--min-box-side", f"must be >= 0, got {args.min_box_side:g}")
    splits = [cfg.dataset.split] if args.split else dataset_splits(cfg.dataset)
    if not splits:
        raise UserError(dataset_root(cfg.dataset), "no split folders (leftImg8bit/train or val) found")
    report = {"dataset": cfg.dataset.name, "min_box_side": args.min_box_side, "splits": {}}
    for split in splits:
        dataset = build_dataset(dataclasses.replace(cfg.dataset, split=split))
        figures = summarize_split(dataset, args.min_box_side, name=cfg.dataset.name,
                                  check_images=args.check_images)
        report["splits"][split] = figures
        print(format_split(figures), flush=True)
    if args.json:
        path = Path(args.json)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(report, indent=2) + "\n")
        except OSError as exc:
            raise UserError(path, f"cannot write the JSON summary ({exc.strerror or exc})") from None
    return 0
