"""Wire config, client, poller and web server together, and keep them running.

Data flows one way: config → client → poller state → collector → web. Reload (``POST /-/reload``
or SIGHUP) re-reads the config file and the credential files it names: a bad new config is
refused, counted and logged, and the old one keeps polling. SIGTERM/SIGINT stop polling, close the
web server and the HTTP session, and return.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable, Sequence
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web
from aiohttp.helpers import get_env_proxy_for_url
from yarl import URL

from exporter.client import DcsClient, TaskDetails
from exporter.config import AkSkAuth, Auth, Config, ConfigError, TaskConfig
from exporter.discovery import Discovery, merge
from exporter.poller import Poller
from exporter.sharding import Shard
from exporter.state import ExporterState
from exporter.throttle import Throttle
from exporter.web import create_app
from exporter.web_config import WebConfig

log = logging.getLogger(__name__)

ConfigLoader = Callable[[], Config]
# Pause before the polling loop is started again after it failed (a bug; it should never happen).
RESTART_DELAY_SECONDS = 1.0


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


def _env_proxy(url: str) -> tuple[URL | None, aiohttp.BasicAuth | None]:
    """The proxy (and its credentials) that HTTPS_PROXY/NO_PROXY give for ``url``, if any."""
    try:
        return get_env_proxy_for_url(URL(url))
    except LookupError:
        return None, None


def open_session(config: Config) -> aiohttp.ClientSession:
    """One HTTP session for the process: pooled connections, proxy settings from the environment."""
    connector = aiohttp.TCPConnector(limit=max(4, config.polling.concurrency * 2))
    # trust_env=True makes aiohttp look up the proxy and ~/.netrc in a worker thread on every
    # request, about half the CPU of a poll; the proxy is decided once here instead.
    proxies = {_env_proxy(url) for url in (config.cloud.dcs_endpoint, config.cloud.iam_endpoint)}
    if len(proxies) == 1:
        proxy, proxy_auth = proxies.pop()
        return aiohttp.ClientSession(connector=connector, proxy=proxy, proxy_auth=proxy_auth)
    # NO_PROXY covers one endpoint but not the other: let aiohttp decide per request.
    return aiohttp.ClientSession(connector=connector, trust_env=True)


def build_poller(
    config: Config,
    session: aiohttp.ClientSession,
    state: ExporterState,
    tasks: Sequence[TaskConfig] | None = None,
) -> Poller:
    """A client and poller for the configured project (for ``tasks``, by default the config's)."""
    throttle = Throttle(config.polling.max_requests_per_second)
    client = DcsClient(
        session,
        config.cloud,
        config.auth,
        timeout=config.polling.timeout,
        throttle=throttle,
        token_refresh_margin=config.polling.token_refresh_margin,
    )
    return Poller(state, client, config.polling, config.tasks if tasks is None else tasks)


def read_credentials(auth: Auth) -> tuple[str, ...]:
    """The secrets in use right now, read from their files where they come from files."""
    if isinstance(auth, AkSkAuth):
        token = auth.security_token.read() if auth.security_token is not None else ""
        return (auth.secret_key.read(), token)
    return (auth.password.read(),)


class Daemon:
    """The running exporter: one poller, one web server, reloadable config."""

    def __init__(
        self,
        config: Config,
        load_config: ConfigLoader | None,
        web_config: WebConfig | None,
        *,
        shard: Shard | None = None,
    ) -> None:
        self.config = config
        self.shard = shard  # this replica's part of the tasks (--shard); None: all of them
        self.discovery: Discovery | None = None  # with a discovery section
        self._discovery_loop: asyncio.Task[None] | None = None
        self.load_config = load_config
        self.web_config = web_config
        self.state = ExporterState()
        self.session: aiohttp.ClientSession | None = None
        self.poller: Poller | None = None
        self.poll_loop_restarts = 0
        self._credentials: tuple[str, ...] = ()
        self._poll_loop: asyncio.Task[None] | None = None
        self._runner: web.AppRunner | None = None
        self._stopping = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self._background: set[asyncio.Task[str | None]] = set()

    # ---- reload -------------------------------------------------------------------------------

    async def reload(self) -> str | None:
        """Re-read the config and credential files; on error keep the old ones and return why."""
        if self.load_config is None:
            log.warning("reload requested, but this daemon runs without a config file (demo)")
            return "this daemon was started without a config file"
        async with self._reload_lock:
            try:
                new = self.load_config()
                credentials = read_credentials(new.auth)
            except ConfigError as error:
                return self._reload_failed(str(error))
            except Exception as error:  # an unreadable file, a bug: never take the daemon down
                log.debug("reload failed", exc_info=True)
                return self._reload_failed(f"{type(error).__name__}: {error}")
            old, self.config = self.config, new
            assert self.session is not None and self.poller is not None
            await self._stop_discovery()
            unchanged = (old.cloud, old.auth, old.polling) == (new.cloud, new.auth, new.polling)
            if unchanged and credentials == self._credentials:
                self.poller.set_tasks(self.watched(new))
            else:
                # Endpoints, credentials or timing changed: a new client (no cached token, new
                # throttle) and scheduler; the task states carry over, removed tasks are dropped.
                await self._stop_polling()
                if (old.cloud, old.polling.concurrency) != (new.cloud, new.polling.concurrency):
                    # The session's proxy choice and pool size depend on these.
                    await self.session.close()
                    self.session = open_session(new)
                self.poller = build_poller(new, self.session, self.state, self.watched(new))
                self._start_polling()
            self._start_discovery(first_delay=0.0)  # new filters apply at once
            self._credentials = credentials
            self.state.config_reload_ok = True
            self.state.changed()
            log.info("configuration reloaded: %d tasks", len(self.poller.task_ids))
            return None

    def watched(self, config: Config) -> tuple[TaskConfig, ...]:
        """The tasks this replica polls: those of ``config`` and discovered ones, in its shard."""
        tasks = config.tasks
        if config.discovery is not None and self.discovery is not None:
            tasks = merge(tasks, self.discovery.found)
        return self.shard.select(tasks) if self.shard is not None else tasks

    # ---- discovery ----------------------------------------------------------------------------

    async def _list_tasks(self) -> list[TaskDetails]:
        assert self.poller is not None
        return await self.poller.client.list_tasks()  # the current client, also after a reload

    def _discovered(self, found: tuple[TaskConfig, ...]) -> None:
        if self.poller is not None:
            self.poller.set_tasks(self.watched(self.config))

    def _discovery_refreshed(self, discovery: Discovery, ok: bool) -> None:
        state = self.state
        if ok:
            state.discovered_tasks = len(discovery.found)
            state.discovery_last_success_time = discovery.last_success_time
        else:
            state.discovery_failures_total += 1
        state.changed()

    def _start_discovery(self, first_delay: float) -> None:
        """Run discovery for the current config, keeping the last result across reloads."""
        config = self.config.discovery
        self.state.discovery_enabled = config is not None
        self.state.changed()
        if config is None:
            self.discovery = None
            return
        found = self.discovery.found if self.discovery is not None else ()
        self.discovery = Discovery(
            config, self._list_tasks, self._discovered, on_refresh=self._discovery_refreshed
        )
        self.discovery.found = found
        self._discovery_loop = asyncio.get_running_loop().create_task(
            self.discovery.run(first_delay=first_delay)
        )

    async def _stop_discovery(self) -> None:
        if self._discovery_loop is not None:
            self._discovery_loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._discovery_loop
            self._discovery_loop = None

    def _reload_failed(self, problem: str) -> str:
        self.state.config_reload_ok = False
        self.state.config_reload_failures_total += 1
        self.state.changed()
        log.error("configuration reload failed; keeping the running one:\n%s", problem)
        return problem

    # ---- polling ------------------------------------------------------------------------------

    def _start_polling(self) -> None:
        self._poll_loop = asyncio.get_running_loop().create_task(self._keep_polling())

    async def _keep_polling(self) -> None:
        """Run the poller's loop; should it ever fail, log why and start it again."""
        while True:
            assert self.poller is not None
            try:
                await self.poller.run()
            except Exception:
                self.poll_loop_restarts += 1
                log.exception("the polling loop failed; starting it again")
                await self.poller.stop()
                await asyncio.sleep(RESTART_DELAY_SECONDS)

    async def _stop_polling(self) -> None:
        if self._poll_loop is not None:
            self._poll_loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poll_loop
            self._poll_loop = None
        if self.poller is not None:
            await self.poller.stop()

    # ---- lifecycle ----------------------------------------------------------------------------

    async def start(self, host: str | None, port: int) -> None:
        """Open the session, start the web server and the background polling."""
        warn_about_proxy()
        self._credentials = read_credentials(self.config.auth)
        self.session = open_session(self.config)
        self.poller = build_poller(self.config, self.session, self.state, self.watched(self.config))
        app = create_app(
            self.state,
            web_config=self.web_config,
            max_cycle_age=lambda: max_cycle_age(self.config),  # follows reloads
            reload=self.reload if self.load_config else None,
        )
        self._runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=1.0
        )
        await self._runner.setup()
        ssl_context = self.web_config.ssl_context if self.web_config else None
        site = web.TCPSite(self._runner, host, port, ssl_context=ssl_context)
        try:
            await site.start()
        except BaseException:
            await self.close()
            raise
        scheme = "https" if ssl_context else "http"
        shown_host = f"[{host}]" if host and ":" in host else host or "0.0.0.0"
        count = len(self.poller.task_ids)
        log.info(
            "listening on %s://%s:%d/metrics, watching %d task%s",
            scheme,
            shown_host,
            self.port,
            count,
            "" if count == 1 else "s",
        )
        if self.shard is not None:
            log.info(
                "shard %s: polling %d of the %d configured tasks",
                self.shard,
                len(self.poller.task_ids),
                len(self.config.tasks),
            )
        if self.config.discovery is not None:
            # One listing before the first round, so that discovered tasks are in it.
            self._start_discovery(first_delay=self.config.discovery.interval)
            assert self.discovery is not None
            await self.discovery.refresh_guarded()
        self._start_polling()

    @property
    def port(self) -> int:
        """The port the web server listens on (useful when started on port 0)."""
        assert self._runner is not None and self._runner.addresses
        address = self._runner.addresses[0]
        return int(address[1])

    async def close(self) -> None:
        """Stop polling, then the web server, then the HTTP session; safe to call twice."""
        for task in list(self._background):
            task.cancel()
        await self._stop_discovery()
        await self._stop_polling()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self.session is not None:
            await self.session.close()
            self.session = None

    def stop(self) -> None:
        """Ask serve() to shut down."""
        self._stopping.set()

    async def serve(self, host: str | None, port: int) -> None:
        """Run until SIGTERM/SIGINT (or stop()): poll in the background and serve the web pages."""
        self._install_signals()
        try:
            await self.start(host, port)
            await self._stopping.wait()
            log.info("shutting down")
        finally:
            await self.close()
            self._remove_signals()

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stop)
        loop.add_signal_handler(signal.SIGHUP, self._reload_in_background)

    def _remove_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signum)

    def _reload_in_background(self) -> None:
        """SIGHUP: reload without blocking the signal handler; the outcome is logged by reload()."""
        if self._stopping.is_set() or self.session is None:
            return
        task = asyncio.get_running_loop().create_task(self.reload())
        self._background.add(task)
        task.add_done_callback(self._background.discard)
