"""``pipeline make-toy``: write generated street scenes in the Cityscapes layout.

The output is a Cityscapes root (leftImg8bit, gtFine polygons json + labelIds/instanceIds PNGs,
disparity, camera) that ``--dataset cityscapes --data-root DIR`` reads like the real thing, plus a
``toy.json`` saying how it was generated. The same seed and size give the same bytes. ``--dataset toy``
generates one automatically into a cache folder.

Re-running with the same arguments rewrites the same files (and completes an interrupted run). A folder
that already holds a different dataset (another seed, size or image count, another generator version, or
data make-toy did not write) is refused unless --overwrite is given, which deletes its leftImg8bit, gtFine,
disparity and camera folders first.
"""
from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time
from pathlib import Path

from ..config import ToyConfig
from ..datasets.toy import (TOY_MANIFEST, TOY_TREES, describe_toy, generate_toy, parse_size,
                            read_toy_manifest, toy_manifest)
from ..errors import UserError

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
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a different dataset in --out (deletes its leftImg8bit, gtFine, disparity "
                             "and camera folders) instead of refusing")
    parser.set_defaults(func=run)


def _os_problem(exc: OSError) -> str:
    return exc.strerror or str(exc)


def prepare_out(out: Path, manifest: dict, overwrite: bool) -> None:
    """Make ``out`` ready for the dataset ``manifest`` describes, or raise a one-line ``UserError``:
    it must be a writable folder holding nothing, the same toy dataset, or (with ``overwrite``) anything,
    whose dataset folders are then deleted."""
    if out.exists() and not out.is_dir():
        raise UserError(out, "exists and is not a folder; choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        raise UserError(out, f"cannot write the toy dataset here ({_os_problem(exc)})") from None
    old = read_toy_manifest(out)
    trees = [name for name in TOY_TREES if (out / name).exists()]
    if old == manifest:
        if trees:
            log.info("%s already holds this toy dataset: rewriting its files", out)
        return
    if old is None and not trees:
        return
    held = (f"a different toy dataset ({describe_toy(old)}; asked for {describe_toy(manifest)})" if old
            else f"a dataset make-toy did not write ({', '.join(trees)} without a valid {TOY_MANIFEST})")
    if not overwrite:
        raise UserError(out, f"already holds {held}; pass --overwrite to replace it or choose another --out")
    log.warning("%s: --overwrite: deleting %s", out, held)
    try:
        for name in trees:
            shutil.rmtree(out / name)
        (out / TOY_MANIFEST).unlink(missing_ok=True)
    except OSError as exc:
        raise UserError(getattr(exc, "filename", None) or out,
                        f"cannot delete the old dataset ({_os_problem(exc)})") from None


def run(args: argparse.Namespace) -> int:
    if args.train < 0 or args.val < 0:
        raise UserError("--train/--val", "image counts must be >= 0")
    size = parse_size(args.size, "--size")
    out = Path(args.out)
    prepare_out(out, toy_manifest(args.train, args.val, args.seed, size), args.overwrite)
    start = time.perf_counter()
    try:
        generate_toy(out, args.train, args.val, args.seed, size, progress=True)
    except OSError as exc:
        raise UserError(exc.filename or out, f"cannot write the toy dataset ({_os_problem(exc)})") from None
    log.info("wrote %d train + %d val images (%dx%d) to %s in %.1f s", args.train, args.val, size[0],
             size[1], out, time.perf_counter() - start)
    return 0
