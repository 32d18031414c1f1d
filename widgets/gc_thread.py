"""Cyclic garbage collection on the GUI thread only.

Python runs its cyclic collector in whichever thread happens to allocate when a threshold is passed. When that is
a worker thread (training, a background task) and the garbage holds a Qt object's Python wrapper, PySide deletes
the object from that thread: its destructor takes a Qt lock and then waits for the GIL, while the GUI thread,
holding the GIL, waits for the same lock to delete a widget. Both stop for good. (Seen in this project's test
suite: the export dialog's worker thread collected a closed window's menu while the GUI thread deleted its
actions.) So automatic collection is switched off and this object collects on the GUI thread from a timer, with
the collector's own thresholds: the same work, in the one thread where deleting Qt objects is safe.
"""

from __future__ import annotations

import gc

from PySide6.QtCore import QObject, QTimer

INTERVAL_MS = 250  # how often the counts are checked: a young-generation pass costs well under a millisecond


class GuiThreadCollector(QObject):
    """While it lives (and until stop()), gc runs from a timer on the thread that made it, not where it falls."""

    def __init__(self, parent: QObject | None = None, interval_ms: int = INTERVAL_MS):
        super().__init__(parent)
        self.was_enabled = gc.isenabled()
        self.thresholds = gc.get_threshold()
        gc.disable()
        self.timer = QTimer(self)
        self.timer.setInterval(interval_ms)
        self.timer.timeout.connect(self.check)
        self.timer.start()

    def check(self) -> None:
        """Collect each generation whose count passed its threshold, as the automatic collector would."""
        t0, t1, t2 = self.thresholds
        c0, c1, c2 = gc.get_count()
        if c0 <= t0:
            return
        if c1 + 1 > t1:
            gc.collect(2 if c2 + 1 > t2 else 1)
        else:
            gc.collect(0)

    def stop(self) -> None:
        """Automatic collection back as it was (tests end with this; the app keeps its collector to the end)."""
        self.timer.stop()
        if self.was_enabled:
            gc.enable()
