"""Datasets from an image folder, a CSV or a .npz: scanned and verified once, split, and served as tensors."""

from __future__ import annotations

import contextlib
import csv
import gc
import itertools
import math
import operator
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS

from engine import image_scan
from engine.config import TASKS, ProjectConfig
from engine.dataset_paths import DataError, PathList, dataset_root, path_key, path_keys
from engine.image_scan import load_image as load_image  # re-exported: the engine reads images through engine.data
from engine.image_scan import to_rgb as to_rgb
from engine.sample_failures import MAX_TRIES, Dropped, Reported, SampleFailure, reason_of
from engine.scan_cache import Runs, ScanCache
from engine.text import readable
from engine.transforms import Preprocess, build_transforms

Progress = Callable[[int, int], None] | None

_KIND_BY_SUFFIX = {".csv": "csv", ".npz": "npz"}
_NOT_TRAINING_CLASS = "label '{}' is not one of the training classes"


@dataclass
class SkippedFile:
    path: str
    reason: str


@dataclass
class DataSource:
    """What a scan found, before any split."""

    kind: str  # "folder" | "csv" | "npz"
    path: Path
    task: str
    class_names: list[str]  # label vocabulary; for regression the output names
    targets: list  # per kept sample: int (classification), multi-hot list[float], or list[float] (regression)
    files: Sequence[Path] | None  # folder/csv: one image per kept sample (a folder's: a PathList)
    array: np.ndarray | None  # npz: the kept images, (N,H,W,C) in the stored dtype
    skipped: list[SkippedFile] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    rows: list[int] | None = None  # npz: each kept sample's row in the archive (rows with bad labels are skipped)

    def __len__(self) -> int:
        return len(self.targets)

    def class_counts(self) -> list[int]:
        """Samples per class (classification), positives per label (multilabel); empty for regression."""
        return _class_counts(self.targets, self.task, len(self.class_names))


def _class_counts(targets: Sequence, task: str, num_classes: int) -> list[int]:
    if task == "classification":
        return np.bincount(np.asarray(targets, dtype=np.int64), minlength=num_classes).tolist()
    if task == "multilabel":
        if not len(targets):
            return [0] * num_classes
        return np.asarray(targets, dtype=np.float64).sum(axis=0).round().astype(int).tolist()
    return []


# ---------------------------------------------------------------------------------------------
# Checking image files (reading them: engine/image_scan.py)


def _verify(
    texts: Sequence[str], progress: Progress, cache: ScanCache | None = None, runs: Runs | None = None
) -> list[str | None]:
    """The problem (or None) of each file, from its header and end (engine/image_scan.py says what that finds),
    in worker processes for a big dataset. runs: the folder of each file, where a folder walk knows it (see
    ScanCache.check).

    With a scan cache, a file whose size, times and inode are those it had when last checked is not read again:
    its remembered result is used, and the cache is written back with this scan's findings. progress gets
    (done, total) after each chunk of files; an exception it raises (a stop) ends the scan there, worker processes
    included, and the cache keeps every file checked until then, so the next scan goes on from there.
    """
    total = len(texts)
    if cache is not None:
        problems, todo, stamps = cache.check(texts, runs)
    else:
        problems, todo, stamps = [None] * total, list(range(total)), {}
    done = total - len(todo)
    try:
        if progress is not None:
            progress(done, total)
        with contextlib.closing(image_scan.inspect_many([texts[i] for i in todo])) as chunks:
            for start, results in chunks:
                for j, (problem, size) in enumerate(results, start=start):
                    i = todo[j]
                    problems[i] = problem
                    if cache is not None and i in stamps:
                        cache.record(texts[i], stamps[i], problem, size)
                done += len(results)
                if progress is not None:
                    progress(done, total)
    finally:
        if cache is not None:
            cache.save()
    return problems


# ---------------------------------------------------------------------------------------------
# Scanning


def scan_source(
    path: str | os.PathLike,
    *,
    kind: str = "auto",
    task: str = "classification",
    class_names: Sequence[str] | None = None,
    progress: Progress = None,
    single_class_ok: bool = False,
) -> DataSource:
    """Find, label and verify every sample of a dataset; unusable files are skipped with a reason.

    class_names: the training vocabulary when scanning a separate validation source; labels outside it
    are skipped. single_class_ok: accept a classification dataset with one class (the audit looks at such a
    dataset; training refuses it).
    """
    if task not in TASKS:
        raise DataError(f"unknown task {task!r}; allowed: {', '.join(TASKS)}")
    p = Path(os.path.expanduser(str(path)))
    if kind == "webdataset":
        raise DataError(
            f"{p}: data.kind = 'webdataset' streams tar shards in order; this needs every image of the dataset at "
            "once (random access), which shards do not give. Point it at the image folder or CSV the shards were "
            "written from"
        )
    if not p.exists():
        raise DataError(f"{p}: no such file or folder")
    kind = _detect_kind(p, kind)
    given = list(class_names) if class_names is not None else None
    with _collector_paused():
        cache = ScanCache(p) if kind in ("folder", "csv") else None
        if kind == "folder":
            source = _scan_folder(p, task, given, progress, cache)
        elif kind == "csv":
            source = _scan_csv(p, task, given, progress, cache)
        else:
            source = _scan_npz(p, task, given, progress)
    _check_enough(source, vocabulary_given=given is not None or single_class_ok)
    return source


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """No cyclic garbage collection while a scan makes a few objects per file: each full collection walks every
    object of a process that has imported PyTorch, and a 20,000-image scan triggered enough of them to double its
    time. The scan itself makes no reference cycles; cycles other threads make meanwhile wait until it ends."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _detect_kind(p: Path, kind: str) -> str:
    if kind not in ("auto", "folder", "csv", "npz"):
        raise DataError(f"unknown data kind {kind!r}; allowed: auto, folder, csv, npz")
    if kind == "auto":
        if p.is_dir():
            return "folder"
        detected = _KIND_BY_SUFFIX.get(p.suffix.lower())
        if detected is None:
            raise DataError(
                f"{p}: not a dataset; expected an image folder (one sub-folder per class), a .csv file or a .npz file"
            )
        return detected
    if kind == "folder" and not p.is_dir():
        raise DataError(f"{p} is a file, but an image folder (one sub-folder per class) was expected")
    if kind in ("csv", "npz") and p.is_dir():
        raise DataError(f"{p} is a folder, but a .{kind} file was expected")
    return kind


def _check_enough(source: DataSource, *, vocabulary_given: bool) -> None:
    if not source.targets:
        first = f"; first problem: {source.skipped[0].path}: {source.skipped[0].reason}" if source.skipped else ""
        if source.kind == "folder":
            raise DataError(
                f"no images found in {source.path}, expected one sub-folder per class "
                f"(such as {source.path / 'cat' / '001.jpg'}){first}"
            )
        raise DataError(f"no usable samples in {source.path}{first}")
    if source.task == "multilabel" and not source.class_names:
        raise DataError(f"{source.path}: no sample has a label; multilabel needs at least one label")
    # A validation source may hold only some of the training classes; the training source needs two.
    if source.task == "classification" and not vocabulary_given:
        present = [name for name, n in zip(source.class_names, source.class_counts(), strict=True) if n]
        if len(present) < 2:
            found = ", ".join(f"'{name}'" for name in present)
            raise DataError(f"{source.path}: classification needs at least 2 classes; found {len(present)}: {found}")


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


_entry_name = operator.attrgetter("name")


class _Seen:
    """The real paths of the image files found so far in one class, to count a file reached twice once.

    A folder of regular files alone is kept as its real path and names, and its files' paths are made only when a
    symlink is met in the class (a class of plain folders, the usual kind, never needs them): two different such
    folders never share a file, as a regular file's real path is its folder's and its name, and one reached again
    (through a symlink to it, or as the real folder after a symlink led there) is refused by its real path.
    """

    __slots__ = ("_files", "_folders", "_heads")

    def __init__(self) -> None:
        self._files: set[str] = set()
        self._folders: list[tuple[str, list[str]]] = []  # (real folder + os.sep, names) not yet in _files
        self._heads: set[str] = set()  # the plain folders taken: one reached again (a symlink to it) is not taken

    def add_folder(self, head: str, names: list[str]) -> bool:
        """Take a plain folder's files unless one of them was found before (then False, and nothing is taken)."""
        if head in self._heads:
            return False
        if self._files:
            targets = [head + name for name in names]
            if not self._files.isdisjoint(targets):
                return False
            self._files.update(targets)
        else:
            self._folders.append((head, names))
        self._heads.add(head)
        return True

    def files(self) -> set[str]:
        """Every real path found so far, to look a file up in and add to."""
        for head, names in self._folders:
            self._files.update([head + name for name in names])
        self._folders.clear()
        return self._files


class _FolderWalk:
    """Walks the class folders of an image folder so that no image is counted twice, however symlinks point.

    Symlinks to folders elsewhere are followed (as ImageFolder users expect), each real folder once; a symlink
    back to a folder on its own path (a loop), or into a class folder (whose images count there), is skipped and
    reported by name; one real file reached through two paths within a class counts once.
    """

    def __init__(self, root: Path, class_folders: list[str], warnings: list[str]):
        self.root = root
        self.root_text = str(root)
        self.root_real = os.path.realpath(root)
        self.warnings = warnings
        self.walked: dict[str, str] = {}  # real folder -> the path it was first scanned through
        self.class_reals: dict[str, str] = {}  # real class folder -> class name
        for name in class_folders:
            real = os.path.realpath(root / name)
            if real in self.class_reals:
                warnings.append(
                    f"class folder '{name}' is the same folder as '{self.class_reals[real]}' "
                    "(a symlink); left out so its images are not counted under two classes"
                )
                continue
            self.class_reals[real] = name

    def classes(self) -> list[str]:
        return list(self.class_reals.values())

    def images(self, name: str, runs: list[tuple[str, list[str]]]) -> list[str]:
        """Image files anywhere under a class folder (as ImageFolder finds them), hidden entries left out; as
        text, each str(Path) of the file under the root: a Path per file cost a 200,000-image scan seconds.
        runs gets (folder, names) of each folder whose images were found, in the order found."""
        folder = name if self.root_text == "." else os.path.join(self.root_text, name)  # as Path writes root / name
        real = os.path.realpath(folder)
        found: list[str] = []
        seen = _Seen()
        doubles = self._visit(folder, real, (self.root_real, real), found, seen, runs)
        if doubles:
            self.warnings.append(
                f"class folder '{name}': {doubles} image(s) reached through two paths (symlinks) counted once"
            )
        return found

    def _visit(
        self,
        path: str,
        real: str,
        ancestors: tuple[str, ...],
        found: list[str],
        seen: _Seen,
        runs: list[tuple[str, list[str]]],
    ) -> int:
        self.walked[real] = path
        try:
            entries = sorted(os.scandir(path), key=_entry_name)
        except OSError as exc:
            self.warnings.append(f"{path}: cannot be read ({exc.strerror or exc}); skipped")
            return 0
        head = real if real.endswith(os.sep) else real + os.sep  # os.path.join(real, name), without its call per file
        try:
            plain = all([entry.is_file(follow_symlinks=False) for entry in entries])
        except OSError:  # an entry whose type needed a stat that failed: the loop below says what to do with it
            plain = False
        if plain:
            # Only regular files (as a class folder of images mostly is): the same, a list at a time
            images = [e for e in entries if e.name[0] != "." and e.name.lower().endswith(IMG_EXTENSIONS)]
            names = [e.name for e in images]
            if seen.add_folder(head, names):  # else one of them was found before in this class: the way below
                found += [e.path for e in images]
                runs.append((path, names))
                return 0
        files = seen.files()
        names = []
        doubles = 0
        folders = []
        for entry in entries:
            if entry.name.startswith("."):  # _is_hidden, without a call per file
                continue
            try:
                is_dir = entry.is_dir()  # through a symlink too
            except OSError:
                is_dir = False
            if is_dir:
                folders.append(entry)
            elif entry.name.lower().endswith(IMG_EXTENSIONS):
                target = os.path.realpath(entry.path) if entry.is_symlink() else head + entry.name
                if target in files:
                    doubles += 1
                    continue
                files.add(target)
                found.append(entry.path)
                names.append(entry.name)
        if names:
            runs.append((path, names))
        for entry in folders:
            if not entry.is_symlink():
                sub = os.path.join(real, entry.name)
                doubles += self._visit(entry.path, sub, (*ancestors, sub), found, seen, runs)
                continue
            sub = os.path.realpath(entry.path)
            why = self._skip_link(sub, ancestors)
            if why:
                self.warnings.append(f"{entry.path}: {why}; skipped")
            else:
                doubles += self._visit(entry.path, sub, (*ancestors, sub), found, seen, runs)
        return doubles

    def _skip_link(self, target: str, ancestors: tuple[str, ...]) -> str | None:
        """Why a symlinked folder must not be followed (None: follow it)."""
        if target in ancestors or any(a.startswith(target + os.sep) for a in ancestors):
            return f"symlink loop (points back to {target}, which contains it)"
        for real, name in self.class_reals.items():
            if target == real or target.startswith(real + os.sep):
                return f"points into class folder '{name}' (its images count there, not twice)"
        if target in self.walked:
            return f"leads to a folder already scanned as {self.walked[target]}"
        return None


def _scan_folder(
    root: Path, task: str, given: list[str] | None, progress: Progress, cache: ScanCache | None = None
) -> DataSource:
    if task != "classification":
        raise DataError(
            f"{root}: an image folder labels images by sub-folder, so it only suits the task "
            f"'classification', not {task!r}; use a CSV or a .npz for {task}"
        )
    skipped: list[SkippedFile] = []
    warnings: list[str] = []
    paths: list[str] = []  # the images to check, class after class
    runs: list[tuple[str, list[str]]] = []  # their folders, each with its images' names: paths, in pieces
    blocks: list[tuple[str, int, int]] = []  # (class, start, stop) in paths
    walk = _FolderWalk(root, sorted(d.name for d in root.iterdir() if d.is_dir() and not _is_hidden(d.name)), warnings)
    folders = walk.classes()
    for name in folders:
        where: list[tuple[str, list[str]]] = []
        images = walk.images(name, where)
        if given is not None and name not in given:
            skipped += [SkippedFile(f, _NOT_TRAINING_CLASS.format(name)) for f in images]
        else:
            blocks.append((name, len(paths), len(paths) + len(images)))
            paths += images
            runs += where

    # A class at a time, with no tuple per file: a class whose images are all usable is taken whole.
    problems = _verify(paths, progress, cache, runs)
    kept = PathList()
    kept_counts: list[tuple[str, int]] = []
    bad_per_class: dict[str, int] = {}
    for name, start, stop in blocks:
        found = problems[start:stop]
        if found.count(None) == len(found):
            kept.texts += paths[start:stop]
            kept_counts.append((name, stop - start))
            continue
        good = 0
        for f, problem in zip(paths[start:stop], found, strict=True):
            if problem is None:
                kept.texts.append(f)
                good += 1
            else:
                skipped.append(SkippedFile(f, problem))
                bad_per_class[name] = bad_per_class.get(name, 0) + 1
        kept_counts.append((name, good))

    used = {name for name, count in kept_counts if count}
    for name in folders:
        if name not in used and (given is None or name in given):
            bad = bad_per_class.get(name, 0)
            what = f"no usable images ({bad} skipped)" if bad else "no images"
            warnings.append(f"class folder '{name}' has {what}; left out")
    vocabulary = given if given is not None else sorted(used)
    index = {name: i for i, name in enumerate(vocabulary)}
    targets: list[int] = []
    for name, count in kept_counts:
        if count:
            targets += [index[name]] * count
    return DataSource(
        kind="folder",
        path=root,
        task=task,
        class_names=list(vocabulary),
        targets=targets,
        files=kept,
        array=None,
        skipped=skipped,
        warnings=warnings,
    )


def _read_csv_rows(file: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Header and (line number, cells) of every non-blank row."""
    try:
        with open(file, encoding="utf-8-sig", newline="") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            rows = [(reader.line_num, row) for row in reader if any(cell.strip() for cell in row)]
    except UnicodeDecodeError:
        raise DataError(f"{file} is not UTF-8 text; save the CSV as UTF-8") from None
    except csv.Error as exc:
        raise DataError(f"{file}: not valid CSV ({exc})") from None
    except OSError as exc:
        raise DataError(f"{file} cannot be read: {exc.strerror or exc}") from None
    if header is None:
        raise DataError(f"{file} is empty; expected a header row with the columns path,label")
    return [h.strip() for h in header], rows


def _scan_csv(
    file: Path, task: str, given: list[str] | None, progress: Progress, cache: ScanCache | None = None
) -> DataSource:
    header, rows = _read_csv_rows(file)
    lookup: dict[str, int] = {}
    for i, name in enumerate(header):
        lookup.setdefault(name.lower(), i)
    missing = [c for c in ("path", "label") if c not in lookup]
    if missing:
        cols = ", ".join(f"'{c}'" for c in missing)
        found = ", ".join(f"'{h}'" for h in header) or "none"
        raise DataError(
            f"{file} has no {cols} column (columns found: {found}); the header row must name the columns path,label"
        )
    path_col, label_col = lookup["path"], lookup["label"]
    base = file.parent
    known = set(given) if given is not None else None
    width = len(given) if given is not None and task == "regression" else None

    skipped: list[SkippedFile] = []
    candidates: list[tuple[Path, Any, int]] = []  # (image, parsed label, line)
    named: set[str] = set()  # classes some row names, to tell the user which ones ended up empty
    for line, row in rows:
        cell = row[path_col].strip() if path_col < len(row) else ""
        raw = row[label_col] if label_col < len(row) else ""
        if not cell:
            skipped.append(SkippedFile(str(file), f"line {line}: empty path"))
            continue
        image = Path(os.path.expanduser(cell))
        image = image if image.is_absolute() else base / image
        label, problem = _parse_label(raw, task, known)
        if problem is None and task == "classification":
            named.add(label)
        if problem is None and task == "regression":
            if width is None:
                width = len(label)
            elif len(label) != width:
                problem = f"{len(label)} values, expected {width}"
        if problem is None and not image.is_file():
            problem = "no such file"
        if problem is not None:
            skipped.append(SkippedFile(str(image), f"line {line}: {problem}"))
        else:
            candidates.append((image, label, line))

    problems = _verify([os.fspath(image) for image, _, _ in candidates], progress, cache)
    kept = []
    for (image, label, line), problem in zip(candidates, problems, strict=True):
        if problem is None:
            kept.append((image, label))
        else:
            skipped.append(SkippedFile(str(image), f"line {line}: {problem}"))

    warnings: list[str] = []
    labels = [label for _, label in kept]
    if task == "classification":
        vocabulary = given if given is not None else _class_order(set(labels))
        warnings += [f"class '{name}' has no usable images; left out" for name in sorted(named - set(labels))]
        index = {name: i for i, name in enumerate(vocabulary)}
        targets: list = [index[label] for label in labels]
    elif task == "multilabel":
        vocabulary = given if given is not None else sorted({name for names in labels for name in names})
        index = {name: i for i, name in enumerate(vocabulary)}
        targets = []
        for names in labels:
            hot = [0.0] * len(vocabulary)
            for name in names:
                hot[index[name]] = 1.0
            targets.append(hot)
    else:
        vocabulary = given if given is not None else _output_names(width or 1)
        targets = labels
    return DataSource(
        kind="csv",
        path=file,
        task=task,
        class_names=list(vocabulary),
        targets=targets,
        files=[image for image, _ in kept],
        array=None,
        skipped=skipped,
        warnings=warnings,
    )


def _parse_label(raw: str, task: str, known: set[str] | None) -> tuple[Any, str | None]:
    """(label, None) or (None, why the label is unusable)."""
    if task == "classification":
        label = raw.strip()
        if not label:
            return None, "empty label"
        if known is not None and label not in known:
            return None, _NOT_TRAINING_CLASS.format(label)
        return label, None
    if task == "multilabel":
        names = sorted({part.strip() for part in raw.split(";") if part.strip()})
        for name in names:
            if known is not None and name not in known:
                return None, _NOT_TRAINING_CLASS.format(name)
        return names, None
    values = []
    for part in raw.split(";"):
        try:
            value = float(part)
        except ValueError:
            return None, (
                f"label '{raw.strip()}' is not a number (regression targets are numbers, several separated by ';')"
            )
        if not math.isfinite(value):
            return None, f"label '{raw.strip()}' is not a finite number"
        values.append(value)
    return values, None


def _class_order(names: set[str]) -> list[str]:
    """Class names sorted; numerically when they are all integers, so '2' comes before '10' (as in .npz)."""
    try:
        return sorted(names, key=int)
    except ValueError:
        return sorted(names)


def _output_names(width: int) -> list[str]:
    return ["value"] if width == 1 else [f"y{i}" for i in range(width)]


def _npz_array(archive: Any, file: Path, name: str) -> np.ndarray:
    if name not in archive.files:
        found = ", ".join(f"'{n}'" for n in archive.files) or "none"
        raise DataError(f"{file} has no array '{name}' (arrays found: {found}); expected 'X' (images) and 'y' (labels)")
    try:
        return archive[name]
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise DataError(
                f"{file}: array '{name}' holds Python objects; refusing to unpickle "
                "(save it as a numeric or string array)"
            ) from None
        raise DataError(f"{file}: array '{name}' cannot be read ({exc})") from None


def _scan_npz(file: Path, task: str, given: list[str] | None, progress: Progress) -> DataSource:
    try:
        # Never allow_pickle: unpickling runs arbitrary code from the file.
        archive = np.load(file, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - zip, format and pickle refusals all mean "not a usable archive"
        raise DataError(f"{file}: not a readable .npz archive ({exc})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(f"{file} holds a single array, not a .npz archive with the arrays 'X' and 'y'")
    with archive:
        x = _npz_array(archive, file, "X")
        y = _npz_array(archive, file, "y")
        names_arr = _npz_array(archive, file, "class_names") if "class_names" in archive.files else None

    if x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[3] not in (1, 3, 4)):
        raise DataError(f"{file}: array 'X' has shape {x.shape}; expected (N, H, W) or (N, H, W, C) with C 1, 3 or 4")
    if x.dtype.kind not in "biuf":
        raise DataError(f"{file}: array 'X' has dtype {x.dtype}; expected numbers (uint8 0..255 or float 0..1)")
    if x.dtype.kind in "iu" and x.dtype not in (np.uint8, np.uint16) and x.size:
        # Integer pixels are read by their range, not their dtype: np.array of Python ints is int64 even for 0..255.
        lo, hi = int(x.min()), int(x.max())
        if lo >= 0 and hi <= 255:
            x = x.astype(np.uint8)
        elif lo >= 0 and hi <= 65535:
            x = x.astype(np.uint16)
        else:
            raise DataError(
                f"{file}: array 'X' ({x.dtype}) holds values from {lo} to {hi}; integer images must be "
                "0..255 (8-bit) or 0..65535 (16-bit); floats must be 0..1"
            )
    n = x.shape[0]
    if y.ndim == 0 or y.shape[0] != n:
        raise DataError(
            f"{file}: array 'X' has {n} rows (shape {x.shape}) but 'y' has shape {y.shape}; "
            "they need one label row per image"
        )
    file_names = None
    if names_arr is not None:
        if names_arr.ndim != 1 or names_arr.dtype.kind not in "US":
            raise DataError(
                f"{file}: array 'class_names' has shape {names_arr.shape} and dtype {names_arr.dtype}; "
                "expected a 1-D array of strings"
            )
        file_names = [str(v.decode() if isinstance(v, bytes) else v) for v in names_arr.tolist()]

    skipped: list[SkippedFile] = []
    warnings: list[str] = []
    keep = np.ones(n, dtype=bool)

    def skip(rows: np.ndarray, reason: str) -> None:
        for i in np.flatnonzero(rows & keep):
            skipped.append(SkippedFile(str(file), f"row {i}: {reason.format(i=i)}"))
        keep[rows] = False

    if x.dtype.kind == "f":
        skip(~np.isfinite(x.reshape(n, -1)).all(axis=1), "non-finite pixel values (NaN or infinity)")
        finite_max = float(np.max(x[keep])) if keep.any() else 0.0
        if finite_max > 1.0:
            warnings.append(
                f"array 'X' is float with values up to {finite_max:g}; float images are read as "
                "0..1 (store 0..255 images as uint8)"
            )

    targets: list[int] | list[list[float]]
    if task == "classification":
        vocabulary, targets = _npz_classes(file, y, file_names, given, keep, skip, warnings)
    elif task == "multilabel":
        vocabulary, targets = _npz_multilabel(file, y, file_names, given, keep, skip)
    else:
        vocabulary, targets = _npz_regression(file, y, file_names, given, keep, skip)

    if progress is not None:
        progress(n, n)
    images = x[..., None] if x.ndim == 3 else x  # a view: one layout for everyone downstream
    return DataSource(
        kind="npz",
        path=file,
        task=task,
        class_names=vocabulary,
        targets=targets,
        files=None,
        array=images if keep.all() else images[keep],
        skipped=skipped,
        warnings=warnings,
        rows=np.flatnonzero(keep).tolist(),
    )


def _npz_classes(
    file: Path,
    y: np.ndarray,
    file_names: list[str] | None,
    given: Sequence[str] | None,
    keep: np.ndarray,
    skip: Callable[[Any, str], None],
    warnings: list[str],
) -> tuple[list[str], list[int]]:
    if y.ndim != 1:
        raise DataError(f"{file}: array 'y' has shape {y.shape}; classification needs one class label per row")
    if y.dtype.kind in "US":
        raw = [str(v.decode() if isinstance(v, bytes) else v) for v in y.tolist()]
        order = sorted(set(raw))
    else:
        if y.dtype.kind not in "biuf":
            raise DataError(f"{file}: array 'y' has dtype {y.dtype}; classification needs integer class labels")
        if y.dtype.kind == "f" and not (np.isfinite(y).all() and (y == np.round(y)).all()):
            raise DataError(f"{file}: array 'y' holds non-integer values; classification needs integer class labels")
        ints = y.astype(np.int64)
        if file_names is not None:
            bad = ints[(ints < 0) | (ints >= len(file_names))]
            if bad.size:
                raise DataError(
                    f"{file}: array 'y' holds the label {bad[0]}, but 'class_names' has only "
                    f"{len(file_names)} names (labels 0..{len(file_names) - 1})"
                )
            raw = [file_names[i] for i in ints.tolist()]
            order = file_names
        else:
            raw = [str(i) for i in ints.tolist()]
            order = [str(i) for i in sorted(set(ints.tolist()))]
    if given is not None:
        known = set(given)
        for name in sorted(set(raw) - known):
            skip(np.array([r == name for r in raw]), _NOT_TRAINING_CLASS.format(name))
    used = {r for r, k in zip(raw, keep, strict=True) if k}
    if given is None:
        left_out = [name for name in order if name not in used]
        warnings += [f"class '{name}' has no usable samples; left out" for name in left_out]
        vocabulary = [name for name in order if name in used]
    else:
        vocabulary = list(given)
    index = {name: i for i, name in enumerate(vocabulary)}
    return vocabulary, [index[r] for r, k in zip(raw, keep, strict=True) if k]


def _npz_multilabel(
    file: Path,
    y: np.ndarray,
    file_names: list[str] | None,
    given: Sequence[str] | None,
    keep: np.ndarray,
    skip: Callable[[Any, str], None],
) -> tuple[list[str], list[list[float]]]:
    if y.ndim != 2:
        raise DataError(f"{file}: array 'y' has shape {y.shape}; multilabel needs (N, K): one 0/1 column per label")
    if y.dtype.kind not in "biuf" or not np.isin(y, (0, 1)).all():
        raise DataError(f"{file}: array 'y' must hold only 0 and 1 for multilabel (1 = the label applies)")
    k = y.shape[1]
    if file_names is not None and len(file_names) != k:
        raise DataError(f"{file}: 'class_names' has {len(file_names)} names but 'y' has {k} columns")
    columns = file_names if file_names is not None else [str(i) for i in range(k)]
    hot = y.astype(np.float32)
    vocabulary = columns
    if given is not None:
        if file_names is None and k != len(given):
            raise DataError(f"{file}: array 'y' has {k} columns but training has {len(given)} labels")
        index = {name: i for i, name in enumerate(given)}
        for j, name in enumerate(columns):
            if name not in index:
                skip(hot[:, j] > 0, _NOT_TRAINING_CLASS.format(name))
        if file_names is not None:
            mapped = np.zeros((y.shape[0], len(given)), dtype=np.float32)
            for j, name in enumerate(columns):
                if name in index:
                    mapped[:, index[name]] = hot[:, j]
            hot = mapped
        vocabulary = list(given)
    return list(vocabulary), hot[keep].tolist()


def _npz_regression(
    file: Path,
    y: np.ndarray,
    file_names: list[str] | None,
    given: Sequence[str] | None,
    keep: np.ndarray,
    skip: Callable[[Any, str], None],
) -> tuple[list[str], list[list[float]]]:
    if y.ndim not in (1, 2) or y.dtype.kind not in "biuf":
        raise DataError(
            f"{file}: array 'y' has shape {y.shape} and dtype {y.dtype}; regression needs numbers, shape (N,) or (N, K)"
        )
    values = y.astype(np.float64).reshape(y.shape[0], -1)
    k = values.shape[1]
    if given is not None and k != len(given):
        raise DataError(f"{file}: array 'y' has {k} output(s) but training has {len(given)}")
    skip(~np.isfinite(values).all(axis=1), "non-finite target value")
    if given is not None:
        names = list(given)
    elif file_names is not None and len(file_names) == k:
        names = file_names
    else:
        names = _output_names(k)
    return names, values[keep].tolist()


# ---------------------------------------------------------------------------------------------
# Datasets


def target_tensor(target: Any, task: str) -> torch.Tensor:
    if task == "classification":
        return torch.tensor(target, dtype=torch.long)
    return torch.tensor(target, dtype=torch.float32)


class EngineDataset(Dataset):
    """What every dataset the engine builds has beyond torch's Dataset (whose type leaves out even the length)."""

    targets: list
    transform: Callable | None
    task: str

    def __len__(self) -> int:
        return len(self.targets)


class ImageFileDataset(EngineDataset):
    """Image files and their targets; each item is (transformed float CHW tensor, target tensor).

    A file that cannot be read (it changed since the scan) does not raise: with on_error "replace" (training)
    the next readable file of the same target stands in for it, with "drop" (evaluation) the item is a
    Dropped marker; either way the item carries the failure (engine/sample_failures.py). origin: the scanned
    folder or CSV the files came from, whose scan cache records the failure.
    """

    def __init__(
        self,
        files: Sequence[str | os.PathLike],
        targets: Sequence,
        transform: Callable | None,
        task: str,
        *,
        origin: str | os.PathLike | None = None,
        on_error: str = "replace",
    ):
        if len(files) != len(targets):
            raise ValueError(f"{len(files)} files but {len(targets)} targets")
        if on_error not in ("replace", "drop"):
            raise ValueError(f"on_error must be 'replace' or 'drop', not {on_error!r}")
        self.files: PathList = PathList(files)  # as text: a Path each cost seconds per 200,000 files
        self.targets = list(targets)
        self.transform = transform
        self.task = task
        self.origin = os.fspath(origin) if origin is not None else ""
        self.on_error = on_error

    def __len__(self) -> int:
        return len(self.files)

    def _stand_ins(self, index: int) -> Iterator[int]:
        """The positions tried in place of an unreadable one: the same target first, each in order after it."""
        n, target = len(self.files), self.targets[index]
        after = [(index + k) % n for k in range(1, n)]
        yield from (j for j in after if self.targets[j] == target)
        yield from (j for j in after if self.targets[j] != target)

    def read(self, index: int, *, stand_in: bool | None = None) -> tuple[int | None, Image.Image | None, list]:
        """(position served, its decoded image, failures met): the image at index, or when it cannot be read a
        stand-in's (stand_in, default: on_error is "replace"), or (None, None, failures) when it is left out."""
        if stand_in is None:
            stand_in = self.on_error == "replace"
        failures: list[SampleFailure] = []
        candidates = iter([index]) if not stand_in else itertools.chain([index], self._stand_ins(index))
        for tries, j in enumerate(candidates):
            if tries >= MAX_TRIES:
                break
            try:
                image = load_image(self.files[j])
            except Exception as exc:  # noqa: BLE001 - the scan reads headers and ends only: inner damage shows here
                failures.append(SampleFailure(str(self.files[j]), reason_of(exc), self.origin, j))
                continue
            if failures and failures[0].index == index:
                failures[0] = replace(failures[0], replaced_by=str(self.files[j]))
            return j, image, failures
        if not stand_in:
            return None, None, failures
        names = "; ".join(f"{f.path}: {f.reason}" for f in failures[:3])
        raise DataError(
            f"{len(failures)} image files in a row could not be read (they changed since the dataset was "
            f"scanned), none to stand in for {self.files[index]}; scan the dataset again. First: {names}"
        )

    def __getitem__(self, index: int) -> Any:
        j, image, failures = self.read(index)
        if j is None or image is None:
            return Dropped(failures)
        x = self.transform(image) if self.transform is not None else _pil_to_float(image)
        item = (x, target_tensor(self.targets[j], self.task))
        return Reported(item, failures) if failures else item


def _pil_to_float(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def array_to_tensor(row: np.ndarray) -> torch.Tensor:
    """One stored image, (H,W) or (H,W,C), as a float32 RGB CHW tensor in [0, 1]."""
    if row.dtype == np.uint8:
        values = row.astype(np.float32) / 255.0
    elif row.dtype.kind in "iu":
        values = row.astype(np.float32) / float(np.iinfo(row.dtype).max)
    else:
        values = row.astype(np.float32)  # float images are taken to be in [0, 1] already; bool as 0/1
    return _rgb_chw(torch.from_numpy(values))


def array_to_image(row: np.ndarray) -> torch.Tensor:
    """One stored image as its transform takes it: uint8 RGB CHW for uint8 arrays (resized as uint8, like a
    decoded image file), otherwise the float32 tensor in [0, 1] of array_to_tensor."""
    if row.dtype != np.uint8:
        return array_to_tensor(row)
    return _rgb_chw(torch.from_numpy(np.ascontiguousarray(row)))


def _rgb_chw(t: torch.Tensor) -> torch.Tensor:
    """An HW or HWC image tensor as 3-channel CHW: grey repeated, alpha dropped."""
    t = t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)
    if t.shape[0] == 1:
        t = t.expand(3, -1, -1)
    elif t.shape[0] == 4:
        t = t[:3]
    return t.contiguous()


class ArrayDataset(EngineDataset):
    """Images stored in one array (N,H,W) or (N,H,W,C) and their targets.

    rows: the array positions to serve, one per target; lets train and validation share one array
    instead of each holding a copy.
    """

    def __init__(
        self,
        array: np.ndarray,
        targets: Sequence,
        transform: Callable | None,
        task: str,
        rows: Sequence[int] | None = None,
    ):
        self.array = array
        self.rows = None if rows is None else [int(r) for r in rows]
        self.targets = list(targets)
        if len(self.targets) != (len(array) if self.rows is None else len(self.rows)):
            raise ValueError("one target per served row is needed")
        self.transform = transform
        self.task = task

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        row = self.array[index if self.rows is None else self.rows[index]]
        x = array_to_tensor(row) if self.transform is None else self.transform(array_to_image(row))
        return x, target_tensor(self.targets[index], self.task)


# ---------------------------------------------------------------------------------------------
# Splitting and preparing


def split_indices(targets: Sequence, task: str, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train positions, validation positions), both sorted; stratified by class for classification."""
    n = len(targets)
    if val_fraction <= 0 or n == 0:
        return list(range(n)), []
    rng = np.random.default_rng(seed)

    def take(count: int) -> int:
        # At least one when there are two, and never every sample, so both sides see the group.
        want = round(val_fraction * count)
        if count >= 2:
            want = max(1, want)
        return min(want, count - 1)

    val: list[int] = []
    if task == "classification":
        labels = np.asarray(targets, dtype=np.int64)
        for c in np.unique(labels):
            members = rng.permutation(np.flatnonzero(labels == c))
            val += members[: take(len(members))].tolist()
    else:
        val = rng.permutation(n)[: take(n)].tolist()
    val_set = set(val)
    return [i for i in range(n) if i not in val_set], sorted(val)


def subset_dataset(
    source: DataSource, positions: Sequence[int], transform: Callable, targets: Sequence | None = None
) -> EngineDataset:
    """The samples at positions of a source; targets replaces theirs (corrected labels), one per position."""
    targets = [source.targets[i] for i in positions] if targets is None else list(targets)
    if source.array is not None:
        return ArrayDataset(source.array, targets, transform, source.task, rows=positions)
    assert source.files is not None  # a source holds an array or files
    files = source.files.take(positions) if isinstance(source.files, PathList) else [source.files[i] for i in positions]
    return ImageFileDataset(files, targets, transform, source.task, origin=source.path)


# ---------------------------------------------------------------------------------------------
# Sample keys and the project's corrections (data.exclude, data.relabel)


def sample_keys(source: DataSource, root: Path | None = None, *, validation: bool = False) -> list[str]:
    """The key of each sample of a source, in order.

    Image files are keyed by their path relative to root (default: the source's own root); .npz rows as
    `#<row>`, or `val#<row>` for a separate validation archive.
    """
    if source.files is not None:
        base = root if root is not None else dataset_root(source.path, source.kind)
        return path_keys(source.files.texts if isinstance(source.files, PathList) else source.files, base)
    rows = source.rows if source.rows is not None else list(range(len(source)))
    prefix = "val#" if validation else "#"
    return [f"{prefix}{r}" for r in rows]


class _Corrections:
    """data.exclude and data.relabel, applied to the samples of a split; misses are reported once, by name."""

    def __init__(self, exclude: Sequence[str], relabel: dict[str, str], class_names: list[str], task: str):
        self.exclude = set(exclude)
        self.relabel: dict[str, int] = {}
        self.problems: list[str] = []
        self.seen: set[str] = set()
        self.excluded: list[str] = []
        self.relabelled: dict[str, tuple[str, str]] = {}
        self.class_names = class_names
        if relabel and task != "classification":
            self.problems.append(
                f"data.relabel applies to classification only (data.task is '{task}'); "
                f"its {len(relabel)} entr{'y is' if len(relabel) == 1 else 'ies are'} ignored"
            )
            return
        index = {name: i for i, name in enumerate(class_names)}
        for key, name in relabel.items():
            if name in index:
                self.relabel[key] = index[name]
            else:
                self.problems.append(
                    f"data.relabel: {key} -> '{name}' skipped: the dataset has no class '{name}' "
                    f"(classes: {', '.join(class_names)})"
                )
                self.seen.add(key)  # reported already; not "no such image" as well

    def apply(self, source: DataSource, positions: Sequence[int], keys: list[str]) -> tuple[list[int], list, list[str]]:
        """The kept positions, their targets (relabelled) and their keys."""
        kept: list[int] = []
        targets: list = []
        kept_keys: list[str] = []
        for i in positions:
            key = keys[i]
            target = source.targets[i]
            if key in self.exclude:
                self.seen.add(key)
                self.excluded.append(key)
                continue
            new = self.relabel.get(key)
            if new is not None:
                self.seen.add(key)
                if new != target:
                    self.relabelled[key] = (self.class_names[target], self.class_names[new])
                target = new
            kept.append(i)
            targets.append(target)
            kept_keys.append(key)
        return kept, targets, kept_keys

    def misses(self, skipped: set[str]) -> list[str]:
        """Problems, then each correction that names no usable sample (skipped: keys of files the scan skipped)."""
        out = list(self.problems)
        for what, keys in (("data.exclude", sorted(self.exclude)), ("data.relabel", sorted(self.relabel))):
            for key in keys:
                if key not in self.seen:
                    why = "is skipped by the scan" if key in skipped else "names no image of the dataset"
                    out.append(f"{what}: {key} {why} (the file may have been moved or deleted); this entry is skipped")
        return out


def class_count_lines(
    task: str, class_names: Sequence[str], train_counts: Sequence[int], val_counts: Sequence[int]
) -> list[str]:
    """The outputs, or each class's (label's) training / validation count, as a run's data summary lists them."""
    if task == "regression":
        return [f"Outputs: {', '.join(class_names)}"]
    title = "Classes" if task == "classification" else "Labels (positives)"
    lines = [f"{title} ({len(class_names)}), train / validation:"]
    width = max((len(name) for name in class_names), default=0)
    for name, tr, va in zip(class_names, train_counts, val_counts, strict=True):
        lines.append(f"  {name:<{width}}  {tr:>6} / {va}")
    return lines


@dataclass
class PreparedData:
    task: str
    class_names: list[str]
    num_outputs: int
    train: EngineDataset
    val: EngineDataset | None
    train_targets: list
    val_targets: list
    train_counts: list[int]
    val_counts: list[int]
    skipped: list[SkippedFile]
    warnings: list[str]
    source: DataSource
    val_source: DataSource | None
    train_keys: list[str] = field(default_factory=list)  # each training sample's key (data.exclude, data.relabel)
    val_keys: list[str] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)  # the data.exclude keys that removed a sample
    relabelled: dict[str, tuple[str, str]] = field(default_factory=dict)  # key -> (scanned class, given class)

    def summary(self, max_reasons: int = 5) -> str:
        """A few lines for a person: sizes, per-class counts, what was skipped and why."""
        n_val = len(self.val_targets)
        where = str(self.source.path) + (f" (validation: {self.val_source.path})" if self.val_source else "")
        lines = [f"{self.task}: {len(self.train_targets)} training and {n_val} validation samples from {where}"]
        lines += class_count_lines(self.task, self.class_names, self.train_counts, self.val_counts)
        if self.val is None:
            lines.append("No validation set.")
        if self.excluded or self.relabelled:
            lines.append(
                f"Corrections from the project: {len(self.excluded)} excluded, {len(self.relabelled)} relabelled"
            )
        if self.skipped:
            lines.append(f"Skipped {len(self.skipped)} sample(s):")
            lines += [f"  {s.path}: {s.reason}" for s in self.skipped[:max_reasons]]
            if len(self.skipped) > max_reasons:
                lines.append(f"  ... and {len(self.skipped) - max_reasons} more")
        if self.warnings:
            lines.append("Warnings:")
            lines += [f"  {w}" for w in self.warnings]
        return readable("\n".join(lines))


def prepare_data(cfg: ProjectConfig, pre: Preprocess, *, progress: Progress = None) -> PreparedData:
    """Scan the project's data, split or scan its validation source, apply its corrections, build the datasets.

    The corrections (data.exclude, data.relabel) are applied after the split, which is computed on the scanned
    data as without them: excluding or relabelling one image never moves another between training and validation.
    """
    d = cfg.data
    path = cfg.resolve(d.path)
    if path is None:
        raise DataError("data.path is empty: give the dataset's path (an image folder, a .csv or a .npz)")
    source = scan_source(path, kind=d.kind, task=d.task, progress=progress)
    train_tf = build_transforms(pre, d.augment, train=True, keep_aspect=d.keep_aspect)
    eval_tf = build_transforms(pre, d.augment, train=False, keep_aspect=d.keep_aspect)
    warnings = list(source.warnings)
    skipped = list(source.skipped)
    root = dataset_root(source.path, source.kind)
    keys = sample_keys(source, root)
    fixes = _Corrections(d.exclude, d.relabel, source.class_names, d.task)

    val_source = None
    val: EngineDataset | None
    if d.val_path:
        val_path = cfg.resolve(d.val_path)
        assert val_path is not None  # d.val_path is not empty
        val_source = scan_source(val_path, kind=d.kind, task=d.task, class_names=source.class_names, progress=progress)
        val_keys_all = sample_keys(val_source, root, validation=True)
        train_pos, train_targets, train_keys = fixes.apply(source, range(len(source)), keys)
        val_pos, val_targets, val_keys = fixes.apply(val_source, range(len(val_source)), val_keys_all)
        train = subset_dataset(source, train_pos, train_tf, train_targets)
        val = subset_dataset(val_source, val_pos, eval_tf, val_targets) if val_pos else None
        warnings += [f"validation: {w}" for w in val_source.warnings]
        skipped += val_source.skipped
        known = set(keys) | set(val_keys_all)
    else:
        train_idx, val_idx = split_indices(source.targets, d.task, d.val_fraction, d.split_seed)
        train_pos, train_targets, train_keys = fixes.apply(source, train_idx, keys)
        val_pos, val_targets, val_keys = fixes.apply(source, val_idx, keys)
        train = subset_dataset(source, train_pos, train_tf, train_targets)
        val = subset_dataset(source, val_pos, eval_tf, val_targets) if val_pos else None
        if d.val_fraction > 0 and not val_idx:
            warnings.append(
                f"data.val_fraction = {d.val_fraction:g} leaves no validation samples "
                f"({len(source)} in all); training runs without validation"
            )
        known = set(keys)
    warnings += fixes.misses({path_key(s.path, root) for s in skipped} - known)
    if not train_pos:
        raise DataError(
            f"{source.path}: data.exclude leaves no training samples ({len(fixes.excluded)} excluded); "
            "remove some exclusions"
        )

    k = len(source.class_names)
    train_counts = _class_counts(train_targets, d.task, k)
    if d.task == "classification" and (fixes.excluded or fixes.relabelled):
        empty = [name for name, n in zip(source.class_names, train_counts, strict=True) if not n]
        if empty:
            warnings.append(f"after the corrections, no training samples remain for: {', '.join(empty)}")
    return PreparedData(
        task=d.task,
        class_names=list(source.class_names),
        num_outputs=k,
        train=train,
        val=val,
        train_targets=train_targets,
        val_targets=val_targets,
        train_counts=train_counts,
        val_counts=_class_counts(val_targets, d.task, k),
        skipped=skipped,
        warnings=warnings,
        source=source,
        val_source=val_source,
        train_keys=train_keys,
        val_keys=val_keys,
        excluded=fixes.excluded,
        relabelled=fixes.relabelled,
    )
