"""The Runs view: opening it on 200 run folders, and overlaying 20 runs of 100,000 points, with the UI heartbeat."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import Figure, Section
from bench.gui import Heartbeat, _app, _isolated_settings, _wait, dispose

BACKBONES = ("resnet18", "mobilenet_v3_small", "efficientnet_b0", "convnext_tiny")
FREEZES = ("head_only", "up_to", "none")


def write_run(folder: Path, index: int, epochs: int, *, planned: int | None = None, status: str = "completed") -> None:
    """A run folder as training leaves it (project.json, metrics.jsonl, run.json, checkpoints/), no training."""
    from engine.config import ProjectConfig, save_project
    from engine.run_files import update_run_info

    rng = np.random.default_rng(index)
    cfg = ProjectConfig()
    cfg.name = f"bench-{index % 7}"
    cfg.data.path = str(folder.parent / "data")
    cfg.output.dir = str(folder.parent)
    cfg.model.backbone = BACKBONES[index % len(BACKBONES)]
    cfg.model.freeze = FREEZES[index % len(FREEZES)]
    cfg.optimizer.lr = float(10 ** rng.uniform(-4, -2))
    cfg.loader.batch_size = int(16 * (1 + index % 4))
    cfg.train.epochs = planned or epochs
    (folder / "checkpoints").mkdir(parents=True)
    save_project(cfg, folder / "project.json")
    e = np.arange(1, epochs + 1, dtype=np.float64)
    scale = max(epochs / 10, 1.0)
    train_loss = 2.3 * np.exp(-e / scale) + 0.05 + rng.random(epochs) * 0.02
    val_loss = train_loss + 0.1 + rng.random(epochs) * 0.05
    val_acc = 0.95 - 0.85 * np.exp(-e / scale) - rng.random(epochs) * 0.02
    lines = [
        f'{{"epoch": {int(x)}, "train_loss": {tl:.6f}, "val_loss": {vl:.6f}, "train_accuracy": {va + 0.02:.6f}, '
        f'"val_accuracy": {va:.6f}, "lr": {cfg.optimizer.lr:.6g}, "epoch_seconds": 12.5, '
        f'"samples_per_second": {400 + index % 50}, "best": false}}\n'
        for x, tl, vl, va in zip(e.tolist(), train_loss.tolist(), val_loss.tolist(), val_acc.tolist(), strict=True)
    ]
    (folder / "metrics.jsonl").write_text("".join(lines), encoding="utf-8")
    update_run_info(folder, started=f"2026-01-{1 + index % 28:02d}T10:{index % 60:02d}:00+0000", status=status)
    if status == "completed":
        (folder / "checkpoints" / "final.pt").write_bytes(b"")
    (folder / "checkpoints" / "last.pt").write_bytes(b"")


def run(quick: bool = False) -> list[Section]:
    from PySide6.QtWidgets import QApplication

    from app.main_window import settle_heap
    from widgets.runs_view import RunsView

    count, epochs = (20, 10) if quick else (200, 30)
    long_runs, points = (3, 2_000) if quick else (20, 100_000)
    _app()
    work = Path(tempfile.mkdtemp(prefix="bench-runs-view-"))
    try:
        _isolated_settings(work / "settings")
        runs, long = work / "runs", work / "long"
        for i in range(count):
            write_run(runs / f"run-{i:03d}", i, epochs, status="stopped" if i % 9 == 0 else "completed")
        for i in range(long_runs):
            write_run(long / f"long-{i:02d}", i, points)

        from engine.run_table import list_runs

        reads = []
        for _ in range(3):  # the baseline: the engine reading the same folders (main.py runs), no Qt
            started = time.perf_counter()
            list_runs(runs)
            reads.append(time.perf_counter() - started)
        engine_read = float(np.median(reads))
        beat = Heartbeat()
        view = RunsView()
        view.resize(1280, 800)
        # As the app's own start-up does (MainWindow(settle=True), and bench.gui's windows): what exists now is
        # taken out of the garbage collector's full scans.
        settle_heap()
        view.set_project("", runs)
        beat.start()
        started = time.perf_counter()
        view.show()
        _wait(lambda: not view.is_reading() and view.model.rowCount() == count)
        opened = time.perf_counter() - started
        beat.stop()
        QApplication.processEvents()
        open_late = np.array(beat.late) * 1000

        view.add_folder(long)
        _wait(lambda: not view.is_reading() and view.model.rowCount() == count + long_runs)
        plots = view.plots.layout_widget
        view.details.show()  # shown only while runs are selected: here, empty, for the baseline paint
        QApplication.processEvents()

        def repaint_ms() -> float:
            times = []
            for _ in range(5):
                started = time.perf_counter()
                plots.viewport().repaint()
                times.append(time.perf_counter() - started)
            return float(np.median(times)) * 1000

        empty_paint = repaint_ms()  # the baseline: the same four plots, no curve in them
        beat = Heartbeat()
        beat.start()
        started = time.perf_counter()
        view.select_paths([str(long / f"long-{i:02d}") for i in range(long_runs)])
        _wait(lambda: len(view.plots.run_keys()) == long_runs and not view.is_reading())
        painted = view.plots.paint_total
        plots.viewport().update()
        _wait(lambda: view.plots.paint_total > painted)  # the window's own paint of the 20 runs, by the event loop
        overlaid = time.perf_counter() - started
        beat.stop()
        overlay_late = np.array(beat.late) * 1000
        full_paint = repaint_ms()
        shown = view.plots.drawn(str(long / "long-00"), "val_loss").getData()[0]
        held = view.plots.curve_data(str(long / "long-00"), "val_loss")[0]
        dispose(view)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def late(values: Any, what: str, limits: bool) -> list[Figure]:
        return [
            Figure(
                f"{what}_heartbeat_p99_ms",
                "… heartbeat lateness, 99th percentile",
                float(np.percentile(values, 99)),
                "ms",
                "<= 50" if limits else None,
            ),
            Figure(
                f"{what}_heartbeat_max_ms",
                "… heartbeat lateness, maximum",
                float(values.max()),
                "ms",
                "<= 200" if limits else None,
            ),
        ]

    opening = Section(
        name="runs_view_open",
        title="Runs view: opening on a folder of run folders",
        figures=[
            Figure("runs_view_open_s", f"Seconds to the table of {count} runs shown", opened, "s", "<= 1"),
            Figure(
                "runs_view_open_vs_engine_read",
                "… as a multiple of the engine reading the same folders (list_runs, median of 3)",
                opened / engine_read,
                "x",
                detail=f"list_runs {engine_read * 1000:.0f} ms",
            ),
            *late(open_late, "runs_view_open", False),
        ],
        setup=f"{count} run folders of {epochs} epochs (project.json, metrics.jsonl, run.json, checkpoints), "
        "read on a worker thread; 1280x800 offscreen; a 10 ms heartbeat timer as in ui_heartbeat",
        notes=[
            "The opening's heartbeat includes the window's first paint (pyqtgraph lays out its four plots once): "
            "for information; the limits apply to the overlay, as the issue sets them."
        ],
    )
    overlay = Section(
        name="runs_view_overlay",
        title=f"Runs view: {long_runs} runs of {points:,} epochs overlaid",
        figures=[
            Figure(
                "runs_view_overlay_s", f"Seconds from selecting {long_runs} runs to their curves drawn", overlaid, "s"
            ),
            Figure(
                "runs_view_overlay_paint_vs_empty",
                f"One repaint of the plots with the {long_runs} runs ÷ of the same plots empty",
                full_paint / empty_paint,
                "x",
                detail=f"{empty_paint:.0f} ms → {full_paint:.0f} ms (median of 5 repaints each, 1280x800 window)",
            ),
            Figure(
                "runs_view_overlay_drawn_ratio", "Points drawn per curve ÷ points held", len(shown) / len(held), "x"
            ),
            *late(overlay_late, "runs_view_overlay", True),
        ],
        setup=f"{long_runs} run folders with {points:,} metrics lines each, read off the GUI thread and drawn "
        "(the heap settled as the app settles it at start-up) "
        "from live_plots' min/max envelope; heartbeat from the selection to the first paint of the curves",
    )
    return [opening, overlay]
