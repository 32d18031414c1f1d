"""Batch assembly: default stacking and zero-padding of differently sized images."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from engine.collate import default_collate, get_collate, pad_collate


class VariedSizes(Dataset):
    """Images whose size depends on the index; module-level so worker processes can use it."""

    def __len__(self) -> int:
        return 6

    def __getitem__(self, i: int):
        return torch.ones(3, 4 + i, 10 - i), torch.tensor(i % 2)


def test_pad_collate_pads_bottom_right_with_zeros_and_reports_sizes():
    batch = [(torch.full((3, 2, 5), 1.0), torch.tensor(0)), (torch.full((3, 4, 3), 2.0), torch.tensor(1))]

    images, targets, sizes = pad_collate(batch)

    assert images.shape == (2, 3, 4, 5)
    assert sizes.dtype == torch.long and sizes.tolist() == [[2, 5], [4, 3]]
    assert targets.tolist() == [0, 1]
    assert torch.all(images[0, :, :2, :] == 1) and torch.all(images[0, :, 2:, :] == 0)
    assert torch.all(images[1, :, :, :3] == 2) and torch.all(images[1, :, :, 3:] == 0)


def test_pad_collate_stacks_vector_targets_like_default_collate():
    batch = [(torch.zeros(3, 2, 2), torch.tensor([1.0, 0.0])), (torch.zeros(3, 3, 1), torch.tensor([0.0, 1.0]))]

    _, targets, _ = pad_collate(batch)

    assert torch.equal(targets, default_collate([t for _, t in batch]))


def test_get_collate_by_name():
    assert get_collate("default") is default_collate
    assert get_collate("pad") is pad_collate
    with pytest.raises(ValueError, match="unknown collate 'zip'; allowed: default, pad"):
        get_collate("zip")


def test_pad_collate_works_in_worker_processes():
    loader = DataLoader(VariedSizes(), batch_size=3, num_workers=2, collate_fn=get_collate("pad"))

    batches = list(loader)

    assert [b[0].shape for b in batches] == [(3, 3, 6, 10), (3, 3, 9, 7)]
    assert batches[1][2].tolist() == [[7, 7], [8, 6], [9, 5]]
    assert float(batches[1][0][0].sum()) == 3 * 7 * 7
