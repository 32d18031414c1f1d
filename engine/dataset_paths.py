"""Dataset errors and sample keys: what front ends need of engine.data without importing PyTorch.

engine.data re-exports these names. The app's Corrections list names and checks images by their keys while the
window opens; importing engine.data there cost the start-up 9 s of importing torch and torchvision.
"""

from __future__ import annotations

import os
from pathlib import Path

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
