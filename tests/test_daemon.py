"""Tests for exporter.daemon, in process: reload of config and credential files, supervision of
the polling loop, and shutdown with a poll in flight. (Signals and the command line are tested on
a subprocess in tests/e2e/test_daemon_e2e.py.)"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest

import exporter.daemon
from exporter.client import DcsClient, TaskDetails
from exporter.config import load_config
from exporter.daemon import Daemon
from exporter.poller import Poller
from exporter.simulator import (
    DEMO_PASSWORD,
    CannedResponse,
    Simulator,
    start,
)
from tests.support import BASELINE_BODY, PROJ, TASK_A, TASK_B, SimServer, config_yaml
from tests.test_poller import Scrape

FAST = "polling:\n  interval: 200ms\n  timeout: 2s\n  max_requests_per_second: 1000\n"


def password_yaml(url: str, password_file: Path, polling: str = FAST) -> str:
    """A config using an IAM password read from a file."""
    return config_yaml(url, (TASK_A,), polling, password_file=password_file)


class Running:
    """A daemon started on a free port, and helpers to talk to it."""

    def __init__(self, daemon: Daemon, session: aiohttp.ClientSession) -> None:
        self.daemon = daemon
        self.session = session
        self.base = f"http://127.0.0.1:{daemon.port}"

    async def metrics(self) -> Scrape:
        async with self.session.get(f"{self.base}/metrics") as response:
            assert response.status == 200
            return Scrape(await response.text())

    async def reload(self) -> tuple[int, str]:
        async with self.session.post(f"{self.base}/-/reload") as response:
            return response.status, await response.text()

    async def until(self, check: Callable[[Scrape], bool], timeout: float = 10.0) -> Scrape:
        """Scrape until ``check`` holds for the exposition."""
        deadline = time.monotonic() + timeout
        while True:
            metrics = await self.metrics()
            if check(metrics):
                return metrics
            if time.monotonic() > deadline:
                raise AssertionError(f"not reached in {timeout}s:\n{metrics.text[:3000]}")
            await asyncio.sleep(0.05)

    async def polls(self, task_id: str = TASK_A) -> float:
        return (await self.metrics()).get("dcs_migration_polls_total", task_id=task_id) or 0.0


@pytest.fixture
async def start_daemon() -> AsyncIterator[Callable[[Path], Awaitable[Running]]]:
    """Start daemons from a config file path; all are closed at the end."""
    started: list[Daemon] = []
    async with aiohttp.ClientSession() as session:

        async def start(path: Path) -> Running:
            daemon = Daemon(load_config(str(path)), lambda: load_config(str(path)), None)
            started.append(daemon)
            await daemon.start("127.0.0.1", 0)
            return Running(daemon, session)

        yield start
        for daemon in started:
            await daemon.close()


def up(task_id: str = TASK_A, value: float = 1) -> Callable[[Scrape], bool]:
    """A check: the task's up gauge has this value."""
    return lambda m: m.get("dcs_migration_up", task_id=task_id) == value


async def test_bad_reload_keeps_the_old_config_polling(
    sim_server: SimServer, tmp_path: Path, start_daemon: Callable[[Path], Awaitable[Running]]
) -> None:
    """A config with a tab is refused with 400: failures +1, last_reload_successful 0, and the old
    config keeps polling; a good config afterwards sets it back to 1."""
    path = tmp_path / "config.yaml"
    path.write_text(config_yaml(sim_server.url, (TASK_A,), FAST))
    running = await start_daemon(path)
    await running.until(up())
    path.write_text('tasks:\n\t- id: "x"\n')
    status, text = await running.reload()
    assert status == 400
    assert "tab" in text.lower()
    metrics = await running.until(
        lambda m: m.get("dcs_migration_config_reload_failures_total") == 1
    )
    assert metrics.get("dcs_migration_config_last_reload_successful") == 0
    polls = await running.polls()
    await running.until(lambda m: (m.get("dcs_migration_polls_total", task_id=TASK_A) or 0) > polls)
    path.write_text(config_yaml(sim_server.url, (TASK_A, TASK_B), FAST))
    assert (await running.reload())[0] == 200
    metrics = await running.until(up(TASK_B))
    assert metrics.get("dcs_migration_config_last_reload_successful") == 1
    assert metrics.get("dcs_migration_config_reload_failures_total") == 1


async def test_a_refused_reload_logs_one_line_per_problem(
    sim_server: SimServer,
    tmp_path: Path,
    start_daemon: Callable[[Path], Awaitable[Running]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two problems in a reloaded config are two ERROR lines naming file and line, after one line
    saying the running config stays; no record carries a newline (logfmt would escape it)."""
    path = tmp_path / "config.yaml"
    path.write_text(config_yaml(sim_server.url, (TASK_A,), FAST))
    running = await start_daemon(path)
    await running.until(up())
    path.write_text(config_yaml(sim_server.url, (TASK_A,), FAST + "  timout: 5\n  intervall: 1s\n"))
    caplog.clear()
    assert (await running.reload())[0] == 400
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors[0] == "configuration reload failed; keeping the running one"
    assert [line for line in errors[1:] if "timout" in line or "intervall" in line] == errors[1:]
    assert len(errors) == 3 and all(f"{path}:" in line for line in errors[1:])
    assert not any("\n" in message for message in errors)


async def test_unreadable_config_file_is_a_failed_reload_not_a_crash(
    sim_server: SimServer, tmp_path: Path, start_daemon: Callable[[Path], Awaitable[Running]]
) -> None:
    """Bytes that are not UTF-8, or a deleted file, count as failed reloads; polling goes on."""
    path = tmp_path / "config.yaml"
    path.write_text(config_yaml(sim_server.url, (TASK_A,), FAST))
    running = await start_daemon(path)
    await running.until(up())
    path.write_bytes(b"tasks:\n  - id: \xff\xfe\n")
    assert (await running.reload())[0] == 400
    path.unlink()
    assert (await running.reload())[0] == 400
    metrics = await running.until(
        lambda m: m.get("dcs_migration_config_reload_failures_total") == 2
    )
    assert metrics.get("dcs_migration_up", task_id=TASK_A) == 1


async def _daemon_on_task_a(
    sim_server: SimServer, tmp_path: Path, start_daemon: Callable[[Path], Awaitable[Running]]
) -> tuple[Path, Running]:
    """A daemon polling TASK_A at the FAST settings, once it is up; and its config file."""
    path = tmp_path / "config.yaml"
    path.write_text(config_yaml(sim_server.url, (TASK_A,), FAST))
    running = await start_daemon(path)
    await running.until(up())
    return path, running


def _break_building_pollers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the daemon's next attempt to build a poller raise, as a bug there would."""

    def broken(*args: object, **kwargs: object) -> None:
        raise ValueError("injected while building a client")

    monkeypatch.setattr(exporter.daemon, "build_poller", broken)


async def test_a_bug_while_applying_a_reload_is_a_failed_reload_not_a_500(
    sim_server: SimServer,
    tmp_path: Path,
    start_daemon: Callable[[Path], Awaitable[Running]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An exception while switching to a valid new config is answered 400 and counted; the daemon
    keeps serving and polling."""
    path, running = await _daemon_on_task_a(sim_server, tmp_path, start_daemon)
    _break_building_pollers(monkeypatch)
    path.write_text(config_yaml(sim_server.url, (TASK_A,), "polling:\n  interval: 300ms\n"))
    status, text = await running.reload()
    assert status == 400
    assert "injected while building a client" in text
    metrics = await running.until(
        lambda m: m.get("dcs_migration_config_reload_failures_total") == 1
    )
    assert metrics.get("dcs_migration_config_last_reload_successful") == 0
    polls = await running.polls()
    await running.until(lambda m: (m.get("dcs_migration_polls_total", task_id=TASK_A) or 0) > polls)


async def test_a_bug_after_the_session_was_replaced_leaves_polling_on_an_open_session(
    sim_server: SimServer,
    tmp_path: Path,
    start_daemon: Callable[[Path], Awaitable[Running]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A new concurrency replaces the HTTP session before the pollers are rebuilt; when that
    rebuild fails, the old pollers go on polling on a session that is still open."""
    path, running = await _daemon_on_task_a(sim_server, tmp_path, start_daemon)
    _break_building_pollers(monkeypatch)
    path.write_text(config_yaml(sim_server.url, (TASK_A,), FAST + "  concurrency: 3\n"))
    assert (await running.reload())[0] == 400
    polls = await running.polls()
    metrics = await running.until(
        lambda m: (m.get("dcs_migration_polls_total", task_id=TASK_A) or 0) > polls + 2
    )
    assert metrics.get("dcs_migration_up", task_id=TASK_A) == 1
    assert metrics.get("dcs_migration_poll_errors_total", task_id=TASK_A, reason="internal") is None

    monkeypatch.undo()  # the next reload works, and moves every poller to the new session
    assert (await running.reload())[0] == 200
    polls = await running.polls()
    metrics = await running.until(
        lambda m: (m.get("dcs_migration_polls_total", task_id=TASK_A) or 0) > polls + 2
    )
    assert metrics.get("dcs_migration_up", task_id=TASK_A) == 1


def stats_requests(sim_server: SimServer) -> int:
    """How many stats requests the simulator has seen so far."""
    return sum(1 for r in sim_server.sim.requests if r.path.endswith("/stats"))


async def test_a_reload_that_rebuilds_the_client_keeps_the_429_pause(
    sim_server: SimServer, tmp_path: Path, start_daemon: Callable[[Path], Awaitable[Running]]
) -> None:
    """After a 429 with Retry-After: 30, a reload that builds a new client (another rate ceiling)
    keeps the pause: no stats request goes out for the 2 s (ten intervals) that follow."""
    path = tmp_path / "config.yaml"
    path.write_text(config_yaml(sim_server.url, (TASK_A, TASK_B), FAST))
    running = await start_daemon(path)
    await running.until(up(TASK_B))
    throttled = CannedResponse(429, {"error_code": "APIG.0308"}, headers={"Retry-After": "30"})
    sim_server.sim.push_all(throttled)
    await running.until(
        lambda m: (
            m.get("dcs_migration_poll_errors_total", task_id=TASK_A, reason="throttled")
            or m.get("dcs_migration_poll_errors_total", task_id=TASK_B, reason="throttled")
        )
    )
    before = stats_requests(sim_server)
    path.write_text(config_yaml(sim_server.url, (TASK_A, TASK_B), FAST.replace("1000", "500")))
    assert (await running.reload())[0] == 200
    await asyncio.sleep(2.0)
    assert stats_requests(sim_server) == before


async def test_reloads_in_quick_succession_keep_each_tasks_schedule(
    sim_server: SimServer, tmp_path: Path, start_daemon: Callable[[Path], Awaitable[Running]]
) -> None:
    """With a 5 s interval, six reloads that each rebuild the poller (the concurrency flips
    between 4 and 5) within 3 s poll each task once, not once per reload."""
    slow = "polling:\n  interval: 5s\n  timeout: 2s\n  concurrency: {}\n"
    path = tmp_path / "config.yaml"
    path.write_text(config_yaml(sim_server.url, (TASK_A, TASK_B), slow.format(4)))
    running = await start_daemon(path)
    await running.until(up(TASK_B))
    before = stats_requests(sim_server)
    for concurrency in (5, 4, 5, 4, 5, 4):
        path.write_text(config_yaml(sim_server.url, (TASK_A, TASK_B), slow.format(concurrency)))
        assert (await running.reload())[0] == 200
        await asyncio.sleep(0.5)
    assert stats_requests(sim_server) == before


async def test_an_endless_first_listing_holds_up_neither_polling_nor_health(
    sim_server: SimServer,
    tmp_path: Path,
    start_daemon: Callable[[Path], Awaitable[Running]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A first discovery listing that never ends (a list API that ignores offset pages for
    1,000 pages, say) delays the start by one request timeout at most: the configured task is
    polled and /healthz answers 200 while the listing goes on."""

    async def endless(self: DcsClient, name: str | None = None) -> list[TaskDetails]:
        await asyncio.sleep(3600)
        return []

    monkeypatch.setattr(DcsClient, "list_tasks", endless)
    path = tmp_path / "config.yaml"
    polling = "polling:\n  interval: 200ms\n  timeout: 1s\n"
    path.write_text(
        config_yaml(sim_server.url, (TASK_A,), polling + "discovery:\n  interval: 1m\n")
    )
    began = time.monotonic()
    running = await start_daemon(path)
    assert time.monotonic() - began < 3.0
    await running.until(up(), timeout=5.0)
    async with running.session.get(f"{running.base}/healthz") as response:
        assert response.status == 200


async def test_reloads_during_a_slow_poll_never_put_two_requests_in_flight(
    sim_server: SimServer, tmp_path: Path, start_daemon: Callable[[Path], Awaitable[Running]]
) -> None:
    """Reloads that rebuild the poller while a 1 s poll is out cancel it, and the new poller waits
    out the request timeout before asking again: the API never sees two requests of one task."""
    polling = "polling:\n  interval: 200ms\n  timeout: 1500ms\n  concurrency: {}\n"
    path = tmp_path / "config.yaml"
    path.write_text(config_yaml(sim_server.url, (TASK_A,), polling.format(4)))
    running = await start_daemon(path)
    await running.until(up())
    sim_server.sim.push(TASK_A, *[CannedResponse(200, dict(BASELINE_BODY), delay=1.0)] * 20)
    for concurrency in (5, 4, 5, 4, 5, 4):
        await asyncio.sleep(0.3)
        path.write_text(config_yaml(sim_server.url, (TASK_A,), polling.format(concurrency)))
        assert (await running.reload())[0] == 200
    await asyncio.sleep(1.5)
    assert sim_server.sim.max_in_flight(TASK_A) == 1


async def test_reload_rereads_the_password_file(
    sim_server: SimServer, tmp_path: Path, start_daemon: Callable[[Path], Awaitable[Running]]
) -> None:
    """A changed password file takes effect at reload (the cached token is dropped); an
    unchanged one does not cost an IAM request."""
    secret = tmp_path / "password"
    secret.write_text(DEMO_PASSWORD + "\n")
    path = tmp_path / "config.yaml"
    path.write_text(password_yaml(sim_server.url, secret))
    running = await start_daemon(path)
    await running.until(up())
    assert sim_server.sim.token_requests == 1
    assert (await running.reload())[0] == 200
    polls = await running.polls()
    await running.until(lambda m: (m.get("dcs_migration_polls_total", task_id=TASK_A) or 0) > polls)
    assert sim_server.sim.token_requests == 1

    secret.write_text("not-the-password\n")
    assert (await running.reload())[0] == 200
    metrics = await running.until(up(value=0))
    assert sim_server.sim.token_requests >= 2
    assert (metrics.get("dcs_migration_poll_errors_total", task_id=TASK_A, reason="auth") or 0) >= 1

    secret.write_text(DEMO_PASSWORD + "\n")
    assert (await running.reload())[0] == 200
    await running.until(up())


async def test_reload_applies_new_polling_settings(
    sim_server: SimServer, tmp_path: Path, start_daemon: Callable[[Path], Awaitable[Running]]
) -> None:
    """A new interval replaces the scheduler; task state and counters carry over."""
    path = tmp_path / "config.yaml"
    path.write_text(config_yaml(sim_server.url, (TASK_A,), "polling:\n  interval: 30s\n"))
    running = await start_daemon(path)
    # The whole first round, details included: a reload cancelling a request still out would
    # rightly hold the task back for the request timeout (10 s here).
    await running.until(lambda m: (m.get("dcs_migration_poll_cycles_total") or 0) >= 1)
    assert await running.polls() == 1  # the next poll would be 30 s away
    path.write_text(config_yaml(sim_server.url, (TASK_A,), FAST))
    assert (await running.reload())[0] == 200
    await running.until(lambda m: (m.get("dcs_migration_polls_total", task_id=TASK_A) or 0) >= 4)
    assert running.daemon.poller is not None
    assert running.daemon.poller.polling.interval == 0.2


async def test_polling_loop_is_restarted_after_a_failure(
    sim_server: SimServer,
    tmp_path: Path,
    start_daemon: Callable[[Path], Awaitable[Running]],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An exception escaping the scheduler is logged and the loop starts again; polls go on."""
    monkeypatch.setattr(exporter.daemon, "RESTART_DELAY_SECONDS", 0.05)
    real_start_round = Poller.start_round
    calls = 0

    def flaky(self: Poller) -> asyncio.Task[None]:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("scheduler bug (injected)")
        return real_start_round(self)

    monkeypatch.setattr(Poller, "start_round", flaky)
    path = tmp_path / "config.yaml"
    path.write_text(config_yaml(sim_server.url, (TASK_A,), FAST))
    running = await start_daemon(path)
    await running.until(lambda m: (m.get("dcs_migration_polls_total", task_id=TASK_A) or 0) >= 3)
    assert running.daemon.poll_loop_restarts == 1
    assert any("polling loop failed" in r.getMessage() and r.exc_info for r in caplog.records)


async def test_close_with_a_poll_in_flight_is_quick_and_clean(
    sim_server: SimServer, tmp_path: Path, start_daemon: Callable[[Path], Awaitable[Running]]
) -> None:
    """close() cancels a hanging poll, stops the server and closes the session within a second,
    leaving no exporter task behind."""
    sim_server.sim.push(TASK_A, *[CannedResponse(hang=True)] * 5)
    path = tmp_path / "config.yaml"
    path.write_text(config_yaml(sim_server.url, (TASK_A,), "polling:\n  timeout: 60s\n"))
    running = await start_daemon(path)
    deadline = time.monotonic() + 5
    while sim_server.sim.in_flight(TASK_A) == 0:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    session = running.daemon.session
    started = time.monotonic()
    await running.daemon.close()
    assert time.monotonic() - started < 1.5
    assert session is not None and session.closed
    leftovers = [
        t
        for t in asyncio.all_tasks()
        if "/exporter/" in t.get_coro().cr_code.co_filename  # type: ignore[union-attr]
        and not t.get_coro().cr_code.co_filename.endswith("simulator.py")  # type: ignore[union-attr]
    ]
    assert leftovers == []


async def test_sighup_before_start_is_ignored(
    sim_server: SimServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A reload request that arrives before the daemon runs does nothing instead of failing."""
    caplog.set_level(logging.ERROR)
    path = tmp_path / "config.yaml"
    path.write_text(config_yaml(sim_server.url, (TASK_A,), FAST))
    daemon = Daemon(load_config(str(path)), lambda: load_config(str(path)), None)
    daemon._reload_in_background()
    assert not daemon._background  # no reload task was started
    await asyncio.sleep(0)
    assert not caplog.records
    assert daemon.state.config_reload_failures_total == 0


async def test_health_limit_follows_a_reloaded_interval(
    sim_server: SimServer, tmp_path: Path, start_daemon: Callable[[Path], Awaitable[Running]]
) -> None:
    """After a reload to a longer interval, rounds further apart than the old limit keep the
    daemon alive and ready (a probe must not kill it for following its new config)."""
    path = tmp_path / "config.yaml"
    fast = "polling:\n  interval: 200ms\n  timeout: 300ms\n"  # health limit 0.8 s
    path.write_text(config_yaml(sim_server.url, (TASK_A,), fast))
    running = await start_daemon(path)
    await running.until(up())
    path.write_text(config_yaml(sim_server.url, (TASK_A,), "polling:\n  interval: 5s\n"))
    assert (await running.reload())[0] == 200
    # The old scheduler has stopped; wait for the new one's first round (within 0.5 s).
    state = running.daemon.state
    cycles = state.poll_cycles_total
    deadline = time.monotonic() + 3
    while state.poll_cycles_total == cycles:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    cycles = state.poll_cycles_total
    await asyncio.sleep(1.5)  # no round for 1.5 s: beyond the old limit, within the new one
    assert state.poll_cycles_total == cycles
    for probe in ("/healthz", "/ready"):
        async with running.session.get(f"{running.base}{probe}") as response:
            assert response.status == 200, await response.text()


async def test_reload_to_new_endpoints_uses_a_new_session(
    sim_server: SimServer, tmp_path: Path, start_daemon: Callable[[Path], Awaitable[Running]]
) -> None:
    """A reload that moves the endpoints polls the new API through a fresh session (its proxy
    choice depends on the endpoints) and closes the old one."""
    other = Simulator(project_id=PROJ)
    other.add_task(TASK_A, "task-a", body={**BASELINE_BODY, "offset": "7"})
    runner, other_url = await start(other)
    try:
        path = tmp_path / "config.yaml"
        path.write_text(config_yaml(sim_server.url, (TASK_A,), FAST))
        running = await start_daemon(path)
        await running.until(up())
        old_session = running.daemon.session
        path.write_text(config_yaml(other_url, (TASK_A,), FAST))
        assert (await running.reload())[0] == 200
        await running.until(lambda m: m.get("dcs_migration_offset", task_id=TASK_A) == 7)
        assert old_session is not None and old_session.closed
        assert running.daemon.session is not old_session
    finally:
        await runner.cleanup()
