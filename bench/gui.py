"""The app's benchmarks: start-up, app vs headless training, GUI responsiveness, memory, plot cost (offscreen).

Each returns a bench.common.Section; bench/run.py runs them with the engine's and writes the results.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from bench.common import REPO, Figure, Section, alternate, median, rss_mib

# Run in a fresh interpreter: `python main.py PROJECT` with a hook that reports when the main window has been
# shown and the event loop has run once (its first paint is queued by then), then exits.
_STARTUP_PROBE = r"""
import os, sys
sys.argv = ["main.py", sys.argv[1]]
sys.path.insert(0, os.getcwd())
import main
import app.main_window as mw
from PySide6.QtCore import QTimer
shown = mw.MainWindow.showEvent
def show_event(self, event):
    shown(self, event)
    QTimer.singleShot(0, lambda: (print("SHOWN", "torch" in sys.modules, flush=True), os._exit(0)))
mw.MainWindow.showEvent = show_event
main.main()
"""


def _app():
    from app.launch import application

    return application()  # as the app makes it


def dispose(widget) -> None:
    """Close and delete a widget now: one left to the interpreter's exit can outlive the QApplication and crash."""
    from PySide6.QtCore import QCoreApplication, QEvent

    widget.close()
    widget.deleteLater()
    QCoreApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)


def _isolated_settings(folder: Path) -> None:
    from PySide6.QtCore import QCoreApplication, QSettings

    QCoreApplication.setOrganizationName("ModelWorkbenchBench")
    QCoreApplication.setApplicationName("ModelWorkbenchBench")
    QSettings.setDefaultFormat(QSettings.Format.IniFormat)
    QSettings.setPath(QSettings.Format.IniFormat, QSettings.Scope.UserScope, str(folder))


def startup(quick: bool = False) -> Section:
    """Seconds from starting `python main.py examples/default.json` to its window shown."""
    repeats = 2 if quick else 5
    env = {**os.environ, "QT_QPA_PLATFORM": os.environ.get("QT_QPA_PLATFORM", "offscreen")}
    times, torch_loaded = [], []
    with tempfile.TemporaryDirectory() as tmp:
        env["XDG_CONFIG_HOME"] = tmp  # the user's recent projects and layout stay untouched
        bare = []
        for _ in range(repeats):
            started = time.perf_counter()
            subprocess.run([sys.executable, "-c", "import PySide6.QtWidgets"], env=env, check=True)
            bare.append(time.perf_counter() - started)
            started = time.perf_counter()
            out = subprocess.run(
                [sys.executable, "-c", _STARTUP_PROBE, str(REPO / "examples" / "default.json")],
                cwd=REPO,
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            elapsed = time.perf_counter() - started
            line = next((ln for ln in out.stdout.splitlines() if ln.startswith("SHOWN")), None)
            if line is None:
                raise RuntimeError(f"the app did not show its window: {out.stderr[-2000:]}")
            times.append(elapsed)
            torch_loaded.append(line.split()[1] == "True")
    return Section(
        name="startup",
        title="Start-up: `python main.py` to the window shown",
        figures=[
            Figure(
                "startup_s",
                "Seconds to the main window shown (median)",
                median(times),
                "s",
                "<= 2",
                detail=f"runs: {', '.join(f'{t:.2f}' for t in times)}",
            ),
            Figure(
                "startup_vs_bare_qt",
                "… as a multiple of starting Python and importing Qt alone",
                median(times) / median(bare),
                "x",
            ),
        ],
        setup=f"examples/default.json, {repeats} cold process starts, offscreen Qt",
        notes=[
            f"PyTorch imported before the window showed: {'yes' if any(torch_loaded) else 'no'} (it loads on a "
            "worker thread afterwards, while the Backbone tab says so)."
        ],
    )


def _wait(predicate, timeout: float = 600.0) -> None:
    """Run the Qt event loop, as the app does, until predicate() holds (checked every 20 ms)."""
    from PySide6.QtCore import QEventLoop, QTimer

    if predicate():
        return
    loop = QEventLoop()
    deadline = time.monotonic() + timeout
    timed_out = []

    def check() -> None:
        if predicate():
            loop.quit()
        elif time.monotonic() > deadline:
            timed_out.append(True)
            loop.quit()

    timer = QTimer()
    timer.setInterval(20)
    timer.timeout.connect(check)
    timer.start()
    loop.exec()
    timer.stop()
    if timed_out:
        raise TimeoutError("the app did not finish in time")


class Heartbeat:
    """A 10 ms timer on the GUI thread; its lateness is how long the event loop was kept from running."""

    def __init__(self, interval_ms: int = 10):
        from PySide6.QtCore import Qt, QTimer

        self.interval = interval_ms / 1000
        self.late: list[float] = []
        self._last: float | None = None
        self.timer = QTimer()
        self.timer.setTimerType(Qt.TimerType.PreciseTimer)
        self.timer.setInterval(interval_ms)
        self.timer.timeout.connect(self._beat)

    def _beat(self) -> None:
        now = time.perf_counter()
        if self._last is not None:
            self.late.append(max(0.0, now - self._last - self.interval))
        self._last = now

    def start(self) -> None:
        self._last = time.perf_counter()  # the first beat is due one interval from now: its lateness counts too
        self.timer.start()

    def stop(self) -> None:
        """Stop; the time since the last beat counts as one more (a block at the end, or a measured stretch shorter
        than two beats, still shows)."""
        self.timer.stop()
        self._beat()


def _bench_project(tmp: Path, *, per_class: int, size: int, epochs: int) -> Path:
    from bench.overhead import write_images
    from engine.config import from_dict, save_project

    data = write_images(tmp / "images", classes=4, per_class=per_class, size=size)
    cfg = from_dict(
        {
            "name": "bench-app",
            "data": {"path": str(data), "image_size": size, "val_fraction": 0.2},
            "model": {"backbone": "resnet18"},
            "loader": {"batch_size": 16},
            "optimizer": {"name": "adam", "lr": 1e-3},
            "train": {"epochs": epochs, "device": "auto", "seed": 0},
            "output": {"dir": str(tmp / "runs"), "tensorboard": False},
        },
        base_dir=tmp,
    )
    path = tmp / "bench.json"
    save_project(cfg, path)
    return path


def _window(project: Path):
    from PySide6.QtWidgets import QMessageBox

    from app.main_window import MainWindow
    from widgets.tasks import running_tasks

    # As the app starts: the catalog loads after the window shows, then start-up's objects are frozen.
    window = MainWindow(background_catalog=True, settle=True)
    window._ask_save_changes = lambda: QMessageBox.StandardButton.Discard  # type: ignore[method-assign]  # stubbed: never a modal question here
    window.open_project(str(project), ask=False)
    window.show()
    _wait(lambda: not running_tasks())
    return window


def _app_run(window) -> dict:
    """Press Train and run the event loop until the run's end arrives (no polling: an idle GUI sleeps)."""
    from PySide6.QtCore import QEventLoop, QTimer

    result: dict = {}
    loop = QEventLoop()

    def finished(info: dict) -> None:
        result.update(info)
        loop.quit()

    window.controller.run_finished.connect(finished)
    try:
        if not window.train():
            raise RuntimeError("the app refused to train the benchmark project")
        QTimer.singleShot(600_000, loop.quit)
        if not result:
            loop.exec()
    finally:
        window.controller.run_finished.disconnect(finished)
    if result.get("status") != "completed":
        raise RuntimeError(f"the app's run did not complete: {result.get('error') or 'it did not end in time'}")
    return result


def app_overhead(quick: bool = False) -> list[Section]:
    """Training from the app (worker thread, live plots, progress) vs the headless Trainer; and the heartbeat."""
    from engine.config import load_project
    from engine.runs import create_run_dir, run_callbacks
    from engine.trainer import Trainer
    from widgets.tasks import running_tasks

    _app()
    repeats = 2 if quick else 5
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        _isolated_settings(tmp / "settings")
        project = _bench_project(tmp, per_class=24 if quick else 80, size=32, epochs=2)
        window = _window(project)

        def in_app() -> None:
            _app_run(window)

        def headless() -> None:
            cfg = load_project(project)
            Trainer(cfg, run_callbacks(cfg, create_run_dir(cfg))).run()

        def settle() -> None:
            _wait(lambda: not running_tasks())  # the evaluation the app starts after a run: not timed

        times = alternate({"app": in_app, "headless": headless}, repeats, between=settle)
        # Responsiveness in runs of their own: the 10 ms probe timer is not part of what the app costs.
        beat = Heartbeat()
        for _ in range(2 if quick else 3):
            beat.start()
            _app_run(window)
            beat.stop()
            settle()
        late_ms = np.array(beat.late) * 1000
        window.state._set_dirty(False)
        dispose(window)
    overhead = Section(
        name="app_overhead",
        title="App overhead: a run from the window vs the headless Trainer",
        figures=[
            Figure(
                "app_vs_headless",
                "Headless run time ÷ app run time (throughput ratio)",
                median(times["headless"]) / median(times["app"]),
                "x",
                ">= 0.95",
                detail=f"median {median(times['app']):.2f} s in the app, {median(times['headless']):.2f} s headless",
            )
        ],
        setup=(
            f"resnet18 on generated 32x32 PNGs (4 classes), 2 epochs with validation and checkpoints, "
            f"{repeats} runs each, alternated; offscreen window with live plots"
        ),
        notes=["Both time the whole run: data scan, model build, epochs, checkpoint files."],
    )
    heartbeat = Section(
        name="ui_heartbeat",
        title="GUI responsiveness while training: lateness of a 10 ms timer",
        figures=[
            Figure(
                "heartbeat_p99_ms",
                "Heartbeat lateness, 99th percentile",
                float(np.percentile(late_ms, 99)),
                "ms",
                "<= 50",
            ),
            Figure("heartbeat_max_ms", "Heartbeat lateness, maximum", float(late_ms.max()), "ms", "<= 200"),
            Figure("heartbeat_median_ms", "Heartbeat lateness, median", float(np.median(late_ms)), "ms"),
        ],
        setup=f"{2 if quick else 3} more app runs of the project above: {len(late_ms)} beats",
    )
    return [overhead, heartbeat]


def _python_threads() -> int:
    """Threads Python started and still runs. Left out: threading's stand-ins for threads it did not start (a
    worker QThread that started a thread pool gets one, and it stays listed after the QThread ended, until a new
    thread reuses its id), which would count a run that scanned with a pool and not one that read the scan cache."""
    return sum(1 for t in threading.enumerate() if not isinstance(t, threading._DummyThread))


def memory(quick: bool = False) -> Section:
    """Peak RSS of the default project's training (headless process), and RSS across 20 runs in one app session."""
    from engine.config import load_project, save_project
    from engine.runs import project_as_run

    figures, notes = [], []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        if not quick:
            cfg = project_as_run(load_project(REPO / "examples" / "default.json"))
            if not cfg.train.phases:  # a run in phases (the Fine-tune recipe) is measured as `make run` trains it
                cfg.train.epochs = 1
            cfg.output.dir = str(tmp / "runs")
            save_project(cfg, tmp / "default-1-epoch.json")
            proc = subprocess.Popen(
                [sys.executable, str(REPO / "main.py"), "train", str(tmp / "default-1-epoch.json")],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            if proc.returncode != 0:
                assert proc.stderr is not None  # stderr=PIPE
                raise RuntimeError(f"the default project's run failed: {proc.stderr.read().decode()[-2000:]}")
            peak = usage.ru_maxrss / (1024 * 1024 if sys.platform == "darwin" else 1024)
            figures.append(
                Figure(
                    "default_peak_rss_mib", "Peak RSS, default project as make run trains it (headless)", peak, "MiB"
                )
            )
        else:
            notes.append("quick run: the default project's peak RSS is left out")

        _app()
        _isolated_settings(tmp / "settings")
        runs = 6 if quick else 20
        window = _window(_bench_project(tmp, per_class=12, size=32, epochs=1))
        threads_before = _python_threads()
        rss = []
        for _ in range(runs):
            _app_run(window)
            from widgets.tasks import running_tasks

            _wait(lambda: not running_tasks())
            gc.collect()
            rss.append(rss_mib())
        threads_after = _python_threads()
        window.state._set_dirty(False)
        dispose(window)
    settle = min(4, runs // 2)  # the first runs fill caches (allocator arenas, imported code): not growth
    growth = (rss[-1] - rss[settle]) / rss[settle] * 100
    slope = float(np.polyfit(np.arange(settle, runs), rss[settle:], 1)[0])
    figures += [
        Figure(
            "app_rss_growth_pct",
            f"RSS growth from run {settle + 1} to run {runs} in one app session",
            growth,
            "%",
            "<= 5",
            detail=f"{rss[settle]:.0f} → {rss[-1]:.0f} MiB; fitted slope {slope:+.2f} MiB per run",
        ),
        Figure(
            "app_thread_growth",
            "Python threads after the runs minus before",
            threads_after - threads_before,
            "threads",
            "<= 0",
        ),
    ]
    return Section(
        name="memory",
        title="Memory: peak RSS and growth over repeated runs",
        figures=figures,
        setup=f"{runs} consecutive one-epoch runs of a small resnet18 project from one window",
        notes=notes,
    )


def plot_cost(quick: bool = False) -> Section:
    """The live plot's cost per update (append a batch of points and repaint) early in a run and late in it."""
    from PySide6.QtWidgets import QApplication

    from widgets.live_plots import LivePlots

    _app()
    total = 20_000 if quick else 200_000
    chunk = 20  # about what one 50 ms update carries on a fast loop
    plots = LivePlots()
    plots.resize(900, 600)
    plots.show()
    QApplication.processEvents()
    rng = np.random.default_rng(0)
    step, costs = 0, []
    updates = total // chunk
    timed = 300  # updates timed at the start and at the end; those between only add their points
    for update in range(updates):
        steps = np.arange(step, step + chunk)
        losses = 2.0 * np.exp(-steps / total * 3) + rng.random(chunk) * 0.1
        if timed <= update < updates - timed:
            plots.add_batches(steps, losses, 1e-3)
        else:
            started = time.perf_counter()
            plots.add_batches(steps, losses, 1e-3)
            plots.repaint()  # the paint a shown window would do
            QApplication.processEvents()
            costs.append(time.perf_counter() - started)
        step += chunk
    dispose(plots)
    early, late = median(costs[10:timed]), median(costs[-(timed - 10) :])
    return Section(
        name="plot_cost",
        title="Live plot: cost per update as a run grows",
        figures=[
            Figure(
                "plot_cost_late_vs_early",
                f"Cost per update at {total:,} points ÷ at the start",
                late / early,
                "x",
                "<= 2",
                detail=f"{early * 1000:.1f} ms → {late * 1000:.1f} ms per update",
            ),
        ],
        setup=(
            f"{total:,} batch losses added {chunk} at a time; the first and last {timed} updates each timed "
            f"with a repaint (900x600, offscreen), median of each"
        ),
    )


def run_all(quick: bool = False) -> list[Section]:
    return [startup(quick), *app_overhead(quick), memory(quick), plot_cost(quick)]
