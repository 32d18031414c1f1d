"""The main window end to end: a real project, real training on a worker thread, real files (offscreen)."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import shiboken6
from conftest import write_project
from PySide6.QtCore import QCoreApplication, QEvent, QPointF, QThread
from PySide6.QtWidgets import (
    QAbstractButton,
    QAbstractItemView,
    QAbstractSpinBox,
    QComboBox,
    QLineEdit,
    QMessageBox,
    QTabBar,
    QWidget,
)

from app.main_window import MainWindow
from engine.config import load_project
from engine.runs import read_metrics

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _answer_modal_questions(monkeypatch):
    """A modal question blocks an offscreen test forever; by default the user discards and agrees to stop.

    The tests of those questions set their own answers.
    """
    monkeypatch.setattr(MainWindow, "_ask_save_changes", lambda self: QMessageBox.StandardButton.Discard)
    monkeypatch.setattr(MainWindow, "_ask_stop_training", lambda self: True)


@pytest.fixture()
def window(qtbot, tiny_project):
    win = MainWindow()
    qtbot.addWidget(win)
    assert win.open_project(str(tiny_project))
    yield win
    if win.controller.is_running():
        win.controller.stop()
        win.controller.wait(60000)
    win.state._set_dirty(False)
    win.close()
    # Delete the window here, on the GUI thread: left to the cyclic collector, a worker thread of a later test
    # could collect it and deadlock with the GUI thread (Qt's lock against the GIL; seen in test_export_...).
    from widgets.tasks import running_tasks

    qtbot.waitUntil(lambda: not running_tasks(), timeout=120000)  # no result may arrive at a deleted window
    win.deleteLater()
    QCoreApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)
    del win
    gc.collect()


def _train(qtbot, window, *, start=None, timeout=180000) -> dict:
    with qtbot.waitSignal(window.controller.run_finished, timeout=timeout) as blocker:
        assert (start or window.train)()
    return blocker.args[0]


def _wait_tasks(qtbot):
    from widgets.tasks import running_tasks

    qtbot.waitUntil(lambda: not running_tasks(), timeout=120000)


def test_title_shows_the_project_and_unsaved_changes(window, tiny_project):
    assert "tiny" in window.windowTitle() and str(tiny_project) in window.windowTitle()
    assert not window.isWindowModified()
    window.state.set("loader.batch_size", 4)
    assert window.isWindowModified()
    assert window.save_project()
    assert not window.isWindowModified()
    assert load_project(tiny_project).loader.batch_size == 4


def test_save_as_and_reopen_gives_the_same_config(qtbot, window, tmp_path):
    window.state.update(
        {
            "optimizer.lr": 0.0005,
            "loader.sampler.name": "weighted_random",
            "loader.sampler.weights": "balanced",
            "model.freeze": "head_only",
        }
    )
    elsewhere = tmp_path / "sub" / "copy.json"
    elsewhere.parent.mkdir()
    assert window.save_project_as(str(elsewhere))
    before = window.state.config.to_dict()
    other = MainWindow()
    qtbot.addWidget(other)
    assert other.open_project(str(elsewhere))
    assert other.state.config.to_dict() == before
    # the data path was rebased, so it still points at the same folder from the new location
    assert other.state.config.resolve(other.state.config.data.path) == window.state.config.resolve(
        window.state.config.data.path
    )
    _wait_tasks(qtbot)
    other.close()


def test_a_bad_project_file_is_reported_and_the_open_project_stays(qtbot, window, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{ not json")
    before = window.state.config.to_dict()
    assert not window.open_project(str(bad))
    assert "not valid JSON" in window.last_error_box.text()
    assert window.state.config.to_dict() == before


def test_training_plots_points_lists_checkpoints_and_evaluates(qtbot, window):
    window.state.set("train.epochs", 1)
    result = _train(qtbot, window)
    assert result["status"] == "completed"
    run_dir = Path(result["run_dir"])
    assert window.run_view.plots.point_count("batch_loss") > 0
    assert (run_dir / "checkpoints" / "epoch-001.pt").is_file()
    assert window.checkpoints.table.rowCount() >= 1
    assert window.current_checkpoint and Path(window.current_checkpoint).parent == run_dir / "checkpoints"
    _wait_tasks(qtbot)  # the evaluation that follows a completed run
    assert window.evaluation.result is not None
    assert not window.controller.is_running()


def test_stop_from_the_window_ends_the_run_within_a_batch(qtbot, tmp_path, image_folder):
    path = write_project(
        tmp_path / "long.json", "images", loader={"batch_size": 2}, train={"epochs": 50, "device": "cpu"}
    )
    win = MainWindow()
    qtbot.addWidget(win)
    win.open_project(str(path))
    steps = []
    win.controller.batch_finished.connect(lambda info: steps.extend(info["steps"]))
    win.train()
    qtbot.waitUntil(lambda: len(steps) >= 2, timeout=60000)
    with qtbot.waitSignal(win.controller.run_finished, timeout=60000) as blocker:
        win.act_stop.trigger()
    assert blocker.args[0]["status"] == "stopped"
    # The worker's own count: the batch in progress when the request arrived is the last one trained.
    during = win.controller.stop_seen_step
    assert during is None or during == max(steps), (during, max(steps))
    assert win.act_train.isEnabled() and not win.act_stop.isEnabled()
    _wait_tasks(qtbot)
    win.close()


def test_an_error_in_the_worker_is_shown_and_the_app_stays_usable(qtbot, window):
    window.state.set("model.freeze_prefixes", ["no_such_layer"])
    result = _train(qtbot, window)
    assert result["status"] == "failed"
    assert window.last_error_box is not None and "no_such_layer" in window.last_error_box.text()
    window.last_error_box.close()
    window.state.set("model.freeze_prefixes", [])
    window.state.set("train.epochs", 1)
    assert _train(qtbot, window)["status"] == "completed"
    _wait_tasks(qtbot)


def test_resume_from_a_checkpoint_continues_the_same_run(qtbot, window):
    window.state.set("train.epochs", 1)
    first = _train(qtbot, window)
    run_dir = first["run_dir"]
    _wait_tasks(qtbot)
    # Finished: Resume says how to go on instead of starting a run that refuses (it read as a failed run).
    assert window.act_resume.isEnabled() and not window.resume_current_run()
    box = window.last_error_box
    assert box.windowTitle() == "The run has finished" and "raise Epochs in the Training panel above 1" in box.text()
    assert not window.controller.is_running() and [r["epoch"] for r in read_metrics(run_dir)] == [1]
    box.close()
    window.state.set("train.epochs", 2)
    assert window.act_resume.isEnabled()
    second = _train(qtbot, window, start=window.resume_current_run)
    assert second["status"] == "completed" and second["run_dir"] == run_dir
    assert [r["epoch"] for r in read_metrics(run_dir)] == [1, 2]
    _wait_tasks(qtbot)


def test_export_from_the_dialog(qtbot, window, tmp_path, head_only_run):
    # As the Checkpoints panel's "Use" does (a finished run making its checkpoint current is tested above).
    window.use_checkpoint(str(head_only_run))
    _wait_tasks(qtbot)
    dialog = window.open_export_dialog()
    assert dialog is not None
    dialog.format_combo.setCurrentIndex(dialog.format_combo.findData("onnx"))
    out = tmp_path / "model.onnx"
    dialog.path_edit.setText(str(out))
    dialog.export()
    _wait_tasks(qtbot)
    assert out.is_file() and dialog.last_result is not None
    dialog.close()
    # Closed, it is deleted on the GUI thread (nothing is left for a worker thread's gc to delete), and the window
    # forgets it; Export opens a new one.
    QCoreApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)
    assert not shiboken6.isValid(dialog) and window.export_dialog is None
    again = window.open_export_dialog()
    assert again is not None and again.isVisible() and window.export_dialog is again
    assert again.checkpoint == str(head_only_run)
    again.reject()
    QCoreApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)
    assert not shiboken6.isValid(again) and window.export_dialog is None


def test_closing_during_a_run_stops_it_and_leaves_no_thread(qtbot, tmp_path, image_folder, monkeypatch):
    path = write_project(
        tmp_path / "long.json", "images", loader={"batch_size": 2}, train={"epochs": 50, "device": "cpu"}
    )
    win = MainWindow()
    qtbot.addWidget(win)
    win.open_project(str(path))
    steps = []
    win.controller.batch_finished.connect(lambda info: steps.extend(info["steps"]))
    win.train()
    qtbot.waitUntil(lambda: len(steps) >= 1, timeout=60000)
    monkeypatch.setattr(win, "_ask_stop_training", lambda: True)
    assert win.close()
    assert not win.controller.is_running()
    assert not [t for t in win.findChildren(QThread) if t.isRunning()]
    run_dir = Path(win.controller.run_dir)
    assert (run_dir / "project.json").is_file()


def test_closing_during_a_run_can_be_cancelled(qtbot, tmp_path, image_folder, monkeypatch):
    path = write_project(
        tmp_path / "long.json", "images", loader={"batch_size": 2}, train={"epochs": 50, "device": "cpu"}
    )
    win = MainWindow()
    qtbot.addWidget(win)
    win.open_project(str(path))
    win.train()
    monkeypatch.setattr(win, "_ask_stop_training", lambda: False)
    assert not win.close()
    assert win.controller.is_running()
    win.controller.stop()
    assert win.controller.wait(60000)
    _wait_tasks(qtbot)


def test_unsaved_changes_are_asked_about_before_opening_another_project(qtbot, window, tmp_path, monkeypatch):
    other = write_project(tmp_path / "other.json", "images")
    window.state.set("loader.batch_size", 5)
    monkeypatch.setattr(window, "_ask_save_changes", lambda: QMessageBox.StandardButton.Cancel)
    assert not window.open_project(str(other))
    assert window.state.config.loader.batch_size == 5
    monkeypatch.setattr(window, "_ask_save_changes", lambda: QMessageBox.StandardButton.Discard)
    assert window.open_project(str(other))
    assert window.state.file == str(other.resolve())


def test_a_dropped_folder_opens_as_the_dataset(qtbot, window, tmp_path):
    from conftest import write_image_folder

    folder = write_image_folder(tmp_path / "dropped", per_class=4)
    window.open_dropped(str(folder))
    assert window.state.config.resolve(window.state.config.data.path) == folder.resolve()
    _wait_tasks(qtbot)


def test_recent_projects_are_remembered(window, tiny_project):
    assert window.recent_projects()[0] == str(tiny_project.resolve())
    assert window.last_project() == str(tiny_project.resolve())


def test_every_interactive_control_has_a_documented_object_name(qtbot, window):
    from app.object_names import all_names, render

    documented = all_names()
    kinds = (QAbstractButton, QLineEdit, QComboBox, QAbstractSpinBox, QAbstractItemView)
    unnamed, undocumented = [], []
    for widget in window.findChildren(QWidget):
        if not isinstance(widget, kinds) or widget.objectName().startswith("qt_"):
            continue
        if type(widget).__module__.startswith("pyqtgraph"):
            continue  # pyqtgraph's own context-menu widgets
        parent, ancestor, internal = widget.parent(), widget.parent(), False
        while ancestor is not None and ancestor is not window:
            internal = internal or isinstance(ancestor, (*kinds, QTabBar)) or ancestor.objectName().startswith("qt_")
            ancestor = ancestor.parent()
        if internal:
            continue  # a control's own parts (a spin box's line edit, a combo's popup, a tab bar's scroll arrows)
        name = widget.objectName()
        if not name:
            unnamed.append(f"{type(widget).__name__} under {parent.objectName() if parent else '?'}")
        elif name not in documented:
            undocumented.append(name)
    assert not unnamed, f"controls without an objectName: {unnamed}"
    assert not undocumented, f"objectNames missing from OBJECT_NAMES: {undocumented}"
    for action in window.findChildren(type(window.act_train)):
        if action.objectName() and not action.objectName().startswith("_q_"):  # Qt's own (a line edit's clear)
            assert action.objectName() in documented
    assert (REPO / "docs" / "object_names.md").read_text(encoding="utf-8") == render(), (
        "docs/object_names.md is out of date: run `make docs`"
    )


def test_the_class_chart_of_100_classes_shows_its_names_without_scrolling_at_1280x800(qtbot, tmp_path):
    from PIL import Image
    from PySide6.QtCore import QPoint, QRect
    from PySide6.QtGui import QFontMetrics
    from PySide6.QtTest import QTest
    from PySide6.QtWidgets import QApplication, QScrollArea

    for c in range(100):
        folder = tmp_path / "hundred" / f"class_{c:03d}"
        folder.mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (4, 4), (c, i, 0)).save(folder / f"{i}.png")
    win = MainWindow()
    qtbot.addWidget(win)
    win.resize(1280, 800)
    win.show()
    qtbot.waitExposed(win)
    assert win.open_project(str(write_project(tmp_path / "project.json", "hundred")))
    axis, chart = win.dataset.class_axis, win.dataset.bar_chart
    qtbot.waitUntil(lambda: len(axis.names) == 100, timeout=60000)
    QApplication.processEvents()

    # The axis with the names lies inside the visible part of the Setup dock's scroll area.
    viewport = win.findChild(QScrollArea, "main.scroll.dataset").viewport()
    rect = chart.mapFromScene(axis.mapRectToScene(axis.boundingRect())).boundingRect()
    shown = QRect(chart.mapTo(viewport, rect.topLeft()), chart.mapTo(viewport, rect.bottomRight()))
    assert viewport.rect().contains(shown), (shown, viewport.rect())
    # Every n-th name is written, with room for each: readable, none overlapping.
    lo, hi = chart.getPlotItem().vb.viewRange()[0]
    spacing, labelled = axis.tickValues(lo, hi, axis.width())[0]
    names = [n for n in axis.tickStrings(labelled, 1, spacing) if n]
    widest = max(QFontMetrics(axis.style.get("tickFont") or QApplication.font()).horizontalAdvance(n) for n in names)
    assert len(names) >= 5 and spacing * axis.width() / (hi - lo) > widest
    # Each bar names its class on hover.
    bar = chart.mapFromScene(chart.getPlotItem().vb.mapViewToScene(QPointF(42, 1)))
    QTest.mouseMove(chart.viewport(), QPoint(bar.x(), bar.y()))
    qtbot.waitUntil(lambda: chart.toolTip().startswith("class_042:"))
    _wait_tasks(qtbot)
    win.state._set_dirty(False)
    win.close()


def test_file_menu_exports_the_project_as_a_script(window):
    from PySide6.QtGui import QAction

    from engine.codegen import generate

    action = window.findChild(QAction, "action.codegen")
    file_menu = window.menuBar().actions()[0].menu()
    assert action in file_menu.actions()
    action.trigger()
    dialog = window.codegen_dialog
    assert dialog is not None and dialog.isVisible()
    assert dialog.preview.toPlainText() == generate(window.state.config).script
    dialog.reject()
    QCoreApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)
    assert not shiboken6.isValid(dialog) and window.codegen_dialog is None
    action.trigger()  # opens a new one
    again = window.codegen_dialog
    assert again is not None and again.isVisible()
    assert again.preview.toPlainText() == generate(window.state.config).script
    again.reject()
    QCoreApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)
    assert not shiboken6.isValid(again) and window.codegen_dialog is None


def test_a_closed_error_box_is_deleted_on_the_gui_thread_and_the_next_error_still_shows(qtbot, window):
    import threading

    window.state.set("loader.batch_size", 0)
    assert window.check_project()
    box = window.last_error_box
    assert box is not None and "batch_size" in box.text()
    on_gui_thread: list[bool] = []
    box.destroyed.connect(lambda *_: on_gui_thread.append(threading.current_thread() is threading.main_thread()))
    box.button(QMessageBox.StandardButton.Ok).click()
    QCoreApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)
    assert on_gui_thread == [True] and not shiboken6.isValid(box) and window.last_error_box is None
    window.show_error("Second", "another problem")
    assert window.last_error_box is not None and window.last_error_box.text() == "another problem"
    window.state.set("loader.batch_size", 8)
    window.last_error_box.button(QMessageBox.StandardButton.Ok).click()
    QCoreApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)
    assert window.last_error_box is None and window.check_project() == [] and window.last_error_box is None


def test_train_and_resume_wait_while_the_learning_rate_finder_runs(qtbot, window):
    dialog = window.training.open_lr_finder()
    dialog.batches.setValue(5)
    assert window.act_train.isEnabled()
    assert dialog.start()
    # start() announced the finder before returning: no event has been processed, so the finder cannot be done yet.
    assert not window.act_train.isEnabled() and not window.act_resume.isEnabled()
    assert not window.train() and not window.controller.is_running()
    assert "Stop the learning-rate finder or wait for it to end to train" in window.log_view.toPlainText()
    qtbot.waitUntil(lambda: not dialog.is_running(), timeout=120000)
    qtbot.waitUntil(window.act_train.isEnabled, timeout=10000)
    dialog.close()


def test_progress_lines_replace_each_other_in_the_log_and_each_stage_keeps_its_last(window):
    """About one progress line a second: a minute's feature pass wrote 56 near-identical lines into the Log tab."""
    lines = [
        "Preparing the data: 100 of 1,797 (5%)",
        "Preparing the data: 900 of 1,797 (50%), 800/s, about 1.1 s left",
        "Feature cache: computing the features after blocks.4 for 1438 train samples",
        "Computing cached features: 320 of 1,438 (22%), 30/s, about 37 s left",
        "Computing cached features: 960 of 1,438 (66%), 30/s, about 16 s left",
        "Computing cached features: 1,438 of 1,438 (100%), done in 48 s",
        "Computing cached features: 100 of 359 (27%), 30/s, about 9 s left",
        "Computing cached features: 359 of 359 (100%), done in 12 s",
        "Precision fp32, channels_last on, torch.compile off",
        "Computing cached features: 5 of 10 (50%)",
    ]
    window.log_view.clear()
    for line in lines:
        window.log(line)
    assert window.log_view.toPlainText().splitlines() == [
        "Preparing the data: 900 of 1,797 (50%), 800/s, about 1.1 s left",
        "Feature cache: computing the features after blocks.4 for 1438 train samples",
        "Computing cached features: 1,438 of 1,438 (100%), done in 48 s",
        "Computing cached features: 359 of 359 (100%), done in 12 s",
        "Precision fp32, channels_last on, torch.compile off",
        "Computing cached features: 5 of 10 (50%)",
    ]
