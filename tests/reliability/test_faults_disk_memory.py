"""Disk full during a checkpoint write, and the device out of memory in a batch: through the engine, the CLI and
the app. Both events are simulated at the lowest level (they cannot be produced here): the checkpoint's file
descriptor is /dev/full, on which every write(2) fails with ENOSPC as on a full disk; the model's forward raises
PyTorch's own torch.OutOfMemoryError with CUDA's message."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import write_project

from engine.checkpoints import CheckpointWriteError, load_checkpoint
from engine.config import load_project
from engine.failures import DeviceOutOfMemoryError
from engine.run_lock import release_run_dir
from engine.runs import create_run_dir, read_metrics, resume_config, run_callbacks
from engine.trainer import Trainer

pytestmark = pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full for a real ENOSPC")

CUDA_OOM = (
    "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which "
    "1.06 GiB is free. Of the allocated memory 75.12 GiB is allocated by PyTorch"
)


def _project(tmp_path: Path, epochs: int = 3) -> Path:
    return write_project(
        tmp_path / "project.json",
        "images",
        loader={"batch_size": 8},
        train={"epochs": epochs, "device": "cpu", "seed": 0},
        output={"dir": "runs", "tensorboard": False},
    )


def _full_disk_for(monkeypatch, prefix: str) -> dict:
    """From now on, a temporary file whose name starts with `prefix` is written to /dev/full (ENOSPC on write).

    The real temporary file is created too, so the code's own clean-up is what removes it. Set
    disk["full"] = False to free the space again.
    """
    real = tempfile.mkstemp
    disk = {"full": True, "hits": []}

    def mkstemp(*args, **kwargs):
        fd, name = real(*args, **kwargs)
        if disk["full"] and Path(name).name.startswith(prefix):
            os.close(fd)
            fd = os.open("/dev/full", os.O_WRONLY)
            disk["hits"].append(name)
        return fd, name

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    return disk


def _device_full_at(monkeypatch, epoch: int, batch: int) -> dict:
    """The model's training forward of (epoch, batch) raises torch.OutOfMemoryError, as CUDA's allocator does."""
    from engine import trainer as trainer_module

    build = trainer_module.build_run
    device = {"full": True, "raised": 0}

    def build_on_a_full_device(*args, **kwargs):
        parts = build(*args, **kwargs)
        target = (epoch - 1) * len(parts.train_loader) + batch
        calls = {"n": 0}

        def allocate(module, inputs):
            if module.training:
                calls["n"] += 1
                if device["full"] and calls["n"] == target:
                    device["raised"] += 1
                    raise torch.OutOfMemoryError(CUDA_OOM)

        parts.model.register_forward_pre_hook(allocate)
        return parts

    monkeypatch.setattr(trainer_module, "build_run", build_on_a_full_device)
    return device


def _leftovers(run_dir: Path) -> list[str]:
    """Temporary or partial files anywhere in a run folder."""
    return sorted(
        str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp")
    )


# -- disk full ---------------------------------------------------------------------------------------------------


def test_disk_full_during_a_checkpoint_write_keeps_the_previous_one_and_the_run_resumes(
    tmp_path, image_folder, monkeypatch
):
    cfg = load_project(_project(tmp_path))
    run_dir = create_run_dir(cfg, tmp_path / "run")
    disk = _full_disk_for(monkeypatch, ".epoch-002.pt.")
    trainer = Trainer(cfg, run_callbacks(cfg, run_dir))
    with pytest.raises(CheckpointWriteError) as info:
        trainer.run()
    release_run_dir(run_dir)  # the run ended: its folder is free again (a run session does this)
    assert disk["hits"], "the epoch-2 checkpoint was never written"
    err = info.value
    checkpoints = run_dir / "checkpoints"
    assert err.errno == errno.ENOSPC
    assert f"cannot write checkpoint {checkpoints / 'epoch-002.pt'}: the disk is full" in str(err)
    assert trainer.state.status == "failed" and trainer.state.error is err
    assert sorted(os.listdir(checkpoints)) == ["best.pt", "epoch-001.pt", "last.pt"]
    assert not _leftovers(run_dir)
    assert load_checkpoint(checkpoints / "last.pt")["epoch"] == 1
    assert [m["epoch"] for m in read_metrics(run_dir)] == [1]  # no line for the epoch that was not saved

    disk["full"] = False  # space freed: the run continues from its last checkpoint
    ckpt = load_checkpoint(checkpoints / "last.pt")
    resumed_cfg = resume_config(ckpt, checkpoints / "last.pt")
    state = Trainer(resumed_cfg, run_callbacks(resumed_cfg, run_dir), resume=ckpt).run()
    assert state.status == "completed"
    assert [m["epoch"] for m in read_metrics(run_dir)] == [1, 2, 3]
    assert load_checkpoint(checkpoints / "final.pt")["epoch"] == 3 and not _leftovers(run_dir)


def test_disk_full_on_the_command_line_is_one_clear_message(tmp_path, image_folder, monkeypatch, capfd):
    from engine.cli import EXIT_FAILED, main

    run_dir = tmp_path / "run"
    _full_disk_for(monkeypatch, ".epoch-002.pt.")
    assert main(["train", str(_project(tmp_path)), "--out", str(run_dir)]) == EXIT_FAILED
    err = capfd.readouterr().err
    assert f"error: cannot write checkpoint {run_dir / 'checkpoints' / 'epoch-002.pt'}: the disk is full" in err
    assert "Traceback" not in err
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["epoch"] == 1 and not _leftovers(run_dir)


# -- out of memory -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("epoch, batch", [(1, 1), (2, 2)])
def test_out_of_memory_in_a_batch_names_the_batch_size_and_keeps_the_checkpoints(
    tmp_path, image_folder, monkeypatch, epoch, batch
):
    cfg = load_project(_project(tmp_path))
    run_dir = create_run_dir(cfg, tmp_path / "run")
    device = _device_full_at(monkeypatch, epoch, batch)
    trainer = Trainer(cfg, run_callbacks(cfg, run_dir))
    with pytest.raises(DeviceOutOfMemoryError) as info:  # on the first batch too: not a "change the image size"
        trainer.run()
    release_run_dir(run_dir)  # the run ended: its folder is free again (a run session does this)
    assert device["raised"] == 1
    message = str(info.value)
    assert f"ran out of memory at epoch {epoch}, batch {batch} with loader.batch_size = 8" in message
    assert "Use a smaller batch: lower loader.batch_size (try 4)" in message
    assert "CUDA out of memory" in message  # what PyTorch said, for the curious
    assert isinstance(info.value.__cause__, torch.OutOfMemoryError)
    assert trainer.state.status == "failed" and trainer.state.error is info.value
    assert not _leftovers(run_dir)
    checkpoints = run_dir / "checkpoints"
    if epoch == 1:
        assert "no epoch of this run had finished" in message
        assert not list(checkpoints.glob("*.pt"))
    else:
        assert "epoch 1 was the last to finish: resume from its checkpoint (last.pt)" in message
        assert load_checkpoint(checkpoints / "last.pt")["epoch"] == 1
        assert sorted(os.listdir(checkpoints)) == ["best.pt", "epoch-001.pt", "last.pt"]
        assert [m["epoch"] for m in read_metrics(run_dir)] == [1]


def test_out_of_memory_on_the_command_line_is_one_clear_message(tmp_path, image_folder, monkeypatch, capfd):
    from engine.cli import EXIT_FAILED, main

    run_dir = tmp_path / "run"
    _device_full_at(monkeypatch, 2, 1)
    assert main(["train", str(_project(tmp_path)), "--out", str(run_dir)]) == EXIT_FAILED
    err = capfd.readouterr().err
    assert "error: the cpu device ran out of memory at epoch 2, batch 1 with loader.batch_size = 8" in err
    assert "lower loader.batch_size (try 4)" in err and "Traceback" not in err
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["epoch"] == 1


def test_a_batch_size_of_one_out_of_memory_points_at_the_image_size(tmp_path, image_folder, monkeypatch):
    cfg = load_project(
        write_project(
            tmp_path / "one.json",
            "images",
            loader={"batch_size": 1},
            train={"epochs": 1, "device": "cpu"},
            output={"dir": "runs", "tensorboard": False},
        )
    )
    _device_full_at(monkeypatch, 1, 1)
    with pytest.raises(
        DeviceOutOfMemoryError,
        match=r"loader.batch_size is 1 already: lower data.image_size "
        r"\(now 16\)",
    ):
        Trainer(cfg, run_callbacks(cfg, create_run_dir(cfg, tmp_path / "run"))).run()


# -- through the app ---------------------------------------------------------------------------------------------


@pytest.fixture()
def window(qtbot, tmp_path, image_folder, monkeypatch):
    """The main window on a 2-epoch project; its settings in a temporary folder, modal questions answered."""
    from PySide6.QtCore import QCoreApplication, QSettings
    from PySide6.QtWidgets import QMessageBox

    from app.main_window import MainWindow

    QCoreApplication.setOrganizationName("ModelWorkbenchTests")
    QCoreApplication.setApplicationName("ModelWorkbenchTests")
    QSettings.setDefaultFormat(QSettings.Format.IniFormat)
    QSettings.setPath(QSettings.Format.IniFormat, QSettings.Scope.UserScope, str(tmp_path / "settings"))
    monkeypatch.setattr(MainWindow, "_ask_save_changes", lambda self: QMessageBox.StandardButton.Discard)
    monkeypatch.setattr(MainWindow, "_ask_stop_training", lambda self: True)
    win = MainWindow()
    qtbot.addWidget(win)
    assert win.open_project(str(_project(tmp_path, epochs=2)))
    yield win
    if win.controller.is_running():
        win.controller.stop()
        win.controller.wait(60000)
    from widgets.tasks import cancel_all, running_tasks

    cancel_all(60000)
    win.close()
    assert not running_tasks()


def _train(qtbot, win, start) -> dict:
    with qtbot.waitSignal(win.controller.run_finished, timeout=180000) as blocker:
        assert start()
    return blocker.args[0]


@pytest.mark.parametrize("fault", ["disk full", "out of memory"])
def test_the_app_shows_the_fault_keeps_the_checkpoints_and_resumes(qtbot, window, monkeypatch, fault):
    from PySide6.QtCore import QThread

    if fault == "disk full":
        switch = _full_disk_for(monkeypatch, ".epoch-002.pt.")
        expected = ["cannot write checkpoint", "epoch-002.pt: the disk is full"]
    else:
        switch = _device_full_at(monkeypatch, 2, 1)
        expected = ["ran out of memory at epoch 2, batch 1 with loader.batch_size = 8", "try 4"]
    result = _train(qtbot, window, window.train)
    assert result["status"] == "failed"
    box = window.last_error_box
    assert box is not None and box.isVisible()
    for text in expected:
        assert text in box.text() and text in result["error"]
    assert "Traceback" not in box.text()
    assert not window.controller.is_running() and not [t for t in window.findChildren(QThread) if t.isRunning()]
    run_dir = Path(result["run_dir"])
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["epoch"] == 1 and not _leftovers(run_dir)
    box.close()

    switch["full"] = False  # space freed / a smaller load: the same run continues from its last checkpoint
    assert window.act_resume.isEnabled() and window.act_train.isEnabled()
    resumed = _train(qtbot, window, window.resume_current_run)
    assert resumed["status"] == "completed" and resumed["run_dir"] == str(run_dir)
    assert [r["epoch"] for r in read_metrics(run_dir)] == [1, 2]
