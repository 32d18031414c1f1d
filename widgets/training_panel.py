"""The training settings panel: a form per group of settings, each row built from the setting's declaration."""

from __future__ import annotations

import sys
import typing
from collections.abc import Callable
from typing import Any, TypeVar

from PySide6.QtCore import QSignalBlocker, Qt, Signal
from PySide6.QtGui import QPalette
from PySide6.QtWidgets import (
    QAbstractSpinBox,
    QCheckBox,
    QComboBox,
    QFormLayout,
    QFrame,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLayoutItem,
    QLineEdit,
    QPushButton,
    QScrollArea,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from engine.config import ProjectConfig
from engine.machine import auto_device, devices_here
from engine.settings import Setting, bounds, choices, fields, meta, unwrap
from widgets.augment_preview import OBJECT_NAMES as PREVIEW_NAMES
from widgets.augment_preview import AugmentPreviewWidget
from widgets.fields import (
    ComboBox,
    DoubleSpinBox,
    FieldBinding,
    SpinBox,
    bind_check,
    bind_combo,
    bind_double,
    bind_float_text,
    bind_list_edit,
    bind_list_mode,
    bind_optional_spin,
    bind_spin,
    bind_text,
    format_numbers,
    format_positions,
    parse_int,
    parse_numbers,
    parse_optional_int,
    parse_positions,
)
from widgets.look import ERROR_STYLE
from widgets.lr_finder_dialog import LrFinderDialog
from widgets.phase_editor import OBJECT_NAMES as PHASE_NAMES
from widgets.phase_editor import PhaseEditor
from widgets.state import ProjectState

W = TypeVar("W", bound=QWidget)

# (name, title, what it holds, the sections its rows come from in order)
GROUPS = [
    ("input", "Input", "image size, normalisation and augmentation", ("data", "loader")),
    ("sampler", "Sampler and loader", "sampler and DataLoader settings", ("loader.sampler", "loader")),
    ("loss", "Loss", "loss function and its options", ("loss",)),
    ("optimizer", "Optimizer", "optimizer and its options", ("optimizer",)),
    ("schedule", "Learning-rate schedule", "learning-rate schedule and its options", ("schedule",)),
    ("training", "Training", "epochs, device, precision, seed", ("train",)),
    ("distributed", "Several processes", "training in several processes through torchrun", ("distributed",)),
    ("early_stopping", "Early stopping", "early stopping", ("early_stopping",)),
    ("checkpoints", "Checkpoints and logs", "checkpoints and TensorBoard logs", ("checkpoint", "output")),
]
LEFT_GROUPS = 3  # the first three groups make the left column when the panel is wide


def _rows() -> dict[str, list[tuple[str, Setting, Any]]]:
    """{group: [(path, declaration, pydantic field)]} in the order the forms show them."""
    out: dict[str, list] = {name: [] for name, *_ in GROUPS}
    order = {name: sections for name, _, _, sections in GROUPS}
    for index, (path, info) in enumerate(fields(ProjectConfig)):
        s = meta(info)
        if s.group:
            rank = next(i for i, sec in enumerate(order[s.group]) if path.startswith(sec + "."))
            out[s.group].append(((rank, index), path, s, info))
    return {g: [row[1:] for row in sorted(rows, key=lambda r: r[0])] for g, rows in out.items()}


ROWS = _rows()


def object_name(path: str, s: Setting) -> str:
    return f"training.{s.name or path.rsplit('.', 1)[1]}"


# Settings in this panel that others depend on (a sampler, a loss...): choosing one brings its consequences along.
CHOOSERS = {_rule.path for _, info in fields(ProjectConfig) if (_rule := meta(info).applies)} & {
    path for rows in ROWS.values() for path, _, _ in rows
}
OBJECT_NAMES = {
    "training.scroll": "the scroll area holding the training settings",
    "training.find_lr": "opens the learning-rate finder (its suggestion can become the learning rate)",
}
OBJECT_NAMES.update({f"training.group.{name}": f"group: {text}" for name, _, text, _ in GROUPS})
OBJECT_NAMES.update(PHASE_NAMES)
OBJECT_NAMES.update(PREVIEW_NAMES)
for _path, _s, _info in (row for rows in ROWS.values() for row in rows):
    _name = object_name(_path, _s)
    OBJECT_NAMES[_name] = f"{_s.label} ({_path}): {_s.doc or _s.help}"
    if _s.widget == "weights":
        OBJECT_NAMES[_name + "_mode"] = f"{_s.label}, given as: {'; '.join(_s.choices.values())} ({_path})"

_devices_here: dict[str, bool] | None = None


def devices_available(*, load: bool = True) -> dict[str, bool] | None:
    """Which train.device choices this machine has (asked once: the answer does not change while the app runs).

    load=False: None while PyTorch is not imported yet (the window starts before it; see app.main_window).
    """
    global _devices_here
    if _devices_here is None:
        if not load and "torch" not in sys.modules:
            return None
        _devices_here = devices_here()
    return _devices_here


def _note(text: str = "") -> QLabel:
    label = QLabel(text)
    label.setWordWrap(True)
    label.setForegroundRole(QPalette.ColorRole.PlaceholderText)
    label.setVisible(bool(text))
    return label


def _control(s: Setting, info) -> tuple[QWidget, Callable[..., FieldBinding], dict[str, Any]]:
    """The control a declaration asks for (by its widget, else by its type) and how to bind it."""
    base, elements, optional = unwrap(info.annotation)
    limits = bounds(list(info.metadata) + elements)
    offered = tuple(s.choices) if s.widget == "weights" else choices(info)
    spans = s.high is not None or "le" in limits or "lt" in limits  # a float over many decades is typed, not spun
    if s.widget in ("positions", "text") or typing.get_origin(base) is list or (base is float and not spans):
        edit = QLineEdit()
        edit.setPlaceholderText(s.placeholder)
        if s.widget == "positions":
            return edit, bind_text, dict(parse=parse_positions, show=format_positions)
        if base is float:
            return edit, bind_float_text, dict(optional=optional)
        if base is int:
            return edit, bind_text, dict(parse=parse_optional_int if optional else parse_int)
        return edit, bind_text, dict(parse=parse_numbers, show=format_numbers)
    if offered:
        box = ComboBox()
        for value in offered:
            box.addItem(s.choices.get(value, str(value)), value)
        return box, bind_combo, {}
    if base is bool:
        return QCheckBox(s.label), bind_check, {}
    spin = SpinBox() if base is int else DoubleSpinBox()
    low = s.low if s.low is not None else limits.get("ge", limits.get("gt", 0))
    if isinstance(spin, SpinBox):  # base is int: the declarations give its limits and step as whole numbers
        first = int(low) - (1 if optional else 0) + (1 if "gt" in limits else 0)
        spin.setRange(first, int(s.high if s.high is not None else limits.get("le", 2**31 - 1)))
        spin.setSingleStep(int(s.step))
    else:
        spin.setDecimals(s.decimals)
        high = s.high if s.high is not None else limits.get("le", limits.get("lt"))
        assert high is not None  # spans: a float without an upper limit is typed, not spun (above)
        spin.setRange(low, high)
        spin.setSingleStep(s.step)
    spin.setSuffix(s.suffix)
    spin.setSpecialValueText(s.special)
    return spin, (bind_optional_spin if optional else bind_spin if base is int else bind_double), {}


class TrainingPanel(QWidget):
    """Every training setting of the project, bound to a ProjectState; refused values are marked at the field.

    The panel keeps no settings of its own: each control writes through ProjectState.try_set and redraws
    from ProjectState.changed. A row whose setting does not apply (its declaration's `applies` rule) is hidden,
    or disabled with the reason and the value in effect.
    """

    finder_running_changed = Signal(bool)  # the learning-rate finder started or ended

    TWO_COLUMN_MARGIN = 48  # spacing, margins and a vertical scroll bar between two columns of groups

    def __init__(self, state: ProjectState, parent: QWidget | None = None):
        super().__init__(parent)
        self.setObjectName("training")
        self.state = state
        self._bindings: dict[str, list[FieldBinding]] = {}
        self._widgets: dict[str, QWidget] = {}  # by path (a weights field: its mode chooser)
        self._lists: dict[str, QLineEdit] = {}  # the list box of a weights field, by path
        self._rows: list[
            tuple[str, Setting, QFormLayout, QWidget, QWidget, QLabel, str]
        ] = []  # ..., cell, control, remark, note
        self._remarks: dict[str, QLabel] = {}
        self._two_columns: bool | None = None

        self._content = QWidget()
        columns = QHBoxLayout(self._content)
        self._columns_layout = columns
        self._cols = [QVBoxLayout(), QVBoxLayout()]
        for col in self._cols:
            columns.addLayout(col, 1)
        boxes = [self._build_group(name, title) for name, title, _, _ in GROUPS]
        forms = {name: box.layout() for (name, *_), box in zip(GROUPS, boxes, strict=True)}
        # The input group ends with the augmentation preview; the training group with the run's phases.
        self.augment_preview = AugmentPreviewWidget(state)
        self.phases = PhaseEditor(state, preset=self._fine_tune_preset)
        phases_caption = QLabel("Phases (gradual unfreezing; none: one phase as above):")
        phases_caption.setToolTip(self.phases.table.toolTip())
        for name, rows in (("input", [self.augment_preview]), ("training", [phases_caption, self.phases])):
            form = forms[name]
            assert isinstance(form, QFormLayout)  # _build_group lays each group out as a form
            for row in rows:
                form.addRow(row)  # the whole width: the table has eight columns
        self.find_lr_button = QPushButton("Find learning rate...")
        self.find_lr_button.setObjectName("training.find_lr")
        self.find_lr_button.setToolTip(
            "Train on a ramp of learning rates for at most one epoch and suggest one from where the loss falls; "
            "the project and its weights stay as they are."
        )
        self.find_lr_button.clicked.connect(self.open_lr_finder)
        self.lr_finder: LrFinderDialog | None = None
        optimizer_form = boxes[[name for name, *_ in GROUPS].index("optimizer")].layout()
        assert isinstance(optimizer_form, QFormLayout)
        optimizer_form.insertRow(2, "", self.find_lr_button)  # under the learning rate
        self._left, self._right = boxes[:LEFT_GROUPS], boxes[LEFT_GROUPS:]
        self._device, self._processes = (
            self._widget_as("train.device", QComboBox),
            self._widget_as("distributed.processes", QSpinBox),
        )
        for widget in self._widgets.values():
            signal = (
                getattr(widget, "currentIndexChanged", None)
                or getattr(widget, "valueChanged", None)
                or getattr(widget, "toggled", None)
            )
            if signal is not None:
                signal.connect(self._on_choice_changed)

        self._scroll = QScrollArea()
        self._scroll.setObjectName("training.scroll")
        self._scroll.setWidgetResizable(True)
        self._scroll.setFrameShape(QFrame.Shape.NoFrame)
        self._scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAsNeeded)
        self._scroll.setWidget(self._content)
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.addWidget(self._scroll)
        self._arrange(two=False)

        # Connected after every binding, so the bindings have redrawn their widgets when this runs.
        state.changed.connect(self._on_choice_changed)
        self.refresh_devices()
        self._sync()

    # -- public --------------------------------------------------------------------------------
    def field_widget(self, path: str) -> QWidget | None:
        """The control that edits a project field (the first one where a field has two), or None."""
        bindings = self._bindings.get(path)
        return bindings[0].widget if bindings else None

    def focus_field(self, path: str) -> bool:
        """Scroll to the control of a field and give it the focus; False if the panel has none or it is hidden."""
        widget = self.field_widget(path)
        if widget is None or not widget.isVisibleTo(self):
            return False
        self._scroll.ensureWidgetVisible(widget)
        widget.setFocus(Qt.FocusReason.OtherFocusReason)
        return True

    def _fine_tune_preset(self) -> dict[str, Any]:
        """The Fine-tune recipe for the project as it stands (engine.phases.fine_tune_preset)."""
        from engine.phases import fine_tune_preset  # reads the backbone's structure: PyTorch is loaded by now

        return fine_tune_preset(self.state.config)

    def open_lr_finder(self) -> LrFinderDialog:
        """The learning-rate finder's dialog for this project (one at a time), shown."""
        if self.lr_finder is None:
            self.lr_finder = LrFinderDialog(self.state, self)
            self.lr_finder.running_changed.connect(self.finder_running_changed)
        self.lr_finder.show()
        self.lr_finder.raise_()
        return self.lr_finder

    def on_running_changed(self, running: bool) -> None:
        """A run is training: the finder would compete with it for the machine, so it waits."""
        self.find_lr_button.setEnabled(not running)

    # -- building ------------------------------------------------------------------------------
    def _build_group(self, name: str, title: str) -> QGroupBox:
        box = QGroupBox(title)
        box.setObjectName(f"training.group.{name}")
        form = QFormLayout(box)
        form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
        form.setRowWrapPolicy(QFormLayout.RowWrapPolicy.DontWrapRows)
        form.setLabelAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        for path, s, info in ROWS[name]:
            key = object_name(path, s)
            widget, bind, kw = _control(s, info)
            if s.widget == "weights":  # a chooser (balanced, none, from list) over a box for the list
                edit = QLineEdit()
                edit.setPlaceholderText(s.placeholder)
                self._lists[path] = edit
                kw = dict(edit=edit, missing=s.special)
                self._add(form, s, path, key + "_mode", widget, bind_list_mode, kw, s.label)
                self._add(form, s, path, key, edit, bind_list_edit, {}, "", help=s.note)
            else:
                self._add(
                    form, s, path, key, widget, bind, kw, "" if isinstance(widget, QCheckBox) else s.label, note=s.note
                )
        return box

    def _add(
        self,
        form: QFormLayout,
        s: Setting,
        path: str,
        key: str,
        widget: QWidget,
        bind,
        kw: dict,
        label: str,
        *,
        note: str = "",
        help: str = "",
    ) -> None:
        """A form row: the control, its error line under it (shown only while a value is refused), a note."""
        widget.setObjectName(key)
        widget.setToolTip(help or s.help)  # before binding: the binding restores this tooltip once an error is gone
        message = QLabel()
        message.setObjectName(f"{key}.message")
        message.setWordWrap(True)
        message.setStyleSheet(ERROR_STYLE)
        message.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        message.hide()
        cell = QWidget()
        box = QVBoxLayout(cell)
        box.setContentsMargins(0, 0, 0, 0)
        box.setSpacing(2)
        box.addWidget(widget)
        box.addWidget(message)
        remark = _note(note)
        box.addWidget(remark)
        if label:
            caption = QLabel(label + ":")
            caption.setToolTip(help or s.help)
            caption.setBuddy(widget)
            form.addRow(caption, cell)
        else:
            form.addRow(cell)
        binding = bind(self.state, path, widget, message=message, also=self._also(path, s), **kw)
        self._bindings.setdefault(path, []).append(binding)
        self._widgets.setdefault(path, widget)
        self._rows.append((path, s, form, cell, widget, remark, note))
        self._remarks.setdefault(path, remark)

    def _widget_as(self, path: str, kind: type[W]) -> W:
        """The control of a field, of the kind its declaration makes it (see _control)."""
        widget = self._widgets[path]
        assert isinstance(widget, kind), (path, type(widget).__name__)
        return widget

    # -- keeping a choice and the settings that depend on it consistent ---------------------------
    def _also(self, path: str, s: Setting) -> Callable[[Any], dict[str, Any]] | None:
        """What is set along with a field: what it brings, or its choice's consequences (see _along)."""
        if s.brings:
            return lambda on: dict(s.brings) if on else {}
        if path in CHOOSERS:
            return lambda value: self._along(path, value, path)
        if s.applies is not None and s.applies.path in CHOOSERS:
            rule = s.applies.path
            return lambda _value: self._along(rule, self._shown(rule), path)
        return None

    def _along(self, chooser: str, value: Any, own: str) -> dict[str, Any]:
        """A choice, with the settings that depend on it made to fit: those the new choice does not use go back
        to their defaults, and one it needs (the weighted sampler's weights) comes from the panel."""
        values: dict[str, Any] = {chooser: value}
        dependents = [
            (p, info)
            for p, info in fields(ProjectConfig)
            if (applies := meta(info).applies) is not None and applies.path == chooser
        ]
        for p, info in dependents:
            rule, default = meta(info).applies, info.get_default(call_default_factory=True)
            assert rule is not None  # a dependent has a rule
            if rule.enforce and not rule.admits(value) and self.state.get(p) not in (None, default):
                values[p] = default
            elif (
                p in self._lists and rule.admits(value) and self.state.get(p) is None and None not in meta(info).choices
            ):
                values[p] = self._typed_list(p)
        supplied = set(values)
        for problem in self.state.check(values):  # what still contradicts the choice goes back to its default
            if problem.path in dict(dependents) and problem.path not in supplied:
                values[problem.path] = dict(dependents)[problem.path].get_default(call_default_factory=True)
        values.pop(own, None)
        return values

    def _typed_list(self, path: str) -> str | list[float]:
        """The list typed in a weights field's box when 'from list' is chosen and it reads, else 'balanced'."""
        try:
            return parse_numbers(self._lists[path].text()) if self._shown(path) == "list" else "balanced"
        except ValueError:
            return "balanced"

    def _shown(self, path: str) -> Any:
        """A choice as its control shows it (a refused choice stays on show), else the project's value."""
        widget = self._widgets.get(path)
        read = next((getattr(widget, g) for g in ("currentData", "value", "isChecked") if hasattr(widget, g)), None)
        return read() if read is not None else self.state.get(path)

    # -- what applies, and what the choices mean ------------------------------------------------
    def _on_choice_changed(self, *_args) -> None:  # a control or the project changed
        self._sync()

    def _sync(self) -> None:
        """Show or enable each row as its `applies` rule says; the notes say what the current choices mean."""
        for path, s, form, cell, control, remark, text in self._rows:
            rule = s.applies
            if rule is not None:
                holds = rule.admits(self._shown(rule.path))
                if rule.hide:
                    form.setRowVisible(cell, holds)
                else:
                    control.setEnabled(holds)
                    if not holds and rule.why:
                        text, effect = self._why_not(rule.why, s)
                        if effect is not None:  # the control shows what the run will use, not the unused setting
                            self._show_in_effect(control, effect)
                    elif s.effect:
                        for binding in self._bindings.get(path, []):
                            binding.refresh()  # the project's own value again
            if s.hints:
                text = s.hints.get(self._shown(path), "")
            remark.setText(text)
            remark.setVisible(bool(text))
        for path, edit in self._lists.items():
            edit.setEnabled(self._widget_as(path, QComboBox).currentData() == "list")
        sampler = self._shown("loader.sampler.name")
        default = {"random": "default (without replacement)", "weighted_random": "default (with replacement)"}
        self._widget_as("loader.sampler.replacement", QComboBox).setItemText(0, default.get(sampler, "default"))
        sgd = self._shown("optimizer.name") == "sgd"
        self._widget_as("optimizer.momentum", QAbstractSpinBox).setSpecialValueText(
            "default (0.9)" if sgd else "default (0)"
        )
        device = self._device.currentData()
        here = devices_available(load=False)
        if here is not None and device in ("cuda", "mps") and not here.get(device, False):
            self._say(
                "train.device",
                f"This machine has no {device.upper() if device == 'cuda' else 'MPS'} device: "
                "a run started here stops with an error. Choose auto or cpu to train here.",
            )
        processes, batch = self._processes.value(), self.state.config.loader.batch_size
        if processes > 1:
            self._say(
                "distributed.processes",
                f"Each step trains on {processes} × {batch} = {processes * batch} "
                "samples (the batch size is per process). Each process's output has "
                "its own tab in the Log.",
            )

    def _say(self, path: str, text: str) -> None:
        self._remarks[path].setText(text)
        self._remarks[path].setVisible(True)

    def _why_not(self, why: str, s: Setting) -> tuple[str, Any]:
        """Why a disabled row is not used, and the value used instead where the weights bring it (else None)."""
        text = why[0].upper() + why[1:]
        if s.effect and "engine.backbones" in sys.modules:  # known once the catalog is loaded (it imports PyTorch)
            from engine.backbones import preprocess_for

            try:
                value = getattr(preprocess_for(self.state.config.model, self.state.config.data), s.effect)
            except Exception:  # noqa: BLE001 - weights the catalog does not know are reported by the backbone panel
                return text + ".", None
            shown = format_numbers(value) if isinstance(value, tuple) else f"{value}{s.suffix}"
            return f"{text}: {shown}.", value
        return text + ".", None

    @staticmethod
    def _show_in_effect(control: QWidget, value: Any) -> None:
        """Show a value in a disabled control without writing it to the project."""
        blocker = QSignalBlocker(control)
        if isinstance(control, QSpinBox):
            control.setValue(int(value))
        elif isinstance(control, QLineEdit):
            control.setText(format_numbers(value) if isinstance(value, tuple) else str(value))
        del blocker

    def refresh_devices(self) -> None:
        """Label each device choice with whether this machine has it (once PyTorch is imported; see
        devices_available)."""
        here = devices_available(load=False)
        if here is None:
            return
        for i in range(self._device.count()):
            name = self._device.itemData(i)
            if name == "auto":
                text = f"auto (uses {auto_device(here)} here)"
            else:
                text = name if here.get(name, False) else f"{name} (not available here)"
            self._device.setItemText(i, text)
        self._on_choice_changed()

    def _arrange(self, *, two: bool) -> None:
        """Two columns of groups when the panel is wide enough, one otherwise (groups keep their objects)."""
        if two == self._two_columns:
            return
        self._two_columns = two
        # The groups' own layout items are moved, not recreated: a widget remembers one item, and a new item
        # would leave the old one's cached height-for-width answers stale (groups drawn squashed after a row
        # appears or a note rewraps).
        items: dict[QWidget, QLayoutItem] = {}
        for col in self._cols:
            while col.count():
                item = col.takeAt(0)
                if item is not None and (widget := item.widget()) is not None:
                    items[widget] = item
        groups = [self._left, self._right] if two else [self._left + self._right, []]
        for col, boxes in zip(self._cols, groups, strict=True):
            for box in boxes:
                if box in items:
                    col.addItem(items[box])
                else:
                    col.addWidget(box)
            col.addStretch(1)
        self._columns_layout.setStretch(1, 1 if two else 0)
        self._columns_layout.setSpacing(12 if two else 0)

    def _two_column_width(self) -> int:
        def widest(boxes):
            return max(box.minimumSizeHint().width() for box in boxes)

        margins = self._columns_layout.contentsMargins()
        return widest(self._left) + widest(self._right) + margins.left() + margins.right() + self.TWO_COLUMN_MARGIN

    def resizeEvent(self, event) -> None:  # noqa: N802 - Qt's name
        self._arrange(two=event.size().width() >= self._two_column_width())
        super().resizeEvent(event)
