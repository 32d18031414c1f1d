"""Class activation maps: they point at the object that decides the class, and leave the model as it was."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cli, write_project
from PIL import Image

IMAGE = 64  # the images' side; the models see them at 128 px so the last feature map is 4 x 4
MODEL_INPUT = 128


def write_shapes(root: Path, per_class: int = 60, seed: int = 0) -> dict[str, tuple[int, int, int]]:
    """Two classes told apart only by the shape of one object at a random place on a noisy background: a filled
    square or a ring. Returns each image's object box (top, left, side)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:IMAGE, 0:IMAGE]
    boxes = {}
    for cls in ("ring", "square"):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            side = int(rng.integers(IMAGE // 4, IMAGE // 3 + 1))
            top, left = (int(v) for v in rng.integers(0, IMAGE - side, size=2))
            pixels = rng.normal(110, 25, size=(IMAGE, IMAGE, 3))
            mark = (yy >= top) & (yy < top + side) & (xx >= left) & (xx < left + side)
            if cls == "ring":
                t = max(side // 5, 2)
                mark &= ~((yy >= top + t) & (yy < top + side - t) & (xx >= left + t) & (xx < left + side - t))
            pixels[mark] = 240
            path = root / cls / f"{i:03d}.png"
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)
            boxes[str(path)] = (top, left, side)
    return boxes


@pytest.fixture(scope="module")
def shape_runs(tmp_path_factory):
    """A ResNet and an EfficientNet (timm's tiny test models, from scratch) trained on the shapes: one run each."""
    from engine.config import load_project
    from engine.runs import RunRecorder
    from engine.trainer import Trainer

    root = tmp_path_factory.mktemp("shapes")
    boxes = write_shapes(root / "images")
    runs = {}
    for backbone, epochs in (("timm/test_resnet", 8), ("timm/test_efficientnet", 6)):
        name = backbone.split("/")[-1]
        cfg = load_project(
            write_project(
                root / f"{name}.json",
                "images",
                data={"image_size": MODEL_INPUT},
                model={"backbone": backbone},
                loader={"batch_size": 16},
                train={"epochs": epochs, "device": "cpu", "seed": 0},
            )
        )
        (root / name).mkdir()
        Trainer(cfg, [RunRecorder(root / name)]).run()
        runs[backbone] = root / name / "checkpoints" / "final.pt"
    return runs, boxes


@pytest.mark.parametrize("backbone", ["timm/test_resnet", "timm/test_efficientnet"])
def test_the_map_points_at_the_object(shape_runs, backbone):
    """The pointing game: the map's maximum lies in the object's box padded by an eighth of the image side."""
    from engine.cam import activation_maps, map_to_image
    from engine.checkpoints import load_checkpoint
    from engine.data import load_image, prepare_data
    from engine.restore import restore_model
    from engine.transforms import build_transforms

    runs, boxes = shape_runs
    model, cfg, names, pre = restore_model(load_checkpoint(runs[backbone]))
    val = prepare_data(cfg, pre).val
    files = [str(f) for f in val.files]
    transform = build_transforms(pre, cfg.data.augment, train=False, keep_aspect=False)
    result = activation_maps(model, torch.stack([transform(load_image(f)) for f in files]))
    assert result.layer == {"timm/test_resnet": "layer4", "timm/test_efficientnet": "bn2"}[backbone]
    correct = np.mean([names[c] == Path(f).parent.name for c, f in zip(result.class_index, files, strict=True)])
    assert correct >= 0.9, f"the model did not learn the shapes ({correct:.0%} right)"
    pad = IMAGE / 8
    hits = []
    for cam, f in zip(result.maps, files, strict=True):
        full = map_to_image(cam, (IMAGE, IMAGE), pre, keep_aspect=False)
        y, x = np.unravel_index(int(np.argmax(full)), full.shape)
        top, left, side = boxes[f]
        hits.append(top - pad <= y < top + side + pad and left - pad <= x < left + side + pad)
    assert np.mean(hits) >= 0.85, f"{np.mean(hits):.0%} of {len(hits)} maps point at the object"


def test_a_map_leaves_weights_grads_flags_and_mode_as_they_were():
    """On a partly frozen model with a gradient already stored: nothing the map's backward pass touches stays."""
    from engine.backbones import build_model
    from engine.cam import activation_maps
    from engine.config import ModelConfig

    model = build_model(ModelConfig(backbone="timm/test_resnet", weights=None), 3, image_size=64).model
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(("layer4", "fc")))  # a frozen backbone with a trainable top
    model.fc.weight.grad = torch.full_like(model.fc.weight, 0.25)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}  # includes BatchNorm's running statistics
    flags = {n: p.requires_grad for n, p in model.named_parameters()}

    result = activation_maps(model, torch.randn(2, 3, 64, 64), method="gradcam++")

    assert result.maps.shape == (2, 64, 64) and result.maps.dtype == np.float32
    assert float(result.maps.max()) > 0  # gradients did reach the frozen layer4... through the input
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert torch.equal(model.fc.weight.grad, torch.full_like(model.fc.weight, 0.25))
    assert all(p.grad is None for n, p in model.named_parameters() if n != "fc.weight")
    assert model.training and all(m.training for m in model.modules())


@pytest.mark.parametrize(
    ("backbone", "size", "layer", "layout"),
    [
        ("timm/test_convnext", 64, "norm_pre", "nchw"),  # after the last stage, before the pooled head
        ("timm/test_vit", 160, "blocks.5.norm1", "tokens"),  # the last block's attention input, behind a class token
        ("resnet18", 32, "layer3", "nchw"),  # at 32 px layer4 is 1 x 1: the last map with a place in it
    ],
)
def test_the_target_layer_is_the_last_spatial_map_the_prediction_depends_on(backbone, size, layer, layout):
    from engine.backbones import build_model
    from engine.cam import activation_maps, target_layer
    from engine.config import ModelConfig

    model = build_model(ModelConfig(backbone=backbone, weights=None), 2, image_size=size).model
    chosen = target_layer(model, size)
    assert (chosen.name, chosen.layout) == (layer, layout)
    assert activation_maps(model, torch.randn(1, 3, size, size)).maps.shape == (1, size, size)


def test_a_chosen_layer_that_is_no_map_is_refused_by_name():
    from engine.backbones import build_model
    from engine.cam import CamUnavailable, activation_maps
    from engine.config import ModelConfig

    model = build_model(ModelConfig(backbone="timm/test_resnet", weights=None), 2, image_size=64).model
    assert activation_maps(model, torch.randn(1, 3, 64, 64), layer="layer2").layer == "layer2"
    with pytest.raises(CamUnavailable, match="'fc'"):
        activation_maps(model, torch.randn(1, 3, 64, 64), layer="fc")
    with pytest.raises(CamUnavailable, match="no layer named 'nope'"):
        activation_maps(model, torch.randn(1, 3, 64, 64), layer="nope")


def test_evaluate_cam_writes_a_map_and_an_overlay_per_hardest_image(shape_runs, tmp_path, capsys):
    runs, _ = shape_runs
    out, report = tmp_path / "cams", tmp_path / "report.json"
    ckpt = runs["timm/test_resnet"]
    done = cli(capsys, "evaluate", str(ckpt), "--top", "4", "--cam", str(out), "--json", str(report))
    assert done.returncode == 0, done.stderr
    ev = json.loads(report.read_text())
    assert [c["path"] for c in ev["cams"]] == [h["path"] for h in ev["hardest"]]
    for cam, hard in zip(ev["cams"], ev["hardest"], strict=True):
        assert cam["class"] == hard["predicted"] and cam["layer"] == "layer4"
        png, npy = Path(cam["overlay"]), Path(cam["map"])
        assert png.parent == npy.parent == out and png.stem == npy.stem and png.suffix == ".png"
        values = np.load(npy)
        assert values.dtype == np.float32 and values.shape == (IMAGE, IMAGE)  # the image's own size
        assert 0.0 <= values.min() and values.max() <= 1.0 and values.max() > 0.5
        with Image.open(png) as image:
            assert image.size == (IMAGE, IMAGE)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [Path(c["overlay"]).name for c in ev["cams"]] + [Path(c["map"]).name for c in ev["cams"]]
    )
