"""The project's data corrections (data.exclude, data.relabel): listed with undo, added from the error-analysis views."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QColor
from PySide6.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QFileDialog,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QMessageBox,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from widgets.look import ERROR_COLOUR
from widgets.state import ProjectState

OBJECT_NAMES = {
    "corrections.table": "the project's corrections: excluded images and relabelled ones, with problems named",
    "corrections.undo": "undoes the last correction",
    "corrections.remove": "removes the selected corrections (the images are used as scanned again)",
    "corrections.save_copy": "writes the dataset with the corrections applied to a new folder or CSV file",
    "corrections.train": "trains the project again, with its corrections",
    "corrections.summary": "how many images are excluded and relabelled, and which corrections name nothing",
    "sample.relabel": "relabels the shown image as the chosen class (kept in the project, data.relabel)",
    "sample.relabel_class": "the class to relabel the shown image as",
    "sample.exclude": "excludes the shown image from training and validation (kept in the project, data.exclude)",
}


class CorrectionsPanel(QWidget):
    """Lists data.exclude and data.relabel of the project in `state`; every change can be undone."""

    train_requested = Signal()
    logged = Signal(str)

    def __init__(self, state: ProjectState, parent: QWidget | None = None):
        super().__init__(parent)
        self.state = state
        self._undo: list[tuple[list[str], dict[str, str]]] = []
        self.table = QTableWidget(0, 3)
        self.table.setObjectName("corrections.table")
        self.table.setHorizontalHeaderLabels(["Image", "Correction", "Problem"])
        self.table.verticalHeader().hide()
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setTextElideMode(Qt.TextElideMode.ElideMiddle)
        self.table.horizontalHeader().setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        self.table.horizontalHeader().setSectionResizeMode(1, QHeaderView.ResizeMode.ResizeToContents)
        self.table.horizontalHeader().setSectionResizeMode(2, QHeaderView.ResizeMode.ResizeToContents)
        self.summary = QLabel()
        self.summary.setObjectName("corrections.summary")
        self.summary.setWordWrap(True)
        self.undo_button = QPushButton("Undo")
        self.undo_button.setObjectName("corrections.undo")
        self.undo_button.clicked.connect(self.undo)
        self.remove_button = QPushButton("Remove selected")
        self.remove_button.setObjectName("corrections.remove")
        self.remove_button.clicked.connect(self._on_remove_clicked)
        self.save_button = QPushButton("Save corrected copy...")
        self.save_button.setObjectName("corrections.save_copy")
        self.save_button.clicked.connect(self._on_save_clicked)
        self.train_button = QPushButton("Train again")
        self.train_button.setObjectName("corrections.train")
        self.train_button.setToolTip("Start a new run of the project, with its corrections")
        self.train_button.clicked.connect(self.train_requested)
        buttons = QHBoxLayout()
        for b in (self.undo_button, self.remove_button, self.save_button, self.train_button):
            buttons.addWidget(b)
        buttons.addStretch(1)
        layout = QVBoxLayout(self)
        layout.addWidget(self.summary)
        layout.addWidget(self.table, 1)
        layout.addLayout(buttons)
        state.changed.connect(self._on_state_changed)
        state.file_changed.connect(lambda _f: self._undo.clear())
        self.refresh()

    # --- changes

    def exclude(self, path: str) -> str:
        """Exclude an image (a path of the project's dataset) from training and validation; returns its key."""
        from engine.corrections import sample_key_for, with_excluded

        key = sample_key_for(self.state.config, path)
        self._apply(with_excluded(self.state.config, [key]).data)
        self.logged.emit(f"Excluded {key} from training (data.exclude)")
        return key

    def relabel(self, path: str, class_name: str) -> str:
        """Give an image a corrected class; returns its key."""
        from engine.corrections import sample_key_for, with_relabel

        key = sample_key_for(self.state.config, path)
        self._apply(with_relabel(self.state.config, key, class_name).data)
        self.logged.emit(f"Relabelled {key} as {class_name} (data.relabel)")
        return key

    def why_not_correctable(self, path: str) -> str:
        """Why an image cannot be corrected in this project ("" when it can): not a file, or not of its dataset
        (an evaluation on another folder shows images the project never reads)."""
        from engine.corrections import sample_key_for

        if not Path(path).is_file():
            return "Not an image file: it cannot be corrected here."
        try:
            key = sample_key_for(self.state.config, path)
        except ValueError as exc:
            return f"No dataset to correct: {exc}"
        if key.startswith("../") and not self.state.get("data.val_path"):
            return "Not an image of the project's dataset (evaluated on other data): it cannot be corrected here."
        return ""

    def remove(self, keys: list[str]) -> None:
        from engine.corrections import without_excluded, without_relabel

        cfg = without_relabel(without_excluded(self.state.config, keys), keys)
        self._apply(cfg.data)

    def undo(self) -> bool:
        if not self._undo:
            return False
        exclude, relabel = self._undo.pop()
        self.state.update({"data.exclude": exclude, "data.relabel": relabel})
        self.refresh()
        return True

    def _apply(self, data: Any) -> None:
        before = (list(self.state.get("data.exclude")), dict(self.state.get("data.relabel")))
        if (list(data.exclude), dict(data.relabel)) == before:
            return
        self._undo.append(before)
        self.state.update({"data.exclude": list(data.exclude), "data.relabel": dict(data.relabel)})
        self.refresh()

    # --- showing

    def entries(self) -> list[tuple[str, str, str]]:
        """(key, correction, problem) per correction, as the table lists them."""
        exclude = list(self.state.get("data.exclude"))
        relabel = dict(self.state.get("data.relabel"))
        root, classes = self._dataset()
        rows = []
        for key in exclude:
            rows.append((key, "excluded", self._missing(root, key)))
        for key, name in relabel.items():
            problem = self._missing(root, key)
            if not problem and classes is not None and name not in classes:
                problem = f"no class {name!r} in the dataset"
            rows.append((key, f"relabelled as {name}", problem))
        return rows

    def problems(self) -> list[str]:
        return [f"{key}: {problem}" for key, _, problem in self.entries() if problem]

    def _dataset(self) -> tuple[Path | None, set[str] | None]:
        from engine.corrections import root_of

        try:
            root = root_of(self.state.config)
        except Exception:  # noqa: BLE001 - no dataset chosen yet: nothing can be checked
            return None, None
        if (
            root.is_dir()
            and self.state.get("data.kind") in ("auto", "folder")
            and self.state.config.resolve(self.state.get("data.path")) == root
        ):
            return root, {d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")}
        return root, None

    @staticmethod
    def _missing(root: Path | None, key: str) -> str:
        if root is None or key.startswith(("#", "val#")):
            return ""
        return "" if (root / key).is_file() else "file not found"

    def refresh(self) -> None:
        rows = self.entries()
        self.table.setRowCount(0)
        for key, what, problem in rows:
            r = self.table.rowCount()
            self.table.insertRow(r)
            item = QTableWidgetItem(key)
            item.setData(Qt.ItemDataRole.UserRole, key)
            item.setToolTip(key)
            self.table.setItem(r, 0, item)
            self.table.setItem(r, 1, QTableWidgetItem(what))
            bad = QTableWidgetItem(problem)
            bad.setForeground(QColor(ERROR_COLOUR))
            self.table.setItem(r, 2, bad)
        n_ex = len(self.state.get("data.exclude"))
        n_re = len(self.state.get("data.relabel"))
        text = f"{n_ex} image(s) excluded, {n_re} relabelled. Your image files are never moved or changed."
        problems = self.problems()
        if problems:
            text += f" {len(problems)} correction(s) will be skipped: " + "; ".join(problems[:3])
        self.summary.setText(text if rows else "No corrections: relabel or exclude images from the Evaluation tab.")
        self.undo_button.setEnabled(bool(self._undo))
        self.remove_button.setEnabled(bool(rows))
        self.save_button.setEnabled(bool(rows))

    def _on_state_changed(self, path: str) -> None:
        if path in ("", "data.exclude", "data.relabel", "data.path", "data.kind"):
            self.refresh()

    def _on_remove_clicked(self) -> None:
        items = [self.table.item(i.row(), 0) for i in self.table.selectedIndexes()]
        keys = sorted({item.data(Qt.ItemDataRole.UserRole) for item in items if item is not None})
        if keys:
            self.remove(keys)

    def save_copy(self, out: str) -> str:
        """Write the corrected copy; returns what happened in one line (also logged)."""
        from engine.corrected_copy import write_corrected_copy

        report = write_corrected_copy(self.state.config, out)
        line = (
            f"Wrote a corrected copy to {out}: {report.written} image(s), {report.excluded} excluded, "
            f"{report.relabelled} relabelled"
        )
        for warning in report.warnings:
            self.logged.emit(warning)
        self.logged.emit(line)
        return line

    def _on_save_clicked(self) -> None:
        out, _ = QFileDialog.getSaveFileName(
            self,
            "Save corrected copy (a new folder name, or a .csv file)",
            "",
            "Image folder (*);;CSV file (*.csv)",
        )
        if not out:
            return
        try:
            line = self.save_copy(out)
        except (ValueError, OSError) as exc:
            QMessageBox.warning(self, "Corrected copy", str(exc))
            return
        self.summary.setText(line)


class SampleCorrections(QWidget):
    """Relabel as... and Exclude from training for the sample a SampleDialog shows."""

    def __init__(self, panel: CorrectionsPanel, class_names: list[str], parent: QWidget | None = None):
        super().__init__(parent)
        self.panel = panel
        self.sample: dict | None = None
        self.relabel_class = QComboBox()
        self.relabel_class.setObjectName("sample.relabel_class")
        self.relabel_class.addItems(class_names)
        self.relabel_button = QPushButton("Relabel as")
        self.relabel_button.setObjectName("sample.relabel")
        self.relabel_button.clicked.connect(self._on_relabel_clicked)
        self.exclude_button = QPushButton("Exclude from training")
        self.exclude_button.setObjectName("sample.exclude")
        self.exclude_button.clicked.connect(self._on_exclude_clicked)
        self.status = QLabel()
        self.status.setWordWrap(True)
        row = QHBoxLayout()
        row.addWidget(self.relabel_button)
        row.addWidget(self.relabel_class, 1)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(row)
        layout.addWidget(self.exclude_button)
        layout.addWidget(self.status)

    def set_sample(self, row: dict) -> None:
        self.sample = row
        if row.get("true") in [self.relabel_class.itemText(i) for i in range(self.relabel_class.count())]:
            # Offer the model's answer: on a mistake the likeliest correction.
            self.relabel_class.setCurrentText(row.get("predicted", row["true"]))
        why = self.panel.why_not_correctable(row["path"])
        self.relabel_button.setEnabled(not why)
        self.exclude_button.setEnabled(not why)
        self.status.setText(why)

    def _on_relabel_clicked(self) -> None:
        if self.sample is not None:
            key = self.panel.relabel(self.sample["path"], self.relabel_class.currentText())
            self.status.setText(f"{key} relabelled as {self.relabel_class.currentText()} (undo in the Dataset panel)")

    def _on_exclude_clicked(self) -> None:
        if self.sample is not None:
            key = self.panel.exclude(self.sample["path"])
            self.status.setText(f"{key} excluded from training (undo in the Dataset panel)")
