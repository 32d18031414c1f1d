"""The learning-rate finder's cost (issue 15): seconds with and without the feature cache, on the default project.

examples/single_phase.json (EfficientNet-Lite0 with its bundled ImageNet weights, frozen up to blocks.2, on the bundled
digits) without its augmentation, so that the feature cache applies: the finder runs with train.feature_cache =
"auto" and "off", alternated (A B, B A, ...), each time from a cleared process cache, so the cached figure includes
finding the cut and computing the features. Both draw the same batches, so their suggestions should agree.
"""

from __future__ import annotations

import functools
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from bench.common import DIGITS, REPO, Figure, Section, alternate, digits_subset, machine, median


def _project(data: Path, mode: str, quick: bool) -> Any:
    from engine.config import from_dict

    project = json.loads((REPO / "examples" / "single_phase.json").read_text(encoding="utf-8"))
    project["data"]["path"] = str(data)
    project["data"]["augment"] = {}  # the cache needs the same images every epoch
    project["train"].update(device="cpu", feature_cache=mode)
    project["output"] = {"dir": str(data.parent / "runs"), "tensorboard": False}
    if quick:  # a smoke run: small random-init images instead of the weights' 224 px
        project["loader"]["batch_size"] = 4
        project["model"]["weights"] = None
        project["data"].update(image_size=32, mean=[0.5], std=[0.5])
    return from_dict(project)


def _find(cfg: Any, results: list[dict[str, Any]], batches: int) -> None:
    from engine import feature_cache
    from engine.lr_finder import find_lr

    feature_cache.clear()  # every run pays for its features: the first finder on a project does
    result = find_lr(cfg, num_batches=batches)
    if result.feature_cache != (cfg.train.feature_cache == "auto"):
        raise RuntimeError(
            f"feature_cache = {cfg.train.feature_cache!r} but the finder's cache use was {result.feature_cache}"
        )
    results.append({"seconds": result.seconds, "suggestion": result.suggestion, "batches": len(result.lrs)})


def run(quick: bool = False) -> Section:
    import torch

    work = Path(tempfile.mkdtemp(prefix="bench-lr-finder-"))
    try:
        if quick:
            data, repeats, batches = digits_subset(work, 3), 1, 5
        else:
            data = work / "digits"
            shutil.copytree(DIGITS, data)
            repeats, batches = 2, 100
        n = sum(1 for _ in data.rglob("*.png"))
        runs: dict[str, list[dict[str, Any]]] = {"cached": [], "recomputed": []}
        configs = {"cached": _project(data, "auto", quick), "recomputed": _project(data, "off", quick)}
        alternate(
            {name: functools.partial(_find, configs[name], runs[name], batches) for name in configs},
            repeats,
            warmup=0,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    cached = median([r["seconds"] for r in runs["cached"]])
    recomputed = median([r["seconds"] for r in runs["recomputed"]])
    steps = runs["cached"][0]["batches"]
    suggestions = {name: rs[0]["suggestion"] for name, rs in runs.items()}
    agree = "the same suggestion" if suggestions["cached"] == suggestions["recomputed"] else "suggestions differ"

    def shown(value: float | None) -> str:
        return "none" if value is None else f"{value:.3g}"

    figures = [
        Figure(
            key="lr_finder_cached_seconds",
            title="finder with the feature cache (computing the features included)",
            value=cached,
            unit="s",
            detail=f"{steps} batches; suggested lr {shown(suggestions['cached'])}",
        ),
        Figure(
            key="lr_finder_recomputed_seconds",
            title="finder without the feature cache",
            value=recomputed,
            unit="s",
            detail=f"{steps} batches; suggested lr {shown(suggestions['recomputed'])} ({agree})",
        ),
        Figure(
            key="lr_finder_cache_speedup",
            title="finder speed-up from the feature cache",
            value=recomputed / cached,
            unit="x",
            detail="seconds without / seconds with the cache, medians of the alternated runs",
        ),
    ]
    return Section(
        name="lr_finder",
        title="Learning-rate finder",
        figures=figures,
        setup=(
            f"examples/single_phase.json without augmentation (timm/efficientnet_lite0, bundled weights, frozen up to "
            f"blocks.2) on the digits image folder ({n} images, 20% validation), batch "
            f"{configs['cached'].loader.batch_size}, a ramp of at most {batches} batches (one epoch), CPU, "
            f"{torch.get_num_threads()} torch threads; cached and recomputed alternated, {repeats} repetition(s), "
            "medians"
        ),
        notes=[
            "The cached finder computes the frozen part's output for the training and validation images once, then "
            "ramps the part after blocks.2 on it; the recomputed one runs the whole network on every batch.",
            f"Machine: {machine().get('cpu', machine()['processor'])}",
        ],
    )


if __name__ == "__main__":
    print(json.dumps(run().to_dict(), indent=2))
