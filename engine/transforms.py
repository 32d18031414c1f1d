"""Image preprocessing and train augmentation, built from the weights' own recipe or the project's settings.

The deterministic steps (to a tensor, resize, centre crop, scaling to float and normalising) call
torchvision's v2 kernels directly on plain tensors: the same kernels v2's transform classes call, so the same
tensors, without the per-call work those classes do to find the images in an arbitrary sample (flattening it,
checking types, wrapping and unwrapping tv_tensors). For a small image that work cost more than the resize
itself. The random augmentations stay v2 transforms, which treat a plain tensor as the image.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import PIL.Image
import torch
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as F

from engine.config import AugmentConfig


@dataclass(frozen=True)
class Preprocess:
    """What a model expects of its input: resize, crop, normalisation."""

    resize_size: int  # the shorter side is resized to this (the longer side when keeping aspect)
    crop_size: int  # centre crop for evaluation; random-resized-crop size for training
    mean: tuple[float, ...]  # one per channel: three
    std: tuple[float, ...]
    interpolation: str = "bilinear"  # bilinear, bicubic or nearest


def build_transforms(pre: Preprocess, augment: AugmentConfig, *, train: bool, keep_aspect: bool) -> Callable:
    """The image pipeline for one split: PIL RGB images or float CHW tensors in [0, 1] in, normalised float32 out."""
    fixed, per_item = _steps(pre, augment, train=train, keep_aspect=keep_aspect, presize=False)
    return Pipeline(fixed + per_item)


def split_transforms(
    pre: Preprocess, augment: AugmentConfig, *, train: bool, keep_aspect: bool
) -> tuple[Callable, Callable]:
    """The pipeline of build_transforms cut in two for the decoded-image cache: (fixed, per_item).

    fixed turns a decoded image into a CHW tensor of the same dtype (uint8 for files) and applies the
    deterministic resize, plus the centre crop when no random crop follows; its output is what the cache
    keeps. per_item does the rest on every draw: random augmentation, scaling to float, normalisation.
    per_item(fixed(image)) equals build_transforms(...)(image) exactly, with one deliberate exception:
    with random_resized_crop (training), fixed "presizes" the image (its shorter side resized to
    pre.resize_size, fastai's presizing) and the random crops are then taken from that presized image
    rather than from the original.
    """
    fixed, per_item = _steps(pre, augment, train=train, keep_aspect=keep_aspect, presize=True)
    # ToImage again: per_item takes what the cache hands out (plain tensors) as well as images.
    return Pipeline(fixed), Pipeline([ToImage()] + per_item)


def unaugmented_train_transform(
    pre: Preprocess, augment: AugmentConfig, *, keep_aspect: bool, decoded: bool
) -> Callable:
    """The training pipeline with every augmentation off, for a phase that trains on plain images (train.phases).

    decoded: the dataset hands out what split_transforms' fixed part made of the project's own augment, so only
    the steps after it run. With random_resized_crop that part only presized the image (shorter side at
    resize_size), and the centre crop follows here: exactly what build_transforms without augmentation does.
    """
    plain = AugmentConfig()
    if not decoded:
        return build_transforms(pre, plain, train=True, keep_aspect=keep_aspect)
    steps: list[Callable] = [ToImage()]
    if augment.random_resized_crop and not keep_aspect:
        steps.append(CenterCrop(pre.crop_size))
    return Pipeline([*steps, Normalize(pre.mean, pre.std)])


def augmentations_on(augment: AugmentConfig) -> list[str]:
    """The names of the training augmentations that are on (each one draws random numbers per image)."""
    return [
        name
        for name, value in (
            ("horizontal_flip", augment.horizontal_flip),
            ("rotation", augment.rotation),
            ("random_resized_crop", augment.random_resized_crop),
            ("color_jitter", augment.color_jitter),
        )
        if value
    ]


def has_random_steps(augment: AugmentConfig, *, train: bool) -> bool:
    """Whether a split's pipeline draws random numbers per item (training with any augmentation on)."""
    return train and bool(augmentations_on(augment))


def _steps(
    pre: Preprocess, augment: AugmentConfig, *, train: bool, keep_aspect: bool, presize: bool
) -> tuple[list[Callable], list[Callable]]:
    """(deterministic steps, per-item steps) of one split's pipeline."""
    interpolation = InterpolationMode(pre.interpolation)
    fixed: list[Callable] = [ToImage()]  # PIL -> uint8 tensor; a plain tensor is taken as the image as is
    steps: list[Callable] = []
    if keep_aspect:
        # size=None with max_size scales the longer side to resize_size (up or down); the pad collate
        # then evens out the different shapes, so no crop of any kind.
        fixed.append(Resize(None, max_size=pre.resize_size, interpolation=interpolation))
    elif train and augment.random_resized_crop:
        if presize:
            # Presizing: the cache keeps the image with its shorter side at resize_size, and the random
            # crops come from that presized image instead of the full-size original.
            fixed.append(Resize(pre.resize_size, interpolation=interpolation))
        steps.append(v2.RandomResizedCrop(pre.crop_size, interpolation=interpolation, antialias=True))
    else:
        fixed += [Resize(pre.resize_size, interpolation=interpolation), CenterCrop(pre.crop_size)]
    if train:
        if augment.horizontal_flip:
            steps.append(v2.RandomHorizontalFlip())
        if augment.rotation > 0:
            # Rotating a tensor supports only nearest and bilinear sampling.
            rot = (
                InterpolationMode.NEAREST if interpolation == InterpolationMode.NEAREST else InterpolationMode.BILINEAR
            )
            steps.append(v2.RandomRotation(augment.rotation, interpolation=rot))
        if augment.color_jitter > 0:
            c = augment.color_jitter
            steps.append(v2.ColorJitter(brightness=c, contrast=c, saturation=c))
    steps.append(Normalize(pre.mean, pre.std))  # to float32 in [0, 1], then per-channel mean and std
    return fixed, steps


# ---------------------------------------------------------------------------------------------
# The deterministic steps: plain tensors in and out (images are CHW), each the v2 kernel its v2 class calls.


class Pipeline:
    """Steps applied one after the other, as v2.Compose does; the result is a plain tensor."""

    def __init__(self, steps: Sequence[Callable]):
        self.steps = list(steps)

    def __call__(self, image: Any) -> torch.Tensor:
        for step in self.steps:
            image = step(image)
        return image

    def __repr__(self) -> str:
        inner = "".join(f"\n    {step}" for step in self.steps)
        return f"Pipeline({inner}\n)"


class ToImage:
    """A PIL image, a NumPy HWC array or a tensor as a plain CHW tensor of the same dtype (v2.ToImage, unwrapped).

    A PIL image becomes uint8 with its rows in memory order (a CHW view of HWC data), as v2.ToImage gives it;
    the resize kernel's result depends on nothing else.
    """

    def __call__(self, image: Any) -> torch.Tensor:
        if isinstance(image, PIL.Image.Image):
            return F.pil_to_tensor(image)  # what to_image wraps as a tv_tensors.Image
        return F.to_image(image).as_subclass(torch.Tensor)

    def __repr__(self) -> str:
        return "ToImage()"


class Resize:
    """v2.Resize(size, max_size=max_size, interpolation=interpolation, antialias=True) on a plain tensor."""

    def __init__(self, size: int | None, *, max_size: int | None = None, interpolation: InterpolationMode):
        self.size = None if size is None else [size]  # one number: the shorter side, as v2.Resize stores it
        self.max_size = max_size
        self.interpolation = interpolation

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return F.resize_image(image, self.size, self.interpolation, self.max_size, antialias=True)

    def __repr__(self) -> str:
        return f"Resize(size={self.size}, max_size={self.max_size}, interpolation={self.interpolation.value})"


class CenterCrop:
    """v2.CenterCrop(size) on a plain tensor."""

    def __init__(self, size: int):
        self.size = [size, size]

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return F.center_crop_image(image, self.size)

    def __repr__(self) -> str:
        return f"CenterCrop(size={self.size})"


class Normalize:
    """v2.ToDtype(torch.float32, scale=True) then v2.Normalize(mean, std): the same operations in the same order.

    Integer images are scaled to [0, 1] by their dtype's maximum; float images are taken to be in [0, 1] already
    and are not changed in place (a float32 image may be one the decoded-image cache keeps).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        if not all(std):
            raise ValueError(f"std {list(std)} has a zero: normalising would divide by zero")
        self.mean = list(mean)
        self.std = list(std)
        self._mean = torch.tensor(self.mean, dtype=torch.float32).view(-1, 1, 1)
        self._std = torch.tensor(self.std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        scaled = F.to_dtype_image(image, torch.float32, scale=True)
        if scaled.ndim < 3:
            raise ValueError(f"expected an image tensor of shape (..., C, H, W), got shape {tuple(scaled.shape)}")
        # to_dtype_image returns a float32 image itself: subtract into a new tensor then, as v2.Normalize does.
        centred = scaled.sub_(self._mean) if scaled is not image else scaled.sub(self._mean)
        return centred.div_(self._std)

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean}, std={self.std})"
