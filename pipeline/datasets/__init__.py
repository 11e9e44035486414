"""Dataset loaders behind one entry point, ``build_dataset(cfg.dataset)``.

``toy`` generates the Cityscapes-layout toy data into its cache folder when missing and reads it with the
Cityscapes loader; ``cityscapes`` reads ``cfg.root`` or ``$CITYSCAPES_DATASET``; ``coco`` reads ``cfg.ann``
with images under ``cfg.root``. ``build_index`` streams any of them, and OpenImages' CSVs (``cfg.ann``, the boxes;
``cfg.classes``), into a dataset index (``pipeline.index``).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable, Iterator

import pyarrow as pa
from tqdm import tqdm

from ..config import DatasetConfig
from ..errors import ConfigError, InputError
from ..index import IndexRow, IndexWriter, SortedRuns
from .base import Category, Dataset, Reject, Sample
from .cityscapes import CityscapesDataset
from .coco import HOLDOUT_SPLIT, CocoDataset, CocoStream, is_held_out
from .openimages import openimages_index_rows, read_classes
from .toy import ensure_toy

__all__ = ["Category", "Dataset", "Reject", "Sample", "CityscapesDataset", "CocoDataset", "build_dataset",
           "build_index", "build_index_with_bar", "dataset_root", "dataset_splits"]

OPENIMAGES = "openimages"
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
    if cfg.name == OPENIMAGES:
        missing = [flag for flag, value in (("--data-root", cfg.root), ("--ann", cfg.ann), ("--classes", cfg.classes))
                   if not value]
        if missing:
            raise ConfigError(missing[0], "the openimages dataset needs --data-root DIR (the folder of <ImageID>.jpg), "
                                          "--ann FILE (the boxes CSV) and --classes FILE (the class-descriptions CSV)")
        return Path(cfg.root)
    raise ConfigError("dataset.name", f"unknown dataset '{cfg.name}'; expected toy, cityscapes, coco or openimages")


def dataset_splits(cfg: DatasetConfig) -> list[str]:
    """Splits the dataset has: for a COCO file, its one split (``cfg.split``); for Cityscapes-layout data,
    those of train / val with a ``leftImg8bit/<split>`` folder."""
    root = dataset_root(cfg)
    if cfg.name == "coco":
        return [cfg.split]
    return [s for s in CITYSCAPES_SPLITS if (root / "leftImg8bit" / s).is_dir()]


def _check_holdout(cfg: DatasetConfig) -> None:
    if not 0.0 <= cfg.holdout < 1.0:
        raise ConfigError("dataset.holdout", f"must be a fraction in [0, 1), got {cfg.holdout}")
    if cfg.holdout and cfg.name != "coco":
        raise ConfigError("dataset.holdout", f"splits COCO-format files only; {cfg.name} has its own val split")


def build_dataset(cfg: DatasetConfig) -> Dataset:
    """The dataset named by ``cfg.name`` for split ``cfg.split`` (lenient unless ``cfg.strict``)."""
    _check_holdout(cfg)
    if cfg.name == OPENIMAGES:
        raise ConfigError("dataset.name", "openimages is read through its dataset index: build it with "
                                          "'pipeline index' (labeling and training from an index come next)")
    root = dataset_root(cfg)
    if cfg.name == "coco":
        return CocoDataset(root, cfg.ann, split=cfg.split, strict=cfg.strict, min_box_side=cfg.min_box_side,
                           holdout=cfg.holdout)
    return CityscapesDataset(root, cfg.split, strict=cfg.strict)


def build_index(cfg: DatasetConfig, out: str | os.PathLike, part_images: int = 10000, buckets: int = 64,
                progress: Callable[[int, int], None] | None = None) -> dict:
    """Write the dataset index of ``cfg`` (`pipeline.index`) into ``out``, streaming: the images of split
    ``cfg.split`` (Cityscapes layout), every image of a COCO file (with ``cfg.holdout``, the images of split
    ``cfg.split`` as ``CocoDataset`` splits them), or every image of an OpenImages boxes CSV. Bad items go to the
    index's rejects (``cfg.strict``: the first one raises and no index is written). ``progress`` is called with
    (images, rejects) so far. Returns the index metadata (``_index.json``)."""
    _check_holdout(cfg)
    root = dataset_root(cfg)
    out = Path(out)
    scratch = out / ".scratch"
    writer = IndexWriter(out, cfg.name, part_images)
    runs = SortedRuns(scratch)
    categories: list[Category]
    source: dict = {"root": os.fspath(root), "split": cfg.split}
    try:
        if cfg.name == OPENIMAGES:
            categories, classes = read_classes(cfg.classes)
            source.update(ann=cfg.ann, classes=cfg.classes)
            items: Iterator = openimages_index_rows(root, cfg.ann, classes, scratch, buckets, cfg.min_box_side)
        elif cfg.name == "coco":
            stream = CocoStream(root, cfg.ann, cfg.min_box_side)
            source.update(ann=cfg.ann)
            items = stream.index_rows(scratch, buckets)
        else:
            city = CityscapesDataset(root, cfg.split, scan=False)
            categories = city.categories
            items = city.index_rows()
        for item in items:
            if isinstance(item, Reject):
                if cfg.strict:
                    raise InputError(item.where, item.problem)
                writer.reject(item.where, item.problem)
            elif isinstance(item, IndexRow):
                writer.add(item)
            else:
                runs.add_run(item)
                pa.default_memory_pool().release_unused()    # a bucket's buffers, or the pool keeps them all
            if progress is not None:
                progress(writer.indexed, writer.rejects)
        if cfg.name == "coco":
            categories = stream.categories
        for row in runs.merged():
            if cfg.holdout and is_held_out(row.image_id, cfg.holdout) != (cfg.split == HOLDOUT_SPLIT):
                continue
            writer.add(row)
            if progress is not None:
                progress(writer.indexed, writer.rejects)
        kind = {OPENIMAGES: OPENIMAGES, "coco": CocoDataset.name}.get(cfg.name, CityscapesDataset.name)
        return writer.close([(c.id, c.name) for c in categories], source, kind)
    except BaseException:
        writer.abort()
        raise
    finally:
        runs.close()
        shutil.rmtree(scratch, ignore_errors=True)


def build_index_with_bar(cfg: DatasetConfig, out: str | os.PathLike, part_images: int = 10000) -> dict:
    """``build_index`` with a progress bar of the images indexed and items rejected (on a terminal only)."""
    with tqdm(desc=f"index {cfg.name}", unit="img", disable=None, leave=False, dynamic_ncols=True) as bar:
        def progress(images: int, rejects: int) -> None:
            bar.n = images
            bar.set_postfix(rejects=rejects, refresh=False)
            bar.update(0)
        return build_index(cfg, out, part_images, progress=progress)
