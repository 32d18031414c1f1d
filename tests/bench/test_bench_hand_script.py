"""The whole-pipeline benchmark: its script trains what main.py trains, and its quick run reports both ratios.

Nothing here measures speed.
"""

import json
import math

import pytest
import torch
import torchvision

from bench import hand_script
from engine.backbones import build_model
from engine.config import ModelConfig
from engine.freezing import apply_freeze


@pytest.mark.parametrize("up_to", ["layer2", "layer3"])
def test_the_script_freezes_the_parameters_the_workbench_freezes(up_to):
    theirs = torchvision.models.resnet18(num_classes=4)
    hand_script.freeze_up_to_child(theirs, up_to)
    cfg = ModelConfig(backbone="resnet18", freeze="up_to", freeze_up_to=up_to)
    built = build_model(cfg, 4)
    apply_freeze(built.model, cfg, built.head_name)
    ours = {name: p.requires_grad for name, p in built.model.named_parameters()}
    assert ours == {name: p.requires_grad for name, p in theirs.named_parameters()}
    assert not ours["layer1.0.conv1.weight"] and ours["fc.weight"]


def test_the_script_trains_the_layers_after_the_frozen_ones(tmp_path):
    data = hand_script.write_folder(tmp_path / "images", classes=2, per_class=4, width=20, height=16)
    out = tmp_path / "out"
    out.mkdir()
    loss = hand_script.hand_script(data, out, size=16, batch=4, epochs=1, freeze_up_to="layer3", workers=0)
    assert math.isfinite(loss) and loss > 0
    saved = torch.load(out / "model.pt", weights_only=True)
    torch.manual_seed(0)
    initial = torchvision.models.resnet18(num_classes=2).state_dict()  # the script's model before training
    assert saved.keys() == initial.keys()
    assert torch.equal(saved["layer3.1.conv2.weight"], initial["layer3.1.conv2.weight"])  # frozen
    assert not torch.equal(saved["layer4.1.conv2.weight"], initial["layer4.1.conv2.weight"])  # trained
    assert not torch.equal(saved["fc.weight"], initial["fc.weight"])


def test_a_missing_module_is_named():
    with pytest.raises(ValueError, match="no top-level module 'layer9'"):
        hand_script.freeze_up_to_child(torchvision.models.resnet18(), "layer9")


def test_quick_run_reports_both_ratios():
    section = hand_script.run(quick=True)
    assert section.name == "hand_script" and section.skipped is None
    assert [f.key for f in section.figures] == ["main_vs_script_caches_off", "main_vs_script_defaults"]
    for figure in section.figures:
        assert figure.unit == "x" and figure.value is not None and math.isfinite(figure.value) and figure.value > 0
        assert figure.target is not None and figure.ok is not None and "median" in figure.detail
    assert "PNGs" in section.setup and section.notes
    json.dumps(section.to_dict())
