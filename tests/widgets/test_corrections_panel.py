"""Relabel and exclude: kept in the project file, read by the loader, listed with undo, surviving views and reopening."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from engine.backbones import preprocess_for
from engine.config import load_project
from engine.data import prepare_data, scan_source
from widgets.corrections_panel import CorrectionsPanel
from widgets.state import ProjectState


@pytest.fixture()
def panel(qtbot, project_state):
    widget = CorrectionsPanel(project_state)
    qtbot.addWidget(widget)
    return widget


def read_keys(project: Path) -> tuple[dict[str, str], list[str]]:
    """What the loader reads for a project file: {key: class} over both splits, and its warnings."""
    cfg = load_project(project)
    prepared = prepare_data(cfg, preprocess_for(cfg.model, cfg.data))
    names = prepared.class_names
    labels = {}
    for keys, dataset in ((prepared.train_keys, prepared.train), (prepared.val_keys, prepared.val)):
        for key, target in zip(keys, dataset.targets, strict=True):
            labels[key] = names[int(target)]
    return labels, prepared.warnings


def test_relabel_and_exclude_round_trip_through_the_project_file_and_the_loader(panel, project_state, tiny_project):
    images = tiny_project.parent / "images"
    before, _ = read_keys(tiny_project)
    assert before["red/000.png"] == "red" and before["green/001.png"] == "green"

    assert panel.exclude(str(images / "red" / "000.png")) == "red/000.png"
    assert panel.relabel(str(images / "green" / "001.png"), "blue") == "green/001.png"
    project_state.save()

    stored = json.loads(tiny_project.read_text())["data"]
    assert stored["exclude"] == ["red/000.png"] and stored["relabel"] == {"green/001.png": "blue"}
    after, warnings = read_keys(tiny_project)
    assert "red/000.png" not in after and after["green/001.png"] == "blue" and not warnings
    assert {k: v for k, v in after.items() if k != "green/001.png"} == {
        k: v for k, v in before.items() if k not in ("red/000.png", "green/001.png")
    }
    assert (images / "red" / "000.png").is_file()  # the user's file is untouched


def test_the_list_undoes_and_removes(panel, project_state, tiny_project):
    images = tiny_project.parent / "images"
    panel.exclude(str(images / "red" / "003.png"))
    panel.relabel(str(images / "blue" / "004.png"), "red")
    assert [(k, what) for k, what, _ in panel.entries()] == [
        ("red/003.png", "excluded"),
        ("blue/004.png", "relabelled as red"),
    ]
    assert panel.table.rowCount() == 2
    assert panel.undo()
    assert [k for k, _, _ in panel.entries()] == ["red/003.png"] and project_state.get("data.relabel") == {}
    panel.table.selectRow(0)
    panel.remove_button.click()
    assert panel.entries() == [] and project_state.get("data.exclude") == []
    assert panel.undo() and project_state.get("data.exclude") == ["red/003.png"]


def test_a_missing_file_or_unknown_class_is_reported_by_name_and_skipped(panel, project_state, tiny_project):
    project_state.update({"data.exclude": ["red/999.png"], "data.relabel": {"green/002.png": "purple"}})
    problems = panel.problems()
    assert problems == ["red/999.png: file not found", "green/002.png: no class 'purple' in the dataset"]
    assert "red/999.png" in panel.summary.text()
    project_state.save()
    labels, warnings = read_keys(tiny_project)  # the loader reads on, skipping both
    assert labels["green/002.png"] == "green" and len(labels) == 36
    assert any("red/999.png" in w for w in warnings) and any("purple" in w for w in warnings)


def test_corrections_survive_closing_and_reopening_the_project(qtbot, panel, project_state, tiny_project):
    images = tiny_project.parent / "images"
    panel.relabel(str(images / "red" / "005.png"), "green")
    panel.exclude(str(images / "blue" / "006.png"))
    project_state.save()
    reopened = ProjectState()
    reopened.open(tiny_project)
    again = CorrectionsPanel(reopened)
    qtbot.addWidget(again)
    assert (
        again.entries()
        == panel.entries()
        == [
            ("blue/006.png", "excluded", ""),
            ("red/005.png", "relabelled as green", ""),
        ]
    )


def digest(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_a_corrected_copy_is_written_elsewhere_and_the_originals_stay(panel, tiny_project, tmp_path):
    images = tiny_project.parent / "images"
    original = digest(images)
    panel.exclude(str(images / "red" / "000.png"))
    panel.relabel(str(images / "green" / "001.png"), "blue")

    panel.save_copy(str(tmp_path / "copy"))
    copied = scan_source(tmp_path / "copy")
    counts = dict(zip(copied.class_names, copied.class_counts(), strict=True))
    assert counts == {"blue": 13, "green": 11, "red": 11}
    moved = hashlib.sha256((images / "green" / "001.png").read_bytes()).hexdigest()
    assert moved in digest(tmp_path / "copy" / "blue").values()  # under its new class (renamed: blue has a 001)
    assert moved not in digest(tmp_path / "copy" / "green").values()

    panel.save_copy(str(tmp_path / "lists" / "corrected.csv"))
    listed = scan_source(tmp_path / "lists" / "corrected.csv")
    assert dict(zip(listed.class_names, listed.class_counts(), strict=True)) == counts
    assert {Path(f).resolve() for f in listed.files} <= {p.resolve() for p in images.rglob("*.png")}

    with pytest.raises(ValueError, match="inside the dataset"):
        panel.save_copy(str(images / "corrected"))
    assert digest(images) == original  # nothing moved, changed or added in the dataset


def test_an_image_outside_the_dataset_is_not_offered_for_correction(panel, tiny_project, tmp_path):
    from conftest import write_image_folder

    other = write_image_folder(tmp_path / "elsewhere", per_class=1)
    assert panel.why_not_correctable(str(tiny_project.parent / "images" / "red" / "001.png")) == ""
    assert "not an image of the project's dataset" in panel.why_not_correctable(str(other / "red" / "000.png")).lower()
    assert "not an image file" in panel.why_not_correctable(str(tmp_path / "gone.png")).lower()
