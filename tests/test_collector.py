"""Tests for exporter.collector: fresh families from the state on every collection."""

from __future__ import annotations

from collections import Counter

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families

import exporter.collector
from exporter.client import TaskDetails
from exporter.collector import DcsCollector
from exporter.state import MAX_ERROR_CODES, ExporterState, TaskState
from exporter.stats import StatsRecord
from tests.support import DOC_TASK, TASK_A, TASK_B


def render(state: ExporterState, openmetrics: bool = False) -> str:
    """Collect through a registry, as prometheus_client does for a scrape."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DcsCollector(state))
    return (generate_openmetrics if openmetrics else generate_latest)(registry).decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Parse a text exposition into {(name, sorted labels): value}."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def polled_task(task_id: str, record: StatsRecord | None, *, up: bool = True) -> TaskState:
    """A task after one poll."""
    return TaskState(
        task_id=task_id,
        record=record,
        polled=True,
        up=up,
        last_success_time=1_700_000_000.0,
        last_poll_duration=0.25,
        polls_total=1,
    )


def test_docstring_sample_is_what_the_collector_renders() -> None:
    """The exposition sample in the module docstring is real output, line for line."""
    state = ExporterState()
    state.tasks[DOC_TASK] = polled_task(DOC_TASK, StatsRecord(offset=100.0))
    text = render(state)
    doc = exporter.collector.__doc__ or ""
    sample = [line.strip() for line in doc.split("::", 1)[1].strip().splitlines()]
    lines = text.splitlines()
    for line in sample:
        assert line in lines, line


def test_unreadable_fields_yield_no_sample_never_zero() -> None:
    """A None field produces no series at all; only the fields that were read are exported."""
    state = ExporterState()
    state.tasks[TASK_A] = polled_task(TASK_A, StatsRecord(target_keys=450.0, progress_ratio=0.45))
    got = samples(render(state))
    values = {
        name
        for (name, labels), _ in got.items()
        if dict(labels) == {"task_id": TASK_A} and name.startswith("dcs_migration_")
    }
    assert "dcs_migration_target_keys" in values and "dcs_migration_progress_ratio" in values
    for absent in (
        "dcs_migration_offset",
        "dcs_migration_source_keys",
        "dcs_migration_target_input_bytes_per_second",
        "dcs_migration_target_ops_per_second",
        "dcs_migration_migrating",
    ):
        assert absent not in values


def test_health_series_appear_only_after_a_poll() -> None:
    """An unpolled task has polls_total 0 but no up/last-success/duration series yet."""
    state = ExporterState()
    state.tasks[TASK_A] = TaskState(task_id=TASK_A)
    got = samples(render(state))
    task_series = {name for (name, labels), _ in got.items() if ("task_id", TASK_A) in labels}
    assert task_series == {"dcs_migration_polls_total"}


def test_gone_task_has_no_info_and_no_values() -> None:
    """A task the cloud says is gone keeps up 0 and counters, loses values and info."""
    state = ExporterState()
    details = TaskDetails(TASK_A, "orders", "SUCCESS", "online_migration", "full", "src", "dst")
    task = polled_task(TASK_A, None, up=False)
    task.details, task.gone = details, True
    state.tasks[TASK_A] = task
    got = samples(render(state))
    names = {name for (name, labels), _ in got.items() if ("task_id", TASK_A) in labels}
    assert "dcs_migration_task_info" not in names
    assert got[("dcs_migration_up", (("task_id", TASK_A),))] == 0


def test_task_info_carries_details_and_configured_name() -> None:
    """task_info is 1 with the configured name winning over the cloud's and the details' labels."""
    state = ExporterState()
    details = TaskDetails(
        TASK_A, "cloud-name", "INCRMIGEATING", "online_migration", "incremental", "src", "dst"
    )
    task = polled_task(TASK_A, StatsRecord(offset=1.0))
    task.details, task.configured_name = details, "orders-cache"
    state.tasks[TASK_A] = task
    got = samples(render(state))
    info = [
        (dict(labels), value)
        for (name, labels), value in got.items()
        if name == "dcs_migration_task_info"
    ]
    assert info == [
        (
            {
                "task_id": TASK_A,
                "task_name": "orders-cache",
                "status": "INCRMIGEATING",
                "migration_method": "incremental",
                "source_instance_name": "src",
                "target_instance_name": "dst",
            },
            1.0,
        )
    ]


def test_awkward_label_values_survive_both_formats() -> None:
    """Quotes, backslashes, newlines and non-ASCII in a name round-trip through both parsers."""
    state = ExporterState()
    name = 'orders "main"\\cache\nzweite Zeile – ü'
    task = polled_task(TASK_A, StatsRecord(offset=7.0))
    task.configured_name = name
    state.tasks[TASK_A] = task
    for openmetrics, parse in ((False, text_string_to_metric_families), (True, parse_openmetrics)):
        families = {f.name: f for f in parse(render(state, openmetrics))}
        info = families["dcs_migration_task_info"].samples
        assert [s.labels["task_name"] for s in info] == [name]


def test_counters_end_in_total_and_no_name_is_both() -> None:
    """Every counter is exposed as X_total and no family exists as both X and X_total (C25)."""
    state = ExporterState()
    task = polled_task(TASK_A, StatsRecord(offset=1.0), up=False)
    task.poll_errors = Counter({"timeout": 2})
    task.api_errors = Counter({("timeout", "none"): 2})
    task.parse_errors = Counter({"offset": 1})
    state.tasks[TASK_A] = task
    text = render(state)
    types = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for sample in family.samples:
            if family.type == "counter":
                assert sample.name.endswith("_total"), sample.name
    sample_names = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    for name in sample_names:
        assert not (name.endswith("_total") and name.removesuffix("_total") in sample_names)
    assert types["dcs_migration_api_errors"] == "counter"


def test_collecting_twice_gives_the_same_output() -> None:
    """Families are built per collection: repeated scrapes neither fail nor duplicate series."""
    state = ExporterState()
    state.tasks[TASK_A] = polled_task(TASK_A, StatsRecord(offset=1.0))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DcsCollector(state))
    first, second, third = (generate_latest(registry) for _ in range(3))
    assert first == second == third
    assert first.count(b'dcs_migration_offset{task_id="') == 1


def test_removed_task_is_not_yielded() -> None:
    """Dropping a task from the state removes every one of its series at the next collection."""
    state = ExporterState()
    state.tasks[TASK_A] = polled_task(TASK_A, StatsRecord(offset=1.0))
    state.tasks[TASK_B] = polled_task(TASK_B, StatsRecord(offset=2.0))
    assert TASK_B in render(state)
    del state.tasks[TASK_B]
    assert TASK_B not in render(state)


def test_error_code_label_is_capped() -> None:
    """The first MAX_ERROR_CODES distinct codes keep their name, later ones become "other"."""
    state = ExporterState()
    codes = [f"DCS.{n:04d}" for n in range(MAX_ERROR_CODES + 5)]
    labels = [state.code_label(code) for code in codes]
    assert labels[:MAX_ERROR_CODES] == codes[:MAX_ERROR_CODES]
    assert set(labels[MAX_ERROR_CODES:]) == {"other"}
    assert state.code_label(codes[0]) == codes[0]  # known codes stay known
    assert state.code_label(None) == state.code_label("") == "none"


def test_clock_skew_only_once_measured() -> None:
    """The skew gauge is absent until a rejected signature measured it, then one per target."""
    state = ExporterState()
    assert "dcs_migration_clock_skew_seconds" not in render(state)
    state.clock_skew_seconds["de"] = 1200.0
    state.clock_skew_seconds["nl"] = -3.0
    got = samples(render(state))
    assert got[("dcs_migration_clock_skew_seconds", (("target", "de"),))] == 1200.0
    assert got[("dcs_migration_clock_skew_seconds", (("target", "nl"),))] == -3.0


def test_exporter_families_are_always_present() -> None:
    """With no tasks at all, the self-metrics still render and parse."""
    got = samples(render(ExporterState()))
    for name in (
        "dcs_migration_poll_cycles_total",
        "dcs_migration_token_refreshes_total",
        "dcs_migration_config_last_reload_successful",
        "dcs_migration_config_reload_failures_total",
    ):
        assert (name, ()) in got
    assert any(name == "dcs_migration_exporter_build_info" for name, _ in got)
