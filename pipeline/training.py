"""The train stage, shared by ``pipeline train`` and ``pipeline run``: the training job of a config (samples,
classes, pseudo-label shards, a warm start) and a run of it on Ray Train with a progress bar. The caller connects
to Ray first (``init_ray``).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Optional

from tqdm import tqdm

from student.config import StudentConfig
from student.model import build_model
from student.train import TrainJob, check_batch_split, fit

from .config import Config
from .datasets import build_dataset
from .errors import UserError
from .shards import read_manifest

log = logging.getLogger(__name__)


def check_labels(labels: str | os.PathLike, dataset_name: str, split: str) -> None:
    """The shard directory exists and was written for this dataset and split."""
    meta = read_manifest(labels)["meta"]
    for key, want in (("dataset", dataset_name), ("split", split)):
        have = meta.get(key) if isinstance(meta, dict) else None
        if have is not None and str(have) != want:
            raise UserError(labels, f"shards were written for {key} {have!r}, training uses {want!r}")


def check_student(cfg: StudentConfig) -> None:
    """The student builds from ``cfg`` (backbone, norm, projection, sizes, a named weights file) and its batch
    splits over its workers, so a bad setting fails in one line before data is generated or Ray starts, not
    inside every training worker or after round 0's labeling. The commands call it once, before ``build_job``."""
    check_batch_split(cfg)
    build_model(cfg, 1)  # the class count only sizes the predictors, so any will do here


def build_job(cfg: Config, out: str | os.PathLike, labels: Optional[str | os.PathLike] = None,
              init_from: Optional[str | os.PathLike] = None) -> TrainJob:
    """The training job of a config: the split's samples (boxes, classes, depth; never masks), its classes and
    the pseudo-label shards, with every path absolute (workers may run elsewhere); ``cfg`` is left as it is.
    ``init_from``: an export whose weights start the run (the previous round's teacher)."""
    if labels:
        check_labels(labels, cfg.dataset.name, cfg.dataset.split)
    data_cfg = dataclasses.replace(cfg.dataset, root=os.path.abspath(cfg.dataset.root) if cfg.dataset.root else "")
    dataset = build_dataset(data_cfg)
    if len(dataset) == 0:
        raise UserError(cfg.dataset.name, f"split {cfg.dataset.split} has no usable images")
    classes = [{"id": c.id, "name": c.name} for c in dataset.categories]
    # The student reads the shards' correspondence cells on the teacher's grid, over the teacher's padded RoI.
    student = dataclasses.replace(cfg.student, correspondence_grid=cfg.teacher.correspondence.grid,
                                  correspondence_pad=cfg.teacher.box_prior.pad)
    return TrainJob(cfg=student, samples=list(dataset), classes=classes, out=os.path.abspath(out),
                    dataset=cfg.dataset.name, labels_dir=os.path.abspath(labels) if labels else "",
                    init_from=os.path.abspath(init_from) if init_from else "")


def loss_terms(record: dict) -> str:
    """A metrics record's loss terms, ``name=value`` without the ``loss_`` prefix, for a log or summary line."""
    return " ".join(f"{k[5:]}={v:.3f}" for k, v in sorted(record.items()) if k.startswith("loss_"))


def run_training(job: TrainJob, resume: bool = False) -> dict:
    """``student.train.fit`` with a progress bar (loss, lr, ETA) and per-term loss lines in the log; returns its
    result (``student.train.fit``'s)."""
    bar = tqdm(total=job.cfg.iterations, unit="it", desc="train", dynamic_ncols=True)

    def progress(rec: dict) -> None:
        bar.update(rec["iteration"] - bar.n)
        bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{rec['lr']:.2g}")
        log.info("iter %d loss %.4f %s", rec["iteration"], rec["loss"], loss_terms(rec))

    try:
        return fit(job, resume=resume, progress=progress)
    finally:
        bar.close()
