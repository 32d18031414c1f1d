"""Training in phases (train.phases): what each phase freezes and trains, its optimizer, images and feature cache."""

from __future__ import annotations

import pytest
import torch
from conftest import write_project

from engine.codegen import CodegenError, generate
from engine.config import ConfigError, from_dict, load_project, run_epochs, with_total_epochs
from engine.phases import plan_phases
from engine.trainer import Callback, Trainer

HEAD = ("fc.",)
# up_to layer3: conv1, bn1, layer1..layer3 stay frozen in phase 2; layer4 and the head train.
PHASE2_FROZEN = ("conv1.", "bn1.", "layer1.", "layer2.", "layer3.")

PHASES = [
    {"name": "head", "epochs": 2, "freeze": "head_only", "augment": False, "lr": 0.02},
    {"name": "top", "epochs": 2, "freeze": "up_to", "freeze_up_to": "layer3", "lr_factor": 0.5, "schedule": "cosine"},
]


def phased_project(tmp_path, image_folder, **sections):
    return load_project(
        write_project(
            tmp_path / "p.json",
            "images",
            data={"augment": {"horizontal_flip": True, "rotation": 5.0}},
            model={"backbone": "timm/test_resnet"},
            optimizer={"name": "sgd", "lr": 0.02},
            train={"epochs": 9, "device": "cpu", "seed": 3, "phases": PHASES},
            output={"dir": "runs", "tensorboard": False},
            **sections,
        )
    )


class Snapshots(Callback):
    """The weights and buffers, which parameters train, the feature cache and the image pipeline, per epoch."""

    def __init__(self):
        self.weights: dict[int, dict[str, torch.Tensor]] = {}
        self.trainable: dict[int, set[str]] = {}
        self.cached: dict[int, bool] = {}
        self.groups: dict[int, list[float]] = {}

    def on_run_started(self, trainer, state):
        self.weights[0] = {k: v.detach().clone() for k, v in trainer.built.model.state_dict().items()}

    def on_epoch_finished(self, trainer, state, metrics):
        model = trainer.built.model
        self.weights[state.epoch] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.trainable[state.epoch] = {n for n, p in model.named_parameters() if p.requires_grad}
        self.cached[state.epoch] = trainer.feature_cache is not None
        self.groups[state.epoch] = [
            g["initial_lr"] if "initial_lr" in g else g["lr"] for g in trainer.built.optimizer.param_groups
        ]


def _changed(before, after, prefixes):
    return {k for k in before if k.startswith(prefixes) and not torch.equal(before[k], after[k])}


def test_each_phase_trains_only_its_parameters_and_leaves_the_frozen_ones_bitwise_alone(tmp_path, image_folder):
    cfg = phased_project(tmp_path, image_folder)
    snaps = Snapshots()
    trainer = Trainer(cfg, [snaps])
    state = trainer.run()
    assert state.status == "completed" and state.epoch == 4 == run_epochs(cfg)  # the phases' sum, not train.epochs
    assert [m["phase"] for m in state.history] == [1, 1, 2, 2]
    w = snaps.weights
    names = set(w[0])

    # Phase 1 (epochs 1-2): only the head trains, on cached features (nothing augmented); every other weight and
    # buffer (BatchNorm statistics included) is bitwise what it was.
    for epoch in (1, 2):
        assert snaps.trainable[epoch] == {"fc.weight", "fc.bias"}
        assert snaps.cached[epoch]
        assert _changed(w[0], w[epoch], tuple(n for n in names if not n.startswith(HEAD))) == set()
        assert _changed(w[epoch - 1], w[epoch], HEAD) == {"fc.weight", "fc.bias"}

    # Phase 2 (epochs 3-4): layer4 and the head train on augmented images (so without the feature cache); the stem
    # and layer1-3 stay bitwise as they were at the start of the run.
    for epoch in (3, 4):
        assert snaps.trainable[epoch] == {
            n for n, _ in trainer.built.model.named_parameters() if n.startswith(("layer4.", "fc."))
        }
        assert not snaps.cached[epoch]
        assert _changed(w[0], w[epoch], PHASE2_FROZEN) == set()
        assert _changed(w[epoch - 1], w[epoch], ("layer4.",))  # layer4 moves now
    # A new optimizer per phase, at the phase's rate: 0.02, then half the previous phase's.
    assert snaps.groups[2] == [0.02] and snaps.groups[4][0] == pytest.approx(0.01)
    assert state.history[2]["lr"] == pytest.approx(0.01)  # cosine restarts from the phase's own rate


def test_old_projects_are_one_phase_and_phase_settings_are_checked(tmp_path, image_folder):
    plain = load_project(write_project(tmp_path / "plain.json", "images", train={"epochs": 3}))
    assert plain.train.phases == [] and run_epochs(plain) == 3
    [only] = plan_phases(plain)
    assert only.cfg is plain and only.epochs == 3  # trained as the project itself, exactly as before
    data = plain.to_dict()
    data["train"]["phases"] = [
        {"epochs": 2, "lr": 0.1, "lr_factor": 0.5},
        {"epochs": 0, "freeze_up_to": "layer3"},
        {"epochs": 1, "augment": True},
    ]
    with pytest.raises(ConfigError) as err:
        from_dict(data, base_dir=tmp_path)
    text = str(err.value)
    assert "train.phases[0] gives both lr = 0.1 and lr_factor = 0.5" in text
    assert "train.phases[1].epochs = 0: must be >= 1" in text
    assert "train.phases[1].freeze_up_to = 'layer3' is only used with freeze = 'up_to', not 'none'" in text
    assert "train.phases[2].augment = true, but data.augment turns no augmentation on" in text
    # --epochs on a run in phases lengthens its last phase.
    longer = with_total_epochs({"train": {"phases": [{"epochs": 2}, {"epochs": 3}]}}, 8)
    assert [p["epochs"] for p in longer["train"]["phases"]] == [2, 6]


def test_a_phase_that_freezes_everything_or_names_no_module_says_which_phase(tmp_path, image_folder):
    cfg = phased_project(tmp_path, image_folder)
    cfg.train.phases[1].freeze_up_to = "layer9"
    with pytest.raises(ConfigError, match=r"phase 2/2 \(top\) \(train\.phases\[1\]\): model\.freeze_up_to = 'layer9'"):
        Trainer(cfg).run()


def test_per_phase_early_stopping_ends_the_phase_and_the_next_begins(tmp_path, image_folder):
    cfg = phased_project(tmp_path, image_folder)
    cfg.train.phases[0].epochs = 6
    cfg.train.phases[0].lr = 1e-9  # nothing improves: patience 1 ends phase 1 after its second epoch
    cfg.early_stopping.enabled, cfg.early_stopping.patience, cfg.early_stopping.per_phase = True, 1, True
    cfg.early_stopping.min_delta = 1.0
    state = Trainer(cfg).run()
    assert state.status == "completed"
    assert [m["phase"] for m in state.history] == [1, 1, 2, 2]
    assert state.phase_starts == [0, 2] and state.epochs == 4


def test_codegen_refuses_a_run_in_phases_by_name(tmp_path, image_folder):
    cfg = phased_project(tmp_path, image_folder)
    with pytest.raises(CodegenError, match="train.phases"):
        generate(cfg, format_code=False)


def test_the_default_project_is_the_preset_of_its_single_phase_self():
    """examples/default.json (what `make run` trains) has the Fine-tune preset's phases for
    examples/single_phase.json, the project it replaced (its other differences: lr, schedule and freeze the
    recipe's own, channels-last on): the top two of EfficientNet-Lite0's seven blocks unfrozen in
    phase 2, both phases unaugmented so that phase 2 trains on features kept from phase 1's pass."""
    from pathlib import Path

    from engine.phases import fine_tune_preset

    examples = Path(__file__).resolve().parents[2] / "examples"
    default, single = load_project(examples / "default.json"), load_project(examples / "single_phase.json")
    assert fine_tune_preset(single) == {"train.phases": default.train.phases}
    assert default.train.channels_last is True and single.train.phases == []
    assert default.data == single.data and default.loss == single.loss and default.loader == single.loader
    head, tune = plan_phases(default)
    assert (head.cfg.model.freeze, head.augmented, tune.cfg.model.freeze_up_to, tune.augmented) == (
        "head_only",
        False,
        "blocks.4",
        False,
    )
    assert tune.lr == pytest.approx(default.optimizer.lr * 0.1) and tune.cfg.schedule.name == "cosine"
    assert (head.epochs, tune.epochs) == (8, 3)
