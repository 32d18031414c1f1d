"""Models behind the dataset panel's Samples and Skipped tabs: every sample and every skipped file of a dataset of
any size, in views that ask only for the rows on screen.

The Samples model holds no image until its view asks for a row's icon: then the row is queued, and one
background task at a time decodes the queued rows that are still on screen (newest requests first) into
thumbnails. Scrolling through 200,000 samples decodes what was looked at, never the whole dataset; a bounded
number of thumbnails is kept.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from PySide6.QtCore import (
    QAbstractListModel,
    QAbstractTableModel,
    QModelIndex,
    QObject,
    QPersistentModelIndex,
    Qt,
    QTimer,
    Signal,
)
from PySide6.QtGui import QColor, QImage, QPixmap

from engine.text import readable
from widgets.look import fit_pixels
from widgets.tasks import Task, run_task

if TYPE_CHECKING:
    from engine.data import DataSource

Index = QModelIndex | QPersistentModelIndex
THUMBS_PER_TASK = 48  # rows decoded by one background task: a screenful of 64-px icons
KEPT_THUMBS = 3000  # decoded thumbnails kept (about 36 MiB at 64 px); the oldest go first


def label_text(target: Any, task: str, names: Sequence[str]) -> str:
    if task == "classification":
        return names[int(target)]
    if task == "multilabel":
        on = [name for name, v in zip(names, target, strict=True) if v > 0.5]
        return ", ".join(on) if on else "(no label)"
    return ", ".join(f"{name}={v:.3g}" for name, v in zip(names, target, strict=True))


def sample_order(source: DataSource) -> np.ndarray:
    """The positions of a source's samples as the Samples tab lists them: grouped by class (stable), else in order."""
    n = len(source)
    if source.task == "classification" and n:
        return np.argsort(np.asarray(source.targets, dtype=np.int64), kind="stable")
    return np.arange(n)


def sample_image(source: DataSource, i: int) -> Any:
    """The i-th sample's image, as PIL RGB."""
    from PIL import Image

    from engine.data import array_to_tensor, load_image

    if source.array is not None:
        pixels = array_to_tensor(source.array[i]).permute(1, 2, 0).numpy()
        return Image.fromarray(np.clip(np.rint(pixels * 255), 0, 255).astype(np.uint8))
    assert source.files is not None  # a source has either an array or files
    return load_image(source.files[i])


def decode_thumbnails(
    source: DataSource,
    positions: list[tuple[int, int]],
    size: int,
    *,
    progress: Callable[[Any], None] | None = None,
    cancel: Any = None,
) -> list[tuple[int, np.ndarray | None]]:
    """(row, thumbnail pixels or None when the file cannot be read) for each (row, sample position)."""
    out: list[tuple[int, np.ndarray | None]] = []
    for row, i in positions:
        if cancel is not None and cancel.is_set():
            break
        try:
            out.append((row, fit_pixels(sample_image(source, i), size)))
        except Exception:  # noqa: BLE001 - a file changed since the scan: shown without a picture
            out.append((row, None))
    return out


class SamplesModel(QAbstractListModel):
    """Every sample of a scanned dataset, grouped by class; icons decoded lazily for rows on screen.

    on_screen(row) says whether a row is visible now (the panel asks its view); rows scrolled past before their
    turn are not decoded.
    """

    thumbnails_arrived = Signal(int)  # how many rows the last task decoded

    def __init__(self, size: int, on_screen: Callable[[int], bool], parent: QObject | None = None):
        super().__init__(parent)
        self.size = size
        self.on_screen = on_screen
        self.source: DataSource | None = None
        self.order = np.zeros(0, dtype=np.int64)
        self.thumbs: OrderedDict[int, QPixmap | None] = OrderedDict()
        self.queued: OrderedDict[int, None] = OrderedDict()  # rows asked for, oldest first
        self.decoded = 0  # thumbnails decoded since the last reset (tests: only what was on screen)
        self.task: Task | None = None
        self._generation = 0
        self._placeholder = QPixmap(size, size)
        self._placeholder.fill(QColor(128, 128, 128, 40))
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(0)  # the requests of one paint become one task
        self._timer.timeout.connect(self._start_task)

    def show(self, source: DataSource | None, order: np.ndarray | None = None) -> None:
        self.beginResetModel()
        self._generation += 1
        if self.task is not None:
            self.task.cancel.set()  # its result is for the previous dataset: ignored
            self.task = None
        self.source = source
        self.order = order if order is not None else (sample_order(source) if source is not None else self.order[:0])
        self.thumbs.clear()
        self.queued.clear()
        self.decoded = 0
        self.endResetModel()

    def rowCount(self, parent: Index = QModelIndex()) -> int:  # noqa: B008, N802 - Qt's name and default
        return 0 if parent.isValid() else len(self.order)

    def position(self, row: int) -> int:
        return int(self.order[row])

    def where(self, row: int) -> str:
        source, i = self.source, self.position(row)
        assert source is not None  # rows exist only with a source
        return readable(str(source.files[i]) if source.files is not None else f"{source.path}, row {i}")

    def data(self, index: Index, role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if not index.isValid() or self.source is None:
            return None
        row = index.row()
        source = self.source
        if role == Qt.ItemDataRole.DisplayRole:
            return label_text(source.targets[self.position(row)], source.task, source.class_names)
        if role == Qt.ItemDataRole.ToolTipRole:
            text = label_text(source.targets[self.position(row)], source.task, source.class_names)
            broken = "\n(cannot be read now: it changed since the scan)" if self.thumbs.get(row, 0) is None else ""
            return f"{text}\n{self.where(row)}{broken}"
        if role == Qt.ItemDataRole.DecorationRole:
            if row in self.thumbs:
                self.thumbs.move_to_end(row)
                return self.thumbs[row] or self._placeholder
            self.queued[row] = None
            self.queued.move_to_end(row)
            if not self._timer.isActive() and self.task is None:
                self._timer.start()
            return self._placeholder
        return None

    def _start_task(self) -> None:
        if self.task is not None or self.source is None:
            return
        # Rows no longer on screen are dropped: the view asks for them again when they return. (A snapshot: asking
        # the view where a row is may lay it out, which asks for more rows.)
        asked = list(self.queued)
        self.queued.clear()
        rows: list[int] = []
        later: list[int] = []
        for row in reversed(asked):  # the latest asked first: where the user looks now
            if row in self.thumbs or not self.on_screen(row):  # made while asked again, or scrolled past
                continue
            (rows if len(rows) < THUMBS_PER_TASK else later).append(row)
        for row in reversed(later):  # on screen still: the next task's
            self.queued[row] = None
        if not rows:
            return
        generation = self._generation
        self.task = run_task(
            "sample thumbnails",
            decode_thumbnails,
            self.source,
            [(row, self.position(row)) for row in rows],
            self.size,
            progress=True,
            on_result=lambda result: self._arrived(generation, result),
            on_error=lambda exc, tb: self._failed(generation),
        )

    def _arrived(self, generation: int, result: list[tuple[int, np.ndarray | None]]) -> None:
        if generation != self._generation:
            return
        self.task = None
        for row, pixels in result:
            if pixels is None:
                self.thumbs[row] = None
            else:
                h, w = pixels.shape[:2]
                image = QImage(pixels.data, w, h, 3 * w, QImage.Format.Format_RGB888).copy()
                self.thumbs[row] = QPixmap.fromImage(image)
            self.decoded += 1
            index = self.index(row)
            self.dataChanged.emit(index, index, [Qt.ItemDataRole.DecorationRole])
        while len(self.thumbs) > KEPT_THUMBS:
            self.thumbs.popitem(last=False)
        self.thumbnails_arrived.emit(len(result))
        if self.queued:
            self._timer.start()

    def _failed(self, generation: int) -> None:
        if generation == self._generation:
            self.task = None

    def is_busy(self) -> bool:
        return self.task is not None or self._timer.isActive()


class SkippedModel(QAbstractTableModel):
    """The files a scan could not use and why: two columns, any number of rows."""

    HEADERS = ("File", "Reason")

    def __init__(self, parent: QObject | None = None):
        super().__init__(parent)
        self.rows: list[tuple[str, str]] = []

    def show(self, rows: list[tuple[str, str]]) -> None:
        self.beginResetModel()
        self.rows = rows
        self.endResetModel()

    def rowCount(self, parent: Index = QModelIndex()) -> int:  # noqa: B008, N802 - Qt's name and default
        return 0 if parent.isValid() else len(self.rows)

    def columnCount(self, parent: Index = QModelIndex()) -> int:  # noqa: B008, N802 - Qt's name and default
        return 0 if parent.isValid() else 2

    def data(self, index: Index, role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if not index.isValid():
            return None
        if role in (Qt.ItemDataRole.DisplayRole, Qt.ItemDataRole.ToolTipRole):
            return self.rows[index.row()][index.column()]
        return None

    def headerData(self, section: int, orientation: Qt.Orientation, role: int = Qt.ItemDataRole.DisplayRole) -> Any:  # noqa: N802
        if role == Qt.ItemDataRole.DisplayRole and orientation == Qt.Orientation.Horizontal:
            return self.HEADERS[section]
        return None
