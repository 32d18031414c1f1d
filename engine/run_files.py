"""A run folder's file names and its metrics, readable without PyTorch (the app's window reads them at start-up)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
PROJECT_FILE = "project.json"


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The epochs recorded in a run folder's metrics.jsonl; a line cut short by a crash is ignored."""
    path = Path(run_dir) / METRICS_FILE
    rows = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows
