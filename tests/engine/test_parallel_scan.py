"""The first scan of a big dataset: image headers checked in worker processes find exactly what the in-process scan
finds; a stop ends the workers and keeps what was checked; progress counts rise to the total.

PARALLEL_FROM is lowered so that a folder of a few dozen files goes to real worker processes (forkserver).
"""

from __future__ import annotations

import io
import multiprocessing
import os

import numpy as np
import pytest
from conftest import write_image_folder
from PIL import Image

import engine.image_scan as image_scan
from engine.data import load_image, scan_source
from engine.scan_cache import ScanCache


def _truncated(path, fmt: str) -> None:
    noise = np.random.default_rng(1).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, format=fmt)
    data = buf.getvalue()
    path.write_bytes(data[: len(data) * 2 // 3])


def _mixed_folder(root):
    """Good images of several kinds among an unreadable, an empty, a non-image and two truncated files."""
    write_image_folder(root, per_class=6)
    (root / "red" / "notes.png").write_text("not a picture")
    (root / "red" / "empty.jpg").write_bytes(b"")
    os.symlink(root / "gone.png", root / "green" / "dangling.png")  # listed, but cannot be opened
    _truncated(root / "green" / "cut.png", "PNG")
    _truncated(root / "blue" / "cut.jpg", "JPEG")
    turned = Image.fromarray(np.zeros((10, 30, 3), np.uint8))
    exif = turned.getexif()
    exif[0x0112] = 6  # shown rotated: 10 wide, 30 high
    turned.save(root / "blue" / "phone.jpg", exif=exif)
    Image.fromarray(np.full((9, 7), 40000, np.uint16)).save(root / "blue" / "deep.png")
    Image.new("CMYK", (8, 5)).save(root / "red" / "cmyk.jpg")
    (root / "green" / "trailing.png").write_bytes((root / "green" / "000.png").read_bytes() + b"junk after IEND")
    return root


def _fields(source):
    return {
        "files": [str(f) for f in source.files],
        "targets": source.targets,
        "class_names": source.class_names,
        "skipped": [(s.path, s.reason) for s in source.skipped],
        "warnings": source.warnings,
    }


@pytest.fixture()
def parallel(monkeypatch):
    """Worker processes for any number of files; the parent's own check fails the test if it is used."""

    def not_here(path):
        raise AssertionError(f"{path} was checked in the test's process, not in a worker")

    monkeypatch.setattr(image_scan, "PARALLEL_FROM", 1)
    monkeypatch.setattr(image_scan, "inspect", not_here)  # workers import their own, real module


def test_workers_find_exactly_what_the_in_process_scan_finds(tmp_path, monkeypatch):
    folder = _mixed_folder(tmp_path / "images")
    monkeypatch.setenv("MWB_CACHE_DIR", str(tmp_path / "serial-cache"))
    serial = scan_source(folder)
    serial_cache = ScanCache(folder).old
    with monkeypatch.context() as m:
        m.setenv("MWB_CACHE_DIR", str(tmp_path / "parallel-cache"))
        m.setattr(image_scan, "PARALLEL_FROM", 1)
        m.setattr(image_scan, "inspect", lambda path: pytest.fail(f"{path} checked outside the workers"))
        assert image_scan.worker_count(len(serial.files)) >= 1
        par = scan_source(folder)
        parallel_cache = ScanCache(folder).old

    assert _fields(par) == _fields(serial)
    assert parallel_cache == serial_cache and len(serial_cache) == 3 * 6 + 8  # all but the dangling link
    reasons = {os.path.relpath(path, folder): reason for path, reason in _fields(par)["skipped"]}
    assert set(reasons) == {"red/notes.png", "red/empty.jpg", "green/dangling.png", "green/cut.png", "blue/cut.jpg"}
    assert "cannot identify image file" in reasons["red/notes.png"] and reasons["red/empty.jpg"].startswith("empty")
    assert "No such file" in reasons["green/dangling.png"]
    assert "truncated" in reasons["green/cut.png"] and "truncated" in reasons["blue/cut.jpg"]
    # The sizes the header gave are those of the decoded, upright image (ground truth: the full decoder).
    for key, (_, problem, size) in serial_cache.items():
        if problem is None:
            assert size == load_image(folder / key).size, key
    assert serial_cache["blue/phone.jpg"][2] == (10, 30)


class Stop(Exception):
    pass


@pytest.mark.parametrize("raised", [Stop, KeyboardInterrupt])
def test_a_stop_ends_the_workers_and_the_next_scan_goes_on_from_what_was_checked(
    tmp_path, monkeypatch, parallel, raised
):
    folder = write_image_folder(tmp_path / "images", per_class=150, size=8)  # 450 files: 15 chunks of 32
    seen: dict[str, list] = {"reports": [], "workers": []}
    before = {p.pid for p in multiprocessing.active_children()}  # left by earlier tests in this process (loaders)

    def progress(done: int, total: int) -> None:
        seen["reports"].append(done)
        seen["workers"] += [p.pid for p in multiprocessing.active_children() if p.pid not in before]
        if 0 < done < total:
            raise raised("stop")

    with pytest.raises(raised):
        scan_source(folder, progress=progress)
    stopped_at = seen["reports"][-1]
    assert 0 < stopped_at < 450 and seen["workers"]
    assert {p.pid for p in multiprocessing.active_children()} <= before  # the pool's processes ended, joined
    for pid in set(seen["workers"]):
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)

    remembered = ScanCache(folder).old
    assert len(remembered) == stopped_at and all(problem is None for _, problem, _ in remembered.values())

    # The next scan (in this process, recorded) checks only the files the stopped one had not.
    monkeypatch.undo()
    checked: list[str] = []
    real = image_scan.inspect
    monkeypatch.setattr(image_scan, "inspect", lambda path: checked.append(str(path)) or real(path))
    source = scan_source(folder)
    assert len(checked) == 450 - stopped_at and not set(checked) & {str(folder / k) for k in remembered}
    assert len(source) == 450 and not source.skipped


def test_progress_counts_rise_from_the_cached_files_to_the_total(tmp_path, parallel):
    folder = write_image_folder(tmp_path / "images", per_class=40, size=8)
    reports: list[tuple[int, int]] = []
    scan_source(folder, progress=lambda done, total: reports.append((done, total)))
    counts = [done for done, _ in reports]
    assert {total for _, total in reports} == {120}
    assert counts[0] == 0 and counts[-1] == 120 and len(counts) >= 3 and counts == sorted(counts)

    for f in list((folder / "red").iterdir())[:10]:
        os.utime(f, ns=(1, 1))  # ten changed files: the other 110 come from the cache
    reports.clear()
    scan_source(folder, progress=lambda done, total: reports.append((done, total)))
    assert reports[0] == (110, 120) and reports[-1] == (120, 120)


def test_progress_lines_give_the_rate_and_the_time_left_once_a_second_after_the_first():
    lines: list[str] = []
    now = [0.0]
    line = image_scan.ProgressLine(lines.append, "Checking images", clock=lambda: now[0])
    for t, done in [(0.0, 1_000), (0.5, 3_000), (1.0, 6_000), (1.5, 8_000), (2.0, 11_000)]:
        now[0] = t
        line(done, 201_000)  # 1,000 known from the cache: the rate counts from there
    assert lines == [
        "Checking images: 6,000 of 201,000 (2%), 5,000/s, about 39 s left",
        "Checking images: 11,000 of 201,000 (5%), 5,000/s, about 38 s left",
    ]
    now[0] = 42.0
    line(201_000, 201_000)
    assert lines[-1] == "Checking images: 201,000 of 201,000 (100%), done in 42 s"
    assert line.line(1_001_000, 2_001_000, 100.0).endswith("10,000/s, about 1 min 40 s left")

    lines.clear()  # a stage that ends within the first second (a small dataset) prints nothing
    for t, done in [(50.0, 0), (50.4, 30), (50.8, 60)]:
        now[0] = t
        line(done, 60)
    assert lines == []


def test_the_worker_module_imports_neither_pytorch_nor_qt():
    import subprocess
    import sys

    code = "import sys, engine.image_scan; print(sorted(m for m in ('torch', 'PySide6') if m in sys.modules))"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_stop_during_the_scan_ends_a_training_run_as_stopped_before_anything_is_built(tmp_path, parallel):
    import threading

    from conftest import write_project

    from engine.config import load_project
    from engine.trainer import Callback, Trainer

    folder = write_image_folder(tmp_path / "images", per_class=20, size=8)
    cfg = load_project(write_project(tmp_path / "p.json", str(folder)))
    events: list = []

    class Recorder(Callback):
        def on_log(self, trainer, message):
            events.append(message)

        def on_batch_finished(self, trainer, state, loss):
            events.append("batch")

    stop = threading.Event()
    stop.set()  # Stop pressed while the run was starting
    trainer = Trainer(cfg, [Recorder()], stop_event=stop)
    state = trainer.run()
    assert state.status == "stopped" and state.epoch == 0 and "batch" not in events
    assert trainer.parts is None  # the scan ended there: no model, loaders or caches were built
    assert events[-1] == "Stopped while preparing the data, before the first batch"
    assert multiprocessing.active_children() == []


def test_stop_ends_the_audit_during_its_scan(tmp_path):
    import threading

    from conftest import write_project

    from engine.audit import AuditStopped, run_audit
    from engine.config import load_project

    folder = write_image_folder(tmp_path / "images", per_class=4, size=8)
    cfg = load_project(write_project(tmp_path / "p.json", str(folder)))
    stop = threading.Event()
    stop.set()
    with pytest.raises(AuditStopped):
        run_audit(cfg, stop=stop, cache=tmp_path / "audit")
    assert ScanCache(folder).old == {}  # the scan ended before checking a file


def test_an_in_process_scan_reports_at_most_a_hundred_and_one_counts(tmp_path):
    folder = write_image_folder(tmp_path / "images", per_class=50, size=8)  # 150 files, under the crossover
    assert image_scan.worker_count(150) == 0
    reports: list[int] = []
    scan_source(folder, progress=lambda done, total: reports.append(done))
    assert reports[0] == 0 and reports[-1] == 150 and reports == sorted(reports) and len(reports) <= 101
