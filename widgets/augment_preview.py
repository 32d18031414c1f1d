"""A grid of training images as the model sees them after the random augmentation, redrawn as the settings change."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from PySide6.QtCore import Qt, QTimer
from PySide6.QtGui import QImage, QPixmap
from PySide6.QtWidgets import QGridLayout, QHBoxLayout, QLabel, QPushButton, QVBoxLayout, QWidget

from engine.config import ProjectConfig
from widgets.look import ERROR_STYLE
from widgets.state import ProjectState
from widgets.tasks import Task, run_task

if TYPE_CHECKING:
    from engine.augment_preview import AugmentPreview, PreviewImages

COLUMNS = 4
TILE = 84  # pixels a side on screen
DEBOUNCE_MS = 150  # a burst of edits (a spin box held down) draws once, well within a second
# Settings that change what the preview shows: the images, their preprocessing and the augmentation.
WATCHED = ("data.", "model.backbone", "model.weights")

OBJECT_NAMES = {
    "training.augment_preview": "eight training images as the model sees them after the random augmentation",
    "training.augment_preview_draw": "button: draw eight other training images, with new random augmentations",
    "training.augment_preview_note": "what the augmentation preview shows, or why it cannot show images",
}


def draw_preview(holder: dict[str, Any], cfg: ProjectConfig, seed: int) -> PreviewImages:
    """On a worker thread: the training set scanned once per project data (kept in holder), then one draw."""
    from engine.augment_preview import AugmentPreview  # imports PyTorch: on the worker, not the GUI thread

    preview: AugmentPreview | None = holder.get("preview")
    if preview is None or preview.key() != AugmentPreview.key_of(cfg):
        preview = AugmentPreview(cfg)
        holder["preview"] = preview
    return preview.draw(cfg.data.augment, seed)


def to_pixmap(image: np.ndarray, side: int = TILE) -> QPixmap:
    """An (H, W, 3) uint8 image as a pixmap scaled to fit side x side."""
    h, w, _ = image.shape
    # From bytes (PySide reads a numpy memoryview's buffer wrongly), copied so the image owns its pixels.
    qimage = QImage(np.ascontiguousarray(image).tobytes(), w, h, 3 * w, QImage.Format.Format_RGB888).copy()
    return QPixmap.fromImage(qimage).scaled(
        side, side, Qt.AspectRatioMode.KeepAspectRatio, Qt.TransformationMode.FastTransformation
    )


class AugmentPreviewWidget(QWidget):
    """Eight training images through the training pipeline, de-normalised; redrawn off the GUI thread shortly after
    any change of the data, preprocessing or augmentation settings, and on *Draw again* with a new seed.

    The first draw waits for *Show images*: it scans the dataset and loads PyTorch, which a window that opens on
    another panel should not pay for. From then on the preview follows every change by itself.
    """

    def __init__(self, state: ProjectState, parent: QWidget | None = None):
        super().__init__(parent)
        self.setObjectName("training.augment_preview")
        self.state = state
        self.seed = 0
        self.shown: PreviewImages | None = None  # the images on show
        self._holder: dict[str, Any] = {}  # the scanned training set, reused between draws (worker side)
        self._task: Task | None = None
        self._pending = False  # a change came in while a draw was running: draw again when it ends
        self._stale = True  # settings changed while the preview was hidden
        self.following = False  # the user asked for images: redraw on every change
        self.tiles = [QLabel() for _ in range(8)]
        grid = QGridLayout()
        grid.setSpacing(4)
        for i, tile in enumerate(self.tiles):
            tile.setFixedSize(TILE, TILE)
            tile.setAlignment(Qt.AlignmentFlag.AlignCenter)
            tile.setStyleSheet("background: #202020;")
            tile.hide()  # no empty frames before the first draw
            grid.addWidget(tile, i // COLUMNS, i % COLUMNS)
        self.draw_button = QPushButton("Show images")
        self.draw_button.setObjectName("training.augment_preview_draw")
        self.draw_button.setToolTip(
            "Show eight training images after the random augmentation; then draw eight others, with new random "
            "augmentations."
        )
        self.draw_button.clicked.connect(self._on_draw_clicked)
        self.message = QLabel("Eight training images after the augmentation, as the model sees them.")
        self.message.setObjectName("training.augment_preview_note")
        self.message.setWordWrap(True)
        row = QHBoxLayout()
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.draw_button)
        row.addWidget(self.message, 1)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(grid)
        layout.addLayout(row)
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(DEBOUNCE_MS)
        self._timer.timeout.connect(self._start)
        state.changed.connect(self._on_project_changed)

    # -- when to draw --------------------------------------------------------------------------
    def _on_project_changed(self, path: str) -> None:
        if path == "" or path.startswith(WATCHED):
            self._stale = True
            if self.following and self.isVisible():
                self._timer.start()

    def showEvent(self, event: Any) -> None:  # noqa: N802 - Qt's name
        super().showEvent(event)
        if self._stale and self.following:
            self._timer.start()

    def _on_draw_clicked(self) -> None:
        if self.following:
            self.seed += 1
        self.following = True
        self.draw_button.setText("Draw again")
        self._start()

    def is_busy(self) -> bool:
        return self._task is not None and self._task.is_running() or self._timer.isActive() or self._pending

    def _start(self) -> None:
        if self._task is not None and self._task.is_running():
            self._pending = True
            return
        self._pending = False
        self._stale = False
        cfg = self.state.snapshot()
        if not cfg.data.path:
            self._say("Choose a dataset to see its training images here.", error=False)
            return
        self._task = run_task(
            "augmentation preview",
            draw_preview,
            self._holder,
            cfg,
            self.seed,
            on_result=self._on_drawn,
            on_error=self._on_failed,
        )
        self._task.finished.connect(self._on_task_finished)

    def _on_task_finished(self) -> None:
        if self._pending:
            self._start()

    # -- showing -------------------------------------------------------------------------------
    def _on_drawn(self, result: PreviewImages) -> None:
        self.shown = result
        for i, tile in enumerate(self.tiles):
            tile.show()
            if i < len(result.images):
                tile.setPixmap(to_pixmap(result.images[i]))
                tile.setToolTip(f"{result.labels[i]} (training image {result.indices[i]})")
            else:
                tile.clear()
                tile.setToolTip("")
        on = [n for n, v in self.state.config.data.augment.model_dump().items() if v]
        self._say(
            "After "
            + (", ".join(n.replace("_", " ") for n in on) if on else "no augmentation")
            + f" (draw {self.seed + 1}), as the model sees them.",
            error=False,
        )

    def _on_failed(self, exc: BaseException, _tb: str) -> None:
        self.shown = None
        for tile in self.tiles:
            tile.clear()
        self._say(f"No preview: {exc}", error=True)

    def _say(self, text: str, *, error: bool) -> None:
        self.message.setText(text)
        self.message.setStyleSheet(ERROR_STYLE if error else "")
