"""Tests for exporter.poller: scheduling, backoff, series lifecycle, with the real client and simulator.

Time is compressed with a fake monotonic clock that the test advances one interval per round;
the HTTP exchanges with the simulator are real.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from exporter.config import TaskConfig
from exporter.exposition import VALUE_FAMILIES
from exporter.poller import MAX_BACKOFF_SECONDS, Poller
from exporter.simulator import CannedResponse
from exporter.state import ExporterState
from exporter.web import MetricsRenderer
from tests.support import BASELINE_BODY, TASK_A, TASK_B, TASK_C, SimServer, make_client, make_config

Labels = tuple[tuple[str, str], ...]
BASELINE_VALUES = {
    "dcs_migration_progress_ratio": 0.45,
    "dcs_migration_offset": 5000.0,
    "dcs_migration_source_keys": 1000.0,
    "dcs_migration_target_keys": 450.0,
    "dcs_migration_target_input_bytes_per_second": 12.5 * 1024,
    "dcs_migration_target_ops_per_second": 300.0,
    "dcs_migration_migrating": 1.0,
}


class FakeClock:
    """A monotonic clock that only moves when told, plus a wall clock at a fixed offset from it."""

    def __init__(self, start: float = 1000.0, tick: float = 0.0) -> None:
        self.now = start
        self.tick = tick  # added on every reading: time passes while code runs

    def __call__(self) -> float:
        self.now += self.tick
        return self.now

    def wall(self) -> float:
        return 1_700_000_000.0 + self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Scrape:
    """One parsed /metrics exposition."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: dict[tuple[str, Labels], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self.samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value

    def get(self, name: str, **labels: str) -> float | None:
        """The value of the sample with exactly these labels, or None."""
        return self.samples.get((name, tuple(sorted(labels.items()))))

    def series(self, name: str | None = None, **labels: str) -> dict[tuple[str, Labels], float]:
        """Samples (optionally of one name) whose labels include ``labels``."""
        return {
            key: value
            for key, value in self.samples.items()
            if (name is None or key[0] == name)
            and all(dict(key[1]).get(k) == v for k, v in labels.items())
        }

    def values(self, task_id: str) -> dict[str, float]:
        """The value series of one task, by metric name."""
        return {
            name: value
            for (name, labels), value in self.samples.items()
            if name in VALUE_FAMILIES and dict(labels) == {"task_id": task_id}
        }


def assert_cadence(times: list[float], interval: float, minimum: int) -> None:
    """Requests on the interval grid: no round skipped (a skip doubles a gap), at least ``minimum``
    requests, and most gaps within 20 % of the interval (a busy machine may delay a few)."""
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert len(times) >= minimum, gaps
    assert max(gaps) < 1.9 * interval, gaps
    on_grid = [gap for gap in gaps if abs(gap - interval) <= 0.2 * interval]
    assert len(on_grid) >= 0.8 * len(gaps), gaps


def stats_times(server: SimServer, task_id: str) -> list[float]:
    """Arrival times of the stats requests of one task at the simulator."""
    return [
        r.time for r in server.sim.requests if r.task_id == task_id and r.path.endswith("/stats")
    ]


async def run_for(poller: Poller, seconds: float, *alongside: Coroutine[Any, Any, None]) -> None:
    """Run the poller's real loop (and ``alongside``) for ``seconds``, then cancel and stop it."""
    loop = asyncio.get_running_loop()
    tasks = [loop.create_task(poller.run()), *(loop.create_task(c) for c in alongside)]
    await asyncio.sleep(seconds)
    for task in tasks:
        task.cancel()
    await poller.stop()


def scrape(state: ExporterState) -> Scrape:
    """Render the exposition the way /metrics does and parse it."""
    return Scrape(MetricsRenderer(state).render(openmetrics=False).decode())


@dataclass
class Rig:
    """The real client and poller against a simulator, on a fake clock."""

    server: SimServer
    poller: Poller
    state: ExporterState
    clock: FakeClock

    @property
    def interval(self) -> float:
        return self.poller.polling.interval

    async def round(self) -> None:
        """Run one polling round to completion, then move the clock on by one interval."""
        await self.poller.start_round()
        self.clock.advance(self.interval)

    def scrape(self) -> Scrape:
        return scrape(self.state)

    def stats_requests(self, task_id: str) -> int:
        return len(stats_times(self.server, task_id))

    async def poll_times(self, task_id: str, count: int) -> list[float]:
        """Run rounds until ``task_id`` is polled ``count`` more times; the clock at each poll."""
        times: list[float] = []
        seen = self.stats_requests(task_id)
        while len(times) < count:
            now = self.clock.now
            await self.round()
            if self.stats_requests(task_id) > seen:
                seen = self.stats_requests(task_id)
                times.append(now)
        return times


def make_rig(
    server: SimServer,
    session: aiohttp.ClientSession,
    task_ids: tuple[str, ...] = (TASK_A, TASK_B),
    clock: FakeClock | None = None,
    **polling: Any,
) -> Rig:
    """A Rig with a generous request ceiling, so that the throttle does not slow tests down."""
    polling.setdefault("max_requests_per_second", 10_000.0)
    config = make_config(server.url, task_ids, **polling)
    state = ExporterState()
    clock = clock or FakeClock()
    poller = Poller(
        state,
        make_client(session, config),
        config.polling,
        config.tasks,
        monotonic=clock,
        wall=clock.wall,
    )
    return Rig(server, poller, state, clock)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """An HTTP session for the client under test."""
    async with aiohttp.ClientSession() as session:
        yield session


def error(status: int, code: str, message: str = "failed (illustrative)") -> CannedResponse:
    """A DCS-shaped error answer."""
    return CannedResponse(
        status=status, body={"error_code": code, "error_msg": message, "error_ext_msg": None}
    )


async def test_every_task_is_polled_in_the_first_round(
    sim_server: SimServer, session: aiohttp.ClientSession
) -> None:
    """A new task is due at once, not a random fraction of a second after the first round."""
    rig = make_rig(sim_server, session)
    await rig.round()
    assert rig.stats_requests(TASK_A) == rig.stats_requests(TASK_B) == 1
    assert rig.scrape().values(TASK_A) == BASELINE_VALUES


async def test_cadence_holds_when_time_passes_during_a_poll(
    sim_server: SimServer, session: aiohttp.ClientSession
) -> None:
    """A task is polled in every round even though its poll starts a little after the round."""
    rig = make_rig(sim_server, session, clock=FakeClock(tick=0.001))
    for _ in range(6):
        await rig.round()
    assert rig.stats_requests(TASK_A) == rig.stats_requests(TASK_B) == 6


async def test_server_errors_are_retried_every_interval(
    sim_server: SimServer, session: aiohttp.ClientSession
) -> None:
    """A 5xx may heal at any moment, so it is not backed off."""
    rig = make_rig(sim_server, session, (TASK_A,))
    sim_server.sim.push(TASK_A, *[error(503, "DCS.5000")] * 5)
    for _ in range(5):
        await rig.round()
    assert rig.stats_requests(TASK_A) == 5
    assert (
        rig.scrape().get("dcs_migration_poll_errors_total", task_id=TASK_A, reason="server_error")
        == 5
    )


async def test_permission_errors_back_off_and_reset_after_success(
    sim_server: SimServer, session: aiohttp.ClientSession
) -> None:
    """403 polls double their gap up to the cap, and one success restores the normal cadence."""
    rig = make_rig(sim_server, session, (TASK_A,))
    sim_server.sim.push(TASK_A, *[error(403, "DCS.4030", "no permission (illustrative)")] * 9)
    polled_at = await rig.poll_times(TASK_A, 10)
    gaps = [b - a for a, b in itertools.pairwise(polled_at)]
    assert gaps == [10, 20, 40, 80, 160, 300, 300, 300, 300]
    assert max(gaps) == MAX_BACKOFF_SECONDS
    await rig.round()
    await rig.round()
    assert rig.stats_requests(TASK_A) == 12  # back to every interval
    assert rig.scrape().get("dcs_migration_up", task_id=TASK_A) == 1


async def test_values_are_dropped_by_time_while_a_backed_off_task_is_not_polled(
    sim_server: SimServer, session: aiohttp.ClientSession
) -> None:
    """Backoff delays the next poll, but stale values still go after stale_intervals intervals."""
    rig = make_rig(sim_server, session, (TASK_A,), stale_intervals=3)
    await rig.round()  # t=0 good
    sim_server.sim.push(TASK_A, *[error(401, "APIGW.0301", "expired (illustrative)")] * 20)
    await rig.round()  # t=10 failure 1, next at 20
    await rig.round()  # t=20 failure 2, next at 40
    assert rig.scrape().values(TASK_A) == BASELINE_VALUES  # kept, marked by up 0
    assert rig.scrape().get("dcs_migration_up", task_id=TASK_A) == 0
    await rig.round()  # t=30: not polled, but 30 s since the last success
    assert rig.stats_requests(TASK_A) == 3
    assert rig.scrape().values(TASK_A) == {}


async def test_removed_task_loses_every_series_and_comes_back_fresh(
    sim_server: SimServer, session: aiohttp.ClientSession
) -> None:
    """set_tasks drops a removed task's series and counters; re-adding starts from zero."""
    rig = make_rig(sim_server, session)
    await rig.round()
    rig.poller.set_tasks([TaskConfig(id=TASK_A)])
    assert rig.scrape().series(task_id=TASK_B) == {}
    await rig.round()
    assert rig.stats_requests(TASK_B) == 1
    rig.poller.set_tasks([TaskConfig(id=TASK_A), TaskConfig(id=TASK_B, name="again")])
    assert rig.scrape().get("dcs_migration_polls_total", task_id=TASK_B) == 0
    await rig.round()
    assert rig.scrape().get("dcs_migration_polls_total", task_id=TASK_B) == 1
    assert rig.scrape().values(TASK_B) == BASELINE_VALUES


async def test_a_replacement_poller_drops_tasks_missing_from_its_list(
    sim_server: SimServer, session: aiohttp.ClientSession
) -> None:
    """A poller built over existing state (reload with new credentials) drops tasks it is not given."""
    rig = make_rig(sim_server, session)
    await rig.round()
    config = make_config(sim_server.url, (TASK_A, TASK_C))
    Poller(rig.state, make_client(session, config), config.polling, config.tasks)
    assert set(rig.state.tasks) == {TASK_A, TASK_C}
    assert rig.scrape().series(task_id=TASK_B) == {}
    assert rig.scrape().values(TASK_A) == BASELINE_VALUES  # kept across the swap


async def test_details_come_back_at_once_when_a_gone_task_returns(
    sim_server: SimServer, session: aiohttp.ClientSession
) -> None:
    """After DCS.4133 the next good poll refetches the details instead of waiting details_interval."""
    rig = make_rig(sim_server, session, (TASK_B,), details_interval=3600.0)
    await rig.round()
    info = rig.scrape().series("dcs_migration_task_info", task_id=TASK_B)
    assert len(info) == 1
    sim_server.sim.remove_task(TASK_B)
    await rig.round()
    assert rig.scrape().series("dcs_migration_task_info", task_id=TASK_B) == {}
    sim_server.sim.add_task(TASK_B, "task-b", body=dict(BASELINE_BODY))
    for _ in range(3):  # gone backs off: 1, then 2 intervals
        await rig.round()
    assert rig.scrape().get("dcs_migration_up", task_id=TASK_B) == 1
    assert rig.scrape().series("dcs_migration_task_info", task_id=TASK_B) == info


async def test_overrun_is_logged_once_per_slow_poll(
    sim_server: SimServer, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    """Rounds that find the task still busy skip it, and only the first of them logs."""
    rig = make_rig(sim_server, session, (TASK_A,))
    sim_server.sim.push(TASK_A, CannedResponse(body=BASELINE_BODY, delay=0.3))
    caplog.set_level(logging.WARNING, "exporter.poller")
    slow = rig.poller.start_round()
    rig.clock.advance(rig.interval)
    for _ in range(3):
        await rig.poller.start_round()
        rig.clock.advance(rig.interval)
    await slow
    await rig.round()
    overruns = [r for r in caplog.records if "still running" in r.getMessage()]
    assert len(overruns) == 1
    assert rig.stats_requests(TASK_A) == 2
    assert sim_server.sim.max_in_flight(TASK_A) == 1


async def test_a_bug_while_recording_does_not_end_the_round(
    sim_server: SimServer,
    session: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An exception in the poller's own bookkeeping is logged; the round and heartbeat go on."""
    rig = make_rig(sim_server, session)

    def broken(*args: object) -> None:
        raise KeyError("bug")

    monkeypatch.setattr(rig.poller, "_record_success", broken)
    await rig.round()
    assert rig.state.poll_cycles_total == 1
    assert any("bug in the poller" in r.getMessage() for r in caplog.records)
    monkeypatch.undo()
    await rig.round()
    assert rig.scrape().get("dcs_migration_up", task_id=TASK_A) == 1


async def test_run_keeps_a_fixed_grid(
    sim_server: SimServer, session: aiohttp.ClientSession
) -> None:
    """The real loop polls every task once per interval, without drifting or skipping rounds."""
    config = make_config(sim_server.url, interval=0.2, max_requests_per_second=1000.0)
    state = ExporterState()
    poller = Poller(state, make_client(session, config), config.polling, config.tasks)
    await run_for(poller, 2.1)
    times = stats_times(sim_server, TASK_B)
    assert len(times) <= 11
    assert_cadence(times, 0.2, minimum=9)
    assert state.poll_cycles_total >= 9


async def test_a_poll_not_sent_during_a_pause_is_not_an_api_error(
    sim_server: SimServer, session: aiohttp.ClientSession
) -> None:
    """After a 429 with a long Retry-After, polls fail as throttled without a request, and only the
    answer that was really received counts in api_errors."""
    rig = make_rig(sim_server, session, (TASK_A,), timeout=0.2)
    throttled = CannedResponse(
        status=429,
        headers={"Retry-After": "120"},
        body={"error_code": "APIG.0308", "error_msg": "throttled (illustrative)"},
    )
    sim_server.sim.push(TASK_A, throttled)
    for _ in range(3):
        await rig.round()
    metrics = rig.scrape()
    assert rig.stats_requests(TASK_A) == 1
    assert metrics.series("dcs_migration_api_errors_total", task_id=TASK_A) == {
        (
            "dcs_migration_api_errors_total",
            (("code", "APIG.0308"), ("status", "429"), ("task_id", TASK_A)),
        ): 1.0
    }
    assert metrics.get("dcs_migration_poll_errors_total", task_id=TASK_A, reason="throttled") == 3
    assert metrics.get("dcs_migration_up", task_id=TASK_A) == 0


async def test_backoff_counts_only_the_failures_it_is_for(
    sim_server: SimServer, session: aiohttp.ClientSession
) -> None:
    """Timeouts and 5xx before a 404 do not inflate its backoff: the first 404 waits one interval,
    the next two, as if the earlier failures had been of no backoff kind at all."""
    rig = make_rig(sim_server, session, (TASK_A,))
    sim_server.sim.push(TASK_A, *[error(503, "DCS.5000")] * 6)
    sim_server.sim.push(TASK_A, *[error(404, "DCS.4133", "not found (illustrative)")] * 3)
    polled_at = await rig.poll_times(TASK_A, 9)
    gaps = [b - a for a, b in itertools.pairwise(polled_at)]
    assert gaps == [10, 10, 10, 10, 10, 10, 10, 20]


async def test_a_task_removed_mid_poll_leaves_no_trace(
    sim_server: SimServer, session: aiohttp.ClientSession
) -> None:
    """A poll still out when its task is removed ends without re-adding schedule entries or
    series for it."""
    rig = make_rig(sim_server, session)
    sim_server.sim.push(TASK_B, CannedResponse(body=BASELINE_BODY, delay=0.2))
    running = rig.poller.start_round()
    await asyncio.sleep(0.05)
    rig.poller.set_tasks([TaskConfig(id=TASK_A)])
    await running
    assert TASK_B not in rig.poller._next_due and TASK_B not in rig.poller._details_due
    assert rig.scrape().series(task_id=TASK_B) == {}


async def test_details_are_read_even_while_stats_fail(
    sim_server: SimServer, session: aiohttp.ClientSession
) -> None:
    """A task whose stats keep failing still shows its status, so a FAILED task can alert."""
    sim_server.sim.set_status(TASK_A, "FAILED")
    sim_server.sim.push(TASK_A, *[error(500, "DCS.5000")] * 3)
    rig = make_rig(sim_server, session, (TASK_A,))
    await rig.round()
    scraped = rig.scrape()
    assert scraped.get("dcs_migration_up", task_id=TASK_A) == 0
    [(_, labels)] = scraped.series("dcs_migration_task_info", task_id=TASK_A)
    assert dict(labels)["status"] == "FAILED"


async def test_polls_kept_back_by_a_429_pause_are_not_logged_one_by_one(
    sim_server: SimServer, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    """A 429 with Retry-After: 60 is logged when it comes; the polls that the pause then keeps
    from going out fail at once (up 0, counted as throttled) without a warning each, round
    after round, although their messages differ in the seconds left."""
    rig = make_rig(sim_server, session, timeout=1.0)
    await rig.round()
    throttled = CannedResponse(429, {"error_code": "APIG.0308"}, headers={"Retry-After": "60"})
    sim_server.sim.push_all(throttled, throttled)
    caplog.set_level(logging.DEBUG, logger="exporter.poller")
    for _ in range(6):
        rig.clock.advance(MAX_BACKOFF_SECONDS)  # every task due again, whatever its backoff
        await rig.round()
    warned = [
        r for r in caplog.records if r.name == "exporter.poller" and r.levelno >= logging.WARNING
    ]
    assert len(warned) <= 2  # the answers that were 429s, nothing for the held polls
    assert all("[throttled]" in r.getMessage() for r in warned)
    held = [r for r in caplog.records if "poll not sent [throttled]" in r.getMessage()]
    assert len(held) >= 10
    metrics = rig.scrape()
    for task_id in (TASK_A, TASK_B):
        assert metrics.get("dcs_migration_up", task_id=task_id) == 0
        assert (
            metrics.get("dcs_migration_poll_errors_total", task_id=task_id, reason="throttled") >= 5
        )
