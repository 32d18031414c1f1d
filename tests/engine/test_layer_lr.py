"""Layer-wise learning rates: the blocks found in each family's module tree, every trainable parameter in exactly one
optimizer group at the rate declared (optimizer.layer_lr_decay, optimizer.lr_mult, optimizer.backbone_lr_mult)."""

from __future__ import annotations

import pytest
import torch

from engine.backbones import build_model
from engine.config import ConfigError, ModelConfig
from engine.freezing import apply_freeze, block_units, lr_plan, param_groups

# The blocks as each family's authors structure the network (read off torchvision's and timm's model code).
FAMILIES = {
    "resnet18": [f"layer{i}" for i in range(1, 5)],
    "efficientnet_b0": [f"features.{i}" for i in range(1, 8)],
    "convnext_tiny": [f"features.{i}" for i in range(1, 8)],
    "vit_b_16": [f"encoder.layers.encoder_layer_{i}" for i in range(12)],
    "timm/test_efficientnet": [f"blocks.{i}" for i in range(5)],
    "timm/test_convnext": [f"stages.{i}" for i in range(4)],
    "timm/test_vit": [f"blocks.{i}" for i in range(6)],
}


def _matches(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _meta_model(backbone: str):
    """The untrained model on the meta device: its structure and parameter names without memory or downloads."""
    with torch.device("meta"):
        built = build_model(ModelConfig(backbone=backbone), 4, image_size=224 if "vit" in backbone else 64)
    return built.model, built.head_name


@pytest.mark.parametrize("backbone", list(FAMILIES))
def test_blocks_and_groups_follow_the_family_structure(backbone):
    model, head = _meta_model(backbone)
    units = block_units(model, head)
    assert units == FAMILIES[backbone]
    top, below_top = units[-1], units[-2]
    size = {n: sum(1 for _ in m.parameters()) for n, m in model.named_modules()}
    # A module inside the top block that holds only part of it.
    inside_top = next(n for n in size if n.startswith(top + ".") and 0 < size[n] < size[top])
    lr, decay, backbone_mult = 0.01, 0.7, 0.5
    lr_mult = {inside_top: 3.0, head: 2.0}
    # Freeze the stem and the bottom block: frozen parameters belong to no group.
    first_block_at = next(i for i, (n, _) in enumerate(model.named_parameters()) if _matches(n, units[0]))
    stem = [n for n, _ in list(model.named_parameters())[:first_block_at]]
    apply_freeze(model, ModelConfig(backbone=backbone, freeze_prefixes=[units[0], *stem]), head)
    groups = param_groups(model, head, lr, backbone_mult, layer_lr_decay=decay, lr_mult=lr_mult, backbone=backbone)

    # Every trainable parameter in exactly one group, no frozen one in any.
    grouped = [id(p) for g in groups for p in g["params"]]
    assert len(grouped) == len(set(grouped))
    assert set(grouped) == {id(p) for p in model.parameters() if p.requires_grad}
    assert groups[0]["name"] == "head:" + head  # the head first: its rate is the run's reported lr

    # Each parameter's rate as declared: head lr x its multiplier; block k of N from the bottom
    # lr x backbone_mult x decay^(N - k); after the last block the head's level; lr_mult on top.
    rate = {id(p): g["lr"] for g in groups for p in g["params"]}
    n = len(units)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if _matches(name, head):
            expected = lr * 2.0
        else:
            k = next((i for i, u in enumerate(units) if _matches(name, u)), None)
            expected = lr * backbone_mult * (decay ** (n - k) if k is not None else 1.0)
            if _matches(name, inside_top):
                expected *= 3.0
        assert rate[id(p)] == pytest.approx(expected, rel=1e-12), name
    names = {g["name"] for g in groups}
    assert {top, below_top, f"{top}:{inside_top}"} <= names and units[0] not in names and "stem" not in names


def test_the_stem_is_one_step_below_the_bottom_block_and_defaults_keep_the_two_plain_groups():
    model, head = _meta_model("resnet18")
    plan = {g.name: g for g in lr_plan(model, head, 1.0, 0.5)}
    assert plan["stem"].params == ("conv1.weight", "bn1.weight", "bn1.bias")
    assert plan["stem"].factor == pytest.approx(0.5**5) and plan["layer1"].factor == pytest.approx(0.5**4)
    assert [g.name for g in lr_plan(model, head)] == ["head", "backbone"]
    groups = param_groups(model, head, 0.1, 0.1)
    assert [(g["name"], g["lr"]) for g in groups] == [("head", 0.1), ("backbone", pytest.approx(0.01))]
    # backbone_lr_mult = 0 leaves every backbone group out, whatever the decay.
    assert [g["name"] for g in param_groups(model, head, 0.1, 0.0, layer_lr_decay=0.7)] == ["head"]


def test_an_lr_mult_name_that_matches_no_module_is_refused_by_name():
    model, head = _meta_model("resnet18")
    with pytest.raises(ConfigError, match=r"optimizer\.lr_mult\['layer5'\].*did you mean layer4"):
        lr_plan(model, head, lr_mult={"layer5": 0.3}, backbone="resnet18")


def test_resume_refuses_a_checkpoint_whose_groups_differ_and_names_them(cli_trained_run):
    from engine.checkpoints import CheckpointError, load_checkpoint
    from engine.config import from_dict
    from engine.trainer import Trainer

    ckpt = load_checkpoint(cli_trained_run.run / "checkpoints" / "last.pt")  # trained with the plain two groups
    data = ckpt["config"]
    data["optimizer"]["layer_lr_decay"] = 0.5
    with pytest.raises(CheckpointError, match=r"parameter groups head, backbone, the project builds head, stem"):
        Trainer(from_dict(data, base_dir=cli_trained_run.project.parent), resume=ckpt).run()
