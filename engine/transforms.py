"""Image preprocessing and train augmentation, built from the weights' own recipe or the project's settings."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2

from engine.config import AugmentConfig


@dataclass(frozen=True)
class Preprocess:
    """What a model expects of its input: resize, crop, normalisation."""

    resize_size: int  # the shorter side is resized to this (the longer side when keeping aspect)
    crop_size: int  # centre crop for evaluation; random-resized-crop size for training
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"  # bilinear, bicubic or nearest


def build_transforms(pre: Preprocess, augment: AugmentConfig, *, train: bool, keep_aspect: bool) -> Callable:
    """The image pipeline for one split: PIL RGB images or float CHW tensors in [0, 1] in, normalised float32 out."""
    interpolation = InterpolationMode(pre.interpolation)
    steps: list[Callable] = [v2.ToImage()]  # PIL -> uint8 tensor; a plain tensor is taken as the image as is
    if keep_aspect:
        # size=None with max_size scales the longer side to resize_size (up or down); the pad collate
        # then evens out the different shapes, so no crop of any kind.
        steps.append(v2.Resize(None, max_size=pre.resize_size, interpolation=interpolation, antialias=True))
    elif train and augment.random_resized_crop:
        steps.append(v2.RandomResizedCrop(pre.crop_size, interpolation=interpolation, antialias=True))
    else:
        steps += [v2.Resize(pre.resize_size, interpolation=interpolation, antialias=True),
                  v2.CenterCrop(pre.crop_size)]
    if train:
        if augment.horizontal_flip:
            steps.append(v2.RandomHorizontalFlip())
        if augment.rotation > 0:
            # Rotating a tensor supports only nearest and bilinear sampling.
            rot = (InterpolationMode.NEAREST if interpolation == InterpolationMode.NEAREST
                   else InterpolationMode.BILINEAR)
            steps.append(v2.RandomRotation(augment.rotation, interpolation=rot))
        if augment.color_jitter > 0:
            c = augment.color_jitter
            steps.append(v2.ColorJitter(brightness=c, contrast=c, saturation=c))
    steps += [
        v2.ToDtype(torch.float32, scale=True),  # uint8 -> [0, 1]; float input is already in [0, 1]
        v2.Normalize(list(pre.mean), list(pre.std)),
        v2.ToPureTensor(),  # plain tensors collate and pickle without torchvision's wrapper types
    ]
    return v2.Compose(steps)
