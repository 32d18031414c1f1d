"""How a project setting is declared once (type, default, range, choices, label, help, when it applies) and read back."""

from __future__ import annotations

import json
import math
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import annotated_types
from pydantic import BaseModel, BeforeValidator, Field
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

_NON_FINITE = ("nan", "inf", "-inf", "infinity", "-infinity")


def _number(value: Any) -> Any:
    """A JSON number as a float: integers widen, and the strings 'nan'/'inf' (JSON has no literal) are read."""
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str) and value.strip().lower() in _NON_FINITE:
        return float(value)
    return value


def _finite(value: Any) -> Any:
    value = _number(value)
    if isinstance(value, float) and not math.isfinite(value):
        raise PydanticCustomError("finite_number", "must be a finite number", {"value": value})
    return value


Number = typing.Annotated[float, BeforeValidator(_number)]  # NaN passes: a rule of its own names it
Finite = typing.Annotated[float, BeforeValidator(_finite)]


@dataclass(frozen=True)
class Applies:
    """When a setting is used: while another setting has one of `values` (or is above `above`).

    enforce: a value other than the default is refused where the setting does not apply (the engine would
    ignore it, or PyTorch refuses it). hide: the form hides the row; otherwise it is disabled and says why.
    negate: the setting applies while the other one has none of `values`.
    """

    path: str
    values: tuple = ()
    above: float | None = None
    negate: bool = False
    enforce: bool = False
    hide: bool = True
    why: str = ""  # shown under a disabled row; added to a refused value's message

    def holds(self, cfg: Any) -> bool:
        return self.admits(get_path(cfg, self.path))

    def admits(self, value: Any) -> bool:
        """Whether the setting applies while the one it depends on has this value."""
        if self.above is not None:
            return isinstance(value, (int, float)) and value > self.above
        return (value in self.values) != self.negate

    def describe(self) -> str:
        if self.above is not None:
            return f"{self.path} > {self.above:g}"
        listed = f"{' or '.join(_json(v, quote=repr) for v in self.values)}"
        return f"{self.path} {'is not' if self.negate else '='} {listed}"


@dataclass(frozen=True)
class Setting:
    """What a front end and the docs need to know about one field, beyond its type, default and range.

    It rides on the pydantic field as json_schema_extra, so the JSON schema carries it too.
    """

    label: str = ""  # the form's caption; a check box's text
    help: str = ""  # the control's tooltip
    doc: str = ""  # one line for the README's table and docs/object_names.md (default: help)
    group: str = ""  # the Training panel's group; "" for settings edited elsewhere
    name: str = ""  # objectName suffix in the Training panel (default: the field's name)
    applies: Applies | None = None
    choices: dict = field(default_factory=dict)  # value -> readable label, in the order offered
    hints: dict = field(default_factory=dict)  # value -> a sentence shown under the chooser
    note: str = ""  # a sentence shown under the control
    brings: dict = field(default_factory=dict)  # other fields set along when this one is turned on
    widget: str = ""  # "text" (typed), "positions", "weights" (a mode chooser and a list); else by type
    low: float | None = None  # the control's range where it differs from the validation's
    high: float | None = None
    step: float = 1
    decimals: int = 3
    suffix: str = ""
    special: str = ""  # the text at a spin box's lowest value (None when optional); a weights list's "type it"
    placeholder: str = ""
    effect: str = ""  # the Preprocess attribute in effect while the weights replace this setting

    def __call__(self, schema: dict[str, Any]) -> None:  # pydantic's json_schema_extra hook
        schema.update({"x-label": self.label, "x-group": self.group})
        if self.applies is not None:
            schema["x-applies"] = self.applies.describe()


def setting(
    default: Any = ...,
    *,
    default_factory: Any = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    **meta: Any,
) -> Any:
    """A project field: its default and range for pydantic, the rest for the front ends (see Setting)."""
    info = Setting(**meta)
    kwargs: dict[str, Any] = {k: v for k, v in dict(ge=ge, gt=gt, le=le, lt=lt).items() if v is not None}
    if default_factory is not None:
        return Field(
            default_factory=default_factory, description=info.doc or info.help, json_schema_extra=info, **kwargs
        )
    return Field(default, description=info.doc or info.help, json_schema_extra=info, **kwargs)


def meta(info: FieldInfo) -> Setting:
    extra = info.json_schema_extra
    return extra if isinstance(extra, Setting) else Setting()


# ---------------------------------------------------------------------------------------------
# Reading the declarations back


def get_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def unwrap(tp: Any) -> tuple[Any, list[Any], bool]:
    """(the base type, its constraint metadata, whether None is allowed) of an annotation."""
    metadata: list[Any] = []
    optional = False
    while True:
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            base, *extra = typing.get_args(tp)
            for item in extra:
                metadata.extend(item.metadata if isinstance(item, FieldInfo) else [item])
            tp = base
        elif origin in (Union, types.UnionType) and type(None) in typing.get_args(tp):
            optional = True
            rest = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(rest) != 1:
                return Union[tuple(rest)], metadata, optional  # noqa: UP007 - built from a runtime tuple of types
            tp = rest[0]
        else:
            return tp, metadata, optional


def is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def fields(cls: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, FieldInfo]]:
    """Every saved leaf field of a model as (dotted path, pydantic field), sections walked in order."""
    for name, info in cls.model_fields.items():
        if info.exclude:
            continue
        path = f"{prefix}{name}"
        base = unwrap(info.annotation)[0]
        if is_model(base):
            yield from fields(base, path + ".")
        else:
            yield path, info


def choices(info: FieldInfo) -> tuple:
    """The values a field can take when it is a choice (a Literal, or an optional true/false)."""
    base, _, optional = unwrap(info.annotation)
    if typing.get_origin(base) is Literal:
        return typing.get_args(base)
    if base is bool and optional:
        return (None, True, False)
    return ()


def bounds(metadata: list[Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for item in metadata:
        for key in ("ge", "gt", "le", "lt"):
            if isinstance(item, getattr(annotated_types, key.capitalize())):
                out[key] = getattr(item, key)
    return out


def range_text(limits: dict[str, float]) -> str:
    """'>= 1', '> 0 and < 1': what a range allows, as the messages and the README say it."""
    signs = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    return " and ".join(f"{signs[k]} {limits[k]:g}" for k in ("ge", "gt", "le", "lt") if k in limits)


def type_name(tp: Any) -> str:
    base, _, optional = unwrap(tp)
    origin = typing.get_origin(base)
    if origin in (Union, types.UnionType):
        text = " or ".join(type_name(a) for a in typing.get_args(base))
    elif origin is list:
        text = f"a list of {type_name(typing.get_args(base)[0])}"
    elif origin is dict:
        text = f"an object of names and {type_name(typing.get_args(base)[1]).removeprefix('a ')}s"
    elif origin is Literal:
        text = "one of " + ", ".join(str(v) for v in typing.get_args(base))
    elif is_model(base):
        text = f"an object with the keys {', '.join(n for n, f in base.model_fields.items() if not f.exclude)}"
    else:
        text = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
            base, getattr(base, "__name__", str(base))
        )
    if optional and base is bool:
        return "true, false or null"
    return f"{text} or null" if optional else text


def _json(value: Any, quote: Callable[[Any], str] = json.dumps) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return quote(value)
    return json.dumps(value)


# ---------------------------------------------------------------------------------------------
# The README's project-file table

TABLE_START, TABLE_END = "<!-- settings:start -->", "<!-- settings:end -->"


def replace_between(text: str, block: str) -> str:
    """text with block between the settings markers (text unchanged when it has none)."""
    start = text.find(TABLE_START)
    end = text.find(TABLE_END, start + len(TABLE_START)) if start >= 0 else -1
    if start < 0 or end < 0:
        return text
    return f"{text[: start + len(TABLE_START)]}\n{block.strip()}\n{text[end:]}"


def table(cls: type[BaseModel]) -> str:
    """The README's project-file table, one row per field, from the declarations."""
    rows = ["| field | default | meaning |", "|---|---|---|"]
    for path, info in fields(cls):
        s = meta(info)
        default = info.get_default(call_default_factory=True)
        parts = [s.doc or s.help]
        allowed = choices(info)
        if allowed and typing.get_origin(unwrap(info.annotation)[0]) is Literal:
            parts.append("one of " + ", ".join(f"`{v}`" for v in allowed))
        limits = bounds(unwrap(info.annotation)[1] + list(info.metadata))
        if limits:
            parts.append(range_text(limits).replace(">=", "≥").replace("<=", "≤"))
        if s.applies is not None:
            parts.append(f"only with `{s.applies.describe()}`")
        meaning = "; ".join(p.rstrip(".") for p in parts if p).replace("|", "\\|")
        rows.append(f"| `{path}` | `{_json(default)}` | {meaning} |")
    return "\n".join(rows)
