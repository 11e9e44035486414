"""Training the student on Ray Train: ``TorchTrainer`` over N workers (DDP: gloo on CPU, nccl on GPU).

``fit(job)`` runs on the driver (inside a Ray session the caller started) and returns the exported files;
``train_loop`` is the per-worker loop:

- data: ``TrainImages`` over the job's samples, a ``DistributedSampler`` with ``set_epoch``, batches of
  ``batch_size / workers`` images per worker; a resumed run skips the batches of the epoch it already did;
- SGD with linear warm-up and step decay; the lr is ``lr`` at ``lr_reference_batch`` images and scales linearly
  with ``batch_size``; AMP on CUDA;
- every step: per-term losses (a non-finite term stops the run on every worker, naming the term and the
  iteration, with the last good checkpoint kept), EMA update;
- every ``checkpoint_every`` iterations and at the end: model, optimizer, scheduler, EMA, feature queue, iteration
  and RNG states through ``ray.train.report(..., checkpoint=...)``; ``FailureConfig(max_failures)`` restarts dead
  workers from the newest one, ``--resume`` continues from it in a new run;
- rank 0 appends per-term losses to ``<out>/train_log.jsonl`` (the driver's progress bar reads it) and at the end
  exports ``student.pt`` and ``teacher.pt`` (the EMA weights) under ``out``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import resource
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .checkpoint import export, warm_start, weights_digest
from .config import StudentConfig
from .data import TrainImages, collate, step_sizes
from .ema import ModelEMA
from .model import StudentError, build_model, first_line
from .pseudo_labels import PseudoLabels

log = logging.getLogger(__name__)

TRAIN_LOG = "train_log.jsonl"
STATE_FILE = "state.pt"
META_FILE = "meta.json"


@dataclass
class TrainJob:
    """Everything a worker needs (pickled to each worker)."""

    cfg: StudentConfig
    samples: Sequence[Any]            # dataset samples (no masks): image_id, boxes, classes, instance_ids, loaders
    classes: list[dict]               # [{id, name}] in label order (label = index + 1)
    out: str                          # run folder: checkpoints, log, exports
    dataset: str = ""
    labels_dir: str = ""              # shard directory of pseudo labels ("" = boxes only)
    init_from: str = ""               # export (student.pt / teacher.pt) whose weights start the run ("" = cfg.weights
                                      # or random init); a resumed run continues from its checkpoint instead
    fault: dict = field(default_factory=dict)  # tests only: {"kill_at": it, "marker": path} / {"nan_at": it, "term": name}


class NonFiniteLoss(StudentError):
    pass


def effective_lr(cfg: StudentConfig) -> float:
    """The linearly scaled learning rate: lr * batch_size / lr_reference_batch."""
    return cfg.lr * cfg.batch_size / cfg.lr_reference_batch


def lr_factor(iteration: int, cfg: StudentConfig) -> float:
    """Multiplier of the effective lr at ``iteration``: linear warm-up from ``warmup_factor``, then x ``gamma`` at
    every step in ``steps`` already passed."""
    decay = cfg.gamma ** sum(iteration >= s for s in cfg.steps)
    if iteration < cfg.warmup_iters:
        alpha = iteration / cfg.warmup_iters
        return decay * (cfg.warmup_factor * (1 - alpha) + alpha)
    return decay


def stretch_schedule(cfg: StudentConfig, iterations: int, keep: Sequence[str] = ()) -> StudentConfig:
    """``cfg`` trained for ``iterations`` steps, with its lr steps and affinity warm-up at the same fractions of the
    run (``keep``: those of ``"steps"`` and ``"objectives.warmup_iters"`` to leave as they are). The lr warm-up and
    the EMA ramp stay in iterations: they are about the first steps from the initial weights, not the run's length
    (as detectron2's longer schedules keep WARMUP_ITERS). Without this a longer toy run would spend most of its steps
    at the decayed lr."""
    if iterations == cfg.iterations:
        return cfg
    f = iterations / cfg.iterations
    objectives = cfg.objectives
    if "objectives.warmup_iters" not in keep:
        objectives = dataclasses.replace(objectives, warmup_iters=round(objectives.warmup_iters * f))
    steps = cfg.steps if "steps" in keep else [round(s * f) for s in cfg.steps]
    return dataclasses.replace(cfg, iterations=iterations, steps=steps, objectives=objectives)


def _rng_state() -> dict:
    # Augmentation, proposal sampling and context RoIs all draw from torch's generators (nothing from numpy's or
    # Python's), so these are the whole random state of a step.
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def _save_state(path: Path, model, optimizer, scheduler, ema: ModelEMA, iteration: int, scaler) -> None:
    model = _unwrap(model)
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "ema": ema.state_dict(), "iteration": iteration,
                "scaler": scaler.state_dict(), "rng": _rng_state(), "queue": model.roi_heads.queue.state_dict()},
               path / STATE_FILE)
    (path / META_FILE).write_text(json.dumps({"iteration": iteration}))


def _load_state(path: Path, model, optimizer, scheduler, ema: ModelEMA, scaler) -> int:
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    if state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    ema.load_state_dict(state["ema"])
    _set_rng_state(state["rng"])
    model.roi_heads.queue.load_state_dict(state["queue"])
    return int(state["iteration"])


def _checkpoints(folder: Path, pattern: str) -> list[tuple[int, Path]]:
    """(iteration, folder) of the finished checkpoints matching ``pattern`` under ``folder``, newest first."""
    found = []
    for meta in folder.glob(f"{pattern}/{META_FILE}"):
        try:
            it = int(json.loads(meta.read_text())["iteration"])
        except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError):
            continue
        if (meta.parent / STATE_FILE).exists():
            found.append((it, meta.parent))
    return sorted(found, key=lambda x: -x[0])


def latest_checkpoint(out: str | os.PathLike) -> Path | None:
    """The newest finished checkpoint folder of any run under ``out`` (by iteration), or None."""
    found = _checkpoints(Path(out), "*/checkpoint_*")
    return found[0][1] if found else None


def _restore(config: dict, run_name: str, model, optimizer, scheduler, ema: ModelEMA, scaler) -> int:
    """Load the newest state this worker should continue from; returns its iteration (0 for a fresh start).

    Candidates: the checkpoint Ray Train hands a restarted worker group, this run's finished checkpoints on disk
    (Ray registers a reported checkpoint asynchronously, so a worker killed just after reporting can leave the
    newest one unregistered), and the ``--resume`` folder the driver found. A candidate that fails to load (a copy
    cut short) is passed over for the next newest.
    """
    import ray.train

    job: TrainJob = config["job"]
    candidates = _checkpoints(Path(job.out) / run_name, "checkpoint_*")
    if config.get("resume_from"):
        candidates += _checkpoints(Path(config["resume_from"]).parent, Path(config["resume_from"]).name)
    registered = ray.train.get_checkpoint()
    with registered.as_directory() if registered is not None else contextlib.nullcontext() as d:
        if d is not None:
            candidates += _checkpoints(Path(d).parent, Path(d).name)
        for it, folder in sorted(candidates, key=lambda x: -x[0]):
            try:
                return _load_state(folder, model, optimizer, scheduler, ema, scaler)
            except (OSError, RuntimeError, EOFError, KeyError, ValueError) as exc:
                log.warning("checkpoint %s (iteration %d) unreadable, trying an older one: %s", folder, it, exc)
    return 0


def _batches(sampler, epoch: int, batch: int, sizes: Sequence[int], seed: int) -> list[list[tuple[int, int]]]:
    """This rank's batches of epoch ``epoch`` as (index, short side) pairs; batch k has the same short side on every
    rank (``student.data.step_sizes``)."""
    sampler.set_epoch(epoch)
    order = list(sampler)
    steps = len(order) // batch
    shorts = step_sizes(steps, sizes, seed * 100_003 + epoch)
    return [[(i, shorts[k]) for i in order[k * batch:(k + 1) * batch]] for k in range(steps)]


def train_loop(config: dict) -> None:
    """The Ray Train worker loop (see the module docstring)."""
    import ray.train
    import ray.train.torch
    from torch.utils.data import DataLoader, DistributedSampler

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
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=effective_lr(cfg), momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, cfg))
    ema = ModelEMA(model, cfg.ema_momentum, cfg.ema_ramp)
    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    iteration = _restore(config, ctx.get_experiment_name(), model, optimizer, scheduler, ema, scaler)
    if rank:
        # Every rank draws its own augmentation and proposal samples (rank 0 keeps the restored RNG state).
        torch.manual_seed(cfg.seed + 1000 * rank + iteration)
    # No BatchNorm buffer broadcast before every forward (as detectron2): it is one more point per step where the
    # ranks wait for each other, and training-mode BatchNorm normalises with batch statistics, so the running
    # statistics each rank keeps change no loss or gradient; rank 0's are the ones exported.
    net = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False) if world > 1 else model

    pseudo = PseudoLabels.from_dir(job.labels_dir) if job.labels_dir else None
    data = TrainImages(job.samples, [c["id"] for c in job.classes], cfg, pseudo)
    per_worker = max(1, cfg.batch_size // world)
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed, drop_last=True)
    per_epoch = len(sampler) // per_worker  # >= 1: fit() refuses a split that cannot fill one batch
    log_path = Path(job.out) / TRAIN_LOG
    model.train()
    stopped = ""
    while iteration < cfg.iterations and not stopped:
        epoch, skip = divmod(iteration, per_epoch)
        batches = _batches(sampler, epoch, per_worker, cfg.min_size, cfg.seed)[skip:]
        loader = DataLoader(data, batch_sampler=batches, collate_fn=collate, num_workers=cfg.loader_workers)
        for images, targets in loader:
            if iteration >= cfg.iterations:
                break
            if job.fault.get("kill_at") == iteration and not os.path.exists(job.fault["marker"]):
                Path(job.fault["marker"]).touch()
                os.kill(os.getpid(), signal.SIGKILL)
            started = time.perf_counter()
            images = [im.to(device) for im in images]
            targets = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
            model.roi_heads.iteration = iteration
            with torch.autocast(device.type, enabled=use_amp):
                losses = net(images, targets)
            if job.fault.get("nan_at") == iteration:
                losses[job.fault["term"]] = losses[job.fault["term"]] * float("nan")
            terms = torch.stack([losses[k].detach().float() for k in sorted(losses)])
            bad = (~torch.isfinite(terms)).float()
            # The flag's all-reduce runs during backward, not before it: a second point where the ranks wait for
            # each other every step costs more than a backward pass wasted on a step that is then dropped.
            flag = torch.distributed.all_reduce(bad, async_op=True) if world > 1 else None
            total = sum(losses.values())
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(total).backward()
            if flag is not None:
                flag.wait()
            if bad.any():
                term = sorted(losses)[int(torch.nonzero(bad)[0])]
                stopped = f"non-finite loss {term} at iteration {iteration}"
                break
            if cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            ema.update(model)
            iteration += 1
            metrics = {"iteration": iteration, "loss": float(terms.sum()), "lr": optimizer.param_groups[0]["lr"],
                       "seconds": time.perf_counter() - started, "time": time.time(), "images": per_worker * world,
                       **{k: float(v) for k, v in zip(sorted(losses), terms)}}
            if rank == 0 and (iteration % cfg.log_every == 0 or iteration == 1 or iteration == cfg.iterations):
                with open(log_path, "a") as f:
                    f.write(json.dumps(metrics) + "\n")
            if iteration % cfg.checkpoint_every == 0 or iteration == cfg.iterations:
                with tempfile.TemporaryDirectory() as tmp:
                    if rank == 0:
                        _save_state(Path(tmp), net, optimizer, scheduler, ema, iteration, scaler)
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp)
                                     if rank == 0 else None)
    if stopped:
        if rank == 0:
            with open(log_path, "a") as f:
                f.write(json.dumps({"error": stopped, "iteration": iteration}) + "\n")
        return
    # Each rank records a digest of its parameters: DDP replicas must agree (a test and a debugging aid).
    replicas = Path(job.out) / "replicas"
    replicas.mkdir(exist_ok=True)
    own = dict(model.named_parameters())
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    (replicas / f"rank-{rank}.json").write_text(json.dumps({"iteration": iteration, "parameters": weights_digest(own),
                                                            "peak_rss_mb": peak_mb, "niceness": os.nice(0)}))
    if rank == 0:
        out = Path(job.out)
        export(out / "student.pt", model.state_dict(), cfg, job.classes, iteration, job.dataset, "student")
        export(out / "teacher.pt", ema.module.state_dict(), cfg, job.classes, iteration, job.dataset, "teacher")


def _read_log(path: Path, offset: int) -> tuple[list[dict], int]:
    try:
        with open(path) as f:
            f.seek(offset)
            text = f.read()
    except FileNotFoundError:
        return [], offset
    lines = text.split("\n")
    done, rest = lines[:-1], lines[-1]
    records = []
    for line in done:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records, offset + len(text) - len(rest)


def use_gpu(cfg: StudentConfig) -> bool:
    if cfg.use_gpu in ("true", "false"):
        return cfg.use_gpu == "true"
    import ray
    return bool(ray.is_initialized() and ray.cluster_resources().get("GPU", 0) >= cfg.workers)


def check_batch_split(cfg: StudentConfig) -> None:
    """Every worker takes the same number of images per step."""
    if cfg.workers < 1 or cfg.batch_size % cfg.workers:
        raise StudentError("student.batch_size", f"{cfg.batch_size} images per step do not split over "
                                                 f"{cfg.workers} workers")


def fit(job: TrainJob, resume: bool = False, progress: Callable[[dict], None] | None = None) -> dict:
    """Train on the connected Ray cluster; returns {"student": path, "teacher": path, "iteration": n}.

    ``progress`` gets each record of the training log (per-term losses) as it appears. Raises ``StudentError``
    for a non-finite loss (naming the term and iteration) or a run that failed past its restarts.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg = job.cfg
    check_batch_split(cfg)
    out = Path(job.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    job.out = os.fspath(out)
    start_from = None
    if resume:
        start_from = latest_checkpoint(out)
        if start_from is None:
            raise StudentError(out, "--resume: no finished checkpoint here")
    if len(job.samples) // cfg.workers < cfg.batch_size // cfg.workers:
        raise StudentError(out, f"{len(job.samples)} training images cannot fill one batch of {cfg.batch_size} "
                                f"over {cfg.workers} workers")
    if job.labels_dir:
        PseudoLabels.from_dir(job.labels_dir)  # a bad shard directory fails here, not in every restarted worker
    if job.init_from:
        warm_start(build_model(cfg, len(job.classes)), job.init_from, job.classes)  # likewise a bad export
    for stale in ("student.pt", "teacher.pt"):
        (out / stale).unlink(missing_ok=True)
    shutil.rmtree(out / "replicas", ignore_errors=True)
    gpu = use_gpu(cfg)
    trainer = TorchTrainer(
        train_loop, train_loop_config={"job": job, "resume_from": os.fspath(start_from) if start_from else ""},
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=RunConfig(name=f"train-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}", storage_path=job.out,
                             # Ray starts workers at nice 15, so any of its own processes preempts a rank at once,
                             # and in lockstep DDP every other rank then waits (bench/RESULTS.md, toy scaling).
                             worker_runtime_env={"env_vars": {"RAY_worker_niceness": "0"}},
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints)))
    log_path = out / TRAIN_LOG
    offset = log_path.stat().st_size if log_path.exists() else 0
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # noqa: BLE001 - re-raised on the calling thread
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    error = ""
    while True:
        thread.join(timeout=1.0)
        records, offset = _read_log(log_path, offset)
        for rec in records:
            if "error" in rec:
                error = rec["error"]
            elif progress is not None:
                progress(rec)
        if not thread.is_alive():
            break
    if error:
        raise NonFiniteLoss(out / TRAIN_LOG, f"{error}; the last good checkpoint is kept (--resume continues "
                                             f"from it)")
    if "error" in outcome:
        exc = outcome["error"]
        raise StudentError(out, f"training failed after {cfg.max_failures} restarts: {first_line(exc)}")
    student, teacher = out / "student.pt", out / "teacher.pt"
    if not teacher.exists():
        raise StudentError(out, "training ended without exporting teacher.pt")
    return {"student": os.fspath(student), "teacher": os.fspath(teacher), "iteration": cfg.iterations}


__all__ = ["TrainJob", "effective_lr", "fit", "latest_checkpoint", "lr_factor", "train_loop"]
