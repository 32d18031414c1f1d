"""timm's catalog, its Hugging Face cache status, and the bundled EfficientNet-Lite0 weights (really pretrained)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file
from torchvision.transforms import v2

from engine.backbones import (
    WeightsError,
    build_model,
    bundled_weights_file,
    load_by_order,
    load_state_dict_file,
    preprocess_for,
    weights_status,
)
from engine.catalog import BUNDLED, BUNDLED_BACKBONE, backbone_problems, list_backbones, weight_names
from engine.config import ConfigError, DataConfig, ModelConfig, from_dict
from engine.freezing import apply_freeze, layer_tree, param_groups

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "resources" / "sample_data" / "digits"
IMAGENET_CLASSES = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta["categories"]


@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache, and a hub that refuses connections: nothing can be downloaded."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: refused at once
    return tmp_path / "hf_home" / "hub"


def _put_in_hf_cache(hub: Path, repo: str, filename: str, write) -> Path:
    """Lay a file out the way huggingface_hub caches a download (refs/main -> snapshots/<commit>/<file>)."""
    folder = hub / f"models--{repo.replace('/', '--')}"
    commit = "0" * 40
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    path = folder / "snapshots" / commit / filename
    path.parent.mkdir(parents=True)
    write(path)
    return path


# ---------------------------------------------------------------------------------------------
# Catalog and config validation


def test_catalog_offers_timm_models_with_their_tags():
    names = set(list_backbones())
    assert {"resnet18", "timm/efficientnet_lite0", "timm/resnet50", "timm/vit_small_patch16_224"} <= names
    assert len([n for n in names if n.startswith("timm/")]) == len(
        [n for n in timm.list_models() if not n.endswith("_enc")]
    )
    assert weight_names("timm/efficientnet_lite0") == ["DEFAULT", "ra_in1k", BUNDLED]
    assert weight_names("timm/resnet50")[:2] == ["DEFAULT", "a1_in1k"]
    assert BUNDLED not in weight_names("timm/resnet50")


def test_config_validation_accepts_timm_names_and_refuses_unknown_ones():
    cfg = from_dict({"model": {"backbone": "timm/efficientnet_lite0", "weights": BUNDLED}}, check_paths=False)
    assert cfg.model.backbone == "timm/efficientnet_lite0"
    with pytest.raises(ConfigError, match="model.backbone = 'timm/nosuchnet': unknown") as err:
        from_dict({"model": {"backbone": "timm/nosuchnet"}}, check_paths=False)
    assert "timm/efficientnet_lite0" in str(err.value)
    (problem,) = backbone_problems("timm/resnet50.a1_in1k", None)
    assert "model.weights to 'a1_in1k'" in problem
    (problem,) = backbone_problems("timm/efficientnet_lite0", "imagenet")
    assert "DEFAULT, ra_in1k, BUNDLED" in problem


# ---------------------------------------------------------------------------------------------
# The bundled weights: a one-to-one mapping by order, refused when anything differs


def test_bundled_weights_map_one_to_one_onto_timms_architecture():
    model = timm.create_model("efficientnet_lite0", pretrained=False)
    source = load_state_dict_file(bundled_weights_file())
    assert len(source) == len(model.state_dict()) == 296
    load_by_order(model, source, "bundled")
    for (key, want), got in zip(source.items(), model.state_dict().values(), strict=True):
        assert torch.equal(want, got), key


def test_a_shape_mismatch_or_a_missing_tensor_is_refused():
    model = timm.create_model("efficientnet_lite0", pretrained=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    source = load_state_dict_file(bundled_weights_file())
    keys = list(source)
    wrong = dict(source)
    wrong[keys[5]] = torch.zeros(7, 3, 3, 3)
    with pytest.raises(WeightsError, match=rf"tensor 5 \({keys[5]}, shape \(7, 3, 3, 3\)\)"):
        load_by_order(model, wrong, "bundled")
    shorter = dict(list(source.items())[:-2])
    with pytest.raises(WeightsError, match="holds 294 tensors, the model has 296"):
        load_by_order(model, shorter, "bundled")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing half loaded


def test_bundled_weights_are_bundled_and_bring_their_preprocessing():
    assert weights_status(BUNDLED_BACKBONE, BUNDLED) == "bundled"
    pre = preprocess_for(ModelConfig(backbone=BUNDLED_BACKBONE, weights=BUNDLED), DataConfig(image_size=64))
    assert (pre.resize_size, pre.crop_size, pre.interpolation) == (224, 224, "bicubic")
    assert pre.mean == (0.5, 0.5, 0.5) and pre.std == (0.5, 0.5, 0.5)
    built = build_model(ModelConfig(backbone=BUNDLED_BACKBONE, weights=BUNDLED), 10)
    assert built.head_name == "classifier" and built.model.classifier.out_features == 10
    assert "BUNDLED" in built.weights_desc


@pytest.fixture(scope="module")
def imagenet_model():
    """The bundled weights with their own 1000-class ImageNet classifier."""
    model = timm.create_model("efficientnet_lite0", pretrained=False)
    load_by_order(model, load_state_dict_file(bundled_weights_file()), "bundled")
    return model.eval()


@pytest.mark.parametrize(
    "photo, plausible",
    [
        ("china.jpg", {"palace", "monastery", "pagoda", "church", "bell cote", "castle", "stupa", "boathouse"}),
        ("flower.jpg", {"daisy", "bee", "sea anemone", "hip", "pot"}),
    ],
)
@pytest.mark.parametrize("size", [None, 192], ids=["the weights' 224 px", "data.input_size 192 px"])
def test_bundled_weights_recognise_real_photographs(imagenet_model, photo, plausible, size):
    from sklearn.datasets import load_sample_image

    pre = preprocess_for(ModelConfig(backbone=BUNDLED_BACKBONE, weights=BUNDLED), DataConfig(input_size=size))
    assert pre.crop_size == (size or 224)
    transform = v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(pre.resize_size, interpolation=v2.InterpolationMode(pre.interpolation), antialias=True),
            v2.CenterCrop(pre.crop_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(pre.mean, pre.std),
        ]
    )
    image = transform(load_sample_image(photo).copy()).unsqueeze(0)
    with torch.no_grad():
        top5 = imagenet_model(image).topk(5).indices[0].tolist()
    names = [IMAGENET_CLASSES[i] for i in top5]
    print(photo, names)
    assert plausible & set(names[:3]), names


def _digits_subset(root: Path, per_class: int, classes: int = 10) -> Path:
    for folder in sorted(p for p in DIGITS.iterdir() if p.is_dir())[:classes]:
        (root / folder.name).mkdir(parents=True)
        for image in sorted(folder.glob("*.png"))[:per_class]:
            shutil.copy(image, root / folder.name / image.name)
    return root


def _fine_tune(data: Path, weights: str | None, size: int) -> float:
    from engine.trainer import Trainer

    cfg = from_dict(
        {
            "name": f"digits-{weights}",
            # image_size sizes the random-init run; input_size the pretrained one (smaller than the weights'
            # 224 px to keep the test quick), which keeps the weights' own normalisation and resampling.
            "data": {"path": str(data), "val_fraction": 0.3, "image_size": size, "mean": [0.5], "std": [0.5]}
            | ({"input_size": size} if weights else {}),
            # The same recipe for both: the last two blocks and the head train, the early blocks stay frozen.
            "model": {"backbone": BUNDLED_BACKBONE, "weights": weights, "freeze": "up_to", "freeze_up_to": "blocks.4"},
            "loader": {"batch_size": 32},
            "optimizer": {"name": "adamw", "lr": 0.003},
            "train": {"epochs": 2, "device": "cpu", "seed": 0},
            "output": {"dir": str(data.parent / "runs"), "tensorboard": False},
        },
        check_paths=False,
    )
    trainer = Trainer(cfg)
    trainer.run()
    return trainer.state.history[-1]["val_accuracy"]


def test_bundled_weights_fine_tune_better_than_random_init(tmp_path):
    data = _digits_subset(tmp_path / "digits", per_class=30)
    start = time.monotonic()
    pretrained = _fine_tune(data, BUNDLED, 96)
    middle = time.monotonic()
    random_init = _fine_tune(data, None, 96)
    print(
        f"val accuracy: pretrained {pretrained:.3f} ({middle - start:.1f} s), "
        f"random init {random_init:.3f} ({time.monotonic() - middle:.1f} s)"
    )
    assert pretrained >= 0.7 and pretrained >= random_init + 0.15


# ---------------------------------------------------------------------------------------------
# Hub weights: the cache, never a download in tests


def test_weights_status_reads_the_hugging_face_cache(empty_hf_cache):
    assert weights_status("timm/efficientnet_lite0", None) == "none"
    assert weights_status("timm/efficientnet_lite0", "DEFAULT") == "download"
    assert weights_status("timm/efficientnet_lite0", "ra_in1k") == "download"
    _put_in_hf_cache(
        empty_hf_cache, "timm/efficientnet_lite0.ra_in1k", "model.safetensors", lambda p: p.write_bytes(b"")
    )
    assert weights_status("timm/efficientnet_lite0", "DEFAULT") == "cached"
    assert weights_status("timm/efficientnet_lite0", "ra_in1k") == "cached"
    assert weights_status("timm/resnet50", "a1_in1k") == "download"


def test_uncached_timm_weights_fail_fast_with_advice(empty_hf_cache):
    with pytest.raises(WeightsError) as err:
        build_model(ModelConfig(backbone="timm/efficientnet_lite0", weights="DEFAULT"), 3)
    assert "random init" in str(err.value) and "not in the cache" in str(err.value)
    assert "model.weights_file" in str(err.value)
    assert not empty_hf_cache.exists() or not any(empty_hf_cache.rglob("*.safetensors"))


def test_cached_timm_weights_load_without_the_network(empty_hf_cache):
    torch.manual_seed(1)
    source = timm.create_model("efficientnet_lite0", pretrained=False)  # a stand-in for the hub's file
    _put_in_hf_cache(
        empty_hf_cache,
        "timm/efficientnet_lite0.ra_in1k",
        "model.safetensors",
        lambda p: save_file(source.state_dict(), str(p)),
    )
    built = build_model(ModelConfig(backbone="timm/efficientnet_lite0", weights="DEFAULT"), 5)
    assert built.weights_desc == "pretrained weights ra_in1k (cached)"
    assert torch.equal(built.model.conv_stem.weight, source.conv_stem.weight)
    assert built.head_name == "classifier" and built.model.classifier.out_features == 5


def test_corrupt_cached_timm_weights_are_a_weights_error(empty_hf_cache):
    _put_in_hf_cache(
        empty_hf_cache,
        "timm/efficientnet_lite0.ra_in1k",
        "model.safetensors",
        lambda p: p.write_bytes(b"not safetensors"),
    )
    with pytest.raises(WeightsError, match="delete the file"):
        build_model(ModelConfig(backbone="timm/efficientnet_lite0", weights="ra_in1k"), 3)


def test_timm_preprocessing_follows_the_pretrained_cfg():
    pre = preprocess_for(ModelConfig(backbone="timm/convnext_tiny", weights="DEFAULT"), DataConfig(image_size=64))
    assert (pre.resize_size, pre.crop_size, pre.interpolation) == (235, 224, "bicubic")  # crop_pct 0.95
    pre = preprocess_for(ModelConfig(backbone="timm/convnext_tiny"), DataConfig(image_size=64))
    assert (pre.resize_size, pre.crop_size) == (64, 64)


# ---------------------------------------------------------------------------------------------
# Head, freezing, layer tree


@pytest.mark.parametrize(
    "backbone, head",
    [
        ("timm/efficientnet_lite0", "classifier"),
        ("timm/convnext_atto", "head.fc"),
        ("timm/vit_tiny_patch16_224", "head"),
    ],
)
def test_timm_heads_freeze_and_train_like_torchvision_ones(backbone, head):
    cfg = ModelConfig(backbone=backbone, freeze="head_only")
    built = build_model(cfg, 4, image_size=64)
    assert built.head_name == head and built.weights_desc == "random init"
    apply_freeze(built.model, cfg, built.head_name)
    trainable = [n for n, p in built.model.named_parameters() if p.requires_grad]
    assert trainable == [f"{head}.weight", f"{head}.bias"]
    assert [g["name"] for g in param_groups(built.model, built.head_name, 0.1, 0.1)] == ["head"]
    tree = layer_tree(built.model, (3, 64, 64))
    assert tree[0].output_shape == (1, 4)
    assert {i.name: i for i in tree}[head].trainable == 4 * built.model.get_submodule(head).in_features + 4


def test_a_run_at_a_size_of_the_users_restores_and_exports_at_that_size(tmp_path):
    from engine.checkpoints import load_checkpoint
    from engine.export import export_checkpoint
    from engine.restore import restore_model
    from engine.runs import create_run_dir, run_callbacks
    from engine.trainer import Trainer, build_run

    data = _digits_subset(tmp_path / "digits", per_class=6, classes=3)
    cfg = from_dict(
        {
            "name": "bundled-at-48",
            "data": {"path": str(data), "val_fraction": 0.25, "input_size": 48},
            "model": {"backbone": BUNDLED_BACKBONE, "weights": BUNDLED, "freeze": "up_to", "freeze_up_to": "blocks.4"},
            "loader": {"batch_size": 8},
            "train": {"epochs": 1, "device": "cpu", "seed": 0},
            "output": {"dir": str(tmp_path / "runs"), "tensorboard": False},
        },
        check_paths=False,
    )
    parts = build_run(cfg)
    images, _ = next(iter(parts.train_loader))
    assert tuple(images.shape[1:]) == (3, 48, 48)  # what the model trains on
    run = create_run_dir(cfg, tmp_path / "run")
    Trainer(cfg, run_callbacks(cfg, run)).run()
    checkpoint = run / "checkpoints" / "final.pt"
    _, _, _, pre = restore_model(load_checkpoint(checkpoint))
    assert (pre.crop_size, pre.mean) == (48, (0.5, 0.5, 0.5))  # the user's size, the weights' normalisation
    export_checkpoint(checkpoint, "torchscript", tmp_path / "model.ts")  # checked against PyTorch at that size
    info = json.loads((tmp_path / "model.ts.json").read_text(encoding="utf-8"))
    assert (info["input_size"], info["mean"]) == ([3, 48, 48], [0.5, 0.5, 0.5])  # what a deployment feeds it


def test_a_timm_checkpoint_is_restored_and_exported(tmp_path):
    from engine.checkpoints import load_checkpoint
    from engine.export import export_checkpoint
    from engine.restore import restore_model
    from engine.runs import create_run_dir, run_callbacks
    from engine.trainer import Trainer

    data = _digits_subset(tmp_path / "digits", per_class=6, classes=3)
    cfg = from_dict(
        {
            "name": "timm-export",
            "data": {"path": str(data), "val_fraction": 0.25, "image_size": 32, "mean": [0.5], "std": [0.5]},
            "model": {"backbone": "timm/efficientnet_lite0", "freeze": "up_to", "freeze_up_to": "blocks.4"},
            "loader": {"batch_size": 8},
            "train": {"epochs": 1, "device": "cpu", "seed": 0},
            "output": {"dir": str(tmp_path / "runs"), "tensorboard": False},
        },
        check_paths=False,
    )
    run = create_run_dir(cfg, tmp_path / "run")
    Trainer(cfg, run_callbacks(cfg, run)).run()
    checkpoint = run / "checkpoints" / "final.pt"
    model, restored_cfg, class_names, pre = restore_model(load_checkpoint(checkpoint))
    assert restored_cfg.model.backbone == "timm/efficientnet_lite0" and class_names == ["0", "1", "2"]
    assert pre.crop_size == 32
    export_checkpoint(checkpoint, "torchscript", tmp_path / "model.ts")  # checks the file against PyTorch
    assert (tmp_path / "model.ts").is_file()


def test_encoder_only_timm_models_are_not_offered():
    import timm

    from engine.catalog import backbone_problems, list_backbones

    encoders = [n for n in timm.list_models() if n.endswith("_enc")]
    catalog = set(list_backbones())
    for name in encoders:  # vision-language encoders have no classifier head to replace
        assert f"timm/{name}" not in catalog
        assert backbone_problems(f"timm/{name}", None)
