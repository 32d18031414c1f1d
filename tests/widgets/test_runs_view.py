"""The Runs view on real run folders: the table against what the folders hold, sorting, filtering, project-field
columns, live updates from the file system, overlaid curves, the project comparison, deleting and opening."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
from PySide6.QtCore import QCoreApplication, QEvent, Qt, QTimer
from PySide6.QtGui import QAction
from PySide6.QtWidgets import QApplication, QMessageBox

from engine.run_files import update_run_info
from engine.run_lock import claim_run_dir, release_run_dir
from tests.conftest import write_image_folder, write_project
from widgets.runs_view import RunsView

WAIT_MS = 20000  # generous: the machine is shared; the waits end as soon as the condition holds

RUNS = {
    # name: (backbone, lr, batch size, planned epochs, val accuracies, val losses, status)
    "alpha": ("resnet18", 1e-3, 16, 3, [0.50, 0.75, 0.70], [1.20, 0.80, 0.85], "completed"),
    "beta": ("mobilenet_v3_small", 2e-4, 128, 4, [0.40, 0.45], [1.50, 1.40], "stopped"),
    "gamma": ("resnet18", 5e-2, 8, 2, [0.30, 0.90], [2.00, 0.30], "completed"),
}


def write_run(root: Path, name: str, backbone: str, lr: float, batch: int, epochs: int, accs, losses, status: str):
    folder = root / name
    (folder / "checkpoints").mkdir(parents=True)
    project = {
        "name": "proj",
        "model": {"backbone": backbone},
        "optimizer": {"lr": lr},
        "loader": {"batch_size": batch},
        "train": {"epochs": epochs},
    }
    (folder / "project.json").write_text(json.dumps(project), encoding="utf-8")
    rows = [
        {"epoch": i + 1, "train_loss": loss + 0.1, "val_loss": loss, "val_accuracy": acc, "lr": lr}
        | {"epoch_seconds": 10.0, "samples_per_second": 100.0 * (i + 1)}
        for i, (acc, loss) in enumerate(zip(accs, losses, strict=True))
    ]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    update_run_info(folder, started="2026-03-01T10:00:00+0000", status=status)
    (folder / "checkpoints" / "last.pt").write_bytes(b"")
    if status == "completed":
        (folder / "checkpoints" / "final.pt").write_bytes(b"")
    return folder


@pytest.fixture()
def runs_root(tmp_path) -> Path:
    root = tmp_path / "runs"
    for name, spec in RUNS.items():
        write_run(root, name, *spec)
    return root


@pytest.fixture()
def view(qtbot, runs_root):
    view = RunsView()  # deleted by dispose() below, not by qtbot
    view.resize(1280, 800)
    view.set_project("", runs_root)
    view.show()
    qtbot.waitUntil(lambda: view.model.rowCount() == len(RUNS) and not view.is_reading(), timeout=WAIT_MS)
    yield view
    view.shutdown()
    dispose(view)


def dispose(widget) -> None:
    """Delete a widget now, on the GUI thread: left to the garbage collector, its wrapper may be collected on a
    worker thread, and PySide then deletes it from inside whatever the GUI thread runs next (a later test's)."""
    widget.close()
    widget.deleteLater()
    QCoreApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)


def column_texts(view: RunsView, key: str) -> dict[str, str]:
    """run name -> the cell's text, as shown (through the sorting/filtering proxy)."""
    col = view.columns().index(key)
    name_col = view.columns().index("name")
    proxy = view.proxy
    return {proxy.index(row, name_col).data(): proxy.index(row, col).data() for row in range(proxy.rowCount())}


def shown_names(view: RunsView) -> list[str]:
    name_col = view.columns().index("name")
    return [view.proxy.index(row, name_col).data() for row in range(view.proxy.rowCount())]


def test_the_table_shows_what_each_run_folder_holds(view):
    assert set(shown_names(view)) == set(RUNS)
    for key, expected in (
        ("model.backbone", {n: s[0] for n, s in RUNS.items()}),
        ("loader.batch_size", {n: str(s[2]) for n, s in RUNS.items()}),
        ("status", {n: s[6] for n, s in RUNS.items()}),
        ("epochs", {n: f"{len(s[4])}/{s[3]}" for n, s in RUNS.items()}),
        ("best_val_accuracy", {n: f"{max(s[4]):.3f}" for n, s in RUNS.items()}),
        ("final_val_accuracy", {n: f"{s[4][-1]:.3f}" for n, s in RUNS.items()}),
        ("best_val_loss", {n: f"{min(s[5]):.4f}" for n, s in RUNS.items()}),
        ("final_val_loss", {n: f"{s[5][-1]:.4f}" for n, s in RUNS.items()}),
        (
            "samples_per_second",
            {n: f"{np.mean([100.0 * (i + 1) for i in range(len(s[4]))]):.0f}" for n, s in RUNS.items()},
        ),
    ):
        assert column_texts(view, key) == expected, key


def test_numbers_sort_as_numbers_and_the_filter_keeps_matching_rows(view):
    col = view.columns().index("loader.batch_size")
    view.table.sortByColumn(col, Qt.SortOrder.AscendingOrder)
    assert shown_names(view) == ["gamma", "alpha", "beta"]  # 8, 16, 128 (as text: 128, 16, 8)
    view.table.sortByColumn(view.columns().index("best_val_loss"), Qt.SortOrder.DescendingOrder)
    assert shown_names(view) == ["beta", "alpha", "gamma"]  # 1.40, 0.80, 0.30

    view.filter_edit.setText("mobilenet")
    assert shown_names(view) == ["beta"]
    view.filter_edit.setText("resnet18 completed")  # every word must occur in the row
    assert sorted(shown_names(view)) == ["alpha", "gamma"]
    view.filter_edit.setText("")
    assert len(shown_names(view)) == 3


def test_any_project_field_can_be_added_as_a_column_from_the_menu(qtbot, view, runs_root):
    from engine.run_table import project_fields

    project = json.loads((runs_root / "alpha" / "project.json").read_text())
    project["optimizer"]["weight_decay"] = 0.125
    (runs_root / "alpha" / "project.json").write_text(json.dumps(project))
    view.refresh()
    qtbot.waitUntil(lambda: not view.is_reading(), timeout=WAIT_MS)
    assert "optimizer.weight_decay" not in view.columns()

    view.columns_menu.aboutToShow.emit()  # as opening the Columns menu fills it
    action = view.columns_menu.findChild(QAction, "runs.column.optimizer.weight_decay")
    assert action is not None and not action.isChecked()
    action.trigger()
    assert view.columns()[-1] == "optimizer.weight_decay"
    default = project_fields()["optimizer.weight_decay"]
    texts = column_texts(view, "optimizer.weight_decay")
    assert texts["alpha"] == "0.125"
    assert texts["beta"] == texts["gamma"] == f"{default:.4g}"  # a run without the field ran with the default


def test_a_new_run_folder_and_a_new_epoch_of_a_running_run_show_up(qtbot, view, runs_root):
    write_run(runs_root, "delta", "resnet18", 1e-3, 32, 3, [0.2], [1.9], "completed")
    qtbot.waitUntil(lambda: "delta" in shown_names(view), timeout=WAIT_MS)

    folder = runs_root / "live"
    folder.mkdir()
    claim_run_dir(folder)  # this process trains it, as far as anyone can tell: its lock is held
    try:
        (folder / "project.json").write_text(json.dumps({"name": "proj", "train": {"epochs": 3}}))
        update_run_info(folder, started="2026-03-02T10:00:00+0000", status="running")
        with open(folder / "metrics.jsonl", "w") as fh:
            fh.write(json.dumps({"epoch": 1, "val_accuracy": 0.25, "val_loss": 1.5}) + "\n")
        qtbot.waitUntil(lambda: column_texts(view, "epochs").get("live") == "1/3", timeout=WAIT_MS)
        assert column_texts(view, "status")["live"] == "running"

        with open(folder / "metrics.jsonl", "a") as fh:  # the next epoch ends
            fh.write(json.dumps({"epoch": 2, "val_accuracy": 0.625, "val_loss": 0.9}) + "\n")
        qtbot.waitUntil(lambda: column_texts(view, "epochs").get("live") == "2/3", timeout=WAIT_MS)
        assert column_texts(view, "best_val_accuracy")["live"] == "0.625"
    finally:
        release_run_dir(folder)
    update_run_info(folder, status="stopped")  # the run ends: its record says so and its lock is free
    qtbot.waitUntil(lambda: column_texts(view, "status").get("live") == "stopped", timeout=WAIT_MS)

    # Resumed later (by this app or another process): it runs again and its next epoch shows up. Its folder was
    # watched only while it ran, and the table kept the stopped run's figures.
    claim_run_dir(folder)
    try:
        update_run_info(folder, status="running")
        qtbot.waitUntil(lambda: column_texts(view, "status").get("live") == "running", timeout=WAIT_MS)
        with open(folder / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps({"epoch": 3, "val_accuracy": 0.875, "val_loss": 0.4}) + "\n")
        qtbot.waitUntil(lambda: column_texts(view, "epochs").get("live") == "3/3", timeout=WAIT_MS)
        assert column_texts(view, "best_val_accuracy")["live"] == "0.875"
    finally:
        release_run_dir(folder)


def test_selected_runs_overlay_one_curve_each_with_their_data(qtbot, view, runs_root):
    paths = [str(runs_root / "alpha"), str(runs_root / "gamma")]
    view.select_paths(paths)
    qtbot.waitUntil(lambda: view.plots.run_keys() == paths, timeout=WAIT_MS)
    for path, name in zip(paths, ("alpha", "gamma"), strict=True):
        x, y = view.plots.curve_data(path, "val_accuracy")
        assert x.tolist() == [float(i + 1) for i in range(len(RUNS[name][4]))]
        np.testing.assert_allclose(y, np.array(RUNS[name][4]) * 100)
        _x, loss = view.plots.curve_data(path, "val_loss")
        np.testing.assert_allclose(loss, RUNS[name][5])
        assert view.plots.label(path) == name
        drawn_x, drawn_y = view.plots.drawn(path, "val_accuracy").getData()
        np.testing.assert_allclose(drawn_y, np.array(RUNS[name][4]) * 100)
    assert view.plots.colour(paths[0]) != view.plots.colour(paths[1])
    assert view.plots.legend_entries() == [
        ("alpha", view.plots.colour(paths[0]).name()),
        ("gamma", view.plots.colour(paths[1]).name()),
    ]
    assert "alpha" in view.plots.legend.text() and "gamma" in view.plots.legend.text()

    view.select_paths(paths[:1])
    qtbot.waitUntil(lambda: view.plots.run_keys() == paths[:1], timeout=WAIT_MS)


def test_compare_shows_exactly_the_fields_that_differ(view, runs_root):
    view.select_paths([str(runs_root / "alpha"), str(runs_root / "gamma")])
    assert view.comparison() == {
        "optimizer.lr": ["0.001", "0.05"],
        "loader.batch_size": ["16", "8"],
        "train.epochs": ["3", "2"],
    }
    view.select_paths([str(runs_root / "alpha"), str(runs_root / "beta"), str(runs_root / "gamma")])
    assert set(view.comparison()) == {"model.backbone", "optimizer.lr", "loader.batch_size", "train.epochs"}
    assert view.comparison()["model.backbone"] == ["resnet18", "mobilenet_v3_small", "resnet18"]
    view.select_paths([str(runs_root / "alpha")])
    assert view.comparison() == {}
    assert "two or more" in view.compare_label.text()


def test_delete_refuses_a_running_run_and_moves_another_to_the_trash(qtbot, view, runs_root, tmp_path, monkeypatch):
    trash = tmp_path / "xdg" / "Trash"
    (trash / "files").mkdir(parents=True)
    (trash / "info").mkdir()
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    claim_run_dir(runs_root / "alpha")
    try:
        assert not view.delete_run(runs_root / "alpha")
        assert "being trained" in view.message() and str(runs_root / "alpha") in view.message()
        assert (runs_root / "alpha" / "metrics.jsonl").is_file()
    finally:
        release_run_dir(runs_root / "alpha")

    view.select_paths([str(runs_root / "beta")])
    view.delete_button.click()
    assert not (runs_root / "beta").exists()
    assert (trash / "files" / "beta" / "metrics.jsonl").is_file()  # whole, where the user can restore it
    assert "trash" in view.message()
    qtbot.waitUntil(lambda: sorted(shown_names(view)) == ["alpha", "gamma"], timeout=WAIT_MS)


def answer_delete_confirmation(button: QMessageBox.StandardButton, seen: list[str]) -> None:
    def answer():
        box = QApplication.activeModalWidget()
        if not isinstance(box, QMessageBox) or box.objectName() != "runs.delete_confirm":
            QTimer.singleShot(10, answer)
            return
        seen.append(box.text())
        box.button(button).click()

    QTimer.singleShot(0, answer)


def test_without_a_trash_a_run_is_deleted_only_after_a_confirmation_naming_it(view, runs_root):
    view.use_trash = False
    seen: list[str] = []
    answer_delete_confirmation(QMessageBox.StandardButton.Cancel, seen)
    assert not view.delete_run(runs_root / "gamma")
    assert str(runs_root / "gamma") in seen[0]
    assert (runs_root / "gamma" / "metrics.jsonl").is_file()

    answer_delete_confirmation(QMessageBox.StandardButton.Yes, seen)
    assert view.delete_run(runs_root / "gamma")
    assert not (runs_root / "gamma").exists()
    assert "gamma" not in shown_names(view)
    # Each confirmation, once answered, is deleted on the GUI thread (not kept, nor left to a worker thread's gc).
    QCoreApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)
    assert view.findChildren(QMessageBox, "runs.delete_confirm") == []


def test_open_as_current_project_loads_that_runs_project(qtbot, tmp_path):
    from app.main_window import MainWindow
    from widgets.tasks import running_tasks

    write_image_folder(tmp_path / "images", per_class=2)
    project = write_project(tmp_path / "project.json", "images", optimizer={"lr": 0.0123}, train={"epochs": 2})
    run = tmp_path / "runs" / "project-20260301-100000"
    (run / "checkpoints").mkdir(parents=True)
    data = json.loads(project.read_text())
    data["data"]["path"] = str(tmp_path / "images")  # as a run folder keeps it: paths made absolute
    data["output"] = {"dir": str(tmp_path / "runs")}
    (run / "project.json").write_text(json.dumps(data))
    (run / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "val_accuracy": 0.5}) + "\n")

    window = MainWindow()  # deleted by dispose() at the end, not by qtbot
    try:
        assert window.state.config.optimizer.lr != pytest.approx(0.0123)
        view = window.runs_view
        window.tabs.setCurrentWidget(view)
        window.show()
        view.add_folder(tmp_path / "runs")
        qtbot.waitUntil(lambda: view.model.rowCount() == 1 and not view.is_reading(), timeout=WAIT_MS)
        view.select_paths([str(run)])
        view.open_button.click()
        assert window.state.config.optimizer.lr == pytest.approx(0.0123)
        assert window.state.config.train.epochs == 2
        assert window.state.file == "" and window.state.dirty  # Save asks where: the run's record stays as it was
        assert window.current_run_dir == str(run.resolve())
        assert json.loads((run / "project.json").read_text()) == data
    finally:
        window.state._set_dirty(False)  # noqa: SLF001 - closing must not ask about the unsaved project
        qtbot.waitUntil(lambda: not running_tasks(), timeout=120000)
        dispose(window)


def test_resume_is_offered_for_a_stopped_run_and_asks_for_its_last_checkpoint(qtbot, view, runs_root):
    view.select_paths([str(runs_root / "alpha")])  # completed: nothing to continue
    assert not view.resume_button.isEnabled()
    view.select_paths([str(runs_root / "beta")])  # stopped after 2 of 4 epochs, last.pt kept
    assert view.resume_button.isEnabled()
    with qtbot.waitSignal(view.resume_requested, timeout=WAIT_MS) as signal:
        view.resume_button.click()
    assert signal.args == [str(runs_root / "beta" / "checkpoints" / "last.pt")]


def test_long_metrics_are_read_in_a_worker_process_into_the_same_curves(qtbot, view, runs_root, monkeypatch):
    import widgets.runs_view as runs_view

    monkeypatch.setattr(runs_view, "PROCESS_BYTES", 1)  # every metrics file counts as long here
    got: list[tuple[str, dict]] = []
    paths = [str(runs_root / "alpha"), str(runs_root / "gamma")]
    runs_view.read_curves(paths, got.append, threading.Event())
    assert [path for path, _curves in got] == paths
    for (path, curves), name in zip(got, ("alpha", "gamma"), strict=True):
        x, y = curves["val_accuracy"].used()
        assert x.tolist() == [float(i + 1) for i in range(len(RUNS[name][4]))], path
        np.testing.assert_allclose(y, np.array(RUNS[name][4]) * 100)
        np.testing.assert_allclose(curves["val_loss"].used()[1], RUNS[name][5])


def test_before_the_first_run_the_missing_runs_folder_is_no_error_and_its_first_run_shows_up(qtbot, tmp_path):
    root = tmp_path / "project" / "runs"  # neither it nor its parent exists yet
    view = RunsView()
    try:
        view.set_project("", root)
        view.show()
        qtbot.waitUntil(lambda: not view.is_reading() and view.message_label.text() != "", timeout=WAIT_MS)
        assert view.message_label.text().startswith("No runs yet:") and not view._error
        assert view.model.rowCount() == 0
        write_run(root, "first", "resnet18", 1e-3, 32, 2, [0.5], [1.0], "completed")  # the first run makes it
        qtbot.waitUntil(lambda: shown_names(view) == ["first"], timeout=WAIT_MS)
        assert view.message_label.text() == ""
    finally:
        view.shutdown()
        dispose(view)


def test_at_1280x800_the_table_has_the_tab_until_runs_are_selected_then_shares_it_with_legible_plots(qtbot, tmp_path):
    from PySide6.QtCore import QPoint
    from PySide6.QtTest import QTest

    from app.main_window import MainWindow
    from tests.widgets.test_live_plots import value_axis_ticks
    from widgets.tasks import running_tasks

    write_image_folder(tmp_path / "images", per_class=2)
    project = write_project(tmp_path / "project.json", "images")
    for i in range(15):  # dated names as the app makes them: they share their start
        accs = [0.3 + 0.05 * i + 0.1 * e for e in range(3)]
        write_run(
            tmp_path / "runs",
            f"tiny-202603{i + 1:02d}-101500",
            "resnet18",
            1e-3,
            8,
            3,
            accs,
            [1.5, 1.0, 0.7],
            "completed",
        )
    window = MainWindow()  # deleted by dispose() at the end, not by qtbot
    try:
        window.resize(1280, 800)
        assert window.open_project(str(project))
        view = window.runs_view
        window.tabs.setCurrentWidget(view)
        window.show()
        qtbot.waitExposed(window)
        qtbot.waitUntil(lambda: view.model.rowCount() == 15 and not view.is_reading(), timeout=WAIT_MS)
        QApplication.processEvents()

        # Nothing selected: no empty plots, a hint instead, and the table has the tab's height: every run shows.
        assert not view.details.isVisible() and view.hint.isVisible()
        assert view.visible_rows() >= 15, view.visible_rows()
        # A run name is cut in the middle, where dated names differ, not at the end.
        assert view.table.textElideMode() == Qt.TextElideMode.ElideMiddle
        assert view.table.columnWidth(view.columns().index("name")) <= 240

        # Three selected: their curves and the comparison under the table, which keeps the larger share.
        paths = [str(r.path) for r in view.model.records[:3]]
        view.select_paths(paths)
        qtbot.waitUntil(lambda: view.plots.run_keys() == paths, timeout=WAIT_MS)
        QApplication.processEvents()
        assert view.details.isVisible() and not view.hint.isVisible()
        table_box, details = view.splitter.sizes()
        assert table_box > details and view.visible_rows() >= 6, (view.splitter.sizes(), view.visible_rows())
        for name, plot in view.plots.plots.items():
            ticks, line = value_axis_ticks(plot)
            assert len(ticks) >= 1 and (np.diff(ticks) >= line).all(), (name, ticks)
            assert plot.getViewBox().height() >= 2 * line, name  # room for the curves, not just the labels

        # The user drags the split; the details keep that height when they are hidden and shown again.
        handle = view.splitter.handle(1)
        centre = handle.rect().center()
        QTest.mousePress(handle, Qt.MouseButton.LeftButton, pos=centre)
        QTest.mouseMove(handle, QPoint(centre.x(), centre.y() - 60))
        QTest.mouseRelease(handle, Qt.MouseButton.LeftButton, pos=QPoint(centre.x(), centre.y() - 60))
        dragged = view.splitter.sizes()
        assert dragged[1] > details
        view.select_paths([])
        assert not view.details.isVisible() and view.hint.isVisible()
        view.select_paths(paths[:1])
        assert view.details.isVisible() and view.splitter.sizes() == dragged
    finally:
        window.state._set_dirty(False)  # noqa: SLF001 - closing must not ask about the unsaved project
        qtbot.waitUntil(lambda: not running_tasks(), timeout=120000)
        dispose(window)
