"""The pseudo-label service: a driver that hands image batches to ``LabelWorker`` Ray actors and streams
their rows into Parquet shards (``pipeline.shards``), exactly once across interruptions.

Workers are named actors ``label-worker-<i>`` in namespace ``pipeline``. The driver holds the dataset and
sends the ``Sample`` objects themselves (boxes, ids and picklable image / depth loaders; the pixels are read
in the worker) in each batch; a worker builds only its teacher, from a picklable factory (constructor
injection: tests pass simple labelers, the CLI passes ``TeacherFactory``), and gets the category names. So
a worker holds no per-dataset index: its memory does not grow with the dataset, and it starts without
reading the annotations. Encoded rows come back.

Scheduling: the remaining samples are cut into batches of ``label.batch_images``; each live worker has at
most ``label.max_inflight`` batches queued, so a slow worker holds back little work and a dead one loses
only its queue. Ray restarts a dead actor (``label.max_restarts``) and re-runs its queued tasks
(``label.max_task_retries``); when Ray gives up on a task the driver re-queues its images one per batch on
the other workers. A batch not back ``label.batch_timeout_s`` after its worker began it (a hung worker) is
cancelled with the batches queued behind it; its images are re-queued one per batch for the other workers
and the hung worker gets no new work until it answers (when no other worker is left to take the work, the
driver restarts the hung one). An image lost ``label.max_attempts`` times (worker deaths and timeouts) is
rejected. The shard writer drops any result for an image already finished, so a re-run or re-issued batch
never writes twice.

Memory: the driver holds the dataset's samples, at most one shard of encoded rows and the batches in
flight; masks are RLE-encoded in the workers. A worker keeps the instance ids of the images its teacher's
memory bank holds objects of (partners are named by position among their image's boxes; the rows need
the dataset's instance ids).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import resource
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import numpy as np
import pyarrow as pa

from .config import Config, LabelConfig, RunConfig
from .datasets.base import Dataset, Sample
from .errors import InputError, PipelineError
from .shards import (BOX_PRIOR, SCHEMA, ShardMeta, ShardWriter, check_resumable, correspondence_records, encode_rle,
                     rows_to_table, sha256_file)

log = logging.getLogger(__name__)

NAMESPACE = "pipeline"

def actor_name(index: int) -> str:
    return f"label-worker-{index}"


# ------------------------------------------------------------------------------------------- teacher

def load_checkpoint(path: str | os.PathLike) -> tuple[Any, str]:
    """Load a teacher checkpoint safely (``weights_only=True``) and build the network it names from the registry
    (``teacher.network``), on the CPU, so a bad file is refused before any worker starts.

    Returns (network, teacher id): the export's weights digest where it records one, else the short sha256 of the
    file. Raises ``PipelineError(path, ...)`` otherwise.
    """
    import torch

    import student  # noqa: F401  (registers the student's network)
    from teacher.network import UnknownNetwork, build_network, known_networks

    path = Path(path)
    if not path.is_file():
        raise PipelineError(path, "checkpoint file not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for foreign or unsafe files
        raise PipelineError(path, f"cannot load checkpoint with weights_only=True "
                                  f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("network"), str):
        raise PipelineError(path, f"checkpoint does not name its network (expected a dict with a 'network' "
                                  f"key; known networks: {', '.join(known_networks())})")
    try:
        network = build_network(ckpt, str(path))
    except UnknownNetwork as exc:
        raise PipelineError(path, f"checkpoint names network {exc.name!r}, which this code does not know "
                                  f"(known networks: {', '.join(known_networks())})") from None
    except ValueError as exc:  # the builder's one-line errors name the file already
        raise PipelineError(path, str(exc).removeprefix(f"{path}: ")) from None
    digest = ckpt.get("digest")
    return network, (str(digest) if isinstance(digest, str) and digest else sha256_file(path)[:12])


def check_network_classes(network: Any, category_ids: list[int], path: str | os.PathLike) -> None:
    """Refuse a network that predicts no mask for some of the dataset's categories (another dataset's teacher)."""
    missing = sorted(set(int(c) for c in category_ids) - set(int(c) for c in network.classes))
    if missing:
        raise PipelineError(path, f"the network predicts classes {sorted(network.classes)[:10]}"
                                  f"{' ...' if len(network.classes) > 10 else ''}; the dataset also has "
                                  f"{missing[:10]}{' ...' if len(missing) > 10 else ''}")


def resolve_device(requested: str) -> str:
    """The teacher device inside a worker: "auto" means the GPU Ray assigned to this actor, if any."""
    if requested != "auto":
        return requested
    import ray

    return "cuda" if ray.is_initialized() and ray.get_gpu_ids() else "cpu"


def resolve_gpus_per_worker(requested: float, cluster_gpus: float, workers: int, device: str = "auto") -> float:
    """GPUs each label worker asks Ray for. ``requested`` >= 0 (``label.gpus_per_worker``) is used as given;
    a negative value means auto: an equal share of the cluster's GPUs, ``min(1, cluster_gpus / workers)``
    (rounded down to Ray's 1e-4 resource unit so the shares fit), and 0 when the cluster has no GPU or the
    teacher is pinned to the CPU (``teacher.device`` "cpu")."""
    if requested >= 0:
        return float(requested)
    if cluster_gpus <= 0 or workers < 1 or device == "cpu":
        return 0.0
    return math.floor(min(1.0, cluster_gpus / workers) * 10_000) / 10_000


def resolve_workers(requested: int | str, resources: Mapping[str, float], cpus_per_worker: float,
                    gpus_per_worker: float, device: str = "auto") -> int:
    """The label worker count: ``requested`` as given, or for "auto" as many as the cluster's CPUs allow at
    ``cpus_per_worker``, and with a GPU teacher (cluster GPUs, ``device`` not "cpu") no more than its GPUs allow
    (one each when ``gpus_per_worker`` is auto). Raises ``PipelineError`` for a count below 1."""
    if requested != "auto":
        if int(requested) < 1:
            raise PipelineError("label.workers", f"must be at least 1 or auto, got {requested}")
        return int(requested)
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    n = int(math.floor(cpus / cpus_per_worker + 1e-9)) if cpus_per_worker > 0 else int(cpus)
    if gpus > 0 and device != "cpu" and gpus_per_worker != 0:
        n = min(n, int(math.floor(gpus / (gpus_per_worker if gpus_per_worker > 0 else 1.0) + 1e-9)))
    if n < 1:
        raise PipelineError("label.workers", f"auto: the Ray cluster has {cpus:g} CPUs and {gpus:g} GPUs, not enough "
                                             f"for one worker at label.cpus_per_worker {cpus_per_worker:g}")
    return n


@dataclass
class TeacherFactory:
    """Builds the structured teacher in a worker: box-prior mode without a checkpoint, else the checkpoint's
    network (``teacher.network`` registry) wrapped by ``StructuredTeacher``. ``checkpoint`` is made absolute here,
    so a relative path works whatever a worker's working directory is."""

    teacher_cfg: Any                       # teacher.config.TeacherConfig
    checkpoint: Optional[str] = None

    def __post_init__(self):
        if self.checkpoint is not None:
            self.checkpoint = os.path.abspath(self.checkpoint)

    def __call__(self, device: str):
        # Imported here: only worker processes build a teacher, the driver never needs torch models.
        from kernels.extension import load_all
        from teacher import StructuredTeacher

        # Load (on a node where the install did not build them: compile) the kernels while the worker starts, so
        # that no labeling batch pays for a build or has to allow for one in label.batch_timeout_s.
        load_all(device)
        cfg = dataclasses.replace(self.teacher_cfg, device=device)
        if self.checkpoint is None:
            return StructuredTeacher.box_prior(cfg)
        network, _ = load_checkpoint(self.checkpoint)
        return StructuredTeacher(network.to(device).eval(), cfg)


def label_digest(cfg: Config, teacher_id: str, round_: int) -> str:
    """Digest of everything that changes the labels: dataset identity, teacher config and weights, round.

    The dataset is identified by its name, split and options; a COCO annotation file by the sha256 of its
    bytes, not its path (edited boxes under the same path give another digest; ``A.json`` and ``./A.json``
    the same one). Worker count, batch sizes, the data root path and the teacher device are left out so a
    run may resume with other resources or after the data moved.
    """
    dataset = dataclasses.asdict(cfg.dataset)
    for key in ("root", "strict"):
        dataset.pop(key)
    if cfg.dataset.name == "toy":
        dataset["toy"].pop("cache_dir")
    else:
        dataset.pop("toy")
    if cfg.dataset.name == "coco":
        try:
            dataset["ann"] = "sha256:" + sha256_file(Path(cfg.dataset.ann))
        except OSError as exc:
            raise PipelineError(cfg.dataset.ann, f"cannot read the annotation file "
                                                 f"({exc.strerror or exc})") from None
    else:
        dataset["ann"] = ""           # only COCO reads an annotation file
    teacher = dataclasses.asdict(cfg.teacher)
    for key in ("device", "network_batch"):  # where and how many images per forward pass: same labels
        teacher.pop(key)
    if teacher_id == BOX_PRIOR:  # without a network these choose nothing
        for key in ("unary", "fusion"):
            teacher.pop(key)
    blob = json.dumps({"dataset": dataset, "teacher": teacher, "teacher_id": teacher_id, "round": round_},
                      sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# -------------------------------------------------------------------------------------- per image

def load_sample(sample: Sample) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """The image (H,W,3) uint8 and depth (H,W) float32 or None of a sample. Raises ``InputError`` when either
    cannot be read or the image does not match the annotation size."""
    image = sample.load_image()
    if image.shape[:2] != (sample.height, sample.width):
        raise InputError(sample.file_name, f"image is {image.shape[1]}x{image.shape[0]}, annotations say "
                                           f"{sample.width}x{sample.height}")
    return image, (sample.load_depth() if sample.has_depth else None)


def sample_rows(sample: Sample, labels: list, category_names: dict[int, str], round_: int, teacher_id: str,
                instance_ids: Optional[Mapping[str, np.ndarray]] = None) -> pa.Table:
    """The teacher's labels of one image as ``SCHEMA`` rows.

    The teacher numbers a partner's instances by position among the boxes it was given; ``instance_ids``
    (image id -> the ``instance_ids`` of the boxes the teacher was given for that image) turns that position
    into the partner's dataset ``instance_id``. A partner image missing from it keeps the position. A label
    list that does not fit the sample is a ``RuntimeError`` (a labeling failure of this image).
    """
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
                correspondence_records(getattr(lab, "correspondences", None) or []), instance_ids or {}),
        })
    return rows_to_table(rows)


def label_images(teacher, loaded: list[tuple[Sample, np.ndarray, Optional[np.ndarray]]]) -> list:
    """The teacher's labels of each (sample, image, depth), or the exception that image failed with. A teacher
    with ``label_batch`` labels them in one call (its network batches the images); others image by image."""
    if hasattr(teacher, "label_batch"):
        return teacher.label_batch([im for _, im, _ in loaded], [s.boxes for s, _, _ in loaded],
                                   [s.classes for s, _, _ in loaded], [d for _, _, d in loaded],
                                   [s.image_id for s, _, _ in loaded], return_exceptions=True)
    out = []
    for sample, image, depth in loaded:
        try:
            out.append(teacher.label(image, sample.boxes, sample.classes, depth=depth, image_id=sample.image_id))
        except Exception as exc:  # noqa: BLE001 - one image's failure is that image's reject
            out.append(exc)
    return out


def _with_instance_ids(records: list[dict], instance_ids: Mapping[str, np.ndarray]) -> list[dict]:
    for rec in records:
        ids = instance_ids.get(rec["partner_image_id"])
        if ids is not None:
            rec["partner_instance_id"] = int(ids[rec["partner_instance_id"]])
    return records


def _bank_image_ids(teacher) -> Optional[set[str]]:
    """Image ids the teacher's memory bank holds objects of (``bank.image_ids()``); None when the teacher has
    no such bank."""
    image_ids = getattr(getattr(teacher, "bank", None), "image_ids", None)
    return {str(i) for i in image_ids()} if callable(image_ids) else None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


# ---------------------------------------------------------------------------------------- the actor

class LabelWorker:
    """A label worker: one teacher (with its memory bank), Ray metrics, and the instance ids of the images
    its bank holds objects of. Samples arrive with each batch; the worker holds no dataset.

    Used as a Ray actor (``ray.remote(LabelWorker)``); the factory is called once per (re)start.
    """

    def __init__(self, index: int, category_names: dict[int, str], teacher_factory: Callable[[str], Any],
                 round_: int, teacher_id: str, device: str = "auto", threads: int = 1):
        from ray.util import metrics

        import torch

        torch.set_num_threads(max(1, threads))
        self.index = index
        self.started = time.monotonic()
        self.busy_s = 0.0
        self.cpu_s = 0.0
        self.images = 0
        self.device = resolve_device(device)
        self.category_names = dict(category_names)
        # image id -> instance ids of the boxes given to the teacher, for the images this worker labeled whose
        # objects may still be bank partners (pruned to the bank's images after each batch when it says).
        self.instance_ids: dict[str, np.ndarray] = {}
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
        return {"index": self.index, "pid": os.getpid(), "device": self.device}

    def label_batch(self, batch_id: int, samples: list[Sample]) -> list[dict]:
        """Label the samples; one result per image: ``{"image_id", "table"}`` for labeled images (plus
        ``"empty"`` describing an image without instances) or ``{"image_id", "file", "reason", "stage"}``
        for rejects. A batch the driver cancelled (it timed out) stops before its next image."""
        import ray

        self.m_batch.set(batch_id)
        t_batch, c_batch = time.monotonic(), time.process_time()
        out = []
        group = max(1, int(getattr(getattr(self.teacher, "config", None), "network_batch", 1)))
        for start in range(0, len(samples), group):
            if ray.get_runtime_context().is_canceled():
                break
            out.extend(self._label_group(samples[start:start + group]))
        in_bank = _bank_image_ids(self.teacher)
        if in_bank is not None:
            self.instance_ids = {k: v for k, v in self.instance_ids.items() if k in in_bank}
        bank = getattr(self.teacher, "bank", None)
        if bank is not None:
            self.m_bank.set(float(sum(bank.fill().values())))
        self.busy_s += time.monotonic() - t_batch
        self.cpu_s += time.process_time() - c_batch
        return out

    def _label_group(self, samples: list[Sample]) -> list[dict]:
        """Results of a few samples labeled together (one network call); rejects stay per image."""
        results: dict[str, dict] = {}
        loaded = []
        for sample in samples:
            # Before the teacher runs: it may push this image's objects into its bank even if labeling fails.
            self.instance_ids[sample.image_id] = np.asarray(sample.instance_ids, np.int32)
            if len(sample.boxes) == 0:
                results[sample.image_id] = self._labeled(sample, SCHEMA.empty_table())
                continue
            try:
                loaded.append((sample, *load_sample(sample)))
            except InputError as exc:
                results[sample.image_id] = {"image_id": sample.image_id, "file": sample.file_name,
                                            "reason": str(exc), "stage": "load"}
        t0 = time.monotonic()
        labels = label_images(self.teacher, loaded) if loaded else []
        per_image = (time.monotonic() - t0) / max(len(loaded), 1)
        for (sample, _, _), lab in zip(loaded, labels):
            try:
                if isinstance(lab, Exception):
                    raise lab
                table = sample_rows(sample, lab, self.category_names, self.round, self.teacher_id,
                                    self.instance_ids)
            except Exception as exc:  # a failure on one image must not stop the batch
                log.warning("label-worker-%d: %s failed:\n%s", self.index, sample.image_id,
                            "".join(traceback.format_exception(exc)))
                results[sample.image_id] = {"image_id": sample.image_id, "file": sample.file_name,
                                            "reason": _one_line(exc), "stage": "label"}
                continue
            self.m_latency.observe(per_image)
            results[sample.image_id] = self._labeled(sample, table)
        return [results[s.image_id] for s in samples if s.image_id in results]

    def _labeled(self, sample: Sample, table: pa.Table) -> dict:
        self.m_images.inc()
        if table.num_rows:
            self.m_instances.inc(table.num_rows)
        self.images += 1
        result = {"image_id": sample.image_id, "table": table}
        if not table.num_rows:
            result["empty"] = {"image_id": sample.image_id, "file_name": sample.file_name,
                               "height": int(sample.height), "width": int(sample.width)}
        return result

    def stats(self) -> dict:
        """Seconds spent labeling (wall and CPU, all threads), seconds alive, images, images whose instance
        ids it keeps, and peak resident memory (MiB) of this worker process."""
        return {"index": self.index, "pid": os.getpid(), "images": self.images, "busy_s": self.busy_s,
                "cpu_s": self.cpu_s, "known_images": len(self.instance_ids),
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
    rejects: int = 0                  # images rejected by this run ("load" and "label" stages)
    dataset_rejects: int = 0          # items the dataset loader rejected ("dataset" stage; every run)
    images_retried: int = 0           # earlier rejects retried by this run (--retry-rejects)
    batches_timed_out: int = 0        # batches re-issued after label.batch_timeout_s
    shards: int = 0                   # shards written by this run
    seconds: float = 0.0
    labeling_seconds: float = 0.0     # from all workers ready to the last result (no startup)
    worker_stats: list[dict] = field(default_factory=list)
    driver_peak_rss_mib: float = 0.0

    def line(self) -> str:
        rate = self.images_labeled / self.seconds if self.seconds > 0 else 0.0
        retried = f" ({self.images_retried} earlier rejects retried)" if self.images_retried else ""
        return (f"labeled {self.images_labeled} images ({self.instances} instances, {rate:.2f} images/s), "
                f"{self.rejects} rejected{retried}, {self.dataset_rejects} rejected by the dataset loader, "
                f"{self.images_skipped} already done, {self.shards} shards written in {self.seconds:.1f} s")


class LabelService:
    """Driver of one labeling run into ``out_dir`` (call ``init_ray`` first).

    ``dataset`` is read in the driver only; its samples travel to the workers in the batches.
    ``retry_rejects``: images an earlier run rejected at the "load" or "label" stage are labeled again
    (their reject lines are dropped; a new failure is recorded again).
    """

    def __init__(self, label_cfg: LabelConfig, out_dir: str | os.PathLike, dataset: Dataset,
                 teacher_factory: Callable[[str], Any], teacher_id: str, config_digest: str, round_: int = 0,
                 device: str = "auto", overwrite: bool = False, limit: Optional[int] = None,
                 strict: bool = False, dataset_name: Optional[str] = None, retry_rejects: bool = False):
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
            dataset=dataset_name or dataset.name, split=dataset.split, data_root=str(Path(dataset.root).resolve()),
            classes=[{"id": int(c.id), "name": c.name} for c in dataset.categories],
            config_digest=config_digest, teacher=teacher_id, round=round_)
        self.workers: list = []
        self.gpus_per_worker = 0.0

    def check_out_dir(self) -> None:
        """Fail before any Ray work when ``out_dir`` holds shards this run must not add to."""
        if not self.overwrite:
            check_resumable(self.out_dir, self.meta)

    # -- actors
    def _start_workers(self) -> list:
        import ray

        if self.cfg.batch_timeout_s <= 0:
            raise PipelineError("label.batch_timeout_s", f"must be positive, got {self.cfg.batch_timeout_s:g}")
        # Actors that do not fit would wait for resources forever: say so instead of hanging.
        resources = ray.cluster_resources()
        n = resolve_workers(self.cfg.workers, resources, self.cfg.cpus_per_worker, self.cfg.gpus_per_worker,
                            self.device)
        log.info("label workers: %d (label.workers %s, cluster %g CPUs, %g GPUs)", n, self.cfg.workers,
                 resources.get("CPU", 0.0), resources.get("GPU", 0.0))
        self.gpus_per_worker = resolve_gpus_per_worker(self.cfg.gpus_per_worker, resources.get("GPU", 0.0), n,
                                                       self.device)
        for kind, per_worker, key in (("CPU", self.cfg.cpus_per_worker, "cpus_per_worker"),
                                      ("GPU", self.gpus_per_worker, "gpus_per_worker")):
            need, have = n * per_worker, resources.get(kind, 0.0)
            if need > have + 1e-9:
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
            log.info("%s: pid %d on %s (%g CPUs, %g GPUs)", actor_name(info["index"]), info["pid"],
                     info["device"], self.cfg.cpus_per_worker, self.gpus_per_worker)
        return actors

    def _create_actor(self, remote, i: int):
        options = dict(name=actor_name(i), namespace=NAMESPACE, num_cpus=self.cfg.cpus_per_worker,
                       num_gpus=self.gpus_per_worker, max_restarts=self.cfg.max_restarts,
                       max_task_retries=self.cfg.max_task_retries)
        deadline = time.monotonic() + 15.0
        while True:
            try:
                return remote.options(**options).remote(
                    i, self.category_names, self.teacher_factory, self.round, self.teacher_id,
                    self.device, max(1, int(self.cfg.cpus_per_worker)))
            except ValueError as exc:
                # The name of a worker from a run that just ended is released asynchronously.
                if "already taken" not in str(exc) or time.monotonic() > deadline:
                    raise PipelineError(actor_name(i), f"actor name taken in namespace {NAMESPACE!r}: is another "
                                                       f"label run using this Ray cluster?") from None
                time.sleep(0.5)

    def _stop_workers(self, hung: set[int] = frozenset()) -> list[dict]:
        """Kill the workers; returns the stats of those that answer (``hung`` ones are not asked: their
        answer would queue behind the batch they are stuck in)."""
        import ray

        stats = []
        if self.workers:
            refs = [a.stats.remote() for i, a in enumerate(self.workers) if i not in hung]
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
        open; ``progress`` after each batch, and for images rejected after being lost too often, with
        ``{"images", "instances", "rejects", "worker", "service"}`` (``images`` + ``rejects`` over a run add up
        to ``todo``; the callback may inspect or even kill workers: the run survives it)."""
        t0 = time.monotonic()
        summary = LabelSummary()
        samples = list(self.dataset)
        if self.limit is not None:
            samples = samples[: self.limit]
        summary.images_total = len(samples)
        retry = {s.image_id for s in samples} if self.retry_rejects else False
        with ShardWriter(self.out_dir, self.meta, self.cfg.shard_rows, overwrite=self.overwrite,
                         retry_rejects=retry) as writer:
            if writer.removed:
                log.info("removed unfinished files of an interrupted run: %s", ", ".join(writer.removed))
            summary.images_retried = len(writer.retried)
            if writer.retried:
                log.info("retrying %d images rejected by an earlier run", len(writer.retried))
            for rej in self.dataset.rejects:
                writer.reject(None, rej.where, rej.problem, "dataset")
            summary.dataset_rejects = len(self.dataset.rejects)
            shards_before = len(writer.entries)
            todo = [s for s in samples if s.image_id not in writer.done]
            summary.images_skipped = len(samples) - len(todo)
            if on_start is not None:
                on_start(len(todo), summary.images_skipped)
            if todo:
                self._start_workers()
                hung: set[int] = set()
                try:
                    t_ready = time.monotonic()
                    scheduler = _Scheduler(self, todo, writer, summary, progress)
                    try:
                        scheduler.run()
                    finally:
                        hung = scheduler.hung()
                    summary.labeling_seconds = time.monotonic() - t_ready
                    writer.flush()
                finally:
                    summary.worker_stats = self._stop_workers(hung)
            summary.shards = len(writer.entries) - shards_before
        summary.seconds = time.monotonic() - t0
        summary.driver_peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return summary

    def _record(self, results: list[dict], writer: ShardWriter, summary: LabelSummary, worker: int,
                progress: Optional[Callable[[dict], None]], rejects_too: bool = True) -> None:
        images = instances = rejects = 0
        for res in results:
            image_id = res["image_id"]
            if "table" in res:
                if writer.add(image_id, res["table"], res.get("empty")):
                    images += 1
                    instances += res["table"].num_rows
            elif rejects_too and not writer.has(image_id):
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


@dataclass
class _Flight:
    """A task in flight on worker ``worker``: a batch of samples, or a ``ready`` probe."""

    worker: int
    kind: str                         # "batch" | "probe"
    batch_id: int = -1
    samples: list = field(default_factory=list)
    started: float = 0.0              # when its worker began it, as the driver sees it; 0 while queued
    stale: bool = False               # timed out: cancelled, its images re-queued; only holds its worker


class _Scheduler:
    """Hands batches of one run to the workers of a ``LabelService`` (module docstring: scheduling)."""

    def __init__(self, service: LabelService, todo: list[Sample], writer: ShardWriter, summary: LabelSummary,
                 progress: Optional[Callable[[dict], None]]):
        self.service = service
        self.cfg = service.cfg
        self.workers = service.workers
        self.writer = writer
        self.summary = summary
        self.progress = progress
        size = max(1, self.cfg.batch_images)
        self.queue: deque[list[Sample]] = deque(todo[i:i + size] for i in range(0, len(todo), size))
        self.attempts: dict[str, int] = {}
        self.inflight: dict[Any, _Flight] = {}
        n = len(self.workers)
        self.pending: list[deque] = [deque() for _ in range(n)]   # each worker's live batch refs, issue order
        self.alive = [True] * n
        self.reprobe_at: dict[int, float] = {}   # worker -> when to ask again whether it is back (restarting)
        self.next_batch = 0

    # Per-worker state read off the flights, so it cannot drift from them.
    def _flights(self, i: int) -> list[_Flight]:
        return [f for f in self.inflight.values() if f.worker == i]

    def _load(self, i: int) -> int:
        """Batches in flight on worker ``i``, timed-out ones included."""
        return sum(f.kind == "batch" for f in self._flights(i))

    def _stalled(self, i: int) -> bool:
        """Worker ``i`` is stuck in a timed-out batch: no new work for it."""
        return any(f.stale for f in self._flights(i))

    def _probing(self, i: int) -> bool:
        """Whether worker ``i`` is being asked if it is back: no work for it until it answers."""
        return i in self.reprobe_at or any(f.kind == "probe" for f in self._flights(i))

    def hung(self) -> set[int]:
        """Workers still stuck in a timed-out batch."""
        return {f.worker for f in self.inflight.values() if f.stale}

    def _free(self, i: int) -> bool:
        return self.alive[i] and not self._probing(i) and not self._stalled(i)

    def run(self) -> None:
        import ray

        # Until every image is finished or rejected: the queue is empty and no live batch is out (probes and
        # timed-out batches left over are not waited for).
        while self.queue or any(f.kind == "batch" and not f.stale for f in self.inflight.values()):
            self._reprobe()
            self._issue()
            if not self.inflight and not self.reprobe_at:
                raise PipelineError("label workers", "all label workers died; finished shards are kept, re-run "
                                                     "the same command to resume")
            if self.queue and not any(self._free(i) or (self.alive[i] and self._probing(i))
                                      for i in range(len(self.workers))):
                self._restart_hung()
            if not self.inflight:             # only restarting workers: ask them again soon
                time.sleep(self._wait_s())
                continue
            ready, _ = ray.wait(list(self.inflight), num_returns=1, timeout=self._wait_s())
            for ref in ready:
                flight = self.inflight.pop(ref)
                if flight.kind == "probe":
                    self._on_probe(ref, flight)
                else:
                    self._on_batch(ref, flight)
            self._check_timeouts()

    def _issue(self) -> None:
        for i, actor in enumerate(self.workers):
            while self._free(i) and self._load(i) < self.cfg.max_inflight and self.queue:
                samples = [s for s in self.queue.popleft() if not self.writer.has(s.image_id)]
                if not samples:
                    continue
                ref = actor.label_batch.remote(self.next_batch, samples)
                started = 0.0 if self.pending[i] else time.monotonic()
                self.inflight[ref] = _Flight(i, "batch", self.next_batch, samples, started)
                self.pending[i].append(ref)
                self.next_batch += 1

    def _probe(self, i: int) -> None:
        """Ask worker ``i`` whether it is back (restarted) or gone for good; no work for it until it answers."""
        if self.alive[i] and not self._probing(i):
            self.inflight[self.workers[i].ready.remote()] = _Flight(i, "probe")

    def _reprobe(self) -> None:
        now = time.monotonic()
        for i, at in list(self.reprobe_at.items()):
            if at <= now:
                del self.reprobe_at[i]
                self.inflight[self.workers[i].ready.remote()] = _Flight(i, "probe")

    def _on_probe(self, ref, flight: _Flight) -> None:
        import ray

        i = flight.worker
        try:
            ray.get(ref)
        except ray.exceptions.ActorUnavailableError:
            # Still restarting (a probe is not retried when label.max_task_retries is 0): ask again soon.
            self.reprobe_at[i] = time.monotonic() + 0.5
            return
        except ray.exceptions.RayActorError as exc:
            self.alive[i] = False
            log.warning("%s is gone for good: %s", actor_name(i), _cause(exc))

    def _on_batch(self, ref, flight: _Flight) -> None:
        import ray

        i = flight.worker
        if flight.stale:
            try:
                results = ray.get(ref)
            except ray.exceptions.TaskCancelledError:
                return
            except ray.exceptions.RayActorError as exc:
                log.warning("%s died in timed-out batch %d: %s", actor_name(i), flight.batch_id, _cause(exc))
                self._probe(i)
                return
            # Finished before the cancel landed: keep what is new. Its rejects are not recorded, the images
            # went back to the queue and their retry decides.
            self.service._record(results, self.writer, self.summary, i, self.progress, rejects_too=False)
            return
        self._started_next(i, ref)
        try:
            results = ray.get(ref)
        except ray.exceptions.RayActorError as exc:
            log.warning("%s lost a batch of %d images (%s); redoing them", actor_name(i), len(flight.samples),
                        _cause(exc))
            self._requeue(flight.samples, "its label worker died", i)
            # Restarting or dead for good? The probe answers once Ray knows.
            self._probe(i)
            return
        self.service._record(results, self.writer, self.summary, i, self.progress)

    def _started_next(self, i: int, ref) -> None:
        """Batch ``ref`` of worker ``i`` is back: the next one queued on the worker starts now."""
        pending = self.pending[i]
        if ref in pending:
            pending.remove(ref)
        if pending and self.inflight[pending[0]].started == 0.0:
            self.inflight[pending[0]].started = time.monotonic()

    def _wait_s(self) -> float:
        """Seconds until the next batch deadline or re-probe (at most 5)."""
        due = [self.inflight[p[0]].started + self.cfg.batch_timeout_s for p in self.pending if p]
        due.extend(self.reprobe_at.values())
        if not due:
            return 5.0
        return min(5.0, max(0.01, min(due) - time.monotonic()))

    def _check_timeouts(self) -> None:
        import ray

        now = time.monotonic()
        for i in range(len(self.workers)):
            if not self.pending[i]:
                continue
            head = self.inflight[self.pending[i][0]]
            if now - head.started < self.cfg.batch_timeout_s:
                continue
            refs = list(self.pending[i])
            self.pending[i].clear()
            queued = [self.inflight[r] for r in refs[1:]]
            behind = f" and the {len(queued)} batch{'es' if len(queued) > 1 else ''} queued behind it" if queued else ""
            log.warning("%s: batch %d (%d images) not back after %.0f s (label.batch_timeout_s); re-issuing its "
                        "images%s to other workers", actor_name(i), head.batch_id, len(head.samples),
                        now - head.started, behind)
            self.summary.batches_timed_out += 1
            for ref in refs:
                ray.cancel(ref)           # a queued batch never runs; the running one stops before its next image
                self.inflight[ref].stale = True
            for flight in reversed(queued):   # never begun: back as they were, not counted as a loss
                self.queue.appendleft(flight.samples)
            self._requeue(head.samples, f"no result within label.batch_timeout_s = {self.cfg.batch_timeout_s:g} s",
                          i)

    def _restart_hung(self) -> None:
        """Work is waiting and every live worker is stuck in a timed-out batch: restart the one stuck longest
        (Ray does not re-run its cancelled batches); the probe says when it is back."""
        import ray

        stuck = [(min(f.started for f in self.inflight.values() if f.stale and f.worker == i), i)
                 for i in range(len(self.workers)) if self.alive[i] and self._stalled(i) and not self._probing(i)]
        if not stuck:
            return
        _, i = min(stuck)
        log.warning("%s is stuck and no other worker is free: restarting it", actor_name(i))
        ray.kill(self.workers[i], no_restart=False)
        # Its cancelled batches die with the process and are not re-run: stop waiting for them.
        for ref in [r for r, f in self.inflight.items() if f.stale and f.worker == i]:
            del self.inflight[ref]
        self._probe(i)

    def _requeue(self, samples: list[Sample], why: str, worker: int) -> None:
        """Samples whose batch was lost: each goes back alone at the head of the queue (so an image that kills
        or hangs workers does not take its batch-mates along), or is rejected once lost ``max_attempts``
        times; rejects reach the progress callback."""
        rejects = 0
        for sample in samples:
            image_id = sample.image_id
            if self.writer.has(image_id):
                continue
            n = self.attempts[image_id] = self.attempts.get(image_id, 0) + 1
            if n >= self.cfg.max_attempts:
                self.writer.reject(image_id, sample.file_name,
                                   f"lost {n} times while labeling it (last time: {why})", "label")
                rejects += 1
            else:
                self.queue.appendleft([sample])
        self.summary.rejects += rejects
        if rejects and self.progress is not None:
            self.progress({"images": 0, "instances": 0, "rejects": rejects, "worker": worker,
                           "service": self.service})


def _cause(exc: BaseException) -> str:
    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:300]
