"""The training loop: builds a run from a project, trains it, and reports through callbacks (no Qt)."""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from engine import rng_state
from engine.backbones import build_model, preprocess_for
from engine.checkpoints import CheckpointError
from engine.collate import get_collate
from engine.config import ConfigError, LoaderConfig, ProjectConfig
from engine.data import PreparedData, Progress, prepare_data
from engine.decoded_cache import apply_decoded_cache
from engine.distributed import DistContext, init_from_env
from engine.events import DATA_PROGRESS, FEATURE_PASS_PROGRESS
from engine.failures import (
    is_out_of_memory,
    non_finite_loss,
    out_of_memory,
)
from engine.feature_cache import FeatureCache, NextPhase
from engine.feature_cache import setup as setup_feature_cache
from engine.forward import Forward
from engine.freezing import (
    FreezeSummary,
    apply_freeze,
    frozen_batchnorm_modules,
    param_groups,
    set_frozen_batchnorm_eval,
)
from engine.image_scan import ProgressLine
from engine.losses import TaskLoss
from engine.machine import auto_device, devices_here
from engine.monitor import MetricTracker
from engine.optim import Schedule, build_optimizer
from engine.phases import Phase, phase_at, plan_phases, planned_epochs
from engine.rng_state import seed_everything
from engine.sample_failures import FailureLog, ReportingCollate, batch_failures, describe
from engine.samplers import LoaderPlan, build_loader, describe_plans, plan_loader, restart_workers
from engine.strategy import OneProcess, Processes
from engine.transforms import has_random_steps, unaugmented_train_transform
from engine.webdataset_data import ShardStream, prepare_webdataset, stream_loader


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
    phase: int = 0  # the phase in progress (0-based; a run without train.phases has one)
    phase_starts: list[int] = field(default_factory=lambda: [0])  # epochs finished before each begun phase
    # Image files that could not be read while training (changed since the scan): {"path", "reason", "split"}
    unreadable: list[dict[str, str]] = field(default_factory=list)


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
    # The training set's pipeline with the project's augmentation (True) and without (False): phases switch.
    train_transforms: dict[bool, Any] = field(default_factory=dict)


def use_channels_last(setting: bool | None, model: torch.nn.Module, device: torch.device) -> bool:
    """train.channels_last: None (auto) is on for CUDA when the model has 2-D convolutions, off elsewhere."""
    if setting is not None:
        return setting
    return device.type == "cuda" and any(isinstance(m, torch.nn.Conv2d) for m in model.modules())


def build_run(
    cfg: ProjectConfig, *, log: Callable[[str], None] = lambda message: None, progress: Progress = None
) -> RunParts:
    """Data, model, freezing, loss, optimizer, schedule and loaders for a project, on its device."""
    dist = init_from_env(cfg)
    device = dist.device if dist is not None else pick_device(cfg.train.device)
    if dist is not None:
        log(dist.describe())
    seed_everything(cfg.train.seed)
    pre = preprocess_for(cfg.model, cfg.data)
    data: PreparedData
    if cfg.data.kind == "webdataset":  # streamed tar shards
        data = prepare_webdataset(cfg, pre, progress=progress)
    else:
        data = prepare_data(cfg, pre, progress=progress)
    log(data.summary())
    built = build_model(cfg.model, data.num_outputs, resolve=cfg.resolve, image_size=pre.crop_size)
    log(f"Backbone {cfg.model.backbone}: {built.weights_desc}")
    if built.report is not None and (built.report.missing or built.report.unexpected or built.report.mismatched):
        log(built.report.summary())
    model = built.model
    first = plan_phases(cfg)[0]
    freeze = phase_freeze(model, first, built.head_name)
    try:
        loss_fn = TaskLoss(cfg.loss, data.task, data.num_outputs, data.train_counts)
    except ValueError as exc:  # the class count is only known once the data is scanned
        raise ConfigError([str(exc)]) from None
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
    optimizer = phase_optimizer(model, first, built.head_name, log)
    cache = apply_decoded_cache(data, cfg, pre, log=log, progress=progress)
    train_transforms = {True: data.train.transform, False: data.train.transform}
    if cfg.train.phases and has_random_steps(cfg.data.augment, train=True):
        train_transforms[False] = unaugmented_train_transform(
            pre, cfg.data.augment, keep_aspect=cfg.data.keep_aspect, decoded=cache.used
        )
        data.train.transform = train_transforms[first.augmented]
    augmented = has_random_steps(cfg.data.augment, train=True)
    plans = [
        plan_loader(
            cfg.loader, cached=cache.used, augmented=aug, deterministic=cfg.train.deterministic, device_type=device.type
        )
        for aug in (augmented, False)
    ]
    if cfg.data.kind == "webdataset":
        for plan in plans:  # a stream's workers start each epoch, carrying its epoch (engine/webdataset_data.py)
            plan.persistent = False
    collate = ReportingCollate(get_collate(cfg.loader.collate))  # unreadable files ride on the batches
    train_loader = loader_for(
        data.train,
        cfg.loader,
        train=True,
        targets=data.train_targets if data.task == "classification" else None,
        collate_fn=collate,
        seed=cfg.train.seed,
        pin_memory=plans[0].pin_memory,
        plan=plans[0],
    )
    drawn = samples_drawn(train_loader)
    if cfg.loader.batch_size > drawn:
        log(
            f"loader.batch_size = {cfg.loader.batch_size} is larger than the {drawn} training samples drawn per "
            f"epoch: each epoch trains on one batch of {drawn}"
        )
    val_loader = None
    if data.val is not None and len(data.val) > 0:
        val_loader = loader_for(
            data.val,
            cfg.loader,
            train=False,
            targets=None,
            collate_fn=collate,
            seed=cfg.train.seed,
            pin_memory=plans[1].pin_memory,
            plan=plans[1],
        )
    log(describe_plans(plans[0], plans[1] if val_loader is not None else None))
    schedule = phase_schedule(first, optimizer, len(train_loader))
    return RunParts(
        data,
        model,
        built.head_name,
        built.weights_desc,
        freeze,
        frozen_bn,
        loss_fn,
        optimizer,
        schedule,
        train_loader,
        val_loader,
        device,
        channels_last,
        dist,
        train_transforms,
    )


def loader_for(
    dataset: Any,
    cfg: LoaderConfig,
    *,
    train: bool,
    targets: list | None,
    collate_fn: Callable[[list[Any]], Any] | None,
    seed: int,
    pin_memory: bool,
    plan: LoaderPlan,
) -> torch.utils.data.DataLoader:
    """build_loader's loader, or for streamed shards (data.kind = "webdataset") one without a sampler."""
    if isinstance(dataset, ShardStream):
        return stream_loader(
            dataset, cfg, collate_fn=collate_fn, seed=seed, pin_memory=pin_memory, workers=plan.workers
        )
    return build_loader(
        dataset,
        cfg,
        train=train,
        targets=targets,
        collate_fn=collate_fn,
        seed=seed,
        pin_memory=pin_memory,
        plan=plan,
    )


def is_stream(loader: torch.utils.data.DataLoader) -> bool:
    """A loader over streamed shards (data.kind = "webdataset"): no sampler; the dataset draws its own order."""
    return isinstance(loader.dataset, torch.utils.data.IterableDataset)


def samples_drawn(loader: torch.utils.data.DataLoader) -> int:
    """Training samples one epoch draws in this process."""
    if is_stream(loader):
        return len(loader.dataset)  # type: ignore[arg-type]  # torch's Dataset type has no len; a ShardStream has
    return len(loader.batch_sampler.sampler)  # type: ignore[union-attr]  # build_loader sets a batch sampler


def phase_freeze(model: torch.nn.Module, phase: Phase, head_name: str) -> FreezeSummary:
    """requires_grad as the phase's project says; refuses a phase (or project) that leaves nothing to train."""
    cfg = phase.cfg
    where = f"{phase.title()} (train.phases[{phase.index}]): " if phase.count > 1 else ""
    try:
        freeze = apply_freeze(model, cfg.model, head_name, freeze_backbone=cfg.optimizer.backbone_lr_mult == 0)
    except ConfigError as exc:
        if not where:
            raise
        raise ConfigError([where + str(p) for p in exc.problems]) from None
    if freeze.trainable == 0:
        raise ConfigError(
            [
                where
                + "model: every parameter is frozen"
                + (
                    " (optimizer.backbone_lr_mult = 0 freezes the backbone)"
                    if cfg.optimizer.backbone_lr_mult == 0
                    else ""
                )
                + ", so there is nothing to train; keep at least the head trainable "
                "(model.freeze = 'head_only')"
            ]
        )
    return freeze


def phase_optimizer(
    model: torch.nn.Module, phase: Phase, head_name: str, log: Callable[[str], None]
) -> torch.optim.Optimizer:
    """A new optimizer over the parameters that train in the phase, at its learning rates (layer-wise ones too)."""
    cfg = phase.cfg
    o = cfg.optimizer
    groups = param_groups(
        model,
        head_name,
        o.lr,
        o.backbone_lr_mult,
        layer_lr_decay=o.layer_lr_decay,
        lr_mult=o.lr_mult,
        backbone=cfg.model.backbone,
    )
    if len(groups) > 2 or o.layer_lr_decay != 1:
        log(
            "Learning rates by group: "
            + ", ".join(f"{g['name']} {g['lr']:.3g} ({len(g['params'])} tensors)" for g in groups)
        )
    return build_optimizer(cfg.optimizer, groups)


def phase_schedule(phase: Phase, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> Schedule:
    """The phase's schedule over the phase's own epochs, from its learning rate."""
    cfg = phase.cfg
    return Schedule(
        cfg.schedule, optimizer, epochs=cfg.train.epochs, steps_per_epoch=steps_per_epoch, base_lr=cfg.optimizer.lr
    )


class _StoppedWhilePreparing(Exception):
    """Stop was asked for while the run was being built (a first scan of a big dataset takes minutes)."""


class Trainer:
    """Runs a project's epochs; stop() ends the run within one batch.

    The loop is here; how several processes agree is the strategy's (engine/strategy.py), how a batch goes
    through the model is Forward's (engine/forward.py), what a failure says is engine/failures.py's, and the
    random generators' state is engine/rng_state.py's.
    """

    def __init__(
        self,
        cfg: ProjectConfig,
        callbacks: Iterable[Callback] = (),
        stop_event: threading.Event | None = None,
        resume: dict[str, Any] | None = None,
        resume_source: str | os.PathLike | None = None,
    ):
        """resume: a checkpoint (as loaded by engine.checkpoints.load_checkpoint) to continue exactly; resume_source:
        its file, named in the messages when it cannot be resumed."""
        self.cfg = cfg
        self.callbacks = list(callbacks)
        self.stop_event = stop_event or threading.Event()
        self.phases = plan_phases(cfg)
        self.state = TrainState(epochs=planned_epochs(self.phases, [0]))
        self.parts: RunParts | None = None
        self.resume = resume
        self.resume_source = resume_source
        self.best = MetricTracker(cfg.checkpoint.monitor, cfg.checkpoint.mode)
        es = cfg.early_stopping
        self.early = MetricTracker(es.monitor, es.mode, es.min_delta) if es.enabled else None
        self._best_weights: dict[str, torch.Tensor] | None = None
        # Set up in run(): when active, epochs train the part after the frozen prefix on cached features.
        self.feature_cache: FeatureCache | None = None
        self.strategy: OneProcess = OneProcess(self.stop_event)
        self.forward: Forward | None = None
        self._grad_scaler: torch.amp.GradScaler | None = None
        self._first_step = 0
        self.failures = FailureLog(self.log)  # unreadable image files met, in this process (and, gathered, all)

    @property
    def built(self) -> RunParts:
        """The run's parts, which run() builds first."""
        if self.parts is None:
            raise RuntimeError("the run is not built yet")
        return self.parts

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
            self._set_up()
            self._fire("on_run_started", state)
            while state.epoch < state.epochs and not self.strategy.stop_requested() and not state.stopped_early:
                phase = phase_at(self.phases, state.phase_starts, state.epoch)
                if phase != state.phase:
                    self._change_phase(phase)
                state.epoch += 1
                metrics = self._run_epoch()
                if metrics is None:
                    state.epoch -= 1  # an epoch cut short by stop() did not finish
                    break
                state.history.append(metrics)
                self._after_epoch(metrics)
                self._fire("on_epoch_finished", state, metrics)
            self._keep_failures(gather=False)  # a stopped run's last, unfinished epoch too
            if state.unreadable and (self.built.dist is None or self.built.dist.is_main):
                self.log(describe(state.unreadable) + "; the scan cache marks them, so the next scan skips them")
            finished = state.epoch >= state.epochs or state.stopped_early
            state.status = "stopped" if self.strategy.stop_requested() and not finished else "completed"
            if state.status == "completed":
                self._restore_best()
            self.strategy.finish(self.built.model, self.log)
        except _StoppedWhilePreparing:
            state.status = "stopped"  # the scan cache keeps what was checked: the next start goes on from there
            self.log("Stopped while preparing the data, before the first batch")
        except BaseException as exc:
            with contextlib.suppress(Exception):  # the run's own failure is the one to report
                self._keep_failures(gather=False)
            state.status = "failed"
            failure = self._explain(exc)
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

    def _set_up(self) -> None:
        """Build the run, restore a checkpoint, choose the strategy, the feature cache and the forward."""
        if self.parts is None:
            self.parts = build_run(self.cfg, log=self.log, progress=self._preparing())
        p, state = self.parts, self.state
        self.failures.sizes = {"train": len(p.data.train), **({"val": len(p.data.val)} if p.data.val else {})}
        for split, ds in (("train", p.data.train), ("val", p.data.val)):
            self.failures.add(getattr(ds, "failures", None) or [], split)  # met filling the decoded-image cache
        state.device = str(p.device)
        state.batches_per_epoch = len(p.train_loader)
        if self.cfg.train.precision == "fp16" and p.device.type == "cuda":
            # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none.
            self._grad_scaler = torch.amp.GradScaler("cuda")
        if self.resume is not None:
            self._restore(self.resume)
        self._first_step = state.global_step
        dist = p.dist
        self.strategy = OneProcess(self.stop_event) if dist is None else Processes(self.stop_event, dist)
        if dist is not None and dist.rank > 0:
            # Same weights everywhere (seeded alike, then DDP broadcasts rank 0's), but each process draws its own
            # augmentation and dropout.
            seed_everything(self.cfg.train.seed + 7919 * dist.rank + state.epoch)
        if self.cfg.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        if len(self.phases) > 1:
            self.log(self._describe_phase())
        self._start_phase()

    def _preparing(self) -> Callable[[int, int], None]:
        """Progress of the data scan (and the decoded cache) in the log, with the time left; Stop ends it."""
        line = ProgressLine(self.log, DATA_PROGRESS)

        def report(done: int, total: int) -> None:
            if self.stop_event.is_set():
                raise _StoppedWhilePreparing
            line(done, total)

        return report

    def _describe_phase(self) -> str:
        phase, state, p = self.phases[self.state.phase], self.state, self.built
        first = state.phase_starts[phase.index] + 1
        trainable = sum(t.numel() for t in p.model.parameters() if t.requires_grad)
        return (
            f"{phase.title().capitalize()}: epochs {first}-{first + phase.epochs - 1}, learning rate "
            f"{phase.lr:.3g}, schedule {phase.cfg.schedule.name}, augmentation {'on' if phase.augmented else 'off'}, "
            f"{trainable:,} trainable parameters"
        )

    def _configure_phase(self, index: int) -> None:
        """Freeze, optimizer, schedule and training images as phase `index` says (its first epoch is next)."""
        p, state = self.built, self.state
        phase = self.phases[index]
        while len(state.phase_starts) <= index:
            state.phase_starts.append(state.epoch)
        state.phase = index
        state.epochs = planned_epochs(self.phases, state.phase_starts)
        phase_freeze(p.model, phase, p.head_name)
        p.frozen_bn = [] if self.cfg.model.train_frozen_batchnorm else frozen_batchnorm_modules(p.model)
        p.optimizer = phase_optimizer(p.model, phase, p.head_name, self.log)
        p.schedule = phase_schedule(phase, p.optimizer, len(p.train_loader))
        if p.data.train.transform is not p.train_transforms[phase.augmented]:
            p.data.train.transform = p.train_transforms[phase.augmented]
            p.train_loader = restart_workers(p.train_loader)
        if self.early is not None and self.cfg.early_stopping.per_phase:
            es = self.cfg.early_stopping
            self.early = MetricTracker(es.monitor, es.mode, es.min_delta)

    def release(self) -> None:
        """After the run: let go of what holds the process group (DDP's wrapper; the forward, which may have
        compiled it), so that ending the group ends its threads."""
        self.strategy.release()
        self.forward = None

    def _change_phase(self, index: int) -> None:
        """Between two epochs: the next phase begins (its freeze, optimizer, schedule, images and cache)."""
        self._configure_phase(index)
        self.log(self._describe_phase())
        self._start_phase()

    def _start_phase(self) -> None:
        """The forward, the feature cache and (under torchrun) DDP for the module that trains in this phase."""
        p, dist = self.built, self.built.dist
        cfg = self.phases[self.state.phase].cfg
        self.forward = Forward(cfg, p.device, p.channels_last, self.log, self.strategy.passes_through)
        # Under torchrun a local stop request must not cut one process's feature pass short: the processes agree
        # on stopping at the training batches.
        outcome = setup_feature_cache(
            cfg,
            p,
            autocast=self.forward.autocast,
            stop_event=self.stop_event if dist is None else None,
            log=self.log,
            on_failures=self.failures.add,
            ahead=self._next_phase(),
            progress=ProgressLine(self.log, FEATURE_PASS_PROGRESS),
        )
        self.feature_cache = outcome.cache
        self.log(outcome.message)
        if isinstance(self.strategy, Processes):
            # Every process must train the same module: if one could not use the feature cache, none does.
            if not self.strategy.agree_on(self.feature_cache is not None) and self.feature_cache is not None:
                self.feature_cache = None
                self.log("Feature cache off: another process of this run could not use it, and all must train alike")
            self.strategy.wrap(self._training_module(), p.device)
        self.forward.prepare(self.strategy.trains(self._training_module()))

    def _next_phase(self) -> NextPhase | None:
        """The phase after this one, for the feature cache to compute its features in this phase's pass; None in
        the last phase. Each process of a torchrun run decides alike from its own copy of the same model and data:
        either way the next phase's features are the same, and its setup's agreement below still holds."""
        index = self.state.phase + 1
        if index >= len(self.phases):
            return None
        p, phase = self.built, self.phases[index]
        return NextPhase(
            cfg=phase.cfg,
            title=phase.title(),
            current=self.phases[self.state.phase].title(),
            train_transform=p.train_transforms.get(phase.augmented, p.data.train.transform),
            frozen=lambda: self._frozen_as(phase),
        )

    @contextlib.contextmanager
    def _frozen_as(self, phase: Phase) -> Iterator[list[str]]:
        """The model frozen as `phase` freezes it (as _configure_phase does) for the with block, which gets that
        phase's frozen BatchNorm layers; afterwards every requires_grad flag and module mode is as it was."""
        model = self.built.model
        flags = [(t, t.requires_grad) for t in model.parameters()]
        modes = [(m, m.training) for m in model.modules()]
        try:
            phase_freeze(model, phase, self.built.head_name)
            yield [] if self.cfg.model.train_frozen_batchnorm else frozen_batchnorm_modules(model)
        finally:
            for t, flag in flags:
                t.requires_grad_(flag)
            for m, training in modes:
                m.training = training

    def _keep_failures(self, *, gather: bool) -> None:
        """The unreadable files every process met (gathered at an epoch's end, where all processes meet) into
        the run's summary, and rank 0 records them in the scan cache for the next scan."""
        log = self.failures
        if gather:
            # Every process's files, quietly: each process logged its own as it met them.
            mine = [(f, log.split_of[f.path]) for f in log.failures()]
            for found in self.strategy.gather(mine):
                for failure, split in found:
                    log.add([failure], split, quiet=True)
        self.state.unreadable = log.summary()
        dist = self.parts.dist if self.parts is not None else None
        if dist is None or dist.is_main:
            log.record()

    def _training_module(self) -> torch.nn.Module:
        """What trains each batch: the model, or with the feature cache the part after the cut."""
        return self.built.model if self.feature_cache is None else self.feature_cache.suffix

    def _explain(self, exc: BaseException) -> BaseException:
        """The failure to report: a device out of memory or a failed peer process in words, else exc itself."""
        if is_out_of_memory(exc):
            device = self.parts.device.type if self.parts is not None else self.cfg.train.device
            if device == "cuda":
                with contextlib.suppress(Exception):
                    torch.cuda.empty_cache()  # the failed batch's blocks go back; the app can start the next run
            return out_of_memory(exc, device=device, cfg=self.cfg, state=self.state, built=self.parts is not None)
        return self.strategy.failure(exc, self.state)

    def _restore_best(self) -> None:
        """early_stopping.restore_best: the best epoch's weights are the run's result."""
        state, early = self.state, self.early
        if (
            self._best_weights is None
            or not self.cfg.early_stopping.restore_best
            or early is None
            or early.best_epoch == state.epoch
        ):
            return
        self.built.model.load_state_dict(self._best_weights)
        state.restored_best_epoch = early.best_epoch
        self.log(f"Restored the weights of epoch {early.best_epoch}, the best by {early.monitor} ({early.best:.4g})")

    def _after_epoch(self, metrics: dict[str, Any]) -> None:
        state = self.state
        metrics["best"] = self.best.update(metrics)
        state.best_epoch = self.best.best_epoch
        if self.early is None:
            return
        if self.early.update(metrics) and self.cfg.early_stopping.restore_best:
            self._best_weights = {k: v.detach().clone() for k, v in self.built.model.state_dict().items()}
        if self.early.epochs_without_improvement >= self.cfg.early_stopping.patience and state.epoch < state.epochs:
            nxt = state.phase + 1
            if self.cfg.early_stopping.per_phase and nxt < len(self.phases):
                # The next phase is begun now (not at the next epoch), so this epoch's checkpoint resumes into it.
                state.phase_starts.append(state.epoch)
                state.epochs = planned_epochs(self.phases, state.phase_starts)
                self.log(
                    f"Early stopping ends {self.phases[state.phase].title()} after epoch {state.epoch}: "
                    f"{self.early.monitor} has not improved for {self.early.epochs_without_improvement} epochs; "
                    f"{self.phases[nxt].title()} follows"
                )
                return
            state.stopped_early = True
            self.log(
                f"Early stopping after epoch {state.epoch}: {self.early.monitor} has not improved for "
                f"{self.early.epochs_without_improvement} epochs (best {self.early.best:.4g} "
                f"at epoch {self.early.best_epoch})"
            )

    def training_state(self) -> dict[str, Any]:
        """Everything beyond model and optimizer that an exact resume needs; plain values and tensors only."""
        p = self.built
        return {
            "scheduler_state_dict": p.schedule.state_dict(),
            "scaler_state_dict": self._grad_scaler.state_dict() if self._grad_scaler is not None else None,
            "rng_state": rng_state.capture(p.train_loader.generator),
            "monitors": {
                "best": self.best.state_dict(),
                "early_stopping": self.early.state_dict() if self.early else None,
            },
            "best_weights": self._best_weights,
            "phase": {"index": self.state.phase, "starts": list(self.state.phase_starts)},
        }

    def _restore(self, ckpt: dict[str, Any]) -> None:
        """Put model, optimizer, schedule, RNGs and history back as they were when ckpt was written."""
        p, state = self.built, self.state
        cannot = f"cannot resume from {self.resume_source}" if self.resume_source is not None else "cannot resume"
        saved_classes = list(ckpt.get("class_names", []))
        if saved_classes != list(p.data.class_names):
            gone = [c for c in saved_classes if c not in p.data.class_names]
            new = [c for c in p.data.class_names if c not in saved_classes]
            raise CheckpointError(
                f"{cannot}: the dataset's classes changed since the checkpoint"
                + (f"; missing now: {', '.join(gone)}" if gone else "")
                + (f"; new: {', '.join(new)}" if new else "")
                + ("" if gone or new else "; same names in another order")
                + ". Start a new run from its weights instead (train --init-from)"
            )
        if ckpt.get("backbone") not in (None, self.cfg.model.backbone):
            raise CheckpointError(
                f"{cannot}: the checkpoint is a {ckpt['backbone']}, the project builds a {self.cfg.model.backbone}"
            )
        try:
            p.model.load_state_dict(ckpt["model_state_dict"])
        except RuntimeError as exc:
            raise CheckpointError(
                f"{cannot}: the model's architecture differs from the checkpoint's: " + " ".join(str(exc).split())[:400]
            ) from None
        state.epoch = int(ckpt["epoch"])
        saved = ckpt.get("phase") or {"index": 0, "starts": [0]}
        if saved["index"] >= len(self.phases):
            raise CheckpointError(
                f"{cannot}: the checkpoint was in phase {saved['index'] + 1}, the project has "
                f"{len(self.phases)} phase(s) (train.phases)"
            )
        state.phase_starts = [int(v) for v in saved["starts"]][: saved["index"] + 1]
        if saved["index"] > 0:
            self._configure_phase(saved["index"])
        state.phase_starts = [int(v) for v in saved["starts"]]  # with a phase that early stopping has begun
        state.epochs = planned_epochs(self.phases, state.phase_starts)
        saved_groups = [g.get("name") for g in ckpt["optimizer_state_dict"].get("param_groups", [])]
        built_groups = [g.get("name") for g in p.optimizer.param_groups]
        if saved_groups != built_groups:
            raise CheckpointError(
                f"{cannot}: the checkpoint's optimizer has the parameter groups "
                f"{', '.join(map(str, saved_groups))}, the project builds {', '.join(map(str, built_groups))} "
                "(optimizer.layer_lr_decay, optimizer.lr_mult or what is frozen changed); start a new run from its "
                "weights instead (train --init-from)"
            )
        p.optimizer.load_state_dict(ckpt["optimizer_state_dict"])
        try:
            p.schedule.load_state_dict(
                ckpt.get("scheduler_state_dict") or {},
                epochs=self.phases[state.phase].epochs if len(self.phases) > 1 else state.epochs,
            )
        except ValueError as exc:
            raise ConfigError([str(exc)]) from None
        if self._grad_scaler is not None and ckpt.get("scaler_state_dict"):
            self._grad_scaler.load_state_dict(ckpt["scaler_state_dict"])
        monitors = ckpt.get("monitors") or {}
        if monitors.get("best"):
            self.best.load_state_dict(monitors["best"])
        if self.early is not None and monitors.get("early_stopping"):
            self.early.load_state_dict(monitors["early_stopping"])
        self._best_weights = ckpt.get("best_weights")
        rng_state.restore(ckpt.get("rng_state") or {}, p.train_loader.generator)
        state.epoch = state.start_epoch = int(ckpt["epoch"])
        state.global_step = int(ckpt.get("global_step", 0))
        state.history = [dict(m) for m in ckpt.get("history", [])]
        state.best_epoch = self.best.best_epoch
        self.log(f"Resumed after epoch {state.epoch} (step {state.global_step}); training to epoch {state.epochs}")

    def _run_epoch(self) -> dict[str, Any] | None:
        """One pass over the training data and one over the validation data; None if stopped midway."""
        p, state, cfg, strategy = self.built, self.state, self.cfg, self.strategy
        forward = self.forward
        assert forward is not None  # set up by run()
        started = time.perf_counter()
        cache = self.feature_cache
        model = self._training_module()
        loader = p.train_loader if cache is None else cache.train
        p.model.train()
        model.train()  # with the feature cache, the suffix's own copies of the modules above the cut follow too
        set_frozen_batchnorm_eval(p.model, p.frozen_bn)
        scaler, trains = self._grad_scaler, strategy.trains(model)
        loss_sum = torch.zeros((), device=p.device, dtype=torch.float64)  # summed on the device: no sync per batch
        correct = torch.zeros((), device=p.device)
        seen = 0
        # the sampler's draw, or for streamed shards the stream's shard order and shuffle, follows the epoch
        loader_in = p.train_loader
        sampler: Any = loader_in.dataset if is_stream(loader_in) else loader_in.batch_sampler.sampler  # type: ignore[union-attr]  # build_loader sets a batch sampler
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(state.epoch)
        state.batch = 0
        for batch in loader:
            if strategy.stop_requested():
                return None
            state.batch += 1
            self.failures.add(batch_failures(batch), "train")
            inputs = forward.to_device(batch[0])
            targets = batch[1].to(p.device, non_blocking=True)
            p.optimizer.zero_grad(set_to_none=True)
            with forward.autocast(), forward.first_batch_guard(inputs, state.global_step == self._first_step):
                outputs = forward(trains, inputs)
                loss = p.loss_fn(outputs, targets)
            loss_value = strategy.batch_loss(loss, p.model)
            if loss_value is None:  # the processes agreed to stop in this batch
                return None
            if not math.isfinite(loss_value):
                raise non_finite_loss(loss_value, cfg=cfg, state=state, lr_now=float(p.optimizer.param_groups[0]["lr"]))
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
            loss_sum += loss.detach().to(torch.float64) * n
            if p.data.task != "regression":
                correct += correct_predictions(outputs.detach(), targets, p.data.task, p.loss_fn.threshold)
            self._fire("on_batch_finished", state, loss_value)
        total_loss, seen, correct_count = strategy.epoch_sums(loss_sum, seen, correct, p.model)
        train_seconds = time.perf_counter() - started
        if seen == 0:
            raise ConfigError(
                [
                    f"loader.batch_size = {cfg.loader.batch_size}: no training batch was drawn "
                    f"({len(p.data.train)} training samples)"
                ]
            )
        lr = p.optimizer.param_groups[0]["lr"]
        metrics: dict[str, Any] = {
            "epoch": state.epoch,
            **({"phase": state.phase + 1} if len(self.phases) > 1 else {}),
            "train_loss": total_loss / seen,
            "train_accuracy": correct_count / seen if p.data.task != "regression" else None,
        }
        val = self.evaluate_loss()
        if val is None and strategy.stop_requested():
            return None
        metrics["val_loss"], metrics["val_accuracy"] = val if val is not None else (None, None)
        self._keep_failures(gather=True)
        monitored = metrics["val_loss"] if metrics["val_loss"] is not None else metrics["train_loss"]
        p.schedule.after_epoch(monitored)
        metrics.update(
            {
                "lr": lr,
                "epoch_seconds": time.perf_counter() - started,
                "samples_per_second": seen / train_seconds if train_seconds > 0 else None,
            }
        )
        return metrics

    def evaluate_loss(self) -> tuple[float, float | None] | None:
        """(mean loss, accuracy) over the validation set; None when there is none or a stop interrupts it."""
        p, forward = self.built, self.forward
        if p.val_loader is None:
            return None
        assert forward is not None  # set up by run()
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
        with torch.inference_mode():
            for batch in loader:
                if self.strategy.eval_interrupted():
                    return None
                self.failures.add(batch_failures(batch), "val")
                inputs = forward.to_device(batch[0])
                targets = batch[1].to(p.device, non_blocking=True)
                with forward.autocast():
                    outputs = model(inputs)
                    loss = p.loss_fn(outputs, targets)
                n = inputs.shape[0]
                total += loss.item() * n
                seen += n
                if p.data.task != "regression":
                    correct += correct_predictions(outputs, targets, p.data.task, p.loss_fn.threshold)
        total, seen, correct_count = self.strategy.eval_sums(total, seen, correct.item(), p.device)
        if seen == 0:
            return None
        return total / seen, (correct_count / seen if p.data.task != "regression" else None)


def correct_predictions(outputs: torch.Tensor, targets: torch.Tensor, task: str, threshold: float) -> torch.Tensor:
    """Correct predictions in a batch: top-1 for classes, the mean of per-label hits for multi-label."""
    if task == "classification":
        return (outputs.argmax(dim=1) == targets).sum()
    return ((outputs > threshold) == (targets > 0.5)).float().mean(dim=1).sum()
