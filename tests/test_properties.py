"""Property: whatever JSON the stats API sends, through the real client, poller and collector,
nothing escapes, /metrics renders and parses in both formats, and no value appears that the body
did not contain."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families

from exporter.config import TaskConfig
from exporter.poller import Poller
from exporter.simulator import Simulator, start
from exporter.state import ExporterState
from exporter.stats import STATS_FIELDS
from exporter.web import MetricsRenderer
from tests.support import BASELINE_BODY, PROJ, TASK_A, make_client, make_config

# metric -> (API field, scale)
SOURCE = {
    "dcs_migration_progress_ratio": ("full_migration_progress", 0.01),
    "dcs_migration_offset": ("offset", 1.0),
    "dcs_migration_source_keys": ("source_dbsize", 1.0),
    "dcs_migration_target_keys": ("target_dbsize", 1.0),
    "dcs_migration_target_input_bytes_per_second": ("target_input_kbps", 1024.0),
    "dcs_migration_target_ops_per_second": ("target_ops", 1.0),
    "dcs_migration_migrating": ("is_migrating", 1.0),
}
TRUE_TEXT, FALSE_TEXT = {"true", "1"}, {"false", "0"}


@dataclass
class Harness:
    """A simulator, client and poller on a private event loop, shared by all examples."""

    loop: asyncio.AbstractEventLoop
    sim: Simulator
    poller: Poller
    state: ExporterState


@pytest.fixture(scope="module")
def harness() -> Iterator[Harness]:
    """Start the simulator and a poller for TASK_A once for the whole module."""
    loop = asyncio.new_event_loop()
    sim = Simulator(project_id=PROJ)
    sim.add_task(TASK_A, "task-a", body=dict(BASELINE_BODY))
    runner, url = loop.run_until_complete(start(sim))

    async def open_session() -> aiohttp.ClientSession:
        return aiohttp.ClientSession()

    session = loop.run_until_complete(open_session())
    config = make_config(url, (TASK_A,), max_requests_per_second=1e6, details_interval=1e9)
    state = ExporterState()
    poller = Poller(state, make_client(session, config), config.polling, config.tasks)
    try:
        yield Harness(loop, sim, poller, state)
    finally:
        loop.run_until_complete(session.close())
        loop.run_until_complete(runner.cleanup())
        loop.close()


# ---- strategies ------------------------------------------------------------------------------

numeric_text = st.one_of(
    st.integers().map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.sampled_from(
        ["45", " 99.5 % ", "100%", "1,234,567", "1,5", "300 ops", "1e3", "-0", ".5", "5.", "", " "]
    ),
    st.from_regex(r"\A[ +\-]?[0-9]{0,25}[.,]?[0-9]{0,5}([eE][+-]?[0-9]{1,3})?\s*%?\s*\Z"),
    st.sampled_from(["true", "False", "TRUE", "yes", "paused", "null", "NaN", "Infinity", "1"]),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=2**53 - 2, max_value=2**53 + 2),
    st.integers(min_value=10**300, max_value=10**400),  # beyond float64
    st.floats(allow_nan=True, allow_infinity=True),
    numeric_text,
    st.text(max_size=20),
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
# Known fields get readable-looking values most of the time, so that the oracle is exercised.
field_values = st.one_of(numeric_text, scalars, json_values)
stats_objects = st.fixed_dictionaries(
    {}, optional={name: field_values for name in STATS_FIELDS}
).flatmap(
    lambda known: st.dictionaries(st.text(max_size=12), json_values, max_size=2).map(
        lambda extra: {**extra, **known}
    )
)
bodies = st.one_of(stats_objects, json_values)


# ---- oracle ------------------------------------------------------------------------------------


def numbers_in(raw: Any) -> list[float]:
    """Every number the raw value can honestly be read as (empty when it holds none)."""
    if isinstance(raw, bool):
        return []
    if isinstance(raw, int | float):
        try:
            return [float(raw)]
        except OverflowError:
            return []
    if isinstance(raw, str):
        text = raw.strip()
        candidates = [text, text.removesuffix("%").strip()]
        found = []
        for candidate in candidates:
            with contextlib.suppress(ValueError):
                found.append(float(candidate))
        return found
    return []


def allowed(metric: str, body: Any, value: float) -> bool:
    """Whether ``value`` is something the body really said for this metric."""
    field, scale = SOURCE[metric]
    if not isinstance(body, dict) or field not in body:
        return False
    raw = body[field]
    if not math.isfinite(value):
        return False
    if metric == "dcs_migration_migrating":
        if isinstance(raw, bool):
            return value == float(raw)
        if isinstance(raw, int | float):
            return raw in (0, 1) and value == raw
        if isinstance(raw, str):
            word = raw.strip().lower()
            return (word in TRUE_TEXT and value == 1.0) or (word in FALSE_TEXT and value == 0.0)
        return False
    return any(math.isclose(value, n * scale, rel_tol=1e-12) for n in numbers_in(raw))


def strings_in(value: Any) -> Iterator[str]:
    """Every string value (not key) inside a JSON value."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from strings_in(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from strings_in(item)


# ---- the property ------------------------------------------------------------------------------


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(body=bodies)
@example(body={"full_migration_progress": "1,5", "offset": "1,234,567", "target_ops": "300 ops"})
@example(body={"full_migration_progress": " 99.5 % ", "is_migrating": "false", "offset": "5000"})
@example(body={"offset": math.nan, "full_migration_progress": "45", "target_dbsize": math.inf})
@example(body={"full_migration_progress": "101", "source_dbsize": -1, "is_migrating": "paused"})
@example(body={"offset": 2**53 + 1, "target_input_kbps": "12.5", "is_migrating": 1})
@example(body=[])
@example(body="ok")
@example(body=None)
@example(body={})
def test_any_json_body_is_exported_faithfully_or_not_at_all(harness: Harness, body: Any) -> None:
    """After a baseline poll, any JSON stats body: the poll classifies it without an internal
    error, /metrics renders and parses in both formats, every exported value comes from this body
    if the poll succeeded (from the baseline, kept and marked up 0, if it failed), and no body text
    becomes a label value."""
    harness.poller.set_tasks([])  # every example starts from a fresh task
    harness.poller.set_tasks([TaskConfig(id=TASK_A)])
    task = harness.state.tasks[TASK_A]
    harness.sim.set_body(TASK_A, dict(BASELINE_BODY))
    harness.loop.run_until_complete(harness.poller.poll_task(task))
    assert task.up
    harness.sim.set_body(TASK_A, json.dumps(body).encode())
    harness.loop.run_until_complete(harness.poller.poll_task(task))
    assert task.poll_errors["internal"] == 0, task.last_error

    renderer = MetricsRenderer(harness.state)  # fresh: the shared one may serve a 1 s old build
    text = renderer.render(openmetrics=False).decode()
    families = list(text_string_to_metric_families(text))
    list(parse_openmetrics(renderer.render(openmetrics=True).decode()))

    samples = {
        sample.name: sample.value
        for family in families
        for sample in family.samples
        if sample.labels == {"task_id": TASK_A}
    }
    assert samples["dcs_migration_up"] == (1.0 if task.up else 0.0)
    source = body if task.up else BASELINE_BODY
    exported = {name: value for name, value in samples.items() if name in SOURCE}
    for metric, value in exported.items():
        assert allowed(metric, source, value), (metric, value, source)
    if not isinstance(body, dict):
        assert not task.up

    label_values = {
        value
        for family in families
        for sample in family.samples
        for value in sample.labels.values()
    }
    for text_value in strings_in(body):
        if len(text_value) >= 3 and text_value not in {TASK_A, *STATS_FIELDS}:
            assert text_value not in label_values, text_value
