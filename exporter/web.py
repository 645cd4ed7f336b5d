"""HTTP endpoints: ``/metrics``, ``/``, ``/healthz``, ``/ready`` and ``POST /-/reload``.

Nothing here waits on the cloud: every page is built from the state the poller keeps. The
rendering of the exporter's own families, and its gzip, is reused until the state changes (and,
for thousands of tasks, at most once a second), so scrapes stay cheap however often they come.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    generate_latest,
)
from prometheus_client.openmetrics.exposition import (
    CONTENT_TYPE_LATEST as OPENMETRICS_CONTENT_TYPE,
)
from prometheus_client.openmetrics.exposition import (
    generate_latest as generate_openmetrics,
)

from exporter.exposition import ExpositionCache
from exporter.landing import install as install_landing
from exporter.state import ExporterState
from exporter.web_config import WebConfig, auth_middleware

TEXT_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PROCESS_METRICS_MAX_AGE = 1.0  # seconds
Reload = Callable[[], Awaitable[str | None]]  # returns None on success, else the error


@dataclass(frozen=True)
class Health:
    """Whether the scheduler is alive and has finished a round."""

    ready: bool
    alive: bool
    detail: str


def health(state: ExporterState, max_cycle_age: float, started: float, now: float) -> Health:
    """Judge the scheduler by its heartbeat: a poll or a round must end every ``max_cycle_age``
    seconds; ready once the first round has finished.

    Polls count as well as rounds: while the API hangs, one round of many tasks takes about
    tasks x timeout / concurrency, longer than any fixed limit, yet its polls keep ending (in
    timeouts) every few seconds. A scheduler that died ends neither, and a liveness probe must
    not restart a healthy exporter in the middle of a cloud outage.
    """
    round_end, poll_end = state.last_cycle_end_monotonic, state.last_poll_end_monotonic
    heartbeat = max((t for t in (round_end, poll_end) if t is not None), default=started)
    age = now - heartbeat
    alive = age <= max_cycle_age
    if not alive:
        return Health(False, False, f"no poll or polling round ended for {age:.0f}s")
    if round_end is None:
        detail = f"no polling round finished yet ({now - started:.0f}s since start)"
    else:
        detail = f"last polling round finished {now - round_end:.0f}s ago"
    if poll_end is not None and (round_end is None or poll_end > round_end + 1.0):
        detail += f"; the last poll ended {now - poll_end:.0f}s ago"
    return Health(round_end is not None, True, detail)


class MetricsRenderer:
    """The exposition: our families from a cache (exporter.exposition), then process metrics."""

    def __init__(
        self, state: ExporterState, *, monotonic: Callable[[], float] = time.monotonic
    ) -> None:
        self.state = state
        self.cache = ExpositionCache(state)
        self._monotonic = monotonic
        self._process: dict[bool, tuple[float, bytes]] = {}

    def render(self, openmetrics: bool) -> bytes:
        """The full exposition in the chosen format."""
        return self.cache.current(openmetrics).body + self._process_exposition(openmetrics)

    async def render_async(self, openmetrics: bool) -> bytes:
        """render() without blocking the event loop for a rebuild (see ExpositionCache.fresh)."""
        rendering, _ = await self.cache.fresh(openmetrics)
        return b"".join((*rendering.chunks, self._process_exposition(openmetrics)))

    async def render_gzip(self, openmetrics: bool) -> bytes:
        """The same, gzip-compressed; the big part is compressed once per rendering, not per scrape."""
        rendering = await self.cache.gzipped(openmetrics)
        return rendering.gzip_with(self._process_exposition(openmetrics))

    def _process_exposition(self, openmetrics: bool) -> bytes:
        """Process metrics, rendered at most once per PROCESS_METRICS_MAX_AGE.

        Reading /proc and formatting them costs more than serving the cached rest (~0.4 ms), and
        nobody needs CPU time fresher than a second; the same bytes also let scrapes share the
        finished gzip stream.
        """
        now = self._monotonic()
        cached = self._process.get(openmetrics)
        if cached is None or now - cached[0] >= PROCESS_METRICS_MAX_AGE:
            generate = generate_openmetrics if openmetrics else generate_latest
            cached = (now, generate(_process_registry))
            self._process[openmetrics] = cached
        return cached[1]


_process_registry = CollectorRegistry(auto_describe=False)
for _collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
    _process_registry.register(_collector)


def _accepted(header: str) -> dict[str, float]:
    """Media types or codings of an Accept-style header with their q-values, names lower-cased."""
    weights: dict[str, float] = {}
    for part in header.split(","):
        name, *params = (piece.strip() for piece in part.split(";"))
        if not name:
            continue
        weight = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    weight = float(value)
                except ValueError:
                    weight = 0.0
        # A type listed twice (Prometheus names two OpenMetrics versions) counts at its best.
        weights[name.lower()] = max(weight, weights.get(name.lower(), 0.0))
    return weights


def _wants_openmetrics(accept: str) -> bool:
    """OpenMetrics when the scraper asks for it with a weight above zero and at least that of
    the text format (named, or as ``text/*`` or ``*/*``)."""
    weights = _accepted(accept)
    openmetrics = weights.get("application/openmetrics-text", 0.0)
    text = weights.get("text/plain", weights.get("text/*", weights.get("*/*", 0.0)))
    return openmetrics > 0 and openmetrics >= text


def _wants_gzip(accept_encoding: str) -> bool:
    """gzip when accepted by name (any case) or by ``*``, and not refused with q=0."""
    weights = _accepted(accept_encoding)
    return weights.get("gzip", weights.get("*", 0.0)) > 0


def create_app(
    state: ExporterState,
    *,
    web_config: WebConfig | None = None,
    max_cycle_age: float | Callable[[], float] = 90.0,  # a callable follows config reloads
    reload: Reload | None = None,
    monotonic: Callable[[], float] = time.monotonic,
) -> web.Application:
    """Build the aiohttp application serving the exporter's pages."""
    renderer = MetricsRenderer(state)
    started = monotonic()
    # Probes stay open: they reveal nothing, and kubelet probes rarely carry credentials.
    open_paths = frozenset({"/healthz", "/ready"})
    middlewares = [auth_middleware(web_config, open_paths)] if web_config is not None else []
    app = web.Application(middlewares=middlewares)

    async def metrics(request: web.Request) -> web.Response:
        openmetrics = _wants_openmetrics(request.headers.get("Accept", ""))
        content_type = OPENMETRICS_CONTENT_TYPE if openmetrics else TEXT_CONTENT_TYPE
        # Caches between scraper and exporter must key on what was negotiated.
        headers = {"Content-Type": content_type, "Vary": "Accept, Accept-Encoding"}
        if _wants_gzip(request.headers.get("Accept-Encoding", "")):
            body = await renderer.render_gzip(openmetrics)
            headers["Content-Encoding"] = "gzip"
        else:
            body = await renderer.render_async(openmetrics)
        return web.Response(body=body, headers=headers)

    def _health() -> Health:
        limit = max_cycle_age() if callable(max_cycle_age) else max_cycle_age
        return health(state, limit, started, monotonic())

    async def healthz(request: web.Request) -> web.Response:
        result = _health()
        return web.Response(status=200 if result.alive else 503, text=f"{result.detail}\n")

    async def ready(request: web.Request) -> web.Response:
        result = _health()
        return web.Response(status=200 if result.ready else 503, text=f"{result.detail}\n")

    async def do_reload(request: web.Request) -> web.Response:
        if reload is None:
            return web.Response(status=404, text="reload is not available\n")
        error = await reload()
        if error is None:
            return web.Response(text="configuration reloaded\n")
        return web.Response(status=400, text=f"configuration rejected, old one kept:\n{error}\n")

    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/ready", ready)
    app.router.add_post("/-/reload", do_reload)
    install_landing(app, state)  # "/", "/api/v1/tasks" and the page's static files
    return app
