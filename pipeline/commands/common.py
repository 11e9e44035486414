"""Arguments shared by several commands, and turning them into a ``Config``.

Precedence: dataclass defaults <- the config file <- dedicated flags (``--dataset``, ``--data-root``,
``--ann``, ``--split``, ``--strict``) <- ``--set`` overrides. A flag that is not given changes nothing, so
a ``--config`` file naming ``dataset: {name: cityscapes, root: ...}`` is used as written. The config file
is ``--config`` when given, else ``configs/<--dataset>.yaml``, else ``configs/toy.yaml``.
"""
from __future__ import annotations

import argparse

from ..config import Config, config_path_for, load_config
from ..errors import UserError
from ..label_service import init_ray

DATASETS = ("toy", "cityscapes", "coco")
DEFAULT_DATASET = "toy"


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE",
                        help=f"YAML config (default: configs/<--dataset>.yaml, configs/{DEFAULT_DATASET}.yaml "
                             f"without --dataset)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value; repeatable, e.g. --set teacher.crf.iters=5")


def add_dataset_args(parser: argparse.ArgumentParser, split_default: str | None = "train",
                     split_key: str = "dataset.split", extra_datasets: tuple[str, ...] = ()) -> None:
    """``split_default``: what omitting ``--split`` means, for the help text. None: the command goes over
    every split; a name: the config's ``split_key`` (that name in the shipped configs). Either way an
    omitted ``--split`` (or ``--dataset``) leaves the config file's value alone. ``extra_datasets``: kinds only this
    command reads, beside ``DATASETS``."""
    parser.add_argument("--dataset", choices=DATASETS + extra_datasets, default=None,
                        help=f"dataset kind (default: dataset.name of the --config file, else "
                             f"{DEFAULT_DATASET}, generated on first use)")
    parser.add_argument("--data-root", metavar="DIR",
                        help="dataset root (cityscapes: default $CITYSCAPES_DATASET; coco: image folder root)")
    ann = "COCO instances json (coco)" + (", OpenImages boxes CSV (openimages)" if "openimages" in extra_datasets
                                          else " (coco only)")
    parser.add_argument("--ann", metavar="FILE", help=ann)
    split_help = ("every split of the dataset" if split_default is None
                  else f"{split_key} of the config, {split_default} in the shipped configs")
    parser.add_argument("--split", default=None, help=f"split to use (default: {split_help})")
    parser.add_argument("--strict", action="store_true",
                        help="stop at the first bad input instead of skipping and recording it")


def add_address_arg(parser: argparse.ArgumentParser, more: str = "") -> None:
    parser.add_argument("--address", metavar="ADDR",
                        help=f"existing Ray cluster (default: $RAY_ADDRESS, else a local cluster){more}")


def connect_ray(cfg: Config, address: str | None) -> None:
    """Join ``address`` (or start a local cluster) once for the command, and print where its dashboard is."""
    url = init_ray(cfg.run, address)
    print(f"Ray dashboard: {url or 'not available on this cluster'}", flush=True)


def at_least_one(flag: str, value: int | None) -> int | None:
    """``value`` of an optional count flag, refused in one line when it is below 1."""
    if value is not None and value < 1:
        raise UserError(flag, f"must be at least 1, got {value}")
    return value


def config_from_args(args: argparse.Namespace) -> Config:
    """The ``Config`` the arguments name (see the module docstring for the precedence)."""
    dataset = getattr(args, "dataset", None)
    # Kinds without a shipped config of their own (openimages) start from the toy config's other sections.
    path = getattr(args, "config", None) or config_path_for(dataset if dataset in DATASETS else DEFAULT_DATASET)
    extra: dict = {"dataset": {}}
    if dataset:
        extra["dataset"]["name"] = dataset
    if getattr(args, "data_root", None):
        extra["dataset"]["root"] = args.data_root
    if getattr(args, "ann", None):
        extra["dataset"]["ann"] = args.ann
    if getattr(args, "classes", None):
        extra["dataset"]["classes"] = args.classes
    if getattr(args, "split", None):
        extra["dataset"]["split"] = args.split
    if getattr(args, "strict", False):
        extra["dataset"]["strict"] = True
    return load_config(path, getattr(args, "overrides", []) or [], extra=extra)
