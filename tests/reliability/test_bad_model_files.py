"""Bad model files: weights for another architecture or class count, a truncated checkpoint, a newer format.

Each through the CLI (exit code 2, one readable error line, no traceback, no file changed) and through the
app (an error shown, the project and its files kept, the app still works). The pickle payload case is in
test_security.py. The CLI runs in the test's process (engine.cli.main, what main.py calls), one trained run shared
by all; one test runs main.py as a process of its own and checks it says the same.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import write_image_folder, write_project

from engine.checkpoints import FORMAT_VERSION

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A 3-class project with a real trained run, and the bad files made from it."""
    from engine.config import load_project
    from engine.runs import RunRecorder
    from engine.trainer import Trainer

    root = tmp_path_factory.mktemp("bad_models")
    write_image_folder(root / "images", per_class=4)
    project = write_project(
        root / "project.json",
        "images",
        optimizer={"name": "sgd", "lr": 0.01, "momentum": 0.0},  # no optimizer state: checkpoints of 45 MB, not 130
        train={"epochs": 1, "device": "cpu", "seed": 0},
        output={"dir": "runs", "tensorboard": False},
    )
    (root / "run").mkdir()
    Trainer(load_project(project), [RunRecorder(root / "run")]).run()
    good = root / "run" / "checkpoints" / "final.pt"
    data = good.read_bytes()
    bad = root / "bad"
    bad.mkdir()
    (bad / "truncated.pt").write_bytes(data[: len(data) // 2])
    ckpt = torch.load(good, weights_only=True)
    torch.save({**ckpt, "format_version": FORMAT_VERSION + 1}, bad / "newer.pt")
    torch.save({**ckpt, "format_version": "2"}, bad / "odd-version.pt")
    torch.save({**ckpt, "class_names": ["cat", "dog"]}, bad / "two-class-names.pt")  # head has 3 outputs
    torch.save(torchvision.models.squeezenet1_1().state_dict(), bad / "squeezenet.pth")
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), bad / "resnet18-10-classes.pth")
    return root


_HASHES: dict[tuple[int, int, int, int, int], str] = {}  # (device, inode, size, mtime, ctime) -> sha256


def snapshot(root: Path) -> dict[str, str]:
    """Every file under root and the SHA-256 of its contents.

    A file's hash is computed again only when its inode, size, modification or change time differ from a file
    already hashed (a write, a truncation, a replacing rename all change them): the checkpoints here are tens of
    MB each, and the tests take a snapshot before and after every command.
    """
    hashes = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            st = p.stat()
            key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            if key not in _HASHES:
                _HASHES[key] = hashlib.sha256(p.read_bytes()).hexdigest()
            hashes[str(p.relative_to(root))] = _HASHES[key]
    return hashes


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`main.py ARGS` in a process of its own, as a user runs it."""
    return subprocess.run(
        [sys.executable, str(REPO / "main.py"), *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def cli_here(capfd, *args: str) -> subprocess.CompletedProcess:
    """`main.py ARGS` run in this process (what main.py runs: engine.cli.main), its output as the process's.

    Reporting a bad file is not about a fresh process, and a process costs seconds of imports on this machine;
    test_the_cli_process_reports_a_bad_checkpoint_the_same_way shows that a real process says the same.
    """
    from engine.cli import main

    capfd.readouterr()
    code = main(list(args))
    out, err = capfd.readouterr()
    return subprocess.CompletedProcess(["main.py", *args], code, out, err)


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and result.stderr.rstrip().endswith(errors[0]), result.stderr
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


# Each case: the file, and what the one error line of every command that opens it must say.
CASES = {
    "truncated checkpoint": ("truncated.pt", ["truncated", "not a PyTorch file"]),
    "newer format version": (
        "newer.pt",
        [f"format version {FORMAT_VERSION + 1}", "newer", f"reads ({FORMAT_VERSION})"],
    ),
    "format version not a number": ("odd-version.pt", ["format version '2'", "not a version number"]),
    "head does not fit its class names": (
        "two-class-names.pt",
        ["do not fit resnet18 with 2 outputs", "fc.weight", "file 3x512, model 2x512"],
    ),
}


def _commands(ckpt: Path, ws: Path) -> dict[str, list[str]]:
    return {
        "evaluate": ["evaluate", str(ckpt)],
        "export": ["export", str(ckpt), "--format", "state_dict", "--out", str(ws / "run" / "model.pth"), "--force"],
        # --epochs 2: the checkpoints are of a finished 1-epoch run, and resume's "already trained" must not
        # stand in for the message about the file.
        "resume": ["resume", str(ckpt), "--epochs", "2", "--out", str(ws / "resumed")],
        "train --init-from": ["train", str(ws / "project.json"), "--init-from", str(ckpt), "--out", str(ws / "new")],
    }


@pytest.mark.parametrize("case", list(CASES))
def test_the_cli_reports_a_bad_checkpoint_in_one_line_and_changes_nothing(workspace, capfd, case):
    name, needles = CASES[case]
    ckpt = workspace / "bad" / name
    # An export already in place must survive a failed --force export over it.
    (workspace / "run" / "model.pth").write_bytes(b"an earlier export")
    before = snapshot(workspace)
    commands = _commands(ckpt, workspace)
    if case == "head does not fit its class names":
        # Training rebuilds the head from the project's data: resume and init-from use the weights without the
        # checkpoint's class names, so only the commands that restore the saved model can misfit.
        del commands["resume"], commands["train --init-from"]
    for command, args in commands.items():
        line = assert_one_line_error(cli_here(capfd, *args), name, *needles)
        assert snapshot(workspace) == before, (command, line)


def test_a_head_that_does_not_fit_its_class_names_is_no_obstacle_to_init_from_but_stops_resume(workspace, capfd):
    """The checkpoint's head has 3 outputs (as the project's 3 classes), its class names are 2.

    resume continues the run the checkpoint records, whose classes (cat, dog) are not the data's: refused, with
    what changed, and nothing written. train --init-from takes only the weights, all of which fit the project's
    model: a new run that starts from every tensor of the file and learns the data's classes.
    """
    ws, name = workspace, "two-class-names.pt"
    before = snapshot(ws)
    commands = _commands(ws / "bad" / name, ws)

    resumed = cli_here(capfd, *commands["resume"])
    assert_one_line_error(
        resumed,
        f"cannot resume from {ws / 'bad' / name}: the dataset's classes changed since the checkpoint; "
        "missing now: cat, dog; new: blue, green, red. Start a new run from its weights instead (train --init-from)",
    )
    assert snapshot(ws) == before
    assert not (ws / "resumed").exists()  # the --out folder the failed resume made is not left behind, empty

    started = cli_here(capfd, *commands["train --init-from"])
    assert started.returncode == 0, started.stderr
    assert f"Backbone resnet18: file {name} (122 of 122 tensors)" in started.stderr
    final = torch.load(ws / "new" / "checkpoints" / "final.pt", weights_only=True)
    assert final["class_names"] == ["blue", "green", "red"] and final["epoch"] == 1
    assert final["config"]["model"]["weights_file"] == str((ws / "bad" / name).resolve())
    after = snapshot(ws)
    assert {k: v for k, v in after.items() if not k.startswith("new/")} == before  # the user's files untouched
    assert "new/checkpoints/final.pt" in after


def test_the_cli_process_reports_a_bad_checkpoint_the_same_way(workspace, capfd, tmp_path):
    """main.py in a process of its own: the exit code and the one line are those cli_here sees."""
    args = _commands(workspace / "bad" / "truncated.pt", workspace)["evaluate"]
    here = cli_here(capfd, *args)
    real = cli(*args, cwd=tmp_path)
    line = assert_one_line_error(real, "truncated.pt", "truncated", "not a PyTorch file")
    assert assert_one_line_error(here) == line


def test_weights_for_another_architecture_stop_the_cli_before_a_run_folder_is_made(workspace, tmp_path, capfd):
    project = write_project(
        tmp_path / "p.json",
        str(workspace / "images"),
        model={"backbone": "resnet18", "weights_file": str(workspace / "bad" / "squeezenet.pth")},
        train={"epochs": 1, "device": "cpu"},
        output={"dir": str(tmp_path / "runs")},
    )
    for args in (["check", str(project)], ["train", str(project)]):
        assert_one_line_error(cli_here(capfd, *args), "squeezenet.pth does not fit resnet18", "another architecture")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_weights_for_another_class_count_load_all_but_the_replaced_head(workspace, tmp_path, capfd):
    """Not an error: the head is rebuilt for the project's classes, so only it is left as built, and it is said."""
    project = write_project(
        tmp_path / "p.json",
        str(workspace / "images"),
        model={"backbone": "resnet18", "weights_file": str(workspace / "bad" / "resnet18-10-classes.pth")},
        train={"epochs": 1, "device": "cpu"},
    )
    result = cli_here(capfd, "check", str(project))
    assert result.returncode == 0, result.stderr
    assert "loaded 120 of 122 tensors" in result.stdout
    assert "fc.weight (file 10x512, model 3x512)" in result.stdout


def test_a_newer_checkpoint_is_refused_as_a_weights_file_too(workspace):
    from engine.backbones import WeightsError, load_state_dict_file

    with pytest.raises(WeightsError, match=rf"weights file newer.pt has format version {FORMAT_VERSION + 1}, newer"):
        load_state_dict_file(workspace / "bad" / "newer.pt")


# ---------------------------------------------------------------------------------------------
# The desktop app


@pytest.fixture()
def window(qtbot, workspace, monkeypatch):
    from PySide6.QtWidgets import QMessageBox

    from app.main_window import MainWindow

    monkeypatch.setattr(MainWindow, "_ask_save_changes", lambda self: QMessageBox.StandardButton.Discard)
    monkeypatch.setattr(MainWindow, "_ask_stop_training", lambda self: True)
    win = MainWindow()
    qtbot.addWidget(win)
    assert win.open_project(str(workspace / "project.json"))
    yield win
    if win.controller.is_running():
        win.controller.stop()
        win.controller.wait(60000)
    win.state._set_dirty(False)
    win.close()


def _wait_tasks(qtbot):
    from widgets.tasks import running_tasks

    qtbot.waitUntil(lambda: not running_tasks(), timeout=120000)


@pytest.mark.parametrize(
    "name, needle",
    [
        ("truncated.pt", "damaged or not a PyTorch file"),
        ("newer.pt", "newer than this Model Workbench reads"),
        ("two-class-names.pt", "do not fit resnet18 with 2 outputs"),
    ],
)
def test_the_app_shows_a_bad_checkpoint_and_keeps_working(qtbot, window, workspace, name, needle):
    bad = workspace / "bad" / name
    project_before = window.state.config.to_dict()
    files_before = snapshot(workspace)

    window.open_dropped(str(bad))
    window.evaluate_current()
    _wait_tasks(qtbot)
    assert needle in window.evaluation.message.text() and name in window.evaluation.message.text()
    window.try_it.open_image(str(workspace / "images" / "red" / "000.png"))
    window.try_it.wait()
    assert "Cannot load the model" in window.try_it.message_label.text()
    assert needle in window.try_it.message_label.text()
    if name != "two-class-names.pt":  # resume rebuilds the head from the data; it only needs a readable file
        with qtbot.waitSignal(window.controller.run_finished, timeout=120000) as blocker:
            assert window.resume_from(str(bad))
        assert blocker.args[0]["status"] == "failed"
        assert window.last_error_box is not None and needle in window.last_error_box.text()
        window.last_error_box.close()
    _wait_tasks(qtbot)

    assert window.state.config.to_dict() == project_before and snapshot(workspace) == files_before
    window.use_checkpoint(str(workspace / "run" / "checkpoints" / "final.pt"))
    window.evaluate_current()
    _wait_tasks(qtbot)
    assert window.evaluation.result is not None and window.evaluation.message.isHidden()


def test_the_app_reports_weights_for_another_architecture_when_training(qtbot, window, workspace):
    files_before = snapshot(workspace)
    window.state.set("model.weights_file", str(workspace / "bad" / "squeezenet.pth"))
    window.state.set("model.weights", None)
    with qtbot.waitSignal(window.controller.run_finished, timeout=120000) as blocker:
        assert window.train()
    assert blocker.args[0]["status"] == "failed"
    assert window.last_error_box is not None
    assert "squeezenet.pth does not fit resnet18" in window.last_error_box.text()
    window.last_error_box.close()
    _wait_tasks(qtbot)
    assert window.state.get("model.weights_file") is not None  # the user's choice is kept, to fix or clear
    assert not window.controller.is_running()
    runs = workspace / "runs"
    assert not runs.exists() or not any(p.is_file() for p in runs.rglob("*"))
    assert {k: v for k, v in snapshot(workspace).items() if not k.startswith("runs/")} == files_before
