"""Qt objects the app is done with are deleted on the GUI thread, never by a worker thread's garbage collection
(widgets/lifetime.py, widgets/tasks.py): a Qt object deleted from a worker thread can deadlock with the GUI thread."""

from __future__ import annotations

import gc
import threading

import shiboken6
from PySide6.QtCore import QCoreApplication, QEvent, QObject, QTimer
from PySide6.QtWidgets import QFileDialog, QMessageBox, QWidget

from widgets.folders import chosen_path, folder_dialog
from widgets.lifetime import collect_on_gui_thread, delete_on_close, forget_when_destroyed
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


def test_a_closed_widget_is_deleted_and_its_owner_forgets_it_but_not_its_successor(qtbot):
    class Owner:
        box: QMessageBox | None = None

    owner = Owner()
    parent = QWidget()
    qtbot.addWidget(parent)
    destroyed: list[tuple[str, bool]] = []
    first = QMessageBox(QMessageBox.Icon.Warning, "First", "first", QMessageBox.StandardButton.Ok, parent)
    delete_on_close(first)
    forget_when_destroyed(owner, "box", first)
    record_destruction(first, destroyed)
    first.open()
    first.button(QMessageBox.StandardButton.Ok).click()  # the user closes it
    assert owner.box is first and shiboken6.isValid(first)  # deleteLater: gone at the next turn of the loop
    second = QMessageBox(QMessageBox.Icon.Warning, "Second", "second", QMessageBox.StandardButton.Ok, parent)
    delete_on_close(second)
    forget_when_destroyed(owner, "box", second)
    second.open()
    deferred_deletes()
    assert not shiboken6.isValid(first) and destroyed == [("QMessageBox", True)]
    assert owner.box is second  # the first one's end does not drop the one that replaced it
    second.close()  # as closing its window does (Escape, the title bar's button)
    deferred_deletes()
    assert not shiboken6.isValid(second) and owner.box is None


def test_a_file_dialog_is_deleted_once_its_answer_is_read(qtbot, tmp_path):
    parent = QWidget()
    qtbot.addWidget(parent)
    dialogs: list[QFileDialog] = []

    def answer(accept: bool) -> None:
        shown = [d for d in parent.findChildren(QFileDialog) if d.isVisible()]
        if not shown:
            QTimer.singleShot(10, lambda: answer(accept))
            return
        dialog = shown[0]
        dialogs.append(dialog)
        if accept:
            dialog.selectFile(str(tmp_path))
            dialog.accept()
        else:
            dialog.reject()

    QTimer.singleShot(0, lambda: answer(False))
    assert chosen_path(folder_dialog(parent, "Pick", str(tmp_path))) is None
    QTimer.singleShot(0, lambda: answer(True))
    assert chosen_path(folder_dialog(parent, "Pick", str(tmp_path.parent))) == str(tmp_path)
    deferred_deletes()
    assert len(dialogs) == 2 and not any(shiboken6.isValid(d) for d in dialogs)
    assert parent.findChildren(QFileDialog) == []


class _Cycle:
    """An object in a reference cycle holding a Qt object that Python owns: only the cyclic collector frees it."""

    def __init__(self) -> None:
        self.me = self
        self.obj = QObject()


def test_while_the_owner_lives_cyclic_garbage_is_collected_on_the_gui_thread_only(qtbot):
    before = gc.isenabled()  # the suite collects between tests (tests/conftest.py): on here, as in a plain process
    gc.enable()
    owner = QObject()
    collect_on_gui_thread(owner, interval_ms=10)
    assert not gc.isenabled()
    destroyed: list[tuple[str, bool]] = []
    cycle = _Cycle()
    record_destruction(cycle.obj, destroyed)
    del cycle
    kept: list[list[int]] = []

    def allocate() -> None:  # far past the threshold at which the interpreter would collect, on this thread
        kept.extend([] for _ in range(gc.get_threshold()[0] * 5))

    worker = threading.Thread(target=allocate)
    worker.start()
    worker.join(30)
    assert destroyed == []  # the worker thread collected nothing
    qtbot.waitUntil(lambda: bool(destroyed), timeout=10000)  # the GUI thread's timer does
    assert destroyed == [("QObject", True)]

    owner.deleteLater()
    deferred_deletes()
    assert gc.isenabled()  # as before, once the owner is gone
    kept.clear()
    if not before:
        gc.disable()
