"""The one generic check of a config: every value against its field's annotation, then
against the range declared next to the field (``dataclasses.field(metadata=...)``).

Annotations understood: ``Literal[...]`` (choices), ``bool``, ``int``, ``float``,
``str``, ``tuple[...]``, ``list[...]``, ``dict[...]``, unions and nested dataclasses.
Conversions are only lossless ones (an int where a float is expected; a YAML 1.1
string such as ``1e-4`` read as the float it spells). Every refusal is a ``ValueError``
of one line that names the field.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Union

from sr_core.errors import shown


@dataclass(frozen=True)
class Range:
    """Bounds of a number (or of each number in a tuple, list or mapping's values)."""

    low: float | None = None
    """Smallest value allowed (None: no lower bound)."""

    high: float | None = None
    """Largest value allowed (None: no upper bound)."""

    low_open: bool = False
    """The value must be strictly above ``low``."""

    high_open: bool = False
    """The value must be strictly below ``high``."""

    text: str = ""
    """How the error line words the range, when the plain wording is not enough (e.g.
    ``"0, 1 or 2 (ZeRO-3 shards parameters...)"``)."""

    def holds(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self) -> str:
        if self.text:
            return self.text
        low, high = self.low, self.high
        if low is not None and high is not None:
            if self.low_open and not self.high_open:
                return f"above {low:g} and at most {high:g}"
            if not self.low_open and self.high_open:
                return f"in [{low:g}, {high:g})"
            return f"from {low:,} to {high:,}"
        if low is not None:
            return f"above {low:g}" if self.low_open else f">= {low:g}"
        return f"below {high:g}" if self.high_open else f"at most {high:g}"


def ranged(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING, low=None, high=None,
           low_open: bool = False, high_open: bool = False, text: str = "") -> Any:
    """A dataclass field whose value (or each number it holds) must lie in a range."""
    return field(default=default, default_factory=default_factory,
                 metadata={"range": Range(low, high, low_open, high_open, text)})


_EXPONENT_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _check_number(value: Any, hint: type, name: str) -> Any:
    if hint is float:
        # PyYAML follows YAML 1.1, which reads 1e-4 (no dot) as a string.
        if isinstance(value, str) and _EXPONENT_NUMBER.fullmatch(value.strip()):
            value = float(value)  # 1e999 overflows to inf: checked below
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name}: expected a number, got {shown(value)}")
        # JSON's Infinity/NaN and YAML's .inf/.nan: a NaN learning rate trains "fine" to a
        # NaN model, so no config number may be non-finite.
        if not math.isfinite(value):
            raise ValueError(f"{name}: {value} is not a finite number; give a finite value")
        return float(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}: expected an integer, got {shown(value)}")
    return value


def _check_sequence(value: Any, hint: Any, name: str) -> Any:
    args = typing.get_args(hint)
    if typing.get_origin(hint) is list:
        if not isinstance(value, list):
            raise ValueError(f"{name}: expected a list, got {shown(value)}")
        return [check_value(v, args[0], f"{name}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{name}: expected a list of {len(args)} values, got {shown(value)}")
    if len(args) == 2 and args[1] is Ellipsis:
        args = (args[0],) * len(value)
    if len(value) != len(args):
        raise ValueError(f"{name}: expected {len(args)} values, got {len(value)} ({shown(value)})")
    return tuple(check_value(v, t, f"{name}[{i}]") for i, (v, t) in enumerate(zip(value, args)))


def check_value(value: Any, hint: Any, name: str) -> Any:
    """``value`` converted to ``hint`` when that is lossless (int -> float), else a
    ``ValueError`` naming the field ``name``."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        # Exact types: True == 1 and 1.0 == 1 must not pass as the choice 1.
        if not any(type(value) is type(c) and value == c for c in choices):
            raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}, got {shown(value)}")
        return value
    if origin in (Union, types.UnionType):
        if isinstance(value, float) and not math.isfinite(value):
            return check_value(value, float, name)  # its own message, not "matches none of"
        for option in typing.get_args(hint):
            try:
                return check_value(value, option, name)
            except ValueError:
                pass
        raise ValueError(f"{name}: {shown(value)} matches none of {hint}")
    if hint is type(None):
        if value is None:
            return None
        raise ValueError(f"{name}: expected null, got {shown(value)}")
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ValueError(f"{name}: expected a mapping of {hint.__name__} fields, got {shown(value)}")
        return build(hint, value, name + ".")
    if origin is dict:
        key_type, value_type = typing.get_args(hint)
        if not isinstance(value, dict):
            raise ValueError(f"{name}: expected a mapping, got {shown(value)}")
        return {check_value(k, key_type, f"{name} key"): check_value(v, value_type, f"{name}.{k}")
                for k, v in value.items()}
    if origin in (tuple, list):
        return _check_sequence(value, hint, name)
    if hint in (float, int):
        return _check_number(value, hint, name)
    if hint in (str, bool):
        if not isinstance(value, hint):
            raise ValueError(f"{name}: expected {hint.__name__}, got {shown(value)}")
        return value
    raise AssertionError(f"config field {name} has an unsupported type {hint}")


_MAX_NAMES_LISTED = 10


def build(cls: type, values: dict[str, Any], prefix: str = ""):
    """Dataclass ``cls`` from a mapping of its fields, each checked by :func:`check_value`;
    an unknown key is refused, listing the fields ``cls`` has."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known, key=str)
    if unknown:
        # A file of 300k stray keys must not make a megabyte-long error line.
        listed = ", ".join(prefix + str(k)[:80] for k in unknown[:_MAX_NAMES_LISTED])
        more = f" and {len(unknown) - _MAX_NAMES_LISTED} more" if len(unknown) > _MAX_NAMES_LISTED else ""
        raise ValueError(f"unknown config key(s) {listed}{more}; {cls.__name__} has: {', '.join(sorted(known))}")
    kwargs = {k: check_value(v, hints[k], prefix + k) for k, v in values.items()}
    return cls(**kwargs)


def _numbers(value: Any, name: str):
    """(name, number) for ``value`` itself or each number inside a tuple, list or mapping."""
    if isinstance(value, (list, tuple)):
        return [(f"{name}[{i}]", v) for i, v in enumerate(value)]
    if isinstance(value, dict):
        return [(f"{name}.{k}", v) for k, v in value.items()]
    return [(name, value)]


def check_ranges(obj: Any, prefix: str = "") -> None:
    """Every field of dataclass ``obj`` (nested sections included) within the range its
    metadata declares."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            check_ranges(value, f"{prefix}{f.name}.")
            continue
        bounds = f.metadata.get("range")
        if bounds is None:
            continue
        for name, number in _numbers(value, prefix + f.name):
            if not bounds.holds(number):
                raise ValueError(f"{name} must be {bounds.describe()}, got {shown(number)}")
