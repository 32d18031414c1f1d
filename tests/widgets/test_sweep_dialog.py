"""The Sweep dialog with real sweeps: the space it builds from the field declarations is the SPACE.json the CLI takes
(saved and loaded back), bad ranges are refused by name before any trial, a real 3-trial study runs on a worker thread
with its trials arriving in the table and the plots with the values Optuna stored, *Use best* puts the best trial's
values into the project, and Stop ends the sweep with no batch after it (measured on the sweep's worker thread)."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import pytest
from conftest import write_image_folder, write_project
from PySide6.QtCore import Qt, QThread, QTimer
from PySide6.QtWidgets import (
    QAbstractButton,
    QAbstractItemView,
    QAbstractSpinBox,
    QApplication,
    QComboBox,
    QLineEdit,
    QMessageBox,
    QWidget,
)

from engine.sweep import parse_space
from widgets.layers_panel import LayersPanel
from widgets.state import ProjectState
from widgets.sweep_dialog import SweepDialog

optuna = pytest.importorskip("optuna")
from optuna.trial import TrialState  # noqa: E402 - after the skip above

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")


def _state(tmp_path, per_class=6, **sections) -> ProjectState:
    write_image_folder(tmp_path / "images", per_class=per_class)
    sections = {"model": {"freeze": "head_only"}, **sections}
    state = ProjectState()
    state.open(write_project(tmp_path / "project.json", "images", **sections))
    return state


def _tick(dialog: SweepDialog, path: str):
    dialog._items[path].setCheckState(0, Qt.CheckState.Checked)  # as a click on the field's box does
    return dialog.editor(path)


def _study(tmp_path):
    return optuna.load_study(study_name="tiny-sweep", storage=f"sqlite:///{tmp_path / 'runs' / 'sweeps.db'}")


def test_the_space_built_from_the_declarations_is_the_cli_space_file_and_bad_ranges_are_refused_by_name(
    qtbot, tmp_path
):
    state = _state(tmp_path)
    dialog = SweepDialog(state)
    qtbot.addWidget(dialog)
    assert dialog.space() == {} and not dialog.start()
    assert "no field is ticked" in dialog.message.text()

    # Numbers start around the current value inside the declared limits; a choice field offers its declared values.
    lr = _tick(dialog, "optimizer.lr")  # 0.003, declared > 0: a tenth to ten times, log
    assert (lr.low.text(), lr.high.text(), lr.log.isChecked()) == ("0.0003", "0.03", True)
    batch = _tick(dialog, "loader.batch_size")  # 8, declared >= 1: half to twice, step 1
    assert (batch.low.value(), batch.high.value(), batch.step.value()) == (4, 16, 1)
    smoothing = _tick(dialog, "loss.label_smoothing")  # 0, declared >= 0 and < 1
    assert (smoothing.low.text(), smoothing.high.text(), smoothing.log.isChecked()) == ("0", "0.5", False)
    optimizer = _tick(dialog, "optimizer.name")
    assert optimizer.checked_choices() == ["sgd", "adam", "adamw", "rmsprop"]

    batch.step.setValue(4)
    smoothing.step.setText("0.1")
    for i in (0, 3):  # untick sgd and rmsprop
        optimizer.choices.item(i).setCheckState(Qt.CheckState.Unchecked)
    expected = {
        "optimizer.name": {"type": "categorical", "choices": ["adam", "adamw"]},
        "loader.batch_size": {"type": "int", "low": 4, "high": 16, "step": 4},
        "loss.label_smoothing": {"type": "float", "low": 0.0, "high": 0.5, "step": 0.1},
        "optimizer.lr": {"type": "float", "low": 0.0003, "high": 0.03, "log": True},
    }
    assert dialog.space() == expected
    checked = dialog.checked_space()
    assert checked is not None and {p.path: p for p in checked} == {p.path: p for p in parse_space(expected)}

    # Every control, the editors' included, has a documented objectName.
    from app.object_names import all_names

    kinds = (QAbstractButton, QLineEdit, QComboBox, QAbstractSpinBox, QAbstractItemView)

    def part_of_a_control(widget: QWidget) -> bool:  # a spin box's line edit, a table's header, a combo's popup
        ancestor = widget.parent()
        while ancestor is not None and ancestor is not dialog:
            if isinstance(ancestor, kinds) or ancestor.objectName().startswith("qt_"):
                return True
            ancestor = ancestor.parent()
        return False

    controls = [w for w in dialog.findChildren(QWidget) if isinstance(w, kinds) and not part_of_a_control(w)]
    names = {w.objectName() for w in controls if not w.objectName().startswith("qt_")}
    assert "" not in names and names <= set(all_names()), names - set(all_names())

    # Saved as the CLI's space file, and a fresh dialog loaded from it shows the same space.
    space_file = tmp_path / "space.json"
    assert dialog.save_space(space_file)
    assert json.loads(space_file.read_text()) == expected
    fresh = SweepDialog(state)
    qtbot.addWidget(fresh)
    assert fresh.load_space_file(space_file)
    assert fresh.space() == expected and set(fresh.editors) == set(expected)

    # Refused by name before anything runs: outside the field's limits, an empty choice list, not a number.
    smoothing.high.setText("1.5")
    assert not dialog.start() and dialog.task is None
    assert "loss.label_smoothing: high = 1.5 outside the field's limits (>= 0 and < 1)" in dialog.message.text()
    assert not dialog.save_space(tmp_path / "bad.json") and not (tmp_path / "bad.json").exists()
    smoothing.high.setText("0.5")
    for i in (1, 2):
        optimizer.choices.item(i).setCheckState(Qt.CheckState.Unchecked)
    assert not dialog.start()
    assert "optimizer.name: choices must be a non-empty list of values" in dialog.message.text()
    _tick(dialog, "optimizer.name").choices.item(1).setCheckState(Qt.CheckState.Checked)
    lr.low.setText("a lot")
    assert not dialog.start() and "optimizer.lr: low = 'a lot' is not a number" in dialog.message.text()
    lr.low.setText("0.0003")
    dialog.sampler.setCurrentText("grid")  # a grid needs a step for a float range: lr has none
    assert not dialog.start() and "optimizer.lr: a grid needs choices or a step" in dialog.message.text()
    assert not (tmp_path / "runs").exists()  # no study, no trial

    # A space file naming an unknown field is refused by name and leaves the dialog as it was.
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"optimizer.learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2}}))
    assert not fresh.load_space_file(wrong)
    assert "optimizer.learning_rate: not a project field (did you mean" in fresh.message.text()
    assert "optimizer.lr?" in fresh.message.text()
    assert fresh.space() == expected


def test_freeze_up_to_is_offered_while_the_project_freezes_up_to_a_block_with_the_layers_panel_blocks(qtbot, tmp_path):
    state = _state(tmp_path)  # model.freeze head_only: model.freeze_up_to is not used
    layers = LayersPanel(state)
    qtbot.addWidget(layers)
    layers.set_num_outputs(3)
    qtbot.waitUntil(lambda: bool(layers.up_to_modules()), timeout=60000)
    dialog = SweepDialog(state)  # no list given: the dialog lists the blocks itself, off the GUI thread
    qtbot.addWidget(dialog)
    item = dialog._items["model.freeze_up_to"]
    assert item.isHidden() and "model.freeze_up_to" not in dialog.offered()  # its rule hides it, as in the panels
    assert dialog.set_searched("model.freeze_up_to", True) is None and dialog.space() == {}
    _tick(dialog, "model.freeze")  # searched: up_to is among the values tried, so freeze_up_to is used in some trials
    assert not item.isHidden() and "model.freeze_up_to" in dialog.offered()
    dialog.set_searched("model.freeze", False)
    assert item.isHidden()

    state.set("model.freeze", "up_to")
    state.set("model.freeze_up_to", "layer1")
    assert not item.isHidden()
    editor = _tick(dialog, "model.freeze_up_to")
    qtbot.waitUntil(lambda: editor.choices.count() > 1, timeout=60000)  # the project's block, then all of them
    offered = [editor.choices.item(i).text() for i in range(editor.choices.count())]
    assert offered == layers.up_to_modules() and "layer3" in offered
    assert editor.checked_choices() == ["layer1"]  # the project's own block, ticked to start with
    editor.choices.item(offered.index("layer1")).setCheckState(Qt.CheckState.Unchecked)
    for name in ("layer2", "layer3"):
        editor.choices.item(offered.index(name)).setCheckState(Qt.CheckState.Checked)
    assert dialog.space() == {"model.freeze_up_to": {"type": "categorical", "choices": ["layer2", "layer3"]}}
    assert dialog.checked_space() is not None

    # The project stops freezing up to a block: the field is no longer searched, and the dialog says why.
    assert state.try_set("model.freeze", "head_only", also={"model.freeze_up_to": None}) is None
    assert dialog.space() == {} and item.isHidden()
    assert "model.freeze_up_to (Set both or remove freeze_up_to; used only with model.freeze = 'up_to'.)" in (
        dialog.message.text()
    )


def test_only_the_fields_the_project_uses_are_offered_greyed_or_hidden_as_their_applies_rules_say(qtbot, tmp_path):
    state = _state(tmp_path, model={"freeze": "head_only", "weights": "DEFAULT"})  # folder data, adam
    dialog = SweepDialog(state)
    qtbot.addWidget(dialog)
    items = dialog._items

    def enabled(path: str) -> bool:
        return bool(items[path].flags() & Qt.ItemFlag.ItemIsUserCheckable) and not items[path].isDisabled()

    # The weights bring their own preprocessing: the image size is greyed with the reason, as the Backbone/Training
    # panels grey it; it cannot be ticked.
    assert not items["data.image_size"].isHidden() and not enabled("data.image_size")
    assert "Set by the chosen weights' own preprocessing" in items["data.image_size"].toolTip(0)
    assert "model.weights = null" in items["data.image_size"].toolTip(0)
    assert dialog.set_searched("data.image_size", True) is None and "data.image_size" not in dialog.editors
    # Image folder data: no shuffle buffer (streamed shards only) - hidden, as a rule with hide is in the panels.
    assert items["data.shuffle_buffer"].isHidden()
    # adam: its eps is offered; sgd's momentum and rmsprop's alpha are not.
    assert enabled("optimizer.eps")
    assert items["optimizer.momentum"].isHidden() and items["optimizer.alpha"].isHidden()
    # Early stopping is off: its fields are greyed (its rules do not hide).
    assert not items["early_stopping.patience"].isHidden() and not enabled("early_stopping.patience")
    assert set(dialog.offered()) == {p for p in items if enabled(p) and not items[p].isHidden()}
    # The filter keeps the hidden ones hidden.
    dialog.filter.setText("optimizer")
    assert items["optimizer.momentum"].isHidden() and not items["optimizer.lr"].isHidden()
    dialog.filter.setText("")

    # A space file naming a field the project does not use is refused by name, and the dialog stays as it was.
    _tick(dialog, "optimizer.lr")
    space = tmp_path / "space.json"
    space.write_text(json.dumps({"data.image_size": {"type": "int", "low": 32, "high": 64}}))
    assert not dialog.load_space_file(space)
    assert "data.image_size is not used by this project" in dialog.message.text()
    assert set(dialog.editors) == {"optimizer.lr"}

    # The project changes: the fields follow it.
    state.set("model.weights", None)
    assert enabled("data.image_size") and dialog.set_searched("data.image_size", True) is not None
    state.set("optimizer.name", "sgd")
    assert enabled("optimizer.momentum") and not items["optimizer.momentum"].isHidden()
    assert items["optimizer.eps"].isHidden()
    # Searching the optimizer itself: each optimizer's own settings are used in some trials, so all are offered.
    _tick(dialog, "optimizer.name")
    assert enabled("optimizer.eps") and enabled("optimizer.alpha") and enabled("optimizer.momentum")
    # A space file with a field that depends on another of its fields loads, in any order.
    space.write_text(
        json.dumps(
            {
                "optimizer.alpha": {"type": "float", "low": 0.9, "high": 0.99},
                "optimizer.name": {"type": "categorical", "choices": ["sgd", "rmsprop"]},
            }
        )
    )
    fresh = SweepDialog(state)
    qtbot.addWidget(fresh)
    assert fresh.load_space_file(space), fresh.message.text()
    assert list(fresh.space()) == ["optimizer.name", "optimizer.alpha"]


def test_streamed_shards_offer_the_shuffle_buffer(qtbot, tmp_path):
    state = ProjectState()
    shards = "shards/train-{000000..000001}.tar"
    state.open(write_project(tmp_path / "project.json", shards, data={"kind": "webdataset", "val_fraction": 0.0}))
    dialog = SweepDialog(state)
    qtbot.addWidget(dialog)
    assert "data.shuffle_buffer" in dialog.offered() and not dialog._items["data.shuffle_buffer"].isHidden()


def test_a_project_in_phases_offers_what_a_phase_brings_into_use(qtbot, tmp_path):
    """The project's own schedule is none, but its second phase trains with a cosine schedule, whose floor
    (schedule.eta_min) is then used: offered. The step schedule's step_size is used by no phase: not offered."""
    phases = [
        {"name": "head", "epochs": 1, "freeze": "head_only", "schedule": "none"},
        {"name": "tune", "epochs": 1, "freeze": "none", "schedule": "cosine"},
    ]
    state = _state(tmp_path, schedule={"name": "none"}, train={"device": "cpu", "phases": phases})
    dialog = SweepDialog(state)
    qtbot.addWidget(dialog)
    offered = dialog.offered()
    assert "schedule.eta_min" in offered and not dialog._items["schedule.eta_min"].isHidden()
    assert "schedule.step_size" not in offered


def test_a_real_sweep_fills_the_table_and_plots_with_the_studys_values_and_use_best_sets_the_project(qtbot, tmp_path):
    state = _state(tmp_path)
    dialog = SweepDialog(state)
    qtbot.addWidget(dialog)
    lr = _tick(dialog, "optimizer.lr")
    lr.low.setText("1e-4")
    lr.high.setText("0.1")
    batch = _tick(dialog, "loader.batch_size")
    batch.low.setValue(4)
    batch.high.setValue(8)
    batch.step.setValue(4)
    dialog.trials_count.setValue(3)
    dialog.sampler.setCurrentText("random")
    dialog.pruner.setCurrentText("none")
    live = []
    dialog.table.model().rowsInserted.connect(lambda *_: live.append(dialog.is_running()))
    qtbot.mouseClick(dialog.run_button, Qt.MouseButton.LeftButton)
    assert dialog.is_running() and dialog.run_button.text() == "Stop"
    qtbot.waitUntil(lambda: not dialog.is_running(), timeout=180000)
    assert dialog.sweep_result is not None, dialog.message.text()
    assert live[:1] == [True]  # the first trial reached the table while the sweep was still running

    study = _study(tmp_path)
    trials = sorted(study.trials, key=lambda t: t.number)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    header = [dialog.table.horizontalHeaderItem(c).text() for c in range(dialog.table.columnCount())]
    assert header == ["Trial", "loader.batch_size", "optimizer.lr", "State", "val_accuracy", "Epochs", "Run folder"]
    rows = [[dialog.table.item(r, c).text() for c in range(len(header))] for r in range(dialog.table.rowCount())]
    assert rows == [
        [
            str(t.number),
            str(t.params["loader.batch_size"]),
            f"{t.params['optimizer.lr']:.4g}",
            "complete",
            f"{t.value:.4f}",
            "2",
            Path(t.user_attrs["run_dir"]).name,
        ]
        for t in trials
    ]
    folders = [dialog.table.item(r, len(header) - 1).toolTip() for r in range(dialog.table.rowCount())]
    assert folders == [t.user_attrs["run_dir"] for t in trials]
    assert all(Path(folder).parent == tmp_path / "runs" for folder in folders)
    assert all(Path(folder).is_dir() for folder in folders)

    # Each parameter's plot holds every trial at (its value, its objective); the learning rate's x axis is log, where
    # the plot holds log10 of the values.
    assert dialog.plotted("optimizer.lr") == (
        pytest.approx([math.log10(t.params["optimizer.lr"]) for t in trials]),
        pytest.approx([t.value for t in trials]),
    )
    assert dialog.plotted("loader.batch_size")[0] == [float(t.params["loader.batch_size"]) for t in trials]
    assert dialog.plots["optimizer.lr"].getAxis("bottom").logMode
    assert not dialog.plots["loader.batch_size"].getAxis("bottom").logMode

    # Use best: the project takes the best trial's values and is marked changed.
    assert not state.dirty and state.get("optimizer.lr") == 0.003
    qtbot.mouseClick(dialog.use_button, Qt.MouseButton.LeftButton)
    assert state.get("optimizer.lr") == study.best_trial.params["optimizer.lr"]
    assert state.get("loader.batch_size") == study.best_trial.params["loader.batch_size"]
    assert state.dirty and f"trial {study.best_trial.number}" in dialog.message.text()


def test_stop_ends_the_sweep_with_no_batch_after_it_and_the_window_trains_one_thing_at_a_time(qtbot, tmp_path):
    from app.main_window import MainWindow

    state = _state(tmp_path, per_class=12, loader={"batch_size": 2})  # 27 training images: 14 batches an epoch
    window = MainWindow(state)
    qtbot.addWidget(window)
    window.state.catalog_checks = True
    dialog = window.open_sweep_dialog()
    assert window.sweep_dialog is dialog and dialog.isVisible()
    _tick(dialog, "optimizer.lr")
    dialog.trials_count.setValue(3)

    # A training run in the window: the sweep is refused, with the reason.
    with qtbot.waitSignal(window.controller.run_finished, timeout=120000):
        assert window.train()
        assert not dialog.start() and dialog.task is None
        assert "A training run is active in the window" in dialog.message.text()
        window.stop()

    # On the sweep's worker thread: the first batch of trial 0 waits there until Stop has been clicked.
    seen: dict = {"at": None, "steps": [], "gui": QThread.currentThread()}
    paused, release = threading.Event(), threading.Event()

    def on_worker_thread(event: dict) -> None:
        if event["kind"] != "batch" or event["trial"] != 0:
            return
        seen["steps"] += event["steps"]
        if seen["at"] is None:
            seen["at"], seen["thread"] = event["global_step"], QThread.currentThread()
            paused.set()
            release.wait(120)

    dialog.relay.news.connect(on_worker_thread, Qt.ConnectionType.DirectConnection)
    qtbot.mouseClick(dialog.run_button, Qt.MouseButton.LeftButton)
    assert dialog.is_running()
    assert not window.act_train.isEnabled() and not window.run_view.train_button.isEnabled()
    assert not window.train() and "The sweep is running" in window.last_error_box.windowTitle()
    window.last_error_box.close()
    try:
        qtbot.waitUntil(paused.is_set, timeout=120000)
        qtbot.mouseClick(dialog.run_button, Qt.MouseButton.LeftButton)  # Stop, while the trainer waits after batch
        assert dialog.message.text() == "Stopping after this batch…"
    finally:
        release.set()
    qtbot.waitUntil(lambda: not dialog.is_running(), timeout=120000)
    QApplication.processEvents()

    assert seen["thread"] is not seen["gui"]  # the sweep ran off the GUI thread
    assert seen["at"] < 14 and max(seen["steps"]) == seen["at"]  # no batch ran after Stop
    study = _study(tmp_path)
    first = next(t for t in study.trials if t.number == 0)
    assert first.state == TrialState.FAIL and first.user_attrs["failure"] == "stopped"
    assert not [t for t in study.trials if t.state in (TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED)]
    assert dialog.table.rowCount() == 1 and dialog.table.item(0, 2).text() == "stopped"
    runs = [p for p in (tmp_path / "runs").iterdir() if p.is_dir() and p.name.startswith("tiny-sweep-trial")]
    assert [p.name.startswith("tiny-sweep-trial-000") for p in runs] == [True]  # trial 1 never began
    assert window.act_train.isEnabled() and window.run_view.train_button.isEnabled()
    window.state._set_dirty(False)


def answer_stop_question(button: QMessageBox.StandardButton, seen: list[tuple[str, str]]) -> None:
    """Answer the window's Stop-and-close question once it shows (it blocks in its own event loop)."""

    def answer() -> None:
        box = QApplication.activeModalWidget()
        if not isinstance(box, QMessageBox) or box.objectName() != "main.stop_confirm":
            QTimer.singleShot(10, answer)
            return
        seen.append((box.windowTitle(), box.text()))
        box.button(button).click()

    QTimer.singleShot(0, answer)


def test_closing_the_window_during_a_sweep_asks_and_no_keeps_it_running_and_yes_stops_it(qtbot, tmp_path):
    from app.main_window import MainWindow

    state = _state(tmp_path, per_class=12, loader={"batch_size": 2})  # 14 batches an epoch, 2 epochs a trial
    window = MainWindow(state)
    qtbot.addWidget(window)
    window.show()
    window.state.catalog_checks = True
    dialog = window.open_sweep_dialog()
    _tick(dialog, "optimizer.lr")
    dialog.trials_count.setValue(3)

    # On the sweep's worker thread, trial 0's first batch waits until the sweep is told to stop.
    held: dict = {"at": None, "steps": []}
    paused = threading.Event()

    def on_worker_thread(event: dict) -> None:
        if event["kind"] != "batch":
            return
        held["steps"] += event["steps"]
        if held["at"] is None:
            held["at"] = event["global_step"]
            paused.set()
            dialog.sweep.stop_event.wait(120)

    dialog.relay.news.connect(on_worker_thread, Qt.ConnectionType.DirectConnection)
    assert dialog.start()
    try:
        qtbot.waitUntil(paused.is_set, timeout=120000)
        qtbot.waitUntil(lambda: dialog.progress.text().startswith("Trial 0: epoch 1 of 2, batch"))
        window.state._set_dirty(False)
        seen: list[tuple[str, str]] = []
        answer_stop_question(QMessageBox.StandardButton.No, seen)
        assert not window.close()
        # The question named the sweep and where it is; No keeps the window and the sweep.
        title, text = seen[0]
        assert title == "A sweep is running"
        assert "study tiny-sweep (3 trials asked), 0 finished in this sweep; trial 0: epoch 1 of 2, batch" in text
        assert window.isVisible() and dialog.is_running() and not dialog.sweep.stop_event.is_set()

        answer_stop_question(QMessageBox.StandardButton.Yes, seen)
        assert window.close()
    finally:
        dialog.stop_and_wait()  # a failed assertion above must leave neither the worker waiting nor the sweep going
    assert len(seen) == 2 and not dialog.is_running() and not window.isVisible()
    # Stopped the way Stop stops it: no batch after the question was answered, the trial kept as stopped.
    assert max(held["steps"]) == held["at"]
    study = _study(tmp_path)
    first = next(t for t in study.trials if t.number == 0)
    assert first.state == TrialState.FAIL and first.user_attrs["failure"] == "stopped"
    assert not [t for t in study.trials if t.state in (TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED)]
    runs = [p.name for p in (tmp_path / "runs").iterdir() if p.name.startswith("tiny-sweep-trial")]
    assert len(runs) == 1 and runs[0].startswith("tiny-sweep-trial-000")  # trial 1 never began
