"""The decoded-image cache on disk: memory of two torchrun processes sharing one cache file vs one process alone.

An image folder is generated (not committed), decoded at a 160 px centre crop (quick: 96 px, fewer images), and
measured three ways, each process touching every cached image and then reading its own /proc/self/smaps_rollup
while all processes of its run are alive (a gloo barrier on either side):
  alone:    one process, the cache in its memory (loader.decoded_cache_disk off, as before the file existed);
  disk:     two torchrun processes on this machine with the disk-backed cache (auto picks it under torchrun):
            one writes the file, the other waits and maps it;
  memory:   two torchrun processes each holding its own cache in memory (the old way; not run in --quick);
  none:     one process without the cache, for what a process holds besides it (not run in --quick).
Resident memory is PSS (proportional set size: a page shared by two processes counts half in each, so the sum over
processes is what they hold together); RSS would count the shared file pages once per process. USS (private
pages only) is given alongside.

    python bench/decoded_cache.py --child OUT_DIR PROJECT.json CROP    (one measured process; what run() starts)
    python bench/decoded_cache.py [--quick]                             (the benchmark; prints its section)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if __name__ == "__main__":  # started as a script (by torchrun): the repository's packages first
    sys.path.insert(0, str(REPO))

from bench.common import Figure, Section, machine  # noqa: E402

MIB = 1024 * 1024


def smaps_rollup() -> dict[str, int]:
    """This process's memory from /proc/self/smaps_rollup, in bytes (Linux)."""
    out: dict[str, int] = {}
    with open("/proc/self/smaps_rollup") as fh:
        for line in fh:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                out[parts[0].rstrip(":")] = int(parts[1]) * 1024
    return out


def child(out_dir: str, project: str, crop: int) -> None:
    """One measured process: cache the project's images as a run does, touch them all, report its memory."""
    import torch
    import torch.distributed as dist

    from engine.config import load_project
    from engine.data import prepare_data
    from engine.decoded_cache import DecodedImageDataset, apply_decoded_cache
    from engine.transforms import Preprocess

    torch.set_num_threads(1)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        dist.init_process_group("gloo")
    cfg = load_project(project)
    pre = Preprocess(resize_size=crop, crop_size=crop, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    data = prepare_data(cfg, pre)
    logged: list[str] = []
    outcome = apply_decoded_cache(data, cfg, pre, log=logged.append)
    checksum = 0
    for split in (data.train, data.val):  # every page of the cache resident in this process
        if isinstance(split, DecodedImageDataset):
            held = split.images if split.images is not None else split.flat
            assert held is not None
            checksum += int(held.sum(dtype=torch.int64))
    if distributed:
        dist.barrier()  # every process has its cache resident before any measures
    memory = smaps_rollup()
    if distributed:
        dist.barrier()  # and none exits (giving its share of the pages to the others) before all have measured
        dist.destroy_process_group()
    rank = os.environ.get("RANK", "0")
    record: dict[str, Any] = {
        "pid": os.getpid(),
        "rss": memory.get("Rss", 0),
        "pss": memory.get("Pss", 0),
        "uss": memory.get("Private_Clean", 0) + memory.get("Private_Dirty", 0),
        "cache_bytes": outcome.nbytes,
        "files": [str(p) for p in outcome.files],
        "written": outcome.written,
        "checksum": checksum,
        "log": logged,
    }
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(record))


def write_folder(folder: Path, count: int, size: int = 48) -> None:
    """count noisy PNGs in four class folders."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(count):
        sub = folder / f"class{i % 4}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(sub / f"{i:06d}.png")


def _measure(
    work: Path, project: Path, crop: int, processes: int, disk: str, name: str, cache: str = "on"
) -> list[dict[str, Any]]:
    """Run `processes` measured processes (torchrun when more than one) and return their records by rank."""
    spec = json.loads(project.read_text())
    spec["loader"].update(decoded_cache=cache, decoded_cache_disk=disk)
    run_project = work / f"{name}.json"
    run_project.write_text(json.dumps(spec))
    out = work / name
    out.mkdir()
    script = [str(Path(__file__).resolve()), "--child", str(out), str(run_project), str(crop)]
    if processes == 1:
        cmd = [sys.executable, *script]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={processes}",
            "--max_restarts=0",
            *script,
        ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"{name}: exit {done.returncode}\n{(done.stdout + done.stderr)[-3000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(processes)]


def run(quick: bool = False) -> Section:
    count, crop = (240, 96) if quick else (3000, 224)
    work = Path(tempfile.mkdtemp(prefix="mwb-bench-decoded-"))
    old_cache = os.environ.get("MWB_CACHE_DIR")
    os.environ["MWB_CACHE_DIR"] = str(work / "cache")  # a fresh cache folder: the disk run writes its file
    try:
        write_folder(work / "images", count)
        project = work / "project.json"
        project.write_text(
            json.dumps(
                {
                    "schema_version": 1,
                    "name": "bench",
                    "data": {"path": str(work / "images"), "val_fraction": 0.2},
                    "model": {"backbone": "resnet18"},
                    "loader": {"decoded_cache": "on"},
                    "train": {"device": "cpu"},
                }
            )
        )
        alone = _measure(work, project, crop, 1, "off", "alone")
        disk = _measure(work, project, crop, 2, "auto", "disk")
        memory = None if quick else _measure(work, project, crop, 2, "off", "memory")
        none = None if quick else _measure(work, project, crop, 1, "off", "none", cache="off")
    finally:
        if old_cache is None:
            os.environ.pop("MWB_CACHE_DIR", None)
        else:
            os.environ["MWB_CACHE_DIR"] = old_cache
        shutil.rmtree(work, ignore_errors=True)

    # Each file written once, by whichever process took its lock first, and mapped by the other.
    if len({tuple(r["files"]) for r in disk}) != 1 or sum(r["written"] for r in disk) != len(disk[0]["files"]):
        raise RuntimeError(f"the two processes did not share one set of files: {disk}")
    if {r["checksum"] for r in [*alone, *disk]} != {alone[0]["checksum"]}:
        raise RuntimeError("the mapped cache does not hold the same pixels as the one in memory")
    cache = alone[0]["cache_bytes"]
    one = alone[0]["pss"]
    together = sum(r["pss"] for r in disk)
    figures = [
        Figure(
            key="two_processes_disk_vs_one",
            title="Two torchrun processes with the disk-backed cache: memory (PSS) of both vs one process alone",
            value=round(together / one, 3),
            unit="x",
            target="<= 1.5",
            detail=f"{together / MIB:,.0f} MiB together vs {one / MIB:,.0f} MiB alone; "
            f"USS {sum(r['uss'] for r in disk) / MIB:,.0f} vs {alone[0]['uss'] / MIB:,.0f} MiB; "
            f"RSS {sum(r['rss'] for r in disk) / MIB:,.0f} vs {alone[0]['rss'] / MIB:,.0f} MiB",
        ),
        Figure(
            key="cache_mib",
            title="The decoded-image cache",
            value=round(cache / MIB, 1),
            unit="MiB",
            detail=f"{count} images at {crop} px, one file per split, each written by one process and mapped by the other",
        ),
    ]
    if none is not None:
        base = none[0]["pss"]
        figures.insert(
            1,
            Figure(
                key="cache_memory_two_vs_one",
                title="The cache's share of that memory: two processes with the disk-backed cache vs one alone",
                value=round((together - 2 * base) / (one - base), 3),
                unit="x",
                target="<= 1.2",
                detail=f"PSS beyond a process without the cache ({base / MIB:,.0f} MiB): "
                f"{(together - 2 * base) / MIB:,.0f} MiB for two vs {(one - base) / MIB:,.0f} MiB for one; "
                "1.0 is one copy, 2.0 a copy each",
            ),
        )
    if memory is not None:
        apart = sum(r["pss"] for r in memory)
        figures.insert(
            1,
            Figure(
                key="two_processes_memory_vs_one",
                title="Two torchrun processes each holding its cache in memory (before): PSS of both vs one alone",
                value=round(apart / one, 3),
                unit="x",
                detail=f"{apart / MIB:,.0f} MiB together vs {one / MIB:,.0f} MiB alone",
            ),
        )
    return Section(
        name="decoded_cache",
        title="Decoded-image cache on disk: two torchrun processes on one machine share one copy",
        figures=figures,
        setup=f"{count} generated 48 px PNGs cached at {crop} px, uint8; each process touches every cached image, "
        "then reads /proc/self/smaps_rollup while the others are alive; "
        f"{machine().get('cpu_count')} CPUs",
        notes=[
            "PSS counts a page shared by two processes half in each, so the sum is what they hold together; "
            "the rest of each process (PyTorch and the libraries) is not shared beyond its read-only code, so two "
            "processes cannot reach 1.0x.",
        ],
    )


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        print(json.dumps(run(quick="--quick" in sys.argv).to_dict(), indent=2))
