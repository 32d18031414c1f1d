"""The export dialog: write a checkpoint's model in a deployable format, verified against PyTorch off the GUI thread."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from PySide6.QtCore import QEvent, QSettings, Qt, Signal
from PySide6.QtGui import QPalette
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDialog,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QMessageBox,
    QProgressBar,
    QPushButton,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from engine.export import FORMATS, QUANTIZE, ExportResult, default_suffix, format_report, replaced_files
from widgets.fields import format_float, parse_float
from widgets.look import message_colour, ok_colour
from widgets.tasks import Task, run_task

OBJECT_NAMES = {
    "export.dialog": "the export dialog itself",
    "export.checkpoint": "shows which checkpoint is exported",
    "export.format": "the file format to export to",
    "export.format_help": "what runs the chosen format",
    "export.quantize": "quantize the ONNX model to int8 with ONNX Runtime (smaller, usually faster on CPU)",
    "export.path": "the file to write (the suffix follows the format)",
    "export.browse": "chooses the file to write in a file dialog",
    "export.advanced": "shows or hides the advanced settings",
    "export.tolerance": "largest allowed difference between the file's logits and PyTorch's",
    "export.export": "exports the checkpoint and verifies the file",
    "export.close": "closes the dialog",
    "export.progress": "busy indicator while an export runs",
    "export.status": "what the export is doing now",
    "export.message": "the last error, shown inline",
    "export.result": "the last export's verification result",
    "export.result_status": "whether the last export passed its check",
    "export.result_file": "the exported file",
    "export.result_runtime": "the runtime the file was loaded back with",
    "export.result_inputs": "what the check ran on",
    "export.result_difference": "largest difference between the file's logits and PyTorch's",
    "export.result_tolerance": "the tolerance the check used",
    "export.result_sidecar": "the JSON file describing the export",
    "export.result_quantization": "how the int8 file was quantized (static or dynamic, and why)",
    "export.result_accuracy": "the exported model's validation accuracy, run by its own runtime, against PyTorch's",
    "export.result_size": "the exported file's size (int8: against the float32 ONNX file)",
    "export.result_latency": "milliseconds per image at batch 1 on this machine's CPU",
    "export.result_throughput": "images per second at batch 32 on this machine's CPU",
}

FORMAT_LABELS = {
    "torchscript": "TorchScript (.pt)",
    "onnx": "ONNX (.onnx)",
    "state_dict": "PyTorch state dict (.pth)",
    "safetensors": "safetensors (.safetensors)",
    "pt2": "torch.export program (.pt2)",
}
FORMAT_HELP = {
    "torchscript": "A self-contained model run by torch.jit.load in PyTorch or LibTorch (C++), no model code needed.",
    "onnx": "Runs in ONNX Runtime (the check uses it), TensorRT, OpenVINO and other ONNX runtimes, in any language.",
    "state_dict": "Weights only: torch.load them into the same architecture with model.load_state_dict.",
    "safetensors": "Weights only, safe to open (no pickle): safetensors load_file into the same architecture.",
    "pt2": "A torch.export program run by torch.export.load in PyTorch 2; the way to AOTInductor and ExecuTorch.",
}
DEFAULT_FORMAT = "onnx"
SETTINGS_FORMAT = "export/format"
QUANTIZABLE = ("onnx",)  # formats the int8 option applies to (ONNX Runtime's quantization)


def file_suffix(fmt: str, quantize: str | None = None) -> str:
    """The suffix the dialog names files with: TorchScript says so, since .pt alone reads as a checkpoint."""
    return (".torchscript" if fmt == "torchscript" else "") + default_suffix(fmt, quantize)


def _strip_known_suffix(name: str) -> str | None:
    known = {file_suffix(f) for f in FORMATS} | {default_suffix(f) for f in FORMATS}
    known |= {file_suffix(f, q) for f in QUANTIZABLE for q in QUANTIZE}
    for suffix in sorted(known, key=len, reverse=True):
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return None


def _export_job(
    checkpoint: str,
    fmt: str,
    out: str,
    force: bool,
    tolerance: float,
    quantize: str | None = None,
    *,
    progress: Callable[[Any], None],
    cancel,
) -> dict:
    from engine.export import export_checkpoint

    # Each engine log line goes to the dialog's status line (the task emits every one: min_interval=0),
    # the deployment report's progress ("Report: 64/360 validation images") included.
    result = export_checkpoint(checkpoint, fmt, out, force=force, tolerance=tolerance, quantize=quantize, log=progress)
    try:
        info = json.loads(result.sidecar.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        info = {}
    return {"result": result, "runtime": info.get("verified_with", ""), "quantization": info.get("quantization")}


class ExportDialog(QDialog):
    """Choose a format and a file, export, and see the check against PyTorch; stays open for the next format."""

    exported = Signal(dict)  # format, path, sidecar, max_abs_diff, tolerance, inputs, runtime (plain values)
    logged = Signal(str)

    def __init__(self, checkpoint: str, parent: QWidget | None = None, default_dir: str | Path | None = None):
        super().__init__(parent)
        self.setObjectName("export.dialog")
        self.setWindowTitle("Export model")
        self.checkpoint = str(checkpoint)
        ckpt_path = Path(self.checkpoint)
        self.run_dir = ckpt_path.parent.parent if ckpt_path.parent.name == "checkpoints" else ckpt_path.parent
        self.default_dir = Path(default_dir) if default_dir else self.run_dir / "exports"
        self.last_result: ExportResult | None = None
        self.last_runtime = ""
        self._task: Task | None = None
        self._request = 0
        self._created: list[Path] = []  # folders this export made, removed again if it fails

        self.checkpoint_label = QLabel(f"Checkpoint: {self.checkpoint}")
        self.checkpoint_label.setObjectName("export.checkpoint")
        self.checkpoint_label.setWordWrap(True)
        self.checkpoint_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)

        self.format_combo = QComboBox()
        self.format_combo.setObjectName("export.format")
        for fmt in FORMATS:
            self.format_combo.addItem(FORMAT_LABELS.get(fmt, fmt), fmt)
            self.format_combo.setItemData(
                self.format_combo.count() - 1, FORMAT_HELP.get(fmt, ""), Qt.ItemDataRole.ToolTipRole
            )
        self.format_help = QLabel()
        self.format_help.setObjectName("export.format_help")
        self.format_help.setWordWrap(True)
        self.format_help.setForegroundRole(QPalette.ColorRole.PlaceholderText)
        self.quantize_check = QCheckBox("Quantize to int8 (ONNX Runtime)")
        self.quantize_check.setObjectName("export.quantize")
        self.quantize_check.setToolTip(
            "ONNX only. Static int8 quantization calibrated on training images (dynamic when they cannot be "
            "read): about a quarter of the file size. The result shows its validation accuracy, size and "
            "speed against the float32 model."
        )
        self.quantize_check.toggled.connect(self._on_quantize_changed)

        self.path_edit = QLineEdit()
        self.path_edit.setObjectName("export.path")
        self.path_edit.setToolTip(
            "The file to write; a missing folder is created. Relative paths are taken "
            f"from the run folder {self.run_dir}."
        )
        # Wide enough for a typical run folder's path, still well inside a 1280-pixel screen.
        self.path_edit.setMinimumWidth(self.fontMetrics().averageCharWidth() * 64)
        self.browse_button = QPushButton("Browse...")
        self.browse_button.setObjectName("export.browse")
        self.browse_button.clicked.connect(self._on_browse_clicked)

        self.advanced_button = QToolButton()
        self.advanced_button.setObjectName("export.advanced")
        self.advanced_button.setText("Advanced")
        self.advanced_button.setCheckable(True)
        self.advanced_button.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextBesideIcon)
        self.advanced_button.setArrowType(Qt.ArrowType.RightArrow)
        self.advanced_button.setAutoRaise(True)
        self.advanced_button.toggled.connect(self._on_advanced_changed)
        self.tolerance_edit = QLineEdit(format_float(1e-3))
        self.tolerance_edit.setObjectName("export.tolerance")
        self.tolerance_edit.setToolTip(
            "Largest allowed absolute difference between the exported file's logits and "
            "the PyTorch model's on a validation batch (scaled by the largest logit when "
            "that is above 1). Typed as a number such as 1e-3."
        )
        self.advanced = QWidget()
        adv_form = QFormLayout(self.advanced)
        adv_form.setContentsMargins(0, 0, 0, 0)
        adv_form.addRow("Tolerance:", self.tolerance_edit)
        self.advanced.hide()

        self.progress = QProgressBar()
        self.progress.setObjectName("export.progress")
        self.progress.setRange(0, 0)  # busy: the engine gives no fraction of an export
        self.progress.setTextVisible(False)
        self.progress.hide()
        self.status = QLabel()
        self.status.setObjectName("export.status")
        self.status.setWordWrap(True)
        self.message = QLabel()
        self.message.setObjectName("export.message")
        self.message.setWordWrap(True)
        self.message.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.message.hide()

        self.result_box = QGroupBox("Last export")
        self.result_box.setObjectName("export.result")
        self.result_labels: dict[str, QLabel] = {}
        self.result_form = result_form = QFormLayout(self.result_box)
        for key, title in (
            ("status", "Result:"),
            ("file", "File:"),
            ("runtime", "Verified with:"),
            ("inputs", "Checked on:"),
            ("difference", "Max abs difference:"),
            ("tolerance", "Tolerance:"),
            ("quantization", "Quantization:"),
            ("accuracy", "Accuracy:"),
            ("size", "File size:"),
            ("latency", "Latency (batch 1):"),
            ("throughput", "Throughput (batch 32):"),
            ("sidecar", "Details (JSON):"),
        ):
            label = QLabel()
            label.setObjectName(f"export.result_{key}")
            label.setWordWrap(True)
            label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
            self.result_labels[key] = label
            result_form.addRow(title, label)
        self.result_box.hide()

        self.export_button = QPushButton("Export")
        self.export_button.setObjectName("export.export")
        self.export_button.setDefault(True)
        self.export_button.clicked.connect(self._on_export_clicked)
        self.close_button = QPushButton("Close")
        self.close_button.setObjectName("export.close")
        self.close_button.setAutoDefault(False)
        self.close_button.clicked.connect(self.reject)

        form = QFormLayout()
        form.addRow("Format:", self.format_combo)
        form.addRow("", self.format_help)
        form.addRow("", self.quantize_check)
        path_row = QHBoxLayout()
        path_row.addWidget(self.path_edit, 1)
        path_row.addWidget(self.browse_button)
        form.addRow("Save to:", path_row)

        busy = QHBoxLayout()
        busy.addWidget(self.progress, 1)
        busy.addWidget(self.status, 2)
        buttons = QHBoxLayout()
        buttons.addStretch(1)
        buttons.addWidget(self.export_button)
        buttons.addWidget(self.close_button)

        layout = QVBoxLayout(self)
        layout.addWidget(self.checkpoint_label)
        layout.addLayout(form)
        layout.addWidget(self.advanced_button, 0, Qt.AlignmentFlag.AlignLeft)
        layout.addWidget(self.advanced)
        layout.addLayout(busy)
        layout.addWidget(self.message)
        layout.addWidget(self.result_box)
        layout.addStretch(1)
        layout.addLayout(buttons)

        self._apply_colours()
        saved = QSettings().value(SETTINGS_FORMAT, DEFAULT_FORMAT)
        index = self.format_combo.findData(saved if saved in FORMATS else DEFAULT_FORMAT)
        self.format_combo.setCurrentIndex(max(index, 0))
        self._format = self.fmt()
        self.path_edit.setText(str(self.default_dir / (Path(self.checkpoint).stem + file_suffix(self._format))))
        self.format_help.setText(FORMAT_HELP.get(self._format, ""))
        self.quantize_check.setEnabled(self._format in QUANTIZABLE)
        self.format_combo.currentIndexChanged.connect(self._on_format_changed)

    # --- public API

    def fmt(self) -> str:
        return self.format_combo.currentData()

    def set_format(self, fmt: str) -> None:
        index = self.format_combo.findData(fmt)
        if index < 0:
            raise ValueError(f"unknown export format {fmt!r}; allowed: {', '.join(FORMATS)}")
        self.format_combo.setCurrentIndex(index)

    def quantize(self) -> str | None:
        """The quantization to apply: "int8" when its option is on and applies to the chosen format, else None."""
        return "int8" if self.quantize_check.isChecked() and self.fmt() in QUANTIZABLE else None

    def output_path(self) -> Path | None:
        """The file the export will write, made absolute (relative paths start at the run folder)."""
        text = self.path_edit.text().strip()
        if not text:
            return None
        p = Path(text).expanduser()
        return p if p.is_absolute() else self.run_dir / p

    def is_running(self) -> bool:
        return self._task is not None and self._task.is_running()

    def wait(self, ms: int = 120000) -> bool:
        """Block until a running export is done (tests)."""
        return self._task.wait(ms) if self._task is not None else True

    def export(self) -> bool:
        """Start exporting with the chosen settings; False (with the reason shown) when it does not start."""
        if self.is_running():
            return False
        self._show_message("")
        fmt = self.fmt()
        out = self.output_path()
        if out is None:
            self._show_message("Choose where to save the exported file.")
            return False
        try:
            tolerance = parse_float(self.tolerance_edit.text())
            if not math.isfinite(tolerance) or tolerance <= 0:
                raise ValueError("must be a number above 0, such as 1e-3")
        except ValueError as exc:
            self.advanced_button.setChecked(True)
            self._show_message(f"Tolerance {self.tolerance_edit.text()!r}: {exc}")
            return False
        if out.resolve() == Path(self.checkpoint).resolve():
            self._show_message(f"{out} is the checkpoint itself; choose another file name.")
            return False
        quantize = self.quantize()
        force = False
        existing = [p for p in replaced_files(out, fmt) if not p.is_dir()]
        if existing:
            if not self._confirm_overwrite(existing[0]):
                self.status.setText(f"Not exported: {existing[0]} exists and was kept.")
                return False
            force = True
        try:
            self._created = self._make_folder(out.parent)
        except OSError as exc:
            self._show_message(f"Cannot create the folder {out.parent}: {exc.strerror or exc}")
            return False

        self._request += 1
        request = self._request
        self._set_running(True)
        label = FORMAT_LABELS.get(fmt, fmt) + (f", {quantize}" if quantize else "")
        self.status.setText(f"Exporting as {label}")
        self.logged.emit(f"Exporting {self.checkpoint} as {fmt}{f' ({quantize})' if quantize else ''} to {out}")
        self._task = run_task(
            "export",
            _export_job,
            self.checkpoint,
            fmt,
            str(out),
            force,
            tolerance,
            quantize,
            progress=True,
            min_interval=0.0,
            on_result=partial(self._on_export_finished, request),
            on_error=partial(self._on_export_failed, request, fmt),
            on_progress=partial(self._on_export_progressed, request),
        )
        return True

    def _confirm_overwrite(self, path: Path) -> bool:
        """Ask before replacing an earlier export (tests replace this one method)."""
        answer = QMessageBox.question(
            self,
            "Overwrite?",
            f"{path} already exists.\n\nReplace it (and its .json details, and predict.py for ONNX) with this export?",
            QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No,
            QMessageBox.StandardButton.No,
        )
        return answer == QMessageBox.StandardButton.Yes

    # --- slots

    def _on_export_clicked(self) -> None:
        self.export()

    def _on_format_changed(self, _index: int) -> None:
        fmt = self.fmt()
        self.format_help.setText(FORMAT_HELP.get(fmt, ""))
        QSettings().setValue(SETTINGS_FORMAT, fmt)
        self.quantize_check.setEnabled(fmt in QUANTIZABLE)
        self._follow_suffix()
        self._format = fmt

    def _on_quantize_changed(self, _on: bool) -> None:
        self._follow_suffix()

    def _follow_suffix(self) -> None:
        # The suffix follows the format (and int8); a name the user gave without a known suffix is left alone.
        text = self.path_edit.text().strip()
        if text:
            p = Path(text)
            stem = _strip_known_suffix(p.name)
            if stem is not None:
                self.path_edit.setText(str(p.with_name(stem + file_suffix(self.fmt(), self.quantize()))))

    def _on_browse_clicked(self) -> None:
        fmt = self.fmt()
        start = self.output_path() or self.default_dir / (
            Path(self.checkpoint).stem + file_suffix(fmt, self.quantize())
        )
        path, _ = QFileDialog.getSaveFileName(
            self,
            "Export to",
            str(start),
            f"{FORMAT_LABELS.get(fmt, fmt)} (*{default_suffix(fmt)});;All files (*)",
            options=QFileDialog.Option.DontConfirmOverwrite,
        )  # the dialog asks itself, with what gets replaced
        if path:
            self.path_edit.setText(path)

    def _on_advanced_changed(self, on: bool) -> None:
        self.advanced.setVisible(on)
        self.advanced_button.setArrowType(Qt.ArrowType.DownArrow if on else Qt.ArrowType.RightArrow)

    def _on_export_progressed(self, request: int, line: Any) -> None:
        if request == self._request:
            self.status.setText(str(line))
            self.logged.emit(str(line))

    def _on_export_finished(self, request: int, value: dict) -> None:
        if request != self._request:
            return
        self._set_running(False)
        self._created = []
        result: ExportResult = value["result"]
        self.last_result = result
        self.last_runtime = value["runtime"]
        quantization = value.get("quantization") or {}
        label = FORMAT_LABELS.get(result.format, result.format) + (f", {result.quantize}" if result.quantize else "")
        self.status.setText(f"Exported {label}; choose another format to export again, or close.")
        texts = {
            "status": "OK: the file matches PyTorch within the tolerance",
            "file": str(result.path),
            "runtime": self.last_runtime,
            "inputs": result.inputs,
            "difference": f"{result.max_abs_diff:.3g}",
            "tolerance": format_float(result.tolerance),
            "sidecar": str(result.sidecar),
        }
        if result.quantize:
            texts["status"] = (
                f"OK: the float32 file matched PyTorch within the tolerance, then was quantized to {result.quantize}; "
                "its accuracy against PyTorch is below"
            )
            texts["tolerance"] += " (the float32 file, before quantizing)"
            how = quantization.get("method", "")
            why = quantization.get("why_not_static")
            texts["quantization"] = f"{result.quantize}, {how}" + (
                f" (not static: {why})" if why else f", calibrated on {quantization.get('calibration', '')}"
            )
        texts.update(_report_texts(result.report))
        self._show_result(ok=True, **texts)
        info = {
            "format": result.format,
            "path": str(result.path),
            "sidecar": str(result.sidecar),
            "max_abs_diff": result.max_abs_diff,
            "tolerance": result.tolerance,
            "inputs": result.inputs,
            "runtime": self.last_runtime,
            "quantize": result.quantize,
            "report": result.report,
        }
        self.logged.emit(
            f"Exported {result.format}{f' ({result.quantize})' if result.quantize else ''} to {result.path}: "
            f"max abs difference {result.max_abs_diff:.3g} (tolerance {result.tolerance:g}), verified with "
            f"{self.last_runtime}\n" + "\n".join(f"  {line}" for line in format_report(result.report))
        )
        self.exported.emit(info)

    def _on_export_failed(self, request: int, fmt: str, exc: BaseException, tb: str) -> None:
        if request != self._request:
            return
        self._set_running(False)
        self._remove_created()
        from engine.checkpoints import CheckpointError
        from engine.export import ExportError

        known = isinstance(exc, (ExportError, CheckpointError, ValueError, OSError))
        text = str(exc) if known and str(exc) else f"{type(exc).__name__}: {exc}"
        self.status.setText("")
        self._show_message(f"Export failed: {text}")
        self._show_result(
            ok=False, status=f"Failed: no {FORMAT_LABELS.get(fmt, fmt)} file was written; the reason is shown above"
        )
        self.logged.emit(f"Export failed: {text}" + ("" if known else f"\n{tb}"))

    def reject(self) -> None:
        if self.is_running():
            # Closing would orphan the export's thread; it finishes in seconds and its files stay consistent.
            self.status.setText("An export is running; close the dialog when it has finished.")
            return
        super().reject()

    def changeEvent(self, event) -> None:  # noqa: N802 - Qt's name
        if event.type() in (QEvent.Type.PaletteChange, QEvent.Type.StyleChange):
            self._apply_colours()
        super().changeEvent(event)

    # --- helpers

    @staticmethod
    def _make_folder(folder: Path) -> list[Path]:
        """Create folder and its missing parents; the ones made are returned, deepest first."""
        missing = []
        p = folder
        while not p.exists() and p != p.parent:
            missing.append(p)
            p = p.parent
        if missing:
            folder.mkdir(parents=True, exist_ok=True)
        return missing

    def _remove_created(self) -> None:
        # A failed export leaves no empty folders behind that it made itself.
        for folder in self._created:
            try:
                folder.rmdir()
            except OSError:
                break
        self._created = []

    def _set_running(self, running: bool) -> None:
        for w in (self.format_combo, self.path_edit, self.browse_button, self.tolerance_edit, self.export_button):
            w.setEnabled(not running)
        self.quantize_check.setEnabled(not running and self.fmt() in QUANTIZABLE)
        self.close_button.setEnabled(not running)
        self.progress.setVisible(running)

    def _apply_colours(self) -> None:
        self.message.setStyleSheet(f"color: {message_colour(self.palette()).name()};")
        self._colour_status()

    def _colour_status(self) -> None:
        label = self.result_labels["status"]
        ok = label.property("ok")
        if ok is None:
            label.setStyleSheet("")
            return
        colour = ok_colour(self.palette()) if ok else message_colour(self.palette())
        label.setStyleSheet(f"color: {colour.name()}; font-weight: bold;")

    def _show_message(self, text: str) -> None:
        self.message.setText(text)
        self.message.setVisible(bool(text))
        if text:
            self._grow()

    def _show_result(self, *, ok: bool, **texts: str) -> None:
        """Fill the result box; rows not given (a failed export has no file or figures) are hidden."""
        for key, label in self.result_labels.items():
            label.setText(texts.get(key, ""))
            self.result_form.setRowVisible(label, key in texts)
        self.result_labels["status"].setProperty("ok", ok)
        self._colour_status()
        self.result_box.show()
        self._grow()

    def _grow(self) -> None:
        # New text (a result, a long error) may need more height than the dialog has; never shrink what the user set.
        layout = self.layout()
        assert layout is not None  # set in __init__
        layout.activate()
        hint = self.sizeHint()
        if hint.height() > self.height() or hint.width() > self.width():
            self.resize(max(hint.width(), self.width()), max(hint.height(), self.height()))


def _report_texts(report: dict[str, Any]) -> dict[str, str]:
    """The deployment report's result rows: accuracy, size, latency and throughput (exported against PyTorch)."""
    texts: dict[str, str] = {}
    ours, theirs, baseline = report.get("exported", {}), report.get("pytorch", {}), report.get("baseline")
    metric = report.get("metric", "accuracy")
    if report.get("evaluated_on") and "difference_points" in report:
        texts["accuracy"] = (
            f"{ours['metric'] * 100:.2f}% exported, {theirs['metric'] * 100:.2f}% PyTorch "
            f"({report['difference_points']:+.2f} points; {metric} on the {report['evaluated_on']})"
        )
        if "top1_agreement" in report:
            texts["accuracy"] += f"; same top-1 as PyTorch on {report['top1_agreement'] * 100:.1f}%"
        texts["accuracy"] += f"; largest logit difference {report['max_abs_logit_diff']:.3g}"
    elif report.get("evaluated_on"):
        texts["accuracy"] = (
            f"{metric} {ours['metric']:.4g} exported, {theirs['metric']:.4g} PyTorch on the {report['evaluated_on']}"
        )
    elif report:
        texts["accuracy"] = f"not measured: {report.get('why_not_evaluated', 'no labelled data')}"
    if "size_bytes" in ours:
        texts["size"] = f"{ours['size_bytes'] / 1e6:.2f} MB"
        if baseline and report.get("size_ratio") is not None:
            texts["size"] += (
                f" ({report['size_ratio']:.2f}x the {baseline['name']}, {baseline['size_bytes'] / 1e6:.2f} MB)"
            )
    if "latency_ms_batch1" in ours:
        parts = [f"{ours['latency_ms_batch1']:.2f} ms exported", f"{theirs['latency_ms_batch1']:.2f} ms PyTorch"]
        through = [f"{ours['throughput_batch32']:.1f} images/s exported", f"{theirs['throughput_batch32']:.1f} PyTorch"]
        if baseline:
            parts.append(f"{baseline['latency_ms_batch1']:.2f} ms {baseline['name']}")
            through.append(f"{baseline['throughput_batch32']:.1f} {baseline['name']}")
        cpu = report.get("cpu", {}).get("name", "this CPU")
        texts["latency"] = ", ".join(parts) + f" (median, {cpu})"
        texts["throughput"] = ", ".join(through)
    return texts
