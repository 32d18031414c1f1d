"""The dataset panel: choose the data source, and see its classes, sample images, split and skipped files."""

from __future__ import annotations

import dataclasses
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QEvent, QSettings, QSize, Qt, QTimer, Signal
from PySide6.QtGui import QFontMetrics, QPalette
from PySide6.QtWidgets import (
    QAbstractItemView,
    QApplication,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QListView,
    QListWidget,
    QListWidgetItem,
    QProgressBar,
    QPushButton,
    QSizePolicy,
    QSpinBox,
    QSplitter,
    QTableView,
    QTableWidget,
    QTableWidgetItem,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from engine.config import TASKS
from engine.text import readable
from widgets.audit_panel import AuditPanel
from widgets.corrections_panel import CorrectionsPanel
from widgets.fields import bind_combo, bind_float_text, bind_spin, bind_text
from widgets.look import ERROR_COLOUR
from widgets.sample_views import SamplesModel, SkippedModel, sample_order
from widgets.state import ProjectState
from widgets.tasks import Task, run_task

if TYPE_CHECKING:
    from engine.data import DataSource
    from engine.image_scan import ProgressLine

# engine.data imports PyTorch: it is imported where a scan runs (a worker thread), not at the window's start-up.

OBJECT_NAMES = {
    "dataset.open_folder": "opens an image folder (one sub-folder per class) as the dataset",
    "dataset.open_file": "opens a .csv or .npz file as the dataset",
    "dataset.open_sample": "opens the bundled digits sample dataset",
    "dataset.path": "the dataset's path (data.path); relative paths are relative to the project file",
    "dataset.kind": "how to read the dataset (data.kind): detect from the path, image folder, CSV, .npz or tar shards",
    "dataset.task": "what the labels mean (data.task): classification, multilabel or regression",
    "dataset.val_fraction": "share of the data held out for validation (data.val_fraction, 0 to below 1)",
    "dataset.split_seed": "seed of the random train/validation split (data.split_seed)",
    "dataset.val_path": "a separate validation source (data.val_path); empty to split the dataset instead",
    "dataset.val_choose": "chooses a separate validation folder or file",
    "dataset.recent": "recently opened datasets, newest first; activate one to open it again",
    "dataset.rescan": "scans the dataset again (after files changed on disk)",
    "dataset.tabs": "switches between the class chart, the sample images, the skipped files and the audit",
    "dataset.classes": "table of classes with their sample counts, in all and per split",
    "dataset.chart": "bar chart of samples per class, training and validation stacked",
    "dataset.samples": "every sample image with its label, grouped by class (thumbnails load as they scroll into view)",
    "dataset.skipped": "files the scan could not use, with the reason",
    "dataset.progress": "busy indicator while the dataset is scanned",
    "dataset.stop_scan": "stops a scan in progress (what was checked is kept for the next scan)",
    "dataset.status": "what the panel is doing, or a summary of the dataset",
    "dataset.split": "how many samples go to training and to validation",
    "dataset.error": "why the dataset cannot be used (bad path, empty folder, a single class...)",
    "dataset.warnings": "warnings from the scan (such as a class folder without usable images)",
}

RECENT_KEY = "recent_datasets"
MAX_RECENT = 10
THUMB_SIZE = 64  # pixels; tiny images (8x8 digits) are enlarged to this with nearest-neighbour
SCAN_FIELDS = ("data.path", "data.kind", "data.task", "data.val_path", "data.classes")
SPLIT_FIELDS = ("data.val_fraction", "data.split_seed")
TRAIN_COLOUR = "#4c72b0"  # data colours, readable on light and dark backgrounds
VAL_COLOUR = "#dd8452"
SAMPLE_DATASET = Path(__file__).resolve().parents[1] / "resources" / "sample_data" / "digits"


# ---------------------------------------------------------------------------------------------
# Background work: plain functions, plain values in and out


class _Cancelled(Exception):
    """Stop was pressed, or a newer request superseded this scan."""


def split_summary(
    source: DataSource, val_fraction: float, seed: int, val_source: DataSource | None = None
) -> dict[str, Any]:
    """Samples and per-class counts of each split, as training will make them."""
    from engine.data import split_indices

    if val_source is not None:
        return {
            "train": len(source),
            "val": len(val_source),
            "train_counts": source.class_counts(),
            "val_counts": val_source.class_counts(),
            "separate": True,
        }
    train_idx, val_idx = split_indices(source.targets, source.task, val_fraction, seed)

    def counts(positions: list[int]) -> list[int]:
        return dataclasses.replace(source, targets=[source.targets[i] for i in positions]).class_counts()

    return {
        "train": len(train_idx),
        "val": len(val_idx),
        "train_counts": counts(train_idx),
        "val_counts": counts(val_idx),
        "separate": False,
    }


def scan_dataset(
    path: str,
    *,
    kind: str = "auto",
    task: str = "classification",
    val_path: str | None = None,
    val_fraction: float = 0.2,
    split_seed: int = 0,
    progress: Callable[[Any], None] | None = None,
    cancel: threading.Event | None = None,
    classes: Sequence[str] = (),
) -> dict[str, Any]:
    """Scan a dataset (and its validation source), split it, and order its samples by class; raises DataError.

    Tar shards (kind "webdataset") are not scanned: their shards.json (or one pass counting them) gives the shard
    and sample counts and the classes; classes is data.classes for shards without one."""
    from engine.data import DataError, scan_source

    report = progress or (lambda value: None)
    if kind == "webdataset":
        return describe_shards(path, task=task, val_path=val_path, val_fraction=val_fraction, classes=classes)

    def check() -> None:
        if cancel is not None and cancel.is_set():
            raise _Cancelled()

    def stage(name: str) -> Callable[[int, int], None]:
        def progress(done: int, total: int) -> None:
            check()  # Stop (or a newer request): the scan ends its worker processes and keeps what it checked
            report((name, done, total))

        return progress

    report(("start", 0, 0))
    source = scan_source(path, kind=kind, task=task, progress=stage("verify"))
    check()
    val_source = None
    if val_path:
        try:
            val_source = scan_source(
                val_path, kind=kind, task=task, class_names=source.class_names, progress=stage("validation")
            )
        except DataError as exc:
            raise DataError(f"validation source: {exc}") from None
        check()

    # The Samples tab lists every sample grouped by class; its thumbnails are decoded later, for rows on screen.
    order = sample_order(source)
    check()

    # Shown as text: Qt drops the undecodable bytes of a non-UTF-8 file name, naming another file or none.
    skipped = [(readable(s.path), readable(s.reason)) for s in source.skipped]
    warnings = [readable(w) for w in source.warnings]
    if val_source is not None:
        skipped += [(readable(s.path), readable(f"validation: {s.reason}")) for s in val_source.skipped]
        warnings += [readable(f"validation: {w}") for w in val_source.warnings]
    # Kept for re-splitting when only val_fraction or split_seed change; without files and pixels it stays small.
    light_val = (
        dataclasses.replace(val_source, files=None, array=None, skipped=[], warnings=[])
        if val_source is not None
        else None
    )
    return {
        "path": str(source.path),
        "kind": source.kind,
        "task": source.task,
        "class_names": list(source.class_names),
        "counts": source.class_counts(),
        "size": len(source),
        "val_path": str(val_source.path) if val_source is not None else None,
        "split": split_summary(source, val_fraction, split_seed, val_source),
        "skipped": skipped,
        "warnings": warnings,
        "order": order,
        "source": source,  # its files (or array) feed the Samples tab's thumbnails
        "val_source": light_val,
    }


def describe_shards(
    path: str, *, task: str, val_path: str | None, val_fraction: float, classes: Sequence[str]
) -> dict[str, Any]:
    """What the panel shows of streamed shards, shaped as scan_dataset's result (no thumbnails, no re-split)."""
    from engine.webdataset_data import open_shards

    train = open_shards(path, task=task, classes=classes)
    val = None
    if val_path:
        val = open_shards(val_path, task=task, classes=classes, what="data.val_path", class_names=train.class_names)
    warnings = []
    if val is None and val_fraction > 0:
        warnings.append(
            f"data.val_fraction = {val_fraction:g} cannot split a stream of shards: give the validation shards, "
            "or set the validation fraction to 0"
        )
    no_counts = [0] * len(train.class_counts)
    return {
        "path": path,
        "kind": "webdataset",
        "task": task,
        "class_names": list(train.class_names),
        "counts": [a + b for a, b in zip(train.class_counts, val.class_counts if val else no_counts, strict=True)],
        "size": train.samples + (val.samples if val else 0),
        "val_path": val_path,
        "split": {
            "train": train.samples,
            "val": val.samples if val else 0,
            "train_counts": list(train.class_counts),
            "val_counts": list(val.class_counts) if val else no_counts,
            "separate": True,
        },
        "shards": {"train": train.describe(), "val": val.describe() if val else None},
        "skipped": [],
        "warnings": warnings,
        "order": None,  # shards are streamed: no samples to list
        "source": None,
        "val_source": None,
    }


# ---------------------------------------------------------------------------------------------
# The bar chart


def _short(name: str, limit: int = 14) -> str:
    """Long names cut in the middle: classes often share a prefix and differ at the end (class_007, class_012)."""
    if len(name) <= limit:
        return name
    head = (limit - 1) // 2
    return name[:head] + "…" + name[-(limit - 1 - head) :]


class ClassAxis(pg.AxisItem):
    """An x axis labelled with class names; with many classes only every n-th name is written, so none overlap."""

    def __init__(self) -> None:
        super().__init__("bottom")
        self.names: list[str] = []
        self._step = 1
        # A fixed height with room for one line of names: growing it only once text is drawn leaves the
        # first drawing after an empty chart without its labels.
        self.setHeight(QFontMetrics(QApplication.font()).height() + 14)

    def set_names(self, names: list[str]) -> None:
        self.names = list(names)
        self.picture = None
        self.update()

    def tickValues(self, minVal, maxVal, size):  # noqa: N802 - pyqtgraph's name
        n = len(self.names)
        lo, hi = max(0, math.ceil(minVal)), min(n - 1, math.floor(maxVal))
        if n == 0 or hi < lo or size <= 0:
            return []
        font = self.style.get("tickFont") or QApplication.font()
        metrics = QFontMetrics(font)
        widest = max(metrics.horizontalAdvance(_short(name)) for name in self.names[lo : hi + 1]) + 10
        pixels_per_class = size / max(maxVal - minVal, 1e-9)
        self._step = max(1, math.ceil(widest / pixels_per_class))
        major = [v for v in range(lo, hi + 1) if v % self._step == 0]
        if self._step == 1:
            return [(1, major)]
        return [(self._step, major), (1, [v for v in range(lo, hi + 1) if v % self._step])]

    def tickStrings(self, values, scale, spacing):  # noqa: N802 - pyqtgraph's name
        if spacing < self._step:  # the unlabelled in-between ticks
            return [""] * len(values)
        out = []
        for v in values:
            i = int(round(v))
            out.append(_short(self.names[i]) if 0 <= i < len(self.names) else "")
        return out


class FittingTabs(QTabWidget):
    """Tabs that ask for only the height they need at least; the layout gives them whatever is left.

    The panel sits in a scroll area, and its word-wrapped labels make that area size it by its height for the
    dock's width, which adds up the preferred heights: the pages' (a plot and two lists) would push the class
    chart's axis, with the class names, below the fold of a 900 px screen.
    """

    def sizeHint(self) -> QSize:  # noqa: N802 - Qt's name
        return QSize(super().sizeHint().width(), self.minimumSizeHint().height())


# ---------------------------------------------------------------------------------------------
# The panel


class DatasetPanel(QWidget):
    """Edits the project's data fields and shows what the data source holds, scanned in the background."""

    scanned = Signal(dict)  # {"path", "num_classes", "class_names", "counts", "train", "val", "skipped", "task"}
    scan_failed = Signal(str)
    logged = Signal(str)

    def __init__(self, state: ProjectState, parent: QWidget | None = None):
        super().__init__(parent)
        self.state = state
        self._request = 0
        self._tasks: list[Task] = []
        self._eta: ProgressLine | None = None  # the scan's rate and time left, for the status line
        self._pending: str | None = None  # "scan" or "split" waiting for the coalescing timer
        self._last: dict[str, Any] | None = None  # the last successful scan
        self._scan_key: tuple | None = None
        self._build()
        self._bindings = [
            bind_text(state, "data.path", self.path_edit, parse=lambda t: t.strip(), message=self.path_message),
            bind_combo(state, "data.kind", self.kind_combo, message=self.kind_message),
            bind_combo(state, "data.task", self.task_combo, message=self.kind_message),
            bind_float_text(state, "data.val_fraction", self.fraction_edit, message=self.split_message),
            bind_spin(state, "data.split_seed", self.seed_spin, message=self.split_message),
            bind_text(
                state, "data.val_path", self.val_path_edit, parse=lambda t: t.strip() or None, message=self.val_message
            ),
        ]
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(0)  # coalesces the several `changed` signals of one edit into one scan
        self._timer.timeout.connect(self._on_timer_fired)
        state.changed.connect(self._on_state_changed)
        self._load_recent()
        self._update_split_fields()
        self._style_chart()
        self._schedule("scan")

    # -- building ------------------------------------------------------------------------------
    def _build(self) -> None:
        def button(name: str, text: str, tip: str, slot) -> QPushButton:
            b = QPushButton(text)
            b.setObjectName(name)
            b.setToolTip(tip)
            b.clicked.connect(slot)
            return b

        def message() -> QLabel:
            label = QLabel()
            label.setWordWrap(True)
            label.setStyleSheet(f"color: {ERROR_COLOUR};")
            label.hide()
            return label

        self.open_folder_button = button(
            "dataset.open_folder",
            "Open folder...",
            "An image folder with one sub-folder per class",
            self._on_open_folder_clicked,
        )
        self.open_file_button = button(
            "dataset.open_file",
            "Open file...",
            "A .csv (columns path,label) or a .npz (arrays X and y)",
            self._on_open_file_clicked,
        )
        self.open_sample_button = button(
            "dataset.open_sample",
            "Open sample",
            "The bundled digits: 10 classes of 8x8 handwritten digits",
            self.open_sample,
        )
        self.rescan_button = button(
            "dataset.rescan",
            "Scan again",
            "Read the dataset again from disk",
            lambda: self._schedule("scan", force=True),
        )

        self.path_edit = QLineEdit()
        self.path_edit.setObjectName("dataset.path")
        self.path_edit.setPlaceholderText("an image folder, a .csv or a .npz (or drop one on the window)")
        self.path_message = message()
        self.kind_combo = QComboBox()
        self.kind_combo.setObjectName("dataset.kind")
        for label, value in (
            ("Detect from the path", "auto"),
            ("Image folder", "folder"),
            ("CSV file", "csv"),
            (".npz archive", "npz"),
            ("Tar shards (WebDataset)", "webdataset"),
        ):
            self.kind_combo.addItem(label, value)
        self.task_combo = QComboBox()
        self.task_combo.setObjectName("dataset.task")
        labels = {
            "classification": "Classification (one class per image)",
            "multilabel": "Multilabel (any number of labels)",
            "regression": "Regression (numbers)",
        }
        for task in TASKS:
            self.task_combo.addItem(labels.get(task, task), task)
        self.kind_message = message()
        self.fraction_edit = QLineEdit()
        self.fraction_edit.setObjectName("dataset.val_fraction")
        self.fraction_edit.setToolTip("Share of each class held out for validation, from 0 (none) to below 1")
        self.fraction_edit.setMaximumWidth(90)
        self.seed_spin = QSpinBox()
        self.seed_spin.setObjectName("dataset.split_seed")
        self.seed_spin.setRange(0, 2**31 - 1)
        self.seed_spin.setToolTip("The same seed gives the same split every time")
        self.split_message = message()
        self.val_path_edit = QLineEdit()
        self.val_path_edit.setObjectName("dataset.val_path")
        self.val_path_edit.setPlaceholderText("none: split the dataset")
        self.val_choose_button = button(
            "dataset.val_choose",
            "Choose...",
            "A validation folder or file of the same kind as the dataset",
            self._on_val_choose_clicked,
        )
        self.val_message = message()

        buttons = QHBoxLayout()
        for b in (self.open_folder_button, self.open_file_button, self.open_sample_button, self.rescan_button):
            buttons.addWidget(b)
        buttons.addStretch(1)
        kind_row = QHBoxLayout()
        kind_row.addWidget(self.kind_combo, 1)
        kind_row.addWidget(QLabel("Task:"))
        kind_row.addWidget(self.task_combo, 2)
        split_row = QHBoxLayout()
        split_row.addWidget(self.fraction_edit)
        split_row.addWidget(QLabel("held out, split seed"))
        split_row.addWidget(self.seed_spin)
        split_row.addStretch(1)
        val_row = QHBoxLayout()
        val_row.addWidget(self.val_path_edit, 1)
        val_row.addWidget(self.val_choose_button)

        form = QFormLayout()
        form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.ExpandingFieldsGrow)

        def with_message(field, label: QLabel) -> QVBoxLayout:
            # The refusal reason sits right under its field and takes no room while hidden.
            box = QVBoxLayout()
            box.setSpacing(2)
            if isinstance(field, QWidget):
                box.addWidget(field)
            else:
                box.addLayout(field)
            box.addWidget(label)
            return box

        form.addRow(buttons)
        form.addRow("Dataset:", with_message(self.path_edit, self.path_message))
        form.addRow("Read as:", with_message(kind_row, self.kind_message))
        form.addRow("Validation:", with_message(split_row, self.split_message))
        form.addRow("Or separately:", with_message(val_row, self.val_message))
        source_box = QGroupBox("Data source")
        source_box.setLayout(form)

        self.recent_list = QListWidget()
        self.recent_list.setObjectName("dataset.recent")
        self.recent_list.setTextElideMode(Qt.TextElideMode.ElideMiddle)
        self.recent_list.setToolTip("Double-click (or press Enter on) a dataset to open it again")
        self.recent_list.itemActivated.connect(self._on_recent_activated)
        recent_box = QGroupBox("Recent datasets")
        recent_layout = QVBoxLayout(recent_box)
        recent_layout.addWidget(self.recent_list)

        top = QVBoxLayout()  # stacked, so the panel fits a dock beside the plots at 1280 px
        top.addWidget(source_box)
        top.addWidget(recent_box)

        self.progress_bar = QProgressBar()
        self.progress_bar.setObjectName("dataset.progress")
        self.progress_bar.setTextVisible(False)
        self.progress_bar.setMaximumWidth(200)
        self.progress_bar.hide()
        self.status_label = QLabel()
        self.status_label.setObjectName("dataset.status")
        self.status_label.setWordWrap(True)
        self.stop_button = QPushButton("Stop")
        self.stop_button.setObjectName("dataset.stop_scan")
        self.stop_button.setToolTip(
            "Stop scanning; what was checked is remembered, so the next scan of this dataset goes on from there"
        )
        self.stop_button.clicked.connect(self.stop_scan)
        self.stop_button.hide()
        status_row = QHBoxLayout()
        status_row.addWidget(self.progress_bar)
        status_row.addWidget(self.stop_button)
        status_row.addWidget(self.status_label, 1)
        self.split_label = QLabel()
        self.split_label.setObjectName("dataset.split")
        self.split_label.setWordWrap(True)
        self.error_label = QLabel()
        self.error_label.setObjectName("dataset.error")
        self.error_label.setWordWrap(True)
        self.error_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.error_label.setStyleSheet(f"color: {ERROR_COLOUR}; font-weight: bold;")
        self.error_label.hide()
        self.warnings_label = QLabel()
        self.warnings_label.setObjectName("dataset.warnings")
        self.warnings_label.setWordWrap(True)
        self.warnings_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.warnings_label.hide()

        # Classes: the chart and the table side by side.
        self.class_axis = ClassAxis()
        self.bar_chart = pg.PlotWidget(axisItems={"bottom": self.class_axis})
        self.bar_chart.setObjectName("dataset.chart")
        self.bar_chart.setMinimumHeight(180)
        plot = self.bar_chart.getPlotItem()
        plot.hideButtons()
        plot.setMenuEnabled(False)
        plot.setMouseEnabled(x=True, y=False)
        plot.setLabel("left", "samples")
        self.train_bars = pg.BarGraphItem(x=[], height=[], width=0.8, brush=TRAIN_COLOUR, pen=None)
        self.val_bars = pg.BarGraphItem(x=[], y0=[], height=[], width=0.8, brush=VAL_COLOUR, pen=None)
        plot.addItem(self.train_bars)
        plot.addItem(self.val_bars)
        self.bar_chart.scene().sigMouseMoved.connect(self._on_chart_hovered)
        self.legend_label = QLabel(
            f"<span style='color:{TRAIN_COLOUR}'>■</span> training &nbsp; "
            f"<span style='color:{VAL_COLOUR}'>■</span> validation"
        )
        self.chart_note = QLabel()
        self.chart_note.setWordWrap(True)
        self.chart_note.hide()
        chart_box = QWidget()
        chart_layout = QVBoxLayout(chart_box)
        chart_layout.setContentsMargins(0, 0, 0, 0)
        chart_layout.addWidget(self.legend_label)
        chart_layout.addWidget(self.chart_note)
        chart_layout.addWidget(self.bar_chart, 1)

        self.class_table = QTableWidget(0, 4)
        self.class_table.setObjectName("dataset.classes")
        self.class_table.setHorizontalHeaderLabels(["Class", "Samples", "Training", "Validation"])
        self.class_table.verticalHeader().hide()
        self.class_table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.class_table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.class_table.setTextElideMode(Qt.TextElideMode.ElideMiddle)
        self.class_table.setWordWrap(False)
        header = self.class_table.horizontalHeader()
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        for col in (1, 2, 3):
            header.setSectionResizeMode(col, QHeaderView.ResizeMode.ResizeToContents)
        classes_split = QSplitter(Qt.Orientation.Vertical)  # chart above the table: both get the dock's width
        classes_split.addWidget(chart_box)
        classes_split.addWidget(self.class_table)
        classes_split.setStretchFactor(0, 3)
        classes_split.setStretchFactor(1, 2)

        self.samples_list = QListView()  # every sample, over a model: thumbnails only for rows on screen
        self.samples_list.setObjectName("dataset.samples")
        self.samples_model = SamplesModel(THUMB_SIZE, self._sample_on_screen, self)
        self.samples_list.setModel(self.samples_model)
        self.samples_list.setViewMode(QListView.ViewMode.IconMode)
        self.samples_list.setIconSize(QSize(THUMB_SIZE, THUMB_SIZE))
        metrics = QFontMetrics(self.samples_list.font())
        self.samples_list.setGridSize(QSize(THUMB_SIZE + 40, THUMB_SIZE + metrics.height() + 14))
        self.samples_list.setResizeMode(QListView.ResizeMode.Adjust)
        self.samples_list.setMovement(QListView.Movement.Static)
        self.samples_list.setUniformItemSizes(True)  # no row is measured to lay out the others
        self.samples_list.setWordWrap(False)
        self.samples_list.setTextElideMode(Qt.TextElideMode.ElideRight)
        self.samples_list.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)

        self.skipped_table = QTableView()
        self.skipped_table.setObjectName("dataset.skipped")
        self.skipped_model = SkippedModel(self)
        self.skipped_table.setModel(self.skipped_model)
        self.skipped_table.verticalHeader().hide()
        self.skipped_table.verticalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Fixed)  # none measured
        self.skipped_table.verticalHeader().setDefaultSectionSize(metrics.height() + 8)
        self.skipped_table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.skipped_table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.skipped_table.setWordWrap(False)
        self.skipped_table.setTextElideMode(Qt.TextElideMode.ElideMiddle)
        self.skipped_table.horizontalHeader().setSectionResizeMode(0, QHeaderView.ResizeMode.Interactive)
        self.skipped_table.horizontalHeader().setStretchLastSection(True)
        self.skipped_table.setColumnWidth(0, 380)

        self.tabs = FittingTabs()
        self.tabs.setObjectName("dataset.tabs")
        self.tabs.addTab(classes_split, "Classes")
        self.tabs.addTab(self.samples_list, "Samples")
        self.tabs.addTab(self.skipped_table, "Skipped")
        self.corrections = CorrectionsPanel(self.state)  # data.exclude / data.relabel, with undo
        self.corrections.logged.connect(self.logged)
        self.tabs.addTab(self.corrections, "Corrections")
        self.audit_panel = AuditPanel(self.state)  # widgets/audit_panel.py
        self.tabs.addTab(self.audit_panel, "Audit")
        self.tabs.currentChanged.connect(self._on_tab_changed)

        layout = QVBoxLayout(self)
        layout.addLayout(top)
        layout.addLayout(status_row)
        layout.addWidget(self.error_label)
        layout.addWidget(self.warnings_label)
        layout.addWidget(self.split_label)
        layout.addWidget(self.tabs, 1)
        self.recent_list.setMaximumHeight(4 * self.recent_list.fontMetrics().height() + 12)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)

    # -- opening -------------------------------------------------------------------------------
    def open_path(self, path: str) -> None:
        """Make a folder, .csv or .npz the project's dataset and scan it (drag-and-drop, recent list, dialogs)."""
        p = Path(os.path.expanduser(str(path)))
        absolute = p if p.is_absolute() else Path.cwd() / p
        absolute = Path(os.path.normpath(absolute))
        values: dict[str, Any] = {"data.kind": "auto"}
        if absolute.is_dir() and self.state.get("data.task") != "classification":
            values["data.task"] = "classification"  # an image folder labels by sub-folder, nothing else
            self.logged.emit("Task set to classification: an image folder labels images by sub-folder")
        if self.state.get("data.val_path"):
            values["data.val_path"] = None  # a validation source belongs with the dataset it was chosen for
            self.logged.emit(
                f"Separate validation source {self.state.get('data.val_path')} cleared for the new dataset"
            )
        reason = self.state.try_set("data.path", self._stored_path(absolute), also=values)
        if reason:
            self._show_error(f"{absolute} cannot be used: {reason}")
            return
        self.logged.emit(f"Dataset: {absolute}")
        self._schedule("scan", force=True)

    def open_sample(self) -> None:
        """Open the bundled digits image folder."""
        if not SAMPLE_DATASET.is_dir():
            self._fail(f"the sample dataset is missing: {SAMPLE_DATASET} does not exist (a damaged install?)")
            return
        self.open_path(str(SAMPLE_DATASET))

    def _stored_path(self, absolute: Path) -> str:
        """Relative to the project's folder when inside it, so the project can move with its data."""
        if self.state.file:
            base = Path(self.state.file).resolve().parent
            try:
                return absolute.resolve().relative_to(base).as_posix() or "."
            except ValueError:
                pass
        return str(absolute)

    def _start_dir(self) -> str:
        current = self.state.config.resolve(self.state.get("data.path"))
        if current is not None and current.exists():
            return str(current.parent)
        if self.state.file:
            return str(Path(self.state.file).parent)
        return str(Path.home())

    def _on_open_folder_clicked(self) -> None:
        folder = QFileDialog.getExistingDirectory(
            self, "Open image folder (one sub-folder per class)", self._start_dir()
        )
        if folder:
            self.open_path(folder)

    def _on_open_file_clicked(self) -> None:
        file, _ = QFileDialog.getOpenFileName(
            self,
            "Open dataset file",
            self._start_dir(),
            "Datasets (*.csv *.npz);;CSV files (*.csv);;NumPy archives (*.npz);;All files (*)",
        )
        if file:
            self.open_path(file)

    def _on_val_choose_clicked(self) -> None:
        current = self.state.config.resolve(self.state.get("data.path"))
        if current is not None and current.is_file():
            suffix = current.suffix.lower()
            chosen, _ = QFileDialog.getOpenFileName(
                self, "Choose the validation file", self._start_dir(), f"Same kind (*{suffix});;All files (*)"
            )
        else:
            chosen = QFileDialog.getExistingDirectory(self, "Choose the validation image folder", self._start_dir())
        if chosen:
            reason = self.state.try_set("data.val_path", self._stored_path(Path(chosen)))
            self.val_message.setText(reason or "")
            self.val_message.setVisible(bool(reason))

    # -- recent datasets -----------------------------------------------------------------------
    def recent_datasets(self) -> list[str]:
        value = QSettings().value(RECENT_KEY, [])
        if isinstance(value, str):  # QSettings' INI format gives back a one-item list as a plain string
            value = [value]
        return [str(v) for v in (value if isinstance(value, (list, tuple)) else []) if v]

    def _save_recent(self, paths: list[str]) -> None:
        QSettings().setValue(RECENT_KEY, paths[:MAX_RECENT])
        self._load_recent()

    def _remember(self, path: str) -> None:
        paths = [p for p in self.recent_datasets() if p != path]
        self._save_recent([path] + paths)

    def _load_recent(self) -> None:
        self.recent_list.clear()
        for path in self.recent_datasets():
            p = Path(path)
            item = QListWidgetItem(f"{p.name}  —  {p.parent}")
            item.setData(Qt.ItemDataRole.UserRole, path)
            item.setToolTip(path)
            self.recent_list.addItem(item)

    def _on_recent_activated(self, item: QListWidgetItem) -> None:
        path = item.data(Qt.ItemDataRole.UserRole)
        if not Path(path).exists():
            self._save_recent([p for p in self.recent_datasets() if p != path])
            message = f"{path} no longer exists; removed from the recent datasets"
            self._show_error(message)
            self.logged.emit(message)
            return
        self.open_path(path)

    # -- scanning ------------------------------------------------------------------------------
    def _on_state_changed(self, path: str) -> None:
        if path == "" or path in SCAN_FIELDS:
            self._schedule("scan")
        elif path in SPLIT_FIELDS:
            self._schedule("split")
        if path in ("", "data.val_path"):
            self._update_split_fields()

    def _update_split_fields(self) -> None:
        separate = bool(self.state.get("data.val_path"))
        tip = "Not used: a separate validation source is set" if separate else ""
        for widget in (self.fraction_edit, self.seed_spin):
            widget.setEnabled(not separate)
            widget.setStatusTip(tip)

    def _schedule(self, what: str, *, force: bool = False) -> None:
        if force:
            self._scan_key = None
        if self._pending != "scan":
            self._pending = what
        self._timer.start()

    def _on_timer_fired(self) -> None:
        what, self._pending = self._pending, None
        key = self._current_key()
        if what == "split" and self._last is not None and key == self._scan_key:
            self._start_split()
        else:
            self._start_scan(key)

    def _current_key(self) -> tuple:
        cfg = self.state.config
        if cfg.data.kind == "webdataset":  # patterns of local paths or URLs
            from engine.shard_patterns import resolve_pattern

            shards = [resolve_pattern(cfg.resolve, p) if p else None for p in (cfg.data.path, cfg.data.val_path)]
            return (shards[0], cfg.data.kind, cfg.data.task, shards[1])
        path, val = cfg.resolve(cfg.data.path), cfg.resolve(cfg.data.val_path)
        return (str(path) if path else None, cfg.data.kind, cfg.data.task, str(val) if val else None)

    def _new_request(self) -> int:
        self._request += 1
        for task in self._tasks:
            task.cancel.set()  # a newer request supersedes it; its result will be ignored
        self._tasks = [t for t in self._tasks if t.is_running()]
        return self._request

    def _start_scan(self, key: tuple) -> None:
        rid = self._new_request()
        path, kind, task, val_path = key
        if path is None:
            self._clear_results()
            self._hide_error()
            self._set_busy(False)
            self.status_label.setText(
                "No dataset yet: open an image folder, a .csv or a .npz file (or drop one on the window)."
            )
            return
        cfg = self.state.config
        self._set_busy(True, f"Scanning {path}...")
        self.stop_button.show()
        from engine.image_scan import ProgressLine

        self._eta = ProgressLine(self.status_label.setText)
        self._tasks.append(
            run_task(
                "dataset scan",
                scan_dataset,
                path,
                kind=kind,
                task=task,
                val_path=val_path,
                val_fraction=cfg.data.val_fraction,
                split_seed=cfg.data.split_seed,
                classes=list(cfg.data.classes),
                progress=True,
                on_result=lambda result: self._on_scan_returned(rid, key, result),
                on_error=lambda exc, tb: self._on_scan_errored(rid, path, exc, tb),
                on_progress=lambda value: self._on_scan_progressed(rid, value),
            )
        )

    def stop_scan(self) -> None:
        """Stop the scan in progress: its worker processes end; the scan cache keeps the files already checked."""
        self._new_request()  # cancels the running scan; its late reports and result are ignored
        self._set_busy(False)
        self.status_label.setText(
            "Scan stopped. The images checked so far are remembered: opening the dataset again goes on from there."
        )

    def _start_split(self) -> None:
        last = self._last
        assert last is not None  # asked for only after a successful scan
        if last["val_source"] is not None or last["source"] is None:
            return  # a separate validation source, or streamed shards: the fraction and seed are not used
        rid = self._new_request()
        cfg = self.state.config
        self._tasks.append(
            run_task(
                "dataset split",
                split_summary,
                last["source"],
                cfg.data.val_fraction,
                cfg.data.split_seed,
                on_result=lambda split: self._on_split_returned(rid, split),
                on_error=lambda exc, tb: self._on_split_errored(rid, exc, tb),
            )
        )

    def _on_tab_changed(self, _index: int = 0) -> None:
        # A report kept for the dataset as it is now shows without recomputing, once the Audit tab is looked at.
        if self.tabs.currentWidget() is self.audit_panel and self._last is not None:
            self.audit_panel.look_up_cached()

    def is_busy(self) -> bool:
        """True while a scan or split of this panel (or its audit) runs."""
        return any(t.is_running() for t in self._tasks) or self._timer.isActive() or self.audit_panel.is_busy()

    def wait(self, ms: int = 30000) -> bool:
        """Block until this panel's background work is done, pending scans and thumbnails included (tests, closing
        the window)."""
        deadline = time.monotonic() + ms / 1000
        while time.monotonic() < deadline:
            QApplication.processEvents()  # fires a pending scan, delivers finished results
            running = [t for t in self._tasks if t.is_running()]
            if self.audit_panel.task is not None and self.audit_panel.task.is_running():
                running.append(self.audit_panel.task)
            thumbs = self.samples_model.task
            if thumbs is not None and thumbs.is_running():
                running.append(thumbs)
            if not running and not self._timer.isActive() and not self.samples_model.is_busy():
                return True
            for task in running:
                task.wait(max(1, int((deadline - time.monotonic()) * 1000)))
        return not self.is_busy()

    def _on_scan_progressed(self, rid: int, value: Any) -> None:
        if rid != self._request:
            return
        stage, done, total = value
        what = {
            "verify": "Checking images",
            "validation": "Checking validation images",
            "thumbs": "Making thumbnails",
        }.get(stage)
        if what is None or total <= 0:
            return
        if self._eta is not None:
            self._eta.what = what
            self.status_label.setText(self._eta.update(done, total))  # with the rate and the time left
        self.progress_bar.setRange(0, total)
        self.progress_bar.setValue(done)  # last: a slot of its signal may stop the scan

    def _on_scan_returned(self, rid: int, key: tuple, result: dict) -> None:
        if rid != self._request:
            return
        self._set_busy(False)
        self._hide_error()
        self._last = result
        self._scan_key = key
        self._show_results(result)
        self._remember(result["path"])
        k = len(result["class_names"])
        skipped = len(result["skipped"])
        self.logged.emit(
            f"Scanned {result['path']}: {result['size']:,} samples, {k} "
            f"{'outputs' if result['task'] == 'regression' else 'classes'}"
            + (f", {skipped} skipped" if skipped else "")
        )
        for warning in result["warnings"]:
            self.logged.emit(f"Warning: {warning}")
        self._emit_scanned()
        self._on_tab_changed()

    def _on_scan_errored(self, rid: int, path: str, exc: BaseException, tb: str) -> None:
        from engine.data import DataError

        if rid != self._request or isinstance(exc, _Cancelled):
            return
        self._set_busy(False)
        if isinstance(exc, DataError):
            message = str(exc)
        else:  # an unexpected failure: the message for the user, the traceback for the log
            message = f"cannot scan {path}: {type(exc).__name__}: {exc}"
            self.logged.emit(tb)
        message, path = readable(message), readable(path)
        if path not in message:
            message = f"{path}: {message}"
        self._fail(message)

    def _on_split_returned(self, rid: int, split: dict) -> None:
        if rid != self._request or self._last is None:
            return
        self._last["split"] = split
        self._show_split(self._last)
        self._emit_scanned()

    def _on_split_errored(self, rid: int, exc: BaseException, tb: str) -> None:
        if rid == self._request:
            self.logged.emit(tb)
            self._fail(f"cannot split {self._last['path'] if self._last else 'the dataset'}: {exc}")

    def _emit_scanned(self) -> None:
        r = self._last
        assert r is not None  # emitted only after a successful scan
        self.scanned.emit(
            {
                "path": r["path"],
                "task": r["task"],
                "num_classes": len(r["class_names"]),
                "class_names": list(r["class_names"]),
                "counts": list(r["counts"]),
                "train": r["split"]["train"],
                "val": r["split"]["val"],
                "skipped": len(r["skipped"]),
            }
        )

    def _fail(self, message: str) -> None:
        self._last = None
        self._scan_key = None
        self._clear_results()
        self._set_busy(False)
        self.status_label.setText("")
        self._show_error(message)
        self.logged.emit(f"Dataset problem: {message}")
        self.scan_failed.emit(message)

    # -- showing -------------------------------------------------------------------------------
    def _set_busy(self, busy: bool, text: str = "") -> None:
        self.progress_bar.setRange(0, 0)  # an indefinite busy bar until the scan reports its size
        self.progress_bar.setVisible(busy)
        if not busy:
            self.stop_button.hide()
        if busy:
            self.status_label.setText(text)

    def _show_error(self, message: str) -> None:
        self.error_label.setText(message)
        self.error_label.show()

    def _hide_error(self) -> None:
        self.error_label.clear()
        self.error_label.hide()

    def _clear_results(self) -> None:
        self.class_axis.set_names([])
        self.train_bars.setOpts(x=[], height=[])
        self.val_bars.setOpts(x=[], y0=[], height=[])
        self.class_table.setRowCount(0)
        self.samples_model.show(None)
        self.skipped_model.show([])
        self.tabs.setTabText(2, "Skipped")
        self.warnings_label.clear()
        self.warnings_label.hide()
        self.split_label.clear()
        self.chart_note.hide()

    def _show_results(self, r: dict) -> None:
        self._clear_results()
        task, names = r["task"], r["class_names"]
        what = {"classification": "classes", "multilabel": "labels", "regression": "outputs"}[task]
        extra = f", {len(r['skipped']):,} skipped" if r["skipped"] else ""
        self.status_label.setText(
            f"{Path(r['path']).name}: {r['size']:,} samples, {len(names)} {what} ({r['kind']}, {task}){extra}"
        )
        self._show_split(r)
        self.samples_model.show(r["source"], r["order"])
        self._show_skipped(r["skipped"])
        if r["warnings"]:
            self.warnings_label.setText("\n".join(f"Warning: {w}" for w in r["warnings"]))
            self.warnings_label.show()

    def _show_split(self, r: dict) -> None:
        split, names, task = r["split"], r["class_names"], r["task"]
        if r.get("shards"):
            shards = r["shards"]
            text = f"Shards: training {shards['train']}; " + (
                f"validation {shards['val']}" if shards["val"] else "no validation shards"
            )
        elif split["separate"]:
            text = (
                f"Split: {split['train']:,} training (all of {Path(r['path']).name}) and {split['val']:,} "
                f"validation from {r['val_path']}"
            )
        elif split["val"]:
            text = (
                f"Split: {split['train']:,} training and {split['val']:,} validation samples "
                f"(validation fraction {self.state.get('data.val_fraction'):g}, seed "
                f"{self.state.get('data.split_seed')})"
            )
        elif self.state.get("data.val_fraction") > 0:
            text = (
                f"Split: all {split['train']:,} samples train; a validation fraction of "
                f"{self.state.get('data.val_fraction'):g} leaves no validation samples"
            )
        else:
            text = f"Split: all {split['train']:,} samples train; no validation (validation fraction 0)"
        self.split_label.setText(text)

        counts = r["counts"]
        if task == "regression":
            self.class_table.setHorizontalHeaderLabels(["Output", "", "", ""])
            self.class_table.setRowCount(len(names))
            for row, name in enumerate(names):
                self.class_table.setItem(row, 0, QTableWidgetItem(name))
            self.class_axis.set_names([])
            self.train_bars.setOpts(x=[], height=[])
            self.val_bars.setOpts(x=[], y0=[], height=[])
            self.chart_note.setText("Regression targets are numbers: there are no classes to count.")
            self.chart_note.show()
            return
        first = "Label" if task == "multilabel" else "Class"
        self.class_table.setHorizontalHeaderLabels(
            [first, "Samples" if task == "classification" else "Positives", "Training", "Validation"]
        )
        self.chart_note.setVisible(task == "multilabel")
        self.chart_note.setText("Multilabel: each bar counts the samples that carry the label.")
        train, val = split["train_counts"], split["val_counts"]
        self.class_table.setRowCount(len(names))
        for row, values in enumerate(zip(names, counts, train, val, strict=True)):
            for col, value in enumerate(values):
                item = QTableWidgetItem(f"{value:,}" if col else value)
                if not col:
                    item.setToolTip(value)
                else:
                    item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
                self.class_table.setItem(row, col, item)
        x = np.arange(len(names), dtype=float)
        self.class_axis.set_names(names)
        self.train_bars.setOpts(x=x, height=np.asarray(train, dtype=float), width=0.8)
        self.val_bars.setOpts(x=x, y0=np.asarray(train, dtype=float), height=np.asarray(val, dtype=float), width=0.8)
        plot = self.bar_chart.getPlotItem()
        top = max(counts) if counts else 1
        plot.setLimits(xMin=-1, xMax=max(len(names), 1), yMin=0)
        plot.setXRange(-0.6, len(names) - 0.4, padding=0)
        plot.setYRange(0, top * 1.08 or 1, padding=0)

    def _sample_on_screen(self, row: int) -> bool:
        """Whether a sample's cell is in the Samples view's visible area now (its thumbnail is wanted)."""
        view = self.samples_list
        if not view.isVisible():
            return False
        return view.visualRect(self.samples_model.index(row)).intersects(view.viewport().rect())

    def _show_skipped(self, skipped: list[tuple[str, str]]) -> None:
        self.skipped_model.show(skipped)  # every one: the view asks only for the rows on screen
        self.tabs.setTabText(2, f"Skipped ({len(skipped):,})" if skipped else "Skipped")

    def _on_chart_hovered(self, pos) -> None:
        r = self._last
        if r is None or r["task"] == "regression":
            return
        point = self.bar_chart.getPlotItem().vb.mapSceneToView(pos)
        i = int(round(point.x()))
        if 0 <= i < len(r["class_names"]):
            split = r["split"]
            self.bar_chart.setToolTip(
                f"{r['class_names'][i]}: {r['counts'][i]:,} "
                f"({split['train_counts'][i]:,} training, {split['val_counts'][i]:,} "
                "validation)"
            )
        else:
            self.bar_chart.setToolTip("")

    # -- palette -------------------------------------------------------------------------------
    def _style_chart(self) -> None:
        palette = self.palette()
        self.bar_chart.setBackground(palette.color(QPalette.ColorRole.Base))
        text = palette.color(QPalette.ColorRole.Text)
        plot = self.bar_chart.getPlotItem()
        for name in ("left", "bottom"):
            axis = plot.getAxis(name)
            axis.setPen(pg.mkPen(text))
            axis.setTextPen(pg.mkPen(text))

    def changeEvent(self, event: QEvent) -> None:  # noqa: N802 - Qt's name
        if event.type() == QEvent.Type.PaletteChange:
            self._style_chart()
        super().changeEvent(event)
