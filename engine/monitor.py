"""Which epoch is best by a chosen metric: shared by best-checkpoint keeping and early stopping."""

from __future__ import annotations

import math
from typing import Any


class MetricTracker:
    """Follows one metric across epochs; `update` says whether an epoch improved on the best so far."""

    def __init__(self, monitor: str, mode: str = "auto", min_delta: float = 0.0):
        self.monitor = monitor
        self.mode = mode if mode != "auto" else ("max" if monitor.endswith("accuracy") else "min")
        self.min_delta = min_delta
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.epochs_without_improvement = 0

    def value(self, metrics: dict[str, Any]) -> float | None:
        """The monitored value, falling back from a missing val_* metric to its train_* twin."""
        value = metrics.get(self.monitor)
        if value is None and self.monitor.startswith("val_"):
            value = metrics.get("train_" + self.monitor[4:])
        return value if value is not None and math.isfinite(value) else None

    def update(self, metrics: dict[str, Any]) -> bool:
        value = self.value(metrics)
        if value is None:
            return False
        if self.best is None:
            improved = True
        elif self.mode == "min":
            improved = value < self.best - self.min_delta
        else:
            improved = value > self.best + self.min_delta
        if improved:
            self.best, self.best_epoch = value, metrics["epoch"]
            self.epochs_without_improvement = 0
        else:
            self.epochs_without_improvement += 1
        return improved

    def state_dict(self) -> dict[str, Any]:
        return {
            "best": self.best,
            "best_epoch": self.best_epoch,
            "epochs_without_improvement": self.epochs_without_improvement,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = state.get("best")
        self.best_epoch = state.get("best_epoch")
        self.epochs_without_improvement = state.get("epochs_without_improvement", 0)
