"""The backbone panel: searching the catalog, choosing a backbone and its weights, importing a weights file."""

from pathlib import Path

import pytest
import torch
import torchvision
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QWidget

from engine.backbones import weights_status
from engine.catalog import BUNDLED, list_backbones
from widgets.backbone_panel import NAME, OBJECT_NAMES, PARAMS, WEIGHTS, BackbonePanel


@pytest.fixture()
def offline_caches(tmp_path, monkeypatch):
    """Empty torch hub and Hugging Face caches, so what this machine has downloaded does not matter."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # set_dir() would override TORCH_HOME
    assert Path(torch.hub.get_dir()) == tmp_path / "torch_home" / "hub"
    return tmp_path / "torch_home" / "hub" / "checkpoints"


@pytest.fixture()
def panel(qtbot, project_state, offline_caches):
    widget = BackbonePanel(project_state)
    qtbot.addWidget(widget)
    widget.resize(1280, 800)
    widget.show()
    assert widget.wait()
    yield widget
    widget.wait()


def shown_names(panel):
    return [panel.proxy.index(r, NAME).data() for r in range(panel.proxy.rowCount())]


def row_text(panel, name, column):
    return panel.catalog.index(panel.catalog.row_of[name], column).data()


def click_row(qtbot, panel, name):
    index = panel.proxy.mapFromSource(panel.catalog.index(panel.catalog.row_of[name], NAME))
    assert index.isValid(), f"{name} is not shown"
    panel.table.scrollTo(index)
    rect = panel.table.visualRect(index)
    qtbot.mouseClick(panel.table.viewport(), Qt.MouseButton.LeftButton, pos=rect.center())


def test_search_filters_the_catalog_and_a_click_chooses_the_backbone(qtbot, panel, project_state):
    panel.select_backbone("timm/efficientnet_lite0")
    assert project_state.get("model.backbone") == "timm/efficientnet_lite0"

    qtbot.keyClicks(panel.search, "resnet")
    names = shown_names(panel)
    assert "resnet18" in names and "timm/resnet50" in names
    assert all("resnet" in n for n in names)
    assert len(names) < len(list_backbones())
    assert panel.count.text() == f"{len(names)} of {len(list_backbones()):,} backbones"
    assert project_state.get("model.backbone") == "timm/efficientnet_lite0"  # filtering chooses nothing

    with qtbot.waitSignal(panel.backbone_changed) as blocker:
        click_row(qtbot, panel, "resnet18")
    assert blocker.args == ["resnet18"]
    assert project_state.get("model.backbone") == "resnet18"
    # Nothing of resnet18 is in the (empty) cache: random init, not the bundled weights of the old backbone.
    assert project_state.get("model.weights") is None
    assert "download" in panel.weights_note.text()
    assert panel.wait()
    assert row_text(panel, "resnet18", PARAMS) == "11.7 M"
    assert "11,689,512" in panel.current.text()

    # Words narrow the search; the source filter keeps one catalog.
    panel.search.setText("timm efficientnet_lite")
    assert set(shown_names(panel)) >= {"timm/efficientnet_lite0", "timm/efficientnet_lite4"}
    panel.source.setCurrentIndex(panel.source.findData("torchvision"))
    assert shown_names(panel) == []
    assert panel.count.text() == f"0 of {len(list_backbones()):,} backbones"


def test_bundled_weights_are_shown_and_chosen_by_default(qtbot, panel, project_state):
    assert row_text(panel, "timm/efficientnet_lite0", WEIGHTS) == "bundled"
    panel.select_backbone("timm/efficientnet_lite0")
    assert project_state.get("model.weights") == BUNDLED  # the best weights that need no network
    assert panel.weights.currentData() == BUNDLED
    assert "BUNDLED — bundled" in panel.weights.currentText()
    assert "no download" in panel.weights_note.text()
    assert "224" in panel.preprocess.text()  # the weights bring their own input size

    panel.offline_only.setChecked(True)
    assert "timm/efficientnet_lite0" in shown_names(panel)
    assert "resnet18" not in shown_names(panel)  # its weights are not in the empty cache


def test_torchvision_weights_not_in_the_cache_need_a_download(qtbot, panel, project_state, offline_caches):
    assert weights_status("resnet50", "IMAGENET1K_V2") == "download"
    assert row_text(panel, "resnet50", WEIGHTS) == "needs download"
    panel.select_backbone("resnet50")
    assert project_state.get("model.weights") is None
    labels = [panel.weights.itemText(i) for i in range(panel.weights.count())]
    assert labels[0] == "random init"
    assert "IMAGENET1K_V2 — needs download" in labels

    # Choosing it is allowed (the project is valid), with the offline advice shown.
    panel.weights.setCurrentIndex(panel.weights.findData("IMAGENET1K_V2"))
    assert project_state.get("model.weights") == "IMAGENET1K_V2"
    assert (
        "not in the cache; training will try to download it — offline, choose random init or import a weights file"
    ) in panel.weights_note.text()
    panel.weights.setCurrentIndex(panel.weights.findData(None))
    assert project_state.get("model.weights") is None

    # Once the file is in the cache, the weights are offline and become the default for the backbone.
    weight = torchvision.models.get_model_weights("resnet50")["IMAGENET1K_V2"]
    offline_caches.mkdir(parents=True)
    (offline_caches / Path(weight.url).name).write_bytes(b"")
    assert panel.refresh_weights_status().wait()
    assert row_text(panel, "resnet50", WEIGHTS) == "cached"
    panel.select_backbone("resnet18")
    panel.select_backbone("resnet50")
    assert weights_status("resnet50", project_state.get("model.weights")) == "cached"
    assert "— cached" in panel.weights.currentText()


def test_a_garbage_weights_file_is_refused_and_a_state_dict_is_imported(qtbot, panel, project_state, tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint" * 10)
    before = project_state.config.to_dict()
    panel.import_weights_file(str(garbage))
    assert panel.wait()
    assert "garbage.pt" in panel.file_note.text() and "Not imported" in panel.file_note.text()
    assert project_state.config.to_dict() == before
    assert not project_state.dirty

    good = tmp_path / "resnet18_3.pth"
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), good)
    panel.import_weights_file(str(good))
    assert panel.wait()
    assert project_state.config.resolve(project_state.get("model.weights_file")) == good
    assert project_state.get("model.weights") is None
    assert not panel.weights.isEnabled()  # catalog weights and a file exclude each other
    note = panel.file_note.text()
    assert "resnet18_3.pth" in note and "loaded 120 of 122 tensors" in note and "fc.weight" in note
    assert not project_state.problems(check_paths=True)

    # A file for another architecture: the note says it will not fit.
    panel.select_backbone("timm/efficientnet_lite0")
    assert panel.wait()
    assert project_state.get("model.weights") is None  # the file stays in charge
    assert "mostly does not fit timm/efficientnet_lite0" in panel.file_note.text()

    panel.clear_file.click()
    assert project_state.get("model.weights_file") is None
    assert panel.file.text() == "none" and not panel.clear_file.isEnabled()
    assert panel.weights.isEnabled()


def test_every_object_name_is_documented(panel):
    names = {w.objectName() for w in panel.findChildren(QWidget) if w.objectName().startswith("backbone.")}
    assert names == set(OBJECT_NAMES)


def test_choosing_another_backbone_keeps_the_preset_but_drops_module_names(qtbot, project_state):
    from widgets.backbone_panel import BackbonePanel

    project_state.update({"model.freeze": "up_to", "model.freeze_up_to": "layer2", "model.freeze_prefixes": ["fc"]})
    panel = BackbonePanel(project_state)
    qtbot.addWidget(panel)
    panel.select_backbone("mobilenet_v3_small")
    model = project_state.config.model
    assert model.backbone == "mobilenet_v3_small"
    assert (model.freeze, model.freeze_up_to, model.freeze_prefixes) == ("head_only", None, [])
    panel.wait(60000)
