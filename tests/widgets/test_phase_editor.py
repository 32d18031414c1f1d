"""The Training panel's phases (train.phases) and augmentation preview, driven as a user drives them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PySide6.QtCore import Qt
from PySide6.QtGui import QImage

from engine.config import load_project
from engine.trainer import build_run
from tests.conftest import write_project
from widgets.augment_preview import TILE
from widgets.phase_editor import COLUMN
from widgets.state import ProjectState
from widgets.training_panel import TrainingPanel


@pytest.fixture()
def panel(qtbot, project_state):
    widget = TrainingPanel(project_state)
    qtbot.addWidget(widget)
    widget.resize(1280, 800)
    widget.show()
    return widget


def type_cell(qtbot, table, row: int, key: str, text: str) -> None:
    """A cell's text as an edit commits it (the item's data set, itemChanged emitted)."""
    table.item(row, COLUMN[key]).setText(text)


def choose(table, row: int, key: str, data) -> None:
    combo = table.cellWidget(row, COLUMN[key])
    combo.setCurrentIndex(combo.findData(data))


def test_phases_edited_in_the_panel_round_trip_through_the_project_file(qtbot, panel, project_state, tmp_path):
    editor, table = panel.phases, panel.phases.table
    qtbot.mouseClick(editor.add_button, Qt.MouseButton.LeftButton)
    qtbot.mouseClick(editor.add_button, Qt.MouseButton.LeftButton)  # a copy of the first
    assert table.rowCount() == 2
    type_cell(qtbot, table, 0, "name", "head")
    type_cell(qtbot, table, 0, "epochs", "5")
    choose(table, 0, "freeze", "head_only")
    choose(table, 0, "augment", False)
    type_cell(qtbot, table, 0, "lr", "0.01")
    type_cell(qtbot, table, 1, "name", "top")
    choose(table, 1, "freeze", "up_to")
    type_cell(qtbot, table, 1, "freeze_up_to", "layer3")
    type_cell(qtbot, table, 1, "lr", "×0.2")
    choose(table, 1, "schedule", "onecycle")
    type_cell(qtbot, table, 1, "layer_lr_decay", "0.7")
    assert project_state.dirty and not editor.message.isVisible()

    project_state.save(tmp_path / "saved.json")
    saved = json.loads((tmp_path / "saved.json").read_text())["train"]["phases"]
    assert saved == [
        {
            "name": "head", "epochs": 5, "freeze": "head_only", "freeze_up_to": None, "freeze_prefixes": None,
            "unfreeze_prefixes": None, "lr": 0.01, "lr_factor": None, "schedule": None, "augment": False,
            "layer_lr_decay": None,
        },
        {
            "name": "top", "epochs": 1, "freeze": "up_to", "freeze_up_to": "layer3", "freeze_prefixes": None,
            "unfreeze_prefixes": None, "lr": None, "lr_factor": 0.2, "schedule": "onecycle", "augment": None,
            "layer_lr_decay": 0.7,
        },
    ]  # fmt: skip

    # Opened again (in a new state and panel), the table shows the same phases, cell by cell.
    other = ProjectState()
    other.open(tmp_path / "saved.json")
    again = TrainingPanel(other)
    qtbot.addWidget(again)
    shown = again.phases.table
    assert [shown.item(r, COLUMN["name"]).text() for r in range(2)] == ["head", "top"]
    assert [shown.item(r, COLUMN["lr"]).text() for r in range(2)] == ["0.01", "×0.2"]
    assert shown.cellWidget(1, COLUMN["schedule"]).currentData() == "onecycle"
    assert shown.cellWidget(0, COLUMN["augment"]).currentData() is False
    assert again.phases.phases() == other.config.train.phases


def test_the_fine_tune_preset_button_writes_the_recipe_for_the_projects_own_blocks(qtbot, panel, project_state):
    """The preset is found from the backbone's structure: head alone, then the top two blocks at a tenth of the
    rate with a cosine schedule, both unaugmented; the project is marked changed and the table shows it."""
    from engine.freezing import block_units
    from engine.phases import fine_tune_preset

    assert project_state.config.train.phases == [] and not project_state.dirty
    qtbot.mouseClick(panel.phases.preset_button, Qt.MouseButton.LeftButton)
    phases = project_state.config.train.phases
    assert phases == fine_tune_preset(project_state.config)["train.phases"] and project_state.dirty
    built = build_run(project_state.config)
    blocks = block_units(built.model, built.head_name)
    assert [(p.name, p.freeze, p.freeze_up_to, p.augment) for p in phases] == [
        ("head", "head_only", None, False),
        ("fine-tune", "up_to", blocks[-3], False),
    ]
    table = panel.phases.table
    assert [table.item(r, COLUMN["lr"]).text() for r in range(2)] == ["", "×0.1"]
    assert table.cellWidget(1, COLUMN["schedule"]).currentData() == "cosine"


def test_a_phase_the_project_refuses_is_explained_and_not_kept(qtbot, panel, project_state):
    editor, table = panel.phases, panel.phases.table
    qtbot.mouseClick(editor.add_button, Qt.MouseButton.LeftButton)
    choose(table, 0, "augment", True)  # the tiny project augments nothing
    assert editor.message.isVisible() and "train.phases[0].augment = true" in editor.message.text()
    assert project_state.config.train.phases[0].augment is None
    type_cell(qtbot, table, 0, "epochs", "two")
    assert "phase 1, Epochs: 'two' is not a whole number" in editor.message.text()
    assert project_state.config.train.phases[0].epochs == 1
    qtbot.mouseClick(editor.remove_button, Qt.MouseButton.LeftButton)
    assert project_state.config.train.phases == [] and table.rowCount() == 0


def tile_pixels(label) -> np.ndarray:
    image = label.pixmap().toImage().convertToFormat(QImage.Format.Format_RGB888)
    w, h = image.width(), image.height()
    rows = np.frombuffer(image.constBits(), np.uint8).reshape(h, image.bytesPerLine())
    return rows[:, : 3 * w].reshape(h, w, 3).copy()  # a copy: the image's memory goes with it


def test_the_augmentation_preview_shows_the_training_pipelines_pixels(qtbot, tmp_path, image_folder):
    # 84 px images: the tiles show them unscaled, so the pixels on screen are the pipeline's.
    project = write_project(
        tmp_path / "p.json",
        "images",
        data={"image_size": TILE, "augment": {"rotation": 30.0, "color_jitter": 0.4, "horizontal_flip": True}},
        loader={"decoded_cache": "off"},
    )
    state = ProjectState()
    state.open(project)
    panel = TrainingPanel(state)
    qtbot.addWidget(panel)
    panel.resize(1280, 800)
    panel.show()
    preview = panel.augment_preview
    assert preview.shown is None  # nothing is drawn (no PyTorch, no scan) before the user asks
    qtbot.mouseClick(preview.draw_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: preview.shown is not None and not preview.is_busy(), timeout=60_000)

    # The run's own training set and pipeline (build_run, as a run builds them), drawn with the same seed.
    parts = build_run(load_project(project))
    first = preview.shown
    torch.manual_seed(preview.seed)
    for k, index in enumerate(first.indices):
        x, _ = parts.data.train[index]
        mean = torch.tensor([0.5]).view(-1, 1, 1)
        expected = (x * 0.5 + mean).clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        assert np.array_equal(first.images[k], expected), k
        assert np.array_equal(tile_pixels(preview.tiles[k]), expected), k

    # An augmentation change redraws (no rotation now: the same images, other pixels); Draw again draws others.
    state.try_set("data.augment.rotation", 0.0)
    qtbot.waitUntil(lambda: preview.shown is not first and not preview.is_busy(), timeout=60_000)
    assert preview.shown.indices == first.indices and not np.array_equal(preview.shown.images, first.images)
    qtbot.mouseClick(preview.draw_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: preview.seed == 1 and preview.shown.indices != first.indices, timeout=60_000)


def test_opening_a_project_in_phases_leaves_it_unchanged(qtbot, tmp_path):
    """Filling the table made and set its combo boxes, whose signals wrote the half-filled table back into the
    project: the window's title said it had changed before any edit."""
    from tests.conftest import write_image_folder

    write_image_folder(tmp_path / "images", per_class=2)
    path = write_project(
        tmp_path / "p.json",
        "images",
        train={"phases": [{"epochs": 2, "freeze": "head_only", "augment": False}, {"epochs": 1, "lr_factor": 0.1}]},
    )
    state = ProjectState()
    changed: list[str] = []
    state.changed.connect(changed.append)
    state.open(path)
    widget = TrainingPanel(state)
    qtbot.addWidget(widget)
    assert not state.dirty and changed == [""]
    assert widget.phases.table.rowCount() == 2

    other = write_project(tmp_path / "q.json", "images", train={"phases": [{"epochs": 3, "schedule": "cosine"}]})
    state.open(other)  # the table (and its combo boxes) exist now, and are refilled
    assert not state.dirty and changed == ["", ""]
    assert state.config.train.phases == load_project(other).train.phases
    choose(widget.phases.table, 0, "schedule", "onecycle")  # an edit is still one
    assert state.dirty and state.config.train.phases[0].schedule == "onecycle"
