"""Start-up: the window shows before PyTorch is imported; the Backbone tab follows once the catalog has loaded.

The start-up time itself is measured by `make bench` (bench/gui.py), not here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_project
from PySide6.QtWidgets import QLabel, QMessageBox

from app.main_window import MainWindow
from app.training import StepCounter
from engine.config import ProjectConfig, validate
from engine.events import EventEmitter
from engine.trainer import Callback
from widgets.tasks import cancel_all, hold_new_tasks, run_task, running_tasks, start_held_tasks

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _discard_changes(monkeypatch):
    monkeypatch.setattr(MainWindow, "_ask_save_changes", lambda self: QMessageBox.StandardButton.Discard)


def test_the_window_modules_import_and_the_window_opens_without_pytorch(tmp_path):
    """Everything the window is built from imports without torch, torchvision or timm (a fresh interpreter), and
    building the window on the default project, as the app starts, does not import them on the GUI thread
    either (a panel that did cost the start-up 9 s)."""
    code = (
        "import sys, json; import app.main_window, app.launch, main; "
        "from PySide6.QtWidgets import QApplication; application = QApplication([]); "
        "window = app.main_window.MainWindow(background_catalog=True); "
        "window.open_initial_project(str(app.main_window.default_project())); "
        "print(json.dumps(sorted(m for m in ('torch', 'torchvision', 'timm') if m in sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        # HOME and XDG_CONFIG_HOME: the window's settings (recent projects) go to the test's folder
        env={
            "QT_QPA_PLATFORM": "offscreen",
            "PATH": "/usr/bin:/bin",
            "HOME": str(tmp_path),
            "XDG_CONFIG_HOME": str(tmp_path),
        },
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_building_and_opening_in_background_mode_starts_no_work_until_the_event_loop(qtbot, tiny_project):
    win = MainWindow(background_catalog=True)
    qtbot.addWidget(win)
    win.open_initial_project(str(tiny_project))
    # Nothing runs yet: the scan, the layer build and the catalog wait for the event loop.
    assert win.backbone is None
    assert win.findChild(QLabel, "backbone.loading") is not None
    assert running_tasks() and all(t.held for t in running_tasks())
    assert win.state.config.model.backbone == "resnet18"  # the project's fields are there at once
    win.show()
    qtbot.waitUntil(lambda: win.backbone is not None, timeout=120000)
    assert win.findChild(QLabel, "backbone.loading") is None
    assert win.backbone.state is win.state
    assert win.state.catalog_checks
    devices = [win.training._device.itemText(i) for i in range(win.training._device.count())]
    assert devices[0].startswith("auto (uses ")  # labelled once PyTorch is there
    qtbot.waitUntil(lambda: not running_tasks(), timeout=120000)
    assert win.dataset.state.config is win.state.config
    win.close()


def test_a_backbone_problem_found_once_the_catalog_loads_is_reported(qtbot, tmp_path, image_folder):
    project = write_project(tmp_path / "bad.json", "images", model={"backbone": "resnet_does_not_exist"})
    win = MainWindow(background_catalog=True)
    qtbot.addWidget(win)
    win.open_initial_project(str(project))  # opens: the backbone's name is checked with the catalog
    assert win.state.config.model.backbone == "resnet_does_not_exist"
    win.show()
    qtbot.waitUntil(lambda: win.last_error_box is not None, timeout=120000)
    assert "resnet_does_not_exist" in win.last_error_box.text()
    qtbot.waitUntil(lambda: not running_tasks(), timeout=120000)
    win.close()


def test_validation_without_the_catalog_leaves_out_only_the_catalog_checks():
    cfg = ProjectConfig()
    cfg.model.backbone = "resnet_does_not_exist"
    cfg.loader.batch_size = 0
    full = [str(p) for p in validate(cfg, check_paths=False)]
    light = [str(p) for p in validate(cfg, check_paths=False, check_catalog=False)]
    assert any("resnet_does_not_exist" in p for p in full)
    assert not any("resnet_does_not_exist" in p for p in light)
    assert [p for p in full if "batch_size" in p] == [p for p in light if "batch_size" in p] != []


def test_the_step_counter_implements_every_trainer_hook():
    """The app's step counter does not subclass Callback (that would import the trainer at start-up): it must
    keep up with it."""
    hooks = [name for name in vars(Callback) if name.startswith("on_")]
    assert hooks
    for name in hooks:
        assert callable(getattr(StepCounter, name, None)), f"StepCounter lacks {name}"
        assert callable(getattr(EventEmitter, name, None)), f"EventEmitter lacks {name}"


def test_held_tasks_start_in_order_and_cancel_all_forgets_them(qtbot):
    results: list[int] = []
    hold_new_tasks()
    try:
        first = run_task("first", lambda: 1, on_result=results.append)
        second = run_task("second", lambda: 2, on_result=results.append)
        assert first.is_running() and second.is_running() and first.held
        assert not first.qthread.isRunning()
    finally:
        start_held_tasks()
    assert first.wait() and second.wait()
    assert sorted(results) == [1, 2]

    hold_new_tasks()
    called: list[str] = []
    dropped = run_task("dropped", lambda: called.append("dropped") or 3, on_result=results.append)
    assert cancel_all(1000)
    start_held_tasks()
    assert not dropped.is_running() and dropped not in running_tasks()
    # start_held_tasks started nothing: the dropped task's thread never ran (one that ran is finished), and no
    # list holds it to start it later. Tasks asked for now still run and deliver their results.
    assert not dropped.qthread.isFinished()
    after = run_task("after", lambda: called.append("after") or 4, on_result=results.append)
    with qtbot.waitSignal(after.finished, timeout=60000):
        pass
    assert called == ["after"] and sorted(results) == [1, 2, 4]
    assert not dropped.qthread.isRunning() and not dropped.qthread.isFinished()


def test_the_apps_start_up_takes_its_objects_out_of_the_collectors_scans(qtbot):
    import gc

    assert gc.get_freeze_count() == 0
    win = MainWindow(background_catalog=True, settle=True)
    qtbot.addWidget(win)
    try:
        win.show()
        qtbot.waitUntil(lambda: win.backbone is not None, timeout=120000)
        # PyTorch, timm and the catalog are frozen: a full collection during a run no longer walks them.
        assert gc.get_freeze_count() > 100_000
    finally:
        gc.unfreeze()
        qtbot.waitUntil(lambda: not running_tasks(), timeout=120000)
        win.close()
