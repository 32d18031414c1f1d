"""Batch assembly for the DataLoader: PyTorch's default stacking, or zero-padding for images of different sizes."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import default_collate

__all__ = ["default_collate", "pad_collate", "get_collate"]


def pad_collate(batch: Sequence[tuple[torch.Tensor, Any]]) -> tuple[torch.Tensor, Any, torch.Tensor]:
    """Images zero-padded at the bottom/right to the batch's largest H and W, the targets, and the original (H, W)s.

    Module-level so DataLoader worker processes can pickle it.
    """
    images = [item[0] for item in batch]
    targets = default_collate([item[1] for item in batch])
    sizes = torch.tensor([tuple(img.shape[-2:]) for img in images], dtype=torch.long)
    h_max, w_max = (int(v) for v in sizes.max(dim=0).values)
    first = images[0]
    out = first.new_zeros((len(images), first.shape[0], h_max, w_max))
    if torch.utils.data.get_worker_info() is not None:
        # As default_collate does: built in shared memory, the batch reaches the main process without a copy.
        out.share_memory_()
    for i, img in enumerate(images):
        h, w = img.shape[-2:]
        out[i, :, :h, :w] = img
    return out, targets, sizes


_COLLATES: dict[str, Callable] = {"default": default_collate, "pad": pad_collate}


def get_collate(name: str) -> Callable:
    """The collate function named in loader.collate."""
    try:
        return _COLLATES[name]
    except KeyError:
        raise ValueError(f"unknown collate {name!r}; allowed: {', '.join(_COLLATES)}") from None
