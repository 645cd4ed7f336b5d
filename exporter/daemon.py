"""Wire config, client, poller and web server together, and keep them running.

Data flows one way: config → client → poller state → collector → web. Reload swaps the config in
place: a bad new config is refused and the old one keeps running.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

from exporter.client import DcsClient
from exporter.config import Config, ConfigError
from exporter.poller import Poller
from exporter.state import ExporterState
from exporter.throttle import Throttle
from exporter.web import create_app
from exporter.web_config import WebConfig

log = logging.getLogger(__name__)

ConfigLoader = Callable[[], Config]


def max_cycle_age(config: Config) -> float:
    """How long a polling round may take before the daemon counts as stuck."""
    return max(3 * config.polling.interval, config.polling.interval + 2 * config.polling.timeout)


def warn_about_proxy() -> None:
    """Say which proxy the client will use; aiohttp reads HTTPS_PROXY/NO_PROXY from the environment."""
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        value = os.environ.get(name)
        if value:
            parts = urlsplit(value)
            log.info("using proxy %s://%s from %s", parts.scheme, parts.hostname, name)
            return


def open_session(config: Config) -> aiohttp.ClientSession:
    """One HTTP session for the process: pooled connections, proxy settings from the environment."""
    connector = aiohttp.TCPConnector(limit=max(4, config.polling.concurrency * 2))
    return aiohttp.ClientSession(connector=connector, trust_env=True)


def build_poller(config: Config, session: aiohttp.ClientSession, state: ExporterState) -> Poller:
    """A client and poller for the configured project."""
    throttle = Throttle(config.polling.max_requests_per_second)
    client = DcsClient(
        session,
        config.cloud,
        config.auth,
        timeout=config.polling.timeout,
        throttle=throttle,
        token_refresh_margin=config.polling.token_refresh_margin,
    )
    return Poller(state, client, config.polling, config.tasks)


class Daemon:
    """The running exporter: one poller, one web server, reloadable config."""

    def __init__(
        self, config: Config, load_config: ConfigLoader | None, web_config: WebConfig | None
    ) -> None:
        self.config = config
        self.load_config = load_config
        self.web_config = web_config
        self.state = ExporterState()
        self.session: aiohttp.ClientSession | None = None
        self.poller: Poller | None = None
        self._poll_loop: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    async def reload(self) -> str | None:
        """Re-read the config; on error keep the old one and return the problem."""
        if self.load_config is None:
            return "this daemon was started without a config file"
        try:
            new = self.load_config()
        except ConfigError as error:
            self.state.config_reload_ok = False
            self.state.config_reload_failures_total += 1
            self.state.changed()
            log.error("configuration reload failed; keeping the running one:\n%s", error)
            return str(error)
        self.state.config_reload_ok = True
        old, self.config = self.config, new
        assert self.session is not None and self.poller is not None
        if (old.cloud, old.auth, old.polling) == (new.cloud, new.auth, new.polling):
            self.poller.set_tasks(new.tasks)
        else:
            # Credentials or endpoints changed: a new client, but task states carry over.
            await self._stop_polling()
            self.poller = build_poller(new, self.session, self.state)
            self._start_polling()
        log.info("configuration reloaded: %d tasks", len(new.tasks))
        return None

    def _start_polling(self) -> None:
        assert self.poller is not None
        self._poll_loop = asyncio.get_running_loop().create_task(self.poller.run())

    async def _stop_polling(self) -> None:
        if self._poll_loop is not None:
            self._poll_loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poll_loop
        if self.poller is not None:
            await self.poller.stop()

    def stop(self) -> None:
        """Ask the daemon to shut down."""
        self._stopping.set()

    async def serve(self, host: str | None, port: int) -> None:
        """Run until stop(): poll in the background and serve the web pages."""
        warn_about_proxy()
        self.session = open_session(self.config)
        self.poller = build_poller(self.config, self.session, self.state)
        app = create_app(
            self.state,
            web_config=self.web_config,
            max_cycle_age=max_cycle_age(self.config),
            reload=self.reload if self.load_config else None,
        )
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        ssl_context = self.web_config.ssl_context if self.web_config else None
        site = web.TCPSite(runner, host, port, ssl_context=ssl_context, shutdown_timeout=1.0)
        try:
            await site.start()
            scheme = "https" if ssl_context else "http"
            log.info(
                "listening on %s://%s:%d/metrics, watching %d tasks",
                scheme,
                host or "0.0.0.0",
                port,
                len(self.config.tasks),
            )
            self._start_polling()
            self._install_signals()
            await self._stopping.wait()
            log.info("shutting down")
        finally:
            await self._stop_polling()
            await runner.cleanup()
            await self.session.close()

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stop)
        loop.add_signal_handler(
            signal.SIGHUP, lambda: loop.create_task(self.reload()).add_done_callback(_drop)
        )


def _drop(_: asyncio.Task[str | None]) -> None:
    """Reload outcomes are logged by reload() itself."""
