"""Arguments shared by several commands, and turning them into a ``Config``."""
from __future__ import annotations

import argparse

from ..config import Config, config_path_for, load_config

DATASETS = ("toy", "cityscapes", "coco")


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE",
                        help="YAML config (default: configs/<dataset>.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value; repeatable, e.g. --set teacher.crf.iters=5")


def add_dataset_args(parser: argparse.ArgumentParser, split_default: str | None = "train") -> None:
    parser.add_argument("--dataset", choices=DATASETS, default="toy",
                        help="dataset kind (default: toy, generated on first use)")
    parser.add_argument("--data-root", metavar="DIR",
                        help="dataset root (cityscapes: default $CITYSCAPES_DATASET; coco: image folder root)")
    parser.add_argument("--ann", metavar="FILE", help="COCO instances json (coco only)")
    parser.add_argument("--split", default=split_default,
                        help=f"split to use (default: {split_default or 'all'})")
    parser.add_argument("--strict", action="store_true",
                        help="stop at the first bad input instead of skipping and recording it")


def config_from_args(args: argparse.Namespace) -> Config:
    dataset = getattr(args, "dataset", None) or "toy"
    path = getattr(args, "config", None) or config_path_for(dataset)
    extra: dict = {"dataset": {"name": dataset}}
    if getattr(args, "data_root", None):
        extra["dataset"]["root"] = args.data_root
    if getattr(args, "ann", None):
        extra["dataset"]["ann"] = args.ann
    if getattr(args, "split", None):
        extra["dataset"]["split"] = args.split
    if getattr(args, "strict", False):
        extra["dataset"]["strict"] = True
    return load_config(path, getattr(args, "overrides", []) or [], extra=extra)
