"""Sweeps (issue 18): a 12-trial sweep over learning rate and freeze depth on the bundled digits with the median
pruner and without it (wall time, trials pruned, the best trial against examples/single_phase.json), and a sweep SIGKILLed
at five seeded moments and continued (tests/engine/test_sweep.py runs three).

The two sweeps use the random sampler with the same seed, so they draw the same parameters in the same order and
the time saved is the pruner's alone. The frozen-feature cache is cleared before each sweep.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import DIGITS, REPO, Figure, Section, digits_subset

SPACE_FILE = (
    REPO / "examples" / "spaces" / "single_phase.json"
)  # learning rate and freeze depth for examples/single_phase.json


# The sweep's trials and the default project it is compared with all run at this size instead of the weights'
# 224 px (data.input_size): 25 runs of three epochs at 224 px take hours on 2 CPUs, at 64 px minutes. The
# digits are 8x8 scans, so the comparison loses nothing that 224 px would show.
SWEEP_SIZE = 64


def _digits_project(root: Path, data: Path, epochs: int) -> Path:
    """examples/single_phase.json on this data at SWEEP_SIZE px, on the CPU, for `epochs` epochs, its runs under root."""
    project = json.loads((REPO / "examples" / "single_phase.json").read_text())
    project["data"]["path"] = str(data)
    project["data"]["input_size"] = SWEEP_SIZE
    project["train"].update(epochs=epochs, device="cpu")
    project["output"] = {"dir": str(root / "runs"), "tensorboard": False}
    project["checkpoint"] = {"every_epoch": False}
    path = root / "digits.json"
    path.write_text(json.dumps(project, indent=2))
    return path


def _timed_sweep(project: Path, trials: int, pruner: str, study: str) -> dict[str, Any]:
    from engine import feature_cache
    from engine.config import load_project
    from engine.sweep import Sweep, SweepSpec, load_space, summary

    feature_cache.clear()
    spec = SweepSpec(
        load_project(project), load_space(SPACE_FILE), trials=trials, study=study, sampler="random", pruner=pruner
    )
    started = time.perf_counter()
    outcomes = Sweep(spec, log=lambda m: None).run()
    seconds = time.perf_counter() - started
    result = summary(Sweep(spec, log=lambda m: None).open())
    return {"seconds": seconds, "outcomes": outcomes, "summary": result}


def _default_run(project: Path) -> float:
    from engine import feature_cache
    from engine.config import load_project
    from engine.run_files import read_metrics
    from engine.session import RunSession

    feature_cache.clear()
    result = RunSession(load_project(project)).run()
    if result.status != "completed" or result.run_dir is None:
        raise RuntimeError(f"the default project's run ended {result.status}: {result.error}")
    return max(m["val_accuracy"] for m in read_metrics(result.run_dir))


def pruning(quick: bool = False) -> Section:
    work = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    try:
        if quick:
            data, epochs, trials = digits_subset(work, 20), 3, 6
        else:
            data, epochs, trials = DIGITS, 4, 12
        project = _digits_project(work, data, epochs)
        pruned = _timed_sweep(project, trials, "median", "pruned")
        full = _timed_sweep(project, trials, "none", "unpruned")
        default = _default_run(project)
        n = sum(1 for _ in data.rglob("*.png"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    stopped_early = [o for o in pruned["outcomes"] if o.state == "pruned"]
    count_pruned = len(stopped_early)
    trial_seconds = sum(o.seconds for o in full["outcomes"])
    saving = 100.0 * (1.0 - pruned["seconds"] / full["seconds"])
    best = pruned["summary"]["best"]
    best_points = 100.0 * (best["value"] - default) if best else None
    return Section(
        "sweep_pruning",
        "Sweep with the median pruner",
        [
            Figure("sweep_pruned_seconds", "sweep wall time, median pruner", pruned["seconds"], "s"),
            Figure("sweep_unpruned_seconds", "sweep wall time, no pruner", full["seconds"], "s"),
            Figure(
                "sweep_pruning_saving",
                "time saved by pruning",
                saving,
                "%",
                ">= 30",
                detail=f"{count_pruned} of {trials} trials pruned"
                + (
                    ", after " + ", ".join(str(o.epochs) for o in sorted(stopped_early, key=lambda o: o.number))
                    if stopped_early
                    else ""
                )
                + f" of {epochs} epochs; unpruned, the trials' own time was {trial_seconds:.0f} s of the sweep's "
                f"{full['seconds']:.0f} s",
            ),
            Figure(
                "sweep_best_vs_default",
                "best trial vs the default project (points)",
                best_points,
                "points",
                ">= 0",
                detail=(
                    f"best {best['value'] * 100:.1f}% (trial {best['number']}: "
                    + ", ".join(
                        f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in best["params"].items()
                    )
                    + f") vs default {default * 100:.1f}%"
                    if best
                    else "no trial completed"
                ),
            ),
        ],
        setup=f"examples/single_phase.json (timm/efficientnet_lite0, BUNDLED weights) at data.input_size {SWEEP_SIZE} px "
        f"on {n} digits, {epochs} epochs, CPU; {trials} trials, random sampler (same seed for both sweeps), lr log-uniform 1e-4..1e-2 and "
        "freeze_up_to among blocks.1 to blocks.5 (the default project freezes up to blocks.2); objective: best val_accuracy",
        notes=[
            "The pruned sweep's best is compared with one run of the default project on the same data, size and epochs."
        ],
    )


# ---------------------------------------------------------------------------------------------
# Kill and continue


def sweep_command(project: Path, space: Path, trials: int, *extra: str) -> list[str]:
    return [
        sys.executable,
        str(REPO / "main.py"),
        "sweep",
        str(project),
        "--space",
        str(space),
        "--trials",
        str(trials),
        "--sampler",
        "random",
        *extra,
    ]


class Lines:
    """A process's stderr read line by line on a thread, so a caller can wait for a line and then act."""

    def __init__(self, proc: subprocess.Popen):
        self.lines: list[str | None] = []
        self._new = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._thread.start()

    def _read(self, proc: subprocess.Popen) -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            with self._new:
                self.lines.append(line)
                self._new.notify_all()
        with self._new:
            self.lines.append(None)  # the end
            self._new.notify_all()

    def wait_for(self, pattern: str, count: int = 1) -> bool:
        """Wait until `count` lines match (True) or the process ends first (False)."""
        with self._new:
            while True:
                matched = [line for line in self.lines if line is not None and re.search(pattern, line)]
                if len(matched) >= count:
                    return True
                if self.lines and self.lines[-1] is None:
                    return False
                self._new.wait(120)

    def text(self) -> str:
        self._thread.join(120)
        return "".join(line for line in self.lines if line is not None)


def kill_and_continue(project: Path, space: Path, *, moments: int, trials: int, seed: int) -> dict[str, Any]:
    """`main.py sweep` SIGKILLed at `moments` moments and started again after each, then run to its end.

    The first moment is inside a trial (right after its first epoch); the others are a seeded delay after the
    first or second trial of that process began. Returns the last process, the trials that printed as finished
    in any process, and how many kills landed inside a trial."""
    rng = random.Random(seed)
    finished: set[int] = set()
    killed_mid_trial = 0
    for moment in range(moments):
        proc = subprocess.Popen(sweep_command(project, space, trials), stderr=subprocess.PIPE, text=True, cwd=REPO)
        lines = Lines(proc)
        if moment == 0:
            lines.wait_for(r"trial \d+ epoch 1 ")
        elif lines.wait_for(r"^trial \d+: ", count=rng.choice([1, 2])):
            threading.Event().wait(rng.uniform(0.0, 1.5))  # the seeded moment after that trial began
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        text = lines.text()
        finished |= {int(n) for n in re.findall(r"^trial (\d+) (?:finished|pruned)", text, re.M)}
        started = set(re.findall(r"^trial (\d+): ", text, re.M))
        ended = set(re.findall(r"^trial (\d+) (?:finished|pruned|failed)", text, re.M))
        killed_mid_trial += bool(started - ended) and proc.returncode == -signal.SIGKILL
    last = subprocess.run(sweep_command(project, space, trials), capture_output=True, text=True, cwd=REPO, timeout=1800)
    return {"last": last, "finished": finished, "killed_mid_trial": killed_mid_trial}


def kill(quick: bool = False) -> Section:
    import optuna
    from optuna.trial import TrialState

    from bench.hand_script import write_folder

    work = Path(tempfile.mkdtemp(prefix="bench-sweep-kill-"))
    moments, trials = (3, 3) if quick else (5, 4)
    try:
        write_folder(work / "images", classes=3, per_class=6, width=16, height=16)
        project = work / "kill.json"
        project.write_text(
            json.dumps(
                {
                    "name": "kill",
                    "data": {"path": "images", "image_size": 16, "val_fraction": 0.25, "mean": [0.5], "std": [0.5]},
                    "model": {"backbone": "resnet18", "freeze": "head_only"},
                    "loader": {"batch_size": 8},
                    "optimizer": {"name": "adam", "lr": 0.003},
                    "train": {"epochs": 2, "device": "cpu", "seed": 0},
                    "output": {"dir": "runs"},
                }
            )
        )
        space = work / "space.json"
        space.write_text(json.dumps({"optimizer.lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True}}))
        started = time.perf_counter()
        run = kill_and_continue(project, space, moments=moments, trials=trials, seed=18)
        seconds = time.perf_counter() - started
        if run["last"].returncode != 0:
            raise RuntimeError(f"the continued sweep failed: {run['last'].stderr.strip().splitlines()[-1]}")
        study = optuna.load_study(study_name="kill-sweep", storage=f"sqlite:///{work / 'runs' / 'sweeps.db'}")
        states = [t.state for t in study.trials]
        done = {t.number for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)}
        failed = sum(1 for s in states if s == TrialState.FAIL)
        lost = len(run["finished"] - done)
        left = sum(1 for s in states if s in (TrialState.RUNNING, TrialState.WAITING))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return Section(
        "sweep_kill",
        "Sweep killed and continued",
        [
            Figure(
                "sweep_kill_finished",
                "finished trials after the last continuation, minus N",
                abs(len(done) - trials),
                "",
                "<= 0",
                detail=f"{len(done)} of N = {trials}; {left} left running or waiting",
            ),
            Figure("sweep_kill_lost", "finished trials lost", lost, "", "<= 0"),
            Figure(
                "sweep_kill_interrupted",
                "interrupted trials marked failed and run again",
                failed,
                "",
                detail=f"{run['killed_mid_trial']} of {moments} kills landed inside a trial",
            ),
            Figure("sweep_kill_seconds", "wall time, all processes", seconds, "s"),
        ],
        setup=f"main.py sweep, resnet18 head at 16 px on 18 images, 2 epochs, {trials} trials; SIGKILL at {moments} "
        "seeded moments (the first inside a trial), then run to its end",
    )


# ---------------------------------------------------------------------------------------------
# The runs table


def runs_table(quick: bool = False) -> Section:
    """Reading 200 run folders (each with 100 epochs of metrics) into the runs table, as `main.py runs` and the
    app's runs list do: the median of 5 reads."""
    from engine.run_files import update_run_info
    from engine.run_table import DEFAULT_COLUMNS, format_table, list_runs

    count, epochs = (50, 20) if quick else (200, 100)
    work = Path(tempfile.mkdtemp(prefix="bench-runs-table-"))
    try:
        for i in range(count):
            folder = work / f"run-{i:03d}"
            (folder / "checkpoints").mkdir(parents=True)
            project = {
                "name": f"run-{i}",
                "model": {"backbone": "resnet18", "freeze": "head_only"},
                "optimizer": {"lr": 10 ** (-4 + 3 * i / count)},
                "train": {"epochs": epochs},
            }
            (folder / "project.json").write_text(json.dumps(project))
            rows = [
                {
                    "epoch": e,
                    "train_loss": 1 / e,
                    "val_loss": 1.1 / e,
                    "val_accuracy": 1 - 1 / (e + 1),
                    "lr": 1e-3,
                    "epoch_seconds": 2.0,
                    "samples_per_second": 500.0,
                }
                for e in range(1, epochs + 1)
            ]
            (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            update_run_info(folder, started="2026-01-01T00:00:00+0000", status="completed")
            (folder / "checkpoints" / "final.pt").write_bytes(b"")
        times = []
        for _ in range(5):
            started = time.perf_counter()
            records = list_runs(work)
            format_table(records, DEFAULT_COLUMNS)
            times.append(time.perf_counter() - started)
        if len(records) != count:
            raise RuntimeError(f"read {len(records)} of {count} run folders")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    times.sort()
    return Section(
        "runs_table",
        "Runs table",
        [
            Figure(
                "runs_table_read",
                f"read {count} run folders into the table",
                times[len(times) // 2] * 1000,
                "ms",
                "<= 1000",
                detail=f"{epochs} epochs of metrics each; median of 5",
            )
        ],
        setup="engine.run_table.list_runs + format_table (main.py runs), warm file cache",
    )
