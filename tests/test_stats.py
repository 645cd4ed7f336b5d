"""Stats parsing: each field read on its own, nothing invented, nothing but UnexpectedShape raised."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exporter.stats import (
    FLOAT_EXACT_LIMIT,
    STATS_FIELDS,
    StatsRecord,
    UnexpectedShape,
    parse_stats,
    read_bool,
    read_number,
    read_percent,
)
from tests.support import BASELINE_BODY, BASELINE_NUMBERS_BODY, BASELINE_SAMPLES

# API field -> (record attribute, factor from the API's value to the record's)
ATTRIBUTES = {
    "full_migration_progress": ("progress_ratio", 0.01),
    "offset": ("offset", 1.0),
    "source_dbsize": ("source_keys", 1.0),
    "target_dbsize": ("target_keys", 1.0),
    "target_input_kbps": ("target_input_bytes_per_second", 1024.0),
    "target_ops": ("target_ops_per_second", 1.0),
    "is_migrating": ("migrating", 1.0),
}


def values(record: StatsRecord) -> dict[str, float | None]:
    """The record's seven values by API field name."""
    return {field: getattr(record, attribute) for field, (attribute, _) in ATTRIBUTES.items()}


def problem_fields(record: StatsRecord) -> dict[str, str]:
    """Field name -> reason of every reported problem."""
    return {problem.field: problem.reason for problem in record.problems}


def test_baseline_body() -> None:
    """The documented string form gives the baseline values, with progress as a ratio."""
    record = parse_stats(dict(BASELINE_BODY))
    assert values(record) == BASELINE_SAMPLES
    assert record.problems == ()
    assert record.imprecise_fields == ()


def test_numbers_and_strings_give_the_same_record() -> None:
    """Bare JSON numbers and the documented strings are read by one path to equal records."""
    assert parse_stats(dict(BASELINE_NUMBERS_BODY)) == parse_stats(dict(BASELINE_BODY))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("12", 12.0),
        (" 12 ", 12.0),
        ("+12", 12.0),
        ("-3", -3.0),
        ("0.5", 0.5),
        (".5", 0.5),
        ("5.", 5.0),
        ("1e3", 1000.0),
        ("1,234", None),
        ("1,5", None),
        ("300 ops", None),
        ("", None),
        ("N/A", None),
        ("0x10", None),
        ("1_000", None),
        ("NaN", None),
        ("Infinity", None),
        ("-inf", None),
        ("1e400", None),
        ("١٢٣", None),  # Arabic-Indic digits, which float() would read as 123
        ("１２", None),  # full-width digits
    ],
)
def test_read_number_strings(text: str, expected: float | None) -> None:
    """Only plain ASCII decimal numbers are numbers; units, separators and NaN/Inf are not."""
    assert read_number(text) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (7, 7.0),
        (2.5, 2.5),
        (True, None),
        (False, None),
        (None, None),
        (float("nan"), None),
        (float("inf"), None),
        (10**400, None),
        ([1], None),
        ({"v": 1}, None),
    ],
)
def test_read_number_values(value: Any, expected: float | None) -> None:
    """Booleans, non-finite floats, overflowing integers and containers are not numbers."""
    assert read_number(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("45", 0.45),
        (45, 0.45),
        ("100%", 1.0),
        (" 99.5 % ", 0.995),
        ("0", 0.0),
        ("100", 1.0),
        ("100.5", None),
        ("101%", None),
        (-1, None),
        ("%", None),
        ("45%%", None),
        ("4 5%", None),
    ],
)
def test_read_percent(value: Any, expected: float | None) -> None:
    """Progress is percent 0..100 with an optional trailing %, given as a 0..1 ratio."""
    assert read_percent(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (True, 1.0),
        (False, 0.0),
        ("true", 1.0),
        ("false", 0.0),
        ("False", 0.0),
        (" TRUE ", 1.0),
        (1, 1.0),
        (0, 0.0),
        (1.0, 1.0),
        (0.0, 0.0),
        ("1", 1.0),
        ("0", 0.0),
        (None, None),
        ("yes", None),
        ("paused", None),
        (2, None),
        (0.5, None),
        ("", None),
        ([], None),
    ],
)
def test_read_bool(value: Any, expected: float | None) -> None:
    """Booleans in JSON, number and string form; the string "false" is never 1."""
    assert read_bool(value) == expected


def test_counts_must_not_be_negative() -> None:
    """Key counts and rates below zero are refused; the offset may be negative."""
    body = {**BASELINE_BODY, "source_dbsize": "-1", "target_ops": -5, "offset": "-7"}
    record = parse_stats(body)
    assert (record.source_keys, record.target_ops_per_second, record.offset) == (None, None, -7.0)
    assert problem_fields(record) == {"source_dbsize": "invalid", "target_ops": "invalid"}


def test_nan_and_infinity_are_invalid() -> None:
    """NaN and Infinity (which json.loads accepts) are reported, never exported."""
    body = {**BASELINE_BODY, "offset": float("nan"), "target_dbsize": float("-inf")}
    record = parse_stats(body)
    assert (record.offset, record.target_keys) == (None, None)
    assert problem_fields(record) == {"offset": "invalid", "target_dbsize": "invalid"}


def test_rate_that_overflows_when_scaled_is_invalid() -> None:
    """A KB/s value that is finite but becomes infinite as bytes/s is refused, not exported."""
    record = parse_stats({**BASELINE_BODY, "target_input_kbps": 1.7e308})
    assert record.target_input_bytes_per_second is None
    assert problem_fields(record) == {"target_input_kbps": "invalid"}


@pytest.mark.parametrize(
    ("value", "imprecise"),
    [
        (FLOAT_EXACT_LIMIT, False),
        (str(FLOAT_EXACT_LIMIT), False),
        (FLOAT_EXACT_LIMIT + 1, True),
        ("9007199254740993", True),
        ("9007199254740993.0", True),
        ("1e20", True),
        (1e20, True),
        ("123456", False),
    ],
)
def test_huge_integers_are_flagged_imprecise(value: Any, imprecise: bool) -> None:
    """Values beyond 2^53 are exported (as float64) but flagged, also in string form."""
    record = parse_stats({**BASELINE_BODY, "offset": value})
    assert record.offset == float(value)
    assert record.imprecise_fields == (("offset",) if imprecise else ())


def test_huge_integer_beyond_float_range_is_invalid() -> None:
    """An integer too large for a float is invalid, not an OverflowError."""
    record = parse_stats({**BASELINE_BODY, "source_dbsize": 10**400})
    assert record.source_keys is None
    assert problem_fields(record) == {"source_dbsize": "invalid"}


def test_extra_fields_are_ignored() -> None:
    """Unknown keys do not change the record or its problems."""
    body = {**BASELINE_BODY, "new_field": {"x": 1}, "error_ext_msg": None, "offset_v2": "x"}
    assert parse_stats(body) == parse_stats(dict(BASELINE_BODY))


def test_missing_and_null_fields_are_told_apart() -> None:
    """An absent field is 'missing', a null one 'invalid', and both leave the value None."""
    record = parse_stats({"full_migration_progress": "45", "offset": None})
    assert record.progress_ratio == 0.45
    assert record.offset is None
    reasons = problem_fields(record)
    assert reasons["offset"] == "invalid"
    assert {reasons[f] for f in STATS_FIELDS if f not in ("offset", "full_migration_progress")} == {
        "missing"
    }


def test_problem_describes_field_and_raw_value() -> None:
    """A problem's log line names the field and the value as sent, bounded in length."""
    record = parse_stats({**BASELINE_BODY, "source_dbsize": "1,234,567", "target_ops": "x" * 500})
    described = {p.field: p.describe() for p in record.problems}
    assert described["source_dbsize"] == "field source_dbsize has unreadable value '1,234,567'"
    assert len(described["target_ops"]) < 120


@pytest.mark.parametrize("body", [{}, [], "ok", None, 5, {"offset": None}, {"foo": 1}])
def test_no_readable_field_is_unexpected_shape(body: Any) -> None:
    """A body with no readable stats field raises UnexpectedShape, naming what it got."""
    with pytest.raises(UnexpectedShape):
        parse_stats(body)


def test_deeply_nested_value_is_reported_not_raised() -> None:
    """A field nested deeper than repr() can print is an invalid field, not a RecursionError."""
    nested: Any = []
    for _ in range(100_000):
        nested = [nested]
    record = parse_stats({**BASELINE_BODY, "target_ops": nested})
    assert record.target_ops_per_second is None
    assert problem_fields(record) == {"target_ops": "invalid"}


# ---- property: for any JSON, nothing invented, nothing else raised ---------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**400), max_value=10**400)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=8,
)
numeric_text = st.from_regex(
    r"\s?[+-]?[0-9٠-٩]{0,25}(\.[0-9]{0,5})?([eE][+-]?[0-9]{1,3})?\s?%?\s?(ops)?", fullmatch=True
) | st.sampled_from(["true", "False", "1", "0", "yes", "NaN", "inf", "1,5", "100%", " 99.5 % "])
field_values = json_values | numeric_text
stats_bodies = st.fixed_dictionaries(
    {}, optional=dict.fromkeys(STATS_FIELDS, field_values)
) | st.dictionaries(st.sampled_from([*STATS_FIELDS, "extra"]), field_values, max_size=8)


def oracle(field: str, raw: Any) -> float | None:
    """What a field may honestly become: the value the body states, or nothing. Written apart
    from stats.py: plain float() of the text (a trailing % allowed for progress), times the unit
    factor. It can accept more than parse_stats does; it must never disagree on a value."""
    if field == "is_migrating":
        if isinstance(raw, str):
            return {"true": 1.0, "1": 1.0, "false": 0.0, "0": 0.0}.get(raw.strip().lower())
        return float(raw) if raw in (0, 1) and raw is not None else None
    if isinstance(raw, bool) or not isinstance(raw, int | float | str):
        return None
    text = raw
    if isinstance(text, str):
        text = text.strip()
        if field == "full_migration_progress" and text.endswith("%"):
            text = text[:-1].strip()
    try:
        number = float(text)
    except (ValueError, OverflowError):
        return None
    if field == "full_migration_progress":
        return number / 100  # percent; dividing is exact where multiplying by 0.01 is not
    return number * ATTRIBUTES[field][1]


@settings(max_examples=600, deadline=None)
@given(body=json_values | stats_bodies)
def test_property_nothing_invented(body: Any) -> None:
    """For any JSON, parse_stats raises only UnexpectedShape, or returns finite values that are
    exactly what the body said (None otherwise, with a problem for that field)."""
    try:
        record = parse_stats(body)
    except UnexpectedShape:
        return
    assert isinstance(body, dict)
    reported = problem_fields(record)
    assert set(reported) <= set(STATS_FIELDS)
    for field, value in values(record).items():
        if value is None:
            assert field in reported
            continue
        assert field not in reported
        assert isinstance(value, float)
        assert math.isfinite(value)
        assert value == oracle(field, body[field]), (field, body[field], value)
    assert any(value is not None for value in values(record).values())
