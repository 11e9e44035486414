"""Exponential moving average of the student's weights: the next round's teacher.

m_t = momentum * (1 - exp(-t / ramp)) at update t (t = 1, 2, ...), so early updates follow the student closely
instead of keeping the random init: with a plain 0.999 a 300-step toy run would still carry 0.999^300 = 74% of
the initial weights. Floating-point parameters and buffers (BatchNorm statistics) are averaged; integer buffers
(BatchNorm's batch counter) are copied.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn


def ema_momentum(update: int, momentum: float, ramp: int) -> float:
    """The momentum of update ``update`` (1-based) with a ramp of ``ramp`` updates (0 = no ramp)."""
    if ramp <= 0:
        return momentum
    return momentum * (1.0 - math.exp(-update / ramp))


class ModelEMA:
    """EMA copy of a model (``.module``, in eval mode, no gradients) with its update count."""

    def __init__(self, model: nn.Module, momentum: float = 0.999, ramp: int = 2000):
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.momentum = momentum
        self.ramp = ramp
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        m = ema_momentum(self.updates, self.momentum, self.ramp)
        current = model.state_dict()
        for name, avg in self.module.state_dict().items():
            value = current[name].detach()
            if avg.dtype.is_floating_point:
                avg.mul_(m).add_(value.to(avg.dtype), alpha=1.0 - m)
            else:
                avg.copy_(value)

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
