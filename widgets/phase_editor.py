"""The phases of a run (train.phases) as a short editable table in the Training panel, bound to the project."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import ValidationError
from PySide6.QtCore import QSignalBlocker, Qt
from PySide6.QtWidgets import (
    QAbstractItemView,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from engine.config import SCHEDULES, PhaseConfig
from widgets.fields import ComboBox, format_float, parse_float
from widgets.look import ERROR_STYLE
from widgets.state import ProjectState

# (key, header, tooltip)
COLUMNS = [
    ("name", "Name", "A label for the log and the plots, such as head or fine-tune."),
    ("epochs", "Epochs", "Epochs of this phase."),
    ("freeze", "Frozen", "What is frozen in this phase; 'as the project' keeps the Layers panel's choice."),
    ("freeze_up_to", "Up to", "With 'up to a module': this module and every one before it are frozen."),
    (
        "lr",
        "Learning rate",
        "The head's learning rate in this phase, such as 0.01; ×0.1 takes the previous phase's times 0.1; empty "
        "uses the optimizer's.",
    ),
    ("schedule", "Schedule", "The learning-rate schedule over this phase's epochs."),
    ("augment", "Augment", "Whether this phase trains on augmented images (off: plain images, so cached features)."),
    (
        "layer_lr_decay",
        "Layer decay",
        "Layer-wise learning-rate decay in this phase (such as 0.7); empty uses the optimizer's.",
    ),
]
COLUMN = {key: i for i, (key, _, _) in enumerate(COLUMNS)}
FREEZE_CHOICES = [
    ("as the project", None),
    ("nothing", "none"),
    ("all but the head", "head_only"),
    ("up to a module", "up_to"),
]
SCHEDULE_CHOICES: list[tuple[str, Any]] = [("as the project", None)] + [(name, name) for name in SCHEDULES]
AUGMENT_CHOICES = [("as the project", None), ("on", True), ("off", False)]
COMBOS: dict[str, list[tuple[str, Any]]] = {
    "freeze": FREEZE_CHOICES,
    "schedule": SCHEDULE_CHOICES,
    "augment": AUGMENT_CHOICES,
}

OBJECT_NAMES = {
    "training.phases": "the phases of the run (train.phases): one row per phase, each cell a setting of it",
    "training.phases_add": "button: add a phase at the end (a copy of the last one, or a first phase)",
    "training.phases_remove": "button: remove the selected phase (the last one when none is selected)",
    "training.phases_fine_tune": "button: the Fine-tune preset (head on cached features, then the top blocks)",
}


def parse_lr(text: str) -> tuple[float | None, float | None]:
    """A phase's learning-rate cell: '0.01' (a rate), '×0.1' or 'x0.1' (a factor of the previous phase's), '' (none)."""
    cleaned = text.strip()
    if not cleaned:
        return None, None
    if cleaned[0] in "×xX*":
        return None, parse_float(cleaned[1:])
    return parse_float(cleaned), None


def format_lr(phase: PhaseConfig) -> str:
    if phase.lr is not None:
        return format_float(phase.lr)
    if phase.lr_factor is not None:
        return f"×{format_float(phase.lr_factor)}"
    return ""


class PhaseEditor(QWidget):
    """train.phases as a table: a row per phase; every edit writes the whole list through ProjectState.try_set, a
    refused list is shown under the table with its reason, and the table redraws from the project when it changes.

    preset: what the Fine-tune button sets (a dict of field paths and values), computed from the project.
    """

    def __init__(
        self,
        state: ProjectState,
        preset: Callable[[], dict[str, Any]] | None = None,
        parent: QWidget | None = None,
    ):
        super().__init__(parent)
        self.state = state
        self._preset = preset
        self._loading = False  # the table is being filled from the project: its widgets' signals are not edits
        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setObjectName("training.phases")
        self.table.setToolTip(
            "Train in phases (gradual unfreezing): each phase sets what is frozen, its learning rate, schedule and "
            "augmentation; no rows trains the project as one phase."
        )
        self.table.setHorizontalHeaderLabels([header for _, header, _ in COLUMNS])
        for i, (_, _, tip) in enumerate(COLUMNS):
            item = self.table.horizontalHeaderItem(i)
            if item is not None:
                item.setToolTip(tip)
        self.table.verticalHeader().setVisible(False)
        self.table.setVerticalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)  # as tall as its rows
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.itemChanged.connect(self._on_item_changed)

        self.add_button = QPushButton("Add phase")
        self.add_button.setObjectName("training.phases_add")
        self.remove_button = QPushButton("Remove phase")
        self.remove_button.setObjectName("training.phases_remove")
        self.add_button.setToolTip("Add a phase at the end: a copy of the last one, or a first phase.")
        self.remove_button.setToolTip("Remove the selected phase (the last one when none is selected).")
        self.preset_button = QPushButton("Fine-tune preset")
        self.preset_button.setObjectName("training.phases_fine_tune")
        self.preset_button.setToolTip(
            "Phase 1 trains the head alone on cached features (no augmentation, many cheap epochs, the optimizer's "
            "learning rate: find it first); phase 2 unfreezes the top blocks with augmentation, layer-wise rates "
            "and a one-cycle schedule."
        )
        self.preset_button.setEnabled(preset is not None)
        self.add_button.clicked.connect(self._on_add_clicked)
        self.remove_button.clicked.connect(self._on_remove_clicked)
        self.preset_button.clicked.connect(self._on_preset_clicked)
        self.message = QLabel()
        self.message.setObjectName("training.phases.message")
        self.message.setWordWrap(True)
        self.message.setStyleSheet(ERROR_STYLE)
        self.message.hide()

        buttons = QHBoxLayout()
        buttons.setContentsMargins(0, 0, 0, 0)
        for button in (self.add_button, self.remove_button, self.preset_button):
            buttons.addWidget(button)
        buttons.addStretch(1)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.table)
        layout.addLayout(buttons)
        layout.addWidget(self.message)
        state.changed.connect(self._on_project_changed)
        self._load()

    # -- reading the project into the table ----------------------------------------------------
    def _on_project_changed(self, path: str) -> None:
        if path in ("", "train.phases"):
            self._load()

    def _load(self) -> None:
        self._loading = True
        try:
            self._fill()
        finally:
            self._loading = False

    def _fill(self) -> None:
        phases = list(self.state.config.train.phases)
        # The table's own signals are blocked; its combo boxes, made or set row by row, still signal: _commit
        # ignores them while loading (else a half-filled table was written back, and the project opened changed).
        blocker = QSignalBlocker(self.table)
        self.table.setRowCount(len(phases))
        for row, phase in enumerate(phases):
            texts = {
                "name": phase.name,
                "epochs": str(phase.epochs),
                "freeze_up_to": phase.freeze_up_to or "",
                "lr": format_lr(phase),
                "layer_lr_decay": format_float(phase.layer_lr_decay),
            }
            for key, text in texts.items():
                self.table.setItem(row, COLUMN[key], QTableWidgetItem(text))
            for key, options in COMBOS.items():
                self._combo(row, key, options).setCurrentIndex(
                    next(i for i, (_, value) in enumerate(options) if value == getattr(phase, key))
                )
        del blocker
        self._fit_height()
        self.remove_button.setEnabled(bool(phases))
        self.message.hide()

    def _combo(self, row: int, key: str, options: list[tuple[str, Any]]) -> ComboBox:
        combo = self.table.cellWidget(row, COLUMN[key])
        if not isinstance(combo, ComboBox):
            combo = ComboBox()
            combo.setObjectName(f"training.phases.{row}.{key}")
            for text, value in options:
                combo.addItem(text, value)
            combo.currentIndexChanged.connect(self._commit)
            self.table.setCellWidget(row, COLUMN[key], combo)
        return combo

    def _fit_height(self) -> None:
        """As tall as its rows (a short list) and a horizontal scroll bar, so no rows hide behind a vertical one."""
        self.table.resizeRowsToContents()
        header = self.table.horizontalHeader().sizeHint().height()
        rows = sum(self.table.rowHeight(r) for r in range(self.table.rowCount()))
        bar = self.table.horizontalScrollBar().sizeHint().height()
        frame = 2 * self.table.frameWidth()
        self.table.setFixedHeight(header + max(rows, self.table.verticalHeader().defaultSectionSize()) + bar + frame)

    # -- writing the table into the project ------------------------------------------------------
    def phases(self) -> list[PhaseConfig]:
        """The phases as the table shows them; raises ValueError naming the phase and the cell that does not read."""
        out = []
        for row in range(self.table.rowCount()):

            def text(key: str, row: int = row) -> str:
                item = self.table.item(row, COLUMN[key])
                return item.text().strip() if item is not None else ""

            where = f"phase {row + 1}"
            values: dict[str, Any] = {"name": text("name")}
            try:
                values["epochs"] = int(text("epochs") or "1")
            except ValueError:
                raise ValueError(f"{where}, Epochs: {text('epochs')!r} is not a whole number") from None
            try:
                values["lr"], values["lr_factor"] = parse_lr(text("lr"))
            except ValueError as exc:
                raise ValueError(f"{where}, Learning rate: {exc} (such as 0.01, or ×0.1 for a factor)") from None
            try:
                decay = text("layer_lr_decay")
                values["layer_lr_decay"] = parse_float(decay) if decay else None
            except ValueError as exc:
                raise ValueError(f"{where}, Layer decay: {exc}") from None
            values["freeze_up_to"] = text("freeze_up_to") or None
            for key, options in COMBOS.items():
                values[key] = self._combo(row, key, options).currentData()
            try:
                out.append(PhaseConfig(**values))
            except ValidationError as exc:
                first = exc.errors()[0]
                raise ValueError(f"{where}, {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
        return out

    def _commit(self, *_args: Any) -> None:
        if self._loading:
            return
        try:
            phases = self.phases()
        except ValueError as exc:
            self._refuse(str(exc))
            return
        reason = self.state.try_set("train.phases", phases)
        if reason:
            self._refuse(reason)
        else:
            self.message.hide()

    def _refuse(self, reason: str) -> None:
        self.message.setText(reason)
        self.message.show()

    def _on_item_changed(self, _item: QTableWidgetItem) -> None:
        self._commit()

    def _on_add_clicked(self) -> None:
        phases = list(self.state.config.train.phases)
        new = phases[-1].model_copy() if phases else PhaseConfig(epochs=1)
        reason = self.state.try_set("train.phases", [*phases, new])
        if reason:
            self._refuse(reason)

    def _on_remove_clicked(self) -> None:
        phases = list(self.state.config.train.phases)
        if not phases:
            return
        rows = self.table.selectionModel().selectedRows()
        index = rows[0].row() if rows else len(phases) - 1
        reason = self.state.try_set("train.phases", phases[:index] + phases[index + 1 :])
        if reason:
            self._refuse(reason)

    def _on_preset_clicked(self) -> None:
        if self._preset is None:
            return
        try:
            values = self._preset()
        except ValueError as exc:
            self._refuse(str(exc))
            return
        first, *rest = values.items()
        reason = self.state.try_set(first[0], first[1], also=dict(rest))
        if reason:
            self._refuse(reason)
