"""Stop in the Dataset panel ends a scan that runs in worker processes: the window stays usable, the workers end,
and what was checked stays in the scan cache for the next scan."""

import multiprocessing

import pytest
from conftest import write_image_folder

import engine.image_scan as image_scan
from engine.scan_cache import ScanCache
from widgets.dataset_panel import DatasetPanel


@pytest.fixture()
def panel(qtbot, project_state):
    widget = DatasetPanel(project_state)
    qtbot.addWidget(widget)
    widget.show()
    assert widget.wait()
    yield widget
    widget.wait()


def test_stop_ends_the_scan_and_its_workers_and_keeps_what_was_checked(qtbot, panel, tmp_path, monkeypatch):
    folder = write_image_folder(tmp_path / "images", per_class=500, size=8)  # 1,500 files: 47 chunks of 32
    monkeypatch.setattr(image_scan, "PARALLEL_FROM", 1)  # a worker-process scan at this size
    clicked: list[int] = []

    def stop_at_first_count(value: int) -> None:
        if value > 0 and not clicked and panel.stop_button.isVisible():
            clicked.append(value)
            panel.stop_button.click()

    panel.progress_bar.valueChanged.connect(stop_at_first_count)
    scanned: list = []
    panel.scanned.connect(scanned.append)
    panel.open_path(str(folder))
    qtbot.waitUntil(lambda: bool(clicked), timeout=60000)
    assert panel.wait()

    assert "Scan stopped" in panel.status_label.text() and not panel.stop_button.isVisible()
    assert scanned == [] and multiprocessing.active_children() == []
    kept = ScanCache(folder).old
    assert 0 < len(kept) < 1500 and all(problem is None for _, problem, _ in kept.values())

    monkeypatch.undo()  # opening it again scans the rest (in this process at this size) and shows the dataset
    with qtbot.waitSignal(panel.scanned, timeout=60000) as blocker:
        panel.open_path(str(folder))
    assert panel.wait() and blocker.args[0]["train"] + blocker.args[0]["val"] == 1500
