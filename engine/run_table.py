"""Every run under a folder as one row of a table (status, settings, results), and the settings two runs differ in.

Read from what run folders already hold, without PyTorch: project.json (the project as run), metrics.jsonl (one
line per epoch), run.json (when it started, how it ended, what started it), checkpoints/final.pt (the run
completed) and the folder's lock (held while a process trains in it). `main.py runs` prints the table; the app's
Runs view shows the same rows.
"""

from __future__ import annotations

import functools
import math
import os
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.config import ConfigError, ProjectConfig
from engine.run_files import (
    PROJECT_FILE,
    RUN_INFO_FILE,
    is_completed,
    is_run_dir,
    project_epochs,
    read_metrics,
    read_run_info,
    read_run_project,
)
from engine.run_lock import LOCK_FILE, holder
from engine.settings import fields

STATUSES = ("running", "completed", "stopped", "failed")


@dataclass(frozen=True)
class Column:
    """One column of the runs table: key (a result's name, or a project field's dotted path) and its heading."""

    key: str
    title: str
    numeric: bool = False


# The results every run has; any project field (by its dotted path) can be a column beside them.
RESULT_COLUMNS: tuple[Column, ...] = (
    Column("name", "run"),
    Column("started", "started"),
    Column("status", "status"),
    Column("epochs", "epochs"),
    Column("best_val_accuracy", "best val acc", True),
    Column("final_val_accuracy", "final val acc", True),
    Column("best_val_loss", "best val loss", True),
    Column("final_val_loss", "final val loss", True),
    Column("wall_seconds", "wall time", True),
    Column("samples_per_second", "samples/s", True),
    Column("trial", "trial"),
)
SETTING_TITLES = {
    "model.backbone": "backbone",
    "model.freeze": "freeze",
    "model.freeze_up_to": "freeze up to",
    "optimizer.lr": "lr",
    "loader.batch_size": "batch",
}
DEFAULT_FIELDS: tuple[str, ...] = tuple(SETTING_TITLES)
DEFAULT_COLUMNS: tuple[str, ...] = (
    "name",
    "started",
    "status",
    *DEFAULT_FIELDS,
    "epochs",
    "best_val_accuracy",
    "final_val_accuracy",
    "best_val_loss",
    "final_val_loss",
    "wall_seconds",
    "samples_per_second",
)
_RESULTS = {c.key: c for c in RESULT_COLUMNS}


@functools.cache
def project_fields() -> dict[str, Any]:
    """Every declared project field: dotted path -> its default (a run written before a field existed had it).

    Read once: the declarations do not change while the program runs, and the table asks for every cell."""
    return {path: info.get_default(call_default_factory=True) for path, info in fields(ProjectConfig)}


def column(key: str) -> Column:
    """The column for a result name or a project field's dotted path; ConfigError names an unknown one."""
    if key in _RESULTS:
        return _RESULTS[key]
    declared = project_fields()
    if key in declared:
        default = declared[key]
        numeric = isinstance(default, (int, float)) and not isinstance(default, bool)
        return Column(key, SETTING_TITLES.get(key, key), numeric)
    near = [p for p in declared if p.endswith("." + key) or key in p][:5]
    hint = f"; did you mean {', '.join(near)}?" if near else "; a project field's dotted path, such as optimizer.lr"
    raise ConfigError([f"column {key!r}: neither a result ({', '.join(_RESULTS)}) nor a project field{hint}"])


def _get(data: dict[str, Any], path: str, default: Any) -> Any:
    obj: Any = data
    for part in path.split("."):
        if not isinstance(obj, dict) or part not in obj:
            return default
        obj = obj[part]
    return obj


def _finite(values: Iterable[Any]) -> list[float]:
    return [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]


_STAMP = re.compile(r"-(\d{8}-\d{6})(?:-\d+)?$")


def _parse_time(text: Any, fmt: str) -> float | None:
    from datetime import datetime

    if not isinstance(text, str):
        return None
    try:
        return datetime.strptime(text, fmt).timestamp()  # a time without a zone is local time
    except ValueError:
        return None


def _started(folder: Path, info: dict[str, Any], owner: dict[str, Any] | None) -> float | None:
    """When the run started: run.json says, else the lock of the process training it; a folder written before
    run.json has its name's timestamp (OUTPUT_DIR/NAME-YYYYmmdd-HHMMSS), else its project file's time."""
    started = _parse_time(info.get("started"), "%Y-%m-%dT%H:%M:%S%z")
    if started is None:
        started = _parse_time((owner or {}).get("started"), "%Y-%m-%d %H:%M:%S")
    if started is None:
        match = _STAMP.search(folder.name)
        started = _parse_time(match.group(1), "%Y%m%d-%H%M%S") if match else None
    if started is None:
        try:
            started = (folder / PROJECT_FILE).stat().st_mtime
        except OSError:
            return None
    return started


@dataclass
class RunRecord:
    """One run folder as the table shows it; values(keys) gives a row."""

    path: Path
    status: str
    project: dict[str, Any]
    metrics: list[dict[str, Any]]
    info: dict[str, Any] = field(default_factory=dict)
    started: float | None = None
    error: str | None = None

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def planned_epochs(self) -> int | None:
        return project_epochs(self.project)  # a run in phases: its phases' epochs, not train.epochs

    @functools.cached_property
    def results(self) -> dict[str, Any]:
        """Every result column's value, computed once from the metrics."""
        rows = self.metrics
        acc = _finite(r.get("val_accuracy") for r in rows)
        loss = _finite(r.get("val_loss") for r in rows)
        last = rows[-1] if rows else {}
        seconds = _finite(r.get("epoch_seconds") for r in rows)
        # Samples over seconds of the epochs that say both: each epoch's rate weighted by its time. A plain mean
        # of the rates said 11,860/s for a run in phases that trained at about 170/s (cached head epochs at
        # 20,000/s, fine-tuning epochs at 75/s).
        timed = [
            (r["samples_per_second"] * r["epoch_seconds"], r["epoch_seconds"])
            for r in rows
            if _finite([r.get("samples_per_second")]) and _finite([r.get("epoch_seconds")]) and r["epoch_seconds"] > 0
        ]
        done = int(last.get("epoch", len(rows))) if rows else 0
        sweep = self.info.get("sweep")
        trial = None
        if isinstance(sweep, dict):
            state = f" {sweep['state']}" if sweep.get("state") else ""
            trial = f"{sweep.get('study', '?')} #{sweep.get('trial', '?')}{state}"
        return {
            "name": self.name,
            "started": self.started,
            "status": self.status,
            "epochs": f"{done}/{self.planned_epochs}" if self.planned_epochs else str(done),
            "best_val_accuracy": max(acc) if acc else None,
            "final_val_accuracy": next(iter(_finite([last.get("val_accuracy")])), None),
            "best_val_loss": min(loss) if loss else None,
            "final_val_loss": next(iter(_finite([last.get("val_loss")])), None),
            "wall_seconds": sum(seconds) if seconds else None,
            "samples_per_second": sum(n for n, _ in timed) / sum(t for _, t in timed) if timed else None,
            "trial": trial,
        }

    def result(self, key: str) -> Any:
        return self.results[key]

    def value(self, key: str) -> Any:
        """A result by name, or a project field by its dotted path (its declared default when the run predates it)."""
        if key in _RESULTS:
            return self.result(key)
        return _get(self.project, key, project_fields().get(key))

    def values(self, keys: Sequence[str]) -> dict[str, Any]:
        return {k: self.value(k) for k in keys}


def run_status(folder: Path, info: dict[str, Any], owner: dict[str, Any] | None) -> tuple[str, str | None]:
    """(status, why it failed) of a run folder: see STATUSES."""
    if owner is not None:
        return "running", None
    if is_completed(folder):
        return "completed", None
    recorded = info.get("status")
    if recorded in ("stopped", "failed"):
        return recorded, info.get("error")
    if info:  # run.json is written from the start: still saying running (or nothing yet) with nobody holding it
        return "failed", "the process ended without finishing the run (killed, or the machine went down)"
    # Written before run.json existed: a folder without final.pt was stopped (or killed) before its end.
    return "stopped", None


def read_run(folder: str | os.PathLike) -> RunRecord:
    path = Path(folder)
    owner = holder(path)
    info = read_run_info(path)
    status, error = run_status(path, info, owner)
    return RunRecord(
        path=path,
        status=status,
        project=read_run_project(path),
        metrics=read_metrics(path),
        info=info,
        started=_started(path, info, owner),
        error=error,
    )


def looks_like_run(folder: Path) -> bool:
    """A run folder, or one a run has just claimed (its lock, project or record is there before any epoch)."""
    return is_run_dir(folder) or any((folder / name).is_file() for name in (PROJECT_FILE, RUN_INFO_FILE, LOCK_FILE))


def find_runs(folder: str | os.PathLike) -> list[Path]:
    """The run folders in folder (and folder itself when it is one), by name."""
    root = Path(folder)
    if not root.is_dir():
        raise ConfigError([f"runs folder {str(root)!r} does not exist or is not a folder"])
    if is_run_dir(root):
        return [root]
    try:
        children = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as exc:
        raise ConfigError([f"runs folder {str(root)!r} cannot be read: {exc.strerror or exc}"]) from None
    return [p for p in children if looks_like_run(p)]


def list_runs(folders: str | os.PathLike | Sequence[str | os.PathLike]) -> list[RunRecord]:
    """Every run under one folder or several, oldest first."""
    roots = [folders] if isinstance(folders, (str, os.PathLike)) else list(folders)
    seen: set[Path] = set()
    records = []
    for root in roots:
        for path in find_runs(root):
            if path.resolve() not in seen:
                seen.add(path.resolve())
                records.append(read_run(path))
    return sorted(records, key=lambda r: (r.started or 0.0, r.name))


# ---------------------------------------------------------------------------------------------
# Text


def format_value(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key == "started":
        return time.strftime("%Y-%m-%d %H:%M", time.localtime(value))
    if key == "wall_seconds":
        minutes, seconds = divmod(int(round(value)), 60)
        return f"{minutes}:{seconds:02d}" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}"
    if key.endswith("accuracy"):
        return f"{value:.3f}"
    if key.endswith("loss"):
        return f"{value:.4f}"
    if key == "samples_per_second":
        return f"{value:.0f}"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def format_table(records: Sequence[RunRecord], keys: Sequence[str]) -> str:
    """The runs as an aligned text table (numbers right-aligned)."""
    cols = [column(k) for k in keys]
    rows = [[c.title for c in cols]] + [[format_value(c.key, r.value(c.key)) for c in cols] for r in records]
    widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
    lines = []
    for row in rows:
        cells = [cell.rjust(w) if c.numeric else cell.ljust(w) for cell, w, c in zip(row, widths, cols, strict=True)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def as_json(records: Sequence[RunRecord], keys: Sequence[str]) -> list[dict[str, Any]]:
    """The rows as plain JSON values: the path, every result, the chosen fields, and why a run failed."""
    out = []
    for r in records:
        row: dict[str, Any] = {"path": str(r.path)}
        row.update({c.key: r.value(c.key) for c in RESULT_COLUMNS})
        row.update({k: r.value(k) for k in keys if k not in row})
        row["error"] = r.error
        if isinstance(r.info.get("sweep"), dict):
            row["sweep"] = r.info["sweep"]
        out.append(row)
    return out


# ---------------------------------------------------------------------------------------------
# Comparing projects


def project_diff(records: Sequence[RunRecord]) -> list[tuple[str, list[Any]]]:
    """The declared project fields whose values differ between the runs: (dotted path, one value per run)."""
    declared = project_fields()
    out = []
    for path, default in declared.items():
        values = [_get(r.project, path, default) for r in records]
        if any(v != values[0] for v in values[1:]):
            out.append((path, values))
    return out


def format_diff(records: Sequence[RunRecord]) -> str:
    diff = project_diff(records)
    if not diff:
        return f"The {len(records)} runs' projects are the same in every field."
    heads = ["field", *(r.name for r in records)]
    rows = [heads] + [[path, *(format_value(path, v) for v in values)] for path, values in diff]
    widths = [max(len(row[i]) for row in rows) for i in range(len(heads))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)
