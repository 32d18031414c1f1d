"""Freezing presets, frozen weights and BatchNorm statistics under training, parameter groups, the layer tree."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from engine.backbones import replace_head
from engine.config import ConfigError, ModelConfig
from engine.freezing import (
    apply_freeze,
    freeze_spec,
    frozen_batchnorm_modules,
    layer_tree,
    param_groups,
    set_frozen_batchnorm_eval,
)


def _resnet18(num_outputs: int = 5) -> tuple[nn.Module, str]:
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    return model, replace_head(model, num_outputs)


def _cfg(**kw) -> ModelConfig:
    return ModelConfig(backbone="resnet18", **kw)


def _frozen(model: nn.Module) -> set[str]:
    return set(freeze_spec(model)["frozen"])


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# Presets and prefixes


def test_head_only_trains_just_the_head():
    model, head = _resnet18()
    summary = apply_freeze(model, _cfg(freeze="head_only"), head)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"fc.weight", "fc.bias"}
    assert summary.trainable == 512 * 5 + 5
    assert summary.total == sum(p.numel() for p in model.parameters())
    assert summary.frozen == summary.total - summary.trainable


def test_up_to_freezes_everything_before_and_the_module_itself():
    model, head = _resnet18()
    apply_freeze(model, _cfg(freeze="up_to", freeze_up_to="layer2"), head)
    for name, p in model.named_parameters():
        before = name.split(".")[0] in ("conv1", "bn1", "layer1", "layer2")
        assert p.requires_grad is not before, name


def test_up_to_a_nested_or_parameterless_module():
    model, head = _resnet18()
    apply_freeze(model, _cfg(freeze="up_to", freeze_up_to="layer1.0"), head)
    assert not model.layer1[0].conv2.weight.requires_grad and not model.conv1.weight.requires_grad
    assert model.layer1[1].conv1.weight.requires_grad
    apply_freeze(model, _cfg(freeze="up_to", freeze_up_to="maxpool"), head)
    assert _frozen(model) == {"conv1.weight", "bn1.weight", "bn1.bias"}


def test_prefixes_then_unfreeze_prefixes():
    model, head = _resnet18()
    cfg = _cfg(freeze="head_only", unfreeze_prefixes=["layer4", "fc"])
    apply_freeze(model, cfg, head)
    assert model.layer4[1].bn2.weight.requires_grad and not model.layer3[0].conv1.weight.requires_grad
    cfg = _cfg(freeze_prefixes=["layer1", "layer3"], unfreeze_prefixes=["layer3.1"])
    apply_freeze(model, cfg, head)  # starts again from all trainable
    assert not model.layer1[0].conv1.weight.requires_grad and not model.layer3[0].conv1.weight.requires_grad
    assert model.layer3[1].conv1.weight.requires_grad and model.conv1.weight.requires_grad


def test_prefix_matches_whole_name_parts_only():
    model = nn.Sequential()
    for i in range(12):
        model.add_module(f"layer{i}", nn.Linear(2, 2))
    apply_freeze(model, _cfg(freeze_prefixes=["layer1"]), "layer11")
    assert _frozen(model) == {"layer1.weight", "layer1.bias"}  # not layer10, layer11


def test_a_prefix_may_name_one_parameter():
    model, head = _resnet18()
    apply_freeze(model, _cfg(freeze_prefixes=["fc.bias"]), head)
    assert _frozen(model) == {"fc.bias"}


@pytest.mark.parametrize(
    "cfg, field",
    [
        (_cfg(freeze="up_to", freeze_up_to="layer9"), "model.freeze_up_to = 'layer9': no such module in resnet18"),
        (_cfg(freeze_prefixes=["fc", "layr1"]), "model.freeze_prefixes[1] = 'layr1': matches no module"),
        (_cfg(unfreeze_prefixes=["laye"]), "model.unfreeze_prefixes[0] = 'laye'"),
    ],
)
def test_unknown_module_names_are_errors_naming_the_field(cfg, field):
    model, head = _resnet18()
    with pytest.raises(ConfigError) as err:
        apply_freeze(model, cfg, head)
    assert err.value.problems[0].message.startswith(field)
    assert err.value.problems[0].path == field.split(" = ")[0].split("[")[0]
    assert "conv1" in str(err.value)  # shows what the modules are called


# ---------------------------------------------------------------------------------------------
# Training with frozen parts


def _train_steps(model, optimizer, steps=3, bn_eval=()):
    torch.manual_seed(1)
    for _ in range(steps):
        model.train()
        set_frozen_batchnorm_eval(model, list(bn_eval))
        optimizer.zero_grad()
        loss = model(torch.randn(2, 3, 16, 16)).logsumexp(dim=1).mean()
        loss.backward()
        optimizer.step()


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda groups: torch.optim.SGD(groups, lr=0.1, momentum=0.9, weight_decay=1e-2),
        lambda groups: torch.optim.AdamW(groups, lr=0.01, weight_decay=0.1),
    ],
    ids=["sgd", "adamw"],
)
def test_frozen_weights_are_bitwise_unchanged_by_training(make_optimizer):
    model, head = _resnet18()
    apply_freeze(model, _cfg(freeze="up_to", freeze_up_to="layer3"), head)
    groups = param_groups(model, head, lr=0.01, backbone_lr_mult=0.1)
    assert [g["name"] for g in groups] == ["head", "backbone"]
    assert groups[1]["lr"] == pytest.approx(0.001)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train_steps(model, make_optimizer(groups), bn_eval=frozen_batchnorm_modules(model))
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, before[name]), f"{name} should have trained"
        else:
            assert torch.equal(p, before[name]), f"{name} is frozen but changed"


def test_param_groups_leave_out_frozen_parameters_and_a_zero_backbone_lr():
    model, head = _resnet18()
    apply_freeze(model, _cfg(freeze_prefixes=["layer1"]), head)
    groups = param_groups(model, head, lr=0.1, backbone_lr_mult=1.0)
    grouped = {id(p) for g in groups for p in g["params"]}
    assert grouped == {id(p) for p in model.parameters() if p.requires_grad}
    only_head = param_groups(model, head, lr=0.1, backbone_lr_mult=0.0)
    assert [g["name"] for g in only_head] == ["head"] and len(only_head[0]["params"]) == 2
    apply_freeze(model, _cfg(freeze="up_to", freeze_up_to="fc"), head)
    assert param_groups(model, head, lr=0.1, backbone_lr_mult=1.0) == []


def _training_forwards(model, steps=3, bn_eval=()):
    torch.manual_seed(1)
    with torch.no_grad():  # running statistics move in the forward pass; no optimizer needed
        for _ in range(steps):
            model.train()
            set_frozen_batchnorm_eval(model, list(bn_eval))
            model(torch.randn(2, 3, 16, 16))


def _bn_state(model):
    return {
        k: v.clone()
        for k, v in model.state_dict().items()
        if k.endswith(("running_mean", "running_var", "num_batches_tracked"))
    }


def test_frozen_batchnorm_statistics_stay_put_in_training():
    model, head = _resnet18()
    apply_freeze(model, _cfg(freeze="up_to", freeze_up_to="layer1"), head)
    names = frozen_batchnorm_modules(model)
    assert names == ["bn1", "layer1.0.bn1", "layer1.0.bn2", "layer1.1.bn1", "layer1.1.bn2"]
    before = _bn_state(model)
    _training_forwards(model, bn_eval=names)
    after = _bn_state(model)
    for key in before:
        if key.rpartition(".")[0] in names:
            assert torch.equal(after[key], before[key]), key
        else:
            assert not torch.equal(after[key], before[key]), key


def test_frozen_batchnorm_statistics_move_when_trained():
    # model.train_frozen_batchnorm = true: the caller does not apply set_frozen_batchnorm_eval.
    model, head = _resnet18()
    apply_freeze(model, _cfg(freeze="up_to", freeze_up_to="layer1"), head)
    before = _bn_state(model)
    _training_forwards(model, steps=1)
    after = _bn_state(model)
    assert not torch.equal(after["bn1.running_mean"], before["bn1.running_mean"])
    assert after["bn1.num_batches_tracked"] == before["bn1.num_batches_tracked"] + 1


def test_norm_without_affine_follows_its_parent():
    model = nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, affine=False)), nn.Linear(4, 2))
    apply_freeze(model, ModelConfig(freeze_prefixes=["0"]), "1")
    assert frozen_batchnorm_modules(model) == ["0.1"]
    apply_freeze(model, ModelConfig(), "1")
    assert frozen_batchnorm_modules(model) == []


def test_freeze_spec_is_a_plain_value():
    model, head = _resnet18()
    apply_freeze(model, _cfg(freeze="head_only"), head)
    spec = freeze_spec(model)
    assert isinstance(spec["frozen"], list) and all(isinstance(n, str) for n in spec["frozen"])
    assert "fc.weight" not in spec["frozen"] and "conv1.weight" in spec["frozen"]


# ---------------------------------------------------------------------------------------------
# The layer tree


def test_layer_tree_counts_and_shapes():
    model, head = _resnet18(5)
    apply_freeze(model, _cfg(freeze="up_to", freeze_up_to="layer3"), head)
    model.train()
    set_frozen_batchnorm_eval(model, ["bn1"])
    before = _bn_state(model)
    tree = {info.name: info for info in layer_tree(model, (3, 64, 64))}

    root = tree[""]
    assert root.depth == 0 and root.type == "ResNet"
    assert root.params == sum(p.numel() for p in model.parameters())
    assert root.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert tree["layer3"].trainable == 0 and tree["layer4"].trainable == tree["layer4"].params
    assert tree["layer1.0.conv1"].depth == 3 and tree["layer1.0.conv1"].type == "Conv2d"
    assert tree["layer4"].output_shape == (1, 512, 2, 2)
    assert tree["fc"].output_shape == (1, 5) and root.output_shape == (1, 5)
    assert tree["relu"].output_shape == (1, 64, 32, 32)  # the first of the calls

    # The dry run leaves no trace: modes restored (bn1 still eval), no stats moved, no hooks left.
    assert model.training and not model.bn1.training and model.layer1.training
    assert all(torch.equal(v, before[k]) for k, v in _bn_state(model).items())
    assert all(not m._forward_hooks for m in model.modules())


def test_layer_tree_survives_an_input_size_the_model_refuses():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    tree = layer_tree(model, (3, 5, 5))
    assert [i.output_shape for i in tree] == [None, None, None]
    assert tree[0].params == 12 * 2 + 2
