"""Optimizers and learning-rate schedules by name, over the trainable parameter groups."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.optim import lr_scheduler

from engine.config import OptimizerConfig, ScheduleConfig


def build_optimizer(cfg: OptimizerConfig, groups: list[dict]) -> torch.optim.Optimizer:
    """The named optimizer over parameter groups that already carry their own lr."""
    if cfg.name == "sgd":
        momentum = 0.9 if cfg.momentum is None else cfg.momentum
        return torch.optim.SGD(
            groups, lr=cfg.lr, momentum=momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay
        )
    if cfg.name == "adam":
        return torch.optim.Adam(
            groups, lr=cfg.lr, betas=(cfg.betas[0], cfg.betas[1]), eps=cfg.eps, weight_decay=cfg.weight_decay
        )
    if cfg.name == "adamw":
        return torch.optim.AdamW(
            groups, lr=cfg.lr, betas=(cfg.betas[0], cfg.betas[1]), eps=cfg.eps, weight_decay=cfg.weight_decay
        )
    if cfg.name == "rmsprop":
        return torch.optim.RMSprop(
            groups, lr=cfg.lr, alpha=cfg.alpha, eps=cfg.eps, momentum=cfg.momentum or 0.0, weight_decay=cfg.weight_decay
        )
    raise ValueError(f"optimizer.name = {cfg.name!r}: unknown")


class Schedule:
    """A learning-rate schedule and when it steps: per batch (one-cycle), per epoch, or on a metric (plateau)."""

    def __init__(
        self,
        cfg: ScheduleConfig,
        optimizer: torch.optim.Optimizer,
        *,
        epochs: int,
        steps_per_epoch: int,
        base_lr: float,
    ):
        self.name = cfg.name
        self.scheduler: Any  # the one the name picks, or None; its attributes (T_max, total_steps) depend on it
        if cfg.name == "none":
            self.scheduler = None
        elif cfg.name == "step":
            self.scheduler = lr_scheduler.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma)
        elif cfg.name == "cosine":
            self.scheduler = lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs, eta_min=cfg.eta_min)
        elif cfg.name == "onecycle":
            max_lr = cfg.max_lr or base_lr
            # Each group keeps its ratio to the head's lr (the backbone multiplier) at the peak too.
            peaks = [max_lr * g["lr"] / base_lr for g in optimizer.param_groups]
            self.total_steps = epochs * max(1, steps_per_epoch)
            self.scheduler = lr_scheduler.OneCycleLR(
                optimizer, max_lr=peaks, epochs=epochs, steps_per_epoch=max(1, steps_per_epoch), pct_start=cfg.pct_start
            )
        elif cfg.name == "plateau":
            self.scheduler = lr_scheduler.ReduceLROnPlateau(
                optimizer, mode="min", factor=cfg.factor, patience=cfg.patience
            )
        else:
            raise ValueError(f"schedule.name = {cfg.name!r}: unknown")

    def after_batch(self) -> None:
        if self.name == "onecycle":
            self.scheduler.step()

    def after_epoch(self, monitored_loss: float) -> None:
        if self.name in ("step", "cosine"):
            self.scheduler.step()
        elif self.name == "plateau":
            self.scheduler.step(monitored_loss)

    def state_dict(self) -> dict:
        return self.scheduler.state_dict() if self.scheduler is not None else {}

    def load_state_dict(self, state: dict, *, epochs: int | None = None) -> None:
        """Restore a saved schedule; `epochs` is the run's total now, which a resume may have raised."""
        if self.scheduler is None or not state:
            return
        self.scheduler.load_state_dict(state)
        if epochs is None:
            return
        if self.name == "cosine" and self.scheduler.T_max != epochs:
            # A raised total: follow the cosine over the new total from the epochs already done, which
            # also revives a finished run whose lr had reached eta_min.
            sched = self.scheduler
            sched.T_max = epochs
            done = sched.last_epoch
            for group, base in zip(sched.optimizer.param_groups, sched.base_lrs, strict=True):
                group["lr"] = sched.eta_min + (base - sched.eta_min) * (1 + math.cos(math.pi * done / epochs)) / 2
            sched._last_lr = [g["lr"] for g in sched.optimizer.param_groups]
        elif self.name == "onecycle" and self.scheduler.total_steps != self.total_steps:
            raise ValueError(
                f"schedule.name = 'onecycle' runs a fixed number of steps "
                f"({self.scheduler.total_steps}); the run cannot be extended to {self.total_steps}. "
                "Resume with the checkpoint's own number of epochs, or start a new run from its "
                "weights (train --init-from)"
            )
