"""The dataset panel on streamed shards (data.kind = "webdataset"): the kind is selectable, and the panel shows the
shard and sample counts and the classes from shards.json instead of scanning a folder."""

import pytest
from conftest import write_image_folder
from PySide6.QtWidgets import QComboBox, QLabel, QTableWidget

from engine.webdataset_data import write_shards
from widgets.dataset_panel import DatasetPanel


@pytest.fixture()
def panel(qtbot, project_state):
    widget = DatasetPanel(project_state)
    qtbot.addWidget(widget)
    widget.resize(1280, 800)
    widget.show()
    assert widget.wait()
    yield widget
    widget.wait()


def test_shards_show_their_counts_and_classes_without_a_scan(qtbot, panel, tmp_path):
    images = write_image_folder(tmp_path / "src", per_class=5)
    result = write_shards(images, tmp_path / "shards", shard_size=4, val_fraction=0.4)
    patterns = result.patterns()
    combo = panel.findChild(QComboBox, "dataset.kind")
    assert combo.findData("webdataset") >= 0
    with qtbot.waitSignal(panel.scanned, timeout=30000) as blocker:
        panel.state.update(
            {"data.kind": "webdataset", "data.path": patterns["train"], "data.val_path": patterns["val"]}
        )
    assert panel.wait()
    assert combo.currentData() == "webdataset"
    info = blocker.args[0]
    assert info["class_names"] == ["blue", "green", "red"] and info["counts"] == [5, 5, 5]
    assert (info["train"], info["val"]) == (9, 6)  # 3 and 2 of each class's 5
    split = panel.findChild(QLabel, "dataset.split").text()
    assert "training 3 shard(s), 9 samples" in split and "validation 2 shard(s), 6 samples" in split
    rows = panel.findChild(QTableWidget, "dataset.classes")
    assert [rows.item(r, 0).text() for r in range(rows.rowCount())] == ["blue", "green", "red"]
    assert [rows.item(r, 2).text() for r in range(rows.rowCount())] == ["3", "3", "3"]
    assert not panel.findChild(QLabel, "dataset.error").isVisible()

    # a shard that is missing is named
    with qtbot.waitSignal(panel.scan_failed, timeout=30000) as failed:
        panel.state.set("data.path", str(tmp_path / "shards" / "train-{000000..000009}.tar"))
    assert panel.wait()
    assert str(tmp_path / "shards" / "train-000003.tar") in failed.args[0]
