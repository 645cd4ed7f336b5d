"""CASES.md, daemon side: the real client, poller, collector and web app against the simulator.

Where a case speaks of minutes, time is compressed: either a fake clock moved one interval per
round (exact, for counting), or short real intervals and delays (for overlap and timeouts).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import statistics
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

import exporter.client
from exporter.config import load_config
from exporter.daemon import Daemon
from exporter.poller import Poller
from exporter.simulator import CannedResponse
from exporter.state import MAX_ERROR_CODES, ExporterState
from exporter.web import create_app
from tests.support import BASELINE_BODY, TASK_A, TASK_B, SimServer, make_client, make_config
from tests.test_poller import (
    BASELINE_VALUES,
    FakeClock,
    Scrape,
    assert_cadence,
    error,
    make_rig,
    run_for,
    scrape,
    stats_times,
)

GONE = CannedResponse(
    status=404,
    body={
        "error_code": "DCS.4133",
        "error_msg": "task not found (illustrative)",
        "error_ext_msg": None,
    },
)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """An HTTP session for the client under test."""
    async with aiohttp.ClientSession() as session:
        yield session


def rss_bytes() -> int:
    """Resident set size of this process, from /proc/self/statm."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


# ---- C11 ------------------------------------------------------------------------------------------


async def test_c11_deleted_task_loses_its_values_and_backs_off(
    sim_server: SimServer, session: aiohttp.ClientSession
) -> None:
    """TASK_B answering 404 DCS.4133 loses its value series at the first such poll, is polled at
    doubling gaps up to 5 min, counts api_errors{404,DCS.4133}, and TASK_A is untouched."""
    rig = make_rig(sim_server, session)
    for _ in range(3):
        await rig.round()
    before = rig.scrape()
    assert before.values(TASK_B) == BASELINE_VALUES
    sim_server.sim.push(TASK_B, *[GONE] * 40)

    await rig.round()  # the first 404: within one interval
    after = rig.scrape()
    assert after.values(TASK_B) == {}
    assert after.series("dcs_migration_task_info", task_id=TASK_B) == {}
    assert after.get("dcs_migration_up", task_id=TASK_B) == 0
    key = {"task_id": TASK_B, "status": "404", "code": "DCS.4133"}
    assert after.get("dcs_migration_api_errors_total", **key) == 1
    assert after.values(TASK_A) == BASELINE_VALUES
    assert after.get("dcs_migration_up", task_id=TASK_A) == 1

    polled_at = [rig.clock.now - rig.interval, *await rig.poll_times(TASK_B, 7)]
    gaps = [b - a for a, b in itertools.pairwise(polled_at)]
    assert gaps == [10, 20, 40, 80, 160, 300, 300]
    final = rig.scrape()
    assert final.get("dcs_migration_api_errors_total", **key) == 8
    assert final.values(TASK_B) == {}
    # TASK_A kept its cadence all along: one poll per round.
    rounds = 3 + 1 + sum(gaps) // 10
    assert rig.stats_requests(TASK_A) == rounds
    assert final.get("dcs_migration_polls_total", task_id=TASK_A) == rounds
    assert final.values(TASK_A) == BASELINE_VALUES


# ---- C12 ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "stall",
    [
        pytest.param(CannedResponse(hang=True), id="never-answers"),
        pytest.param(
            CannedResponse(partial=b'{"full_migration_progress":"4'), id="stalls-mid-body"
        ),
    ],
)
async def test_c12_stalled_answers_time_out_without_touching_the_other_task(
    sim_server: SimServer, session: aiohttp.ClientSession, stall: CannedResponse
) -> None:
    """With timeout 1 s and interval 0.5 s (the case's 10 s / 30 s, compressed), each stalled
    TASK_A poll ends as a timeout after 1 s ± 0.2 s, one request at most is pending for TASK_A,
    and TASK_B keeps its 0.5 s cadence."""
    sim_server.sim.push(TASK_A, *[stall] * 20)
    config = make_config(sim_server.url, interval=0.5, timeout=1.0, max_requests_per_second=1000.0)
    state = ExporterState()
    poller = Poller(state, make_client(session, config), config.polling, config.tasks)
    durations: list[float] = []

    async def watch() -> None:
        polls = 0
        while True:
            task = state.tasks[TASK_A]
            if task.polls_total > polls and task.last_poll_duration is not None and not task.up:
                polls = task.polls_total
                durations.append(task.last_poll_duration)
            await asyncio.sleep(0.02)

    await run_for(poller, 3.6, watch())

    metrics = scrape(state)
    assert metrics.get("dcs_migration_up", task_id=TASK_A) == 0
    timeouts = metrics.get(
        "dcs_migration_api_errors_total", task_id=TASK_A, status="timeout", code="none"
    )
    assert timeouts is not None and timeouts >= 2
    assert (
        metrics.get("dcs_migration_poll_errors_total", task_id=TASK_A, reason="timeout") == timeouts
    )
    assert metrics.values(TASK_A) == {}  # never a partial value from the cut body
    assert durations and all(0.8 <= d <= 1.2 for d in durations), durations
    assert sim_server.sim.max_in_flight(TASK_A) == 1
    b_times = stats_times(sim_server, TASK_B)
    assert_cadence(b_times, 0.5, minimum=6)
    assert metrics.get("dcs_migration_up", task_id=TASK_B) == 1


# ---- C13 ------------------------------------------------------------------------------------------


async def test_c13_slow_answers_never_overlap_and_do_not_stall_anything(
    sim_server: SimServer, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    """TASK_A answering after 1.5 s with interval 0.5 s and timeout 3 s (the case's 40 s / 15 s /
    60 s, compressed): never two TASK_A requests in flight, each overrun logged once, /metrics
    fast throughout, the asyncio task count flat, TASK_B on its 0.5 s cadence."""
    caplog.set_level(logging.WARNING, "exporter.poller")
    slow = CannedResponse(body=BASELINE_BODY, delay=1.5)
    sim_server.sim.push(TASK_A, *[slow] * 20)
    config = make_config(sim_server.url, interval=0.5, timeout=3.0, max_requests_per_second=1000.0)
    state = ExporterState()
    poller = Poller(state, make_client(session, config), config.polling, config.tasks)
    latencies: list[float] = []
    task_counts: list[int] = []
    round_counts: list[int] = []

    async with TestClient(TestServer(create_app(state))) as web:

        async def scrape_often() -> None:
            while True:
                started = time.monotonic()
                response = await web.get("/metrics")
                await response.read()
                assert response.status == 200
                latencies.append(time.monotonic() - started)
                tasks = asyncio.all_tasks()
                task_counts.append(len(tasks))
                round_counts.append(sum("_round" in repr(t.get_coro()) for t in tasks))
                await asyncio.sleep(0.05)

        await run_for(poller, 6.2, scrape_often())

    assert sim_server.sim.max_in_flight(TASK_A) == 1
    a_polls = len(stats_times(sim_server, TASK_A))
    assert 3 <= a_polls <= 4  # one every 2 s: 1.5 s answer, then the next round
    overruns = [
        r for r in caplog.records if TASK_A in r.getMessage() and "still running" in r.getMessage()
    ]
    assert a_polls - 1 <= len(overruns) <= a_polls
    assert not any(TASK_B in r.getMessage() for r in caplog.records)
    assert max(latencies) < 1.0
    # Bounded, not growing: a pile-up would add a task per round (about 4 per third of the run),
    # while scrapes, executor jobs and the simulator's handlers come and go around the median.
    third = len(task_counts) // 3
    assert statistics.median(task_counts[-third:]) <= statistics.median(task_counts[:third]) + 2
    assert max(round_counts) <= 2  # the slow round, and a fast one now and then
    b_times = stats_times(sim_server, TASK_B)
    assert_cadence(b_times, 0.5, minimum=11)
    assert scrape(state).values(TASK_A) == BASELINE_VALUES  # slow but fine: up, with values


# ---- C26 ------------------------------------------------------------------------------------------


@pytest.fixture
async def daemon_for(tmp_path: Path) -> AsyncIterator[list[Daemon]]:
    """Closes the daemons a test starts."""
    daemons: list[Daemon] = []
    yield daemons
    for daemon in daemons:
        await daemon.close()


async def wait_for(check: object, timeout: float = 10.0) -> None:
    """Poll an async predicate until it is true."""
    deadline = time.monotonic() + timeout
    while not await check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


async def test_c26_reload_drops_the_removed_tasks_series(
    sim_server: SimServer,
    session: aiohttp.ClientSession,
    tmp_path: Path,
    daemon_for: list[Daemon],
) -> None:
    """Config v1 [A, B] polled twice, v2 [A] reloaded through POST /-/reload: no series with
    task_id=B remains, and A's series go on unchanged and continuous."""
    from tests.support import config_yaml

    path = tmp_path / "config.yaml"
    polling = "polling:\n  interval: 200ms\n  max_requests_per_second: 1000\n"
    path.write_text(config_yaml(sim_server.url, (TASK_A, TASK_B), polling))
    daemon = Daemon(load_config(str(path)), lambda: load_config(str(path)), None)
    daemon_for.append(daemon)
    await daemon.start("127.0.0.1", 0)
    base = f"http://127.0.0.1:{daemon.port}"

    async def get_metrics() -> Scrape:
        async with session.get(f"{base}/metrics") as response:
            return Scrape(await response.text())

    async def both_polled_twice() -> bool:
        m = await get_metrics()
        return all(
            (m.get("dcs_migration_polls_total", task_id=t) or 0) >= 2 for t in (TASK_A, TASK_B)
        )

    await wait_for(both_polled_twice)
    before = await get_metrics()
    assert before.values(TASK_B) == BASELINE_VALUES

    path.write_text(config_yaml(sim_server.url, (TASK_A,), polling))
    async with session.post(f"{base}/-/reload") as response:
        assert response.status == 200, await response.text()
    polls_a = (await get_metrics()).get("dcs_migration_polls_total", task_id=TASK_A) or 0

    async def polled_again() -> bool:
        m = await get_metrics()
        return (m.get("dcs_migration_polls_total", task_id=TASK_A) or 0) > polls_a

    await wait_for(polled_again)
    after = await get_metrics()
    assert after.series(task_id=TASK_B) == {}
    assert TASK_B not in after.text
    assert after.values(TASK_A) == BASELINE_VALUES
    assert after.get("dcs_migration_up", task_id=TASK_A) == 1
    assert (after.get("dcs_migration_polls_total", task_id=TASK_A) or 0) > (
        before.get("dcs_migration_polls_total", task_id=TASK_A) or 0
    )
    assert after.get("dcs_migration_config_last_reload_successful") == 1


async def test_c26_task_gone_in_the_cloud_loses_its_value_series(
    sim_server: SimServer, session: aiohttp.ClientSession
) -> None:
    """Variant without reload: TASK_B deleted in the cloud loses its value and info series at the
    next poll. It keeps up 0 and its error counters, because it is still configured and the
    operator needs to see why it shows nothing."""
    rig = make_rig(sim_server, session)
    await rig.round()
    await rig.round()
    sim_server.sim.remove_task(TASK_B)
    await rig.round()
    metrics = rig.scrape()
    b_series = {name for name, _ in metrics.series(task_id=TASK_B)}
    assert b_series == {
        "dcs_migration_up",
        "dcs_migration_last_success_timestamp_seconds",
        "dcs_migration_poll_duration_seconds",
        "dcs_migration_polls_total",
        "dcs_migration_poll_errors_total",
        "dcs_migration_api_errors_total",
    }
    assert metrics.get("dcs_migration_up", task_id=TASK_B) == 0
    assert metrics.values(TASK_A) == BASELINE_VALUES


# ---- C28 ------------------------------------------------------------------------------------------


async def test_c28_error_codes_and_messages_do_not_grow_the_series(
    sim_server: SimServer, session: aiohttp.ClientSession
) -> None:
    """1,000 polls of 500 cycling through 50 random error codes with per-request messages: the code
    label holds at most 20 values plus "other", messages never become labels, the series count
    stays within baseline + 21, and RSS stays within 10 %."""
    rng = random.Random(28)
    codes = [f"DCS.{rng.randint(10000, 99999)}" for _ in range(50)]
    rig = make_rig(sim_server, session, (TASK_A,))
    await rig.round()
    baseline = len(rig.scrape().samples)

    def failures(count: int) -> list[CannedResponse]:
        return [
            error(
                500,
                codes[i % len(codes)],
                f"internal error request_id={uuid.uuid4()} at {time.time()} (illustrative)",
            )
            for i in range(count)
        ]

    task = rig.state.tasks[TASK_A]
    sim_server.sim.push(TASK_A, *failures(200))
    for _ in range(200):
        await rig.poller.poll_task(task)
    rss_warm = rss_bytes()
    sim_server.sim.push(TASK_A, *failures(800))
    for _ in range(800):
        await rig.poller.poll_task(task)
    rss_end = rss_bytes()

    metrics = rig.scrape()
    errors = metrics.series("dcs_migration_api_errors_total", task_id=TASK_A)
    labels = [dict(key[1]) for key in errors]
    assert {label["status"] for label in labels} == {"500"}
    code_values = {label["code"] for label in labels}
    assert len(code_values) == MAX_ERROR_CODES + 1
    assert "other" in code_values
    assert code_values - {"other"} <= set(codes)
    assert sum(errors.values()) == 1000
    assert "request_id" not in metrics.text
    assert len(metrics.samples) <= baseline + 21
    assert abs(rss_end - rss_warm) <= 0.10 * rss_warm, (rss_warm, rss_end)


# ---- C29 ------------------------------------------------------------------------------------------


async def test_c29_failing_upstream_is_not_a_frozen_migration(
    sim_server: SimServer, session: aiohttp.ClientSession
) -> None:
    """4 good polls, then 40 polls of 500: up is 0 from the first failure, last_success stops
    moving. Choice documented here and in the poller: the last good values are kept (marked by
    up 0) for stale_intervals=3 failed polls and dropped from the third on, so neither a
    dashboard nor the stalled-offset alert (which also requires up == 1) sees a frozen offset."""
    rig = make_rig(sim_server, session, (TASK_A,), stale_intervals=3)
    ups: list[float | None] = []
    last_success: list[float | None] = []
    offsets: list[float | None] = []
    sim_server.sim.push(TASK_A, *[CannedResponse(body=BASELINE_BODY)] * 4)
    sim_server.sim.push(TASK_A, *[error(500, "DCS.5000", "internal (illustrative)")] * 40)
    for _ in range(44):
        await rig.round()
        metrics = rig.scrape()
        ups.append(metrics.get("dcs_migration_up", task_id=TASK_A))
        last_success.append(
            metrics.get("dcs_migration_last_success_timestamp_seconds", task_id=TASK_A)
        )
        offsets.append(metrics.get("dcs_migration_offset", task_id=TASK_A))
    assert ups == [1] * 4 + [0] * 40
    assert len(set(last_success[:4])) == 4  # advancing while polls succeed
    assert set(last_success[3:]) == {last_success[3]}  # then frozen
    assert offsets == [5000] * 6 + [None] * 38
    metrics = rig.scrape()
    assert (
        metrics.get("dcs_migration_api_errors_total", task_id=TASK_A, status="500", code="DCS.5000")
        == 40
    )
    assert metrics.values(TASK_A) == {}
    assert rig.stats_requests(TASK_A) == 44  # 5xx is not backed off


# ---- C30 ------------------------------------------------------------------------------------------


async def test_c30_unexpected_errors_do_not_end_polling(
    sim_server: SimServer,
    session: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Poll 2 nested garbage, poll 3 a RuntimeError from the signer, poll 4 fine: up 1, 0, 0, 1 on
    schedule and the poll-cycle heartbeat rises every round. The garbage body is logged as one
    WARN naming the unreadable fields rather than a traceback, since it is bad data, not a bug;
    the RuntimeError is logged with its traceback."""
    caplog.set_level(logging.WARNING)
    rig = make_rig(sim_server, session, (TASK_A,))
    real_sign = exporter.client.sign_request
    fail_signing = False

    def sign(*args: object, **kwargs: object) -> object:
        if fail_signing:
            raise RuntimeError("signer exploded (injected)")
        return real_sign(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(exporter.client, "sign_request", sign)
    sim_server.sim.push(
        TASK_A,
        CannedResponse(body=BASELINE_BODY),
        CannedResponse(body={"offset": {"nested": 1}, "full_migration_progress": ["45"]}),
    )
    ups, cycles = [], []
    for poll in range(1, 5):
        fail_signing = poll == 3
        await rig.round()
        metrics = rig.scrape()
        ups.append(metrics.get("dcs_migration_up", task_id=TASK_A))
        cycles.append(metrics.get("dcs_migration_poll_cycles_total"))
    assert ups == [1, 0, 0, 1]
    assert cycles == [1, 2, 3, 4]
    assert rig.stats_requests(TASK_A) == 3  # poll 3 never left the process
    metrics = rig.scrape()
    assert (
        metrics.get("dcs_migration_poll_errors_total", task_id=TASK_A, reason="unexpected_shape")
        == 1
    )
    assert metrics.get("dcs_migration_poll_errors_total", task_id=TASK_A, reason="internal") == 1
    assert metrics.values(TASK_A) == BASELINE_VALUES
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1
    assert isinstance(tracebacks[0].exc_info[1], RuntimeError)  # type: ignore[index]
    shape = [r for r in caplog.records if "unexpected_shape" in r.getMessage()]
    assert len(shape) == 1
    assert "offset" in shape[0].getMessage() and "full_migration_progress" in shape[0].getMessage()


async def test_c30_readiness_fails_when_no_round_finishes(
    sim_server: SimServer, session: aiohttp.ClientSession
) -> None:
    """/ready and /healthz answer 200 while rounds finish and 503 once neither a round nor a
    poll has ended in 3 intervals; a new round makes them healthy again."""
    clock = FakeClock()
    rig = make_rig(sim_server, session, clock=clock)
    app = create_app(rig.state, max_cycle_age=3 * rig.interval, monotonic=clock)
    async with TestClient(TestServer(app)) as web:
        assert (await web.get("/ready")).status == 503  # nothing polled yet
        await rig.round()
        assert (await web.get("/ready")).status == 200
        assert (await web.get("/healthz")).status == 200
        clock.advance(3 * rig.interval)  # the scheduler is silent for 3+ intervals
        ready, alive = await web.get("/ready"), await web.get("/healthz")
        assert (ready.status, alive.status) == (503, 503)
        assert "no poll or polling round ended for" in await ready.text()
        await rig.round()
        assert (await web.get("/ready")).status == 200
