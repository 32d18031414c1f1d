"""The run view: Train / Stop / Resume, epoch and batch progress with time left, the status line and the live plots."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from PySide6.QtCore import QEvent, Qt, QTimer, Signal, Slot
from PySide6.QtWidgets import (
    QFileDialog,
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QSizePolicy,
    QVBoxLayout,
    QWidget,
)

from engine.events import FEATURE_PASS_PROGRESS, progress_kind
from engine.run_files import is_completed, planned_epochs
from engine.run_lock import holder
from widgets.live_plots import LivePlots
from widgets.look import ERROR_COLOUR

# Batch updates are applied in batches of their own, paced so that drawing them takes at most this share of one
# core: on a machine whose cores all train, every millisecond the GUI thread paints is taken from the model, and
# more than that (a training thread put aside for the GUI waits, and its team with it, at the next barrier).
# At 2.5% the app's runs took 0.83-0.91x the headless run's time on 2 CPUs (GUI thread CPU 0.6 s of a 10 s run);
# at 1% 0.99x (0.45 s), with the plots still redrawn about once a second.
# The interval follows the measured cost of an update (mostly repainting the plots), within these bounds; where an
# update costs more than MAX_UPDATE_INTERVAL x GUI_SHARE (10 ms), the bound wins and the share is larger (2 to 3%
# of a core was measured on 2 CPUs, plots four wide, epoch updates and the progress bars' repaints included).
GUI_SHARE = 0.01
MIN_UPDATE_INTERVAL = 0.1  # seconds: the display never lags a fast machine's run by more than this ...
MAX_UPDATE_INTERVAL = 1.0  # ... nor a slow machine's by more than this
STATUS_LINES = 2  # lines of text the status line keeps room for, so the plots under it keep their size

OBJECT_NAMES = {
    "run.train": "starts a new training run of the project",
    "run.stop": "stops the run after the current batch (the finished epochs' checkpoints are kept)",
    "run.resume": "continues the current run from its last checkpoint",
    "run.save_plots": "saves the four plots as one PNG image",
    "run.epoch_progress": "epochs finished out of the run's total",
    "run.batch_progress": "batches done in the current epoch",
    "run.run_eta": "estimated time left in the run",
    "run.epoch_eta": "estimated time left in the current epoch",
    "run.status": "device, training speed and the last epoch's metrics",
    "run.message": "the result of saving the plots (where it went, or why it failed)",
}


def format_duration(seconds: float) -> str:
    """A short human duration: '8 s', '3 min 05 s', '1 h 12 min'."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def time_left(elapsed: float, fraction: float) -> float | None:
    """Seconds still to go when `fraction` of the work took `elapsed` seconds; None before there is a rate."""
    if not (0 < fraction <= 1) or elapsed <= 0:
        return None
    return elapsed * (1 - fraction) / fraction


def _number(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def metrics_text(metrics: dict[str, Any]) -> str:
    """One epoch's metrics in a line: 'train loss 0.512, val loss 0.601, val accuracy 83.3%'."""
    parts = []
    for key, label in (("train_loss", "train loss"), ("val_loss", "val loss")):
        value = _number(metrics.get(key))
        if value is not None:
            parts.append(f"{label} {value:.4g}")
    for key, label in (("train_accuracy", "train accuracy"), ("val_accuracy", "val accuracy")):
        value = _number(metrics.get(key))
        if value is not None:
            parts.append(f"{label} {100 * value:.1f}%")
    return ", ".join(parts)


class RunView(QWidget):
    """Shows one run as it trains. Connect the TrainingController's signals to the on_* slots."""

    train_requested = Signal()
    stop_requested = Signal()
    resume_requested = Signal()

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self._running = False
        self._can_resume = False
        self._stopping = False
        self._preparing = False  # running, and the run has not started yet (no run_started)
        self._progress_shown = False  # the status line shows a progress line of the log, not the run's state
        self._device = ""
        self._epochs = 0
        self._start_epoch = 0
        self._batches_per_epoch = 0
        self._epoch_started_at = 0.0  # run-elapsed seconds when the current epoch began
        self._epoch_first: tuple[int, int, float] | None = None  # (epoch, batch, elapsed) of its first batch shown
        self._last_metrics: dict[str, Any] | None = None
        self.run_dir: str | None = None
        self._pending: list[dict] = []  # batch payloads waiting for the next paced update
        self._last_update = 0.0  # perf_counter() of the last applied update
        self._update_cost = 0.0  # seconds the last updates took on the GUI thread (applying and painting)
        self._painted = 0.0  # the plots' paint_total at the last update
        self._flush_timer = QTimer(self)
        self._flush_timer.setSingleShot(True)
        self._flush_timer.timeout.connect(self.flush_batches)

        self.train_button = self._button("Train", "run.train", "Start a new training run of the project")
        self.stop_button = self._button(
            "Stop", "run.stop", "Stop after the current batch; finished epochs keep their checkpoints"
        )
        self.resume_button = self._button("Resume", "run.resume", "Continue the current run from its last checkpoint")
        self.save_button = self._button(
            "Save plots as PNG...", "run.save_plots", "Save the four plots as one PNG image"
        )
        self.train_button.clicked.connect(self._on_train_clicked)
        self.stop_button.clicked.connect(self._on_stop_clicked)
        self.resume_button.clicked.connect(self._on_resume_clicked)
        self.save_button.clicked.connect(self._on_save_plots_clicked)

        self.epoch_bar = self._bar("run.epoch_progress")
        self.batch_bar = self._bar("run.batch_progress")
        self.run_eta = self._label("run.run_eta")
        self.epoch_eta = self._label("run.epoch_eta")
        self.status_label = self._label("run.status", wrap=True)
        self._reserve_status_lines()
        self.message_label = self._label("run.message", wrap=True)
        self.message_label.hide()
        self.plots = LivePlots()

        buttons = QHBoxLayout()
        for button in (self.train_button, self.stop_button, self.resume_button):
            buttons.addWidget(button)
        buttons.addStretch(1)
        buttons.addWidget(self.save_button)

        progress = QGridLayout()
        progress.addWidget(QLabel("Epochs"), 0, 0)
        progress.addWidget(self.epoch_bar, 0, 1)
        progress.addWidget(self.run_eta, 0, 2)
        progress.addWidget(QLabel("Batches"), 1, 0)
        progress.addWidget(self.batch_bar, 1, 1)
        progress.addWidget(self.epoch_eta, 1, 2)
        progress.setColumnStretch(1, 3)
        progress.setColumnStretch(2, 2)

        layout = QVBoxLayout(self)
        layout.addLayout(buttons)
        layout.addLayout(progress)
        layout.addWidget(self.status_label)
        layout.addWidget(self.message_label)
        layout.addWidget(self.plots, 1)

        self.reset_progress()
        self.status_label.setText("No run yet: press Train to start one.")
        self.on_running_changed(False)

    # -- construction helpers --------------------------------------------------------------------
    def _button(self, text: str, name: str, tip: str) -> QPushButton:
        button = QPushButton(text)
        button.setObjectName(name)
        button.setToolTip(tip)
        return button

    def _bar(self, name: str) -> QProgressBar:
        bar = QProgressBar()
        bar.setObjectName(name)
        bar.setTextVisible(True)
        bar.setAlignment(Qt.AlignmentFlag.AlignCenter)
        bar.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        return bar

    def _label(self, name: str, wrap: bool = False) -> QLabel:
        label = QLabel()
        label.setObjectName(name)
        label.setWordWrap(wrap)
        label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        return label

    def _reserve_status_lines(self) -> None:
        """The status line keeps room for STATUS_LINES lines of text. Its texts take one line or two (the run starting,
        then each epoch's metrics): left to size itself, it grew and shrank at every run's start and first epoch,
        and the plots under it, resized, were laid out and repainted whole each time (two full repaints a run, and
        the plots jumping by a line)."""
        margins = self.status_label.contentsMargins()
        lines = STATUS_LINES * self.status_label.fontMetrics().lineSpacing()
        self.status_label.setMinimumHeight(lines + margins.top() + margins.bottom())

    def changeEvent(self, event: QEvent) -> None:  # noqa: N802 - Qt override
        if event.type() in (QEvent.Type.FontChange, QEvent.Type.StyleChange):
            self._reserve_status_lines()
        super().changeEvent(event)

    # -- state the main window sets ----------------------------------------------------------------
    def set_can_resume(self, can: bool) -> None:
        """Whether Resume has something to continue (the main window knows when a checkpoint exists)."""
        self._can_resume = bool(can)
        self.resume_button.setEnabled(self._can_resume and not self._running)

    def reset_progress(self) -> None:
        """Empty progress bars and time estimates (no run shown)."""
        self.epoch_bar.setRange(0, 1)
        self.epoch_bar.setValue(0)
        self.epoch_bar.setFormat("no run")
        self.batch_bar.setRange(0, 1)
        self.batch_bar.setValue(0)
        self.batch_bar.setFormat("")
        self.run_eta.setText("")
        self.epoch_eta.setText("")

    def show_no_run(self) -> None:
        """No run to show (a new project, or one that never trained): empty plots, and what to do."""
        self._flush_timer.stop()
        self._pending.clear()
        self.run_dir = None
        self._last_metrics = None
        self.plots.clear()
        self.reset_progress()
        self.status_label.setText("No run yet: press Train to start one.")

    def show_history(self, run_dir: str, rows: list[dict[str, Any]]) -> None:
        """Show a finished or interrupted run's epoch curves, as read from its metrics.jsonl, and which it is."""
        self._flush_timer.stop()
        self._pending.clear()
        self.run_dir = run_dir
        self._last_metrics = None
        self.plots.load_history(rows)
        self.reset_progress()
        epochs = [int(r["epoch"]) for r in rows if _number(r.get("epoch")) is not None]
        done = max(epochs, default=0)
        planned = planned_epochs(run_dir) or done
        if done:
            self.epoch_bar.setRange(0, max(done, planned))
            self.epoch_bar.setValue(done)
            self.epoch_bar.setFormat(f"{done} / {max(done, planned)} epoch(s)")
        name = Path(run_dir).name
        owner = holder(run_dir)
        if owner is not None:  # another process (the command line, another window) is training it now
            text = (
                f"Run {name}: being trained by process {owner.get('pid', '?')} right now; "
                f"these are its curves up to epoch {done}."
            )
        elif is_completed(run_dir):
            text = f"Run {name}: finished, {done} epoch(s)."
        elif done:
            # Stopped, killed or crashed: its last checkpoint is whole, so Resume continues it.
            text = f"Run {name}: interrupted after epoch {done} of {planned}. Resume continues it."
        else:
            text = f"Run {name}: interrupted before its first epoch finished."
        summary = metrics_text(rows[-1] if rows else {})
        self.status_label.setText(text + (f" Last epoch: {summary}." if summary else ""))

    # -- slots for TrainingController ------------------------------------------------------------
    @Slot(dict)
    def on_run_started(self, info: dict) -> None:
        self._flush_timer.stop()
        self._pending.clear()  # a previous run's last points never land on the new run's plots
        self._last_update = 0.0
        self.run_dir = info.get("run_dir")
        self._preparing = self._progress_shown = False
        self._epoch_first = None  # a previous run's first batch is no reference for this one's pace
        self._device = str(info.get("device") or "")
        self._epochs = int(info.get("epochs") or 0)
        self._start_epoch = int(info.get("start_epoch") or 0)
        self._batches_per_epoch = int(info.get("batches_per_epoch") or 0)
        self._epoch_started_at = 0.0
        history = list(info.get("history") or [])
        self._last_metrics = history[-1] if history else None
        if history:  # a resumed run: its earlier epochs first
            self.plots.load_history(history, batches_per_epoch=self._batches_per_epoch or None)
        else:
            self.plots.clear()
        self.epoch_bar.setRange(0, max(1, self._epochs))
        self.epoch_bar.setValue(self._start_epoch)
        self._set_epoch_format(self._start_epoch + 1)
        self.batch_bar.setRange(0, max(1, self._batches_per_epoch))
        self.batch_bar.setValue(0)
        self.batch_bar.setFormat(f"batch 0 / {self._batches_per_epoch}")
        self.run_eta.setText("")
        self.epoch_eta.setText("")
        if self._start_epoch:
            what = f"Resumed after epoch {self._start_epoch} of {self._epochs}"
        else:
            what = f"Training {self._epochs} epoch(s)"
        processes = int(info.get("world_size") or 1)
        where = f"{self._device} in {processes} processes" if processes > 1 else self._device
        self.status_label.setText(f"{what} on {where}, {self._batches_per_epoch} batches per epoch.")

    @Slot(dict)
    def on_batch_finished(self, info: dict) -> None:
        """Queue a batch payload; it is shown now if the last update is long enough ago, else a little later."""
        self._pending.append(info)
        if self._flush_timer.isActive():
            return
        wait = self._last_update + self.update_interval() - time.perf_counter()
        if wait <= 0:
            self.flush_batches()
        else:
            self._flush_timer.start(max(1, math.ceil(wait * 1000)))

    def update_interval(self) -> float:
        """Seconds between batch updates: the measured cost of one over GUI_SHARE, within the bounds."""
        return min(MAX_UPDATE_INTERVAL, max(MIN_UPDATE_INTERVAL, self._update_cost / GUI_SHARE))

    @Slot()
    def flush_batches(self) -> None:
        """Show every queued batch payload now: all their points, and the progress of the newest."""
        self._flush_timer.stop()
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        started = time.perf_counter()
        steps, losses, lrs = [], [], []
        for info in pending:
            s, v = list(info.get("steps") or []), list(info.get("losses") or [])
            if not s:
                continue
            steps += s
            losses += v
            # Each payload's learning rate belongs at its last step.
            lrs += [math.nan] * (len(s) - 1) + [info["lr"] if _number(info.get("lr")) is not None else math.nan]
        self.plots.add_batches(steps, losses, lrs)
        self._show_batch(pending[-1])
        # This update's own work, and every paint since the last one (what that update caused, however many
        # repaints it took; before the first paint, the typical cost of one).
        painted = self.plots.paint_total - self._painted if self._painted else self.plots.paint_seconds
        self._painted = self.plots.paint_total
        took = time.perf_counter() - started + painted
        self._update_cost = took if self._update_cost == 0.0 else 0.7 * self._update_cost + 0.3 * took
        self._last_update = time.perf_counter()

    def _show_batch(self, info: dict) -> None:
        epoch, epochs = int(info.get("epoch") or 0), int(info.get("epochs") or self._epochs)
        batch = int(info.get("batch") or 0)
        per_epoch = int(info.get("batches_per_epoch") or self._batches_per_epoch or 1)
        if epochs != self._epochs:
            self._epochs = epochs
            self.epoch_bar.setRange(0, max(1, epochs))
        self._batches_per_epoch = per_epoch
        self.batch_bar.setRange(0, per_epoch)
        self.batch_bar.setValue(min(batch, per_epoch))
        self.batch_bar.setFormat(f"batch {batch} / {per_epoch}")
        self._set_epoch_format(epoch)

        elapsed = float(info.get("elapsed") or 0.0)
        if self._epoch_first is None or self._epoch_first[0] != epoch:
            self._epoch_first = (epoch, batch, elapsed)
        # The pace of this epoch's batches since the first one shown: what came before it (the next phase's feature
        # pass, the loader's workers starting) is not batches, and at the epoch's start it would dominate.
        _, first_batch, first_elapsed = self._epoch_first
        pace = (elapsed - first_elapsed) / (batch - first_batch) if batch > first_batch else None
        if pace is not None:
            epoch_left: float | None = pace * (per_epoch - batch)
        else:
            epoch_left = time_left(elapsed - self._epoch_started_at, batch / per_epoch)
        self.epoch_eta.setText("" if epoch_left is None else f"about {format_duration(epoch_left)} left in this epoch")
        planned = epochs - self._start_epoch
        if planned > 0:
            done = (epoch - 1 - self._start_epoch + batch / per_epoch) / planned
            run_left = time_left(elapsed, done)
            if pace is not None and epoch_left is not None:
                # At least this epoch's rest and the epochs after it at its pace: the run's average pace is far too
                # quick once a run in phases leaves its cached head epochs for the fine-tuning.
                at_this_pace = epoch_left + max(0, epochs - epoch) * pace * per_epoch
                run_left = max(run_left or 0.0, at_this_pace)
            self.run_eta.setText("" if run_left is None else f"about {format_duration(run_left)} left in the run")
        if self._progress_shown and not self._stopping:
            self._progress_shown = False  # a later phase's feature pass has ended: its batches train
            if self._last_metrics is not None:
                self.status_label.setText(self._status_text(self._last_metrics))
        loss = _number(info.get("loss"))
        if self._last_metrics is None and loss is not None and not self._stopping:
            # Before the first epoch ends there are no epoch metrics; the batch loss says it is moving.
            self.status_label.setText(f"{self._device} · epoch {epoch}, batch {batch}: loss {loss:.4g}")

    @Slot(dict)
    def on_epoch_finished(self, metrics: dict) -> None:
        self.flush_batches()
        self.plots.add_epoch(metrics)
        self._last_metrics = dict(metrics)
        epoch = int(metrics.get("epoch") or 0)
        epochs = int(metrics.get("epochs") or self._epochs)
        self._epochs = epochs
        self._epoch_started_at = float(metrics.get("elapsed") or self._epoch_started_at)
        self.epoch_bar.setRange(0, max(1, epochs))
        self.epoch_bar.setValue(min(epoch, epochs))
        self._set_epoch_format(epoch + 1 if epoch < epochs else epoch)  # the epoch now training
        self.batch_bar.setValue(self.batch_bar.maximum())
        self.epoch_eta.setText("")
        if epoch >= epochs:
            self.run_eta.setText("")
        if not self._stopping:
            self.status_label.setText(self._status_text(metrics))

    @Slot(dict)
    def on_run_finished(self, result: dict) -> None:
        self.flush_batches()
        status = result.get("status")
        epoch, epochs = int(result.get("epoch") or 0), int(result.get("epochs") or self._epochs)
        best = result.get("best_epoch")
        best_text = f", best epoch {best}" if best else ""
        self.run_eta.setText("")
        self.epoch_eta.setText("")
        if status == "completed":
            if epoch >= epochs > 0:
                self.epoch_bar.setRange(0, epochs)
                self.epoch_bar.setValue(epochs)
                self.batch_bar.setValue(self.batch_bar.maximum())
            if result.get("stopped_early"):
                text = f"Early stopping ended the run after epoch {epoch} of {epochs}{best_text}."
            else:
                text = f"Finished {epoch} of {epochs} epoch(s){best_text}."
        elif status == "stopped":
            text = (
                f"Stopped after epoch {epoch} of {epochs}{best_text}."
                if epoch
                else "Stopped before the first epoch finished; no checkpoint was written."
            )
        else:
            text = f"The run failed: {result.get('error') or 'unknown error'}"
        if epoch:
            self._set_epoch_format(epoch)  # the last finished epoch, not the one that was cut short
        if self._last_metrics and status != "failed":
            summary = metrics_text(self._last_metrics)
            if summary:
                text += f" Last epoch: {summary}."
        self.status_label.setText(text)

    @Slot(str)
    def on_logged(self, text: str) -> None:
        """The run's log, as it comes. While the run prepares (the data scanned, the model built, features cached:
        a minute, on a big dataset) the status line shows what it is doing; during the run, the progress lines of
        a later phase's feature pass (between two epochs, with the bars standing still)."""
        if not self._running or self._stopping:
            return
        line = text.strip().splitlines()[0] if text.strip() else ""
        if not line:
            return
        if self._preparing:
            self.status_label.setText(f"Preparing the run: {line}")
        elif progress_kind(line) == FEATURE_PASS_PROGRESS:
            self._progress_shown = True
            self.status_label.setText(line)

    @Slot(bool)
    def on_running_changed(self, running: bool) -> None:
        if running and not self._running:  # a run begins: until it has started (run_started) it prepares
            self._preparing = True
            self._progress_shown = False
            self.reset_progress()
            self.epoch_bar.setFormat("preparing")
            self.status_label.setText("Preparing the run: reading the data and building the model...")
        if not running and self._preparing:  # ended (failed, stopped) before it started: no "preparing" left over
            self.reset_progress()
        self._running = bool(running)
        if not running:
            self._preparing = self._progress_shown = False
            self._stopping = False
        self.train_button.setEnabled(not running)
        self.resume_button.setEnabled(not running and self._can_resume)
        self.stop_button.setEnabled(running and not self._stopping)
        self.stop_button.setText("Stopping..." if self._stopping else "Stop")

    # -- button handlers -------------------------------------------------------------------------
    @Slot()
    def _on_train_clicked(self) -> None:
        self.train_requested.emit()

    @Slot()
    def _on_resume_clicked(self) -> None:
        self.resume_requested.emit()

    @Slot()
    def _on_stop_clicked(self) -> None:
        if not self._running or self._stopping:
            return  # a second press while the first is taking effect does nothing
        self._stopping = True
        self.stop_button.setEnabled(False)
        self.stop_button.setText("Stopping...")
        self.status_label.setText("Stopping after the current batch...")
        self.stop_requested.emit()

    @Slot()
    def _on_save_plots_clicked(self) -> None:
        start = str(Path(self.run_dir or Path.home()) / "plots.png")
        path, _ = QFileDialog.getSaveFileName(self, "Save plots as PNG", start, "PNG images (*.png)")
        if path:
            self.save_plots(path)

    def save_plots(self, path: str) -> bool:
        """Write the plots to path (".png" added when missing); the outcome is shown under the status line."""
        target = Path(path)
        if target.suffix.lower() != ".png":
            target = target.with_name(target.name + ".png")
        try:
            if not target.parent.is_dir():
                raise OSError(f"the folder {target.parent} does not exist")
            size = self.plots.export_png(target)
        except OSError as exc:
            self._show_message(f"Could not save the plots to {target}: {exc}", error=True)
            return False
        self._show_message(f"Saved the plots to {target} ({size.width()} x {size.height()} pixels).")
        return True

    # -- helpers ---------------------------------------------------------------------------------
    def _set_epoch_format(self, current: int) -> None:
        self.epoch_bar.setFormat(f"epoch {max(1, current)} / {self._epochs}" if self._epochs else "")

    def _status_text(self, metrics: dict[str, Any]) -> str:
        parts = [self._device] if self._device else []
        speed = _number(metrics.get("samples_per_second"))
        if speed is not None:
            parts.append(f"{speed:,.0f} samples/s")
        summary = metrics_text(metrics)
        epoch = metrics.get("epoch")
        parts.append(f"epoch {epoch}: {summary}" if summary else f"epoch {epoch} finished")
        if metrics.get("best"):
            parts[-1] += " (best so far)"
        return " · ".join(parts)

    def _show_message(self, text: str, *, error: bool = False) -> None:
        self.message_label.setText(text)
        self.message_label.setStyleSheet(f"color: {ERROR_COLOUR};" if error else "")
        self.message_label.setVisible(bool(text))
