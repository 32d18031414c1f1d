"""Shared fixtures: small real datasets written to disk, and project files that train on them in seconds."""

from __future__ import annotations

import atexit
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

# PyTorch's OpenMP threads spin while they wait for work. On a machine with more busy processes than CPUs (a test
# run beside other work on 2 CPUs) the spinning threads take the CPUs from the ones with work: one training
# step of resnet18 on 8 images of 16 px took 11 s instead of 0.3 s (measured here, load 15 on 2 CPUs).
# Passive waiting changes no result, only how idle threads wait; set before the first test imports torch, and
# inherited by the main.py and torchrun processes that tests start.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# The scan cache (and any other workbench cache) of the tests' own, never the user's ~/.cache; the processes
# tests start inherit it.
os.environ["MWB_CACHE_DIR"] = tempfile.mkdtemp(prefix="mwb-test-cache-")
atexit.register(shutil.rmtree, os.environ["MWB_CACHE_DIR"], True)

COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 60, 220)}


def write_image_folder(root: Path, per_class: int = 12, size: int = 12, seed: int = 0) -> Path:
    """Three classes of noisy solid-colour images: easy to learn, so a falling loss is a real signal."""
    rng = np.random.default_rng(seed)
    for name, colour in COLOURS.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            noise = rng.integers(-30, 30, size=(size, size, 3))
            pixels = np.clip(np.array(colour)[None, None, :] + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    return root


def write_project(path: Path, data_path: str, **sections) -> Path:
    """A project that trains a small resnet18 on tiny images quickly; sections override its parts."""
    project = {
        "schema_version": 1,
        "name": "tiny",
        "data": {"path": data_path, "image_size": 16, "val_fraction": 0.25, "mean": [0.5], "std": [0.5]},
        "model": {"backbone": "resnet18"},
        "loader": {"batch_size": 8},
        "optimizer": {"name": "adam", "lr": 0.003},
        "train": {"epochs": 2, "device": "cpu", "seed": 0},
        "output": {"dir": "runs"},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(project.get(key), dict):
            project[key] = {**project[key], **value}
        else:
            project[key] = value
    path.write_text(json.dumps(project, indent=2))
    return path


@pytest.fixture()
def image_folder(tmp_path) -> Path:
    return write_image_folder(tmp_path / "images")


@pytest.fixture()
def tiny_project(tmp_path, image_folder) -> Path:
    return write_project(tmp_path / "project.json", "images")


def pytest_configure(config):
    """Cyclic garbage is collected between tests, never at whatever allocation passes a threshold: a collection
    that deletes a Qt object deadlocks when it falls on a worker thread (a Qt lock held, waiting for the GIL) or
    inside a Qt call on the GUI thread that holds the lock the destructor needs (both seen hanging the suite).
    The app itself collects on its GUI thread's timer (widgets/lifetime.collect_on_gui_thread)."""
    gc.disable()


@pytest.fixture(autouse=True)
def _collect_between_tests():
    """After each test, each generation that Python's thresholds say is due, as the interpreter would collect."""
    yield
    from widgets.lifetime import collect_due

    collect_due()


@pytest.fixture(autouse=True)
def _qt_isolation(request, tmp_path):
    """Qt tests (tests/widgets, tests/app, tests/reliability, tests/bench): QSettings go to a temporary folder, and no
    background task may outlive a test."""
    parts = Path(str(request.node.path)).parts
    if not {"widgets", "app", "reliability", "bench"} & set(parts):
        yield
        return
    from PySide6.QtCore import QCoreApplication, QSettings

    QCoreApplication.setOrganizationName("ModelWorkbenchTests")
    QCoreApplication.setApplicationName("ModelWorkbenchTests")
    QSettings.setDefaultFormat(QSettings.Format.IniFormat)
    QSettings.setPath(QSettings.Format.IniFormat, QSettings.Scope.UserScope, str(tmp_path / "settings"))
    yield
    from widgets.tasks import cancel_all, running_tasks

    left = [t.name for t in running_tasks()]
    cancel_all(30000)
    assert not left, f"background tasks still running after the test: {left}"


ROOT = Path(__file__).resolve().parents[1]


def cli(capsys, *args):
    """`main.py ARGS` run in this process, as a finished process would report it: returncode, stdout, stderr."""
    from main import main

    code = main(list(args))
    out = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)


@pytest.fixture(scope="session")
def cli_trained_run(tmp_path_factory):
    """One real `main.py train` process (the CLI end to end), shared by the tests that read or continue its run:
    a project of timm's tiny test_resnet trained 1 epoch into run/. Tests that change the run work on a copy
    (copy_run)."""
    root = tmp_path_factory.mktemp("cli-run")
    write_image_folder(root / "images")
    project = write_project(root / "project.json", "images", model={"backbone": "timm/test_resnet"})
    result = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), "train", str(project), "--epochs", "1", "--out", str(root / "run")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    return SimpleNamespace(project=project, run=root / "run", result=result)


def copy_run(run: Path, to: Path) -> Path:
    """A copy of a run folder (its project file keeps pointing at the same data) to resume or change."""
    import shutil

    shutil.copytree(run, to)
    return to


@pytest.fixture()
def project_state(tiny_project):
    """The tiny project opened as the app opens a project file."""
    from widgets.state import ProjectState

    state = ProjectState()
    state.open(tiny_project)
    return state


def train_head_only_run(root: Path) -> Path:
    """A real checkpoint in a few seconds: resnet18's head trained one epoch on 16 px colour images; returns final.pt."""
    from engine.config import load_project
    from engine.runs import RunRecorder
    from engine.trainer import Trainer

    write_image_folder(root / "images", per_class=8)
    cfg = load_project(
        write_project(
            root / "project.json",
            "images",
            model={"freeze": "head_only"},
            train={"epochs": 1, "device": "cpu", "seed": 0},
        )
    )
    run_dir = root / "run"
    run_dir.mkdir()
    Trainer(cfg, [RunRecorder(run_dir)]).run()
    return run_dir / "checkpoints" / "final.pt"


@pytest.fixture(scope="session")
def _head_only_run_once(tmp_path_factory) -> Path:
    return train_head_only_run(tmp_path_factory.mktemp("head-only-run"))


@pytest.fixture(scope="module")
def head_only_run(_head_only_run_once, tmp_path_factory) -> Path:
    """final.pt of train_head_only_run, trained once per session. Each module gets its own hard-linked copy of the
    folder (images, project, run): what one module writes there (an export, a report) no other module sees, and
    best/last/final stay links to their epoch file."""
    root = _head_only_run_once.parents[2]
    copy = tmp_path_factory.mktemp("head-only-run-copy") / root.name
    shutil.copytree(root, copy, copy_function=os.link)
    return copy / "run" / "checkpoints" / "final.pt"


def answer_file_dialog(choice):
    """Answer the next modal file dialog as a user would: choose this path, or cancel (None)."""
    from PySide6.QtCore import QTimer
    from PySide6.QtWidgets import QApplication, QFileDialog

    def answer():
        dialog = QApplication.activeModalWidget()
        if not isinstance(dialog, QFileDialog):
            QTimer.singleShot(10, answer)  # not open yet
            return
        if choice is None:
            dialog.reject()
        else:
            dialog.selectFile(str(choice))
            dialog.accept()

    QTimer.singleShot(0, answer)
