"""A run's events as typed values, one throttled emitter, and its outputs (the console, JSON lines, the GUI).

The trainer's callbacks become events here, once, for every front end: `EventEmitter` is the trainer callback;
what it makes of each hook goes to every output it was given (a callable taking an Event). Batch losses are
grouped and sent at most every UPDATE_INTERVAL seconds, so a fast loop cannot flood a GUI or a pipe; nothing is
lost (every loss is in some BatchProgress) and the ends of epochs and of the run flush the group.

`main.py train|resume ... --events` writes the events as JSON lines on stdout (`JsonLines`): EVENT_PREFIX and
then an object with an "event" key naming the type (EVENT_TYPES) and the type's fields. The app starts
multi-process runs through torchrun and reads rank 0's lines back with `decode`. Non-finite numbers are written
as null, so any JSON parser reads every line.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

EVENT_PREFIX = "@mwb-event "
UPDATE_INTERVAL = 0.1  # seconds between batch events; every loss is still sent, in groups


# What the progress lines of the feature cache's pass over the frozen part begin with, in a run's log (and the
# finder's): the app shows them in the run's status line.
FEATURE_PASS_PROGRESS = "Computing cached features"
# ... and those of the data's scan (and its decoded-image cache) before a run.
DATA_PROGRESS = "Preparing the data"
PROGRESS_LINES = (FEATURE_PASS_PROGRESS, DATA_PROGRESS)


def progress_kind(line: str) -> str | None:
    """Which of PROGRESS_LINES a log line is ('Computing cached features: 352 of 1,438 ...'), or None."""
    return next((p for p in PROGRESS_LINES if line.startswith(p + ": ")), None)


@dataclass(frozen=True)
class LogMessage:
    message: str


@dataclass(frozen=True)
class RunStarted:
    run_dir: str
    epochs: int
    start_epoch: int
    batches_per_epoch: int
    device: str
    global_step: int
    history: list[dict[str, Any]]
    world_size: int = 1


@dataclass(frozen=True)
class BatchProgress:
    """The batches since the previous BatchProgress: their steps and losses, and where the run stands."""

    epoch: int
    epochs: int
    batch: int
    batches_per_epoch: int
    global_step: int
    steps: list[int]
    losses: list[float]
    loss: float
    lr: float | None
    elapsed: float


@dataclass(frozen=True)
class EpochFinished:
    metrics: dict[str, Any]  # the epoch's line of metrics.jsonl
    epochs: int
    global_step: int
    best_epoch: int | None
    checkpoint: str
    last_checkpoint: str
    elapsed: float

    def to_dict(self) -> dict[str, Any]:
        """The metrics and the rest side by side, as metrics.jsonl readers expect ("epoch", "val_loss", ...)."""
        return {
            **self.metrics,
            **{f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "metrics"},
        }


@dataclass(frozen=True)
class RunFinished:
    """How a run ended. kind says who can fix a failure: "input" (the user's project or files), "fault" (the
    run met a condition outside the code: a diverging loss, a full disk, no device memory) or "bug"."""

    status: str  # "completed" | "stopped" | "failed"
    run_dir: str | None
    epoch: int  # the last finished epoch
    epochs: int
    best_epoch: int | None = None
    stopped_early: bool = False
    error: str | None = None
    error_type: str | None = None
    kind: str | None = None
    traceback: str | None = field(default=None, compare=False)
    # Image files that could not be read while training (changed since the scan): {"path", "reason", "split"}
    unreadable: list[dict[str, str]] = field(default_factory=list)


Event = LogMessage | RunStarted | BatchProgress | EpochFinished | RunFinished
EVENT_TYPES: dict[str, type] = {
    "log": LogMessage,
    "run_started": RunStarted,
    "batch": BatchProgress,
    "epoch": EpochFinished,
    "run_finished": RunFinished,
}
_NAMES = {cls: name for name, cls in EVENT_TYPES.items()}
Output = Callable[[Event], None]


def to_dict(event: Event) -> dict[str, Any]:
    """An event's fields as a plain dict (an EpochFinished with its metrics at the top level)."""
    if isinstance(event, EpochFinished):
        return event.to_dict()
    return {f.name: getattr(event, f.name) for f in dataclasses.fields(event)}


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


def encode(event: Event) -> str:
    """One event line (without the newline)."""
    fields = {f.name: getattr(event, f.name) for f in dataclasses.fields(event)}
    return EVENT_PREFIX + json.dumps({"event": _NAMES[type(event)], **_plain(fields)}, separators=(",", ":"))


def decode(line: str) -> Event | None:
    """The event a line carries, or None for any other line (a log line, a warning, torchrun's own output)."""
    at = line.find(EVENT_PREFIX)
    if at < 0:
        return None
    try:
        data = json.loads(line[at + len(EVENT_PREFIX) :])
        cls = EVENT_TYPES[data.pop("event")]
        return cls(**data)
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


class JsonLines:
    """An output that writes each event as one line (stdout unless a stream is given) for a parent process."""

    def __init__(self, stream: TextIO | None = None):
        self._stream = stream

    def __call__(self, event: Event) -> None:
        stream = self._stream if self._stream is not None else sys.stdout  # the stdout of now
        stream.write(encode(event) + "\n")
        stream.flush()


class EventEmitter:
    """The trainer's callbacks (engine.trainer.Callback's hooks, by name) as events to every output."""

    def __init__(
        self, run_dir: Path, outputs: list[Output], *, world_size: int = 1, clock: Callable[[], float] = time.monotonic
    ):
        self.run_dir = Path(run_dir)
        self.outputs = list(outputs)
        self.world_size = world_size
        self._clock = clock
        self._points: list[tuple[int, float]] = []
        self._last_emit = 0.0
        self._started = clock()

    def emit(self, event: Event) -> None:
        for output in self.outputs:
            output(event)

    def on_log(self, trainer: Any, message: str) -> None:
        self.emit(LogMessage(message))

    def on_run_started(self, trainer: Any, state: Any) -> None:
        self._started = self._clock()
        self.emit(
            RunStarted(
                run_dir=str(self.run_dir),
                epochs=state.epochs,
                start_epoch=state.start_epoch,
                batches_per_epoch=state.batches_per_epoch,
                device=state.device,
                global_step=state.global_step,
                history=[dict(m) for m in state.history],
                world_size=self.world_size,
            )
        )

    def on_batch_finished(self, trainer: Any, state: Any, loss: float) -> None:
        self._points.append((state.global_step, float(loss)))
        now = self._clock()
        if now - self._last_emit >= UPDATE_INTERVAL:
            self._flush(trainer, state, now)

    def _flush(self, trainer: Any, state: Any, now: float | None = None) -> None:
        if not self._points:
            return
        now = now if now is not None else self._clock()
        self._last_emit = now
        points, self._points = self._points, []
        groups = trainer.parts.optimizer.param_groups if trainer.parts else []
        self.emit(
            BatchProgress(
                epoch=state.epoch,
                epochs=state.epochs,
                batch=state.batch,
                batches_per_epoch=state.batches_per_epoch,
                global_step=state.global_step,
                steps=[s for s, _ in points],
                losses=[v for _, v in points],
                loss=points[-1][1],
                lr=max((float(g["lr"]) for g in groups), default=None),
                elapsed=now - self._started,
            )
        )

    def on_epoch_finished(self, trainer: Any, state: Any, metrics: dict[str, Any]) -> None:
        self._flush(trainer, state)
        checkpoints = self.run_dir / "checkpoints"
        self.emit(
            EpochFinished(
                metrics=dict(metrics),
                epochs=state.epochs,
                global_step=state.global_step,
                best_epoch=state.best_epoch,
                checkpoint=str(checkpoints / f"epoch-{state.epoch:03d}.pt"),
                last_checkpoint=str(checkpoints / "last.pt"),
                elapsed=self._clock() - self._started,
            )
        )

    def on_run_finished(self, trainer: Any, state: Any) -> None:
        self._flush(trainer, state)
