"""Training from the app: the engine's Trainer on a worker QThread, its events throttled into GUI-thread signals."""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PySide6.QtCore import QObject, QThread, Signal, Slot
from PySide6.QtWidgets import QApplication

from app.process_run import Launcher, ProcessRun, run_processes
from engine.config import ProjectConfig
from engine.events import BatchProgress, EpochFinished, Event, LogMessage, RunFinished, RunStarted, to_dict

if TYPE_CHECKING:  # the engine's trainer imports torch: loaded on the worker thread, off the window's start-up
    from engine.trainer import Trainer, TrainState


def release_freed_memory() -> bool:
    """Give the heap pages a finished run freed back to the system (glibc's malloc_trim); False where unavailable.

    glibc keeps freed memory in each thread's arena for reuse; a run's tensors and batches are freed when it
    ends, but without a trim the app's resident memory creeps up from one run to the next.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.malloc_trim(0))
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return False


class StepCounter:
    """A trainer callback that keeps the worker's global_step current at every batch (the events are throttled).

    It implements every hook of engine.trainer.Callback (the trainer calls them by name), without importing the
    trainer's module, which would pull PyTorch into the window's start-up."""

    def __init__(self, worker: TrainingWorker):
        self.worker = worker

    def on_log(self, trainer: Trainer, message: str) -> None:
        pass

    def on_run_started(self, trainer: Trainer, state: TrainState) -> None:
        self.worker.global_step = state.global_step

    def on_batch_finished(self, trainer: Trainer, state: TrainState, loss: float) -> None:
        worker = self.worker
        # The stop request is looked at before the step is published: a Stop pressed after the GUI read this
        # step counts against a later one.
        if worker.stop_seen_step is None and worker.stop_event.is_set():
            worker.stop_seen_step = state.global_step  # the batch in progress when Stop was pressed
        worker.global_step = state.global_step  # an int: safe to read from the GUI thread

    def on_epoch_finished(self, trainer: Trainer, state: TrainState, metrics: dict[str, Any]) -> None:
        pass

    def on_run_finished(self, trainer: Trainer, state: TrainState) -> None:
        pass


class TrainingWorker(QObject):
    """Runs one RunSession; run() executes on the worker thread. Every signal carries plain Python values: the
    session's events (engine/events.py) as dicts, throttled by the session's emitter."""

    logged = Signal(str)
    run_started = Signal(dict)
    batch_finished = Signal(dict)
    epoch_finished = Signal(dict)
    run_finished = Signal(dict)  # engine.events.RunFinished's fields
    done = Signal()

    def __init__(
        self,
        cfg: ProjectConfig | None,
        stop_event: threading.Event,
        *,
        resume_from: str | None = None,
        epochs: int | None = None,
        init_from: str | None = None,
    ):
        super().__init__()
        self.cfg, self.stop_event = cfg, stop_event
        self.resume_from, self.epochs, self.init_from = resume_from, epochs, init_from
        self.run_dir: Path | None = None
        self.global_step = 0  # the trainer's step right now, ahead of the throttled signals
        # The first step that ended after Stop was pressed: the batch in progress then. None while Stop was not
        # pressed, or when it came between batches (while the next batch loaded, or during validation).
        self.stop_seen_step: int | None = None

    def _on_event(self, event: Event) -> None:
        """The session's output: each event becomes its signal (emitted on the worker thread, delivered on the
        GUI thread)."""
        if isinstance(event, LogMessage):
            self.logged.emit(event.message)
            return
        signal = {
            RunStarted: self.run_started,
            BatchProgress: self.batch_finished,
            EpochFinished: self.epoch_finished,
            RunFinished: self.run_finished,
        }[type(event)]
        signal.emit(to_dict(event))

    @Slot()
    def run(self) -> None:
        try:
            self._run()
        finally:
            # Back to the GUI thread before this thread ends: the controller deletes this object there (see
            # widgets/tasks.py for why no Qt object may be left to a worker thread's garbage collection).
            app = QApplication.instance()
            if app is not None:
                self.moveToThread(app.thread())

    def _run(self) -> None:
        from engine.checkpoints import load_checkpoint
        from engine.runs import resume_config
        from engine.session import RunSession, apply_init_from, failed_before_start

        try:
            session_args: dict[str, Any] = {
                "outputs": [self._on_event],
                "callbacks": [StepCounter(self)],
                "stop_event": self.stop_event,
                "log": self.logged.emit,
            }
            if self.resume_from is not None:
                resume = load_checkpoint(self.resume_from)
                cfg = resume_config(resume, self.resume_from, epochs=self.epochs, epochs_field="epochs")
                session = RunSession(cfg, resume=resume, checkpoint=self.resume_from, **session_args)
            else:
                assert self.cfg is not None, "a fresh run needs its project"
                if self.init_from:
                    apply_init_from(self.cfg, self.init_from)
                session = RunSession(self.cfg, **session_args)
        except Exception as exc:  # noqa: BLE001 - shown to the user; the thread must end cleanly
            self._on_event(failed_before_start(exc))
            self.done.emit()
            return
        try:
            self.run_dir = session.prepare()
            session.run()
        except Exception as exc:  # noqa: BLE001 - preparing failed (the run folder is taken, cannot be made)
            self._on_event(failed_before_start(exc))
        finally:
            self.done.emit()


class TrainingController(QObject):
    """Starts, stops and tracks one run at a time. Its signals are emitted on the GUI thread.

    A project with distributed.processes 1 trains in the app's process, in the worker-object pattern: a
    TrainingWorker moved to a QThread, thread.started -> worker.run, worker.done -> thread.quit; Stop sets a
    threading.Event the trainer checks every batch. With more processes, torchrun runs them as a child process
    (app/process_run.py), which sends the same signals with the same payloads; Stop reaches it as SIGINT.
    """

    logged = Signal(str)
    launched = Signal(int)  # a run began in this many processes (1: on the worker thread)
    rank_logged = Signal(int, str)  # (rank, line) of a multi-process run
    run_started = Signal(dict)
    batch_finished = Signal(dict)
    epoch_finished = Signal(dict)
    run_finished = Signal(dict)
    running_changed = Signal(bool)
    errored = Signal(str)  # a failed run's message, for a dialog

    def __init__(self, parent: QObject | None = None, *, launcher: Launcher | None = None):
        """launcher: how a multi-process run's command line is made (default: torchrun, see app/process_run.py)."""
        super().__init__(parent)
        self._launcher = launcher
        self._thread: QThread | None = None
        self._worker: TrainingWorker | None = None
        self._process_run: ProcessRun | None = None
        self._stop = threading.Event()
        self.run_dir: str | None = None
        self.last_result: dict[str, Any] | None = None
        # Of the last run stopped on the worker thread: the step during which Stop was pressed (see
        # TrainingWorker.stop_seen_step); None for other runs and for a Stop that came between batches.
        self.stop_seen_step: int | None = None

    def is_running(self) -> bool:
        return self._thread is not None or self._process_run is not None

    def current_step(self) -> int | None:
        """The running trainer's global step at this moment (not throttled); None when no run is going.
        A run in other processes is known only as far as rank 0's latest batch event."""
        runner = self._worker or self._process_run
        return runner.global_step if runner is not None else None

    def process_ids(self) -> list[int]:
        """torchrun's and its workers' pids while a multi-process run is going; empty otherwise."""
        return self._process_run.pids() if self._process_run is not None else []

    def start(self, cfg: ProjectConfig, *, init_from: str | None = None) -> bool:
        """Train a snapshot of cfg in a new run folder; False (and nothing starts) while a run is going."""
        if self.is_running():
            return self._refuse()
        if cfg.distributed.processes > 1:
            return self._launch_processes(
                ProcessRun(
                    copy.deepcopy(cfg),
                    cfg.distributed.processes,
                    init_from=init_from,
                    launcher=self._launcher,
                    parent=self,
                )
            )
        return self._launch(TrainingWorker(copy.deepcopy(cfg), self._new_stop(), init_from=init_from))

    def resume(self, checkpoint: str, epochs: int | None = None, *, processes: int | None = None) -> bool:
        """Continue the run a checkpoint belongs to, in its folder, to `epochs` in all (default: as saved), in as
        many processes as that run used unless `processes` says otherwise."""
        if self.is_running():
            return self._refuse()
        processes = processes or run_processes(checkpoint)
        if processes > 1:
            return self._launch_processes(
                ProcessRun(None, processes, resume_from=checkpoint, epochs=epochs, launcher=self._launcher, parent=self)
            )
        return self._launch(TrainingWorker(None, self._new_stop(), resume_from=checkpoint, epochs=epochs))

    def stop(self) -> None:
        """Ask the run to end after the current batch (pressing it twice is harmless)."""
        if self._process_run is not None:
            if not self._process_run.stop_requested:
                self._process_run.stop()
                self.logged.emit("Stopping every process after this batch...")
        elif self.is_running() and not self._stop.is_set():
            self._stop.set()
            self.logged.emit("Stopping after this batch...")

    def wait(self, ms: int = 60000) -> bool:
        """Block until the run ended, processing events so its last signals arrive; True if ended."""
        deadline = time.monotonic() + ms / 1000
        while self.is_running() and time.monotonic() < deadline:
            if self._thread is not None:
                self._thread.wait(20)
            elif self._process_run is not None:
                self._process_run.wait_briefly(20)
            QApplication.processEvents()
        return not self.is_running()

    def _new_stop(self) -> threading.Event:
        self._stop = threading.Event()
        return self._stop

    def _refuse(self) -> bool:
        self.logged.emit("A run is already going; stop it before starting another.")
        return False

    def _launch(self, worker: TrainingWorker) -> bool:
        thread = QThread()
        thread.setObjectName("training")
        worker.moveToThread(thread)
        self._connect(worker)
        thread.started.connect(worker.run)
        self._thread, self._worker = thread, worker
        self.run_dir, self.stop_seen_step = None, None
        self.launched.emit(1)
        thread.start()
        self.running_changed.emit(True)
        return True

    def _launch_processes(self, run: ProcessRun) -> bool:
        self._connect(run)
        run.rank_logged.connect(self.rank_logged)
        self._process_run = run
        self.run_dir, self.stop_seen_step = None, None
        self.launched.emit(run.processes)
        run.start()
        self.running_changed.emit(True)
        return True

    def _connect(self, runner: TrainingWorker | ProcessRun) -> None:
        runner.logged.connect(self._on_logged)
        runner.run_started.connect(self._on_run_started)
        runner.batch_finished.connect(self._on_batch_finished)
        runner.epoch_finished.connect(self._on_epoch_finished)
        runner.run_finished.connect(self._on_run_finished)
        runner.done.connect(self._on_done)

    @Slot(str)
    def _on_logged(self, message: str) -> None:
        self.logged.emit(message)

    @Slot(dict)
    def _on_run_started(self, info: dict) -> None:
        self.run_dir = info["run_dir"]
        self.run_started.emit(info)

    @Slot(dict)
    def _on_batch_finished(self, info: dict) -> None:
        self.batch_finished.emit(info)

    @Slot(dict)
    def _on_epoch_finished(self, metrics: dict) -> None:
        self.epoch_finished.emit(metrics)

    @Slot(dict)
    def _on_run_finished(self, result: dict) -> None:
        self.last_result = result
        if result.get("run_dir"):
            self.run_dir = result["run_dir"]
        if result["status"] == "failed":
            self.logged.emit(f"Run failed: {result['error']}")
            return
        message = f"Run {result['status']} after epoch {result['epoch']} of {result['epochs']}"
        worker = self._worker
        if result["status"] == "stopped" and worker is not None and worker.stop_seen_step is not None:
            # The worker wrote both before it emitted this result: no race with the training thread.
            self.stop_seen_step = worker.stop_seen_step
            message += f" (Stop was pressed during step {worker.stop_seen_step}; the last step trained: "
            message += f"{worker.global_step})"
        self.logged.emit(message)

    @Slot()
    def _on_done(self) -> None:
        thread, worker, result = self._thread, self._worker, self.last_result or {}
        if thread is not None:
            thread.quit()
            thread.wait()
            # Deleted here, on the GUI thread (the worker moved itself back before its thread ended), not by
            # whichever thread's garbage collection finds them in a reference cycle later.
            thread.deleteLater()
        if worker is not None:
            worker.deleteLater()
        if self._process_run is not None:
            self._process_run.deleteLater()
        self._thread, self._worker, self._process_run = None, None, None
        release_freed_memory()
        self.running_changed.emit(False)
        self.run_finished.emit(result)
        if result.get("status") == "failed":
            self.errored.emit(result.get("error") or "the run failed")
