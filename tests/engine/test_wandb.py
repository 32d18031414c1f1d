"""Weights & Biases logging offline: the run folder holds a W&B offline run with the project as its config and the
epochs' metrics as its summary; nothing is written to the network or to $HOME; a missing package is named."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import write_image_folder, write_project

from engine.config import ConfigError, load_project
from engine.run_files import read_metrics, read_run_info
from engine.runs import import_wandb
from engine.session import RunSession

wandb = pytest.importorskip("wandb")


@pytest.fixture()
def offline_env(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    return home


def test_an_offline_run_is_written_into_the_run_folder(tmp_path, offline_env):
    write_image_folder(tmp_path / "images", per_class=6)
    cfg = load_project(
        write_project(
            tmp_path / "project.json",
            "images",
            model={"freeze": "head_only"},
            train={"epochs": 2, "device": "cpu", "seed": 0},
            output={"dir": "runs", "wandb": {"mode": "offline", "project": "mwb-test"}},
        )
    )
    run_dir = tmp_path / "runs" / "logged"

    result = RunSession(cfg, out=run_dir).run()

    assert result.status == "completed", result.error
    run_id = read_run_info(run_dir)["wandb_id"]
    (offline,) = (run_dir / "wandb").glob(f"offline-run-*-{run_id}")
    records = list(wandb_records(offline / f"run-{run_id}.wandb"))
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = {_key(i): json.loads(i.value_json) for i in run.config.update}
    assert run.run_id == run_id and run.project == "mwb-test" and run.display_name == "logged"
    assert config["model"]["freeze"] == "head_only" and config["train"]["epochs"] == 2
    history = [
        {_key(i): json.loads(i.value_json) for i in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
    metrics = read_metrics(run_dir)
    assert [h["_step"] for h in history] == [m["epoch"] for m in metrics] == [1, 2]
    for logged, row in zip(history, metrics, strict=True):
        assert logged["val_loss"] == pytest.approx(row["val_loss"]) and logged["lr"] == row["lr"]
    summary = {
        _key(i): json.loads(i.value_json)
        for r in records
        if r.WhichOneof("record_type") == "summary"
        for i in r.summary.update
    }
    assert summary["status"] == "completed"
    assert any(r.WhichOneof("record_type") == "exit" and r.exit.exit_code == 0 for r in records)
    assert not any(offline_env.iterdir())  # nothing written into $HOME


def _key(item) -> str:
    return "/".join(item.nested_key) or item.key


def wandb_records(path: Path):
    """The records of a W&B transaction log (.wandb), which W&B offers no Python reader for: LevelDB's log format
    (32 KiB blocks; 7-byte record headers of CRC, length, type FULL/FIRST/MIDDLE/LAST) after a 7-byte ':W&B'
    header, each record one protobuf Record."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left  # a block's trailer
            continue
        length = int.from_bytes(data[pos + 4 : pos + 6], "little")
        kind = data[pos + 6]
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0:  # padding
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""


def test_a_missing_wandb_package_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what an interpreter without the package sees
    with pytest.raises(ConfigError, match=r"output.wandb.mode = 'offline' needs the wandb package: pip install"):
        import_wandb("offline")


def test_a_sweeps_trials_are_w_and_b_runs_in_one_group(tmp_path, offline_env):
    from engine.sweep import Sweep, SweepSpec, parse_space

    write_image_folder(tmp_path / "images", per_class=6)
    cfg = load_project(
        write_project(
            tmp_path / "project.json",
            "images",
            model={"freeze": "head_only"},
            train={"epochs": 1, "device": "cpu", "seed": 0},
            output={"dir": "runs", "wandb": {"mode": "offline"}},
        )
    )
    space = parse_space({"optimizer.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}})
    sweep = Sweep(SweepSpec(cfg, space, trials=2, sampler="random", pruner="none"), log=lambda m: None)

    outcomes = sweep.run()

    assert [o.state for o in outcomes] == ["complete", "complete"]
    for outcome in outcomes:
        run_id = read_run_info(outcome.run_dir)["wandb_id"]
        (log,) = Path(outcome.run_dir).glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb")
        (run,) = [r.run for r in wandb_records(log) if r.WhichOneof("record_type") == "run"]
        assert run.run_group == "tiny-sweep" and run.project == "tiny"
