"""What every benchmark shares: the machine's description, alternating repetitions, and the result records.

A figure is always a ratio (or a latency) measured against its baseline in the same process, the two
alternated A B A B ... so that a noisy neighbour slows both alike; the median of the repetitions is kept.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DIGITS = REPO / "resources" / "sample_data" / "digits"


@dataclass
class Figure:
    """One measured number with its target; ok is None when there is no target (a figure for information)."""

    key: str
    title: str
    value: float | None
    unit: str  # "x" (a ratio: measured / baseline), "ms", "s", "MiB", "%"
    target: str | None = None  # e.g. ">= 0.97", "<= 50"
    detail: str = ""
    ok: bool | None = None

    def __post_init__(self) -> None:
        if self.ok is None and self.target and self.value is not None:
            op, bound = self.target.split()
            self.ok = self.value >= float(bound) if op == ">=" else self.value <= float(bound)


@dataclass
class Section:
    """One benchmark's figures, the conditions they were measured under, and what a reader should know."""

    name: str
    title: str
    figures: list[Figure] = field(default_factory=list)
    setup: str = ""
    notes: list[str] = field(default_factory=list)
    skipped: str | None = None  # why nothing was measured (e.g. no GPU here)
    measured: str = ""  # when (UTC, ISO 8601): sections kept by `--update` keep the date of their own run
    machine: str = ""  # bench.run.machine_line of where it ran, when `--update` added it from another machine

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def machine() -> dict[str, Any]:
    """Where the figures were measured: they only compare with figures from the same machine and run."""
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            info["cpu"] = names[0]
    except OSError:
        pass
    return info


def alternate(
    candidates: dict[str, Callable[[], Any]], repeats: int, *, warmup: int = 1, between: Callable[[], Any] | None = None
) -> dict[str, list[float]]:
    """Seconds per call of each candidate, called in turn (A B A B ...) after `warmup` untimed rounds.

    between, if given, runs untimed after every call (e.g. letting work a call left behind finish).
    """
    for _ in range(warmup):
        for fn in candidates.values():
            fn()
            if between is not None:
                between()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for i in range(repeats):
        order = list(candidates.items())
        if i % 2:
            order.reverse()  # A B, B A, A B ...: neither always runs first
        for name, fn in order:
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
            if between is not None:
                between()
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def ratio(times: dict[str, list[float]], measured: str, baseline: str, *, throughput: bool = True) -> float:
    """measured vs baseline from the medians: as throughput (baseline time / measured time) or as time."""
    m, b = median(times[measured]), median(times[baseline])
    return b / m if throughput else m / b


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (Linux reports kilobytes, macOS bytes)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def rss_mib() -> float:
    """This process's resident memory now (Linux /proc; elsewhere the peak is the best we have)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / (1024 * 1024)
    except (OSError, ValueError):
        return peak_rss_mib()


def digits_subset(root: Path, per_class: int) -> Path:
    """The first per_class digits of each class, copied under root (a quick run's data)."""
    import shutil

    out = root / "digits"
    for folder in sorted(p for p in DIGITS.iterdir() if p.is_dir()):
        (out / folder.name).mkdir(parents=True)
        for f in sorted(folder.iterdir())[:per_class]:
            shutil.copy(f, out / folder.name / f.name)
    return out
