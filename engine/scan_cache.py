"""The scan cache: what verifying each image file of a dataset found, kept between starts.

Verifying decodes every image once, which takes seconds per ten thousand files; the second start on an unchanged
dataset reads the results back instead. One JSON file per dataset path under the cache folder holds, for each
file, its size, modification time, inode and change time as they were when it was decoded, with what decoding
found (its problem, or its width and height). A file is trusted only while all four are unchanged; any other file
is decoded again. The file is replaced atomically (a killed write leaves the previous one), and one written by
another version of the format is ignored.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

VERSION = 1
ENV = "MWB_CACHE_DIR"


def cache_root() -> Path:
    """The workbench's cache folder: $MWB_CACHE_DIR, else $XDG_CACHE_HOME/model-workbench, else ~/.cache/..."""
    given = os.environ.get(ENV)
    if given:
        return Path(given).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "model-workbench"


Stamp = tuple[int, int, int, int]  # size, mtime_ns, inode, ctime_ns
Entry = tuple[Stamp, str | None, tuple[int, int] | None]  # stamp, problem, (width, height)


def stamp(st: os.stat_result) -> Stamp:
    return (st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)


class _Columns(NamedTuple):
    """A cache file as read: one list per field, a file's values at its position in names."""

    names: list[str]
    size: list[int]
    mtime_ns: list[int]
    inode: list[int]
    ctime_ns: list[int]
    width: list[int]
    height: list[int]
    problems: list[str | None]

    def entries(self) -> dict[str, Entry]:
        return {
            name: ((size, mtime, ino, ctime), problem, (w, h) if w else None)
            for name, size, mtime, ino, ctime, w, h, problem in zip(*self, strict=True)
        }


class ScanCache:
    """The remembered verification results of one dataset (a folder or a CSV file).

    On disk the files are columns (names relative to the dataset's folder, then one list per stamp field, the
    problems by position), which JSON reads several times faster than one nested record per file.
    """

    def __init__(self, dataset: Path):
        self.dataset = Path(dataset)
        self.base = os.fsdecode(self.dataset if self.dataset.is_dir() else self.dataset.parent)
        digest = hashlib.blake2b(str(self.dataset.absolute()).encode("utf-8", "surrogateescape"), digest_size=16)
        self.file = cache_root() / "scan" / f"{digest.hexdigest()}.json"
        self._columns = self._read()
        self._old: dict[str, Entry] | None = None
        self.new: dict[str, Entry] = {}
        self._unchanged = False  # check() found every remembered file, unchanged, in order: new is old then
        self._order: list[str] = []  # the names check() was given, in order
        self.hits = 0

    @property
    def old(self) -> dict[str, Entry]:
        """The remembered results by file name, made from the columns when first asked for: a second start that
        finds every file unchanged compares the columns as they are read and never needs it."""
        if self._old is None:
            self._old = self._columns.entries() if self._columns is not None else {}
        return self._old

    def _read(self) -> _Columns | None:
        try:
            with open(self.file, encoding="utf-8") as fh:
                data = json.load(fh)
        except (OSError, ValueError):  # none yet, unreadable or half a file: scan afresh
            return None
        if not isinstance(data, dict) or data.get("version") != VERSION or data.get("dataset") != str(self.dataset):
            return None
        try:
            names = data["names"]
            size, mtime, ino, ctime, width, height = columns = [
                data[k] for k in ("size", "mtime_ns", "inode", "ctime_ns", "width", "height")
            ]
            if not isinstance(names, list) or not all(isinstance(c, list) and len(c) == len(names) for c in columns):
                return None
            if set(map(type, names)) - {str}:
                return None
            problems: list[str | None] = [None] * len(names)
            for k, v in data["problems"].items():
                i = int(k)
                if i < 0:
                    return None
                problems[i] = str(v)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError):  # another layout: not trusted
            return None
        return _Columns(names, size, mtime, ino, ctime, width, height, problems)

    def _key(self, path: str | os.PathLike) -> str:
        text = os.fsdecode(path)
        base = self.base
        if text.startswith(base) and text[len(base) : len(base) + 1] == os.sep:
            return text[len(base) + 1 :]
        return os.path.relpath(text, base)

    def lookup(self, path: str | os.PathLike, st: Stamp) -> tuple[bool, str | None, tuple[int, int] | None]:
        """(found, problem, (width, height)) for a file whose stamp is st; found is False when it must be decoded."""
        key = self._key(path)
        entry = self.old.get(key)
        if entry is None or entry[0] != st:
            return False, None, None
        self._changing()[key] = entry
        self.hits += 1
        return True, entry[1], entry[2]

    def check(self, paths: Sequence[str]) -> tuple[list[str | None], list[int], dict[int, Stamp]]:
        """Stat each file and look it up: (problems, positions to decode, their stamps by position).

        problems holds the remembered result of each file found unchanged (None elsewhere); a file that cannot be
        stat-ed is to decode without a stamp (decoding says what is wrong with it, and it is not remembered).
        When the files are those remembered, in the same order (a second start on an unchanged dataset), their
        stamps are compared a column at a time against the file's columns, with no object per file beyond its
        stat; any difference, or a file that cannot be stat-ed, leaves the comparison to _check_each. save()
        writes the files in the order given here, so that the next start's files are those remembered in order.
        """
        prefix = self.base + os.sep
        if paths and os.path.commonprefix([min(paths), max(paths)]).startswith(prefix):  # all under the base
            cut = len(prefix)
            keys = [p[cut:] for p in paths]
        else:
            keys = [self._key(p) for p in paths]
        self._order = keys
        cols = self._columns
        if cols is None or not paths or keys != cols.names or self.new:
            return self._check_each(paths, keys)
        stat = os.stat
        step = 8192  # bounds the stat results held at once
        for a in range(0, len(paths), step):
            try:
                stats = [stat(p) for p in paths[a : a + step]]
            except OSError:
                return self._check_each(paths, keys)
            b = a + len(stats)
            if (
                [st.st_mtime_ns for st in stats] != cols.mtime_ns[a:b]
                or [st.st_size for st in stats] != cols.size[a:b]
                or [st.st_ctime_ns for st in stats] != cols.ctime_ns[a:b]
                or [st.st_ino for st in stats] != cols.inode[a:b]
            ):
                return self._check_each(paths, keys)
        self._unchanged = True
        self.hits += len(paths)
        return list(cols.problems), [], {}

    def _check_each(
        self, paths: Sequence[str], keys: list[str]
    ) -> tuple[list[str | None], list[int], dict[int, Stamp]]:
        """check() a file at a time, looking each up by name: the files differ from those remembered."""
        problems: list[str | None] = [None] * len(paths)
        todo: list[int] = []
        stamps: dict[int, Stamp] = {}
        old, new = self.old, self.new
        stat = os.stat
        hits = 0
        for i, (path, key) in enumerate(zip(paths, keys, strict=True)):
            try:
                st = stat(path)
            except OSError:
                todo.append(i)
                continue
            s = (st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)
            entry = old.get(key)
            if entry is not None and entry[0] == s:
                new[key] = entry
                problems[i] = entry[1]
                hits += 1
            else:
                stamps[i] = s
                todo.append(i)
        self.hits += hits
        return problems, todo, stamps

    def record(self, path: str | os.PathLike, st: Stamp, problem: str | None, size: tuple[int, int] | None) -> None:
        self._changing()[self._key(path)] = (st, problem, size)

    def _changing(self) -> dict[str, Entry]:
        """new, about to be added to: made a copy of old first where check() left it standing for old."""
        if self._unchanged:
            self.new, self._unchanged = dict(self.old), False
        return self.new

    def save(self) -> None:
        """Write what this scan found (files no longer there drop out); a cache that cannot be written is skipped."""
        if self._unchanged:
            return
        new = self.new
        # In check()'s order (the parallel checks record files as their chunks finish), then any others
        order = dict.fromkeys(k for k in self._order if k in new) if self._order else {}
        order.update(dict.fromkeys(new))
        names = list(order)
        if new == self.old and (not new or (self._columns is not None and names == self._columns.names)):
            return
        entries = [(k, new[k]) for k in names]
        payload: dict[str, Any] = {"version": VERSION, "dataset": str(self.dataset), "names": [k for k, _ in entries]}
        for j, field in enumerate(("size", "mtime_ns", "inode", "ctime_ns")):
            payload[field] = [e[0][j] for _, e in entries]
        payload["width"] = [e[2][0] if e[2] else 0 for _, e in entries]
        payload["height"] = [e[2][1] if e[2] else 0 for _, e in entries]
        payload["problems"] = {str(i): e[1] for i, (_, e) in enumerate(entries) if e[1] is not None}
        tmp = self.file.with_name(f".{self.file.name}.{os.getpid()}.tmp")
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "w", encoding="utf-8") as fh:  # ensure_ascii: undecodable names survive as escapes
                json.dump(payload, fh, separators=(",", ":"))
            os.replace(tmp, self.file)
        except OSError:  # a read-only or full cache folder costs only the next start's speed
            try:
                tmp.unlink()
            except OSError:
                pass


def record_failures(dataset: Path, failures: list[tuple[str, str]], *, when: str = "training") -> None:
    """Mark files of a dataset as unreadable (path, reason), found after its scan (when: "training", "evaluation",
    "the audit"): the next scan lists them as skipped with the reason, until a file's size or times change and it
    is looked at again."""
    cache = ScanCache(dataset)
    cache.new = dict(cache.old)
    for path, reason in failures:
        try:
            st = stamp(os.stat(path))
        except OSError:  # gone: the next scan does not find it at all
            continue
        cache.record(Path(path), st, f"unreadable when {when} read it: {reason}", None)
    cache.save()
