"""``pipeline eval``: a student checkpoint (student.pt or teacher.pt) on a dataset split.

Prints COCO mask AP and box AP (AP, AP50, AP75, AP by size, AP per class), the Cityscapes table, and the
box-as-mask AP of the same detections (each predicted box filled as its mask): when the mask AP does not beat
it, the mask head has not learned shape. Writes the predictions as COCO results json (RLE masks).
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from boxmask_common.files import atomic_write_text

from ..evaluation import CocoMaskResult, cityscapes_table
from .common import add_config_args, add_dataset_args, at_least_one, config_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="mask AP, box AP and box-as-mask AP of a student checkpoint",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataset_args(p, split_default="val", split_key="evaluation.split")
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
    from ..model_eval import eval_dataset_config, evaluate_checkpoint  # torch: see pipeline.cli's docstring

    cfg = config_from_args(args)
    at_least_one("--limit", args.limit)
    if args.split is None:
        cfg = eval_dataset_config(cfg)  # evaluation defaults to the held-out split
    ev = evaluate_checkpoint(cfg, args.checkpoint, args.limit)
    results = ev.results
    print(f"{args.checkpoint} ({ev.meta.get('kind', '?')}, iteration {ev.meta['iteration']}) on {cfg.dataset.name} "
          f"{ev.dataset.split}: {results['mask'].num_images} images, {len(ev.records)} detections")
    print(table(results))
    print()
    print(per_class(results))
    print()
    print(cityscapes_table({"mask": results["mask"], "box-as-mask": results["box-as-mask"]}))
    out = Path(args.out or f"{args.checkpoint}.{ev.dataset.split}.predictions.json")
    atomic_write_text(out, json.dumps(ev.records))
    print(f"predictions: {out}")
    if args.json:
        Path(args.json).write_text(json.dumps({k: r.to_dict() for k, r in results.items()}, indent=1))
    return 0
