"""Training in phases (issue 15, section 5): a two-phase run against a one-phase run of the same total epochs.

Phase 1 trains the head alone on cached features (nothing augmented), phase 2 unfreezes the last stage on augmented
images; the one-phase run trains that stage and the head for every epoch on augmented images. The two runs are
alternated (A B, B A, ...) in this process and compared by their median wall time and their final accuracy.
"""

from __future__ import annotations

import functools
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.common import DIGITS, Figure, Section, alternate, digits_subset, machine, median

if TYPE_CHECKING:
    from engine.config import ProjectConfig


def _project(data: Path, size: int, epochs: tuple[int, int], phased: bool) -> ProjectConfig:
    from engine.config import from_dict

    head, tune = epochs
    train: dict[str, Any] = {"epochs": head + tune, "device": "cpu", "seed": 0}
    if phased:
        train["phases"] = [
            {"name": "head", "epochs": head, "freeze": "head_only", "augment": False, "lr": 0.01},
            {"name": "top", "epochs": tune, "lr": 0.003, "schedule": "onecycle", "layer_lr_decay": 0.7},
        ]
    return from_dict(
        {
            "name": "phases-bench",
            "data": {
                "path": str(data),
                "image_size": size,
                "val_fraction": 0.2,
                "mean": [0.5],
                "std": [0.5],
                "augment": {"rotation": 10.0},
            },
            "model": {"backbone": "resnet18", "freeze": "up_to", "freeze_up_to": "layer3"},
            "loader": {"batch_size": 64},
            "optimizer": {"name": "adam", "lr": 0.003},
            "schedule": {"name": "cosine"},
            "train": train,
            "checkpoint": {"every_epoch": False},
            "output": {"dir": str(data.parent / "runs"), "tensorboard": False},
        }
    )


def _train(cfg: ProjectConfig) -> dict[str, Any]:
    from engine import feature_cache
    from engine.trainer import Trainer

    feature_cache.clear()  # each phased run computes its features: that cost is part of the figure
    started = time.perf_counter()
    trainer = Trainer(cfg)
    state = trainer.run()
    if state.status != "completed":
        raise RuntimeError(f"the run ended {state.status}: {state.error}")
    return {"seconds": time.perf_counter() - started, "accuracy": state.history[-1]["val_accuracy"]}


def run(quick: bool = False) -> Section:
    import torch

    work = Path(tempfile.mkdtemp(prefix="bench-phases-"))
    try:
        if quick:
            data, size, epochs, repeats = digits_subset(work, 20), 32, (2, 1), 1
        else:
            data = work / "digits"
            shutil.copytree(DIGITS, data)
            size, epochs, repeats = 32, (4, 2), 3
        n = sum(1 for _ in data.rglob("*.png"))
        configs = {"two_phase": _project(data, size, epochs, True), "one_phase": _project(data, size, epochs, False)}
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in configs}

        def run_one(name: str) -> None:
            runs[name].append(_train(configs[name]))

        alternate({name: functools.partial(run_one, name) for name in configs}, repeats, warmup=0)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    seconds = {name: median([r["seconds"] for r in rs]) for name, rs in runs.items()}
    accuracy = {name: median([r["accuracy"] for r in rs]) for name, rs in runs.items()}
    total = sum(epochs)
    figures = [
        Figure(
            key="phases_speedup",
            title=f"two-phase run vs one-phase run, {total} epochs each",
            value=seconds["one_phase"] / seconds["two_phase"],
            unit="x",
            detail=f"median {seconds['two_phase']:.1f} s two-phase ({epochs[0]} head epochs on cached features, "
            f"{epochs[1]} with layer4) vs {seconds['one_phase']:.1f} s one-phase (layer4 and the head every epoch)",
        ),
        Figure(
            key="phases_accuracy_points",
            title="final accuracy, two-phase minus one-phase (points)",
            value=(accuracy["two_phase"] - accuracy["one_phase"]) * 100,
            unit="points",
            detail=f"validation accuracy {accuracy['two_phase'] * 100:.1f}% two-phase, "
            f"{accuracy['one_phase'] * 100:.1f}% one-phase",
        ),
    ]
    return Section(
        name="phases",
        title="Training in phases",
        figures=figures,
        setup=(
            f"resnet18 (random init) on the digits image folder ({n} images, 20% validation) at {size} px, rotation "
            f"augmentation, batch 64, Adam, {total} epochs in all, CPU, {torch.get_num_threads()} torch threads; the "
            f"two runs alternated, {repeats} repetition(s), medians"
        ),
        notes=[
            "The two-phase time includes computing the cached features at the start of phase 1.",
            f"Machine: {machine().get('cpu', machine()['processor'])}",
        ],
    )


if __name__ == "__main__":
    print(json.dumps(run().to_dict(), indent=2))
