"""Bad settings and actions in the desktop app (offscreen): a clear message, the app stays usable, nothing is lost.

Real windows, real training on the worker thread, real files. Modal questions are answered through the
window's hooks (_ask_save_changes, _ask_stop_training, ExportDialog._confirm_overwrite); errors are read
from the non-blocking box the window keeps in last_error_box.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from conftest import train_head_only_run, write_project
from PySide6.QtCore import QCoreApplication, QObject, QSettings, Qt, QThread, Signal, Slot
from PySide6.QtWidgets import QLabel, QLineEdit, QMessageBox, QPushButton, QSpinBox
from test_bad_settings_cli import read_only_folder

from app.main_window import MainWindow
from engine.checkpoints import load_checkpoint
from engine.config import SCHEMA_VERSION, load_project
from engine.restore import restore_model
from engine.runs import read_metrics


@pytest.fixture(autouse=True)
def _isolated_app(monkeypatch, tmp_path):
    """QSettings in a temporary folder, modal questions answered, and no background task left after a test.

    (tests/conftest.py does the first and last for tests/app and tests/widgets only.)
    """
    QCoreApplication.setOrganizationName("ModelWorkbenchTests")
    QCoreApplication.setApplicationName("ModelWorkbenchTests")
    QSettings.setDefaultFormat(QSettings.Format.IniFormat)
    QSettings.setPath(QSettings.Format.IniFormat, QSettings.Scope.UserScope, str(tmp_path / "settings"))
    monkeypatch.setattr(MainWindow, "_ask_save_changes", lambda self: QMessageBox.StandardButton.Discard)
    monkeypatch.setattr(MainWindow, "_ask_stop_training", lambda self: True)
    yield
    from widgets.tasks import cancel_all, running_tasks

    left = [t.name for t in running_tasks()]
    cancel_all(30000)
    assert not left, f"background tasks still running after the test: {left}"


def _open_window(qtbot, project: Path) -> MainWindow:
    win = MainWindow()
    qtbot.addWidget(win)
    assert win.open_project(str(project))
    return win


@pytest.fixture()
def window(qtbot, tiny_project):
    win = _open_window(qtbot, tiny_project)
    yield win
    if win.controller.is_running():
        win.controller.stop()
        win.controller.wait(60000)
    _wait_tasks(qtbot)
    win.state._set_dirty(False)
    win.close()


@pytest.fixture()
def long_project(tmp_path, image_folder) -> Path:
    """14 batches an epoch and 50 epochs: a run that is still going whenever the test acts."""
    return write_project(
        tmp_path / "long.json", "images", loader={"batch_size": 2}, train={"epochs": 50, "device": "cpu"}
    )


def _wait_tasks(qtbot):
    from widgets.tasks import running_tasks

    qtbot.waitUntil(lambda: not running_tasks(), timeout=120000)


def _train(qtbot, window, *, timeout=180000) -> dict:
    with qtbot.waitSignal(window.controller.run_finished, timeout=timeout) as blocker:
        assert window.train()
    return blocker.args[0]


def _log(window) -> str:
    return window.log_view.toPlainText()


def _error_text(window) -> str:
    box = window.last_error_box
    assert box is not None, "no error was shown"
    text = box.text()
    box.close()
    window.last_error_box = None
    return text


def _runs(project: Path) -> list[Path]:
    runs = project.parent / "runs"
    return sorted(runs.iterdir()) if runs.is_dir() else []


# -- project files that cannot be opened ---------------------------------------------------------------------

# (file name, how the tiny project is spoiled or the raw text, what the message must contain)
BAD_FILES = [
    (
        "json.json",
        '{\n  "name": "x",\n  "loader": {"batch_size": 8,}\n}\n',
        "not valid JSON: Expecting property name enclosed in double quotes at line 3, column 30",
    ),
    ("batch0.json", {"loader": {"batch_size": 0}}, "loader.batch_size = 0: must be >= 1"),
    ("batch-4.json", {"loader": {"batch_size": -4}}, "loader.batch_size = -4: must be >= 1"),
    ("lr0.json", {"optimizer": {"lr": 0}}, "optimizer.lr = 0.0: must be > 0"),
    ("lr-neg.json", {"optimizer": {"lr": -0.1}}, "optimizer.lr = -0.1: must be > 0"),
    ("lr-nan.json", {"optimizer": {"lr": "nan"}}, "optimizer.lr = nan: must be a finite number"),
    ("epochs0.json", {"train": {"epochs": 0, "device": "cpu"}}, "train.epochs = 0: must be >= 1"),
    ("types.json", {"loader": {"batch_size": "8"}}, "loader.batch_size = '8': expected an integer"),
    ("unknown.json", {"loader": {"batchsize": 8}}, "loader.batchsize: unknown key (allowed: batch_size"),
    (
        "newer.json",
        {"schema_version": SCHEMA_VERSION + 1},
        f"schema_version = {SCHEMA_VERSION + 1}: this project was written by a newer Model Workbench",
    ),
    (
        "weights.json",
        {"loader": {"sampler": {"name": "weighted_random", "weights": [1, -2, 3]}}},
        "loader.sampler.weights: -2.0 is not a finite, non-negative weight",
    ),
]


def test_a_bad_project_file_is_reported_by_name_and_the_open_project_is_kept(qtbot, window, tmp_path):
    window.state.set("optimizer.lr", 0.0007)  # an unsaved edit: opening a bad file must not lose it
    before, file_before = window.state.config.to_dict(), window.state.file
    for name, spoil, message in BAD_FILES:
        path = tmp_path / name
        if isinstance(spoil, str):
            path.write_text(spoil)
        else:
            write_project(path, "images", **spoil)
        text_before = path.read_bytes()
        assert not window.open_project(str(path), ask=False), name
        text = _error_text(window)
        assert message in text and str(path) in text, (name, text)
        assert "Traceback" not in text
        assert window.state.config.to_dict() == before and window.state.file == file_before, name
        assert window.state.dirty, name
        assert path.read_bytes() == text_before, name  # a bad file is never rewritten
    assert window.act_train.isEnabled() and window.act_open.isEnabled()
    assert window.check_project() == [] and window.last_error_box is None


def test_the_training_panel_refuses_bad_batch_sizes_epochs_and_learning_rates(qtbot, window):
    panel = window.training
    before = window.state.config.to_dict()
    window.setup_tabs.setCurrentIndex(3)
    window.show()
    for name, field in (("batch_size", "loader.batch_size"), ("epochs", "train.epochs")):
        box = panel.findChild(QSpinBox, f"training.{name}")
        good = window.state.get(field)
        assert box.minimum() == 1
        for text, expected in (("0", good), ("-4", 4)):  # the minus sign cannot be typed: "-4" becomes 4
            box.setFocus()
            box.selectAll()
            qtbot.keyClicks(box, text)
            qtbot.keyClick(box, Qt.Key.Key_Return)
            box.clearFocus()
            assert window.state.get(field) == box.value() == expected, (name, text)
        window.state.set(field, good)
    # Values that reach the project by other ways (a script, a restored run) are refused by the same rules.
    for field, value in (
        ("loader.batch_size", 0),
        ("loader.batch_size", -4),
        ("train.epochs", 0),
        ("optimizer.lr", 0.0),
        ("optimizer.lr", float("nan")),
    ):
        reason = window.state.try_set(field, value)
        assert reason is not None and field in reason, (field, value)
    lr = panel.findChild(QLineEdit, "training.lr")
    message = panel.findChild(QLabel, "training.lr.message")
    for text in ("nan", "inf", "-1e-3", "0"):
        lr.setFocus()
        lr.selectAll()
        qtbot.keyClicks(lr, text)
        qtbot.keyClick(lr, Qt.Key.Key_Return)
        assert window.state.get("optimizer.lr") == pytest.approx(0.003), text
        assert message.isVisibleTo(panel) and "optimizer.lr" in message.text(), text
    assert window.state.config.to_dict() == before


# -- settings that reach training ----------------------------------------------------------------------------


def test_a_batch_larger_than_the_dataset_trains_and_the_log_says_why_epochs_are_one_batch(qtbot, window):
    window.state.update({"loader.batch_size": 64, "train.epochs": 1})
    result = _train(qtbot, window)
    assert result["status"] == "completed", result
    assert (
        "loader.batch_size = 64 is larger than the 27 training samples drawn per epoch: each epoch trains on "
        "one batch of 27" in _log(window)
    )
    assert load_checkpoint(Path(result["run_dir"]) / "checkpoints" / "final.pt")["global_step"] == 1


def test_a_diverging_run_is_stopped_with_its_message_and_the_earlier_epoch_is_kept(qtbot, window):
    window.state.update({"schedule.name": "step", "schedule.step_size": 1, "schedule.gamma": 1e20, "train.epochs": 3})
    before = window.state.config.to_dict()
    result = _train(qtbot, window)
    assert result["status"] == "failed" and result["error_type"] == "NonFiniteLossError"
    text = _error_text(window)
    assert "the loss became" in text and "at epoch 2, batch" in text and "Lower optimizer.lr" in text
    assert "Traceback" not in text
    run_dir = Path(result["run_dir"])
    last = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert last["epoch"] == 1 and not (run_dir / "checkpoints" / "final.pt").exists()
    restore_model(last)  # whole and loadable
    assert [m["epoch"] for m in read_metrics(run_dir)] == [1]
    # The epoch that trained is the current model; the project and the window are as they were.
    # (the best so far of an unfinished run, which here is that epoch: best.pt and last.pt are one file)
    assert window.current_checkpoint and Path(window.current_checkpoint).name in ("best.pt", "last.pt")
    assert load_checkpoint(window.current_checkpoint)["epoch"] == 1
    assert window.state.config.to_dict() == before
    assert not window.controller.is_running() and window.act_train.isEnabled()
    assert not [t for t in window.findChildren(QThread) if t.isRunning()]


def test_sampler_weights_of_the_wrong_length_are_named_and_the_next_run_trains(qtbot, window, tiny_project):
    window.state.update(
        {"loader.sampler.name": "weighted_random", "loader.sampler.weights": [1.0, 2.0, 3.0], "train.epochs": 1}
    )
    result = _train(qtbot, window)
    assert result["status"] == "failed"
    text = _error_text(window)
    assert "loader.sampler.weights has 3 values but the training set has 27 samples" in text
    assert "Traceback" not in text
    assert _runs(tiny_project) == []  # nothing was written, and no empty run folder is left
    assert window.state.get("loader.sampler.weights") == [1.0, 2.0, 3.0]  # the user's settings are kept
    window.state.set("loader.sampler.weights", "balanced")
    assert _train(qtbot, window)["status"] == "completed"


# -- buttons pressed twice -----------------------------------------------------------------------------------


def test_train_pressed_twice_starts_one_run(qtbot, long_project):
    win = _open_window(qtbot, long_project)
    started, steps = [], []
    win.controller.run_started.connect(started.append)
    win.controller.batch_finished.connect(lambda info: steps.extend(info["steps"]))
    train_button = win.run_view.findChild(QPushButton, "run.train")
    assert win.train()
    assert not win.train()  # the second press (say, F5 again) is refused
    win.act_train.trigger()  # the menu item and the button are disabled while a run goes
    train_button.click()
    assert not win.act_train.isEnabled() and not train_button.isEnabled()
    qtbot.waitUntil(lambda: len(steps) >= 2, timeout=60000)
    with qtbot.waitSignal(win.controller.run_finished, timeout=60000):
        win.stop()
    assert len(started) == 1 and len(_runs(long_project)) == 1
    assert "A run is already going." in _log(win)
    _wait_tasks(qtbot)
    win.close()


def test_stop_pressed_twice_stops_once_and_the_next_run_starts(qtbot, long_project):
    win = _open_window(qtbot, long_project)
    steps, finished = [], []
    win.controller.batch_finished.connect(lambda info: steps.extend(info["steps"]))
    win.controller.run_finished.connect(finished.append)
    stop_button = win.run_view.findChild(QPushButton, "run.stop")
    assert win.train()
    qtbot.waitUntil(lambda: len(steps) >= 2, timeout=60000)
    with qtbot.waitSignal(win.controller.run_finished, timeout=60000):
        stop_button.click()
        stop_button.click()
        win.act_stop.trigger()
        win.stop()
    # run_finished comes after the training thread was joined: all it sent is posted by now. Deliver every posted
    # event, so that a second stop or a second end of the run would be counted below.
    QCoreApplication.sendPostedEvents()
    QCoreApplication.processEvents()
    assert [r["status"] for r in finished] == ["stopped"]
    assert _log(win).count("Stopping after this batch...") == 1
    assert win.act_train.isEnabled() and not win.act_stop.isEnabled() and stop_button.text() == "Stop"
    # The stop did not stick: the next run trains to the end.
    win.state.set("train.epochs", 1)
    assert _train(qtbot, win)["status"] == "completed"
    assert len(_runs(long_project)) == 2
    _wait_tasks(qtbot)
    win.state._set_dirty(False)
    win.close()


# -- closing while a checkpoint is written -------------------------------------------------------------------


class _Answerer(QObject):
    """Lives on the GUI thread; ask() from another thread is answered only when the GUI thread runs its events."""

    _asked = Signal()

    def __init__(self) -> None:
        super().__init__()
        self.answered = threading.Event()
        self._asked.connect(self._answer)  # queued: asked from the training thread

    def ask(self) -> None:
        self._asked.emit()

    @Slot()
    def _answer(self) -> None:
        self.answered.set()


class _PausingFile:
    """A file object that writes through, but after its first MiB stops until the window is closing.

    It goes on once the close has asked the run to stop and the GUI thread, inside the close, has run its events
    (the close waits for the run that way): a close that did not wait would return with the write still stopped.
    """

    def __init__(self, fh, paused: threading.Event, closing: threading.Event, answerer: _Answerer, seen: dict):
        self._fh, self._paused, self._closing, self._answerer, self._seen = fh, paused, closing, answerer, seen
        self._written = 0

    def write(self, data) -> int:
        n = self._fh.write(data)
        self._written += len(data)
        if self._written >= 1 << 20 and not self._paused.is_set():
            self._paused.set()
            self._seen["closing"] = self._closing.wait(120)  # generous: only a broken close lets it run out
            self._answerer.ask()
            self._seen["waited"] = self._answerer.answered.wait(120)
        return n

    def __getattr__(self, name):
        return getattr(self._fh, name)


def test_closing_while_a_checkpoint_is_written_waits_and_leaves_it_whole(qtbot, long_project, monkeypatch):
    paused, closing, answerer, seen = threading.Event(), threading.Event(), _Answerer(), {}
    real_save = torch.save

    def save_with_a_pause(obj, f, *args, **kwargs):
        if paused.is_set():  # only the first checkpoint is held up
            return real_save(obj, f, *args, **kwargs)
        real_save(obj, _PausingFile(f, paused, closing, answerer, seen), *args, **kwargs)
        seen["written"] = True

    monkeypatch.setattr(torch, "save", save_with_a_pause)
    win = _open_window(qtbot, long_project)
    win.controller.logged.connect(lambda message: message == "Stopping after this batch..." and closing.set())
    assert win.train()
    qtbot.waitUntil(paused.is_set, timeout=120000)  # epoch 1's checkpoint is half written, and stays so
    assert win.close()  # the user agrees to stop (the hook answers yes)
    assert seen == {"closing": True, "waited": True, "written": True}  # the close waited for the write to finish
    assert not win.controller.is_running()
    assert not [t for t in win.findChildren(QThread) if t.isRunning()]
    run_dir = Path(win.controller.run_dir)
    folder = run_dir / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["best.pt", "epoch-001.pt", "last.pt"]  # no temp file
    ckpt = load_checkpoint(folder / "epoch-001.pt")
    assert ckpt["epoch"] == 1
    model = restore_model(ckpt)[0]
    assert set(model.state_dict()) == set(ckpt["model_state_dict"])
    assert load_checkpoint(folder / "last.pt")["epoch"] == 1
    assert [m["epoch"] for m in read_metrics(run_dir)] == [1]
    assert win.controller.last_result["status"] == "stopped"
    # The run can be continued where it stopped.
    assert load_project(run_dir / "project.json").train.epochs == 50


# -- export destinations -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return train_head_only_run(tmp_path_factory.mktemp("trained"))


def test_export_asks_before_overwriting_and_refuses_a_read_only_folder(qtbot, window, checkpoint, tmp_path):
    window.use_checkpoint(str(checkpoint))
    dialog = window.open_export_dialog()
    dialog.set_format("state_dict")
    asked = []

    # An existing file: the dialog asks (its hook stands in for the modal question); "No" keeps the file.
    out = tmp_path / "model.pth"
    out.write_bytes(b"an earlier export")
    dialog.path_edit.setText(str(out))
    dialog._confirm_overwrite = lambda path: asked.append(path) or False
    assert not dialog.export()
    assert asked == [out] and out.read_bytes() == b"an earlier export"
    assert "exists and was kept" in dialog.status.text()

    # A read-only folder: refused inline with the folder's name; nothing is written there.
    with read_only_folder(tmp_path / "locked") as locked:
        dialog.path_edit.setText(str(locked / "model.pth"))
        assert dialog.export()
        _wait_tasks(qtbot)
        assert "is not writable" in dialog.message.text() and str(locked) in dialog.message.text()
        assert list(locked.iterdir()) == [] and dialog.export_button.isEnabled()

    # A missing folder is made (the dialog's promise); "Yes" replaces the earlier file.
    dialog.path_edit.setText(str(tmp_path / "new" / "model.pth"))
    assert dialog.export()
    _wait_tasks(qtbot)
    assert (tmp_path / "new" / "model.pth").is_file() and not dialog.message.isVisible()
    dialog.path_edit.setText(str(out))
    dialog._confirm_overwrite = lambda path: asked.append(path) or True
    assert dialog.export()
    _wait_tasks(qtbot)
    assert asked == [out, out]
    assert set(torch.load(out, weights_only=True)) == set(load_checkpoint(checkpoint)["model_state_dict"])
    dialog.close()
