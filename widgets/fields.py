"""Two-way bindings between input widgets and project fields; a refused value is marked at the field with its reason."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from PySide6.QtCore import QObject, QSignalBlocker, Qt
from PySide6.QtGui import QWheelEvent
from PySide6.QtWidgets import QCheckBox, QComboBox, QDoubleSpinBox, QLabel, QLineEdit, QSizePolicy, QSpinBox, QWidget

from widgets.look import ERROR_COLOUR
from widgets.state import ProjectState

INVALID_STYLE = f"border: 1px solid {ERROR_COLOUR}; border-radius: 3px;"


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


def parse_numbers(text: str) -> list[float]:
    """Numbers separated by commas, semicolons or spaces: '0.485, 0.456, 0.406'."""
    tokens = [t for t in re.split(r"[,;\s]+", text.strip()) if t]
    if not tokens:
        raise ValueError("type at least one number, such as 0.5")
    values = []
    for token in tokens:
        try:
            values.append(float(token))
        except ValueError:
            raise ValueError(f"{token!r} is not a number") from None
    return values


def format_numbers(values: Iterable[float] | None) -> str:
    return "" if values is None else ", ".join(format_float(float(v)) for v in values)


MAX_POSITIONS = 10_000_000  # a typo such as 0-9999999999 must not build a list that fills the memory


def parse_positions(text: str) -> list[int] | None:
    """Training-set positions and inclusive ranges: '0-99, 200'; empty means all (None)."""
    if not text.strip():
        return None
    # Ranges may be typed with spaces or an en dash ("0 - 99", "0–99", "0..99"); make them one token.
    normal = re.sub(r"\s*(?:-|–|\.\.)\s*(?=\d)", "-", text.strip())
    out: list[int] = []
    for token in (t for t in re.split(r"[,;\s]+", normal) if t):
        single = re.fullmatch(r"\d+", token)
        span = re.fullmatch(r"(\d+)-(\d+)", token)
        if single:
            out.append(int(token))
        elif span:
            first, last = int(span.group(1)), int(span.group(2))
            if last < first:
                raise ValueError(f"the range {token!r} runs backwards; write it as {last}-{first}")
            if len(out) + last - first + 1 > MAX_POSITIONS:
                raise ValueError(f"more than {MAX_POSITIONS:,} positions; give a smaller range")
            out.extend(range(first, last + 1))
        else:
            raise ValueError(f"{token!r} is not a position or a range such as 0-99 (positions start at 0)")
    return out


def format_positions(values: list[int] | None) -> str:
    """The shortest text parse_positions reads back as the same list (runs of 3 or more become ranges)."""
    if not values:
        return ""
    parts: list[str] = []
    start = prev = values[0]
    for v in list(values[1:]) + [None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        if prev - start >= 2:
            parts.append(f"{start}-{prev}")
        else:
            parts.extend(str(x) for x in range(start, prev + 1))
        if v is not None:
            start = prev = v
    return ", ".join(parts)


def parse_int(text: str) -> int:
    cleaned = text.strip()
    if not cleaned:
        raise ValueError("a whole number is required")
    try:
        return int(cleaned)
    except ValueError:
        raise ValueError(f"{cleaned!r} is not a whole number") from None


class FieldBinding(QObject):
    """Keeps one widget and one project field in step.

    Widget -> project goes through ProjectState.try_set, so an invalid value is refused with the reason shown
    on the widget (red border, tooltip, and the optional message label). Project -> widget updates run with
    the widget's signals blocked, so they never echo back.
    """

    def __init__(
        self,
        state: ProjectState,
        path: str,
        widget: QWidget,
        *,
        read: Callable[[], Any],
        write: Callable[[Any], None],
        signal,
        message: QLabel | None = None,
        also: Callable[[Any], dict[str, Any]] | None = None,
    ):
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
    return FieldBinding(
        state, path, box, read=box.value, write=lambda v: box.setValue(int(v)), signal=box.valueChanged, **kw
    )


def bind_double(state: ProjectState, path: str, box: QDoubleSpinBox, **kw) -> FieldBinding:
    return FieldBinding(
        state, path, box, read=box.value, write=lambda v: box.setValue(float(v)), signal=box.valueChanged, **kw
    )


def bind_check(state: ProjectState, path: str, box: QCheckBox, **kw) -> FieldBinding:
    return FieldBinding(
        state, path, box, read=box.isChecked, write=lambda v: box.setChecked(bool(v)), signal=box.toggled, **kw
    )


def bind_combo(state: ProjectState, path: str, combo: QComboBox, **kw) -> FieldBinding:
    """A combo whose items carry the field's values as their data (addItem(label, value))."""

    def write(value: Any) -> None:
        index = combo.findData(value)
        if index < 0:  # a value from a hand-edited project file that the list does not offer: show it
            combo.addItem(str(value), value)
            index = combo.count() - 1
        combo.setCurrentIndex(index)

    return FieldBinding(state, path, combo, read=combo.currentData, write=write, signal=combo.currentIndexChanged, **kw)


def bind_text(
    state: ProjectState,
    path: str,
    edit: QLineEdit,
    *,
    parse: Callable[[str], Any] = str,
    show: Callable[[Any], str] = lambda v: "" if v is None else str(v),
    **kw,
) -> FieldBinding:
    """A line edit committed on Enter or focus-out; parse raises ValueError for text that is not a value."""
    return FieldBinding(
        state,
        path,
        edit,
        read=lambda: parse(edit.text()),
        write=lambda v: edit.setText(show(v)),
        signal=edit.editingFinished,
        **kw,
    )


def bind_float_text(state: ProjectState, path: str, edit: QLineEdit, *, optional: bool = False, **kw) -> FieldBinding:
    """Learning rates and other numbers spanning many decades: typed as text (1e-4), not spun."""
    return bind_text(
        state, path, edit, parse=parse_optional_float if optional else parse_float, show=format_float, **kw
    )


# ---------------------------------------------------------------------------------------------
# Input widgets that leave the wheel to the scroll area unless they have the focus


if TYPE_CHECKING:
    _GuardBase = QWidget  # the mixin's methods are a widget's; at run time the widget class comes after it
else:
    _GuardBase = object


class _WheelGuard(_GuardBase):
    """A scrolling form must not change a value the pointer merely passes over while the wheel turns."""

    def _guard_init(self) -> None:
        self.setFocusPolicy(Qt.FocusPolicy.StrongFocus)

    def wheelEvent(self, event: QWheelEvent) -> None:  # noqa: N802 - Qt's name
        if self.hasFocus():
            super().wheelEvent(event)
        else:
            event.ignore()  # an ignored wheel event goes on to the parent, so the panel scrolls


class SpinBox(_WheelGuard, QSpinBox):
    def __init__(self, parent=None):
        super().__init__(parent)
        self._guard_init()
        self.setKeyboardTracking(False)  # commit 224, not 2, 22 and 224 on the way
        self.setMaximum(2**31 - 1)


class DoubleSpinBox(_WheelGuard, QDoubleSpinBox):
    def __init__(self, parent=None):
        super().__init__(parent)
        self._guard_init()
        self.setKeyboardTracking(False)


class ComboBox(_WheelGuard, QComboBox):
    def __init__(self, parent=None):
        super().__init__(parent)
        self._guard_init()
        self.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToContents)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)  # as wide as the other fields


def bind_optional_spin(state: ProjectState, path: str, box: QSpinBox | QDoubleSpinBox, **kw) -> FieldBinding:
    """A spin box whose lowest value (shown as its special text) stands for None: the engine's default."""
    low = box.minimum()

    def write(v: Any) -> None:
        if isinstance(box, QSpinBox):
            box.setValue(int(low if v is None else v))  # a QSpinBox: low is an int too
        else:
            box.setValue(low if v is None else float(v))

    return FieldBinding(
        state,
        path,
        box,
        read=lambda: None if box.value() <= low else box.value(),
        write=write,
        signal=box.valueChanged,
        **kw,
    )


def bind_list_mode(
    state: ProjectState, path: str, combo: QComboBox, *, edit: QLineEdit, missing: str, **kw
) -> FieldBinding:
    """The chooser of a field that is None, 'balanced' or a list; 'from list' takes the list from its box."""
    modes = [combo.itemData(i) for i in range(combo.count())]

    def read():
        mode = combo.currentData()
        if mode != "list":
            return mode
        if not edit.text().strip():
            raise ValueError(missing)
        return parse_numbers(edit.text())

    def write(value):
        mode = "list" if isinstance(value, list) else value
        combo.setCurrentIndex(max(0, combo.findData(mode if mode in modes else modes[0])))

    return FieldBinding(state, path, combo, read=read, write=write, signal=combo.currentIndexChanged, **kw)


def bind_list_edit(state: ProjectState, path: str, edit: QLineEdit, **kw) -> FieldBinding:
    def write(value):
        # Keep what was typed while the field holds no list, so switching to "from list" finds it again.
        if isinstance(value, list):
            edit.setText(format_numbers(value))

    return FieldBinding(
        state, path, edit, read=lambda: parse_numbers(edit.text()), write=write, signal=edit.editingFinished, **kw
    )
