"""Training hooks that only tests install (``TrainJob.hooks``): a worker killed once, a loss term made NaN, and a
digest of each rank's parameters. The tests pickle this module by value, so Ray workers need not import it."""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from student.checkpoint import weights_digest
from student.loop import HookBase


class KillOnce(HookBase):
    """SIGKILL the worker before step ``at`` the first time (``marker`` remembers it across the restart), ``wait``
    seconds after reaching it. Ray Train's controller collects reports at its health checks (every 2 s), so a worker
    killed sooner after a checkpoint may restart from the one before; the wait makes the test deterministic."""

    def __init__(self, at: int, marker: str, wait: float = 5.0):
        self.at, self.marker, self.wait = at, marker, wait

    def before_step(self) -> None:
        if self.trainer.iter == self.at and not os.path.exists(self.marker):
            Path(self.marker).touch()
            time.sleep(self.wait)
            os.kill(os.getpid(), signal.SIGKILL)


class InjectNaN(HookBase):
    """Make loss ``term`` NaN at step ``at`` (every time the step runs)."""

    def __init__(self, at: int, term: str):
        self.at, self.term = at, term

    def after_forward(self) -> None:
        t = self.trainer
        if t.iter == self.at:
            t.losses[self.term] = t.losses[self.term] * float("nan")


class ReplicaDigest(HookBase):
    """Each rank writes ``<out>/replicas/rank-<r>.json``: its step, a digest of its parameters, its niceness."""

    def __init__(self, out: str):
        self.out = Path(out)

    def after_train(self) -> None:
        t = self.trainer
        folder = self.out / "replicas"
        folder.mkdir(parents=True, exist_ok=True)
        record = {"iteration": t.iter, "parameters": weights_digest(dict(t.module.named_parameters())),
                  "niceness": os.nice(0)}
        (folder / f"rank-{t.rank}.json").write_text(json.dumps(record))
