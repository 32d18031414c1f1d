"""The training loop: builds a run from a project, trains it, and reports through callbacks (no Qt)."""
from __future__ import annotations

import contextlib
import math
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import torch

from engine.backbones import build_model, preprocess_for
from engine.collate import get_collate
from engine.config import ConfigError, ProjectConfig
from engine.data import PreparedData, prepare_data
from engine.freezing import (FreezeSummary, apply_freeze, frozen_batchnorm_modules, param_groups,
                             set_frozen_batchnorm_eval)
from engine.losses import TaskLoss
from engine.optim import Schedule, build_optimizer
from engine.samplers import build_loader


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stops instead of training on garbage."""


def pick_device(name: str) -> torch.device:
    """'auto' is cuda, then mps, then cpu; an explicit device that is not there is a clear error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(["train.device = 'cuda': no CUDA GPU is available here; use 'auto' or 'cpu'"])
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError(["train.device = 'mps': Apple's Metal backend is not available here; use 'auto' or 'cpu'"])
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class TrainState:
    """Where a run is: read by callbacks, never written by them."""

    epochs: int
    epoch: int = 0  # the epoch in progress (1-based); after it ends, the last finished one
    batch: int = 0  # the batch in progress within the epoch (1-based)
    batches_per_epoch: int = 0
    global_step: int = 0
    status: str = "created"  # created, running, completed, stopped, failed
    error: BaseException | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    device: str = "cpu"


class Callback:
    """Hooks the trainer calls on its own thread; a GUI bridge turns them into signals."""

    def on_log(self, trainer: "Trainer", message: str) -> None: ...
    def on_run_started(self, trainer: "Trainer", state: TrainState) -> None: ...
    def on_batch_finished(self, trainer: "Trainer", state: TrainState, loss: float) -> None: ...
    def on_epoch_finished(self, trainer: "Trainer", state: TrainState, metrics: dict[str, Any]) -> None: ...
    def on_run_finished(self, trainer: "Trainer", state: TrainState) -> None: ...  # completed, stopped or failed


@dataclass
class RunParts:
    """Everything built from a project before the first batch."""

    data: PreparedData
    model: torch.nn.Module
    head_name: str
    weights_desc: str
    freeze: FreezeSummary
    frozen_bn: list[str]
    loss_fn: TaskLoss
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    train_loader: torch.utils.data.DataLoader
    val_loader: torch.utils.data.DataLoader | None
    device: torch.device


def build_run(cfg: ProjectConfig, *, log=lambda message: None, progress=None) -> RunParts:
    """Data, model, freezing, loss, optimizer, schedule and loaders for a project, on its device."""
    device = pick_device(cfg.train.device)
    seed_everything(cfg.train.seed)
    pre = preprocess_for(cfg.model, cfg.data)
    data = prepare_data(cfg, pre, progress=progress)
    log(data.summary())
    built = build_model(cfg.model, data.num_outputs, resolve=cfg.resolve, image_size=pre.crop_size)
    log(f"Backbone {cfg.model.backbone}: {built.weights_desc}")
    if built.report is not None and (built.report.missing or built.report.unexpected or built.report.mismatched):
        log(built.report.summary())
    model = built.model
    try:
        freeze = apply_freeze(model, cfg.model, built.head_name)
        loss_fn = TaskLoss(cfg.loss, data.task, data.num_outputs, data.train_counts)
    except ValueError as exc:  # module names and class counts are only known once model and data exist
        raise ConfigError([str(exc)]) from None
    if freeze.trainable == 0:
        raise ConfigError(["model: every parameter is frozen, so there is nothing to train; "
                           "unfreeze at least the head (model.freeze = 'head_only')"])
    frozen_bn = [] if cfg.model.train_frozen_batchnorm else frozen_batchnorm_modules(model)
    log(f"Parameters: {freeze.total:,} in all, {freeze.trainable:,} trainable, {freeze.frozen:,} frozen")
    model.to(device)
    loss_fn.to(device)
    groups = param_groups(model, built.head_name, cfg.optimizer.lr, cfg.optimizer.backbone_lr_mult)
    optimizer = build_optimizer(cfg.optimizer, groups)
    pin = cfg.loader.pin_memory if cfg.loader.pin_memory is not None else device.type == "cuda"
    collate = get_collate(cfg.loader.collate)
    train_loader = build_loader(data.train, cfg.loader, train=True,
                                targets=data.train_targets if data.task == "classification" else None,
                                collate_fn=collate, seed=cfg.train.seed, pin_memory=pin)
    val_loader = None
    if data.val is not None and len(data.val) > 0:
        val_loader = build_loader(data.val, cfg.loader, train=False, targets=None, collate_fn=collate,
                                  seed=cfg.train.seed, pin_memory=pin)
    schedule = Schedule(cfg.schedule, optimizer, epochs=cfg.train.epochs, steps_per_epoch=len(train_loader),
                        base_lr=cfg.optimizer.lr)
    return RunParts(data, model, built.head_name, built.weights_desc, freeze, frozen_bn, loss_fn, optimizer,
                    schedule, train_loader, val_loader, device)


class Trainer:
    """Runs a project's epochs; stop() ends the run within one batch."""

    def __init__(self, cfg: ProjectConfig, callbacks: Iterable[Callback] = (),
                 stop_event: threading.Event | None = None):
        self.cfg = cfg
        self.callbacks = list(callbacks)
        self.stop_event = stop_event or threading.Event()
        self.state = TrainState(epochs=cfg.train.epochs)
        self.parts: RunParts | None = None

    def stop(self) -> None:
        self.stop_event.set()

    def _fire(self, name: str, *args: Any) -> None:
        for cb in self.callbacks:
            getattr(cb, name)(self, *args)

    def log(self, message: str) -> None:
        self._fire("on_log", message)

    def run(self) -> TrainState:
        """Train to the end, to a stop request, or to an error (which is re-raised after callbacks ran)."""
        state = self.state
        state.status = "running"
        try:
            if self.parts is None:
                self.parts = build_run(self.cfg, log=self.log)
            state.device = str(self.parts.device)
            state.batches_per_epoch = len(self.parts.train_loader)
            if self.cfg.train.deterministic:
                torch.use_deterministic_algorithms(True, warn_only=True)
            self._fire("on_run_started", state)
            while state.epoch < state.epochs and not self.stop_event.is_set():
                state.epoch += 1
                metrics = self._run_epoch()
                if metrics is None:
                    state.epoch -= 1  # an epoch cut short by stop() did not finish
                    break
                state.history.append(metrics)
                self._fire("on_epoch_finished", state, metrics)
            state.status = "stopped" if self.stop_event.is_set() and state.epoch < state.epochs else "completed"
        except BaseException as exc:
            state.status = "failed"
            state.error = exc
            self._fire("on_run_finished", state)
            raise
        finally:
            if self.cfg.train.deterministic:
                torch.use_deterministic_algorithms(False)
        self._fire("on_run_finished", state)
        return state

    def _autocast(self):
        precision = self.cfg.train.precision
        device = self.parts.device
        if precision == "fp32" or device.type not in ("cuda", "cpu"):
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=torch.float16 if precision == "fp16" else torch.bfloat16)

    def _run_epoch(self) -> dict[str, Any] | None:
        """One pass over the training data and one over the validation data; None if stopped midway."""
        p, state, cfg = self.parts, self.state, self.cfg
        started = time.perf_counter()
        p.model.train()
        set_frozen_batchnorm_eval(p.model, p.frozen_bn)
        scaler = self._scaler
        total_loss = 0.0
        seen = 0
        correct = torch.zeros((), device=p.device)  # summed on the device: no extra sync per batch
        sampler = p.train_loader.batch_sampler.sampler
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(state.epoch)
        state.batch = 0
        for batch in p.train_loader:
            if self.stop_event.is_set():
                return None
            state.batch += 1
            inputs = batch[0].to(p.device, non_blocking=True)
            targets = batch[1].to(p.device, non_blocking=True)
            p.optimizer.zero_grad(set_to_none=True)
            with self._autocast():
                outputs = p.model(inputs)
                loss = p.loss_fn(outputs, targets)
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise NonFiniteLossError(
                    f"the loss became {loss_value} at epoch {state.epoch}, batch {state.batch}; training stopped. "
                    f"Lower optimizer.lr (now {cfg.optimizer.lr:g}), or set train.grad_clip_norm")
            if scaler is not None:
                scaler.scale(loss).backward()
                if cfg.train.grad_clip_norm:
                    scaler.unscale_(p.optimizer)
                    torch.nn.utils.clip_grad_norm_(p.model.parameters(), cfg.train.grad_clip_norm)
                scaler.step(p.optimizer)
                scaler.update()
            else:
                loss.backward()
                if cfg.train.grad_clip_norm:
                    torch.nn.utils.clip_grad_norm_(p.model.parameters(), cfg.train.grad_clip_norm)
                p.optimizer.step()
            p.schedule.after_batch()
            state.global_step += 1
            n = inputs.shape[0]
            seen += n
            total_loss += loss_value * n
            if p.data.task != "regression":
                correct += _correct(outputs.detach(), targets, p.data.task)
            self._fire("on_batch_finished", state, loss_value)
        train_seconds = time.perf_counter() - started
        if seen == 0:
            raise ConfigError([f"loader.batch_size = {cfg.loader.batch_size}: no training batch was drawn "
                               f"({len(p.data.train)} training samples)"])
        lr = p.optimizer.param_groups[0]["lr"]
        metrics: dict[str, Any] = {
            "epoch": state.epoch,
            "train_loss": total_loss / seen,
            "train_accuracy": correct.item() / seen if p.data.task != "regression" else None,
        }
        val = self.evaluate_loss()
        if val is None and self.stop_event.is_set():
            return None
        metrics["val_loss"], metrics["val_accuracy"] = val if val is not None else (None, None)
        monitored = metrics["val_loss"] if metrics["val_loss"] is not None else metrics["train_loss"]
        p.schedule.after_epoch(monitored)
        metrics.update({
            "lr": lr,
            "epoch_seconds": time.perf_counter() - started,
            "samples_per_second": seen / train_seconds if train_seconds > 0 else None,
        })
        return metrics

    @property
    def _scaler(self) -> torch.amp.GradScaler | None:
        # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none.
        if not hasattr(self, "_grad_scaler"):
            use = self.cfg.train.precision == "fp16" and self.parts.device.type == "cuda"
            self._grad_scaler = torch.amp.GradScaler("cuda") if use else None
        return self._grad_scaler

    def evaluate_loss(self) -> tuple[float, float | None] | None:
        """(mean loss, accuracy) over the validation set; None when there is none or a stop interrupts it."""
        p = self.parts
        if p.val_loader is None:
            return None
        p.model.eval()
        total, seen = 0.0, 0
        correct = torch.zeros((), device=p.device)
        with torch.inference_mode():
            for batch in p.val_loader:
                if self.stop_event.is_set():
                    return None
                inputs = batch[0].to(p.device, non_blocking=True)
                targets = batch[1].to(p.device, non_blocking=True)
                with self._autocast():
                    outputs = p.model(inputs)
                    loss = p.loss_fn(outputs, targets)
                n = inputs.shape[0]
                total += loss.item() * n
                seen += n
                if p.data.task != "regression":
                    correct += _correct(outputs, targets, p.data.task)
        if seen == 0:
            return None
        return total / seen, (correct.item() / seen if p.data.task != "regression" else None)


def _correct(outputs: torch.Tensor, targets: torch.Tensor, task: str) -> torch.Tensor:
    """Correct predictions in a batch: top-1 for classes, the mean of per-label hits for multi-label."""
    if task == "classification":
        return (outputs.argmax(dim=1) == targets).sum()
    return ((outputs > 0) == (targets > 0.5)).float().mean(dim=1).sum()
