"""Qt objects the app is done with are deleted on the GUI thread, never by a worker thread's garbage collection
(widgets/lifetime.py, widgets/tasks.py): a Qt object deleted from a worker thread can deadlock with the GUI thread."""

from __future__ import annotations

import gc
import threading

import shiboken6
from PySide6.QtCore import QCoreApplication, QEvent, QObject

from widgets.tasks import run_task


def deferred_deletes() -> None:
    QCoreApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)


def record_destruction(obj: QObject, into: list[tuple[str, bool]]) -> None:
    """Note, when obj's C++ object is destroyed, whether that happened on the GUI (main) thread."""
    name = type(obj).__name__
    obj.destroyed.connect(lambda *_: into.append((name, threading.current_thread() is threading.main_thread())))


def collect_on_a_worker_thread(qtbot) -> None:
    """gc.collect() on a real Python thread while the GUI thread runs its event loop; a deadlock fails the test
    after 20 s instead of hanging it."""
    worker = threading.Thread(target=gc.collect, daemon=True)
    worker.start()
    qtbot.waitUntil(lambda: not worker.is_alive(), timeout=20000)
    worker.join(1)
    assert not worker.is_alive(), "gc.collect() on a worker thread did not finish"


def _count(progress, cancel) -> int:
    for i in range(5):
        progress(i)
    return 5


def test_a_finished_tasks_thread_and_worker_are_deleted_on_the_gui_thread_not_by_a_worker_threads_gc(qtbot):
    destroyed: list[tuple[str, bool]] = []
    progressed: list[int] = []
    # progress=True: the worker holds the progress callable, which refers back to the worker (a reference cycle).
    task = run_task("count", _count, progress=True, min_interval=0.0, on_progress=progressed.append)
    record_destruction(task.worker, destroyed)
    record_destruction(task.qthread, destroyed)
    worker, qthread = task.worker, task.qthread
    with qtbot.waitSignal(task.finished, timeout=30000):
        pass
    assert task.result == 5 and progressed[-1] == 4 and not task.is_running() and task.wait()
    deferred_deletes()
    assert not shiboken6.isValid(worker) and not shiboken6.isValid(qthread)
    del task, worker, qthread
    collect_on_a_worker_thread(qtbot)
    assert sorted(destroyed) == [("QThread", True), ("_Worker", True)]
