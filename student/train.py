"""Training the student on Ray Train: a ``TorchTrainer`` over N workers (DDP: gloo on CPU, nccl on GPU).

``fit(job)`` runs on the driver (inside a Ray session the caller started); ``train_loop`` is each worker's loop,
a ``student.loop.Trainer`` with the hooks of ``student.hooks``:

- data: ``TrainImages`` over the job's samples, a ``DistributedSampler`` with ``set_epoch``, batches of
  ``batch_size / workers`` images per worker; a resumed run skips the batches of the epoch it already did;
- SGD with linear warm-up and step decay (``student.schedule``); AMP on CUDA;
- metrics and checkpoints through ``ray.train.report``; the run is ``<out>/train`` (``RUN_NAME``), so Ray Train's
  own restore continues it: ``FailureConfig(max_failures)`` restarts dead workers from the newest checkpoint
  (``ray.train.get_checkpoint()``), and ``--resume`` starts the same run again, which Ray restores likewise
  (where Ray's snapshot of the run was cut by a stop during its write, from the newest complete folder instead).
  Ray's controller collects reports at its health checks (every 2 s), so a worker that dies within 2 s of a
  checkpoint may restart from the one before: a longer way to the same weights, since a step is deterministic
  given the restored state.
"""
from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from boxmask_common.errors import UserError, one_line

from .checkpoint import warm_start
from .config import StudentConfig
from .data import TrainImages, batch_stream
from .ema import ModelEMA
from .hooks import (AffinityWarmup, EMAUpdate, Export, LRSchedule, NaNGuard, NonFiniteLoss, QueueCommit,
                    RayTrainReport)
from .loop import HookBase, Trainer
from .model import build_model
from .pseudo_labels import PseudoLabels
from .schedule import effective_lr, lr_factor
from .train_state import RUN_NAME, TrainState, check_resumable, latest_checkpoint, unreadable_snapshot

log = logging.getLogger(__name__)


@dataclass
class TrainJob:
    """Everything a worker needs (pickled to each worker)."""

    cfg: StudentConfig
    samples: Sequence[Any]            # dataset samples (no masks): image_id, boxes, classes, instance_ids, loaders
    classes: list[dict]               # [{id, name}] in label order (label = index + 1)
    out: str                          # run folder: the Ray Train run, the exports
    dataset: str = ""
    labels_dir: str = ""              # shard directory of pseudo labels ("" = boxes only)
    init_from: str = ""               # export (student.pt / teacher.pt) whose weights start the run ("" = cfg.weights
                                      # or random init); a resumed run continues from its checkpoint instead
    resume_from: str = ""             # checkpoint folder to continue from when Ray Train holds none (its snapshot
                                      # was unreadable, `_prepare`)
    hooks: list[HookBase] = field(default_factory=list)  # extra hooks (tests: fault injection, replica digests)


def train_loop(config: dict) -> int:
    """The Ray Train worker loop (see the module docstring); returns the steps taken in all."""
    import ray.train
    import ray.train.torch

    job: TrainJob = config["job"]
    cfg = job.cfg
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    model = build_model(cfg, len(job.classes))
    if job.init_from:
        warm_start(model, job.init_from, job.classes)
    model = model.to(device)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=effective_lr(cfg),
                                momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, cfg))
    ema = ModelEMA(model, cfg.ema_momentum, cfg.ema_ramp)
    state = TrainState(model, optimizer, scheduler, ema, torch.amp.GradScaler("cuda", enabled=cfg.amp and
                                                                             device.type == "cuda"))
    checkpoint = ray.train.get_checkpoint()
    start = 0
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            start = state.load(Path(folder))
    elif job.resume_from:
        start = state.load(Path(job.resume_from))
    if rank:
        # Every rank draws its own augmentation and proposal samples (rank 0 keeps the restored RNG state).
        torch.manual_seed(cfg.seed + 1000 * rank + start)
    # No BatchNorm buffer broadcast before every forward (as detectron2): it is one more point per step where the
    # ranks wait for each other, and training-mode BatchNorm normalises with batch statistics, so the running
    # statistics each rank keeps change no loss or gradient; rank 0's are the ones exported.
    net = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False) if world > 1 else model
    data = TrainImages(job.samples, [c["id"] for c in job.classes], cfg,
                       PseudoLabels.from_dir(job.labels_dir) if job.labels_dir else None)
    hooks = [AffinityWarmup(cfg), *job.hooks, NaNGuard(job.out), LRSchedule(scheduler), EMAUpdate(ema),
             QueueCommit(), RayTrainReport(state, cfg), Export(job.out, ema, cfg, job.classes, job.dataset)]
    return Trainer(net, optimizer, batch_stream(data, cfg, rank, world), hooks, start_iter=start,
                   max_iter=cfg.iterations, device=device, grad_clip=cfg.grad_clip, scaler=state.scaler,
                   rank=rank, world=world).train()


def use_gpu(cfg: StudentConfig) -> bool:
    if cfg.use_gpu in ("true", "false"):
        return cfg.use_gpu == "true"
    import ray
    return bool(ray.is_initialized() and ray.cluster_resources().get("GPU", 0) >= cfg.workers)


def check_batch_split(cfg: StudentConfig) -> None:
    """Every worker takes the same number of images per step."""
    if cfg.workers < 1 or cfg.batch_size % cfg.workers:
        raise UserError("student.batch_size", f"{cfg.batch_size} images per step do not split over "
                                              f"{cfg.workers} workers")


def _prepare(job: TrainJob, resume: bool) -> Path:
    """Checks the job on the driver, changing nothing until every check passed; returns the run folder."""
    cfg = job.cfg
    check_batch_split(cfg)
    out = Path(job.out).resolve()
    job.out = os.fspath(out)
    if len(job.samples) // cfg.workers < cfg.batch_size // cfg.workers:
        raise UserError(out, f"{len(job.samples)} training images cannot fill one batch of {cfg.batch_size} "
                             f"over {cfg.workers} workers")
    newest = latest_checkpoint(out)
    if resume:
        if newest is None:
            raise UserError(out, "--resume: no finished checkpoint here")
        check_resumable(newest, cfg)
    elif newest is not None:
        raise UserError(out / RUN_NAME, "holds the checkpoints of an earlier run: --resume continues it; to start "
                                        "over, delete the folder or use another --out")
    if job.labels_dir:
        PseudoLabels.from_dir(job.labels_dir)  # a bad shard directory fails here, not in every restarted worker
    if job.init_from:
        warm_start(build_model(cfg, len(job.classes)), job.init_from, job.classes)  # likewise a bad export
    if not resume:
        shutil.rmtree(out / RUN_NAME, ignore_errors=True)  # no checkpoint in it: a run stopped before its first
    elif (snapshot := unreadable_snapshot(out)) is not None:
        # Ray would refuse to start the run on it; its checkpoints are whole, so the run goes on from the newest.
        snapshot.replace(snapshot.with_name(snapshot.name + ".unreadable"))
        job.resume_from = os.fspath(newest)
        log.warning("%s was cut when the run stopped; set aside, continuing from %s", snapshot, newest.name)
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("student.pt", "teacher.pt"):
        (out / stale).unlink(missing_ok=True)
    return out


def _worker_error(exc: BaseException, max_failures: int) -> UserError:
    """A failed run's error for the user: a worker's own ``UserError`` (a non-finite loss, a bad file) as it is,
    anything else in one line after the restarts it had."""
    for failure in getattr(exc, "worker_failures", {}).values():
        cause = getattr(failure, "_base_exc", failure)  # Ray wraps each worker's exception with its traceback
        if isinstance(cause, UserError):
            return cause
    return UserError("student training", f"failed after {max_failures} restarts: {one_line(exc, last=True)}")


def fit(job: TrainJob, resume: bool = False, progress: Callable[[dict], None] | None = None) -> dict:
    """Train on the connected Ray cluster. Returns ``{"student", "teacher"}`` (the exports' paths),
    ``"iteration"`` (the step reached) and ``"metrics"`` (the last reported ones), both from Ray's ``Result``, and
    ``"history"``: every metrics record rank 0 reported, in order (restarted steps appear again).

    ``progress`` gets each record as Ray Train receives it. Raises ``NonFiniteLoss`` naming the term and the step,
    ``UserError`` for a refused ``resume`` (nothing written) or a run that failed past its restarts.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from .progress import ProgressRelay

    cfg = job.cfg
    out = _prepare(job, resume)
    gpu = use_gpu(cfg)
    relay = ProgressRelay()
    trainer = TorchTrainer(
        train_loop, train_loop_config={"job": job},
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=RunConfig(name=RUN_NAME, storage_path=job.out, callbacks=[relay],
                             # Ray starts workers at nice 15, so any of its own processes preempts a rank at once,
                             # and in lockstep DDP every other rank then waits (bench/NOTEBOOK.md, "Toy scaling").
                             worker_runtime_env={"env_vars": {"RAY_worker_niceness": "0"}},
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints)))
    try:
        result, history = relay.run(trainer.fit, progress)
    except Exception as exc:  # noqa: BLE001 - Ray's TrainingFailedError and its kin
        raise _worker_error(exc, cfg.max_failures) from None
    teacher = out / "teacher.pt"
    if result.error is not None or not teacher.exists():
        raise UserError(out, "training ended without exporting teacher.pt")
    return {"student": os.fspath(out / "student.pt"), "teacher": os.fspath(teacher),
            "iteration": int(result.metrics["iteration"]), "metrics": dict(result.metrics), "history": history}


__all__ = ["TrainJob", "fit", "latest_checkpoint", "train_loop", "NonFiniteLoss", "RUN_NAME"]
