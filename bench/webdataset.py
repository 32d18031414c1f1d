"""Streaming shards against the image folder they were written from: samples per second of one loader pass each,
through the engine's own loaders (the same transforms, batch size and workers), alternated in the same process.

The images are generated here (small PNGs in 10 class folders), written as shards by engine.webdataset_data, and
removed afterwards; nothing is committed.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import Figure, Section, median
from bench.dataset_scan import CLASSES, write_folder


def _pass(loader: Any) -> tuple[int, float]:
    started = time.perf_counter()
    n = 0
    for x, _ in loader:
        n += x.shape[0]
    return n, time.perf_counter() - started


def run(quick: bool = False) -> Section:
    from engine.backbones import preprocess_for
    from engine.config import from_dict
    from engine.data import prepare_data
    from engine.samplers import build_loader, usable_cpus
    from engine.webdataset_data import prepare_webdataset, stream_loader, write_shards

    count = 200 if quick else 6000
    shard_size = 50 if quick else 500
    workers = 0 if usable_cpus() < 4 else 2
    work = Path(tempfile.mkdtemp(prefix="mwb-bench-wds-"))
    old_cache = os.environ.get("MWB_CACHE_DIR")
    os.environ["MWB_CACHE_DIR"] = str(work / "cache")
    try:
        folder = work / "images"
        write_folder(folder, count)
        result = write_shards(folder, work / "shards", shard_size=shard_size)
        common: dict[str, Any] = {
            "schema_version": 1,
            "model": {"backbone": "resnet18"},
            "loader": {"batch_size": 64, "num_workers": workers, "decoded_cache": "off"},
            "train": {"device": "cpu", "seed": 0},
        }
        data_settings = {"image_size": 32, "val_fraction": 0.0}
        folder_cfg = from_dict({**common, "data": {"path": str(folder), **data_settings}}, check_catalog=False)
        shard_cfg = from_dict(
            {**common, "data": {"path": result.patterns()["train"], "kind": "webdataset", **data_settings}},
            check_catalog=False,
        )
        folder_data = prepare_data(folder_cfg, preprocess_for(folder_cfg.model, folder_cfg.data))
        shard_data = prepare_webdataset(shard_cfg, preprocess_for(shard_cfg.model, shard_cfg.data))
        loaders = {
            "folder": build_loader(
                folder_data.train,
                folder_cfg.loader,
                train=True,
                targets=None,
                collate_fn=None,
                seed=0,
                pin_memory=False,
            ),
            "shards": stream_loader(
                shard_data.train, shard_cfg.loader, collate_fn=None, seed=0, pin_memory=False, workers=workers
            ),
        }
        repeats = 2 if quick else 5
        rates: dict[str, list[float]] = {"folder": [], "shards": []}
        seen: dict[str, int] = {}
        for _ in range(repeats):  # alternated, so a noisy neighbour slows both alike
            for name, loader in loaders.items():
                n, seconds = _pass(loader)
                seen[name] = n
                rates[name].append(n / seconds)
        folder_rate, shard_rate = median(rates["folder"]), median(rates["shards"])
        shards = len(result.shards["train"])
    finally:
        if old_cache is None:
            os.environ.pop("MWB_CACHE_DIR", None)
        else:
            os.environ["MWB_CACHE_DIR"] = old_cache
        shutil.rmtree(work, ignore_errors=True)

    return Section(
        name="webdataset",
        title="Streaming shards vs the same images as a folder: samples per second of a loader pass",
        figures=[
            Figure(
                key="shards_vs_folder",
                title="Shards vs image folder, samples per second of one loader pass (higher is better)",
                value=round(shard_rate / folder_rate, 2),
                unit="x",
                target=">= 0.9",
                detail=f"shards {shard_rate:,.0f} samples/s, folder {folder_rate:,.0f} samples/s "
                f"(medians of {repeats} alternated passes of {seen['shards']} and {seen['folder']} samples)",
            ),
        ],
        setup=f"{count} generated 12x12 PNGs in {CLASSES} class folders and the same images in {shards} shards of "
        f"{shard_size} (main.py shard); the engine's training loaders (resized to 32 px, batch 64, {workers} "
        f"workers, decoded-image cache off, shuffled: a shuffle buffer of 1000 for the shards), one pass each. "
        f"{os.cpu_count()} CPUs.",
        notes=[
            "Both decode every PNG with engine.data.load_image and run the same transforms; the shards read "
            "each tar file front to back instead of opening one file per image.",
        ],
    )


if __name__ == "__main__":
    print(run(quick="--quick" in sys.argv))
