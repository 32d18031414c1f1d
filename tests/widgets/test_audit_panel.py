"""The Audit tab: runs in the background, shows findings with their images, and acts through the project's fields."""

from __future__ import annotations

import shutil

from tests.conftest import write_image_folder, write_project


def _project(tmp_path):
    write_image_folder(tmp_path / "images", per_class=10, size=12)
    write_image_folder(tmp_path / "val", per_class=3, size=12, seed=1)
    shutil.copy(tmp_path / "images" / "red" / "004.png", tmp_path / "val" / "red" / "leak.png")
    return write_project(tmp_path / "p.json", "images", data={"val_path": "val"}, model={"weights": None})


def test_audit_tab_fixes_leakage_keeps_a_finding_and_reopens_from_the_cache(qtbot, tmp_path, monkeypatch):
    from widgets.audit_panel import AuditPanel
    from widgets.state import ProjectState

    monkeypatch.setenv("MWB_CACHE_DIR", str(tmp_path / "cache"))
    state = ProjectState()
    state.open(_project(tmp_path))
    panel = AuditPanel(state)
    qtbot.addWidget(panel)
    assert not panel.fix_leakage_button.isEnabled()
    panel.start()
    assert panel.stop_button.isEnabled()
    assert panel.wait(120000) and panel.report is not None
    leaks = panel.report.of_kind("leakage")
    assert [f.detail["val_keys"] for f in leaks] == [["../val/red/leak.png"]]
    assert panel.findings_list.count() == len(panel.report.findings)

    panel.kind_combo.setCurrentIndex(panel.kind_combo.findData("leakage"))
    assert panel.findings_list.count() == 1 and panel.selected() is leaks[0]
    qtbot.waitUntil(lambda: panel.images_list.count() == 2, timeout=30000)  # the twins side by side
    panel.fix_leakage_button.click()
    assert state.config.data.exclude == ["../val/red/leak.png"]
    assert panel.findings_list.item(0).text().startswith("[excluded]")

    exact = panel.report.of_kind("exact_duplicate")[0]
    panel.kind_combo.setCurrentIndex(panel.kind_combo.findData("exact_duplicate"))
    panel.keep_button.click()
    assert panel.findings_list.item(0).text().startswith("[kept]")

    panel.sampler_button.click()
    assert state.get("loader.sampler.name") == "weighted_random" and state.get("loader.sampler.weights") == "balanced"

    again = AuditPanel(state)  # reopening: the report of the dataset as it is comes from the cache
    qtbot.addWidget(again)
    again.look_up_cached()
    assert again.wait(60000) and again.report is not None and again.report.from_cache
    again.kind_combo.setCurrentIndex(again.kind_combo.findData("exact_duplicate"))
    assert again.selected().id == exact.id and again.findings_list.item(0).text().startswith("[kept]")
    assert again.wait(30000) and panel.wait(30000)


def test_stop_from_the_tab_leaves_nothing_cached(qtbot, tmp_path, monkeypatch):
    from widgets.audit_panel import AuditPanel
    from widgets.state import ProjectState

    monkeypatch.setenv("MWB_CACHE_DIR", str(tmp_path / "cache"))
    state = ProjectState()
    state.open(_project(tmp_path))
    panel = AuditPanel(state)
    qtbot.addWidget(panel)
    panel.start()
    panel.stop()  # before the first batch: the worker checks the flag before every step
    assert panel.wait(60000)
    assert panel.report is None and "stopped" in panel.status_label.text()
    assert not (tmp_path / "cache" / "audit").exists() or not any((tmp_path / "cache" / "audit").iterdir())
