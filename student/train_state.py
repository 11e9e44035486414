"""The training state a checkpoint holds, and where a run's checkpoints are: the Ray Train run ``<out>/train``,
whose newest checkpoint ``latest_checkpoint`` finds and ``check_resumable`` compares with a resumed run's config."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from boxmask_common.errors import UserError, one_line
from boxmask_common.files import load_weights_only

from .config import StudentConfig
from .ema import ModelEMA

RUN_NAME = "train"
STATE_FILE = "state.pt"
META_FILE = "meta.json"
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"   # Ray Train's, in the run folder
# Keys a resumed run may change: how long and how it runs, not what a step computes.
RESUMABLE_KEYS = ("iterations", "checkpoint_every", "keep_checkpoints", "log_every", "max_failures", "loader_workers",
                  "cpus_per_worker", "use_gpu")


def _rng_state() -> dict:
    # Augmentation, proposal sampling and context RoIs all draw from torch's generators (nothing from numpy's or
    # Python's), so these are the whole random state of a step.
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


@dataclass
class TrainState:
    """Everything a resumed run needs to continue bit for bit: the model, optimizer, scheduler, EMA, AMP scaler,
    feature queue and random state (``state.pt``), with the step and the config (``meta.json``)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    ema: ModelEMA
    scaler: torch.amp.GradScaler

    def save(self, folder: Path, iteration: int, cfg: StudentConfig) -> None:
        torch.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(), "ema": self.ema.state_dict(), "iteration": iteration,
                    "scaler": self.scaler.state_dict(), "rng": _rng_state(),
                    "queue": self.model.roi_heads.queue.state_dict()}, folder / STATE_FILE)
        (folder / META_FILE).write_text(json.dumps({"iteration": iteration, "config": dataclasses.asdict(cfg)}))

    def load(self, folder: Path) -> int:
        """Restore from a checkpoint folder; returns its step."""
        state = load_weights_only(folder / STATE_FILE, "training checkpoint")
        self.model.load_state_dict(state["model"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.ema.load_state_dict(state["ema"])
        self.model.roi_heads.queue.load_state_dict(state["queue"])
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"].get("cuda") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        return int(state["iteration"])


def latest_checkpoint(out: str | os.PathLike) -> Path | None:
    """The newest checkpoint folder of the run under ``out``, or None: the one Ray Train registered or, where its
    snapshot is unreadable (`unreadable_snapshot`), the newest complete one on disk."""
    from ray.train import Result
    from ray.train.v2.api.exceptions import RayTrainError

    run = Path(out) / RUN_NAME
    try:
        result = Result.from_path(run)
    except (RuntimeError, OSError):   # no run, or no checkpoint registered yet
        return None
    except (RayTrainError, ValueError):
        return _newest_on_disk(run)
    return Path(result.checkpoint.path) if result.checkpoint is not None else None


def unreadable_snapshot(out: str | os.PathLike) -> Path | None:
    """Ray Train's record of the run's checkpoints under ``out`` where it exists and does not parse, else None.

    Ray rewrites that file in place after every checkpoint, so a run stopped during the write leaves it cut, and
    Ray then refuses to start the run again: `student.train` sets it aside and continues from the folder."""
    snapshot = Path(out) / RUN_NAME / SNAPSHOT_FILE
    try:
        json.loads(snapshot.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return snapshot
    return None


def _newest_on_disk(run: Path) -> Path | None:
    found = []
    for folder in run.glob("checkpoint_*"):
        try:
            iteration = int(json.loads((folder / META_FILE).read_text())["iteration"])
        except (OSError, ValueError, KeyError, TypeError):
            continue   # being written, or cut
        if (folder / STATE_FILE).is_file():
            found.append((iteration, folder.name, folder))
    return max(found)[2] if found else None


def check_resumable(checkpoint: Path, cfg: StudentConfig) -> None:
    """``cfg`` may continue ``checkpoint``'s run: it differs at most in ``RESUMABLE_KEYS``."""
    meta = checkpoint / META_FILE
    try:
        stored = json.loads(meta.read_text())["config"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(meta, f"--resume: unreadable checkpoint metadata ({one_line(exc)})") from None
    now = dataclasses.asdict(cfg)
    diff = sorted(k for k in stored.keys() | now.keys() if k not in RESUMABLE_KEYS and stored.get(k) != now.get(k))
    if diff:
        raise UserError(meta, f"--resume: the checkpoint was trained with another config; differing keys: "
                              f"{', '.join('student.' + k for k in diff)}. Resume with its config, or start a new run")
