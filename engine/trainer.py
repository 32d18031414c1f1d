"""The training loop: builds a run from a project, trains it, and reports through callbacks (no Qt)."""
from __future__ import annotations

import contextlib
import math
import random
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch

from engine.backbones import build_model, preprocess_for
from engine.collate import get_collate
from engine.config import ConfigError, ProjectConfig
from engine.data import PreparedData, Progress, prepare_data
from engine.decoded_cache import apply_decoded_cache
from engine.distributed import DistContext, all_reduce_sum, broadcast_buffers, init_from_env, weights_checksum
from engine.feature_cache import FeatureCache
from engine.feature_cache import setup as setup_feature_cache
from engine.freezing import (
    FreezeSummary,
    apply_freeze,
    frozen_batchnorm_modules,
    param_groups,
    set_frozen_batchnorm_eval,
)
from engine.losses import TaskLoss
from engine.machine import auto_device, devices_here
from engine.monitor import MetricTracker
from engine.optim import Schedule, build_optimizer
from engine.samplers import build_loader, describe_plans, plan_loader
from engine.transforms import has_random_steps


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stops instead of training on garbage."""


class DeviceOutOfMemoryError(RuntimeError):
    """The device ran out of memory during a batch; the message names the batch size to lower."""


class PeerProcessError(RuntimeError):
    """Another process of a multi-process run failed or vanished; this one cannot go on without it."""


_PEER_SIGNS = ("connection closed by peer", "connection reset by peer", "remote worker",
               "nccl communicator was aborted")


def is_peer_failure(exc: BaseException) -> bool:
    """An error of the process group (a peer crashed, was killed, or did not answer within the timeout)."""
    dist_error = getattr(torch.distributed, "DistError", None)
    if dist_error is not None and isinstance(exc, dist_error):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(sign in text for sign in _PEER_SIGNS)


def is_out_of_memory(exc: BaseException) -> bool:
    """A CUDA/MPS/CPU allocation failure, whichever way PyTorch raised it."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "not enough memory" in text)


def pick_device(name: str) -> torch.device:
    """'auto' is cuda, then mps, then cpu; an explicit device that is not there is a clear error."""
    here = devices_here()
    if name == "auto":
        return torch.device(auto_device(here))
    if name == "cuda" and not here["cuda"]:
        raise ConfigError(["train.device = 'cuda': no CUDA GPU is available here; use 'auto' or 'cpu'"])
    if name == "mps" and not here["mps"]:
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
    start_epoch: int = 0  # the epoch a resumed run continued after (0 for a fresh run)
    best_epoch: int | None = None  # by checkpoint.monitor
    stopped_early: bool = False  # early stopping ended the run (status is still "completed")
    restored_best_epoch: int | None = None  # early stopping put back this epoch's weights at the end


class Callback:
    """Hooks the trainer calls on its own thread; a GUI bridge turns them into signals."""

    def on_log(self, trainer: Trainer, message: str) -> None: ...
    def on_run_started(self, trainer: Trainer, state: TrainState) -> None: ...
    def on_batch_finished(self, trainer: Trainer, state: TrainState, loss: float) -> None: ...
    def on_epoch_finished(self, trainer: Trainer, state: TrainState, metrics: dict[str, Any]) -> None: ...
    def on_run_finished(self, trainer: Trainer, state: TrainState) -> None: ...  # completed, stopped or failed


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
    channels_last: bool = False  # the model's weights and the 4-D inputs are in channels-last memory format
    dist: DistContext | None = None  # the process group of a multi-process (torchrun) run


def use_channels_last(setting: bool | None, model: torch.nn.Module, device: torch.device) -> bool:
    """train.channels_last: None (auto) is on for CUDA when the model has 2-D convolutions, off elsewhere."""
    if setting is not None:
        return setting
    return device.type == "cuda" and any(isinstance(m, torch.nn.Conv2d) for m in model.modules())


def build_run(cfg: ProjectConfig, *, log: Callable[[str], None] = lambda message: None,
              progress: Progress = None) -> RunParts:
    """Data, model, freezing, loss, optimizer, schedule and loaders for a project, on its device."""
    dist = init_from_env(cfg)
    device = dist.device if dist is not None else pick_device(cfg.train.device)
    if dist is not None:
        log(dist.describe())
    seed_everything(cfg.train.seed)
    pre = preprocess_for(cfg.model, cfg.data)
    data = prepare_data(cfg, pre, progress=progress)
    log(data.summary())
    built = build_model(cfg.model, data.num_outputs, resolve=cfg.resolve, image_size=pre.crop_size)
    log(f"Backbone {cfg.model.backbone}: {built.weights_desc}")
    if built.report is not None and (built.report.missing or built.report.unexpected or built.report.mismatched):
        log(built.report.summary())
    model = built.model
    freeze = apply_freeze(model, cfg.model, built.head_name, freeze_backbone=cfg.optimizer.backbone_lr_mult == 0)
    try:
        loss_fn = TaskLoss(cfg.loss, data.task, data.num_outputs, data.train_counts)
    except ValueError as exc:  # the class count is only known once the data is scanned
        raise ConfigError([str(exc)]) from None
    if freeze.trainable == 0:
        raise ConfigError(["model: every parameter is frozen"
                           + (" (optimizer.backbone_lr_mult = 0 freezes the backbone)"
                              if cfg.optimizer.backbone_lr_mult == 0 else "")
                           + ", so there is nothing to train; keep at least the head trainable "
                           "(model.freeze = 'head_only')"])
    if cfg.distributed.sync_batchnorm:
        if dist is None:
            log("distributed.sync_batchnorm is on, but this run has one process: nothing to synchronise")
        else:  # on CUDA: init_from_env refused it elsewhere
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
            log("BatchNorm statistics are synchronised over every process's batch (SyncBatchNorm)")
    frozen_bn = [] if cfg.model.train_frozen_batchnorm else frozen_batchnorm_modules(model)
    log(f"Parameters: {freeze.total:,} in all, {freeze.trainable:,} trainable, {freeze.frozen:,} frozen")
    model.to(device)
    channels_last = use_channels_last(cfg.train.channels_last, model, device)
    if channels_last:  # NHWC: faster convolutions on tensor cores; state_dict() values keep their shapes
        model.to(memory_format=torch.channels_last)
    loss_fn.to(device)
    groups = param_groups(model, built.head_name, cfg.optimizer.lr, cfg.optimizer.backbone_lr_mult)
    optimizer = build_optimizer(cfg.optimizer, groups)
    cache = apply_decoded_cache(data, cfg, pre, log=log, progress=progress)
    augmented = has_random_steps(cfg.data.augment, train=True)
    plans = [plan_loader(cfg.loader, cached=cache.used, augmented=aug, deterministic=cfg.train.deterministic,
                         device_type=device.type) for aug in (augmented, False)]
    collate = get_collate(cfg.loader.collate)
    train_loader = build_loader(data.train, cfg.loader, train=True,
                                targets=data.train_targets if data.task == "classification" else None,
                                collate_fn=collate, seed=cfg.train.seed, pin_memory=plans[0].pin_memory,
                                plan=plans[0])
    drawn = len(train_loader.batch_sampler.sampler)  # type: ignore[union-attr]  # build_loader sets a batch sampler
    if cfg.loader.batch_size > drawn:
        log(f"loader.batch_size = {cfg.loader.batch_size} is larger than the {drawn} training samples drawn per "
            f"epoch: each epoch trains on one batch of {drawn}")
    val_loader = None
    if data.val is not None and len(data.val) > 0:
        val_loader = build_loader(data.val, cfg.loader, train=False, targets=None, collate_fn=collate,
                                  seed=cfg.train.seed, pin_memory=plans[1].pin_memory, plan=plans[1])
    log(describe_plans(plans[0], plans[1] if val_loader is not None else None))
    schedule = Schedule(cfg.schedule, optimizer, epochs=cfg.train.epochs, steps_per_epoch=len(train_loader),
                        base_lr=cfg.optimizer.lr)
    return RunParts(data, model, built.head_name, built.weights_desc, freeze, frozen_bn, loss_fn, optimizer,
                    schedule, train_loader, val_loader, device, channels_last, dist)


class Trainer:
    """Runs a project's epochs; stop() ends the run within one batch."""

    def __init__(self, cfg: ProjectConfig, callbacks: Iterable[Callback] = (),
                 stop_event: threading.Event | None = None, resume: dict[str, Any] | None = None):
        """resume: a checkpoint (as loaded by engine.checkpoints.load_checkpoint) to continue exactly."""
        self.cfg = cfg
        self.callbacks = list(callbacks)
        self.stop_event = stop_event or threading.Event()
        self.state = TrainState(epochs=cfg.train.epochs)
        self.parts: RunParts | None = None
        self.resume = resume
        self.best = MetricTracker(cfg.checkpoint.monitor, cfg.checkpoint.mode)
        es = cfg.early_stopping
        self.early = MetricTracker(es.monitor, es.mode, es.min_delta) if es.enabled else None
        self._best_weights: dict[str, torch.Tensor] | None = None
        # Set up in run(): when active, epochs train the part after the frozen prefix on cached features.
        self.feature_cache: FeatureCache | None = None
        self._compiled: Any = None  # torch.compile's callable for the training forward (train.compile)
        self._compiled_model: torch.nn.Module | None = None  # the module it compiled
        self._compile_tried = False  # its first batch ran (or failed and the run went back to eager)
        # A multi-process run: the module that trains, wrapped in DistributedDataParallel, and whether the
        # processes agreed to stop (a stop request counts once every process has seen it in the same batch).
        self._ddp: torch.nn.Module | None = None
        self._agreed_stop = False

    @property
    def built(self) -> RunParts:
        """The run's parts, which run() builds first."""
        if self.parts is None:
            raise RuntimeError("the run is not built yet")
        return self.parts

    def stop(self) -> None:
        self.stop_event.set()

    def _stop_requested(self) -> bool:
        """Whether to stop now. Several processes stop together: only when they agreed, at a training batch."""
        if self.parts is not None and self.built.dist is not None:
            return self._agreed_stop
        return self.stop_event.is_set()

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
            state.device = str(self.built.device)
            state.batches_per_epoch = len(self.built.train_loader)
            if self.resume is not None:
                self._restore(self.resume)
            self._first_step = state.global_step
            dist = self.built.dist
            if dist is not None and dist.rank > 0:
                # Same weights everywhere (seeded alike, then DDP broadcasts rank 0's), but each process draws
                # its own augmentation and dropout.
                seed_everything(self.cfg.train.seed + 7919 * dist.rank + state.epoch)
            if self.cfg.train.deterministic:
                torch.use_deterministic_algorithms(True, warn_only=True)
            # Under torchrun a local stop request must not cut one process's feature pass short: the processes
            # agree on stopping at the training batches.
            outcome = setup_feature_cache(self.cfg, self.parts, autocast=self._autocast,
                                          stop_event=self.stop_event if dist is None else None, log=self.log)
            self.feature_cache = outcome.cache
            self.log(outcome.message)
            if dist is not None:
                self._agree_on_feature_cache()
                self._wrap_ddp()
            self._prepare_forward()
            self._fire("on_run_started", state)
            while state.epoch < state.epochs and not self._stop_requested() and not state.stopped_early:
                state.epoch += 1
                metrics = self._run_epoch()
                if metrics is None:
                    state.epoch -= 1  # an epoch cut short by stop() did not finish
                    break
                state.history.append(metrics)
                self._after_epoch(metrics)
                self._fire("on_epoch_finished", state, metrics)
            finished = state.epoch >= state.epochs or state.stopped_early
            state.status = "stopped" if self._stop_requested() and not finished else "completed"
            if state.status == "completed" and self._best_weights is not None and \
                    self.cfg.early_stopping.restore_best and self.early is not None and \
                    self.early.best_epoch != state.epoch:
                self.built.model.load_state_dict(self._best_weights)
                state.restored_best_epoch = self.early.best_epoch
                self.log(f"Restored the weights of epoch {self.early.best_epoch}, the best by "
                         f"{self.early.monitor} ({self.early.best:.4g})")
            if self.built.dist is not None:
                self._check_ranks_agree()
        except BaseException as exc:
            state.status = "failed"
            failure = (self._out_of_memory(exc) if is_out_of_memory(exc) else
                       self._peer_failure(exc) if self.parts is not None and self.built.dist is not None
                       and is_peer_failure(exc) else exc)
            state.error = failure
            self._fire("on_run_finished", state)
            if failure is not exc:
                raise failure from exc
            raise
        finally:
            if self.cfg.train.deterministic:
                torch.use_deterministic_algorithms(False)
        self._fire("on_run_finished", state)
        return state

    def _peer_failure(self, exc: BaseException) -> PeerProcessError:
        dist, state = self.built.dist, self.state
        assert dist is not None  # a peer failure is one of a multi-process run
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        first = re.sub(r"^\[[^\]]*\.(?:cc|cpp|h):\d+\]\s*", "", first).split(". ")[0]  # gloo's source location
        where = f"at epoch {state.epoch}, batch {state.batch}" if state.batch else f"in epoch {state.epoch or 1}"
        saved = (f"epoch {state.history[-1]['epoch']} was the last to finish (its checkpoint is last.pt)"
                 if state.history else "no epoch of this run had finished")
        return PeerProcessError(
            f"rank {dist.rank}: another of the {dist.world_size} processes failed or stopped answering {where} "
            f"({first[:200]}); that process's own error says why (torchrun names the first failure); {saved}")

    def _agree_on_feature_cache(self) -> None:
        """Every process must train the same module: if one could not use the feature cache (its memory bound
        was lower), none does."""
        dist = self.built.dist
        assert dist is not None  # asked only in a multi-process run
        mine = torch.tensor([1.0 if self.feature_cache is not None else 0.0], device=dist.device)
        if all_reduce_sum(mine).item() in (0.0, float(dist.world_size)):
            return
        if self.feature_cache is not None:
            self.feature_cache = None
            self.log("Feature cache off: another process of this run could not use it, and all must train alike")

    def _wrap_ddp(self) -> None:
        """DistributedDataParallel around the module that trains (the model, or the part after the feature
        cache's cut): it broadcasts rank 0's weights and buffers and averages the gradients in backward."""
        from torch.nn.parallel import DistributedDataParallel

        p = self.built
        module = p.model if self.feature_cache is None else self.feature_cache.suffix
        ids = [p.device.index] if p.device.type == "cuda" else None
        self._ddp = DistributedDataParallel(module, device_ids=ids, output_device=ids[0] if ids else None)

    def _check_ranks_agree(self) -> None:
        """At the end of a multi-process run: every process must hold the same weights; say so either way."""
        import torch.distributed as tdist

        dist = self.built.dist
        assert dist is not None  # asked only in a multi-process run
        mine = weights_checksum(self.built.model).to(dist.device)
        high, low = mine.clone(), mine.clone()
        tdist.all_reduce(high, op=tdist.ReduceOp.MAX)
        tdist.all_reduce(low, op=tdist.ReduceOp.MIN)
        if torch.allclose(high, low, rtol=1e-9, atol=0.0):
            self.log(f"All {dist.world_size} processes end with the same weights and buffers (checksum "
                     f"{mine[0].item():.10g})")
        else:
            self.log(f"Warning: the {dist.world_size} processes end with different weights or buffers (checksums "
                     f"{low[0].item():.10g} to {high[0].item():.10g}); rank 0's are saved")

    def _out_of_memory(self, exc: BaseException) -> DeviceOutOfMemoryError:
        """The message for a batch that did not fit on the device: what ran out, where, and what to lower."""
        state, cfg = self.state, self.cfg
        device = self.built.device.type if self.parts is not None else cfg.train.device
        if device == "cuda":
            with contextlib.suppress(Exception):
                torch.cuda.empty_cache()  # the failed batch's blocks go back; the app can start the next run
        size = cfg.loader.batch_size
        where = (f"at epoch {state.epoch}, batch {state.batch}" if state.batch else
                 f"while preparing epoch {state.epoch or 1}" if self.parts is not None else "while building the run")
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        if size > 1:
            advice = (f"Use a smaller batch: lower loader.batch_size (try {max(size // 2, 1)}) or data.image_size "
                      f"(now {cfg.data.image_size})")
        else:
            advice = (f"loader.batch_size is 1 already: lower data.image_size (now {cfg.data.image_size}) "
                      "or choose a smaller backbone")
        saved = (f"epoch {state.history[-1]['epoch']} was the last to finish: resume from its checkpoint (last.pt)"
                 if state.history else "no epoch of this run had finished")
        return DeviceOutOfMemoryError(
            f"the {device} device ran out of memory {where} with loader.batch_size = {size} "
            f"({first[:200]}). {advice}; {saved}")

    def _after_epoch(self, metrics: dict[str, Any]) -> None:
        state = self.state
        metrics["best"] = self.best.update(metrics)
        state.best_epoch = self.best.best_epoch
        if self.early is None:
            return
        if self.early.update(metrics) and self.cfg.early_stopping.restore_best:
            self._best_weights = {k: v.detach().clone() for k, v in self.built.model.state_dict().items()}
        if self.early.epochs_without_improvement >= self.cfg.early_stopping.patience and state.epoch < state.epochs:
            state.stopped_early = True
            self.log(f"Early stopping after epoch {state.epoch}: {self.early.monitor} has not improved for "
                     f"{self.early.epochs_without_improvement} epochs (best {self.early.best:.4g} "
                     f"at epoch {self.early.best_epoch})")

    def training_state(self) -> dict[str, Any]:
        """Everything beyond model and optimizer that an exact resume needs; plain values and tensors only."""
        p = self.built
        np_state = cast(tuple[Any, ...], np.random.get_state())  # the legacy tuple, get_state's default
        py_state = random.getstate()
        return {
            "scheduler_state_dict": p.schedule.state_dict(),
            "scaler_state_dict": self._scaler.state_dict() if self._scaler is not None else None,
            "rng_state": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                          "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                          "cached_gaussian": float(np_state[4])},
                "python": {"version": py_state[0], "state": list(py_state[1]), "gauss_next": py_state[2]},
                "loader": p.train_loader.generator.get_state(),
            },
            "monitors": {"best": self.best.state_dict(),
                         "early_stopping": self.early.state_dict() if self.early else None},
            "best_weights": self._best_weights,
        }

    def _restore(self, ckpt: dict[str, Any]) -> None:
        """Put model, optimizer, schedule, RNGs and history back as they were when ckpt was written."""
        from engine.checkpoints import CheckpointError

        p, state = self.built, self.state
        saved_classes = list(ckpt.get("class_names", []))
        if saved_classes != list(p.data.class_names):
            gone = [c for c in saved_classes if c not in p.data.class_names]
            new = [c for c in p.data.class_names if c not in saved_classes]
            raise CheckpointError(
                "cannot resume: the dataset's classes changed since the checkpoint"
                + (f"; missing now: {', '.join(gone)}" if gone else "")
                + (f"; new: {', '.join(new)}" if new else "")
                + ("" if gone or new else "; same names in another order")
                + ". Start a new run from its weights instead (train --init-from)")
        if ckpt.get("backbone") not in (None, self.cfg.model.backbone):
            raise CheckpointError(f"cannot resume: the checkpoint is a {ckpt['backbone']}, the project builds a "
                                  f"{self.cfg.model.backbone}")
        try:
            p.model.load_state_dict(ckpt["model_state_dict"])
        except RuntimeError as exc:
            raise CheckpointError("cannot resume: the model's architecture differs from the checkpoint's: "
                                  + " ".join(str(exc).split())[:400]) from None
        p.optimizer.load_state_dict(ckpt["optimizer_state_dict"])
        try:
            p.schedule.load_state_dict(ckpt.get("scheduler_state_dict") or {}, epochs=state.epochs)
        except ValueError as exc:
            raise ConfigError([str(exc)]) from None
        if self._scaler is not None and ckpt.get("scaler_state_dict"):
            self._scaler.load_state_dict(ckpt["scaler_state_dict"])
        monitors = ckpt.get("monitors") or {}
        if monitors.get("best"):
            self.best.load_state_dict(monitors["best"])
        if self.early is not None and monitors.get("early_stopping"):
            self.early.load_state_dict(monitors["early_stopping"])
        self._best_weights = ckpt.get("best_weights")
        rng = ckpt.get("rng_state") or {}
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        if rng.get("cuda") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        if "numpy" in rng:
            n = rng["numpy"]
            np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                                 n["cached_gaussian"]))
        if "python" in rng:
            py = rng["python"]
            random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
        if "loader" in rng:
            p.train_loader.generator.set_state(rng["loader"])
        state.epoch = state.start_epoch = int(ckpt["epoch"])
        state.global_step = int(ckpt.get("global_step", 0))
        state.history = [dict(m) for m in ckpt.get("history", [])]
        state.best_epoch = self.best.best_epoch
        self.log(f"Resumed after epoch {state.epoch} (step {state.global_step}); training to epoch {state.epochs}")

    @contextlib.contextmanager
    def _first_batch_guard(self, inputs: torch.Tensor) -> Iterator[None]:
        """A model that cannot take the project's inputs fails on its first batch: say which setting to change."""
        if self.state.global_step != self._first_step:
            yield
            return
        try:
            yield
        except (RuntimeError, ValueError, AssertionError, IndexError) as exc:
            if is_out_of_memory(exc):  # the shape fits, the memory does not: run() names the batch size
                raise
            if self.built.dist is not None and is_peer_failure(exc):  # DDP's forward talks to the others
                raise
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            shape = "x".join(str(d) for d in inputs.shape)
            hint = ("loader.batch_size >= 2 (BatchNorm needs more than one sample per batch)"
                    if "more than 1 value per channel" in first else
                    "data.image_size, data.keep_aspect or the backbone")
            raise ConfigError([f"{self.cfg.model.backbone} cannot train on batches of shape {shape} ({first}); "
                               f"change {hint}"]) from exc

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        precision = self.cfg.train.precision
        device = self.built.device
        if precision == "fp32" or device.type not in ("cuda", "cpu"):
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=torch.float16 if precision == "fp16" else torch.bfloat16)

    def _prepare_forward(self) -> None:
        """train.compile wraps the training forward (the model itself, saved and checkpointed, stays as it is).

        With the feature cache, what trains each batch is the part after the cut (cache.suffix): that is compiled.
        """
        p, t = self.built, self.cfg.train
        auto = " (auto)" if t.channels_last is None else ""
        self.log(f"Precision {t.precision}, channels_last {'on' if p.channels_last else 'off'}{auto}, "
                 f"torch.compile {'on' if t.compile else 'off'}")
        if t.compile and self._compiled is None and not self._compile_tried:
            self._compiled_model = (self._ddp if self._ddp is not None else
                                    p.model if self.feature_cache is None else self.feature_cache.suffix)
            try:
                self._compiled = torch.compile(self._compiled_model)
            except Exception as exc:  # torch.compile itself refuses (an unsupported Python, a missing backend)
                self._compile_failed(exc)

    def _compile_failed(self, exc: BaseException) -> None:
        self._compiled = None
        self._compile_tried = True
        lines = [line for line in str(exc).strip().splitlines() if line.strip()]
        reason = f"{type(exc).__name__}: {lines[0][:300]}" if lines else type(exc).__name__
        self.log(f"torch.compile failed ({reason}); training continues without compiling (eager)")

    def _train_forward(self, model: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        """The training forward of `model`: compiled when train.compile is on and compiling worked."""
        if self._compiled is None or model is not self._compiled_model:
            return model(inputs)
        if self._compile_tried:
            return self._compiled(inputs)
        try:
            # Compile the backward now too (it is otherwise compiled lazily at loss.backward(), out of this try).
            with _eager_backward_lowering():
                outputs = self._compiled(inputs)
        except Exception as exc:  # no C compiler, an operation the compiler does not support, ...
            if self.built.dist is not None and is_peer_failure(exc):
                raise
            self._compile_failed(exc)
            return model(inputs)
        self._compile_tried = True
        return outputs

    def _to_device(self, inputs: torch.Tensor) -> torch.Tensor:
        """A batch's inputs on the run's device, channels-last when the model is (images only: 4-D)."""
        p = self.built
        if p.channels_last and inputs.dim() == 4:
            return inputs.to(p.device, memory_format=torch.channels_last, non_blocking=True)
        return inputs.to(p.device, non_blocking=True)

    def _run_epoch(self) -> dict[str, Any] | None:
        """One pass over the training data and one over the validation data; None if stopped midway."""
        p, state, cfg = self.built, self.state, self.cfg
        started = time.perf_counter()
        cache = self.feature_cache
        model = p.model if cache is None else cache.suffix
        loader = p.train_loader if cache is None else cache.train
        p.model.train()
        if cache is not None:
            model.train()  # the suffix's own copies of the modules above the cut follow too
        set_frozen_batchnorm_eval(p.model, p.frozen_bn)
        scaler = self._scaler
        dist = p.dist
        forward_model = self._ddp if self._ddp is not None else model
        total_loss = 0.0
        local_loss = torch.zeros((), device=p.device, dtype=torch.float64)  # several processes: summed at the end
        seen = 0
        correct = torch.zeros((), device=p.device)  # summed on the device: no extra sync per batch
        sampler = p.train_loader.batch_sampler.sampler  # type: ignore[union-attr]  # build_loader sets a batch sampler
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(state.epoch)
        state.batch = 0
        for batch in loader:
            if self._stop_requested():
                return None
            state.batch += 1
            inputs = self._to_device(batch[0])
            targets = batch[1].to(p.device, non_blocking=True)
            p.optimizer.zero_grad(set_to_none=True)
            with self._autocast(), self._first_batch_guard(inputs):
                outputs = self._train_forward(forward_model, inputs)
                loss = p.loss_fn(outputs, targets)
            if dist is None:
                loss_value = loss.item()
            else:
                # One small all-reduce per batch: the loss averaged over the processes (what is reported and
                # checked for NaN, so every process stops at the same batch) and whether any was asked to stop.
                shared = torch.stack([loss.detach().to(torch.float64),
                                      torch.tensor(float(self.stop_event.is_set()), dtype=torch.float64,
                                                   device=p.device)])
                total, stops = all_reduce_sum(shared).tolist()
                loss_value = total / dist.world_size
                if stops > 0:  # every process leaves here, in the same batch: keep their buffers equal too
                    self._agreed_stop = True
                    broadcast_buffers(p.model)
                    return None
            if not math.isfinite(loss_value):
                # A schedule may have moved the learning rate far from optimizer.lr: say where it was.
                lr_now = float(p.optimizer.param_groups[0]["lr"])
                scheduled = (f"; the {cfg.schedule.name} schedule had it at {lr_now:g} in this batch"
                             if cfg.schedule.name != "none" and not math.isclose(lr_now, cfg.optimizer.lr,
                                                                                 rel_tol=1e-6) else "")
                raise NonFiniteLossError(
                    f"the loss became {loss_value} at epoch {state.epoch}, batch {state.batch}; training stopped. "
                    f"Lower optimizer.lr (now {cfg.optimizer.lr:g}{scheduled}), or set train.grad_clip_norm")
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
            if dist is None:
                total_loss += loss_value * n
            else:
                local_loss += loss.detach().to(torch.float64) * n
            if p.data.task != "regression":
                correct += _correct(outputs.detach(), targets, p.data.task, p.loss_fn.threshold)
            self._fire("on_batch_finished", state, loss_value)
        if dist is not None:  # the epoch's sums over every process; rank 0's BatchNorm statistics everywhere
            broadcast_buffers(p.model)
            sums = all_reduce_sum(torch.stack([local_loss, torch.tensor(float(seen), dtype=torch.float64,
                                                                         device=p.device),
                                               correct.to(torch.float64)]))
            total_loss, seen_all, correct_all = sums.tolist()
            seen = int(round(seen_all))
            correct = torch.tensor(correct_all)
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
        if val is None and self._stop_requested():
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
            use = self.cfg.train.precision == "fp16" and self.built.device.type == "cuda"
            self._grad_scaler = torch.amp.GradScaler("cuda") if use else None
        return self._grad_scaler

    def evaluate_loss(self) -> tuple[float, float | None] | None:
        """(mean loss, accuracy) over the validation set; None when there is none or a stop interrupts it."""
        p = self.built
        if p.val_loader is None:
            return None
        cache = self.feature_cache
        model: torch.nn.Module
        loader: Iterable[Any]
        if cache is None or cache.val is None:
            model, loader = p.model, p.val_loader
        else:
            model, loader = cache.suffix, cache.val
        p.model.eval()
        model.eval()
        total, seen = 0.0, 0
        correct = torch.zeros((), device=p.device)
        dist = p.dist
        with torch.inference_mode():
            for batch in loader:
                if dist is None and self.stop_event.is_set():  # several processes finish it together
                    return None
                inputs = self._to_device(batch[0])
                targets = batch[1].to(p.device, non_blocking=True)
                with self._autocast():
                    outputs = model(inputs)
                    loss = p.loss_fn(outputs, targets)
                n = inputs.shape[0]
                total += loss.item() * n
                seen += n
                if p.data.task != "regression":
                    correct += _correct(outputs, targets, p.data.task, p.loss_fn.threshold)
        if dist is not None:  # each process evaluated its own share: sum the shares
            sums = all_reduce_sum(torch.tensor([total, float(seen), correct.item()], dtype=torch.float64,
                                               device=p.device))
            total, seen_all, correct_all = sums.tolist()
            seen = int(round(seen_all))
            correct = torch.tensor(correct_all)
        if seen == 0:
            return None
        return total / seen, (correct.item() / seen if p.data.task != "regression" else None)


def _eager_backward_lowering() -> contextlib.AbstractContextManager[Any]:
    """While compiling, compile the backward graph with the forward, so that its failure shows at once."""
    try:
        from torch._functorch import config as functorch_config

        return functorch_config.patch(force_non_lazy_backward_lowering=True)
    except Exception:  # a PyTorch without the switch: the backward compiles lazily
        return contextlib.nullcontext()


def _correct(outputs: torch.Tensor, targets: torch.Tensor, task: str, threshold: float) -> torch.Tensor:
    """Correct predictions in a batch: top-1 for classes, the mean of per-label hits for multi-label."""
    if task == "classification":
        return (outputs.argmax(dim=1) == targets).sum()
    return ((outputs > threshold) == (targets > 0.5)).float().mean(dim=1).sum()
