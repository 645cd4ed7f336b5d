"""Tests for exporter.web: /metrics formats, health endpoints and POST /-/reload."""

from __future__ import annotations

import asyncio
import gzip
import time
from pathlib import Path

import pytest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families

from exporter.state import ExporterState, TaskState
from exporter.stats import StatsRecord
from exporter.web import create_app, health
from tests.support import TASK_A, Clients, basic_auth, basic_auth_web_config
from tests.test_poller import FakeClock


@pytest.fixture
def state() -> ExporterState:
    """A state with one task that polled fine."""
    state = ExporterState()
    state.tasks[TASK_A] = TaskState(
        task_id=TASK_A,
        record=StatsRecord(offset=5000.0, migrating=1.0),
        polled=True,
        up=True,
        polls_total=1,
        last_success_time=1_700_000_000.0,
    )
    state.changed()
    return state


async def test_metrics_is_prometheus_text(state: ExporterState, clients: Clients) -> None:
    """/metrics answers 200 in text format 0.0.4 with the task's samples and process metrics."""
    client = await clients(create_app(state))
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    text = await response.text()
    names = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    assert "dcs_migration_offset" in names and "process_cpu_seconds_total" in names


async def test_metrics_negotiates_openmetrics(state: ExporterState, clients: Clients) -> None:
    """An OpenMetrics Accept header gets a valid OpenMetrics body ending in a single # EOF."""
    client = await clients(create_app(state))
    response = await client.get(
        "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
    )
    assert response.headers["Content-Type"].startswith("application/openmetrics-text")
    text = await response.text()
    assert text.endswith("# EOF\n") and text.count("# EOF") == 1
    families = {f.name for f in parse_openmetrics(text)}
    assert "dcs_migration_up" in families


async def test_metrics_gzip_when_asked(state: ExporterState, clients: Clients) -> None:
    """gzip is used when the scraper accepts it, and decompresses to the plain body's families."""
    client = await clients(create_app(state))
    response = await client.get(
        "/metrics", headers={"Accept-Encoding": "gzip"}, auto_decompress=False
    )
    assert response.headers["Content-Encoding"] == "gzip"
    text = gzip.decompress(await response.read()).decode()
    assert f'dcs_migration_offset{{task_id="{TASK_A}"}} 5000.0' in text


@pytest.mark.parametrize(
    ("accept", "accept_encoding", "openmetrics", "gzipped"),
    [
        ("application/openmetrics-text;q=0, text/plain", "gzip;q=0", False, False),
        ("text/plain;q=0.5, application/openmetrics-text", "GZIP", True, True),
        ("*/*", "deflate, *;q=0.1", False, True),
        ("", "identity", False, False),
        ("application/openmetrics-text;q=0.5,text/plain;q=0.9", "", False, False),
        ("application/openmetrics-text;q=0.5,*/*;q=0.9", "", False, False),
        # What Prometheus sends: two OpenMetrics versions, text at a lower weight.
        (
            "application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
            "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
            "gzip",
            True,
            True,
        ),
    ],
)
async def test_metrics_negotiation_honours_q_values(
    state: ExporterState,
    clients: Clients,
    accept: str,
    accept_encoding: str,
    openmetrics: bool,
    gzipped: bool,
) -> None:
    """q=0 refuses a format or coding, the higher weight of OpenMetrics and text wins, names
    are case-insensitive, and the answer says it varies."""
    client = await clients(create_app(state))
    response = await client.get(
        "/metrics",
        headers={"Accept": accept, "Accept-Encoding": accept_encoding},
        auto_decompress=False,
    )
    assert response.headers["Content-Type"].startswith(
        "application/openmetrics-text" if openmetrics else "text/plain"
    )
    assert ("Content-Encoding" in response.headers) is gzipped
    assert response.headers["Vary"] == "Accept, Accept-Encoding"


async def test_metrics_follow_state_changes(state: ExporterState, clients: Clients) -> None:
    """A change in the state shows in /metrics within the renderer's one-second rebuild limit."""
    client = await clients(create_app(state))
    assert TASK_A in await (await client.get("/metrics")).text()
    del state.tasks[TASK_A]
    state.changed()
    deadline = time.monotonic() + 1.5
    while TASK_A in await (await client.get("/metrics")).text():
        assert time.monotonic() < deadline, "the removed task is still exported"
        await asyncio.sleep(0.05)


async def test_health_before_the_first_round(clients: Clients) -> None:
    """Before any round: not ready, but alive until max_cycle_age has passed since start."""
    clock = FakeClock()
    client = await clients(create_app(ExporterState(), max_cycle_age=30.0, monotonic=clock))
    assert (await client.get("/ready")).status == 503
    assert (await client.get("/healthz")).status == 200
    clock.advance(31.0)
    response = await client.get("/healthz")
    assert response.status == 503
    assert "no poll or polling round ended for 31s" in await response.text()


@pytest.mark.parametrize(
    ("round_end", "poll_end", "alive", "ready", "detail"),
    [
        (None, None, True, False, "no polling round finished yet (50s since start)"),
        (
            None,
            95.0,
            True,
            False,
            "no polling round finished yet (100s since start); the last poll",
        ),
        (0.0, 95.0, True, True, "last polling round finished 100s ago; the last poll ended 5s ago"),
        (90.0, 90.0, True, True, "last polling round finished 10s ago"),
        (0.0, 5.0, False, False, "no poll or polling round ended for 95s"),
        (None, None, False, False, "no poll or polling round ended for 100s"),
    ],
)
def test_health_counts_every_poll_as_a_heartbeat(
    round_end: float | None, poll_end: float | None, alive: bool, ready: bool, detail: str
) -> None:
    """A round that takes long because the API hangs (its polls keep ending in timeouts) keeps
    /healthz at 200, so Kubernetes does not restart the exporter during a cloud outage; with
    neither polls nor rounds ending for max_cycle_age, it is 503. Ready needs a finished round."""
    state = ExporterState(last_cycle_end_monotonic=round_end, last_poll_end_monotonic=poll_end)
    started = 50.0 if detail.endswith("(50s since start)") else 0.0
    result = health(state, 90.0, started, now=100.0)
    assert (result.alive, result.ready) == (alive, ready)
    assert result.detail.startswith(detail)


async def test_reload_endpoint(state: ExporterState, clients: Clients) -> None:
    """POST /-/reload is 404 without a config file, 200 on success, 400 with the problem otherwise."""
    assert (await (await clients(create_app(state))).post("/-/reload")).status == 404

    outcomes: list[str | None] = [None, "config.yaml:2:1: tab not allowed"]

    async def reload() -> str | None:
        return outcomes.pop(0)

    client = await clients(create_app(state, reload=reload))
    assert (await client.post("/-/reload")).status == 200
    response = await client.post("/-/reload")
    assert response.status == 400
    assert "tab not allowed" in await response.text()
    assert (await client.get("/-/reload")).status == 405  # a GET must not reload


async def test_basic_auth_guards_metrics_not_probes(
    state: ExporterState,
    clients: Clients,
    tmp_path: Path,
) -> None:
    """With --web.config.file basic auth, /metrics and /-/reload need credentials, probes do not."""
    web_config = basic_auth_web_config(tmp_path, "prom", "s3cret")
    client = await clients(create_app(state, web_config=web_config))
    assert (await client.get("/metrics")).status == 401
    assert (await client.post("/-/reload")).status == 401
    assert (await client.get("/healthz")).status in (200, 503)
    assert (await client.get("/metrics", headers=basic_auth("prom", "s3cret"))).status == 200
    assert (await client.get("/metrics", headers=basic_auth("prom", "wrong"))).status == 401
