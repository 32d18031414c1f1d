"""The runs table read from real run folders: each status as the folder shows it (a live process's lock, final.pt,
run.json), results equal to the epochs the run reported, any project field as a column, and project diffs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
from conftest import ROOT, cli, write_image_folder, write_project

from engine.config import ConfigError, load_project
from engine.events import EpochFinished
from engine.run_files import read_run_info
from engine.run_table import find_runs, list_runs, project_diff, read_run
from engine.session import RunSession
from engine.trainer import Callback


class _StopAfterFirstEpoch(Callback):
    def on_epoch_finished(self, trainer, state, metrics):
        trainer.stop()


class _Breaks(Callback):
    def on_epoch_finished(self, trainer, state, metrics):
        raise RuntimeError("a bug in a callback")


@pytest.fixture(scope="module")
def three_runs(tmp_path_factory):
    """Real runs in one output folder: completed (lr 0.003), stopped after 1 of 2 epochs (lr 0.01), and failed
    in its first epoch's callbacks; each with the epochs it reported."""
    root = tmp_path_factory.mktemp("runs-table")
    write_image_folder(root / "images", per_class=6)
    reported: dict[str, list[dict]] = {}
    for name, lr, extra in (
        ("completed", 0.003, []),
        ("stopped", 0.01, [_StopAfterFirstEpoch()]),
        ("failed", 0.003, [_Breaks()]),
    ):
        cfg = load_project(
            write_project(
                root / f"{name}.json",
                "images",
                name=name,
                model={"freeze": "head_only"},
                optimizer={"name": "adam", "lr": lr},
                train={"epochs": 2 if name != "completed" else 1, "device": "cpu", "seed": 0},
            )
        )
        epochs: list[dict] = []
        result = RunSession(
            cfg,
            out=root / "runs" / name,
            callbacks=extra,
            outputs=[lambda e, acc=epochs: acc.append(e.metrics) if isinstance(e, EpochFinished) else None],
        ).run()
        assert result.status == name
        reported[name] = epochs
    return root / "runs", reported


def test_each_run_has_its_status_and_the_results_it_reported(three_runs):
    folder, reported = three_runs
    records = {r.name: r for r in list_runs(folder)}

    assert {n: r.status for n, r in records.items()} == {
        "completed": "completed",
        "stopped": "stopped",
        "failed": "failed",
    }
    assert records["failed"].error == "a bug in a callback"
    for name, epochs in reported.items():
        r = records[name]
        accs = [m["val_accuracy"] for m in epochs]
        losses = [m["val_loss"] for m in epochs]
        assert r.value("best_val_accuracy") == pytest.approx(max(accs))
        assert r.value("final_val_accuracy") == pytest.approx(accs[-1])
        assert r.value("best_val_loss") == pytest.approx(min(losses))
        assert r.value("wall_seconds") == pytest.approx(sum(m["epoch_seconds"] for m in epochs))
        assert r.value("samples_per_second") == pytest.approx(
            sum(m["samples_per_second"] * m["epoch_seconds"] for m in epochs) / sum(m["epoch_seconds"] for m in epochs)
        )
        assert r.value("model.backbone") == "resnet18" and r.value("model.freeze") == "head_only"
        assert r.started is not None
    assert records["stopped"].value("epochs") == "1/2" and records["completed"].value("epochs") == "1/1"
    assert records["stopped"].value("optimizer.lr") == 0.01
    # a field the run's project file does not carry reads as its declared default
    assert records["completed"].value("loss.label_smoothing") == 0.0


def test_a_run_a_live_process_holds_is_running_and_failed_once_that_process_is_killed(three_runs, tmp_path):
    folder = tmp_path / "live"
    folder.mkdir()
    (folder / "project.json").write_text(json.dumps({"name": "live", "train": {"epochs": 3}}))
    script = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from engine.run_lock import claim_folder
        from engine.run_files import update_run_info
        claim = claim_folder({str(folder)!r})
        update_run_info({str(folder)!r}, status="running", started="2026-01-02T03:04:05+0000")
        print("claimed", flush=True)
        time.sleep(600)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "claimed"
        live = read_run(folder)
        assert live.status == "running" and live.value("epochs") == "0/3"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    dead = read_run(folder)
    assert dead.status == "failed" and "killed" in dead.error
    assert dead.started == pytest.approx(1767323045.0)


def test_runs_command_prints_the_table_and_json_with_chosen_fields(three_runs, capsys):
    folder, reported = three_runs

    table = cli(capsys, "runs", str(folder), "--field", "optimizer.weight_decay")
    as_json = cli(capsys, "runs", str(folder), "--json", "--field", "optimizer.weight_decay")
    only = cli(capsys, "runs", str(folder), "--json", "--status", "stopped")

    assert table.returncode == 0
    head, *lines = table.stdout.splitlines()
    assert head.split()[:4] == ["run", "started", "status", "backbone"] and "optimizer.weight_decay" in head
    assert sorted(line.split()[0] for line in lines) == ["completed", "failed", "stopped"]
    rows = {row["name"]: row for row in json.loads(as_json.stdout)}
    assert rows["stopped"]["optimizer.lr"] == 0.01 and rows["stopped"]["optimizer.weight_decay"] == 0.0
    assert rows["completed"]["final_val_accuracy"] == pytest.approx(reported["completed"][-1]["val_accuracy"])
    assert [row["name"] for row in json.loads(only.stdout)] == ["stopped"]


def test_an_unknown_column_is_refused_by_name(three_runs, capsys):
    folder, _ = three_runs
    result = cli(capsys, "runs", str(folder), "--field", "optimizer.learning_rate")
    assert result.returncode == 2
    assert "'optimizer.learning_rate'" in result.stderr and "optimizer.lr" in result.stderr


def test_compare_lists_only_the_fields_that_differ(three_runs, capsys):
    folder, _ = three_runs
    records = [read_run(folder / n) for n in ("completed", "stopped")]

    diff = dict(project_diff(records))
    printed = cli(capsys, "compare", str(folder / "completed"), str(folder / "stopped"))

    assert diff == {"name": ["completed", "stopped"], "optimizer.lr": [0.003, 0.01], "train.epochs": [1, 2]}
    assert printed.returncode == 0
    assert [line.split()[0] for line in printed.stdout.splitlines()] == [
        "field",
        "name",
        "optimizer.lr",
        "train.epochs",
    ]
    with pytest.raises(ConfigError, match="runs folder .*missing' does not exist"):
        find_runs(folder / "missing")


def test_run_json_keeps_the_first_start_and_labels(three_runs):
    folder, _ = three_runs
    info = read_run_info(folder / "completed")
    assert info["status"] == "completed" and info["started"] <= info["ended"] and info["resumed"] is None


def test_metrics_with_a_line_cut_short_keep_every_whole_line(tmp_path):
    from engine.run_files import read_metrics

    rows = [{"epoch": e, "val_loss": 1.0 / e} for e in (1, 2, 3)]
    lines = [json.dumps(r) for r in rows]
    (tmp_path / "metrics.jsonl").write_text(lines[0] + "\n" + lines[1][:9] + "\n" + lines[2] + "\n\n" + lines[1][:5])

    assert read_metrics(tmp_path) == [rows[0], rows[2]]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert read_metrics(tmp_path) == rows


def test_metrics_read_in_pieces_are_the_same_rows(tmp_path):
    from engine.run_files import metrics_chunks, read_metrics

    rows = [{"epoch": e, "val_loss": 1.0 / e} for e in range(1, 8)]
    lines = [json.dumps(r) for r in rows]
    lines[4] = lines[4][:7]  # a line cut short in the second piece
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")

    pieces = list(metrics_chunks(tmp_path, 3))
    assert [len(p) for p in pieces] == [3, 2, 1]
    assert [r for p in pieces for r in p] == read_metrics(tmp_path) == rows[:4] + rows[5:]
    assert list(metrics_chunks(tmp_path / "missing", 3)) == []


def test_a_run_in_phases_counts_its_phases_epochs_and_its_rate_over_its_time(tmp_path):
    """The default project's shape: 8 cached head epochs at 20,000 samples/s, then 3 fine-tuning epochs at 75/s.
    The table said 11/10 epochs (train.epochs' default) and 11,860 samples/s (the mean of the epochs' rates)."""
    folder = tmp_path / "phased-20261207-053016"
    folder.mkdir()
    train = {"phases": [{"epochs": 8, "freeze": "head_only"}, {"epochs": 3, "lr_factor": 0.1}]}
    (folder / "project.json").write_text(json.dumps({"name": "phased", "train": train}))
    rows = [{"epoch": e, "phase": 1, "samples_per_second": 20000.0, "epoch_seconds": 0.072} for e in range(1, 9)]
    rows += [{"epoch": e, "phase": 2, "samples_per_second": 75.0, "epoch_seconds": 19.2} for e in (9, 10, 11)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    record = read_run(folder)
    assert record.value("epochs") == "11/11"
    samples = 8 * 20000.0 * 0.072 + 3 * 75.0 * 19.2
    assert record.value("samples_per_second") == pytest.approx(samples / (8 * 0.072 + 3 * 19.2))  # about 102/s
    train["phases"][1]["epochs"] = "three"  # unreadable: no plan is shown rather than a wrong one
    (folder / "project.json").write_text(json.dumps({"name": "phased", "train": train}))
    assert read_run(folder).value("epochs") == "11"
