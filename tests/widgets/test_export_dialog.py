"""The export dialog on a real trained checkpoint: verified exports, overwrite questions, bad destinations."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from PySide6.QtGui import QAction
from PySide6.QtWidgets import QAbstractButton, QAbstractItemView, QAbstractSpinBox, QComboBox, QLineEdit, QWidget

from engine.checkpoints import load_checkpoint
from engine.export import FORMATS
from widgets.export_dialog import OBJECT_NAMES, ExportDialog


@pytest.fixture(scope="module")
def checkpoint(head_only_run):
    """A resnet18 whose head trained one epoch on 16 px colour images, in a run folder of its own."""
    return head_only_run


@pytest.fixture()
def dialog(qtbot, checkpoint):
    dlg = ExportDialog(str(checkpoint))
    qtbot.addWidget(dlg)
    dlg.show()
    yield dlg
    dlg.wait()


def export(qtbot, dlg):
    with qtbot.waitSignal(dlg.exported, timeout=120000) as blocker:
        assert dlg.export()
    assert dlg.wait()
    return blocker.args[0]


def fail(qtbot, dlg):
    """Start an export that the engine refuses; wait until the dialog shows why."""
    with qtbot.waitSignal(dlg.logged, timeout=60000, check_params_cb=lambda m: m.startswith("Export failed")):
        assert dlg.export()
    assert dlg.wait()


def test_onnx_export_is_verified_in_onnxruntime(qtbot, dialog, checkpoint):
    run_dir = checkpoint.parent.parent
    out = run_dir / "exports" / "final.onnx"
    assert not out.parent.exists()
    # ONNX is the default, saved under RUN/exports, a folder the export creates.
    assert dialog.fmt() == "onnx" and dialog.output_path() == out
    assert "ONNX Runtime" in dialog.format_help.text()

    info = export(qtbot, dialog)
    result = dialog.last_result
    assert out.is_file() and result.path == out and info["path"] == str(out)
    assert 0.0 <= result.max_abs_diff <= result.tolerance == 1e-3
    assert info["runtime"] == "onnxruntime"
    sidecar = json.loads(result.sidecar.read_text())
    assert sidecar["verified_with"] == "onnxruntime" and sidecar["max_abs_diff"] == result.max_abs_diff

    labels = dialog.result_labels
    assert labels["status"].text().startswith("OK")
    assert labels["difference"].text() == f"{result.max_abs_diff:.3g}"
    assert labels["tolerance"].text() == "0.001" and labels["runtime"].text() == "onnxruntime"
    assert labels["file"].text() == str(out) and labels["sidecar"].text() == str(out) + ".json"
    # Still open and usable for the next format.
    assert dialog.isVisible() and dialog.export_button.isEnabled() and not dialog.progress.isVisible()
    assert not dialog.message.isVisible()


def test_the_suffix_follows_the_format(dialog, checkpoint):
    exports = checkpoint.parent.parent / "exports"
    expected = {
        "torchscript": "final.torchscript.pt",
        "onnx": "final.onnx",
        "state_dict": "final.pth",
        "safetensors": "final.safetensors",
        "pt2": "final.pt2",
    }
    assert [dialog.format_combo.itemData(i) for i in range(dialog.format_combo.count())] == list(FORMATS)
    for fmt in FORMATS:
        dialog.set_format(fmt)
        assert dialog.output_path() == exports / expected[fmt]
        assert dialog.format_help.text()
    dialog.path_edit.setText(str(exports / "mine.bin"))  # a name of the user's own is kept
    dialog.set_format("onnx")
    assert dialog.output_path() == exports / "mine.bin"


def test_overwrite_is_asked_and_respected(qtbot, dialog, tmp_path, monkeypatch):
    out = tmp_path / "model.pth"
    dialog.set_format("state_dict")
    dialog.path_edit.setText(str(out))
    export(qtbot, dialog)
    first = dialog.last_result
    inode, sidecar_text = out.stat().st_ino, (tmp_path / "model.pth.json").read_text()

    asked = []
    monkeypatch.setattr(dialog, "_confirm_overwrite", lambda path: asked.append(path) or False)
    assert not dialog.export()
    assert asked == [out]
    assert out.stat().st_ino == inode and (tmp_path / "model.pth.json").read_text() == sidecar_text
    assert dialog.last_result is first and not dialog.is_running()
    assert "exists and was kept" in dialog.status.text()

    monkeypatch.setattr(dialog, "_confirm_overwrite", lambda path: asked.append(path) or True)
    export(qtbot, dialog)
    assert asked == [out, out]
    assert out.stat().st_ino != inode  # a new file was moved into place
    assert dialog.last_result is not first and dialog.last_result.path == out


def test_state_dict_and_safetensors_hold_the_model(qtbot, dialog, checkpoint, tmp_path):
    from safetensors.torch import load_file

    weights = load_checkpoint(checkpoint)["model_state_dict"]
    dialog.path_edit.setText(str(tmp_path / "model.pth"))
    dialog.set_format("state_dict")
    export(qtbot, dialog)
    state = torch.load(tmp_path / "model.pth", weights_only=True)
    assert set(state) == set(weights) and torch.equal(state["fc.weight"], weights["fc.weight"])
    assert dialog.result_labels["runtime"].text() == "torch.load into a fresh model"

    dialog.set_format("safetensors")
    assert dialog.output_path() == tmp_path / "model.safetensors"
    export(qtbot, dialog)
    state = load_file(str(tmp_path / "model.safetensors"))
    assert set(state) == set(weights) and torch.equal(state["fc.weight"], weights["fc.weight"])
    assert dialog.last_result.max_abs_diff <= 1e-3
    assert (tmp_path / "model.safetensors.json").is_file()


def test_missing_folders_are_created(qtbot, dialog, tmp_path):
    out = tmp_path / "a" / "b" / "model.pth"
    dialog.set_format("state_dict")
    dialog.path_edit.setText(str(out))
    export(qtbot, dialog)
    assert out.is_file() and dialog.last_result.path == out


def test_a_failed_export_explains_itself_and_leaves_no_new_folder(qtbot, checkpoint, tmp_path):
    gone = tmp_path / "gone.pt"
    shutil.copy(checkpoint, gone)
    dlg = ExportDialog(str(gone))
    qtbot.addWidget(dlg)
    dlg.show()
    gone.unlink()
    dlg.set_format("state_dict")
    dlg.path_edit.setText(str(tmp_path / "new" / "model.pth"))
    fail(qtbot, dlg)
    assert dlg.message.isVisible() and "does not exist" in dlg.message.text()
    assert dlg.result_labels["status"].text().startswith("Failed")
    assert not (tmp_path / "new").exists()  # the folder made for it is gone again
    assert dlg.last_result is None and dlg.export_button.isEnabled()


def test_bad_destinations_are_refused_inline(qtbot, dialog, checkpoint, tmp_path):
    dialog.set_format("state_dict")
    folder = tmp_path / "folder.pth"
    folder.mkdir()
    dialog.path_edit.setText(str(folder))
    fail(qtbot, dialog)
    assert "is a folder" in dialog.message.text()

    dialog.path_edit.setText(str(checkpoint))
    assert not dialog.export()
    assert "is the checkpoint itself" in dialog.message.text()

    dialog.path_edit.setText("")
    assert not dialog.export() and "Choose where" in dialog.message.text()

    dialog.path_edit.setText(str(tmp_path / "model.pth"))
    dialog.tolerance_edit.setText("-1")
    assert not dialog.export()
    assert "Tolerance" in dialog.message.text() and dialog.advanced.isVisible()

    # Destinations that even root cannot write (the tests run as root, who writes into any read-only folder):
    # a path through a regular file, and the kernel's /proc/sys, which refuses new entries to everyone.
    dialog.tolerance_edit.setText("1e-3")
    plain = tmp_path / "notes.txt"
    plain.write_text("a file, not a folder")
    dialog.path_edit.setText(str(plain / "model.pth"))
    fail(qtbot, dialog)
    assert f"folder {plain} is not a folder" in dialog.message.text()
    assert plain.read_text() == "a file, not a folder"
    proc_sys = Path("/proc/sys")
    if proc_sys.is_dir():  # Linux
        dialog.path_edit.setText(str(proc_sys / "model.pth"))
        fail(qtbot, dialog)
        assert "folder /proc/sys is not writable" in dialog.message.text()
        assert not (proc_sys / "model.pth").exists()

    # After all that, an export still works.
    dialog.tolerance_edit.setText("1e-3")
    dialog.path_edit.setText(str(tmp_path / "model.pth"))
    export(qtbot, dialog)
    assert (tmp_path / "model.pth").is_file() and not dialog.message.isVisible()


def test_every_control_is_named_and_documented(dialog):
    named = {dialog.objectName()}
    named |= {w.objectName() for w in dialog.findChildren(QWidget) if w.objectName().startswith("export.")}
    named |= {a.objectName() for a in dialog.findChildren(QAction) if a.objectName().startswith("export.")}
    assert named == set(OBJECT_NAMES)
    interactive = (QAbstractButton, QLineEdit, QComboBox, QAbstractSpinBox, QAbstractItemView)

    def inside_a_control(w):  # a combo's popup list, a table's header: parts of the named control
        parent = w.parentWidget()
        while parent is not None and parent is not dialog:
            if isinstance(parent, interactive):
                return True
            parent = parent.parentWidget()
        return False

    for w in dialog.findChildren(QWidget):
        if isinstance(w, interactive) and not inside_a_control(w):
            assert w.objectName() in OBJECT_NAMES, f"unnamed {type(w).__name__}: {w.objectName()!r}"


def test_int8_applies_to_onnx_only_and_names_the_file(dialog, checkpoint):
    exports = checkpoint.parent.parent / "exports"
    assert dialog.fmt() == "onnx" and dialog.quantize_check.isEnabled() and not dialog.quantize_check.isChecked()
    dialog.quantize_check.setChecked(True)
    assert dialog.quantize() == "int8" and dialog.output_path() == exports / "final.int8.onnx"
    dialog.set_format("torchscript")  # TorchScript cannot be quantized: the option is off for it
    assert not dialog.quantize_check.isEnabled() and dialog.quantize() is None
    assert dialog.output_path() == exports / "final.torchscript.pt"
    dialog.set_format("onnx")
    assert dialog.quantize_check.isEnabled() and dialog.output_path() == exports / "final.int8.onnx"
    dialog.quantize_check.setChecked(False)
    assert dialog.quantize() is None and dialog.output_path() == exports / "final.onnx"


def test_int8_export_shows_its_deployment_report(qtbot, dialog, tmp_path):
    import onnx

    lines = []
    dialog.logged.connect(lines.append)
    dialog.path_edit.setText(str(tmp_path / "final.onnx"))
    dialog.quantize_check.setChecked(True)
    assert dialog.output_path() == tmp_path / "final.int8.onnx"
    info = export(qtbot, dialog)
    result = dialog.last_result
    assert info["quantize"] == "int8" and result.path == tmp_path / "final.int8.onnx"
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in onnx.load(str(result.path)).graph.node}
    assert (tmp_path / "predict.py").is_file()

    # The report's progress reached the status line while the export ran off the GUI thread.
    assert any(line.startswith("Report: ") and "validation images" in line for line in lines)
    sidecar = json.loads(result.sidecar.read_text())
    report = sidecar["report"]
    assert info["report"] == report and sidecar["quantization"]["method"] == "static"
    labels = dialog.result_labels
    assert (
        labels["status"].text().startswith("OK: the float32 file matched PyTorch") and "int8" in labels["status"].text()
    )
    assert labels["quantization"].text().startswith("int8, static, calibrated on 18 training images")
    exported, pytorch = report["exported"]["metric"] * 100, report["pytorch"]["metric"] * 100
    assert labels["accuracy"].text().startswith(f"{exported:.2f}% exported, {pytorch:.2f}% PyTorch")
    assert "validation set of 6 images" in labels["accuracy"].text()
    assert labels["size"].text() == (
        f"{result.path.stat().st_size / 1e6:.2f} MB ({report['size_ratio']:.2f}x the float32 ONNX file, "
        f"{report['baseline']['size_bytes'] / 1e6:.2f} MB)"
    )
    assert f"{report['exported']['latency_ms_batch1']:.2f} ms exported" in labels["latency"].text()
    assert "float32 ONNX file" in labels["throughput"].text()
    for key in ("quantization", "accuracy", "size", "latency", "throughput"):
        assert not labels[key].isHidden()


def test_a_float32_export_shows_its_report_without_quantization(qtbot, dialog, tmp_path):
    dialog.set_format("state_dict")
    dialog.path_edit.setText(str(tmp_path / "model.pth"))
    export(qtbot, dialog)
    report = dialog.last_result.report
    labels = dialog.result_labels
    assert labels["quantization"].isHidden()
    assert "(+0.00 points; top-1 accuracy on the validation set of 6 images)" in labels["accuracy"].text()
    assert labels["size"].text() == f"{(tmp_path / 'model.pth').stat().st_size / 1e6:.2f} MB"
    assert labels["throughput"].text().startswith(f"{report['exported']['throughput_batch32']:.1f} images/s exported")
    assert not (tmp_path / "predict.py").exists()  # predict.py runs ONNX files only
