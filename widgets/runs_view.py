"""The Runs view: every run folder of the project (and of folders the user adds) as a live table, with the
selected runs' curves overlaid, their projects compared, and Open / Resume / Delete."""

from __future__ import annotations

import hashlib
import math
import multiprocessing
import os
import shutil
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures import TimeoutError as FuturesTimeout
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from PySide6.QtCore import (
    QAbstractTableModel,
    QFile,
    QFileSystemWatcher,
    QItemSelectionModel,
    QModelIndex,
    QPersistentModelIndex,
    QSettings,
    QSortFilterProxyModel,
    Qt,
    QTimer,
    Signal,
    Slot,
)
from PySide6.QtGui import QAction, QBrush, QColor, QFont, QFontMetrics
from PySide6.QtWidgets import (
    QAbstractItemView,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QMenu,
    QMessageBox,
    QPushButton,
    QSplitter,
    QTableView,
    QTableWidget,
    QTableWidgetItem,
    QTabWidget,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from engine.config import ConfigError
from engine.run_files import METRICS_FILE, metrics_chunks
from engine.run_lock import holder
from engine.run_table import (
    DEFAULT_COLUMNS,
    DEFAULT_FIELDS,
    RESULT_COLUMNS,
    RunRecord,
    column,
    find_runs,
    format_value,
    project_diff,
    project_fields,
    read_run,
)
from widgets.folders import chosen_path, folder_dialog, remember_folder, remembered_folder, start_folder
from widgets.live_plots import RunsPlots, epoch_curves
from widgets.look import ERROR_COLOUR
from widgets.tasks import Task, run_task

OBJECT_NAMES = {
    "runs.view": "the Runs tab: every run of the project's output folder and of added folders",
    "runs.table": "the runs, one per row: status, settings and results; click a heading to sort, select "
    "several to overlay their curves and compare their projects",
    "runs.filter": "shows only the runs whose cells contain every word typed here",
    "runs.columns": "chooses the table's columns: results, and any project field",
    "runs.add_folder": "adds a folder of run folders to the list (remembered for this project)",
    "runs.forget_folders": "removes the added folders from the list (the project's output folder stays)",
    "runs.folders": "which folders are listed",
    "runs.open_project": "makes the selected run's project (its project.json) the window's project, unsaved",
    "runs.resume": "continues the selected stopped or failed run from its last checkpoint",
    "runs.delete": "moves the selected run folders to the trash (or deletes them after a confirmation naming "
    "each folder where there is no trash); refuses a run that is training",
    "runs.delete_confirm": "asks before deleting a run folder for good, naming it (no trash on this system)",
    "runs.details": "the selected runs' curves overlaid, and their projects compared (hidden while no run is "
    "selected, so the table has the tab's height)",
    "runs.hint": "shown while no run is selected: how to compare runs' curves and projects",
    "runs.plots": "the selected runs' epoch curves, one colour per run",
    "runs.legend": "which colour is which run in the plots below it",
    "runs.compare": "the project fields that differ between the selected runs, one column per run",
    "runs.compare_label": "what the comparison shows, or why there is none",
    "runs.message": "the result of the last action (a run deleted, or why a folder could not be read)",
}

SETTINGS_COLUMNS = "runs/columns"
SETTINGS_FOLDERS = "runs/added_folders/"  # + a digest of the project file: each project remembers its own
SETTINGS_ADD_DIR = "runs/last_added_folder"
SORT_ROLE = Qt.ItemDataRole.UserRole + 1
REREAD_DELAY_MS = 200  # changes closer together than this are read in one go
LOCK_CHECK_MS = 2000  # running runs' locks: a killed process changes no file, only its lock frees
MAX_OVERLAY = 20
# Lines of a long metrics.jsonl parsed at a time (see metrics_chunks): the GUI thread waits while one is parsed
# (500 lines: 2-3 ms of GIL here; 2,000 held it for 8-12 ms at a time).
METRICS_CHUNK = 500
PROCESS_BYTES = 4 * 1024 * 1024  # a metrics file this long (some 16,000 epochs) is parsed in a worker process
TABLE_SHARE = 0.6  # of the tab's height, for the table while the selected runs' details show under it
NAME_WIDTH = 240  # the run name column at most (elided in the middle): the other columns stay in view
OVERLAY_STEP = 2  # runs handed to the plots per turn of the event loop


def _number(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def sort_key(key: str, value: Any) -> tuple[int, Any]:
    """How a cell sorts: numbers as numbers, text as text, empty cells last."""
    if value is None:
        return (2, "")
    if key == "epochs" and isinstance(value, str):  # "3/10": by the epochs done
        head = value.split("/", 1)[0]
        return (0, float(head)) if head.isdigit() else (1, value)
    number = _number(value)
    if number is not None:
        return (0, number)
    return (1, format_value(key, value).lower())


def read_folders(roots: Sequence[str], known: frozenset[str], reread: frozenset[str] | None) -> dict[str, Any]:
    """On a worker thread: the run folders under roots, and records for those not known yet or to read again
    (reread None: every one). A root that cannot be read is reported, not raised, so the others still show."""
    paths: list[str] = []
    problems: list[str] = []
    notes: list[str] = []
    for root in roots:
        if not os.path.lexists(root):  # the project's output folder before its first run: nothing wrong
            notes.append(f"No runs yet: {root} does not exist; the first run makes it.")
            continue
        try:
            found = find_runs(root)
        except ConfigError as exc:
            problems.append(str(exc))
            continue
        for path in found:
            text = str(path)
            if text not in paths:
                paths.append(text)
    records = []
    for text in paths:
        if reread is None or text not in known or text in reread:
            record = read_run(text)
            record.results  # noqa: B018 - computed here, off the GUI thread (a cached property)
            # The table needs only the results; the curves are read when runs are selected, so a long run's
            # thousands of metrics rows are not held for every row.
            record.metrics = []
            records.append(record)
    return {"paths": paths, "records": records, "problems": problems, "notes": notes}


def curves_of(path: str) -> dict[str, Any]:
    """One run folder's epoch curves (see live_plots.epoch_curves), its metrics read in pieces."""
    return epoch_curves(metrics_chunks(path, METRICS_CHUNK))


def _metrics_bytes(path: str) -> int:
    try:
        return (Path(path) / METRICS_FILE).stat().st_size
    except OSError:
        return 0


def read_curves(paths: Sequence[str], progress: Any, cancel: Any) -> None:
    """On a worker thread: each run folder's epoch curves, handed over one run at a time through
    progress((path, curves)) so the first runs show while later ones are read.

    Metrics files of PROCESS_BYTES or more are parsed in a worker process: parsed on a thread of this process,
    they held the GIL most of the time and the GUI thread, which needs it for every event and paint, stalled
    (bench runs_view: heartbeat p99 242 ms, max 486 ms with a thread; 46 and 98 ms with a process). The curves
    come back as numpy arrays, which unpickle in milliseconds. Where the process cannot run, they are read here."""
    from engine.image_scan import start_method  # here: Pillow, which it imports, is not needed at start-up

    big = [p for p in paths if _metrics_bytes(p) >= PROCESS_BYTES]
    pool = None
    futures: dict[str, Future[dict[str, Any]]] = {}
    if big:
        pool = ProcessPoolExecutor(
            max(1, min(len(big), (os.cpu_count() or 2) - 1, 4)),  # a CPU left to the GUI
            mp_context=multiprocessing.get_context(start_method()),
        )
        futures = {p: pool.submit(curves_of, p) for p in big}
    try:
        for path in paths:
            if cancel.is_set():
                return
            future = futures.get(path)
            curves = None
            while future is not None:
                try:
                    curves = future.result(timeout=0.1)
                    break
                except FuturesTimeout:
                    if cancel.is_set():
                        return
                except BrokenProcessPool:
                    break  # no worker process here: read in this thread below
            progress((path, curves if curves is not None else curves_of(path)))
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


class RunsModel(QAbstractTableModel):
    """The runs as rows, the chosen columns (result names and project fields' dotted paths) as columns."""

    def __init__(self, keys: Sequence[str], parent: Any = None):
        super().__init__(parent)
        self.keys = list(keys)
        self.records: list[RunRecord] = []
        self._rows: dict[str, int] = {}

    def rowCount(self, parent: QModelIndex | QPersistentModelIndex = QModelIndex()) -> int:  # noqa: N802, B008
        return 0 if parent.isValid() else len(self.records)

    def columnCount(self, parent: QModelIndex | QPersistentModelIndex = QModelIndex()) -> int:  # noqa: N802, B008
        return 0 if parent.isValid() else len(self.keys)

    def headerData(self, section: int, orientation: Qt.Orientation, role: int = Qt.ItemDataRole.DisplayRole) -> Any:  # noqa: N802
        if orientation == Qt.Orientation.Horizontal and 0 <= section < len(self.keys):
            key = self.keys[section]
            if role == Qt.ItemDataRole.DisplayRole:
                return column(key).title
            if role == Qt.ItemDataRole.ToolTipRole:
                return key
        return None

    def data(self, index: QModelIndex | QPersistentModelIndex, role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if not index.isValid():
            return None
        record = self.records[index.row()]
        key = self.keys[index.column()]
        if role == Qt.ItemDataRole.DisplayRole:
            return format_value(key, record.value(key))
        if role == SORT_ROLE:
            return sort_key(key, record.value(key))
        if role == Qt.ItemDataRole.ToolTipRole:
            tip = str(record.path)
            return tip + (f"\n{record.status}: {record.error}" if record.error else "")
        if role == Qt.ItemDataRole.TextAlignmentRole and column(key).numeric:
            return int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        if role == Qt.ItemDataRole.ForegroundRole and key == "status" and record.status == "failed":
            return QBrush(QColor(ERROR_COLOUR))
        if role == Qt.ItemDataRole.FontRole and record.status == "running":
            font = QFont()
            font.setBold(True)
            return font
        return None

    def set_keys(self, keys: Sequence[str]) -> None:
        self.beginResetModel()
        self.keys = list(keys)
        self.endResetModel()

    def record(self, row: int) -> RunRecord:
        return self.records[row]

    def row_of(self, path: str) -> int | None:
        return self._rows.get(path)

    def merge(self, paths: Sequence[str], records: Sequence[RunRecord]) -> None:
        """Rows for exactly these folders: gone ones removed, the given records replacing or adding rows.

        New rows arrive in one insertion: the sorting proxy then sorts once, not once per row."""
        keep = set(paths)
        for row in reversed(range(len(self.records))):
            if str(self.records[row].path) not in keep:
                self.beginRemoveRows(QModelIndex(), row, row)
                del self.records[row]
                self.endRemoveRows()
        self._reindex()
        new: list[RunRecord] = []
        for record in records:
            text = str(record.path)
            at = self._rows.get(text)
            if text not in keep:
                continue
            if at is None:
                new.append(record)
            else:
                self.records[at] = record
                self.dataChanged.emit(self.index(at, 0), self.index(at, len(self.keys) - 1))
        if new:
            first = len(self.records)
            self.beginInsertRows(QModelIndex(), first, first + len(new) - 1)
            self.records.extend(new)
            self._reindex()
            self.endInsertRows()

    def _reindex(self) -> None:
        self._rows = {str(r.path): i for i, r in enumerate(self.records)}


class RunsProxy(QSortFilterProxyModel):
    """Sorts by SORT_ROLE (numbers as numbers); keeps the rows whose cells contain every word of the filter."""

    def __init__(self, parent: Any = None):
        super().__init__(parent)
        self.words: list[str] = []
        self.setSortRole(SORT_ROLE)
        self.setDynamicSortFilter(True)

    def set_filter_text(self, text: str) -> None:
        self.words = text.lower().split()
        self.invalidate()  # invalidateFilter() is deprecated in Qt 6.10; this also re-sorts (cheap here)

    def lessThan(self, left: QModelIndex | QPersistentModelIndex, right: QModelIndex | QPersistentModelIndex) -> bool:  # noqa: N802
        a, b = left.data(SORT_ROLE), right.data(SORT_ROLE)
        try:
            return bool(a < b)
        except TypeError:
            return str(a) < str(b)

    def filterAcceptsRow(self, source_row: int, source_parent: QModelIndex | QPersistentModelIndex) -> bool:  # noqa: N802
        if not self.words:
            return True
        model = self.sourceModel()
        assert isinstance(model, RunsModel)
        record = model.record(source_row)
        cells = [format_value(k, record.value(k)) for k in model.keys]
        text = " ".join([record.name, str(record.path), *cells]).lower()
        return all(word in text for word in self.words)


class RunsView(QWidget):
    """The runs of the project's output folder and of added folders, kept current by watching the file system."""

    open_project_requested = Signal(str)  # a run folder: make its project.json the window's project
    resume_requested = Signal(str)  # a checkpoint (the run's last.pt) to continue the run from
    logged = Signal(str)
    refreshed = Signal()  # the table was brought up to date with what was read

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.setObjectName("runs.view")
        self.project_file = ""
        self.project_dir: str | None = None
        self.added: list[str] = []
        self.use_trash = True  # QFile.moveToTrash first; tests turn it off to go the confirmation way
        self._task: Task | None = None
        self._curves_task: Task | None = None
        self._curves_again = False
        self._again = False  # a change arrived while a read was running: read once more after it
        self._full = True  # the next read reads every folder (the folders listed changed)
        self._pending: set[str] = set()  # run folders to read again
        self._curves: dict[str, tuple[float, dict[str, Any]]] = {}  # run folder -> (metrics mtime, curves)
        self._error = ""
        self._awaited: dict[str, str] = {}  # an existing parent watched -> the listed folder not made yet
        # Nothing is read or watched until the view is first shown: a window that never opens the Runs tab
        # pays nothing for it at start-up.
        self._active = False
        self._sized = False  # the columns were fitted to the first rows read
        # _show_curves queued for the next turn of the event loop (the plots get a few runs per turn); a timer of
        # the view's own, so a queued call dies with the view.
        self._overlay_timer = QTimer(self)
        self._overlay_timer.setSingleShot(True)
        self._overlay_timer.setInterval(0)
        self._overlay_timer.timeout.connect(self._show_curves)
        # Once the details appear under the table (the first run selected), the selected row is scrolled back
        # into the shorter table, after the layout has settled.
        self._scroll_timer = QTimer(self)
        self._scroll_timer.setSingleShot(True)
        self._scroll_timer.setInterval(0)
        self._scroll_timer.timeout.connect(self._scroll_to_selection)

        saved = QSettings().value(SETTINGS_COLUMNS)
        keys = [str(k) for k in saved] if isinstance(saved, list) else list(DEFAULT_COLUMNS)
        keys = [k for k in keys if self._known_column(k)] or list(DEFAULT_COLUMNS)
        self.model = RunsModel(keys, self)
        self.proxy = RunsProxy(self)
        self.proxy.setSourceModel(self.model)

        self.watcher = QFileSystemWatcher(self)
        self.watcher.directoryChanged.connect(self._on_directory_changed)
        self.watcher.fileChanged.connect(self._on_file_changed)
        self._reread_timer = QTimer(self)
        self._reread_timer.setSingleShot(True)
        self._reread_timer.setInterval(REREAD_DELAY_MS)
        self._reread_timer.timeout.connect(self._start_read)
        self._lock_timer = QTimer(self)
        self._lock_timer.setInterval(LOCK_CHECK_MS)
        self._lock_timer.timeout.connect(self._check_locks)

        self.filter_edit = QLineEdit()
        self.filter_edit.setObjectName("runs.filter")
        self.filter_edit.setPlaceholderText("Filter runs (words in any cell: a name, resnet18, failed...)")
        self.filter_edit.setClearButtonEnabled(True)
        self.filter_edit.textChanged.connect(self.proxy.set_filter_text)

        self.columns_button = QToolButton()
        self.columns_button.setObjectName("runs.columns")
        self.columns_button.setText("Columns")
        self.columns_button.setToolTip("Choose the columns: results, and any project field")
        self.columns_button.setPopupMode(QToolButton.ToolButtonPopupMode.InstantPopup)
        self.columns_menu = QMenu(self)
        self.columns_menu.aboutToShow.connect(self._fill_columns_menu)
        self.columns_button.setMenu(self.columns_menu)

        self.add_button = self._button("Add folder...", "runs.add_folder", self._on_add_clicked)
        self.forget_button = self._button("Forget added", "runs.forget_folders", self.forget_folders)
        self.folders_label = QLabel()
        self.folders_label.setObjectName("runs.folders")
        self.folders_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)

        self.table = QTableView()
        self.table.setObjectName("runs.table")
        self.table.setModel(self.proxy)
        self.table.setSortingEnabled(True)
        if "started" in keys:  # newest first
            self.table.sortByColumn(keys.index("started"), Qt.SortOrder.DescendingOrder)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.ExtendedSelection)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setAlternatingRowColors(True)
        # Run names share their start (the project's name) and differ at the end (the date and time): a cut
        # name keeps both ends.
        self.table.setTextElideMode(Qt.TextElideMode.ElideMiddle)
        self.table.setWordWrap(False)  # one line a row: wrapped at the name's hyphens, each line was cut instead
        self.table.setHorizontalScrollMode(QAbstractItemView.ScrollMode.ScrollPerPixel)
        self.table.verticalHeader().setVisible(False)
        self.table.verticalHeader().setDefaultSectionSize(self.fontMetrics().height() + 6)
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.Interactive)
        header.setStretchLastSection(True)
        header.setSectionsMovable(True)
        header.setResizeContentsPrecision(100)  # fit columns to the first rows, not to every one of 200
        self.table.selectionModel().selectionChanged.connect(self._on_selection_changed)
        self.table.doubleClicked.connect(lambda _index: self._on_open_clicked())

        self.open_button = self._button("Open as current project", "runs.open_project", self._on_open_clicked)
        self.resume_button = self._button("Resume", "runs.resume", self._on_resume_clicked)
        self.delete_button = self._button("Delete run...", "runs.delete", self._on_delete_clicked)
        self.message_label = QLabel()
        self.message_label.setObjectName("runs.message")
        self.message_label.setWordWrap(True)
        self.message_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.message_label.hide()
        self.hint = QLabel("Select runs to compare their curves and projects.")
        self.hint.setToolTip("Click a run; Ctrl+click or Shift+click selects several.")
        self.hint.setObjectName("runs.hint")
        self.hint.setWordWrap(True)
        self.hint.setEnabled(False)  # greyed: a note, not a message

        # The plots are built when the view is first shown (see plots): four pyqtgraph plots take a few hundred
        # milliseconds to make, which the window's start-up should not pay for a tab it may never open.
        self._plots: RunsPlots | None = None
        self._plots_holder = QWidget()
        QVBoxLayout(self._plots_holder).setContentsMargins(0, 0, 0, 0)
        self.compare_label = QLabel()
        self.compare_label.setObjectName("runs.compare_label")
        self.compare_label.setWordWrap(True)
        self.compare_table = QTableWidget(0, 0)
        self.compare_table.setObjectName("runs.compare")
        self.compare_table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.compare_table.setAlternatingRowColors(True)
        self.compare_table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        compare_box = QWidget()
        compare_layout = QVBoxLayout(compare_box)
        compare_layout.setContentsMargins(0, 4, 0, 0)
        compare_layout.addWidget(self.compare_label)
        compare_layout.addWidget(self.compare_table, 1)
        self.details = QTabWidget()
        self.details.setObjectName("runs.details")
        self.details.setDocumentMode(True)
        self.details.addTab(self._plots_holder, "Curves")
        self.details.addTab(compare_box, "Compare projects")

        top = QHBoxLayout()
        top.addWidget(self.filter_edit, 1)
        top.addWidget(self.columns_button)
        top.addWidget(self.add_button)
        top.addWidget(self.forget_button)
        actions = QHBoxLayout()
        actions.addWidget(self.open_button)
        actions.addWidget(self.resume_button)
        actions.addWidget(self.delete_button)
        actions.addWidget(self.hint, 1)
        actions.addStretch(0)  # the buttons keep their width while the hint is hidden
        table_box = QWidget()
        table_layout = QVBoxLayout(table_box)
        table_layout.setContentsMargins(0, 0, 0, 0)
        table_layout.addLayout(top)
        table_layout.addWidget(self.folders_label)
        table_layout.addWidget(self.table, 1)
        table_layout.addWidget(self.message_label)
        table_layout.addLayout(actions)
        self.splitter = QSplitter(Qt.Orientation.Vertical)
        self.splitter.addWidget(table_box)
        self.splitter.addWidget(self.details)
        # The table gets the larger share; the details are hidden while no run is selected (see
        # _on_selection_changed), and then the table has the whole height.
        self.splitter.setStretchFactor(0, 3)
        self.splitter.setStretchFactor(1, 2)
        self.splitter.setChildrenCollapsible(False)
        self.splitter.splitterMoved.connect(self._on_splitter_moved)
        self._details_height: int | None = None  # as the user dragged it (this session)
        layout = QVBoxLayout(self)
        layout.addWidget(self.splitter)

        self._update_folders_label()
        self._on_selection_changed()

    def _button(self, text: str, name: str, slot: Any) -> QPushButton:
        button = QPushButton(text)
        button.setObjectName(name)
        button.setToolTip(OBJECT_NAMES[name][0].upper() + OBJECT_NAMES[name][1:])
        button.clicked.connect(slot)
        return button

    # -- folders ---------------------------------------------------------------------------------
    def folders(self) -> list[str]:
        """The folders listed: the project's output folder, then the added ones."""
        roots = [self.project_dir] if self.project_dir else []
        return roots + [f for f in self.added if f not in roots]

    def set_project(self, project_file: str, output_dir: str | os.PathLike | None) -> None:
        """The window's project: its output folder is listed, with the folders added for it earlier."""
        output = str(Path(output_dir).resolve()) if output_dir else None
        if project_file == self.project_file and output == self.project_dir:
            return
        if project_file != self.project_file:
            self.project_file = project_file
            self.added = self._remembered_folders()
        self.project_dir = output
        self._folders_changed()

    def add_folder(self, path: str | os.PathLike) -> bool:
        """List the runs of another folder too (a folder of run folders, or one run folder)."""
        folder = Path(path).expanduser()
        if not folder.is_dir():
            self._set_message(f"Cannot add {folder}: it is not a folder.", error=True)
            return False
        text = str(folder.resolve())
        if text not in self.folders():
            self.added.append(text)
            self._remember_folders()
            self._folders_changed()
        self._set_message("")
        return True

    @Slot()
    def forget_folders(self) -> None:
        self.added = []
        self._remember_folders()
        self._folders_changed()

    def _settings_key(self) -> str | None:
        if not self.project_file:
            return None
        return SETTINGS_FOLDERS + hashlib.sha1(str(Path(self.project_file).resolve()).encode()).hexdigest()[:20]

    def _remembered_folders(self) -> list[str]:
        key = self._settings_key()
        value = QSettings().value(key, []) if key else []
        if isinstance(value, str):
            value = [value]
        return [str(v) for v in value] if isinstance(value, list) else []

    def _remember_folders(self) -> None:
        key = self._settings_key()
        if key:  # an unsaved project keeps its added folders for this session only
            QSettings().setValue(key, list(self.added))

    @property
    def plots(self) -> RunsPlots:
        """The overlay plots, made on first use."""
        if self._plots is None:
            self._plots = RunsPlots()
            layout = self._plots_holder.layout()
            assert layout is not None  # made with the holder
            layout.addWidget(self._plots)
        return self._plots

    def showEvent(self, event: Any) -> None:  # noqa: N802 - Qt override
        super().showEvent(event)
        if not self._active:
            self._active = True
            self.plots  # noqa: B018 - built now, on the first show
            self._folders_changed()

    def _folders_changed(self) -> None:
        self._update_folders_label()
        if not self._active:
            return
        watched = self.watcher.directories()
        if watched:
            self.watcher.removePaths(watched)
        files = self.watcher.files()
        if files:
            self.watcher.removePaths(files)
        self._awaited = {}
        for root in self.folders():
            if Path(root).is_dir():
                self.watcher.addPath(root)
            else:  # watch the nearest folder that exists, to see the first run make this one
                parent = Path(root).parent
                while not parent.is_dir() and parent != parent.parent:
                    parent = parent.parent
                self._awaited[str(parent)] = root
                self.watcher.addPath(str(parent))
        self._full = True
        self._start_read()

    def _update_folders_label(self) -> None:
        roots = self.folders()
        if not roots:
            self.folders_label.setText(
                "No folder listed: save the project (its runs go to its output folder) or add one."
            )
        else:
            self.folders_label.setText("Runs in: " + "; ".join(roots))
        self.forget_button.setEnabled(bool(self.added))

    @Slot()
    def _on_add_clicked(self) -> None:
        start = start_folder(remembered_folder(SETTINGS_ADD_DIR), self.project_dir)
        path = chosen_path(folder_dialog(self, "Add a folder of runs", start))
        if path and self.add_folder(path):
            remember_folder(SETTINGS_ADD_DIR, Path(path).resolve().parent)

    # -- reading ---------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Read every listed folder again."""
        self._full = True
        self._start_read()

    def is_reading(self) -> bool:
        return self._task is not None or self._reread_timer.isActive() or self._curves_task is not None

    def _schedule(self, run_dir: str | None = None) -> None:
        if run_dir is not None:
            self._pending.add(run_dir)
        if not self._reread_timer.isActive():
            self._reread_timer.start()

    @Slot(str)
    def _on_directory_changed(self, path: str) -> None:
        if path in self._awaited:  # the parent of a listed folder that did not exist: watch again, one level
            self._folders_changed()  # nearer if only a parent of it was made, or the folder itself
            return
        if path in self.folders():
            self._schedule()  # a run folder appeared or went: list again, read the new ones
        else:
            self._schedule(path)  # a running run's folder: run.json rewritten, its lock file made
        if Path(path).is_dir() and path not in self.watcher.directories():
            self.watcher.addPath(path)

    @Slot(str)
    def _on_file_changed(self, path: str) -> None:
        self._schedule(str(Path(path).parent))  # metrics.jsonl: an epoch ended

    @Slot()
    def _start_read(self) -> None:
        if not self._active:
            return
        if self._task is not None:
            self._again = True
            return
        known = frozenset(str(r.path) for r in self.model.records)
        reread = None if self._full else frozenset(self._pending)
        self._full, self._pending, self._again = False, set(), False
        self._task = run_task(
            "runs: read run folders",
            read_folders,
            self.folders(),
            known,
            reread,
            on_result=self._on_read,
            on_error=self._on_read_failed,
            parent=self,
        )
        self._task.finished.connect(self._on_read_finished)

    def _on_read(self, result: dict[str, Any]) -> None:
        selected = self.selected_paths()
        self.model.merge(result["paths"], result["records"])
        self._select(selected)
        if result["problems"]:
            self._set_message("\n".join(result["problems"]), error=True)
        elif result["notes"]:
            self._set_message("\n".join(result["notes"]))
        elif self._error.startswith("runs folder") or self.message_label.text().startswith("No runs yet"):
            self._set_message("")
        self._watch_running()
        changed = {str(r.path) for r in result["records"]}
        if changed & set(selected):
            self._load_curves()  # a selected run has new epochs
        if not self._sized and self.model.records:
            self._sized = True  # once: later the user's own column widths stay
            self._fit_columns()
        self.refreshed.emit()

    def _on_read_failed(self, exc: BaseException, tb: str) -> None:
        self.logged.emit(tb)
        self._set_message(f"Could not read the run folders: {type(exc).__name__}: {exc}", error=True)

    def _on_read_finished(self) -> None:
        self._task = None
        if self._again or self._pending or self._full:
            self._schedule()

    def _watch_running(self) -> None:
        """Watch every listed run's folder (a run resumed, here or by another process, rewrites its run.json and
        makes its lock file there) and the running runs' metrics files; drop the watches of runs gone or ended."""
        want_dirs = set(self.folders()) | set(self._awaited)
        want_files = set()
        running = False
        for record in self.model.records:
            want_dirs.add(str(record.path))
            if record.status == "running":
                running = True
                metrics = record.path / METRICS_FILE
                if metrics.is_file():
                    want_files.add(str(metrics))
        have_dirs, have_files = set(self.watcher.directories()), set(self.watcher.files())
        drop = [p for p in have_dirs - want_dirs] + [p for p in have_files - want_files]
        if drop:
            self.watcher.removePaths(drop)
        add = [p for p in (want_dirs - have_dirs) | (want_files - have_files) if Path(p).exists()]
        if add:
            self.watcher.addPaths(add)
        if running and not self._lock_timer.isActive():
            self._lock_timer.start()
        elif not running:
            self._lock_timer.stop()

    @Slot()
    def _check_locks(self) -> None:
        """A running run whose process ended (or was killed: no file says so) is read again."""
        for record in self.model.records:
            if record.status == "running" and holder(record.path) is None:
                self._schedule(str(record.path))

    # -- columns ---------------------------------------------------------------------------------
    def _fit_columns(self, sample: int = 30) -> None:
        """Widths from the heading and the first rows' texts (QTableView's own fitting asks every cell for its
        size hint through the proxy: a quarter of a second for 40 rows)."""
        metrics = self.table.fontMetrics()
        bold = QFont(self.table.font())
        bold.setBold(True)
        wide = QFontMetrics(bold)  # running rows are bold
        records = self.model.records[:sample]
        for col, key in enumerate(self.model.keys):
            texts = [column(key).title] + [format_value(key, r.value(key)) for r in records]
            width = max(max(metrics.horizontalAdvance(t) for t in texts), wide.horizontalAdvance(texts[0]))
            self.table.setColumnWidth(col, min(width + 24, NAME_WIDTH if key == "name" else 320))

    @staticmethod
    def _known_column(key: str) -> bool:
        try:
            column(key)
        except ConfigError:
            return False
        return True

    def columns(self) -> list[str]:
        return list(self.model.keys)

    def set_columns(self, keys: Sequence[str]) -> None:
        """Show these columns (result names and project fields' dotted paths); ConfigError names an unknown one."""
        for key in keys:
            column(key)
        self.model.set_keys(keys)
        QSettings().setValue(SETTINGS_COLUMNS, list(keys))
        self._fit_columns()

    def toggle_column(self, key: str, shown: bool) -> None:
        keys = [k for k in self.model.keys if k != key]
        if shown:
            keys.append(key)
        if keys:
            self.set_columns(keys)

    @Slot()
    def _fill_columns_menu(self) -> None:
        menu = self.columns_menu
        menu.clear()
        shown = set(self.model.keys)

        def add(target: QMenu, key: str, text: str) -> None:
            action = QAction(text, target)
            action.setCheckable(True)
            action.setChecked(key in shown)
            action.setObjectName(f"runs.column.{key}")
            action.toggled.connect(lambda on, key=key: self.toggle_column(key, on))
            target.addAction(action)

        for c in RESULT_COLUMNS:
            add(menu, c.key, c.title)
        menu.addSeparator()
        for key in DEFAULT_FIELDS:
            add(menu, key, f"{column(key).title} ({key})")
        fields_menu = menu.addMenu("Any project field")
        sections: dict[str, QMenu] = {}
        for path in project_fields():
            section = path.split(".", 1)[0]
            if section not in sections:
                sections[section] = fields_menu.addMenu(section)
            add(sections[section], path, path)
        menu.addSeparator()
        reset = menu.addAction("Default columns")
        reset.triggered.connect(lambda: self.set_columns(DEFAULT_COLUMNS))

    # -- selection, curves, comparison -----------------------------------------------------------
    def selected_records(self) -> list[RunRecord]:
        rows = sorted(self.proxy.mapToSource(i).row() for i in self.table.selectionModel().selectedRows())
        return [self.model.record(r) for r in rows if 0 <= r < len(self.model.records)]

    def selected_paths(self) -> list[str]:
        return [str(r.path) for r in self.selected_records()]

    def select_paths(self, paths: Sequence[str]) -> None:
        self._select([str(Path(p)) for p in paths])

    def _select(self, paths: Sequence[str]) -> None:
        selection = self.table.selectionModel()
        selection.blockSignals(True)
        try:
            self.table.clearSelection()
            flags = QItemSelectionModel.SelectionFlag.Select | QItemSelectionModel.SelectionFlag.Rows
            for path in paths:
                row = self.model.row_of(path)
                if row is not None:
                    index = self.proxy.mapFromSource(self.model.index(row, 0))
                    if index.isValid():
                        selection.select(index, flags)
        finally:
            selection.blockSignals(False)
        self.table.viewport().update()
        self._on_selection_changed()

    @Slot()
    def _on_selection_changed(self, *_args: Any) -> None:
        records = self.selected_records()
        one = records[0] if len(records) == 1 else None
        self.open_button.setEnabled(one is not None)
        self.resume_button.setEnabled(
            one is not None and one.status in ("stopped", "failed") and (one.path / "checkpoints" / "last.pt").is_file()
        )
        self.delete_button.setEnabled(bool(records))
        self.hint.setVisible(not records)
        if bool(records) != self.details.isVisibleTo(self):
            self._show_details(bool(records))
        self._show_comparison(records)
        self._load_curves()

    def _show_details(self, shown: bool) -> None:
        """The curves and the comparison under the table while runs are selected; otherwise the table has the tab's
        height. They come back at the height the user last gave them, else at TABLE_SHARE of it for the table
        (less where the plots need more to stay legible)."""
        if not shown:
            self.details.hide()
            return
        self.details.show()
        total = sum(self.splitter.sizes())
        if self._details_height is None:
            details = max(round(total * (1 - TABLE_SHARE)), self.details.minimumSizeHint().height())
        else:
            details = self._details_height
        self.splitter.setSizes([max(0, total - details), details])
        self._scroll_timer.start()

    @Slot(int, int)
    def _on_splitter_moved(self, _pos: int, _index: int) -> None:
        self._details_height = self.splitter.sizes()[1]

    @Slot()
    def _scroll_to_selection(self) -> None:
        rows = self.table.selectionModel().selectedRows()
        if rows:
            self.table.scrollTo(min(rows, key=lambda i: i.row()))

    def visible_rows(self) -> int:
        """How many whole rows the table shows at its current height."""
        height = self.table.viewport().height()
        return max(0, height // max(1, self.table.verticalHeader().defaultSectionSize()))

    def _load_curves(self) -> None:
        paths = self.selected_paths()[:MAX_OVERLAY]
        wanted = [p for p in paths if self._curves.get(p, (None,))[0] != self._metrics_time(p)]
        if not wanted:
            self._show_curves()
            return
        if self._curves_task is not None:
            self._curves_again = True  # once more when it ends, with the newest selection
            return
        stamps = {p: self._metrics_time(p) for p in wanted}
        self._curves_task = run_task(
            "runs: read curves",
            read_curves,
            wanted,
            progress=True,
            min_interval=0.0,  # every run's curves, none dropped
            on_progress=lambda item: self._on_curves(item, stamps),
            on_error=self._on_read_failed,
            parent=self,
        )
        self._curves_task.finished.connect(self._on_curves_finished)

    def _on_curves_finished(self) -> None:
        self._curves_task = None
        if self._curves_again:
            self._curves_again = False
            self._load_curves()

    @staticmethod
    def _metrics_time(path: str) -> float:
        try:
            stat = (Path(path) / METRICS_FILE).stat()
        except OSError:
            return 0.0
        return stat.st_mtime + stat.st_size * 1e-12  # an append within the clock's resolution still differs

    def _on_curves(self, item: tuple[str, dict[str, Any]], stamps: dict[str, float]) -> None:
        path, data = item
        self._curves[path] = (stamps[path], data)
        if not self._overlay_timer.isActive():
            self._overlay_timer.start()  # several runs read meanwhile are shown in one go

    def _show_curves(self) -> None:
        self._overlay_timer.stop()
        paths = self.selected_paths()[:MAX_OVERLAY]
        if self._plots is None and not paths:
            return  # nothing to draw: the plots need not exist yet
        runs = [(p, Path(p).name, self._curves[p][1]) for p in paths if p in self._curves]
        # A few runs per turn of the event loop: handing 20 runs' curves to the plots at once would hold the
        # GUI thread for longer than a frame.
        shown = set(self.plots.run_keys())
        end, added = 0, 0
        for end, (path, _name, _curves) in enumerate(runs, 1):  # noqa: B007 - end is used after the loop
            if path not in shown:
                added += 1
                if added == OVERLAY_STEP:
                    break
        self.plots.set_runs([run for i, run in enumerate(runs) if i < end or run[0] in shown])
        if end < len(runs):
            self._overlay_timer.start()
        for path in list(self._curves):
            if path not in paths:
                del self._curves[path]  # only the shown runs' curves are kept in memory
        if len(self.selected_paths()) > MAX_OVERLAY:
            self._set_message(f"The curves of the first {MAX_OVERLAY} selected runs are shown.")

    def _show_comparison(self, records: list[RunRecord]) -> None:
        table = self.compare_table
        table.clear()
        if len(records) < 2:
            table.setRowCount(0)
            table.setColumnCount(0)
            self.compare_label.setText("Select two or more runs to see the project fields they differ in.")
            return
        diff = project_diff(records)
        table.setColumnCount(len(records))
        table.setHorizontalHeaderLabels([r.name for r in records])
        table.setRowCount(len(diff))
        table.setVerticalHeaderLabels([path for path, _values in diff])
        for row, (path, values) in enumerate(diff):
            for col, value in enumerate(values):
                item = QTableWidgetItem(format_value(path, value))
                item.setToolTip(f"{path} = {value!r} in {records[col].name}")
                table.setItem(row, col, item)
        if diff:
            self.compare_label.setText(f"{len(diff)} project field(s) differ between the {len(records)} runs.")
        else:
            self.compare_label.setText(f"The {len(records)} runs' projects are the same in every field.")

    def comparison(self) -> dict[str, list[str]]:
        """What the comparison table shows: field -> one cell text per selected run."""
        table = self.compare_table
        out = {}
        for row in range(table.rowCount()):
            head = table.verticalHeaderItem(row)
            cells = [table.item(row, col) for col in range(table.columnCount())]
            out[head.text() if head else str(row)] = [c.text() if c else "" for c in cells]
        return out

    # -- actions ---------------------------------------------------------------------------------
    @Slot()
    def _on_open_clicked(self) -> None:
        records = self.selected_records()
        if len(records) != 1:
            return
        project = records[0].path / "project.json"
        if not project.is_file():
            self._set_message(f"Cannot open {records[0].name}'s project: {project} does not exist.", error=True)
            return
        self._set_message("")
        self.open_project_requested.emit(str(records[0].path))

    @Slot()
    def _on_resume_clicked(self) -> None:
        records = self.selected_records()
        if len(records) != 1:
            return
        last = records[0].path / "checkpoints" / "last.pt"
        if not last.is_file():
            self._set_message(f"Cannot resume {records[0].name}: {last} does not exist.", error=True)
            return
        self._set_message("")
        self.resume_requested.emit(str(last))

    @Slot()
    def _on_delete_clicked(self) -> None:
        for record in self.selected_records():
            if not self.delete_run(record.path):
                break

    def delete_run(self, path: str | os.PathLike) -> bool:
        """Move a run folder to the trash; where there is none, delete it only after a confirmation naming it.
        A run that is training (its lock is held) is refused. Returns whether the folder is gone."""
        folder = Path(path)
        owner = holder(folder)
        if owner is not None:
            self._set_message(
                f"Cannot delete {folder}: it is being trained right now (process {owner.get('pid', '?')}). "
                "Stop the run first.",
                error=True,
            )
            return False
        if not folder.is_dir():
            self._set_message(f"Cannot delete {folder}: it no longer exists.", error=True)
            self._schedule()
            return False
        if self.use_trash and QFile.moveToTrash(str(folder)):
            self._gone(folder, f"Moved {folder} to the trash (restore it from there).")
            return True
        if not self._confirm_delete(folder):
            self._set_message(f"{folder} was not deleted.")
            return False
        try:
            shutil.rmtree(folder)
        except OSError as exc:
            self._set_message(f"Could not delete {folder}: {exc.strerror or exc}", error=True)
            self._schedule()
            return False
        self._gone(folder, f"Deleted {folder}.")
        return True

    def _confirm_delete(self, folder: Path) -> bool:
        box = QMessageBox(
            QMessageBox.Icon.Warning,
            "Delete run",
            f"This system has no trash for {folder.parent}.\n\nDelete the run folder\n{folder}\n"
            "and everything in it (checkpoints, metrics, exports) for good?",
            QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.Cancel,
            self,
        )
        box.setObjectName("runs.delete_confirm")
        box.setDefaultButton(QMessageBox.StandardButton.Cancel)
        box.setTextFormat(Qt.TextFormat.PlainText)
        answer = box.exec()
        box.deleteLater()  # the answer is read: deleted on the GUI thread (widgets/lifetime.py), not left to gc
        return answer == QMessageBox.StandardButton.Yes

    def _gone(self, folder: Path, message: str) -> None:
        self._set_message(message)
        self.logged.emit(message)
        self._curves.pop(str(folder), None)
        self.model.merge([str(r.path) for r in self.model.records if r.path != folder], [])
        self._on_selection_changed()

    def _set_message(self, text: str, *, error: bool = False) -> None:
        self._error = text if error else ""
        self.message_label.setText(text)
        self.message_label.setStyleSheet(f"color: {ERROR_COLOUR};" if error else "")
        self.message_label.setVisible(bool(text))
        if error and text:
            self.logged.emit(text)

    def message(self) -> str:
        return self.message_label.text()

    def shutdown(self) -> None:
        """Stop watching and wait for the reads in flight (closing the window)."""
        self._reread_timer.stop()
        self._lock_timer.stop()
        self._overlay_timer.stop()
        self._scroll_timer.stop()
        for path_list in (self.watcher.directories(), self.watcher.files()):
            if path_list:
                self.watcher.removePaths(path_list)
        for task in (self._task, self._curves_task):
            if task is not None:
                task.wait()
