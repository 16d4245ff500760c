"""Config classes: pydantic dataclasses that check themselves whenever one is built.

A field is declared once, with its type, default, one-line help and range, e.g.
`lr: float = Field(default=1e-3, description="peak learning rate", gt=0)` (`default=` by keyword: mypy
reads no other); the loader, `ssit-dist config`, the command-line options, the JSON Schema and the error
messages all read it from there. `@configclass` makes
a class such a dataclass, as strict as JSON Schema (an int field refuses true and "3", a bool field
refuses 1; 1e3 is the int 1000, 2 the float 2.0), and turns pydantic's errors into a ConfigError naming
the field, the value and what is expected. A class's `validate()`, where it has one, checks what relates
fields; its `renamed` ClassVar maps older field names to today's (read with a FutureWarning).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from typing import Any, TypeVar

import pydantic.dataclasses
from pydantic import ConfigDict, Field, ValidationError
from pydantic.fields import FieldInfo

T = TypeVar("T")

# JSON's types, no coercion between them; unknown keyword arguments are errors, not dropped.
STRICT = ConfigDict(strict=True, extra="forbid")
_BOUNDS = ("ge", "gt", "le", "lt")
_RANGE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the field and says what is expected (a line per
    field at fault, each starting with the field's name)."""


@typing.dataclass_transform(kw_only_default=True, field_specifiers=(Field, FieldInfo))
def configclass(cls: type[T] | None = None, /, *, frozen: bool = False) -> Any:
    """`@configclass` or `@configclass(frozen=True)`: `cls` as a checked pydantic dataclass with
    keyword-only fields (a section's required fields may follow its base's defaults)."""

    def make(cls: type[T]) -> type[T]:
        made = pydantic.dataclasses.dataclass(cls, config=STRICT, frozen=frozen, kw_only=True)
        build = made.__init__

        @functools.wraps(build)
        def __init__(self: Any, **values: Any) -> None:
            fields = config_fields(made)
            values = {k: as_declared(v, fields[k].annotation) if k in fields else v for k, v in values.items()}
            try:
                build(self, **values)
            except ValidationError as e:
                raise ConfigError("\n".join(explain(made, e, values))) from None
            if hasattr(self, "validate"):
                self.validate()

        made.__init__ = __init__  # type: ignore[method-assign]
        return made  # type: ignore[return-value]

    return make(cls) if cls is not None else make


def require(condition: bool, name: str, value: Any, expected: str) -> None:
    """For `validate()`: a check that relates fields. `name` is the field as this class calls it (a
    section's errors get the section's dotted prefix where the config is loaded)."""
    if not condition:
        raise ConfigError(f"{name} = {value!r}: {expected}")


def config_fields(cls: type) -> dict[str, FieldInfo]:
    """The fields of a config class, in order: annotation, default, `description`, range (`metadata`)."""
    return cls.__pydantic_fields__  # type: ignore[attr-defined]


def renamed(cls: type) -> dict[str, str]:
    """{older name: today's name} over the class and the sections it builds on."""
    return {old: new for c in reversed(cls.__mro__) for old, new in vars(c).get("renamed", {}).items()}


def default_of(info: FieldInfo) -> Any:
    """A field's default (a fresh one from its factory); dataclasses.MISSING for a required field."""
    return dataclasses.MISSING if info.is_required() else info.get_default(call_default_factory=True)


def restate(section: type, name: str, default: Any = ...) -> Any:
    """Field `name` of `section` with this class's own default (`...`: required); its help and range
    stay the section's, so that they are written once."""
    info = config_fields(section)[name]
    limits = bounds(info)
    return Field(
        default=default,
        description=info.description,
        ge=limits.get("ge"),
        gt=limits.get("gt"),
        le=limits.get("le"),
        lt=limits.get("lt"),
    )


def bounds(info: FieldInfo) -> dict[str, float]:
    """{"ge": 0, "lt": 1}: the range of a field."""
    return {key: getattr(m, key) for m in info.metadata for key in _BOUNDS if hasattr(m, key)}


def as_declared(value: Any, tp: Any) -> Any:
    """A YAML or JSON number as the field declares it: 2 for a float is 2.0, 1e3 for an int is 1000 (as
    JSON Schema's integer). Booleans and everything else are left to the check."""
    kinds = set(typing.get_args(tp)) if _is_union(tp) else {tp}
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value
    if float in kinds and isinstance(value, int):
        return float(value)
    if int in kinds and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def explain(cls: type, error: ValidationError, values: dict[str, Any]) -> list[str]:
    """`field = value: what is expected`, a line for each field pydantic refused."""
    fields, lines = config_fields(cls), dict[str, str]()
    for e in error.errors(include_url=False):
        name = str(e["loc"][0]) if e["loc"] else "?"
        if name in lines:
            continue  # one line per field (a list reports each bad item)
        info = fields.get(name)
        if info is None:
            close = difflib.get_close_matches(name, fields, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            lines[name] = f"unknown field {name} ({hint}known: {', '.join(fields)})"
        elif e["type"] in ("missing", "missing_keyword_only_argument"):
            lines[name] = f"{name} is required: {info.description}"
        else:
            value = values.get(name, e.get("input"))
            lines[name] = f"{name} = {value!r}: {expected(info, e['type'])}"
    return list(lines.values())


def expected(info: FieldInfo, error_type: str) -> str:
    """`must be positive, or null`, `expected int or null`: what a field takes, as a user reads it."""
    if error_type in _RANGE_ERRORS:
        null = ", or null" if _admits_none(info.annotation) else ""
        return f"must be {range_text(bounds(info))}{null}"
    return f"expected {describe(info.annotation)}"


def range_text(limits: dict[str, float]) -> str:
    """`positive`, `0 or more`, `at least 1`, `in [0, 1)`: a range as a user reads it."""
    low = ("[", limits["ge"]) if "ge" in limits else ("(", limits["gt"]) if "gt" in limits else None
    high = ("]", limits["le"]) if "le" in limits else (")", limits["lt"]) if "lt" in limits else None
    if low and high:
        return f"in {low[0]}{low[1]:g}, {high[1]:g}{high[0]}"
    if low == ("(", 0):
        return "positive"
    if low == ("[", 0):
        return "0 or more"
    if low:
        return f"at least {low[1]:g}" if low[0] == "[" else f"above {low[1]:g}"
    assert high is not None
    return f"at most {high[1]:g}" if high[0] == "]" else f"below {high[1]:g}"


def describe(tp: Any) -> str:
    """`int`, `float or null`, `list of float`, `one of max, avg`: a type as a user reads it."""
    if tp is type(None):
        return "null"
    if tp is Any:
        return "any value"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return "one of " + ", ".join(map(str, args))
    if _is_union(tp):
        return " or ".join(describe(a) for a in args)
    if origin is list:
        return f"list of {describe(args[0])}"
    if origin is dict:
        return f"mapping of {describe(args[1])}"
    if dataclasses.is_dataclass(tp):
        return "section"
    return getattr(tp, "__name__", str(tp))


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _admits_none(tp: Any) -> bool:
    return _is_union(tp) and type(None) in typing.get_args(tp)
