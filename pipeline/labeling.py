"""The label stage, shared by ``pipeline label`` and ``pipeline run``: a label service with every input checked
before Ray is needed, and a run of it with a progress bar. Neither starts Ray (the caller connects once with
``init_ray``).

Every run labels a dataset index (``pipeline.index``) through Ray Data. Given a configured dataset instead of an
index, it first streams the dataset into the index ``<out>/_index`` (pyarrow's dataset discovery skips names
starting with "_", so shard readers do not see it). That index is written again by every run, at the cost of
one pass over the annotations (what loading the dataset cost before): an index kept from an earlier run could
describe annotations edited since, and telling would take the same pass.
"""
from __future__ import annotations

import logging
import os
import shutil
from typing import Optional

from tqdm import tqdm

from kernels.extension import missing_builds

from .config import Config
from .datasets import build_index_with_bar
from .index import IndexSource
from .label_service import (
    LabelService,
    LabelSummary,
    TeacherFactory,
    check_network_classes,
    label_digest,
    load_checkpoint,
)
from .shards import BOX_PRIOR

log = logging.getLogger(__name__)

DATASET_INDEX = "_index"                # the index of a configured dataset, inside the shard directory


def prepare_label(cfg: Config, out: str | os.PathLike, checkpoint: Optional[str] = None, round_: int = 0, *,
                  limit: Optional[int] = None, overwrite: bool = False, retry_rejects: bool = False,
                  index: Optional[str | os.PathLike] = None) -> LabelService:
    """A label service for ``cfg``'s split into ``out``, every input checked before Ray is needed: the checkpoint
    is built once here (a bad one is refused before any data is made or worker starts) and the shard directory
    must hold nothing of another config. ``checkpoint``: a student export for network mode; None: box prior.
    ``index``: a dataset index (``pipeline index``) to label instead of ``cfg.dataset``, whose index is otherwise
    written into ``out`` first (module docstring); the driver reads no annotations past that."""
    network, teacher_id = load_checkpoint(checkpoint) if checkpoint else (None, BOX_PRIOR)
    created = not os.path.exists(out)
    try:
        return _prepare(cfg, out, network, checkpoint, teacher_id, round_, limit, overwrite, retry_rejects, index)
    except BaseException:
        if created:     # a refused input leaves nothing behind, not even the index written for it
            shutil.rmtree(out, ignore_errors=True)
        raise


def _prepare(cfg: Config, out: str | os.PathLike, network, checkpoint: Optional[str], teacher_id: str, round_: int,
             limit: Optional[int], overwrite: bool, retry_rejects: bool,
             index: Optional[str | os.PathLike]) -> LabelService:
    if index is None:
        # The workers read the images by paths relative to the index's root: it must not depend on their
        # working directory.
        if cfg.dataset.root:
            cfg.dataset.root = os.path.abspath(cfg.dataset.root)
        index = os.path.join(out, DATASET_INDEX)
        build_index_with_bar(cfg.dataset, index)
    dataset = IndexSource(index)
    log.info("index %s: %s %s, %d images, %d categories, %d rejects", index, dataset.name, dataset.split,
             dataset.images, len(dataset.categories), dataset.meta.get("rejects", 0))
    if network is not None:
        check_network_classes(network, [c.id for c in dataset.categories], checkpoint)
        del network  # the workers build their own
    missing = missing_builds("cuda" if cfg.teacher.device == "cuda" else "cpu")
    if missing:
        # The workers' own warning stays in their logs: say it where the user looks.
        log.warning("no current build of the kernels %s (not built at install, or older than their sources): each "
                    "label worker compiles them while starting, about a minute; ./scripts/setup.sh builds them once",
                    ", ".join(missing))
    service = LabelService(cfg.label, out, dataset, TeacherFactory(cfg.teacher, checkpoint), teacher_id,
                           label_digest(dataset.fingerprint(), cfg.teacher, teacher_id, round_), round_=round_,
                           device=cfg.teacher.device,
                           overwrite=overwrite, limit=limit, strict=cfg.dataset.strict,
                           retry_rejects=retry_rejects)
    service.check_out_dir()
    return service


def run_label(service: LabelService, out: str | os.PathLike) -> LabelSummary:
    """Run a prepared label service (Ray connected) with a progress bar over the images still to do."""
    bar = None

    def on_start(todo: int, skipped: int) -> None:
        nonlocal bar
        if skipped:
            print(f"resuming: {skipped} images already finished in {out}", flush=True)
        bar = tqdm(total=todo, unit="img", desc="label", dynamic_ncols=True)

    def progress(event: dict) -> None:
        bar.update(event["images"] + event["rejects"])

    try:
        return service.run(progress, on_start)
    finally:
        if bar is not None:
            bar.close()
