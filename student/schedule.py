"""What changes with the training step: the learning rate and the affinity terms' warm-up, and a config's schedule
stretched to another length. Pure functions of the step and the config; the training loop's hooks apply them."""
from __future__ import annotations

import dataclasses
from typing import Sequence

from teacher.affinity import warmup_weight

from .config import StudentConfig

# The loss terms whose weight ramps up over ``objectives.warmup_iters``: the pairwise affinity terms teach shape
# only once the projection term has put the masks roughly inside their boxes (AsyInst, Sec. 4.1).
WARMED_UP_TERMS = ("loss_color", "loss_depth")


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


def loss_scales(iteration: int, cfg: StudentConfig) -> dict[str, float]:
    """The factor of each warmed-up loss term at ``iteration`` (0 at the start, 1 from ``objectives.warmup_iters``
    on); terms not named are used as the heads compute them."""
    factor = warmup_weight(iteration, cfg.objectives.warmup_iters, 1.0)
    return {term: factor for term in WARMED_UP_TERMS}


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
