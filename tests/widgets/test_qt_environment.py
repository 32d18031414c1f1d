"""The installed Qt binding keeps Python's reference counts straight (PySide6 6.12 on Python 3.11 does not)."""

from __future__ import annotations

import sys

import pytest
from PySide6.QtCore import QObject, QPointF, Signal


class _Emitter(QObject):
    fired = Signal()


@pytest.mark.skipif(
    sys.version_info >= (3, 12),
    reason="None and True are immortal from Python 3.12 (PEP 683): their reference counts no longer change",
)
def test_void_calls_and_emits_do_not_leak_references_to_none_or_true():
    # Each lost reference brings "Fatal Python error: none_dealloc" closer in a long session of live plots.
    point, emitter = QPointF(), _Emitter()
    none_before, true_before = sys.getrefcount(None), sys.getrefcount(True)
    for _ in range(1000):
        point.setX(1.0)
        emitter.fired.emit()
    assert sys.getrefcount(None) - none_before > -50
    assert sys.getrefcount(True) - true_before > -50
