"""The Try it panel: open or drop an image and see what the current model predicts for it."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PySide6.QtCore import QSize, Qt, Signal
from PySide6.QtGui import QDragEnterEvent, QDropEvent, QImage, QPalette, QPixmap, QResizeEvent
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFrame,
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QSizePolicy,
    QVBoxLayout,
    QWidget,
)

from widgets.folders import chosen_path, open_file_dialog, remember_folder, remembered_folder, start_folder
from widgets.look import ERROR_COLOUR, fit_pixels
from widgets.tasks import Task, run_task

if TYPE_CHECKING:
    from engine.predict import Predictor

# The engine's prediction code imports PyTorch: it is imported on the worker thread that predicts.

OBJECT_NAMES = {
    "tryit.open_image": "opens an image file and shows what the current model predicts for it",
    "tryit.checkpoint": "which checkpoint (model) the predictions come from",
    "tryit.image": "the image being predicted; drop an image file here",
    "tryit.predictions": "the top predictions as bars: class and probability (values for regression)",
    "tryit.message": "why there is no prediction (no model yet, an unreadable image, a bad checkpoint)",
    "tryit.progress": "busy indicator while the model loads and predicts",
    "tryit.show_cam": "lays the class activation map over the image: where the model looked",
    "tryit.cam_class": "which class the map explains (the predicted one by default)",
    "tryit.cam_method": "the map's method: Grad-CAM, or the sharper Grad-CAM++ and LayerCAM",
}

TOP_K = 10
DISPLAY_SIZE = 320  # the longest side of the image as shown; decoded and scaled in the background
NO_MODEL = "No model yet: train or restore a checkpoint first."
IMAGE_DIR_KEY = "tryit/last_image_dir"  # QSettings: the folder of the image last opened with the dialog
IMAGE_FILTER = "Images (*.png *.jpg *.jpeg *.bmp *.gif *.tif *.tiff *.webp *.ppm *.pgm);;All files (*)"


class PredictorCache:
    """One loaded model, reloaded only when its checkpoint file changes (last.pt is rewritten every epoch).

    Used only from background tasks, so the model never crosses into the GUI thread.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: tuple | None = None
        self._predictor: Predictor | None = None

    def get(self, checkpoint: str) -> Predictor:
        from engine.predict import Predictor

        try:
            st = os.stat(checkpoint)
            key = (str(Path(checkpoint).resolve()), st.st_mtime_ns, st.st_size)
        except OSError:
            key = None  # from_checkpoint says what is wrong with the path
        with self._lock:
            if key is None or key != self._key:
                self._predictor = None
                self._predictor = Predictor.from_checkpoint(checkpoint)
                self._key = key
            assert self._predictor is not None  # made above or by an earlier call
            return self._predictor


def predict_file(cache: PredictorCache, checkpoint: str, image_path: str) -> dict[str, Any]:
    """Decode the image, predict it with the checkpoint's model; plain values back (raises DataError/CheckpointError)."""
    from PIL import Image

    from engine.predict import read_image

    image = read_image(image_path)  # a DataError naming the file when it does not decode
    assert isinstance(image, Image.Image)  # a path reads as PIL (arrays as tensors)
    predictor = cache.get(checkpoint)
    predictions = predictor.predict(image)
    return {
        "checkpoint": checkpoint,
        "image": image_path,
        "size": image.size,
        "task": predictor.task,
        "info": dict(predictor.info),
        "predictions": predictions,
        "pixels": fit_pixels(image, DISPLAY_SIZE),
    }


def map_file(cache: PredictorCache, checkpoint: str, image_path: str, class_name: str | None, method: str) -> dict:
    """The image with its class activation map laid over it, fitted for display (plain values back)."""
    from PIL import Image

    from engine.cam import overlay

    made = cache.get(checkpoint).activation_map(image_path, class_name=class_name, method=method)
    return {
        "image": image_path,
        "pixels": fit_pixels(Image.fromarray(overlay(made["pixels"], made["map"])), DISPLAY_SIZE),
        "class": made["class"],
        "layer": made["layer"],
    }


class _Bars(QWidget):
    """Rows of class name, horizontal bar and value, for the top predictions."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.setObjectName("tryit.predictions")
        self.title = QLabel()
        self.title.setWordWrap(True)
        font = self.title.font()
        font.setBold(True)
        self.title.setFont(font)
        self.more = QLabel()
        self.more.setWordWrap(True)
        self.grid = QGridLayout()
        self.grid.setColumnStretch(1, 1)
        self.grid.setHorizontalSpacing(10)
        self.rows: list[tuple[QLabel, QProgressBar, QLabel]] = []
        for i in range(TOP_K):
            name, bar, value = QLabel(), QProgressBar(), QLabel()
            name.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
            bar.setRange(0, 1000)
            bar.setTextVisible(False)
            bar.setMinimumWidth(120)
            value.setAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
            value.setMinimumWidth(value.fontMetrics().horizontalAdvance("100.0%") + 6)
            self.grid.addWidget(name, i, 0)
            self.grid.addWidget(bar, i, 1)
            self.grid.addWidget(value, i, 2)
            self.rows.append((name, bar, value))
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.title)
        layout.addLayout(self.grid)
        layout.addWidget(self.more)
        layout.addStretch(1)
        self.show_predictions([], "classification")

    def show_predictions(self, predictions: list[tuple[str, float]], task: str) -> None:
        top = predictions[:TOP_K]
        self.title.setText(
            {
                "classification": "Most likely classes",
                "multilabel": "Labels (each probability on its own)",
                "regression": "Predicted values",
            }.get(task, "Predictions")
            if top
            else ""
        )
        for i, (name_label, bar, value_label) in enumerate(self.rows):
            visible = i < len(top)
            for widget in (name_label, bar, value_label):
                widget.setVisible(visible)
            if not visible:
                continue
            name, value = top[i]
            name_label.setText(name)
            name_label.setToolTip(name)
            if task == "regression":
                bar.hide()  # raw values have no common scale to draw
                value_label.setText(f"{value:.4g}")
            else:
                bar.setValue(int(round(max(0.0, min(1.0, value)) * 1000)))
                value_label.setText(f"{value * 100:.1f}%")
        hidden = len(predictions) - len(top)
        self.more.setText(
            f"... and {hidden} more {'outputs' if task == 'regression' else 'classes'}" if hidden > 0 else ""
        )
        self.more.setVisible(hidden > 0)


class TryItPanel(QWidget):
    """Shows one image and the current model's predictions for it, computed off the GUI thread."""

    predicted = Signal(list)  # [(name, probability or value), ...] as shown, most likely first
    logged = Signal(str)

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.setAcceptDrops(True)
        self._checkpoint: str | None = None
        self._image_path: str | None = None
        self._dataset_dir: str | None = None
        self._pixmap: QPixmap | None = None
        self._predictions: list[tuple[str, float]] = []
        self._cache = PredictorCache()
        self._request = 0
        self._tasks: list[Task] = []
        self._build()
        self.set_checkpoint(None)

    def _build(self) -> None:
        self.open_button = QPushButton("Open image...")
        self.open_button.setObjectName("tryit.open_image")
        self.open_button.clicked.connect(self._on_open_clicked)
        self.checkpoint_label = QLabel()
        self.checkpoint_label.setObjectName("tryit.checkpoint")
        self.checkpoint_label.setWordWrap(True)
        self.checkpoint_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.progress_bar = QProgressBar()
        self.progress_bar.setObjectName("tryit.progress")
        self.progress_bar.setRange(0, 0)
        self.progress_bar.setTextVisible(False)
        self.progress_bar.setMaximumWidth(160)
        self.progress_bar.hide()
        top = QHBoxLayout()
        top.addWidget(self.open_button)
        top.addWidget(self.progress_bar)
        top.addWidget(self.checkpoint_label, 1)

        self.message_label = QLabel()
        self.message_label.setObjectName("tryit.message")
        self.message_label.setWordWrap(True)
        self.message_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)

        self.image_label = QLabel("Drop an image here, or use Open image...")
        self.image_label.setObjectName("tryit.image")
        self.image_label.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.image_label.setWordWrap(True)
        self.image_label.setFrameShape(QFrame.Shape.StyledPanel)
        self.image_label.setBackgroundRole(QPalette.ColorRole.Base)
        self.image_label.setAutoFillBackground(True)
        self.image_label.setMinimumSize(QSize(240, 240))
        self.image_label.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        self.image_caption = QLabel()
        self.image_caption.setWordWrap(True)
        self.image_caption.setAlignment(Qt.AlignmentFlag.AlignCenter)
        left = QVBoxLayout()
        left.addWidget(self.image_label, 1)
        left.addWidget(self.image_caption)

        self.show_cam = QCheckBox("Show class activation map")
        self.show_cam.setObjectName("tryit.show_cam")
        self.show_cam.setToolTip("Colour where the model looked to score the class (Grad-CAM and variants)")
        self.cam_class = QComboBox()
        self.cam_class.setObjectName("tryit.cam_class")
        self.cam_class.addItem("Predicted class", None)
        self.cam_method = QComboBox()
        self.cam_method.setObjectName("tryit.cam_method")
        for key, label in (("gradcam", "Grad-CAM"), ("gradcam++", "Grad-CAM++"), ("layercam", "LayerCAM")):
            self.cam_method.addItem(label, key)
        self.show_cam.toggled.connect(self._on_cam_changed)
        self.cam_class.currentIndexChanged.connect(self._on_cam_changed)
        self.cam_method.currentIndexChanged.connect(self._on_cam_changed)
        cam_row = QHBoxLayout()
        cam_row.addWidget(self.show_cam)
        cam_row.addWidget(self.cam_class)
        cam_row.addWidget(self.cam_method)
        cam_row.addStretch(1)
        left.addLayout(cam_row)
        self._plain_pixmap: QPixmap | None = None
        self._cam_request = 0

        self.bars = _Bars()
        body = QHBoxLayout()
        body.addLayout(left, 1)
        body.addWidget(self.bars, 1)

        layout = QVBoxLayout(self)
        layout.addLayout(top)
        layout.addWidget(self.message_label)
        layout.addLayout(body, 1)

    # -- the model -----------------------------------------------------------------------------
    def set_checkpoint(self, path: str | None) -> None:
        """Use this checkpoint's model (None: no model yet); a shown image is predicted again with it."""
        self._checkpoint = str(path) if path else None
        has_model = self._checkpoint is not None
        self.open_button.setEnabled(has_model)
        self.open_button.setToolTip("Choose an image to classify" if has_model else NO_MODEL)
        if not has_model:
            self._request += 1  # a running prediction belongs to the old model
            self._set_busy(False)
            self.checkpoint_label.setText("Model: none")
            self._show_message(NO_MODEL, error=False)
            self._show_predictions([], "classification")
            return
        checkpoint = self._checkpoint
        assert checkpoint is not None  # the branch above handles no model
        p = Path(checkpoint)
        self.checkpoint_label.setText(f"Model: {p.name} in {p.parent}")
        self.checkpoint_label.setToolTip(checkpoint)
        self._show_message("")
        if self._image_path is not None:
            self._start_prediction(self._image_path)

    def checkpoint(self) -> str | None:
        return self._checkpoint

    # -- images --------------------------------------------------------------------------------
    def open_image(self, path: str) -> None:
        """Show an image and predict it with the current model (the main window calls this for a dropped image)."""
        if self._checkpoint is None:
            self._show_message(f"Cannot predict {Path(path).name}: {NO_MODEL[0].lower()}{NO_MODEL[1:]}", error=True)
            return
        self._start_prediction(str(path))

    def set_dataset_dir(self, path: str | os.PathLike | None) -> None:
        """The project's dataset folder: where Open image... starts before any image was chosen."""
        self._dataset_dir = str(path) if path else None

    def image_dialog(self) -> QFileDialog:
        """The Open image dialog, not yet shown: beside the image shown, else where an image was last chosen
        (remembered across sessions), else in the project's dataset."""
        start = start_folder(self._image_path, remembered_folder(IMAGE_DIR_KEY), self._dataset_dir)
        return open_file_dialog(self, "Open an image to predict", start, IMAGE_FILTER)

    def _on_open_clicked(self) -> None:
        path = chosen_path(self.image_dialog())
        if path:
            remember_folder(IMAGE_DIR_KEY, path)
            self.open_image(path)

    def dragEnterEvent(self, event: QDragEnterEvent) -> None:  # noqa: N802 - Qt's name
        if any(url.isLocalFile() for url in event.mimeData().urls()):
            event.acceptProposedAction()
        else:
            event.ignore()

    def dropEvent(self, event: QDropEvent) -> None:  # noqa: N802 - Qt's name
        paths = [url.toLocalFile() for url in event.mimeData().urls() if url.isLocalFile()]
        if paths:
            event.acceptProposedAction()
            self.open_image(paths[0])

    # -- predicting ----------------------------------------------------------------------------
    def _start_prediction(self, image_path: str) -> None:
        self._request += 1
        rid = self._request
        self._tasks = [t for t in self._tasks if t.is_running()]
        self._set_busy(True)
        self._show_message("")
        self._tasks.append(
            run_task(
                "predict image",
                predict_file,
                self._cache,
                self._checkpoint,
                image_path,
                on_result=lambda result: self._on_prediction_returned(rid, result),
                on_error=lambda exc, tb: self._on_prediction_errored(rid, image_path, exc, tb),
            )
        )

    def is_busy(self) -> bool:
        return any(t.is_running() for t in self._tasks)

    def wait(self, ms: int = 60000) -> bool:
        """Block until this panel's predictions are done (tests, closing the window)."""
        ok = True
        for task in list(self._tasks):
            ok = task.wait(ms) and ok
        return ok

    def _on_prediction_returned(self, rid: int, result: dict) -> None:
        if rid != self._request:
            return
        self._set_busy(False)
        self._image_path = result["image"]
        pixels = result["pixels"]
        h, w = pixels.shape[:2]
        self._pixmap = QPixmap.fromImage(QImage(pixels.data, w, h, 3 * w, QImage.Format.Format_RGB888).copy())
        self._plain_pixmap = self._pixmap
        self._update_pixmap()
        if result["task"] == "classification":
            names = sorted(name for name, _ in result["predictions"])
            if [self.cam_class.itemData(i) for i in range(1, self.cam_class.count())] != names:
                self.cam_class.blockSignals(True)
                while self.cam_class.count() > 1:
                    self.cam_class.removeItem(1)
                for name in names:
                    self.cam_class.addItem(name, name)
                self.cam_class.blockSignals(False)
        self._on_cam_changed()
        width, height = result["size"]
        self.image_caption.setText(f"{Path(result['image']).name} ({width} x {height})")
        self.image_caption.setToolTip(result["image"])
        info = result["info"]
        epoch = f", epoch {info['epoch']}" if info.get("epoch") is not None else ""
        p = Path(result["checkpoint"])
        self.checkpoint_label.setText(
            f"Model: {info.get('backbone', '?')}{epoch}, {info.get('num_classes')} "
            f"{'outputs' if result['task'] == 'regression' else 'classes'} "
            f"({p.name} in {p.parent})"
        )
        self._show_predictions(result["predictions"], result["task"])
        if result["predictions"]:
            name, value = result["predictions"][0]
            shown = f"{value:.4g}" if result["task"] == "regression" else f"{value * 100:.1f}%"
            self.logged.emit(f"Try it: {Path(result['image']).name} -> {name} ({shown})")

    def _on_prediction_errored(self, rid: int, image_path: str, exc: BaseException, tb: str) -> None:
        from engine.checkpoints import CheckpointError
        from engine.data import DataError

        if rid != self._request:
            return
        self._set_busy(False)
        if isinstance(exc, DataError):
            message = str(exc) if image_path in str(exc) else f"cannot read image {image_path}: {exc}"
        elif isinstance(exc, CheckpointError):
            message = f"Cannot load the model: {exc}"
        else:  # unexpected: a short message here, the traceback in the log
            message = f"Prediction failed for {image_path}: {type(exc).__name__}: {exc}"
            self.logged.emit(tb)
        self._show_predictions([], "classification")
        if isinstance(exc, DataError):  # the image shown before is not the one that failed
            self._clear_image()
        self._show_message(message[0].upper() + message[1:], error=True)
        self.logged.emit(f"Try it: {message}")

    # -- class activation maps -----------------------------------------------------------------
    def _on_cam_changed(self, *_args: Any) -> None:
        self._cam_request += 1
        rid = self._cam_request
        if not self.show_cam.isChecked() or self._image_path is None or self._checkpoint is None:
            if self._plain_pixmap is not None:
                self._pixmap = self._plain_pixmap
                self._update_pixmap()
            return
        self._set_busy(True)
        self._tasks = [t for t in self._tasks if t.is_running()]
        self._tasks.append(
            run_task(
                "class activation map",
                map_file,
                self._cache,
                self._checkpoint,
                self._image_path,
                self.cam_class.currentData(),
                self.cam_method.currentData(),
                on_result=lambda result: self._on_map_returned(rid, result),
                on_error=lambda exc, tb: self._on_map_errored(rid, exc),
            )
        )

    def _on_map_returned(self, rid: int, result: dict) -> None:
        if rid != self._cam_request or result["image"] != self._image_path:
            return
        self._set_busy(False)
        pixels = result["pixels"]
        h, w = pixels.shape[:2]
        self._pixmap = QPixmap.fromImage(QImage(pixels.data, w, h, 3 * w, QImage.Format.Format_RGB888).copy())
        self._update_pixmap()
        self.show_cam.setToolTip(f"Map of {result['class']} from layer {result['layer']}")

    def _on_map_errored(self, rid: int, exc: BaseException) -> None:
        if rid != self._cam_request:
            return
        self._set_busy(False)
        self._show_message(f"No class activation map: {exc}", error=True)

    def map_shown(self) -> bool:
        """Whether the image shown now is the map overlay (not the plain image)."""
        return self._pixmap is not None and self._pixmap is not self._plain_pixmap

    # -- showing -------------------------------------------------------------------------------
    def shown_predictions(self) -> list[tuple[str, float]]:
        """The (name, probability or value) pairs the bars show, most likely first."""
        return list(self._predictions[:TOP_K])

    def _show_predictions(self, predictions: list[tuple[str, float]], task: str) -> None:
        self._predictions = list(predictions)
        self.bars.show_predictions(self._predictions, task)
        if predictions:
            self.predicted.emit(self.shown_predictions())

    def _show_message(self, text: str, *, error: bool = False) -> None:
        self.message_label.setText(text)
        self.message_label.setStyleSheet(f"color: {ERROR_COLOUR};" if error else "")
        self.message_label.setVisible(bool(text))

    def _set_busy(self, busy: bool) -> None:
        self.progress_bar.setVisible(busy)

    def _clear_image(self) -> None:
        self._image_path = None
        self._pixmap = None
        self._plain_pixmap = None
        self.image_label.clear()
        self.image_label.setText("Drop an image here, or use Open image...")
        self.image_caption.clear()

    def _update_pixmap(self) -> None:
        if self._pixmap is None:
            return
        box = self.image_label.contentsRect().size()
        pixmap = self._pixmap
        if pixmap.width() > box.width() or pixmap.height() > box.height():
            pixmap = pixmap.scaled(box, Qt.AspectRatioMode.KeepAspectRatio, Qt.TransformationMode.SmoothTransformation)
        self.image_label.setPixmap(pixmap)

    def resizeEvent(self, event: QResizeEvent) -> None:  # noqa: N802 - Qt's name
        super().resizeEvent(event)
        self._update_pixmap()
