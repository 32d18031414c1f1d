"""Streaming shards (data.kind = "webdataset"): tar files in the WebDataset layout, read in order, never indexed.

A shard holds samples as consecutive tar members sharing a key: `<key>.<image extension>` (the image file's own
bytes), `<key>.cls` (the class index, classification) or `<key>.json` (the target list, multilabel and regression)
and `<key>.path.txt` (where the image came from). `main.py shard` writes them with `shards.json` beside them: the
task, the class names and every shard's sample and class counts, which give the epoch's length and the class
counts without reading a shard. Shards from elsewhere (no `shards.json`, or shards it does not list) are counted
once, by one pass over them when the run starts; their class names then come from data.classes.

Under torchrun the shards are split between the processes (webdataset's split_by_node) and each process's between
its loader workers (split_by_worker); with fewer shards than processes x workers every worker reads all of them and
keeps every (processes x workers)-th sample instead. Every process trains the same number of batches per epoch,
whatever its shards hold, or DDP would wait forever on the process with more: each worker cycles through its shards
(the webdataset `repeat` idea) and stops at a quota fixed from the total sample count, so a process whose shards are
short this epoch sees some of its samples twice, as DistributedSampler pads a share, and one whose shards are long
leaves the rest for later epochs (the shard order is reshuffled each epoch, from train.seed and the epoch).

The images decode as image files do (engine.data.load_image) and pass through the same transforms, so the model
sees the same tensors as from the image folder the shards were written from.
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from engine.config import LoaderConfig, ProjectConfig
from engine.data import PreparedData, Progress, class_count_lines
from engine.dataset_paths import DataError, dataset_root, path_key
from engine.shard_patterns import expand_pattern, is_remote
from engine.shard_patterns import resolve_pattern as _resolve_pattern
from engine.transforms import Preprocess

META_NAME = "shards.json"
META_FORMAT = "model-workbench-webdataset"
META_VERSION = 1
# Members that are not the image: everything else in a sample is its image file, under the file's own extension.
_NOT_IMAGE = ("cls", "json", "path.txt")
_SHARD_NAME = re.compile(r"^(train|val)-\d{6}\.tar$")


def resolve_pattern(cfg: ProjectConfig, pattern: str) -> str:
    """Local paths made absolute against the project file's folder; URLs as they are."""
    return _resolve_pattern(cfg.resolve, pattern)


# ---------------------------------------------------------------------------------------------
# The shard set: which shards, how many samples each, which classes


@dataclass
class ShardSet:
    """The shards of one split and what is known of them before reading: counts and classes."""

    pattern: str
    urls: list[str]
    counts: list[int]  # samples per shard
    class_counts: list[int]  # per class (classification), positives per label (multilabel); [] for regression
    class_names: list[str]
    task: str
    counted: list[str] = field(default_factory=list)  # shards counted by reading them (not in shards.json)

    @property
    def samples(self) -> int:
        return sum(self.counts)

    def describe(self) -> str:
        how = (
            f"{len(self.counted)} of them counted by reading (no {META_NAME} lists them)"
            if self.counted
            else f"counts from {META_NAME}"
        )
        return f"{len(self.urls)} shard(s), {self.samples} samples ({how})"


def _read_meta(first_url: str) -> tuple[dict[str, Any] | None, str]:
    """shards.json beside the first shard (None when there is none) and where it was looked for."""
    if is_remote(first_url):
        where = first_url.rsplit("/", 1)[0] + "/" + META_NAME
        if first_url.startswith("pipe:"):
            return None, where
        import webdataset as wds

        try:
            with wds.gopen(where) as f:
                text = f.read().decode("utf-8")
        except Exception:  # noqa: BLE001 - no metadata there: the shards are counted instead
            return None, where
    else:
        path = Path(first_url).parent / META_NAME
        where = str(path)
        if not path.is_file():
            return None, where
        text = path.read_text(encoding="utf-8")
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != META_FORMAT:
        raise DataError(f'{where}: not a shard set\'s metadata (no "format": "{META_FORMAT}")')
    if int(meta.get("version", 0)) > META_VERSION:
        raise DataError(
            f"{where}: written by a newer version (format version {meta['version']}; this one reads {META_VERSION})"
        )
    return meta, where


def open_shards(
    pattern: str,
    *,
    task: str,
    classes: Sequence[str],
    what: str = "data.path",
    class_names: Sequence[str] | None = None,
) -> ShardSet:
    """The shards a pattern names, checked: local ones exist, every sample's class is known, counts are known.

    classes: data.classes (used when no shards.json gives them; must agree with it when both do). class_names: the
    training vocabulary, when opening the validation shards.
    """
    if not pattern.strip():
        raise DataError(f"{what} is empty: give the shards, such as shards/train-{{000000..000009}}.tar")
    try:
        urls = expand_pattern(pattern)
    except ValueError as exc:
        raise DataError(f"{what} = {pattern!r}: not a valid shard pattern ({exc})") from None
    if not urls:
        raise DataError(f"{what} = {pattern!r} names no shards")
    missing = [u for u in urls if not is_remote(u) and not Path(u).is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more of {len(urls)})" if len(missing) > 1 else ""
        raise DataError(f"{what}: shard {missing[0]} does not exist{more}; pattern {pattern!r}")
    meta, where = _read_meta(urls[0])
    listed: dict[str, dict[str, Any]] = {}
    names: list[str] = list(classes)
    if meta is not None:
        if meta.get("task") != task:
            raise DataError(f"{where}: the shards hold a {meta.get('task')} dataset, but data.task is '{task}'")
        meta_names = [str(n) for n in meta.get("classes", [])]
        if classes and list(classes) != meta_names:
            raise DataError(
                f"data.classes ({', '.join(classes)}) differs from the classes in {where} "
                f"({', '.join(meta_names)}); leave data.classes empty to use the shards' own"
            )
        names = meta_names
        listed = {str(s["name"]): s for s in meta.get("shards", [])}
    if class_names is not None:
        if names and list(names) != list(class_names):
            raise DataError(
                f"{what}: the validation shards' classes ({', '.join(names)}) differ from the training shards' "
                f"({', '.join(class_names)})"
            )
        names = list(class_names)
    if task != "regression" and not names:
        raise DataError(
            f"{what}: no {META_NAME} beside the shards ({where}) gives the class names; list them in data.classes "
            "(in the order of the class indices the shards' .cls members hold)"
        )
    counts: list[int] = []
    per_class = np.zeros(len(names), dtype=np.int64)
    counted: list[str] = []
    for url in urls:
        entry = listed.get(url.rsplit("/", 1)[-1])
        if entry is not None:
            counts.append(int(entry["samples"]))
            if task != "regression":
                per_class += np.asarray(entry.get("class_counts", [0] * len(names)), dtype=np.int64)
            continue
        n, c = _count_shard(url, task, len(names))
        counts.append(n)
        per_class += c
        counted.append(url)
    shards = ShardSet(
        pattern, urls, counts, per_class.tolist() if task != "regression" else [], names, task, counted=counted
    )
    if task == "regression" and not shards.class_names:
        shards.class_names = [str(n) for n in (meta or {}).get("classes", [])] or ["value"]
    return shards


def _count_shard(url: str, task: str, num_classes: int) -> tuple[int, np.ndarray]:
    """(samples, per-class counts) of one shard, by reading it once (no metadata lists it)."""
    per_class = np.zeros(num_classes, dtype=np.int64)
    n = 0
    for sample in _samples([url]):
        target = _target(sample, task, num_classes)
        n += 1
        if task == "classification":
            per_class[int(target)] += 1
        elif task == "multilabel":
            per_class += np.asarray(target, dtype=np.float64).round().astype(np.int64)
    return n, per_class


def _samples(urls: Iterable[str]) -> Iterator[dict[str, Any]]:
    """The samples of the shards in order: webdataset opens each shard (url_opener: local paths, URLs, pipe:) and
    groups members into samples by key (group_by_keys); the members come from _tar_members."""
    from webdataset.tariterators import group_by_keys, url_opener

    def handler(exc: Exception) -> bool:
        raise DataError(f"cannot read shard: {' '.join(str(a) for a in exc.args if isinstance(a, str))}") from exc

    opened = url_opener(({"url": u} for u in urls), handler=handler)
    yield from group_by_keys(_tar_members(opened), handler=handler)


_BLOCK = 512
_META = re.compile(r"__[^/]*__($|/)")


def _tar_members(opened: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Each regular file of each opened shard as {"fname", "data", "__url__"}, then {} at the end of the shard (what
    webdataset's tar_file_expander yields).

    A lean reader of the tar headers: Python's tarfile, which webdataset's expander uses, spent about 0.4 ms
    decoding every header field of every member, a third of a small image's loading time (3 members a sample). The
    checksum of every header is verified; GNU long names and pax `path` records are honoured; other entries
    (folders, links, global pax headers) are skipped, as webdataset skips non-regular members.
    """
    for source in opened:
        url, stream = source["url"], source["stream"]
        try:
            yield from _members_of(url, stream)
        finally:
            stream.close()
        yield {}


def _members_of(url: str, stream: Any) -> Iterator[dict[str, Any]]:
    offset = 0
    long_name: str | None = None
    while True:
        header = stream.read(_BLOCK)
        if len(header) < _BLOCK:
            if header.strip(b"\0"):
                raise DataError(f"{url}: truncated tar header at byte {offset}")
            return
        if header == b"\0" * _BLOCK:
            return  # the end-of-archive marker
        stored = header[148:156].split(b"\0", 1)[0].strip()
        try:
            size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
            checksum = int(stored, 8)
        except ValueError:
            raise DataError(f"{url}: not a tar file (no valid header at byte {offset})") from None
        if checksum != sum(header[:148]) + 256 + sum(header[156:]):
            raise DataError(f"{url}: not a tar file (header checksum wrong at byte {offset})")
        data = stream.read(size)
        if len(data) < size:
            raise DataError(f"{url}: truncated at byte {offset + _BLOCK + len(data)} (member of {size} bytes)")
        pad = -size % _BLOCK
        if pad:
            stream.read(pad)
        offset += _BLOCK + size + pad
        kind = header[156:157]
        if kind == b"L":  # GNU long name: the next member's name
            long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
            continue
        if kind == b"x":  # pax extended header: its path, if any, names the next member
            for record in data.decode("utf-8", "surrogateescape").split("\n"):
                _, _, field = record.partition(" ")
                if field.startswith("path="):
                    long_name = field[5:]
            continue
        if kind not in (b"0", b"\0", b"7"):
            long_name = None
            continue  # folders, links, global headers: not samples' members
        if long_name is not None:
            name, long_name = long_name, None
        else:
            name = header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            prefix = header[345:500].split(b"\0", 1)[0]
            if header[257:262] == b"ustar" and prefix:
                name = prefix.decode("utf-8", "surrogateescape") + "/" + name
        if ("/" not in name and name.startswith("__") and name.endswith("__")) or _META.match(name):
            continue  # webdataset's metadata members
        yield {"fname": name, "data": data, "__url__": url}


def _target(sample: dict[str, Any], task: str, num_classes: int) -> Any:
    where = f"{sample.get('__url__')}: sample {sample.get('__key__')}"
    try:
        if task == "classification":
            value = int(bytes(sample["cls"]).decode("ascii").strip())
            if not 0 <= value < num_classes:
                raise DataError(f"{where}: class index {value} is not below the number of classes ({num_classes})")
            return value
        values = [float(v) for v in json.loads(bytes(sample["json"]).decode("utf-8"))]
    except KeyError as exc:
        raise DataError(f"{where}: no .{exc.args[0]} member holds its target") from None
    except (ValueError, TypeError) as exc:
        raise DataError(f"{where}: unreadable target ({exc})") from None
    if task == "multilabel" and len(values) != num_classes:
        raise DataError(f"{where}: {len(values)} label values for {num_classes} labels")
    return values


def _image_bytes(sample: dict[str, Any]) -> tuple[str, bytes]:
    for key, value in sample.items():
        if not key.startswith("__") and key not in _NOT_IMAGE:
            return key, bytes(value)
    raise DataError(f"{sample.get('__url__')}: sample {sample.get('__key__')} has no image member")


# ---------------------------------------------------------------------------------------------
# The stream


def _world() -> tuple[int, int]:
    from engine.samplers import distributed_world

    world = distributed_world()
    return world if world is not None else (1, 0)


class ShardStream(IterableDataset):
    """One split's samples, (transformed image, target tensor), streamed from its shards.

    Training (quota set): each process yields exactly `quota` samples per epoch, each loader worker its fixed part,
    from its shards cycled as often as needed; shard order and a shuffle buffer are drawn from seed and the epoch.
    Evaluation (no quota): every sample once over all processes and workers, in order.
    """

    def __init__(
        self,
        shards: ShardSet,
        transform: Callable,
        task: str,
        *,
        train: bool,
        shuffle: bool = False,
        buffer: int = 1000,
        seed: int = 0,
    ):
        self.shards = shards
        self.transform = transform
        self.task = task
        self.train = train
        self.shuffle = shuffle
        self.buffer = buffer
        self.seed = seed
        self.epoch = 0
        self.batch_size = 1  # set by stream_loader, with the worker count and drop_last: they fix the quotas
        self.workers = 0
        self.drop_last = False
        self.targets: list[Any] = []  # not known before reading; counts are in shards.class_counts

    def set_epoch(self, epoch: int) -> None:
        """Each epoch draws its own shard order and shuffle (the loader's workers are started per epoch)."""
        self.epoch = epoch

    def quotas(self) -> list[int]:
        """Samples each loader worker of this process yields per epoch.

        One process: exactly the samples of each worker's shards (or stride), so an epoch reads every sample once.
        Several (training): the total spread evenly over the processes (rounded up, as DistributedSampler pads)
        in whole batches per worker, the partial batch to one worker, so every process runs ceil(share / batch)
        batches whatever its shards hold this epoch. Evaluation: each slot's own samples (no collective waits on
        an evaluation batch; the sums are reduced once).
        """
        world, rank = _world()
        workers = max(self.workers, 1)
        if not self.train or world == 1:
            return [self._slot_samples(rank * workers + w) for w in range(workers)]
        share = -(-self.shards.samples // world)
        full, rest = divmod(share, self.batch_size)
        out = []
        for worker in range(workers):
            quota = (full // workers + (1 if worker < full % workers else 0)) * self.batch_size
            if rest and worker == full % workers:
                quota += rest
            out.append(quota)
        return out

    def per_process(self) -> int:
        """Samples this process yields per epoch."""
        return sum(self.quotas())

    def batches(self) -> int:
        """Batches this process yields per epoch (the same on every process when training)."""
        b = self.batch_size
        return sum(q // b if self.drop_last else -(-q // b) for q in self.quotas())

    def __len__(self) -> int:
        return self.per_process()

    def __getitem__(self, index: int) -> Any:
        raise DataError(
            f"the training data is streamed from shards (data.kind = 'webdataset', {self.shards.pattern}): it is "
            "read in order, so what asked for sample "
            f"{index} by position needs random access that shards do not give; use the image folder or CSV the "
            "shards were written from for it"
        )

    # -- who reads what

    def _slots(self) -> tuple[int, int]:
        """(slots, this worker's slot): every (process, loader worker) pair is one slot."""
        world, rank = _world()
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        return world * workers, rank * workers + worker

    def _split_by_shard(self, slots: int) -> bool:
        return len(self.shards.urls) >= slots

    def _slot_samples(self, slot: int) -> int:
        """Samples a slot reads when the shards are not reshuffled between processes (fixed assignment)."""
        world, _ = _world()
        workers = max(self.workers, 1)
        slots = world * workers
        counts = self.shards.counts
        if self._split_by_shard(slots):
            rank, worker = divmod(slot, workers)
            return sum(counts[rank::world][worker::workers])
        return len(range(slot, sum(counts), slots))

    def _my_urls(self, slots: int, slot: int) -> tuple[list[str], int | None]:
        """(this worker's shards in this epoch's order, the stride slot when samples are split instead)."""
        import webdataset as wds

        world, _ = _world()
        order = list(self.shards.urls)
        reshuffle = self.train and self.shuffle
        if reshuffle and world > 1:  # every process draws the same order, so their shards stay disjoint
            random.Random(self._seed_for(-1)).shuffle(order)
        if not self._split_by_shard(slots):
            return order, slot
        # split_by_node reads RANK and WORLD_SIZE (torchrun's); split_by_worker the DataLoader's worker info
        mine = list(wds.split_by_worker(wds.split_by_node(iter(order))))
        if reshuffle and world == 1:  # one process: each worker keeps its shards (exact counts), in a new order
            random.Random(self._seed_for(-2 - slot)).shuffle(mine)
        return mine, None

    def _seed_for(self, slot: int) -> int:
        return (self.seed * 1_000_003 + self.epoch * 7919 + slot + 1) % 2**63

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        slots, slot = self._slots()
        urls, stride = self._my_urls(slots, slot)
        if self.train:
            info = get_worker_info()
            quota = self.quotas()[info.id if info is not None else 0]
            samples = self._cycled(urls, stride, slots, quota)
            if self.shuffle:
                samples = _shuffled(samples, self.buffer, random.Random(self._seed_for(slot)))
        else:
            samples = self._strided(_samples(urls), stride, slots)
        for sample in samples:
            yield self._decode(sample)

    def _strided(self, samples: Iterator[dict[str, Any]], stride: int | None, slots: int) -> Iterator[dict[str, Any]]:
        if stride is None:
            yield from samples
            return
        for i, sample in enumerate(samples):
            if i % slots == stride:
                yield sample

    def _cycled(self, urls: list[str], stride: int | None, slots: int, quota: int) -> Iterator[dict[str, Any]]:
        """Exactly quota samples from the shards, starting over at the first when they run out."""
        given = 0
        while given < quota:
            before = given
            for sample in self._strided(_samples(urls), stride, slots):
                yield sample
                given += 1
                if given >= quota:
                    return
            if given == before:
                raise DataError(
                    f"{self.shards.pattern}: this loader's shards ({', '.join(urls) or 'none'}) hold no samples"
                )

    def _decode(self, sample: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        from engine.data import load_image, target_tensor

        name, data = _image_bytes(sample)
        try:
            # load_image opens anything Image.open does: the member's bytes decode exactly as the file did
            image = load_image(cast(Any, io.BytesIO(data)))
        except Exception as exc:  # noqa: BLE001 - any decoder failure: name the sample
            raise DataError(f"{sample.get('__url__')}: cannot decode {sample.get('__key__')}.{name}: {exc}") from exc
        x = self.transform(image)
        target = _target(sample, self.task, len(self.shards.class_names))
        return x, target_tensor(target, self.task)


def _shuffled(samples: Iterator[dict[str, Any]], size: int, rng: random.Random) -> Iterator[dict[str, Any]]:
    """A shuffle buffer: each sample leaves at a random place among the next `size` (as webdataset's shuffle)."""
    if size <= 1:
        yield from samples
        return
    buf: list[dict[str, Any]] = []
    for sample in samples:
        buf.append(sample)
        if len(buf) >= size:
            i = rng.randrange(len(buf))
            buf[i], buf[-1] = buf[-1], buf[i]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf


def refuse_stream(cfg: ProjectConfig, what: str) -> None:
    """For what reads samples by position: a clear refusal when the project streams shards."""
    if cfg.data.kind == "webdataset":
        raise DataError(
            f"{what} reads samples by position, which streamed shards (data.kind = 'webdataset', "
            f"{cfg.data.path}) do not give: they are read in order. Use a project whose data.path is the image "
            "folder or CSV the shards were written from"
        )


def check_loader_settings(cfg: LoaderConfig) -> None:
    """Samplers that need positions (and settings that draw other than once each) cannot work on a stream."""
    s = cfg.sampler
    if s.name not in ("random", "sequential"):
        raise DataError(
            f"loader.sampler.name = '{s.name}' draws samples by position, which streamed shards "
            "(data.kind = 'webdataset') do not give; use 'random' (a shuffle buffer) or 'sequential'"
        )
    if s.name == "random" and (s.replacement or s.num_samples is not None):
        setting = "replacement" if s.replacement else "num_samples"
        raise DataError(
            f"loader.sampler.{setting} does not apply to streamed shards (data.kind = 'webdataset'), which read "
            "every sample once per epoch; remove it"
        )


class StreamLoader(DataLoader):
    """A DataLoader over a stream whose length is the batches the workers yield (each ends its own partial batch),
    not len(dataset) / batch_size as torch counts an iterable dataset."""

    def __len__(self) -> int:
        assert isinstance(self.dataset, ShardStream)  # what stream_loader builds it on
        return self.dataset.batches()


def stream_loader(
    dataset: ShardStream,
    cfg: LoaderConfig,
    *,
    collate_fn: Callable[[list[Any]], Any] | None,
    seed: int,
    pin_memory: bool,
    workers: int,
) -> DataLoader:
    """A DataLoader over a stream: batches from the workers in turn, exactly len(loader) per epoch on every process.

    Workers are started each epoch (never persistent) so each epoch's copy of the stream carries its epoch.
    """
    from engine.samplers import seed_worker

    dataset.batch_size = cfg.batch_size
    dataset.workers = workers
    dataset.drop_last = False
    if dataset.train:
        # as build_loader: a last batch of one sample breaks BatchNorm in training mode, so such batches are dropped
        ones = cfg.batch_size > 1 and any(q % cfg.batch_size == 1 and q > 1 for q in dataset.quotas())
        dataset.drop_last = cfg.drop_last or ones
    generator = torch.Generator()
    generator.manual_seed(seed)
    return StreamLoader(
        dataset,
        batch_size=cfg.batch_size,
        drop_last=dataset.drop_last,
        num_workers=workers,
        collate_fn=collate_fn,
        pin_memory=pin_memory,
        persistent_workers=False,
        worker_init_fn=seed_worker if workers > 0 else None,
        generator=generator,
    )


# ---------------------------------------------------------------------------------------------
# Preparing a project's data


@dataclass
class StreamedData(PreparedData):
    """PreparedData whose splits are streams: counts from the shard sets, no per-sample targets or keys."""

    train_shards: ShardSet | None = None
    val_shards: ShardSet | None = None

    def summary(self, max_reasons: int = 5) -> str:
        assert self.train_shards is not None  # prepare_webdataset sets it
        lines = [f"{self.task}: streamed shards {self.train_shards.pattern}: {self.train_shards.describe()}"]
        if self.val_shards is not None:
            lines.append(f"Validation shards {self.val_shards.pattern}: {self.val_shards.describe()}")
        else:
            lines.append("No validation set.")
        lines += class_count_lines(self.task, self.class_names, self.train_counts, self.val_counts)
        if self.warnings:
            lines.append("Warnings:")
            lines += [f"  {w}" for w in self.warnings]
        return "\n".join(lines)


def prepare_webdataset(cfg: ProjectConfig, pre: Preprocess, *, progress: Progress = None) -> StreamedData:
    """engine.data.prepare_data for data.kind = "webdataset": the shards opened and counted, the streams built."""
    from engine.data import DataSource
    from engine.transforms import build_transforms

    d = cfg.data
    problems = []
    if d.exclude or d.relabel:
        problems.append(
            "data.exclude and data.relabel name images by path, which streamed shards do not look up; write the "
            "shards again from the corrected dataset (main.py shard)"
        )
    if d.val_fraction > 0 and not d.val_path:
        problems.append(
            f"data.val_fraction = {d.val_fraction:g} cannot split a stream of shards: give the validation shards "
            "in data.val_path, or set data.val_fraction to 0 to train without validation"
        )
    if problems:
        raise DataError("; ".join(problems))
    check_loader_settings(cfg.loader)
    pattern = resolve_pattern(cfg, d.path)
    train_shards = open_shards(pattern, task=d.task, classes=d.classes)
    val_shards = None
    if d.val_path:
        val_shards = open_shards(
            resolve_pattern(cfg, d.val_path),
            task=d.task,
            classes=d.classes,
            what="data.val_path",
            class_names=train_shards.class_names,
        )
    train_tf = build_transforms(pre, d.augment, train=True, keep_aspect=d.keep_aspect)
    eval_tf = build_transforms(pre, d.augment, train=False, keep_aspect=d.keep_aspect)
    shuffle = cfg.loader.sampler.name == "random" and cfg.loader.shuffle is not False
    train = ShardStream(
        train_shards, train_tf, d.task, train=True, shuffle=shuffle, buffer=d.shuffle_buffer, seed=cfg.train.seed
    )
    val = ShardStream(val_shards, eval_tf, d.task, train=False) if val_shards and val_shards.samples else None
    warnings = []
    if cfg.loader.decoded_cache == "on":
        warnings.append("loader.decoded_cache = 'on' does not apply to streamed shards; images decode every epoch")
    for shards, label in ((train_shards, "training"), (val_shards, "validation")):
        if shards is not None and shards.counted:
            warnings.append(
                f"{label}: {len(shards.counted)} shard(s) not listed in a {META_NAME} were counted by reading"
            )
    k = len(train_shards.class_names)
    source = DataSource(
        kind="webdataset",
        path=Path(train_shards.urls[0]).parent if not is_remote(train_shards.urls[0]) else Path(pattern),
        task=d.task,
        class_names=list(train_shards.class_names),
        targets=[],
        files=None,
        array=None,
        warnings=warnings,
    )
    return StreamedData(
        task=d.task,
        class_names=list(train_shards.class_names),
        num_outputs=k,
        train=cast(Any, train),
        val=cast(Any, val),
        train_targets=[],
        val_targets=[],
        train_counts=list(train_shards.class_counts),
        val_counts=list(val_shards.class_counts) if val_shards is not None else [0] * len(train_shards.class_counts),
        skipped=[],
        warnings=warnings,
        source=source,
        val_source=None,
        train_shards=train_shards,
        val_shards=val_shards,
    )


# ---------------------------------------------------------------------------------------------
# Writing shards (main.py shard)


@dataclass
class ShardWriteResult:
    out: Path
    shards: dict[str, list[str]]  # split -> shard file names
    samples: dict[str, int]
    skipped: int
    replaced: int  # shard files of a previous set removed

    def patterns(self) -> dict[str, str]:
        """The data.path / data.val_path pattern of each split."""
        out = {}
        for split, names in self.shards.items():
            if names:
                last = len(names) - 1
                out[split] = str(self.out / (f"{split}-{{000000..{last:06d}}}.tar" if last else names[0]))
        return out


def previous_shard_set(out: Path) -> list[Path] | None:
    """The files of a shard set `main.py shard` wrote in out (None when out holds anything else): shards.json of
    this format, and only the shards it lists (or their unfinished .tmp files)."""
    meta_path = out / META_NAME
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(meta, dict) or meta.get("format") != META_FORMAT:
        return None
    files = [meta_path]
    for entry in out.iterdir():
        if entry == meta_path:
            continue
        name = entry.name.removesuffix(".tmp")
        if not entry.is_file() or entry.is_symlink() or not _SHARD_NAME.match(name):
            return None
        files.append(entry)
    return files


def write_shards(
    data: str | os.PathLike,
    out: str | os.PathLike,
    *,
    shard_size: int,
    kind: str = "auto",
    task: str = "classification",
    val_fraction: float = 0.0,
    split_seed: int = 0,
    progress: Callable[[str], None] = lambda message: None,
) -> ShardWriteResult:
    """Shards of an image folder or CSV: every usable image's own bytes and its label, shard_size samples a shard.

    The source is only read. out must be empty or missing, or hold a previous shard set (then replaced). With
    val_fraction, a stratified split as data.val_fraction makes goes to val-*.tar, the rest to train-*.tar.
    """
    import webdataset as wds

    from engine.data import scan_source, split_indices

    if shard_size < 1:
        raise DataError(f"--shard-size = {shard_size}: must be at least 1")
    if not 0 <= val_fraction < 1:
        raise DataError(f"--val-fraction = {val_fraction:g}: must be at least 0 and below 1")
    source_path = Path(os.path.expanduser(str(data))).absolute()
    out_dir = Path(os.path.expanduser(str(out))).absolute()
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"--out {out_dir}: is a file; give a folder for the shards")
    if source_path.is_dir() and (out_dir == source_path or source_path in out_dir.parents):
        raise DataError(f"--out {out_dir} is inside the dataset {source_path}; the source is never written to")
    previous: list[Path] = []
    if out_dir.is_dir() and any(out_dir.iterdir()):
        found = previous_shard_set(out_dir)
        if found is None:
            raise DataError(
                f"--out {out_dir} is not empty and does not hold a shard set written by main.py shard "
                f"(a {META_NAME} and its shards only); give an empty or new folder"
            )
        previous = found
    source = scan_source(source_path, kind=kind, task=task)
    if source.files is None:
        raise DataError(f"{source_path}: shards are written from an image folder or a CSV, not a .{source.kind}")
    progress(f"{len(source)} samples in {source.path} ({len(source.skipped)} skipped)")
    root = dataset_root(source.path, source.kind)
    train_idx, val_idx = split_indices(source.targets, task, val_fraction, split_seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in previous:  # a set this command wrote earlier: its files only, never anything else
        old.unlink()
    k = len(source.class_names)
    entries: list[dict[str, Any]] = []
    written: dict[str, list[str]] = {"train": [], "val": []}
    totals: dict[str, int] = {"train": 0, "val": 0}
    for split, positions in (("train", train_idx), ("val", val_idx)):
        for start in range(0, len(positions), shard_size):
            chunk = positions[start : start + shard_size]
            name = f"{split}-{len(written[split]):06d}.tar"
            tmp = out_dir / (name + ".tmp")
            counts = np.zeros(k, dtype=np.int64)
            with wds.TarWriter(str(tmp), encoder=False, mtime=0) as sink:
                for i in chunk:
                    path = source.files[i]
                    target = source.targets[i]
                    sample: dict[str, Any] = {
                        "__key__": f"{i:09d}",
                        _extension(path): path.read_bytes(),
                        "path.txt": path_key(path, root).encode("utf-8"),
                    }
                    if task == "classification":
                        sample["cls"] = str(int(target)).encode("ascii")
                        counts[int(target)] += 1
                    else:
                        sample["json"] = json.dumps([float(v) for v in target]).encode("utf-8")
                        if task == "multilabel":
                            counts += np.asarray(target, dtype=np.float64).round().astype(np.int64)
                    sink.write(sample)
            tmp.replace(out_dir / name)
            written[split].append(name)
            totals[split] += len(chunk)
            entry: dict[str, Any] = {"name": name, "split": split, "samples": len(chunk)}
            if task != "regression":
                entry["class_counts"] = counts.tolist()
            entries.append(entry)
            progress(f"{name}: {len(chunk)} samples")
    meta = {
        "format": META_FORMAT,
        "version": META_VERSION,
        "task": task,
        "classes": list(source.class_names),
        "source": str(source.path),
        "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "shards": entries,
    }
    tmp_meta = out_dir / (META_NAME + ".tmp")
    tmp_meta.write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    tmp_meta.replace(out_dir / META_NAME)
    return ShardWriteResult(out_dir, written, totals, len(source.skipped), max(len(previous) - 1, 0))


def _extension(path: Path) -> str:
    """The image's member extension: its own suffix, lower case (webdataset keys end at the first dot)."""
    suffix = path.suffix.lower().lstrip(".")
    return suffix or "img"


def read_back(shard: str | os.PathLike) -> list[dict[str, Any]]:
    """Every sample of one shard as webdataset reads it (tests, and anyone checking a shard by hand)."""
    return list(_samples([str(shard)]))
