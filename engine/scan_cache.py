"""The scan cache: what verifying each image file of a dataset found, kept between starts.

Verifying decodes every image once, which takes seconds per ten thousand files; the second start on an unchanged
dataset reads the results back instead. One file per dataset path under the cache folder holds, for each file,
its size, modification time, inode and change time as they were when it was decoded, with what decoding found
(its problem, or its width and height). A file is trusted only while all four are unchanged; any other file is
decoded again. The file is replaced atomically (a killed write leaves the previous one), and one written by
another version of the format is ignored.

The file is binary, so that reading it back costs no parsing per file: a first line naming the format, a JSON
line (version, dataset, count, the byte length of the names, the problems by position), the files' names
relative to the dataset's folder joined by NUL characters (UTF-8, lone surrogates kept), then one column of
64-bit little-endian integers per field of FIELDS. Version 1 was one JSON file of lists (<digest>.json), which a
second start on 200,000 files spent a sixth of its time parsing; such a file is not read, and is removed when
this version's file is written.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from array import array
from collections.abc import Sequence
from pathlib import Path
from typing import Any

VERSION = 2
ENV = "MWB_CACHE_DIR"
MAGIC = b"model-workbench scan cache\n"
FIELDS = ("size", "mtime_ns", "inode", "ctime_ns", "width", "height")
_TYPECODES = ("q", "q", "Q", "q", "q", "q")  # inodes are unsigned; times before 1970 are negative
_STEP = 8192  # files stat-ed before their stamps are compared: bounds the stat results held at once
# A folder's files are stat-ed by name relative to the open folder (the kernel then resolves one name, not the
# whole path: a fifth less time per file); where os.stat cannot take dir_fd, by their full paths.
_BY_FOLDER = os.stat in os.supports_dir_fd and hasattr(os, "O_DIRECTORY")


def cache_root() -> Path:
    """The workbench's cache folder: $MWB_CACHE_DIR, else $XDG_CACHE_HOME/model-workbench, else ~/.cache/..."""
    given = os.environ.get(ENV)
    if given:
        return Path(given).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "model-workbench"


Stamp = tuple[int, int, int, int]  # size, mtime_ns, inode, ctime_ns
Entry = tuple[Stamp, str | None, tuple[int, int] | None]  # stamp, problem, (width, height)
Runs = Sequence[tuple[str, Sequence[str]]]  # (folder, names of files in it): paths given as folder/name, in order


def stamp(st: os.stat_result) -> Stamp:
    return (st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)


def _parse(data: bytes) -> tuple[dict[str, Any], str, list[array]] | None:
    """(header, names joined by NUL, a column per field) of a cache file of this version; None for any other."""
    if not data.startswith(MAGIC):
        return None
    line_end = data.find(b"\n", len(MAGIC))
    if line_end < 0:
        return None
    try:
        header = json.loads(data[len(MAGIC) : line_end])
        if not isinstance(header, dict) or header.get("version") != VERSION:
            return None
        count, names_bytes = header["count"], header["names_bytes"]
        problems = header["problems"]
        if not (isinstance(count, int) and isinstance(names_bytes, int) and isinstance(problems, dict)):
            return None
        if not isinstance(header.get("dataset"), str) or count < 0 or names_bytes < 0:
            return None
        if any(not isinstance(v, str) or not 0 <= int(k) < count for k, v in problems.items()):
            return None
        start = line_end + 1 + names_bytes
        if len(data) != start + 8 * count * len(FIELDS):
            return None
        view = memoryview(data)  # the names and columns are read from their place in data, not copied out first
        names = str(view[line_end + 1 : start], "utf-8", "surrogatepass")
    except (KeyError, TypeError, ValueError):  # another layout, or bytes that are not text: not trusted
        return None
    if names.count("\0") != max(count - 1, 0) or (count == 0) != (names == ""):
        return None
    columns = []
    for j, code in enumerate(_TYPECODES):
        column = array(code)
        column.frombytes(view[start + 8 * count * j : start + 8 * count * (j + 1)])
        if sys.byteorder == "big":
            column.byteswap()
        columns.append(column)
    return header, names, columns


def read_payload(file: Path) -> dict[str, Any] | None:
    """A cache file as the lists it holds: version, dataset, names, a list per field of FIELDS, and problems
    ({position as text: problem}); None for a file that is missing, cut short, or of another layout or version."""
    try:
        parsed = _parse(file.read_bytes())
    except OSError:
        return None
    if parsed is None:
        return None
    header, names, columns = parsed
    payload = {"version": header["version"], "dataset": header["dataset"], "names": names.split("\0") if names else []}
    payload.update({field: column.tolist() for field, column in zip(FIELDS, columns, strict=True)})
    payload["problems"] = header["problems"]
    return payload


def write_payload(file: Path, payload: dict[str, Any]) -> None:
    """Write a cache file from lists as read_payload gives them, atomically (a temporary file renamed over it).

    Raises OverflowError for a value a 64-bit column cannot hold (a time past the year 2262), OSError when the
    file cannot be written.
    """
    names = payload["names"]
    text = "\0".join(names).encode("utf-8", "surrogatepass")
    columns = [array(code, payload[field]) for field, code in zip(FIELDS, _TYPECODES, strict=True)]
    if sys.byteorder == "big":
        for column in columns:
            column.byteswap()
    header = {
        "version": payload["version"],
        "dataset": payload["dataset"],
        "count": len(names),
        "names_bytes": len(text),
        "problems": payload["problems"],
    }
    tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as fh:  # json's ensure_ascii: the header is one line of ASCII, whatever it names
            fh.write(MAGIC + json.dumps(header, separators=(",", ":")).encode("ascii") + b"\n" + text)
            for column in columns:
                fh.write(column.tobytes())
        os.replace(tmp, file)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise


def _fits(entry: Entry) -> bool:
    """Whether a file's stamp fits the 64-bit columns (a time past the year 2262 does not)."""
    size, mtime, ino, ctime = entry[0]
    signed = range(-(2**63), 2**63)
    return size in signed and mtime in signed and ctime in signed and 0 <= ino < 2**64


class _Columns:
    """A cache file as read: the names joined by NUL, a column per field, the problems by position."""

    def __init__(self, names: str, columns: list[array], problems: dict[str, str]):
        self.names = names
        self.count = len(columns[0])
        self.size, self.mtime_ns, self.inode, self.ctime_ns, self.width, self.height = columns
        self.problems: list[str | None] = [None] * self.count
        for k, v in problems.items():
            self.problems[int(k)] = v

    def entries(self) -> dict[str, Entry]:
        names = self.names.split("\0") if self.count else []
        columns = [c.tolist() for c in (self.size, self.mtime_ns, self.inode, self.ctime_ns, self.width, self.height)]
        return {
            name: ((size, mtime, ino, ctime), problem, (w, h) if w else None)
            for name, size, mtime, ino, ctime, w, h, problem in zip(names, *columns, self.problems, strict=True)
        }


class ScanCache:
    """The remembered verification results of one dataset (a folder or a CSV file)."""

    def __init__(self, dataset: Path):
        self.dataset = Path(dataset)
        self.base = os.fsdecode(self.dataset if self.dataset.is_dir() else self.dataset.parent)
        digest = hashlib.blake2b(str(self.dataset.absolute()).encode("utf-8", "surrogateescape"), digest_size=16)
        self.file = cache_root() / "scan" / f"{digest.hexdigest()}.scan"
        self._columns = self._read()
        self._old: dict[str, Entry] | None = None
        self.new: dict[str, Entry] = {}
        self._unchanged = False  # check() found every remembered file, unchanged, in order: new is old then
        self._order: list[str] = []  # the names check() was given, in order (where it compared them one by one)
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
            with open(self.file, "rb") as fh:
                parsed = _parse(fh.read())
        except OSError:  # none yet, or unreadable: scan afresh
            return None
        if parsed is None:  # half a file, another version or layout
            return None
        header, names, columns = parsed
        if header["dataset"] != str(self.dataset):
            return None
        return _Columns(names, columns, header["problems"])

    def _key(self, path: str | os.PathLike) -> str:
        text = os.fsdecode(path)
        base = self.base
        if text.startswith(base) and text[len(base) : len(base) + 1] == os.sep:
            return text[len(base) + 1 :]
        return os.path.relpath(text, base)

    def _keys(self, paths: Sequence[str]) -> list[str]:
        prefix = self.base + os.sep
        if paths and os.path.commonprefix([min(paths), max(paths)]).startswith(prefix):  # all under the base
            cut = len(prefix)
            return [p[cut:] for p in paths]
        return [self._key(p) for p in paths]

    def _listing(self, paths: Sequence[str], runs: Runs | None) -> str:
        """The names of paths relative to the base, joined by NUL as the cache file keeps them; from runs, a
        folder's names are joined at once, with no string made per file."""
        if runs is None:
            return "\0".join(self._keys(paths))
        parts = []
        for folder, names in runs:
            if names:
                rel = self._key(folder)
                head = "" if rel == os.curdir else rel + os.sep
                parts.append(head + ("\0" + head).join(names))
        return "\0".join(parts)

    def lookup(self, path: str | os.PathLike, st: Stamp) -> tuple[bool, str | None, tuple[int, int] | None]:
        """(found, problem, (width, height)) for a file whose stamp is st; found is False when it must be decoded."""
        key = self._key(path)
        entry = self.old.get(key)
        if entry is None or entry[0] != st:
            return False, None, None
        self._changing()[key] = entry
        self.hits += 1
        return True, entry[1], entry[2]

    def check(
        self, paths: Sequence[str], runs: Runs | None = None
    ) -> tuple[list[str | None], list[int], dict[int, Stamp]]:
        """Stat each file and look it up: (problems, positions to decode, their stamps by position).

        problems holds the remembered result of each file found unchanged (None elsewhere); a file that cannot be
        stat-ed is to decode without a stamp (decoding says what is wrong with it, and it is not remembered).
        runs, where given (a folder walk has them), says which folder each path is in: paths are then each run's
        folder joined with its names, run after run.

        When the files are those remembered, in the same order (a second start on an unchanged dataset), their
        names are compared as one string and their stamps a column at a time against the file's columns, with
        no object per file beyond its stat; any difference, or a file that cannot be stat-ed, leaves the
        comparison to _check_each. save() writes the files in the order given here, so that the next start's
        files are those remembered in order.
        """
        cols = self._columns
        if cols is not None and paths and not self.new and cols.count == len(paths):
            if self._listing(paths, runs) == cols.names and self._same_stamps(paths, runs, cols):
                self._unchanged = True
                self.hits += len(paths)
                return list(cols.problems), [], {}
        keys = self._keys(paths)
        self._order = keys
        return self._check_each(paths, keys)

    @staticmethod
    def _same_stamps(paths: Sequence[str], runs: Runs | None, cols: _Columns) -> bool:
        """Whether every file's stamp is the remembered one at its position (False too if one cannot be stat-ed)."""
        stat = os.stat
        done = 0

        def same(stats: list[os.stat_result]) -> bool:
            a, b = done, done + len(stats)
            return (
                [st.st_mtime_ns for st in stats] == cols.mtime_ns[a:b].tolist()
                and [st.st_size for st in stats] == cols.size[a:b].tolist()
                and [st.st_ctime_ns for st in stats] == cols.ctime_ns[a:b].tolist()
                and [st.st_ino for st in stats] == cols.inode[a:b].tolist()
            )

        try:
            if runs is None or not _BY_FOLDER:
                for a in range(0, len(paths), _STEP):
                    stats = [stat(p) for p in paths[a : a + _STEP]]
                    if not same(stats):
                        return False
                    done += len(stats)
                return True
            for folder, names in runs:
                fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    for a in range(0, len(names), _STEP):
                        stats = [stat(name, dir_fd=fd) for name in names[a : a + _STEP]]
                        if not same(stats):
                            return False
                        done += len(stats)
                finally:
                    os.close(fd)
        except (OSError, ValueError):  # gone, unreadable, or a name no file can have: compared one by one
            return False
        return done == len(paths)

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
        if new == self.old and (not new or (self._columns is not None and "\0".join(names) == self._columns.names)):
            return
        entries = [(k, new[k]) for k in names]
        try:
            self._write(entries)
        except OverflowError:  # a stamp no 64-bit column holds: that file alone is checked again next time
            try:
                self._write([(k, e) for k, e in entries if _fits(e)])
            except OSError:
                return
        except OSError:  # a read-only or full cache folder costs only the next start's speed
            return
        try:
            self.file.with_suffix(".json").unlink()  # version 1's file for this dataset, superseded
        except OSError:
            pass

    def _write(self, entries: list[tuple[str, Entry]]) -> None:
        payload: dict[str, Any] = {"version": VERSION, "dataset": str(self.dataset), "names": [k for k, _ in entries]}
        for j, field in enumerate(FIELDS[:4]):
            payload[field] = [e[0][j] for _, e in entries]
        payload["width"] = [e[2][0] if e[2] else 0 for _, e in entries]
        payload["height"] = [e[2][1] if e[2] else 0 for _, e in entries]
        payload["problems"] = {str(i): e[1] for i, (_, e) in enumerate(entries) if e[1] is not None}
        write_payload(self.file, payload)


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
