"""Error analysis: the time for one class activation map, and for the first screen of a 1,000-image cell's grid."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import Figure, Section, median


def _cam_seconds(repeats: int) -> tuple[float, float]:
    """(first map including the layer probe, median of the following maps) for resnet18 at 224 px, in seconds."""
    import torch

    from engine.backbones import build_model
    from engine.cam import activation_maps
    from engine.config import ModelConfig

    model = build_model(ModelConfig(backbone="resnet18", weights=None), 10, image_size=224).model.eval()
    image = torch.randn(1, 3, 224, 224)
    start = time.perf_counter()
    activation_maps(model, image)
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        activation_maps(model, image)
        times.append(time.perf_counter() - start)
    return first, median(times)


def _first_screen_seconds(folder: Path, count: int) -> tuple[float, int]:
    """Seconds from showing a cell of `count` images until every thumbnail on the first screen is drawn."""
    from PIL import Image
    from PySide6.QtCore import QCoreApplication

    from app.launch import application
    from widgets.sample_browser import SampleBrowser

    app = application()  # as the app makes it
    rng = np.random.default_rng(0)
    rows = []
    for i in range(count):
        path = folder / f"{i:04d}.png"
        Image.fromarray(rng.integers(0, 255, size=(160, 160, 3), dtype=np.uint8)).save(path)
        rows.append(
            {
                "index": i,
                "path": str(path),
                "true": "a",
                "predicted": "b",
                "confidence": 0.5,
                "loss": 1.0 - i / count,
                "top": [["b", 0.5], ["a", 0.5]],
            }
        )
    browser = SampleBrowser()
    browser.resize(1000, 700)  # the grid's share of a 1280 x 800 window, generously
    browser.show()
    app.processEvents()
    start = time.perf_counter()
    browser.show_samples("bench", rows, arrays=None, checkpoint=None, class_names=["a", "b"])
    view, model = browser.grid, browser.model
    visible: list[int] = []
    while time.perf_counter() - start < 60:
        app.processEvents()
        port = view.viewport().rect()
        visible = [i for i in range(min(count, 200)) if view.visualRect(model.index(i)).intersects(port)]
        if visible and all(model.is_loaded(i) for i in visible):
            break
        time.sleep(0.001)
    elapsed = time.perf_counter() - start
    while model.is_busy():
        app.processEvents()
        time.sleep(0.01)
    browser.close()
    browser.deleteLater()
    QCoreApplication.sendPostedEvents(None, 0)
    return elapsed, len(visible)


def run(quick: bool = False) -> Section:
    first, cam = _cam_seconds(3 if quick else 10)
    with tempfile.TemporaryDirectory(prefix="bench-cells-") as tmp:
        screen, shown = _first_screen_seconds(Path(tmp), 200 if quick else 1000)
    return Section(
        name="error_analysis",
        title="Error analysis: activation maps and the cell grid",
        figures=[
            Figure(
                "cam_resnet18_224",
                "Grad-CAM of one 224 px image, resnet18 (CPU)",
                cam,
                "s",
                "<= 0.5",
                detail=f"median of repeated maps; the first, which also finds the target layer, took {first:.2f} s",
            ),
            Figure(
                "cell_first_screen",
                f"First screen of thumbnails of a {200 if quick else 1000}-image cell",
                screen,
                "s",
                "<= 1",
                detail=f"{shown} thumbnails on the first screen, decoded from 160 px PNGs off the GUI thread",
            ),
        ],
        setup="resnet18 with random weights (the time does not depend on them); the grid at 1000 x 700 px offscreen",
    )
