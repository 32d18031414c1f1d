"""The *Sweep* dialog: choose project fields and their ranges from the declarations, run an Optuna study of the
project on a worker thread (engine.sweep), watch the trials arrive in a table and a plot of each parameter against
the objective, stop it within a batch, and copy the best trial's values into the project (*Use best*).

The space the dialog builds is the SPACE.json that `main.py sweep --space` takes (*Save space...* writes it,
*Load space...* fills the dialog from one), and it is checked by the same functions (parse_space, check_space) before
any trial runs. The study is the CLI's: by default OUTPUT_DIR/sweeps.db under the name PROJECT_NAME-sweep, so a sweep
started here and one started with `main.py sweep` continue each other.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QObject, Qt, Signal
from PySide6.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QDialog,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QScrollArea,
    QSpinBox,
    QSplitter,
    QTableWidget,
    QTableWidgetItem,
    QTreeWidget,
    QTreeWidgetItem,
    QVBoxLayout,
    QWidget,
)

from engine.config import ConfigError, ProjectConfig
from engine.events import BatchProgress, EpochFinished, Event, RunStarted
from engine.phases import rule_holds
from engine.session import error_text
from engine.settings import Applies, bounds, choices, fields, meta, unwrap
from engine.sweep import (
    OBJECTIVES,
    PRUNERS,
    SAMPLERS,
    STORAGE_FILE,
    Param,
    SpaceError,
    SweepSpec,
    TrialOutcome,
    grid_problems,
    load_space,
    parse_space,
)
from widgets.fields import ComboBox, SpinBox, format_float, parse_float
from widgets.look import ERROR_STYLE
from widgets.state import ProjectState
from widgets.tasks import Task, run_task

OBJECT_NAMES = {
    "sweep.dialog": "the Sweep dialog itself (Run > Sweep...)",
    "sweep.filter": "narrows the list of fields by name",
    "sweep.fields": "the project fields a sweep can search, by section; tick a field to search it. A field the "
    "project does not use is hidden, or greyed with the reason (as the Setup panels show it)",
    "sweep.params": "the ticked fields' ranges and choices (one box per field, named sweep.param.FIELD)",
    "sweep.param.low": "a numeric field's lowest value to try",
    "sweep.param.high": "a numeric field's highest value to try",
    "sweep.param.log": "a float field sampled log-uniformly (such as a learning rate)",
    "sweep.param.step": "the step between values: an int field's, or a float field's (empty: continuous; a grid "
    "needs one)",
    "sweep.param.choices": "a choice field's values to try (tick at least one); for model.freeze_up_to the "
    "backbone's blocks, as the Layers panel lists them",
    "sweep.trials_count": "how many finished (complete or pruned) trials the study should hold",
    "sweep.sampler": "Optuna's sampler: tpe (default), random or grid",
    "sweep.pruner": "stops bad trials early from their epoch validation metric: median, hyperband or none",
    "sweep.objective": "what each trial is scored on: the best val_accuracy (maximised) or val_loss (minimised)",
    "sweep.study": "the study's name in the storage (the same name continues a study)",
    "sweep.storage": "where the study is kept: OUTPUT_DIR/sweeps.db",
    "sweep.load": "fills the dialog from a space file (the JSON main.py sweep --space takes)",
    "sweep.save": "writes the chosen fields and ranges as a space file for main.py sweep --space",
    "sweep.run": "starts the sweep; while it runs, stops it after the running trial's batch",
    "sweep.progress": "the running trial, its epoch and batch",
    "sweep.trials": "the trials as they end: number, parameters, state, objective, epochs, run folder",
    "sweep.plot": "each searched parameter against the objective (log axis for log ranges)",
    "sweep.message": "what the dialog did, or what it refused and why",
    "sweep.use_best": "copies the best trial's parameter values into the project",
    "sweep.close": "closes the dialog (stopping the sweep first)",
}

FREEZE_UP_TO = "model.freeze_up_to"
# Settings that change where, how fast or with what bookkeeping a run goes, not what it learns: not offered.
NOT_SEARCHED_SECTIONS = ("output.", "checkpoint.", "distributed.")
NOT_SEARCHED = {
    "schema_version",
    "data.kind",
    "data.task",
    "train.device",
    "train.precision",
    "train.feature_cache",
    "train.feature_cache_max_mb",
    "train.channels_last",
    "loader.num_workers",
    "loader.persistent_workers",
    "loader.pin_memory",
    "loader.decoded_cache",
    "loader.decoded_cache_disk",
    "loader.decoded_cache_max_mb",
    "loader.sampler.num_replicas",
    "loader.sampler.rank",
}
STATE_COLOURS = {"complete": "#1f5fa8", "pruned": "#9aa4ad", "stopped": "#d62", "failed": "#b3261e"}


def searchable_fields() -> list[tuple[str, str, Any]]:
    """(path, kind, field info) of every field a sweep can search: numbers ("float"/"int"), choices ("choice")."""
    out: list[tuple[str, str, Any]] = []
    for path, info in fields(ProjectConfig):
        if path in NOT_SEARCHED or path.startswith(NOT_SEARCHED_SECTIONS):
            continue
        base = unwrap(info.annotation)[0]
        if path == FREEZE_UP_TO or choices(info):
            out.append((path, "choice", info))
        elif base in (int, float) and base is not bool:
            out.append((path, "int" if base is int else "float", info))
    return out


def unused_reason(rule: Applies) -> str:
    """Why a field is not offered: its `applies` rule, as the Setup panels word a disabled row."""
    why = f"{rule.why[0].upper()}{rule.why[1:]}; u" if rule.why else "U"
    return f"{why}sed only with {rule.describe()}."


def _round(value: float) -> float:
    return float(f"{value:.3g}")


def default_range(kind: str, current: Any, limits: dict[str, float], info: Any) -> tuple[float, float, bool]:
    """(low, high, log) to start from: around the current value (a tenth to ten times for a positive float, half
    to twice for an int), kept inside the field's declared limits (and the form's own range where it has one)."""
    shown = meta(info)
    floor = limits.get("ge", limits.get("gt", shown.low))
    ceiling = limits.get("le", limits.get("lt", shown.high))
    value = float(current) if isinstance(current, (int, float)) and not isinstance(current, bool) else None
    if kind == "int":
        c = int(value) if value is not None else int(floor or 0)
        first, last = (c // 2, c * 2) if c > 0 else (c, c + 10)
        if floor is not None:
            first = max(first, math.ceil(floor + (1e-9 if "gt" in limits else 0)))
        if ceiling is not None:
            last = min(last, math.floor(ceiling - (1e-9 if "lt" in limits else 0)))
        return float(first), float(max(first, last)), False
    if value is not None and value > 0 and (floor is None or floor >= 0):
        low, high, log = _round(value / 10), _round(value * 10), True
    else:
        low = floor if floor is not None else (value or 0.0) - 1.0
        high = ceiling if ceiling is not None else (value or 0.0) + 1.0
        log = False
    if floor is not None and (low < floor or ("gt" in limits and low <= floor)):
        # Onto a closed limit; halfway to the current value (or 1 above) from an open one.
        low = _round((floor + (value if value is not None else floor + 1)) / 2) if "gt" in limits else floor
    if ceiling is not None and (high > ceiling or ("lt" in limits and high >= ceiling)):
        high = _round((ceiling + max(low, value or low)) / 2) if "lt" in limits else ceiling
    if log and low <= 0:
        log = False
    return float(low), float(high), log


def _text(value: Any) -> str:
    """A value as the table and labels show it: 4 significant digits, a name as it is, JSON for the rest."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, str):
        return value
    return json.dumps(value)


class ParamEditor(QGroupBox):
    """One ticked field: a numeric range (low, high, log; a step) or the choices to try."""

    def __init__(self, path: str, kind: str, info: Any, current: Any, blocks: list[str]):
        super().__init__(path)
        self.setObjectName(f"sweep.param.{path}")
        self.path, self.kind, self.info = path, kind, info
        self.setToolTip(meta(info).help or meta(info).doc)
        form = QFormLayout(self)
        form.setContentsMargins(6, 4, 6, 4)
        self.low: QLineEdit | QSpinBox | None = None
        self.high: QLineEdit | QSpinBox | None = None
        self.step: QLineEdit | QSpinBox | None = None
        self.log: QCheckBox | None = None
        self.choices: QListWidget | None = None
        self._values: list[Any] = []
        limits = bounds(unwrap(info.annotation)[1] + list(info.metadata))
        if kind == "choice":
            self.choices = QListWidget()
            self.choices.setObjectName("sweep.param.choices")
            self.choices.setMaximumHeight(120)
            labels = meta(info).choices
            values = list(blocks) if path == FREEZE_UP_TO else list(choices(info))
            for value in values:
                self.add_choice(value, labels.get(value, ""), checked=path != FREEZE_UP_TO or value == current)
            if path == FREEZE_UP_TO and current and current not in values:
                self.add_choice(current, "", checked=True)
            form.addRow(self.choices)
            return
        low, high, log = default_range(kind, current, limits, info)
        if kind == "int":
            spins = []
            for name in ("low", "high", "step"):
                box = SpinBox()
                box.setObjectName(f"sweep.param.{name}")
                box.setRange(-(2**31) + 1, 2**31 - 1)  # the field's limits are checked by name, not clamped here
                spins.append(box)
            self.low, self.high, self.step = spins
            spins[0].setValue(int(low))
            spins[1].setValue(int(high))
            spins[2].setMinimum(1)
            spins[2].setValue(1)
        else:
            self.low, self.high = QLineEdit(format_float(low)), QLineEdit(format_float(high))
            self.low.setObjectName("sweep.param.low")
            self.high.setObjectName("sweep.param.high")
            self.step = QLineEdit()
            self.step.setObjectName("sweep.param.step")
            self.step.setPlaceholderText("continuous")
            self.log = QCheckBox("log scale")
            self.log.setObjectName("sweep.param.log")
            self.log.setChecked(log)
        row = QHBoxLayout()
        row.addWidget(QLabel("from"))
        row.addWidget(self.low, 1)
        row.addWidget(QLabel("to"))
        row.addWidget(self.high, 1)
        row.addWidget(QLabel("step"))
        row.addWidget(self.step, 1)
        if self.log is not None:
            row.addWidget(self.log)
        form.addRow(row)
        if limits:
            from engine.settings import range_text

            hint = QLabel(f"allowed: {range_text(limits)}; now {_text(current)}")
            hint.setEnabled(False)
            form.addRow(hint)

    def add_choice(self, value: Any, label: str = "", *, checked: bool) -> None:
        assert self.choices is not None
        item = QListWidgetItem(_text(value) + (f" — {label}" if label else ""))
        item.setFlags(item.flags() | Qt.ItemFlag.ItemIsUserCheckable)
        item.setCheckState(Qt.CheckState.Checked if checked else Qt.CheckState.Unchecked)
        item.setData(Qt.ItemDataRole.UserRole, len(self._values))
        self._values.append(value)
        self.choices.addItem(item)

    def set_blocks(self, blocks: list[str]) -> None:
        """model.freeze_up_to: the backbone's blocks, once listed (ticked ones stay ticked)."""
        assert self.choices is not None
        ticked = set(self.checked_choices())
        extra = [v for v in ticked if v not in blocks]
        self.choices.clear()
        self._values = []
        for value in list(blocks) + extra:
            self.add_choice(value, checked=value in ticked)

    def checked_choices(self) -> list[Any]:
        assert self.choices is not None
        out = []
        for i in range(self.choices.count()):
            item = self.choices.item(i)
            if item.checkState() == Qt.CheckState.Checked:
                out.append(self._values[int(item.data(Qt.ItemDataRole.UserRole))])
        return out

    def spec(self) -> dict[str, Any]:
        """This field's entry of the space file; ValueError names a box that does not hold a number."""
        if self.kind == "choice":
            return {"type": "categorical", "choices": self.checked_choices()}
        if isinstance(self.low, QSpinBox) and isinstance(self.high, QSpinBox) and isinstance(self.step, QSpinBox):
            return {"type": "int", "low": self.low.value(), "high": self.high.value(), "step": self.step.value()}
        assert isinstance(self.low, QLineEdit) and isinstance(self.high, QLineEdit) and isinstance(self.step, QLineEdit)
        out: dict[str, Any] = {"type": "float"}
        for name, edit in (("low", self.low), ("high", self.high), ("step", self.step)):
            if name == "step" and not edit.text().strip():
                continue
            try:
                out[name] = parse_float(edit.text())
            except ValueError:
                raise ValueError(f"{self.path}: {name} = {edit.text()!r} is not a number") from None
        if self.log is not None and self.log.isChecked():
            out["log"] = True
        return out

    def fill(self, param: Param) -> None:
        """Show a loaded space's entry for this field."""
        if self.kind == "choice":
            assert self.choices is not None
            known = list(self._values)
            for i in range(self.choices.count()):
                item = self.choices.item(i)
                value = self._values[int(item.data(Qt.ItemDataRole.UserRole))]
                item.setCheckState(Qt.CheckState.Checked if value in param.choices else Qt.CheckState.Unchecked)
            for value in param.choices:
                if value not in known:
                    self.add_choice(value, checked=True)
            return
        if isinstance(self.low, QSpinBox) and isinstance(self.high, QSpinBox) and isinstance(self.step, QSpinBox):
            self.low.setValue(int(param.low or 0))
            self.high.setValue(int(param.high or 0))
            self.step.setValue(int(param.step or 1))
            return
        assert isinstance(self.low, QLineEdit) and isinstance(self.high, QLineEdit) and isinstance(self.step, QLineEdit)
        self.low.setText(format_float(param.low))
        self.high.setText(format_float(param.high))
        self.step.setText(format_float(param.step) if param.step is not None else "")
        if self.log is not None:
            self.log.setChecked(param.log)


class SweepRelay(QObject):
    """Carries the sweep's news from the worker thread to the dialog (queued onto the GUI thread): plain dicts."""

    news = Signal(object)


def _list_blocks(model_cfg: Any, data_cfg: Any) -> list[str]:
    """The backbone's top-level and second-level modules, as the Layers panel's *Freeze up to* offers them."""
    from widgets.layers_panel import build_project_layers

    rows = build_project_layers(model_cfg, data_cfg, 2)["rows"]
    return [row["name"] for row in rows if 1 <= row["depth"] <= 2]


def _run_sweep(sweep: Any, *, progress: Callable[[Any], None], cancel: threading.Event) -> dict[str, Any]:
    """On the worker thread: the sweep to its end; closing the window (cancel) stops it like Stop does."""
    from engine.sweep import summary

    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.25):
            if cancel.is_set():
                sweep.stop()
                return

    watcher = threading.Thread(target=watch, name="sweep-cancel", daemon=True)
    watcher.start()
    try:
        outcomes = sweep.run()
        return {"outcomes": outcomes, "summary": summary(sweep.study)}
    finally:
        done.set()
        watcher.join()


class SweepDialog(QDialog):
    """Builds a space from the project's field declarations and runs it as an Optuna study off the GUI thread."""

    logged = Signal(str)
    running_changed = Signal(bool)

    def __init__(
        self,
        state: ProjectState,
        parent: QWidget | None = None,
        *,
        blocks: list[str] | None = None,
        busy: Callable[[], str | None] | None = None,
    ):
        """blocks: the backbone's blocks if already known (the Layers panel's list), else listed here in the
        background; busy: why a sweep cannot start now (a training run in the window), or None."""
        super().__init__(parent)
        self.setObjectName("sweep.dialog")
        self.setWindowTitle("Sweep")
        self.state = state
        self.busy = busy or (lambda: None)
        self.blocks: list[str] = list(blocks or [])
        self.editors: dict[str, ParamEditor] = {}
        self.task: Task | None = None
        self.blocks_task: Task | None = None
        self.sweep: Any = None
        self.spec: SweepSpec | None = None
        self.outcomes: list[TrialOutcome] = []
        self.sweep_result: dict[str, Any] | None = None
        self.relay = SweepRelay(self)
        self.relay.news.connect(self._on_event)
        self._fields = {path: (kind, info) for path, kind, info in searchable_fields()}
        self._unused: dict[str, Applies] = {}  # fields this project does not use now -> the rule that says so
        self._updating = False
        self._shown = False  # the project's fields were shown once (later changes may need the blocks again)

        # -- the space
        self.filter = QLineEdit()
        self.filter.setObjectName("sweep.filter")
        self.filter.setPlaceholderText("Filter fields…")
        self.filter.setClearButtonEnabled(True)
        self.filter.textChanged.connect(self._on_filter)
        self.field_tree = QTreeWidget()
        self.field_tree.setObjectName("sweep.fields")
        self.field_tree.setHeaderLabels(["Field", "Now"])
        self.field_tree.setSelectionMode(QAbstractItemView.SelectionMode.NoSelection)
        self._items: dict[str, QTreeWidgetItem] = {}
        sections: dict[str, QTreeWidgetItem] = {}
        for path in self._fields:
            section = path.split(".")[0] if "." in path else "project"
            parent_item = sections.get(section)
            if parent_item is None:
                parent_item = QTreeWidgetItem(self.field_tree, [section])
                parent_item.setFlags(Qt.ItemFlag.ItemIsEnabled)
                sections[section] = parent_item
            item = QTreeWidgetItem(parent_item, [path.split(".", 1)[-1], _text(self.state.get(path))])
            item.setFlags(Qt.ItemFlag.ItemIsEnabled | Qt.ItemFlag.ItemIsUserCheckable)
            item.setCheckState(0, Qt.CheckState.Unchecked)
            item.setData(0, Qt.ItemDataRole.UserRole, path)
            self._items[path] = item
        self._sections = list(sections.values())
        self.field_tree.expandAll()
        self.field_tree.header().setSectionResizeMode(0, QHeaderView.ResizeMode.ResizeToContents)
        self.field_tree.itemChanged.connect(self._on_field_ticked)

        self.params_box = QWidget()
        self.params_box.setObjectName("sweep.params")
        self.params_layout = QVBoxLayout(self.params_box)
        self.params_layout.setContentsMargins(0, 0, 0, 0)
        self.params_hint = QLabel("Tick the fields to search in the list on the left.")
        self.params_hint.setWordWrap(True)
        self.params_layout.addWidget(self.params_hint)
        self.params_layout.addStretch(1)
        params_scroll = QScrollArea()
        params_scroll.setWidgetResizable(True)
        params_scroll.setWidget(self.params_box)

        self.trials_count = SpinBox()
        self.trials_count.setObjectName("sweep.trials_count")
        self.trials_count.setRange(1, 100_000)
        self.trials_count.setValue(12)
        self.sampler = ComboBox()
        self.sampler.setObjectName("sweep.sampler")
        self.sampler.addItems(list(SAMPLERS))
        self.pruner = ComboBox()
        self.pruner.setObjectName("sweep.pruner")
        self.pruner.addItems(list(PRUNERS))
        self.objective = ComboBox()
        self.objective.setObjectName("sweep.objective")
        self.objective.addItems(list(OBJECTIVES))
        self.study = QLineEdit()
        self.study.setObjectName("sweep.study")
        self.storage = QLabel()
        self.storage.setObjectName("sweep.storage")
        self.storage.setWordWrap(True)
        self.storage.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        for widget in (self.trials_count, self.sampler, self.pruner, self.objective, self.study):
            widget.setToolTip(OBJECT_NAMES[widget.objectName()])
        self.load_button = QPushButton("Load space...")
        self.load_button.setObjectName("sweep.load")
        self.load_button.clicked.connect(self._on_load_clicked)
        self.save_button = QPushButton("Save space...")
        self.save_button.setObjectName("sweep.save")
        self.save_button.clicked.connect(self._on_save_clicked)
        self.run_button = QPushButton("Run")
        self.run_button.setObjectName("sweep.run")
        self.run_button.clicked.connect(self._on_run_clicked)
        self.progress = QLabel("")
        self.progress.setObjectName("sweep.progress")

        settings = QFormLayout()
        settings.addRow("Trials:", self.trials_count)
        settings.addRow("Sampler:", self.sampler)
        settings.addRow("Pruner:", self.pruner)
        settings.addRow("Objective:", self.objective)
        settings.addRow("Study:", self.study)
        settings.addRow("Storage:", self.storage)
        space_buttons = QHBoxLayout()
        space_buttons.addWidget(self.load_button)
        space_buttons.addWidget(self.save_button)
        settings.addRow(space_buttons)
        run_row = QHBoxLayout()
        run_row.addWidget(self.run_button)
        run_row.addWidget(self.progress, 1)
        settings.addRow(run_row)
        settings_box = QWidget()
        settings_box.setLayout(settings)

        left = QWidget()
        left_layout = QVBoxLayout(left)
        left_layout.setContentsMargins(0, 0, 0, 0)
        left_layout.addWidget(self.filter)
        left_layout.addWidget(self.field_tree, 1)
        top = QSplitter(Qt.Orientation.Horizontal)
        top.addWidget(left)
        top.addWidget(params_scroll)
        top.addWidget(settings_box)
        top.setStretchFactor(0, 2)
        top.setStretchFactor(1, 3)
        top.setStretchFactor(2, 2)
        top.setSizes([300, 450, 330])

        # -- the trials
        self.table = QTableWidget(0, 0)
        self.table.setObjectName("sweep.trials")
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.verticalHeader().setVisible(False)
        self.table.horizontalHeader().setStretchLastSection(True)
        self.plot = pg.GraphicsLayoutWidget()
        self.plot.setObjectName("sweep.plot")
        self.plot.setBackground("w")
        self.plot.setMinimumHeight(200)
        self.plots: dict[str, Any] = {}
        self.scatters: dict[str, Any] = {}
        bottom = QSplitter(Qt.Orientation.Horizontal)
        bottom.addWidget(self.table)
        bottom.addWidget(self.plot)
        bottom.setSizes([560, 520])
        split = QSplitter(Qt.Orientation.Vertical)
        split.addWidget(top)
        split.addWidget(bottom)
        split.setSizes([360, 320])

        self.message = QLabel("")
        self.message.setObjectName("sweep.message")
        self.message.setWordWrap(True)
        self.message.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.use_button = QPushButton("Use best")
        self.use_button.setObjectName("sweep.use_best")
        self.use_button.setEnabled(False)
        self.use_button.setToolTip(OBJECT_NAMES["sweep.use_best"])
        self.use_button.clicked.connect(self.use_best)
        close = QPushButton("Close")
        close.setObjectName("sweep.close")
        close.clicked.connect(self.close)
        buttons = QHBoxLayout()
        buttons.addWidget(self.message, 1)
        buttons.addWidget(self.use_button)
        buttons.addWidget(close)
        layout = QVBoxLayout(self)
        layout.addWidget(split, 1)
        layout.addLayout(buttons)

        self.state.changed.connect(self._on_project_changed)
        self._on_project_changed("")
        self.resize(1180, 740)

    # -- the space -----------------------------------------------------------------------------
    def _on_project_changed(self, path: str) -> None:
        cfg = self.state.config
        if path in ("", "name") and not self.study.isModified():
            self.study.setText(f"{cfg.name}-sweep")
        if path in ("", "output.dir"):
            out = cfg.resolve(cfg.output.dir)
            self.storage.setText(str(out / STORAGE_FILE) if out is not None else "(output.dir is empty)")
        if path in ("", "model.backbone", "data.image_size") and self._shown:
            self.blocks = []  # another model: its blocks are listed again when freeze_up_to is searched
            if FREEZE_UP_TO in self.editors:
                self._list_blocks()
        self._shown = True
        for field_path, item in self._items.items():
            if path in ("", field_path):
                item.setText(1, _text(self.state.get(field_path)))
        self._update_applicable()

    def unused_rule(self, path: str) -> Applies | None:
        """The `applies` rule by which the project does not use this field now (the rule the Setup panels show and
        hide rows by), else None. A field whose rule depends on a searched field is used in some trials: offered."""
        rule = meta(self._fields[path][1]).applies
        if rule is None or rule.path in self.editors or rule_holds(self.state.config, rule):
            return None
        return rule

    def offered(self) -> list[str]:
        """The fields that can be ticked now (those the project uses)."""
        return [path for path in self._fields if path not in self._unused]

    def _update_applicable(self) -> None:
        """Hide or grey the fields the project does not use, as their `applies` rules say; a ticked one is unticked."""
        if self._updating:
            return  # unticking a field below calls this again
        self._updating = True
        try:
            dropped: dict[str, Applies] = {}
            while True:  # an unticked field may leave others unused (their rule's field is no longer searched)
                unused = {path: rule for path in self._fields if (rule := self.unused_rule(path)) is not None}
                now = [path for path in unused if path in self.editors]
                if not now:
                    break
                for path in now:
                    self.set_searched(path, False)
                    dropped[path] = unused[path]
        finally:
            self._updating = False
        if dropped:
            self._say(
                "No longer searched, as the project does not use them now: "
                + "; ".join(f"{path} ({unused_reason(rule)})" for path, rule in dropped.items())
            )
        self._unused = unused
        self.field_tree.blockSignals(True)
        for path, item in self._items.items():
            info = self._fields[path][1]
            rule = unused.get(path)
            if rule is None:
                item.setFlags(Qt.ItemFlag.ItemIsEnabled | Qt.ItemFlag.ItemIsUserCheckable)
                item.setToolTip(0, f"{path}: {meta(info).help or meta(info).doc}")
            else:
                item.setFlags(Qt.ItemFlag.NoItemFlags)  # greyed, and cannot be ticked
                item.setToolTip(0, f"{path}: not used by this project. {unused_reason(rule)}")
        self.field_tree.blockSignals(False)
        self._on_filter(self.filter.text())

    def _on_filter(self, text: str) -> None:
        """Fields matching the filter, less those the project does not use whose rule hides them (a section with
        none left is hidden too)."""
        needle = text.strip().lower()
        for path, item in self._items.items():
            rule = self._unused.get(path)
            item.setHidden((bool(needle) and needle not in path.lower()) or (rule is not None and rule.hide))
        for section in self._sections:
            fields_shown = [item for item in self._items.values() if item.parent() is section]
            section.setHidden(all(item.isHidden() for item in fields_shown))

    def _on_field_ticked(self, item: QTreeWidgetItem, column: int) -> None:
        path = item.data(0, Qt.ItemDataRole.UserRole)
        if not path or column != 0:
            return
        self.set_searched(path, item.checkState(0) == Qt.CheckState.Checked)

    def set_searched(self, path: str, on: bool) -> ParamEditor | None:
        """Search this field (an editor with its default range or choices) or stop searching it. A field the project
        does not use (see unused_rule) is not searched: None."""
        item = self._items[path]
        if on and path in self._unused:
            return None
        item.treeWidget().blockSignals(True)
        item.setCheckState(0, Qt.CheckState.Checked if on else Qt.CheckState.Unchecked)
        item.treeWidget().blockSignals(False)
        if not on:
            editor = self.editors.pop(path, None)
            if editor is not None:
                editor.deleteLater()
                self._update_applicable()  # fields that depend on this one may be unused again
            self.params_hint.setVisible(not self.editors)
            return None
        if path in self.editors:
            return self.editors[path]
        kind, info = self._fields[path]
        editor = ParamEditor(path, kind, info, self.state.get(path), self.blocks)
        self.editors[path] = editor
        order = list(self._fields)
        position = sum(1 for p in self.editors if order.index(p) < order.index(path))
        self.params_layout.insertWidget(position + 1, editor)  # after the hint
        self.params_hint.setVisible(False)
        if path == FREEZE_UP_TO and not self.blocks:
            self._list_blocks()
        if any((rule := meta(info).applies) is not None and rule.path == path for _kind, info in self._fields.values()):
            self._update_applicable()  # the fields that depend on this one are used in some trials now
        return editor

    def editor(self, path: str) -> ParamEditor:
        return self.editors[path]

    def _list_blocks(self) -> None:
        cfg = self.state.config
        if self.blocks_task is not None and self.blocks_task.is_running():
            return
        self._say(f"Listing the blocks of {cfg.model.backbone}…")
        self.blocks_task = run_task(
            "sweep blocks",
            _list_blocks,
            cfg.model.model_copy(deep=True),
            cfg.data.model_copy(deep=True),
            on_result=self._on_blocks,
            on_error=lambda exc, _tb: self._say(f"The backbone's blocks cannot be listed: {error_text(exc)}", True),
            parent=self,
        )

    def _on_blocks(self, blocks: list[str]) -> None:
        self.blocks = blocks
        editor = self.editors.get(FREEZE_UP_TO)
        if editor is not None:
            editor.set_blocks(blocks)
        self._say(f"{len(blocks)} blocks of {self.state.config.model.backbone} to choose from for {FREEZE_UP_TO}.")

    def space(self) -> dict[str, Any]:
        """The space file's content from the editors (ValueError names a box that does not hold a number)."""
        return {path: self.editors[path].spec() for path in self._fields if path in self.editors}  # declared order

    def checked_space(self) -> list[Param] | None:
        """The editors' space parsed and checked against the project, or None with the problems said by name."""
        try:
            data = self.space()
            if not data:
                raise SpaceError(["no field is ticked: tick at least one field to search, such as optimizer.lr"])
            params = parse_space(data)
            spec = self._spec(params)
            spec.check()
            if spec.sampler == "grid" and grid_problems(params):
                raise SpaceError(grid_problems(params))
        except ValueError as exc:
            self._say(f"invalid sweep space: {exc}", error=True)
            return None
        except ConfigError as exc:
            self._say(str(exc), error=True)
            return None
        return params

    def _spec(self, params: list[Param]) -> SweepSpec:
        return SweepSpec(
            self.state.snapshot(),
            params,
            trials=self.trials_count.value(),
            study=self.study.text().strip() or None,
            sampler=self.sampler.currentText(),
            pruner=self.pruner.currentText(),
            objective=self.objective.currentText(),
        )

    def save_space(self, path: str | Path) -> bool:
        """Write the space file (only a space parse_space accepts)."""
        try:
            data = self.space()
            parse_space(data)
        except (ValueError, ConfigError) as exc:
            self._say(str(exc) if isinstance(exc, ConfigError) else f"invalid sweep space: {exc}", error=True)
            return False
        try:
            Path(path).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        except OSError as exc:
            self._say(f"{path}: cannot be written: {exc.strerror or exc}", error=True)
            return False
        self._say(f"Saved the space ({len(data)} fields) to {path}.")
        return True

    def load_space_file(self, path: str | Path) -> bool:
        """Fill the dialog from a space file; a file with problems is refused by name and the dialog is left as it was."""
        try:
            params = load_space(path)
        except ConfigError as exc:
            self._say(str(exc), error=True)
            return False
        outside = [p.path for p in params if p.path not in self._fields]
        if outside:
            self._say(f"{path}: {', '.join(outside)}: not offered for a sweep here", error=True)
            return False
        searched = {p.path for p in params}
        unused = [
            f"{p.path} is not used by this project ({unused_reason(rule)})"
            for p in params
            if (rule := meta(self._fields[p.path][1]).applies) is not None
            and rule.path not in searched
            and not rule_holds(self.state.config, rule)
        ]
        if unused:
            self._say(f"{path}: " + "; ".join(unused), error=True)
            return False
        mismatched = [
            f"{p.path}: a {p.kind} range for a {self._fields[p.path][0]} field"
            for p in params
            if (p.kind == "categorical") != (self._fields[p.path][0] == "choice")
        ]
        if mismatched:
            self._say(f"{path}: " + "; ".join(mismatched), error=True)
            return False
        for existing in list(self.editors):
            self.set_searched(existing, False)
        pending = list(params)
        while pending:  # a field that depends on another of the file's is offered once that one is ticked
            ticked = [(param, self.set_searched(param.path, True)) for param in pending]
            for param, editor in ticked:
                if editor is not None:
                    editor.fill(param)
            pending = [param for param, editor in ticked if editor is None]
            assert len(pending) < len(ticked), "every field was checked to be used above"
        self._say(f"Loaded {len(params)} fields from {path}.")
        return True

    def _on_save_clicked(self) -> None:
        start = str(Path(self.state.file).parent / "space.json") if self.state.file else "space.json"
        path, _ = QFileDialog.getSaveFileName(self, "Save sweep space", start, "Space files (*.json)")
        if path:
            self.save_space(path if path.lower().endswith(".json") else path + ".json")

    def _on_load_clicked(self) -> None:
        start = str(Path(self.state.file).parent) if self.state.file else ""
        path, _ = QFileDialog.getOpenFileName(self, "Load sweep space", start, "Space files (*.json)")
        if path:
            self.load_space_file(path)

    # -- running -------------------------------------------------------------------------------
    def is_running(self) -> bool:
        return self.task is not None and self.task.is_running()

    def start(self) -> bool:
        """Check everything and run the sweep on a worker thread; False (and the reason said) when refused."""
        if self.is_running():
            return False
        reason = self.busy()
        if reason:
            self._say(reason, error=True)
            return False
        if not self.state.file:
            self._say("Save the project first: the trials' run folders and the study go in its output folder.", True)
            return False
        problems = self.state.problems(check_paths=True)
        if problems:
            self._say("The project cannot train yet: " + "; ".join(map(str, problems)), error=True)
            return False
        params = self.checked_space()
        if params is None:
            return False
        from engine.sweep import Sweep

        self.spec = spec = self._spec(params)
        self.outcomes = []
        self.sweep_result = None
        self._reset_results(params)
        relay = self.relay

        def outputs(number: int) -> list[Callable[[Event], None]]:
            return [lambda event: relay.news.emit(_plain(number, event))]

        self.sweep = Sweep(
            spec,
            log=lambda message: relay.news.emit({"kind": "log", "message": message}),
            outputs=outputs,
            on_trial=lambda outcome: relay.news.emit({"kind": "trial", "outcome": outcome}),
        )
        self.task = run_task(
            "sweep",
            _run_sweep,
            self.sweep,
            progress=True,
            on_result=self._on_result,
            on_error=self._on_error,
            parent=self,
        )
        self.task.finished.connect(self._on_finished)
        self._set_running(True)
        self._say(f"Sweeping {', '.join(p.path for p in params)}: {spec.trials} trials, study {spec.study_name}.")
        return True

    def stop(self) -> None:
        """End the sweep after the running trial stops (within a batch); the study runs it again when continued."""
        if self.sweep is not None and self.is_running():
            self.sweep.stop()
            self.run_button.setEnabled(False)
            self._say("Stopping after this batch…")

    def stop_and_wait(self, ms: int = 10 * 60 * 1000) -> bool:
        """Stop the sweep (as Stop does) and wait until it has ended; whether it did within ms."""
        if not self.is_running():
            return True
        self.stop()
        assert self.task is not None
        return self.task.wait(ms)

    def progress_text(self) -> str:
        """Where the running sweep is, in words: its study, its trials finished of those asked, the running trial."""
        if self.spec is None or not self.is_running():
            return "no sweep is running"
        done = len(self.outcomes)
        text = f"study {self.spec.study_name} ({self.spec.trials} trials asked), {done} finished in this sweep"
        now = self.progress.text()
        return f"{text}; {now[0].lower()}{now[1:]}" if now else text

    def _on_run_clicked(self) -> None:
        if self.is_running():
            self.stop()
        else:
            self.start()

    def _set_running(self, running: bool) -> None:
        self.run_button.setText("Stop" if running else "Run")
        self.run_button.setEnabled(True)
        for widget in (
            self.field_tree,
            self.params_box,
            self.trials_count,
            self.sampler,
            self.pruner,
            self.objective,
            self.study,
            self.load_button,
        ):
            widget.setEnabled(not running)
        if running:
            self.use_button.setEnabled(False)
        self.running_changed.emit(running)

    def _on_event(self, event: dict[str, Any]) -> None:
        kind = event["kind"]
        if kind == "log":
            self.logged.emit(event["message"])
        elif kind == "run_started":
            self.progress.setText(f"Trial {event['trial']}: starting in {Path(event['run_dir']).name}")
        elif kind == "batch":
            self.progress.setText(
                f"Trial {event['trial']}: epoch {event['epoch']} of {event['epochs']}, "
                f"batch {event['batch']} of {event['batches_per_epoch']}"
            )
        elif kind == "epoch":
            assert self.spec is not None
            value = event["metrics"].get(self.spec.objective)
            shown = f", {self.spec.objective} {value:.4f}" if isinstance(value, (int, float)) else ""
            self.progress.setText(f"Trial {event['trial']}: epoch {event['metrics'].get('epoch')} done{shown}")
        elif kind == "trial":
            self._add_outcome(event["outcome"])

    def _on_result(self, result: dict[str, Any]) -> None:
        self.sweep_result = result
        summary = result["summary"]
        counts = summary["trials"]
        best = summary["best"]
        head = (
            f"Study {summary['study']}: {counts['complete']} complete, {counts['pruned']} pruned, "
            f"{counts['fail']} failed."
        )
        if best is None:
            self._say(head + " No trial completed: nothing to use.")
        else:
            assert self.spec is not None
            shown = ", ".join(f"{k} = {_text(v)}" for k, v in best["params"].items())
            self._say(head + f" Best: trial {best['number']}, {self.spec.objective} {best['value']:.4f} ({shown}).")
        self.use_button.setEnabled(best is not None)

    def _on_error(self, exc: BaseException, tb: str) -> None:
        self.logged.emit(tb)
        self._say(f"The sweep stopped with an error: {error_text(exc)}", error=True)

    def _on_finished(self) -> None:
        self.progress.setText("")
        self._set_running(False)

    # -- the trials ----------------------------------------------------------------------------
    def _reset_results(self, params: list[Param]) -> None:
        assert self.spec is not None
        columns = ["Trial", *[p.path for p in params], "State", self.spec.objective, "Epochs", "Run folder"]
        self.table.setRowCount(0)
        self.table.setColumnCount(len(columns))
        self.table.setHorizontalHeaderLabels(columns)
        self.plot.clear()
        self.plots, self.scatters = {}, {}
        per_row = 2 if len(params) > 1 else 1
        key = " ".join(f"<span style='color:{colour}'>●</span> {state}" for state, colour in STATE_COLOURS.items())
        self.plot.addLabel(f"<span style='color:#333'>{key}; a pruned trial at its best epoch</span>", 0, 0, 1, per_row)
        for i, param in enumerate(params):
            plot = self.plot.addPlot(row=1 + i // per_row, col=i % per_row)
            plot.setLabel("bottom", param.path)
            plot.setLabel("left", self.spec.objective)
            plot.showGrid(x=True, y=True, alpha=0.3)
            if param.kind != "categorical" and param.log:
                plot.setLogMode(x=True, y=False)
            if param.kind == "categorical":
                plot.getAxis("bottom").setTicks([[(j, _text(c)) for j, c in enumerate(param.choices)]])
                plot.setXRange(-0.5, len(param.choices) - 0.5, padding=0)
            elif param.log:  # the whole range searched, in decades (log mode plots log10 of the values)
                assert param.low is not None and param.high is not None
                plot.getAxis("bottom").enableAutoSIPrefix(False)  # 0.001, not 1 with "(x0.001)" beside the label
                plot.getAxis("bottom").setTicks([_log_ticks(param.low, param.high)])  # pyqtgraph's crowd under a decade
                plot.setXRange(math.log10(param.low), math.log10(param.high), padding=0.05)
            else:
                assert param.low is not None and param.high is not None
                plot.setXRange(param.low, param.high, padding=0.05)
            self.plots[param.path] = plot
            # A PlotDataItem of symbols, not a bare ScatterPlotItem: only the former follows the plot's log x mode.
            self.scatters[param.path] = plot.plot(pen=None, symbol="o", symbolSize=9, symbolPen=None)

    def _add_outcome(self, outcome: TrialOutcome) -> None:
        assert self.spec is not None
        self.outcomes.append(outcome)
        row = self.table.rowCount()
        self.table.insertRow(row)
        cells = [
            str(outcome.number),
            *[_text(outcome.params[p.path]) for p in self.spec.params],
            outcome.state,
            f"{outcome.value:.4f}" if outcome.value is not None else "",
            str(outcome.epochs),
            Path(outcome.run_dir).name if outcome.run_dir else (outcome.error or ""),
        ]
        for column, text in enumerate(cells):
            item = QTableWidgetItem(text)
            if column == len(cells) - 1:
                item.setToolTip(outcome.run_dir or outcome.error or "")  # the folder's full path, or what failed
            self.table.setItem(row, column, item)
        self.table.resizeColumnsToContents()
        self.table.scrollToBottom()
        self._draw()

    def _draw(self) -> None:
        assert self.spec is not None
        scored = [o for o in self.outcomes if o.value is not None]
        for param in self.spec.params:
            xs = []
            for o in scored:
                value = o.params[param.path]
                xs.append(param.choices.index(value) if param.kind == "categorical" else float(value))
            brushes = [pg.mkBrush(STATE_COLOURS.get(o.state, "#444")) for o in scored]
            self.scatters[param.path].setData(
                np.asarray(xs, dtype=float), np.asarray([o.value for o in scored], dtype=float), symbolBrush=brushes
            )

    def plotted(self, path: str) -> tuple[list[float], list[float]]:
        """The points of a parameter's plot as drawn: x is log10 of the value on a log axis, a choice's index."""
        x, y = self.scatters[path].getData()
        return list(map(float, x)), list(map(float, y))

    # -- the result ----------------------------------------------------------------------------
    def use_best(self) -> bool:
        """Copy the best trial's parameter values into the project (the fields show them; the project is changed)."""
        best = (self.sweep_result or {}).get("summary", {}).get("best")
        if not best:
            return False
        values = dict(best["params"])
        first, *rest = values
        refused = self.state.try_set(first, values[first], also={k: values[k] for k in rest})
        if refused:
            self._say(f"The best trial's values were refused: {refused}", error=True)
            return False
        shown = ", ".join(f"{k} = {_text(v)}" for k, v in values.items())
        self._say(f"The project now has trial {best['number']}'s values: {shown}.")
        return True

    def _say(self, text: str, error: bool = False) -> None:
        self.message.setText(text)
        self.message.setStyleSheet(ERROR_STYLE if error else "")

    def closeEvent(self, event) -> None:  # noqa: N802 - Qt's name
        self.stop_and_wait()  # the trial ends within a batch
        super().closeEvent(event)


def _log_ticks(low: float, high: float) -> list[tuple[float, str]]:
    """Ticks of a log axis from low to high at 1 and 3 times each power of ten (positions are log10)."""
    ticks = []
    for power in range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1):
        for mantissa in (1, 3):
            value = mantissa * 10.0**power
            if low * 0.999 <= value <= high * 1.001:
                ticks.append((math.log10(value), f"{value:g}"))
    return ticks


def _plain(number: int, event: Event) -> dict[str, Any]:
    """A run event of trial `number` as the dialog shows it (on the worker thread)."""
    if isinstance(event, BatchProgress):
        return {
            "kind": "batch",
            "trial": number,
            "epoch": event.epoch,
            "epochs": event.epochs,
            "batch": event.batch,
            "batches_per_epoch": event.batches_per_epoch,
            "global_step": event.global_step,
            "steps": list(event.steps),
        }
    if isinstance(event, RunStarted):
        return {"kind": "run_started", "trial": number, "run_dir": event.run_dir}
    if isinstance(event, EpochFinished):
        return {"kind": "epoch", "trial": number, "metrics": dict(event.metrics)}
    return {"kind": "other", "trial": number}
