"""A big image folder (200,000 tiny PNGs, generated here and removed afterwards): the first scan's time and peak
memory, the second start's scan, and the time from `main.py train` to its first training batch against a
hand-written torchvision ImageFolder script on the same folder.

Each measurement runs in a fresh Python process, as a user's start does: the scans import engine.data and time
scan_source alone; the two trainings are timed from the process's start to the line each prints after its first
optimizer step (main.py's --events batch line; the script's own print), imports included.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from bench.common import REPO, Figure, Section

CLASSES = 10

_SCAN = """
import json, resource, sys, time
from bench.large_dataset import baselines
from engine import image_scan
from engine.data import scan_source
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
started = time.perf_counter()
source = scan_source(sys.argv[1])
took = time.perf_counter() - started
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
walk_stat, listing = baselines(sys.argv[1])
print(json.dumps({"seconds": took, "images": len(source), "skipped": len(source.skipped), "rss_before_kib": before,
                  "rss_peak_kib": peak, "workers": image_scan.worker_count(len(source.files)),
                  "walk_stat_s": walk_stat, "imagefolder_s": listing}))
"""

# What a person writes: ImageFolder, the usual transforms, a DataLoader, resnet18, one step; prints after it.
_SCRIPT = """
import sys, torch, torchvision
from torchvision import transforms as T
tf = T.Compose([T.Resize(32), T.CenterCrop(32), T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
data = torchvision.datasets.ImageFolder(sys.argv[1], transform=tf)
loader = torch.utils.data.DataLoader(data, batch_size=32, shuffle=True, num_workers=int(sys.argv[2]))
model = torchvision.models.resnet18(num_classes=len(data.classes))
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
for x, y in loader:
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    print("first batch", flush=True)
    break
"""


def _write_share(root: str, start: int, stop: int) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(start)
    pixels = rng.integers(0, 256, size=(stop - start, 8, 8, 3), dtype=np.uint8)  # each file its own content
    for i in range(start, stop):
        Image.fromarray(pixels[i - start]).save(f"{root}/class{i % CLASSES}/{i:07d}.png", compress_level=1)


def write_folder(root: Path, count: int) -> float:
    """count distinct 8x8 PNGs in CLASSES folders, written by a process per CPU; returns the seconds it took."""
    started = time.perf_counter()
    for c in range(CLASSES):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
    shares = [(start, min(start + 5000, count)) for start in range(0, count, 5000)]
    if len(shares) == 1:  # a small folder: not worth starting processes
        _write_share(str(root), 0, count)
        return time.perf_counter() - started
    with ProcessPoolExecutor(os.cpu_count(), mp_context=multiprocessing.get_context("forkserver")) as pool:
        list(pool.map(_write_share, [str(root)] * len(shares), [a for a, _ in shares], [b for _, b in shares]))
    return time.perf_counter() - started


def baselines(folder: str | Path) -> tuple[float, float]:
    """Seconds of (os.walk + os.stat of each file, sorted as a scan is: the floor any scan that notices a changed
    file pays; torchvision ImageFolder's listing, no stat and no check: what the hand-written script pays)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    started = time.perf_counter()
    for parent, subfolders, names in os.walk(folder):
        subfolders.sort()
        for name in sorted(names):
            os.stat(os.path.join(parent, name))
    walk_stat = time.perf_counter() - started
    started = time.perf_counter()
    make_dataset(os.fspath(folder), find_classes(os.fspath(folder))[1], IMG_EXTENSIONS)
    return walk_stat, time.perf_counter() - started


def _env(cache: Path) -> dict[str, str]:
    return {**os.environ, "MWB_CACHE_DIR": str(cache), "PYTHONPATH": str(REPO)}


def _scan(folder: Path, cache: Path) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-c", _SCAN, str(folder)], cwd=REPO, env=_env(cache), capture_output=True, text=True
    )
    if out.returncode != 0:
        raise RuntimeError(f"scan failed: {out.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def _scan_here(folder: Path, cache: Path) -> dict[str, Any]:
    import resource

    from engine import image_scan
    from engine.data import scan_source

    old = os.environ.get("MWB_CACHE_DIR")
    os.environ["MWB_CACHE_DIR"] = str(cache)
    try:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        started = time.perf_counter()
        source = scan_source(folder)
        took = time.perf_counter() - started
    finally:
        if old is None:
            os.environ.pop("MWB_CACHE_DIR", None)
        else:
            os.environ["MWB_CACHE_DIR"] = old
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    workers = image_scan.worker_count(len(source.files))
    walk_stat, listing = baselines(folder)
    return {
        "walk_stat_s": walk_stat,
        "imagefolder_s": listing,
        "seconds": took,
        "images": len(source),
        "skipped": len(source.skipped),
        "rss_before_kib": before,
        "rss_peak_kib": peak,
        "workers": workers,
    }


def _first_batch(command: list[str], cache: Path, is_first: Any) -> float:
    """Seconds from starting the process to the first stdout line is_first accepts; the process is then ended."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        command, cwd=REPO, env=_env(cache), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if is_first(line):
                return time.perf_counter() - started
        raise RuntimeError(f"{' '.join(command[:3])} ended (exit {proc.wait()}) before its first batch")
    finally:
        proc.kill()
        proc.wait()


def _is_batch(line: str) -> bool:
    from engine.events import BatchProgress, decode

    return isinstance(decode(line), BatchProgress)


def run(quick: bool = False) -> Section:
    from bench.hand_script import write_project
    from engine.config import load_project
    from engine.samplers import plan_loader

    count = 300 if quick else 200_000
    work = Path(tempfile.mkdtemp(prefix="mwb-bench-large-"))
    times: dict[str, list[float]] = {"main": [], "script": []}
    try:
        folder, cache = work / "images", work / "cache"
        made = write_folder(folder, count)
        # quick (the test of this benchmark): the scans in this process, no trainings; the figures mean nothing.
        scan = _scan_here if quick else _scan
        first = scan(folder, cache)
        second = scan(folder, cache)
        if first["images"] != count or second["images"] != count:
            raise RuntimeError(f"expected {count} images, the scans found {first['images']} and {second['images']}")
        project = write_project(
            work / "p.json", folder, work / "runs", size=32, batch=32, epochs=1, freeze_up_to="conv1", caches=False
        )
        workers = plan_loader(load_project(project).loader, cached=False, augmented=False).workers
        script = work / "script.py"
        script.write_text(_SCRIPT)
        main_py = [sys.executable, str(REPO / "main.py"), "train", str(project), "--events"]
        hand = [sys.executable, str(script), str(folder), str(workers)]
        for _ in range(0 if quick else 2):  # alternated, so a noisy neighbour slows both alike
            times["main"].append(_first_batch(main_py, cache, _is_batch))
            times["script"].append(_first_batch(hand, cache, lambda line: line.startswith("first batch")))
            shutil.rmtree(work / "runs", ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if quick:
        first_batch = Figure(
            key="first_batch_vs_script",
            title="`main.py train` to its first batch ÷ a hand-written ImageFolder script's (scan cache present)",
            value=None,
            unit="x",
            detail="not measured in the quick form",
        )
    else:
        main_t, script_t = min(times["main"]), min(times["script"])
        first_batch = Figure(
            key="first_batch_vs_script",
            title="`main.py train` to its first batch ÷ a hand-written ImageFolder script's (scan cache present)",
            value=round(main_t / script_t, 2),
            unit="x",
            target="<= 2",
            detail=f"main.py {main_t:.1f} s, script {script_t:.1f} s (each the faster of {len(times['main'])}, "
            "from process start, imports included); caches off on both sides",
        )
    per = 1024 if sys.platform == "darwin" else 1  # ru_maxrss: bytes on macOS, KiB elsewhere
    peak_mib = first["rss_peak_kib"] / per / 1024
    grew_mib = (first["rss_peak_kib"] - first["rss_before_kib"]) / per / 1024
    return Section(
        name="large_dataset",
        title=f"A big image folder ({count:,} tiny PNGs): first scan, second start, time to the first batch",
        figures=[
            Figure(
                key="first_scan_s",
                title="First scan (headers checked in worker processes), seconds",
                value=round(first["seconds"], 2),
                unit="s",
                detail=f"{count / first['seconds']:,.0f} images/s with {first['workers']} worker process(es); "
                f"{first['skipped']} skipped",
            ),
            Figure(
                key="first_scan_peak_rss",
                title="First scan: peak resident memory of the scanning process",
                value=round(peak_mib),
                unit="MiB",
                detail=f"{grew_mib:.0f} MiB more than after importing engine.data (PyTorch included)",
            ),
            Figure(
                key="second_start_s",
                title="Second start: scan of the unchanged folder (scan cache), seconds",
                value=round(second["seconds"], 2),
                unit="s",
                target=None if quick else "<= 2",
                detail=f"{count:,} files stat-ed and looked up; first scan {first['seconds']:.1f} s",
            ),
            Figure(
                key="second_start_vs_walk_stat",
                title="Second start's scan ÷ listing the folder and stat-ing each file (os.walk + os.stat)",
                value=round(second["seconds"] / second["walk_stat_s"], 2),
                unit="x",
                detail=f"os.walk + os.stat {second['walk_stat_s']:.2f} s, torchvision ImageFolder's listing "
                f"{second['imagefolder_s']:.2f} s, each in the scanning process after its scan",
            ),
            first_batch,
        ],
        setup=f"{count:,} distinct 8x8 PNGs in {CLASSES} class folders (written in {made:.0f} s by a process per "
        f"CPU); each measurement in a fresh process; main.py: resnet18 (random init) at 32 px, batch 32, no "
        f"validation split, decoded-image and feature caches off, {workers} loader worker(s), the script the "
        f"same; {os.cpu_count()} CPUs.",
        notes=[
            "The first scan opens each file's header and reads its last bytes (a file whose end looks cut short "
            "is decoded in full), in worker processes above engine.image_scan.PARALLEL_FROM files; its result "
            "per file goes into the scan cache, which the second start reads instead.",
            "With its caches on (the defaults), main.py decodes every image into the decoded-image cache, or "
            "computes the frozen layers' features, before its first batch: that is measured by the "
            "input_pipeline and hand_script sections, not here.",
        ],
    )


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv).to_dict(), indent=2))
