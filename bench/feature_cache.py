"""Frozen-backbone feature cache: epoch time and final accuracy of cached vs recomputed training (issue 6, item 4).

The same project, seed and data are trained with train.feature_cache = "auto" and "off", the two runs alternated
(A B, B A, ...). Epochs after the first are compared (the first cached epoch pays for computing the features),
and the final validation accuracies of the pair must agree. A second pair freezes only up to a ResNet stage, so
the cache cuts the model at that stage and the later stages still train.
"""

from __future__ import annotations

import functools
import json
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.common import DIGITS, Figure, Section, alternate, digits_subset, machine, median

if TYPE_CHECKING:
    from engine.config import ProjectConfig


def _project(data: Path, size: int, freeze: dict[str, Any], mode: str, epochs: int) -> ProjectConfig:
    from engine.config import from_dict

    return from_dict(
        {
            "name": "feature-cache-bench",
            "data": {"path": str(data), "image_size": size, "val_fraction": 0.2, "mean": [0.5], "std": [0.5]},
            "model": {"backbone": "resnet18", **freeze},
            "loader": {"batch_size": 64},
            "optimizer": {"name": "adam", "lr": 0.003},
            "train": {"epochs": epochs, "device": "cpu", "seed": 0, "feature_cache": mode},
            "checkpoint": {"every_epoch": False},
            "output": {"dir": str(data.parent / "runs"), "tensorboard": False},
        }
    )


def _train(cfg: ProjectConfig) -> dict[str, Any]:
    from engine import feature_cache
    from engine.trainer import Trainer

    feature_cache.clear()  # every cached run computes its features: the first-epoch cost is part of the figure
    trainer = Trainer(cfg)
    trainer.run()
    cache = trainer.feature_cache
    if (cache is not None) != (cfg.train.feature_cache == "auto"):
        raise RuntimeError(
            f"feature_cache = {cfg.train.feature_cache!r} but the cache was "
            f"{'used' if cache is not None else 'not used'}"
        )
    return {
        "epochs": [m["epoch_seconds"] for m in trainer.state.history],
        "setup": cache.seconds if cache is not None else 0.0,
        "boundary": cache.boundary.output if cache is not None else None,
        "accuracy": trainer.state.history[-1]["val_accuracy"],
    }


def _compare(data: Path, size: int, freeze: dict[str, Any], epochs: int, repeats: int) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {"cached": [], "recomputed": []}
    configs = {
        "cached": _project(data, size, freeze, "auto", epochs),
        "recomputed": _project(data, size, freeze, "off", epochs),
    }

    def run_one(name: str) -> None:
        runs[name].append(_train(configs[name]))

    alternate({name: functools.partial(run_one, name) for name in configs}, repeats, warmup=0)
    later = {name: [s for r in rs for s in r["epochs"][1:]] for name, rs in runs.items()}
    first_cached = [r["setup"] + r["epochs"][0] for r in runs["cached"]]
    first_recomputed = [r["epochs"][0] for r in runs["recomputed"]]
    return {
        "speedup": median(later["recomputed"]) / median(later["cached"]),
        "first_ratio": median(first_cached) / median(first_recomputed),
        "accuracy_points": max(
            abs(a["accuracy"] - b["accuracy"]) * 100 for a, b in zip(runs["cached"], runs["recomputed"], strict=True)
        ),
        "boundary": runs["cached"][0]["boundary"],
        "cached_epoch": median(later["cached"]),
        "recomputed_epoch": median(later["recomputed"]),
        "accuracy": runs["recomputed"][0]["accuracy"],
    }


def run(quick: bool = False) -> Section:
    import torch

    work = Path(tempfile.mkdtemp(prefix="bench-feature-cache-"))
    try:
        if quick:
            data, head_size, prefix_size, epochs, repeats = digits_subset(work, 20), 32, 32, 2, 1
        else:
            data = work / "digits"
            shutil.copytree(DIGITS, data)
            head_size, prefix_size, epochs, repeats = 64, 32, 3, 3
        n = sum(1 for _ in data.rglob("*.png"))
        head = _compare(data, head_size, {"freeze": "head_only"}, epochs, repeats)
        prefix = _compare(data, prefix_size, {"freeze": "up_to", "freeze_up_to": "layer3"}, epochs, max(1, repeats - 1))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    figures = [
        Figure(
            key="feature_cache_speedup",
            title="epoch speed-up after the first",
            value=head["speedup"],
            unit="x",
            target=">= 10",
            detail=f"median epoch {head['recomputed_epoch']:.3f} s recomputed vs {head['cached_epoch']:.4f} s "
            f"cached (cut after {head['boundary']})",
        ),
        Figure(
            key="feature_cache_accuracy_diff",
            title="final accuracy difference (points)",
            value=head["accuracy_points"],
            unit="points",
            target="<= 1",
            detail=f"final validation accuracy {head['accuracy'] * 100:.1f}% recomputed",
        ),
        Figure(
            key="feature_cache_first_epoch",
            title="first-epoch cost (computing the features included)",
            value=head["first_ratio"],
            unit="x",
            detail="cached first epoch incl. finding the cut and computing the features / a recomputed epoch",
        ),
        Figure(
            key="feature_cache_prefix_speedup",
            title="epoch speed-up after the first, frozen up to layer3",
            value=prefix["speedup"],
            unit="x",
            detail=f"cut after {prefix['boundary']}, layer4 and the head train; final accuracy difference "
            f"{prefix['accuracy_points']:.2f} points",
        ),
    ]
    return Section(
        name="feature_cache",
        title="Frozen-backbone feature cache",
        figures=figures,
        setup=(
            f"resnet18 (random init) on the digits image folder ({n} images, 20% validation), batch 64, Adam, "
            f"{epochs} epochs, CPU, {torch.get_num_threads()} torch threads; head only at {head_size} px, "
            f"frozen up to layer3 at {prefix_size} px; cached and recomputed runs alternated, "
            f"{repeats} repetition(s) (prefix pair {max(1, repeats - 1)}), medians"
        ),
        notes=[
            "Speed-ups compare the median of the epochs after the first; the first cached epoch also finds the "
            "cut and computes the features, reported as the first-epoch cost.",
            "Both runs use the same seed and draw the same batches, so their accuracies should agree exactly.",
            f"Machine: {machine().get('cpu', machine()['processor'])}",
        ],
    )


if __name__ == "__main__":
    print(json.dumps(run().to_dict(), indent=2))
