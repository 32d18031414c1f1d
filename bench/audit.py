"""Dataset audit (issue 17): near-duplicate search at 100,000 embeddings, the whole audit of the digits cold and
cached, Stop latency, and the ground-truth figures on all 1,797 digits with injected problems.

The ground truth: a separate validation folder (20% of each class), 5% of the training labels flipped (seeded),
20 exact copies (half byte-identical, half re-encoded) and 20 near copies (enlarged 2-4x, JPEG 85-95) of
training images written into validation, and 4 + 4 copies within training (duplicates that are no leakage).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import DIGITS, Figure, Section, machine, peak_rss_mib, rss_mib


def _search(n: int, dims: int = 1280, pairs: int = 500, seed: int = 0) -> dict[str, Any]:
    """Synthetic embeddings (clusters, like a dataset's classes, plus per-image spread) with injected near copies."""
    from engine.audit import near_pairs, neighbour_candidates, normalise

    base = rss_mib()
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(200, dims)).astype(np.float32)
    x = np.empty((n, dims), dtype=np.float16)
    for s in range(0, n, 10000):
        m = min(10000, n - s)
        x[s : s + m] = centres[rng.integers(0, 200, m)] + rng.normal(size=(m, dims)).astype(np.float32)
    src = rng.choice(n - pairs, pairs, replace=False)
    dst = np.arange(n - pairs, n)
    x[dst] = x[src].astype(np.float32) + 0.05 * rng.normal(size=(pairs, dims)).astype(np.float32)
    started = time.perf_counter()
    unit = normalise(x)
    del x
    found, dist = neighbour_candidates(unit, 10, 32)
    got, threshold = near_pairs(found, dist, 0.4)
    seconds = time.perf_counter() - started
    truth = {(int(min(a, b)), int(max(a, b))) for a, b in zip(src, dst, strict=True)}
    flagged = {(a, b) for a, b, _ in got}
    return {
        "seconds": seconds,
        "memory": peak_rss_mib() - base,
        "recall": len(truth & flagged) / len(truth),
        "precision": len(truth & flagged) / max(len(flagged), 1),
    }


def _inject(root: Path, per_class_limit: int | None, seed: int = 17) -> dict[str, Any]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    train, val = root / "train", root / "val"
    train_files: list[Path] = []
    for cls in sorted(p.name for p in DIGITS.iterdir() if p.is_dir()):
        files = sorted((DIGITS / cls).glob("*.png"))[:per_class_limit]
        order = rng.permutation(len(files))
        n_val = round(0.2 * len(files))
        for side, idx in ((val, order[:n_val]), (train, order[n_val:])):
            (side / cls).mkdir(parents=True)
            for i in idx:
                shutil.copy(files[i], side / cls / files[i].name)
        train_files += [train / cls / files[i].name for i in order[n_val:]]
    order = rng.permutation(len(train_files))
    n_flip = round(0.05 * len(train_files))

    def key(p: Path) -> str:
        return Path(os.path.relpath(p, train)).as_posix()

    exact, near, within = set(), set(), set()
    for j, i in enumerate(order[n_flip : n_flip + 24]):
        src = train_files[i]
        dest = (val if j < 20 else train) / src.parent.name / f"copy_{src.name}"
        if j % 2:
            Image.open(src).convert("RGB").save(dest)
        else:
            shutil.copy(src, dest)
        (exact if j < 20 else within).add(tuple(sorted((key(src), key(dest)))))
    for j, i in enumerate(order[n_flip + 24 : n_flip + 48]):
        src = train_files[i]
        image = Image.open(src).convert("L")
        factor = int(rng.integers(2, 5))
        buffer = io.BytesIO()
        image.resize((image.width * factor,) * 2, Image.NEAREST).convert("RGB").save(
            buffer, "JPEG", quality=int(rng.choice([85, 90, 95]))
        )
        dest = (val if j < 20 else train) / src.parent.name / f"near_{src.stem}.jpg"
        Image.open(io.BytesIO(buffer.getvalue())).save(dest, quality=95)
        (near if j < 20 else within).add(tuple(sorted((key(src), key(dest)))))
    flipped = []
    for i in order[:n_flip]:
        src = train_files[i]
        dest = train / str((int(src.parent.name) + int(rng.integers(1, 10))) % 10) / src.name
        src.rename(dest)
        flipped.append(key(dest))
    project = root / "project.json"
    project.write_text(
        json.dumps(
            {
                "schema_version": 1,
                "name": "audit-bench",
                "data": {"path": "train", "val_path": "val"},
                "model": {"backbone": "timm/efficientnet_lite0", "weights": "BUNDLED"},
                "train": {"device": "cpu"},
            }
        )
    )
    return {"project": project, "exact": exact, "near": near, "within": within, "flipped": flipped}


def _pairs(report: Any, kind: str) -> set[tuple[str, str]]:
    out = set()
    for f in report.of_kind(kind):
        keys = sorted(f.keys)
        out |= {(a, b) for i, a in enumerate(keys) for b in keys[i + 1 :]}
    return out


def _truth_figures(report: Any, truth: dict[str, Any]) -> dict[str, float]:
    exact, near = _pairs(report, "exact_duplicate"), _pairs(report, "near_duplicate")
    injected_near = truth["near"] | {p for p in truth["within"] if "near_" in p[0] + p[1]}
    leaks = {tuple(sorted(p)) for f in report.of_kind("leakage") for p in f.detail["pairs"]}
    across = truth["exact"] | truth["near"]
    ranked = sorted(report.of_kind("label_issue"), key=lambda f: -f.score)
    top = {f.keys[0] for f in ranked[: 2 * len(truth["flipped"])]}
    return {
        "exact_recall": len(exact & truth["exact"]) / len(truth["exact"]),
        "near_recall": len(near & truth["near"]) / len(truth["near"]),
        "near_precision": len(near & injected_near) / max(len(near), 1),
        "near_reported": len(near),
        "leak_recall": len(leaks & across) / len(across),
        "leak_precision": len(leaks & across) / max(len(leaks), 1),
        "flipped_recall": len(top & set(truth["flipped"])) / len(truth["flipped"]),
        "flipped": len(truth["flipped"]),
    }


def _stop_latency(project: Path, cache: Path) -> tuple[float, float]:
    """(seconds from the stop flag being set to the audit returning, the longest time between two of the worker's
    stop checks while embedding): the first is what a Stop at a check costs, the second bounds any Stop."""
    from engine.audit import AuditStopped, run_audit
    from engine.config import load_project

    stop = threading.Event()
    stamps: list[float] = []

    def progress(stage: str, done: int, total: int) -> None:
        if stage != "embed" or stop.is_set():
            return
        stamps.append(time.perf_counter())
        if done >= min(total, 640):  # stop after ten batches of 64
            stop.set()

    try:
        run_audit(load_project(project), progress=progress, stop=stop, cache=cache, use_cached_report=False)
    except AuditStopped:
        returned = time.perf_counter() - stamps[-1]
        return returned, max(b - a for a, b in zip(stamps, stamps[1:], strict=False))
    raise RuntimeError("the audit finished although it was stopped")


def run(quick: bool = False) -> Section:
    from engine.audit import run_audit
    from engine.config import load_project

    n = 10_000 if quick else 100_000
    search = _search(n)
    work = Path(tempfile.mkdtemp(prefix="bench-audit-"))
    try:
        truth = _inject(work, 30 if quick else None)
        cfg = load_project(truth["project"])
        images = sum(1 for p in work.rglob("*") if p.suffix in (".png", ".jpg"))
        latency, gap = _stop_latency(truth["project"], work / "cache-stop")
        # Cold means the scan too: a scan cache of its own, empty (the stopped audit above filled the other).
        os.environ["MWB_CACHE_DIR"] = str(work / "workbench-cache")
        started = time.perf_counter()
        report = run_audit(cfg, cache=work / "cache")
        cold = time.perf_counter() - started
        started = time.perf_counter()
        again = run_audit(cfg, cache=work / "cache", use_cached_report=False)
        cached = time.perf_counter() - started
        if again.findings != report.findings:
            raise RuntimeError("the audit from cached embeddings differs from the cold one")
        started = time.perf_counter()
        run_audit(cfg, cache=work / "cache")
        reopened = time.perf_counter() - started
        figures = _truth_figures(report, truth)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    f = figures
    return Section(
        name="audit",
        title="Dataset audit",
        figures=[
            Figure(
                "audit_search_seconds",
                f"near-duplicate search, {n:,} synthetic 1,280-d embeddings",
                search["seconds"],
                "s",
                "<= 30",
                f"index over 32 PCA dimensions, 10 candidates each, confirmed on the full embeddings; injected "
                f"pairs found {100 * search['recall']:.1f}%, precision {100 * search['precision']:.1f}%",
            ),
            Figure(
                "audit_search_memory",
                "near-duplicate search, peak memory above the start (embeddings included)",
                search["memory"],
                "MiB",
                "<= 1024",
            ),
            Figure("audit_cold_seconds", f"whole audit of {images:,} digits, cold", cold, "s", "<= 60"),
            Figure("audit_cached_seconds", "whole audit, embeddings cached", cached, "s", "<= 10"),
            Figure("audit_reopen_seconds", "reopening (report cached: scan and fingerprint only)", reopened, "s"),
            Figure(
                "audit_stop_ms",
                "Stop: longest time between two stop checks while embedding",
                1000 * gap,
                "ms",
                "<= 1000",
                f"flag set at a check to audit returned: {1000 * latency:.1f} ms",
            ),
            Figure("audit_exact_recall", "injected exact duplicates found", 100 * f["exact_recall"], "%", ">= 90"),
            Figure("audit_near_recall", "injected near duplicates found", 100 * f["near_recall"], "%", ">= 80"),
            Figure(
                "audit_near_precision",
                "near-duplicate pairs that are injected ones",
                100 * f["near_precision"],
                "%",
                ">= 90",
                f"{f['near_reported']:.0f} pairs reported",
            ),
            Figure("audit_leak_recall", "injected leakage pairs found", 100 * f["leak_recall"], "%", ">= 80"),
            Figure(
                "audit_leak_precision", "leakage pairs that are injected ones", 100 * f["leak_precision"], "%", ">= 90"
            ),
            Figure(
                "audit_flipped_recall",
                f"flipped labels in the top 2x{f['flipped']:.0f} label issues",
                100 * f["flipped_recall"],
                "%",
                ">= 70",
            ),
        ],
        setup=(
            f"digits image folder with injected problems ({images:,} images), timm/efficientnet_lite0 BUNDLED "
            f"embeddings on the CPU; search over {n:,} embeddings in float16"
        ),
        notes=[
            "Cold: no cached embeddings or report (a fresh cache folder); cached: embeddings from the disk cache, "
            "the rest recomputed; reopening: the report itself from the cache.",
            f"Machine: {machine().get('cpu', machine()['processor'])}; timings are wall-clock on a machine that "
            "may be shared, so compare them only with figures from the same run.",
        ],
    )


if __name__ == "__main__":
    print(json.dumps(run().to_dict(), indent=2))
