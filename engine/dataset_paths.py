"""Dataset errors and sample keys: what front ends need of engine.data without importing PyTorch.

engine.data re-exports these names. The app's Corrections list names and checks images by their keys while the
window opens; importing engine.data there cost the start-up 9 s of importing torch and torchvision.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import overload

from engine.text import readable


class DataError(ValueError):
    """A dataset problem; the message names the file or folder and what is wrong."""

    def __init__(self, message: str):
        super().__init__(readable(message))  # a non-UTF-8 file name stays visible wherever the message goes


def dataset_root(path: Path, kind: str) -> Path:
    """The folder sample keys are relative to: an image folder itself, or the folder of a .csv or .npz file."""
    return path if kind == "folder" else path.parent


def path_key(path: str | os.PathLike, root: Path) -> str:
    """An image's key: its path relative to the dataset root, POSIX style; `../` steps for a file outside it."""
    p = Path(path)
    try:
        return p.relative_to(root).as_posix()
    except ValueError:
        return Path(os.path.relpath(p, root)).as_posix()


def _is_plain(rest: str) -> bool:
    """Whether relative POSIX text is as Path would write it (no empty or `.` parts), so it can be used as is."""
    return bool(rest) and rest[0] != "/" and rest[-1] != "/" and "//" not in rest and "." not in rest.split("/")


def path_keys(paths: Iterable[str | os.PathLike], root: Path) -> list[str]:
    """path_key of each path, without making a Path of each where the text already is its key after the root's.

    A 200,000-image folder's keys took seconds through Path objects; an image folder's scan writes its paths as
    the root's text and plain names, so for those the key is the text after the root.
    """
    base = os.fspath(root)
    if os.sep != "/" or os.altsep is not None:  # Windows: separators and drive letters need Path's rules
        return [path_key(p, root) for p in paths]
    prefix = "" if base == "." else base if base.endswith("/") else base + "/"
    cut = len(prefix)
    out = []
    for p in paths:
        text = os.fspath(p)
        rest = text[cut:]
        out.append(rest if text.startswith(prefix) and _is_plain(rest) else path_key(text, root))
    return out


class PathList(Sequence[Path]):
    """File paths kept as text, each made a Path when it is read.

    A scan of 200,000 images spent seconds making a Path of each file (pathlib parses the whole text), most of
    them never used as a Path: training opens them by name. texts: the paths as str, in order.
    """

    __slots__ = ("texts",)

    def __init__(self, paths: Iterable[str | os.PathLike] = ()):
        self.texts: list[str] = paths.texts.copy() if isinstance(paths, PathList) else [os.fspath(p) for p in paths]

    def __len__(self) -> int:
        return len(self.texts)

    @overload
    def __getitem__(self, index: int) -> Path: ...

    @overload
    def __getitem__(self, index: slice) -> PathList: ...

    def __getitem__(self, index: int | slice) -> Path | PathList:
        if isinstance(index, slice):
            return PathList(self.texts[index])
        return Path(self.texts[index])

    def __iter__(self) -> Iterator[Path]:
        return map(Path, self.texts)

    def take(self, positions: Iterable[int]) -> PathList:
        """The paths at positions, in that order."""
        texts = self.texts
        out = PathList()
        out.texts = [texts[i] for i in positions]
        return out

    def __eq__(self, other: object) -> bool:
        if isinstance(other, PathList):
            return self.texts == other.texts
        if isinstance(other, list):
            return list(self) == other
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable like a list, so unhashable like one

    def __repr__(self) -> str:
        return f"PathList({self.texts!r})"
