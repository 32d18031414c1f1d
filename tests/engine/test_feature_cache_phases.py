"""A run in phases computes the next phase's cached features in the same pass as this phase's, only where they come out
exactly as the next phase's own setup would compute them."""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import write_image_folder, write_project
from test_feature_cache import Logs

from engine import feature_cache
from engine.config import load_project
from engine.trainer import Callback, Trainer, build_run

BATCH = 9  # 27 training and 9 validation images: every batch of a feature pass is full, and larger than a probe
HEAD_THEN_LAYER3 = [
    {"name": "head", "epochs": 1, "freeze": "head_only", "augment": False, "lr": 0.02},
    {"name": "top", "epochs": 2, "freeze": "up_to", "freeze_up_to": "layer3", "lr_factor": 0.5},
]


@pytest.fixture(autouse=True)
def _fresh_cache():
    feature_cache.clear()
    feature_cache.stats.reset()
    yield
    feature_cache.clear()


def phased(tmp_path, phases, **sections):
    if not (tmp_path / "images").exists():
        write_image_folder(tmp_path / "images")
    return load_project(
        write_project(
            tmp_path / "p.json",
            "images",
            model={"backbone": "timm/test_resnet"},
            loader={"batch_size": BATCH},
            train={"device": "cpu", "seed": 0, "phases": phases, **sections.pop("train", {})},
            output={"dir": "runs", "tensorboard": False},
            **sections,
        )
    )


class Passes(Callback):
    """Full batches through the network's first layer (the feature passes: probes are smaller, and cached epochs
    never reach it), the phase 2 features served, and (clear_before=N) the process cache emptied after epoch N."""

    def __init__(self, clear_before: int | None = None):
        self.full_batches = 0
        self.clear_before = clear_before
        self.features: dict[str, torch.Tensor] = {}
        self.describe = ""
        self.layer4_at_start = torch.empty(0)

    def on_run_started(self, trainer, state):
        self.layer4_at_start = trainer.built.model.layer4[0].conv1.weight.detach().clone()

    def count(self, _module, inputs):
        self.full_batches += inputs[0].shape[0] == BATCH

    def on_epoch_finished(self, trainer, state, metrics):
        if state.epoch == self.clear_before:
            feature_cache.clear()  # phase 2 finds nothing computed ahead: it computes its own, as before
        cache = trainer.feature_cache
        if metrics.get("phase") == 2 and cache is not None:
            self.features = {"train": cache.train.features, "val": cache.val.features}
            self.describe = cache.describe()


def train(cfg, passes: Passes | None = None):
    passes = passes or Passes()
    logs = Logs()
    trainer = Trainer(cfg, [logs, passes])
    trainer.parts = build_run(cfg)
    trainer.parts.model.conv1.register_forward_pre_hook(passes.count)
    state = trainer.run()
    assert state.status == "completed"
    return trainer, logs, passes


def test_the_next_phase_reuses_features_computed_in_this_phases_pass_and_trains_the_same(tmp_path):
    cfg = phased(tmp_path, HEAD_THEN_LAYER3)
    ahead, logs, passes = train(cfg.copy())
    # One pass over the 27 + 9 images for both phases: 4 full batches, 2 splits computed, 2 reused.
    assert passes.full_batches == 4
    assert (feature_cache.stats.computed, feature_cache.stats.ahead, feature_cache.stats.reused) == (2, 2, 2)
    assert any(
        line.startswith("Feature cache: phase 2/2 (top)'s features after layer3 were computed in the same pass (")
        for line in logs.lines
    )
    assert "computed in phase 1/2 (head)'s pass" in passes.describe
    assert ahead.feature_cache.boundary.output == "layer3"

    feature_cache.clear()  # the same run again, from the start
    feature_cache.stats.reset()
    fresh, _, fresh_passes = train(cfg.copy(), Passes(clear_before=1))
    assert fresh_passes.full_batches == 8  # phase 2 computed its own features: a second pass
    assert (feature_cache.stats.computed, feature_cache.stats.reused) == (4, 0)
    # The features phase 2 trained on are bitwise what its own setup computes (the same operations on the same
    # batches), and so is the training: the same losses epoch by epoch and the same final weights.
    for split in ("train", "val"):
        assert torch.equal(passes.features[split], fresh_passes.features[split]), split
    ha, hb = ahead.state.history, fresh.state.history
    assert [m["phase"] for m in ha] == [m["phase"] for m in hb] == [1, 2, 2]
    for ma, mb in zip(ha, hb, strict=True):
        for key in ("train_loss", "val_loss", "train_accuracy", "val_accuracy"):
            assert ma[key] == mb[key], key
    wa, wb = ahead.parts.model.state_dict(), fresh.parts.model.state_dict()
    assert all(torch.equal(wa[key], wb[key]) for key in wa)
    assert not torch.equal(wa["layer4.0.conv1.weight"], passes.layer4_at_start)  # phase 2 trained layer4


def model_state(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [p.requires_grad for p in model.parameters()],
        [m.training for m in model.modules()],
        torch.get_rng_state(),
    )


def test_planning_the_next_cut_leaves_the_model_and_the_random_state_as_they_were(tmp_path):
    cfg = phased(tmp_path, HEAD_THEN_LAYER3)
    trainer = Trainer(cfg)
    p = trainer.parts = build_run(cfg)
    inputs = p.train_loader.collate_fn([p.data.train[i] for i in range(4)])[0]
    boundary, _ = feature_cache.find_boundary(p.model, p.frozen_bn, inputs)
    p.model.eval()  # as a validation pass leaves it; the plan runs its forwards in training mode
    before = model_state(p.model)
    splits = {"train": p.data.train, "val": p.data.val}
    plan, why = feature_cache._plan_ahead(
        p,
        trainer._next_phase(),
        inputs,
        contextlib.nullcontext,
        boundary,
        {"train": "t", "val": "v"},
        ["train", "val"],
        splits,
        0,
        2**30,
    )
    assert why == "" and plan is not None and plan.boundary.output == "layer3" and set(plan.keys) == {"train", "val"}
    weights, flags, modes, rng = model_state(p.model)
    assert flags == before[1] and sum(flags) == 2  # phase 1's freeze: only fc.weight and fc.bias train
    assert modes == before[2] and rng.equal(before[3])
    assert all(torch.equal(weights[k], before[0][k]) for k in weights)


@pytest.mark.parametrize(
    "phases, augment, reason",
    [
        # Phase 1 trains layer2, which phase 2 freezes before its cut (layer3): its weights move in phase 1.
        (
            [
                {"epochs": 1, "freeze": "up_to", "freeze_up_to": "layer1"},
                {"epochs": 1, "freeze": "up_to", "freeze_up_to": "layer3"},
            ],
            {},
            "layer2.0.conv1.weight, before its cut (layer3), trains in this phase",
        ),
        # Phase 2 augments its images: it trains without the cache.
        (
            [
                {"epochs": 1, "freeze": "head_only", "augment": False},
                {"epochs": 1, "freeze": "up_to", "freeze_up_to": "layer3"},
            ],
            {"horizontal_flip": True},
            "train augmentation is on (data.augment.horizontal_flip)",
        ),
    ],
    ids=["trained-before-its-cut", "augmented"],
)
def test_no_features_are_computed_ahead_when_they_would_differ(tmp_path, phases, augment, reason):
    cfg = phased(tmp_path, phases, data={"augment": augment})
    _, logs, passes = train(cfg)
    said = f"Feature cache: phase 2/2's features are not computed in this pass: {reason}"
    assert any(line.startswith(said) for line in logs.lines)
    assert feature_cache.stats.ahead == 0 and feature_cache.stats.reused == 0
    # Phase 2 computes its own features as before, or trains on the augmented images without them.
    assert passes.full_batches == (8 if not augment else 4 + 3 + 1)
    assert feature_cache.stats.computed == (4 if not augment else 2)


def test_features_for_the_next_phase_are_not_computed_ahead_beyond_the_memory_bound(tmp_path):
    # At 80 px, 36 images: the features after layer3 (192 x 5 x 5) take 0.66 MiB, after layer2 (48 x 10 x 10) as
    # much; each fits the bound of 1 MiB, both together do not.
    phases = [
        {"epochs": 1, "freeze": "up_to", "freeze_up_to": "layer3", "augment": False},
        {"epochs": 1, "freeze": "up_to", "freeze_up_to": "layer2"},
    ]
    cfg = phased(tmp_path, phases, train={"feature_cache_max_mb": 1}, data={"image_size": 80})
    trainer, logs, passes = train(cfg)
    assert (
        "Feature cache: phase 2/2's features are not computed in this pass: with this phase's 0.7 MiB they would "
        "take 1.3 MiB, over the bound of 1.0 MiB (train.feature_cache_max_mb; empty means half the available memory)"
    ) in logs.lines
    assert feature_cache.stats.ahead == 0 and feature_cache.stats.computed == 4
    assert trainer.feature_cache is not None and trainer.feature_cache.boundary.output == "layer2"
    assert passes.full_batches == 8
