"""Evaluated samples as a grid of thumbnails (decoded lazily off the GUI thread and cached) and a large view of one
with its class probabilities and class activation map."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import shiboken6
from PIL import Image
from PySide6.QtCore import QAbstractListModel, QModelIndex, QPersistentModelIndex, QSize, Qt, QTimer, QUrl, Signal
from PySide6.QtGui import QDesktopServices, QIcon, QImage, QKeyEvent, QPixmap
from PySide6.QtWidgets import (
    QAbstractItemView,
    QApplication,
    QCheckBox,
    QComboBox,
    QDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QListView,
    QMenu,
    QPushButton,
    QSizePolicy,
    QStyle,
    QVBoxLayout,
    QWidget,
)

from widgets.lifetime import delete_on_close, forget_when_destroyed
from widgets.look import ERROR_COLOUR, fit_pixels
from widgets.tasks import Task, run_task
from widgets.try_it import PredictorCache

OBJECT_NAMES = {
    "samples.title": "which evaluated samples the grid shows: a confusion-matrix cell or a class",
    "samples.grid": "the chosen samples' thumbnails, most telling first; Enter or a double click opens one large",
    "samples.cam": "lays each thumbnail's class activation map (predicted class) over it",
    "sample.image": "the sample large, with its class activation map when shown",
    "sample.path": "the sample's file (or .npz row)",
    "sample.open_folder": "opens the folder that holds the sample's file",
    "sample.probabilities": "the model's five most likely classes for the sample",
    "sample.show_cam": "lays the class activation map over the image",
    "sample.cam_class": "which class the map explains (the predicted one by default)",
    "sample.cam_method": "the map's method: Grad-CAM, or the sharper Grad-CAM++ and LayerCAM",
    "sample.cam_layer": "which layer the map is read from (automatic: the last spatial feature map)",
    "sample.previous": "shows the previous sample of the grid",
    "sample.next": "shows the next sample of the grid",
    "sample.message": "why a map or an image cannot be shown",
}

THUMBNAIL = 96
CACHE_LIMIT = 4000  # thumbnails kept (96 px RGB, about 27 kB each)
BATCH = 48  # thumbnails decoded per background task: about one screen
LARGE = 448  # the longer side of the large view
ROW_ROLE = Qt.ItemDataRole.UserRole + 1

# One loaded model for every map these views make (reloaded when the checkpoint file changes).
_PREDICTORS = PredictorCache()


def predictor_cache() -> PredictorCache:
    return _PREDICTORS


class _Pixels:
    """Reads a sample's stored pixels: an image file, or a row of the evaluated .npz ("row N")."""

    def __init__(self, arrays: dict | None):
        self.arrays = arrays or {}
        self._rows: Any = None
        self._error = ""

    def __call__(self, path: str) -> np.ndarray:
        from engine.data import array_to_tensor, load_image, scan_source

        if not (path.startswith("row ") and not Path(path).exists()):
            return np.array(load_image(path), dtype=np.uint8)  # writable: torch warns on a read-only array
        if self._rows is None and not self._error:
            try:
                a = self.arrays
                source = scan_source(
                    a["path"], kind=a["kind"], task=a["task"], class_names=a["class_names"] if a["given"] else None
                )
                self._rows = source.array
                if self._rows is None:
                    self._error = f"{a['path']} holds no image array"
            except Exception as exc:  # noqa: BLE001 - a dataset gone since the evaluation: said on each sample
                self._error = str(exc) or type(exc).__name__
        if self._rows is None:
            raise ValueError(self._error or "no image array for this sample")
        chw = array_to_tensor(self._rows[int(path[4:])]).clamp(0, 1)
        return np.rint(chw.permute(1, 2, 0).numpy() * 255).astype(np.uint8)


def thumbnails_job(
    paths: Sequence[str],
    arrays: dict | None,
    size: int,
    cam: dict | None,
    *,
    progress: Callable[[Any], None],
    cancel: threading.Event,
) -> dict[str, Any] | None:
    """{path: RGB array fitting size x size, or the reason it cannot be shown}; partial dicts go out as progress.

    cam: {"checkpoint", "method"} to lay each sample's map (for its predicted class) over it.
    """
    from engine.cam import overlay

    read = _Pixels(arrays)
    out: dict[str, Any] = {}
    for path in paths:
        if cancel.is_set():
            return None
        try:
            pixels = read(path)
            if cam is not None:
                predictor = _PREDICTORS.get(cam["checkpoint"])
                made = predictor.activation_map(pixels, method=cam["method"])
                pixels = overlay(pixels, made["map"])
            out[path] = fit_pixels(Image.fromarray(pixels), size)
        except Exception as exc:  # noqa: BLE001 - one unreadable image must not hide the others
            out[path] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        progress(dict(out))
    return out


def to_pixmap(pixels: np.ndarray) -> QPixmap:
    h, w = pixels.shape[:2]
    data = np.ascontiguousarray(pixels[..., :3])
    return QPixmap.fromImage(QImage(data.data, w, h, data.strides[0], QImage.Format.Format_RGB888).copy())


class SampleModel(QAbstractListModel):
    """Rows of evaluated samples; each row's thumbnail is asked for only when the view paints it."""

    thumbnails_loaded = Signal()

    def __init__(self, parent: Any = None):
        super().__init__(parent)
        self._rows: list[dict] = []
        self._arrays: dict | None = None
        self._checkpoint: str | None = None
        self._cam_method: str | None = None  # None: plain thumbnails
        self._cache: OrderedDict[tuple, QPixmap | str] = OrderedDict()
        self._pending: list[str] = []
        self._asked: set[tuple] = set()
        self._task: Task | None = None
        self._generation = 0
        self._placeholder: QIcon | None = None

    # --- content

    def set_rows(self, rows: Sequence[dict], arrays: dict | None, checkpoint: str | None) -> None:
        self.beginResetModel()
        self._rows = list(rows)
        if (arrays, checkpoint) != (self._arrays, self._checkpoint):
            self._cache.clear()
        self._arrays, self._checkpoint = arrays, checkpoint
        self._forget_pending()
        self.endResetModel()

    def rows(self) -> list[dict]:
        return list(self._rows)

    def set_cam(self, method: str | None) -> None:
        """Overlay the maps (method: gradcam, gradcam++, layercam) or show the plain images (None)."""
        if method == self._cam_method:
            return
        self._cam_method = method
        self._forget_pending()
        if self._rows:
            self.dataChanged.emit(self.index(0), self.index(len(self._rows) - 1), [Qt.ItemDataRole.DecorationRole])

    def _forget_pending(self) -> None:
        self._generation += 1
        self._pending.clear()
        self._asked.clear()
        if self._task is not None and self._task.is_running():
            self._task.cancel.set()
        self._task = None

    # --- Qt model

    def rowCount(self, parent: QModelIndex | QPersistentModelIndex = QModelIndex()) -> int:  # noqa: N802
        return 0 if parent.isValid() else len(self._rows)

    def data(self, index: QModelIndex | QPersistentModelIndex, role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if not index.isValid() or index.row() >= len(self._rows):
            return None
        row = self._rows[index.row()]
        if role == Qt.ItemDataRole.DisplayRole:
            return f"true {row['true']}\npred {row['predicted']}\n{row['confidence'] * 100:.1f}%"
        if role == Qt.ItemDataRole.DecorationRole:
            return self._thumbnail(row["path"])
        if role == Qt.ItemDataRole.ToolTipRole:
            tip = (
                f"{row['path']}\ntrue: {row['true']}\npredicted: {row['predicted']} "
                f"({row['confidence'] * 100:.1f}%)\nloss: {row['loss']:.4g}"
            )
            shown = self._cache.get(self._key(row["path"]))
            return f"{tip}\nimage not shown: {shown}" if isinstance(shown, str) else tip
        if role == ROW_ROLE:
            return row
        if role == Qt.ItemDataRole.TextAlignmentRole:
            return int(Qt.AlignmentFlag.AlignHCenter | Qt.AlignmentFlag.AlignTop)
        return None

    # --- thumbnails

    def _key(self, path: str) -> tuple:
        return (path, self._cam_method)

    def is_loaded(self, row: int) -> bool:
        return self._key(self._rows[row]["path"]) in self._cache

    def thumbnail_of(self, row: int) -> QPixmap | str | None:
        return self._cache.get(self._key(self._rows[row]["path"]))

    def _thumbnail(self, path: str) -> Any:
        key = self._key(path)
        hit = self._cache.get(key)
        if isinstance(hit, QPixmap):
            self._cache.move_to_end(key)
            return hit
        if isinstance(hit, str):
            return QApplication.style().standardIcon(QStyle.StandardPixmap.SP_MessageBoxWarning)
        if key not in self._asked:
            self._asked.add(key)
            self._pending.append(path)
            if len(self._pending) == 1:
                QTimer.singleShot(0, self, self._start_next)
        return self._blank()

    def _blank(self) -> QIcon:
        if self._placeholder is None:
            pixmap = QPixmap(THUMBNAIL, THUMBNAIL)
            pixmap.fill(Qt.GlobalColor.transparent)
            self._placeholder = QIcon(pixmap)
        return self._placeholder

    def _start_next(self) -> None:
        if (self._task is not None and self._task.is_running()) or not self._pending:
            return
        # Newest requests first: what the view paints now, not what it scrolled past.
        batch = self._pending[-BATCH:][::-1]
        del self._pending[-BATCH:]
        cam = None
        if self._cam_method is not None and self._checkpoint:
            cam = {"checkpoint": self._checkpoint, "method": self._cam_method}
        gen, method = self._generation, self._cam_method
        self._task = run_task(
            "sample thumbnails",
            thumbnails_job,
            batch,
            self._arrays,
            THUMBNAIL,
            cam,
            progress=True,
            on_progress=partial(self._on_loaded, gen, method),
            on_result=partial(self._on_batch_done, gen, method),
            on_error=partial(self._on_batch_failed, gen),
        )

    def _on_loaded(self, gen: int, method: str | None, images: dict | None) -> None:
        if not shiboken6.isValid(self) or gen != self._generation or not images:
            return
        positions = {r["path"]: i for i, r in enumerate(self._rows)}
        changed = []
        for path, image in images.items():
            key = (path, method)
            if key in self._cache:
                continue
            self._cache[key] = to_pixmap(image) if isinstance(image, np.ndarray) else str(image)
            if path in positions:
                changed.append(positions[path])
        while len(self._cache) > CACHE_LIMIT:
            old, _ = self._cache.popitem(last=False)
            self._asked.discard(old)
        for row in changed:
            self.dataChanged.emit(self.index(row), self.index(row), [Qt.ItemDataRole.DecorationRole])
        if changed:
            self.thumbnails_loaded.emit()

    def _on_batch_done(self, gen: int, method: str | None, images: dict | None) -> None:
        self._on_loaded(gen, method, images)
        if shiboken6.isValid(self) and gen == self._generation:
            self._task = None
            QTimer.singleShot(0, self, self._start_next)

    def _on_batch_failed(self, gen: int, exc: BaseException, tb: str) -> None:
        if gen == self._generation:
            self._task = None

    def is_busy(self) -> bool:
        return bool(self._pending) or (self._task is not None and self._task.is_running())


class SampleGrid(QListView):
    """The thumbnails in icon mode; Enter opens the current one (arrow keys move as in any list)."""

    opened = Signal(int)  # the row to show large

    def __init__(self, model: SampleModel, parent: QWidget | None = None):
        super().__init__(parent)
        self.setObjectName("samples.grid")
        self.setModel(model)
        self.setViewMode(QListView.ViewMode.IconMode)
        self.setIconSize(QSize(THUMBNAIL, THUMBNAIL))
        self.setResizeMode(QListView.ResizeMode.Adjust)
        self.setMovement(QListView.Movement.Static)
        self.setWrapping(True)
        self.setWordWrap(True)
        self.setUniformItemSizes(True)  # the view lays out thousands of rows without asking each its size
        self.setLayoutMode(QListView.LayoutMode.Batched)
        self.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        fm = self.fontMetrics()
        self.setGridSize(QSize(max(THUMBNAIL, fm.horizontalAdvance("M" * 11)) + 16, THUMBNAIL + 3 * fm.height() + 16))
        self.activated.connect(lambda index: self.opened.emit(index.row()))
        self.doubleClicked.connect(lambda index: self.opened.emit(index.row()))

    def keyPressEvent(self, event: QKeyEvent) -> None:  # noqa: N802 - Qt's name
        if event.key() in (Qt.Key.Key_Return, Qt.Key.Key_Enter, Qt.Key.Key_Space) and self.currentIndex().isValid():
            self.opened.emit(self.currentIndex().row())
            return
        super().keyPressEvent(event)


def _map_job(
    checkpoint: str,
    path: str,
    arrays: dict | None,
    class_name: str | None,
    method: str,
    layer: str | None,
    with_layers: bool,
) -> dict:
    """A sample's pixels and, when a checkpoint is given, its map and probabilities (plain values back)."""
    from engine.cam import overlay

    pixels = _Pixels(arrays)(path)
    out: dict[str, Any] = {"path": path, "pixels": fit_pixels(Image.fromarray(pixels), LARGE)}
    predictor = _PREDICTORS.get(checkpoint)
    made = predictor.activation_map(pixels, class_name=class_name, method=method, layer=layer)
    out.update(
        overlay=fit_pixels(Image.fromarray(overlay(pixels, made["map"])), LARGE),
        cam_class=made["class"],
        layer=made["layer"],
        probabilities=made["probabilities"],
        layers=predictor.spatial_layers() if with_layers else None,
    )
    return out


class SampleDialog(QDialog):
    """One sample large: image (with its class activation map), top-5 probabilities, file path; Left/Right move."""

    def __init__(
        self,
        rows: Sequence[dict],
        row: int,
        *,
        checkpoint: str | None,
        arrays: dict | None,
        class_names: Sequence[str],
        make_actions: Callable[[QDialog], QWidget | None] | None = None,
        parent: QWidget | None = None,
    ):
        super().__init__(parent)
        self.setWindowTitle("Sample")
        self.rows = list(rows)
        self.row = row
        self.checkpoint = checkpoint
        self.arrays = arrays
        self.class_names = list(class_names)
        self.shown: dict | None = None
        self._task: Task | None = None
        self._request = 0
        self._layers_known = False

        self.image = QLabel()
        self.image.setObjectName("sample.image")
        self.image.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.image.setMinimumSize(QSize(LARGE // 2, LARGE // 2))
        self.image.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        self.caption = QLabel()
        self.caption.setWordWrap(True)
        self.path = QLabel()
        self.path.setObjectName("sample.path")
        self.path.setWordWrap(True)
        self.path.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.open_folder = QPushButton("Open containing folder")
        self.open_folder.setObjectName("sample.open_folder")
        self.open_folder.clicked.connect(self._on_open_folder_clicked)
        self.probabilities = QLabel()
        self.probabilities.setObjectName("sample.probabilities")
        self.probabilities.setTextFormat(Qt.TextFormat.PlainText)
        self.message = QLabel()
        self.message.setObjectName("sample.message")
        self.message.setWordWrap(True)
        self.message.setStyleSheet(f"color: {ERROR_COLOUR};")
        self.message.hide()

        self.show_cam = QCheckBox("Show class activation map")
        self.show_cam.setObjectName("sample.show_cam")
        self.show_cam.setChecked(True)
        self.show_cam.toggled.connect(self._show_image)
        self.cam_class = QComboBox()
        self.cam_class.setObjectName("sample.cam_class")
        self.cam_class.addItem("Predicted class", None)
        for name in self.class_names:
            self.cam_class.addItem(name, name)
        self.cam_method = QComboBox()
        self.cam_method.setObjectName("sample.cam_method")
        for key, label in (("gradcam", "Grad-CAM"), ("gradcam++", "Grad-CAM++"), ("layercam", "LayerCAM")):
            self.cam_method.addItem(label, key)
        self.cam_layer = QComboBox()
        self.cam_layer.setObjectName("sample.cam_layer")
        self.cam_layer.addItem("Automatic (last spatial map)", None)
        for combo in (self.cam_class, self.cam_method, self.cam_layer):
            combo.currentIndexChanged.connect(self._load)

        self.previous = QPushButton("Previous")
        self.previous.setObjectName("sample.previous")
        self.previous.clicked.connect(lambda: self.go(self.row - 1))
        self.next = QPushButton("Next")
        self.next.setObjectName("sample.next")
        self.next.clicked.connect(lambda: self.go(self.row + 1))

        side = QVBoxLayout()
        side.addWidget(self.caption)
        side.addWidget(self.probabilities)
        form = QFormLayout()
        form.addRow(self.show_cam)
        form.addRow("Map of", self.cam_class)
        form.addRow("Method", self.cam_method)
        form.addRow("Layer", self.cam_layer)
        side.addLayout(form)
        # What a front end lets the user do with the sample (relabel, exclude): a widget with set_sample(row).
        self.action_bar = make_actions(self) if make_actions is not None else None
        if self.action_bar is not None:
            side.addWidget(self.action_bar)
        side.addStretch(1)
        body = QHBoxLayout()
        body.addWidget(self.image, 3)
        body.addLayout(side, 2)
        path_row = QHBoxLayout()
        path_row.addWidget(self.path, 1)
        path_row.addWidget(self.open_folder)
        nav = QHBoxLayout()
        nav.addWidget(self.previous)
        nav.addWidget(self.next)
        nav.addStretch(1)
        layout = QVBoxLayout(self)
        layout.addLayout(body, 1)
        layout.addWidget(self.message)
        layout.addLayout(path_row)
        layout.addLayout(nav)
        self.resize(900, 600)
        self.go(row)

    def current(self) -> dict:
        return self.rows[self.row]

    def go(self, row: int) -> None:
        if not 0 <= row < len(self.rows):
            return
        self.row = row
        r = self.current()
        self.previous.setEnabled(row > 0)
        self.next.setEnabled(row < len(self.rows) - 1)
        self.caption.setText(
            f"{row + 1} of {len(self.rows)}: true {r['true']}, predicted {r['predicted']} "
            f"({r['confidence'] * 100:.1f}%), loss {r['loss']:.4g}"
        )
        self.path.setText(r["path"])
        self.open_folder.setEnabled(Path(r["path"]).exists())
        self.probabilities.setText(
            "Top classes:\n" + "\n".join(f"  {name}: {p * 100:.1f}%" for name, p in r.get("top", []))
        )
        if self.action_bar is not None and hasattr(self.action_bar, "set_sample"):
            self.action_bar.set_sample(r)
        self._load()

    def _load(self) -> None:
        self._request += 1
        request = self._request
        self.shown = None
        self.image.setText("Loading...")
        self.message.hide()
        if not self.checkpoint:
            self.message.setText("No checkpoint: the map needs the model.")
            self.message.show()
            return
        self._task = run_task(
            "sample map",
            _map_job,
            self.checkpoint,
            self.current()["path"],
            self.arrays,
            self.cam_class.currentData(),
            self.cam_method.currentData(),
            self.cam_layer.currentData(),
            not self._layers_known,
            on_result=partial(self._on_loaded, request),
            on_error=partial(self._on_failed, request),
        )

    def _on_loaded(self, request: int, result: dict) -> None:
        if request != self._request:
            return
        self.shown = result
        if result.get("layers") and not self._layers_known:
            self._layers_known = True
            self.cam_layer.blockSignals(True)
            for name in result["layers"]:
                self.cam_layer.addItem(name, name)
            self.cam_layer.blockSignals(False)
        self.show_cam.setText(f"Show class activation map ({result['cam_class']}, layer {result['layer']})")
        self._show_image()

    def _on_failed(self, request: int, exc: BaseException, tb: str) -> None:
        if request != self._request:
            return
        self.image.setText("")
        self.message.setText(f"Cannot show the map: {exc}")
        self.message.show()

    def _show_image(self) -> None:
        if self.shown is None:
            return
        pixels = self.shown["overlay"] if self.show_cam.isChecked() else self.shown["pixels"]
        self.image.setPixmap(to_pixmap(pixels))

    def _on_open_folder_clicked(self) -> None:
        QDesktopServices.openUrl(QUrl.fromLocalFile(str(Path(self.current()["path"]).parent)))

    def keyPressEvent(self, event: QKeyEvent) -> None:  # noqa: N802 - Qt's name
        if event.key() == Qt.Key.Key_Left:
            self.go(self.row - 1)
        elif event.key() == Qt.Key.Key_Right:
            self.go(self.row + 1)
        else:
            super().keyPressEvent(event)

    def wait(self, ms: int = 60000) -> bool:
        return self._task is None or not self._task.is_running() or self._task.wait(ms)

    def done(self, code: int) -> None:
        self._request += 1
        super().done(code)


class SampleBrowser(QWidget):
    """A title, a CAM toggle and the grid; opens a SampleDialog for a row."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.model = SampleModel(self)
        self.title = QLabel("Click a cell of the confusion matrix or a row of the per-class table.")
        self.title.setObjectName("samples.title")
        self.title.setWordWrap(True)
        self.cam = QCheckBox("Show activation maps")
        self.cam.setObjectName("samples.cam")
        self.cam.setToolTip("Lay each thumbnail's Grad-CAM map (for its predicted class) over it")
        self.cam.toggled.connect(self._on_cam_toggled)
        self.grid = SampleGrid(self.model)
        self.grid.opened.connect(self.open_row)
        self.grid.setContextMenuPolicy(Qt.ContextMenuPolicy.CustomContextMenu)
        self.grid.customContextMenuRequested.connect(self._on_context_menu)
        # Where Relabel as... / Exclude from training go (widgets.corrections_panel.CorrectionsPanel); None: not offered.
        self.corrections: Any = None
        self.class_names: list[str] = []
        self.checkpoint: str | None = None
        self.arrays: dict | None = None
        self.dialog: SampleDialog | None = None
        self.make_actions: Callable[[QDialog], QWidget | None] | None = None
        top = QHBoxLayout()
        top.addWidget(self.title, 1)
        top.addWidget(self.cam)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(top)
        layout.addWidget(self.grid, 1)

    def show_samples(
        self,
        title: str,
        rows: Sequence[dict],
        *,
        arrays: dict | None,
        checkpoint: str | None,
        class_names: Sequence[str],
    ) -> None:
        self.title.setText(title)
        self.class_names = list(class_names)
        self.checkpoint, self.arrays = checkpoint, arrays
        self.model.set_rows(rows, arrays, checkpoint)
        if rows:
            self.grid.setCurrentIndex(self.model.index(0))
        self.grid.scrollToTop()

    def clear(self) -> None:
        self.show_samples(
            "Click a cell of the confusion matrix or a row of the per-class table.",
            [],
            arrays=None,
            checkpoint=None,
            class_names=[],
        )

    def context_menu(self, row: int) -> QMenu:
        """Open large, and (with a project to keep them in) Relabel as... and Exclude from training."""
        menu = QMenu(self)
        menu.addAction("Open large", lambda: self.open_row(row))
        sample = self.model.rows()[row]
        if self.corrections is not None and not self.corrections.why_not_correctable(sample["path"]):
            relabel = menu.addMenu("Relabel as...")
            for name in self.class_names:
                if name != sample["true"]:
                    relabel.addAction(name, partial(self.corrections.relabel, sample["path"], name))
            menu.addAction("Exclude from training", partial(self.corrections.exclude, sample["path"]))
        return menu

    def _on_context_menu(self, pos: Any) -> None:
        index = self.grid.indexAt(pos)
        if index.isValid():
            menu = self.context_menu(index.row())
            menu.exec(self.grid.viewport().mapToGlobal(pos))
            menu.deleteLater()  # one menu per right-click: deleted once used, on the GUI thread

    def _on_cam_toggled(self, on: bool) -> None:
        self.model.set_cam("gradcam" if on else None)

    def open_row(self, row: int) -> SampleDialog:
        if self.dialog is not None and shiboken6.isValid(self.dialog):
            self.dialog.close()
        dialog = SampleDialog(
            self.model.rows(),
            row,
            checkpoint=self.checkpoint,
            arrays=self.arrays,
            class_names=self.class_names,
            make_actions=self.make_actions,
            parent=self,
        )
        # One per sample opened: deleted when closed, on the GUI thread (widgets/lifetime.py says why).
        delete_on_close(dialog)
        forget_when_destroyed(self, "dialog", dialog)
        dialog.show()
        return dialog
