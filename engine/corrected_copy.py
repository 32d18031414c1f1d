"""A corrected copy of a project's dataset: excluded images left out, relabelled ones under their new class.

The originals are only read: an image folder copy gets copies of the image files, a CSV copy only names the
original files. Written elsewhere, never into the dataset.
"""

from __future__ import annotations

import csv
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from engine.config import ProjectConfig
from engine.data import DataError, dataset_root, sample_keys, scan_source


@dataclass
class CopyReport:
    written: int = 0
    excluded: int = 0
    relabelled: int = 0
    warnings: list[str] = field(default_factory=list)  # corrections that named no sample or no class, by name


def write_corrected_copy(cfg: ProjectConfig, out: str | os.PathLike) -> CopyReport:
    """Write the project's dataset with its corrections applied: an image folder (out is a new or empty
    folder) or, when out ends in .csv, a CSV of path,label rows naming the original files."""
    data = cfg.resolve(cfg.data.path)
    if data is None:
        raise DataError("data.path is empty: there is no dataset to copy")
    if cfg.data.task != "classification":
        raise DataError(f"a corrected copy is written for classification datasets; this one is {cfg.data.task}")
    source = scan_source(data, kind=cfg.data.kind, task=cfg.data.task)
    if source.files is None:
        raise DataError(f"{data}: an .npz archive; a corrected copy is written for image folders and CSV files")
    root = dataset_root(source.path, source.kind).resolve()
    target = Path(os.path.expanduser(str(out))).resolve()
    if target == root or root in target.parents:
        raise DataError(f"{target} is inside the dataset {root}: write the corrected copy somewhere else")
    as_csv = target.suffix.lower() == ".csv"
    if as_csv and target.exists():
        raise DataError(f"{target} already exists: choose a new file name")
    if not as_csv and target.exists() and any(target.iterdir()):
        raise DataError(f"{target} is not empty: choose a new or empty folder")

    exclude = set(cfg.data.exclude)
    relabel = dict(cfg.data.relabel)
    report = CopyReport()
    keys = sample_keys(source)
    known = set(keys)
    report.warnings += [f"data.exclude: {k}: no such image in the dataset; skipped" for k in exclude - known]
    report.warnings += [f"data.relabel: {k}: no such image in the dataset; skipped" for k in relabel.keys() - known]
    rows: list[tuple[Path, str, str]] = []  # (file, class, key)
    for file, target_index, key in zip(source.files, source.targets, keys, strict=True):
        if key in exclude:
            report.excluded += 1
            continue
        label = source.class_names[int(target_index)]
        new = relabel.get(key)
        if new is not None and new not in source.class_names:
            report.warnings.append(f"data.relabel: {key}: class {new!r} is not one of {source.class_names}; skipped")
        elif new is not None and new != label:
            label = new
            report.relabelled += 1
        rows.append((Path(file), label, key))

    if as_csv:
        target.parent.mkdir(parents=True, exist_ok=True)
        with target.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "label"])
            for file, label, _key in rows:
                writer.writerow([Path(os.path.relpath(file.resolve(), target.parent)).as_posix(), label])
    else:
        used: set[Path] = set()
        for name in source.class_names:
            (target / name).mkdir(parents=True, exist_ok=True)  # every class, even one left empty
        for file, label, key in rows:
            # Inside its class folder a file keeps the path below its original class folder (or its name).
            parts = Path(key).parts
            rel = Path(*parts[1:]) if source.kind == "folder" and len(parts) > 1 else Path(file.name)
            dest = target / label / rel
            n = 1
            while dest in used or dest.exists():
                dest = dest.with_name(f"{Path(rel).stem}-{n}{Path(rel).suffix}")
                n += 1
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(file, dest)
            used.add(dest)
    report.written = len(rows)
    return report
