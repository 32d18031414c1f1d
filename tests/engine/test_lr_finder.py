"""The learning-rate finder: its suggestion on a problem whose good range is known, a run after it equal bit for bit
to a run without it, the feature cache, and `main.py lr-find`."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
from conftest import cli, write_image_folder, write_project

from engine import feature_cache
from engine.config import load_project
from engine.lr_curve import LrFinderResult, lr_ramp, ramp, smooth, suggest
from engine.lr_finder import find_lr
from engine.trainer import Trainer, build_run


def test_the_suggestion_lies_on_the_descending_part_for_a_problem_with_a_known_good_range():
    """Least squares with unit-variance features: the loss's curvature is L = 2, so plain SGD converges for
    lr < 2 / L = 1 and fastest near 1 / L = 0.5; below about 1e-3 a hundred steps barely move the loss."""
    torch.manual_seed(0)
    dim = 20
    w_true = torch.randn(dim, 1)
    model = torch.nn.Linear(dim, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    generator = torch.Generator().manual_seed(1)

    def step(lr: float) -> float:
        x = torch.randn(32, dim, generator=generator)
        y = x @ w_true + 0.1 * torch.randn(32, 1, generator=generator)
        optimizer.param_groups[0]["lr"] = lr
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    lrs, losses, status = ramp(step, lr_ramp(1e-5, 100.0, 100))
    assert status == "diverged" and lrs[-1] < 100.0  # stopped early, once the loss blew up past 1 / (L / 2)
    smoothed = smooth(losses)
    index, reason = suggest(lrs, smoothed)
    assert index is not None, reason
    assert 1e-2 <= lrs[index] <= 1.0, lrs[index]  # inside the known good range
    lowest = int(np.argmin(smoothed))
    assert index < lowest and smoothed[index] < smoothed[0]  # on the way down, before the minimum
    assert all(smoothed[i] > smoothed[i + 1] for i in range(index - 3, index + 3))  # still falling there


def test_a_loss_that_never_falls_gives_no_suggestion_and_says_why():
    lrs = lr_ramp(1e-6, 1.0, 40)
    index, reason = suggest(lrs, smooth([1.0 + 0.01 * i for i in range(40)]))
    assert index is None and "did not fall" in reason


def test_a_loss_that_is_not_a_number_ends_the_ramp_and_is_written_as_null():
    lrs, losses, status = ramp(lambda lr: 1.0 if lr < 1e-2 else math.nan, lr_ramp(1e-4, 1.0, 21))
    assert status == "diverged" and lrs[-2] < 1e-2 <= lrs[-1] and len(lrs) == 11 and math.isnan(losses[-1])
    result = LrFinderResult(lrs, losses, [], None, None, "", status, 1e-4, 1.0, False, 0.0)
    assert json.loads(json.dumps(result.to_dict()))["losses"] == [1.0] * 10 + [None]


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    ("sections", "cached"),
    [
        ({"model": {"backbone": "timm/test_resnet", "freeze": "up_to", "freeze_up_to": "layer2"}}, True),
        ({"model": {"backbone": "timm/test_resnet"}, "data": {"augment": {"horizontal_flip": True}}}, False),
    ],
    ids=["feature-cache", "augmented"],
)
def test_a_run_after_the_finder_equals_a_run_without_it_bitwise(tmp_path, sections, cached):
    write_image_folder(tmp_path / "images", per_class=8)
    project = write_project(
        tmp_path / "p.json",
        "images",
        loader={"batch_size": 2},
        optimizer={"name": "adam", "lr": 0.003, "layer_lr_decay": 0.7},
        train={"epochs": 2, "device": "cpu", "seed": 5},
        output={"dir": "runs", "tensorboard": False},
        **sections,
    )
    cfg = load_project(project)
    feature_cache.clear()
    straight = Trainer(cfg)
    straight.run()

    feature_cache.clear()  # the finder computes the features itself, as it would before a first run
    parts = build_run(load_project(project))
    before = _weights(parts.model)
    generator_state = parts.train_loader.generator.get_state()
    rng = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    result = find_lr(load_project(project), parts=parts, num_batches=30)
    assert result.feature_cache is cached
    assert len(result.lrs) == len(result.losses) >= 5 and not any(math.isnan(x) for x in result.losses[:5])
    after = _weights(parts.model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # buffers (BatchNorm statistics) too
    assert torch.equal(parts.train_loader.generator.get_state(), generator_state)
    assert torch.equal(torch.get_rng_state(), rng[0]) and np.array_equal(np.random.get_state()[1], rng[1])
    assert random.getstate() == rng[2]
    assert all(p.grad is None for p in parts.model.parameters())

    after_finder = Trainer(load_project(project))
    after_finder.parts = parts  # the very run the finder ramped on
    after_finder.run()
    assert [m["train_loss"] for m in after_finder.state.history] == [m["train_loss"] for m in straight.state.history]
    assert [m["val_loss"] for m in after_finder.state.history] == [m["val_loss"] for m in straight.state.history]
    a, b = _weights(straight.parts.model), _weights(after_finder.parts.model)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cli_lr_find_writes_the_curve_and_the_plot(tmp_path, capsys):
    write_image_folder(tmp_path / "images", per_class=12)  # 27 training images: 14 batches of 2
    project = write_project(
        tmp_path / "p.json",
        "images",
        model={"backbone": "timm/test_resnet", "freeze": "head_only"},
        loader={"batch_size": 2},
    )
    out, plot = tmp_path / "lr.json", tmp_path / "lr.png"
    args = ["--json", str(out), "--plot", str(plot), "--batches", "12", "--start-lr", "1e-6", "--end-lr", "1e-2"]
    done = cli(capsys, "lr-find", str(project), *args)
    assert done.returncode == 0, done.stderr
    data = json.loads(out.read_text())
    assert data["feature_cache"] is True and data["status"] in ("completed", "diverged")
    ramped = lr_ramp(1e-6, 1e-2, 12)
    assert len(data["losses"]) == len(data["lrs"]) == (12 if data["status"] == "completed" else len(data["lrs"]))
    assert data["lrs"] == pytest.approx(ramped[: len(data["lrs"])], rel=1e-12)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert ("suggested lr" in done.stdout) == (data["suggestion"] is not None)
    bad = cli(capsys, "lr-find", str(project), "--start-lr", "1", "--end-lr", "0.1")
    assert bad.returncode == 2 and "end_lr = 0.1: must be above start_lr" in bad.stderr


def test_on_a_run_in_phases_the_finder_studies_the_first_phase(tmp_path):
    """The project augments and trains everything; its first phase trains the head alone without augmentation,
    so the finder ramps that phase's parameters on cached features."""
    write_image_folder(tmp_path / "images", per_class=8)
    project = write_project(
        tmp_path / "p.json",
        "images",
        model={"backbone": "timm/test_resnet"},
        data={"path": "images", "image_size": 16, "mean": [0.5], "std": [0.5], "augment": {"horizontal_flip": True}},
        loader={"batch_size": 2},
        train={
            "device": "cpu",
            "seed": 0,
            "phases": [{"epochs": 1, "freeze": "head_only", "augment": False}, {"epochs": 1, "lr_factor": 0.1}],
        },
    )
    feature_cache.clear()
    result = find_lr(load_project(project), num_batches=8)
    assert result.feature_cache is True
    whole = load_project(project)
    whole.train.phases = []
    feature_cache.clear()
    assert find_lr(whole, num_batches=8).feature_cache is False  # the project itself augments: no cache
