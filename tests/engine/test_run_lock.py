"""Two runs never share a folder: run folders (and export files) are claimed by one live process at a time."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from engine.config import ConfigError, load_project
from engine.run_files import read_metrics
from engine.run_lock import LOCK_FILE, FolderBusyError, claim_folder, holder, read_owner, release_run_dir
from engine.runs import create_run_dir, resume_run_dir

ROOT = Path(__file__).resolve().parents[2]
HOLDER = """
import sys, time
from engine.run_lock import claim_folder
claim = claim_folder(sys.argv[1])
print("held", flush=True)
sys.stdin.read()  # until the test closes our stdin, or kills us
claim.release()
"""


def hold(folder: Path) -> subprocess.Popen:
    """A real process that claims folder and keeps it until its stdin closes (or it is killed)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder)], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def _race(barrier, project: str, out: str | None, results) -> None:
    cfg = load_project(project)
    barrier.wait()  # both processes reach the claim together
    try:
        made = create_run_dir(cfg, out)
        (made / "owner.txt").write_text(str(os.getpid()))
        results.put(("ok", str(made)))
    except (ConfigError, FolderBusyError) as exc:
        results.put(("refused", str(exc)))


def race(project: Path, out: Path | None) -> list[tuple[str, str]]:
    """Two real processes, started together, each asking for a run folder; what each got."""
    ctx = multiprocessing.get_context("fork")  # torch is already imported: the children start in milliseconds
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [
        ctx.Process(target=_race, args=(barrier, str(project), str(out) if out else None, results)) for _ in range(2)
    ]
    for p in procs:
        p.start()
    got = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    return got


def test_two_processes_racing_for_one_out_folder_exactly_one_gets_it(tiny_project, tmp_path):
    for round_ in range(15):
        out = tmp_path / f"same-{round_}"
        got = race(tiny_project, out)
        winners = [r for r in got if r[0] == "ok"]
        refused = [r for r in got if r[0] == "refused"]
        assert len(winners) == 1 and len(refused) == 1, got
        assert str(out) in refused[0][1] and "in use by process" in refused[0][1]
        assert (out / "owner.txt").read_text().isdigit()


def test_two_runs_started_in_the_same_second_get_different_folders(tiny_project):
    for _ in range(10):
        got = race(tiny_project, None)
        assert [r[0] for r in got] == ["ok", "ok"], got
        assert got[0][1] != got[1][1]


def test_a_folder_held_by_a_live_process_is_refused_naming_that_process(tiny_project, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    other = hold(out)
    try:
        with pytest.raises(FolderBusyError, match=rf"{out}.*in use by process {other.pid}"):
            create_run_dir(load_project(tiny_project), out)
        with pytest.raises(FolderBusyError, match=f"process {other.pid}"):
            resume_run_dir(out / "checkpoints" / "last.pt", None)
        # the command line: exit 2 and one line naming the folder and the process, no traceback
        cli = subprocess.run(
            [sys.executable, "main.py", "train", str(tiny_project), "--out", str(out)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert cli.returncode == 2, cli.stderr
        assert f"in use by process {other.pid}" in cli.stderr and str(out) in cli.stderr
        assert "Traceback" not in cli.stderr
        assert not (out / "metrics.jsonl").exists()
    finally:
        other.stdin.close()
        other.wait(30)
    assert not (out / LOCK_FILE).exists()  # released with its owner's end


def test_a_stale_lock_from_a_killed_process_is_taken_over_saying_so(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    other = hold(out)
    assert holder(out)["pid"] == other.pid  # a look at who holds it, while it does
    other.send_signal(signal.SIGKILL)
    other.wait(30)
    other.stdin.close()
    assert read_owner(out / LOCK_FILE)["pid"] == other.pid  # the file is still there, its lock is not
    assert holder(out) is None

    said: list[str] = []
    claim = claim_folder(out, log=said.append)
    try:
        assert claim.took_over["pid"] == other.pid
        assert len(said) == 1 and f"process {other.pid}" in said[0] and "no longer runs" in said[0]
        assert read_owner(out / LOCK_FILE)["pid"] == os.getpid()
    finally:
        claim.release()
    assert not (out / LOCK_FILE).exists()


def test_two_trainings_into_one_folder_leave_one_run(tiny_project, tmp_path):
    """The user's report: `train --out runs/same` twice at once. One trains, the other is refused; the folder's
    metrics hold each epoch once."""
    out = tmp_path / "same"
    cmd = [sys.executable, "main.py", "train", str(tiny_project), "--out", str(out), "--epochs", "1"]
    procs = [
        subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)
    ]
    outputs = [p.communicate(timeout=600) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], outputs
    refused = outputs[[p.returncode for p in procs].index(2)][1]
    assert "in use by process" in refused or "already holds a run" in refused
    assert [m["epoch"] for m in read_metrics(out)] == [1]
    assert json.loads((out / "project.json").read_text())["name"] == "tiny"
    assert not (out / LOCK_FILE).exists()


def test_a_failed_start_releases_the_folder(tiny_project, tmp_path):
    out = tmp_path / "run"
    run_dir = create_run_dir(load_project(tiny_project), out)
    assert read_owner(out / LOCK_FILE)["pid"] == os.getpid()
    release_run_dir(run_dir)
    assert not (out / LOCK_FILE).exists()
    other = hold(out)  # another process can now have it
    other.stdin.close()
    other.wait(30)
