"""The project's data corrections (data.exclude, data.relabel): adding and removing them.

Every function returns a new ProjectConfig and leaves the one given unchanged, so a front end can keep the old one
for undo. The corrections are applied when the dataset is read (engine.data.prepare_data); the user's image files
are never moved, renamed or deleted.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from engine.config import ProjectConfig
from engine.dataset_paths import DataError, dataset_root, path_key  # not engine.data: no PyTorch for the app


def _with_data(cfg: ProjectConfig, exclude: list[str], relabel: dict[str, str]) -> ProjectConfig:
    new = cfg.copy()
    new.data.exclude = exclude
    new.data.relabel = relabel
    return new


def with_excluded(cfg: ProjectConfig, keys: Iterable[str]) -> ProjectConfig:
    """The project with these sample keys excluded (appended in order, each once)."""
    exclude = list(cfg.data.exclude)
    present = set(exclude)
    for key in keys:
        if key not in present:
            exclude.append(key)
            present.add(key)
    return _with_data(cfg, exclude, dict(cfg.data.relabel))


def without_excluded(cfg: ProjectConfig, keys: Iterable[str]) -> ProjectConfig:
    """The project with these exclusions removed (the images are used again)."""
    drop = set(keys)
    return _with_data(cfg, [k for k in cfg.data.exclude if k not in drop], dict(cfg.data.relabel))


def with_relabel(cfg: ProjectConfig, key: str, class_name: str) -> ProjectConfig:
    """The project with one image's label corrected to class_name (replacing an earlier correction)."""
    if not class_name:
        raise ValueError("a relabel needs a class name")
    relabel = dict(cfg.data.relabel)
    relabel[key] = class_name
    return _with_data(cfg, list(cfg.data.exclude), relabel)


def without_relabel(cfg: ProjectConfig, keys: Iterable[str]) -> ProjectConfig:
    """The project with these label corrections removed (the images take their scanned label again)."""
    drop = set(keys)
    relabel = {k: v for k, v in cfg.data.relabel.items() if k not in drop}
    return _with_data(cfg, list(cfg.data.exclude), relabel)


def root_of(cfg: ProjectConfig) -> Path:
    """The folder the project's sample keys are relative to."""
    data = cfg.resolve(cfg.data.path)
    if data is None:
        raise DataError("data.path is empty: give the dataset's path (an image folder, a .csv or a .npz)")
    kind: str = cfg.data.kind
    if kind == "auto":
        kind = "folder" if data.is_dir() else data.suffix.lower().lstrip(".")
    return dataset_root(data, kind)


def sample_key_for(cfg: ProjectConfig, path: str | os.PathLike) -> str:
    """The key under which data.exclude and data.relabel name the image at path (an image file of the dataset)."""
    p = Path(os.path.expanduser(str(path)))
    if not p.is_absolute():
        p = (Path(cfg.base_dir) / p).resolve()
    return path_key(p, root_of(cfg))
