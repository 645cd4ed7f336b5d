"""The landing page ``/`` and its JSON feed ``/api/v1/tasks``: live task status without Grafana.

Both are built from the poller's state, like ``/metrics``, and never wait on the cloud. The page is
rendered complete on the server (it works without JavaScript) and ``static/landing.js`` refreshes
its table from the JSON every few seconds. Everything it needs is served by the daemon itself, and a
strict Content-Security-Policy keeps it that way.

The offset trend and the ETA of the full phase need a little history, which the poller does not
keep: :class:`History` holds a short, bounded ring of readings per task, sampled whenever the state
changes. It lives only in this web layer and forgets tasks that leave the state.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import importlib.resources
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from aiohttp import web

from exporter import __version__
from exporter.state import ExporterState, TaskState

__all__ = [
    "COLUMNS",
    "DASH",
    "History",
    "Sample",
    "Trend",
    "format_count",
    "format_duration",
    "full_eta",
    "install",
    "offset_trend",
    "render_page",
    "snapshot",
]

DASH = "–"  # shown for every value that is not known
REFRESH_SECONDS = 5
TREND_WINDOW_SECONDS = 300.0  # like the deriv(...[5m]) of the recording rules
HISTORY_SECONDS = 900.0  # progress moves in whole percent: the ETA needs a longer baseline
HISTORY_SAMPLES = 180  # hard bound per task, whatever the poll interval
SAMPLE_EVERY_SECONDS = 1.0
MAX_ERROR_CHARS = 300

# (key in "display", column heading); the page and landing.js both follow this order.
COLUMNS: tuple[tuple[str, str], ...] = (
    ("task", "Task"),
    ("status", "Status"),
    ("progress", "Full sync"),
    ("offset", "Offset"),
    ("trend", "Offset trend"),
    ("keys", "Keys source → target"),
    ("ops", "Target load"),
    ("last_poll", "Last good poll"),
    ("errors", "Errors"),
)

# No inline script or style, no other origin: a value that slipped through escaping still could
# not run, and the page cannot pull anything from outside the daemon.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

TrendKind = Literal["unknown", "copying", "sync", "flat", "falling", "rising", "steady"]
Health = Literal["up", "down", "pending", "gone"]


# --------------------------------------------------------------------------------------------------
# History and trends


@dataclass(frozen=True)
class Sample:
    """One good reading of a task: when it was polled and what it said."""

    at: float  # seconds on any steady clock; only differences matter
    offset: float | None
    progress: float | None  # ratio 0..1


@dataclass(frozen=True)
class Trend:
    """Where the incremental offset is heading, as far as the samples tell."""

    kind: TrendKind
    rate: float | None = None  # offset units per second over the trend window
    held_seconds: float | None = None  # how long the offset has kept its current value

    @property
    def label(self) -> str:
        """A short human text: ``↓ 120/s``, ``flat for 4m 10s``, ``in sync``, ``–``."""
        if self.kind == "sync":
            return "in sync"
        if self.kind == "copying":
            return "full copy"
        if self.kind == "flat":
            return f"flat for {format_duration(self.held_seconds or 0.0)}"
        if self.kind in ("falling", "rising") and self.rate is not None:
            arrow = "↓" if self.kind == "falling" else "↑"
            return f"{arrow} {format_compact(abs(self.rate))}/s"
        if self.kind == "steady":
            return "steady"
        return DASH


def offset_trend(samples: Sequence[Sample], window: float = TREND_WINDOW_SECONDS) -> Trend:
    """Judge the offset from successive readings (oldest first)."""
    points = [(s.at, s.offset) for s in samples if s.offset is not None]
    if not points:
        return Trend("unknown")
    newest_at, newest = points[-1]
    held_since = newest_at
    for at, value in reversed(points):
        if value != newest:
            break
        held_since = at
    held = newest_at - held_since
    recent = [(at, value) for at, value in points if at >= newest_at - window]
    rate = None
    if len(recent) >= 2 and recent[-1][0] > recent[0][0]:
        rate = (recent[-1][1] - recent[0][1]) / (recent[-1][0] - recent[0][0])
    if newest == 0:
        # During the full copy the offset is 0 because the incremental phase has not begun.
        progress = samples[-1].progress if samples else None
        copying = progress is not None and progress < 1.0
        return Trend("copying" if copying else "sync", rate, held)
    if len(points) < 2:
        return Trend("unknown")
    if held > 0:
        # The stall the alert looks for: the same non-zero value on successive good polls.
        return Trend("flat", rate, held)
    if rate is None or rate == 0:
        return Trend("steady", rate, held)
    return Trend("falling" if rate < 0 else "rising", rate, held)


def full_eta(old: Sample | None, new: Sample | None) -> float | None:
    """Seconds until the full phase reaches 100 % at the progress rate between two samples.

    0 once it is complete; None when unknown (one sample, no progress, or progress not rising).
    """
    if new is None or new.progress is None:
        return None
    if new.progress >= 1.0:
        return 0.0
    if old is None or old.progress is None or new.at <= old.at:
        return None
    rate = (new.progress - old.progress) / (new.at - old.at)
    if rate <= 0:
        return None
    return (1.0 - new.progress) / rate


class History:
    """A short ring of good readings per task, fed from the exporter state.

    A reading is taken once per successful poll (keyed by its time), however often it is
    observed, so page loads do not skew the trend. Bounded by age and count; tasks that leave
    the state are forgotten.
    """

    def __init__(
        self,
        *,
        keep_seconds: float = HISTORY_SECONDS,
        max_samples: int = HISTORY_SAMPLES,
        window: float = TREND_WINDOW_SECONDS,
    ) -> None:
        self.keep_seconds = keep_seconds
        self.max_samples = max_samples
        self.window = window
        self._rings: dict[str, deque[Sample]] = {}
        self._seen_version: int | None = None

    def observe(self, state: ExporterState) -> None:
        """Record each task's latest good reading if it is new."""
        if state.version == self._seen_version:
            return
        self._seen_version = state.version
        for task_id in list(self._rings):
            if task_id not in state.tasks:
                del self._rings[task_id]
        for task_id, task in state.tasks.items():
            record, at = task.record, task.last_success_monotonic
            if record is None or at is None:
                continue
            self.add(task_id, Sample(at, record.offset, record.progress_ratio))

    def add(self, task_id: str, sample: Sample) -> None:
        """Append one reading (ignored if it is not newer than the last one)."""
        ring = self._rings.setdefault(task_id, deque(maxlen=self.max_samples))
        if ring and sample.at <= ring[-1].at:
            return
        ring.append(sample)
        while ring[0].at < sample.at - self.keep_seconds:
            ring.popleft()

    def samples(self, task_id: str) -> list[Sample]:
        """The readings of a task, oldest first."""
        return list(self._rings.get(task_id, ()))

    def trend(self, task_id: str) -> Trend:
        """The offset trend of a task."""
        return offset_trend(self.samples(task_id), self.window)

    def full_eta(self, task_id: str) -> float | None:
        """ETA of the full phase from the oldest and newest reading kept."""
        ring = self._rings.get(task_id)
        if not ring:
            return None
        return full_eta(ring[0], ring[-1])

    def task_ids(self) -> list[str]:
        """Tasks with at least one reading."""
        return list(self._rings)


# --------------------------------------------------------------------------------------------------
# Formatting: one implementation for the page, the JSON "display" strings and the terminal


def format_count(value: float | None) -> str:
    """``1,250,000``; ``–`` when unknown."""
    if value is None:
        return DASH
    if float(value).is_integer():
        return f"{int(value):,}"
    return f"{value:,.1f}"


def format_compact(value: float) -> str:
    """``950``, ``12.5``, ``1.2k``, ``3.4M``: short rates for narrow columns."""
    magnitude = abs(value)
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if magnitude >= limit:
            return f"{value / limit:.1f}{suffix}"
    if magnitude >= 10 or float(value).is_integer():
        return f"{value:.0f}"
    return f"{value:.1f}"


def format_bytes_rate(value: float | None) -> str:
    """``2.3 MiB/s``; ``–`` when unknown."""
    if value is None:
        return DASH
    for limit, unit in ((1024**3, "GiB/s"), (1024**2, "MiB/s"), (1024, "KiB/s")):
        if value >= limit:
            return f"{value / limit:.1f} {unit}"
    return f"{value:.0f} B/s"


def format_duration(seconds: float | None) -> str:
    """``45s``, ``12m 05s``, ``3h 50m``, ``2d 4h``; ``–`` when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return DASH
    total = round(seconds)
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def format_percent(ratio: float | None) -> str:
    """``45 %`` or ``99.5 %``; ``–`` when unknown."""
    if ratio is None:
        return DASH
    percent = ratio * 100
    return f"{percent:.0f} %" if float(round(percent, 1)).is_integer() else f"{percent:.1f} %"


def _json_number(value: float | None) -> float | int | None:
    """Whole numbers as JSON integers (offsets and key counts read better), others as floats."""
    if value is None:
        return None
    if float(value).is_integer() and abs(value) < 2**53:
        return int(value)
    return value


# --------------------------------------------------------------------------------------------------
# The snapshot: what both the JSON feed and the page show


def _health(task: TaskState) -> Health:
    if task.gone:
        return "gone"
    if not task.polled:
        return "pending"
    return "up" if task.up else "down"


def _errors_text(task: TaskState) -> str:
    failures = sum(task.poll_errors.values())
    if task.up or not task.polled:
        return "none" if not failures else f"none now ({failures} earlier)"
    reason = task.last_reason or "error"
    text = f"{reason} ×{task.consecutive_failures}"
    if task.last_error:
        message = task.last_error
        if len(message) > MAX_ERROR_CHARS:
            message = message[: MAX_ERROR_CHARS - 1] + "…"
        text += f": {message}"
    return text


def task_snapshot(task: TaskState, history: History, now: float) -> dict[str, object]:
    """One task as JSON-ready data, with the page's display strings under ``display``."""
    record = task.record
    # Without current values (dropped after failures, or the task is gone) the history is frozen:
    # "flat" would read as a stall and a rate as made up, so the trend is unknown.
    current = record is not None and record.offset is not None and not task.gone
    trend = history.trend(task.task_id) if current else Trend("unknown")
    eta = history.full_eta(task.task_id)
    age = None if task.last_success_time is None else max(0.0, now - task.last_success_time)
    status = task.details.status if task.details else None
    progress = record.progress_ratio if record else None
    offset = record.offset if record else None
    source_keys = record.source_keys if record else None
    target_keys = record.target_keys if record else None
    ops = record.target_ops_per_second if record else None
    input_rate = record.target_input_bytes_per_second if record else None
    migrating = None if record is None or record.migrating is None else record.migrating == 1.0
    health = _health(task)

    progress_text = format_percent(progress)
    if progress is not None and progress < 1.0 and eta is not None:
        progress_text += f" · ETA {format_duration(eta)}"
    ops_text = DASH
    if ops is not None or input_rate is not None:
        ops_text = f"{format_compact(ops) if ops is not None else DASH} ops/s · {format_bytes_rate(input_rate)}"
    display = {
        "task": task.display_name,
        "status": status or DASH,
        "progress": progress_text,
        "offset": format_count(offset),
        "trend": trend.label,
        "keys": f"{format_count(source_keys)} → {format_count(target_keys)}",
        "ops": ops_text,
        "last_poll": DASH if age is None else f"{format_duration(age)} ago",
        "errors": _errors_text(task),
    }
    return {
        "task_id": task.task_id,
        "name": task.display_name,
        "status": status,
        "health": health,
        "up": task.up,
        "migrating": migrating,
        "progress": progress,
        "full_eta_seconds": None if eta is None else round(eta, 1),
        "offset": _json_number(offset),
        "offset_trend": trend.kind,
        "offset_rate": None if trend.rate is None else round(trend.rate, 3),
        "offset_held_seconds": None if trend.held_seconds is None else round(trend.held_seconds, 1),
        "source_keys": _json_number(source_keys),
        "target_keys": _json_number(target_keys),
        "target_ops_per_second": _json_number(ops),
        "target_input_bytes_per_second": _json_number(input_rate),
        "last_success_time": task.last_success_time,
        "last_success_age_seconds": None if age is None else round(age, 1),
        "consecutive_failures": task.consecutive_failures,
        "poll_errors_total": sum(task.poll_errors.values()),
        "last_reason": task.last_reason,
        "last_error": task.last_error,
        "display": display,
    }


def snapshot(state: ExporterState, history: History, now: float) -> dict[str, object]:
    """The whole JSON document of ``/api/v1/tasks``; ``now`` is Unix time."""
    history.observe(state)
    return {
        "version": __version__,
        "generated_at": now,
        "refresh_seconds": REFRESH_SECONDS,
        "tasks": [task_snapshot(task, history, now) for task in state.tasks.values()],
    }


# --------------------------------------------------------------------------------------------------
# The page


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _row(task: Mapping[str, object]) -> str:
    """One table row; the same structure landing.js builds (cells labelled for the phone layout)."""
    display = task["display"]
    assert isinstance(display, dict)
    cells = []
    for key, heading in COLUMNS:
        inner = ""
        if key == "progress" and isinstance(task["progress"], int | float):
            inner = f'<progress max="1" value="{_e(task["progress"])}"></progress> '
        inner += _e(display[key])
        if key == "task":
            inner += f"<small>{_e(task['task_id'])}</small>"
        css = f"{key} trend-{_e(task['offset_trend'])}" if key == "trend" else key
        cells.append(f'<td class="{css}" data-label="{_e(heading)}">{inner}</td>')
    return f'<tr class="health-{_e(task["health"])}" data-task-id="{_e(task["task_id"])}">{"".join(cells)}</tr>'


def _snapshot_time(document: Mapping[str, object]) -> str:
    generated = document.get("generated_at")
    if not isinstance(generated, int | float):
        return ""
    return "Snapshot of " + time.strftime("%H:%M:%S UTC", time.gmtime(generated))


def render_page(document: Mapping[str, object]) -> str:
    """The landing page for a snapshot document; every value from the cloud is escaped."""
    tasks = document["tasks"]
    assert isinstance(tasks, list)
    rows = "\n".join(_row(task) for task in tasks)
    if not tasks:
        rows = f'<tr class="empty"><td colspan="{len(COLUMNS)}">No tasks configured.</td></tr>'
    headings = "".join(f'<th data-key="{_e(key)}">{_e(text)}</th>' for key, text in COLUMNS)
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>DCS migration exporter</title>
<link rel="stylesheet" href="static/landing.css">
<script src="static/landing.js" defer></script>
</head>
<body>
<header>
<h1>DCS migration tasks</h1>
<p class="meta">dcs-migration-exporter {_e(document["version"])} ·
<a href="metrics">Metrics</a> · <a href="healthz">Health</a> · <a href="ready">Readiness</a> ·
<a href="api/v1/tasks">JSON</a></p>
<p id="updated" class="meta" aria-live="polite">{_e(_snapshot_time(document))}</p>
</header>
<main>
<table id="tasks" data-refresh="{_e(document["refresh_seconds"])}">
<thead><tr>{headings}</tr></thead>
<tbody>
{rows}
</tbody>
</table>
</main>
</body>
</html>
"""


# --------------------------------------------------------------------------------------------------
# Wiring


HISTORY_KEY = web.AppKey("landing_history", History)
_STATIC = ("landing.js", "landing.css")
_CONTENT_TYPES = {"js": "text/javascript", "css": "text/css"}


def _static_files() -> dict[str, bytes]:
    package = importlib.resources.files("exporter") / "static"
    return {name: (package / name).read_bytes() for name in _STATIC}


def install(
    app: web.Application,
    state: ExporterState,
    *,
    wall: Callable[[], float] = time.time,
    sample_every: float = SAMPLE_EVERY_SECONDS,
) -> History:
    """Add ``/``, ``/api/v1/tasks`` and the page's static files to ``app``; returns its history.

    A background sampler feeds the history while the app runs, so trends are there as soon as
    someone opens the page rather than only after they have watched it for a while.
    """
    history = History()
    app[HISTORY_KEY] = history
    files = _static_files()

    async def page(request: web.Request) -> web.Response:
        body = render_page(snapshot(state, history, wall()))
        return web.Response(
            text=body,
            content_type="text/html",
            headers={
                "Content-Security-Policy": CONTENT_SECURITY_POLICY,
                "Cache-Control": "no-store",
                "X-Content-Type-Options": "nosniff",
                "Referrer-Policy": "no-referrer",
            },
        )

    async def tasks(request: web.Request) -> web.Response:
        return web.json_response(
            snapshot(state, history, wall()),
            headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"},
        )

    def static(name: str) -> Callable[[web.Request], Awaitable[web.Response]]:
        content_type = _CONTENT_TYPES[name.rpartition(".")[2]]

        async def handler(request: web.Request) -> web.Response:
            return web.Response(
                body=files[name],
                content_type=content_type,
                charset="utf-8",
                headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"},
            )

        return handler

    async def sampler(app: web.Application) -> AsyncIterator[None]:
        loop_task = asyncio.get_running_loop().create_task(
            _sample_forever(state, history, sample_every)
        )
        yield
        loop_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop_task

    app.router.add_get("/", page)
    app.router.add_get("/api/v1/tasks", tasks)
    for name in _STATIC:
        app.router.add_get(f"/static/{name}", static(name))
    app.cleanup_ctx.append(sampler)
    return history


async def _sample_forever(state: ExporterState, history: History, every: float) -> None:
    while True:
        history.observe(state)
        await asyncio.sleep(every)
