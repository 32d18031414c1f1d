"""The learning-rate finder in the app: Find learning rate... runs it on a worker thread, the plot shows the curve
with the suggestion marked, and Use this learning rate puts the suggestion into optimizer.lr (the field shows it)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QLineEdit, QPushButton

from tests.conftest import write_image_folder, write_project
from widgets.state import ProjectState
from widgets.training_panel import TrainingPanel


@pytest.fixture()
def panel(qtbot, tmp_path):
    write_image_folder(tmp_path / "images", per_class=12)  # 27 training images: 14 batches of 2
    project = write_project(
        tmp_path / "project.json",
        "images",
        model={"backbone": "timm/test_resnet", "freeze": "head_only"},
        loader={"batch_size": 2},
        optimizer={"name": "sgd", "lr": 0.01},
    )
    state = ProjectState()
    state.open(project)
    widget = TrainingPanel(state)
    qtbot.addWidget(widget)
    return widget


def test_the_finder_plots_its_curve_marks_the_suggestion_and_use_sets_the_learning_rate(qtbot, panel):
    state = panel.state
    qtbot.mouseClick(panel.findChild(QPushButton, "training.find_lr"), Qt.MouseButton.LeftButton)
    dialog = panel.lr_finder
    assert dialog is not None and dialog.isVisible()
    dialog.start_lr.setText("1e-4")
    dialog.end_lr.setText("100")
    dialog.batches.setValue(14)
    qtbot.mouseClick(dialog.run_button, Qt.MouseButton.LeftButton)
    assert dialog.run_button.text() == "Stop"  # the run is on its worker thread; the window stays responsive
    qtbot.waitUntil(lambda: not dialog.is_running(), timeout=120_000)
    result = dialog.found
    assert result is not None, dialog.message.text()
    assert result.suggestion is not None, result.reason
    assert result.feature_cache and dialog.run_button.text() == "Run"

    # The plot holds the whole curve on a log axis, and the marker sits on the smoothed curve at the suggestion.
    x, y = dialog.raw_curve.getData()
    assert len(x) == len(result.lrs) and np.allclose(x, np.log10(result.lrs))  # log mode: the axis is log10(lr)
    mx, my = dialog.marker.getData()
    assert mx.tolist() == pytest.approx([math.log10(result.suggestion)])
    assert my.tolist() == pytest.approx([result.smoothed[result.suggestion_index]])
    assert dialog.line.isVisible() and dialog.line.value() == pytest.approx(math.log10(result.suggestion))
    assert f"{result.suggestion:.3g}" in dialog.message.text()

    # Nothing changed before Use; after it optimizer.lr is the suggestion, shown in the field, project changed.
    assert state.get("optimizer.lr") == 0.01 and not state.dirty
    qtbot.mouseClick(dialog.use_button, Qt.MouseButton.LeftButton)
    expected = float(f"{result.suggestion:.3g}")
    assert state.get("optimizer.lr") == expected and state.dirty
    assert float(panel.findChild(QLineEdit, "training.lr").text()) == expected


def test_bounds_that_cannot_make_a_ramp_are_refused_in_the_dialog(qtbot, panel):
    dialog = panel.open_lr_finder()
    dialog.start_lr.setText("1")
    dialog.end_lr.setText("0.1")
    assert not dialog.start() and not dialog.is_running()
    assert "end_lr = 0.1: must be above start_lr" in dialog.message.text()
    dialog.end_lr.setText("ten")
    assert not dialog.start() and "must be numbers" in dialog.message.text()
