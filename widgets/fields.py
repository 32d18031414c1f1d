"""Two-way bindings between input widgets and project fields; a refused value is marked at the field with its reason."""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from PySide6.QtCore import QObject, QSignalBlocker
from PySide6.QtWidgets import QCheckBox, QComboBox, QDoubleSpinBox, QLabel, QLineEdit, QSpinBox, QWidget

from widgets.state import ProjectState

INVALID_STYLE = "border: 1px solid #d9534f; border-radius: 3px;"


def parse_float(text: str) -> float:
    """A number as a person types it: 1e-3, 0.001, 1,5 (a decimal comma), 'nan' for NaN."""
    cleaned = text.strip().replace(",", ".")
    if not cleaned:
        raise ValueError("a number is required")
    return float(cleaned)


def parse_optional_float(text: str) -> float | None:
    return None if not text.strip() else parse_float(text)


def parse_optional_int(text: str) -> int | None:
    cleaned = text.strip()
    if not cleaned:
        return None
    try:
        return int(cleaned)
    except ValueError:
        raise ValueError("a whole number is required") from None


def format_float(value: float | None) -> str:
    if value is None:
        return ""
    # Six significant digits: enough that showing a typed value and committing it again never changes it.
    return f"{value:.6g}" if math.isfinite(value) else str(value)


class FieldBinding(QObject):
    """Keeps one widget and one project field in step.

    Widget -> project goes through ProjectState.try_set, so an invalid value is refused with the reason shown
    on the widget (red border, tooltip, and the optional message label). Project -> widget updates run with
    the widget's signals blocked, so they never echo back.
    """

    def __init__(self, state: ProjectState, path: str, widget: QWidget, *,
                 read: Callable[[], Any], write: Callable[[Any], None], signal,
                 message: QLabel | None = None, also: Callable[[Any], dict[str, Any]] | None = None):
        super().__init__(widget)
        self.state, self.path, self.widget = state, path, widget
        self._read, self._write, self._message, self._also = read, write, message, also
        self._tooltip = widget.toolTip()
        self.error: str | None = None
        signal.connect(self._on_widget_changed)
        state.changed.connect(self._on_state_changed)
        self.refresh()

    def refresh(self) -> None:
        with QSignalBlocker(self.widget):
            self._write(self.state.get(self.path))
        self._show_error(None)

    def _on_state_changed(self, path: str) -> None:
        if path == "" or path == self.path:
            self.refresh()

    def _on_widget_changed(self, *_args) -> None:
        try:
            value = self._read()
        except ValueError as exc:
            self._show_error(f"{self.path}: {exc}")
            return
        also = self._also(value) if self._also else None
        self._show_error(self.state.try_set(self.path, value, also=also))

    def _show_error(self, reason: str | None) -> None:
        self.error = reason
        self.widget.setProperty("invalid", bool(reason))
        self.widget.setStyleSheet(INVALID_STYLE if reason else "")
        self.widget.setToolTip(reason or self._tooltip)
        if self._message is not None:
            self._message.setText(reason or "")
            self._message.setVisible(bool(reason))


def bind_spin(state: ProjectState, path: str, box: QSpinBox, **kw) -> FieldBinding:
    return FieldBinding(state, path, box, read=box.value, write=lambda v: box.setValue(int(v)),
                        signal=box.valueChanged, **kw)


def bind_double(state: ProjectState, path: str, box: QDoubleSpinBox, **kw) -> FieldBinding:
    return FieldBinding(state, path, box, read=box.value, write=lambda v: box.setValue(float(v)),
                        signal=box.valueChanged, **kw)


def bind_check(state: ProjectState, path: str, box: QCheckBox, **kw) -> FieldBinding:
    return FieldBinding(state, path, box, read=box.isChecked, write=lambda v: box.setChecked(bool(v)),
                        signal=box.toggled, **kw)


def bind_combo(state: ProjectState, path: str, combo: QComboBox, **kw) -> FieldBinding:
    """A combo whose items carry the field's values as their data (addItem(label, value))."""

    def write(value: Any) -> None:
        index = combo.findData(value)
        if index < 0:  # a value from a hand-edited project file that the list does not offer: show it
            combo.addItem(str(value), value)
            index = combo.count() - 1
        combo.setCurrentIndex(index)

    return FieldBinding(state, path, combo, read=combo.currentData, write=write,
                        signal=combo.currentIndexChanged, **kw)


def bind_text(state: ProjectState, path: str, edit: QLineEdit, *, parse: Callable[[str], Any] = str,
              show: Callable[[Any], str] = lambda v: "" if v is None else str(v), **kw) -> FieldBinding:
    """A line edit committed on Enter or focus-out; parse raises ValueError for text that is not a value."""
    return FieldBinding(state, path, edit, read=lambda: parse(edit.text()), write=lambda v: edit.setText(show(v)),
                        signal=edit.editingFinished, **kw)


def bind_float_text(state: ProjectState, path: str, edit: QLineEdit, *, optional: bool = False, **kw) -> FieldBinding:
    """Learning rates and other numbers spanning many decades: typed as text (1e-4), not spun."""
    return bind_text(state, path, edit, parse=parse_optional_float if optional else parse_float,
                     show=format_float, **kw)
