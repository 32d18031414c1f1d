"""Image preprocessing and train augmentation, built from the weights' own recipe or the project's settings."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torchvision.transforms import InterpolationMode, v2

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
    return v2.Compose(fixed + per_item)


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
    # ToImage again: the cache hands out plain tensors, which torchvision's v2 transforms then treat as images.
    return v2.Compose(fixed), v2.Compose([v2.ToImage()] + per_item)


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
    fixed: list[Callable] = [v2.ToImage()]  # PIL -> uint8 tensor; a plain tensor is taken as the image as is
    steps: list[Callable] = []
    if keep_aspect:
        # size=None with max_size scales the longer side to resize_size (up or down); the pad collate
        # then evens out the different shapes, so no crop of any kind.
        fixed.append(v2.Resize(None, max_size=pre.resize_size, interpolation=interpolation, antialias=True))
    elif train and augment.random_resized_crop:
        if presize:
            # Presizing: the cache keeps the image with its shorter side at resize_size, and the random
            # crops come from that presized image instead of the full-size original.
            fixed.append(v2.Resize(pre.resize_size, interpolation=interpolation, antialias=True))
        steps.append(v2.RandomResizedCrop(pre.crop_size, interpolation=interpolation, antialias=True))
    else:
        fixed += [v2.Resize(pre.resize_size, interpolation=interpolation, antialias=True), v2.CenterCrop(pre.crop_size)]
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
    steps += [
        v2.ToDtype(torch.float32, scale=True),  # uint8 -> [0, 1]; float input is already in [0, 1]
        v2.Normalize(list(pre.mean), list(pre.std)),
        v2.ToPureTensor(),  # plain tensors collate and pickle without torchvision's wrapper types
    ]
    return fixed, steps
