"""The evaluation panel on a real trained checkpoint: figures equal the engine's, heat map, thumbnails, errors."""

import json
import shutil

import numpy as np
import pytest
from conftest import COLOURS
from PySide6.QtCore import Qt
from PySide6.QtGui import QAction, QColor, QPalette
from PySide6.QtWidgets import (
    QAbstractButton,
    QAbstractItemView,
    QAbstractSpinBox,
    QComboBox,
    QLineEdit,
    QTabWidget,
    QWidget,
)

from engine.evaluate import evaluate_checkpoint
from widgets.evaluation_panel import OBJECT_NAMES, TOP_N, EvaluationPanel, viridis
from widgets.sample_browser import OBJECT_NAMES as SAMPLE_NAMES

CLASSES = ["blue", "green", "red"]


@pytest.fixture(scope="module")
def trained(head_only_run):
    """A resnet18 whose head trained one epoch on 16 px colour images; 6 validation images."""
    return head_only_run


@pytest.fixture()
def panel(qtbot):
    widget = EvaluationPanel()
    qtbot.addWidget(widget)
    widget.resize(1280, 800)
    widget.show()
    yield widget
    widget.wait()


def evaluate(qtbot, panel, data=None):
    with qtbot.waitSignal(panel.evaluated, timeout=60000) as blocker:
        assert panel.evaluate(data=data)
    qtbot.waitUntil(panel.thumbnails_done, timeout=30000)
    assert panel.wait()
    return blocker.args[0]


def dominant_colour(pixels):
    mean = pixels.reshape(-1, 3).mean(axis=0)
    return min(COLOURS, key=lambda name: float(np.abs(mean - np.array(COLOURS[name])).sum()))


def test_evaluation_shows_the_engines_figures(qtbot, panel, trained):
    panel.set_checkpoint(trained)
    result = evaluate(qtbot, panel)
    expected = evaluate_checkpoint(trained, device="cpu", top_n=TOP_N)

    assert result == panel.result
    assert panel.evaluate_button.isEnabled() and panel.save_button.isEnabled()
    assert not panel.stop_button.isEnabled() and not panel.progress.isVisible()
    assert result["accuracy"] == pytest.approx(expected.accuracy, abs=1e-9)
    assert result["samples"] == expected.samples == 6
    assert f"accuracy {expected.accuracy * 100:.1f}%" in panel.summary.text()
    assert f"loss {expected.loss:.4f}" in panel.summary.text() and "6 samples" in panel.summary.text()
    assert "validation split of" in panel.data_label.text()

    # The confusion matrix: 3x3 over the class names, every validation image counted once.
    counts = panel.matrix.counts()
    assert counts.shape == (3, 3) and counts.sum() == 6
    assert counts.tolist() == expected.confusion
    assert panel.matrix.class_names() == CLASSES
    assert panel.matrix.cell_text(0, 0) == str(expected.confusion[0][0])

    # One row per class with the engine's precision, recall, F1 and support.
    rows = {
        panel.table.item(r, 0).text(): [panel.table.item(r, c).text() for c in range(1, 5)]
        for r in range(panel.table.rowCount())
    }
    assert set(rows) == {"red", "green", "blue"}
    for row in expected.per_class:
        assert rows[row["class"]] == [
            f"{row['precision']:.3f}",
            f"{row['recall']:.3f}",
            f"{row['f1']:.3f}",
            str(row["support"]),
        ]

    # The hardest samples, highest loss first, each with a thumbnail of its image (12 px enlarged to 96 px).
    assert panel.samples.count() == len(expected.hardest) == 6
    for i, h in enumerate(expected.hardest):
        item = panel.samples.item(i)
        assert f"true {h['true']}" in item.text() and f"predicted {h['predicted']}" in item.text()
        assert f"loss {h['loss']:.3g}" in item.text() and h["path"] in item.toolTip()
        assert not item.icon().isNull()
        thumb = panel.thumbnails[i]
        assert thumb.shape == (96, 96, 3) and dominant_colour(thumb) == h["true"]


def test_table_sorts_by_number_and_heat_map_normalises(qtbot, panel, trained):
    panel.set_checkpoint(trained)
    evaluate(qtbot, panel)
    table = panel.table
    table.sortByColumn(3, Qt.SortOrder.DescendingOrder)
    f1 = [float(table.item(r, 3).text()) for r in range(table.rowCount())]
    assert f1 == sorted(f1, reverse=True)

    counts = panel.matrix.counts()
    panel.normalise.setChecked(True)
    assert panel.matrix.is_normalised()
    values = panel.matrix.values()
    np.testing.assert_allclose(values.sum(axis=1), 1.0)
    r = int(np.argmax(counts.max(axis=1)))
    c = int(np.argmax(counts[r]))
    assert panel.matrix.cell_text(r, c) == f"{counts[r, c] / counts[r].sum() * 100:.0f}%"

    # What is drawn: each cell in the colour of its value, in a light and in a dark palette.
    for window in (QColor(250, 250, 250), QColor(30, 30, 30)):
        palette = panel.palette()
        palette.setColor(QPalette.ColorRole.Window, window)
        palette.setColor(
            QPalette.ColorRole.WindowText, QColor(20, 20, 20) if window.lightness() > 128 else QColor(235, 235, 235)
        )
        panel.setPalette(palette)
        image = panel.matrix.grab().toImage()
        for row in range(3):
            for col in range(3):
                rect = panel.matrix.cell_rect(row, col)
                # A corner, clear of the count written in the middle.
                pixel = image.pixelColor(int(rect.left() + 3), int(rect.top() + 3))
                want = viridis(values[row, col])
                assert abs(pixel.red() - want.red()) <= 2 and abs(pixel.blue() - want.blue()) <= 2


def test_report_is_saved_as_json(qtbot, panel, trained, tmp_path):
    panel.set_checkpoint(trained)
    result = evaluate(qtbot, panel)
    out = tmp_path / "report.json"
    assert panel.save_report(out)
    assert json.loads(out.read_text()) == result

    assert not panel.save_report(tmp_path / "missing-folder" / "report.json")
    assert panel.message.isVisible() and "Could not save the report" in panel.message.text()


def test_a_deleted_checkpoint_shows_an_error_and_the_panel_still_works(qtbot, panel, trained, tmp_path):
    copy = tmp_path / "copy.pt"
    shutil.copy(trained, copy)
    panel.set_checkpoint(copy)
    copy.unlink()
    with qtbot.waitSignal(
        panel.logged, timeout=30000, check_params_cb=lambda text: text.startswith("Evaluation failed")
    ):
        assert panel.evaluate()
    assert panel.wait()
    assert panel.message.isVisible()
    assert "does not exist" in panel.message.text() and str(copy) in panel.message.text()
    assert panel.result is None and panel.evaluate_button.isEnabled()

    panel.set_checkpoint(trained)
    assert not panel.message.isVisible()
    result = evaluate(qtbot, panel)
    assert result["samples"] == 6 and not panel.message.isVisible()
    assert panel.matrix.counts().sum() == 6


def test_a_missing_dataset_keeps_the_last_results(qtbot, panel, trained, tmp_path):
    panel.set_checkpoint(trained)
    first = evaluate(qtbot, panel)
    with qtbot.waitSignal(
        panel.logged, timeout=30000, check_params_cb=lambda text: text.startswith("Evaluation failed")
    ):
        panel.evaluate(data=tmp_path / "gone")
    assert panel.wait()
    assert "no such file or folder" in panel.message.text() and "gone" in panel.message.text()
    assert panel.result == first and panel.samples.count() == 6  # the earlier figures still stand


def test_npz_samples_are_rendered_from_the_array(qtbot, panel, trained, tmp_path):
    labels = ["red", "blue", "purple", "green"]  # purple is not a class of the model: skipped
    colours = {**COLOURS, "purple": (150, 40, 200)}
    x = np.stack([np.full((12, 12, 3), colours[name], dtype=np.uint8) for name in labels])
    np.savez(tmp_path / "test.npz", X=x, y=np.array(labels))
    panel.set_checkpoint(trained)
    result = evaluate(qtbot, panel, data=tmp_path / "test.npz")
    assert result["samples"] == 3 and len(result["skipped"]) == 1
    assert "1 sample(s) skipped" in panel.data_label.text()
    assert panel.matrix.counts().sum() == 3
    for h, thumb in zip(result["hardest"], panel.thumbnails, strict=True):
        assert h["path"].startswith("row ")
        assert isinstance(thumb, np.ndarray) and dominant_colour(thumb) == h["true"]
        assert tuple(thumb[0, 0]) == COLOURS[h["true"]]  # the stored pixels, unchanged


def test_without_a_checkpoint_nothing_runs(qtbot, panel):
    assert not panel.evaluate_button.isEnabled() and not panel.save_button.isEnabled()
    assert not panel.evaluate()
    assert "Choose a checkpoint" in panel.message.text()


def test_every_control_is_named_and_documented(panel):
    named = {w.objectName() for w in panel.findChildren(QWidget) if w.objectName().startswith("evaluation.")}
    named |= {a.objectName() for a in panel.findChildren(QAction) if a.objectName().startswith("evaluation.")}
    assert named == set(OBJECT_NAMES)
    interactive = (QAbstractButton, QLineEdit, QComboBox, QAbstractSpinBox, QAbstractItemView)

    def inside_a_control(w):  # a combo's popup list, a table's header: parts of the named control
        parent = w.parentWidget()
        while parent is not None and parent is not panel:
            if isinstance(parent, (*interactive, QTabWidget)):  # a tab bar's scroll buttons
                return True
            parent = parent.parentWidget()
        return False

    for w in panel.findChildren(QWidget):
        if isinstance(w, interactive) and not inside_a_control(w):
            assert w.objectName() in OBJECT_NAMES | SAMPLE_NAMES, f"unnamed {type(w).__name__}: {w.objectName()!r}"


def test_stop_and_choosing_another_checkpoint(qtbot, panel, trained):
    panel.set_checkpoint(trained)
    # The worker loads the checkpoint, builds the model and scans the data before its first batch; stop()
    # is the next statement here, so the evaluation ends without a result.
    assert panel.evaluate()
    assert panel.stop_button.isEnabled() and not panel.evaluate_button.isEnabled()
    with qtbot.waitSignal(panel.logged, timeout=30000, check_params_cb=lambda m: m == "Evaluation stopped"):
        panel.stop()
    assert panel.wait() and panel.result is None and panel.evaluate_button.isEnabled()

    evaluate(qtbot, panel)
    panel.set_checkpoint(trained)  # the same, unchanged file: its results stay
    assert panel.result is not None and panel.samples.count() == 6
    panel.set_checkpoint(None)
    assert panel.result is None and panel.samples.count() == 0 and panel.table.rowCount() == 0
    assert panel.matrix.counts().size == 0
    assert not panel.evaluate_button.isEnabled() and not panel.save_button.isEnabled()
