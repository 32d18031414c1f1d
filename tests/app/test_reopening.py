"""Reopening a project brings back its work (its runs, checkpoints and model), and dialogs start at its files."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from conftest import answer_file_dialog, write_image_folder, write_project
from PySide6.QtWidgets import QLabel, QMessageBox, QPushButton

from app.main_window import MainWindow
from engine.trainer import Callback
from widgets.tasks import running_tasks
from widgets.try_it import TryItPanel


class _StopAfterFirstEpoch(Callback):
    """What a user's Stop (or a closed laptop) leaves: one epoch of two saved, no final.pt."""

    def on_epoch_finished(self, trainer, state, metrics):
        trainer.stop()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two projects trained once for the module: 'done' ran to its end, 'interrupted' was stopped after epoch 1 of 2.

    Each test works on its own hard-linked copy, so best/last/final stay links to their epoch files."""
    from engine.config import load_project
    from engine.run_lock import release_run_dir
    from engine.runs import create_run_dir, run_callbacks
    from engine.trainer import Trainer

    root = tmp_path_factory.mktemp("reopening")
    for name, epochs, extra in (("done", 1, []), ("interrupted", 2, [_StopAfterFirstEpoch()])):
        folder = root / name
        write_image_folder(folder / "images", per_class=8)
        project = write_project(
            folder / "project.json",
            "images",
            model={"freeze": "head_only"},
            train={"epochs": epochs, "device": "cpu", "seed": 0},
            output={"dir": "runs", "tensorboard": False},
        )
        cfg = load_project(project)
        run_dir = create_run_dir(cfg)
        Trainer(cfg, run_callbacks(cfg, run_dir) + extra).run()
        release_run_dir(run_dir)  # as a run session does when its run ends
    return root


def copy_project(trained, name, tmp_path) -> tuple[Path, Path]:
    """A private copy of a trained project: its project file and its one run folder."""
    folder = tmp_path / name
    shutil.copytree(trained / name, folder, copy_function=os.link)
    (run,) = (folder / "runs").iterdir()
    return folder / "project.json", run


def older_copy(run: Path) -> Path:
    """The same run as if it had been trained an hour earlier."""
    older = run.with_name("tiny-older")
    shutil.copytree(run, older, copy_function=os.link)
    metrics = older / "metrics.jsonl"
    text = metrics.read_text()
    metrics.unlink()  # a file of its own: a hard link's time is the original's
    metrics.write_text(text)
    os.utime(metrics, (time.time() - 3600, time.time() - 3600))
    return older


@pytest.fixture(autouse=True)
def _answer_modal_questions(monkeypatch):
    monkeypatch.setattr(MainWindow, "_ask_save_changes", lambda self: QMessageBox.StandardButton.Discard)


@pytest.fixture()
def open_window(qtbot):
    windows = []

    def open_window(project: Path) -> MainWindow:
        win = MainWindow()
        qtbot.addWidget(win)
        windows.append(win)
        assert win.open_project(str(project))
        return win

    yield open_window
    for win in windows:
        win.try_it.wait()
        win.state._set_dirty(False)
        win.close()


def test_a_completed_run_is_shown_with_its_checkpoints_and_model(open_window, trained, tmp_path):
    project, run = copy_project(trained, "done", tmp_path)
    # An older run of the same project, and a newer one of another project sharing the output folder.
    older_copy(run)
    foreign = run.with_name("other-project-run")
    shutil.copytree(run, foreign, copy_function=shutil.copy2)
    (foreign / "project.json").write_text(
        json.dumps({**json.loads((run / "project.json").read_text()), "name": "other"})
    )

    win = open_window(project)
    assert win.current_run_dir == str(run.resolve())
    assert win.run_view.plots.point_count("train_loss") == 1 and win.run_view.plots.point_count("val_loss") == 1
    status = win.run_view.findChild(QLabel, "run.status").text()
    assert run.name in status and "finished" in status
    assert win.checkpoints.run_dir == str(run.resolve())
    assert {e.path.name for e in win.checkpoints.entries} >= {"epoch-001.pt"}
    final = run.resolve() / "checkpoints" / "final.pt"
    assert win.current_checkpoint == str(final)
    assert Path(win.checkpoints.current_checkpoint()).samefile(final)  # its row is selected in the dock
    assert win.try_it.checkpoint() == str(final)
    assert win.act_evaluate.isEnabled() and win.act_export.isEnabled()
    assert win.tabs.currentWidget() is win.run_view


def test_an_interrupted_run_is_shown_as_such_with_resume_offered(qtbot, open_window, trained, tmp_path):
    project, run = copy_project(trained, "interrupted", tmp_path)
    assert not (run / "checkpoints" / "final.pt").exists()
    win = open_window(project)
    assert win.current_run_dir == str(run.resolve())
    status = win.run_view.findChild(QLabel, "run.status").text()
    assert "interrupted after epoch 1 of 2" in status and "Resume" in status
    assert win.run_view.findChild(QPushButton, "run.resume").isEnabled() and win.act_resume.isEnabled()
    assert win.current_checkpoint == str(run.resolve() / "checkpoints" / "best.pt")
    with qtbot.waitSignal(win.controller.run_finished, timeout=180000) as blocker:
        assert win.resume_current_run()  # continues the same run to its planned two epochs
    assert blocker.args[0]["status"] == "completed" and blocker.args[0]["epoch"] == 2
    assert (run / "checkpoints" / "final.pt").is_file()
    qtbot.waitUntil(lambda: not running_tasks(), timeout=120000)  # the evaluation a completed run starts


def test_a_run_another_process_is_training_is_shown_as_such(open_window, trained, tmp_path):
    """The command line (or another window) trains the project's run right now: not 'interrupted'."""
    import subprocess
    import sys

    project, run = copy_project(trained, "interrupted", tmp_path)
    script = (
        "import sys; from engine.run_lock import claim_folder; c = claim_folder(sys.argv[1]); "
        "print('held', flush=True); sys.stdin.read(); c.release()"
    )
    other = subprocess.Popen(
        [sys.executable, "-c", script, str(run)],
        cwd=Path(__file__).resolve().parents[2],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert other.stdout.readline().strip() == "held"
        status = open_window(project).run_view.findChild(QLabel, "run.status").text()
        assert f"being trained by process {other.pid} right now" in status and "interrupted" not in status
    finally:
        other.stdin.close()
        other.wait(30)


def test_a_project_without_runs_opens_as_before(open_window, tmp_path):
    write_image_folder(tmp_path / "images", per_class=2)
    win = open_window(write_project(tmp_path / "project.json", "images"))
    assert win.current_run_dir is None and win.current_checkpoint is None
    assert "No run yet" in win.run_view.findChild(QLabel, "run.status").text()
    assert win.checkpoints.run_label.text().startswith("No run")
    assert not win.act_resume.isEnabled() and not win.act_export.isEnabled()


def test_the_run_shown_when_the_project_was_saved_comes_back_and_a_new_project_shows_none(
    open_window, trained, tmp_path
):
    project, run = copy_project(trained, "done", tmp_path)
    older = older_copy(run)
    win = open_window(project)
    assert win.current_run_dir == str(run.resolve())  # the newest
    assert win.checkpoints.open_run_dir(older)  # the user looks at the older run, then saves
    assert win.save_project()

    again = open_window(project)
    assert again.current_run_dir == str(older.resolve())
    assert again.run_view.plots.point_count("train_loss") == 1

    assert again.new_project()  # a new project shows no run, and no curves of the previous one
    assert again.current_run_dir is None and again.run_view.plots.point_count("train_loss") == 0
    assert "No run yet" in again.run_view.findChild(QLabel, "run.status").text()


def test_dialogs_start_at_the_projects_runs_and_dataset_and_remember_the_image_folder(
    qtbot, open_window, trained, tmp_path
):
    project, _run = copy_project(trained, "done", tmp_path)
    win = open_window(project)
    runs = project.parent / "runs"
    assert win.checkpoints.run_dir_dialog().directory().absolutePath() == str(runs.resolve())
    win.checkpoints.set_run_dir(None)  # no run shown: still the project's runs, not the working folder
    assert win.checkpoints.run_dir_dialog().directory().absolutePath() == str(runs.resolve())
    images = (project.parent / "images").resolve()
    assert win.try_it.image_dialog().directory().absolutePath() == str(images)

    picture = tmp_path / "photos" / "red.png"
    picture.parent.mkdir()
    shutil.copy(images / "red" / "000.png", picture)
    answer_file_dialog(picture)
    with qtbot.waitSignal(win.try_it.predicted, timeout=60000):
        win.try_it.findChild(QPushButton, "tryit.open_image").click()
    # A later session: the folder the last image came from.
    later = TryItPanel()
    qtbot.addWidget(later)
    later.set_dataset_dir(images)
    assert later.image_dialog().directory().absolutePath() == str(picture.parent.resolve())
