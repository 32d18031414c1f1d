"""GPU paths: the engine's Trainer against a hand-written loop with the same precision, layout, pinning and compile.

For each set of options the two loops train the same resnet18 (the hand loop a copy of the engine's model) on
the same Dataset object, batch size, optimizer and loss; the hand loop does by hand what the option means
(torch.autocast, a GradScaler for fp16, channels-last model and inputs, a pinned DataLoader with non_blocking
copies, torch.compile). Each figure is the Trainer's samples/s over the hand loop's, alternated, median.
Without a CUDA GPU the section is skipped at once.
"""

from __future__ import annotations

import copy
import gc
import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.common import Figure, Section, alternate, median
from bench.overhead import project, write_images

TITLE = "GPU paths: Trainer vs a hand-written loop with the same options"
BATCH = 64
IMAGE_SIZE = 128  # the cache resizes the small written images up once; each draw only scales and normalises


@dataclass(frozen=True)
class Options:
    key: str
    label: str
    precision: str = "fp32"
    channels_last: bool = False
    pin_memory: bool = False
    compile: bool = False


OPTION_SETS = [
    Options("gpu_fp32", "fp32, contiguous layout, pageable memory"),
    Options("gpu_bf16_channels_last_pinned", "bf16 autocast, channels-last, pinned memory", "bf16", True, True),
    Options(
        "gpu_fp16_scaler_channels_last", "fp16 autocast + GradScaler, channels-last, pinned memory", "fp16", True, True
    ),
    Options(
        "gpu_compile_bf16",
        "torch.compile, bf16 autocast, channels-last, pinned memory",
        "bf16",
        True,
        True,
        compile=True,
    ),
]


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0][:300]}" if lines else type(exc).__name__


def _hand_epoch(parts: Any, opts: Options, batch: int) -> Callable[[], None]:
    """One epoch of the loop a person writes for these options, over the engine's training Dataset."""
    device = parts.device
    model = copy.deepcopy(parts.model)  # the same initial weights, on the same device
    layout = torch.channels_last if opts.channels_last else torch.contiguous_format
    model.to(memory_format=layout)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    scaler = torch.amp.GradScaler("cuda") if opts.precision == "fp16" else None
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(opts.precision)
    forward = torch.compile(model) if opts.compile else model
    workers = parts.train_loader.num_workers
    loader = torch.utils.data.DataLoader(
        parts.data.train,
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        pin_memory=opts.pin_memory,
        persistent_workers=workers > 0,
    )

    def epoch() -> None:
        model.train()
        running = 0.0
        for inputs, targets in loader:
            inputs = inputs.to(device, memory_format=layout, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=dtype or torch.float16, enabled=dtype is not None):
                loss = loss_fn(forward(inputs), targets)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            running += loss.item()
        torch.cuda.synchronize()  # the epoch's queued work counts in its time

    return epoch


def _measure(data: Path, opts: Options, *, repeats: int, workers: int) -> tuple[Figure, int]:
    """The figure for one option set; its value is None, and the reason in its detail, if either loop failed."""
    from engine.trainer import Callback, Trainer, build_run

    class Logs(Callback):
        def __init__(self) -> None:
            self.lines: list[str] = []

        def on_log(self, trainer: Trainer, message: str) -> None:
            self.lines.append(message)

    title = f"Trainer ÷ hand-written loop, samples/s: {opts.label}"
    logs = Logs()
    trainer = parts = hand = None
    samples = 0
    try:
        cfg = project(
            data,
            size=IMAGE_SIZE,
            batch=BATCH,
            loader={"num_workers": workers, "pin_memory": opts.pin_memory, "decoded_cache": "on"},
            train={
                "device": "cuda",
                "precision": opts.precision,
                "channels_last": opts.channels_last,
                "compile": opts.compile,
                "feature_cache": "off",
            },
        )
        parts = build_run(cfg, log=logs.lines.append)
        trainer = Trainer(cfg, [logs])
        trainer.parts = parts
        samples = len(parts.data.train)
        hand = _hand_epoch(parts, opts, BATCH)

        def engine_epoch() -> None:
            assert trainer is not None
            trainer.state.epoch = 0  # one more epoch of the same run each time
            trainer.state.epochs = 1
            trainer.run()
            torch.cuda.synchronize()

        times = alternate({"engine": engine_epoch, "hand": hand}, repeats)
        fallback = next((line for line in logs.lines if line.startswith("torch.compile failed")), None)
        if fallback is not None:  # the Trainer went on in eager mode: not the path this figure is about
            return Figure(opts.key, title, None, "x", ">= 0.97", detail=fallback), samples
        engine_t, hand_t = median(times["engine"]), median(times["hand"])
        return Figure(
            opts.key,
            title,
            hand_t / engine_t,
            "x",
            ">= 0.97",
            detail=f"{samples / engine_t:.0f} vs {samples / hand_t:.0f} samples/s",
        ), samples
    except Exception as exc:  # one option set that cannot run here (compiler, dtype support) must not end the rest
        return Figure(opts.key, title, None, "x", ">= 0.97", detail=f"failed: {_first_line(exc)}"), samples
    finally:
        trainer = parts = hand = None  # persistent loader workers and GPU memory go before the next set
        gc.collect()
        if opts.compile:
            try:
                torch._dynamo.reset()
            except Exception:
                pass
        torch.cuda.empty_cache()


def run(quick: bool = False) -> Section:
    if not torch.cuda.is_available():
        return Section(name="gpu_paths", title=TITLE, skipped="no CUDA GPU on this machine")
    from engine.samplers import usable_cpus

    per_class = 128 if quick else 512  # 4 classes: 8 or 32 batches of 64 per epoch
    repeats = 2 if quick else 5
    workers = min(8, usable_cpus() - 1)
    option_sets = [o for o in OPTION_SETS if not (quick and o.compile)]
    figures: list[Figure] = []
    samples = 0
    with tempfile.TemporaryDirectory() as tmp:
        data = write_images(Path(tmp) / "images", classes=4, per_class=per_class, size=32)
        for opts in option_sets:
            figure, n = _measure(data, opts, repeats=repeats, workers=workers)
            samples = n or samples
            figures.append(figure)
    return Section(
        name="gpu_paths",
        title=TITLE,
        figures=figures,
        setup=(
            f"resnet18 (random init) on {samples} generated images at {IMAGE_SIZE}x{IMAGE_SIZE} (decoded-image "
            f"cache, no augmentation), batch {BATCH}, Adam, one epoch per repetition, {repeats} repetitions "
            f"alternated, {torch.cuda.get_device_name(0)}, {workers} loader workers"
            + ("; quick: torch.compile left out" if quick else "")
        ),
        notes=[
            "Both loops read the same Dataset object through loaders with the same workers and pinning; the "
            "hand loop applies each option itself (autocast, GradScaler, channels-last, non_blocking copies, "
            "torch.compile). Loader workers are set explicitly so that the GPU, not the loading, sets the pace.",
            "A figure without a value names why that option set could not run here (for example torch.compile "
            "failing, after which the Trainer falls back to eager).",
        ],
    )


if __name__ == "__main__":
    import sys

    print(json.dumps(run(quick="--quick" in sys.argv).to_dict(), indent=2))
