"""data.exclude and data.relabel: kept in the project file, applied whenever the dataset is read."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import write_image_folder, write_project
from PIL import Image

from engine import corrections
from engine.config import load_project, save_project
from engine.data import DataError, prepare_data
from engine.transforms import Preprocess

PRE = Preprocess(resize_size=16, crop_size=12, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def _prepared(project):
    return prepare_data(load_project(project), PRE)


def _labels(prepared, side):
    keys = prepared.train_keys if side == "train" else prepared.val_keys
    targets = prepared.train_targets if side == "train" else prepared.val_targets
    return {key: prepared.class_names[t] for key, t in zip(keys, targets, strict=True)}


def test_keys_name_each_sample_relative_to_the_dataset_and_line_up_with_the_datasets(tmp_path):
    write_image_folder(tmp_path / "images", per_class=8)
    prepared = _prepared(write_project(tmp_path / "p.json", "images"))
    assert len(prepared.train_keys) == len(prepared.train) and len(prepared.val_keys) == len(prepared.val)
    assert set(prepared.train_keys).isdisjoint(prepared.val_keys)
    assert len(prepared.train_keys) + len(prepared.val_keys) == 24
    for key, path in zip(prepared.train_keys, prepared.train.files, strict=True):
        assert (tmp_path / "images" / key).resolve() == path.resolve()
        assert key.split("/")[0] in {"red", "green", "blue"} and "\\" not in key


def test_exclude_and_relabel_round_trip_through_the_project_file_and_change_what_is_read(tmp_path):
    write_image_folder(tmp_path / "images", per_class=8)
    project = write_project(tmp_path / "p.json", "images")
    before = _prepared(project)
    gone_train, gone_val = before.train_keys[0], before.val_keys[0]
    moved = before.train_keys[3]
    new_class = next(c for c in before.class_names if c != moved.split("/")[0])

    cfg = load_project(project)
    fixed = corrections.with_relabel(corrections.with_excluded(cfg, [gone_train, gone_val]), moved, new_class)
    assert cfg.data.exclude == [] and cfg.data.relabel == {}  # the original is untouched (undo keeps it)
    save_project(fixed, project)
    on_disk = json.loads(project.read_text())["data"]
    assert on_disk["exclude"] == [gone_train, gone_val] and on_disk["relabel"] == {moved: new_class}

    after = _prepared(project)
    assert gone_train not in after.train_keys and gone_val not in after.val_keys
    assert len(after.train) == len(before.train) - 1 and len(after.val) == len(before.val) - 1
    assert _labels(after, "train")[moved] == new_class
    assert after.relabelled == {moved: (moved.split("/")[0], new_class)}
    # Nothing else moved across the split, and every other label is as scanned.
    assert set(after.train_keys) == set(before.train_keys) - {gone_train}
    assert set(after.val_keys) == set(before.val_keys) - {gone_val}
    old = _labels(before, "train")
    assert {k: v for k, v in _labels(after, "train").items() if k != moved} == {
        k: v for k, v in old.items() if k not in (moved, gone_train)
    }
    # The datasets read the corrected targets: the loader sees the new label.
    position = after.train_keys.index(moved)
    assert after.class_names[int(after.train[position][1])] == new_class
    # The images themselves are all still there.
    assert sum(1 for _ in (tmp_path / "images").rglob("*.png")) == 24

    undone = corrections.without_relabel(corrections.without_excluded(fixed, [gone_train]), [moved])
    assert undone.data.exclude == [gone_val] and undone.data.relabel == {}


def test_a_missing_file_or_unknown_class_is_reported_by_name_and_skipped(tmp_path):
    write_image_folder(tmp_path / "images", per_class=8)
    project = write_project(
        tmp_path / "p.json",
        "images",
        data={
            "path": "images",
            "image_size": 16,
            "val_fraction": 0.25,
            "mean": [0.5],
            "std": [0.5],
            "exclude": ["red/gone.png"],
            "relabel": {"green/000.png": "purple", "blue/missing.png": "red"},
        },
    )
    prepared = _prepared(project)
    text = "\n".join(prepared.warnings)
    assert "data.exclude: red/gone.png names no image of the dataset" in text
    assert "data.relabel: blue/missing.png names no image of the dataset" in text
    assert "green/000.png -> 'purple' skipped: the dataset has no class 'purple'" in text
    assert len(prepared.train) + len(prepared.val) == 24
    labels = {**_labels(prepared, "train"), **_labels(prepared, "val")}
    assert labels["green/000.png"] == "green"


def test_a_correction_naming_an_unreadable_file_says_the_scan_skipped_it(tmp_path):
    write_image_folder(tmp_path / "images", per_class=8)
    (tmp_path / "images" / "red" / "broken.png").write_bytes(b"not a png")
    project = write_project(tmp_path / "p.json", "images")
    cfg = corrections.with_excluded(load_project(project), ["red/broken.png"])
    prepared = prepare_data(cfg, PRE)
    assert any("data.exclude: red/broken.png is skipped by the scan" in w for w in prepared.warnings)


def test_excluding_everything_is_refused_by_name(tmp_path):
    write_image_folder(tmp_path / "images", per_class=4)
    project = write_project(tmp_path / "p.json", "images")
    cfg = load_project(project)
    every = [p.relative_to(tmp_path / "images").as_posix() for p in (tmp_path / "images").rglob("*.png")]
    with pytest.raises(DataError, match="data.exclude leaves no training samples"):
        prepare_data(corrections.with_excluded(cfg, every), PRE)


def test_sample_key_for_a_path_and_a_separate_validation_folder(tmp_path):
    write_image_folder(tmp_path / "train", per_class=6)
    write_image_folder(tmp_path / "val", per_class=3, seed=1)
    project = write_project(
        tmp_path / "p.json",
        "train",
        data={"path": "train", "val_path": "val", "image_size": 16, "mean": [0.5], "std": [0.5]},
    )
    cfg = load_project(project)
    assert corrections.sample_key_for(cfg, tmp_path / "train" / "red" / "001.png") == "red/001.png"
    val_key = corrections.sample_key_for(cfg, tmp_path / "val" / "red" / "001.png")
    assert val_key == "../val/red/001.png"
    prepared = prepare_data(corrections.with_excluded(cfg, [val_key, "red/001.png"]), PRE)
    assert val_key not in prepared.val_keys and "red/001.png" not in prepared.train_keys
    assert len(prepared.val) == 8 and len(prepared.train) == 17
    assert not [w for w in prepared.warnings if "data.exclude" in w]


def test_npz_rows_are_keyed_by_their_row_in_the_archive(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.random(size=(20, 8, 8)).astype(np.float32)
    x[5, 0, 0] = np.nan  # the scan skips row 5, and later rows keep their own numbers
    y = np.array([0, 1] * 10)
    np.savez(tmp_path / "d.npz", X=x, y=y, class_names=np.array(["a", "b"]))
    project = write_project(
        tmp_path / "p.json",
        "d.npz",
        data={"path": "d.npz", "image_size": 8, "val_fraction": 0.0, "mean": [0.5], "std": [0.5]},
    )
    cfg = corrections.with_relabel(corrections.with_excluded(load_project(project), ["#6"]), "#7", "a")
    prepared = prepare_data(cfg, PRE)
    assert "#5" not in prepared.train_keys and "#6" not in prepared.train_keys
    assert len(prepared.train) == 18
    assert _labels(prepared, "train")["#7"] == "a"
    position = prepared.train_keys.index("#7")
    assert torch_equal(prepared.train[position][0], prepare_data(load_project(project), PRE).train[6][0])


def torch_equal(a, b) -> bool:
    return bool((a == b).all())


def _csv(folder, name: str, labels: list) -> None:
    """Small images in folder/imgs and a CSV beside them giving each its label."""
    img = folder / "imgs"
    img.mkdir(exist_ok=True)
    rows = ["path,label"]
    for i, label in enumerate(labels):
        Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(img / f"{i}.png")
        rows.append(f"imgs/{i}.png,{label}")
    (folder / name).write_text("\n".join(rows) + "\n")


def test_csv_keys_are_relative_to_the_csv_folder(tmp_path):
    _csv(tmp_path, "labels.csv", ["cat" if i % 2 else "dog" for i in range(12)])
    img = tmp_path / "imgs"
    project = write_project(tmp_path / "p.json", "labels.csv", data={"path": "labels.csv", "val_fraction": 0.0})
    cfg = load_project(project)
    assert corrections.sample_key_for(cfg, img / "3.png") == "imgs/3.png"
    prepared = prepare_data(corrections.with_relabel(cfg, "imgs/3.png", "dog"), PRE)
    assert _labels(prepared, "train")["imgs/3.png"] == "dog"
    assert sorted(prepared.train_keys) == sorted(f"imgs/{i}.png" for i in range(12))


def test_relabel_on_a_regression_task_is_ignored_with_a_message(tmp_path):
    _csv(tmp_path, "v.csv", [i / 2 for i in range(6)])
    project = write_project(
        tmp_path / "p.json",
        "v.csv",
        data={"path": "v.csv", "task": "regression", "val_fraction": 0.0, "relabel": {"imgs/1.png": "x"}},
        loss={"name": "mse"},
    )
    prepared = _prepared(project)
    assert any("data.relabel applies to classification only" in w for w in prepared.warnings)
    assert len(prepared.train) == 6
