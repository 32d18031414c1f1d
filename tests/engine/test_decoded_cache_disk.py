"""The decoded-image cache on disk: a memory-mapped file per split in the cache folder, written once, atomically,
and shared by real processes and loader workers; it serves bitwise the tensors decoding gives.

The processes are real (tests/engine/decoded_cache_child/child.py); a hook in them stops the writer at a chosen
point of the write, so the kill (or the go-ahead) lands exactly there.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_input_pipeline import PRE, assert_same_items, odd_sizes_folder, project, write_npz

from engine.data import ArrayDataset, ImageFileDataset, prepare_data
from engine.decoded_cache import DecodedImageDataset, apply_decoded_cache, disk_folder
from engine.samplers import build_loader, plan_loader

CHILD = Path(__file__).resolve().parent / "decoded_cache_child" / "child.py"
REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 120  # seconds a child may take to reach a point, on a machine as busy as it gets


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Each test its own cache folder (the processes it starts inherit it)."""
    monkeypatch.setenv("MWB_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def on_disk(cfg, mode="on"):
    cfg.loader.decoded_cache_disk = mode
    return cfg


def cached(cfg, pre=PRE):
    """(the project's data served from the cache, the outcome, the lines logged)."""
    data = prepare_data(cfg, pre)
    logged: list[str] = []
    outcome = apply_decoded_cache(data, cfg, pre, log=logged.append)
    return data, outcome, logged


def bin_files():
    return sorted(disk_folder().glob("*.bin"))


def temporaries():
    return sorted(p.name for p in disk_folder().glob(".*.tmp")) if disk_folder().exists() else []


@pytest.mark.parametrize("source", ["folder", "keep_aspect", "npz_float"])
def test_mapped_cache_gives_bitwise_the_decoded_tensors(tmp_path, source):
    if source == "npz_float":
        cfg = project(tmp_path, write_npz(tmp_path / "d.npz", np.float32).name)
    else:
        odd_sizes_folder(tmp_path / "images")
        cfg = project(tmp_path, "images", **({"keep_aspect": True} if source == "keep_aspect" else {}))
    plain = prepare_data(cfg, PRE)
    data, outcome, logged = cached(on_disk(cfg))
    assert outcome.used and outcome.written == 2 and len(outcome.files) == 2  # train and val, one file each
    assert [p.parent for p in outcome.files] == [disk_folder()] * 2 and bin_files() == sorted(outcome.files)
    for split in (data.train, data.val):
        assert isinstance(split, DecodedImageDataset) and split.backing in outcome.files
        held = split.images if split.images is not None else split.flat
        assert held.untyped_storage().filename is None  # a NumPy memmap: check the mapping in /proc instead
    maps = Path("/proc/self/maps").read_text() if Path("/proc/self/maps").exists() else None
    if maps is not None:
        assert all(str(p) in maps for p in outcome.files)
    if source == "keep_aspect":
        assert data.train.images is None and len({tuple(data.train.image(i).shape) for i in range(len(data.train))}) > 1
    else:
        assert data.train.images.dtype == (torch.float32 if source == "npz_float" else torch.uint8)
    assert_same_items(plain.train, data.train)
    assert_same_items(plain.val, data.val)
    line = logged[-1]
    assert line.startswith(f"Decoded-image cache: {len(plain.train) + len(plain.val)} images")
    assert "memory-mapped from" in line and str(disk_folder()) in line and "written by this process" in line
    # A second start maps the same files without writing them again.
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in outcome.files}
    again, second, logged = cached(cfg)
    assert second.used and second.written == 0 and second.files == outcome.files
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in outcome.files} == before
    assert "mapped as found, not rewritten" in logged[-1]
    assert_same_items(plain.val, again.val)


def test_auto_uses_the_file_when_memory_is_too_small_and_reuses_it_when_present(tmp_path):
    odd_sizes_folder(tmp_path / "images")
    cfg = project(tmp_path, "images")
    big = dataclasses.replace(PRE, resize_size=256, crop_size=224)  # 2.2 MiB for 15 images
    cfg.loader.decoded_cache_max_mb = 1
    _, outcome, logged = cached(cfg, big)
    assert outcome.used and outcome.written == 2 and "the images need more than the memory bound" in logged[-1]
    cfg.loader.decoded_cache_max_mb = None  # it fits in memory now, but the file is there: mapped, not decoded
    _, again, logged = cached(cfg, big)
    assert again.used and again.written == 0 and again.files == outcome.files and "an earlier run left it" in logged[-1]
    cfg.loader.decoded_cache_disk = "off"
    data, memory, logged = cached(cfg, big)
    assert memory.used and not memory.files and isinstance(data.train, DecodedImageDataset)
    assert data.train.backing is None and "in memory" in logged[-1]


def test_a_changed_file_gives_a_new_cache_and_the_old_one_goes(tmp_path):
    odd_sizes_folder(tmp_path / "images")
    cfg = on_disk(project(tmp_path, "images"))
    data, first, _ = cached(cfg)
    changed = data.train.source.files[2]
    old_pixels = data.train.image(2).clone()
    with Image.open(changed) as im:
        size = im.size
    Image.fromarray(np.full((size[1], size[0], 3), 7, dtype=np.uint8)).save(changed)
    data, second, logged = cached(cfg)
    train_file = next(p for p in second.files if p in (data.train.backing,))
    assert second.written == 1 and train_file not in first.files  # train rewritten under its new stamps ...
    assert data.val.backing in first.files  # ... validation's files did not change: mapped as it was
    assert not any(p.exists() for p in first.files if p not in second.files)  # one file per dataset and steps
    assert any("removed" in line and "changed since" in line for line in logged)
    assert not torch.equal(data.train.image(2), old_pixels)
    assert_same_items(prepare_data(cfg, PRE).train, data.train)


def run_child(tmp_path, name, cfg_path, pre, **env):
    """Start child.py on the project; its output goes to tmp_path/NAME.log, its result to NAME.json."""
    log = open(tmp_path / f"{name}.log", "w")
    proc = subprocess.Popen(
        [
            sys.executable,
            str(CHILD),
            str(cfg_path),
            str(tmp_path / f"{name}.json"),
            json.dumps(dataclasses.asdict(pre)),
        ],
        cwd=REPO,
        env={**os.environ, **env},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    return proc


def wait_for(proc, what, check):
    started = time.monotonic()
    while not check():
        if proc.poll() is not None:
            raise AssertionError(f"the process ended (exit {proc.returncode}) before {what}")
        if time.monotonic() - started > TIMEOUT:
            proc.kill()
            raise AssertionError(f"no {what} within {TIMEOUT} s")
        time.sleep(0.02)


def finish(proc, tmp_path, name):
    assert proc.wait(TIMEOUT) == 0, (tmp_path / f"{name}.log").read_text()
    return json.loads((tmp_path / f"{name}.json").read_text())


def project_file(tmp_path, **loader):
    odd_sizes_folder(tmp_path / "images")
    cfg = on_disk(project(tmp_path, "images"))
    path = tmp_path / "p.json"  # project() wrote it; the loader setting goes into the file for the children
    spec = json.loads(path.read_text())
    spec["loader"] = {**spec.get("loader", {}), "decoded_cache_disk": "on", **loader}
    path.write_text(json.dumps(spec))
    return cfg, path


def test_a_killed_write_is_not_trusted_and_is_rebuilt(tmp_path):
    # Killed with 4 of the training split's images in the temporary file. (Killed whole but not yet renamed is the
    # same case to the reader, which never looks at temporary files; the waiting test pauses the writer there.)
    cfg, path = project_file(tmp_path)
    marker = tmp_path / "paused.json"
    writer = run_child(
        tmp_path, "killed", path, PRE, MWB_TEST_DECODED_PAUSE="bytes:4", MWB_TEST_DECODED_MARKER=str(marker)
    )
    wait_for(writer, "the pause in the write", marker.exists)
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait(TIMEOUT)
    paused = json.loads(marker.read_text())
    left = Path(paused["temporary"])
    # The half-written file is there: the header page and 4 images of 3 x 16 x 16 bytes, no footer.
    assert left.exists() and left.stat().st_size == paused["bytes"] == 4096 + 4 * 3 * 16 * 16
    assert temporaries() == [left.name] and bin_files() == []  # and nothing under a name that would be trusted
    data, outcome, logged = cached(cfg)
    assert outcome.written == 2 and not left.exists() and temporaries() == []
    assert any(f"removed {left.name} left by a write that did not finish" in line for line in logged)
    plain = prepare_data(cfg, PRE)
    assert_same_items(plain.train, data.train)
    assert_same_items(plain.val, data.val)


def test_a_cut_off_or_foreign_file_under_the_final_name_is_not_trusted(tmp_path):
    odd_sizes_folder(tmp_path / "images")
    cfg = on_disk(project(tmp_path, "images"))
    _, first, _ = cached(cfg)
    train_file = first.files[0]
    whole = train_file.read_bytes()
    for damaged in (whole[:-100], whole[:-1] + b"X", b"\0" * len(whole)):
        train_file.write_bytes(damaged)
        data, again, _ = cached(cfg)
        assert again.written == 1 and train_file.read_bytes() == whole  # rewritten: the same bytes, header and all
        assert_same_items(prepare_data(cfg, PRE).train, data.train)


def test_two_processes_use_one_file_the_second_waits_and_maps_it(tmp_path):
    _, path = project_file(tmp_path)
    marker, go = tmp_path / "paused.json", tmp_path / "go"
    first = run_child(
        tmp_path,
        "first",
        path,
        PRE,
        MWB_TEST_DECODED_PAUSE="rename",
        MWB_TEST_DECODED_MARKER=str(marker),
        MWB_TEST_DECODED_GO=str(go),
    )
    wait_for(first, "the first process's pause before its rename", marker.exists)
    second = run_child(tmp_path, "second", path, PRE)
    waiting = f"Decoded-image cache: waiting for process {first.pid} on "
    wait_for(second, "the second process waiting", lambda: waiting in (tmp_path / "second.log").read_text())
    assert bin_files() == []  # the second waits while the first holds the lock with its file unfinished
    go.touch()
    one, two = finish(first, tmp_path, "first"), finish(second, tmp_path, "second")
    assert one["used"] and two["used"]
    assert one["files"] == two["files"]  # the same paths, inodes and modification times: nothing written twice
    assert sorted(Path(f["path"]) for f in one["files"]) == bin_files()  # one file per split, no other
    for f in one["files"]:
        st = os.stat(f["path"])
        assert (st.st_ino, st.st_mtime_ns) == (f["inode"], f["mtime_ns"])
    # The training split's file, which the first paused before renaming, is the first's and the second mapped it.
    # (Validation's goes to whichever takes its lock first once the first lets go of the training split's.)
    train = Path(json.loads(marker.read_text())["temporary"]).name.split(".")[1] + ".bin"
    assert f"train: {train} written by this process" in (tmp_path / "first.log").read_text()
    assert f"train: {train} mapped as found, not rewritten" in (tmp_path / "second.log").read_text()
    assert one["written"] + two["written"] == 2 and one["written"] >= 1


def test_loader_workers_read_the_mapped_file(tmp_path):
    odd_sizes_folder(tmp_path / "images")
    cfg = on_disk(project(tmp_path, "images"))
    data, outcome, _ = cached(cfg)
    plain = prepare_data(cfg, PRE)
    cfg.loader.num_workers = 2
    cfg.loader.shuffle = False
    plan = plan_loader(cfg.loader, cached=True, augmented=False, deterministic=False, device_type="cpu")
    wrapped = WhereServed(data.val, str(data.val.backing))
    loader = build_loader(
        wrapped, cfg.loader, train=False, targets=None, collate_fn=None, seed=0, pin_memory=False, plan=plan
    )
    seen = []
    for xs, ys, pids, mappeds in loader:
        seen += zip(xs, ys, pids, mappeds, strict=True)
    assert len({int(pid) for *_, pid, _ in seen} - {os.getpid()}) >= 1  # served by worker processes
    assert all(bool(mapped) for *_, mapped in seen)  # each worker reads the cache file's mapping
    for i, (x, y, _, _) in enumerate(seen):
        ref_x, ref_y = plain.val[i]
        assert torch.equal(x, ref_x) and torch.equal(y, ref_y)
    # A worker started by spawn unpickles the dataset: it maps the file again instead of carrying a copy.
    shipped = pickle.dumps(data.val)
    assert len(shipped) < data.val.nbytes
    assert_same_items(plain.val, pickle.loads(shipped))


class WhereServed(torch.utils.data.Dataset):
    """Each item with the serving process's pid and whether the cache file is mapped there."""

    def __init__(self, inner, path):
        self.inner, self.path = inner, path

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        x, y = self.inner[i]
        return x, y, os.getpid(), self.path in Path("/proc/self/maps").read_text()


def test_when_it_fits_neither_in_memory_nor_on_disk_images_are_decoded_every_epoch(tmp_path):
    odd_sizes_folder(tmp_path / "images")
    cfg = project(tmp_path, "images")
    cfg.loader.decoded_cache_max_mb = 1
    disk_folder().mkdir(parents=True)
    free = shutil.disk_usage(disk_folder()).free
    side = int((free / (3 * 15)) ** 0.5) + 1  # 15 images of this size need more than the disk has free
    huge = dataclasses.replace(PRE, resize_size=side, crop_size=side)
    data, outcome, logged = cached(cfg, huge)
    assert not outcome.used and isinstance(data.train, ImageFileDataset) and bin_files() == [] and temporaries() == []
    assert len(logged) == 1 and "bound of 1 MiB" in logged[0] and "decoded on every epoch" in logged[0]
    assert "and on disk the estimated" in logged[0] and "free on the disk of the cache folder" in logged[0]
    assert str(disk_folder()) in logged[0]


def test_an_array_dataset_is_cached_by_its_bytes(tmp_path):
    npz = write_npz(tmp_path / "d.npz")
    cfg = on_disk(project(tmp_path, npz.name))
    _, first, _ = cached(cfg)
    x = np.load(npz)
    arr = x["X"].copy()
    arr[0, 0, 0, 0] ^= 1  # one value of one image
    np.savez(npz, X=arr, y=x["y"])
    data, second, _ = cached(cfg)
    assert isinstance(data.train.source, ArrayDataset) and second.written >= 1
    assert set(second.files) != set(first.files)
    assert_same_items(prepare_data(cfg, PRE).train, data.train)
