"""Dataset loaders behind one entry point, ``build_dataset(cfg.dataset)``.

``toy`` generates the Cityscapes-layout toy data into its cache folder when missing and reads it with the
Cityscapes loader; ``cityscapes`` reads ``cfg.root`` or ``$CITYSCAPES_DATASET``; ``coco`` reads ``cfg.ann``
with images under ``cfg.root``.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..config import DatasetConfig
from ..errors import ConfigError
from .base import Category, Dataset, Reject, Sample
from .cityscapes import CityscapesDataset
from .coco import CocoDataset
from .toy import ensure_toy

__all__ = ["Category", "Dataset", "Reject", "Sample", "CityscapesDataset", "CocoDataset", "build_dataset",
           "dataset_root", "dataset_splits"]

CITYSCAPES_ENV = "CITYSCAPES_DATASET"
# Splits with instance annotations, in the order a summary lists them (Cityscapes' test labels are empty).
CITYSCAPES_SPLITS = ("train", "val")


def dataset_root(cfg: DatasetConfig) -> Path:
    """The folder the dataset is read from; for ``toy`` this generates the data on first use."""
    if cfg.name == "toy":
        return ensure_toy(cfg.toy)
    if cfg.name == "cityscapes":
        root = cfg.root or os.environ.get(CITYSCAPES_ENV, "")
        if not root:
            raise ConfigError("--data-root", f"the cityscapes dataset needs --data-root (dataset.root) or "
                                             f"${CITYSCAPES_ENV}; neither is set")
        return Path(root)
    if cfg.name == "coco":
        if not cfg.root or not cfg.ann:
            raise ConfigError("--ann" if cfg.root else "--data-root",
                              "the coco dataset needs --data-root DIR (the image folder root, dataset.root) and "
                              "--ann FILE (the instances json, dataset.ann)")
        return Path(cfg.root)
    raise ConfigError("dataset.name", f"unknown dataset '{cfg.name}'; expected toy, cityscapes or coco")


def dataset_splits(cfg: DatasetConfig) -> list[str]:
    """Splits the dataset has: for a COCO file, its one split (``cfg.split``); for Cityscapes-layout data,
    those of train / val with a ``leftImg8bit/<split>`` folder."""
    root = dataset_root(cfg)
    if cfg.name == "coco":
        return [cfg.split]
    return [s for s in CITYSCAPES_SPLITS if (root / "leftImg8bit" / s).is_dir()]


def build_dataset(cfg: DatasetConfig) -> Dataset:
    """The dataset named by ``cfg.name`` for split ``cfg.split`` (lenient unless ``cfg.strict``)."""
    if not 0.0 <= cfg.holdout < 1.0:
        raise ConfigError("dataset.holdout", f"must be a fraction in [0, 1), got {cfg.holdout}")
    if cfg.holdout and cfg.name != "coco":
        raise ConfigError("dataset.holdout", f"splits COCO-format files only; {cfg.name} has its own val split")
    root = dataset_root(cfg)
    if cfg.name == "coco":
        return CocoDataset(root, cfg.ann, split=cfg.split, strict=cfg.strict, min_box_side=cfg.min_box_side,
                           holdout=cfg.holdout)
    return CityscapesDataset(root, cfg.split, strict=cfg.strict)
