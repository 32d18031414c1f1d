"""The dataset panel: opening real folders and files, what it shows of them, and how it reports bad data."""

import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import write_image_folder
from PySide6.QtCore import Qt, QTimer
from PySide6.QtWidgets import QLabel, QLineEdit, QListView, QListWidget, QPushButton, QTableView, QTableWidget, QWidget

from engine.data import scan_source, split_indices
from widgets.dataset_panel import OBJECT_NAMES, DatasetPanel


@pytest.fixture()
def panel(qtbot, project_state):
    widget = DatasetPanel(project_state)
    qtbot.addWidget(widget)
    widget.resize(1280, 800)
    widget.show()
    assert widget.wait()  # the project's own dataset is scanned as the panel opens
    yield widget
    widget.wait()


def open_and_wait(qtbot, panel, path):
    with qtbot.waitSignal(panel.scanned, timeout=30000) as blocker:
        panel.open_path(str(path))
    assert panel.wait()
    return blocker.args[0]


def open_and_fail(qtbot, panel, path):
    with qtbot.waitSignal(panel.scan_failed, timeout=30000) as blocker:
        panel.open_path(str(path))
    assert panel.wait()
    return blocker.args[0]


def bar_chart_data(panel):
    """(class names on the x axis, bar heights summed per class) as the chart holds them."""
    items = panel.bar_chart.getPlotItem().items
    bars = [item for item in items if type(item).__name__ == "BarGraphItem"]
    totals = None
    for bar in bars:
        heights = np.asarray(bar.opts["height"], dtype=float)
        totals = heights if totals is None else totals + heights
    return panel.class_axis.names, ([] if totals is None else totals.tolist())


def table_rows(table: QTableWidget | QTableView):
    model = table.model()
    return [[model.index(r, c).data() or "" for c in range(model.columnCount())] for r in range(model.rowCount())]


def sample_labels(panel) -> list[str]:
    model = panel.findChild(QListView, "dataset.samples").model()
    return [model.index(r, 0).data() for r in range(model.rowCount())]


def thumbnail(qtbot, panel, row: int):
    """The Samples tab shown, scrolled to a row, and that row's decoded thumbnail once the background task made it."""
    view = panel.findChild(QListView, "dataset.samples")
    panel.tabs.setCurrentWidget(view)
    model = view.model()
    view.scrollTo(model.index(row, 0))
    qtbot.waitUntil(lambda: row in model.thumbs, timeout=30000)
    return model.thumbs[row]


def test_the_tiny_image_folder_shows_its_classes_samples_and_split(qtbot, panel, image_folder):
    info = open_and_wait(qtbot, panel, image_folder)
    assert info["class_names"] == ["blue", "green", "red"] and info["counts"] == [12, 12, 12]
    assert info["num_classes"] == 3 and info["skipped"] == 0

    names, heights = bar_chart_data(panel)
    assert names == ["blue", "green", "red"] and heights == [12, 12, 12]
    rows = table_rows(panel.findChild(QTableWidget, "dataset.classes"))
    assert [(r[0], r[1]) for r in rows] == [("blue", "12"), ("green", "12"), ("red", "12")]

    assert sample_labels(panel) == ["blue"] * 12 + ["green"] * 12 + ["red"] * 12  # every sample, by class
    image = thumbnail(qtbot, panel, 30).toImage()  # a red one: noisy (220, 40, 40)
    r, g, b = (image.pixelColor(image.width() // 2, image.height() // 2).getRgb()[i] for i in range(3))
    assert r > 150 and g < 110 and b < 110

    # The project's split (val_fraction 0.25, seed 0), as training will make it.
    source = scan_source(image_folder)
    train, val = split_indices(source.targets, "classification", 0.25, 0)
    assert (info["train"], info["val"]) == (len(train), len(val)) == (27, 9)
    split_text = panel.findChild(QLabel, "dataset.split").text()
    assert "27 training" in split_text and "9 validation" in split_text
    assert [(r[2], r[3]) for r in rows] == [("9", "3")] * 3
    assert not panel.findChild(QLabel, "dataset.error").isVisible()


def test_changing_the_fraction_re_splits_and_a_bad_fraction_is_refused(qtbot, panel, image_folder):
    open_and_wait(qtbot, panel, image_folder)
    edit = panel.findChild(QLineEdit, "dataset.val_fraction")
    with qtbot.waitSignal(panel.scanned, timeout=30000) as blocker:
        edit.setText("0.5")
        edit.editingFinished.emit()
    panel.wait()
    assert panel.state.config.data.val_fraction == 0.5
    assert (blocker.args[0]["train"], blocker.args[0]["val"]) == (18, 18)

    edit.setText("1.5")
    qtbot.keyClick(edit, Qt.Key.Key_Return)
    panel.wait()
    assert panel.state.config.data.val_fraction == 0.5  # unchanged
    assert "data.val_fraction" in edit.toolTip() and "1.5" in edit.toolTip()
    message = panel.split_message
    assert message.isVisible() and "val_fraction" in message.text()


def test_a_corrupt_png_is_listed_as_skipped_with_its_reason(qtbot, panel, tmp_path):
    folder = write_image_folder(tmp_path / "with_bad", per_class=4)
    bad = folder / "red" / "broken.png"
    bad.write_text("this is not a picture")
    info = open_and_wait(qtbot, panel, folder)
    assert info["skipped"] == 1 and info["counts"] == [4, 4, 4]
    rows = table_rows(panel.findChild(QTableView, "dataset.skipped"))
    assert len(rows) == 1 and rows[0][0] == str(bad) and "cannot identify image" in rows[0][1]
    assert panel.tabs.tabText(2) == "Skipped (1)"


@pytest.mark.parametrize("make_bad", ["missing", "empty", "one_class"])
def test_a_bad_path_shows_an_error_and_the_panel_stays_usable(qtbot, panel, image_folder, tmp_path, make_bad):
    open_and_wait(qtbot, panel, image_folder)
    bad = tmp_path / "bad"
    if make_bad == "empty":
        bad.mkdir()
    elif make_bad == "one_class":
        write_image_folder(tmp_path / "all", per_class=2)
        shutil.copytree(tmp_path / "all" / "red", bad / "red")
    message = open_and_fail(qtbot, panel, bad)
    error = panel.findChild(QLabel, "dataset.error")
    assert error.isVisible() and str(bad) in error.text() and error.text() == message
    assert "Traceback" not in message
    assert bar_chart_data(panel) == ([], [])  # the previous dataset is no longer shown
    assert sample_labels(panel) == []
    assert panel.findChild(QTableWidget, "dataset.classes").rowCount() == 0

    info = open_and_wait(qtbot, panel, image_folder)  # still usable
    assert info["counts"] == [12, 12, 12] and not error.isVisible()


def test_npz_rows_become_thumbnails_and_the_sample_dataset_opens(qtbot, panel, tmp_path):
    x = np.zeros((20, 8, 8), dtype=np.uint8)
    x[10:] = 255
    np.savez(tmp_path / "data.npz", X=x, y=np.array([0] * 10 + [1] * 10), class_names=np.array(["dark", "light"]))
    info = open_and_wait(qtbot, panel, tmp_path / "data.npz")
    assert info["class_names"] == ["dark", "light"] and info["counts"] == [10, 10]
    assert sample_labels(panel) == ["dark"] * 10 + ["light"] * 10
    for row, value in ((0, 0), (19, 255)):
        image = thumbnail(qtbot, panel, row).toImage()
        assert image.width() == 64 and image.pixelColor(32, 32).getRgb()[:3] == (value, value, value)

    with qtbot.waitSignal(panel.scanned, timeout=60000) as blocker:
        panel.findChild(QPushButton, "dataset.open_sample").click()
    panel.wait()
    digits = blocker.args[0]
    assert digits["num_classes"] == 10 and sum(digits["counts"]) == 1797
    assert len(sample_labels(panel)) == 1797
    assert Path(panel.state.config.resolve(panel.state.config.data.path)).name == "digits"


def test_paths_inside_the_project_folder_are_stored_relative(qtbot, panel, image_folder, tmp_path):
    open_and_wait(qtbot, panel, image_folder)
    assert panel.state.config.data.path == "images"  # the project file is in tmp_path
    outside = write_image_folder(tmp_path.parent / f"{tmp_path.name}-outside", per_class=2)
    try:
        open_and_wait(qtbot, panel, outside)
        assert panel.state.config.data.path == str(outside)
    finally:
        shutil.rmtree(outside)


def test_recent_datasets_remember_opened_paths_and_drop_missing_ones(qtbot, panel, image_folder, tmp_path):
    other = write_image_folder(tmp_path / "other", per_class=2)
    open_and_wait(qtbot, panel, other)
    open_and_wait(qtbot, panel, image_folder)
    recent = panel.findChild(QListWidget, "dataset.recent")
    assert panel.recent_datasets()[:2] == [str(image_folder), str(other)]
    assert recent.item(0).data(Qt.ItemDataRole.UserRole) == str(image_folder)

    # Choosing an entry opens it again.
    with qtbot.waitSignal(panel.scanned, timeout=30000) as blocker:
        recent.itemActivated.emit(recent.item(1))
    panel.wait()
    assert blocker.args[0]["path"] == str(other) and panel.recent_datasets()[0] == str(other)

    shutil.rmtree(other)
    recent.itemActivated.emit(recent.item(0))
    panel.wait()
    error = panel.findChild(QLabel, "dataset.error")
    assert error.isVisible() and str(other) in error.text() and "no longer exists" in error.text()
    assert str(other) not in panel.recent_datasets()
    assert all(recent.item(i).data(Qt.ItemDataRole.UserRole) != str(other) for i in range(recent.count()))


def test_a_separate_validation_folder_gives_the_split(qtbot, panel, image_folder, tmp_path):
    open_and_wait(qtbot, panel, image_folder)
    val = write_image_folder(tmp_path / "val", per_class=3, seed=5)
    with qtbot.waitSignal(panel.scanned, timeout=30000) as blocker:
        panel.state.set("data.val_path", str(val))
    panel.wait()
    assert (blocker.args[0]["train"], blocker.args[0]["val"]) == (36, 9)
    assert not panel.findChild(QLineEdit, "dataset.val_fraction").isEnabled()
    assert str(val) in panel.findChild(QLabel, "dataset.split").text()


def test_every_control_has_a_documented_object_name(panel):
    names = {w.objectName() for w in panel.findChildren(QWidget) if w.objectName().startswith("dataset.")}
    assert names == set(OBJECT_NAMES)


def test_a_multilabel_csv_counts_positives_per_label(qtbot, panel, image_folder, tmp_path):
    rows = ["path,label"]
    for i in range(6):
        rows.append(f"{image_folder / 'red' / f'{i:03d}.png'},warm;bright")
        rows.append(f"{image_folder / 'blue' / f'{i:03d}.png'},cold")
    rows.append(f"{tmp_path / 'gone.png'},cold")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    panel.state.set("data.task", "multilabel")
    panel.wait()
    info = open_and_wait(qtbot, panel, tmp_path / "labels.csv")
    assert info["class_names"] == ["bright", "cold", "warm"] and info["counts"] == [6, 6, 6]
    assert info["train"] + info["val"] == 12 and info["skipped"] == 1
    assert bar_chart_data(panel) == (["bright", "cold", "warm"], [6, 6, 6])
    assert set(sample_labels(panel)) == {"bright, warm", "cold"}
    skipped = table_rows(panel.findChild(QTableView, "dataset.skipped"))
    assert skipped[0][0] == str(tmp_path / "gone.png") and "no such file" in skipped[0][1]


def test_two_hundred_thousand_samples_scan_off_the_gui_thread_into_virtual_views(qtbot, panel, tmp_path):
    """An .npz of 200,000 8x8 images (ten classes, each a flat grey level) and a CSV with thousands of missing files:
    the event loop turns while the scan runs, every sample is one row of a model (no item objects), thumbnails are
    decoded only for the rows on screen, and the skipped list holds every entry."""
    from widgets.sample_views import SamplesModel, SkippedModel
    from widgets.tasks import running_tasks

    n, k = 200_000, 10
    y = np.arange(n) % k
    x = np.repeat((y * 25).astype(np.uint8)[:, None, None], 8, axis=1).repeat(8, axis=2)
    np.savez(tmp_path / "big.npz", X=x, y=y)
    seen: list[str] = []
    timer = QTimer()
    timer.setInterval(5)
    timer.timeout.connect(lambda: seen.append("scan" if "dataset scan" in [t.name for t in running_tasks()] else "-"))
    panel.scanned.connect(lambda info: seen.append("done"))
    timer.start()
    info = open_and_wait(qtbot, panel, tmp_path / "big.npz")
    timer.stop()
    assert info["counts"] == [n // k] * k
    # The GUI thread ran its timer while the scan task ran, before the scan's result arrived.
    assert seen.count("scan") >= 2 and seen.index("scan") < seen.index("done"), seen[:20]

    view = panel.findChild(QListView, "dataset.samples")
    model = view.model()
    assert isinstance(model, SamplesModel) and model.rowCount() == n
    assert model.index(0, 0).data() == "0" and model.index(n - 1, 0).data() == "9"  # grouped by class
    assert model.thumbs == {}  # nothing decoded while the tab is hidden
    panel.tabs.setCurrentWidget(view)

    def on_screen() -> set[int]:
        first = view.indexAt(view.viewport().rect().topLeft()).row()
        return {r for r in range(first, min(n, first + 500)) if panel._sample_on_screen(r)}

    visible = on_screen()
    assert 0 < len(visible) < 200
    qtbot.waitUntil(lambda: visible <= set(model.thumbs), timeout=30000)
    assert set(model.thumbs) == visible and model.decoded == len(visible)
    view.scrollToBottom()
    qtbot.waitUntil(lambda: n - 1 in model.thumbs, timeout=30000)
    panel.wait()
    assert model.decoded < 3 * len(visible)  # what was looked at, not 200,000
    for row in (0, n - 1):
        level = int(y[model.position(row)]) * 25
        assert model.thumbs[row].toImage().pixelColor(32, 32).getRgb()[:3] == (level, level, level)

    few = write_image_folder(tmp_path / "few", per_class=2)
    rows = ["path,label"] + [f"{p},{p.parent.name}" for p in sorted(few.rglob("*.png"))]
    rows += [f"{tmp_path / 'gone' / f'{i}.png'},red" for i in range(5000)]
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    info = open_and_wait(qtbot, panel, tmp_path / "list.csv")
    assert info["skipped"] == 5000
    table = panel.findChild(QTableView, "dataset.skipped")
    assert isinstance(table.model(), SkippedModel) and table.model().rowCount() == 5000
    assert table.model().index(4999, 0).data() == str(tmp_path / "gone" / "4999.png")
    assert "no such file" in table.model().index(4999, 1).data()
    assert panel.tabs.tabText(2) == "Skipped (5,000)"
