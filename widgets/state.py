"""The open project as an observable object: widgets read and write its config by dotted path and follow its changes."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from PySide6.QtCore import QObject, Signal

from engine.config import ConfigError, Problem, ProjectConfig, from_dict, load_project, save_project, validate


def _split(path: str) -> tuple[list[str], str]:
    parts = path.split(".")
    return parts[:-1], parts[-1]


def get_field(cfg: ProjectConfig, path: str) -> Any:
    obj: Any = cfg
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def set_field(cfg: ProjectConfig, path: str, value: Any) -> None:
    parents, last = _split(path)
    obj: Any = cfg
    for part in parents:
        obj = getattr(obj, part)
    if not hasattr(obj, last):
        raise AttributeError(f"the project has no field {path!r}")
    setattr(obj, last, copy.deepcopy(value))


class ProjectState(QObject):
    """The one ProjectConfig the app edits, with its file, its unsaved-changes flag and change signals.

    Widgets never keep their own copy of a setting: they call set()/try_set() and redraw on `changed`.
    """

    changed = Signal(str)  # dotted path of the field that changed; "" after replace() (everything changed)
    dirty_changed = Signal(bool)
    file_changed = Signal(str)  # the project file's path; "" for a new, unsaved project
    refused = Signal(str, str)  # (path, reason) when try_set refused a value

    def __init__(self, cfg: ProjectConfig | None = None, file: str | Path | None = None, parent=None):
        super().__init__(parent)
        self._cfg = cfg if cfg is not None else ProjectConfig()
        self._file = str(Path(file).resolve()) if file else ""
        self._dirty = False
        # False while the app starts: checks that need the backbone catalog (which imports PyTorch) wait until
        # the catalog is loaded; see app.main_window.MainWindow(background_catalog=True).
        self.catalog_checks = True

    # -- reading -------------------------------------------------------------------------------
    @property
    def config(self) -> ProjectConfig:
        """The live config. Read it freely; change it only through set(), try_set(), update() or replace()."""
        return self._cfg

    @property
    def file(self) -> str:
        return self._file

    @property
    def dirty(self) -> bool:
        return self._dirty

    def get(self, path: str) -> Any:
        return get_field(self._cfg, path)

    def problems(self, *, check_paths: bool = True) -> list[Problem]:
        """What is wrong with the project as it stands (the same checks `python main.py check` starts with)."""
        return validate(self._cfg, check_paths=check_paths, check_catalog=self.catalog_checks)

    def snapshot(self) -> ProjectConfig:
        """An independent copy for a run: later edits in the window do not reach a running trainer."""
        clone = copy.deepcopy(self._cfg)
        return clone

    # -- writing -------------------------------------------------------------------------------
    def set(self, path: str, value: Any) -> None:
        """Set one field without checking it (for values a widget can only produce valid)."""
        self.update({path: value})

    def update(self, values: dict[str, Any]) -> None:
        """Set several fields at once; `changed` is emitted once per field that really changed."""
        changed = []
        for path, value in values.items():
            if get_field(self._cfg, path) != value:
                set_field(self._cfg, path, value)
                changed.append(path)
        if changed:
            self._set_dirty(True)
            for path in changed:
                self.changed.emit(path)

    def check(self, values: dict[str, Any]) -> list[Problem]:
        """The problems these values would bring (paths are not checked: files may come later).

        A problem counts when it is about a field being set, or about a field that had none before: a project
        opened with a problem (a backbone the catalog lacks) can still be edited elsewhere.
        """
        trial = copy.deepcopy(self._cfg)
        for path, value in values.items():
            set_field(trial, path, value)
        before = {p.path for p in validate(self._cfg, check_paths=False, check_catalog=self.catalog_checks)}
        try:
            return [
                p
                for p in validate(trial, check_paths=False, check_catalog=self.catalog_checks)
                if p.path in values or p.path not in before
            ]
        except Exception as exc:  # a value of the wrong type that validation cannot even compare
            return [Problem(next(iter(values)), f"{', '.join(values)}: {exc}")]

    def try_set(self, path: str, value: Any, *, also: dict[str, Any] | None = None) -> str | None:
        """Set a field if the project stays valid; otherwise leave it and return the reason (also emitted)."""
        values = {path: value, **(also or {})}
        problems = self.check(values)
        if problems:
            reason = "; ".join(map(str, problems))
            self.refused.emit(path, reason)
            return reason
        self.update(values)
        return None

    def replace(self, cfg: ProjectConfig, file: str | Path | None = None, *, dirty: bool = False) -> None:
        """A whole new project (New, Open, restoring a run's settings)."""
        self._cfg = cfg
        new_file = str(Path(file).resolve()) if file else ""
        if new_file != self._file:
            self._file = new_file
            self.file_changed.emit(self._file)
        self._dirty = not dirty  # force the signal below
        self._set_dirty(dirty)
        self.changed.emit("")

    # -- files ---------------------------------------------------------------------------------
    def open(self, file: str | Path) -> None:
        """Load a project file; raises ConfigError (nothing changes) when it is not a valid project."""
        cfg = load_project(file, check_paths=False, check_catalog=self.catalog_checks)
        self.replace(cfg, file)

    def save(self, file: str | Path | None = None) -> Path:
        """Write the project (to `file`, or to its own file). Relative paths stay relative to the new folder."""
        target = Path(file).resolve() if file else (Path(self._file) if self._file else None)
        if target is None:
            raise ConfigError(["the project has no file yet; choose where to save it"])
        old_base = Path(self._cfg.base_dir).resolve()
        new_base = target.parent
        if old_base != new_base:
            self._rebase(old_base, new_base)
        save_project(self._cfg, target)
        if str(target) != self._file:
            self._file = str(target)
            self.file_changed.emit(self._file)
        self._set_dirty(False)
        return target

    def _rebase(self, old: Path, new: Path) -> None:
        """Keep relative paths pointing at the same files when the project moves to another folder."""
        import os

        for section, name in (("data", "path"), ("data", "val_path"), ("model", "weights_file"), ("output", "dir")):
            obj = getattr(self._cfg, section)
            value = getattr(obj, name)
            if value and not Path(os.path.expanduser(value)).is_absolute():
                absolute = (old / value).resolve()
                try:
                    setattr(obj, name, os.path.relpath(absolute, new))
                except ValueError:  # another drive on Windows
                    setattr(obj, name, str(absolute))
        self._cfg.base_dir = str(new)

    def _set_dirty(self, dirty: bool) -> None:
        if dirty != self._dirty:
            self._dirty = dirty
            self.dirty_changed.emit(dirty)


def config_from_dict(data: dict, base_dir: str | Path) -> ProjectConfig:
    """A config from JSON-shaped data (a run's project.json, a checkpoint's config) without checking paths."""
    return from_dict(data, base_dir=base_dir, check_paths=False)
