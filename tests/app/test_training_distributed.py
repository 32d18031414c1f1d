"""Multi-process runs from the app end to end: the real torchrun and main.py as a QProcess child, two CPU
processes (gloo), the real window and its plots (offscreen)."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest
from conftest import write_image_folder, write_project

from app.main_window import MainWindow
from app.training import TrainingController
from engine.checkpoints import load_checkpoint
from engine.config import load_project
from engine.runs import read_metrics

torch_distributed = pytest.importorskip("torch.distributed")
pytestmark = pytest.mark.skipif(
    not torch_distributed.is_available(), reason="this PyTorch build has no torch.distributed"
)

TWO_CPU_PROCESSES = {"processes": 2, "backend": "gloo", "timeout_s": 60}


@pytest.fixture(autouse=True)
def _no_modal_questions(monkeypatch):
    monkeypatch.setattr(MainWindow, "_ask_stop_training", lambda self: True)


def _window(qtbot, path: Path) -> MainWindow:
    win = MainWindow()
    qtbot.addWidget(win)
    assert win.open_project(str(path))
    return win


def _close(qtbot, win: MainWindow) -> None:
    from widgets.tasks import running_tasks

    qtbot.waitUntil(lambda: not running_tasks(), timeout=120000)  # the evaluation after a completed run
    win.state._set_dirty(False)
    assert win.close()
    assert not win.controller.is_running()


def _gone(pid: int) -> bool:
    """The process ended (a zombie waiting to be reaped holds nothing of the run)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def test_the_app_trains_in_two_processes_and_plots_rank_0s_curve(qtbot, tmp_path):
    write_image_folder(tmp_path / "images", per_class=8)
    path = write_project(
        tmp_path / "ddp.json", "images", distributed=TWO_CPU_PROCESSES, train={"epochs": 2, "device": "cpu", "seed": 0}
    )
    win = _window(qtbot, path)
    seen = {"started": [], "epochs": [], "steps": []}
    win.controller.run_started.connect(seen["started"].append)
    win.controller.epoch_finished.connect(seen["epochs"].append)
    win.controller.batch_finished.connect(lambda info: seen["steps"].extend(info["steps"]))
    with qtbot.waitSignal(win.controller.run_finished, timeout=120000) as blocker:
        assert win.train()
    result = blocker.args[0]
    assert result["status"] == "completed", result
    info = seen["started"][0]
    assert info["world_size"] == 2 and info["device"] == "cpu"
    assert [m["epoch"] for m in seen["epochs"]] == [1, 2]
    # Rank 0's every batch loss is on the live plot, and both epochs' losses.
    batches = 2 * info["batches_per_epoch"]
    assert seen["steps"] == list(range(1, batches + 1))
    x, y = win.run_view.plots.curve_data("batch_loss")
    assert list(x) == list(range(1, batches + 1)) and len(y) == batches
    assert list(win.run_view.plots.curve_data("train_loss")[0]) == [1, 2]
    assert win.run_view.status_label.text().startswith("Finished 2 of 2 epoch(s)")
    run_dir = Path(result["run_dir"])
    assert [r["epoch"] for r in read_metrics(run_dir)] == [1, 2]
    assert (run_dir / "checkpoints" / "final.pt").is_file() and (run_dir / "checkpoints" / "last.pt").is_file()
    assert load_project(run_dir / "project.json").distributed.processes == 2
    # Each rank's output in its own tab; the event lines are not shown as text anywhere.
    tabs, app_log = win.log_tabs, win.log_view.toPlainText()
    assert tabs.rank_count() == 2
    assert "this is rank 0" in tabs.rank_text(0) and "this is rank 1" not in tabs.rank_text(0)
    assert "this is rank 1" in tabs.rank_text(1) and "this is rank 0" not in tabs.rank_text(1)
    assert "this is rank 0" in app_log and "this is rank 1" not in app_log  # the app's log: rank 0 and torchrun
    assert "@mwb-event" not in tabs.rank_text(0) + tabs.rank_text(1) + app_log
    assert app_log.count("Run folder:") == 1  # rank 0 says its log messages twice (event and line): shown once
    assert win.current_checkpoint and Path(win.current_checkpoint).parent == run_dir / "checkpoints"
    _close(qtbot, win)


def test_stop_ends_torchrun_and_both_workers_and_the_last_checkpoint_loads(qtbot, tmp_path):
    write_image_folder(tmp_path / "images", per_class=8)
    path = write_project(
        tmp_path / "long.json",
        "images",
        distributed=TWO_CPU_PROCESSES,
        loader={"batch_size": 2},
        train={"epochs": 50, "device": "cpu", "seed": 0},
    )
    win = _window(qtbot, path)
    epochs, steps = [], []
    win.controller.epoch_finished.connect(epochs.append)
    win.controller.batch_finished.connect(lambda info: steps.extend(info["steps"]))
    assert win.train()
    qtbot.waitUntil(lambda: len(epochs) >= 1 and steps[-1] > epochs[0]["global_step"], timeout=120000)
    pids = win.controller.process_ids()
    assert len(pids) >= 3  # torchrun and its two workers (and any loader workers below them)
    with qtbot.waitSignal(win.controller.run_finished, timeout=90000) as blocker:
        win.act_stop.trigger()
        win.act_stop.trigger()  # a second press is harmless (the action is disabled by then anyway)
        win.controller.stop()
    result = blocker.args[0]
    assert result["status"] == "stopped", result
    assert result["epoch"] >= 1
    qtbot.waitUntil(lambda: all(_gone(pid) for pid in pids), timeout=60000)
    last = Path(result["run_dir"]) / "checkpoints" / "last.pt"
    ckpt = load_checkpoint(last)
    assert ckpt["epoch"] == result["epoch"] == read_metrics(result["run_dir"])[-1]["epoch"]
    assert win.act_train.isEnabled() and not win.act_stop.isEnabled()
    # torchrun ends a stopped run by raising SignalException: its traceback is not the run's news.
    assert "SignalException" not in win.log_view.toPlainText()

    # Resume continues the stopped run in two processes, in its folder.
    started = []
    win.controller.run_started.connect(started.append)
    with qtbot.waitSignal(win.controller.run_finished, timeout=120000) as blocker:
        assert win.controller.resume(str(last), epochs=result["epoch"] + 1)
    assert blocker.args[0]["status"] == "completed", blocker.args[0]
    assert started[0]["world_size"] == 2 and started[0]["start_epoch"] == result["epoch"]
    assert [r["epoch"] for r in read_metrics(result["run_dir"])] == list(range(1, result["epoch"] + 2))
    _close(qtbot, win)


def test_closing_the_window_during_a_multi_process_run_stops_it_and_waits(qtbot, tmp_path):
    write_image_folder(tmp_path / "images", per_class=8)
    path = write_project(
        tmp_path / "long.json",
        "images",
        distributed=TWO_CPU_PROCESSES,
        loader={"batch_size": 2},
        train={"epochs": 50, "device": "cpu", "seed": 0},
    )
    win = _window(qtbot, path)
    steps = []
    win.controller.batch_finished.connect(lambda info: steps.extend(info["steps"]))
    assert win.train()
    qtbot.waitUntil(lambda: len(steps) >= 1, timeout=120000)
    pids = win.controller.process_ids()
    win.state._set_dirty(False)
    assert win.close()
    assert not win.controller.is_running() and win.controller.last_result["status"] == "stopped"
    assert all(_gone(pid) for pid in pids)


def test_a_rank_that_fails_ends_the_run_with_its_message(qtbot, tmp_path):
    images = write_image_folder(tmp_path / "images", per_class=8)
    cfg = load_project(write_project(tmp_path / "ddp.json", "images", distributed=TWO_CPU_PROCESSES))
    controller = TrainingController()
    per_rank: dict[int, list[str]] = {}
    controller.rank_logged.connect(lambda rank, line: per_rank.setdefault(rank, []).append(line))
    messages = []
    controller.errored.connect(messages.append)
    with qtbot.waitSignal(controller.run_finished, timeout=120000) as blocker:
        assert controller.start(cfg)
        shutil.rmtree(images)  # the data vanishes while the processes start (they take seconds to import torch)
    result = blocker.args[0]
    assert result["status"] == "failed"
    assert str(images) in result["error"] and "Traceback" not in result["error"], result["error"]
    assert messages == [result["error"]]
    # Each rank reported the failure in its own log.
    assert any(str(images) in line for line in per_rank.get(1, [])), per_rank
    assert not controller.is_running()


def _rank_pid(pids: list[int], rank: int) -> int:
    for pid in pids[1:]:
        try:
            with open(f"/proc/{pid}/environ", "rb") as fh:
                env = fh.read().split(b"\0")
        except OSError:
            continue
        if f"LOCAL_RANK={rank}".encode() in env:
            return pid
    raise AssertionError(f"no process of rank {rank} among {pids}")


def test_a_rank_killed_mid_run_fails_the_run_naming_it_and_nothing_is_left_running(qtbot, tmp_path):
    write_image_folder(tmp_path / "images", per_class=8)
    cfg = load_project(
        write_project(
            tmp_path / "long.json",
            "images",
            distributed=TWO_CPU_PROCESSES,
            loader={"batch_size": 2},
            train={"epochs": 50, "device": "cpu", "seed": 0},
        )
    )
    controller = TrainingController()
    steps = []
    controller.batch_finished.connect(lambda info: steps.extend(info["steps"]))
    assert controller.start(cfg)
    qtbot.waitUntil(lambda: len(steps) >= 1, timeout=120000)
    pids = controller.process_ids()
    with qtbot.waitSignal(controller.run_finished, timeout=90000) as blocker:
        os.kill(_rank_pid(pids, 1), signal.SIGKILL)  # as the out-of-memory killer would
    result = blocker.args[0]
    assert result["status"] == "failed", result
    # The cause first (rank 1 was killed), then what rank 0 saw of it.
    assert result["error"].startswith("rank 1: the process was killed by SIGKILL"), result["error"]
    assert "rank 0:" in result["error"]
    qtbot.waitUntil(lambda: all(_gone(pid) for pid in pids), timeout=60000)
