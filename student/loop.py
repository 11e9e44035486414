"""The training loop: ``Trainer.run_step`` takes one SGD step, and hooks do everything around it (detectron2's
``SimpleTrainer`` and ``HookBase`` are the model).

A step is: next batch -> forward (per-term losses, scaled by ``loss_scales``) -> ``after_forward`` -> backward ->
``after_backward`` -> gradient clip -> optimizer step -> ``after_step``. ``Trainer.iter`` counts the steps taken
before the current one; hooks read it, and everything else they need, from the trainer, so no module learns the
step by an attribute pushed into it. A hook raises to stop the run (the NaN guard does).
"""
from __future__ import annotations

import time
from typing import Callable, Iterator, Sequence

import torch


class HookBase:
    """A training hook; every method is a no-op unless overridden. ``trainer`` is set by ``Trainer``."""

    trainer: "Trainer"

    def before_train(self) -> None:
        pass

    def before_step(self) -> None:
        pass

    def after_forward(self) -> None:
        pass

    def after_backward(self) -> None:
        pass

    def after_step(self) -> None:
        pass

    def after_train(self) -> None:
        """Called once the last step is taken (not when a hook or the step raised)."""


class Trainer:
    """SGD over batches from ``data(start)`` (an iterator of (images, targets) from step ``start`` on).

    ``model``: the module whose ``forward(images, targets)`` returns a dict of scalar losses (a DDP wrapper in a
    distributed run; ``module`` is the bare model the hooks average, save and export). State the hooks read:
    ``iter`` (steps taken before this one), ``max_iter``, ``losses`` (this step's scaled terms), ``seconds`` (this
    step's wall time), ``loss_scales`` (term -> factor, set by a hook before the forward), ``rank`` and ``world``.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 data: Callable[[int], Iterator], hooks: Sequence[HookBase], *, start_iter: int, max_iter: int,
                 device: torch.device, grad_clip: float = 0.0, scaler: torch.amp.GradScaler | None = None,
                 rank: int = 0, world: int = 1):
        self.model, self.optimizer, self.data = model, optimizer, data
        self.module = model.module if hasattr(model, "module") else model
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.iter, self.max_iter = start_iter, max_iter
        self.device, self.grad_clip, self.rank, self.world = device, grad_clip, rank, world
        self.scaler = scaler or torch.amp.GradScaler(device.type, enabled=False)
        self.losses: dict[str, torch.Tensor] = {}
        self.loss_scales: dict[str, float] = {}
        self.seconds = 0.0
        self.hooks = list(hooks)
        for h in self.hooks:
            h.trainer = self

    def call(self, stage: str) -> None:
        for h in self.hooks:
            getattr(h, stage)()

    def train(self) -> int:
        """Steps from ``iter`` (the step it starts at) to ``max_iter``; returns the steps taken in all
        (``max_iter``)."""
        self.call("before_train")
        batches = self.data(self.iter)
        self.module.train()
        while self.iter < self.max_iter:
            self.call("before_step")
            self.run_step(batches)
            self.iter += 1
            self.call("after_step")
        self.call("after_train")
        return self.iter

    def run_step(self, batches: Iterator) -> None:
        images, targets = next(batches)
        started = time.perf_counter()  # the step's compute: data loading is not in it
        images = [im.to(self.device) for im in images]
        targets = [{k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
        with torch.autocast(self.device.type, enabled=self.scaler.is_enabled()):
            losses = self.model(images, targets)
        self.losses = {k: v * self.loss_scales.get(k, 1.0) for k, v in losses.items()}
        self.call("after_forward")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(sum(self.losses.values())).backward()
        self.call("after_backward")
        if self.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.seconds = time.perf_counter() - started
