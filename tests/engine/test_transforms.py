"""The preprocessing and augmentation pipelines: shapes, value ranges, keep-aspect resizing."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

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
