"""The dataset panel's Audit tab: run the dataset audit in the background and act on its findings.

Actions write the project's corrections (data.exclude, data.relabel) through engine.corrections, or its balance
settings; the user's files are never touched. Keep (not an issue) is remembered beside the audit's cache, per
dataset: it is a judgement about the images, not a training setting, so it stays out of the project file.
"""

from __future__ import annotations

import functools
from typing import Any

from PySide6.QtCore import QSize, Qt
from PySide6.QtGui import QIcon, QImage, QPixmap
from PySide6.QtWidgets import (
    QComboBox,
    QHBoxLayout,
    QLabel,
    QListView,
    QListWidget,
    QListWidgetItem,
    QProgressBar,
    QPushButton,
    QSplitter,
    QVBoxLayout,
    QWidget,
)

from widgets.look import fit_pixels
from widgets.state import ProjectState
from widgets.tasks import Task, run_task

OBJECT_NAMES = {
    "audit.run": "audits the dataset in the background: duplicates, leakage, likely label errors, outliers, balance",
    "audit.stop": "stops the running audit (within a second; nothing is written)",
    "audit.progress": "progress of the running audit",
    "audit.status": "what the audit is doing, or the summary of its report",
    "audit.kind": "shows the findings of one kind only",
    "audit.findings": "the audit's findings, most likely problems first, with their status",
    "audit.images": "the images of the selected finding, side by side",
    "audit.detail": "what the selected finding is about (labels, score, split)",
    "audit.exclude": "leaves the selected finding's images out of training and validation (data.exclude); of "
    "duplicates every copy but one, of leakage the validation twins",
    "audit.relabel_class": "the class to relabel the selected image as",
    "audit.relabel": "corrects the selected image's label to the chosen class (data.relabel)",
    "audit.keep": "marks the selected finding as not an issue (remembered for this dataset)",
    "audit.fix_leakage": "excludes every validation image that has a twin in training, in one action",
    "audit.balance_sampler": "draws rare classes as often as common ones (weighted_random sampler, balanced weights)",
    "audit.balance_loss": "weights the loss by inverse class frequency (loss.class_weights: balanced)",
}

THUMB = 96
KIND_NAMES = {
    "unreadable": "Unreadable",
    "exact_duplicate": "Exact duplicates",
    "near_duplicate": "Near duplicates",
    "leakage": "Train/validation leakage",
    "label_issue": "Likely label errors",
    "outlier": "Outliers",
    "image_property": "Image problems",
    "class_imbalance": "Class imbalance",
}


def _run(cfg: Any, *, progress: Any, cancel: Any, cached_only: bool = False) -> Any:
    from engine.audit import run_audit

    return run_audit(
        cfg, progress=lambda stage, done, total: progress((stage, done, total)), stop=cancel, cached_only=cached_only
    )


def _thumbnails(cfg: Any, keys: list[str]) -> list[tuple[str, Any]]:
    from PIL import Image

    from engine.audit import image_for_key

    out: list[tuple[str, Any]] = []
    for key in keys[:12]:
        try:
            out.append((key, fit_pixels(Image.fromarray(image_for_key(cfg, key)), THUMB)))
        except Exception as exc:  # noqa: BLE001 - an unreadable image shows its reason instead of a picture
            out.append((key, str(exc)))
    return out


class AuditPanel(QWidget):
    """The Audit tab: Run / Stop, the findings list, the selected finding's images and the actions on it."""

    def __init__(self, state: ProjectState, parent: QWidget | None = None):
        super().__init__(parent)
        self.state = state
        self.report: Any = None
        self.task: Task | None = None
        self._thumb_tasks: list[Task] = []
        self._thumb_request = 0
        self._kept: set[str] = set()
        self._build()
        state.changed.connect(self._on_state_changed)

    def _button(self, name: str, text: str, slot: Any) -> QPushButton:
        b = QPushButton(text)
        b.setObjectName(name)
        b.setToolTip(OBJECT_NAMES[name])
        b.clicked.connect(slot)
        return b

    def _build(self) -> None:
        self.run_button = self._button("audit.run", "Audit dataset", self.start)
        self.stop_button = self._button("audit.stop", "Stop", self.stop)
        self.stop_button.setEnabled(False)
        self.progress_bar = QProgressBar()
        self.progress_bar.setObjectName("audit.progress")
        self.progress_bar.setMaximumWidth(160)
        self.progress_bar.hide()
        self.status_label = QLabel("Audit the dataset for duplicates, leakage, likely label errors and outliers.")
        self.status_label.setObjectName("audit.status")
        self.status_label.setWordWrap(True)
        self.status_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.kind_combo = QComboBox()
        self.kind_combo.setObjectName("audit.kind")
        self.kind_combo.addItem("All findings", "")
        for kind, name in KIND_NAMES.items():
            self.kind_combo.addItem(name, kind)
        self.kind_combo.currentIndexChanged.connect(self._show_findings)
        self.fix_leakage_button = self._button("audit.fix_leakage", "Fix leakage", self.fix_leakage)
        self.sampler_button = self._button("audit.balance_sampler", "Balance: weighted sampler", self.balance_sampler)
        self.loss_button = self._button("audit.balance_loss", "Balance: class weights", self.balance_loss)

        self.findings_list = QListWidget()
        self.findings_list.setObjectName("audit.findings")
        self.findings_list.currentRowChanged.connect(self._on_finding_selected)
        self.images_list = QListWidget()
        self.images_list.setObjectName("audit.images")
        self.images_list.setViewMode(QListView.ViewMode.IconMode)
        self.images_list.setFlow(QListView.Flow.LeftToRight)
        self.images_list.setIconSize(QSize(THUMB, THUMB))
        self.images_list.setGridSize(QSize(THUMB + 60, THUMB + 36))
        self.images_list.setResizeMode(QListView.ResizeMode.Adjust)
        self.images_list.setMovement(QListView.Movement.Static)
        self.images_list.setWordWrap(True)
        self.detail_label = QLabel()
        self.detail_label.setObjectName("audit.detail")
        self.detail_label.setWordWrap(True)
        self.detail_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.exclude_button = self._button("audit.exclude", "Exclude", self.exclude_selected)
        self.relabel_combo = QComboBox()
        self.relabel_combo.setObjectName("audit.relabel_class")
        self.relabel_combo.setToolTip(OBJECT_NAMES["audit.relabel_class"])
        self.relabel_button = self._button("audit.relabel", "Relabel as", self.relabel_selected)
        self.keep_button = self._button("audit.keep", "Keep (not an issue)", self.keep_selected)

        top = QHBoxLayout()
        for w in (self.run_button, self.stop_button, self.progress_bar):
            top.addWidget(w)
        top.addWidget(self.status_label, 1)
        # The filter and the three fixes on two rows: on one they set the Setup panel's width at 1280x800.
        fixes = QHBoxLayout()
        fixes.addWidget(self.kind_combo)
        fixes.addWidget(self.fix_leakage_button)
        fixes.addStretch(1)
        balance = QHBoxLayout()
        for w in (self.sampler_button, self.loss_button):
            balance.addWidget(w)
        balance.addStretch(1)
        actions = QHBoxLayout()
        actions.addWidget(self.exclude_button)
        actions.addWidget(self.relabel_button)
        actions.addWidget(self.relabel_combo)
        actions.addWidget(self.keep_button)
        actions.addStretch(1)
        detail = QWidget()
        detail_layout = QVBoxLayout(detail)
        detail_layout.setContentsMargins(0, 0, 0, 0)
        detail_layout.addWidget(self.images_list, 1)
        detail_layout.addWidget(self.detail_label)
        detail_layout.addLayout(actions)
        split = QSplitter(Qt.Orientation.Vertical)
        split.addWidget(self.findings_list)
        split.addWidget(detail)
        layout = QVBoxLayout(self)
        layout.addLayout(top)
        layout.addLayout(fixes)
        layout.addLayout(balance)
        layout.addWidget(split, 1)
        self._update_actions()

    # -- running ------------------------------------------------------------------------------
    def start(self, *, cached_only: bool = False) -> None:
        """Run the audit (or, with cached_only, show the report kept for the dataset as it is now, if any)."""
        if self.is_busy():
            return
        self.run_button.setEnabled(False)
        self.stop_button.setEnabled(not cached_only)
        self.progress_bar.setRange(0, 0)
        self.progress_bar.setVisible(not cached_only)
        if not cached_only:
            self.status_label.setText("Auditing...")
        self.task = run_task(
            "dataset audit",
            _run,
            self.state.snapshot(),
            cached_only=cached_only,
            progress=True,
            on_result=self._on_returned,
            on_error=self._on_errored,
            on_progress=self._on_progressed,
        )
        self.task.finished.connect(self._on_finished)

    def look_up_cached(self) -> None:
        """Show the dataset's cached report without computing anything (after the dataset was scanned)."""
        if self.report is None:
            self.start(cached_only=True)

    def stop(self) -> None:
        if self.task is not None:
            self.task.cancel.set()

    def is_busy(self) -> bool:
        return self.task is not None and self.task.is_running()

    def wait(self, ms: int = 60000) -> bool:
        ok = self.task.wait(ms) if self.task is not None else True
        for task in self._thumb_tasks:
            ok = task.wait(ms) and ok
        self._thumb_tasks = [t for t in self._thumb_tasks if t.is_running()]
        return ok

    def _on_progressed(self, value: Any) -> None:
        stage, done, total = value
        what = {"scan": "Checking images", "embed": "Embedding", "index": "Searching duplicates"}.get(stage, "Probing")
        if total > 0:
            self.progress_bar.setRange(0, total)
            self.progress_bar.setValue(done)
        self.status_label.setText(f"{what}: {done:,} of {total:,}" if total > 1 else f"{what}...")

    def _on_returned(self, report: Any) -> None:
        if report is None:  # nothing cached for the dataset as it is now
            self.status_label.setText("No audit of this dataset yet: press Audit dataset.")
            return
        from engine.audit import kept_findings

        self.report = report
        self._kept = kept_findings(self.state.config)
        self.relabel_combo.clear()
        self.relabel_combo.addItems(report.class_names)
        self._show_summary()
        self._show_findings()

    def _on_errored(self, exc: BaseException, tb: str) -> None:
        from engine.audit import AuditStopped

        if isinstance(exc, AuditStopped):
            self.status_label.setText("Audit stopped; nothing was written.")
        else:
            self.status_label.setText(f"Audit failed: {exc}")

    def _on_finished(self) -> None:
        self.run_button.setEnabled(True)
        self.stop_button.setEnabled(False)
        self.progress_bar.hide()

    def _on_state_changed(self, path: str) -> None:
        if path in ("", "data.path", "data.kind", "data.task", "data.val_path", "data.val_fraction", "data.split_seed"):
            self.report = None
            self.findings_list.clear()
            self.images_list.clear()
            self.detail_label.clear()
            self._update_actions()
        elif self.report is not None and (path.startswith("data.") or path.startswith(("loader.", "loss."))):
            self._show_summary()
            self._refresh_statuses()

    # -- showing ------------------------------------------------------------------------------
    def _status(self, finding: Any) -> str:
        from engine.audit import finding_status

        return finding_status(finding, self.state.config, self._kept)

    def _show_summary(self) -> None:
        r = self.report
        open_count = sum(1 for f in r.findings if self._status(f) == "open")
        leak = r.leakage
        parts = [
            f"{r.samples:,} images, {len(r.findings):,} findings ({open_count:,} open)"
            + (" from the cache" if r.from_cache else f" in {r.seconds.get('total', 0):.1f} s"),
            f"leakage: {leak['val_with_twin']:,} of {leak['val_total']:,} validation images have a twin in training",
        ]
        if r.balance:
            parts.append(f"imbalance ratio {r.balance['imbalance_ratio']:.2f}")
        self.status_label.setText("; ".join(parts) + ".")
        self.status_label.setToolTip("\n".join(r.notes))

    def _visible(self) -> list[Any]:
        kind = self.kind_combo.currentData()
        return [f for f in self.report.findings if not kind or f.kind == kind] if self.report is not None else []

    def _text(self, finding: Any) -> str:
        what = KIND_NAMES[finding.kind]
        first = finding.keys[0] if finding.keys else ""
        more = f" + {len(finding.keys) - 1}" if len(finding.keys) > 1 else ""
        extra = ""
        if finding.kind == "label_issue":
            extra = f": {finding.detail['given']} -> {finding.detail['suggested']}?"
        elif finding.kind == "image_property":
            extra = f": {finding.detail['property'].replace('_', ' ')}"
        elif finding.kind == "class_imbalance":
            extra = f": {finding.detail['largest']} vs {finding.detail['smallest']}"
        return f"[{self._status(finding)}] {what}{extra}  {first}{more}  (score {finding.score:.3g})"

    def _show_findings(self) -> None:
        self.findings_list.clear()
        for finding in self._visible():
            self.findings_list.addItem(QListWidgetItem(self._text(finding)))
        if self.findings_list.count():
            self.findings_list.setCurrentRow(0)
        self._update_actions()

    def _refresh_statuses(self) -> None:
        for row, finding in enumerate(self._visible()):
            item = self.findings_list.item(row)
            if item is not None:
                item.setText(self._text(finding))
        self._update_actions()

    def selected(self) -> Any:
        row = self.findings_list.currentRow()
        visible = self._visible()
        return visible[row] if 0 <= row < len(visible) else None

    def _on_finding_selected(self, row: int) -> None:
        finding = self.selected()
        self.images_list.clear()
        self._update_actions()
        if finding is None:
            self.detail_label.clear()
            return
        detail = {k: v for k, v in finding.detail.items() if k not in ("members", "pairs", "fixes")}
        self.detail_label.setText(
            f"{KIND_NAMES[finding.kind]}, score {finding.score:.4g}, {self._status(finding)}: "
            + ", ".join(f"{k} {v}" for k, v in detail.items())
        )
        self._thumb_request += 1
        if finding.keys:
            self._thumb_tasks = [t for t in self._thumb_tasks if t.is_running()]
            self._thumb_tasks.append(
                run_task(
                    "audit thumbnails",
                    _thumbnails,
                    self.state.snapshot(),
                    list(finding.keys),
                    on_result=functools.partial(self._show_thumbnails, self._thumb_request, finding),
                )
            )

    def _show_thumbnails(self, request: int, finding: Any, thumbs: list[tuple[str, Any]]) -> None:
        if request != self._thumb_request or finding is not self.selected():
            return  # the user has selected another finding since
        self.images_list.clear()
        sides = {m["key"]: m["split"] for m in finding.detail.get("members", [])}
        sides.update({k: "train" for k in finding.detail.get("train_keys", [])})
        sides.update({k: "val" for k in finding.detail.get("val_keys", [])})
        if "split" in finding.detail and finding.keys:
            sides[finding.keys[0]] = finding.detail["split"]
        for key, pixels in thumbs:
            label = key + (f"\n({sides[key]})" if key in sides else "")
            if isinstance(pixels, str):
                item = QListWidgetItem(f"{label}\n{pixels}")
            else:
                h, w = pixels.shape[:2]
                image = QImage(pixels.data, w, h, 3 * w, QImage.Format.Format_RGB888).copy()
                item = QListWidgetItem(QIcon(QPixmap.fromImage(image)), label)
            item.setToolTip(label)
            self.images_list.addItem(item)

    def _update_actions(self) -> None:
        finding = self.selected()
        has_images = finding is not None and bool(finding.keys)
        self.exclude_button.setEnabled(has_images)
        single = finding is not None and len(finding.keys) == 1 and bool(self.report and self.report.class_names)
        self.relabel_button.setEnabled(single and self.state.get("data.task") == "classification")
        self.relabel_combo.setEnabled(self.relabel_button.isEnabled())
        if finding is not None and finding.kind == "label_issue":
            self.relabel_combo.setCurrentText(finding.detail["suggested"])
        self.keep_button.setEnabled(finding is not None)
        r = self.report
        self.fix_leakage_button.setEnabled(bool(r and r.leakage.get("val_keys")))
        self.sampler_button.setEnabled(bool(r and r.balance))
        self.loss_button.setEnabled(bool(r and r.balance))

    # -- acting -------------------------------------------------------------------------------
    def _apply(self, new_cfg: Any) -> None:
        self.state.update({"data.exclude": list(new_cfg.data.exclude), "data.relabel": dict(new_cfg.data.relabel)})

    def exclude_selected(self) -> None:
        """Exclude the selected finding's images; for duplicates every copy but the first (one is kept)."""
        from engine.corrections import with_excluded

        finding = self.selected()
        if finding is None:
            return
        keys = list(finding.keys)
        if finding.kind in ("exact_duplicate", "near_duplicate"):
            keys = keys[1:]
        elif finding.kind == "leakage":
            keys = list(finding.detail["val_keys"])
        self._apply(with_excluded(self.state.config, keys))

    def relabel_selected(self) -> None:
        from engine.corrections import with_relabel

        finding = self.selected()
        name = self.relabel_combo.currentText()
        if finding is None or not name:
            return
        self._apply(with_relabel(self.state.config, finding.keys[0], name))

    def keep_selected(self) -> None:
        from engine.audit import set_kept

        finding = self.selected()
        if finding is None:
            return
        set_kept(self.state.config, finding.id)
        self._kept.add(finding.id)
        self._refresh_statuses()
        self._show_summary()

    def fix_leakage(self) -> None:
        from engine.audit import leakage_fix
        from engine.corrections import with_excluded

        if self.report is not None:
            self._apply(with_excluded(self.state.config, leakage_fix(self.report)))

    def balance_sampler(self) -> None:
        self.state.try_set("loader.sampler.name", "weighted_random", also={"loader.sampler.weights": "balanced"})

    def balance_loss(self) -> None:
        self.state.try_set("loss.class_weights", "balanced")
