"""Render the exporter's families as exposition text, fast, and cache the result per format.

``prometheus_client.generate_latest`` builds a ``Metric`` and a ``Sample`` per series and formats
each through generic helpers: about 1.2 s for 10,000 tasks (some 130,000 series). Here the
per-task sample lines are written directly, and each task's lines are kept until one of the task's
fields changes, so a rebuild costs a comparison per task plus the tasks polled since the last one.

``DcsCollector`` stays the reference: the HELP/TYPE lines and the exporter-wide families come from
it (rendered over the state without its tasks), and ``tests/test_exposition.py`` checks that the
output is byte for byte what ``generate_latest(DcsCollector)`` gives, in both formats. The per-task
sample lines are identical in the text format 0.0.4 and OpenMetrics 1.0 (counter samples end in
``_total`` in both; label names sorted); only the HELP/TYPE lines differ.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import chain
from operator import itemgetter

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from exporter.collector import VALUE_METRICS, DcsCollector
from exporter.state import ExporterState, TaskState

_EOF = b"# EOF\n"

# Per-task families in the collector's order, by family name (counters without ``_total``).
VALUE_FAMILIES = tuple(name for name, _, _ in VALUE_METRICS)
_VALUE_ATTRIBUTES = tuple(attribute for _, attribute, _ in VALUE_METRICS)
PER_TASK_FAMILIES = (
    *VALUE_FAMILIES,
    "dcs_migration_task_info",
    "dcs_migration_up",
    "dcs_migration_last_success_timestamp_seconds",
    "dcs_migration_poll_duration_seconds",
    "dcs_migration_polls",
    "dcs_migration_poll_errors",
    "dcs_migration_api_errors",
    "dcs_migration_parse_errors",
)
_INFO, _UP, _LAST, _DURATION, _POLLS, _POLL_ERRORS, _API_ERRORS, _PARSE_ERRORS = range(
    len(VALUE_FAMILIES), len(PER_TASK_FAMILIES)
)
_GETTERS = tuple(itemgetter(index) for index in range(len(PER_TASK_FAMILIES)))


def escape_label_value(value: str) -> str:
    """Escape a label value as both formats require (backslash, newline, double quote)."""
    if "\\" in value or "\n" in value or '"' in value:
        return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
    return value


def format_value(value: float) -> str:
    """A sample value exactly as prometheus_client's ``floatToGoString`` writes it."""
    text = repr(value)
    # Short reprs of finite floats need no change; checked first because it is the common case.
    if len(text) <= 7 and text[-1] not in "fn":
        return text
    if value != value:
        return "NaN"
    if value in (math.inf, -math.inf):
        return "+Inf" if value > 0 else "-Inf"
    dot = text.find(".")
    # Go switches to an exponent for seven or more integer digits.
    if value > 0 and dot > 6:
        mantissa = f"{text[0]}.{text[1:dot]}{text[dot + 1 :]}".rstrip("0.")
        return f"{mantissa}e+{dot - 1:02d}"
    return text


# The fields the lines of a task depend on. Records and details are immutable and compare by
# identity first; counters are copied as (key, count) pairs, usually empty.
_Fingerprint = tuple[object, ...]


def _fingerprint(task: TaskState) -> _Fingerprint:
    poll_errors, api_errors, parse_errors = task.poll_errors, task.api_errors, task.parse_errors
    return (
        task.polls_total,
        task.last_poll_duration,
        task.up,
        task.record,
        task.details,
        task.last_success_time,
        task.polled,
        task.gone,
        task.configured_name,
        # Most tasks have no errors: the empty check keeps them cheap.
        tuple(poll_errors.items()) if poll_errors else (),
        tuple(api_errors.items()) if api_errors else (),
        tuple(parse_errors.items()) if parse_errors else (),
    )


def task_lines(task: TaskState) -> tuple[bytes, ...]:
    """The sample lines of one task, one bytes string per family of PER_TASK_FAMILIES."""
    task_id = escape_label_value(task.task_id)
    labels = f'{{task_id="{task_id}"}} '
    lines: list[str] = [""] * len(PER_TASK_FAMILIES)
    record = task.record
    if record is not None:
        for index, attribute in enumerate(_VALUE_ATTRIBUTES):
            value = getattr(record, attribute)
            if value is not None:
                lines[index] = f"{VALUE_FAMILIES[index]}{labels}{format_value(value)}\n"
    details = task.details
    if not (task.gone or (details is None and not task.configured_name)):
        name = escape_label_value(task.display_name)
        if details is None:
            lines[_INFO] = (
                'dcs_migration_task_info{migration_method="",source_instance_name="",status="",'
                f'target_instance_name="",task_id="{task_id}",task_name="{name}"}} 1.0\n'
            )
        else:
            lines[_INFO] = (
                "dcs_migration_task_info{"
                f'migration_method="{escape_label_value(details.migration_method)}",'
                f'source_instance_name="{escape_label_value(details.source_instance_name)}",'
                f'status="{escape_label_value(details.status)}",'
                f'target_instance_name="{escape_label_value(details.target_instance_name)}",'
                f'task_id="{task_id}",task_name="{name}"}} 1.0\n'
            )
    if task.polled:
        lines[_UP] = f"dcs_migration_up{labels}{'1.0' if task.up else '0.0'}\n"
        if task.last_success_time is not None:
            lines[_LAST] = (
                f"dcs_migration_last_success_timestamp_seconds{labels}"
                f"{format_value(task.last_success_time)}\n"
            )
        if task.last_poll_duration is not None:
            lines[_DURATION] = (
                f"dcs_migration_poll_duration_seconds{labels}"
                f"{format_value(task.last_poll_duration)}\n"
            )
    lines[_POLLS] = f"dcs_migration_polls_total{labels}{format_value(float(task.polls_total))}\n"
    if task.poll_errors:
        lines[_POLL_ERRORS] = "".join(
            f'dcs_migration_poll_errors_total{{reason="{escape_label_value(reason)}",'
            f'task_id="{task_id}"}} {format_value(float(count))}\n'
            for reason, count in sorted(task.poll_errors.items())
        )
    if task.api_errors:
        lines[_API_ERRORS] = "".join(
            f'dcs_migration_api_errors_total{{code="{escape_label_value(code)}",'
            f'status="{escape_label_value(status)}",task_id="{task_id}"}} '
            f"{format_value(float(count))}\n"
            for (status, code), count in sorted(task.api_errors.items())
        )
    if task.parse_errors:
        lines[_PARSE_ERRORS] = "".join(
            f'dcs_migration_parse_errors_total{{field="{escape_label_value(field)}",'
            f'task_id="{task_id}"}} {format_value(float(count))}\n'
            for field, count in sorted(task.parse_errors.items())
        )
    return tuple(line.encode() for line in lines)


@dataclass
class _Entry:
    fingerprint: _Fingerprint
    lines: tuple[bytes, ...]


def _family_blocks(body: bytes) -> list[tuple[str, bytes]]:
    """Split an exposition into (family name, block) pairs at its ``# HELP`` lines."""
    blocks: list[tuple[str, bytes]] = []
    for chunk in body.split(b"# HELP ")[1:]:
        name = chunk.split(b" ", 1)[0].decode()
        blocks.append((name, b"# HELP " + chunk))
    return blocks


class ExpositionRenderer:
    """The exporter's own families (no process metrics, no ``# EOF``), built fast from the state."""

    def __init__(self, state: ExporterState, *, slice_tasks: int = 500) -> None:
        self.state = state
        self.slice_tasks = slice_tasks  # tasks per slice of an async rebuild: a few milliseconds
        self._entries: dict[str, _Entry] = {}
        self.tasks_rendered = 0  # tasks whose lines were (re)built, for tests and the benchmark

    def render(self, openmetrics: bool) -> bytes:
        """The exposition of every family of DcsCollector, in the chosen format."""
        return b"".join(self.render_chunks(openmetrics))

    def render_chunks(self, openmetrics: bool) -> tuple[bytes, ...]:
        """The same exposition as one chunk per family.

        A single buffer of ~12 MB per rebuild (10,000 tasks) makes glibc raise its mmap threshold
        and carve later ones from the heap, which fragments it: RSS grew by 40 MB under steady
        polling. Family-sized chunks (about 1 MB) do not.
        """
        chunks: list[bytes] = []
        for _ in self._build(openmetrics, chunks):
            pass
        return tuple(chunks)

    async def render_chunks_async(self, openmetrics: bool) -> tuple[tuple[bytes, ...], float]:
        """render_chunks() in slices, letting the event loop run in between; also the CPU spent.

        Scrapes served from the cache and polls go on during a rebuild instead of waiting for it
        (at 10,000 tasks a whole rebuild is tens of milliseconds, a first one several hundred).
        """
        chunks: list[bytes] = []
        busy = 0.0
        steps = self._build(openmetrics, chunks)
        while True:
            started = time.perf_counter()
            more = next(steps, False) is None  # the steps yield None; False once exhausted
            busy += time.perf_counter() - started
            if not more:
                return tuple(chunks), busy
            await asyncio.sleep(0)

    def _build(self, openmetrics: bool, chunks: list[bytes]) -> Iterator[None]:
        """Append the chunks to ``chunks``, pausing (yielding) after every slice of the work."""
        frame = self._frame(openmetrics)
        items = list(self.state.tasks.items())
        old = self._entries
        fresh: dict[str, _Entry] = {}
        for start in range(0, len(items), self.slice_tasks):
            for task_id, task in items[start : start + self.slice_tasks]:
                fingerprint = _fingerprint(task)
                entry = old.get(task_id)
                if entry is None or entry.fingerprint != fingerprint:
                    entry = _Entry(fingerprint, task_lines(task))
                    self.tasks_rendered += 1
                fresh[task_id] = entry
            yield
        self._entries = fresh  # drops the lines of tasks that are gone
        entries = [entry.lines for entry in fresh.values()]
        for name, block in frame:
            index = _FAMILY_INDEX.get(name)
            if index is None:
                chunks.append(block)
            else:
                chunks.append(b"".join(chain((block,), map(_GETTERS[index], entries))))
                yield

    def _frame(self, openmetrics: bool) -> list[tuple[str, bytes]]:
        """HELP/TYPE lines of every family and the samples of the exporter-wide ones."""
        # The collector over the state without its tasks: per-task families come out empty.
        registry = CollectorRegistry(auto_describe=False)
        registry.register(DcsCollector(dataclasses.replace(self.state, tasks={})))
        generate: Callable[[CollectorRegistry], bytes] = (
            generate_openmetrics if openmetrics else generate_latest
        )
        return _family_blocks(generate(registry).removesuffix(_EOF))


_FAMILY_INDEX = {}
for _index, _family in enumerate(PER_TASK_FAMILIES):
    # The text format names counters with _total in HELP/TYPE; OpenMetrics without.
    _FAMILY_INDEX[_family] = _index
    if _index >= _POLLS:
        _FAMILY_INDEX[_family + "_total"] = _index


# A rebuild costing less than this is done on every scrape that finds the state changed. Dearer
# ones (thousands of tasks, where the poller changes the state many times a second) wait at least
# MIN_REBUILD_INTERVAL, and long enough that rebuilding takes at most MAX_REBUILD_SHARE of the
# time, but never more than MAX_REBUILD_INTERVAL: the values served are that much older at most.
CHEAP_BUILD_SECONDS = 0.005
MIN_REBUILD_INTERVAL = 1.0
MAX_REBUILD_INTERVAL = 10.0
MAX_REBUILD_SHARE = 0.02
_GZIP_LEVEL = 1  # fast; exposition text compresses about 25:1 even so
_GZIP_WBITS = 31  # zlib's gzip container: header and CRC trailer
# Below this a body compresses in well under a millisecond: not worth a thread hop.
THREAD_COMPRESS_BYTES = 256 * 1024


@dataclass
class Rendering:
    """One build of the exporter's families in one format, and its gzip once compressed."""

    version: int
    built_at: float  # monotonic
    chunks: tuple[bytes, ...]  # see ExpositionRenderer.render_chunks
    gzip_prefix: bytes = b""
    # Compressor that has consumed ``body`` but is not flushed: each scrape copies it and appends
    # the process metrics, so they stay fresh without compressing the big part again.
    compressor: zlib._Compress | None = field(default=None, repr=False)
    compressing: asyncio.Task[None] | None = field(default=None, repr=False)
    _last_gzip: tuple[bytes, bytes] | None = field(default=None, repr=False)

    @property
    def body(self) -> bytes:
        """The whole rendering in one buffer."""
        return b"".join(self.chunks)

    def gzip_with(self, tail: bytes) -> bytes:
        """One gzip stream holding ``body + tail``; needs the compressed prefix (see gzipped()).

        The result for the last tail is kept: scrapes that share a tail share the bytes.
        """
        if self._last_gzip is not None and self._last_gzip[0] is tail:
            return self._last_gzip[1]
        assert self.compressor is not None
        compressor = self.compressor.copy()
        result = b"".join((self.gzip_prefix, compressor.compress(tail), compressor.flush()))
        self._last_gzip = (tail, result)
        return result


def _compress(chunks: tuple[bytes, ...]) -> tuple[bytes, zlib._Compress]:
    """Deflate ``chunks`` without finishing the stream; zlib releases the GIL, so a thread helps."""
    compressor = zlib.compressobj(_GZIP_LEVEL, zlib.DEFLATED, _GZIP_WBITS)
    return b"".join([compressor.compress(chunk) for chunk in chunks]), compressor


def rebuild_interval(
    build_seconds: float,
    *,
    cheap: float = CHEAP_BUILD_SECONDS,
    minimum: float = MIN_REBUILD_INTERVAL,
    maximum: float = MAX_REBUILD_INTERVAL,
    share: float = MAX_REBUILD_SHARE,
) -> float:
    """How long a rendering that took ``build_seconds`` of CPU is served after the state moved."""
    if build_seconds < cheap:
        return 0.0
    return min(maximum, max(minimum, build_seconds / share))


class ExpositionCache:
    """Serve one rendering to many scrapes: rebuilt when the state moved (throttled when dear)."""

    def __init__(
        self,
        state: ExporterState,
        *,
        interval: Callable[[float], float] = rebuild_interval,
        monotonic: Callable[[], float] = time.monotonic,
        thread_compress_bytes: int = THREAD_COMPRESS_BYTES,
        slice_tasks: int = 500,
    ) -> None:
        self.state = state
        self._interval = interval
        self._monotonic = monotonic
        self._thread_compress_bytes = thread_compress_bytes
        self.renderer = ExpositionRenderer(state, slice_tasks=slice_tasks)
        self._latest: dict[bool, Rendering] = {}
        self._build_seconds: dict[bool, float] = {}
        self._building: dict[bool, asyncio.Task[None]] = {}
        self._gzipped: dict[bool, Rendering] = {}  # newest rendering whose gzip is ready
        # Until a scrape asks for uncompressed text, a compressed rendering drops its text: at
        # 10,000 tasks that is 12 MB that Prometheus (which always asks for gzip) never reads.
        self._plain_wanted = False
        self.builds = 0

    def _usable(self, openmetrics: bool, now: float, plain: bool) -> Rendering | None:
        """The latest rendering if it may still be served (as text if ``plain``), else None."""
        latest = self._latest.get(openmetrics)
        if latest is None or (plain and not latest.chunks):
            return None
        if latest.version == self.state.version:
            return latest
        if now - latest.built_at < self._interval(self._build_seconds[openmetrics]):
            return latest
        return None

    def _publish(self, openmetrics: bool, rendering: Rendering, build_seconds: float) -> Rendering:
        newest = self._latest.get(openmetrics)
        if newest is not None and newest.version > rendering.version:
            # A one-go build (current()) finished during a sliced one that began earlier.
            return newest
        self._latest[openmetrics] = rendering
        self._build_seconds[openmetrics] = build_seconds
        self.builds += 1
        return rendering

    def current(self, openmetrics: bool) -> Rendering:
        """The newest rendering in the format, rebuilt first (synchronously) if out of date."""
        self._plain_wanted = True
        now = self._monotonic()
        usable = self._usable(openmetrics, now, plain=True)
        if usable is not None:
            return usable
        version = self.state.version
        started = time.perf_counter()
        chunks = self.renderer.render_chunks(openmetrics)
        rendering = Rendering(version, now, chunks)
        return self._publish(openmetrics, rendering, time.perf_counter() - started)

    async def fresh(self, openmetrics: bool, *, plain: bool = True) -> tuple[Rendering, bool]:
        """The rendering to serve, and whether this call rebuilt it.

        The scrape that finds the rendering out of date waits for a rebuild, so that a lone
        Prometheus always sees current values; scrapes arriving during that rebuild are served
        the previous rendering rather than queueing behind it. ``plain``: the caller needs the
        uncompressed text (``chunks``), not only the gzip.
        """
        if plain:
            self._plain_wanted = True
        now = self._monotonic()
        usable = self._usable(openmetrics, now, plain)
        if usable is not None:
            return usable, False
        building = self._building.get(openmetrics)
        if building is not None:
            previous = self._latest.get(openmetrics)
            if previous is not None and (previous.chunks or not plain):
                return previous, False
            await asyncio.shield(building)
            return self._latest[openmetrics], False
        # The version now: the build reads the state after this, so it is never newer than it.
        version = self.state.version
        building = asyncio.get_running_loop().create_task(self._rebuild(openmetrics, now, version))
        self._building[openmetrics] = building
        # Shielded: a scrape that gives up must not cancel the rebuild others wait for.
        await asyncio.shield(building)
        return self._latest[openmetrics], True

    async def _rebuild(self, openmetrics: bool, now: float, version: int) -> None:
        try:
            chunks, busy = await self.renderer.render_chunks_async(openmetrics)
            self._publish(openmetrics, Rendering(version, now, chunks), busy)
        finally:
            del self._building[openmetrics]

    async def gzipped(self, openmetrics: bool) -> Rendering:
        """A rendering whose gzip prefix is ready.

        As with the rebuild, the scrape that caused it waits for its compression, and scrapes
        arriving meanwhile get the previous compressed rendering if there is one.
        """
        latest, rebuilt = await self.fresh(openmetrics, plain=False)
        if latest.compressor is not None:
            return latest
        if sum(map(len, latest.chunks)) < self._thread_compress_bytes:
            self._compressed(openmetrics, latest, *_compress(latest.chunks))
            return latest
        if latest.compressing is None:
            latest.compressing = asyncio.get_running_loop().create_task(
                self._compress_rendering(openmetrics, latest)
            )
        previous = self._gzipped.get(openmetrics)
        if previous is not None and not rebuilt:
            return previous
        await asyncio.shield(latest.compressing)
        return latest

    async def _compress_rendering(self, openmetrics: bool, rendering: Rendering) -> None:
        loop = asyncio.get_running_loop()
        prefix, compressor = await loop.run_in_executor(None, _compress, rendering.chunks)
        self._compressed(openmetrics, rendering, prefix, compressor)

    def _compressed(
        self, openmetrics: bool, rendering: Rendering, prefix: bytes, compressor: zlib._Compress
    ) -> None:
        rendering.gzip_prefix, rendering.compressor = prefix, compressor
        if not self._plain_wanted:
            rendering.chunks = ()
        previous = self._gzipped.get(openmetrics)
        if previous is None or previous.version <= rendering.version:
            self._gzipped[openmetrics] = rendering
