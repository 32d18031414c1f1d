"""The preprocessing and augmentation pipelines: shapes, value ranges, keep-aspect resizing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2

from engine.config import AugmentConfig
from engine.transforms import Preprocess, build_transforms

PRE = Preprocess(resize_size=20, crop_size=16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
ALL_AUGMENTS = AugmentConfig(horizontal_flip=True, rotation=15.0, random_resized_crop=True, color_jitter=0.3)


def pil_image(size=(40, 30), color=(128, 128, 128)) -> Image.Image:
    return Image.new("RGB", size, color)


def test_eval_resizes_crops_and_normalises_pil_and_tensor_inputs():
    tf = build_transforms(PRE, AugmentConfig(), train=False, keep_aspect=False)

    from_pil = tf(pil_image(color=(128, 128, 128)))
    from_tensor = tf(torch.full((3, 30, 40), 0.5))

    for out in (from_pil, from_tensor):
        assert out.shape == (3, 16, 16) and out.dtype == torch.float32
        assert type(out) is torch.Tensor  # plain tensors, not torchvision wrapper types
    assert torch.allclose(from_tensor, torch.zeros(3, 16, 16), atol=1e-5)  # (0.5 - 0.5) / 0.25
    assert torch.allclose(from_pil, torch.full((3, 16, 16), (128 / 255 - 0.5) / 0.25), atol=1e-4)


def test_eval_is_deterministic():
    tf = build_transforms(PRE, ALL_AUGMENTS, train=False, keep_aspect=False)
    x = torch.rand(3, 30, 40)
    assert torch.equal(tf(x), tf(x))


@pytest.mark.parametrize(
    "augment", [AugmentConfig(), ALL_AUGMENTS, AugmentConfig(horizontal_flip=True, rotation=10.0, color_jitter=0.5)]
)
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest"])
def test_train_output_has_the_crop_size(augment, interpolation):
    pre = Preprocess(20, 16, (0.5,) * 3, (0.25,) * 3, interpolation=interpolation)
    tf = build_transforms(pre, augment, train=True, keep_aspect=False)

    assert tf(pil_image()).shape == (3, 16, 16)
    assert tf(torch.rand(3, 30, 40)).shape == (3, 16, 16)


def test_train_augmentation_varies_the_image():
    tf = build_transforms(PRE, ALL_AUGMENTS, train=True, keep_aspect=False)
    x = torch.rand(3, 30, 40)
    torch.manual_seed(0)
    assert not torch.equal(tf(x), tf(x))


@pytest.mark.parametrize("train", [False, True])
def test_keep_aspect_resizes_the_longer_side_without_cropping(train):
    tf = build_transforms(PRE, ALL_AUGMENTS, train=train, keep_aspect=True)

    wide = tf(pil_image(size=(80, 40)))
    tall = tf(torch.rand(3, 60, 30))
    small = tf(pil_image(size=(10, 5)))

    assert wide.shape == (3, 10, 20)
    assert tall.shape == (3, 20, 10)
    assert small.shape == (3, 10, 20)  # upscaled too: the longer side always equals resize_size


def v2_compose(pre, augment, *, train, keep_aspect):
    """The same recipe as torchvision's own transform classes in a v2.Compose: what the pipeline must equal."""
    interpolation = InterpolationMode(pre.interpolation)
    steps = [v2.ToImage()]
    if keep_aspect:
        steps.append(v2.Resize(None, max_size=pre.resize_size, interpolation=interpolation, antialias=True))
    elif train and augment.random_resized_crop:
        steps.append(v2.RandomResizedCrop(pre.crop_size, interpolation=interpolation, antialias=True))
    else:
        steps += [v2.Resize(pre.resize_size, interpolation=interpolation, antialias=True), v2.CenterCrop(pre.crop_size)]
    if train:
        if augment.horizontal_flip:
            steps.append(v2.RandomHorizontalFlip())
        if augment.rotation:
            nearest = interpolation == InterpolationMode.NEAREST
            rotation = InterpolationMode.NEAREST if nearest else InterpolationMode.BILINEAR
            steps.append(v2.RandomRotation(augment.rotation, interpolation=rotation))
        if augment.color_jitter:
            c = augment.color_jitter
            steps.append(v2.ColorJitter(brightness=c, contrast=c, saturation=c))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(pre.mean), list(pre.std)), v2.ToPureTensor()]
    return v2.Compose(steps)


def sample_inputs():
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (23, 37, 3), dtype=np.uint8)
    return {
        "PIL RGB": Image.fromarray(pixels),
        "uint8 tensor": torch.from_numpy(pixels).permute(2, 0, 1).contiguous(),
        "float tensor": torch.from_numpy(pixels).permute(2, 0, 1).float() / 255,
        "float64 tensor": torch.from_numpy(pixels).permute(2, 0, 1).double() / 255,
        "HWC array": pixels,
    }


@pytest.mark.parametrize("augment", [AugmentConfig(), ALL_AUGMENTS], ids=["plain", "augmented"])
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest"])
@pytest.mark.parametrize("train, keep_aspect", [(False, False), (True, False), (True, True)])
def test_pipeline_gives_exactly_what_torchvisions_transform_classes_give(augment, interpolation, train, keep_aspect):
    pre = Preprocess(20, 16, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), interpolation=interpolation)
    ours = build_transforms(pre, augment, train=train, keep_aspect=keep_aspect)
    theirs = v2_compose(pre, augment, train=train, keep_aspect=keep_aspect)
    for name, image in sample_inputs().items():
        for seed in range(2):
            torch.manual_seed(seed)
            expected = theirs(image)
            torch.manual_seed(seed)
            got = ours(image)
            assert type(got) is torch.Tensor and got.dtype == torch.float32, name
            assert torch.equal(got, expected), f"{name}, seed {seed}"


def test_a_float_image_is_not_changed_in_place():
    # The decoded-image cache hands float32 images of float arrays to the per-item steps: they must stay as kept.
    image = torch.rand(3, 16, 16)
    kept = image.clone()
    tf = build_transforms(PRE, AugmentConfig(), train=False, keep_aspect=False)
    out = tf(image)
    assert torch.equal(image, kept) and not torch.equal(out, image)
