"""``pipeline make-toy``: write generated street scenes in the Cityscapes layout.

The output is a Cityscapes root (leftImg8bit, gtFine polygons json + labelIds/instanceIds PNGs,
disparity, camera) that ``--dataset cityscapes --data-root DIR`` reads like the real thing. The same seed
and size give the same bytes. ``--dataset toy`` generates one automatically into a cache folder.
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from ..config import ToyConfig
from ..datasets.toy import generate_toy, parse_size
from ..errors import PipelineError

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    defaults = ToyConfig()
    parser = subparsers.add_parser(
        "make-toy", help="generate a toy dataset in the Cityscapes layout (images, polygons, depth)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (the dataset root)")
    parser.add_argument("--train", type=int, default=defaults.train, metavar="N",
                        help=f"training images (default: {defaults.train})")
    parser.add_argument("--val", type=int, default=defaults.val, metavar="M",
                        help=f"validation images (default: {defaults.val})")
    parser.add_argument("--seed", type=int, default=defaults.seed, metavar="S",
                        help=f"random seed (default: {defaults.seed})")
    parser.add_argument("--size", default=defaults.size, metavar="HxW",
                        help=f"image size (default: {defaults.size}; Cityscapes itself is 1024x2048)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.train < 0 or args.val < 0:
        raise PipelineError("--train/--val", "image counts must be >= 0")
    size = parse_size(args.size, "--size")
    out = Path(args.out)
    if (out / "leftImg8bit").exists():
        log.info("%s already holds a dataset: files of the same names are overwritten", out)
    start = time.perf_counter()
    generate_toy(out, args.train, args.val, args.seed, size, progress=True)
    log.info("wrote %d train + %d val images (%dx%d) to %s in %.1f s", args.train, args.val, size[0],
             size[1], out, time.perf_counter() - start)
    return 0
