"""Input pipeline: epoch time with the decoded-image cache and auto workers vs decoding every epoch.

The bundled digits (1,797 PNGs) at the default project's preprocessing (timm/efficientnet_lite0: 224 px,
bicubic), batches of the default project's size. Three loaders over the same training split:
  plain:    no cache, 0 workers (decode, resize, crop, augment, normalise every item, every epoch);
  cached:   the decoded-image cache with the automatic worker choice (what a project gets by default);
  workers:  no cache, with the automatic worker choice.
Figures are throughput ratios (plain time / variant time) of a full pass over the training loader, with the
default project's augmentation off and on, plus a short training epoch of a small CNN, and the one-off cache
build relative to one uncached epoch.
"""

from __future__ import annotations

import copy
import functools
import json
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.utils.data import DataLoader

from bench.common import REPO, Figure, Section, alternate, machine, median, ratio
from engine.collate import get_collate
from engine.config import ProjectConfig, load_project
from engine.data import EngineDataset, prepare_data
from engine.decoded_cache import apply_decoded_cache
from engine.samplers import LoaderPlan, auto_workers, build_loader, plan_loader, usable_cpus
from engine.transforms import build_transforms, has_random_steps, split_transforms

PROJECT = REPO / "examples" / "single_phase.json"


def _project(augment: bool) -> ProjectConfig:
    cfg = load_project(PROJECT)
    cfg.loader.num_workers = None
    cfg.loader.persistent_workers = None
    if not augment:
        cfg.data.augment.rotation = 0.0
        cfg.data.augment.color_jitter = 0.0
        cfg.data.augment.horizontal_flip = False
        cfg.data.augment.random_resized_crop = False
    return cfg


def _with_transform(dataset: EngineDataset, transform: Callable) -> EngineDataset:
    clone = copy.copy(dataset)  # shares the files / cached images; only the per-item steps differ
    clone.transform = transform
    return clone


def _loader(
    dataset: EngineDataset, cfg: ProjectConfig, *, cached: bool, workers: int | None
) -> tuple[DataLoader, LoaderPlan]:
    augmented = has_random_steps(cfg.data.augment, train=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    plan = plan_loader(cfg.loader, cached=cached, augmented=augmented, device_type=device)
    if workers is not None:
        plan.workers, plan.persistent, plan.auto_workers = workers, workers > 0, False
    loader = build_loader(
        dataset,
        cfg.loader,
        train=True,
        targets=None,
        collate_fn=get_collate(cfg.loader.collate),
        seed=0,
        pin_memory=False,
        plan=plan,
    )
    return loader, plan


def _pass(
    loader: Iterable[Any], limit: int | None, step: Callable[[torch.Tensor, torch.Tensor], None] | None = None
) -> int:
    n = 0
    for i, (x, y) in enumerate(loader):
        if limit is not None and i >= limit:
            break
        if step is not None:
            step(x, y)
        n += x.shape[0]
    return n


def _workers(n: int) -> str:
    return f"{n} worker{'' if n == 1 else 's'}"


def _small_cnn(classes: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 5, stride=4, padding=2),
        torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, stride=2, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(32, classes),
    )


def run(quick: bool = False) -> Section:
    from engine.backbones import preprocess_for

    plain_cfg = _project(augment=False)
    aug_cfg = _project(augment=True)
    pre = preprocess_for(plain_cfg.model, plain_cfg.data)

    # The uncached datasets, and the same split through the cache (built three times to time the build).
    uncached = prepare_data(plain_cfg, pre)
    builds = []
    for _ in range(1 if quick else 3):
        cached = prepare_data(plain_cfg, pre)
        started = time.perf_counter()
        outcome = apply_decoded_cache(cached, plain_cfg, pre)
        builds.append(time.perf_counter() - started)
        if not outcome.used:
            return Section(
                name="input_pipeline",
                title="Input pipeline: decoded-image cache and auto workers",
                skipped=f"the cache does not fit here: {outcome.message}",
            )

    plain_train = uncached.train
    aug_plain_train = _with_transform(
        plain_train, build_transforms(pre, aug_cfg.data.augment, train=True, keep_aspect=False)
    )
    _, aug_per_item = split_transforms(pre, aug_cfg.data.augment, train=True, keep_aspect=False)
    cached_train = cached.train
    aug_cached_train = _with_transform(cached_train, aug_per_item)

    figures: list[Figure] = []
    notes: list[str] = []
    limit = 15 if quick else None  # batches per pass
    repeats = 2 if quick else 5
    chosen = {}
    for label, cfg, plain_ds, cached_ds, reps in (
        ("no augmentation", plain_cfg, plain_train, cached_train, repeats),
        ("default augmentation", aug_cfg, aug_plain_train, aug_cached_train, max(2, repeats - 2)),
    ):
        if quick and label != "no augmentation":
            continue
        loaders = {
            "plain": _loader(plain_ds, cfg, cached=False, workers=0),
            "cached": _loader(cached_ds, cfg, cached=True, workers=None),
            "workers": _loader(plain_ds, cfg, cached=False, workers=None),
        }
        chosen[label] = {name: plan.workers for name, (_, plan) in loaders.items()}
        workers_why = "auto"
        if chosen[label]["workers"] == 0:
            # Auto chose no workers here (training on few CPUs), which is the plain loader again: measure the
            # count a GPU run on this machine would get instead, so the figure says what workers do here.
            gpu_count = auto_workers(
                usable_cpus(), cached=False, augmented=label != "no augmentation", accelerator=True
            )[0]
            if gpu_count > 0:
                loaders["workers"] = _loader(plain_ds, cfg, cached=False, workers=gpu_count)
                workers_why = "auto for GPU training; auto for CPU training here is 0, the plain loader"
            else:
                del loaders["workers"]
        times = alternate({name: functools.partial(_pass, ld, limit) for name, (ld, _) in loaders.items()}, reps)
        key = "noaug" if label == "no augmentation" else "aug"
        per_pass = "first 15 batches" if quick else f"{len(loaders['plain'][0])} batches"
        figures.append(
            Figure(
                key=f"epoch_speedup_cached_{key}",
                title=f"Train-loader pass, {label}: cache + auto workers vs plain",
                value=round(ratio(times, "cached", "plain"), 2),
                unit="x",
                detail=f"{per_pass}; plain {median(times['plain']):.2f} s, cached {median(times['cached']):.2f} s "
                f"({_workers(chosen[label]['cached'])}, auto)",
            )
        )
        if "workers" in loaders:
            figures.append(
                Figure(
                    key=f"epoch_speedup_workers_{key}",
                    title=f"Train-loader pass, {label}: no cache + workers vs plain",
                    value=round(ratio(times, "workers", "plain"), 2),
                    unit="x",
                    detail=f"{per_pass}; plain {median(times['plain']):.2f} s, no cache with "
                    f"{_workers(loaders['workers'][1].workers)} ({workers_why}) {median(times['workers']):.2f} s",
                )
            )
        if key == "noaug":
            full = median(times["plain"])
            if quick:  # a quick pass is partial: scaled to the whole split (the quick form checks shape, not speed)
                full *= len(loaders["plain"][0]) / min(limit or 1, len(loaders["plain"][0]))
            figures.append(
                Figure(
                    key="cache_build_vs_epoch",
                    title="One-off cache build vs one uncached epoch (lower is better)",
                    value=round(median(builds) / full, 2),
                    unit="x",
                    detail=f"build {median(builds):.2f} s ({outcome.images} images, {outcome.nbytes / 2**20:.0f} MiB, "
                    f"train and validation) vs one plain pass over the training split {full:.2f} s",
                )
            )
        del loaders

    # A short training epoch of a small CNN with the default augmentation: the cache saves the decoding, the
    # model's own work stays.
    classes = len(uncached.class_names)
    model = _small_cnn(classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    train_limit = 10 if quick else 25
    loaders = {
        "plain": _loader(aug_plain_train, aug_cfg, cached=False, workers=0),
        "cached": _loader(aug_cached_train, aug_cfg, cached=True, workers=None),
    }
    times = alternate(
        {name: functools.partial(_pass, ld, train_limit, step) for name, (ld, _) in loaders.items()}, 2 if quick else 3
    )
    figures.append(
        Figure(
            key="training_speedup_cached_aug",
            title="Short training epoch (small CNN, default augmentation): cache + auto workers vs plain",
            value=round(ratio(times, "cached", "plain"), 2),
            unit="x",
            detail=f"{train_limit} batches; plain {median(times['plain']):.2f} s, cached {median(times['cached']):.2f} s "
            f"({_workers(loaders['cached'][1].workers)}, auto)",
        )
    )
    del loaders

    cpus = usable_cpus()
    notes.append(
        "Ratios are throughput: plain time / variant time (above 1 is faster). No target: the issue asks "
        "for epoch time with vs without; the gain depends on how costly decoding is next to the "
        "random augmentation and the model's own work."
    )
    notes.append(
        "The digits are 8x8 PNGs, so decoding is cheap and the cache mostly saves the resize to "
        f"{pre.crop_size} px; larger files (photo-sized JPEGs) cost more to decode, which the cache "
        "saves too (not measured here)."
    )
    notes.append(
        "A data-only pass leaves the training process idle, so workers show only their cost there "
        "(batches pickled between processes); with a model to run, their loading overlaps its work. "
        "The machine may be shared: compare ratios from one run only."
    )
    notes.append(
        f"Auto workers here ({cpus} usable CPUs, training on "
        f"{'a GPU' if torch.cuda.is_available() else 'the CPU'}): "
        + "; ".join(f"{label}: cached {c['cached']}, uncached {c['workers']}" for label, c in chosen.items())
        + ". On the CPU, workers take cores from the model's threads; on a GPU all CPUs but one load."
    )
    return Section(
        name="input_pipeline",
        title="Input pipeline: decoded-image cache and auto workers",
        figures=figures,
        setup=(
            f"bundled digits ({len(uncached.train)} training images), examples/single_phase.json's preprocessing "
            f"({pre.resize_size}/{pre.crop_size} px, {pre.interpolation}), "
            f"batch size {plain_cfg.loader.batch_size}, "
            f"torch threads {torch.get_num_threads()}, {cpus} usable CPUs; "
            f"{'quick: partial passes, 2 repetitions' if quick else f'{repeats} alternating repetitions'}, "
            "median"
        ),
        notes=notes,
    )


if __name__ == "__main__":
    import sys

    section = run(quick="--quick" in sys.argv)
    print(json.dumps({"machine": machine(), "section": section.to_dict()}, indent=2))
