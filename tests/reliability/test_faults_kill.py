"""Kill anywhere: a real `main.py train` process SIGKILLed at 10 seeded random moments, several inside checkpoint
writes; after every kill the checkpoints on disk load and `main.py resume` continues the run, and it finishes."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import write_image_folder, write_project

from engine.checkpoints import load_checkpoint
from engine.runs import read_metrics

ROOT = Path(__file__).resolve().parents[2]
KILLS = 10
SEED = 20261128


def _temporaries(folder: Path) -> set[str]:
    try:
        return {n for n in os.listdir(folder) if n.startswith(".") and n.endswith(".tmp")}
    except FileNotFoundError:
        return set()


def _epoch_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("epoch-*.pt"))


def _kill_when(
    proc: subprocess.Popen, log: Path, ckpt_dir: Path, last_epoch: int, kind: str, rng: random.Random
) -> dict:
    """Wait for the moment `kind` names, SIGKILL the process there; what was on disk at that instant.

    startup: 0.3-3 s after the process started (importing, scanning the data, building the model);
    training: 0-1 s after the process saved its first new epoch (the next epoch's batches, validation,
    checkpoint and metrics writes), so each of these kills comes after progress;
    write: 0-20 ms after a new temporary checkpoint file appeared (inside torch.save, fsync or the rename).
    A fresh run (no last.pt yet) is killed only once its first checkpoint exists, so that each kill leaves
    something to resume.
    """
    stale = _temporaries(ckpt_dir)  # a previous kill's leftovers: the new process deletes them, they do not count
    fresh = not (ckpt_dir / "last.pt").exists()
    progress = ckpt_dir / f"epoch-{last_epoch + 1 + fresh:03d}.pt"  # fresh: epoch 1 is saved, then epoch 2
    spawned = time.monotonic()
    delay = {"startup": rng.uniform(0.3, 3.0), "training": rng.uniform(0.0, 1.0), "write": rng.uniform(0.0, 0.02)}[kind]
    armed_at = spawned if kind == "startup" else None
    while True:
        if proc.poll() is not None:
            raise AssertionError(
                f"the run ended by itself (exit {proc.returncode}) before the {kind} kill:\n"
                + log.read_text(errors="replace")[-3000:]
            )
        if time.monotonic() - spawned > 120:
            proc.kill()
            raise AssertionError(f"no {kind} moment within 120 s:\n" + log.read_text(errors="replace")[-3000:])
        if armed_at is None and fresh and (ckpt_dir / "last.pt").exists():
            fresh, stale = False, _temporaries(ckpt_dir)  # epoch 1 is saved: the moments count from here
        if armed_at is None and not fresh:
            if kind == "training" and progress.exists():
                armed_at = time.monotonic()
            elif kind == "write" and any(n.startswith(".epoch-") for n in _temporaries(ckpt_dir) - stale):
                armed_at = time.monotonic()
        if armed_at is not None and time.monotonic() - armed_at >= delay:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(30)
            break
        time.sleep(0.001)
    assert proc.returncode == -signal.SIGKILL
    left = _temporaries(ckpt_dir) - stale
    return {"kind": kind, "delay": round(delay, 3), "in_write": sorted(left)}


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


def test_sigkill_at_random_moments_then_resume_finishes_the_run(tmp_path):
    rng = random.Random(SEED)
    write_image_folder(tmp_path / "images", per_class=12)
    # resnet18 with plain SGD: 45 MB checkpoints, so a write lasts long enough to be killed in.
    project = write_project(
        tmp_path / "project.json",
        "images",
        loader={"batch_size": 8},
        optimizer={"name": "sgd", "lr": 0.01, "momentum": 0.0},
        train={"epochs": 50, "device": "cpu", "seed": 0},
        output={"dir": "runs", "tensorboard": False},
    )
    run = tmp_path / "run"
    ckpt_dir = run / "checkpoints"
    kinds = ["write"] * 5 + ["training"] * 4 + ["startup"]
    rng.shuffle(kinds)
    if kinds[0] == "startup":  # the first process trains from scratch: it is killed once epoch 1 is saved
        kinds[0], kinds[1] = kinds[1], kinds[0]

    # One compute thread: two on a busy 2-core machine make each epoch 20 times slower (thread contention).
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    report, last_epoch = [], 0
    for i, kind in enumerate(kinds):
        resuming = (ckpt_dir / "last.pt").exists()
        args = ["resume", str(ckpt_dir / "last.pt")] if resuming else ["train", str(project), "--out", str(run)]
        log = tmp_path / f"segment-{i}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, str(ROOT / "main.py"), *args], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
            )
            try:
                moment = _kill_when(proc, log, ckpt_dir, last_epoch, kind, rng)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(30)
        text = log.read_text(errors="replace")
        if resuming and "Training on" in text:  # it got as far as training: it continued from last.pt
            assert f"Resumed after epoch {last_epoch} " in text, text[-3000:]
        last_epoch = _check_after_kill(run, last_epoch)
        report.append({**moment, "command": args[0], "last_epoch_after": last_epoch})

    assert last_epoch >= 1 + kinds.count("training"), report  # each "training" kill came after a new epoch
    # Space for the run to finish: one epoch past the last checkpoint, as `resume --epochs` allows.
    final_log = tmp_path / "final.log"
    result = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), "resume", str(ckpt_dir / "last.pt"), "--epochs", str(last_epoch + 1)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    final_log.write_text(result.stderr)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Resumed after epoch {last_epoch} " in result.stderr
    final = load_checkpoint(ckpt_dir / "final.pt")
    assert final["epoch"] == last_epoch + 1
    assert [m["epoch"] for m in final["history"]] == list(range(1, last_epoch + 2))
    assert [r["epoch"] for r in read_metrics(run)] == list(range(1, last_epoch + 2))
    assert not _temporaries(ckpt_dir) and not _temporaries(run), "a killed write's temporary file outlived resume"

    in_write = [r for r in report if r["in_write"]]
    print(f"\n{KILLS} kills, {len(in_write)} inside a checkpoint write; finished at epoch {last_epoch + 1}")
    for r in report:
        print("  ", r)
    assert len(report) == KILLS
    assert len(in_write) >= 3, report  # several kills landed while a checkpoint file was half written
