"""The log dock's tabs: the app's log, and during and after a multi-process run one log per process (rank)."""

from __future__ import annotations

from PySide6.QtCore import Slot
from PySide6.QtWidgets import QPlainTextEdit, QTabWidget, QWidget

OBJECT_NAMES = {
    "log.tabs": "the log's tabs: the app's log, and one per process of a multi-process run (the tab bar shows "
    "only then)",
    "log.rank.N": "the output of process N (rank N, from 0) of a multi-process run, as torchrun passed it on; "
    "for example log.rank.1",
}
MAX_LINES = 5000  # per log, as the app's own


class LogTabs(QTabWidget):
    """The app's log as the first tab; a multi-process run adds a tab per rank, which stay until the next run."""

    def __init__(self, app_log: QWidget, parent: QWidget | None = None):
        super().__init__(parent)
        self.setObjectName("log.tabs")
        self.setDocumentMode(True)
        self.setTabBarAutoHide(True)  # one tab (no multi-process run yet): no tab bar, the log as before
        self.addTab(app_log, "Log")
        self._ranks: list[QPlainTextEdit] = []

    @Slot(int)
    def on_launched(self, processes: int) -> None:
        """A run began in this many processes: fresh rank tabs for several, none for one."""
        for view in self._ranks:
            self.removeTab(self.indexOf(view))
            view.deleteLater()
        self._ranks = []
        if processes < 2:
            return
        for rank in range(processes):
            view = QPlainTextEdit()
            view.setObjectName(f"log.rank.{rank}")
            view.setReadOnly(True)
            view.setMaximumBlockCount(MAX_LINES)
            view.setLineWrapMode(QPlainTextEdit.LineWrapMode.WidgetWidth)
            self.addTab(view, f"Rank {rank}")
            self.setTabToolTip(
                self.count() - 1,
                f"What process {rank} of the run wrote" + (" (it also reports to the Log tab)" if rank == 0 else ""),
            )
            self._ranks.append(view)

    @Slot(int, str)
    def on_rank_logged(self, rank: int, line: str) -> None:
        if 0 <= rank < len(self._ranks):
            self._ranks[rank].appendPlainText(line)

    def rank_count(self) -> int:
        return len(self._ranks)

    def rank_text(self, rank: int) -> str:
        return self._ranks[rank].toPlainText()
