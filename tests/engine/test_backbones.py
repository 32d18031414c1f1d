"""Backbone catalog, head replacement, weights cache status and weight files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from engine.backbones import (
    BuiltModel,
    WeightsError,
    build_model,
    load_state_dict_file,
    load_weights_file,
    preprocess_for,
    replace_head,
    weights_status,
)
from engine.catalog import backbone_problems, is_known, list_backbones, weight_names
from engine.config import DataConfig, ModelConfig

REPO = Path(__file__).resolve().parents[2]


class NotATensor:
    """A custom class: a pickle holding it must be refused, not executed."""


@pytest.fixture
def empty_torch_home(tmp_path, monkeypatch):
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    # The hub folder follows TORCH_HOME unless someone called torch.hub.set_dir.
    assert Path(torch.hub.get_dir()) == home / "hub"
    return home


def _resnet18(num_outputs: int) -> torch.nn.Module:
    return build_model(ModelConfig(backbone="resnet18"), num_outputs).model


# ---------------------------------------------------------------------------------------------
# Catalog and config validation


def test_catalog_lists_classification_models_only():
    names = list_backbones()
    assert names == sorted(names)
    assert {"resnet18", "vit_b_16", "squeezenet1_1", "googlenet"} <= set(names)
    assert "fasterrcnn_resnet50_fpn" not in names  # detection models have no classifier head to swap
    assert weight_names("resnet18") == ["DEFAULT", "IMAGENET1K_V1"]


def test_unknown_backbone_is_reported_with_close_matches():
    (problem,) = backbone_problems("resnet1", None)
    assert problem.startswith("model.backbone = 'resnet1': unknown")
    assert "resnet18" in problem and str(len(list_backbones())) in problem


def test_unknown_weights_are_reported_with_the_allowed_names():
    (problem,) = backbone_problems("resnet18", "X")
    assert "model.weights = 'X': not a weight of resnet18" in problem
    assert "DEFAULT, IMAGENET1K_V1" in problem
    assert backbone_problems("resnet18", "DEFAULT") == []
    assert backbone_problems("resnet18", None) == []


def test_known_names_are_the_catalog_and_a_torchvision_one_is_checked_without_timm():
    names = set(list_backbones())
    assert all(is_known(n) for n in names)
    for name in ("resnet1", "timm/resnet1", "timm/", "", "fasterrcnn_resnet50_fpn", "timm/resnet50.a1_in1k"):
        assert not is_known(name) and name not in names
    # A fresh interpreter, as `main.py train` starts: a torchvision project is validated and its model built
    # without importing timm (its hundreds of model modules cost a start seconds); then a timm one imports it.
    code = (
        "import sys; from engine.config import from_dict; from engine.backbones import build_model\n"
        "for name in ('resnet18', 'timm/resnet18'):\n"
        "    cfg = from_dict({'model': {'backbone': name}}, check_paths=False)\n"
        "    build_model(cfg.model, 3); print('timm' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True"]


def test_config_validation_uses_the_catalog():
    from engine.config import ConfigError, from_dict

    with pytest.raises(ConfigError, match="model.backbone = 'resnet1'"):
        from_dict({"model": {"backbone": "resnet1"}}, check_paths=False)


# ---------------------------------------------------------------------------------------------
# Preprocessing


def test_preprocess_follows_the_weights_recipe():
    pre = preprocess_for(ModelConfig(backbone="efficientnet_b0", weights="DEFAULT"), DataConfig(image_size=64))
    assert (pre.resize_size, pre.crop_size, pre.interpolation) == (256, 224, "bicubic")
    assert pre.mean == pytest.approx((0.485, 0.456, 0.406))
    kept = preprocess_for(ModelConfig(backbone="efficientnet_b0", weights="DEFAULT"), DataConfig(keep_aspect=True))
    assert kept.resize_size == kept.crop_size == 224


def test_a_size_of_the_users_replaces_the_weights_size_and_keeps_their_resize_ratio():
    weights = ModelConfig(backbone="efficientnet_b0", weights="DEFAULT")  # resize 256, crop 224
    pre = preprocess_for(weights, DataConfig(input_size=112))
    assert (pre.resize_size, pre.crop_size, pre.interpolation) == (128, 112, "bicubic")
    assert pre.mean == pytest.approx((0.485, 0.456, 0.406))  # the weights' normalisation stays
    kept = preprocess_for(weights, DataConfig(input_size=112, keep_aspect=True))
    assert kept.resize_size == kept.crop_size == 112
    # Without weights the project's image_size decides; input_size is not used.
    plain = preprocess_for(ModelConfig(backbone="resnet18"), DataConfig(image_size=64, input_size=112))
    assert (plain.resize_size, plain.crop_size) == (64, 64)


def test_preprocess_without_weights_uses_the_project_settings():
    pre = preprocess_for(ModelConfig(backbone="resnet18"), DataConfig(image_size=64, mean=[0.5], std=[0.25]))
    assert (pre.resize_size, pre.crop_size, pre.interpolation) == (64, 64, "bilinear")
    assert pre.mean == (0.5, 0.5, 0.5) and pre.std == (0.25, 0.25, 0.25)


# ---------------------------------------------------------------------------------------------
# Head replacement


@pytest.mark.parametrize(
    "backbone, head",
    [
        ("resnet18", "fc"),
        ("mobilenet_v3_small", "classifier.3"),
        ("efficientnet_b0", "classifier.1"),
        ("convnext_tiny", "classifier.2"),
        ("densenet121", "classifier"),
        ("regnet_y_400mf", "fc"),
        ("squeezenet1_1", "classifier.1"),  # the only family without a Linear head: a 1x1 Conv2d
        ("googlenet", "fc"),
    ],
)
def test_new_head_gives_one_output_per_class(backbone, head):
    built = build_model(ModelConfig(backbone=backbone), 7)
    assert isinstance(built, BuiltModel)
    assert built.head_name == head and built.weights_desc == "random init" and built.report is None
    # Training mode: googlenet would return a tuple with its aux heads' outputs if they were kept.
    with torch.no_grad():
        out = built.model.train()(torch.randn(2, 3, 64, 64))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 7)


@pytest.fixture(scope="module")
def vit():
    return build_model(ModelConfig(backbone="vit_b_16"), 4)


def test_vit_head_is_replaced(vit):
    assert vit.head_name == "heads.head"
    with torch.no_grad():
        out = vit.model.eval()(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 4)


def test_replace_head_keeps_in_features_and_bias():
    model = torchvision.models.get_model("resnet18")
    name = replace_head(model, 3)
    assert name == "fc"
    assert model.fc.in_features == 512 and model.fc.out_features == 3 and model.fc.bias is not None


# ---------------------------------------------------------------------------------------------
# Catalog weights: the cache, never a download in tests


def test_weights_status_reads_the_hub_cache(empty_torch_home):
    assert weights_status("resnet18", None) == "none"
    assert weights_status("resnet18", "DEFAULT") == "download"
    url = torchvision.models.get_model_weights("resnet18").IMAGENET1K_V1.url
    cached = empty_torch_home / "hub" / "checkpoints" / os.path.basename(url)
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"")
    assert weights_status("resnet18", "DEFAULT") == "cached"
    assert weights_status("resnet18", "IMAGENET1K_V1") == "cached"


def test_uncached_weights_fail_fast_with_advice(empty_torch_home):
    with pytest.raises(WeightsError) as err:
        build_model(ModelConfig(backbone="resnet18", weights="DEFAULT"), 3)
    assert "random init" in str(err.value) and "not in the cache" in str(err.value)
    assert not list((empty_torch_home / "hub" / "checkpoints").glob("*.pth"))


def test_cached_weights_are_loaded_and_aux_heads_dropped(empty_torch_home):
    # A stand-in for the ImageNet file: torchvision's own googlenet layout, aux heads included.
    src = torchvision.models.googlenet(aux_logits=True, init_weights=False, transform_input=True)
    url = torchvision.models.get_model_weights("googlenet").DEFAULT.url
    cached = empty_torch_home / "hub" / "checkpoints" / os.path.basename(url)
    cached.parent.mkdir(parents=True)
    torch.save(src.state_dict(), cached)

    built = build_model(ModelConfig(backbone="googlenet", weights="DEFAULT"), 5)
    assert built.weights_desc == "ImageNet weights IMAGENET1K_V1 (cached)"
    assert torch.equal(built.model.conv1.conv.weight, src.conv1.conv.weight)
    out = built.model.train()(torch.randn(2, 3, 64, 64))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 5)


def test_corrupt_cached_weights_are_a_weights_error(empty_torch_home):
    url = torchvision.models.get_model_weights("resnet18").DEFAULT.url
    cached = empty_torch_home / "hub" / "checkpoints" / os.path.basename(url)
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="delete the file"):
        build_model(ModelConfig(backbone="resnet18", weights="DEFAULT"), 3)


# ---------------------------------------------------------------------------------------------
# Weight files


@pytest.fixture(scope="module")
def ten_class_state():
    torch.manual_seed(0)
    return _resnet18(10).state_dict()


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_weights_file_with_the_same_head_loads_fully(tmp_path, ten_class_state, suffix):
    path = tmp_path / f"model{suffix}"
    if suffix == ".safetensors":
        save_file(ten_class_state, str(path))
    else:
        torch.save(ten_class_state, path)
    built = build_model(ModelConfig(backbone="resnet18", weights_file=path.name), 10, resolve=lambda p: tmp_path / p)
    report = built.report
    assert report.loaded == len(ten_class_state)
    assert report.missing == [] and report.unexpected == [] and report.mismatched == []
    assert built.weights_desc == f"file model{suffix} ({len(ten_class_state)} of {len(ten_class_state)} tensors)"
    for key, value in built.model.state_dict().items():
        assert torch.equal(value, ten_class_state[key]), key


def test_weights_file_with_another_class_count_loads_all_but_the_head(tmp_path, ten_class_state):
    path = tmp_path / "model.pt"
    torch.save(ten_class_state, path)
    model = _resnet18(3)
    report = load_weights_file(model, path)
    assert sorted(report.mismatched) == [("fc.bias", (10,), (3,)), ("fc.weight", (10, 512), (3, 512))]
    assert report.loaded == len(ten_class_state) - 2 and report.missing == []
    assert torch.equal(model.conv1.weight, ten_class_state["conv1.weight"])
    assert "fc.weight (file 10x512, model 3x512)" in report.summary()


def test_checkpoint_and_ddp_layouts_are_unwrapped(tmp_path, ten_class_state):
    path = tmp_path / "ckpt.pt"
    ddp = {f"module.{k}": v for k, v in ten_class_state.items()}
    torch.save({"epoch": 3, "model_state_dict": ddp, "optimizer_state_dict": {}}, path)
    state = load_state_dict_file(path)
    assert set(state) == set(ten_class_state)
    report = load_weights_file(_resnet18(10), path)
    assert report.loaded == len(ten_class_state)


def test_weights_for_another_architecture_are_refused(tmp_path):
    path = tmp_path / "squeeze.pt"
    torch.save(torchvision.models.squeezenet1_1().state_dict(), path)
    with pytest.raises(WeightsError, match="does not fit resnet18: none of its"):
        build_model(ModelConfig(backbone="resnet18", weights_file=str(path)), 10)


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"x": NotATensor()}, path)
    with pytest.raises(WeightsError, match="refusing to load evil.pt"):
        load_state_dict_file(path)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_truncated_file_is_a_weights_error(tmp_path, ten_class_state, suffix):
    whole = tmp_path / f"whole{suffix}"
    if suffix == ".safetensors":
        save_file(ten_class_state, str(whole))
    else:
        torch.save(ten_class_state, whole)
    cut = tmp_path / f"cut{suffix}"
    data = whole.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=f"cut{suffix}"):
        load_state_dict_file(cut)


def test_non_tensor_values_are_a_weights_error(tmp_path):
    path = tmp_path / "mixed.pt"
    torch.save({"w": torch.zeros(2), "note": "hello"}, path)
    with pytest.raises(WeightsError, match="not tensors"):
        load_state_dict_file(path)


def test_missing_file_is_a_weights_error(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        load_state_dict_file(tmp_path / "nope.pt")


def test_random_init_vit_takes_the_project_image_size():
    from engine.config import ModelConfig

    built = build_model(ModelConfig(backbone="vit_b_32", weights=None), 4, image_size=64)
    with torch.no_grad():
        assert built.model.eval()(torch.zeros(2, 3, 64, 64)).shape == (2, 4)
