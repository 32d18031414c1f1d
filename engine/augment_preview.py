"""Training images as the model sees them: drawn through the training pipeline, de-normalised for display.

The pipeline is the one a run builds (engine.transforms.build_transforms with the project's augmentation, as
engine.data.prepare_data builds it for the training set), applied to the run's own training set (the same split),
with torch's global generator seeded, which is the generator torchvision's random transforms draw from. A run with
the decoded-image cache applies the same steps to images it decoded once (engine.transforms.split_transforms): the
same pixels, except that random resized crops are taken from the presized image there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from engine.backbones import preprocess_for
from engine.config import AugmentConfig, ProjectConfig
from engine.data import EngineDataset, prepare_data
from engine.transforms import Preprocess, build_transforms

PREVIEW_COUNT = 8


@dataclass(frozen=True)
class PreviewImages:
    images: np.ndarray  # (N, H, W, 3) uint8, de-normalised
    labels: list[str]  # each image's class (or target) as text
    indices: list[int]  # training-set positions drawn


def denormalise(x: torch.Tensor, pre: Preprocess) -> np.ndarray:
    """A normalised CHW float image back to HWC uint8 for display (clipped to the displayable range)."""
    mean = torch.tensor(pre.mean, dtype=x.dtype).view(-1, 1, 1)
    std = torch.tensor(pre.std, dtype=x.dtype).view(-1, 1, 1)
    pixels = (x * std + mean).clamp(0, 1).mul(255).round().to(torch.uint8)
    if pixels.shape[0] == 1:
        pixels = pixels.expand(3, -1, -1)
    return pixels.permute(1, 2, 0).contiguous().numpy()


def pick(n: int, seed: int, count: int = PREVIEW_COUNT) -> list[int]:
    """The training-set positions a draw shows: `count` of them, chosen by the seed (a private generator)."""
    generator = torch.Generator()
    generator.manual_seed(seed)
    return torch.randperm(n, generator=generator)[: min(count, n)].tolist()


class AugmentPreview:
    """A project's training set, scanned once, and draws of it through the training pipeline."""

    def __init__(self, cfg: ProjectConfig):
        if cfg.data.kind == "webdataset":
            from engine.webdataset_data import refuse_stream

            refuse_stream(cfg, "The augmentation preview")
        self.cfg = cfg
        self.pre = preprocess_for(cfg.model, cfg.data)
        self.data = prepare_data(cfg, self.pre)

    @property
    def train(self) -> EngineDataset:
        return self.data.train

    def key(self) -> tuple[Any, ...]:
        return self.key_of(self.cfg)

    @staticmethod
    def key_of(cfg: ProjectConfig) -> tuple[Any, ...]:
        """What the scanned training set and its preprocessing depend on (another key needs a new preview)."""
        d, m = cfg.data, cfg.model
        return (
            *(cfg.base_dir, d.path, d.kind, d.task, d.val_path, d.val_fraction, d.split_seed),
            *(m.backbone, m.weights, d.image_size, tuple(d.mean), tuple(d.std), d.keep_aspect),
        )

    def pipeline(self, augment: AugmentConfig) -> Any:
        """The training pipeline for this augmentation, as prepare_data builds it for a run."""
        return build_transforms(self.pre, augment, train=True, keep_aspect=self.cfg.data.keep_aspect)

    def draw(self, augment: AugmentConfig, seed: int, count: int = PREVIEW_COUNT) -> PreviewImages:
        """`count` training images through the pipeline with torch's generator seeded; the caller's RNG is kept."""
        train = self.train
        indices = pick(len(train), seed, count)
        transform = self.pipeline(augment)
        saved = train.transform
        out: list[np.ndarray] = []
        labels: list[str] = []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            try:
                train.transform = transform
                for i in indices:
                    x, _ = train[i]
                    out.append(denormalise(x, self.pre))
                    labels.append(self._label(i))
            finally:
                train.transform = saved
        return PreviewImages(_stack(out), labels, indices)

    def _label(self, index: int) -> str:
        target = self.data.train_targets[index]
        names = self.data.class_names
        if self.data.task == "classification" and isinstance(target, int) and 0 <= target < len(names):
            return names[target]
        if isinstance(target, Sequence) and self.data.task == "multilabel":
            return ", ".join(n for n, t in zip(names, target, strict=False) if t) or "(none)"
        return str(target)


def _stack(images: list[np.ndarray]) -> np.ndarray:
    """The images in one array; sizes that differ (keep_aspect) are padded to the largest."""
    if not images:
        return np.zeros((0, 1, 1, 3), dtype=np.uint8)
    h = max(i.shape[0] for i in images)
    w = max(i.shape[1] for i in images)
    out = np.zeros((len(images), h, w, 3), dtype=np.uint8)
    for k, image in enumerate(images):
        out[k, : image.shape[0], : image.shape[1]] = image
    return out
