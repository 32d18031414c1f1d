"""The training settings panel: every control follows the project, refuses invalid values at the field, round-trips."""

from __future__ import annotations

import pytest
from PySide6.QtCore import QPoint, QPointF, Qt
from PySide6.QtGui import QWheelEvent
from PySide6.QtWidgets import (
    QAbstractButton,
    QAbstractSpinBox,
    QApplication,
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QGroupBox,
    QLabel,
    QLineEdit,
    QSpinBox,
    QWidget,
)

from engine.config import DIST_BACKENDS, LOSSES, OPTIMIZERS, SAMPLERS, SCHEDULES, load_project
from tests.conftest import write_project
from widgets.state import ProjectState
from widgets.training_panel import OBJECT_NAMES, TrainingPanel, format_positions, parse_positions

# A project in which every field the panel shows differs from its default.
CUSTOM = dict(
    data={
        "image_size": 32,
        "keep_aspect": True,
        "mean": [0.4, 0.5, 0.6],
        "std": [0.2, 0.25, 0.3],
        "augment": {"horizontal_flip": True, "rotation": 15.0, "random_resized_crop": False, "color_jitter": 0.3},
    },
    loader={
        "batch_size": 4,
        "num_workers": 2,
        "persistent_workers": False,
        "pin_memory": False,
        "drop_last": True,
        "collate": "pad",
        "decoded_cache": "off",
        "decoded_cache_max_mb": 512,
        "sampler": {"name": "weighted_random", "weights": "balanced", "replacement": False, "num_samples": 20},
    },
    loss={"name": "cross_entropy", "label_smoothing": 0.1, "class_weights": [1.0, 2.0, 0.5]},
    optimizer={
        "name": "sgd",
        "lr": 0.02,
        "weight_decay": 0.0005,
        "momentum": 0.8,
        "nesterov": True,
        "eps": 1e-7,
        "alpha": 0.95,
        "betas": [0.8, 0.99],
        "backbone_lr_mult": 0.1,
    },
    schedule={
        "name": "onecycle",
        "max_lr": 0.05,
        "pct_start": 0.25,
        "step_size": 5,
        "gamma": 0.5,
        "eta_min": 1e-6,
        "patience": 3,
        "factor": 0.2,
    },
    train={
        "epochs": 7,
        "device": "cpu",
        "seed": 123,
        "deterministic": True,
        "precision": "bf16",
        "grad_clip_norm": 2.5,
        "feature_cache": "off",
        "feature_cache_max_mb": 512,
        "channels_last": True,
        "compile": True,
    },
    distributed={"processes": 3, "backend": "gloo", "sync_batchnorm": True, "timeout_s": 120},
    checkpoint={"every_epoch": False, "keep_last": 0, "monitor": "val_accuracy", "mode": "max"},
    early_stopping={
        "enabled": True,
        "monitor": "train_loss",
        "mode": "min",
        "patience": 4,
        "min_delta": 0.01,
        "restore_best": True,
    },
    output={"dir": "runs", "tensorboard": False},
)

# What each control shows for CUSTOM (combos: their item data; line edits: their text).
CUSTOM_SHOWN = {
    "image_size": 32,
    "keep_aspect": True,
    "collate": "pad",
    "mean": "0.4, 0.5, 0.6",
    "std": "0.2, 0.25, 0.3",
    "horizontal_flip": True,
    "rotation": 15.0,
    "random_resized_crop": False,
    "color_jitter": 0.3,
    "sampler": "weighted_random",
    "sampler_weights_mode": "balanced",
    "sampler_replacement": False,
    "sampler_num_samples": 20,
    "batch_size": 4,
    "num_workers": 2,
    "persistent_workers": False,
    "pin_memory": False,
    "decoded_cache": "off",
    "decoded_cache_max_mb": 512,
    "drop_last": True,
    "shuffle": None,
    "loss": "cross_entropy",
    "label_smoothing": 0.1,
    "class_weights_mode": "list",
    "class_weights": "1, 2, 0.5",
    "optimizer": "sgd",
    "lr": "0.02",
    "weight_decay": "0.0005",
    "momentum": 0.8,
    "nesterov": True,
    "eps": "1e-07",
    "alpha": 0.95,
    "betas": "0.8, 0.99",
    "backbone_lr_mult": "0.1",
    "schedule": "onecycle",
    "max_lr": "0.05",
    "pct_start": 0.25,
    "step_size": 5,
    "gamma": "0.5",
    "eta_min": "1e-06",
    "plateau_patience": 3,
    "plateau_factor": 0.2,
    "epochs": 7,
    "device": "cpu",
    "seed": "123",
    "deterministic": True,
    "precision": "bf16",
    "grad_clip_norm": "2.5",
    "feature_cache": "off",
    "feature_cache_max_mb": "512",
    "channels_last": True,
    "compile": True,
    "processes": 3,
    "dist_backend": "gloo",
    "sync_batchnorm": True,
    "dist_timeout": 120,
    "checkpoint_every_epoch": False,
    "checkpoint_keep_last": 0,
    "checkpoint_monitor": "val_accuracy",
    "checkpoint_mode": "max",
    "tensorboard": False,
    "early_stopping": True,
    "es_monitor": "train_loss",
    "es_mode": "min",
    "es_patience": 4,
    "es_min_delta": "0.01",
    "es_restore_best": True,
}


def shown(widget: QWidget):
    if isinstance(widget, QComboBox):
        return widget.currentData()
    if isinstance(widget, QCheckBox):
        return widget.isChecked()
    if isinstance(widget, (QSpinBox, QDoubleSpinBox)):
        return widget.value()
    if isinstance(widget, QLineEdit):
        return widget.text()
    raise TypeError(widget)


def control(panel: TrainingPanel, name: str) -> QWidget:
    widget = panel.findChild(QWidget, f"training.{name}")
    assert widget is not None, name
    return widget


def message(panel: TrainingPanel, name: str) -> QLabel:
    return panel.findChild(QLabel, f"training.{name}.message")


def choose(panel: TrainingPanel, name: str, value) -> None:
    combo = control(panel, name)
    index = combo.findData(value)
    assert index >= 0, (name, value)
    combo.setCurrentIndex(index)


def type_text(qtbot, panel: TrainingPanel, name: str, text: str) -> None:
    edit = control(panel, name)
    edit.setFocus()
    edit.selectAll()
    if text:
        qtbot.keyClicks(edit, text)
    else:
        qtbot.keyClick(edit, Qt.Key.Key_Backspace)
    qtbot.keyClick(edit, Qt.Key.Key_Return)


def visible(panel: TrainingPanel, name: str) -> bool:
    return control(panel, name).isVisibleTo(panel)


@pytest.fixture()
def panel(qtbot, project_state):
    widget = TrainingPanel(project_state)
    qtbot.addWidget(widget)
    widget.resize(1280, 800)
    widget.show()
    return widget


def test_every_interactive_control_has_a_listed_object_name(panel):
    kinds = (QAbstractButton, QLineEdit, QComboBox, QAbstractSpinBox)
    names = set()
    for widget in panel.findChildren(QWidget):
        if not isinstance(widget, kinds) or isinstance(widget.parent(), (QAbstractSpinBox, QComboBox)):
            continue  # a spin box's own line edit is part of the spin box
        if widget.objectName().startswith("qt_"):
            continue  # Qt's own parts (the phase table's corner button)
        assert widget.objectName() in OBJECT_NAMES, (type(widget).__name__, widget.objectName())
        names.add(widget.objectName())
    for name in names:
        assert panel.findChild(QWidget, name).toolTip(), name
    containers = {
        w.objectName()
        for w in panel.findChildren(QWidget)
        if w.objectName().startswith("training.") and not w.objectName().endswith(".message")
    }  # an error line belongs to its control
    assert names <= containers == set(OBJECT_NAMES)


def test_choosers_offer_every_engine_option_with_readable_labels(panel):
    for name, values in (("sampler", SAMPLERS), ("loss", LOSSES), ("optimizer", OPTIMIZERS), ("schedule", SCHEDULES)):
        combo = control(panel, name)
        assert [combo.itemData(i) for i in range(combo.count())] == list(values)
        assert all(combo.itemText(i) != combo.itemData(i) for i in range(combo.count()))


def test_controls_show_an_opened_project(panel, project_state, tmp_path):
    write_project(tmp_path / "custom.json", "images", **CUSTOM)
    project_state.open(tmp_path / "custom.json")
    for name, value in CUSTOM_SHOWN.items():
        got = shown(control(panel, name))
        assert got == pytest.approx(value) if isinstance(value, float) else got == value, name
    # The options of the chosen sampler, loss, optimizer and schedule are the ones on show.
    assert visible(panel, "sampler_weights_mode") and not visible(panel, "sampler_indices")
    assert visible(panel, "max_lr") and not visible(panel, "step_size")
    assert visible(panel, "nesterov") and not visible(panel, "betas")
    assert control(panel, "es_patience").isEnabled()
    assert not control(panel, "shuffle").isEnabled()  # a weighted sampler decides the order itself


def test_controls_show_each_samplers_own_options(panel, project_state, tmp_path):
    write_project(
        tmp_path / "subset.json",
        "images",
        loader={"sampler": {"name": "subset_random", "indices": [0, 1, 2, 3, 4, 9, 20]}},
    )
    project_state.open(tmp_path / "subset.json")
    assert shown(control(panel, "sampler_indices")) == "0-4, 9, 20"
    assert visible(panel, "sampler_indices") and not visible(panel, "sampler_replacement")

    write_project(
        tmp_path / "dist.json",
        "images",
        loader={"sampler": {"name": "distributed", "shuffle": False, "seed": 7, "num_replicas": 2, "rank": 1}},
    )
    project_state.open(tmp_path / "dist.json")
    assert [
        shown(control(panel, n)) for n in ("sampler_shuffle", "sampler_seed", "sampler_num_replicas", "sampler_rank")
    ] == [False, "7", 2, 1]
    assert visible(panel, "sampler_rank") and not visible(panel, "sampler_indices")

    write_project(
        tmp_path / "random.json",
        "images",
        loader={"shuffle": True, "sampler": {"name": "random", "replacement": True, "num_samples": 50}},
    )
    project_state.open(tmp_path / "random.json")
    assert [shown(control(panel, n)) for n in ("sampler_replacement", "sampler_num_samples", "shuffle")] == [
        True,
        50,
        True,
    ]
    assert control(panel, "shuffle").isEnabled()
    assert not visible(panel, "sampler_rank")


def test_weighted_random_reveals_its_options_and_hides_randoms(panel, project_state):
    assert visible(panel, "sampler_replacement") and visible(panel, "sampler_num_samples")
    assert not visible(panel, "sampler_weights_mode")
    choose(panel, "sampler", "weighted_random")
    assert project_state.get("loader.sampler.name") == "weighted_random"
    assert project_state.get("loader.sampler.weights") == "balanced"
    assert visible(panel, "sampler_weights_mode") and visible(panel, "sampler_weights")
    assert not control(panel, "sampler_weights").isEnabled()  # the list box is for "from list"
    assert not visible(panel, "sampler_indices") and not visible(panel, "sampler_rank")
    choose(panel, "sampler_weights_mode", "list")
    assert control(panel, "sampler_weights").isEnabled()
    assert "one weight per training sample" in message(panel, "sampler_weights_mode").text()


def test_typed_sampler_weights_are_used(qtbot, panel, project_state):
    choose(panel, "sampler", "weighted_random")
    choose(panel, "sampler_weights_mode", "list")
    assert project_state.get("loader.sampler.weights") == "balanced"  # nothing typed yet: refused, unchanged
    assert message(panel, "sampler_weights_mode").isVisibleTo(panel)
    type_text(qtbot, panel, "sampler_weights", "1, 2, 0.5")
    assert project_state.get("loader.sampler.weights") == [1.0, 2.0, 0.5]
    assert not message(panel, "sampler_weights_mode").isVisibleTo(panel)
    choose(panel, "sampler", "random")
    assert project_state.get("loader.sampler.weights") is None  # validate() refuses weights on 'random'
    assert not visible(panel, "sampler_weights")


def test_balanced_weights_without_classes_are_refused_and_a_list_still_works(qtbot, tmp_path):
    project = write_project(
        tmp_path / "reg.json", "values.csv", data={"kind": "csv", "task": "regression"}, loss={"name": "mse"}
    )
    state = ProjectState()
    state.open(project)
    panel = TrainingPanel(state)
    qtbot.addWidget(panel)
    panel.show()
    choose(panel, "sampler", "weighted_random")
    assert state.get("loader.sampler.name") == "random"
    assert "needs class labels" in message(panel, "sampler").text()
    assert visible(panel, "sampler_weights_mode")  # the way out is on show: type the weights
    choose(panel, "sampler_weights_mode", "list")
    type_text(qtbot, panel, "sampler_weights", "1 1 3")
    assert (state.get("loader.sampler.name"), state.get("loader.sampler.weights")) == (
        "weighted_random",
        [1.0, 1.0, 3.0],
    )
    assert not message(panel, "sampler").isVisibleTo(panel)


def test_choosing_batch_size_16_sets_the_loader(qtbot, panel, project_state):
    box = control(panel, "batch_size")
    box.setFocus()
    box.selectAll()
    qtbot.keyClicks(box, "16")
    qtbot.keyClick(box, Qt.Key.Key_Return)
    assert project_state.get("loader.batch_size") == 16
    assert project_state.dirty


@pytest.mark.parametrize("text", ["-1", "abc", "0"])
def test_an_invalid_learning_rate_is_refused_with_its_reason(qtbot, panel, project_state, text):
    before = project_state.config.to_dict()
    type_text(qtbot, panel, "lr", text)
    assert project_state.config.to_dict() == before
    label = message(panel, "lr")
    assert label.isVisibleTo(panel) and "optimizer.lr" in label.text()
    assert control(panel, "lr").property("invalid") is True
    assert control(panel, "lr").toolTip() == label.text()
    type_text(qtbot, panel, "lr", "3e-4")
    assert project_state.get("optimizer.lr") == pytest.approx(0.0003)
    assert not label.isVisibleTo(panel) and control(panel, "lr").property("invalid") is False


@pytest.mark.parametrize("text", ["0", "lots"])
def test_a_bad_feature_cache_limit_is_refused_and_empty_means_auto(qtbot, panel, project_state, text):
    type_text(qtbot, panel, "feature_cache_max_mb", "256")
    assert project_state.get("train.feature_cache_max_mb") == 256
    type_text(qtbot, panel, "feature_cache_max_mb", text)
    assert project_state.get("train.feature_cache_max_mb") == 256
    assert message(panel, "feature_cache_max_mb").isVisibleTo(panel)
    type_text(qtbot, panel, "feature_cache_max_mb", "")
    assert project_state.get("train.feature_cache_max_mb") is None
    assert not message(panel, "feature_cache_max_mb").isVisibleTo(panel)
    assert control(panel, "feature_cache").currentData() == "auto"


def test_schedule_options_follow_the_chosen_schedule(panel, project_state):
    expected = {
        "none": set(),
        "step": {"step_size", "gamma"},
        "cosine": {"eta_min"},
        "onecycle": {"max_lr", "pct_start"},
        "plateau": {"plateau_patience", "plateau_factor"},
    }
    every = set().union(*expected.values())
    for name, options in expected.items():
        choose(panel, "schedule", name)
        assert project_state.get("schedule.name") == name
        assert {o for o in every if visible(panel, o)} == options, name


def test_onecycle_peak_lr_defaults_to_the_optimizers(qtbot, panel, project_state):
    choose(panel, "schedule", "onecycle")
    assert visible(panel, "max_lr") and visible(panel, "pct_start")
    type_text(qtbot, panel, "max_lr", "0.01")
    assert project_state.get("schedule.max_lr") == pytest.approx(0.01)
    type_text(qtbot, panel, "max_lr", "")
    assert project_state.get("schedule.max_lr") is None


def test_loss_and_optimizer_options_follow_the_choice(qtbot, panel, project_state):
    assert visible(panel, "label_smoothing") and visible(panel, "class_weights_mode")
    assert not visible(panel, "loss_beta")
    control(panel, "label_smoothing").setValue(0.1)
    choose(panel, "loss", "smooth_l1")
    assert project_state.get("loss.name") == "smooth_l1"
    assert project_state.get("loss.label_smoothing") == 0.0  # cross-entropy only: reset with the switch
    assert visible(panel, "loss_beta") and not visible(panel, "label_smoothing")
    choose(panel, "loss", "nll")
    assert visible(panel, "class_weights_mode") and not visible(panel, "label_smoothing")
    choose(panel, "class_weights_mode", "balanced")
    assert project_state.get("loss.class_weights") == "balanced"

    choose(panel, "optimizer", "rmsprop")
    assert visible(panel, "alpha") and visible(panel, "momentum") and not visible(panel, "nesterov")
    assert control(panel, "momentum").specialValueText() == "default (0)"
    choose(panel, "optimizer", "sgd")
    assert visible(panel, "nesterov") and not visible(panel, "betas") and not visible(panel, "eps")
    control(panel, "momentum").setValue(0.0)
    control(panel, "nesterov").setChecked(True)
    assert project_state.get("optimizer.nesterov") is False
    assert "momentum > 0" in message(panel, "nesterov").text()
    control(panel, "momentum").setValue(control(panel, "momentum").minimum())
    assert project_state.get("optimizer.momentum") is None  # the lowest setting is the engine's default


def test_keep_aspect_brings_the_pad_collate(panel, project_state):
    control(panel, "keep_aspect").setChecked(True)
    assert project_state.get("data.keep_aspect") is True
    assert project_state.get("loader.collate") == "pad"
    assert shown(control(panel, "collate")) == "pad"
    choose(panel, "collate", "default")
    assert project_state.get("loader.collate") == "pad"
    assert "needs loader.collate = 'pad'" in message(panel, "collate").text()
    control(panel, "random_resized_crop").setChecked(True)
    assert project_state.get("data.augment.random_resized_crop") is False
    assert "turn one of them off" in message(panel, "random_resized_crop").text()


def test_mean_std_and_positions_are_typed_as_lists(qtbot, panel, project_state):
    type_text(qtbot, panel, "mean", "0.485, 0.456, 0.406")
    assert project_state.get("data.mean") == [0.485, 0.456, 0.406]
    type_text(qtbot, panel, "std", "0.2, x")
    assert "'x' is not a number" in message(panel, "std").text()
    assert project_state.get("data.std") == [0.5]
    type_text(qtbot, panel, "std", "0.2, 0.3")
    assert "give 1 or 3 values" in message(panel, "std").text()
    choose(panel, "sampler", "subset_random")
    type_text(qtbot, panel, "sampler_indices", "0-3, 10, 7 - 8")
    assert project_state.get("loader.sampler.indices") == [0, 1, 2, 3, 10, 7, 8]
    type_text(qtbot, panel, "sampler_indices", "5-2")
    assert "runs backwards" in message(panel, "sampler_indices").text()


def test_shuffle_goes_only_with_random_and_sequential(panel, project_state):
    choose(panel, "shuffle", False)
    assert project_state.get("loader.shuffle") is False
    choose(panel, "sampler", "subset_random")
    assert project_state.get("loader.sampler.name") == "subset_random"
    assert project_state.get("loader.shuffle") is None  # DataLoader refuses shuffle with a custom sampler
    assert not control(panel, "shuffle").isEnabled()
    choose(panel, "sampler", "sequential")
    assert control(panel, "shuffle").isEnabled()
    choose(panel, "shuffle", True)
    assert project_state.get("loader.shuffle") is None
    assert "contradicts" in message(panel, "shuffle").text()


def test_early_stopping_options_are_disabled_while_it_is_off(panel, project_state):
    options = ["es_monitor", "es_mode", "es_patience", "es_min_delta", "es_restore_best"]
    assert not any(control(panel, n).isEnabled() for n in options)
    control(panel, "early_stopping").setChecked(True)
    assert project_state.get("early_stopping.enabled") is True
    assert all(control(panel, n).isEnabled() for n in options)


def test_device_choices_say_what_this_machine_has(panel):
    import torch

    combo = control(panel, "device")
    labels = {combo.itemData(i): combo.itemText(i) for i in range(combo.count())}
    assert set(labels) == {"auto", "cpu", "cuda", "mps"}
    assert ("not available" in labels["cuda"]) != torch.cuda.is_available()
    if not torch.cuda.is_available():
        choose(panel, "device", "cuda")
        note = [w for w in panel.findChildren(QLabel) if "no CUDA device" in w.text()]
        assert note and note[0].isVisibleTo(panel)


def test_replacing_the_project_updates_every_control(panel, project_state, tmp_path):
    write_project(tmp_path / "custom.json", "images", **CUSTOM)
    other = load_project(tmp_path / "custom.json", check_paths=False)
    project_state.replace(other)
    for name, value in CUSTOM_SHOWN.items():
        got = shown(control(panel, name))
        assert got == pytest.approx(value) if isinstance(value, float) else got == value, name


def test_settings_made_in_the_panel_round_trip_through_the_project_file(qtbot, panel, project_state, tmp_path):
    choose(panel, "sampler", "weighted_random")
    choose(panel, "sampler_weights_mode", "list")
    type_text(qtbot, panel, "sampler_weights", ", ".join(["1"] * 27))
    choose(panel, "sampler_replacement", False)
    control(panel, "sampler_num_samples").setValue(20)
    control(panel, "image_size").setValue(48)
    control(panel, "keep_aspect").setChecked(True)
    type_text(qtbot, panel, "mean", "0.4, 0.5, 0.6")
    type_text(qtbot, panel, "std", "0.2, 0.3, 0.25")
    control(panel, "horizontal_flip").setChecked(True)
    control(panel, "rotation").setValue(12.5)
    control(panel, "color_jitter").setValue(0.25)
    control(panel, "batch_size").setValue(16)
    control(panel, "num_workers").setValue(1)
    choose(panel, "persistent_workers", False)
    choose(panel, "pin_memory", False)
    choose(panel, "decoded_cache", "on")
    control(panel, "decoded_cache_max_mb").setValue(2048)
    control(panel, "drop_last").setChecked(True)
    choose(panel, "loss", "nll")
    choose(panel, "class_weights_mode", "list")
    type_text(qtbot, panel, "class_weights", "1, 2, 3")
    choose(panel, "optimizer", "sgd")
    type_text(qtbot, panel, "lr", "3e-4")
    type_text(qtbot, panel, "weight_decay", "1e-4")
    control(panel, "momentum").setValue(0.85)
    control(panel, "nesterov").setChecked(True)
    type_text(qtbot, panel, "backbone_lr_mult", "0.1")
    choose(panel, "schedule", "step")
    control(panel, "step_size").setValue(3)
    type_text(qtbot, panel, "gamma", "0.5")
    control(panel, "epochs").setValue(5)
    choose(panel, "device", "cpu")
    choose(panel, "precision", "bf16")
    type_text(qtbot, panel, "seed", "42")
    control(panel, "deterministic").setChecked(True)
    type_text(qtbot, panel, "grad_clip_norm", "1.5")
    choose(panel, "feature_cache", "off")
    type_text(qtbot, panel, "feature_cache_max_mb", "300")
    choose(panel, "channels_last", False)
    control(panel, "compile").setChecked(True)
    control(panel, "processes").setValue(2)
    choose(panel, "dist_backend", "gloo")
    control(panel, "sync_batchnorm").setChecked(True)
    control(panel, "dist_timeout").setValue(90)
    control(panel, "early_stopping").setChecked(True)
    choose(panel, "es_monitor", "val_accuracy")
    choose(panel, "es_mode", "max")
    control(panel, "es_patience").setValue(3)
    type_text(qtbot, panel, "es_min_delta", "0.001")
    control(panel, "es_restore_best").setChecked(True)
    control(panel, "checkpoint_every_epoch").setChecked(False)
    control(panel, "checkpoint_keep_last").setValue(2)
    choose(panel, "checkpoint_monitor", "train_loss")
    choose(panel, "checkpoint_mode", "min")
    control(panel, "tensorboard").setChecked(False)
    refused = [
        label.objectName()
        for label in panel.findChildren(QLabel)
        if label.objectName().endswith(".message") and label.text()
    ]
    assert not refused

    cfg = project_state.config
    assert (
        cfg.loader.sampler.name,
        cfg.loader.sampler.weights[:2],
        cfg.loader.sampler.replacement,
        cfg.loader.sampler.num_samples,
    ) == ("weighted_random", [1.0, 1.0], False, 20)
    assert (cfg.data.image_size, cfg.data.keep_aspect, cfg.loader.collate, cfg.data.mean) == (
        48,
        True,
        "pad",
        [0.4, 0.5, 0.6],
    )
    assert (
        cfg.loader.num_workers,
        cfg.loader.persistent_workers,
        cfg.loader.decoded_cache,
        cfg.loader.decoded_cache_max_mb,
    ) == (1, False, "on", 2048)
    assert (cfg.loss.name, cfg.loss.class_weights) == ("nll", [1.0, 2.0, 3.0])
    assert (cfg.optimizer.name, cfg.optimizer.lr, cfg.optimizer.momentum, cfg.optimizer.nesterov) == (
        "sgd",
        pytest.approx(3e-4),
        pytest.approx(0.85),
        True,
    )
    assert (cfg.schedule.name, cfg.schedule.step_size, cfg.schedule.gamma) == ("step", 3, 0.5)
    assert (cfg.train.epochs, cfg.train.precision, cfg.train.seed, cfg.train.grad_clip_norm) == (5, "bf16", 42, 1.5)
    assert (cfg.train.feature_cache, cfg.train.feature_cache_max_mb) == ("off", 300)
    assert (cfg.train.channels_last, cfg.train.compile) == (False, True)
    assert (
        cfg.distributed.processes,
        cfg.distributed.backend,
        cfg.distributed.sync_batchnorm,
        cfg.distributed.timeout_s,
    ) == (2, "gloo", True, 90)
    assert (cfg.early_stopping.enabled, cfg.early_stopping.monitor, cfg.early_stopping.min_delta) == (
        True,
        "val_accuracy",
        0.001,
    )
    assert (cfg.checkpoint.keep_last, cfg.checkpoint.monitor, cfg.output.tensorboard) == (2, "train_loss", False)

    saved = project_state.save(tmp_path / "saved.json")
    assert not project_state.dirty
    reloaded = load_project(saved)  # with path checks: a project the engine accepts as it is
    assert reloaded.to_dict() == cfg.to_dict()

    # A fresh panel on the reloaded project shows exactly what this one shows.
    fresh_state = ProjectState()
    fresh_state.open(saved)
    fresh = TrainingPanel(fresh_state)
    qtbot.addWidget(fresh)
    for name in OBJECT_NAMES:
        if isinstance(
            control(panel, name.removeprefix("training.")), (QComboBox, QCheckBox, QAbstractSpinBox, QLineEdit)
        ):
            short = name.removeprefix("training.")
            assert shown(control(fresh, short)) == shown(control(panel, short)), short


def test_spin_boxes_and_combos_leave_the_wheel_to_the_scroll_area(qtbot, project_state):
    panel = TrainingPanel(project_state)
    qtbot.addWidget(panel)
    panel.resize(480, 300)
    panel.show()
    qtbot.waitExposed(panel)
    bar = panel._scroll.verticalScrollBar()
    assert bar.maximum() > 0

    def wheel(widget) -> bool:
        """A wheel turn over the widget, passed to its parents while ignored, as Qt does for real input."""
        centre = QPointF(widget.width() / 2, widget.height() / 2)
        target = widget
        while target is not None:
            pos = QPointF(widget.mapTo(target, centre.toPoint())) if target is not widget else centre
            event = QWheelEvent(
                pos,
                target.mapToGlobal(pos),
                QPoint(0, 0),
                QPoint(0, -120),
                Qt.MouseButton.NoButton,
                Qt.KeyboardModifier.NoModifier,
                Qt.ScrollPhase.NoScrollPhase,
                False,
            )
            QApplication.sendEvent(target, event)
            if event.isAccepted():
                return target is widget
            target = target.parentWidget()
        return False

    size, sampler = control(panel, "image_size"), control(panel, "sampler")
    assert size.focusPolicy() == Qt.FocusPolicy.StrongFocus
    panel.setFocus()
    assert not wheel(size) and not wheel(sampler)  # neither takes it while it has no focus
    assert size.value() == 16 and sampler.currentData() == "random"
    assert bar.value() > 0  # the panel scrolled instead

    size.setFocus()
    qtbot.waitUntil(size.hasFocus)
    assert wheel(size)
    assert size.value() < 16  # a focused spin box still answers the wheel
    assert project_state.get("data.image_size") == size.value()


def test_panel_fits_1280x800_in_two_columns_and_one_when_narrow(qtbot, panel):
    qtbot.waitExposed(panel)
    assert not panel._scroll.horizontalScrollBar().isVisible()
    input_group = panel.findChild(QWidget, "training.group.input")
    optimizer_group = panel.findChild(QWidget, "training.group.optimizer")
    assert optimizer_group.x() > input_group.x() + input_group.width() - 1
    for widget in panel.findChildren(QWidget):
        if widget.isVisibleTo(panel) and not (isinstance(widget, QLabel) and widget.wordWrap()):
            assert widget.width() >= widget.minimumSizeHint().width(), widget.objectName()
    panel.resize(520, 800)
    qtbot.waitUntil(lambda: optimizer_group.y() > input_group.y())
    assert not panel._scroll.horizontalScrollBar().isVisible()

    # After the groups moved between columns, rows that appear and notes that wrap still get their room.
    panel.resize(1280, 800)
    qtbot.waitUntil(lambda: optimizer_group.y() == input_group.y())
    choose(panel, "sampler", "distributed")
    choose(panel, "schedule", "onecycle")
    choose(panel, "device", "cuda")  # on a machine without CUDA a note appears under it
    groups = [w for w in panel.findChildren(QWidget) if w.objectName().startswith("training.group.")]

    def roomy():
        return all(g.height() >= g.heightForWidth(g.width()) for g in groups)

    qtbot.waitUntil(roomy)


def test_focus_field_scrolls_to_a_field(qtbot, panel):
    qtbot.waitExposed(panel)
    assert panel.focus_field("train.epochs")
    qtbot.waitUntil(control(panel, "epochs").hasFocus)
    assert not panel.focus_field("schedule.max_lr")  # hidden while the schedule is constant
    assert not panel.focus_field("model.backbone")  # not this panel's


def test_positions_text_round_trips():
    for values in ([0], [0, 1], [0, 1, 2], [5, 6, 7, 8, 1, 3, 3, 4], list(range(100)) + [200]):
        assert parse_positions(format_positions(values)) == values
    assert format_positions(list(range(100)) + [200]) == "0-99, 200"
    assert parse_positions("  ") is None
    with pytest.raises(ValueError, match="not a position"):
        parse_positions("-5")


def test_workers_and_cache_limit_have_an_auto_setting(panel, project_state):
    workers, limit = control(panel, "num_workers"), control(panel, "decoded_cache_max_mb")
    assert project_state.config.loader.num_workers is None and workers.value() == -1
    assert workers.text() == "auto" and limit.text().startswith("auto")
    workers.setValue(0)  # 0 is a setting of its own: load in the training process
    assert project_state.config.loader.num_workers == 0
    workers.setValue(-1)
    assert project_state.config.loader.num_workers is None
    choose(panel, "persistent_workers", True)  # with auto workers: accepted
    workers.setValue(0)
    assert "loader.persistent_workers" in message(panel, "num_workers").text()
    assert project_state.config.loader.num_workers is None  # refused, so the project keeps auto
    choose(panel, "persistent_workers", None)
    limit.setValue(1024)
    assert project_state.config.loader.decoded_cache_max_mb == 1024
    limit.setValue(0)
    assert project_state.config.loader.decoded_cache_max_mb is None


def test_processes_setting_reveals_its_options_and_says_the_global_batch(panel, project_state):
    processes = control(panel, "processes")
    assert processes.value() == 1 and processes.text() == "1 (in the app)"
    assert "torchrun" in processes.toolTip() and "per process" in processes.toolTip()
    for name in ("dist_backend", "sync_batchnorm", "dist_timeout"):
        assert not visible(panel, name), name
    processes.setValue(2)
    assert project_state.get("distributed.processes") == 2
    for name in ("dist_backend", "sync_batchnorm", "dist_timeout"):
        assert visible(panel, name), name
    note = panel.findChild(QGroupBox, "training.group.distributed").findChildren(QLabel)
    assert any("2 × 8 = 16 samples" in label.text() and label.isVisibleTo(panel) for label in note)
    control(panel, "batch_size").setValue(4)
    assert any("2 × 4 = 8 samples" in label.text() for label in note)
    assert [control(panel, "dist_backend").itemData(i) for i in range(control(panel, "dist_backend").count())] == list(
        DIST_BACKENDS
    )
    control(panel, "dist_timeout").setValue(5)  # below the engine's lowest: the spin box stops at 10
    assert project_state.get("distributed.timeout_s") == 10
    processes.setValue(1)
    assert not visible(panel, "dist_timeout")


def test_settings_the_weights_replace_show_the_value_in_effect_and_are_not_editable(panel, project_state):
    import engine.backbones  # noqa: F401 - the catalog is loaded in the app once PyTorch is; the panel asks it then

    size, mean, std = (control(panel, n) for n in ("image_size", "mean", "std"))
    assert size.isEnabled() and mean.isEnabled() and std.isEnabled()
    project_state.update({"model.backbone": "timm/efficientnet_lite0", "model.weights": "BUNDLED"})
    assert not size.isEnabled() and not mean.isEnabled() and not std.isEnabled()
    notes = {
        name: panel._remarks[path].text()
        for name, path in (("size", "data.image_size"), ("mean", "data.mean"), ("std", "data.std"))
    }
    assert "weights" in notes["size"] and notes["size"].endswith("224 px.")
    assert notes["mean"].endswith("0.5, 0.5, 0.5.") and notes["std"].endswith("0.5, 0.5, 0.5.")
    assert all(panel._remarks[p].isVisibleTo(panel) for p in ("data.image_size", "data.mean", "data.std"))
    # the controls show what the run will use; the project keeps its own values, untouched
    assert size.value() == 224 and mean.text() == "0.5, 0.5, 0.5" and std.text() == "0.5, 0.5, 0.5"
    assert project_state.get("data.mean") == [0.5] and project_state.get("data.image_size") == 16
    project_state.set("model.weights", None)
    assert size.isEnabled() and not panel._remarks["data.image_size"].isVisibleTo(panel)
    assert size.value() == 16 and mean.text() == "0.5"  # the project's values again, editable


def test_a_size_of_the_users_with_weights_is_offered_only_with_weights(qtbot, panel, project_state):
    import engine.backbones  # noqa: F401 - the panel reads the weights' preprocessing once the catalog is loaded

    size, own = control(panel, "image_size"), control(panel, "input_size")
    assert not own.isEnabled() and "Image size sets the size" in panel._remarks["data.input_size"].text()
    project_state.update({"model.backbone": "timm/efficientnet_lite0", "model.weights": "BUNDLED"})
    assert own.isEnabled() and own.text() == "the weights' own" and size.value() == 224
    own.setValue(own.minimum() + 7 * own.singleStep())  # seven steps up from "the weights' own"
    assert project_state.get("data.input_size") == 128
    assert size.value() == 128  # the size in effect, shown where the weights' size was
    own.setValue(own.minimum())
    assert project_state.get("data.input_size") is None and size.value() == 224
