"""Multi-process runs from the app, against a stand-in for torchrun: a real child process that writes what
torchrun --tee writes (rank-prefixed lines, rank 0's event lines), to check the parsing, the end of a run and Stop."""

from __future__ import annotations

import json
import os
import signal
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import write_project

from app.process_run import ProcessRun, descendants
from engine.config import load_project

# What the stand-in does, chosen by its first argument; the rest are main.py's arguments as the app passes them.
STAND_IN = textwrap.dedent(r"""
    import json, os, signal, subprocess, sys, time
    scenario, args = sys.argv[1], sys.argv[2:]
    out = args[args.index("--out") + 1] if "--out" in args else None
    def say(text, rank=None, err=False, end="\n"):
        stream = sys.stderr if err else sys.stdout
        stream.write((f"[default{rank}]:" if rank is not None else "") + text + end)
        stream.flush()
    def event(kind, **payload):
        say("@mwb-event " + json.dumps({"event": kind, **payload}), rank=0)
    started = dict(run_dir=out, epochs=2, start_epoch=0, batches_per_epoch=3, device="cpu", global_step=0,
                   history=[], world_size=2)
    if scenario == "complete":
        say("W1128 torchrun: Setting OMP_NUM_THREADS environment variable for each process to be 1", err=True)
        say("rank 1 joined the group", rank=1)
        event("log", message="Loader: no workers")
        event("run_started", **started)
        say("[rank 1] a warning from rank 1", rank=1, err=True)
        event("batch", epoch=1, epochs=2, batch=2, batches_per_epoch=3, global_step=2, steps=[1, 2],
              losses=[1.0, 0.9], loss=0.9, lr=0.01, elapsed=0.1)
        # A line torchrun tailed before its end was written: the rest follows after the header again.
        line = "@mwb-event " + json.dumps({"event": "batch", "epoch": 1, "epochs": 2, "batch": 3,
                                            "batches_per_epoch": 3, "global_step": 3, "steps": [3],
                                            "losses": [0.8], "loss": 0.8, "lr": 0.01, "elapsed": 0.2})
        say(line[:40], rank=0, end="")
        say(line[40:], rank=0)
        say("epoch 1 " + "\r" + "epoch 1 100%", rank=1, err=True)
        event("epoch", metrics=dict(epoch=1, train_loss=0.9, val_loss=0.95, train_accuracy=0.5, val_accuracy=0.5,
                                    lr=0.01), epochs=2, global_step=3, best_epoch=1, checkpoint="",
              last_checkpoint="", elapsed=0.3)
        say("plain line from rank 0", rank=0, err=True)
        event("run_finished", status="completed", run_dir=out, epoch=2, epochs=2, best_epoch=1,
              stopped_early=False, error=None, error_type=None)
        say("torchrun: done")
    elif scenario == "crash":
        event("run_started", **started)
        say("error: data.path '/gone' does not exist", rank=1, err=True)
        say("Traceback (most recent call last): ...", err=True)
        sys.exit(1)
    elif scenario == "silent_crash":  # dies leaving a worker of its own running
        worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
        say(f"worker {worker.pid}", rank=1)
        time.sleep(1.0)
        say("Segmentation fault in worker", err=True)
        os.kill(os.getpid(), signal.SIGKILL)
    elif scenario == "rank1_fails":
        event("run_started", **started)
        say("error: something broke on rank 1", rank=1, err=True)
        event("run_finished", status="stopped", run_dir=out, epoch=0, epochs=2, best_epoch=None,
              stopped_early=False, error=None, error_type=None)
        sys.exit(1)
    elif scenario == "stops":
        def on_sigint(*_):
            event("run_finished", status="stopped", run_dir=out, epoch=1, epochs=2, best_epoch=1,
                  stopped_early=False, error=None, error_type=None)
            sys.exit(130)
        signal.signal(signal.SIGINT, on_sigint)
        event("run_started", **started)
        while True:
            time.sleep(0.05)
    elif scenario == "deaf":  # ignores SIGINT, with two children of its own (as torchrun's workers)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for _ in range(2):
            subprocess.Popen([sys.executable, "-c",
                              "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(600)"],
                             start_new_session=True)
        event("run_started", **started)
        while True:
            time.sleep(0.05)
""")


@pytest.fixture()
def stand_in(tmp_path):
    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN)

    def launcher_for(scenario):
        return lambda processes, args: [sys.executable, str(script), scenario, *args]

    return launcher_for


@pytest.fixture()
def cfg(tmp_path, image_folder):
    return load_project(write_project(tmp_path / "project.json", "images", distributed={"processes": 2}))


def _record(run: ProcessRun) -> dict:
    seen = {
        name: []
        for name in ("logged", "rank_logged", "run_started", "batch_finished", "epoch_finished", "run_finished")
    }
    run.logged.connect(seen["logged"].append)
    run.rank_logged.connect(lambda rank, text: seen["rank_logged"].append((rank, text)))
    for name in ("run_started", "batch_finished", "epoch_finished", "run_finished"):
        getattr(run, name).connect(seen[name].append)
    return seen


def _run(qtbot, run: ProcessRun, *, stop_after_start: bool = False, timeout: int = 30000) -> dict:
    seen = _record(run)
    with qtbot.waitSignal(run.done, timeout=timeout):
        run.start()
        if stop_after_start:
            qtbot.waitUntil(lambda: bool(seen["run_started"]), timeout=timeout)
            run.stop()
            run.stop()  # twice is harmless
    return seen


def _gone(pid: int) -> bool:
    """The process ended (or is a zombie waiting for its parent's wait, which holds nothing of a run)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def test_events_become_the_in_process_signals_and_lines_go_to_their_rank(qtbot, cfg, stand_in):
    run = ProcessRun(cfg, 2, launcher=stand_in("complete"))
    seen = _run(qtbot, run)
    run_dir = Path(seen["run_started"][0]["run_dir"])
    assert (run_dir / "project.json").is_file()  # the app wrote the snapshot the processes train
    snapshot = json.loads((run_dir / "project.json").read_text())
    assert Path(snapshot["data"]["path"]).is_absolute() and snapshot["distributed"]["processes"] == 2
    assert seen["run_started"][0]["world_size"] == 2 and "event" not in seen["run_started"][0]
    steps = [s for b in seen["batch_finished"] for s in b["steps"]]
    assert steps == [1, 2, 3]  # the line torchrun split in two arrived whole
    assert run.global_step == 3
    assert [m["epoch"] for m in seen["epoch_finished"]] == [1]
    result = seen["run_finished"][0]
    assert result["status"] == "completed" and result["run_dir"] == str(run_dir) and result["traceback"] is None
    ranks = seen["rank_logged"]
    assert (1, "rank 1 joined the group") in ranks and (1, "a warning from rank 1") in ranks
    assert (1, "epoch 1 100%") in ranks  # a progress bar redrawn with \r: its last state
    assert ranks.count((0, "Loader: no workers")) == 1 and (0, "plain line from rank 0") in ranks
    assert not any("@mwb-event" in text for _, text in ranks)
    # The app's log: rank 0 and torchrun itself, as for an in-process run; not the other ranks.
    log = seen["logged"]
    assert log.count("Loader: no workers") == 1 and "plain line from rank 0" in log and "torchrun: done" in log
    assert any("OMP_NUM_THREADS" in line for line in log)
    assert not any("rank 1" in line for line in log if not line.startswith("Starting"))


def test_processes_that_end_without_a_result_report_the_ranks_error(qtbot, cfg, stand_in):
    run = ProcessRun(cfg, 2, launcher=stand_in("crash"))
    seen = _run(qtbot, run)
    result = seen["run_finished"][0]
    assert result["status"] == "failed"
    assert result["error"] == "rank 1: data.path '/gone' does not exist"
    assert result["run_dir"] is None  # nothing but the app's snapshot was written: no folder is left behind
    assert not list((Path(cfg.base_dir) / "runs").iterdir())


def test_a_killed_child_reports_its_last_output_and_leaves_no_worker_behind(qtbot, cfg, stand_in):
    run = ProcessRun(cfg, 2, launcher=stand_in("silent_crash"))
    run._watch.setInterval(100)
    seen = _run(qtbot, run)
    result = seen["run_finished"][0]
    assert result["status"] == "failed"
    assert "was killed" in result["error"] and "Segmentation fault in worker" in result["error"]
    worker = int(next(text for rank, text in seen["rank_logged"] if text.startswith("worker ")).split()[1])
    qtbot.waitUntil(lambda: _gone(worker), timeout=60000)  # torchrun died; its worker must not train on alone
    assert any("left 1 of its processes running" in line for line in seen["logged"])


def test_rank_0_stopped_by_a_failing_rank_is_a_failed_run_with_that_ranks_message(qtbot, cfg, stand_in):
    seen = _run(qtbot, ProcessRun(cfg, 2, launcher=stand_in("rank1_fails")))
    result = seen["run_finished"][0]
    assert result["status"] == "failed" and "rank 1: something broke on rank 1" in result["error"]


def test_a_command_that_cannot_start_is_a_failed_run(qtbot, cfg):
    run = ProcessRun(cfg, 2, launcher=lambda n, args: ["/no/such/torchrun", *args])
    seen = _run(qtbot, run)
    result = seen["run_finished"][0]
    assert result["status"] == "failed" and "/no/such/torchrun" in result["error"]
    assert result["run_dir"] is None


def test_stop_sends_sigint_and_the_processes_result_is_kept(qtbot, cfg, stand_in):
    run = ProcessRun(cfg, 2, launcher=stand_in("stops"))
    seen = _run(qtbot, run, stop_after_start=True)
    result = seen["run_finished"][0]
    assert (result["status"], result["epoch"], result["best_epoch"]) == ("stopped", 1, 1)
    assert not run.killed


def test_processes_that_ignore_stop_are_killed_with_their_children_after_the_grace_period(qtbot, cfg, stand_in):
    run = ProcessRun(cfg, 2, launcher=stand_in("deaf"))
    run._kill_timer.setInterval(1500)  # STOP_GRACE_MS is 45 s
    seen = _record(run)
    run.start()
    qtbot.waitUntil(lambda: bool(seen["run_started"]) and len(run.pids()) == 3, timeout=20000)
    pids = run.pids()
    with qtbot.waitSignal(run.done, timeout=20000):
        run.stop()
    assert run.killed and seen["run_finished"][0]["status"] == "stopped"
    qtbot.waitUntil(lambda: all(_gone(pid) for pid in pids), timeout=60000)
    assert any("did not end within" in line for line in seen["logged"])


def test_descendants_finds_children_and_grandchildren():
    import subprocess

    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
            "'import time; time.sleep(30)']); time.sleep(30)",
        ]
    )
    try:
        deadline = time.monotonic() + 10
        while len(descendants(parent.pid)) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        found = descendants(parent.pid)
        assert len(found) == 1  # the grandchild, and nothing else
        # From this process: the child and, through it, the grandchild, the child first. Other children of this
        # test process may be there too (a forkserver an earlier test's scan started lives as long as the process).
        mine = descendants(os.getpid())
        assert parent.pid in mine and found[0] in mine and mine.index(parent.pid) < mine.index(found[0])
    finally:
        for pid in [*descendants(parent.pid), parent.pid]:
            os.kill(pid, signal.SIGKILL)
        parent.wait()


def test_the_controller_runs_a_multi_process_project_through_the_launcher(qtbot, cfg, stand_in):
    from app.training import TrainingController

    controller = TrainingController(launcher=stand_in("stops"))
    running, launched, ranks, errors = [], [], [], []
    controller.running_changed.connect(running.append)
    controller.launched.connect(launched.append)
    controller.rank_logged.connect(lambda rank, text: ranks.append(rank))
    controller.errored.connect(errors.append)
    with qtbot.waitSignal(controller.run_started, timeout=20000):
        assert controller.start(cfg)
    assert controller.is_running() and not controller.start(cfg)  # one run at a time
    assert launched == [2] and running == [True] and controller.current_step() == 0
    assert len(controller.process_ids()) >= 1
    controller.stop()
    controller.stop()
    assert controller.wait(20000)
    assert running == [True, False] and controller.last_result["status"] == "stopped" and not errors
    assert controller.process_ids() == [] and controller.current_step() is None

    failing = TrainingController(launcher=stand_in("crash"))
    failing.errored.connect(errors.append)
    with qtbot.waitSignal(failing.run_finished, timeout=20000):
        failing.start(cfg)
    assert errors == ["rank 1: data.path '/gone' does not exist"]
