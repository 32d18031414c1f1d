"""The learning-rate range test (`main.py lr-find`, the app's Find learning rate...): train on an exponential ramp
of learning rates for at most one epoch, record the loss, and suggest a rate from where it falls.

The ramp goes from start_lr to end_lr over at most `num_batches` batches and at most one epoch, every parameter
group at its own ratio to optimizer.lr (layer-wise rates ramp together), and stops early once the (causally)
smoothed loss exceeds `diverge` times its lowest value or is not finite. The suggestion is taken from a zero-lag
smoothed curve (see suggest()). With the feature cache's conditions met (the frozen part is a prefix of the
forward pass and nothing is augmented) the ramp trains the part after the cut on cached features, as a run would.

The finder changes nothing a later run could see: it trains a throwaway optimizer on its own shuffle of the
training set (its own generator), and puts back the model's weights, buffers, gradients and modes and every
random generator (torch, CUDA, numpy, Python) as they were. The process-level feature cache keeps the features it
computed: the same values a run would compute, so the run that follows reuses them.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from engine import rng_state
from engine.config import ConfigError, ProjectConfig
from engine.events import FEATURE_PASS_PROGRESS
from engine.feature_cache import setup as setup_feature_cache
from engine.forward import Forward
from engine.freezing import param_groups, set_frozen_batchnorm_eval
from engine.image_scan import ProgressLine
from engine.lr_curve import (
    DEFAULT_BATCHES,
    DEFAULT_DIVERGE,
    DEFAULT_END_LR,
    DEFAULT_START_LR,
    MIN_POINTS,
    LrFinderResult,
    Progress,
    bounds_problems,
    lr_ramp,
    ramp,
    smooth,
    suggest,
)
from engine.optim import build_optimizer
from engine.trainer import RunParts, build_run


@contextlib.contextmanager
def preserved_random_state() -> Iterator[None]:
    """torch's (CPU and CUDA), numpy's and Python's generators put back as they were (engine.rng_state's parts)."""
    spare = torch.Generator()  # rng_state keeps a loader generator too; the finder never touches the run's
    saved = rng_state.capture(spare)
    try:
        yield
    finally:
        rng_state.restore(saved, spare)


@contextlib.contextmanager
def preserved_model(model: torch.nn.Module) -> Iterator[None]:
    """The model's weights and buffers (bitwise), its gradients and every module's mode, put back afterwards."""
    weights = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=False).items()}
    grads = {n: (None if p.grad is None else p.grad.detach().clone()) for n, p in model.named_parameters()}
    modes = {m: m.training for m in model.modules()}
    try:
        yield
    finally:
        with torch.no_grad():
            model.load_state_dict(weights)
        for n, p in model.named_parameters():
            p.grad = grads[n]
        for m, training in modes.items():
            m.training = training


def find_lr(
    cfg: ProjectConfig,
    *,
    parts: RunParts | None = None,
    start_lr: float = DEFAULT_START_LR,
    end_lr: float = DEFAULT_END_LR,
    num_batches: int = DEFAULT_BATCHES,
    diverge: float = DEFAULT_DIVERGE,
    stop_event: threading.Event | None = None,
    progress: Progress | None = None,
    log: Callable[[str], None] = lambda message: None,
) -> LrFinderResult:
    """Run the range test on the project (built here unless `parts` of a built run are given, which are left as
    they were) and suggest a learning rate."""
    problems = bounds_problems(start_lr, end_lr, num_batches)
    if problems:
        raise ConfigError(problems)
    if cfg.data.kind == "webdataset":
        from engine.webdataset_data import refuse_stream

        refuse_stream(cfg, "The learning-rate finder")
    if cfg.train.phases and parts is None:
        from engine.phases import plan_phases

        cfg = plan_phases(cfg)[0].cfg  # a run in phases: the range test is for its first phase, as it trains
    started = time.perf_counter()
    lines: list[str] = []

    def say(message: str) -> None:
        lines.append(message)
        log(message)

    with preserved_random_state():
        if parts is None:
            parts = build_run(cfg, log=say)
        deterministic = (
            torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(),
        )
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            with preserved_model(parts.model):
                lrs, losses, status, cached = _run_ramp(
                    cfg, parts, start_lr, end_lr, num_batches, diverge, stop_event, progress, say
                )
        finally:
            torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
    # The batch whose loss diverged (the only one that may not be finite) is plotted but not smoothed: averaged
    # backwards, a blown-up loss would lift the bottom of the valley it follows.
    usable = len(losses) - (1 if status == "diverged" and losses else 0)
    smoothed = smooth(losses[:usable]) if usable else []
    index, reason = suggest(lrs[:usable], smoothed) if status != "stopped" or usable >= MIN_POINTS else (None, "")
    if status == "stopped" and index is None:
        reason = "stopped before the curve said enough"
    suggestion = lrs[index] if index is not None else None
    if not lrs:
        say(f"Learning-rate finder {status} before its first batch")
    elif suggestion is None:
        say(f"Learning-rate finder {status} after {len(lrs)} batches: no suggestion: {reason}")
    else:
        say(
            f"Learning-rate finder {status} after {len(lrs)} batches ({lrs[0]:.2g} to {lrs[-1]:.2g}): "
            f"suggested lr {suggestion:.3g}, {reason}"
        )
    return LrFinderResult(
        lrs=lrs,
        losses=losses,
        smoothed=smoothed,
        suggestion=suggestion,
        suggestion_index=index,
        reason=reason,
        status=status,
        start_lr=start_lr,
        end_lr=end_lr,
        feature_cache=cached,
        seconds=time.perf_counter() - started,
        log=lines,
    )


def _run_ramp(
    cfg: ProjectConfig,
    parts: RunParts,
    start_lr: float,
    end_lr: float,
    num_batches: int,
    diverge: float,
    stop_event: threading.Event | None,
    progress: Progress | None,
    say: Callable[[str], None],
) -> tuple[list[float], list[float], str, bool]:
    device = parts.device
    forward = Forward(cfg, device, parts.channels_last, say, lambda exc: False)  # eager: compiling is not worth it
    outcome = setup_feature_cache(
        cfg,
        parts,
        autocast=forward.autocast,
        stop_event=stop_event,
        log=say,
        progress=ProgressLine(say, FEATURE_PASS_PROGRESS),
    )
    cache = outcome.cache
    say(outcome.message)
    # The finder's own shuffle of the training set (the run's loader generator is not drawn from), the same batches
    # whether they are cached features or images, so the two give one curve.
    generator = torch.Generator()
    generator.manual_seed(cfg.train.seed)
    batch_size = cfg.loader.batch_size
    order = torch.randperm(len(parts.data.train), generator=generator)
    chunks = [order[i : i + batch_size].tolist() for i in range(0, len(order), batch_size)]
    if cfg.loader.drop_last and len(chunks) > 1 and len(chunks[-1]) < batch_size:
        chunks.pop()
    per_epoch = len(chunks)
    batches: Iterable[tuple[Any, Any]]
    module: torch.nn.Module
    if cache is not None:
        features, targets = cache.train.features, cache.train.targets
        batches = (
            (features.index_select(0, index), targets.index_select(0, index))
            for index in (torch.as_tensor(c, dtype=torch.long) for c in chunks)
        )
        module = cache.suffix
    else:
        loader = parts.train_loader
        batches = torch.utils.data.DataLoader(
            parts.data.train,
            batch_sampler=chunks,
            num_workers=loader.num_workers,
            collate_fn=loader.collate_fn,
            worker_init_fn=loader.worker_init_fn,
            pin_memory=loader.pin_memory,
            generator=torch.Generator().manual_seed(cfg.train.seed),  # the workers' seeds: not the run's generator
        )
        module = parts.model
    steps = min(num_batches, per_epoch)
    if steps < MIN_POINTS:
        raise ConfigError(
            [
                f"loader.batch_size = {batch_size}: one epoch has only {per_epoch} batch(es), too few for the "
                f"learning-rate finder (at least {MIN_POINTS}); lower the batch size"
            ]
        )
    if steps < num_batches:
        say(f"One epoch has {per_epoch} batches: the ramp takes {steps} steps")
    o = cfg.optimizer
    groups = param_groups(
        parts.model,
        parts.head_name,
        o.lr,
        o.backbone_lr_mult,
        layer_lr_decay=o.layer_lr_decay,
        lr_mult=o.lr_mult,
        backbone=cfg.model.backbone,
    )
    ratios = [g["lr"] / o.lr for g in groups]
    optimizer = build_optimizer(o, groups)  # a throwaway: the run's optimizer and its state are not touched
    scaler = torch.amp.GradScaler("cuda") if cfg.train.precision == "fp16" and device.type == "cuda" else None
    parts.model.train()
    module.train()
    set_frozen_batchnorm_eval(parts.model, parts.frozen_bn)
    iterator = iter(batches)

    def step(lr: float) -> float:
        for group, ratio in zip(optimizer.param_groups, ratios, strict=True):
            group["lr"] = lr * ratio
        inputs, targets = next(iterator)
        inputs = forward.to_device(inputs)
        targets = targets.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with forward.autocast():
            loss = parts.loss_fn(module(inputs), targets)
        value = float(loss.detach())
        if not math.isfinite(value):
            return value
        if scaler is not None:
            scaler.scale(loss).backward()
            if cfg.train.grad_clip_norm:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(parts.model.parameters(), cfg.train.grad_clip_norm)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if cfg.train.grad_clip_norm:
                torch.nn.utils.clip_grad_norm_(parts.model.parameters(), cfg.train.grad_clip_norm)
            optimizer.step()
        return value

    lrs, losses, status = ramp(
        step, lr_ramp(start_lr, end_lr, steps), diverge=diverge, stop_event=stop_event, progress=progress
    )
    optimizer.zero_grad(set_to_none=True)
    return lrs, losses, status, cache is not None
