"""Every sampler of torch.utils.data, chosen by name from the project, and the DataLoaders built around them."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    DistributedSampler,
    RandomSampler,
    Sampler,
    SequentialSampler,
    SubsetRandomSampler,
    WeightedRandomSampler,
)

from engine.config import LoaderConfig, SamplerConfig
from engine.data import EngineDataset


class SamplerError(ValueError):
    """A sampler setting that does not fit the dataset (checked once the dataset is known)."""


def distributed_world() -> tuple[int, int] | None:
    """(world_size, rank) when launched under torchrun with more than one process, else None."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
    except ValueError:
        return None
    return (world, rank) if world > 1 else None


# (generator, total) -> one epoch's global order of sample positions
Draw = Callable[[torch.Generator, int], "torch.Tensor | Sequence[int]"]


class ShardedSampler(Sampler[int]):
    """One process's share of an epoch's draw: every process draws the same global order from seed + epoch,
    and process `rank` takes positions rank, rank + replicas, ... of it.

    The draw is any of the single-process samplers' (sequential, a permutation, with replacement, a subset,
    weighted), so class balancing holds across processes: the global draw is balanced, each share is a
    stride of it. pad: repeat the start of the draw so every share has the same length (training, where
    every process must run the same number of batches); without it the shares cover each sample once
    (evaluation, whose sums are reduced over processes).
    """

    def __init__(self, draw: Draw, total: int, *, num_replicas: int, rank: int, seed: int = 0, pad: bool = True):
        if not 0 <= rank < num_replicas:
            raise SamplerError(f"rank {rank} is not below the number of processes ({num_replicas})")
        self._draw = draw  # (generator, total) -> the epoch's global order of sample positions
        self.total = total
        self.num_replicas, self.rank, self.seed, self.pad = num_replicas, rank, seed, pad
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _padded_total(self) -> int:
        if not self.pad or self.total == 0:
            return self.total
        return -(-self.total // self.num_replicas) * self.num_replicas

    def __len__(self) -> int:
        total = self._padded_total()
        return len(range(self.rank, total, self.num_replicas))

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        order = [int(i) for i in self._draw(g, self.total)]
        want = self._padded_total()
        while order and len(order) < want:
            order += order[: want - len(order)]
        return iter(order[self.rank : want : self.num_replicas])


def sharded_sampler(
    spec: SamplerConfig, dataset_len: int, targets: Sequence[int] | None, *, num_replicas: int, rank: int, seed: int
) -> ShardedSampler:
    """The project's sampler, drawn the same way on every process and split into per-process shares."""
    name = spec.name
    kw: dict[str, Any] = {"num_replicas": num_replicas, "rank": rank, "seed": seed}
    if name == "distributed":
        for field_name, value, actual in (("num_replicas", spec.num_replicas, num_replicas), ("rank", spec.rank, rank)):
            if value is not None and value != actual:
                raise SamplerError(
                    f"loader.sampler.{field_name} = {value}, but torchrun gave this process "
                    f"{field_name} {actual}; leave it empty (null) under torchrun"
                )
        shuffle = spec.shuffle
        kw["seed"] = spec.seed
        return ShardedSampler(lambda g, n: torch.randperm(n, generator=g) if shuffle else range(n), dataset_len, **kw)
    if name == "sequential":
        return ShardedSampler(lambda g, n: range(n), dataset_len, **kw)
    if name == "random":
        total = spec.num_samples or dataset_len
        if spec.replacement:
            return ShardedSampler(lambda g, n: torch.randint(dataset_len, (n,), generator=g), total, **kw)
        if total > dataset_len:
            # RandomSampler draws whole permutations back to back for num_samples beyond the data's size
            return ShardedSampler(
                lambda g, n: torch.cat([torch.randperm(dataset_len, generator=g) for _ in range(-(-n // dataset_len))])[
                    :n
                ],
                total,
                **kw,
            )
        return ShardedSampler(lambda g, n: torch.randperm(dataset_len, generator=g)[:n], total, **kw)
    single = build_sampler(spec, dataset_len, targets, world=None)  # checks the settings against the data
    if name == "subset_random":
        assert isinstance(single, SubsetRandomSampler)  # what build_sampler makes of this name
        indices = list(single.indices)
        return ShardedSampler(lambda g, n: [indices[i] for i in torch.randperm(n, generator=g)], len(indices), **kw)
    if name == "weighted_random":
        assert isinstance(single, WeightedRandomSampler)  # what build_sampler makes of this name
        weights = single.weights
        replacement = single.replacement
        return ShardedSampler(
            lambda g, n: torch.multinomial(weights, n, replacement, generator=g), single.num_samples, **kw
        )
    raise SamplerError(f"loader.sampler.name = {name!r}: unknown")


_FROM_ENV = object()


def balanced_weights(targets: Sequence[int]) -> list[float]:
    """Per-sample weights 1/count(class), so every class is drawn equally often."""
    counts = Counter(int(t) for t in targets)
    return [1.0 / counts[int(t)] for t in targets]


def build_sampler(
    spec: SamplerConfig,
    dataset_len: int,
    targets: Sequence[int] | None = None,
    *,
    generator: torch.Generator | None = None,
    shuffle: bool | None = None,
    world: tuple[int, int] | None | object = _FROM_ENV,
) -> Sampler[int]:
    """The sampler a project names, over positions 0..dataset_len-1 of the training set.

    Under torchrun (WORLD_SIZE > 1) every sampler is sharded (ShardedSampler): each rank trains on its own
    share of the same global draw, whatever the name. world: (world_size, rank), None for one process;
    by default read from torchrun's environment.
    """
    name = spec.name
    world = distributed_world() if world is _FROM_ENV else world
    assert world is None or isinstance(world, tuple)
    if world is not None:
        if name == "random" and shuffle is False:
            name = "sequential"
        spec_used = spec if name == spec.name else SamplerConfig(**{**spec.__dict__, "name": name})
        return sharded_sampler(
            spec_used,
            dataset_len,
            targets,
            num_replicas=world[0],
            rank=world[1],
            seed=spec.seed if name == "distributed" else (0 if generator is None else generator.initial_seed()),
        )
    if name == "distributed":
        replicas = spec.num_replicas or (world[0] if world else 1)
        rank = spec.rank if spec.rank is not None else (world[1] if world else 0)
        if rank >= replicas:
            raise SamplerError(f"loader.sampler.rank = {rank}: must be below num_replicas ({replicas})")
        positions: Any = range(dataset_len)  # DistributedSampler only takes its len(); torch types it a Dataset
        return DistributedSampler(positions, num_replicas=replicas, rank=rank, shuffle=spec.shuffle, seed=spec.seed)
    if name == "sequential" or (name == "random" and shuffle is False):
        return SequentialSampler(range(dataset_len))
    if name == "random":
        return RandomSampler(
            range(dataset_len), replacement=bool(spec.replacement), num_samples=spec.num_samples, generator=generator
        )
    if name == "subset_random":
        indices = list(range(dataset_len)) if spec.indices is None else list(spec.indices)
        too_big = [i for i in indices if i >= dataset_len]
        if too_big:
            raise SamplerError(
                f"loader.sampler.indices: {too_big[0]} is past the end of the training set "
                f"({dataset_len} samples, positions 0..{dataset_len - 1})"
            )
        return SubsetRandomSampler(indices, generator=generator)
    if name == "weighted_random":
        if spec.weights == "balanced":
            if targets is None:
                raise SamplerError("loader.sampler.weights = 'balanced' needs class labels")
            weights = balanced_weights(targets)
        else:
            assert not isinstance(spec.weights, str)  # "balanced" is the one word validation lets through
            weights = list(spec.weights or [])
            if len(weights) != dataset_len:
                raise SamplerError(
                    f"loader.sampler.weights has {len(weights)} values but the training set has "
                    f"{dataset_len} samples: give one weight per training sample, or 'balanced'"
                )
        num = spec.num_samples or dataset_len
        replacement = spec.replacement is not False  # drawing with replacement is what makes weights matter
        if not replacement and num > sum(1 for w in weights if w > 0):
            raise SamplerError(
                f"loader.sampler.num_samples = {num} without replacement needs at least that many "
                f"samples of non-zero weight; set replacement = true or lower num_samples"
            )
        return WeightedRandomSampler(weights, num_samples=num, replacement=replacement, generator=generator)
    raise SamplerError(f"loader.sampler.name = {name!r}: unknown")


MAX_AUTO_WORKERS = 8


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the system has one); under torchrun, its share of
    them (the machine's CPUs divided by the processes torchrun started on it), so workers do not oversubscribe."""
    count = os.cpu_count() or 1
    if hasattr(os, "sched_getaffinity"):
        try:
            count = len(os.sched_getaffinity(0))
        except OSError:
            pass
    try:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if distributed_world() is not None else 1
    except ValueError:
        local = 1
    return max(1, count // max(local, 1))


def auto_workers(
    cpus: int, *, cached: bool, augmented: bool, deterministic: bool = False, accelerator: bool = False
) -> tuple[int, str]:
    """The worker count loader.num_workers = null picks, and why.

    cached: the split is served by the decoded-image cache; augmented: its items draw random augmentation;
    deterministic: train.deterministic, which asks for an exact resume (augmentation drawn in worker
    processes is not replayed on resume, so it stays in the training process); accelerator: the model
    runs on a GPU, so the training process leaves its CPUs to the loading.
    """
    if cached and not augmented:
        return 0, "cached, no augmentation"  # indexing is cheaper than passing batches between processes
    if deterministic and augmented:
        return 0, "train.deterministic with augmentation"  # replayed exactly on resume in this process
    if cpus <= 1:
        return 0, "one CPU"
    if accelerator:
        # One CPU stays with the training process, which feeds the GPU.
        return min(cpus - 1, MAX_AUTO_WORKERS), f"{cpus} CPUs, training on a GPU"
    # Training on the CPU: the model's torch threads use every core, and workers would take cores from them
    # (on 2 CPUs one worker made the default project's epochs about 10% slower); a quarter goes to loading.
    return min(cpus // 4, MAX_AUTO_WORKERS), f"{cpus} CPUs shared with training on the CPU"


@dataclass
class LoaderPlan:
    """The worker count, persistence and pinning of one DataLoader, and whether each was chosen automatically."""

    workers: int
    persistent: bool
    pin_memory: bool
    auto_workers: bool
    why: str = ""


def plan_loader(
    cfg: LoaderConfig,
    *,
    cached: bool,
    augmented: bool,
    deterministic: bool = False,
    device_type: str = "cpu",
    cpus: int | None = None,
) -> LoaderPlan:
    """The project's loader settings with every null (auto) filled in for one split trained on device_type."""
    cuda = device_type == "cuda"
    if cfg.num_workers is None:
        workers, why = auto_workers(
            usable_cpus() if cpus is None else cpus,
            cached=cached,
            augmented=augmented,
            deterministic=deterministic,
            accelerator=device_type != "cpu",
        )
    else:
        workers, why = cfg.num_workers, "loader.num_workers"
    persistent = workers > 0 if cfg.persistent_workers is None else bool(cfg.persistent_workers) and workers > 0
    pin = cuda if cfg.pin_memory is None else bool(cfg.pin_memory)
    return LoaderPlan(workers, persistent, pin, cfg.num_workers is None, why)


def describe_plans(train: LoaderPlan, val: LoaderPlan | None) -> str:
    """One log line, such as 'Loader: 1 worker (auto: 4 CPUs shared with training on the CPU), persistent'."""

    def count(plan: LoaderPlan) -> str:
        n = plan.workers
        text = "main process" if n == 0 else f"{n} worker{'s' if n != 1 else ''}"
        return text + (f" (auto: {plan.why})" if plan.auto_workers else "")

    if val is None or (val.workers, val.auto_workers, val.why) == (train.workers, train.auto_workers, train.why):
        where = count(train)
    else:
        where = f"training {count(train)}, validation {count(val)}"
    persistent = any(p.persistent for p in (train, val) if p is not None)
    parts = [f"Loader: {where}"]
    if persistent:
        parts.append("persistent")
    parts.append(f"pinned memory {'on' if train.pin_memory else 'off'}")
    return ", ".join(parts)


def build_loader(
    dataset: EngineDataset,
    cfg: LoaderConfig,
    *,
    train: bool,
    targets: Sequence[int] | None,
    collate_fn: Callable[[list[Any]], Any] | None,
    seed: int,
    pin_memory: bool,
    plan: LoaderPlan | None = None,
) -> DataLoader:
    """A DataLoader with a batch sampler around the project's sampler (train) or a sequential one (eval).

    plan: workers and persistence (see plan_loader); without one, an auto worker count is taken as for an
    uncached dataset.
    """
    n = len(dataset)
    generator = torch.Generator()
    generator.manual_seed(seed)
    if train:
        sampler = build_sampler(cfg.sampler, n, targets, generator=generator, shuffle=cfg.shuffle)
        drop_last = cfg.drop_last
        drawn = _sampler_len(sampler)
        if not drop_last and cfg.batch_size > 1 and drawn > cfg.batch_size and drawn % cfg.batch_size == 1:
            # A last batch of one sample breaks BatchNorm in training mode ("expected more than 1 value per
            # channel"); dropping it loses little, since a shuffled epoch draws the sample next time.
            drop_last = True
        if drop_last and _sampler_len(sampler) < cfg.batch_size:
            raise SamplerError(
                f"loader.batch_size = {cfg.batch_size} is larger than the {_sampler_len(sampler)} "
                "samples drawn per epoch, and loader.drop_last = true would drop every batch; "
                "lower the batch size or set drop_last to false"
            )
    else:
        world = distributed_world()
        sampler = (
            ShardedSampler(lambda g, total: range(total), n, num_replicas=world[0], rank=world[1], pad=False)
            if world
            else SequentialSampler(range(n))
        )
        drop_last = False
    if plan is None:
        plan = plan_loader(cfg, cached=False, augmented=train)
    batches = _EpochBatchSampler(
        sampler, batch_size=cfg.batch_size, drop_last=drop_last, generator=generator, persistent=plan.persistent
    )
    workers = plan.workers
    return DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=collate_fn,
        pin_memory=pin_memory,
        persistent_workers=plan.persistent,
        worker_init_fn=seed_worker if workers > 0 else None,
        generator=generator,
    )


class _EpochBatchSampler(BatchSampler):
    """A BatchSampler that keeps the shared generator's draws the same with persistent workers as without.

    Every new DataLoader iterator draws its workers' base seed from the loader's generator, which the sampler
    shares (its state is what a checkpoint saves). Without persistent workers that is one draw per epoch; with
    them only the first epoch of a process draws, so the orders of later epochs, and of a resumed run, would
    depend on the worker setting. This sampler makes the missing draw itself at the start of later epochs.
    """

    def __init__(
        self, sampler: Sampler[int], batch_size: int, drop_last: bool, *, generator: torch.Generator, persistent: bool
    ):
        super().__init__(sampler, batch_size=batch_size, drop_last=drop_last)
        self._generator = generator
        self._persistent = persistent
        self._epochs = 0

    def __iter__(self) -> Iterator[list[int]]:
        if self._persistent and self._epochs > 0:
            torch.empty((), dtype=torch.int64).random_(generator=self._generator)  # as DataLoader draws a seed
        self._epochs += 1
        yield from super().__iter__()


def _sampler_len(sampler: Sampler) -> int:
    return len(sampler)  # type: ignore[arg-type]  # every sampler built above has a length; Sampler's type has none


def seed_worker(worker_id: int) -> None:
    """A DataLoader worker's start: its own numpy and random seeds (and per process under torchrun); Ctrl-C ignored."""
    # PyTorch seeds each worker's torch RNG; numpy and random need the same for reproducible augmentation.
    import random
    import signal

    import numpy as np

    # Ctrl-C is the main process's to handle (it stops after the batch); workers end when it does.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    seed = torch.initial_seed() % 2**32
    world = distributed_world()
    if world is not None:  # every process's loader shares the run's seed: draw each process its own augmentation
        seed = (seed + 7919 * world[1]) % 2**32
        torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def restart_workers(loader: DataLoader) -> DataLoader:
    """The same loader (dataset, batch sampler, generator, settings) with new worker processes, so a dataset whose
    transform changed between epochs (a phase of train.phases) is what the workers load; without persistent
    workers each epoch starts new ones anyway and the loader itself is returned.

    The new loader draws its workers' seed at its first epoch as a new loader does, so the batch sampler stops
    making that draw itself, as in a run resumed at this point.
    """
    if not (loader.persistent_workers and loader.num_workers > 0):
        return loader
    batches = loader.batch_sampler
    if isinstance(batches, _EpochBatchSampler):
        batches._epochs = 0
    return DataLoader(
        loader.dataset,
        batch_sampler=batches,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        persistent_workers=True,
        worker_init_fn=loader.worker_init_fn,
        generator=loader.generator,
    )
