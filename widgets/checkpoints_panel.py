"""The checkpoints of one run folder as a table with their metrics, to use as the model, resume from, or open."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PySide6.QtCore import Qt, Signal, Slot
from PySide6.QtGui import QFont
from PySide6.QtWidgets import (
    QAbstractItemView,
    QFileDialog,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from engine.run_files import METRICS_FILE, is_run_dir, planned_epochs, read_metrics
from widgets.folders import chosen_path, folder_dialog, remember_folder, remembered_folder, start_folder
from widgets.look import ERROR_COLOUR

OBJECT_NAMES = {
    "checkpoints.table": "the run's checkpoint files with epoch, losses, validation accuracy and best/last/final",
    "checkpoints.use": "makes the selected checkpoint the current model (evaluation, Try it, export, new training)",
    "checkpoints.resume": "continues the run from the selected checkpoint up to the chosen total of epochs",
    "checkpoints.resume_epochs": "the run's new total of epochs when resuming from the selected checkpoint",
    "checkpoints.open_run": "opens a run folder and lists its checkpoints and curves",
    "checkpoints.run_label": "which run folder is listed",
    "checkpoints.message": "why a folder could not be opened, or that the run has no checkpoints yet",
}

EPOCH_FILE = re.compile(r"^epoch-(\d+)\.pt$")
ALIASES = ("best", "last", "final")
# The role (best/last/final) early, so a narrow dock still shows which file is best.
COLUMNS = ("File", "Epoch", "Role", "Train loss", "Val loss", "Val accuracy")
MAX_EPOCHS = 100000
SETTINGS_KEY = "checkpoints/last_open_dir"


@dataclass
class CheckpointEntry:
    """One checkpoint file on disk and what the run folder says about it (no checkpoint is ever read)."""

    path: Path
    epoch: int | None
    metrics: dict[str, Any] | None
    roles: list[str] = field(default_factory=list)  # "best", "last", "final": names that are this same file


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def list_checkpoints(run_dir: str | os.PathLike, rows: list[dict[str, Any]] | None = None) -> list[CheckpointEntry]:
    """The run's checkpoints, one entry per file on disk, sorted by epoch.

    best.pt / last.pt / final.pt are hard links to an epoch file: they become roles of that file's entry
    (found by inode with os.path.samefile). One that is its own file (epoch files turned off, the linked
    epoch pruned, or a filesystem without hard links) gets an entry of its own, its epoch taken from the
    metrics rows: the last row flagged best for best.pt, the last row for last.pt.
    """
    folder = Path(run_dir) / "checkpoints"
    if rows is None:
        rows = read_metrics(run_dir)
    by_epoch: dict[int, dict[str, Any]] = {}
    for row in rows:
        if isinstance(row.get("epoch"), int):
            by_epoch[row["epoch"]] = row  # a resumed run rewrote earlier lines; the newest one is the truth
    if not folder.is_dir():
        return []
    entries: list[CheckpointEntry] = []
    aliases: dict[str, Path] = {}
    others: list[Path] = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.suffix != ".pt" or not path.is_file():
            continue  # temporary files of a save in progress, and anything else that is not a checkpoint
        match = EPOCH_FILE.match(path.name)
        if match:
            epoch = int(match.group(1))
            entries.append(CheckpointEntry(path, epoch, by_epoch.get(epoch)))
        elif path.stem in ALIASES:
            aliases[path.stem] = path
        else:
            others.append(path)

    own: dict[str, CheckpointEntry] = {}
    for role in ALIASES:
        alias = aliases.get(role)
        if alias is None:
            continue
        target = next((e for e in entries if _same_file(alias, e.path)), None)
        if target is None:
            target = next((e for e in own.values() if _same_file(alias, e.path)), None)
        if target is not None:
            target.roles.append(role)
            continue
        alias_epoch = _alias_epoch(role, rows)
        entry = CheckpointEntry(
            alias, alias_epoch, by_epoch.get(alias_epoch) if alias_epoch is not None else None, [role]
        )
        own[role] = entry
    entries.extend(own.values())
    entries.extend(CheckpointEntry(p, None, None) for p in others)
    # Epoch order, then the alias files that stand alone, then files we know nothing about.
    entries.sort(key=lambda e: (e.epoch is None, e.epoch or 0, not EPOCH_FILE.match(e.path.name), e.path.name))
    return entries


def _alias_epoch(role: str, rows: list[dict[str, Any]]) -> int | None:
    epochs = [r for r in rows if isinstance(r.get("epoch"), int)]
    if role == "best":
        flagged = [r for r in epochs if r.get("best")]
        return flagged[-1]["epoch"] if flagged else None
    if role == "last" and epochs:
        return epochs[-1]["epoch"]
    return None  # final.pt on its own: it is best.pt or last.pt, which ever the run ended with


def _fmt(value: Any, percent: bool = False) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return "—"
    return f"{100 * value:.1f}%" if percent else f"{value:.4g}"


class CheckpointsPanel(QWidget):
    """Lists a run's checkpoints; emits what the user wants done with the selected one."""

    restore_requested = Signal(str)  # checkpoint path: make it the current model
    resume_requested = Signal(str, int)  # checkpoint path, the run's new total of epochs
    run_opened = Signal(str, list)  # run folder, its metrics.jsonl rows

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.run_dir: str | None = None
        self.runs_dir: str | None = None  # the project's output folder (set_runs_dir)
        self.entries: list[CheckpointEntry] = []
        self._rows: list[dict[str, Any]] = []
        self._planned: int | None = None
        self._training = False
        self._error = ""  # the last failure, shown until the next action succeeds
        self._spin_entry: str | None = None  # the checkpoint the epochs spin box was last set up for

        self.run_label = QLabel()
        self.run_label.setObjectName("checkpoints.run_label")
        self.run_label.setWordWrap(True)
        self.run_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)

        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setObjectName("checkpoints.table")
        self.table.setHorizontalHeaderLabels(COLUMNS)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.verticalHeader().setVisible(False)
        self.table.setAlternatingRowColors(True)
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        header.setStretchLastSection(True)
        self.table.itemSelectionChanged.connect(self._on_selection_changed)

        self.message_label = QLabel()
        self.message_label.setObjectName("checkpoints.message")
        self.message_label.setWordWrap(True)
        self.message_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.message_label.hide()

        self.use_button = QPushButton("Use these weights")
        self.use_button.setObjectName("checkpoints.use")
        self.use_button.setToolTip(
            "Make the selected checkpoint the current model for evaluation, Try it, "
            "export and as the starting weights of a new training"
        )
        self.use_button.clicked.connect(self._on_use_clicked)

        self.resume_button = QPushButton("Resume from here")
        self.resume_button.setObjectName("checkpoints.resume")
        self.resume_button.setToolTip("Continue this run from the selected checkpoint, in its folder")
        self.resume_button.clicked.connect(self._on_resume_clicked)
        self.epochs_spin = QSpinBox()
        self.epochs_spin.setObjectName("checkpoints.resume_epochs")
        self.epochs_spin.setRange(1, MAX_EPOCHS)
        self.epochs_spin.setPrefix("to ")
        self.epochs_spin.setSuffix(" epochs")
        self.epochs_spin.setToolTip("The run's new total of epochs; more than the checkpoint has trained")

        self.open_button = QPushButton("Open run folder...")
        self.open_button.setObjectName("checkpoints.open_run")
        self.open_button.setToolTip("List the checkpoints and show the curves of a run folder written earlier")
        self.open_button.clicked.connect(self._on_open_clicked)

        resume_row = QHBoxLayout()
        resume_row.addWidget(self.resume_button)
        resume_row.addWidget(self.epochs_spin)
        resume_row.addStretch(1)
        buttons = QHBoxLayout()
        buttons.addWidget(self.use_button)
        buttons.addStretch(1)
        buttons.addWidget(self.open_button)

        layout = QVBoxLayout(self)
        layout.addWidget(self.run_label)
        layout.addWidget(self.table, 1)
        layout.addWidget(self.message_label)
        layout.addLayout(buttons)
        layout.addLayout(resume_row)

        self.set_run_dir(None)

    # -- public API ------------------------------------------------------------------------------
    def set_run_dir(self, path: str | os.PathLike | None) -> None:
        """List the checkpoints of this run folder (None: no run)."""
        self.run_dir = str(Path(path).resolve()) if path else None
        self._planned = planned_epochs(self.run_dir) if self.run_dir else None
        self._error = ""
        self.refresh()

    def refresh(self) -> None:
        """Read the folder again (a new epoch was saved); the selected file stays selected if it still exists."""
        selected = self.current_checkpoint()
        if self.run_dir is None:
            self.entries, self._rows = [], []
            self.run_label.setText("No run: train the project, or open a run folder.")
        else:
            self._rows = read_metrics(self.run_dir)
            self.entries = list_checkpoints(self.run_dir, self._rows)
            planned = planned_epochs(self.run_dir)
            self._planned = planned or self._planned
            self.run_label.setText(f"Run: {Path(self.run_dir).name}")
            self.run_label.setToolTip(self.run_dir)
        self._fill_table(selected)
        self._update_message()

    def current_checkpoint(self) -> str | None:
        """The selected checkpoint's path, or None."""
        entry = self._selected_entry()
        return str(entry.path) if entry else None

    def select_checkpoint(self, path: str | os.PathLike) -> bool:
        """Select the row of this file (or of the file it is a link to); False if it is not listed."""
        for row, entry in enumerate(self.entries):
            if entry.path == Path(path) or _same_file(entry.path, Path(path)):
                self.table.selectRow(row)
                return True
        return False

    @Slot(bool)
    def on_running_changed(self, running: bool) -> None:
        """While a run trains, resuming (which starts another) is not offered (TrainingController.running_changed)."""
        self._training = bool(running)
        self._update_buttons()

    def set_runs_dir(self, path: str | os.PathLike | None) -> None:
        """The project's output folder: where its runs are, so Open run folder... starts there."""
        self.runs_dir = str(path) if path else None

    def run_dir_dialog(self) -> QFileDialog:
        """The Open run folder dialog, not yet shown: beside the run shown, else in the project's runs, else
        where a run folder was last opened (remembered across sessions)."""
        start = start_folder(
            Path(self.run_dir).parent if self.run_dir else None, self.runs_dir, remembered_folder(SETTINGS_KEY)
        )
        return folder_dialog(self, "Open run folder", start)

    def choose_run_dir(self) -> bool:
        """Ask for a run folder with a dialog, then open it (see open_run_dir)."""
        path = chosen_path(self.run_dir_dialog())
        if not path:
            return False
        return self.open_run_dir(path, remember=True)

    def open_run_dir(self, path: str | os.PathLike, *, remember: bool = False) -> bool:
        """Open a run folder: list its checkpoints and emit run_opened; a clear message when it is not one.

        remember: the user chose it, so the next Open run folder dialog of any session may start beside it."""
        folder = Path(path).expanduser()
        if folder.name == "checkpoints" and is_run_dir(folder.parent):
            folder = folder.parent  # the user picked the checkpoints folder inside the run
        if not folder.is_dir():
            self._set_error(f"Cannot open {folder}: it is not a folder.")
            return False
        if not is_run_dir(folder):
            self._set_error(
                f"Cannot open {folder}: it is not a run folder. A run folder holds {METRICS_FILE} "
                "and a checkpoints folder with .pt files; training creates one inside the "
                "project's output folder for each run."
            )
            return False
        if remember:
            remember_folder(SETTINGS_KEY, folder.resolve().parent)
        self.set_run_dir(folder)
        self.run_opened.emit(self.run_dir, list(self._rows))
        return True

    # -- table -----------------------------------------------------------------------------------
    def _fill_table(self, keep: str | None) -> None:
        self.table.blockSignals(True)  # one selection update at the end, not one per row
        try:
            self.table.clearSelection()
            self.table.setRowCount(len(self.entries))
            for row, entry in enumerate(self.entries):
                m = entry.metrics or {}
                cells = (
                    entry.path.name,
                    "—" if entry.epoch is None else str(entry.epoch),
                    self._role_text(entry),
                    _fmt(m.get("train_loss")),
                    _fmt(m.get("val_loss")),
                    _fmt(m.get("val_accuracy"), percent=True),
                )
                bold = "best" in entry.roles
                for col, text in enumerate(cells):
                    item = QTableWidgetItem(text)
                    if col in (1, 3, 4, 5):
                        item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
                    if bold:
                        font = QFont(item.font())
                        font.setBold(True)
                        item.setFont(font)
                    item.setToolTip(str(entry.path))
                    self.table.setItem(row, col, item)
            if keep is not None:
                for row, entry in enumerate(self.entries):
                    if str(entry.path) == keep:
                        self.table.selectRow(row)
                        break
        finally:
            self.table.blockSignals(False)
        self._on_selection_changed()

    @staticmethod
    def _role_text(entry: CheckpointEntry) -> str:
        roles = [r for r in ALIASES if r in entry.roles]
        if not roles:
            return ""
        text = ", ".join(roles)
        return f"★ {text}" if "best" in roles else text

    def _selected_entry(self) -> CheckpointEntry | None:
        rows = self.table.selectionModel().selectedRows()
        if not rows:
            return None
        row = rows[0].row()
        return self.entries[row] if 0 <= row < len(self.entries) else None

    # -- handlers --------------------------------------------------------------------------------
    @Slot()
    def _on_selection_changed(self) -> None:
        entry = self._selected_entry()
        if entry is not None:
            minimum = (entry.epoch or 0) + 1
            known = [r["epoch"] for r in self._rows if isinstance(r.get("epoch"), int)]
            total = self._planned or max(known, default=minimum)
            self.epochs_spin.setMinimum(minimum)  # raises the value too when it was below
            if self._spin_entry != str(entry.path):
                self.epochs_spin.setValue(max(total, minimum))  # a new selection starts at the run's total
                self._spin_entry = str(entry.path)
        self._update_buttons()

    def _update_buttons(self) -> None:
        entry = self._selected_entry()
        self.use_button.setEnabled(entry is not None)
        self.resume_button.setEnabled(entry is not None and not self._training)
        self.epochs_spin.setEnabled(entry is not None and not self._training)

    @Slot()
    def _on_use_clicked(self) -> None:
        path = self.current_checkpoint()
        if path and self._still_there(path):
            self._set_error("")
            self.restore_requested.emit(path)

    @Slot()
    def _on_resume_clicked(self) -> None:
        path = self.current_checkpoint()
        if path and self._still_there(path):
            self._set_error("")
            self.resume_requested.emit(path, self.epochs_spin.value())

    @Slot()
    def _on_open_clicked(self) -> None:
        self.choose_run_dir()

    def _still_there(self, path: str) -> bool:
        if Path(path).is_file():
            return True
        # Pruned by keep_last (or deleted) since the list was read.
        self._error = (
            f"Cannot use {Path(path).name}: the file no longer exists (older epoch files are "
            "removed as training goes, see checkpoint.keep_last)."
        )
        self.refresh()
        return False

    def _set_error(self, text: str) -> None:
        self._error = text
        self._update_message()

    def _update_message(self) -> None:
        if self._error:
            text, error = self._error, True
        elif self.run_dir is not None and not self.entries:
            text, error = "This run has no checkpoints yet: one is written after each epoch.", False
        else:
            text, error = "", False
        self.message_label.setText(text)
        self.message_label.setStyleSheet(f"color: {ERROR_COLOUR};" if error else "")
        self.message_label.setVisible(bool(text))
