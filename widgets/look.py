"""Shared look: message colours that read on light and dark palettes, and image pixels fitted to a display box."""

from __future__ import annotations

import numpy as np
from PIL import Image
from PySide6.QtGui import QColor, QPalette

# The fields' invalid red, for error text and borders: readable on light and dark palettes alike.
ERROR_COLOUR = "#d9534f"
ERROR_STYLE = f"color: {ERROR_COLOUR};"


def _dark(palette: QPalette) -> bool:
    return palette.color(QPalette.ColorRole.Window).lightnessF() < 0.5


def message_colour(palette: QPalette) -> QColor:
    """An error red with enough contrast on the palette's window colour (darker on light, lighter on dark)."""
    return QColor("#ff7b72") if _dark(palette) else QColor("#b3261e")


def ok_colour(palette: QPalette) -> QColor:
    return QColor("#56d364") if _dark(palette) else QColor("#1a7f37")


def fit_pixels(image: Image.Image, box: int) -> np.ndarray:
    """RGB uint8 pixels fitting box x box: shrunk smoothly, or enlarged by a whole factor keeping pixels sharp."""
    w, h = image.size
    scale = box / max(w, h, 1)
    if scale >= 2:
        factor = int(scale)
        image = image.resize((w * factor, h * factor), Image.Resampling.NEAREST)
    elif scale < 1:
        image = image.copy()
        image.thumbnail((box, box), Image.Resampling.BILINEAR)
    return np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))
