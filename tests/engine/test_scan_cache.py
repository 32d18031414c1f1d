"""The scan cache: a second scan of an unchanged dataset reads no image; a changed, added or removed file alone is
scanned again; a cache of another format version, or half written, is not trusted."""

from __future__ import annotations

import json
import os

import pytest
from conftest import write_image_folder

import engine.image_scan
from engine.data import scan_source
from engine.scan_cache import VERSION, ScanCache, read_payload, write_payload

PLANTED = "planted in the cache by the test"


@pytest.fixture()
def decodes(monkeypatch):
    """Every image file the scan reads, in order (the real check runs; this only records its argument). Small
    datasets are checked in the test's own process, where the recording sees them."""
    seen: list[str] = []
    real = engine.image_scan.inspect

    def recording(path):
        seen.append(os.path.basename(os.path.dirname(path)) + "/" + os.path.basename(path))
        return real(path)

    monkeypatch.setattr(engine.image_scan, "inspect", recording)
    return seen


def _plant(folder, name: str) -> None:
    """Rewrite the cached result of one file as a problem no decoder would report: a scan that reports it read
    the cache for that file instead of decoding it."""
    cache = ScanCache(folder)
    data = read_payload(cache.file)
    data["problems"][str(data["names"].index(name))] = PLANTED
    write_payload(cache.file, data)


def _reasons(source) -> dict[str, str]:
    return {os.path.relpath(s.path, source.path): s.reason for s in source.skipped}


def test_a_second_scan_decodes_nothing_and_reads_what_the_first_found(tmp_path, decodes):
    folder = write_image_folder(tmp_path / "images", per_class=4)
    (folder / "red" / "broken.png").write_bytes(b"not an image")
    first = scan_source(folder)
    assert len(decodes) == 13 and _reasons(first) == {"red/broken.png": _reasons(first)["red/broken.png"]}
    decodes.clear()
    second = scan_source(folder)
    assert decodes == []
    assert second.files == first.files and second.targets == first.targets and _reasons(second) == _reasons(first)

    _plant(folder, "green/001.png")
    assert _reasons(scan_source(folder))["green/001.png"] == PLANTED  # the result came from the cache
    assert decodes == []


def test_touched_added_and_removed_files_alone_are_scanned_again(tmp_path, decodes):
    folder = write_image_folder(tmp_path / "images", per_class=4)
    scan_source(folder)
    _plant(folder, "red/000.png")
    _plant(folder, "blue/003.png")
    decodes.clear()

    os.utime(folder / "red" / "000.png", ns=(1, 1))  # touched: size the same, time changed
    write_image_folder(tmp_path / "extra", per_class=1, seed=5)
    os.replace(tmp_path / "extra" / "green" / "000.png", folder / "green" / "new.png")  # added
    (folder / "blue" / "002.png").unlink()  # removed

    source = scan_source(folder)
    assert sorted(decodes) == ["green/new.png", "red/000.png"]
    reasons = _reasons(source)
    assert "red/000.png" not in reasons  # decoded again: fine
    assert reasons["blue/003.png"] == PLANTED  # unchanged: still from the cache
    names = {os.path.relpath(f, folder) for f in source.files}
    assert (
        "green/new.png" in names and "blue/002.png" not in names and len(names) == 11
    )  # 12 + 1 - 1, less the planted blue/003
    kept = read_payload(ScanCache(folder).file)["names"]
    assert "blue/002.png" not in kept and sorted(kept) == sorted(names | {"blue/003.png"})  # + the planted one


def test_a_file_rewritten_in_place_with_the_same_size_is_scanned_again(tmp_path, decodes):
    folder = write_image_folder(tmp_path / "images", per_class=3)
    scan_source(folder)
    target = folder / "blue" / "001.png"
    st = target.stat()
    target.write_bytes(b"x" * st.st_size)  # now broken, same size; put its modification time back as well
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    decodes.clear()
    source = scan_source(folder)
    assert decodes == ["blue/001.png"]  # its change time differs, so it is not trusted
    assert "cannot identify image file" in _reasons(source)["blue/001.png"]


@pytest.mark.parametrize("field", ["size", "mtime_ns", "inode", "ctime_ns"])
def test_a_file_whose_remembered_stamp_differs_in_one_field_alone_is_scanned_again(tmp_path, decodes, field):
    """Each stamp field is compared on its own: the remembered value of one file is made to differ by one (as a
    file rewritten with the same size and a mtime_ns one nanosecond on would), the other fields and files left
    as they are; that file alone is decoded, the others' results still come from the cache."""
    folder = write_image_folder(tmp_path / "images", per_class=3)
    scan_source(folder)
    _plant(folder, "red/002.png")
    file = ScanCache(folder).file
    data = read_payload(file)
    data[field][data["names"].index("green/001.png")] += 1
    write_payload(file, data)
    decodes.clear()
    source = scan_source(folder)
    assert decodes == ["green/001.png"]
    assert _reasons(source) == {"red/002.png": PLANTED}


def test_the_cache_lists_the_files_in_the_scans_order_after_some_were_checked_again(tmp_path, decodes):
    """A file checked again (or by a worker whose chunk finished early) is recorded after the remembered ones; the
    cache is still written in the scan's order, so the next start finds the files it lists, in order (and compares
    their stamps a column at a time)."""
    folder = write_image_folder(tmp_path / "images", per_class=3)
    scan_source(folder)
    os.utime(folder / "green" / "001.png", ns=(1, 1))
    decodes.clear()
    source = scan_source(folder)
    assert decodes == ["green/001.png"]
    names = read_payload(ScanCache(folder).file)["names"]
    assert names == [os.path.relpath(f, folder) for f in source.files] and len(names) == 9


def test_two_files_that_swapped_names_keep_each_its_own_result(tmp_path, decodes):
    """The same names in the same order, each now another file: the results follow the files' contents."""
    folder = write_image_folder(tmp_path / "images", per_class=3)
    broken, good = folder / "blue" / "000.png", folder / "blue" / "001.png"
    broken.write_bytes(b"not an image")
    first = scan_source(folder)
    assert set(_reasons(first)) == {"blue/000.png"}
    os.replace(broken, folder / "blue" / "swap")
    os.replace(good, broken)
    os.replace(folder / "blue" / "swap", good)
    decodes.clear()
    second = scan_source(folder)
    assert sorted(decodes) == ["blue/000.png", "blue/001.png"]
    assert set(_reasons(second)) == {"blue/001.png"} and len(second) == len(first)


def test_a_cache_listing_the_same_files_in_another_order_is_still_used(tmp_path, decodes):
    """A CSV whose rows were reordered: every file is remembered, at another position; none is decoded."""
    folder = write_image_folder(tmp_path / "images", per_class=2)
    rows = [f"{p.relative_to(tmp_path)},{p.parent.name}" for p in sorted(folder.rglob("*.png"))]
    table = tmp_path / "a.csv"
    table.write_text("\n".join(["path,label", *rows]))
    scan_source(table)
    _plant(table, "images/red/001.png")
    table.write_text("\n".join(["path,label", *reversed(rows)]))
    decodes.clear()
    source = scan_source(table)
    assert decodes == []
    assert [s.reason for s in source.skipped] == [f"line 2: {PLANTED}"]  # red/001.png is now the first row
    assert [str(f.relative_to(tmp_path)) for f in source.files] == [r.split(",")[0] for r in reversed(rows)][1:]
    # and the cache is written again in the new order (a cache of an earlier version, written in the order the
    # checks finished, is put in order the same way), so that the next start compares the stamps in columns
    assert read_payload(ScanCache(table).file)["names"] == [r.split(",")[0] for r in reversed(rows)]


@pytest.mark.parametrize(
    "damage", ["newer version", "half written", "another dataset", "a count that does not match", "names not UTF-8"]
)
def test_a_cache_of_another_version_or_half_written_is_ignored_and_replaced(tmp_path, decodes, damage):
    folder = write_image_folder(tmp_path / "images", per_class=2)
    scan_source(folder)
    _plant(folder, "red/000.png")
    file = ScanCache(folder).file
    data = read_payload(file)
    raw = file.read_bytes()
    if damage == "newer version":
        data["version"] = VERSION + 1
        write_payload(file, data)
    elif damage == "another dataset":
        data["dataset"] = str(tmp_path / "elsewhere")
        write_payload(file, data)
    elif damage == "a count that does not match":
        assert raw.count(b'"count":6,') == 1
        file.write_bytes(raw.replace(b'"count":6,', b'"count":5,'))
    elif damage == "names not UTF-8":
        at = raw.index(b"red/000.png")
        file.write_bytes(raw[:at] + b"\xff" + raw[at + 1 :])
    else:
        file.write_bytes(raw[: len(raw) // 2])
    assert read_payload(file) is None or damage in ("newer version", "another dataset")
    decodes.clear()
    source = scan_source(folder)
    assert len(decodes) == 6 and "red/000.png" not in _reasons(source)
    assert read_payload(file)["version"] == VERSION  # rewritten whole by this scan
    assert read_payload(file)["dataset"] == str(folder)


def test_a_cache_in_the_json_layout_of_version_1_is_not_trusted_and_is_replaced(tmp_path, decodes):
    """The JSON file an earlier release wrote (its layout, under its name): a scan decodes every file instead of
    taking that file's results, writes this version's cache, and removes the old one."""
    folder = write_image_folder(tmp_path / "images", per_class=2)
    scan_source(folder)
    current = ScanCache(folder).file
    data = read_payload(current)
    data["version"] = 1
    data["problems"][str(data["names"].index("red/000.png"))] = PLANTED
    old = current.with_suffix(".json")
    old.write_text(json.dumps(data))
    current.unlink()
    decodes.clear()
    source = scan_source(folder)
    assert len(decodes) == 6 and _reasons(source) == {}
    assert read_payload(current)["names"] == [os.path.relpath(f, folder) for f in source.files]
    assert not old.exists()


def test_names_that_are_not_utf8_are_remembered(tmp_path, decodes):
    """A file name with bytes that are not UTF-8 (Python holds them as lone surrogates) survives the cache file:
    the second scan decodes nothing."""
    folder = write_image_folder(tmp_path / "images", per_class=2)
    odd = os.fsencode(folder / "red") + b"/caf\xe9-\xff.png"
    os.replace(folder / "red" / "000.png", odd)
    first = scan_source(folder)
    assert os.fsdecode(odd) in {str(f) for f in first.files} and len(first) == 6
    decodes.clear()
    second = scan_source(folder)
    assert decodes == [] and second.files == first.files
    assert os.path.relpath(os.fsdecode(odd), folder) in read_payload(ScanCache(folder).file)["names"]


def test_a_stamp_past_the_64_bit_columns_is_checked_again_and_the_others_are_kept(tmp_path, decodes):
    """A modification time after the year 2262 does not fit the cache's columns: that file is left out of the
    cache (and decoded again at the next scan), the others are remembered."""
    folder = write_image_folder(tmp_path / "images", per_class=2)
    far = folder / "green" / "001.png"
    try:
        os.utime(far, ns=(2**63 + 10**9, 2**63 + 10**9))
    except (OSError, OverflowError):
        pytest.skip("this file system or platform cannot hold a time past 2262")
    if far.stat().st_mtime_ns < 2**63:
        pytest.skip("this file system stored a smaller time")
    scan_source(folder)
    names = read_payload(ScanCache(folder).file)["names"]
    assert "green/001.png" not in names and len(names) == 5
    decodes.clear()
    assert len(scan_source(folder)) == 6
    assert decodes == ["green/001.png"]


def test_a_cache_folder_that_cannot_be_written_only_costs_speed(tmp_path, monkeypatch, decodes):
    blocker = tmp_path / "a-file"
    blocker.write_text("the cache folder would have to be made inside a regular file")
    monkeypatch.setenv("MWB_CACHE_DIR", str(blocker / "cache"))
    folder = write_image_folder(tmp_path / "images", per_class=2)
    assert len(scan_source(folder)) == 6 and len(scan_source(folder)) == 6
    assert len(decodes) == 12  # nothing could be remembered, so both scans decoded, and neither failed


def test_a_csv_dataset_is_cached_under_its_own_file(tmp_path, decodes):
    folder = write_image_folder(tmp_path / "images", per_class=2)
    rows = ["path,label"] + [f"{p.relative_to(tmp_path)},{p.parent.name}" for p in sorted(folder.rglob("*.png"))]
    (tmp_path / "a.csv").write_text("\n".join(rows))
    (tmp_path / "b.csv").write_text("\n".join(rows[:4]))
    scan_source(tmp_path / "a.csv")
    scan_source(tmp_path / "b.csv")
    decodes.clear()
    assert len(scan_source(tmp_path / "a.csv")) == 6 and len(scan_source(tmp_path / "b.csv")) == 3
    assert decodes == []


def _column_check_only(monkeypatch):
    """Fail the test if a scan compares the files one by one (looking each up by name) rather than all at once."""

    def one_by_one(self, paths, keys):
        raise AssertionError(f"{len(paths)} files compared one by one: their names or stamps differed")

    monkeypatch.setattr(ScanCache, "_check_each", one_by_one)


@pytest.mark.parametrize("given_as", ["absolute", "relative", "the current folder"])
def test_a_second_start_on_an_unchanged_folder_compares_it_whole(tmp_path, monkeypatch, decodes, given_as):
    """Nested folders, a symlinked folder and a symlinked file among them: the names the walk gives, folder by
    folder, are the names the cache keeps, so that no file is looked up on its own."""
    folder = write_image_folder(tmp_path / "images", per_class=3)
    write_image_folder(tmp_path / "elsewhere", per_class=2, seed=3)
    (folder / "red" / "deeper" / "deepest").mkdir(parents=True)
    os.replace(tmp_path / "elsewhere" / "red" / "000.png", folder / "red" / "deeper" / "000.png")
    os.replace(tmp_path / "elsewhere" / "red" / "001.png", folder / "red" / "deeper" / "deepest" / "001.png")
    os.symlink(tmp_path / "elsewhere" / "green", folder / "green" / "linked")
    os.symlink(folder / "blue" / "000.png", folder / "blue" / "again.png")  # the same file twice: counted once
    monkeypatch.chdir(tmp_path if given_as != "the current folder" else folder)
    path = {"absolute": folder, "relative": "images", "the current folder": "."}[given_as]
    first = scan_source(path)
    assert len(first) == 9 + 2 + 2 and len(decodes) == 13
    decodes.clear()
    with monkeypatch.context() as m:
        _column_check_only(m)
        second = scan_source(path)
    assert decodes == [] and second.files == first.files and second.targets == first.targets

    # a touched file: compared one by one, and it alone decoded
    os.utime(folder / "red" / "deeper" / "deepest" / "001.png", ns=(1, 1))
    assert len(scan_source(path)) == 13 and decodes == ["deepest/001.png"]


def test_a_second_start_on_an_unchanged_csv_compares_it_whole(tmp_path, monkeypatch, decodes):
    folder = write_image_folder(tmp_path / "images", per_class=2)
    rows = [f"{p.relative_to(tmp_path)},{p.parent.name}" for p in sorted(folder.rglob("*.png"))]
    (tmp_path / "a.csv").write_text("\n".join(["path,label", *rows]))
    first = scan_source(tmp_path / "a.csv")
    decodes.clear()
    with monkeypatch.context() as m:
        _column_check_only(m)
        assert scan_source(tmp_path / "a.csv").files == first.files and decodes == []
