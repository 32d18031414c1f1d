"""The evaluation panel: a checkpoint's accuracy, per-class table, confusion-matrix heat map and hardest samples."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from PySide6.QtCore import QEvent, QPointF, QRectF, QSize, Qt, Signal
from PySide6.QtGui import QColor, QFontMetrics, QIcon, QImage, QLinearGradient, QPainter, QPalette, QPen, QPixmap
from PySide6.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QFileDialog,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QListView,
    QListWidget,
    QListWidgetItem,
    QMenu,
    QProgressBar,
    QPushButton,
    QSizePolicy,
    QSplitter,
    QStyle,
    QTableWidget,
    QTableWidgetItem,
    QTabWidget,
    QToolTip,
    QVBoxLayout,
    QWidget,
)

from widgets.look import fit_pixels, message_colour
from widgets.sample_browser import SampleBrowser
from widgets.tasks import Task, run_task

OBJECT_NAMES = {
    "evaluation.evaluate": "evaluates the chosen checkpoint on its own validation split",
    "evaluation.other_data": "opens a menu to evaluate the checkpoint on another dataset",
    "evaluation.other_folder": "menu action: evaluate on an image folder chosen in a file dialog",
    "evaluation.other_file": "menu action: evaluate on a CSV or .npz file chosen in a file dialog",
    "evaluation.stop": "stops the running evaluation",
    "evaluation.save_report": "saves the last evaluation as a JSON report",
    "evaluation.checkpoint": "shows which checkpoint is evaluated",
    "evaluation.progress": "progress of the running evaluation",
    "evaluation.status": "what the evaluation is doing now",
    "evaluation.message": "the last error, shown inline",
    "evaluation.summary": "accuracy, loss, sample count and macro F1 of the last evaluation",
    "evaluation.data": "which data the shown results come from",
    "evaluation.per_class": "per-class precision, recall, F1 and support; click a header to sort",
    "evaluation.normalise": "shows each confusion-matrix row as fractions of its true class",
    "evaluation.confusion": "the confusion matrix heat map (rows: true class, columns: predicted class)",
    "evaluation.hardest": "the highest-loss samples with their image, true and predicted class, and loss",
    "evaluation.sample_tabs": "the highest-loss samples, or the samples of the chosen cell or class",
    "evaluation.difference": "shows the confusion matrix minus the previous evaluation's (e.g. the run before "
    "corrections): red cells grew, blue ones shrank",
}

TOP_N = 30  # hardest samples fetched and shown
THUMBNAIL = 96  # pixels, the longer side of a hardest-sample thumbnail
MAX_LABELLED_CLASSES = 20  # above this the heat map leaves counts out of the cells (tooltips still give them)

# Viridis: perceptually even and readable on light and dark window colours alike (data colours, not palette).
_VIRIDIS = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)]


def viridis(t: float) -> QColor:
    t = min(max(t, 0.0), 1.0) * (len(_VIRIDIS) - 1)
    i = min(int(t), len(_VIRIDIS) - 2)
    f = t - i
    a, b = _VIRIDIS[i], _VIRIDIS[i + 1]
    return QColor(*(round(a[c] + (b[c] - a[c]) * f) for c in range(3)))


def diverging(t: float) -> QColor:
    """Blue (t = 0) through near-white (0.5) to red (1): fewer / the same / more, in a difference matrix."""
    t = min(max(t, 0.0), 1.0)
    blue, white, red = (49, 99, 180), (245, 245, 245), (200, 50, 40)
    a, b, f = (blue, white, t * 2) if t < 0.5 else (white, red, t * 2 - 1)
    return QColor(*(round(a[c] + (b[c] - a[c]) * f) for c in range(3)))


def run_folder(checkpoint: str | Path) -> Path:
    """The run folder a checkpoint belongs to (RUN/checkpoints/x.pt -> RUN), else the checkpoint's own folder."""
    p = Path(checkpoint)
    return p.parent.parent if p.parent.name == "checkpoints" else p.parent


def _file_stamp(path: str | None) -> tuple | None:
    try:
        st = Path(path).stat() if path else None
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size) if st else None


def _describe(value: Any) -> str:
    """A true/predicted value of any task as short text: a class, a list of labels, or numbers."""
    if isinstance(value, list):
        if not value:
            return "(none)"
        return ", ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in value)
    return str(value)


# ---------------------------------------------------------------------------------------------
# Background work: plain functions that return plain values and never touch a widget


def _evaluate_job(
    checkpoint: str, data: str | None, top_n: int, *, progress: Callable[[Any], None], cancel: threading.Event
) -> dict | None:
    from engine.checkpoints import load_checkpoint
    from engine.config import from_dict
    from engine.evaluate import evaluate_checkpoint

    progress("Loading the checkpoint and its data")
    ckpt = load_checkpoint(checkpoint)
    ev = evaluate_checkpoint(
        ckpt,
        data=data,
        top_n=top_n,
        progress=lambda done, total: progress((done, total)),
        stop_event=cancel,
        source=checkpoint,
    )
    if ev is None:
        return None
    # Samples of an .npz are named "row N" of the kept images; the thumbnails need the same scan to find them.
    cfg = from_dict(ckpt["config"], check_paths=False)
    if data is not None:
        arrays = {"path": str(Path(data).expanduser().resolve()), "kind": "auto", "given": True}
    elif cfg.data.val_path:
        arrays = {"path": str(cfg.resolve(cfg.data.val_path)), "kind": cfg.data.kind, "given": True}
    else:
        arrays = {"path": str(cfg.resolve(cfg.data.path)), "kind": cfg.data.kind, "given": False}
    arrays.update(task=ev.task, class_names=list(ev.class_names))
    return {"evaluation": ev.to_dict(), "arrays": arrays}


def _thumbnails_job(
    paths: Sequence[str], arrays: dict, size: int, *, progress: Callable[[Any], None], cancel: threading.Event
) -> list | None:
    """One RGB array per sample (or the reason it cannot be shown); partial lists go out as progress."""
    from engine.data import array_to_tensor, load_image, scan_source

    rows: np.ndarray | None = None
    rows_error = ""
    if any(p.startswith("row ") for p in paths):
        try:
            source = scan_source(
                arrays["path"],
                kind=arrays["kind"],
                task=arrays["task"],
                class_names=arrays["class_names"] if arrays["given"] else None,
            )
            rows = source.array
            if rows is None:
                rows_error = f"{arrays['path']} holds no image array"
        except Exception as exc:  # noqa: BLE001 - a dataset gone since the evaluation: say so on each sample
            rows_error = str(exc) or type(exc).__name__
    out: list = [None] * len(paths)
    for i, path in enumerate(paths):
        if cancel.is_set():
            return None
        try:
            if path.startswith("row ") and not Path(path).exists():
                if rows is None:
                    raise ValueError(rows_error)
                chw = array_to_tensor(rows[int(path[4:])]).clamp(0, 1)
                pixels = np.rint(chw.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
            else:
                pixels = np.asarray(load_image(path), dtype=np.uint8)
            out[i] = fit_pixels(Image.fromarray(pixels), size)
        except Exception as exc:  # noqa: BLE001 - one unreadable image must not hide the others
            out[i] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        progress(list(out))
    return out


# ---------------------------------------------------------------------------------------------
# The heat map


class ConfusionMatrixView(QWidget):
    """A custom-painted confusion matrix: true classes down the side, predictions along the bottom, a colour bar.

    Clicking a cell, or moving to it with the arrow keys and pressing Enter, emits cell_chosen(true, predicted).
    """

    cell_chosen = Signal(int, int)  # row (true class) and column (predicted class) indices

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.current: tuple[int, int] | None = None  # the keyboard's cell
        self._diff: np.ndarray | None = None
        self.setFocusPolicy(Qt.FocusPolicy.StrongFocus)
        self._counts = np.zeros((0, 0), dtype=np.int64)
        self._names: list[str] = []
        self._normalised = False
        self._empty_text = "No evaluation yet."
        self.setMouseTracking(True)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)

    # --- data

    def set_matrix(self, counts: Sequence[Sequence[int]], class_names: Sequence[str]) -> None:
        self._counts = (
            np.asarray(counts, dtype=np.int64).reshape(len(class_names), len(class_names))
            if len(counts)
            else np.zeros((0, 0), dtype=np.int64)
        )
        self._names = list(class_names) if len(counts) else []
        self.update()

    def clear(self, text: str = "No evaluation yet.") -> None:
        self.current = None
        self._diff = None
        self._counts = np.zeros((0, 0), dtype=np.int64)
        self._names = []
        self._empty_text = text
        self.update()

    def counts(self) -> np.ndarray:
        return self._counts.copy()

    def class_names(self) -> list[str]:
        return list(self._names)

    def set_normalised(self, on: bool) -> None:
        self._normalised = bool(on)
        self.update()

    def is_normalised(self) -> bool:
        return self._normalised

    def set_difference(self, diff: np.ndarray | None) -> None:
        """Show these signed count changes (this evaluation minus an earlier one) instead; None: the counts."""
        self._diff = None if diff is None else np.asarray(diff, dtype=np.int64)
        self.update()

    def difference(self) -> np.ndarray | None:
        return None if self._diff is None else self._diff.copy()

    def _colour(self, t: float) -> QColor:
        return diverging(t) if self._diff is not None else viridis(t)

    def values(self) -> np.ndarray:
        """What the colours show: counts, each row divided by its true-class total, or a difference."""
        if self._diff is not None:
            return self._diff.astype(np.float64)
        if not self._normalised:
            return self._counts.astype(np.float64)
        totals = self._counts.sum(axis=1, keepdims=True)
        return np.divide(self._counts, totals, out=np.zeros(self._counts.shape), where=totals > 0)

    def cell_text(self, row: int, col: int) -> str:
        if self._diff is not None:
            return f"{int(self._diff[row, col]):+d}" if self._diff[row, col] else "0"
        if self._normalised:
            return f"{self.values()[row, col] * 100:.0f}%"
        return str(int(self._counts[row, col]))

    def _scale_max(self) -> float:
        if self._diff is not None:
            return float(max(int(np.abs(self._diff).max(initial=0)), 1))
        return 1.0 if self._normalised else float(max(int(self._counts.max(initial=0)), 1))

    def _scale_label(self, value: float) -> str:
        if self._diff is not None:
            return f"{value:+.0f}" if value else "0"
        return f"{value * 100:.0f}%" if self._normalised else f"{value:.0f}"

    # --- geometry

    def minimumSizeHint(self) -> QSize:
        fm = self.fontMetrics()
        return QSize(fm.height() * 12, fm.height() * 12)

    def sizeHint(self) -> QSize:
        fm = self.fontMetrics()
        return QSize(fm.height() * 30, fm.height() * 24)

    def _label(self, name: str) -> str:
        return QFontMetrics(self.font()).elidedText(name, Qt.TextElideMode.ElideRight, self.fontMetrics().height() * 7)

    def _layout(self) -> dict:
        fm = self.fontMetrics()
        k = len(self._names)
        pad = fm.height() // 2
        label_w = max((fm.horizontalAdvance(self._label(n)) for n in self._names), default=0) + pad
        title_h = fm.height() + pad  # the rotated "True class" and the "Predicted class" titles
        bar_w = fm.height()
        bar_label_w = (
            max(
                fm.horizontalAdvance(self._scale_label(v))
                for v in (0.0, 0.5 * self._scale_max(), self._scale_max(), -self._scale_max())
            )
            + pad
        )
        left = pad + title_h + label_w
        right = pad + bar_w + pad + bar_label_w + pad
        top = pad
        avail_w = max(self.width() - left - right, 1)
        # Column labels go vertical when they do not fit under their cells side by side.
        cell_guess = max(min(avail_w, self.height() - top - 2 * title_h - label_w) / max(k, 1), 1)
        vertical = label_w - pad > cell_guess
        bottom_labels = (label_w if vertical else fm.height()) + pad
        bottom = bottom_labels + title_h + pad
        avail_h = max(self.height() - top - bottom, 1)
        cell = max(min(avail_w, avail_h) / max(k, 1), 1.0)
        # Centred in the width it does not need, so a tall-limited matrix does not hug the left edge.
        grid = QRectF(left + max(avail_w - cell * k, 0) / 2, top, cell * k, cell * k)
        return {
            "grid": grid,
            "cell": cell,
            "vertical": vertical,
            "pad": pad,
            "label_w": label_w,
            "title_h": title_h,
            "bar": QRectF(grid.right() + pad, grid.top(), bar_w, grid.height()),
            "bottom_labels": bottom_labels,
        }

    def _cell_font(self, widest: str, cell: float):
        """The widget's font, or a smaller one down to 7 pt, in which widest fits a cell; None if none does."""
        font = self.font()
        size = font.pointSizeF() if font.pointSizeF() > 0 else 9.0
        while size >= 7.0:
            font.setPointSizeF(size)
            fm = QFontMetrics(font)
            if fm.horizontalAdvance(widest) + 4 <= cell and fm.height() + 2 <= cell:
                return font
            size -= 0.5
        return None

    def cell_rect(self, row: int, col: int) -> QRectF:
        """Where a cell is drawn at the widget's current size."""
        return self._cell_rect(self._layout(), row, col)

    @staticmethod
    def _cell_rect(geo: dict, row: int, col: int) -> QRectF:
        return QRectF(
            geo["grid"].left() + col * geo["cell"], geo["grid"].top() + row * geo["cell"], geo["cell"], geo["cell"]
        )

    def cell_at(self, pos: QPointF) -> tuple[int, int] | None:
        if not self._names:
            return None
        geo = self._layout()
        grid = geo["grid"]
        if not grid.contains(pos):
            return None
        k = len(self._names)
        return (
            min(int((pos.y() - grid.top()) / geo["cell"]), k - 1),
            min(int((pos.x() - grid.left()) / geo["cell"]), k - 1),
        )

    # --- painting

    def paintEvent(self, event) -> None:  # noqa: N802 - Qt's name
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing, False)
        pal = self.palette()
        text_colour = pal.color(QPalette.ColorRole.WindowText)
        if not self._names:
            painter.setPen(pal.color(QPalette.ColorRole.PlaceholderText))
            painter.drawText(self.rect(), Qt.AlignmentFlag.AlignCenter | Qt.TextFlag.TextWordWrap, self._empty_text)
            return
        geo = self._layout()
        fm = self.fontMetrics()
        k = len(self._names)
        cell, grid, pad = geo["cell"], geo["grid"], geo["pad"]
        values = self.values()
        top = self._scale_max()
        widest = "100%" if self._normalised else str(int(self._counts.max(initial=0)))
        if self._diff is not None:
            widest = f"+{int(np.abs(self._diff).max(initial=0))}"
        cell_font = self._cell_font(widest, cell)
        write = k <= MAX_LABELLED_CLASSES and cell_font is not None
        if write:
            painter.setFont(cell_font)
        for r in range(k):
            for c in range(k):
                rect = self._cell_rect(geo, r, c)
                t = (values[r, c] / top + 1) / 2 if self._diff is not None else values[r, c] / top
                colour = self._colour(t)
                painter.fillRect(rect, colour)
                if write:
                    # Dark text on the light end of the map, light text on the dark end.
                    painter.setPen(QColor(20, 20, 20) if colour.lightnessF() > 0.55 else QColor(245, 245, 245))
                    painter.drawText(rect, Qt.AlignmentFlag.AlignCenter, self.cell_text(r, c))
        painter.setFont(self.font())
        painter.setBrush(Qt.BrushStyle.NoBrush)
        if self.current is not None and self.current[0] < k and self.current[1] < k:
            painter.setPen(QPen(pal.color(QPalette.ColorRole.Highlight), 3 if self.hasFocus() else 2))
            painter.drawRect(self._cell_rect(geo, *self.current).adjusted(1, 1, -1, -1))
        painter.setPen(QPen(text_colour, 1))
        painter.drawRect(grid)

        labels = cell >= fm.height() * 0.8  # too many classes for their names: tooltips carry them
        if labels:
            for i, name in enumerate(self._names):
                text = self._label(name)
                row_rect = QRectF(grid.left() - geo["label_w"], grid.top() + i * cell, geo["label_w"] - pad / 2, cell)
                painter.drawText(row_rect, Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter, text)
                x = grid.left() + i * cell
                if geo["vertical"]:
                    painter.save()
                    painter.translate(x + cell / 2 + fm.ascent() / 2 - fm.descent(), grid.bottom() + pad / 2)
                    painter.rotate(90)
                    painter.drawText(QPointF(0, 0), text)
                    painter.restore()
                else:
                    painter.drawText(
                        QRectF(x, grid.bottom() + pad / 2, cell, fm.height()),
                        Qt.AlignmentFlag.AlignHCenter | Qt.AlignmentFlag.AlignTop,
                        text,
                    )
        # Axis titles.
        painter.drawText(
            QRectF(grid.left(), grid.bottom() + geo["bottom_labels"], grid.width(), geo["title_h"]),
            Qt.AlignmentFlag.AlignHCenter | Qt.AlignmentFlag.AlignVCenter,
            "Predicted class",
        )
        painter.save()
        painter.translate(grid.left() - geo["label_w"] - geo["title_h"], grid.center().y())
        painter.rotate(-90)
        painter.drawText(
            QRectF(-grid.height() / 2, 0, grid.height(), geo["title_h"]),
            Qt.AlignmentFlag.AlignHCenter | Qt.AlignmentFlag.AlignTop,
            "True class",
        )
        painter.restore()

        # Colour bar: the scale from 0 to the largest count (or 0-100 % of a row).
        bar = geo["bar"]
        gradient = QLinearGradient(bar.bottomLeft(), bar.topLeft())
        for i in range(len(_VIRIDIS)):
            t = i / (len(_VIRIDIS) - 1)
            gradient.setColorAt(t, self._colour(t))
        painter.fillRect(bar, gradient)
        painter.drawRect(bar)
        for frac in (0.0, 0.5, 1.0):
            y = bar.bottom() - frac * bar.height()
            painter.drawLine(QPointF(bar.right(), y), QPointF(bar.right() + pad / 2, y))
            label_rect = QRectF(bar.right() + pad, y - fm.height() / 2, self.width() - bar.right() - pad, fm.height())
            painter.drawText(
                label_rect,
                Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignVCenter,
                self._scale_label((2 * frac - 1) * top if self._diff is not None else frac * top),
            )

    def mousePressEvent(self, event) -> None:  # noqa: N802 - Qt's name
        hit = self.cell_at(QPointF(event.position()))
        if hit is not None and event.button() == Qt.MouseButton.LeftButton:
            self.current = hit
            self.update()
            self.cell_chosen.emit(*hit)
        super().mousePressEvent(event)

    def keyPressEvent(self, event) -> None:  # noqa: N802 - Qt's name
        k = len(self._names)
        moves = {Qt.Key.Key_Left: (0, -1), Qt.Key.Key_Right: (0, 1), Qt.Key.Key_Up: (-1, 0), Qt.Key.Key_Down: (1, 0)}
        if k and event.key() in moves:
            r, c = self.current if self.current is not None else (0, 0)
            dr, dc = moves[event.key()] if self.current is not None else (0, 0)
            self.current = (min(max(r + dr, 0), k - 1), min(max(c + dc, 0), k - 1))
            self.update()
            return
        if k and self.current is not None and event.key() in (Qt.Key.Key_Return, Qt.Key.Key_Enter, Qt.Key.Key_Space):
            self.cell_chosen.emit(*self.current)
            return
        super().keyPressEvent(event)

    def event(self, event) -> bool:
        if event.type() == QEvent.Type.ToolTip:
            hit = self.cell_at(QPointF(event.pos()))
            if hit is None:
                QToolTip.hideText()
                event.ignore()
                return True
            r, c = hit
            row_total = int(self._counts[r].sum())
            share = f" ({self._counts[r, c] / row_total * 100:.1f}% of {self._names[r]})" if row_total else ""
            QToolTip.showText(
                event.globalPos(),
                f"true {self._names[r]}, predicted {self._names[c]}: {int(self._counts[r, c])}{share}",
                self,
            )
            return True
        return super().event(event)


class _NumberItem(QTableWidgetItem):
    """A table cell that sorts by its number, not its text."""

    def __init__(self, value: float, text: str):
        super().__init__(text)
        self.setData(Qt.ItemDataRole.UserRole, value)
        self.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)

    def __lt__(self, other: QTableWidgetItem) -> bool:
        mine, theirs = self.data(Qt.ItemDataRole.UserRole), other.data(Qt.ItemDataRole.UserRole)
        if isinstance(mine, (int, float)) and isinstance(theirs, (int, float)):
            return mine < theirs
        return super().__lt__(other)


# ---------------------------------------------------------------------------------------------
# The panel


class EvaluationPanel(QWidget):
    """Evaluates a checkpoint off the GUI thread and shows what it got right and wrong."""

    evaluated = Signal(dict)  # Evaluation.to_dict() of the finished evaluation
    logged = Signal(str)

    PER_CLASS_COLUMNS = ("Class", "Precision", "Recall", "F1", "Support")

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.checkpoint: str | None = None
        self.result: dict | None = None  # the last evaluation's to_dict()
        self.thumbnails: list = []  # per hardest sample: an RGB array, an error text, or None while loading
        self._request = 0
        self._running = False  # an evaluation was started and has not reported back
        self._stamp: tuple | None = None  # the checkpoint file's (mtime, size) when it was chosen
        self._task: Task | None = None
        self._thumb_task: Task | None = None
        self._arrays: dict | None = None  # where the evaluated samples' pixels are (an .npz's rows)
        self._evaluated_checkpoint: str | None = None

        self.checkpoint_label = QLabel()
        self.checkpoint_label.setObjectName("evaluation.checkpoint")
        self.checkpoint_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.checkpoint_label.setWordWrap(True)

        self.evaluate_button = QPushButton("Evaluate")
        self.evaluate_button.setObjectName("evaluation.evaluate")
        self.evaluate_button.setToolTip("Evaluate the checkpoint on the validation split its run trained with")
        self.evaluate_button.clicked.connect(self._on_evaluate_clicked)

        self.other_button = QPushButton("Evaluate on another dataset...")
        self.other_button.setObjectName("evaluation.other_data")
        self.other_button.setToolTip(
            "Evaluate the checkpoint on an image folder, a CSV or an .npz; samples whose "
            "class the model does not know are skipped"
        )
        menu = QMenu(self.other_button)
        folder_action = menu.addAction("Image folder...")
        folder_action.setObjectName("evaluation.other_folder")
        folder_action.triggered.connect(self._on_other_folder_triggered)
        file_action = menu.addAction("CSV or .npz file...")
        file_action.setObjectName("evaluation.other_file")
        file_action.triggered.connect(self._on_other_file_triggered)
        self.other_button.setMenu(menu)

        self.stop_button = QPushButton("Stop")
        self.stop_button.setObjectName("evaluation.stop")
        self.stop_button.setToolTip("Stop the running evaluation")
        self.stop_button.clicked.connect(self.stop)

        self.save_button = QPushButton("Save report as JSON...")
        self.save_button.setObjectName("evaluation.save_report")
        self.save_button.setToolTip("Write every figure of the last evaluation to a JSON file")
        self.save_button.clicked.connect(self._on_save_clicked)

        self.progress = QProgressBar()
        self.progress.setObjectName("evaluation.progress")
        self.progress.setTextVisible(False)
        self.status = QLabel()
        self.status.setObjectName("evaluation.status")
        self.message = QLabel()
        self.message.setObjectName("evaluation.message")
        self.message.setWordWrap(True)
        self.message.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.message.hide()

        self.summary = QLabel()
        self.summary.setObjectName("evaluation.summary")
        self.summary.setTextFormat(Qt.TextFormat.PlainText)
        font = self.summary.font()
        font.setPointSizeF(font.pointSizeF() * 1.25)
        font.setBold(True)
        self.summary.setFont(font)
        self.summary.setWordWrap(True)
        self.data_label = QLabel()
        self.data_label.setObjectName("evaluation.data")
        self.data_label.setWordWrap(True)
        self.data_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)

        self.table = QTableWidget(0, len(self.PER_CLASS_COLUMNS))
        self.table.setObjectName("evaluation.per_class")
        self.table.setHorizontalHeaderLabels(list(self.PER_CLASS_COLUMNS))
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.verticalHeader().hide()
        self.table.horizontalHeader().setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        for col in range(1, len(self.PER_CLASS_COLUMNS)):
            self.table.horizontalHeader().setSectionResizeMode(col, QHeaderView.ResizeMode.ResizeToContents)
        self.table.setTextElideMode(Qt.TextElideMode.ElideRight)
        self._fit_table()
        self.table.setSortingEnabled(True)
        self.table.sortByColumn(0, Qt.SortOrder.AscendingOrder)

        self.matrix = ConfusionMatrixView()
        self.matrix.setObjectName("evaluation.confusion")
        self.normalise = QCheckBox("Normalise rows")
        self.normalise.setToolTip("Show each row as the share of its true class")
        self.normalise.setObjectName("evaluation.normalise")
        self.normalise.toggled.connect(self._on_normalise_changed)
        self.difference = QCheckBox("Difference from previous")
        self.difference.setObjectName("evaluation.difference")
        self.difference.setEnabled(False)
        self.difference.toggled.connect(self._on_difference_changed)
        self._latest: dict | None = None  # {"confusion", "class_names", "checkpoint", "data"} of the last evaluation
        self.previous: dict | None = None  # the same for the one before it

        self.table.cellClicked.connect(self._on_table_clicked)
        self.table.cellActivated.connect(self._on_table_clicked)
        self.matrix.cell_chosen.connect(self.show_cell)

        self.samples = QListWidget()
        self.samples.setObjectName("evaluation.hardest")
        self.samples.setViewMode(QListView.ViewMode.IconMode)
        self.samples.setIconSize(QSize(THUMBNAIL, THUMBNAIL))
        self.samples.setResizeMode(QListView.ResizeMode.Adjust)
        self.samples.setMovement(QListView.Movement.Static)
        self.samples.setWrapping(True)
        self.samples.setWordWrap(True)
        self.samples.setUniformItemSizes(True)
        self.samples.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.samples.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self._update_grid()

        buttons = QHBoxLayout()
        buttons.addWidget(self.evaluate_button)
        buttons.addWidget(self.other_button)
        buttons.addWidget(self.stop_button)
        buttons.addStretch(1)
        buttons.addWidget(self.save_button)

        busy = QHBoxLayout()
        busy.addWidget(self.progress, 1)
        busy.addWidget(self.status, 2)

        table_box = QGroupBox("Per class")
        QVBoxLayout(table_box).addWidget(self.table)
        matrix_box = QGroupBox("Confusion matrix")
        matrix_layout = QVBoxLayout(matrix_box)
        matrix_layout.addWidget(self.normalise)  # one above the other: side by side they widen the tab at 1280 px
        matrix_layout.addWidget(self.difference)
        matrix_layout.addWidget(self.matrix, 1)
        self.browser = SampleBrowser()
        self.samples.itemActivated.connect(self._on_hardest_activated)
        self.sample_tabs = QTabWidget()
        self.sample_tabs.setObjectName("evaluation.sample_tabs")
        self.sample_tabs.addTab(self.samples, f"Highest-loss samples (up to {TOP_N})")
        self.sample_tabs.addTab(self.browser, "Chosen cell or class")
        samples_box = self.sample_tabs

        upper = QSplitter(Qt.Orientation.Horizontal)
        upper.addWidget(table_box)
        upper.addWidget(matrix_box)
        upper.setStretchFactor(0, 2)
        upper.setStretchFactor(1, 3)
        upper.setChildrenCollapsible(False)
        split = QSplitter(Qt.Orientation.Vertical)
        split.addWidget(upper)
        split.addWidget(samples_box)
        split.setStretchFactor(0, 3)
        split.setStretchFactor(1, 2)
        split.setChildrenCollapsible(False)

        layout = QVBoxLayout(self)
        layout.addWidget(self.checkpoint_label)
        layout.addLayout(buttons)
        layout.addLayout(busy)
        layout.addWidget(self.message)
        layout.addWidget(self.summary)
        layout.addWidget(self.data_label)
        layout.addWidget(split, 1)

        self._apply_message_colour()
        self._show_results(None)
        self._set_running(False)
        self._show_checkpoint()

    # --- public API

    def set_checkpoint(self, path: str | Path | None) -> None:
        """Choose the model to evaluate; results of another checkpoint (or of this file before it was
        rewritten, as a resumed run does) are cleared, and an evaluation of it stopped."""
        new = str(path) if path else None
        if new == self.checkpoint and _file_stamp(new) == self._stamp:
            return
        self._abandon()
        self._show_results(None)
        self.checkpoint = new
        self._stamp = _file_stamp(new)
        self._show_message("")
        self._show_checkpoint()
        self._set_running(self._running)

    def evaluate(self, data: str | Path | None = None) -> bool:
        """Start evaluating the checkpoint (on its own validation split, or on data); False if it cannot start."""
        if not self.checkpoint:
            self._show_message("Choose a checkpoint to evaluate first (train a model or pick a checkpoint file).")
            return False
        self._abandon()
        self._stamp = _file_stamp(self.checkpoint)  # results from now on belong to the file as it is
        request = self._request
        data = str(data) if data else None
        self._show_message("")
        self._set_running(True)
        self.progress.setRange(0, 0)
        where = data or "its validation split"
        self.status.setText("Starting")
        self.logged.emit(f"Evaluating {self.checkpoint} on {where}")
        self._task = run_task(
            "evaluate",
            _evaluate_job,
            self.checkpoint,
            data,
            TOP_N,
            progress=True,
            on_result=partial(self._on_evaluation_finished, request),
            on_error=partial(self._on_evaluation_failed, request),
            on_progress=partial(self._on_evaluation_progressed, request),
        )
        return True

    def stop(self) -> None:
        """Ask the running evaluation to stop; it ends after the batch in progress."""
        if self._running and self._task is not None:
            self._task.cancel.set()
            self.status.setText("Stopping")

    def is_running(self) -> bool:
        return self._running

    def wait(self, ms: int = 60000) -> bool:
        """Block until the evaluation and its thumbnails are done (tests, closing the window)."""
        deadline = time.monotonic() + ms / 1000
        for _ in range(2):  # an evaluation's result starts the thumbnail task
            for task in (self._task, self._thumb_task):
                if task is not None and task.is_running():
                    task.wait(max(int((deadline - time.monotonic()) * 1000), 0))
        return not any(t is not None and t.is_running() for t in (self._task, self._thumb_task))

    def save_report(self, path: str | Path) -> bool:
        """Write the last evaluation's to_dict() as JSON; False (with the reason shown) when it cannot."""
        if self.result is None:
            self._show_message("Nothing to save yet: evaluate a checkpoint first.")
            return False
        path = Path(path)
        try:
            path.write_text(json.dumps(self.result, indent=2, allow_nan=False) + "\n", encoding="utf-8")
        except OSError as exc:
            self._show_message(f"Could not save the report to {path}: {exc.strerror or exc}")
            return False
        self._show_message("")
        self.status.setText(f"Saved report to {path}")
        self.logged.emit(f"Saved evaluation report to {path}")
        return True

    # --- slots

    def _on_evaluate_clicked(self) -> None:
        self.evaluate()

    def _on_other_folder_triggered(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Evaluate on an image folder", self._start_dir())
        if folder:
            self.evaluate(data=folder)

    def _on_other_file_triggered(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "Evaluate on a CSV or .npz file", self._start_dir(), "Datasets (*.csv *.npz);;All files (*)"
        )
        if path:
            self.evaluate(data=path)

    def _on_save_clicked(self) -> None:
        start = str(run_folder(self.checkpoint) / "evaluation.json") if self.checkpoint else "evaluation.json"
        path, _ = QFileDialog.getSaveFileName(self, "Save evaluation report", start, "JSON (*.json)")
        if path:
            self.save_report(path)

    def _on_normalise_changed(self, on: bool) -> None:
        self.matrix.set_normalised(on)

    def _on_difference_changed(self, on: bool) -> None:
        diff = self.confusion_difference() if on else None
        self.matrix.set_difference(diff)
        self.normalise.setEnabled(diff is None)

    def confusion_difference(self) -> np.ndarray | None:
        """This evaluation's confusion matrix minus the previous one's, when both have the same classes."""
        ev = self.result or {}
        prev = self.previous
        if not ev.get("confusion") or prev is None or prev["class_names"] != ev.get("class_names"):
            return None
        return np.asarray(ev["confusion"], dtype=np.int64) - np.asarray(prev["confusion"], dtype=np.int64)

    def _on_evaluation_progressed(self, request: int, value: Any) -> None:
        if request != self._request:
            return
        if isinstance(value, tuple):
            done, total = value
            self.progress.setRange(0, max(total, 1))
            self.progress.setValue(done)
            self.status.setText(f"Evaluating: batch {done} of {total}")
        else:
            self.status.setText(str(value))

    def _on_evaluation_finished(self, request: int, value: dict | None) -> None:
        if request != self._request:
            return
        self._set_running(False)
        if value is None:
            self.status.setText("Evaluation stopped")
            self.logged.emit("Evaluation stopped")
            return
        ev = value["evaluation"]
        if ev.get("confusion"):
            self.previous, self._latest = (
                self._latest,
                {
                    "confusion": ev["confusion"],
                    "class_names": ev["class_names"],
                    "checkpoint": self.checkpoint,
                    "data": ev.get("data", ""),
                },
            )
        self._arrays = value["arrays"]
        self._evaluated_checkpoint = self.checkpoint
        self._show_results(ev)
        self.status.setText("Done")
        self.logged.emit(f"Evaluated {ev['data']}: {self._headline(ev)}")
        self._load_thumbnails(request, value["arrays"])
        self.evaluated.emit(ev)

    def _on_evaluation_failed(self, request: int, exc: BaseException, tb: str) -> None:
        if request != self._request:
            return
        self._set_running(False)
        self.status.setText("")
        from engine.checkpoints import CheckpointError

        # Bad input (a missing file, a dataset gone, a foreign checkpoint) explains itself; anything else is a bug.
        known = isinstance(exc, (CheckpointError, ValueError, OSError))
        text = str(exc) if known and str(exc) else f"{type(exc).__name__}: {exc}"
        self._show_message(f"Evaluation failed: {text}")
        self.logged.emit(f"Evaluation failed: {text}" + ("" if known else f"\n{tb}"))

    def _on_thumbnails_progressed(self, request: int, images: list) -> None:
        if request == self._request:
            self._set_thumbnails(images)

    def _on_thumbnails_finished(self, request: int, images: list | None) -> None:
        if request == self._request and images is not None:
            self._set_thumbnails(images)

    def _on_thumbnails_failed(self, request: int, exc: BaseException, tb: str) -> None:
        if request == self._request:
            self.logged.emit(f"Thumbnails of the hardest samples could not be loaded: {exc}\n{tb}")

    def changeEvent(self, event) -> None:  # noqa: N802 - Qt's name
        if event.type() in (QEvent.Type.PaletteChange, QEvent.Type.StyleChange):
            self._apply_message_colour()
        elif event.type() == QEvent.Type.FontChange:
            self._update_grid()
        super().changeEvent(event)

    # --- helpers

    def _show_checkpoint(self) -> None:
        if self.checkpoint is None:
            self.checkpoint_label.setText("No checkpoint chosen: train a model or pick a checkpoint to evaluate.")
            self.checkpoint_label.setToolTip("")
        else:
            self.checkpoint_label.setText(f"Checkpoint: {self.checkpoint}")
            self.checkpoint_label.setToolTip(self.checkpoint)

    def _start_dir(self) -> str:
        return str(run_folder(self.checkpoint)) if self.checkpoint else ""

    def _abandon(self) -> None:
        """Stop caring about running work: it is cancelled and its results (by request id) ignored."""
        self._request += 1
        for task in (self._task, self._thumb_task):
            if task is not None and task.is_running():
                task.cancel.set()
        self._set_running(False)

    def _set_running(self, running: bool) -> None:
        self._running = running
        has = bool(self.checkpoint)
        self.evaluate_button.setEnabled(has and not running)
        self.other_button.setEnabled(has and not running)
        self.stop_button.setEnabled(running)
        self.save_button.setEnabled(self.result is not None and not running)
        self.progress.setVisible(running)
        if not running:
            self.progress.setRange(0, 1)
            self.progress.setValue(0)

    def _apply_message_colour(self) -> None:
        self.message.setStyleSheet(f"color: {message_colour(self.palette()).name()};")

    def _show_message(self, text: str) -> None:
        self.message.setText(text)
        self.message.setVisible(bool(text))

    def _update_grid(self) -> None:
        fm = self.samples.fontMetrics()
        grid = QSize(max(THUMBNAIL, fm.horizontalAdvance("M" * 11)) + 16, THUMBNAIL + 3 * fm.height() + 16)
        self.samples.setGridSize(grid)
        # At least one whole row of thumbnails with their three lines of text stays visible.
        scroll = self.samples.style().pixelMetric(QStyle.PixelMetric.PM_ScrollBarExtent)
        self.samples.setMinimumHeight(grid.height() + 2 * self.samples.frameWidth() + scroll)

    @staticmethod
    def _headline(ev: dict) -> str:
        parts = []
        if ev.get("accuracy") is not None:
            parts.append(f"accuracy {ev['accuracy'] * 100:.1f}%")
        if ev.get("top5_accuracy") is not None:
            parts.append(f"top-5 {ev['top5_accuracy'] * 100:.1f}%")
        if ev.get("mae") is not None:
            parts.append(f"MAE {ev['mae']:.4g}")
        if ev.get("rmse") is not None:
            parts.append(f"RMSE {ev['rmse']:.4g}")
        if ev.get("loss") is not None:
            parts.append(f"loss {ev['loss']:.4f}")
        if ev.get("macro_f1") is not None:
            parts.append(f"macro F1 {ev['macro_f1']:.3f}")
        parts.append(f"{ev.get('samples', 0)} samples")
        return "   ".join(parts)

    def _show_results(self, ev: dict | None) -> None:
        self.result = ev
        self.difference.setEnabled(False)
        self.matrix.set_difference(None)
        self.normalise.setEnabled(True)
        self.browser.clear()
        self.sample_tabs.setCurrentIndex(0)
        self.thumbnails = []
        self.samples.clear()
        self.table.setSortingEnabled(False)
        self.table.setRowCount(0)
        if ev is None:
            self.summary.setText("")
            self.summary.hide()
            self.data_label.setText("Press Evaluate to measure the checkpoint on its validation split.")
            self.matrix.clear("No evaluation yet.")
            self.table.setSortingEnabled(True)
            self._set_running(self._running)
            return
        self.summary.setText(self._headline(ev))
        self.summary.show()
        data = f"Evaluated: {ev.get('data', '')}"
        skipped = ev.get("skipped") or []
        if skipped:
            data += f"; {len(skipped)} sample(s) skipped, e.g. {skipped[0]['path']}: {skipped[0]['reason']}"
        self.data_label.setText(data)

        for row in ev.get("per_class", []):
            r = self.table.rowCount()
            self.table.insertRow(r)
            self.table.setItem(r, 0, QTableWidgetItem(str(row["class"])))
            for col, key in enumerate(("precision", "recall", "f1"), start=1):
                value = row[key] if row[key] is not None else 0.0
                self.table.setItem(r, col, _NumberItem(float(value), f"{value:.3f}"))
            self.table.setItem(r, 4, _NumberItem(int(row["support"]), str(row["support"])))
        self.table.setSortingEnabled(True)  # re-sorts by the column the user chose
        self._fit_table()

        if ev.get("confusion"):
            self.matrix.set_matrix(ev["confusion"], ev["class_names"])
            comparable = self.confusion_difference() is not None
            self.difference.setEnabled(comparable)
            if comparable and self.previous is not None:
                self.difference.setToolTip(
                    f"Minus the evaluation before: {self.previous['checkpoint']} on {self.previous['data']}"
                )
            if self.difference.isChecked():
                self._on_difference_changed(comparable)
        else:
            task = ev.get("task", "")
            self.matrix.clear(f"No confusion matrix for a {task} model (only single-label classification has one).")

        for h in ev.get("hardest", []):
            loss = f"loss {h['loss']:.3g}" if h.get("loss") is not None else "loss -"
            item = QListWidgetItem(f"true {_describe(h['true'])}\npredicted {_describe(h['predicted'])}\n{loss}")
            tip = [h["path"], f"true: {_describe(h['true'])}", f"predicted: {_describe(h['predicted'])}"]
            if h.get("confidence") is not None:
                tip.append(f"confidence: {h['confidence'] * 100:.1f}%")
            if h.get("loss") is not None:
                tip.append(f"loss: {h['loss']:.4g}")
            item.setToolTip("\n".join(tip))
            item.setData(Qt.ItemDataRole.UserRole, h["path"])
            item.setTextAlignment(Qt.AlignmentFlag.AlignHCenter | Qt.AlignmentFlag.AlignTop)
            self.samples.addItem(item)
        self._set_running(self._running)

    def _load_thumbnails(self, request: int, arrays: dict) -> None:
        paths = [h["path"] for h in (self.result or {}).get("hardest", [])]
        self.thumbnails = [None] * len(paths)
        if not paths:
            return
        self._thumb_task = run_task(
            "evaluation thumbnails",
            _thumbnails_job,
            paths,
            arrays,
            THUMBNAIL,
            progress=True,
            on_result=partial(self._on_thumbnails_finished, request),
            on_error=partial(self._on_thumbnails_failed, request),
            on_progress=partial(self._on_thumbnails_progressed, request),
        )

    def _set_thumbnails(self, images: list) -> None:
        for i, image in enumerate(images[: self.samples.count()]):
            if image is None or (i < len(self.thumbnails) and self.thumbnails[i] is not None):
                continue
            self.thumbnails[i] = image
            item = self.samples.item(i)
            if isinstance(image, np.ndarray):
                h, w = image.shape[:2]
                qimage = QImage(image.data, w, h, image.strides[0], QImage.Format.Format_RGB888).copy()
                item.setIcon(QIcon(QPixmap.fromImage(qimage)))
            else:
                item.setIcon(self.style().standardIcon(QStyle.StandardPixmap.SP_MessageBoxWarning))
                item.setToolTip(f"{item.toolTip()}\nimage not shown: {image}")

    def _fit_table(self) -> None:
        """Keep every figure column whole: the table is never narrower than the numbers plus a short class name
        (the splitter otherwise gives the heat map all the width at 1280 x 800 and only class names show)."""
        header = self.table.horizontalHeader()
        fm = self.table.fontMetrics()
        numbers = sum(
            max(header.sectionSizeHint(c), self.table.sizeHintForColumn(c), fm.horizontalAdvance("0.000") + 12)
            for c in range(1, len(self.PER_CLASS_COLUMNS))
        )
        scroll = self.table.style().pixelMetric(QStyle.PixelMetric.PM_ScrollBarExtent)
        name = fm.horizontalAdvance("M" * 5)
        self.table.setMinimumWidth(numbers + name + 2 * self.table.frameWidth() + scroll + 4)

    def show_cell(self, true: int, predicted: int) -> list[dict]:
        """Show the validation samples of one confusion-matrix cell (true class index, predicted class index)."""
        from engine.evaluate import cell_samples

        ev = self.result or {}
        names = ev.get("class_names", [])
        if not ev.get("predictions") or not (0 <= true < len(names) and 0 <= predicted < len(names)):
            return []
        rows = cell_samples(ev["predictions"], names[true], names[predicted])
        if true == predicted:
            title = f"True {names[true]}, predicted correctly: {len(rows)} sample(s), least confident first"
        else:
            title = f"True {names[true]}, predicted {names[predicted]}: {len(rows)} sample(s), highest loss first"
        self._browse(title, rows)
        return rows

    def show_class(self, name: str) -> list[dict]:
        """Show every validation sample whose true class is name, highest loss (the mistakes) first."""
        from engine.evaluate import cell_samples

        ev = self.result or {}
        if not ev.get("predictions"):
            return []
        rows = cell_samples(ev["predictions"], name, None)
        wrong = sum(r["predicted"] != name for r in rows)
        self._browse(f"True {name}: {len(rows)} sample(s), {wrong} wrong, highest loss first", rows)
        return rows

    def _browse(self, title: str, rows: list[dict]) -> None:
        self.browser.show_samples(
            title,
            rows,
            arrays=self._arrays,
            checkpoint=self._evaluated_checkpoint,
            class_names=(self.result or {}).get("class_names", []),
        )
        self.sample_tabs.setCurrentWidget(self.browser)

    def _on_table_clicked(self, row: int, _column: int) -> None:
        item = self.table.item(row, 0)
        if item is not None:
            self.show_class(item.text())

    def _on_hardest_activated(self, item: QListWidgetItem) -> None:
        ev = self.result or {}
        if not ev.get("predictions"):
            return
        by_path = {r["path"]: r for r in ev["predictions"]}
        rows = [by_path[h["path"]] for h in ev.get("hardest", []) if h["path"] in by_path]
        self._browse(f"The {len(rows)} highest-loss samples", rows)
        self.browser.open_row(self.samples.row(item))

    def thumbnails_done(self) -> bool:
        """True when every hardest sample has its thumbnail (or the reason it has none)."""
        return len(self.thumbnails) == self.samples.count() and all(t is not None for t in self.thumbnails)
