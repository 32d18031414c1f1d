"""Image files that fail while a run reads them: reported with the batch they were in, never a crash mid-epoch.

The scan decoded (or, reading headers only, looked at) every file, but a file can still fail later: it was
overwritten or cut short after the scan, or only a full decode shows the damage. A dataset that meets such a
file (engine.data.ImageFileDataset) does not raise. Training serves another sample in its place (the next
readable one of the same class, found the same way every time); evaluation leaves the sample out. Either way
the item carries a SampleFailure, and ReportingCollate moves those onto the batch, so they cross from a
DataLoader worker process to the main process with the batch itself. There FailureLog logs each file once by
name, keeps them for the run's summary, and records them in the scan cache (engine.scan_cache.record_failures),
so the next scan lists the file as skipped.

Why training replaces rather than drops: a replaced sample keeps every batch at its size and every index of the
split served, so BatchNorm never sees a batch of one, the processes of a torchrun run keep stepping together,
the feature cache still holds one row per index, and the sampler's draws (what a checkpoint's resume replays)
are those of the run without the failure. The replacement is chosen by position alone, so a run repeated with
the same unreadable file is the same run. Evaluation drops instead, since its results name each sample.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.dataset_paths import DataError

# More unreadable files than this share of a split (and more than MIN_FAILED) stops the run: the data is not
# what was scanned, and training on what is left would not be the run the user asked for.
MAX_FAILED_SHARE = 0.1
MIN_FAILED = 2
# A sample and this many replacements in a row unreadable: the data is broken beyond replacing.
MAX_TRIES = 16


@dataclass(frozen=True)
class SampleFailure:
    """One image file that could not be read: its path, why, the dataset it was scanned from, its position."""

    path: str
    reason: str
    dataset: str  # the scanned folder or CSV the file belongs to ("" when unknown)
    index: int  # its position in the split dataset
    replaced_by: str | None = None  # the file served in its place (training), or None (left out)

    def as_dict(self) -> dict[str, str]:
        return {"path": self.path, "reason": self.reason}


def reason_of(exc: BaseException) -> str:
    """An exception as the one-line reason a report gives."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class Reported(tuple):  # an item of any shape; only the attribute matters
    """A dataset item, (inputs, target), that also carries the failures met while reading it."""

    failures: list[SampleFailure]

    def __new__(cls, item: Sequence[Any], failures: list[SampleFailure]) -> Reported:
        self = super().__new__(cls, item)
        self.failures = failures
        return self

    def __reduce__(self) -> tuple[Any, ...]:  # pickled to the main process as item and failures
        return (Reported, (tuple(self), self.failures))


class Dropped:
    """In place of an item that could not be read and is left out of the batch (evaluation)."""

    __slots__ = ("failures",)

    def __init__(self, failures: list[SampleFailure]):
        self.failures = failures

    def __reduce__(self) -> tuple[Any, ...]:
        return (Dropped, (self.failures,))


class Batch(list):  # whatever the inner collate made: (inputs, targets[, sizes])
    """A collated batch and the failures met while reading its items."""

    failures: list[SampleFailure]

    def __init__(self, parts: Iterable[Any], failures: list[SampleFailure]):
        super().__init__(parts)
        self.failures = failures

    def __reduce__(self) -> tuple[Any, ...]:
        return (Batch, (list(self), self.failures))

    def pin_memory(self) -> Batch:
        """As the DataLoader pins a plain batch, keeping the failures (its pinning calls this method)."""
        from torch.utils.data._utils.pin_memory import pin_memory

        return Batch([pin_memory(part) for part in self], self.failures)


class ReportingCollate:
    """Wraps a collate: items left out are dropped, and the failures of every item ride on the Batch.

    Module-level and plain, so DataLoader worker processes can pickle it. An empty Batch comes out when every
    item of a batch was left out.
    """

    def __init__(self, inner: Callable[[list[Any]], Any]):
        self.inner = inner

    def __call__(self, items: Sequence[Any]) -> Batch:
        failures: list[SampleFailure] = []
        kept: list[Any] = []
        for item in items:
            found = getattr(item, "failures", None)
            if found:
                failures += found
            if isinstance(item, Dropped):
                continue
            kept.append(tuple(item) if isinstance(item, Reported) else item)
        if not kept:
            return Batch([], failures)
        return Batch(self.inner(kept), failures)


def batch_failures(batch: Any) -> list[SampleFailure]:
    """The failures a batch carries (none for a batch from another collate)."""
    return list(getattr(batch, "failures", None) or [])


class TooManyFailures(DataError):
    """More files of a split failed than a run can stand; the message says how many and which."""


class FailureLog:
    """The main process's record of a run's unreadable files: each logged once, counted per split, recorded."""

    def __init__(self, log: Callable[[str], None], sizes: dict[str, int] | None = None):
        self.log = log
        self.sizes = dict(sizes or {})  # split -> its samples, for the share that stops the run
        self.seen: dict[str, SampleFailure] = {}
        self.split_of: dict[str, str] = {}
        self.counts: dict[str, int] = {}  # unreadable files per split
        self.unrecorded: list[SampleFailure] = []

    def add(self, failures: Iterable[SampleFailure], split: str = "train", *, quiet: bool = False) -> None:
        """Note failures (repeats of a known file are ignored); raises TooManyFailures past the split's share."""
        for failure in failures:
            if failure.path in self.seen:
                continue
            self.seen[failure.path] = failure
            self.split_of[failure.path] = split
            self.counts[split] = self.counts.get(split, 0) + 1
            self.unrecorded.append(failure)
            if not quiet:
                instead = f"; {failure.replaced_by} is used in its place" if failure.replaced_by else "; left out"
                self.log(f"Unreadable image skipped ({split}): {failure.path}: {failure.reason}{instead}")
        self.check()

    def check(self) -> None:
        for split, size in self.sizes.items():
            count = self.counts.get(split, 0)
            if count >= MIN_FAILED and count > MAX_FAILED_SHARE * size:
                failed = [f for f in self.seen.values() if self.split_of[f.path] == split]
                names = "; ".join(f"{f.path}: {f.reason}" for f in failed[:3])
                raise TooManyFailures(
                    f"{count} of the {size} {split} images could not be read while training (more than "
                    f"{MAX_FAILED_SHARE:.0%}): the files changed since the dataset was scanned. Stopped rather "
                    f"than train on what is left; scan the dataset again. First: {names}"
                )

    def failures(self) -> list[SampleFailure]:
        return list(self.seen.values())

    def summary(self) -> list[dict[str, str]]:
        """{"path", "reason", "split"} per unreadable file, in the order they were met."""
        return [{**f.as_dict(), "split": self.split_of[f.path]} for f in self.seen.values()]

    def record(self) -> None:
        """Write the files not yet recorded into their datasets' scan caches (a cache that cannot be written
        costs only the next scan's time)."""
        from engine.scan_cache import record_failures

        pending, self.unrecorded = self.unrecorded, []
        by_dataset: dict[str, list[tuple[str, str]]] = {}
        for f in pending:
            if f.dataset:
                by_dataset.setdefault(f.dataset, []).append((f.path, f.reason))
        for dataset, entries in by_dataset.items():
            record_failures(Path(dataset), entries)


def describe(failures: Sequence[SampleFailure | dict[str, str]]) -> str:
    """One line naming the unreadable files for a summary."""
    paths = [f.path if isinstance(f, SampleFailure) else str(f.get("path")) for f in failures]
    shown = ", ".join(os.path.basename(p) for p in paths[:5])
    more = f" and {len(paths) - 5} more" if len(paths) > 5 else ""
    return f"{len(paths)} unreadable image(s) skipped: {shown}{more}"
