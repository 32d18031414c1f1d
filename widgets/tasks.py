"""Run a plain function off the GUI thread (a worker object on a QThread) and get its result back as signals.

A finished task's QThread and worker are deleted on the GUI thread (deleteLater, from the task's done slot), never
left to Python's cyclic garbage collector: that runs in whichever thread allocates when a threshold is passed, and a
Qt object deleted from a worker thread there can deadlock with the GUI thread (the object's destructor takes a Qt
lock and waits for the GIL, which the GUI thread holds while it waits for the same lock).
"""

from __future__ import annotations

import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from PySide6.QtCore import QCoreApplication, QObject, QThread, Signal, Slot
from PySide6.QtWidgets import QApplication


def _nothing() -> None:
    return None


class _Worker(QObject):
    """Lives on the task's thread while it runs (then moves back to the GUI thread); only forwards plain values."""

    progressed = Signal(object)
    returned = Signal(object)
    errored = Signal(object, str)  # the exception and its formatted traceback (for the log)
    done = Signal()

    def __init__(self, fn: Callable[..., Any], args: tuple, kwargs: dict):
        super().__init__()
        self._fn, self._args, self._kwargs = fn, args, kwargs

    def release(self) -> None:
        """Drop the function and its arguments (on the GUI thread, once run() has returned)."""
        self._fn, self._args, self._kwargs = _nothing, (), {}

    @Slot()
    def run(self) -> None:
        try:
            self.returned.emit(self._fn(*self._args, **self._kwargs))
        except BaseException as exc:  # noqa: BLE001 - every failure must reach the GUI, never vanish
            self.errored.emit(exc, traceback.format_exc())
        finally:
            self.done.emit()
            # Back to the GUI thread before this thread ends, so the task can delete this object there (a thread
            # may only push its own objects; once it has ended nobody could move or safely delete this one).
            app = QCoreApplication.instance()
            if app is not None:
                self.moveToThread(app.thread())


class Task(QObject):
    """A running function. Its signals are emitted on the GUI thread, so slots may touch widgets.

    progress: when `progress=True` is given to run_task, the function receives a `progress` callable
    (call it with any plain value; calls closer than `min_interval` apart are dropped, except the last)
    and a `cancel` threading.Event it should check in long loops.
    """

    progressed = Signal(object)
    returned = Signal(object)
    errored = Signal(object, str)
    finished = Signal()

    def __init__(self, name: str, parent: QObject | None = None):
        super().__init__(parent)
        self.name = name
        self.cancel = threading.Event()
        self.qthread = QThread()
        self.qthread.setObjectName(f"task:{name}")
        self.worker: _Worker | None = None
        self.result: Any = None
        self.error: BaseException | None = None
        self.held = False  # queued by hold_new_tasks(), not started yet
        self.ended = False  # the function returned and the thread and worker are handed to deleteLater

    def is_running(self) -> bool:
        return self.held or (not self.ended and self.qthread.isRunning())

    def wait(self, ms: int = 30000) -> bool:
        """Block until the function returned (for tests and for closing the window)."""
        if self.held:
            start_held_tasks()  # whoever waits needs the result now
        deadline = time.monotonic() + ms / 1000
        while not self.ended and self.qthread.isRunning() and time.monotonic() < deadline:
            self.qthread.wait(20)
            QApplication.processEvents()
        QApplication.processEvents()
        return not self.is_running()

    # Slots of an object on the GUI thread: queued connections deliver the worker's signals here.
    @Slot(object)
    def _on_progressed(self, value: Any) -> None:
        self.progressed.emit(value)

    @Slot(object)
    def _on_returned(self, value: Any) -> None:
        self.result = value
        self.returned.emit(value)

    @Slot(object, str)
    def _on_errored(self, exc: BaseException, tb: str) -> None:
        self.error = exc
        self.errored.emit(exc, tb)

    @Slot()
    def _on_done(self) -> None:
        self.qthread.quit()
        self.qthread.wait()
        self.ended = True
        worker, self.worker = self.worker, None
        if worker is not None:
            # The function, its arguments and the progress callable (which refers back to the worker: a reference
            # cycle) go now, on this thread; the objects themselves at the GUI thread's next turn of its loop.
            worker.release()
            worker.deleteLater()
        self.qthread.deleteLater()
        _running.discard(self)
        self.finished.emit()


_running: set[Task] = set()
_held: list[Task] | None = None


def hold_new_tasks() -> None:
    """Queue tasks instead of starting them, until start_held_tasks(). The app holds them while its window
    first shows: a worker thread importing PyTorch would take the GIL from the GUI thread that builds it."""
    global _held
    if _held is None:
        _held = []


def start_held_tasks() -> None:
    """Start the queued tasks in the order they were asked for; new tasks start at once again."""
    global _held
    held, _held = _held or [], None
    for task in held:
        task.held = False
        task.qthread.start()


def running_tasks() -> list[Task]:
    return list(_running)


def cancel_all(wait_ms: int = 30000) -> bool:
    """Ask every task to stop and wait for them (closing the window); True when none is left running."""
    global _held
    for task in _held or []:  # never started: forgotten, their callbacks never run
        task.held = False
        _running.discard(task)
    if _held is not None:
        _held = []
    for task in list(_running):
        task.cancel.set()
    ok = True
    for task in list(_running):
        ok = task.wait(wait_ms) and ok
    return ok


def run_task(
    name: str,
    fn: Callable[..., Any],
    *args: Any,
    progress: bool = False,
    min_interval: float = 0.05,
    on_result: Callable[[Any], None] | None = None,
    on_error: Callable[[BaseException, str], None] | None = None,
    on_progress: Callable[[Any], None] | None = None,
    parent: QObject | None = None,
    **kwargs: Any,
) -> Task:
    """Start fn(*args, **kwargs) on its own QThread and return the Task; callbacks run on the GUI thread."""
    task = Task(name, parent)
    if progress:
        last = [0.0]

        def report(value: Any, _force: bool = False) -> None:
            now = time.monotonic()
            if _force or now - last[0] >= min_interval:
                last[0] = now
                worker.progressed.emit(value)

        kwargs = {**kwargs, "progress": report, "cancel": task.cancel}
    worker = _Worker(fn, args, kwargs)
    task.worker = worker
    worker.moveToThread(task.qthread)
    worker.progressed.connect(task._on_progressed)
    worker.returned.connect(task._on_returned)
    worker.errored.connect(task._on_errored)
    worker.done.connect(task._on_done)
    task.qthread.started.connect(worker.run)
    if on_result is not None:
        task.returned.connect(on_result)
    if on_error is not None:
        task.errored.connect(on_error)
    if on_progress is not None:
        task.progressed.connect(on_progress)
    _running.add(task)
    if _held is not None:
        task.held = True
        _held.append(task)
    else:
        task.qthread.start()
    return task
