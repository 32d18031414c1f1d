"""A run folder's file names and its metrics, readable without PyTorch (the app's window reads them at start-up)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
PROJECT_FILE = "project.json"
# When the run started and how it last ended ("running" while it trains: a folder left saying so was killed), and
# what started it (a sweep's study and trial). Written by engine.runs.RunRecorder.
RUN_INFO_FILE = "run.json"


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The epochs recorded in a run folder's metrics.jsonl; a line cut short by a crash is ignored."""
    return [row for rows in metrics_chunks(run_dir) for row in rows]


def metrics_chunks(run_dir: str | os.PathLike, lines: int = 0) -> Iterator[list[dict[str, Any]]]:
    """read_metrics a piece at a time: the rows of `lines` lines at once (0: the whole file in one piece).

    One parse holds the GIL for its whole length, and rows kept alive by the hundred thousand make Python's
    garbage collector scan them all, also with the GIL held: a reader on a worker thread that turns each piece
    into what it needs and drops the rows leaves the GUI thread its turns. In pieces, the file is read line by
    line too: decoding and splitting a 20 MB file in one call holds the GIL for some 130 ms."""
    path = Path(run_dir) / METRICS_FILE
    if lines <= 0:
        try:
            text = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except FileNotFoundError:
            return
        if text:
            yield _parse_lines(text)
        return
    try:
        file = path.open(encoding="utf-8")
    except FileNotFoundError:
        return
    with file:
        piece: list[str] = []
        for line in file:
            if line.strip():
                piece.append(line)
                if len(piece) == lines:
                    yield _parse_lines(piece)
                    piece = []
        if piece:
            yield _parse_lines(piece)


def _parse_lines(lines: list[str]) -> list[dict[str, Any]]:
    try:  # one parse for many lines (the runs table reads hundreds of files); line by line if one is cut
        rows = json.loads("[" + ",".join(lines) + "]")
        if all(isinstance(row, dict) for row in rows):
            return rows
    except json.JSONDecodeError:
        pass
    rows = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def is_run_dir(path: str | os.PathLike) -> bool:
    """A folder training wrote: it has metrics.jsonl or checkpoint files."""
    folder = Path(path)
    if (folder / METRICS_FILE).is_file():
        return True
    checkpoints = folder / "checkpoints"
    return checkpoints.is_dir() and any(p.suffix == ".pt" and not p.name.startswith(".") for p in checkpoints.iterdir())


def read_run_project(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The run's project.json as plain JSON ({} when missing or unreadable): the project as last run."""
    try:
        data = json.loads((Path(run_dir) / PROJECT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def read_run_info(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The run's run.json ({} when missing or unreadable, as in folders written before it existed)."""
    try:
        data = json.loads((Path(run_dir) / RUN_INFO_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def update_run_info(run_dir: str | os.PathLike, **values: Any) -> dict[str, Any]:
    """Merge values into run.json (a dict value is merged one level deep), written atomically; returns the whole."""
    folder = Path(run_dir)
    info = read_run_info(folder)
    for key, value in values.items():
        old = info.get(key)
        info[key] = {**old, **value} if isinstance(old, dict) and isinstance(value, dict) else value
    tmp = folder / f".{RUN_INFO_FILE}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(info, fh, indent=2)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, folder / RUN_INFO_FILE)
    except OSError:
        tmp.unlink(missing_ok=True)  # a full disk leaves no half-written temporary behind
        raise
    return info


def planned_epochs(run_dir: str | os.PathLike) -> int | None:
    """The run's total epochs as its project.json (rewritten on each resume) says."""
    return project_epochs(read_run_project(run_dir))


def project_epochs(project: dict[str, Any]) -> int | None:
    """The epochs a project's run is planned for, read from its dict as saved (engine.config.run_epochs on a
    loaded one): its phases' epochs together (a phase's default is 1), or train.epochs; None where unreadable."""
    train = project.get("train")
    if not isinstance(train, dict):
        return None
    phases = train.get("phases")
    if isinstance(phases, list) and phases:
        counts = [p.get("epochs", 1) if isinstance(p, dict) else None for p in phases]
        ok = all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in counts)
        return sum(c for c in counts if isinstance(c, int)) if ok else None
    epochs = train.get("epochs")
    return epochs if isinstance(epochs, int) and not isinstance(epochs, bool) and epochs > 0 else None


def is_completed(run_dir: str | os.PathLike) -> bool:
    """The run reached its end: final.pt is linked only then. A run folder without it was stopped or killed."""
    return (Path(run_dir) / "checkpoints" / "final.pt").is_file()


def last_written(run_dir: str | os.PathLike) -> float:
    """When the run last recorded an epoch (its metrics.jsonl), else when its folder changed: orders runs by recency."""
    folder = Path(run_dir)
    for path in (folder / METRICS_FILE, folder):
        try:
            return path.stat().st_mtime
        except OSError:
            continue
    return 0.0


def project_runs(output_dir: str | os.PathLike | None, project_name: str) -> list[Path]:
    """The run folders a project wrote into its output folder, oldest first.

    Several projects may share an output folder (the default "runs" beside the project files), so a run
    counts as this project's when its project.json carries the project's name.
    """
    if not output_dir:
        return []
    folder = Path(output_dir)
    try:
        children = [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")]
    except OSError:
        return []
    runs = [p for p in children if is_run_dir(p) and read_run_project(p).get("name") == project_name]
    return sorted(runs, key=lambda p: (last_written(p), p.name))
