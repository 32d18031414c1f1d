"""Kill anywhere: a real `main.py train` process SIGKILLed at 10 seeded moments, five of them inside checkpoint
writes; after every kill the checkpoints on disk load and `main.py resume` continues the run, and it finishes.

The kills inside a write do not depend on timing: kill_hook/sitecustomize.py (put on the child's PYTHONPATH) makes
the process stop dead at a chosen point of one epoch's checkpoint writes (a chosen byte of the temporary file, the
whole temporary file before its rename, last.pt's new link before its rename) and say so in a marker file; the
test then SIGKILLs it there. The other kills land at seeded random times (at startup, and during training after a
new epoch was saved).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import write_image_folder, write_project

from engine.checkpoints import CheckpointError, load_checkpoint
from engine.runs import read_metrics

ROOT = Path(__file__).resolve().parents[2]
HOOK = Path(__file__).resolve().parent / "kill_hook"
SEED = 20261128
# Where the five kills inside a write stop the writer: three at a random byte of epoch-E.pt's temporary file,
# one with the temporary file whole but not renamed, one with last.pt's new link made but not renamed.
WRITE_STAGES = ["bytes", "bytes", "bytes", "rename", "link"]
KINDS = ["write"] * len(WRITE_STAGES) + ["training"] * 4 + ["startup"]
TIMEOUT = 120  # seconds a moment may take to come, on a machine as busy as it gets


def _temporaries(folder: Path) -> set[str]:
    try:
        return {n for n in os.listdir(folder) if n.startswith(".") and n.endswith(".tmp")}
    except FileNotFoundError:
        return set()


def _epoch_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("epoch-*.pt"))


def _fail(proc: subprocess.Popen, log: Path, what: str) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(30)
    raise AssertionError(f"{what}:\n" + log.read_text(errors="replace")[-3000:])


def _kill_when(proc: subprocess.Popen, log: Path, ckpt_dir: Path, epoch: int, kind: str, marker: Path, delay: float):
    """Wait for the moment `kind` names and SIGKILL the process there; returns the writer's marker (write) or None.

    startup: `delay` seconds after the process started (importing, scanning the data, building the model, or
    already training); training: `delay` seconds after this process saved epoch-`epoch`.pt, so the kill comes
    after progress; write: once the hook says the writer stopped inside epoch `epoch`'s checkpoint writes.
    """
    epoch_file = ckpt_dir / f"epoch-{epoch:03d}.pt"
    earlier = _identity(epoch_file)  # one an earlier process wrote before it was killed is not this one's progress
    spawned = time.monotonic()
    armed_at = spawned if kind == "startup" else None
    while True:
        if proc.poll() is not None:
            _fail(proc, log, f"the run ended by itself (exit {proc.returncode}) before the {kind} kill")
        if time.monotonic() - spawned > TIMEOUT:
            _fail(proc, log, f"no {kind} moment within {TIMEOUT} s")
        if kind == "write" and marker.exists():
            os.kill(proc.pid, signal.SIGKILL)
            break
        if kind == "write" and (ckpt_dir / f"epoch-{epoch + 1:03d}.pt").exists() and not marker.exists():
            _fail(proc, log, f"epoch {epoch} was saved without the hook stopping its writer")
        if kind == "training" and armed_at is None and _identity(epoch_file) not in (None, earlier):
            armed_at = time.monotonic()
        if armed_at is not None and time.monotonic() - armed_at >= delay:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    return json.loads(marker.read_text()) if kind == "write" else None


def _identity(path: Path) -> tuple[int, int] | None:
    """Which file is at path (inode, modification time), None if none."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def _check_killed_write(ckpt_dir: Path, epoch: int, paused: dict, epoch_file_before: tuple[int, int] | None) -> None:
    """What a kill inside epoch `epoch`'s writes left: the new file half made, the previous checkpoints whole.

    epoch_file_before: the epoch-E.pt there was before the process started (an earlier process killed after
    writing it but before last.pt moved to it leaves one), which the killed write must not have replaced.
    """
    temporary = Path(paused["temporary"])
    assert temporary.parent == ckpt_dir and temporary.name in _temporaries(ckpt_dir), paused
    assert temporary.stat().st_size == paused["bytes"] > 0, paused
    assert load_checkpoint(ckpt_dir / "last.pt")["epoch"] == epoch - 1, "last.pt moved before its rename"
    epoch_file = ckpt_dir / f"epoch-{epoch:03d}.pt"
    if paused["stage"] == "bytes":
        assert _identity(epoch_file) == epoch_file_before, "epoch file replaced before its write was whole"
        with pytest.raises(CheckpointError, match="damaged or not a PyTorch file"):
            load_checkpoint(temporary)  # truly half written
    elif paused["stage"] == "rename":
        assert _identity(epoch_file) == epoch_file_before, "epoch file replaced before its rename"
        assert load_checkpoint(temporary)["epoch"] == epoch  # whole and fsynced, only not yet renamed
    else:  # link: epoch-E.pt is in place, last.pt's new link waits for its rename
        assert os.path.samefile(temporary, epoch_file) and load_checkpoint(epoch_file)["epoch"] == epoch


def _check_after_kill(run: Path, previous_epoch: int) -> int:
    """Every checkpoint left loads; last.pt never goes back; metrics.jsonl agrees with it. Returns last.pt's epoch."""
    ckpt_dir = run / "checkpoints"
    last_path = ckpt_dir / "last.pt"
    if not last_path.exists():
        assert previous_epoch == 0, "last.pt disappeared after it had been written"
        assert not _epoch_files(ckpt_dir), "an epoch file without last.pt"
        return 0
    last = load_checkpoint(last_path)["epoch"]
    assert last >= previous_epoch, f"last.pt went back from epoch {previous_epoch} to {last}"
    files = _epoch_files(ckpt_dir)
    epochs = [load_checkpoint(f)["epoch"] for f in files]  # each one whole: a kill never leaves half a file
    assert [int(f.stem.split("-")[1]) for f in files] == epochs
    assert epochs[-1] in (last, last + 1), f"newest epoch file {epochs[-1]}, last.pt {last}"
    if (ckpt_dir / "best.pt").exists():
        assert load_checkpoint(ckpt_dir / "best.pt")["epoch"] <= epochs[-1]
    rows = [r["epoch"] for r in read_metrics(run)]
    assert rows == list(range(1, len(rows) + 1)) and len(rows) in (last - 1, last), (rows, last)
    return last


def test_sigkill_inside_checkpoint_writes_and_at_random_moments_then_resume_finishes_the_run(tmp_path):
    rng = random.Random(SEED)
    write_image_folder(tmp_path / "images", per_class=4, size=8)
    # The smallest model that trains like a real one (timm's test_resnet: 1.5 MB checkpoints, epochs of three
    # batches); where a kill lands in a write is set by the hook, not by how long the write lasts.
    project = write_project(
        tmp_path / "project.json",
        "images",
        data={"image_size": 8},
        model={"backbone": "timm/test_resnet"},
        loader={"batch_size": 3},
        optimizer={"name": "sgd", "lr": 0.01, "momentum": 0.0},
        train={"epochs": 500, "device": "cpu", "seed": 0},
        output={"dir": "runs", "tensorboard": False},
    )
    run = tmp_path / "run"
    ckpt_dir = run / "checkpoints"
    kinds = list(KINDS)
    rng.shuffle(kinds)
    if kinds[0] == "startup":  # the first process trains from scratch: it is killed once epoch 1 is saved
        kinds[0], kinds[1] = kinds[1], kinds[0]
    stages = list(WRITE_STAGES)
    rng.shuffle(stages)

    # One compute thread: two on a busy 2-core machine make each epoch many times slower (thread contention).
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    report, last_epoch = [], 0
    for i, kind in enumerate(kinds):
        resuming = (ckpt_dir / "last.pt").exists()
        args = ["resume", str(ckpt_dir / "last.pt")] if resuming else ["train", str(project), "--out", str(run)]
        # The epoch the kill waits for: the next one, or epoch 2 for a fresh run (epoch 1 leaves something to resume).
        epoch = last_epoch + 1 if resuming else 2
        marker = tmp_path / f"paused-{i}.json"
        child_env = dict(env)
        delay = 0.0
        if kind == "write":
            stage = stages.pop()
            at = f":{rng.uniform(0.02, 0.98):.3f}" if stage == "bytes" else ""  # that fraction of the file
            child_env.update(
                PYTHONPATH=os.pathsep.join(filter(None, [str(HOOK), env.get("PYTHONPATH")])),
                MWB_TEST_REPO=str(ROOT),
                MWB_TEST_PAUSE_IN_WRITE=f"{stage}:{epoch}{at}",
                MWB_TEST_PAUSED_MARKER=str(marker),
            )
        else:
            delay = rng.uniform(0.3, 3.0) if kind == "startup" else rng.uniform(0.0, 1.0)
        stale = _temporaries(ckpt_dir)  # a previous kill's leftovers: the new process deletes them
        epoch_file_before = _identity(ckpt_dir / f"epoch-{epoch:03d}.pt")
        log = tmp_path / f"segment-{i}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, str(ROOT / "main.py"), *args],
                cwd=ROOT,
                env=child_env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
            try:
                paused = _kill_when(proc, log, ckpt_dir, epoch, kind, marker, delay)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(30)
        text = log.read_text(errors="replace")
        if resuming and "Training on" in text:  # it got as far as training: it continued from last.pt
            assert f"Resumed after epoch {last_epoch} " in text, text[-3000:]
        if paused is not None:
            assert not stale & _temporaries(ckpt_dir), "the resumed process left a killed write's temporary file"
            _check_killed_write(ckpt_dir, epoch, paused, epoch_file_before)
        last_epoch = _check_after_kill(run, last_epoch)
        report.append(
            {"kind": kind, "command": args[0], "delay": round(delay, 3), "paused": paused, "last": last_epoch}
        )

    print(f"\n{len(kinds)} kills; {len(WRITE_STAGES)} inside checkpoint writes")
    for r in report:
        print("  ", r)
    assert [r["kind"] for r in report] == kinds and not stages
    assert sorted(r["paused"]["stage"] for r in report if r["paused"]) == sorted(WRITE_STAGES)
    # Each write and training kill came after a new epoch was saved (a write kill's epoch is saved by the resume).
    assert last_epoch >= 1 + kinds.count("training"), report

    # Space for the run to finish: one epoch past the last checkpoint, as `resume --epochs` allows.
    result = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), "resume", str(ckpt_dir / "last.pt"), "--epochs", str(last_epoch + 1)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    (tmp_path / "final.log").write_text(result.stderr)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Resumed after epoch {last_epoch} " in result.stderr
    final = load_checkpoint(ckpt_dir / "final.pt")
    assert final["epoch"] == last_epoch + 1
    assert [m["epoch"] for m in final["history"]] == list(range(1, last_epoch + 2))
    assert [r["epoch"] for r in read_metrics(run)] == list(range(1, last_epoch + 2))
    assert not _temporaries(ckpt_dir) and not _temporaries(run), "a killed write's temporary file outlived resume"
