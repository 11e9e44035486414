"""``pipeline index``: write the dataset index, one Parquet row per image, by streaming the annotations.

The index (DIR/part-*.parquet, DIR/_rejects.jsonl, DIR/_index.json) holds each image's id, file, size, boxes,
classes and ignore regions, and never a mask. It is read with pyarrow (``pyarrow.dataset.dataset(DIR)``) and in
parts, so nothing downstream has to hold the dataset. Building never holds it either: COCO's json is parsed as a
stream and OpenImages' boxes CSV in blocks, both spread over hash buckets on disk and grouped one bucket at a time.
Bad items (a box outside the image, a zero-area box, a missing image file, an unknown class) go to
DIR/_rejects.jsonl with their reason and the rest goes on (--strict stops at the first). Building again starts
over; an index whose build was interrupted has no _index.json and is not read.

OpenImages: --data-root is the folder of <ImageID>.jpg files, --ann the boxes CSV
(oidv6-train-annotations-bbox.csv style) and --classes the class-descriptions CSV; IsGroupOf boxes are crowd
regions.
"""
from __future__ import annotations

import argparse
import time

from ..datasets import build_index_with_bar
from .common import add_config_args, add_dataset_args, at_least_one, config_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("index", help="stream a dataset's annotations into a Parquet index (one row per image)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataset_args(p, extra_datasets=("openimages",))
    p.add_argument("--classes", metavar="FILE", help="OpenImages class-descriptions CSV (openimages only)")
    p.add_argument("--out", required=True, metavar="DIR", help="index folder to write (its old parts are replaced)")
    p.add_argument("--part-images", type=int, default=10000, metavar="N",
                   help="images per Parquet part (default: 10000): the unit later stages read and label")
    add_config_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    at_least_one("--part-images", args.part_images)
    start = time.perf_counter()
    meta = build_index_with_bar(cfg.dataset, args.out, args.part_images)
    print(f"indexed {meta['images']} images ({meta['boxes']} boxes, {len(meta['categories'])} classes) into "
          f"{len(meta['parts'])} parts in {time.perf_counter() - start:.1f} s; {meta['rejects']} rejected items "
          f"listed in {args.out}/_rejects.jsonl")
    return 0
