"""The layers panel: the module tree of the project's model, ticks as freezing, and the project round trip."""

import pytest
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QStyle, QStyleOptionViewItem, QWidget

from engine.backbones import build_model
from engine.config import ModelConfig
from engine.freezing import apply_freeze
from widgets.layers_panel import MODULE, OBJECT_NAMES, PARAMS, SHAPE, TRAINABLE, LayersPanel

CHECKED, UNCHECKED, PARTIAL = Qt.CheckState.Checked, Qt.CheckState.Unchecked, Qt.CheckState.PartiallyChecked


@pytest.fixture()
def panel(qtbot, project_state):
    widget = LayersPanel(project_state)
    qtbot.addWidget(widget)
    widget.resize(1280, 800)
    widget.show()
    assert widget.wait()
    yield widget
    widget.wait()


def frozen_in_fresh_model(state, num_outputs=2):
    """The parameters a freshly built model freezes under the project's settings, as training will."""
    cfg = state.config.model
    built = build_model(ModelConfig(backbone=cfg.backbone), num_outputs, image_size=16)
    apply_freeze(built.model, cfg, built.head_name)
    return {n for n, p in built.model.named_parameters() if not p.requires_grad}


def params_of(state, module):
    built = build_model(ModelConfig(backbone=state.config.model.backbone), 2, image_size=16)
    return {n for n, _ in built.model.named_parameters() if n == module or n.startswith(module + ".")}


def click_box(qtbot, panel, name):
    """A mouse click on a module's check box."""
    index = panel.tree.indexFromItem(panel.item_for(name), MODULE)
    option = QStyleOptionViewItem()
    panel.tree.initViewItemOption(option)
    option.rect = panel.tree.visualRect(index)
    option.features |= QStyleOptionViewItem.ViewItemFeature.HasCheckIndicator
    box = panel.tree.style().subElementRect(QStyle.SubElement.SE_ItemViewItemCheckIndicator, option, panel.tree)
    qtbot.mouseClick(panel.tree.viewport(), Qt.MouseButton.LeftButton, pos=box.center())


def number(text):
    return int(text.replace(",", ""))


def checkable(panel):
    return {name: item for name, item in panel.items.items() if item.checkable}


def test_tree_shows_the_modules_with_output_shapes_and_counts(qtbot, panel):
    for name in ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "avgpool", "fc"):
        assert panel.item_for(name) is not None, name
        assert panel.item_for(name).parent() is panel.item_for("")
    # tiny_project: 16 px images, 2 outputs until a dataset scan says otherwise
    assert panel.item_for("layer1").text(SHAPE) == "1×64×4×4"
    assert panel.item_for("layer4").text(SHAPE) == "1×512×1×1"
    assert panel.item_for("fc").text(SHAPE) == "1×2"
    assert panel.item_for("layer1.0.conv1").text(MODULE) == "conv1"
    assert number(panel.item_for("layer1").text(PARAMS)) == 147_968
    assert number(panel.item_for("fc").text(PARAMS)) == 512 * 2 + 2
    assert not panel.item_for("avgpool").checkable  # nothing to freeze: no box
    assert panel.totals.text() == "11,177,538 parameters: 11,177,538 trainable, 0 frozen"
    assert panel.item_for("layer1").isExpanded() and not panel.item_for("layer1.0").isExpanded()

    panel.set_num_outputs(3)  # after a dataset scan found three classes
    assert panel.wait()
    assert panel.item_for("fc").text(SHAPE) == "1×3"
    assert number(panel.item_for("fc").text(PARAMS)) == 512 * 3 + 3

    panel.depth_box.setValue(3)
    assert panel.item_for("layer1.0").isExpanded()


def test_ticking_a_module_freezes_it_in_the_project(qtbot, panel, project_state):
    total, trainable, frozen = panel.summary
    layer1 = number(panel.item_for("layer1").text(PARAMS))
    click_box(qtbot, panel, "layer1")

    assert panel.summary == (total, total - layer1, layer1)
    assert panel.totals.text() == f"{total:,} parameters: {total - layer1:,} trainable, {layer1:,} frozen"
    assert project_state.get("model.freeze") == "none"
    assert project_state.get("model.freeze_prefixes") == ["layer1"]
    assert project_state.dirty
    # Children follow their parent, and the model around them is partly frozen.
    assert panel.item_for("layer1.0.conv1").checkState(MODULE) == CHECKED
    assert panel.item_for("").checkState(MODULE) == PARTIAL
    assert number(panel.item_for("layer1").text(TRAINABLE)) == 0
    assert panel.item_for("layer1").font(MODULE).italic()
    assert not panel.item_for("layer2").font(MODULE).italic()
    # Training builds its own model from the project: exactly layer1 is frozen there.
    assert frozen_in_fresh_model(project_state) == params_of(project_state, "layer1") == panel.frozen_parameters()

    click_box(qtbot, panel, "layer1")
    assert project_state.get("model.freeze_prefixes") == []
    assert panel.summary == (total, total, 0)


def test_head_only_preset_and_ticks_on_top_of_it_round_trip(qtbot, panel, project_state):
    panel.head_only.click()
    assert project_state.get("model.freeze") == "head_only"
    qtbot.waitUntil(
        lambda: (
            panel.item_for("fc").checkState(MODULE) == UNCHECKED
            and panel.item_for("layer4").checkState(MODULE) == CHECKED
        ),
        timeout=60000,
    )
    for name, item in checkable(panel).items():
        if name == "":
            assert item.checkState(MODULE) == PARTIAL
        elif name.startswith("fc"):
            assert item.checkState(MODULE) == UNCHECKED, name
        else:
            assert item.checkState(MODULE) == CHECKED, name
    assert panel.summary[1] == 512 * 2 + 2

    # Untick layer4, then tick one conv inside it: the preset stays, the difference is prefixes.
    panel.item_for("layer4").setCheckState(MODULE, UNCHECKED)
    assert project_state.get("model.freeze") == "head_only"
    assert project_state.get("model.unfreeze_prefixes") == ["layer4"]
    panel.item_for("layer4.0.conv1").setCheckState(MODULE, CHECKED)
    assert panel.item_for("layer4").checkState(MODULE) == PARTIAL
    assert frozen_in_fresh_model(project_state) == panel.frozen_parameters()
    expected = set().union(
        *(params_of(project_state, m) for m in ("conv1", "bn1", "layer1", "layer2", "layer3"))
    ) | params_of(project_state, "layer4.0.conv1")
    assert panel.frozen_parameters() == expected

    # Ticking the partial parent freezes all of it.
    panel.item_for("layer4").setCheckState(MODULE, CHECKED)
    assert frozen_in_fresh_model(project_state) == panel.frozen_parameters()
    assert panel.summary[1] == 512 * 2 + 2

    panel.train_all.click()
    assert project_state.get("model.freeze") == "none"
    assert project_state.get("model.freeze_prefixes") == project_state.get("model.unfreeze_prefixes") == []
    qtbot.waitUntil(lambda: panel.summary[2] == 0, timeout=60000)


def test_freeze_up_to_preset(qtbot, panel, project_state):
    panel.up_to.setCurrentIndex(panel.up_to.findData("layer2"))
    panel.freeze_up_to_button.click()
    assert project_state.get("model.freeze") == "up_to"
    assert project_state.get("model.freeze_up_to") == "layer2"
    qtbot.waitUntil(lambda: panel.item_for("layer2").checkState(MODULE) == CHECKED, timeout=60000)
    assert panel.item_for("layer3").checkState(MODULE) == UNCHECKED
    assert panel.item_for("conv1").checkState(MODULE) == CHECKED
    assert frozen_in_fresh_model(project_state) == panel.frozen_parameters()

    panel.item_for("bn1").setCheckState(MODULE, UNCHECKED)
    assert (project_state.get("model.freeze"), project_state.get("model.unfreeze_prefixes")) == ("up_to", ["bn1"])
    assert frozen_in_fresh_model(project_state) == panel.frozen_parameters()


def test_the_tree_follows_the_project(qtbot, panel, project_state):
    project_state.set("model.freeze", "head_only")
    qtbot.waitUntil(lambda: panel.item_for("layer1").checkState(MODULE) == CHECKED, timeout=60000)
    assert panel.item_for("fc").checkState(MODULE) == UNCHECKED
    assert panel.summary[1] == 512 * 2 + 2

    project_state.update({"model.freeze": "none", "model.freeze_prefixes": ["layer9"]})  # a hand-edited file
    qtbot.waitUntil(lambda: panel.error.isVisible(), timeout=60000)
    assert "model.freeze_prefixes[0] = 'layer9'" in panel.error.text()
    assert panel.summary[2] == 0
    panel.item_for("layer3").setCheckState(MODULE, CHECKED)  # a tick rewrites the settings without it
    assert project_state.get("model.freeze_prefixes") == ["layer3"]
    qtbot.waitUntil(lambda: not panel.error.isVisible(), timeout=60000)

    project_state.set("optimizer.backbone_lr_mult", 0.0)
    assert panel.note.isVisible() and "backbone_lr_mult" in panel.note.text()

    project_state.set("model.backbone", "mobilenet_v3_small")
    assert panel.wait()
    assert panel.item_for("layer1") is None and panel.item_for("features") is not None
    assert panel.item_for("").text(MODULE) == "mobilenet_v3_small"
    assert "model.freeze_prefixes[0] = 'layer3'" in panel.error.text()  # resnet's name means nothing here
    panel.train_all.click()
    qtbot.waitUntil(lambda: not panel.error.isVisible(), timeout=60000)


def test_every_object_name_is_documented(panel):
    names = {w.objectName() for w in panel.findChildren(QWidget) if w.objectName().startswith("layers.")}
    names.add("layers.freeze_up_to_here")  # a context-menu action, created when the menu opens
    assert names == set(OBJECT_NAMES)


def test_any_sequence_of_ticks_round_trips_through_the_project(qtbot, panel, project_state):
    """Ticks anywhere in a ViT (parameters directly on modules too: class_token, encoder.pos_embedding)."""
    import random

    import torch

    project_state.set("model.backbone", "vit_b_16")  # 16 px images: one patch
    assert panel.wait()
    names = sorted(checkable(panel))
    rng = random.Random(0)
    # First the modules that hold parameters of their own, and the whole model; then anything.
    fixed = ["encoder", "encoder.layers", "", "conv_proj", ""]
    for step in range(30):
        if step == 15:
            panel.head_only.click()
        if step == 23:
            panel.freeze_up_to("encoder.layers.encoder_layer_3")
        name = fixed[step] if step < len(fixed) else rng.choice(names)
        item = panel.item_for(name)
        item.setCheckState(MODULE, UNCHECKED if item.checkState(MODULE) == CHECKED else CHECKED)
        cfg = project_state.config.model
        with torch.device("meta"):  # a fresh model of the same architecture, without the memory
            built = build_model(ModelConfig(backbone="vit_b_16"), 2, image_size=16)
        apply_freeze(built.model, cfg, built.head_name)
        fresh = {n for n, p in built.model.named_parameters() if not p.requires_grad}
        assert fresh == panel.frozen_parameters(), (step, name, cfg)
        assert not project_state.problems(check_paths=False)


def test_the_learning_rate_column_follows_the_settings_and_an_edit_sets_the_multiplier(qtbot, panel):
    from PySide6.QtCore import QPoint
    from PySide6.QtWidgets import QApplication, QLineEdit

    from widgets.layers_panel import LR

    state = panel.state  # resnet18, optimizer.lr 0.003
    rate = lambda name: panel.item_for(name).text(LR)  # noqa: E731
    assert rate("layer1") == rate("fc") == "0.003" and rate("avgpool") == ""
    state.update({"optimizer.layer_lr_decay": 0.5, "optimizer.backbone_lr_mult": 0.2})
    qtbot.waitUntil(lambda: rate("layer4") == f"{0.003 * 0.2 * 0.5:.3g}")
    assert rate("fc") == "0.003" and rate("layer1") == f"{0.003 * 0.2 * 0.5**4:.3g}"
    assert rate("conv1") == f"{0.003 * 0.2 * 0.5**5:.3g}"  # the stem, one step below the bottom stage
    assert rate("") == f"{0.003 * 0.2 * 0.5**5:.3g}–0.003"  # the whole model: the range of its parts

    # Double-click layer3's rate and type the rate it should train at: its multiplier is written.
    item = panel.item_for("layer3")
    panel.tree.scrollToItem(item)
    rect = panel.tree.visualItemRect(item)
    cell = QPoint(panel.tree.header().sectionViewportPosition(LR) + 5, rect.center().y())
    qtbot.mouseClick(panel.tree.viewport(), Qt.MouseButton.LeftButton, pos=cell)
    qtbot.mouseDClick(panel.tree.viewport(), Qt.MouseButton.LeftButton, pos=cell)
    editor = QApplication.focusWidget()
    assert isinstance(editor, QLineEdit)
    editor.selectAll()
    qtbot.keyClicks(editor, "1e-4")
    qtbot.keyClick(editor, Qt.Key.Key_Return)
    qtbot.waitUntil(lambda: state.get("optimizer.lr_mult") != {})  # the view commits the edit once it closes
    base = 0.003 * 0.2 * 0.5**2
    assert state.get("optimizer.lr_mult") == {"layer3": pytest.approx(1e-4 / base, rel=1e-5)} and state.dirty
    assert rate("layer3") == "0.0001" and rate("layer3.0.conv1") == "0.0001" and rate("layer2") != "0.0001"
    panel.set_rate("layer3", "")  # an empty rate removes the entry
    assert state.get("optimizer.lr_mult") == {}
    panel.set_rate("layer3", "fast")
    assert panel.error.isVisible() and "'fast' is not a learning rate" in panel.error.text()
