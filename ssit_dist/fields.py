"""Self-checking config dataclasses: every field has a type, a one-line help and (where it matters) a
range, and a config checks all of them when it is built, in one place (`Checked.__post_init__`).

`option(default, help, ge=..., gt=..., le=..., lt=...)` declares a field with its range; a class's
`validate()` adds the checks that relate fields.
Types come from the annotations: `int` refuses booleans and fractions (an integral float such as
`1e3` becomes 1000), `float` takes ints, `X | None` takes None, `list[X]` and `dict[str, X]` check
their items, `Literal["a", "b"]` takes one of its values. Errors are ConfigError naming the field and the value.
"""

from __future__ import annotations

import dataclasses
import operator
import types
import typing
from typing import Any


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the field and says what is expected."""


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    factory: Any = dataclasses.MISSING,  # noqa: A002
    alias: str | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
) -> Any:
    """A config field with its one-line help (shown by `ssit-dist config`) and its range (a None value
    is not checked against it). `alias`: an older name still read, with a deprecation warning."""
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    metadata = {"help": help, "alias": alias, "bounds": bounds}
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


class Checked:
    """Base of the config dataclasses: types are checked, then `validate()` runs."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = _coerce(getattr(self, f.name), hints[f.name], f.name)
            object.__setattr__(self, f.name, value)  # frozen configs too: this is their construction
            bounds = f.metadata.get("bounds")
            if bounds and value is not None and not _within(value, bounds):
                null = ", or null" if _admits_none(hints[f.name]) else ""
                raise ConfigError(f"{f.name} = {value!r}: must be {range_text(bounds)}{null}")
        self.validate()

    def validate(self) -> None:
        """Ranges and relations between fields; raise ConfigError naming the field."""


def require(condition: bool, name: str, value: Any, expected: str) -> None:
    """For `validate()`: a check that relates fields. `name` is the field as this class calls it (a
    section's errors get the section's dotted prefix where the config is loaded)."""
    if not condition:
        raise ConfigError(f"{name} = {value!r}: {expected}")


def range_text(bounds: dict[str, float]) -> str:
    """`positive`, `0 or more`, `at least 1`, `in [0, 1)`: a range as a user reads it."""
    low = ("[", bounds["ge"]) if "ge" in bounds else ("(", bounds["gt"]) if "gt" in bounds else None
    high = ("]", bounds["le"]) if "le" in bounds else (")", bounds["lt"]) if "lt" in bounds else None
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


_COMPARE = {"ge": operator.ge, "gt": operator.gt, "le": operator.le, "lt": operator.lt}


def _within(value: float, bounds: dict[str, float]) -> bool:
    return all(_COMPARE[name](value, limit) for name, limit in bounds.items())


def _admits_none(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


def describe(tp: Any) -> str:
    """`int`, `float or null`, `list of float`, ...: a type as a user reads it."""
    if tp is type(None):
        return "null"
    if tp is Any:
        return "any value"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return "one of " + ", ".join(map(str, args))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in args)
    if origin is list:
        return f"list of {describe(args[0])}"
    if origin is dict:
        return f"mapping of {describe(args[1])}"
    if dataclasses.is_dataclass(tp):
        return "section"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, name: str) -> Any:
    ok, result = _match(value, tp)
    if not ok:
        raise ConfigError(f"{name} = {value!r}: expected {describe(tp)}")
    return result


def _match(value: Any, tp: Any) -> tuple[bool, Any]:
    if tp is Any:
        return True, value
    if tp is type(None):
        return value is None, value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return value in args, value
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            ok, result = _match(value, arg)
            if ok:
                return True, result
        return False, value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            return False, value
        matched = [_match(v, args[0]) for v in value]
        return all(ok for ok, _ in matched), [v for _, v in matched]
    if origin is dict:
        if not isinstance(value, dict):
            return False, value
        entries = {k: _match(v, args[1]) for k, v in value.items()}
        ok = all(isinstance(k, str) for k in value) and all(good for good, _ in entries.values())
        return ok, {k: v for k, (_, v) in entries.items()}
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        if isinstance(value, float) and value.is_integer():
            return True, int(value)
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        return False, value
    if isinstance(tp, type):
        return isinstance(value, tp), value
    return True, value
