"""Turn a decoded stats body into a typed record, one field at a time.

The API documents every number as a String but the live service (and its own example) sends bare
JSON numbers, so both are read by one code path. Anything that is not clearly a number is absent
from the record and reported, never turned into 0: a stalled-offset alert must not fire, or stay
quiet, because of a value the exporter made up.
"""

from __future__ import annotations

import decimal
import math
import re
from dataclasses import dataclass
from typing import Any

# Plain decimal numbers only: "1,234" or "300 ops" are ambiguous or carry units, so they are refused.
# ASCII digits only: float() would also read "١٢٣" or full-width digits, which no API sends.
_NUMBER = re.compile(r"^\s*[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?\s*$", re.ASCII)
_PERCENT = re.compile(r"^\s*(?P<number>[+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*%\s*$", re.ASCII)
_TRUE_STRINGS = frozenset({"true", "1"})
_FALSE_STRINGS = frozenset({"false", "0"})
FLOAT_EXACT_LIMIT = 2**53  # integers above this cannot all be told apart as float64 samples


@dataclass(frozen=True)
class FieldProblem:
    """A field that was missing or could not be read."""

    field: str  # API field name, e.g. "offset"
    reason: str  # "missing" or "invalid"
    raw: str  # a short repr of what was sent, for the log

    def describe(self) -> str:
        """One line for the log."""
        if self.reason == "missing":
            return f"field {self.field} is missing"
        return f"field {self.field} has unreadable value {self.raw}"


@dataclass(frozen=True)
class StatsRecord:
    """One successful stats reading; None means the field was absent or unreadable."""

    progress_ratio: float | None = None
    offset: float | None = None
    source_keys: float | None = None
    target_keys: float | None = None
    target_input_bytes_per_second: float | None = None
    target_ops_per_second: float | None = None
    migrating: float | None = None
    problems: tuple[FieldProblem, ...] = ()
    imprecise_fields: tuple[str, ...] = ()  # integers above 2^53, exported with float rounding


class UnexpectedShape(ValueError):
    """The body is not a stats object at all (not a JSON object, or no known field readable)."""


def _short(value: Any) -> str:
    """A bounded repr for logs; bodies can be large (or nested deeper than repr can go)."""
    try:
        text = repr(value)
    except (RecursionError, ValueError):  # ValueError: an int too long to print
        return f"<{type(value).__name__}>"
    return text if len(text) <= 80 else text[:77] + "..."


def read_number(value: Any) -> float | None:
    """A finite number from a JSON number or a plain numeric string; None for anything else."""
    if isinstance(value, bool):  # bool is an int subclass; true is not 1 here
        return None
    if isinstance(value, int):
        try:
            return float(value)
        except OverflowError:  # a JSON integer with hundreds of digits
            return None
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str) and _NUMBER.match(value):
        number = float(value)
        return number if math.isfinite(number) else None
    return None


def read_percent(value: Any) -> float | None:
    """A percentage 0..100 as a ratio 0..1; a trailing ``%`` is allowed in the string form."""
    number = read_number(value)
    if number is None and isinstance(value, str):
        match = _PERCENT.match(value)
        number = float(match.group("number")) if match else None
    if number is None or not 0.0 <= number <= 100.0:
        return None
    return number / 100.0


def read_bool(value: Any) -> float | None:
    """1.0 or 0.0 from a JSON boolean, 0/1 (also 0.0/1.0), or "true"/"false"/"1"/"0" in any case."""
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, int | float):
        return float(value) if value in (0, 1) else None
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE_STRINGS:
            return 1.0
        if text in _FALSE_STRINGS:
            return 0.0
    return None


def _read_count(value: Any) -> float | None:
    """A non-negative number (key counts, rates)."""
    number = read_number(value)
    return number if number is not None and number >= 0 else None


def _is_imprecise(value: Any) -> bool:
    """True when a number is beyond 2^53, where float64 can no longer tell neighbours apart.

    Judged on the exact value sent (``"9007199254740993"`` is 2^53 + 1 although it reads as the
    float 2^53), and the same whether it came as a JSON number or as a string.
    """
    if isinstance(value, bool):
        return False
    if isinstance(value, int | float):
        return abs(value) > FLOAT_EXACT_LIMIT
    if isinstance(value, str):
        text = value.strip()
        if text.endswith("%"):
            text = text[:-1].strip()
        try:
            return abs(decimal.Decimal(text)) > FLOAT_EXACT_LIMIT
        except (decimal.InvalidOperation, ValueError):
            return False
    return False


# API field -> (record attribute, reader, scale)
_FIELDS = {
    "full_migration_progress": ("progress_ratio", read_percent, 1.0),
    "offset": ("offset", read_number, 1.0),
    "source_dbsize": ("source_keys", _read_count, 1.0),
    "target_dbsize": ("target_keys", _read_count, 1.0),
    "target_input_kbps": ("target_input_bytes_per_second", _read_count, 1024.0),
    "target_ops": ("target_ops_per_second", _read_count, 1.0),
    "is_migrating": ("migrating", read_bool, 1.0),
}
STATS_FIELDS = tuple(_FIELDS)


def parse_stats(body: Any) -> StatsRecord:
    """Read every known field of a decoded stats body; unknown fields are ignored.

    Raises UnexpectedShape when the body is not an object or not one field is readable, since
    then the poll told us nothing and the task must show as down rather than as empty.
    """
    if not isinstance(body, dict):
        raise UnexpectedShape(f"expected a JSON object, got {type(body).__name__}: {_short(body)}")
    values: dict[str, float] = {}
    problems: list[FieldProblem] = []
    imprecise: list[str] = []
    for name, (attribute, reader, scale) in _FIELDS.items():
        if name not in body or body[name] is None:
            reason = "missing" if name not in body else "invalid"
            problems.append(FieldProblem(name, reason, "null" if name in body else ""))
            continue
        value = reader(body[name])
        if value is not None:
            value *= scale
        if value is None or not math.isfinite(value):  # scaling can overflow a huge rate
            problems.append(FieldProblem(name, "invalid", _short(body[name])))
            continue
        if _is_imprecise(body[name]):
            imprecise.append(name)
        values[attribute] = value
    if not values:
        fields = (
            ", ".join(p.describe() for p in problems if p.reason == "invalid") or "none present"
        )
        raise UnexpectedShape(f"no stats field is readable ({fields})")
    return StatsRecord(**values, problems=tuple(problems), imprecise_fields=tuple(imprecise))
