"""Tests for exporter.landing: trends, ETA, the JSON feed, the page and its wiring into the app."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest
from aiohttp import web

from exporter import landing
from exporter.client import TaskDetails
from exporter.landing import History, Sample, Trend, full_eta, offset_trend
from exporter.state import ExporterState, TaskState
from exporter.stats import StatsRecord
from exporter.web import create_app
from tests.support import TASK_A, TASK_B, Clients, basic_auth, basic_auth_web_config

HOSTILE = "<img src=x onerror=alert(1)>\"'&"
NOW = 1_700_000_100.0


def samples(*points: tuple[float, float | None, float | None]) -> list[Sample]:
    """Samples from (at, offset, progress) triples."""
    return [Sample(at, offset, progress) for at, offset, progress in points]


def polled_task(
    task_id: str = TASK_A,
    *,
    offset: float | None = 5000.0,
    progress: float | None = 0.45,
    at: float = 100.0,
    name: str | None = "orders-cache",
) -> TaskState:
    """A task whose last poll succeeded ``NOW - last_success_time`` = 2 s ago."""
    return TaskState(
        task_id=task_id,
        configured_name=name,
        record=StatsRecord(
            progress_ratio=progress,
            offset=offset,
            source_keys=1_250_000.0,
            target_keys=562_500.0,
            target_input_bytes_per_second=12.5 * 1024,
            target_ops_per_second=300.0,
            migrating=1.0,
        ),
        details=TaskDetails(
            task_id=task_id,
            task_name="orders",
            status="FULLMIGRATING",
            migration_type="online_migration",
            migration_method="full_incr_migration",
            source_instance_name="src",
            target_instance_name="dst",
        ),
        polled=True,
        up=True,
        last_success_time=NOW - 2,
        last_success_monotonic=at,
    )


# ---- trends and ETA ----------------------------------------------------------------------------


def test_trend_falling_offset_has_negative_rate() -> None:
    """An offset that shrinks over the window is "falling" at its average rate."""
    trend = offset_trend(samples((0, 9000, 1), (30, 6000, 1), (60, 3000, 1)))
    assert trend.kind == "falling"
    assert trend.rate == pytest.approx(-100.0)
    assert trend.label == "↓ 100/s"


def test_trend_rising_offset() -> None:
    """An offset that grows is "rising", with a compact rate."""
    trend = offset_trend(samples((0, 1000, 1), (10, 13_000, 1)))
    assert (trend.kind, trend.label) == ("rising", "↑ 1.2k/s")


def test_trend_constant_nonzero_offset_is_flat_with_duration() -> None:
    """The same non-zero offset on successive polls is "flat", for as long as it has held."""
    trend = offset_trend(samples((0, 10, 1), (30, 4242, 1), (90, 4242, 1), (280, 4242, 1)))
    assert trend.kind == "flat"
    assert trend.held_seconds == 250
    assert trend.label == "flat for 4m 10s"


def test_trend_zero_offset_is_in_sync_even_alone() -> None:
    """Offset 0 means in sync, with one sample or many."""
    assert offset_trend(samples((0, 0, 1))).label == "in sync"
    assert offset_trend(samples((0, 500, 1), (5, 0, 1))).kind == "sync"


def test_trend_zero_offset_during_full_copy_is_not_in_sync() -> None:
    """Offset 0 while the full copy is still running is "full copy", not "in sync"."""
    trend = offset_trend(samples((0, 0, 0.04), (5, 0, 0.05)))
    assert (trend.kind, trend.label) == ("copying", "full copy")


def test_trend_unknown_without_history() -> None:
    """One non-zero reading, or none with an offset, says nothing about a trend."""
    assert offset_trend(samples((0, 500, 1))) == Trend("unknown")
    assert offset_trend(samples((0, None, 1), (5, None, 1))).label == landing.DASH


def test_trend_window_ignores_old_samples() -> None:
    """Only samples within the window set the rate: an old peak does not bend it."""
    trend = offset_trend(samples((0, 90_000, 1), (1000, 2000, 1), (1100, 1000, 1)), window=300)
    assert trend.rate == pytest.approx(-10.0)


def test_trend_same_ends_is_steady() -> None:
    """An offset that moved but ends where the window began is "steady"."""
    trend = offset_trend(samples((0, 100, 1), (10, 900, 1), (20, 400, 1), (30, 100, 1)))
    assert trend.kind == "steady"


def test_full_eta_from_two_samples() -> None:
    """10 % in 100 s with 50 % done leaves 500 s."""
    assert full_eta(Sample(0, 0, 0.40), Sample(100, 0, 0.50)) == pytest.approx(500.0)


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (None, Sample(0, 0, 0.5), None),  # one sample
        (Sample(0, 0, 0.5), Sample(60, 0, 0.5), None),  # no progress
        (Sample(0, 0, 0.6), Sample(60, 0, 0.5), None),  # going backwards
        (Sample(0, 0, None), Sample(60, 0, 0.5), None),  # unreadable before
        (None, Sample(0, 0, 1.0), 0.0),  # complete
        (Sample(0, 0, 0.5), None, None),  # nothing now
    ],
)
def test_full_eta_unknown_or_done(
    old: Sample | None, new: Sample | None, expected: float | None
) -> None:
    """Without a positive rate the ETA is unknown; at 100 % it is 0."""
    assert full_eta(old, new) == expected


# ---- history -----------------------------------------------------------------------------------


def test_history_takes_one_sample_per_poll() -> None:
    """Observing the same poll many times records it once; a new poll adds a sample."""
    state, history = ExporterState(), History()
    state.tasks[TASK_A] = polled_task(at=100.0)
    for _ in range(5):
        state.changed()
        history.observe(state)
    assert len(history.samples(TASK_A)) == 1
    state.tasks[TASK_A] = polled_task(at=130.0, offset=4000.0)
    state.changed()
    history.observe(state)
    assert [s.offset for s in history.samples(TASK_A)] == [5000.0, 4000.0]


def test_history_is_bounded_by_count_and_age() -> None:
    """The ring keeps at most max_samples, none older than keep_seconds before the newest."""
    history = History(keep_seconds=100.0, max_samples=5)
    for at in range(0, 300, 10):
        history.add(TASK_A, Sample(float(at), 1.0, 0.5))
    kept = history.samples(TASK_A)
    assert len(kept) == 5
    assert kept[0].at >= kept[-1].at - 100.0
    history2 = History(keep_seconds=25.0, max_samples=100)
    for at in range(0, 100, 10):
        history2.add(TASK_A, Sample(float(at), 1.0, 0.5))
    assert [s.at for s in history2.samples(TASK_A)] == [70.0, 80.0, 90.0]


def test_history_forgets_removed_tasks_and_skips_unpolled() -> None:
    """A task gone from the state loses its ring; a task without a good poll gets none."""
    state, history = ExporterState(), History()
    state.tasks[TASK_A] = polled_task()
    state.tasks[TASK_B] = TaskState(task_id=TASK_B)
    state.changed()
    history.observe(state)
    assert history.task_ids() == [TASK_A]
    del state.tasks[TASK_A]
    state.changed()
    history.observe(state)
    assert history.task_ids() == []


# ---- snapshot ----------------------------------------------------------------------------------


def test_snapshot_fields_and_display() -> None:
    """The JSON entry carries raw numbers (integers where whole) and the page's strings."""
    state, history = ExporterState(), History()
    state.tasks[TASK_A] = polled_task(at=100.0, offset=6000.0, progress=0.40)
    state.changed()
    history.observe(state)
    state.tasks[TASK_A] = polled_task(at=160.0, offset=5000.0, progress=0.45)
    state.changed()
    tasks = landing.snapshot(state, history, NOW)["tasks"]
    assert isinstance(tasks, list)
    (task,) = tasks
    assert task["name"] == "orders-cache"
    assert task["status"] == "FULLMIGRATING"
    assert task["health"] == "up"
    assert task["offset"] == 5000 and isinstance(task["offset"], int)
    assert task["offset_trend"] == "falling"
    assert task["full_eta_seconds"] == pytest.approx(660.0)
    assert task["last_success_age_seconds"] == 2.0
    assert task["display"] == {
        "task": "orders-cache",
        "status": "FULLMIGRATING",
        "progress": "45 % · ETA 11m 00s",
        "offset": "5,000",
        "trend": "↓ 17/s",
        "keys": "1,250,000 → 562,500",
        "ops": "300 ops/s · 12.5 KiB/s",
        "last_poll": "2s ago",
        "errors": "none",
    }
    json.dumps(task)  # must be serialisable as is


def test_snapshot_of_failing_and_pending_tasks() -> None:
    """A failing task shows its reason, count and message; an unpolled one is pending."""
    state = ExporterState()
    failing = polled_task()
    failing.up, failing.record = False, None
    failing.consecutive_failures, failing.last_reason = 3, "timeout"
    failing.last_error = "x" * 1000
    failing.poll_errors["timeout"] = 3
    state.tasks[TASK_A] = failing
    state.tasks[TASK_B] = TaskState(task_id=TASK_B)
    tasks = landing.snapshot(state, History(), NOW)["tasks"]
    assert isinstance(tasks, list)
    down, pending = tasks
    assert down["health"] == "down"
    assert down["display"]["errors"].startswith("timeout ×3: xxx")
    assert len(down["display"]["errors"]) < 400  # long messages are cut
    assert down["display"]["offset"] == landing.DASH
    assert pending["health"] == "pending"
    assert pending["name"] == TASK_B
    assert pending["display"]["last_poll"] == landing.DASH


@pytest.mark.parametrize("how", ["values dropped", "gone"])
def test_a_task_without_current_values_has_no_trend(how: str) -> None:
    """Once a failing task's values are dropped, or the cloud says it is gone, its frozen
    history does not read as "flat" (a stall) and no rate is shown: the trend is unknown."""
    state, history = ExporterState(), History()
    for at in (100.0, 130.0, 160.0):
        state.tasks[TASK_A] = polled_task(at=at, offset=5000.0)
        state.changed()
        history.observe(state)
    task = state.tasks[TASK_A]
    task.up = False
    if how == "gone":
        task.gone = True
    task.record = None
    state.changed()
    (entry,) = landing.snapshot(state, history, NOW)["tasks"]  # type: ignore[misc]
    assert entry["offset_trend"] == "unknown"
    assert entry["offset_rate"] is None and entry["offset_held_seconds"] is None
    assert entry["display"]["trend"] == landing.DASH


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (None, "–"),
        (-1, "–"),
        (0, "0s"),
        (59.4, "59s"),
        (125, "2m 05s"),
        (3 * 3600 + 50 * 60, "3h 50m"),
        (2 * 86400 + 4 * 3600, "2d 4h"),
    ],
)
def test_format_duration(seconds: float | None, text: str) -> None:
    """Durations read at a glance, with the unit that matters."""
    assert landing.format_duration(seconds) == text


# ---- the page ----------------------------------------------------------------------------------


def test_page_escapes_everything_from_the_cloud() -> None:
    """A task name, status and error message full of markup come out as text, never as tags."""
    state = ExporterState()
    task = polled_task(name=HOSTILE)
    task.details = TaskDetails(TASK_A, HOSTILE, HOSTILE, "", "", "", "")
    task.up, task.consecutive_failures, task.last_reason = False, 1, "server_error"
    task.last_error = HOSTILE
    state.tasks[TASK_A] = task
    page = landing.render_page(landing.snapshot(state, History(), NOW))
    assert "<img" not in page
    assert "onerror=alert(1)&gt;&quot;&#x27;&amp;" in page
    assert page.count("&lt;img src=x") == 3  # name, status, error


def test_page_has_one_row_per_task_with_labelled_cells() -> None:
    """Each task is a row with one labelled cell per column, a progress bar where known."""
    state = ExporterState()
    state.tasks[TASK_A] = polled_task()
    state.tasks[TASK_B] = TaskState(task_id=TASK_B)
    page = landing.render_page(landing.snapshot(state, History(), NOW))
    rows = re.findall(r"<tr class=\"health-(\w+)\" data-task-id=\"([^\"]+)\">", page)
    assert rows == [("up", TASK_A), ("pending", TASK_B)]
    assert page.count("<td ") == 2 * len(landing.COLUMNS)
    assert page.count('<progress max="1" value="0.45">') == 1
    assert 'data-label="Offset trend"' in page


def test_page_without_tasks_says_so() -> None:
    """An empty config gives a clear row instead of an empty table."""
    page = landing.render_page(landing.snapshot(ExporterState(), History(), NOW))
    assert "No tasks configured." in page


def test_page_and_assets_reference_nothing_outside_the_daemon() -> None:
    """No absolute URL in the page, the script or the style sheet: all is served by the daemon."""
    page = landing.render_page(landing.snapshot(ExporterState(), History(), NOW))
    static = Path(landing.__file__).parent / "static"
    script, style = (static / "landing.js").read_text(), (static / "landing.css").read_text()
    for text in (page, script, style):
        assert "://" not in text
        assert "@import" not in text and "url(" not in text
    assert 'src="//' not in page and 'href="//' not in page
    assert re.findall(r'(?:src|href)="([^"]+)"', page) == [
        "static/landing.css",
        "static/landing.js",
        "metrics",
        "healthz",
        "ready",
        "api/v1/tasks",
    ]
    assert 'fetch("api/v1/tasks"' in script  # relative: works behind a path prefix too


# ---- in the app --------------------------------------------------------------------------------


async def test_app_serves_page_feed_and_assets(clients: Clients) -> None:
    """/, /api/v1/tasks and the static files answer from the same state, with a strict CSP."""
    state = ExporterState()
    state.tasks[TASK_A] = polled_task()
    state.changed()
    client = await clients(create_app(state))

    page = await client.get("/")
    assert page.status == 200 and page.content_type == "text/html"
    assert page.headers["Content-Security-Policy"] == landing.CONTENT_SECURITY_POLICY
    assert "orders-cache" in await page.text()

    feed = await client.get("/api/v1/tasks")
    assert feed.status == 200 and feed.content_type == "application/json"
    assert feed.headers["Cache-Control"] == "no-store"
    document = await feed.json()
    assert [task["task_id"] for task in document["tasks"]] == [TASK_A]

    for path, content_type in (
        ("/static/landing.js", "text/javascript"),
        ("/static/landing.css", "text/css"),
    ):
        asset = await client.get(path)
        assert asset.status == 200 and asset.content_type == content_type
        assert len(await asset.read()) > 500


async def test_app_feed_follows_state_changes(clients: Clients) -> None:
    """A new poll shows up in the next answer of the feed, with its trend."""
    state = ExporterState()
    state.tasks[TASK_A] = polled_task(at=100.0, offset=9000.0)
    state.changed()
    client = await clients(create_app(state))
    first = await (await client.get("/api/v1/tasks")).json()
    state.tasks[TASK_A] = polled_task(at=130.0, offset=6000.0)
    state.changed()
    second = await (await client.get("/api/v1/tasks")).json()
    assert first["tasks"][0]["offset_trend"] == "unknown"
    assert second["tasks"][0]["offset"] == 6000
    assert second["tasks"][0]["offset_rate"] == pytest.approx(-100.0)


async def test_app_pages_need_the_same_auth_as_metrics(tmp_path: Path, clients: Clients) -> None:
    """With basic auth configured, the page, the feed and the assets all ask for it."""
    web_config = basic_auth_web_config(tmp_path, "alice", "s3cret")
    client = await clients(create_app(ExporterState(), web_config=web_config))
    good = basic_auth("alice", "s3cret")
    for path in ("/", "/api/v1/tasks", "/static/landing.js", "/metrics"):
        assert (await client.get(path)).status == 401, path
        assert (await client.get(path, headers=good)).status == 200, path


async def test_sampler_builds_history_without_requests() -> None:
    """While the app runs, the history fills from the state even if nobody loads the page."""
    state = ExporterState()
    app = web.Application()
    history = landing.install(app, state, sample_every=0.01)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        for at, offset in ((100.0, 3000.0), (130.0, 2000.0)):
            state.tasks[TASK_A] = polled_task(at=at, offset=offset)
            state.changed()
            await asyncio.sleep(0.05)
        assert [s.offset for s in history.samples(TASK_A)] == [3000.0, 2000.0]
    finally:
        await runner.cleanup()
