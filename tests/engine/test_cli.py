"""`main.py train` and friends as a user runs them: exit codes, console output, the run folder they leave.

One real main.py process trains (the shared cli_trained_run) and `python -m engine` starts once; the other commands
run in this process through main.main(argv), where nothing about a fresh process is being tested.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import cli, write_project

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args, cwd=None, module=False):
    cmd = [sys.executable, "-m", "engine", *args] if module else [sys.executable, str(ROOT / "main.py"), *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, cwd=cwd or ROOT, capture_output=True, text=True, env=env, timeout=600)


def test_train_writes_a_complete_run_folder(cli_trained_run):
    result, out = cli_trained_run.result, cli_trained_run.run
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "epoch 1" in result.stderr and "val_acc" in result.stderr and "Done: 1 epoch(s)" in result.stderr
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1]
    for key in ("epoch", "train_loss", "val_loss", "val_accuracy", "lr", "epoch_seconds", "samples_per_second"):
        assert key in lines[0]
    project = json.loads((out / "project.json").read_text())
    assert project["train"]["epochs"] == 1 and Path(project["data"]["path"]).is_absolute()
    ckpt = torch.load(out / "checkpoints" / "final.pt", map_location="cpu", weights_only=True)
    for key in ("epoch", "model_state_dict", "optimizer_state_dict", "loss", "class_names", "config"):
        assert key in ckpt
    assert ckpt["epoch"] == 1 and ckpt["class_names"] == ["blue", "green", "red"]
    assert ckpt["metrics"]["train_loss"] == pytest.approx(lines[0]["train_loss"])
    from engine.backbones import build_model
    from engine.config import ModelConfig

    model = build_model(ModelConfig(backbone="timm/test_resnet"), 3).model
    model.load_state_dict(ckpt["model_state_dict"])  # plain PyTorch can use it


def test_default_run_folder_is_made_under_output_dir(tiny_project, capsys):
    result = cli(capsys, "train", str(tiny_project), "--epochs", "1")
    assert result.returncode == 0, result.stderr
    runs = list((tiny_project.parent / "runs").iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("tiny-")
    assert (runs[0] / "checkpoints" / "final.pt").is_file()


def test_an_existing_run_is_never_overwritten(cli_trained_run, tmp_path, capsys):
    out = cli_trained_run.run
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    result = cli(capsys, "train", str(cli_trained_run.project), "--epochs", "1", "--out", str(out))
    assert result.returncode == 2 and "already holds a run" in result.stderr
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before


@pytest.mark.parametrize(
    "change, message",
    [
        ({"loader": {"batch_size": 0}}, "loader.batch_size = 0"),
        ({"optimizer": {"lr": -1}}, "optimizer.lr = -1"),
        ({"model": {"backbone": "resnet1"}}, "model.backbone = 'resnet1'"),
        ({"data": {"path": "nowhere"}}, "data.path = 'nowhere'"),
    ],
)
def test_bad_input_exits_2_with_a_message_and_no_traceback(tmp_path, image_folder, capsys, change, message):
    project = write_project(tmp_path / "p.json", "images", **change)
    result = cli(capsys, "train", str(project))
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()


def test_bad_epochs_override_names_the_option(tiny_project, capsys):
    result = cli(capsys, "train", str(tiny_project), "--epochs", "0")
    assert result.returncode == 2 and "--epochs = 0" in result.stderr


def test_missing_and_malformed_project_files(tmp_path, capsys):
    result = cli(capsys, "train", str(tmp_path / "none.json"))
    assert result.returncode == 2 and "does not exist" in result.stderr
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    result = cli(capsys, "train", str(bad))
    assert result.returncode == 2 and "not valid JSON" in result.stderr


def test_a_dataset_with_one_class_is_bad_input(tmp_path, image_folder, capsys):
    import shutil

    shutil.rmtree(image_folder / "green")
    shutil.rmtree(image_folder / "blue")
    result = cli(capsys, "train", str(write_project(tmp_path / "p.json", "images")))
    assert result.returncode == 2 and "2 classes" in result.stderr and "Traceback" not in result.stderr
    assert not any((tmp_path / "runs").iterdir())  # no empty run folder left behind


def test_divergence_exits_1_with_the_epoch_and_batch(tmp_path, image_folder, capsys):
    project = write_project(tmp_path / "p.json", "images", optimizer={"name": "sgd", "lr": 1e30})
    result = cli(capsys, "train", str(project), "--out", str(tmp_path / "run"))
    assert result.returncode == 1
    assert "batch" in result.stderr and "Traceback" not in result.stderr


def test_check_and_layers_commands(tiny_project, capsys):
    result = cli(capsys, "check", str(tiny_project))
    assert result.returncode == 0, result.stderr
    assert "red" in result.stdout and "valid" in result.stdout
    result = cli(capsys, "layers", str(tiny_project), "--depth", "1")
    assert result.returncode == 0, result.stderr
    assert "layer4" in result.stdout and "fc" in result.stdout and "trainable" in result.stdout


def test_backbones_lists_the_catalog_offline(capsys):
    result = cli(capsys, "backbones", "resnet")
    assert result.returncode == 0, result.stderr
    assert "resnet18" in result.stdout and "IMAGENET1K_V1" in result.stdout


@pytest.mark.parametrize("module", [False, True])
def test_help_lists_the_commands(module):
    # Real processes: main.py and `python -m engine` as entry points. Without a command main.py opens the desktop
    # app (tests/app/test_launch.py covers its headless fallback).
    result = run_cli("--help", module=module)
    assert result.returncode == 0, result.stderr
    for command in ("train", "resume", "evaluate", "export", "check", "backbones", "layers", "audit"):
        assert command in result.stdout
