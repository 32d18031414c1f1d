"""Windows and dialogs are deleted on the GUI thread once closed, not left to Python's cyclic garbage collector.

The collector runs in whichever thread allocates when a threshold is passed: a training or export thread as often
as the GUI thread. When the garbage it finds holds the Python wrapper of a window that Python owns, PySide deletes
the window, with all its children, from that thread. Its destructor takes Qt's locks and waits for the GIL, while
the GUI thread holds the GIL and waits for one of the same locks: both stop for good (seen in this project's test
suite, in test_export_from_the_dialog). A window deleted on the GUI thread as soon as it is closed leaves the
collector only wrappers of objects that are gone, whose collection deletes nothing.

Not every Qt wrapper Python owns is a window closed by the user: a menu, an action or a panel's helper object in a
reference cycle met the same end (seen in the test suite: a layers task thread's collection deleting widgets while
the GUI thread deleted a menu's actions). So while the main window lives, cyclic collection runs on the GUI thread
alone (collect_on_gui_thread): automatic collection is off, and a timer on the GUI thread collects as Python's own
thresholds would have.
"""

from __future__ import annotations

import gc

from PySide6.QtCore import QObject, Qt, QTimer
from PySide6.QtWidgets import QWidget

_owners = 0  # objects that currently keep the automatic collector off (collect_on_gui_thread)
_was_enabled = True


def collect_due() -> None:
    """Collect each generation that Python's thresholds say is due, as the interpreter would at an allocation: gen 1
    only after gen 0 was due, gen 2 likewise. For a place where collecting is safe (the GUI thread's event loop,
    between tests), with automatic collection off."""
    counts, thresholds = gc.get_count(), gc.get_threshold()
    for generation in range(3):
        if counts[generation] <= thresholds[generation]:
            break
        gc.collect(generation)


def collect_on_gui_thread(owner: QObject, interval_ms: int = 500) -> QTimer:
    """Until owner is destroyed, Python's cyclic garbage collection runs only on this (the GUI) thread: automatic
    collection is turned off and a timer, a child of owner, collects each generation when Python's thresholds say
    it is due, as the interpreter would have. When the last such owner is gone, automatic collection is as before.
    Worker threads' garbage (a training run's, a task's) waits at most interval_ms, or until the next time the
    GUI thread's event loop turns."""
    global _owners, _was_enabled
    if _owners == 0:
        _was_enabled = gc.isenabled()
    _owners += 1
    gc.disable()

    def release() -> None:
        global _owners
        _owners -= 1
        if _owners == 0 and _was_enabled:
            gc.enable()

    timer = QTimer(owner)
    timer.setInterval(interval_ms)
    timer.timeout.connect(collect_due)
    timer.destroyed.connect(release)  # with owner, on the GUI thread
    timer.start()
    return timer


def delete_on_close(widget: QWidget) -> None:
    """Delete the widget (deleteLater, on the GUI thread) once it is closed, by the user or by code; a dialog's
    accept(), reject() and done() close it too. Not for a dialog run with exec() whose result is read after: exec()
    deletes such a dialog before it returns: call its deleteLater() once the answer is read."""
    widget.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)


def forget_when_destroyed(owner: object, attribute: str, obj: QObject) -> None:
    """Set owner.attribute to obj, and back to None when obj's C++ object is destroyed (unless another object took
    its place meanwhile), so that no code reaches a deleted object through it ("Internal C++ object already
    deleted")."""
    setattr(owner, attribute, obj)

    def forget() -> None:
        if getattr(owner, attribute, None) is obj:
            setattr(owner, attribute, None)

    obj.destroyed.connect(forget)
