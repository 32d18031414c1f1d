"""Samplers by name: what they draw, and the errors for settings that do not fit the dataset."""

from collections import Counter

import pytest
import torch
from torch.utils.data import (
    DistributedSampler,
    RandomSampler,
    SequentialSampler,
    SubsetRandomSampler,
    TensorDataset,
    WeightedRandomSampler,
)

from engine.collate import default_collate
from engine.config import LoaderConfig, SamplerConfig
from engine.samplers import SamplerError, ShardedSampler, build_loader, build_sampler


def test_balanced_weighted_sampling_draws_a_9_to_1_dataset_evenly():
    targets = [0] * 900 + [1] * 100
    spec = SamplerConfig(name="weighted_random", weights="balanced", replacement=True, num_samples=10_000)
    g = torch.Generator().manual_seed(1)
    drawn = Counter(targets[i] for i in build_sampler(spec, len(targets), targets, generator=g))
    assert sum(drawn.values()) == 10_000
    for cls in (0, 1):
        assert abs(drawn[cls] - 5_000) <= 500, drawn


def test_plain_random_sampling_keeps_the_imbalance():
    targets = [0] * 900 + [1] * 100
    g = torch.Generator().manual_seed(1)
    drawn = Counter(targets[i] for i in build_sampler(SamplerConfig(name="random"), 1000, targets, generator=g))
    assert drawn[0] == 900 and drawn[1] == 100


@pytest.mark.parametrize(
    "spec, kind",
    [
        (SamplerConfig(name="sequential"), SequentialSampler),
        (SamplerConfig(name="random"), RandomSampler),
        (SamplerConfig(name="random", replacement=True, num_samples=7), RandomSampler),
        (SamplerConfig(name="subset_random", indices=[1, 3, 5]), SubsetRandomSampler),
        (SamplerConfig(name="weighted_random", weights=[1.0] * 10), WeightedRandomSampler),
        (SamplerConfig(name="distributed", num_replicas=2, rank=1), DistributedSampler),
    ],
)
def test_each_sampler_by_name(spec, kind):
    sampler = build_sampler(spec, 10, list(range(10)), generator=torch.Generator().manual_seed(0))
    assert isinstance(sampler, kind)
    drawn = list(sampler)
    assert all(0 <= i < 10 for i in drawn)
    if spec.name == "subset_random":
        assert sorted(drawn) == [1, 3, 5]
    if spec.name == "random" and spec.num_samples:
        assert len(drawn) == 7
    if spec.name == "distributed":
        assert len(drawn) == 5


def test_shuffle_false_makes_the_random_sampler_sequential():
    sampler = build_sampler(SamplerConfig(name="random"), 5, None, shuffle=False)
    assert list(sampler) == [0, 1, 2, 3, 4]


def test_seeded_random_order_is_reproducible():
    orders = [
        list(build_sampler(SamplerConfig(name="random"), 50, None, generator=torch.Generator().manual_seed(3)))
        for _ in range(2)
    ]
    assert orders[0] == orders[1] and orders[0] != list(range(50))


def test_weights_of_the_wrong_length_name_both_lengths():
    with pytest.raises(SamplerError, match=r"3 values .* 10 samples"):
        build_sampler(SamplerConfig(name="weighted_random", weights=[1.0, 1.0, 1.0]), 10, None)


def test_subset_indices_past_the_end():
    with pytest.raises(SamplerError, match="12 is past the end"):
        build_sampler(SamplerConfig(name="subset_random", indices=[0, 12]), 10, None)


def test_weighted_without_replacement_needs_enough_nonzero_weights():
    spec = SamplerConfig(name="weighted_random", weights=[1.0, 0.0, 0.0], replacement=False, num_samples=2)
    with pytest.raises(SamplerError, match="replacement"):
        build_sampler(spec, 3, None)


def test_torchrun_environment_shards_the_sampler(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    sampler = build_sampler(SamplerConfig(name="random"), 20, None)
    assert isinstance(sampler, ShardedSampler)
    assert sampler.num_replicas == 4 and sampler.rank == 2 and len(list(sampler)) == 5


def _dataset(n):
    return TensorDataset(torch.arange(n, dtype=torch.float32).unsqueeze(1), torch.arange(n) % 2)


def test_loader_batches_around_the_sampler_with_drop_last():
    cfg = LoaderConfig(batch_size=4, drop_last=True, sampler=SamplerConfig(name="sequential"))
    loader = build_loader(
        _dataset(10), cfg, train=True, targets=None, collate_fn=default_collate, seed=0, pin_memory=False
    )
    sizes = [len(b[0]) for b in loader]
    assert sizes == [4, 4]
    cfg.drop_last = False
    loader = build_loader(
        _dataset(10), cfg, train=True, targets=None, collate_fn=default_collate, seed=0, pin_memory=False
    )
    assert [len(b[0]) for b in loader] == [4, 4, 2]


def test_batch_larger_than_the_dataset_with_drop_last_is_refused():
    cfg = LoaderConfig(batch_size=64, drop_last=True)
    with pytest.raises(SamplerError, match="larger than the 10 samples"):
        build_loader(_dataset(10), cfg, train=True, targets=None, collate_fn=default_collate, seed=0, pin_memory=False)


def test_evaluation_loader_is_sequential_and_keeps_every_sample():
    cfg = LoaderConfig(batch_size=4, drop_last=True, sampler=SamplerConfig(name="random"))
    loader = build_loader(
        _dataset(10), cfg, train=False, targets=None, collate_fn=default_collate, seed=0, pin_memory=False
    )
    assert torch.cat([b[0] for b in loader]).squeeze(1).tolist() == list(range(10))


def test_balanced_weights_balance_with_the_default_settings():
    targets = [0] * 900 + [1] * 100
    spec = SamplerConfig(name="weighted_random", weights="balanced")
    sampler = build_sampler(spec, len(targets), targets, generator=torch.Generator().manual_seed(2))
    drawn = Counter(targets[i] for i in sampler)
    assert sum(drawn.values()) == 1000 and abs(drawn[1] - 500) <= 60, drawn
