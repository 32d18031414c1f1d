"""Scanning, verifying, splitting and serving datasets from folders, CSVs and .npz archives."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from engine.config import DataConfig, ProjectConfig
from engine.data import ArrayDataset, DataError, ImageFileDataset, load_image, prepare_data, scan_source, split_indices
from engine.transforms import Preprocess

PRE = Preprocess(resize_size=16, crop_size=12, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def save_image(path: Path, size=(10, 8), mode="RGB", color=None, fmt=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if color is None:
        color = {"RGB": (200, 30, 60), "L": 128, "RGBA": (10, 20, 30, 40), "CMYK": (0, 255, 0, 0)}.get(mode, 0)
    Image.new(mode, size, color).save(path, format=fmt)
    return path


def make_folder(root: Path, counts: dict[str, int], ext=".png") -> Path:
    for name, n in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            save_image(root / name / f"{i:03d}{ext}")
    return root


def write_csv(path: Path, rows: list[list[str]], header=("path", "label")) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def project(path, **data) -> ProjectConfig:
    return ProjectConfig(data=DataConfig(path=str(path), **data))


# ---------------------------------------------------------------------------------------------
# Folders


def test_folder_scan_finds_sorted_classes_and_counts(tmp_path):
    root = make_folder(tmp_path / "data", {"dog": 3, "cat": 2, "bird": 4})
    save_image(root / "cat" / "nested" / "deep.jpg")  # recursive within a class
    (root / "cat" / "notes.txt").write_text("not an image")  # other extensions: ignored silently
    save_image(root / "cat" / ".hidden.png")
    save_image(root / ".cache" / "x.png")

    src = scan_source(root)

    assert src.kind == "folder" and src.task == "classification"
    assert src.class_names == ["bird", "cat", "dog"]
    assert src.class_counts() == [4, 3, 3]
    assert len(src.files) == len(src.targets) == 10
    assert not src.skipped and not src.warnings
    assert all(
        src.class_names[t] == Path(f).relative_to(root).parts[0] for f, t in zip(src.files, src.targets, strict=True)
    )


def test_broken_images_are_skipped_with_reasons_and_the_rest_load(tmp_path):
    root = make_folder(tmp_path / "data", {"cat": 3, "dog": 3})
    (root / "cat" / "text.png").write_text("this is not a png")
    (root / "dog" / "empty.jpg").write_bytes(b"")
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "full.jpg", quality=90)
    data = (tmp_path / "full.jpg").read_bytes()
    (root / "dog" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    calls = []

    src = scan_source(root, progress=lambda done, total: calls.append((done, total)))

    assert src.class_counts() == [3, 3]
    reasons = {Path(s.path).name: s.reason for s in src.skipped}
    assert set(reasons) == {"text.png", "empty.jpg", "truncated.jpg"}
    assert "cannot identify image file" in reasons["text.png"]
    assert reasons["empty.jpg"] == "empty file (0 bytes)"
    assert "truncated" in reasons["truncated.jpg"]
    assert calls and calls[-1] == (9, 9) and len(calls) <= 101
    ds = ImageFileDataset(src.files, src.targets, None, src.task)
    assert all(ds[i][0].shape[0] == 3 for i in range(len(ds)))


def test_class_folder_without_usable_images_is_left_out_with_a_warning(tmp_path):
    root = make_folder(tmp_path / "data", {"cat": 2, "dog": 2})
    (root / "empty").mkdir()
    (root / "broken").mkdir()
    (root / "broken" / "a.png").write_text("nope")

    src = scan_source(root)

    assert src.class_names == ["cat", "dog"]
    assert any("'empty'" in w and "left out" in w for w in src.warnings)
    assert any("'broken'" in w and "1 skipped" in w for w in src.warnings)


def test_oversized_image_is_skipped_as_a_decompression_bomb(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "data", {"cat": 2, "dog": 2})
    save_image(root / "dog" / "huge.png", size=(40, 40))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 40*40 is above it, the 10x8 images are not

    with pytest.warns(Image.DecompressionBombWarning):
        src = scan_source(root)

    (skip,) = src.skipped
    assert skip.path.endswith("huge.png") and "too large" in skip.reason
    assert src.class_counts() == [2, 2]


@pytest.mark.parametrize(
    "mode,fmt", [("L", "PNG"), ("RGBA", "PNG"), ("P", "PNG"), ("CMYK", "JPEG"), ("LA", "PNG"), ("1", "PNG")]
)
def test_image_modes_become_three_channel_tensors(tmp_path, mode, fmt):
    path = save_image(tmp_path / f"img.{fmt.lower()}", mode=mode, fmt=fmt)
    if mode == "P":  # a palette image with a transparent index
        img = Image.new("P", (10, 8), 3)
        img.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] * 64)
        img.save(path, transparency=0)
    ds = ImageFileDataset([path], [0], None, "classification")

    x, y = ds[0]

    assert load_image(path).mode == "RGB"
    assert x.shape == (3, 8, 10) and x.dtype == torch.float32
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert y.dtype == torch.long


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 32896, 65535, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")

    rgb = np.asarray(load_image(tmp_path / "deep.png"))

    assert rgb.shape == (1, 4, 3)
    assert rgb[0, :, 0].tolist() == [0, 128, 255, 255]


def test_exif_orientation_is_honoured(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90° clockwise to view
    img.save(tmp_path / "phone.jpg", exif=exif)

    assert load_image(tmp_path / "phone.jpg").size == (20, 40)


def test_folder_problems_raise_data_errors_naming_the_path(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no images found in .*empty.*one sub-folder per class"):
        scan_source(empty)

    single = make_folder(tmp_path / "single", {"cat": 3})
    with pytest.raises(DataError, match="at least 2 classes; found 1: 'cat'"):
        scan_source(single)

    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match="nowhere: no such file or folder"):
        scan_source(missing)

    a_file = save_image(tmp_path / "pic.png")
    with pytest.raises(DataError, match=r"pic\.png is a file, but an image folder"):
        scan_source(a_file, kind="folder")
    with pytest.raises(DataError, match=r"pic\.png: not a dataset"):
        scan_source(a_file)

    with pytest.raises(DataError, match="only suits the task 'classification'"):
        scan_source(make_folder(tmp_path / "two", {"a": 1, "b": 1}), task="regression")


def test_validation_folder_with_unknown_class_skips_it(tmp_path):
    root = make_folder(tmp_path / "val", {"cat": 2, "dog": 1, "fox": 2})

    src = scan_source(root, class_names=["cat", "dog", "owl"])

    assert src.class_names == ["cat", "dog", "owl"]
    assert src.class_counts() == [2, 1, 0]
    assert len(src.skipped) == 2
    assert all(s.reason == "label 'fox' is not one of the training classes" for s in src.skipped)


def test_folder_scan_labels_each_kept_file_by_its_folder_with_broken_ones_skipped_in_order(tmp_path):
    """Classes all usable, partly broken, all broken and empty, scanned twice (the second from the scan cache):
    each kept file's target is its own folder's class, and the skipped files and warnings are the same."""
    root = make_folder(tmp_path / "data", {"ant": 3, "bee": 4, "cow": 2, "elk": 2})
    (root / "bee" / "001.png").write_bytes(b"not an image")
    (root / "bee" / "003.png").write_bytes(b"")
    for f in (root / "cow").iterdir():
        f.write_bytes(b"broken")
    (root / "dog").mkdir()
    for _ in range(2):
        src = scan_source(root)
        assert src.class_names == ["ant", "bee", "elk"]
        assert [(f.parent.name, f.name) for f in src.files] == [
            ("ant", "000.png"), ("ant", "001.png"), ("ant", "002.png"), ("bee", "000.png"), ("bee", "002.png"),
            ("elk", "000.png"), ("elk", "001.png"),
        ]  # fmt: skip
        assert [src.class_names[t] for t in src.targets] == [f.parent.name for f in src.files]
        assert [Path(s.path).relative_to(root).as_posix() for s in src.skipped] == [
            "bee/001.png",
            "bee/003.png",
            "cow/000.png",
            "cow/001.png",
        ]
        assert src.warnings == [
            "class folder 'cow' has no usable images (2 skipped); left out",
            "class folder 'dog' has no images; left out",
        ]


def test_image_that_changes_on_disk_after_the_scan_with_none_to_stand_in_raises_data_error(tmp_path):
    # engine/sample_failures.py: another file stands in while one is readable (tests/engine/test_unreadable.py)
    root = make_folder(tmp_path / "data", {"cat": 1, "dog": 1})
    src = scan_source(root)
    ds = ImageFileDataset(src.files, src.targets, None, src.task)
    for f in src.files:
        Path(f).write_text("overwritten")

    with pytest.raises(DataError, match=str(src.files[0].name)):
        ds[0]


def test_symlink_loop_in_a_class_folder_is_reported_and_counts_equal_the_real_files(tmp_path):
    root = make_folder(tmp_path / "data", {"disc": 5, "square": 7})
    (root / "square" / "again").symlink_to(root, target_is_directory=True)  # back to the dataset's root
    (root / "disc" / "deeper").mkdir()
    (root / "disc" / "deeper" / "up").symlink_to(root / "disc", target_is_directory=True)  # to its own ancestor

    src = scan_source(root)

    assert src.class_counts() == [5, 7]  # the real files, each once
    assert sorted(f.name for f, t in zip(src.files, src.targets, strict=True) if t == 1) == [
        f"{i:03d}.png" for i in range(7)
    ]
    loops = [w for w in src.warnings if "symlink loop" in w]
    assert len(loops) == 2
    assert any(str(root / "square" / "again") in w for w in loops)
    assert any(str(root / "disc" / "deeper" / "up") in w for w in loops)


def test_symlink_to_a_folder_elsewhere_is_followed_once(tmp_path):
    root = make_folder(tmp_path / "data", {"cat": 2, "dog": 3})
    extra = make_folder(tmp_path / "more", {"cats": 4}) / "cats"
    (root / "cat" / "more").symlink_to(extra, target_is_directory=True)
    (root / "cat" / "same-again").symlink_to(extra, target_is_directory=True)  # a second path to it
    (root / "cat" / "linked.png").symlink_to(root / "cat" / "000.png")  # one real file, two names

    src = scan_source(root)

    assert src.class_counts() == [2 + 4, 3]
    cat = [f for f, t in zip(src.files, src.targets, strict=True) if t == 0]
    assert sum(1 for f in cat if f.parent.name in ("more", "same-again")) == 4
    assert any("same-again" in w and "already scanned" in w for w in src.warnings)
    assert any("reached through two paths" in w for w in src.warnings)


def test_a_folder_reached_again_inside_a_linked_folder_counts_its_images_once(tmp_path):
    """cat/a-inner links to more/inner, cat/b-outer to more itself, whose own sub-folder inner is walked again:
    its images count once, under the first path, and the doubles are reported."""
    root = make_folder(tmp_path / "data", {"cat": 2, "dog": 2})
    more = make_folder(tmp_path / "more", {"inner": 3})
    save_image(more / "top.png")
    (root / "cat" / "a-inner").symlink_to(more / "inner", target_is_directory=True)
    (root / "cat" / "b-outer").symlink_to(more, target_is_directory=True)

    src = scan_source(root)

    cat = [f.relative_to(root).as_posix() for f, t in zip(src.files, src.targets, strict=True) if t == 0]
    assert cat == ["cat/000.png", "cat/001.png", *(f"cat/a-inner/{i:03d}.png" for i in range(3)), "cat/b-outer/top.png"]
    assert "class folder 'cat': 3 image(s) reached through two paths (symlinks) counted once" in src.warnings


def test_a_plain_folder_reached_by_a_symlink_and_then_as_itself_counts_once(tmp_path):
    """cat holds nothing but a link to more, whose link a-inner leads to its own sub-folder inner before inner is
    walked as itself: no regular file was taken in the class before either visit, and inner still counts once."""
    root = make_folder(tmp_path / "data", {"dog": 2})
    (root / "cat").mkdir()
    more = make_folder(tmp_path / "more", {"inner": 3})
    (more / "a-inner").symlink_to(more / "inner", target_is_directory=True)
    (root / "cat" / "more").symlink_to(more, target_is_directory=True)

    src = scan_source(root)

    cat = [f.relative_to(root).as_posix() for f, t in zip(src.files, src.targets, strict=True) if t == 0]
    assert cat == [f"cat/more/a-inner/{i:03d}.png" for i in range(3)]
    assert "class folder 'cat': 3 image(s) reached through two paths (symlinks) counted once" in src.warnings


def test_symlink_into_another_class_folder_is_not_counted_under_both(tmp_path):
    root = make_folder(tmp_path / "data", {"a": 2, "b": 3})
    (root / "a" / "to-b").symlink_to(root / "b", target_is_directory=True)

    src = scan_source(root)

    assert src.class_counts() == [2, 3]
    assert any("to-b" in w and "class folder 'b'" in w for w in src.warnings)


# ---------------------------------------------------------------------------------------------
# CSV


def test_csv_classification_with_relative_absolute_and_missing_paths(tmp_path):
    a = save_image(tmp_path / "imgs" / "a.png")
    b = save_image(tmp_path / "imgs" / "b.png")
    c = save_image(tmp_path / "elsewhere" / "c.png")
    file = write_csv(
        tmp_path / "labels.csv",
        [["imgs/a.png", "cat"], ["imgs/b.png", "dog"], [str(c), "dog"], ["imgs/gone.png", "cat"], ["imgs/a.png", ""]],
        header=("path", "label", "notes"),
    )

    src = scan_source(file)

    assert src.kind == "csv"
    assert src.class_names == ["cat", "dog"]
    assert src.files == [a, b, c] and src.targets == [0, 1, 1]
    reasons = [s.reason for s in src.skipped]
    assert reasons == ["line 5: no such file", "line 6: empty label"]
    assert src.skipped[0].path.endswith("gone.png")


def test_csv_missing_column_names_it_and_the_columns_found(tmp_path):
    file = write_csv(tmp_path / "bad.csv", [["a.png", "cat"]], header=("file", "label"))

    with pytest.raises(DataError, match=r"bad\.csv has no 'path' column \(columns found: 'file', 'label'\)"):
        scan_source(file)


def test_validation_csv_with_unknown_label_skips_that_row(tmp_path):
    save_image(tmp_path / "a.png")
    save_image(tmp_path / "b.png")
    file = write_csv(tmp_path / "val.csv", [["a.png", "cat"], ["b.png", "zebra"]])

    src = scan_source(file, class_names=["cat", "dog"])

    assert src.targets == [0]
    (skip,) = src.skipped
    assert skip.reason == "line 3: label 'zebra' is not one of the training classes"


def test_multilabel_csv_gives_multi_hot_targets(tmp_path):
    for n in "abc":
        save_image(tmp_path / f"{n}.png")
    file = write_csv(tmp_path / "tags.csv", [["a.png", "sky;tree"], ["b.png", ""], ["c.png", " tree "]])

    src = scan_source(file, task="multilabel")

    assert src.class_names == ["sky", "tree"]
    assert src.targets == [[1.0, 1.0], [0.0, 0.0], [0.0, 1.0]]
    assert src.class_counts() == [1, 2]
    x, y = ImageFileDataset(src.files, src.targets, None, src.task)[0]
    assert y.dtype == torch.float32 and y.tolist() == [1.0, 1.0]


def test_regression_csv_single_and_several_values(tmp_path):
    for n in "abcd":
        save_image(tmp_path / f"{n}.png")
    one = scan_source(
        write_csv(tmp_path / "one.csv", [["a.png", "1.5"], ["b.png", "-2"], ["c.png", "abc"]]), task="regression"
    )
    two = scan_source(
        write_csv(tmp_path / "two.csv", [["a.png", "1;2"], ["b.png", "3;4"], ["c.png", "5"]]), task="regression"
    )

    assert one.class_names == ["value"] and one.targets == [[1.5], [-2.0]]
    assert "line 4: label 'abc' is not a number" in one.skipped[0].reason
    assert two.class_names == ["y0", "y1"] and two.targets == [[1.0, 2.0], [3.0, 4.0]]
    assert two.skipped[0].reason == "line 4: 1 values, expected 2"
    assert one.class_counts() == []


# ---------------------------------------------------------------------------------------------
# npz


def test_npz_grayscale_and_colour_arrays(tmp_path):
    gray = np.random.default_rng(0).integers(0, 256, (6, 8, 9), dtype=np.uint8)
    np.savez(tmp_path / "gray.npz", X=gray, y=np.array([3, 7, 3, 7, 3, 7]))
    colour = np.random.default_rng(1).random((4, 8, 9, 4)).astype(np.float32)
    np.savez(tmp_path / "colour.npz", X=colour, y=np.array([0, 1, 2, 1]), class_names=np.array(["ant", "bee", "cow"]))

    g = scan_source(tmp_path / "gray.npz")
    c = scan_source(tmp_path / "colour.npz")

    assert g.kind == "npz" and g.files is None
    assert g.class_names == ["3", "7"] and g.targets == [0, 1, 0, 1, 0, 1]
    assert c.class_names == ["ant", "bee", "cow"] and c.class_counts() == [1, 2, 1]
    xg, yg = ArrayDataset(g.array, g.targets, None, g.task)[1]
    assert xg.shape == (3, 8, 9) and torch.allclose(xg[0], torch.from_numpy(gray[1] / 255.0).float())
    assert torch.equal(xg[0], xg[2]) and yg.item() == 1
    xc, _ = ArrayDataset(c.array, c.targets, None, c.task)[0]
    assert xc.shape == (3, 8, 9) and torch.allclose(xc, torch.from_numpy(colour[0, :, :, :3]).permute(2, 0, 1))


def test_npz_rows_with_non_finite_pixels_are_skipped(tmp_path):
    x = np.full((5, 4, 4, 3), 0.5, dtype=np.float32)
    x[2, 1, 1, 0] = np.nan
    np.savez(tmp_path / "d.npz", X=x, y=np.array([0, 1, 0, 1, 0]))

    src = scan_source(tmp_path / "d.npz")

    assert src.targets == [0, 1, 1, 0] and src.array.shape == (4, 4, 4, 3)
    assert [s.reason.split(":")[0] for s in src.skipped] == ["row 2"]


def test_npz_problems_raise_data_errors(tmp_path):
    np.savez(tmp_path / "short.npz", X=np.zeros((4, 5, 5), np.uint8), y=np.zeros(3, np.int64))
    with pytest.raises(DataError, match=r"array 'X' has 4 rows .* 'y' has shape \(3,\)"):
        scan_source(tmp_path / "short.npz")

    np.savez(tmp_path / "objects.npz", X=np.zeros((2, 5, 5), np.uint8), y=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(DataError, match="array 'y' holds Python objects; refusing to unpickle"):
        scan_source(tmp_path / "objects.npz")

    np.savez(tmp_path / "noy.npz", X=np.zeros((2, 5, 5), np.uint8))
    with pytest.raises(DataError, match="no array 'y'"):
        scan_source(tmp_path / "noy.npz")

    np.savez(tmp_path / "dims.npz", X=np.zeros((2, 5), np.uint8), y=np.zeros(2, np.int64))
    with pytest.raises(DataError, match=r"array 'X' has shape \(2, 5\)"):
        scan_source(tmp_path / "dims.npz")


def test_npz_multilabel_and_regression_targets(tmp_path):
    x = np.zeros((3, 4, 4, 3), np.uint8)
    np.savez(tmp_path / "ml.npz", X=x, y=np.array([[1, 0], [1, 1], [0, 0]]), class_names=np.array(["a", "b"]))
    np.savez(tmp_path / "rg.npz", X=x, y=np.array([0.5, np.inf, 2.0]))

    ml = scan_source(tmp_path / "ml.npz", task="multilabel")
    rg = scan_source(tmp_path / "rg.npz", task="regression")

    assert ml.class_names == ["a", "b"] and ml.class_counts() == [2, 1]
    assert rg.class_names == ["value"] and rg.targets == [[0.5], [2.0]] and len(rg.skipped) == 1
    _, y = ArrayDataset(rg.array, rg.targets, None, rg.task)[1]
    assert y.dtype == torch.float32 and y.tolist() == [2.0]


# ---------------------------------------------------------------------------------------------
# Splitting and preparing


def test_stratified_split_keeps_proportions_and_follows_the_seed():
    targets = [0] * 50 + [1] * 30 + [2] * 10 + [3] * 2

    train, val = split_indices(targets, "classification", 0.2, seed=0)
    again, val_again = split_indices(targets, "classification", 0.2, seed=0)
    _, val_other = split_indices(targets, "classification", 0.2, seed=1)

    assert sorted(train + val) == list(range(len(targets))) and not set(train) & set(val)
    assert np.bincount([targets[i] for i in val]).tolist() == [10, 6, 2, 1]
    assert (train, val) == (again, val_again)
    assert val != val_other


def test_split_of_other_tasks_and_edge_fractions():
    targets = [[float(i)] for i in range(10)]
    train, val = split_indices(targets, "regression", 0.3, seed=0)
    assert len(val) == 3 and sorted(train + val) == list(range(10))
    assert split_indices(targets, "regression", 0.0, seed=0) == (list(range(10)), [])
    # a class of one is never moved wholly into validation
    _, val = split_indices([0, 0, 0, 1], "classification", 0.5, seed=0)
    assert 3 not in val


def test_prepare_data_splits_a_folder_and_loads_batches(tmp_path):
    root = make_folder(tmp_path / "data", {"cat": 10, "dog": 5})
    (root / "dog" / "bad.png").write_text("x")

    prepared = prepare_data(project(root, val_fraction=0.2, split_seed=3), PRE)

    assert prepared.class_names == ["cat", "dog"] and prepared.num_outputs == 2
    assert prepared.train_counts == [8, 4] and prepared.val_counts == [2, 1]
    assert len(prepared.train) == len(prepared.train_targets) == 12
    assert [prepared.train[i][1].item() for i in range(12)] == prepared.train_targets
    assert len(prepared.skipped) == 1
    text = prepared.summary()
    assert "cat" in text and "8 / 2" in text and "bad.png" in text
    images, labels = next(iter(DataLoader(prepared.train, batch_size=4)))
    assert images.shape == (4, 3, 12, 12) and labels.dtype == torch.long
    x_val, _ = prepared.val[0]
    assert x_val.shape == (3, 12, 12)


def test_prepare_data_with_a_separate_validation_folder(tmp_path):
    train_root = make_folder(tmp_path / "train", {"cat": 3, "dog": 3})
    val_root = make_folder(tmp_path / "val", {"cat": 1, "dog": 2, "emu": 1})

    prepared = prepare_data(project(train_root, val_path=str(val_root)), PRE)

    assert prepared.train_counts == [3, 3] and prepared.val_counts == [1, 2]
    assert prepared.val_source is not None and len(prepared.val) == 3
    assert [s.reason for s in prepared.skipped] == ["label 'emu' is not one of the training classes"]
    assert "validation" in prepared.summary()


def test_prepare_data_from_npz_without_validation(tmp_path):
    np.savez(tmp_path / "d.npz", X=np.zeros((6, 20, 30, 3), np.uint8), y=np.array([0, 1, 0, 1, 0, 1]))

    prepared = prepare_data(project(tmp_path / "d.npz", val_fraction=0.0, keep_aspect=True), PRE)

    assert prepared.val is None and prepared.val_counts == [0, 0]
    x, _ = prepared.train[0]
    assert x.shape[2] == 16 and x.shape[1] in (10, 11)  # the longer side resized to 16, aspect kept
    assert "No validation set" in prepared.summary()


def test_csv_numeric_class_names_sort_as_numbers(tmp_path):
    rows = [[f"i{n}.png", str(n)] for n in (10, 2, 1)]
    for name, _ in rows:
        save_image(tmp_path / name)
    src = scan_source(write_csv(tmp_path / "labels.csv", rows))
    assert src.class_names == ["1", "2", "10"]


@pytest.mark.parametrize("dtype, peak", [(np.int64, 200), (np.int32, 200), (np.int64, 40000)])
def test_npz_integer_images_are_read_by_their_range(tmp_path, dtype, peak):
    X = np.full((4, 6, 6), peak, dtype=dtype)
    np.savez(tmp_path / "d.npz", X=X, y=np.array([0, 1, 0, 1]))
    src = scan_source(tmp_path / "d.npz")
    value = ArrayDataset(src.array, src.targets, None, "classification")[0][0].max().item()
    assert value == pytest.approx(peak / (255 if peak <= 255 else 65535), rel=1e-5)


def test_npz_integer_images_out_of_any_pixel_range_are_refused(tmp_path):
    np.savez(tmp_path / "d.npz", X=np.full((2, 4, 4), -5, dtype=np.int64), y=np.array([0, 1]))
    with pytest.raises(DataError, match="-5"):
        scan_source(tmp_path / "d.npz")
