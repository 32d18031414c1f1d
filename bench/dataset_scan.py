"""Scanning a big image folder: the first scan (every image checked once), the second start (the scan cache), and
torchvision's ImageFolder listing the same folder, in the same process.

The folder is generated here (tiny PNGs in 10 class folders) and removed afterwards; nothing is committed.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bench.common import Figure, Section, median

CLASSES = 10


def write_folder(root: Path, count: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for c in range(CLASSES):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        pixels = rng.integers(0, 255, size=(12, 12, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"class{i % CLASSES}" / f"{i:06d}.png", compress_level=1)


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def run(quick: bool = False) -> Section:
    from torchvision.datasets import ImageFolder

    from engine.data import scan_source

    count = 600 if quick else 20_000
    work = Path(tempfile.mkdtemp(prefix="mwb-bench-scan-"))
    old_cache = os.environ.get("MWB_CACHE_DIR")
    os.environ["MWB_CACHE_DIR"] = str(work / "cache")
    try:
        folder = work / "images"
        write_folder(folder, count)
        first = _timed(lambda: scan_source(folder))
        repeats = 3 if quick else 5
        cached, listing = [], []
        for _ in range(repeats):  # alternated, so a noisy neighbour slows both alike
            cached.append(_timed(lambda: scan_source(folder)))
            listing.append(_timed(lambda: ImageFolder(str(folder))))
        second, plain = median(cached), median(listing)
    finally:
        if old_cache is None:
            os.environ.pop("MWB_CACHE_DIR", None)
        else:
            os.environ["MWB_CACHE_DIR"] = old_cache
        shutil.rmtree(work, ignore_errors=True)

    per_10k = 10_000 / count
    return Section(
        name="dataset_scan",
        title="Scanning a big image folder: first scan, scan cache, and torchvision's ImageFolder",
        figures=[
            Figure(
                key="scan_cached_per_10k",
                title="Second start (scan cache): seconds per 10,000 images",
                value=round(second * per_10k, 3),
                unit="s",
                target="<= 0.1",  # the 2 s for 200,000 images
                detail=f"{count} PNGs: {second:.2f} s (median of {repeats}, alternated with ImageFolder)",
            ),
            Figure(
                key="scan_cached_vs_imagefolder",
                title="Second start (scan cache) vs ImageFolder listing the same folder (lower is better)",
                value=round(second / plain, 2),
                unit="x",
                detail=f"scan cache {second:.2f} s, ImageFolder {plain:.2f} s; the scan also stats every file "
                "to know whether it changed",
            ),
            Figure(
                key="scan_first_vs_cached",
                title="First scan (checks every image) vs second start (higher is better)",
                value=round(first / second, 1),
                unit="x",
                detail=f"first scan {first:.2f} s ({first * per_10k:.1f} s per 10,000 images), second {second:.2f} s",
            ),
        ],
        setup=f"{count} generated 12x12 PNGs in {CLASSES} class folders; engine.data.scan_source with an empty "
        f"cache folder, then again; torchvision.datasets.ImageFolder on the same folder. {os.cpu_count()} CPUs.",
        notes=[
            "The first scan checks every image once (its header and its last bytes; a file that looks cut short "
            "is decoded), in worker processes from engine.image_scan.PARALLEL_FROM files up, so that a broken "
            "file is found before training; the second start stats each file and reads the remembered results "
            "instead, which is what ImageFolder's listing costs plus one JSON file.",
        ],
    )


if __name__ == "__main__":
    print(run(quick="--quick" in sys.argv))
