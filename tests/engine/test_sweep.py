"""Sweeps on Optuna with real processes: a sweep SIGKILLed at seeded moments and started again ends with exactly N
finished trials (none lost, none counted twice, the interrupted one failed and run again, every run folder
readable); two worker processes share one SQLite study; a space file's errors are refused by name before any
trial; and a study in a real PostgreSQL server when its binaries are on the machine."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest
from conftest import ROOT, cli, write_image_folder, write_project

from bench.sweep import kill_and_continue, sweep_command
from engine.checkpoints import load_checkpoint
from engine.config import ConfigError, load_project
from engine.run_files import read_metrics, read_run_info
from engine.run_table import list_runs, read_run
from engine.sweep import MAX_RETRIES, check_space, load_space, parse_space, unused_params

optuna = pytest.importorskip("optuna")
from optuna.storages import RetryHeartbeatStaleTrialCallback  # noqa: E402 - after the skip above
from optuna.trial import TrialState  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
SPACE = {"optimizer.lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True}}


@pytest.fixture(scope="module")
def sweep_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    write_image_folder(root / "images", per_class=6)
    return root


def _project(root: Path, name: str, epochs: int = 2) -> tuple[Path, Path]:
    project = write_project(
        root / f"{name}.json",
        "images",
        name=name,
        model={"freeze": "head_only"},
        train={"epochs": epochs, "device": "cpu", "seed": 0},
        output={"dir": f"runs-{name}"},
    )
    space = root / f"{name}-space.json"
    space.write_text(json.dumps(SPACE))
    return project, space


def _sweep(project: Path, space: Path, trials: int, *extra: str) -> list[str]:
    return sweep_command(project, space, trials, *extra)


def _study(root: Path, name: str):
    storage = f"sqlite:///{root / f'runs-{name}' / 'sweeps.db'}"
    return optuna.load_study(study_name=f"{name}-sweep", storage=storage)


def check_continued_study(root: Path, name: str, trials: int, run: dict) -> None:
    """Exactly N finished trials, none lost, the interrupted ones failed and run again, every folder readable."""
    last, finished, killed_mid_trial = run["last"], run["finished"], run["killed_mid_trial"]
    assert last.returncode == 0, last.stderr
    study = _study(root, name)
    states = [t.state for t in study.trials]
    done = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(done) == trials  # exactly N: none counted twice
    assert TrialState.RUNNING not in states and TrialState.WAITING not in states
    assert killed_mid_trial >= 1
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    assert failed and all(t.user_attrs.get("failure") == "killed" for t in failed)
    retried = {n for t in study.trials for n in RetryHeartbeatStaleTrialCallback.retry_history(t)}
    for t in failed:  # each interrupted trial was run again, unless its series used up its retries
        assert t.number in retried or len(RetryHeartbeatStaleTrialCallback.retry_history(t)) >= MAX_RETRIES
    assert finished <= {t.number for t in done}  # no finished trial was lost
    for t in done:
        record = read_run(t.user_attrs["run_dir"])
        info = read_run_info(record.path)
        assert info["sweep"]["trial"] == t.number and info["sweep"]["study"] == f"{name}-sweep"
        if t.state == TrialState.COMPLETE:
            assert record.status == "completed" and info["sweep"]["state"] == "complete"
            assert load_checkpoint(record.path / "checkpoints" / "final.pt")["epoch"] == 2
            assert t.value == pytest.approx(max(m["val_accuracy"] for m in read_metrics(record.path)))
        else:
            assert record.status == "stopped" and info["sweep"]["state"] == "pruned"
    for t in failed:
        if t.user_attrs.get("run_dir"):
            record = read_run(t.user_attrs["run_dir"])
            assert record.status == "failed" and read_run_info(record.path)["sweep"]["state"] == "failed"
    # every folder the killed processes left is readable as a run, and its last checkpoint loads
    for record in list_runs(root / f"runs-{name}"):
        last_pt = record.path / "checkpoints" / "last.pt"
        if last_pt.exists():
            assert load_checkpoint(last_pt)["epoch"] >= 1


def test_a_sweep_killed_at_seeded_moments_continues_to_exactly_n_trials(sweep_root):
    # Three moments here (each costs a process start); bench/sweep_kill.py runs five.
    project, space = _project(sweep_root, "killed")
    run = kill_and_continue(project, space, moments=3, trials=3, seed=18)
    check_continued_study(sweep_root, "killed", 3, run)


def test_two_workers_share_one_sqlite_study(sweep_root):
    trials = 4
    project, space = _project(sweep_root, "pair", epochs=1)

    result = subprocess.run(
        _sweep(project, space, trials, "--workers", "2", "--pruner", "none"),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )

    assert result.returncode == 0, result.stderr
    for word in ("locked", "OperationalError", "Traceback"):
        assert word not in result.stderr
    study = _study(sweep_root, "pair")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * trials
    assert sorted(t.number for t in study.trials) == list(range(trials))
    run_dirs = {t.user_attrs["run_dir"] for t in study.trials}
    assert len(run_dirs) == trials and all(Path(d).is_dir() for d in run_dirs)
    assert len({t.user_attrs["worker"]["pid"] for t in study.trials}) == 2  # both processes ran trials
    assert re.search(r"\[worker 1\] trial \d+ finished", result.stderr)


@pytest.mark.parametrize(
    ("space", "expected"),
    [
        (
            {"optimizer.learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2}},
            "optimizer.learning_rate: not a project field (did you mean optimizer.name, optimizer.lr",
        ),
        (
            {"optimizer.lr": {"type": "float", "low": -1e-3, "high": 1e-2}},
            "optimizer.lr: low = -0.001 outside the field's limits (> 0)",
        ),
        (
            {"loss.label_smoothing": {"type": "float", "low": 0, "high": 1.5}},
            "loss.label_smoothing: high = 1.5 outside",
        ),
        (
            {"model.freeze_up_to": {"type": "categorical", "choices": []}},
            "model.freeze_up_to: choices must be a non-empty list",
        ),
        (
            {"optimizer.name": {"type": "categorical", "choices": ["adam", "lion"]}},
            'optimizer.name: choice(s) "lion" not allowed',
        ),
        (
            {"loader.batch_size": {"type": "float", "low": 8, "high": 32}},
            'loader.batch_size: an integer field; use "type": "int"',
        ),
        (
            {"optimizer.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True, "step": 1e-4}},
            "log and step cannot",
        ),
        ({}, "is empty"),
    ],
)
def test_space_errors_are_refused_by_name(space, expected):
    with pytest.raises(ConfigError) as caught:
        parse_space(space)
    assert expected in str(caught.value)


def test_the_sweep_command_refuses_a_bad_space_before_any_trial(sweep_root, capsys):
    project, _ = _project(sweep_root, "refused")
    space = sweep_root / "bad-space.json"
    space.write_text(
        json.dumps(
            {
                "optimizer.lr": {"type": "float", "low": 0, "high": 0.1},
                "model.freeze_up_to": {"type": "categorical", "choices": []},
                "optimizer.momentun": {"type": "float", "low": 0, "high": 0.9},
            }
        )
    )

    result = cli(capsys, "sweep", str(project), "--space", str(space), "--trials", "2")

    assert result.returncode == 2
    for text in ("optimizer.lr: low = 0 outside", "model.freeze_up_to: choices", "optimizer.momentun: not a project"):
        assert text in result.stderr
    assert not (sweep_root / "runs-refused").exists()  # no study, no run folder


def test_a_choice_the_project_refuses_is_named(sweep_root):
    project, _ = _project(sweep_root, "rules")
    params = parse_space({"model.freeze": {"type": "categorical", "choices": ["head_only", "up_to"]}})
    with pytest.raises(ConfigError, match=r'model.freeze = "up_to": the project refuses it: .*freeze_up_to'):
        check_space(load_project(project), params)  # up_to without a block to freeze up to


def test_the_example_space_fits_the_example_project():
    params = load_space(ROOT / "examples" / "spaces" / "single_phase.json")
    check_space(load_project(ROOT / "examples" / "single_phase.json"), params)
    assert [p.path for p in params] == ["optimizer.lr", "model.freeze_up_to"]


def test_a_field_the_project_does_not_use_is_refused_by_name():
    """A sweep over a field the project ignores would train the same thing in every trial: refused before any
    trial, saying which rule or which phases make it unused."""
    single = load_project(ROOT / "examples" / "single_phase.json")
    head_only = single.copy()
    head_only.model.freeze, head_only.model.freeze_up_to = "head_only", None
    freeze_depth = parse_space({"model.freeze_up_to": {"type": "categorical", "choices": ["blocks.1", "blocks.3"]}})
    with pytest.raises(
        ConfigError, match=r"model.freeze_up_to: this project does not use it \(used only with model.freeze = 'up_to'\)"
    ):
        check_space(head_only, freeze_depth)
    # Searched together with the field its rule names, it is used in some trials.
    both = parse_space(
        {
            "model.freeze": {"type": "categorical", "choices": ["head_only", "up_to"]},
            "model.freeze_up_to": {"type": "categorical", "choices": ["blocks.1", "blocks.3"]},
        }
    )
    assert unused_params(head_only, both) == []

    # The default project trains in phases, each with its own epochs and schedule; the learning rate still counts
    # (phase 1 trains at it, phase 2 at a tenth), and so does the cosine schedule's floor, which phase 2's schedule
    # brings into use while the project's own schedule is none.
    phased = load_project(ROOT / "examples" / "default.json")
    space = parse_space(
        {
            "optimizer.lr": {"type": "float", "low": 1e-3, "high": 1e-1, "log": True},
            "train.epochs": {"type": "int", "low": 1, "high": 4},
            "schedule.name": {"type": "categorical", "choices": ["none", "cosine"]},
            "schedule.eta_min": {"type": "float", "low": 0.0, "high": 1e-4},
        }
    )
    assert phased.schedule.name == "none" and [p.schedule for p in phased.train.phases] == ["none", "cosine"]
    problems = unused_params(phased, space)
    assert [p.split(":")[0] for p in problems] == ["train.epochs", "schedule.name"]
    assert all("every phase of train.phases that uses it sets it" in p for p in problems)
    with pytest.raises(ConfigError, match="schedule.name: every phase"):
        check_space(phased, space)
    assert unused_params(phased, [space[0], space[3]]) == []
    # Its own freeze is head-only (the phases set theirs): a freeze depth is refused with that rule.
    with pytest.raises(ConfigError, match=r"model.freeze_up_to = \"blocks.1\": the project refuses it"):
        check_space(phased, freeze_depth)


def _postgres_binaries() -> tuple[str, str] | None:
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    return (initdb, pg_ctl) if initdb and pg_ctl else None


@pytest.mark.skipif(_postgres_binaries() is None, reason="no PostgreSQL server binaries (initdb, pg_ctl) here")
def test_a_study_in_a_real_postgresql_server(sweep_root):
    pytest.importorskip("psycopg", reason="the psycopg driver is not installed (pip install 'psycopg[binary]')")
    initdb, pg_ctl = _postgres_binaries()  # type: ignore[misc]
    as_user: list[str] = []
    base = Path(tempfile.mkdtemp(prefix="mwb-pg-"))
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root: the server runs as the postgres user
        runuser = shutil.which("runuser")
        try:
            import pwd

            pg = pwd.getpwnam("postgres")
        except KeyError:
            pg = None
        if runuser is None or pg is None:
            pytest.skip("running as root without a postgres user to start the server as")
        os.chown(base, pg.pw_uid, pg.pw_gid)
        as_user = [runuser, "-u", "postgres", "--"]
    data, sockets = base / "data", base
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run(
        [*as_user, initdb, "-D", str(data), "-A", "trust", "-U", "postgres"], check=True, capture_output=True
    )
    options = f"-k {sockets} -p {port} -c listen_addresses=''"
    # -l: the server's output goes to a file; were it a pipe of ours, run() would wait for the server to end
    subprocess.run(
        [*as_user, pg_ctl, "-D", str(data), "-o", options, "-l", str(base / "server.log"), "-w", "start"],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=120,
    )
    try:
        project, space = _project(sweep_root, "pg", epochs=1)
        url = f"postgresql+psycopg://postgres@/postgres?host={sockets}&port={port}"
        result = subprocess.run(
            _sweep(project, space, 2, "--storage", url, "--pruner", "none"),
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=600,
        )
        assert result.returncode == 0, result.stderr
        study = optuna.load_study(study_name="pg-sweep", storage=url)
        assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
        assert all(read_run(t.user_attrs["run_dir"]).status == "completed" for t in study.trials)
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True, timeout=120)
        shutil.rmtree(base, ignore_errors=True)
