"""One labeling run into a shard directory: ``LabelService`` runs the Ray Data pipeline of a dataset index
(``streaming``) and a ``ShardSink`` streams its results into a ``ShardWriter``. Exactly once across
interruptions: the writer drops a result for an image already finished, and a re-run skips finished images."""
from __future__ import annotations

import logging
import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import pyarrow as pa
import pyarrow.compute as pc

from ..config import LabelConfig
from ..errors import UserError, one_line
from ..index import IndexSource
from ..shards import ShardMeta, ShardWriter, check_resumable
from .cluster import check_fits, resolve_gpus_per_worker, resolve_workers

log = logging.getLogger(__name__)

Progress = Callable[[dict], None]


@dataclass
class LabelSummary:
    images_total: int = 0             # images of the dataset (after --limit)
    images_skipped: int = 0           # finished by an earlier run
    images_labeled: int = 0           # labeled by this run
    instances: int = 0
    rejects: int = 0                  # images rejected by this run ("load" and "label" stages)
    dataset_rejects: int = 0          # items the dataset loader rejected ("dataset" stage; every run)
    images_retried: int = 0           # earlier rejects retried by this run (--retry-rejects)
    batches_timed_out: int = 0        # batches redone after label.batch_timeout_s
    shards: int = 0                   # shards written by this run
    seconds: float = 0.0
    labeling_seconds: float = 0.0     # from the start of the Ray Data pipeline to its last result
    worker_stats: list[dict] = field(default_factory=list)
    driver_peak_rss_mib: float = 0.0

    def line(self) -> str:
        rate = self.images_labeled / self.seconds if self.seconds > 0 else 0.0
        retried = f" ({self.images_retried} earlier rejects retried)" if self.images_retried else ""
        return (f"labeled {self.images_labeled} images ({self.instances} instances, {rate:.2f} images/s), "
                f"{self.rejects} rejected{retried}, {self.dataset_rejects} rejected by the dataset loader, "
                f"{self.images_skipped} already done, {self.shards} shards written in {self.seconds:.1f} s")


class ShardSink:
    """Where a run's results go: rows and rejects into ``writer``, counts into ``summary``, and after each result
    ``progress({"images", "instances", "rejects", "worker"})``. With ``strict`` the first image the teacher or
    the loader rejects stops the run."""

    def __init__(self, writer: ShardWriter, summary: LabelSummary, progress: Optional[Progress] = None,
                 strict: bool = False):
        self.writer = writer
        self.summary = summary
        self.progress = progress
        self.strict = strict

    def add(self, results: list[dict], worker: int) -> None:
        images = instances = rejects = 0
        for res in results:
            image_id = res["image_id"]
            if "table" in res:
                if self.writer.add(image_id, res["table"], res.get("empty")):
                    images += 1
                    instances += res["table"].num_rows
            elif not self.writer.has(image_id):
                self.writer.reject(image_id, res["file"], res["reason"], res["stage"])
                rejects += 1
                if self.strict:
                    raise UserError(res["file"] or image_id, f"{res['reason']} (--strict stops at the first "
                                                              f"bad input)")
        self._count(images, instances, rejects, worker)

    def _count(self, images: int, instances: int, rejects: int, worker: int) -> None:
        self.summary.images_labeled += images
        self.summary.instances += instances
        self.summary.rejects += rejects
        if self.progress is not None:
            self.progress({"images": images, "instances": instances, "rejects": rejects, "worker": worker})


class LabelService:
    """Driver of one labeling run of a dataset index into ``out_dir`` (call ``init_ray`` first). The driver holds
    no dataset: the images stream from the index's parts through the label workers.

    ``retry_rejects``: images an earlier run rejected at the "load" or "label" stage are labeled again
    (their reject lines are dropped; a new failure is recorded again).
    """

    def __init__(self, label_cfg: LabelConfig, out_dir: str | os.PathLike, dataset: IndexSource,
                 teacher_factory: Callable[[str], Any], teacher_id: str, config_digest: str, round_: int = 0,
                 device: str = "auto", overwrite: bool = False, limit: Optional[int] = None,
                 strict: bool = False, retry_rejects: bool = False):
        self.cfg = label_cfg
        self.out_dir = Path(out_dir)
        self.dataset = dataset
        self.teacher_factory = teacher_factory
        self.teacher_id = teacher_id
        self.round = round_
        self.device = device
        self.overwrite = overwrite
        self.limit = limit
        self.strict = strict
        self.retry_rejects = retry_rejects
        self.category_names = {int(c.id): c.name for c in dataset.categories}
        self.meta = ShardMeta(
            dataset=dataset.name, split=dataset.split, data_root=str(Path(dataset.root).resolve()),
            classes=[{"id": int(c.id), "name": c.name} for c in dataset.categories],
            config_digest=config_digest, teacher=teacher_id, round=round_)
        self.gpus_per_worker = 0.0

    def check_out_dir(self) -> None:
        """Fail before any Ray work when ``out_dir`` holds shards this run must not add to."""
        if not self.overwrite:
            check_resumable(self.out_dir, self.meta)

    def _run_index(self, writer: ShardWriter, summary: LabelSummary, progress: Optional[Progress],
                   on_start: Optional[Callable[[int, int], None]]) -> None:
        """The Ray Data pipeline (``streaming``) of the images still to do, into ``writer``."""
        import ray

        from .ledger import AttemptLedger
        from .streaming import iter_results, label_pipeline

        finished = pa.array(sorted(writer.done), pa.string())
        skipped = sum(int(pc.sum(pc.is_in(ids, value_set=finished)).as_py() or 0)
                      for ids in self.dataset.image_ids(self.limit)) if len(finished) else 0
        summary.images_skipped = skipped
        if on_start is not None:
            on_start(summary.images_total - skipped, skipped)
        if summary.images_total - skipped <= 0:
            return
        n = self._pool()
        ledger = ray.remote(AttemptLedger).options(num_cpus=0).remote()
        worker_args = dict(root=str(Path(self.dataset.root).resolve()), ledger=ledger,
                           max_attempts=self.cfg.max_attempts, batch_timeout_s=self.cfg.batch_timeout_s,
                           category_names=self.category_names, teacher_factory=self.teacher_factory,
                           round_=self.round, teacher_id=self.teacher_id, device=self.device,
                           threads=max(1, int(self.cfg.cpus_per_worker)))
        ds = label_pipeline(self.dataset, finished, self.limit, worker_args, n, self.cfg.batch_images,
                            self.cfg.max_inflight, self.cfg.cpus_per_worker, self.gpus_per_worker)
        sink = ShardSink(writer, summary, progress, self.strict)
        t_start = time.monotonic()
        results = iter_results(ds)
        try:
            for worker, res in results:
                sink.add([res], worker)
            writer.flush()
        except ray.exceptions.RayError as exc:
            raise UserError("label workers", f"the labeling pipeline failed ({one_line(exc, last=True)}); finished "
                                             f"shards are kept, re-run the same command to resume") from None
        finally:
            results.close()
            summary.labeling_seconds = time.monotonic() - t_start
            try:
                done = ray.get(ledger.summary.remote(), timeout=10)
                summary.worker_stats, summary.batches_timed_out = done["workers"], done["timeouts"]
            except ray.exceptions.RayError:
                pass
            ray.kill(ledger)

    def _pool(self) -> int:
        """The label worker count, checked against the cluster (sets ``gpus_per_worker``)."""
        import ray

        if self.cfg.batch_timeout_s <= 0:
            raise UserError("label.batch_timeout_s", f"must be positive, got {self.cfg.batch_timeout_s:g}")
        resources = ray.cluster_resources()
        n = resolve_workers(self.cfg.workers, resources, self.cfg.cpus_per_worker, self.cfg.gpus_per_worker,
                            self.device)
        self.gpus_per_worker = resolve_gpus_per_worker(self.cfg.gpus_per_worker, resources.get("GPU", 0.0), n,
                                                       self.device)
        check_fits(n, resources, self.cfg.cpus_per_worker, self.gpus_per_worker)
        log.info("label workers: %d (label.workers %s, cluster %g CPUs, %g GPUs)", n, self.cfg.workers,
                 resources.get("CPU", 0.0), resources.get("GPU", 0.0))
        return n

    # -- the run
    def run(self, progress: Optional[Progress] = None,
            on_start: Optional[Callable[[int, int], None]] = None) -> LabelSummary:
        """Label every unfinished image. ``on_start(todo, skipped)`` is called once the shard directory is
        open; ``progress`` after each batch, and for images rejected after being lost too often, with
        ``{"images", "instances", "rejects", "worker"}`` (``images`` + ``rejects`` over a run add up
        to ``todo``; the callback may inspect or even kill workers: the run survives it)."""
        t0 = time.monotonic()
        summary = LabelSummary()
        summary.images_total = self.dataset.images if self.limit is None else min(self.limit, self.dataset.images)
        retry = self.retry_rejects and (True if self.limit is None else
                                        {i for ids in self.dataset.image_ids(self.limit) for i in ids.to_pylist()})
        with ShardWriter(self.out_dir, self.meta, self.cfg.shard_rows, overwrite=self.overwrite,
                         retry_rejects=retry) as writer:
            if writer.removed:
                log.info("removed unfinished files of an interrupted run: %s", ", ".join(writer.removed))
            summary.images_retried = len(writer.retried)
            if writer.retried:
                log.info("retrying %d images rejected by an earlier run", len(writer.retried))
            dataset_rejects = self.dataset.rejects
            for rej in dataset_rejects:
                writer.reject(None, rej.where, rej.problem, "dataset")
            summary.dataset_rejects = len(dataset_rejects)
            shards_before = len(writer.entries)
            self._run_index(writer, summary, progress, on_start)
            summary.shards = len(writer.entries) - shards_before
        summary.seconds = time.monotonic() - t0
        summary.driver_peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return summary
