"""Bad settings and actions through the command line: a message naming the thing, exit code 2 (1 for a
diverged run), no traceback, and nothing the user had is lost.

Most cases run the CLI's entry function in this process (as a subprocess would, minus the seconds of
importing PyTorch); the last test runs `python main.py` itself to show the same holds in a real process.
Tests of single validation rules live in tests/engine/test_config.py; these go through the whole command.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import train_head_only_run, write_project

from engine.checkpoints import load_checkpoint
from engine.cli import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, main
from engine.config import SCHEMA_VERSION
from engine.restore import restore_model
from engine.runs import read_metrics

ROOT = Path(__file__).resolve().parents[2]


def cli(capfd, *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capfd.readouterr()
    return code, out, err


def runs_left(tmp_path: Path) -> list[Path]:
    runs = tmp_path / "runs"
    return sorted(runs.iterdir()) if runs.is_dir() else []


@contextlib.contextmanager
def read_only_folder(folder: Path):
    """A folder nobody can write into, root included: mode 0555, and the immutable flag when running as root."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o555)
    immutable = False
    try:
        if os.access(folder, os.W_OK):  # root ignores the mode bits; the immutable attribute binds it too
            immutable = subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
            if os.access(folder, os.W_OK):
                pytest.skip("cannot make a folder read-only for this user here (no chattr)")
        yield folder
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        folder.chmod(0o755)


# -- settings refused before anything is written -----------------------------------------------------------

# (how the project is spoiled, what the message must contain)
REFUSED = [
    pytest.param({"loader": {"batch_size": 0}}, "loader.batch_size = 0: must be >= 1", id="batch_size=0"),
    pytest.param({"loader": {"batch_size": -4}}, "loader.batch_size = -4: must be >= 1", id="batch_size=-4"),
    pytest.param({"optimizer": {"name": "adam", "lr": 0}}, "optimizer.lr = 0.0: must be > 0", id="lr=0"),
    pytest.param({"optimizer": {"name": "adam", "lr": -0.1}}, "optimizer.lr = -0.1: must be > 0", id="lr=-0.1"),
    pytest.param(
        {"optimizer": {"name": "adam", "lr": "nan"}}, "optimizer.lr = nan: must be a finite number", id="lr='nan'"
    ),
    pytest.param({"train": {"epochs": 0, "device": "cpu"}}, "train.epochs = 0: must be >= 1", id="epochs=0"),
    pytest.param(
        {"loader": {"batch_size": "8"}}, "loader.batch_size = '8': expected an integer", id="wrong-type-batch_size"
    ),
    pytest.param(
        {"train": {"epochs": 2.5, "device": "cpu"}}, "train.epochs = 2.5: expected an integer", id="wrong-type-epochs"
    ),
    pytest.param(
        {"train": {"epochs": True, "device": "cpu"}},
        "train.epochs = True: expected an integer",
        id="wrong-type-epochs-bool",
    ),
    pytest.param({"optimizer": ["adam"]}, "optimizer = ['adam']: expected an object", id="wrong-type-section"),
    pytest.param({"loader": {"batchsize": 8}}, "loader.batchsize: unknown key (allowed: batch_size", id="unknown-key"),
    pytest.param({"colour": "red"}, "colour: unknown key", id="unknown-top-level-key"),
    pytest.param(
        {"schema_version": SCHEMA_VERSION + 1},
        f"schema_version = {SCHEMA_VERSION + 1}: this project was written by a newer Model Workbench",
        id="newer-schema",
    ),
    pytest.param({"schema_version": "1"}, "schema_version = '1': expected a positive integer", id="wrong-type-schema"),
]


@pytest.mark.parametrize("change, message", REFUSED)
def test_a_bad_setting_is_refused_by_name_before_any_run_folder(capfd, tmp_path, image_folder, change, message):
    project = write_project(tmp_path / "p.json", "images", **change)
    before = project.read_bytes()
    code, out, err = cli(capfd, "train", project)
    assert code == EXIT_BAD_INPUT, err
    assert message in err and str(project) in err
    assert "Traceback" not in err
    assert runs_left(tmp_path) == []
    assert project.read_bytes() == before  # the project file is only read


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_a_non_finite_learning_rate_literal_is_refused(capfd, tmp_path, image_folder, literal):
    # Python's JSON reader accepts these non-standard literals; validation must still refuse them.
    project = write_project(tmp_path / "p.json", "images")
    project.write_text(project.read_text().replace('"lr": 0.003', f'"lr": {literal}'))
    code, _, err = cli(capfd, "train", project)
    assert code == EXIT_BAD_INPUT
    assert "optimizer.lr = " in err and "must be a finite number" in err and "Traceback" not in err
    assert runs_left(tmp_path) == []


def test_invalid_json_names_the_line_and_column(capfd, tmp_path):
    project = tmp_path / "p.json"
    project.write_text('{\n  "name": "tiny",\n  "loader": {"batch_size": 8,}\n}\n')
    for command in ("train", "check"):
        code, _, err = cli(capfd, command, project)
        assert code == EXIT_BAD_INPUT
        assert f"invalid project in {project}: not valid JSON" in err
        assert "line 3, column 30" in err and "Traceback" not in err


def test_every_problem_of_a_project_is_listed_at_once(capfd, tmp_path, image_folder):
    project = write_project(
        tmp_path / "p.json",
        "images",
        loader={"batch_size": 0},
        optimizer={"name": "adam", "lr": -1},
        train={"epochs": 0, "device": "cpu"},
    )
    code, _, err = cli(capfd, "check", project)
    assert code == EXIT_BAD_INPUT and "(3 problems)" in err
    for field in ("loader.batch_size", "optimizer.lr", "train.epochs"):
        assert field in err


def test_sampler_weights_of_the_wrong_length_name_both_lengths(capfd, tmp_path, image_folder):
    # 36 images, a quarter held out: 27 training samples, and 3 weights (one per class, a common mistake).
    project = write_project(
        tmp_path / "p.json",
        "images",
        loader={"batch_size": 8, "sampler": {"name": "weighted_random", "weights": [1, 2, 3]}},
    )
    code, _, err = cli(capfd, "train", project)
    assert code == EXIT_BAD_INPUT
    assert "loader.sampler.weights has 3 values but the training set has 27 samples" in err
    assert "Traceback" not in err
    assert runs_left(tmp_path) == []  # failed before training: the empty run folder is removed again


# -- settings that train -----------------------------------------------------------------------------------


def test_a_batch_larger_than_the_dataset_trains_one_batch_per_epoch_and_says_so(capfd, tmp_path, image_folder):
    project = write_project(
        tmp_path / "p.json", "images", loader={"batch_size": 64}, train={"epochs": 2, "device": "cpu"}
    )
    run = tmp_path / "run"
    code, _, err = cli(capfd, "train", project, "--out", run)
    assert code == EXIT_OK, err
    assert (
        "loader.batch_size = 64 is larger than the 27 training samples drawn per epoch: each epoch trains "
        "on one batch of 27" in err
    )
    assert "2 epoch(s) of 1 batches" in err
    assert load_checkpoint(run / "checkpoints" / "final.pt")["global_step"] == 2


def test_a_diverging_learning_rate_is_stopped_and_the_earlier_epoch_is_kept(capfd, tmp_path, image_folder):
    # Epoch 1 trains at lr 0.003; the step schedule then multiplies it by 1e20, and the loss diverges in epoch 2.
    project = write_project(
        tmp_path / "p.json",
        "images",
        schedule={"name": "step", "step_size": 1, "gamma": 1e20},
        train={"epochs": 3, "device": "cpu"},
    )
    run = tmp_path / "run"
    code, _, err = cli(capfd, "train", project, "--out", run)
    assert code == EXIT_FAILED
    line = next(line for line in err.splitlines() if line.startswith("error:"))
    assert "the loss became nan at epoch 2, batch" in line or "the loss became inf at epoch 2, batch" in line
    assert "training stopped. Lower optimizer.lr (now 0.003; the step schedule had it at 3e+17 in this batch)" in line
    assert "Traceback" not in err
    checkpoints = run / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best.pt", "epoch-001.pt", "last.pt"]
    last = load_checkpoint(checkpoints / "last.pt")
    assert last["epoch"] == 1 and last["metrics"]["train_loss"] is not None
    model = restore_model(last)[0]  # the weights of epoch 1 are whole and finite
    assert all(bool(t.isfinite().all()) for t in model.state_dict().values() if t.is_floating_point())
    assert [m["epoch"] for m in read_metrics(run)] == [1]


# -- export destinations -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return train_head_only_run(tmp_path_factory.mktemp("trained"))


def test_export_to_a_missing_folder_is_refused_and_creates_nothing(capfd, checkpoint, tmp_path):
    out = tmp_path / "nowhere" / "model.pth"
    code, _, err = cli(capfd, "export", checkpoint, "--format", "state_dict", "--out", out)
    assert code == EXIT_BAD_INPUT
    assert f"cannot write {out}: folder {out.parent} does not exist; create it or choose another --out" in err
    assert "Traceback" not in err and not out.parent.exists()


def test_export_to_a_read_only_folder_is_refused(capfd, checkpoint, tmp_path):
    with read_only_folder(tmp_path / "locked") as locked:
        code, _, err = cli(capfd, "export", checkpoint, "--format", "state_dict", "--out", locked / "model.pth")
        assert code == EXIT_BAD_INPUT
        assert f"folder {locked} is not writable; choose another --out" in err and "Traceback" not in err
        assert list(locked.iterdir()) == []


def test_export_over_an_existing_file_needs_force(capfd, checkpoint, tmp_path):
    out = tmp_path / "model.pth"
    out.write_bytes(b"an earlier export the user wants to keep")
    code, _, err = cli(capfd, "export", checkpoint, "--format", "state_dict", "--out", out)
    assert code == EXIT_BAD_INPUT
    assert f"{out} exists; use --force to replace it" in err and "Traceback" not in err
    assert out.read_bytes() == b"an earlier export the user wants to keep"
    assert not (tmp_path / "model.pth.json").exists()

    code, stdout, err = cli(capfd, "export", checkpoint, "--format", "state_dict", "--out", out, "--force")
    assert code == EXIT_OK, err
    assert f"Exported state_dict to {out}" in stdout
    import torch

    assert set(torch.load(out, weights_only=True)) == set(load_checkpoint(checkpoint)["model_state_dict"])


# -- the same in a real process ----------------------------------------------------------------------------


def test_a_real_process_reports_bad_settings_without_a_traceback(tmp_path, image_folder):
    project = write_project(tmp_path / "p.json", "images", colour="red")
    before = project.read_bytes()
    result = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), "train", str(project)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == EXIT_BAD_INPUT
    assert "colour: unknown key" in result.stderr and "Traceback" not in result.stderr
    assert project.read_bytes() == before
    assert runs_left(tmp_path) == []
