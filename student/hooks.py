"""The hooks of the student's training loop (``student.loop``), in the order ``student.train`` installs them:

- ``AffinityWarmup``: the affinity terms' weights for this step (``student.schedule.loss_scales``);
- ``NaNGuard``: a non-finite loss term stops the run on every rank, naming the term and the step;
- ``LRSchedule``, ``EMAUpdate``, ``QueueCommit``: the scheduler, the EMA teacher and the feature queue follow each
  step taken;
- ``RayTrainReport``: metrics through ``ray.train.report`` every ``log_every`` steps, with a checkpoint of the
  training state every ``checkpoint_every`` steps and at the end;
- ``Export``: ``student.pt`` and ``teacher.pt`` (the EMA weights) when the last step is taken.
"""
from __future__ import annotations

import resource
import tempfile
import time
from pathlib import Path

import torch

from boxmask_common.errors import UserError

from .checkpoint import export
from .config import StudentConfig
from .ema import ModelEMA
from .loop import HookBase
from .schedule import loss_scales
from .train_state import TrainState

class NonFiniteLoss(UserError):
    """A loss term became NaN or infinite; ``where`` is the run folder, whose last good checkpoint is kept."""


class AffinityWarmup(HookBase):
    def __init__(self, cfg: StudentConfig):
        self.cfg = cfg

    def before_step(self) -> None:
        self.trainer.loss_scales = loss_scales(self.trainer.iter, self.cfg)


class NaNGuard(HookBase):
    """Every rank checks every term of the step; the flags are summed over the ranks (while backward runs: a second
    point per step where the ranks wait for each other costs more than a backward wasted on a dropped step), and
    a bad term raises ``NonFiniteLoss`` on every rank before the optimizer steps. Ray Train then restarts from the
    last checkpoint, up to ``max_failures`` times: a transient overflow is survived, a NaN that comes back ends
    the run with this error."""

    def __init__(self, out: str):
        self.out = out
        self._flags = self._pending = None

    def after_forward(self) -> None:
        t = self.trainer
        self._flags = torch.stack([(~torch.isfinite(t.losses[k].detach().float())).float() for k in sorted(t.losses)])
        self._pending = (torch.distributed.all_reduce(self._flags, async_op=True) if t.world > 1 else None)

    def after_backward(self) -> None:
        if self._pending is not None:
            self._pending.wait()
        if self._flags.any():
            term = sorted(self.trainer.losses)[int(torch.nonzero(self._flags)[0])]
            raise NonFiniteLoss(self.out, f"non-finite loss {term} at iteration {self.trainer.iter}; the last good "
                                          f"checkpoint is kept (--resume continues from it)")


class LRSchedule(HookBase):
    def __init__(self, scheduler):
        self.scheduler = scheduler

    def after_step(self) -> None:
        self.scheduler.step()


class EMAUpdate(HookBase):
    def __init__(self, ema: ModelEMA):
        self.ema = ema

    def after_step(self) -> None:
        self.ema.update(self.trainer.module)


class QueueCommit(HookBase):
    def after_step(self) -> None:
        self.trainer.module.roi_heads.queue.commit()


class RayTrainReport(HookBase):
    """Every rank calls ``ray.train.report`` at the same steps (it is a collective): the step's metrics every
    ``log_every`` steps and at the first and last, and rank 0's checkpoint of ``state`` every ``checkpoint_every``
    steps and at the last. Metrics: iteration, loss (the sum), each term, lr, seconds (the step's compute),
    images per step, time, and the rank's peak RSS."""

    def __init__(self, state: TrainState, cfg: StudentConfig):
        self.state, self.cfg = state, cfg

    def metrics(self) -> dict:
        t = self.trainer
        terms = {k: float(v.detach()) for k, v in sorted(t.losses.items())}
        return {"iteration": t.iter, "loss": sum(terms.values()), **terms,
                "lr": t.optimizer.param_groups[0]["lr"], "seconds": t.seconds, "images": self.cfg.batch_size,
                "time": time.time(), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}

    def after_step(self) -> None:
        import ray.train

        it, cfg = self.trainer.iter, self.cfg
        if it == self.trainer.max_iter or it % cfg.checkpoint_every == 0:
            self._report_with_checkpoint(it)
        elif it % cfg.log_every == 0 or it == 1:
            ray.train.report(self.metrics())

    def _report_with_checkpoint(self, it: int) -> None:
        import ray.train

        with tempfile.TemporaryDirectory() as tmp:
            if self.trainer.rank == 0:
                self.state.save(Path(tmp), it, self.cfg)
            ray.train.report(self.metrics(),
                             checkpoint=ray.train.Checkpoint.from_directory(tmp) if self.trainer.rank == 0 else None)


class Export(HookBase):
    """Rank 0 writes ``student.pt`` (the trained weights) and ``teacher.pt`` (their EMA) under ``out``."""

    def __init__(self, out: str, ema: ModelEMA, cfg: StudentConfig, classes: list[dict], dataset: str):
        self.out, self.ema, self.cfg, self.classes, self.dataset = Path(out), ema, cfg, classes, dataset

    def after_train(self) -> None:
        t = self.trainer
        if t.rank == 0:
            for name, module in (("student", t.module), ("teacher", self.ema.module)):
                export(self.out / f"{name}.pt", module.state_dict(), self.cfg, self.classes, t.iter, self.dataset,
                       name)
