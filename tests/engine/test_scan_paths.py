"""Paths kept as text by the scan: sample keys made from the text agree with pathlib's, a PathList reads as the
list of Paths it replaces, and a folder scanned through '.' or holding a dangling symlink is listed as before."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import write_image_folder

from engine.data import sample_keys, scan_source
from engine.dataset_paths import PathList, path_key, path_keys

ROOTS = ["/data/set", "/data/set/", "data/set", ".", "/"]
PATHS = [
    "/data/set/cat/001.png",
    "/data/set/cat/deep/er/002.JPG",
    "/data/set//cat/003.png",  # doubled separator: pathlib drops the empty part
    "/data/set/./cat/004.png",
    "/data/set/cat/./005.png",
    "/data/set/cat/../dog/006.png",  # pathlib keeps '..'
    "/data/set/cat/.hidden.png",
    "/data/settle/cat/007.png",  # shares the root's text but not its folder
    "/elsewhere/008.png",
    "data/set/cat/009.png",
    "./data/set/cat/010.png",
    "cat/011.png",
    "./cat/012.png",
    "cat/sub/",
]


@pytest.mark.parametrize("root", ROOTS)
def test_keys_from_text_are_the_keys_pathlib_gives(root):
    assert path_keys(PATHS, Path(root)) == [path_key(p, Path(root)) for p in PATHS]
    assert path_keys([Path(p) for p in PATHS], Path(root)) == [path_key(p, Path(root)) for p in PATHS]


def test_a_path_list_reads_as_the_list_of_paths_it_holds():
    texts = ["a/1.png", "b/2.png", "c/3.png"]
    paths = PathList(texts)
    assert len(paths) == 3
    assert paths[1] == Path("b/2.png") and isinstance(paths[1], Path)
    assert paths[-1] == Path("c/3.png")
    assert list(paths) == [Path(t) for t in texts]
    assert paths == [Path(t) for t in texts] and paths != texts
    assert paths[1:] == PathList(texts[1:])
    assert paths.take([2, 0]).texts == ["c/3.png", "a/1.png"]
    assert PathList(paths).texts == texts and PathList(paths).texts is not paths.texts
    assert PathList([Path("x/../y.png")]).texts == [str(Path("x/../y.png"))]
    with pytest.raises(IndexError):
        paths[3]


def test_a_folder_scanned_as_dot_lists_the_paths_pathlib_would(tmp_path, monkeypatch):
    write_image_folder(tmp_path / "set", per_class=2, size=8)
    (tmp_path / "set" / "red" / "broken.png").write_bytes(b"not an image")
    monkeypatch.chdir(tmp_path / "set")
    source = scan_source(".")
    expected = sorted(
        (p for p in Path(".").glob("*/*.png") if p.name != "broken.png"), key=lambda p: (p.parent.name, p.name)
    )
    assert list(source.files) == expected
    assert source.files.texts == [str(p) for p in expected]  # 'red/000.png', not './red/000.png'
    assert [s.path for s in source.skipped] == [str(Path("red") / "broken.png")]
    assert sample_keys(source) == [p.as_posix() for p in expected]


def test_a_dangling_symlink_is_skipped_with_a_reason_on_every_scan(tmp_path):
    root = write_image_folder(tmp_path / "set", per_class=2, size=8)
    (root / "red" / "gone.png").symlink_to(tmp_path / "no-such-file.png")
    first = scan_source(root)
    second = scan_source(root)  # from the scan cache, which cannot stat the link: it is checked again
    link = os.path.join(root, "red", "gone.png")
    assert [s.path for s in first.skipped] == [link]
    assert first.skipped == second.skipped and first.skipped[0].reason
    assert list(second.files) == list(first.files) and Path(link) not in first.files
