"""Windows and dialogs are deleted on the GUI thread once closed, not left to Python's cyclic garbage collector.

The collector runs in whichever thread allocates when a threshold is passed: a training or export thread as often
as the GUI thread. When the garbage it finds holds the Python wrapper of a window that Python owns, PySide deletes
the window, with all its children, from that thread. Its destructor takes Qt's locks and waits for the GIL, while
the GUI thread holds the GIL and waits for one of the same locks: both stop for good (seen in this project's test
suite, in test_export_from_the_dialog). A window deleted on the GUI thread as soon as it is closed leaves the
collector only wrappers of objects that are gone, whose collection deletes nothing.
"""

from __future__ import annotations

from PySide6.QtCore import QObject, Qt
from PySide6.QtWidgets import QWidget


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
