"""Tests for exporter.exposition: the fast renderer matches prometheus_client, and the cache."""

from __future__ import annotations

import asyncio
import copy
import gzip
import subprocess
from collections import Counter
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.utils import floatToGoString

from exporter.client import TaskDetails
from exporter.collector import DcsCollector
from exporter.exposition import (
    ExpositionCache,
    ExpositionRenderer,
    format_value,
    rebuild_interval,
)
from exporter.state import ExporterState, TaskState
from exporter.stats import StatsRecord
from exporter.web import MetricsRenderer, create_app
from tests.tools import find_tool

# Label values with everything that needs escaping, and some that does not.
label_text = st.text(alphabet=st.sampled_from('ab-_"\\\n é✓0'), max_size=8)
values = st.none() | st.floats(allow_nan=False, allow_infinity=False) | st.sampled_from([0.0, 1.0])
counters = st.dictionaries(label_text, st.integers(1, 10**6), max_size=3)


@st.composite
def task_states(draw: st.DrawFn, task_id: str) -> TaskState:
    """A TaskState in any combination the poller can leave it in."""
    task = TaskState(task_id=task_id, configured_name=draw(st.none() | label_text))
    if draw(st.booleans()):
        task.record = StatsRecord(*(draw(values) for _ in range(7)))
    if draw(st.booleans()):
        task.details = TaskDetails(task_id, *(draw(label_text) for _ in range(6)))
    task.polled, task.up, task.gone = draw(st.booleans()), draw(st.booleans()), draw(st.booleans())
    task.last_success_time = draw(st.none() | st.floats(0, 2e9))
    task.last_poll_duration = draw(st.none() | st.floats(0, 100))
    task.polls_total = draw(st.integers(0, 10**9))
    task.poll_errors = Counter(draw(counters))
    task.api_errors = Counter(
        {
            (status, code): n
            for (status, code), n in draw(
                st.dictionaries(st.tuples(label_text, label_text), st.integers(1, 99), max_size=3)
            ).items()
        }
    )
    task.parse_errors = Counter(draw(counters))
    return task


@st.composite
def exporter_states(draw: st.DrawFn) -> ExporterState:
    """An ExporterState with a few tasks and any exporter-wide values."""
    state = ExporterState()
    for task_id in draw(st.lists(label_text.filter(bool), unique=True, max_size=4)):
        state.tasks[task_id] = draw(task_states(task_id))
    state.poll_cycles_total = draw(st.integers(0, 10**6))
    state.clock_skew_seconds = draw(st.dictionaries(label_text, st.floats(-1e4, 1e4), max_size=2))
    state.config_reload_ok = draw(st.booleans())
    return state


def reference(state: ExporterState, openmetrics: bool) -> bytes:
    """What prometheus_client makes of DcsCollector, without the OpenMetrics ``# EOF``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DcsCollector(state))
    if openmetrics:
        return generate_openmetrics(registry).removesuffix(b"# EOF\n")
    return generate_latest(registry)


def sample_state(count: int) -> ExporterState:
    """A state with ``count`` healthy polled tasks."""
    state = ExporterState()
    for index in range(count):
        task_id = f"task-{index}"
        task = TaskState(task_id=task_id, configured_name=f"name-{index}")
        task.record = StatsRecord(0.5, 100.0 + index, 1e6, 5e5, 2048.0, 30.0, 1.0)
        task.polled = task.up = True
        task.last_success_time, task.last_poll_duration, task.polls_total = 1.7e9, 0.01, 3
        state.tasks[task_id] = task
    return state


@given(st.floats())
def test_format_value_matches_prometheus_client(value: float) -> None:
    """Every float, including inf and nan, is written as floatToGoString writes it."""
    assert format_value(value) == floatToGoString(value)


@settings(max_examples=200, deadline=None)
@given(exporter_states(), st.booleans())
def test_render_matches_generate_latest(state: ExporterState, openmetrics: bool) -> None:
    """The fast renderer gives byte for byte what generate_latest gives for DcsCollector."""
    assert ExpositionRenderer(state).render(openmetrics) == reference(state, openmetrics)


@settings(max_examples=100, deadline=None)
@given(exporter_states(), exporter_states())
def test_reused_renderer_follows_every_change(first: ExporterState, second: ExporterState) -> None:
    """A renderer that has cached one state's lines renders another state exactly, field by field."""
    state = ExporterState()
    renderer = ExpositionRenderer(state)
    state.tasks.update(first.tasks)
    renderer.render(False)
    # Same task IDs get the second state's fields in place, as the poller mutates them.
    for task_id, task in second.tasks.items():
        target = state.tasks.get(task_id)
        if target is None:
            state.tasks[task_id] = task
        else:
            target.__dict__.update(task.__dict__)
    for task_id in list(state.tasks):
        if task_id not in second.tasks:
            del state.tasks[task_id]
    state.poll_cycles_total = second.poll_cycles_total
    assert renderer.render(False) == reference(state, False)


TASK_FIELDS = tuple(name for name in TaskState.__dataclass_fields__ if name != "task_id")


@settings(max_examples=150, deadline=None)
@given(task_states("t"), task_states("t"))
def test_one_field_changing_alone_is_seen(first: TaskState, second: TaskState) -> None:
    """Whichever single field of a task changes, the cached renderer shows the change."""
    for name in TASK_FIELDS:
        task = copy.deepcopy(first)
        state = ExporterState(tasks={"t": task})
        renderer = ExpositionRenderer(state)
        renderer.render(False)
        setattr(task, name, copy.deepcopy(getattr(second, name)))
        assert renderer.render(False) == reference(state, False), name


def test_task_state_fields_are_the_ones_the_renderer_knows() -> None:
    """A new TaskState field fails here: check exposition.task_lines, _fingerprint and the
    task_states strategy above, then add the field to this list."""
    assert set(TASK_FIELDS) == {
        "configured_name",
        "record",
        "details",
        "polled",
        "up",
        "gone",
        "last_success_time",
        "last_success_monotonic",
        "last_poll_duration",
        "last_error",
        "last_reason",
        "consecutive_failures",
        "backoff_failures",
        "polls_total",
        "poll_errors",
        "api_errors",
        "parse_errors",
    }


def test_counter_increment_alone_is_seen() -> None:
    """A failure counted with no other field moving (a frozen clock) still changes the output."""
    state = sample_state(2)
    renderer = ExpositionRenderer(state)
    renderer.render(False)
    state.tasks["task-1"].api_errors[("503", "none")] += 1
    assert b'dcs_migration_api_errors_total{code="none",status="503",task_id="task-1"} 1.0' in (
        renderer.render(False)
    )
    state.tasks["task-1"].api_errors[("503", "none")] += 1
    assert b'status="503",task_id="task-1"} 2.0' in renderer.render(False)


def test_only_changed_tasks_are_rebuilt() -> None:
    """After one task changes, a render rebuilds that task's lines and reuses the others."""
    state = sample_state(50)
    renderer = ExpositionRenderer(state)
    renderer.render(False)
    assert renderer.tasks_rendered == 50
    state.tasks["task-7"].polls_total += 1
    renderer.render(True)
    assert renderer.tasks_rendered == 51


def test_removed_task_loses_its_lines() -> None:
    """A task dropped from the state is gone from the next rendering."""
    state = sample_state(3)
    renderer = ExpositionRenderer(state)
    assert b'task_id="task-2"' in renderer.render(False)
    del state.tasks["task-2"]
    assert b'task_id="task-2"' not in renderer.render(False)


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_cache_reuses_until_the_version_moves() -> None:
    """Without a state change the same rendering is served; a change rebuilds a cheap one at once."""
    state = sample_state(3)
    cache = ExpositionCache(state, monotonic=FakeClock())
    first = cache.current(False)
    assert cache.current(False) is first
    state.tasks["task-0"].up = False
    state.changed()
    second = cache.current(False)
    assert second is not first
    assert b'dcs_migration_up{task_id="task-0"} 0.0' in second.body
    assert cache.builds == 2


def test_dear_rebuilds_wait_for_their_interval() -> None:
    """When a build is dear, a moving state is rebuilt only once its interval has passed."""
    clock = FakeClock()
    state = sample_state(3)
    cache = ExpositionCache(state, interval=lambda build_seconds: 1.0, monotonic=clock)
    first = cache.current(False)
    state.changed()
    clock.now += 0.5
    assert cache.current(False) is first
    clock.now += 0.5
    assert cache.current(False) is not first


@pytest.mark.parametrize(
    ("build_seconds", "interval"),
    [(0.001, 0.0), (0.01, 1.0), (0.05, 2.5), (0.1, 5.0), (1.0, 10.0)],
)
def test_rebuild_interval_keeps_rebuilds_to_a_small_share(
    build_seconds: float, interval: float
) -> None:
    """Cheap builds are redone at once; dear ones take at most 2 % of the time, within 1-10 s."""
    assert rebuild_interval(build_seconds) == pytest.approx(interval)


async def test_scrapes_during_an_async_rebuild_get_the_previous_rendering() -> None:
    """While one scrape waits for a rebuild, others are served the previous rendering at once."""
    state = sample_state(6)
    cache = ExpositionCache(state, slice_tasks=1)  # a rebuild of several slices
    old, _ = await cache.fresh(False)
    state.tasks["task-2"].polls_total = 42
    state.changed()
    rebuilding = asyncio.get_running_loop().create_task(cache.fresh(False))
    await asyncio.sleep(0)  # the rebuild has started and yielded
    assert await cache.fresh(False) == (old, False)
    new, rebuilt = await rebuilding
    assert rebuilt
    assert b'dcs_migration_polls_total{task_id="task-2"} 42.0' in new.body
    assert await cache.fresh(False) == (new, False)


async def test_async_and_sync_rebuilds_render_the_same() -> None:
    """The sliced rebuild gives the same bytes as the one-go rebuild and as prometheus_client."""
    state = sample_state(7)
    chunks, busy = await ExpositionRenderer(state, slice_tasks=2).render_chunks_async(True)
    assert b"".join(chunks) == ExpositionRenderer(state).render(True) == reference(state, True)
    assert busy > 0


def test_formats_are_cached_separately() -> None:
    """Text and OpenMetrics renderings differ only in HELP/TYPE lines and are cached apart."""
    state = sample_state(2)
    cache = ExpositionCache(state)
    assert cache.current(False).body == reference(state, False)
    assert cache.current(True).body == reference(state, True)


@pytest.mark.parametrize("thread_compress_bytes", [0, 10**9])
async def test_gzip_holds_body_and_tail(thread_compress_bytes: int) -> None:
    """The cached compressor plus a fresh tail decompress to the body followed by the tail."""
    state = sample_state(20)
    cache = ExpositionCache(state, thread_compress_bytes=thread_compress_bytes)
    rendering = await cache.gzipped(True)
    body = reference(state, True)
    assert gzip.decompress(rendering.gzip_with(b"# EOF\n")) == body + b"# EOF\n"
    # The compressor is copied, not consumed: a second scrape gets a whole stream too.
    assert gzip.decompress(rendering.gzip_with(b"tail\n")) == body + b"tail\n"


async def test_gzip_for_the_same_tail_is_shared() -> None:
    """Scrapes with the same tail object get the same finished bytes; a new tail gets its own."""
    state = sample_state(3)
    rendering = await ExpositionCache(state).gzipped(False)
    tail = b"process_open_fds 7.0\n"
    first = rendering.gzip_with(tail)
    assert rendering.gzip_with(tail) is first
    other = rendering.gzip_with(b"process_open_fds 8.0\n")
    assert gzip.decompress(other) == reference(state, False) + b"process_open_fds 8.0\n"


async def test_text_is_dropped_until_someone_asks_for_it() -> None:
    """Gzip-only scrapes leave no uncompressed copy; a plain scrape rebuilds it, and it is kept."""
    state = sample_state(4)
    cache = ExpositionCache(state)
    compressed = await cache.gzipped(False)
    assert compressed.chunks == ()
    plain, rebuilt = await cache.fresh(False)
    assert rebuilt and plain.body == reference(state, False)
    state.changed()
    kept = await cache.gzipped(False)
    assert kept.compressor is not None and kept.body == reference(state, False)


def test_chunks_are_one_per_family() -> None:
    """The rendering comes as one chunk per family, which join to the whole exposition."""
    state = sample_state(4)
    chunks = ExpositionRenderer(state).render_chunks(True)
    assert b"".join(chunks) == reference(state, True)
    assert all(chunk.startswith(b"# HELP ") and chunk.count(b"# HELP ") == 1 for chunk in chunks)


async def test_scrape_during_compression_gets_previous_gzip() -> None:
    """While a new rendering compresses, other gzip scrapes get the previous one, not a wait."""
    state = sample_state(5)
    cache = ExpositionCache(state, thread_compress_bytes=0)
    old = await cache.gzipped(False)
    state.changed()
    new = cache.current(False)  # rebuilt by an uncompressed scrape
    assert await cache.gzipped(False) is old
    assert new.compressing is not None
    await new.compressing
    assert await cache.gzipped(False) is new


async def test_rebuilding_scrape_waits_for_its_own_gzip() -> None:
    """The scrape that finds the state changed gets the new data, compressed."""
    state = sample_state(5)
    cache = ExpositionCache(state, thread_compress_bytes=0)
    await cache.gzipped(False)
    state.tasks["task-3"].polls_total = 99
    state.changed()
    rendering = await cache.gzipped(False)
    assert b'dcs_migration_polls_total{task_id="task-3"} 99.0' in gzip.decompress(
        rendering.gzip_with(b"")
    )


async def test_concurrent_first_scrapes_share_one_compression() -> None:
    """Many gzip scrapes of a fresh cache all get the one rendering, compressed once."""
    cache = ExpositionCache(sample_state(5), thread_compress_bytes=0)
    results = await asyncio.gather(*(cache.gzipped(True) for _ in range(5)))
    assert all(result is results[0] for result in results)
    assert cache.builds == 1


def test_promtool_accepts_the_exposition(tmp_path: Path) -> None:
    """promtool check metrics finds nothing wrong with a rendering that has every family."""
    promtool = find_tool("promtool")
    state = sample_state(3)
    task = state.tasks["task-1"]
    task.poll_errors["timeout"] += 2
    task.api_errors[("429", "APIGW.0308")] += 1
    task.parse_errors["offset"] += 1
    task.details = TaskDetails(
        "task-1", "orders", "MIGRATING", "online_migration", "full", "a", "b"
    )
    state.clock_skew_seconds = {"default": 1.5}
    body = ExpositionRenderer(state).render(False)
    result = subprocess.run(
        [promtool, "check", "metrics"], input=body, capture_output=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("openmetrics", [False, True])
async def test_metrics_endpoint_negotiates_gzip_and_format(openmetrics: bool) -> None:
    """/metrics gives the same exposition with and without gzip, in the negotiated format."""
    state = sample_state(3)
    accept = "application/openmetrics-text; version=1.0.0" if openmetrics else "text/plain"
    async with TestClient(TestServer(create_app(state))) as client:
        plain = await client.get(
            "/metrics", headers={"Accept": accept, "Accept-Encoding": "identity"}
        )
        zipped = await client.get(
            "/metrics", headers={"Accept": accept, "Accept-Encoding": "gzip"}, auto_decompress=False
        )
        plain_body, zipped_body = await plain.read(), await zipped.read()
    assert "Content-Encoding" not in plain.headers
    assert zipped.headers["Content-Encoding"] == "gzip"
    assert plain.headers["Content-Type"].startswith(
        "application/openmetrics-text" if openmetrics else "text/plain"
    )
    ours = reference(state, openmetrics)
    for body in (plain_body, gzip.decompress(zipped_body)):
        assert body.startswith(ours)
        assert b"process_cpu_seconds" in body[len(ours) :]
        assert body.endswith(b"# EOF\n") == openmetrics


async def test_scrapes_within_a_second_share_the_gzip_bytes() -> None:
    """Process metrics are rendered at most once a second, so scrapes in between share one gzip."""
    clock = FakeClock()
    renderer = MetricsRenderer(sample_state(3), monotonic=clock)
    first = await renderer.render_gzip(True)
    clock.now += 0.5
    assert await renderer.render_gzip(True) is first
    clock.now += 0.5
    later = await renderer.render_gzip(True)
    assert later is not first
    assert gzip.decompress(later).endswith(b"# EOF\n")


async def test_an_older_sliced_build_does_not_replace_a_newer_one() -> None:
    """A sync rebuild that finishes during a sliced one of an older state stays the latest."""
    state = sample_state(6)
    cache = ExpositionCache(state, slice_tasks=1)
    await cache.fresh(False)
    state.changed()
    sliced = asyncio.get_running_loop().create_task(cache.fresh(False))
    await asyncio.sleep(0)  # the sliced rebuild has begun with the current version
    state.tasks["task-1"].polls_total = 7
    state.changed()
    newer = cache.current(False)
    served, _ = await sliced
    assert served is newer
    assert cache.current(False) is newer
