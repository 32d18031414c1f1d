"""The decoded-image cache: decode and resize every image once, keep the tensors, and run only the per-item steps.

A split's pipeline is cut in two (engine.transforms.split_transforms): the deterministic part (decode, RGB,
CHW tensor, resize, centre crop) runs once per image while the cache is filled, up front, in threads (Pillow's
decoders and torch's resize release the GIL); the rest (random augmentation, scaling to float, normalisation)
runs on every draw. Without augmentation an item is exactly the tensor the uncached dataset gives.

The images of a split live in one tensor (N, C, H, W) when they share a size, or in one flat buffer with
offsets when they do not (keep_aspect, presizing of non-square images). DataLoader workers forked from the
training process then share those pages copy-on-write: there is no Python object per image whose reference
count would make each worker copy its page.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from engine.config import ProjectConfig
from engine.data import (
    ArrayDataset,
    EngineDataset,
    ImageFileDataset,
    PreparedData,
    Progress,
    array_to_image,
    target_tensor,
)
from engine.machine import available_memory_bytes
from engine.transforms import Preprocess, split_transforms

MIB = 1024 * 1024
FALLBACK_BOUND_MB = 1024  # the bound when the free memory cannot be read
FREE_MEMORY_SHARE = 0.25  # auto bound: this share of the memory available now


class DecodedImageDataset(EngineDataset):
    """A split's images decoded and resized once; each item is (per_item(image), target tensor)."""

    transform: Callable  # the per-item steps, always set

    def __init__(
        self,
        images: torch.Tensor | None,
        flat: torch.Tensor | None,
        offsets: np.ndarray | None,
        shapes: np.ndarray | None,
        targets: Sequence,
        per_item: Callable,
        task: str,
        names: Sequence[str],
        source: Any = None,
    ):
        self.images = images  # (N, C, H, W) when every image has the same size
        self.flat = flat  # otherwise every image's values one after another ...
        self.offsets = offsets  # ... image i at flat[offsets[i]:offsets[i + 1]] ...
        self.shapes = shapes  # ... shaped (C, H, W) = shapes[i]
        self.targets = list(targets)
        self.transform = per_item
        self.task = task
        self.names = list(names)  # the image path or "row i" of each item, as the source dataset names them
        self.source = source  # the dataset decoded (what the feature cache's fingerprint describes)
        self.failures: list = []  # image files that no longer decoded while filling (engine/sample_failures.py)

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def nbytes(self) -> int:
        held = self.images if self.images is not None else self.flat
        assert held is not None  # one of the two layouts holds the images
        return held.numel() * held.element_size()

    def image(self, index: int) -> torch.Tensor:
        """The cached (decoded, resized) image, before the per-item steps."""
        if self.images is not None:
            return self.images[index]
        assert (
            self.flat is not None and self.offsets is not None and self.shapes is not None
        )  # the variable-size layout
        start, end = int(self.offsets[index]), int(self.offsets[index + 1])
        return self.flat[start:end].view(*(int(v) for v in self.shapes[index]))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(self.image(index)), target_tensor(self.targets[index], self.task)


# ---------------------------------------------------------------------------------------------
# Memory


def memory_bound(max_mb: int | None) -> tuple[int, str]:
    """(bound in bytes, how it was chosen) for loader.decoded_cache_max_mb."""
    if max_mb is not None:
        return int(max_mb) * MIB, f"loader.decoded_cache_max_mb = {max_mb}"
    from engine.distributed import local_processes

    free = available_memory_bytes()
    share = local_processes()  # several processes on this machine each hold a cache
    each = f", shared by {share} processes" if share > 1 else ""
    if free is None:
        return FALLBACK_BOUND_MB * MIB // share, f"{FALLBACK_BOUND_MB} MiB, as the free memory is unknown{each}"
    return int(free * FREE_MEMORY_SHARE) // share, f"a quarter of the {free / MIB:,.0f} MiB of memory available{each}"


def _itemsize(dataset: Dataset) -> int:
    if isinstance(dataset, ArrayDataset) and dataset.array.dtype != np.uint8:
        return 4  # 16-bit and float arrays stay float32, so nothing is rounded
    return 1


# ---------------------------------------------------------------------------------------------
# Filling


class CacheTooLarge(Exception):
    """The images decoded so far already overrun the bound (wide images presized by their shorter side)."""


def _raw_getter(dataset: Dataset, failures: list | None = None) -> tuple[Callable[[int], object], list[str]]:
    """A function giving item i as the pipeline takes it (PIL image or array tensor), and a name per item.

    An image file that no longer decodes is replaced by the dataset's stand-in for it (as training would serve
    it); what was met goes into failures (engine/sample_failures.py)."""
    if isinstance(dataset, ImageFileDataset):

        def read(i: int) -> object:
            _, image, met = dataset.read(i, stand_in=True)
            if met and failures is not None:
                failures.extend(met)  # list.extend is atomic: the filling threads share the list
            return image

        return read, [str(f) for f in dataset.files]
    if isinstance(dataset, ArrayDataset):
        rows = dataset.rows if dataset.rows is not None else range(len(dataset))
        return (lambda i: array_to_image(dataset.array[rows[i]])), [f"row {r}" for r in rows]
    raise TypeError(f"no decoded-image cache for {type(dataset).__name__}")


def decode_dataset(
    dataset: EngineDataset,
    fixed: Callable,
    per_item: Callable,
    *,
    fixed_size: bool,
    bound: int | None = None,
    progress: Progress = None,
    threads: int | None = None,
) -> DecodedImageDataset:
    """Run `fixed` over every item of an ImageFileDataset or ArrayDataset in threads and keep the results.

    fixed_size: every output has the same shape (a centre crop), so the results go straight into one
    preallocated tensor. Raises CacheTooLarge when variable-size results pass `bound` bytes.
    """
    failures: list = []
    read, names = _raw_getter(dataset, failures)
    n = len(dataset)
    threads = threads or max(
        1, min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1), 16)
    )
    step = max(1, n // 100)

    def one(i: int) -> torch.Tensor:
        return fixed(read(i)).as_subclass(torch.Tensor)

    if n == 0:
        return DecodedImageDataset(
            torch.empty(0, 3, 1, 1, dtype=torch.uint8), None, None, None, [], per_item, dataset.task, [], source=dataset
        )
    first = one(0)
    if fixed_size:
        images = torch.empty((n, *first.shape), dtype=first.dtype)
        images[0] = first

        def put(i: int) -> None:
            images[i] = one(i)

        with ThreadPoolExecutor(threads) as pool:
            for done, _ in enumerate(pool.map(put, range(1, n)), start=2):
                if progress is not None and (done % step == 0 or done == n):
                    progress(done, n)
        done_ds = DecodedImageDataset(
            images, None, None, None, dataset.targets, per_item, dataset.task, names, source=dataset
        )
        done_ds.failures = failures
        return done_ds

    parts: list[torch.Tensor] = [first]
    total = first.numel() * first.element_size()
    with ThreadPoolExecutor(threads) as pool:
        results = pool.map(one, range(1, n))
        for done, image in enumerate(results, start=2):
            parts.append(image)
            total += image.numel() * image.element_size()
            if bound is not None and total > bound:
                pool.shutdown(wait=True, cancel_futures=True)
                raise CacheTooLarge(total)
            if progress is not None and (done % step == 0 or done == n):
                progress(done, n)
    shapes = np.array([tuple(p.shape) for p in parts], dtype=np.int64)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(shapes.prod(axis=1), out=offsets[1:])
    flat = torch.empty(int(offsets[-1]), dtype=first.dtype)
    for i, p in enumerate(parts):
        flat[offsets[i] : offsets[i + 1]] = p.reshape(-1)
    parts.clear()
    done_ds = DecodedImageDataset(
        None, flat, offsets, shapes, dataset.targets, per_item, dataset.task, names, source=dataset
    )
    done_ds.failures = failures
    return done_ds


# ---------------------------------------------------------------------------------------------
# The cache of a run


@dataclass
class CacheOutcome:
    """What apply_decoded_cache did: used or not, why not, and what it cost."""

    used: bool
    setting: str
    estimate: int = 0  # bytes, from the preprocess size
    bound: int = 0  # bytes
    nbytes: int = 0  # bytes actually held
    images: int = 0
    seconds: float = 0.0
    message: str = ""  # the line logged (empty when the setting is "off")


def apply_decoded_cache(
    data: PreparedData,
    cfg: ProjectConfig,
    pre: Preprocess,
    *,
    log: Callable[[str], None] = lambda message: None,
    progress: Progress = None,
) -> CacheOutcome:
    """Replace data.train and data.val by decoded-image datasets when loader.decoded_cache allows and they fit."""
    setting = cfg.loader.decoded_cache
    if setting == "off":
        return CacheOutcome(False, setting)
    d = cfg.data
    splits = [
        (name, ds, train)
        for name, ds, train in (("train", data.train, True), ("val", data.val, False))
        if ds is not None and len(ds) > 0
    ]
    if any(not isinstance(ds, (ImageFileDataset, ArrayDataset)) for _, ds, _ in splits):
        return CacheOutcome(False, setting)
    fixed_size = {
        name: not d.keep_aspect and not (train and d.augment.random_resized_crop) for name, _, train in splits
    }
    # From the preprocess size, before anything is decoded: centre-cropped images are exactly C x crop x crop;
    # keep-aspect ones at most resize x resize; presized ones are counted as square (resize x resize), and the
    # filling stops if wider images overrun the bound.
    estimate = 0
    for name, ds, _ in splits:
        side = pre.crop_size if fixed_size[name] else pre.resize_size
        estimate += len(ds) * 3 * side * side * _itemsize(ds)
    bound, how = memory_bound(cfg.loader.decoded_cache_max_mb)
    images = sum(len(ds) for _, ds, _ in splits)

    def fall_back(size: int, why: str) -> CacheOutcome:
        forced = " although loader.decoded_cache = 'on'" if setting == "on" else ""
        message = (
            f"Decoded-image cache not used{forced}: {why} {size / MIB:,.0f} MiB for {images} images "
            f"exceeds the bound of {bound / MIB:,.0f} MiB ({how}); images are decoded on every epoch. "
            "Raise loader.decoded_cache_max_mb or lower the image size to cache them"
        )
        log(message)
        return CacheOutcome(False, setting, estimate, bound, images=images, message=message)

    if estimate > bound:
        return fall_back(estimate, "the estimated")
    started = time.perf_counter()
    cached: dict[str, DecodedImageDataset] = {}
    held = 0
    for name, ds, train in splits:
        fixed, per_item = split_transforms(pre, d.augment, train=train, keep_aspect=d.keep_aspect)
        try:
            cached[name] = decode_dataset(
                ds, fixed, per_item, fixed_size=fixed_size[name], bound=bound - held, progress=progress
            )
        except CacheTooLarge as exc:
            return fall_back(held + int(exc.args[0]), "the presized images pass")
        held += cached[name].nbytes
    seconds = time.perf_counter() - started
    data.train = cached.get("train", data.train)
    data.val = cached.get("val", data.val)
    message = f"Decoded-image cache: {images} images, {held / MIB:,.1f} MiB, built in {seconds:.1f} s"
    log(message)
    return CacheOutcome(True, setting, estimate, bound, held, images, seconds, message)
