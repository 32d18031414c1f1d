"""The "Find learning rate" dialog: the range test on a worker thread with progress and Stop, the loss against the
learning rate on a log axis with the suggestion marked, and a button that makes the suggestion optimizer.lr."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from engine.config import ProjectConfig
from engine.lr_curve import DEFAULT_BATCHES, DEFAULT_END_LR, DEFAULT_START_LR, LrFinderResult, bounds_problems
from engine.session import error_text
from widgets.fields import format_float, parse_float
from widgets.look import ERROR_STYLE
from widgets.state import ProjectState
from widgets.tasks import Task, run_task

OBJECT_NAMES = {
    "lr_finder.dialog": "the learning-rate finder's dialog itself",
    "lr_finder.start_lr": "the ramp's first learning rate",
    "lr_finder.end_lr": "the ramp's last learning rate",
    "lr_finder.batches": "the ramp's number of batches (at most one epoch)",
    "lr_finder.run": "runs the finder; while it runs, stops it after the batch",
    "lr_finder.progress": "batches of the ramp done",
    "lr_finder.plot": "the loss against the learning rate (log axis), the suggestion marked",
    "lr_finder.message": "the suggestion and how it was chosen, or why there is none",
    "lr_finder.use": "sets the optimizer's learning rate to the suggestion",
    "lr_finder.close": "closes the dialog (stopping the finder first)",
}


def _find(
    cfg: ProjectConfig,
    start_lr: float,
    end_lr: float,
    batches: int,
    *,
    progress: Callable[[Any], None],
    cancel: threading.Event,
) -> LrFinderResult:
    from engine.lr_finder import find_lr  # imports PyTorch: on the worker thread, when the finder first runs

    return find_lr(cfg, start_lr=start_lr, end_lr=end_lr, num_batches=batches, stop_event=cancel, progress=progress)


class LrFinderDialog(QDialog):
    """Runs the finder on a snapshot of the project; *Use this learning rate* writes the suggestion to the project."""

    running_changed = Signal(bool)  # the finder started (True) or ended (False): the window holds Train meanwhile

    def __init__(self, state: ProjectState, parent: QWidget | None = None):
        super().__init__(parent)
        self.setObjectName("lr_finder.dialog")
        self.setWindowTitle("Find learning rate")
        self.state = state
        self.task: Task | None = None
        self.found: LrFinderResult | None = None
        self._live: tuple[list[float], list[float]] = ([], [])

        self.start_lr = QLineEdit(format_float(DEFAULT_START_LR))
        self.end_lr = QLineEdit(format_float(DEFAULT_END_LR))
        self.batches = QSpinBox()
        self.batches.setRange(5, 100_000)
        self.batches.setValue(DEFAULT_BATCHES)
        self.batches.setSuffix(" batches")
        for widget, name, tip in (
            (self.start_lr, "lr_finder.start_lr", "The learning rate the ramp starts from, such as 1e-7."),
            (self.end_lr, "lr_finder.end_lr", "The learning rate the ramp ends at, such as 10."),
            (self.batches, "lr_finder.batches", "How many batches the ramp takes; it never goes past one epoch."),
        ):
            widget.setObjectName(name)
            widget.setToolTip(tip)
        self.run_button = QPushButton("Run")
        self.run_button.setObjectName("lr_finder.run")
        self.run_button.clicked.connect(self._on_run_clicked)
        self.progress = QProgressBar()
        self.progress.setObjectName("lr_finder.progress")
        self.progress.setFormat("%v of %m batches")

        self.plot = pg.PlotWidget(background="w")
        self.plot.setObjectName("lr_finder.plot")
        self.plot.setLogMode(x=True, y=False)
        self.plot.setLabel("bottom", "learning rate")
        self.plot.setLabel("left", "training loss")
        self.plot.showGrid(x=True, y=True, alpha=0.3)
        self.plot.addLegend(offset=(-10, 10))
        self.raw_curve = self.plot.plot(pen=pg.mkPen("#9ab", width=1), name="loss per batch")
        self.smooth_curve = self.plot.plot(pen=pg.mkPen("#1f5fa8", width=2), name="smoothed")
        self.marker = self.plot.plot(
            pen=None, symbol="o", symbolSize=12, symbolBrush=pg.mkBrush("#d62"), symbolPen="#822", name="suggestion"
        )
        self.line = pg.InfiniteLine(angle=90, pen=pg.mkPen("#d62", style=Qt.PenStyle.DashLine))
        self.line.hide()
        self.plot.addItem(self.line)
        self.plot.setMinimumSize(560, 320)

        self.message = QLabel(
            "Trains on a ramp of learning rates for at most one epoch; nothing of the project changes."
        )
        self.message.setObjectName("lr_finder.message")
        self.message.setWordWrap(True)
        self.message.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.use_button = QPushButton("Use this learning rate")
        self.use_button.setObjectName("lr_finder.use")
        self.use_button.setEnabled(False)
        self.use_button.clicked.connect(self._on_use_clicked)
        close = QPushButton("Close")
        close.setObjectName("lr_finder.close")
        close.clicked.connect(self.close)

        bounds = QFormLayout()
        bounds.addRow("From:", self.start_lr)
        bounds.addRow("To:", self.end_lr)
        bounds.addRow("Steps:", self.batches)
        top = QHBoxLayout()
        top.addLayout(bounds, 1)
        run_column = QVBoxLayout()
        run_column.addWidget(self.run_button)
        run_column.addWidget(self.progress)
        run_column.addStretch(1)
        top.addLayout(run_column, 1)
        buttons = QHBoxLayout()
        buttons.addStretch(1)
        buttons.addWidget(self.use_button)
        buttons.addWidget(close)
        layout = QVBoxLayout(self)
        layout.addLayout(top)
        layout.addWidget(self.plot, 1)
        layout.addWidget(self.message)
        layout.addLayout(buttons)
        self.resize(760, 560)

    # -- running -------------------------------------------------------------------------------
    def is_running(self) -> bool:
        return self.task is not None and self.task.is_running()

    def start(self) -> bool:
        """Run the finder with the bounds typed; False (and a message) when a bound is not usable."""
        if self.is_running():
            return False
        try:
            start_lr, end_lr = parse_float(self.start_lr.text()), parse_float(self.end_lr.text())
        except ValueError as exc:
            self._say(f"The ramp's bounds must be numbers such as 1e-7 and 10 ({exc})", error=True)
            return False
        problems = bounds_problems(start_lr, end_lr, self.batches.value())
        if problems:
            self._say("; ".join(problems), error=True)
            return False
        self.found = None
        self._live = ([], [])
        self._draw([], [], [], None)
        self.use_button.setEnabled(False)
        self.progress.setRange(0, self.batches.value())
        self.progress.setValue(0)
        self._say("Preparing the data and the model...")
        self.run_button.setText("Stop")
        for widget in (self.start_lr, self.end_lr, self.batches):
            widget.setEnabled(False)
        self.task = run_task(
            "lr_finder",
            _find,
            self.state.snapshot(),
            start_lr,
            end_lr,
            self.batches.value(),
            progress=True,
            on_result=self._on_result,
            on_error=self._on_error,
            on_progress=self._on_progress,
            parent=self,
        )
        self.task.finished.connect(self._on_finished)
        self.running_changed.emit(True)
        return True

    def stop(self) -> None:
        if self.task is not None and self.is_running():
            self.task.cancel.set()
            self._say("Stopping after this batch...")

    def _on_run_clicked(self) -> None:
        if self.is_running():
            self.stop()
        else:
            self.start()

    def _on_progress(self, info: dict[str, Any]) -> None:
        self.progress.setMaximum(info["batches"])
        self.progress.setValue(info["batch"])
        lrs, losses = self._live
        lrs.append(info["lr"])
        losses.append(info["loss"] if math.isfinite(info["loss"]) else math.nan)
        self._draw(lrs, losses, [], None)
        self._say(
            f"Batch {info['batch']} of {info['batches']}: learning rate {info['lr']:.3g}, loss {info['loss']:.4g}"
        )

    def _on_result(self, result: LrFinderResult) -> None:
        self.found = result
        self.progress.setMaximum(max(1, len(result.lrs)))
        self.progress.setValue(len(result.lrs))
        self._draw(result.lrs, result.losses, result.smoothed, result.suggestion_index)
        ended = {"completed": "", "diverged": " (stopped when the loss diverged)", "stopped": " (stopped)"}
        where = " on cached features" if result.feature_cache else ""
        head = f"{len(result.lrs)} batches{where} in {result.seconds:.1f} s{ended.get(result.status, '')}. "
        if result.suggestion is None:
            self._say(head + f"No suggestion: {result.reason}.", error=True)
        else:
            self._say(head + f"Suggested learning rate {result.suggestion:.3g}: {result.reason}.")
        self.use_button.setEnabled(result.suggestion is not None)

    def _on_error(self, exc: BaseException, _traceback: str) -> None:
        self._say(f"The finder failed: {error_text(exc)}", error=True)

    def _on_finished(self) -> None:
        self.running_changed.emit(False)
        self.run_button.setText("Run")
        for widget in (self.start_lr, self.end_lr, self.batches):
            widget.setEnabled(True)

    # -- the result ----------------------------------------------------------------------------
    def _on_use_clicked(self) -> None:
        if self.found is None or self.found.suggestion is None:
            return
        value = float(f"{self.found.suggestion:.3g}")  # as the message shows it: 3 significant digits
        refused = self.state.try_set("optimizer.lr", value)
        if refused:
            self._say(f"optimizer.lr = {value:g} was refused: {refused}", error=True)
        else:
            self._say(f"optimizer.lr is now {value:g}.")

    def _draw(self, lrs: list[float], losses: list[float], smoothed: list[float], index: int | None) -> None:
        # setLogMode(x=True) plots log10 of the data itself, so the raw rates go in.
        x = np.asarray(lrs, dtype=float)
        self.raw_curve.setData(x, np.asarray(losses, dtype=float), connect="finite")
        self.smooth_curve.setData(x[: len(smoothed)], np.asarray(smoothed, dtype=float))
        if index is None or not smoothed:
            self.marker.setData([], [])
            self.line.hide()
            return
        self.marker.setData([lrs[index]], [smoothed[index]])
        self.line.setPos(math.log10(lrs[index]))
        self.line.show()
        finite = [v for v in smoothed if math.isfinite(v)]
        if finite:
            low, high = min(finite), max(finite)
            span = high - low or 1.0
            self.plot.setYRange(low - 0.1 * span, high + 0.2 * span)

    def _say(self, text: str, *, error: bool = False) -> None:
        self.message.setText(text)
        self.message.setStyleSheet(ERROR_STYLE if error else "")

    def closeEvent(self, event) -> None:  # noqa: N802 - Qt's name
        if self.task is not None and self.is_running():
            self.task.cancel.set()
            self.task.wait(60000)
        super().closeEvent(event)
