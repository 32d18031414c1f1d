"""Machine-readable training events: one JSON object per line, for a parent process that shows the run.

`main.py train|resume ... --events` makes the training process (rank 0 under torchrun) write these lines to
its stdout, among its other output. The app starts multi-process runs through torchrun and turns the lines back
into the same dictionaries its in-process runs send (app/training.py), so both feed the same live plots.

A line is EVENT_PREFIX followed by a JSON object with an "event" key:

- "log": {"message"}
- "run_started": {"run_dir", "epochs", "start_epoch", "batches_per_epoch", "device", "global_step", "history",
  "world_size"}
- "batch": {"epoch", "epochs", "batch", "batches_per_epoch", "global_step", "steps", "losses", "loss", "lr",
  "elapsed"}, at most every UPDATE_INTERVAL seconds; steps/losses hold every batch since the previous one
- "epoch": the epoch's metrics and {"epochs", "global_step", "best_epoch", "checkpoint", "last_checkpoint",
  "elapsed"}
- "run_finished": {"status", "run_dir", "epoch", "epochs", "best_epoch", "stopped_early", "error", "error_type"}

Non-finite numbers are written as null, so any JSON parser reads every line.
"""
from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from engine.trainer import Trainer, TrainState

EVENT_PREFIX = "@mwb-event "
UPDATE_INTERVAL = 0.1  # seconds between batch events; every loss is still sent, in groups


def _plain(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "item"):  # a 0-d tensor or numpy scalar
        return _plain(value.item())
    return str(value)


def encode(event: str, payload: dict[str, Any]) -> str:
    """One event line (without the newline)."""
    return EVENT_PREFIX + json.dumps({"event": event, **_plain(payload)}, separators=(",", ":"))


def decode(line: str) -> dict[str, Any] | None:
    """The event a line carries, or None for any other line (a log line, a warning, torchrun's own output)."""
    at = line.find(EVENT_PREFIX)
    if at < 0:
        return None
    try:
        event = json.loads(line[at + len(EVENT_PREFIX):])
    except ValueError:
        return None
    return event if isinstance(event, dict) and isinstance(event.get("event"), str) else None


class EventWriter:
    """The trainer's callbacks written as event lines (engine.trainer.Callback's hooks, by name)."""

    def __init__(self, run_dir: Path, stream: TextIO | None = None, *, world_size: int = 1,
                 clock: Callable[[], float] = time.monotonic):
        self.run_dir = Path(run_dir)
        self._stream = stream
        self.world_size = world_size
        self._clock = clock
        self._points: list[tuple[int, float]] = []
        self._last_emit = 0.0
        self._started = 0.0

    def write(self, event: str, payload: dict[str, Any]) -> None:
        stream = self._stream if self._stream is not None else sys.stdout
        stream.write(encode(event, payload) + "\n")
        stream.flush()

    def on_log(self, trainer: Trainer, message: str) -> None:
        self.write("log", {"message": message})

    def on_run_started(self, trainer: Trainer, state: TrainState) -> None:
        self._started = self._clock()
        self.write("run_started", {
            "run_dir": str(self.run_dir), "epochs": state.epochs, "start_epoch": state.start_epoch,
            "batches_per_epoch": state.batches_per_epoch, "device": state.device,
            "global_step": state.global_step, "history": [dict(m) for m in state.history],
            "world_size": self.world_size,
        })

    def on_batch_finished(self, trainer: Trainer, state: TrainState, loss: float) -> None:
        self._points.append((state.global_step, float(loss)))
        now = self._clock()
        if now - self._last_emit >= UPDATE_INTERVAL:
            self._flush(trainer, state, now)

    def _flush(self, trainer: Trainer, state: TrainState, now: float | None = None) -> None:
        if not self._points:
            return
        now = now if now is not None else self._clock()
        self._last_emit = now
        points, self._points = self._points, []
        groups = trainer.parts.optimizer.param_groups if trainer.parts else []
        self.write("batch", {
            "epoch": state.epoch, "epochs": state.epochs, "batch": state.batch,
            "batches_per_epoch": state.batches_per_epoch, "global_step": state.global_step,
            "steps": [s for s, _ in points], "losses": [v for _, v in points], "loss": points[-1][1],
            "lr": max((float(g["lr"]) for g in groups), default=None), "elapsed": now - self._started,
        })

    def on_epoch_finished(self, trainer: Trainer, state: TrainState, metrics: dict[str, Any]) -> None:
        self._flush(trainer, state)
        checkpoints = self.run_dir / "checkpoints"
        self.write("epoch", {
            **metrics, "epochs": state.epochs, "global_step": state.global_step, "best_epoch": state.best_epoch,
            "checkpoint": str(checkpoints / f"epoch-{state.epoch:03d}.pt"),
            "last_checkpoint": str(checkpoints / "last.pt"), "elapsed": self._clock() - self._started,
        })

    def on_run_finished(self, trainer: Trainer, state: TrainState) -> None:
        self._flush(trainer, state)

    def finished(self, result: dict[str, Any]) -> None:
        """The run's outcome, written once by the CLI after the trainer returned or raised."""
        self.write("run_finished", result)
