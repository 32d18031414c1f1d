"""Bad data inputs, each tried for real: through `main.py train` in a subprocess, the dataset panel and the main window.

A dataset that cannot train at all is refused with a message naming it (CLI exit 2, no traceback, no run folder;
in the app an error shown, the app usable, the project unchanged). A corrupt file in a usable dataset is reported
and skipped: the run goes on with the good images and the report names the bad file and why.
Checks already made by tests/engine/test_data.py, tests/engine/test_cli.py and tests/widgets/test_dataset_panel.py
(the engine's reasons for each kind of corrupt file, a missing data.path and a one-class folder through the CLI,
a missing/empty/one-class path in the panel) are not repeated here.
"""

from __future__ import annotations

import csv
import json
import os
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import write_image_folder, write_project
from PIL import Image

from engine.data import DataError, load_image, scan_source

ROOT = Path(__file__).resolve().parents[2]
BAD_NAME = b"bad\xff.png"  # not UTF-8: a Linux file name is bytes
GOOD_NAME = b"caf\xe9.png"  # Latin-1 'café', as an old camera or Windows share writes it
SHOWN_BAD = "bad\\xff.png"  # how messages must write it (Qt would drop the byte and show 'bad.png')


# ---------------------------------------------------------------------------------------------
# Real bad files


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_png(path: Path, width: int, height: int, bit_depth: int, colour_type: int, raw: bytes) -> Path:
    """A PNG written byte by byte: lets a header claim any size, or hold 16-bit colour Pillow cannot save."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(raw))
        + _png_chunk(b"IEND", b"")
    )
    return path


def write_bomb_png(path: Path) -> Path:
    """A 100 000 x 100 000 PNG header (10 gigapixels, far over Pillow's limit) with a few bytes of data: 100 bytes."""
    return write_png(path, 100_000, 100_000, 8, 2, b"\x00" * 16)


def write_rgb48_png(path: Path, values: np.ndarray) -> Path:
    """A 16-bit-per-channel RGB PNG of values (H, W, 3) uint16."""
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in values)
    return write_png(path, values.shape[1], values.shape[0], 16, 2, raw)


def write_truncated_jpeg(path: Path) -> Path:
    noise = np.random.default_rng(0).integers(0, 255, (48, 48, 3), dtype=np.uint8)
    full = path.with_name("full-" + path.name)
    Image.fromarray(noise).save(full, quality=90)
    data = full.read_bytes()
    full.unlink()
    path.write_bytes(data[: len(data) // 2])
    return path


def write_rotated_jpeg(path: Path) -> Path:
    """Stored 40 wide x 20 high, left half red, right half blue, with EXIF orientation 6 ('rotate 90° clockwise
    to view'): upright it is 20 x 40 with red on top."""
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = (255, 0, 0)
    pixels[:, 20:] = (0, 0, 255)
    img = Image.fromarray(pixels)
    exif = img.getexif()
    exif[0x0112] = 6
    img.save(path, exif=exif, quality=95)
    return path


def write_bytes_name(folder: Path, name: bytes, data: bytes) -> str:
    """A file whose name is not UTF-8; returns its path as Python names it (undecodable bytes as surrogates)."""
    target = os.path.join(os.fsencode(folder), name)
    with open(target, "wb") as fh:
        fh.write(data)
    return os.fsdecode(target)


def png_bytes(colour=(200, 30, 60), size=12) -> bytes:
    from io import BytesIO

    buf = BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="PNG")
    return buf.getvalue()


def write_mixed_folder(root: Path) -> dict[str, str]:
    """Three good classes (red, green, blue; 8 images each) plus every kind of bad and odd file among them.

    Returns {case: path} of the files placed. Corrupt (skipped): a zero-byte image, a truncated JPEG, a text
    file named .png, a decompression bomb, a non-UTF-8-named text file. Odd but good (kept): a 16-bit PNG, a
    CMYK JPEG, an EXIF-rotated JPEG, a non-UTF-8-named PNG. An empty class folder is left out with a warning.
    """
    write_image_folder(root, per_class=8)
    placed = {}
    (root / "red" / "empty.png").write_bytes(b"")
    placed["zero-byte"] = str(root / "red" / "empty.png")
    placed["truncated"] = str(write_truncated_jpeg(root / "green" / "truncated.jpg"))
    (root / "blue" / "notes.png").write_text("these are my notes, not a picture\n")
    placed["text-as-png"] = str(root / "blue" / "notes.png")
    placed["bomb"] = str(write_bomb_png(root / "red" / "bomb.png"))
    placed["bad-bytes-name"] = write_bytes_name(root / "green", BAD_NAME, b"not an image")

    deep = np.full((12, 12), 40000, np.uint16)
    Image.fromarray(deep).save(root / "blue" / "deep16.png")
    placed["16-bit"] = str(root / "blue" / "deep16.png")
    Image.new("CMYK", (12, 12), (0, 255, 0, 0)).save(root / "red" / "cmyk.jpg")
    placed["cmyk"] = str(root / "red" / "cmyk.jpg")
    placed["rotated"] = str(write_rotated_jpeg(root / "green" / "phone.jpg"))
    placed["good-bytes-name"] = write_bytes_name(root / "blue", GOOD_NAME, png_bytes((40, 60, 220)))
    (root / "purple").mkdir()
    return placed


CORRUPT = {
    "zero-byte": "empty file (0 bytes)",
    "truncated": "truncated",
    "text-as-png": "cannot identify image file",
    "bomb": "decompression bomb",
    "bad-bytes-name": "cannot identify image file",
}


def write_csv(path: Path, rows, header=("path", "label")) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def fatal_dataset(case: str, tmp_path: Path) -> tuple[Path, dict, str]:
    """(dataset path, data settings, the words the refusal must hold) for a dataset that cannot train."""
    if case == "file-for-folder":
        write_image_folder(tmp_path / "imgs", per_class=2)
        return tmp_path / "imgs" / "red" / "000.png", {"kind": "folder"}, "is a file, but an image folder"
    if case == "empty-folder":
        (tmp_path / "nothing").mkdir()
        return tmp_path / "nothing", {}, "no images found in"
    if case == "one-class-left":  # the other class folder holds no images
        write_image_folder(tmp_path / "two", per_class=3)
        for name in ("green", "blue"):
            for f in (tmp_path / "two" / name).iterdir():
                f.unlink()
        return tmp_path / "two", {}, "classification needs at least 2 classes; found 1: 'red'"
    if case == "all-corrupt":
        for name in ("cat", "dog"):
            (tmp_path / "broken" / name).mkdir(parents=True)
            (tmp_path / "broken" / name / "a.png").write_bytes(b"")
        return tmp_path / "broken", {}, "empty file (0 bytes)"
    if case == "csv-missing-column":
        write_image_folder(tmp_path / "imgs", per_class=2)
        file = write_csv(tmp_path / "labels.csv", [["imgs/red/000.png", "red"]], header=("file", "label"))
        return file, {}, "has no 'path' column (columns found: 'file', 'label')"
    if case == "npz-mismatched":
        np.savez(tmp_path / "data.npz", X=np.zeros((6, 8, 8), np.uint8), y=np.array([0, 1, 0, 1, 0]))
        return tmp_path / "data.npz", {}, "array 'X' has 6 rows (shape (6, 8, 8)) but 'y' has shape (5,)"
    if case == "npz-object":
        np.savez(tmp_path / "data.npz", X=np.zeros((4, 8, 8), np.uint8), y=np.array([{"a": 1}, 2, 3, None], object))
        return tmp_path / "data.npz", {}, "array 'y' holds Python objects; refusing to unpickle"
    raise AssertionError(case)


FATAL = [
    "file-for-folder",
    "empty-folder",
    "one-class-left",
    "all-corrupt",
    "csv-missing-column",
    "npz-mismatched",
    "npz-object",
]


def run_cli(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, str(ROOT / "main.py"), *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=600
    )


# ---------------------------------------------------------------------------------------------
# The engine: what each odd file decodes to (the reasons for corrupt ones are in tests/engine/test_data.py)


def test_exif_rotated_jpeg_loads_upright_with_its_top_on_top(tmp_path):
    img = np.asarray(load_image(write_rotated_jpeg(tmp_path / "phone.jpg")))
    assert img.shape == (40, 20, 3)  # upright: taller than wide
    top, bottom = img[:15].reshape(-1, 3).mean(axis=0), img[25:].reshape(-1, 3).mean(axis=0)
    assert top[0] > 200 and top[2] < 50, top  # red on top
    assert bottom[2] > 200 and bottom[0] < 50, bottom


def test_cmyk_jpeg_is_converted_to_the_same_colour_in_rgb(tmp_path):
    Image.new("CMYK", (12, 12), (0, 255, 0, 0)).save(tmp_path / "magenta.jpg")  # full magenta ink only
    Image.new("CMYK", (12, 12), (0, 0, 0, 255)).save(tmp_path / "black.jpg")
    magenta = np.asarray(load_image(tmp_path / "magenta.jpg")).reshape(-1, 3)
    black = np.asarray(load_image(tmp_path / "black.jpg")).reshape(-1, 3)
    assert np.abs(magenta.astype(int) - (255, 0, 255)).max() <= 3
    assert black.max() <= 3


def test_sixteen_bit_rgb_png_is_scaled_to_eight_bits_not_clipped(tmp_path):
    # 16 bits per channel, three channels: Pillow cannot write it, so it is written by hand.
    values = np.array([[[0, 32896, 65535], [1000, 20000, 50000]]], np.uint16)
    rgb = np.asarray(load_image(write_rgb48_png(tmp_path / "deep.png", values))).astype(int)
    assert rgb.shape == (1, 2, 3)
    assert np.abs(rgb - values / 257.0).max() <= 1.0  # 65535 -> 255 and 1000 -> 4, not everything at 255


def test_a_png_header_claiming_ten_gigapixels_is_skipped_without_decoding(tmp_path):
    root = write_image_folder(tmp_path / "data", per_class=2)
    write_bomb_png(root / "red" / "bomb.png")
    src = scan_source(root)
    (skip,) = src.skipped
    assert skip.path.endswith("bomb.png") and "decompression bomb" in skip.reason
    assert src.class_counts() == [2, 2, 2]


def test_non_utf8_file_names_load_and_are_named_readably_when_skipped(tmp_path):
    root = write_image_folder(tmp_path / "data", per_class=2)
    good = write_bytes_name(root / "red", GOOD_NAME, png_bytes())
    write_bytes_name(root / "red", BAD_NAME, b"junk")
    src = scan_source(root)
    assert good in [str(f) for f in src.files] and src.class_counts() == [2, 2, 3]
    (skip,) = src.skipped
    assert os.fsencode(skip.path).endswith(BAD_NAME)  # the real name, usable to open or delete the file
    from engine.config import DataConfig, ProjectConfig
    from engine.data import prepare_data
    from engine.transforms import Preprocess

    cfg = ProjectConfig(data=DataConfig(path=str(root), val_fraction=0.0))
    summary = prepare_data(cfg, Preprocess(resize_size=8, crop_size=8, mean=(0.5,) * 3, std=(0.5,) * 3)).summary()
    assert SHOWN_BAD in summary
    summary.encode("utf-8")  # writable to any UTF-8 log: no lone surrogates left
    with pytest.raises(DataError) as info:
        scan_source(Path(write_bytes_name(tmp_path, b"gone\xff", b"x")) / "sub")
    assert "gone\\xff" in str(info.value)


def test_readable_writes_only_undecodable_bytes_as_escapes():
    from engine.text import readable

    assert readable(os.fsdecode(b"/d/caf\xe9.png")) == "/d/caf\\xe9.png"
    assert readable("/d/café ünïcode.png") == "/d/café ünïcode.png"
    assert readable("x\ud800y") == "x\\ud800y"  # a surrogate no file name makes: still shown, never dropped


# ---------------------------------------------------------------------------------------------
# The CLI: a real `main.py train` per case


def test_cli_trains_on_the_good_images_and_names_every_corrupt_file(tmp_path):
    placed = write_mixed_folder(tmp_path / "images")
    project = write_project(tmp_path / "p.json", "images", train={"epochs": 1, "device": "cpu", "seed": 0})
    before = project.read_text()

    result = run_cli("train", str(project), "--out", str(tmp_path / "run"))

    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    err = result.stderr
    assert "Skipped 5 sample(s):" in err
    for case, reason in CORRUPT.items():
        shown = placed[case].replace(os.fsdecode(BAD_NAME), SHOWN_BAD)
        line = next((ln for ln in err.splitlines() if ln.strip().startswith(shown + ":")), None)
        assert line is not None and reason in line, (case, err)
    assert "class folder 'purple' has no images; left out" in err
    # 8 + 2 kept odd files (CMYK; bomb and empty skipped) in red, 8 + 1 (rotated) in green, 8 + 2 in blue:
    # the 16-bit PNG, the CMYK and rotated JPEGs and the non-UTF-8 name all train.
    ckpt_dir = tmp_path / "run" / "checkpoints"
    assert (ckpt_dir / "final.pt").is_file()
    import torch

    ckpt = torch.load(ckpt_dir / "final.pt", map_location="cpu", weights_only=True)
    assert ckpt["class_names"] == ["blue", "green", "red"]
    per_class = {m[1]: int(m[2]) + int(m[3]) for m in re.finditer(r"^\s+(blue|green|red)\s+(\d+) / (\d+)$", err, re.M)}
    assert per_class == {"blue": 10, "green": 9, "red": 9}
    assert project.read_text() == before


def test_cli_csv_with_a_missing_file_and_a_validation_csv_with_an_unknown_label(tmp_path):
    write_image_folder(tmp_path / "imgs", per_class=4)
    rows = [[f"imgs/{name}/{i:03d}.png", name] for name in ("red", "green", "blue") for i in range(4)]
    write_csv(tmp_path / "train.csv", rows + [["imgs/red/gone.png", "red"]])
    write_csv(tmp_path / "val.csv", [["imgs/red/000.png", "red"], ["imgs/blue/000.png", "purple"]])
    project = write_project(tmp_path / "p.json", "train.csv", train={"epochs": 1, "device": "cpu", "seed": 0})
    data = json.loads(project.read_text())
    data["data"]["val_path"] = "val.csv"
    project.write_text(json.dumps(data))

    result = run_cli("train", str(project), "--out", str(tmp_path / "run"))

    assert result.returncode == 0, result.stderr
    assert f"{tmp_path / 'imgs' / 'red' / 'gone.png'}: line 14: no such file" in result.stderr
    assert (
        f"{tmp_path / 'imgs' / 'blue' / '000.png'}: line 3: label 'purple' is not one of the training classes"
        in result.stderr
    )
    assert "12 training and 1 validation samples" in result.stderr
    assert (tmp_path / "run" / "checkpoints" / "final.pt").is_file()


@pytest.mark.parametrize("case", FATAL)
def test_cli_refuses_a_dataset_that_cannot_train_with_exit_2_and_its_reason(tmp_path, case):
    path, data, words = fatal_dataset(case, tmp_path)
    project = write_project(
        tmp_path / "p.json", str(path), data={"path": str(path), "image_size": 16, "val_fraction": 0.25, **data}
    )
    result = run_cli("train", str(project))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ") or "\nerror: " in result.stderr
    assert words in result.stderr and str(path) in result.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


# ---------------------------------------------------------------------------------------------
# The app: the dataset panel and the main window, offscreen


@pytest.fixture()
def panel(qtbot, project_state):
    from widgets.dataset_panel import DatasetPanel

    widget = DatasetPanel(project_state)
    qtbot.addWidget(widget)
    widget.show()
    assert widget.wait()
    yield widget
    widget.wait()


def _open(qtbot, panel, path, signal):
    with qtbot.waitSignal(getattr(panel, signal), timeout=60000) as blocker:
        panel.open_path(str(path))
    assert panel.wait()
    return blocker.args[0]


def _rows(table):
    model = table.model()
    return [[model.index(r, c).data() for c in range(model.columnCount())] for r in range(model.rowCount())]


def test_panel_lists_each_corrupt_file_readably_and_keeps_the_odd_good_ones(qtbot, panel, tmp_path):
    from PySide6.QtWidgets import QListView, QTableView

    placed = write_mixed_folder(tmp_path / "mixed")
    info = _open(qtbot, panel, tmp_path / "mixed", "scanned")

    assert info["skipped"] == 5 and info["counts"] == [10, 9, 9]
    rows = {path: reason for path, reason in _rows(panel.findChild(QTableView, "dataset.skipped"))}
    for case, reason in CORRUPT.items():
        shown = placed[case].replace(os.fsdecode(BAD_NAME), SHOWN_BAD)
        assert reason in rows[shown], (case, rows)
    assert not any(path.endswith("/bad.png") for path in rows)  # the undecodable byte was not silently dropped
    assert "purple" in panel.warnings_label.text() and panel.warnings_label.isVisible()
    assert panel.findChild(QListView, "dataset.samples").model().rowCount() == 28  # every usable sample


@pytest.mark.parametrize("case", FATAL)
def test_panel_shows_why_a_dataset_cannot_train_and_stays_usable(qtbot, panel, tmp_path, case, image_folder):
    from PySide6.QtWidgets import QLabel

    path, data, words = fatal_dataset(case, tmp_path)
    if case == "file-for-folder":  # opening a path in the app detects its kind: an image file is no dataset kind
        words = "not a dataset; expected an image folder (one sub-folder per class), a .csv file or a .npz file"
    message = _open(qtbot, panel, path, "scan_failed")
    error = panel.findChild(QLabel, "dataset.error")
    assert error.isVisible() and error.text() == message
    assert words in message and str(path) in message and "Traceback" not in message

    info = _open(qtbot, panel, image_folder, "scanned")  # still usable
    assert info["counts"] == [12, 12, 12] and not error.isVisible()


@pytest.fixture()
def window(qtbot, monkeypatch):
    from PySide6.QtWidgets import QMessageBox

    from app.main_window import MainWindow

    monkeypatch.setattr(MainWindow, "_ask_save_changes", lambda self: QMessageBox.StandardButton.Discard)
    monkeypatch.setattr(MainWindow, "_ask_stop_training", lambda self: True)
    win = MainWindow()
    qtbot.addWidget(win)
    yield win
    if win.controller.is_running():
        win.controller.stop()
        win.controller.wait(60000)
    win.state._set_dirty(False)
    win.close()


def _wait_tasks(qtbot):
    from widgets.tasks import running_tasks

    qtbot.waitUntil(lambda: not running_tasks(), timeout=120000)


def test_window_refuses_a_bad_dataset_then_trains_around_corrupt_files(qtbot, window, tmp_path):
    # A dataset that cannot train: the run fails with the dataset's message, nothing of the project is lost.
    path, _, words = fatal_dataset("npz-object", tmp_path)
    placed = write_mixed_folder(tmp_path / "images")
    project = write_project(tmp_path / "p.json", "data.npz", train={"epochs": 1, "device": "cpu", "seed": 0})
    saved = project.read_text()
    assert window.open_project(str(project))
    _wait_tasks(qtbot)
    config = window.state.config.to_dict()

    with qtbot.waitSignal(window.controller.run_finished, timeout=120000) as blocker:
        assert window.train()
    assert blocker.args[0]["status"] == "failed"
    qtbot.waitUntil(lambda: window.last_error_box is not None, timeout=10000)
    box = window.last_error_box.text()
    assert words in box and str(path) in box and "Traceback" not in box
    assert window.state.config.to_dict() == config and project.read_text() == saved
    assert window.act_train.isEnabled()
    window.last_error_box.close()

    # The same window, now on a folder with corrupt files: the run completes, the log names each bad file.
    window.state.set("data.path", "images")
    _wait_tasks(qtbot)
    with qtbot.waitSignal(window.controller.run_finished, timeout=180000) as blocker:
        assert window.train()
    assert blocker.args[0]["status"] == "completed"
    assert (Path(blocker.args[0]["run_dir"]) / "checkpoints" / "final.pt").is_file()
    log = window.log_view.toPlainText()
    for case, reason in CORRUPT.items():
        shown = placed[case].replace(os.fsdecode(BAD_NAME), SHOWN_BAD)
        assert any(line.strip().startswith(shown + ":") and reason in line for line in log.splitlines()), case
    _wait_tasks(qtbot)


def test_window_with_a_missing_dataset_says_so_before_training(qtbot, window, tmp_path):
    project = write_project(tmp_path / "p.json", "no_such_folder")
    assert window.open_project(str(project))
    _wait_tasks(qtbot)
    assert not window.train()
    assert "no_such_folder" in window.last_error_box.text()
    assert not window.controller.is_running() and window.act_train.isEnabled()
    assert not (tmp_path / "runs").exists()
