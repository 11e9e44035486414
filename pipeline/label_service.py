"""The pseudo-label service: a driver that hands image batches to ``LabelWorker`` Ray actors and streams
their rows into Parquet shards (``pipeline.shards``), exactly once across interruptions.

Workers are named actors ``label-worker-<i>`` in namespace ``pipeline``. Each builds its own dataset and
teacher from picklable factories (constructor injection: tests pass simple labelers, the CLI passes
``TeacherFactory``), so images never travel through the driver, only image ids out and encoded rows back.

Scheduling: the remaining image ids are cut into batches of ``label.batch_images``; each live worker has at
most ``label.max_inflight`` batches queued, so a slow worker holds back little work and a dead one loses
only its queue. Ray restarts a dead actor (``label.max_restarts``) and re-runs its queued tasks
(``label.max_task_retries``); when Ray gives up on a task the driver re-queues its images one per batch on
the other workers, and rejects an image after ``label.max_attempts`` worker deaths while labeling it. The
shard writer drops any result for an image already finished, so a re-run task never writes twice.

Memory: the driver holds at most one shard of encoded rows plus the batches in flight; masks are
RLE-encoded in the workers.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import resource
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import pyarrow as pa

from .config import Config, DatasetConfig, LabelConfig, RunConfig
from .datasets.base import Dataset, Sample
from .errors import InputError, PipelineError
from .shards import (SCHEMA, ShardMeta, ShardWriter, check_resumable, correspondence_records, encode_rle,
                     rows_to_table)

log = logging.getLogger(__name__)

NAMESPACE = "pipeline"

# Networks a checkpoint may name (``{"network": <name>, "state_dict": ...}``): name -> builder taking the
# loaded checkpoint dict and returning the network object ``StructuredTeacher`` consumes. The student
# package registers its networks here; a checkpoint naming anything else is refused with a clear error.
NETWORK_BUILDERS: dict[str, Callable[[dict], Any]] = {}


def actor_name(index: int) -> str:
    return f"label-worker-{index}"


# ------------------------------------------------------------------------------------------- teacher

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_checkpoint(path: str | os.PathLike) -> tuple[dict, str]:
    """Load a teacher checkpoint safely (``weights_only=True``) and check that it names a known network.

    Returns (checkpoint dict, short sha256 of the file). Raises ``PipelineError(path, ...)`` otherwise.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise PipelineError(path, "checkpoint file not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for foreign or unsafe files
        raise PipelineError(path, f"cannot load checkpoint with weights_only=True "
                                  f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    name = ckpt.get("network") if isinstance(ckpt, dict) else None
    known = ", ".join(sorted(NETWORK_BUILDERS)) or "none yet"
    if not isinstance(name, str):
        raise PipelineError(path, f"checkpoint does not name its network (expected a dict with a 'network' "
                                  f"key; known networks: {known})")
    if name not in NETWORK_BUILDERS:
        raise PipelineError(path, f"checkpoint names network {name!r}, which this code does not know "
                                  f"(known networks: {known})")
    return ckpt, _sha256(path)[:12]


def resolve_device(requested: str) -> str:
    """The teacher device inside a worker: "auto" means the GPU Ray assigned to this actor, if any."""
    if requested != "auto":
        return requested
    import ray

    return "cuda" if ray.is_initialized() and ray.get_gpu_ids() else "cpu"


@dataclass
class TeacherFactory:
    """Builds the structured teacher in a worker: box-prior mode without a checkpoint, else the
    checkpoint's network (``NETWORK_BUILDERS``) wrapped by ``StructuredTeacher``."""

    teacher_cfg: Any                       # teacher.config.TeacherConfig
    checkpoint: Optional[str] = None

    def __call__(self, device: str):
        # Imported here: only worker processes build a teacher, the driver never needs torch models.
        from teacher import StructuredTeacher

        cfg = dataclasses.replace(self.teacher_cfg, device=device)
        if self.checkpoint is None:
            return StructuredTeacher.box_prior(cfg)
        ckpt, _ = load_checkpoint(self.checkpoint)
        network = NETWORK_BUILDERS[ckpt["network"]](ckpt)
        if hasattr(network, "to"):
            network = network.to(device)
        return StructuredTeacher(network, cfg)


@dataclass
class DatasetFactory:
    """Builds the dataset from its config section (in the driver and again in each worker)."""

    dataset_cfg: DatasetConfig

    def __call__(self) -> Dataset:
        from .datasets import build_dataset

        return build_dataset(self.dataset_cfg)


def label_digest(cfg: Config, teacher_id: str, round_: int) -> str:
    """Digest of everything that changes the labels: dataset identity, teacher config and weights, round.

    Worker count, batch sizes, the data root path and the teacher device are left out so a run may resume
    with other resources or after the data moved.
    """
    dataset = dataclasses.asdict(cfg.dataset)
    for key in ("root", "strict"):
        dataset.pop(key)
    if cfg.dataset.name == "toy":
        dataset["toy"].pop("cache_dir")
    else:
        dataset.pop("toy")
    teacher = dataclasses.asdict(cfg.teacher)
    teacher.pop("device")
    blob = json.dumps({"dataset": dataset, "teacher": teacher, "teacher_id": teacher_id, "round": round_},
                      sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# -------------------------------------------------------------------------------------- per image

def label_sample(teacher, sample: Sample, category_names: dict[int, str], round_: int, teacher_id: str,
                 samples: Optional[dict[str, Sample]] = None) -> pa.Table:
    """Label one image: its instance rows as a ``SCHEMA`` table (empty when it has no boxes).

    The teacher numbers a partner's instances by position among the boxes it was given; ``samples`` (image
    id -> Sample) turns that position into the partner's dataset ``instance_id``.

    Raises ``InputError`` when the image or depth cannot be read or does not match the annotation size;
    any other exception is a labeling failure of this image.
    """
    if len(sample.boxes) == 0:
        return SCHEMA.empty_table()
    image = sample.load_image()
    if image.shape[:2] != (sample.height, sample.width):
        raise InputError(sample.file_name, f"image is {image.shape[1]}x{image.shape[0]}, annotations say "
                                           f"{sample.width}x{sample.height}")
    depth = sample.load_depth() if sample.has_depth else None
    labels = teacher.label(image, sample.boxes, sample.classes, depth=depth, image_id=sample.image_id)
    if len(labels) != len(sample.boxes):
        raise RuntimeError(f"teacher returned {len(labels)} labels for {len(sample.boxes)} boxes")
    rows = []
    for k, lab in enumerate(labels):
        mask = np.asarray(lab.mask, bool)
        if mask.shape != (sample.height, sample.width):
            raise RuntimeError(f"teacher mask {k} has shape {mask.shape}, expected {(sample.height, sample.width)}")
        cid = int(sample.classes[k])
        rows.append({
            "image_id": sample.image_id, "file_name": sample.file_name,
            "height": int(sample.height), "width": int(sample.width),
            "instance_id": int(sample.instance_ids[k]), "category_id": cid,
            "category": category_names.get(cid, str(cid)),
            "box": [float(v) for v in sample.boxes[k]], "mask_rle": encode_rle(mask),
            "score": float(np.clip(lab.score, 0.0, 1.0)), "round": round_, "teacher": teacher_id,
            "correspondences": _with_instance_ids(
                correspondence_records(getattr(lab, "correspondences", None) or []), samples or {}),
        })
    return rows_to_table(rows)


def _with_instance_ids(records: list[dict], samples: dict[str, Sample]) -> list[dict]:
    for rec in records:
        partner = samples.get(rec["partner_image_id"])
        if partner is not None:
            rec["partner_instance_id"] = int(partner.instance_ids[rec["partner_instance_id"]])
    return records


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


# ---------------------------------------------------------------------------------------- the actor

class LabelWorker:
    """A label worker: one dataset index, one teacher (with its memory bank), Ray metrics.

    Used as a Ray actor (``ray.remote(LabelWorker)``); the factories are called once per (re)start.
    """

    def __init__(self, index: int, dataset_factory: Callable[[], Dataset],
                 teacher_factory: Callable[[str], Any], round_: int, teacher_id: str,
                 device: str = "auto", threads: int = 1):
        from ray.util import metrics

        import torch

        torch.set_num_threads(max(1, threads))
        self.index = index
        self.started = time.monotonic()
        self.busy_s = 0.0
        self.cpu_s = 0.0
        self.images = 0
        self.device = resolve_device(device)
        dataset = dataset_factory()
        self.samples = {s.image_id: s for s in dataset}
        self.category_names = {c.id: c.name for c in dataset.categories}
        self.teacher = teacher_factory(self.device)
        self.round = round_
        self.teacher_id = teacher_id
        tags = {"worker": str(index)}
        self.m_images = metrics.Counter("boxmask_label_images", "images labeled", tag_keys=("worker",))
        self.m_instances = metrics.Counter("boxmask_label_instances", "instances labeled", tag_keys=("worker",))
        self.m_latency = metrics.Histogram("boxmask_label_image_seconds", "labeling time per image (s)",
                                           boundaries=[0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60],
                                           tag_keys=("worker",))
        self.m_batch = metrics.Gauge("boxmask_label_batch", "batch being labeled", tag_keys=("worker",))
        self.m_bank = metrics.Gauge("boxmask_label_bank_fill", "objects in the memory bank", tag_keys=("worker",))
        for m in (self.m_images, self.m_instances, self.m_latency, self.m_batch, self.m_bank):
            m.set_default_tags(tags)

    def ready(self) -> dict:
        return {"index": self.index, "pid": os.getpid(), "device": self.device, "images": len(self.samples)}

    def label_batch(self, batch_id: int, image_ids: list[str]) -> list[dict]:
        """Label the images; one result per image: ``{"image_id", "table"}`` for labeled images (plus
        ``"empty"`` describing an image without instances) or ``{"image_id", "file", "reason", "stage"}``
        for rejects."""
        self.m_batch.set(batch_id)
        t_batch, c_batch = time.monotonic(), time.process_time()
        out = []
        for image_id in image_ids:
            sample = self.samples.get(image_id)
            if sample is None:
                out.append({"image_id": image_id, "file": "", "reason": "image id not in the worker's dataset",
                            "stage": "load"})
                continue
            t0 = time.monotonic()
            try:
                table = label_sample(self.teacher, sample, self.category_names, self.round, self.teacher_id,
                                     self.samples)
            except InputError as exc:
                out.append({"image_id": image_id, "file": sample.file_name, "reason": str(exc), "stage": "load"})
                continue
            except Exception as exc:  # a failure on one image must not stop the batch
                log.warning("label-worker-%d: %s failed:\n%s", self.index, image_id, traceback.format_exc())
                out.append({"image_id": image_id, "file": sample.file_name, "reason": _one_line(exc),
                            "stage": "label"})
                continue
            self.m_latency.observe(time.monotonic() - t0)
            self.m_images.inc()
            if table.num_rows:
                self.m_instances.inc(table.num_rows)
            self.images += 1
            result = {"image_id": image_id, "table": table}
            if not table.num_rows:
                result["empty"] = {"image_id": image_id, "file_name": sample.file_name,
                                   "height": int(sample.height), "width": int(sample.width)}
            out.append(result)
        bank = getattr(self.teacher, "bank", None)
        if bank is not None:
            self.m_bank.set(float(sum(bank.fill().values())))
        self.busy_s += time.monotonic() - t_batch
        self.cpu_s += time.process_time() - c_batch
        return out

    def stats(self) -> dict:
        """Seconds spent labeling (wall and CPU, all threads), seconds alive, images, and peak resident
        memory (MiB) of this worker process."""
        return {"index": self.index, "pid": os.getpid(), "images": self.images, "busy_s": self.busy_s,
                "cpu_s": self.cpu_s,
                "alive_s": time.monotonic() - self.started,
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


# ------------------------------------------------------------------------------------------- driver

def init_ray(run_cfg: RunConfig, address: Optional[str] = None) -> str:
    """Connect to ``address`` / $RAY_ADDRESS, or start a local cluster with the dashboard on
    ``run.dashboard_host`` (token authentication stays at Ray's default: on). Returns the dashboard URL
    ("" when unknown). Reuses an already initialised Ray."""
    import ray

    if ray.is_initialized():
        return _dashboard_url()
    address = address or run_cfg.address or os.environ.get("RAY_ADDRESS") or None
    try:
        if address:
            ctx = ray.init(address=address, namespace=NAMESPACE, log_to_driver=False)
        else:
            ctx = ray.init(namespace=NAMESPACE, include_dashboard=True, dashboard_host=run_cfg.dashboard_host,
                           log_to_driver=False)
    except ConnectionError as exc:
        raise PipelineError(address or "ray", f"cannot connect to the Ray cluster ({exc})") from None
    url = ctx.dashboard_url or ""
    return url if not url or url.startswith("http") else f"http://{url}"


def _dashboard_url() -> str:
    import ray

    try:
        url = ray._private.worker.get_dashboard_url()
    except Exception:  # no dashboard on this cluster
        return ""
    return url if not url or url.startswith("http") else f"http://{url}"


@dataclass
class LabelSummary:
    images_total: int = 0             # images of the dataset (after --limit)
    images_skipped: int = 0           # finished by an earlier run
    images_labeled: int = 0           # labeled by this run
    instances: int = 0
    rejects: int = 0                  # images rejected by this run
    shards: int = 0                   # shards written by this run
    seconds: float = 0.0
    labeling_seconds: float = 0.0     # from all workers ready to the last result (no startup)
    worker_stats: list[dict] = field(default_factory=list)
    driver_peak_rss_mib: float = 0.0

    def line(self) -> str:
        rate = self.images_labeled / self.seconds if self.seconds > 0 else 0.0
        return (f"labeled {self.images_labeled} images ({self.instances} instances, {rate:.2f} images/s), "
                f"{self.rejects} rejected, {self.images_skipped} already done, {self.shards} shards written "
                f"in {self.seconds:.1f} s")


class LabelService:
    """Driver of one labeling run into ``out_dir`` (call ``init_ray`` first)."""

    def __init__(self, label_cfg: LabelConfig, out_dir: str | os.PathLike, dataset: Dataset,
                 dataset_factory: Callable[[], Dataset], teacher_factory: Callable[[str], Any],
                 teacher_id: str, config_digest: str, round_: int = 0, device: str = "auto",
                 overwrite: bool = False, limit: Optional[int] = None, strict: bool = False,
                 dataset_name: Optional[str] = None):
        self.cfg = label_cfg
        self.out_dir = Path(out_dir)
        self.dataset = dataset
        self.dataset_factory = dataset_factory
        self.teacher_factory = teacher_factory
        self.teacher_id = teacher_id
        self.round = round_
        self.device = device
        self.overwrite = overwrite
        self.limit = limit
        self.strict = strict
        self.meta = ShardMeta(
            dataset=dataset_name or dataset.name, split=dataset.split, data_root=str(Path(dataset.root).resolve()),
            classes=[{"id": int(c.id), "name": c.name} for c in dataset.categories],
            config_digest=config_digest, teacher=teacher_id, round=round_)
        self.workers: list = []

    def check_out_dir(self) -> None:
        """Fail before any Ray work when ``out_dir`` holds shards this run must not add to."""
        if not self.overwrite:
            check_resumable(self.out_dir, self.meta)

    # -- actors
    def _start_workers(self) -> list:
        import ray

        n = self.cfg.workers
        if n < 1:
            raise PipelineError("label.workers", f"must be at least 1, got {n}")
        # Actors that do not fit would wait for resources forever: say so instead of hanging.
        resources = ray.cluster_resources()
        for kind, per_worker, key in (("CPU", self.cfg.cpus_per_worker, "cpus_per_worker"),
                                      ("GPU", self.cfg.gpus_per_worker, "gpus_per_worker")):
            need, have = n * per_worker, resources.get(kind, 0.0)
            if need > have:
                raise PipelineError("label.workers", f"{n} workers x {per_worker:g} {kind}s need {need:g} {kind}s, "
                                                     f"the Ray cluster has {have:g}: lower --workers or label.{key}")
        remote = ray.remote(LabelWorker)
        actors = []
        for i in range(n):
            actors.append(self._create_actor(remote, i))
        self.workers = actors
        try:
            infos = ray.get([a.ready.remote() for a in actors])
        except ray.exceptions.RayActorError as exc:
            raise PipelineError("label worker", f"failed to start: {_cause(exc)}") from None
        for info in infos:
            log.info("%s: pid %d on %s, %d images indexed", actor_name(info["index"]), info["pid"],
                     info["device"], info["images"])
        return actors

    def _create_actor(self, remote, i: int):
        options = dict(name=actor_name(i), namespace=NAMESPACE, num_cpus=self.cfg.cpus_per_worker,
                       num_gpus=self.cfg.gpus_per_worker, max_restarts=self.cfg.max_restarts,
                       max_task_retries=self.cfg.max_task_retries)
        deadline = time.monotonic() + 15.0
        while True:
            try:
                return remote.options(**options).remote(
                    i, self.dataset_factory, self.teacher_factory, self.round, self.teacher_id,
                    self.device, max(1, int(self.cfg.cpus_per_worker)))
            except ValueError as exc:
                # The name of a worker from a run that just ended is released asynchronously.
                if "already taken" not in str(exc) or time.monotonic() > deadline:
                    raise PipelineError(actor_name(i), f"actor name taken in namespace {NAMESPACE!r}: is another "
                                                       f"label run using this Ray cluster?") from None
                time.sleep(0.5)

    def _stop_workers(self) -> list[dict]:
        import ray

        stats = []
        if self.workers:
            refs = [a.stats.remote() for a in self.workers]
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=10.0)
            for ref in ready:
                try:
                    stats.append(ray.get(ref))
                except ray.exceptions.RayError:
                    pass
        for a in self.workers:
            ray.kill(a, no_restart=True)
        self.workers = []
        return sorted(stats, key=lambda s: s["index"])

    # -- the run
    def run(self, progress: Optional[Callable[[dict], None]] = None,
            on_start: Optional[Callable[[int, int], None]] = None) -> LabelSummary:
        """Label every unfinished image. ``on_start(todo, skipped)`` is called once the shard directory is
        open; ``progress`` after each batch with ``{"images", "instances", "rejects", "worker", "service"}``
        (the callback may inspect or even kill workers: the run survives it)."""
        t0 = time.monotonic()
        summary = LabelSummary()
        samples = list(self.dataset)
        if self.limit is not None:
            samples = samples[: self.limit]
        summary.images_total = len(samples)
        with ShardWriter(self.out_dir, self.meta, self.cfg.shard_rows, overwrite=self.overwrite) as writer:
            if writer.removed:
                log.info("removed unfinished files of an interrupted run: %s", ", ".join(writer.removed))
            for rej in self.dataset.rejects:
                writer.reject(None, rej.where, rej.problem, "dataset")
            shards_before = len(writer.entries)
            todo = [s.image_id for s in samples if s.image_id not in writer.done]
            summary.images_skipped = len(samples) - len(todo)
            if on_start is not None:
                on_start(len(todo), summary.images_skipped)
            if todo:
                self._start_workers()
                try:
                    t_ready = time.monotonic()
                    self._schedule(todo, writer, summary, progress)
                    summary.labeling_seconds = time.monotonic() - t_ready
                    writer.flush()
                finally:
                    summary.worker_stats = self._stop_workers()
            summary.shards = len(writer.entries) - shards_before
        summary.seconds = time.monotonic() - t0
        summary.driver_peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return summary

    def _schedule(self, todo: list[str], writer: ShardWriter, summary: LabelSummary,
                  progress: Optional[Callable[[dict], None]]) -> None:
        import ray

        size = max(1, self.cfg.batch_images)
        queue: deque[list[str]] = deque(todo[i:i + size] for i in range(0, len(todo), size))
        attempts: dict[str, int] = {}
        inflight: dict[Any, tuple[int, list[str], str]] = {}    # ref -> (worker, image ids, "batch"|"probe")
        load = [0] * len(self.workers)
        alive = [True] * len(self.workers)
        probing = [False] * len(self.workers)
        batch_id = 0
        while queue or inflight:
            for i, actor in enumerate(self.workers):
                while alive[i] and not probing[i] and load[i] < self.cfg.max_inflight and queue:
                    ids = queue.popleft()
                    inflight[actor.label_batch.remote(batch_id, ids)] = (i, ids, "batch")
                    batch_id += 1
                    load[i] += 1
            if not inflight:
                raise PipelineError("label workers", "all label workers died; finished shards are kept, re-run "
                                                     "the same command to resume")
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=5.0)
            for ref in ready:
                i, ids, kind = inflight.pop(ref)
                if kind == "probe":
                    probing[i] = False
                    try:
                        ray.get(ref)
                    except ray.exceptions.RayActorError as exc:
                        alive[i] = False
                        log.warning("%s is gone for good: %s", actor_name(i), _cause(exc))
                    continue
                load[i] -= 1
                try:
                    results = ray.get(ref)
                except ray.exceptions.RayActorError as exc:
                    log.warning("%s lost a batch of %d images (%s); redoing them", actor_name(i), len(ids),
                                _cause(exc))
                    self._requeue(ids, attempts, queue, writer, summary)
                    if alive[i] and not probing[i]:
                        # Restarting or dead for good? The probe answers once Ray knows.
                        probing[i] = True
                        inflight[self.workers[i].ready.remote()] = (i, [], "probe")
                    continue
                self._record(results, writer, summary, i, progress)

    def _requeue(self, ids: list[str], attempts: dict[str, int], queue: deque, writer: ShardWriter,
                 summary: LabelSummary) -> None:
        for image_id in ids:
            if writer.has(image_id):
                continue
            attempts[image_id] = attempts.get(image_id, 0) + 1
            if attempts[image_id] >= self.cfg.max_attempts:
                sample = self.dataset.get(image_id)
                writer.reject(image_id, sample.file_name,
                              f"label worker died {attempts[image_id]} times while labeling it", "label")
                summary.rejects += 1
            else:
                # Alone in its batch, so an image that kills workers does not take its batch-mates along.
                queue.appendleft([image_id])

    def _record(self, results: list[dict], writer: ShardWriter, summary: LabelSummary, worker: int,
                progress: Optional[Callable[[dict], None]]) -> None:
        images = instances = rejects = 0
        for res in results:
            image_id = res["image_id"]
            if "table" in res:
                if writer.add(image_id, res["table"], res.get("empty")):
                    images += 1
                    instances += res["table"].num_rows
            elif not writer.has(image_id):
                writer.reject(image_id, res["file"], res["reason"], res["stage"])
                rejects += 1
                if self.strict:
                    raise PipelineError(res["file"] or image_id, f"{res['reason']} (--strict stops at the first "
                                                                  f"bad input)")
        summary.images_labeled += images
        summary.instances += instances
        summary.rejects += rejects
        if progress is not None:
            progress({"images": images, "instances": instances, "rejects": rejects, "worker": worker,
                      "service": self})


def _cause(exc: BaseException) -> str:
    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:300]
