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
import signal
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from exporter.client import DcsClient, TaskDetails
from exporter.config import AkSkAuth, Auth, Config, ConfigError, Target, TaskConfig
from exporter.discovery import Discovery, merge
from exporter.logs import log_each_line
from exporter.poller import Poller
from exporter.session import open_session, session_key
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


def build_poller(
    config: Config,
    session: aiohttp.ClientSession,
    state: ExporterState,
    tasks: Sequence[TaskConfig] | None = None,
    *,
    target: Target | None = None,
    owned: Iterable[str] | None = None,
) -> Poller:
    """A client and poller for one target (the first by default) and ``tasks`` (its own by default).

    ``owned``: the task IDs in ``state`` that the new poller takes over (see Poller); by default
    every task in the state, which is right only while there is one target.
    """
    target = target or config.targets[0]
    throttle = Throttle(config.polling.max_requests_per_second)
    client = DcsClient(
        session,
        target.cloud,
        target.auth,
        timeout=config.polling.timeout,
        throttle=throttle,
        token_refresh_margin=config.polling.token_refresh_margin,
    )
    return Poller(
        state,
        client,
        config.polling,
        target.tasks if tasks is None else tasks,
        target=target.name,
        owned=owned,
    )


def read_credentials(auth: Auth) -> tuple[str, ...]:
    """The secrets in use right now, read from their files where they come from files."""
    if isinstance(auth, AkSkAuth):
        token = auth.security_token.read() if auth.security_token is not None else ""
        return (auth.secret_key.read(), token)
    return (auth.password.read(),)


@dataclass
class TargetRun:
    """One target's machinery: its client and poller, its discovery, and their loops."""

    target: Target
    poller: Poller
    credentials: tuple[str, ...]
    discovery: Discovery | None = None
    poll_loop: asyncio.Task[None] | None = None
    discovery_loop: asyncio.Task[None] | None = None


class Daemon:
    """The running exporter: one poller per target, one web server, reloadable config."""

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
        self.runs: dict[str, TargetRun] = {}  # by target name, in config order
        self.load_config = load_config
        self.web_config = web_config
        self.state = ExporterState()
        self.session: aiohttp.ClientSession | None = None
        # Replaced sessions that pollers may still use (after a reload that failed half-way).
        self._retired_sessions: list[aiohttp.ClientSession] = []
        self._session_targets = 0
        self.poll_loop_restarts = 0
        self._runner: web.AppRunner | None = None
        self._stopping = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self._background: set[asyncio.Task[str | None]] = set()

    @property
    def poller(self) -> Poller | None:
        """The first target's poller (the only one of a config without ``targets:``)."""
        return next(iter(self.runs.values())).poller if self.runs else None

    @property
    def discovery(self) -> Discovery | None:
        """The first target's discovery, if it has one."""
        return next(iter(self.runs.values())).discovery if self.runs else None

    @property
    def task_ids(self) -> list[str]:
        """Every task polled, over all targets."""
        return [task_id for run in self.runs.values() for task_id in run.poller.task_ids]

    # ---- reload -------------------------------------------------------------------------------

    async def reload(self) -> str | None:
        """Re-read the config and credential files; on error keep the old ones and return why.

        Targets are matched by name. An unchanged target keeps its client and poller (and so its
        token and throttle); one whose cloud, auth, credentials or the polling settings changed
        gets a new client and poller, its task states carried over; a removed target's tasks lose
        their series; a new target starts polling at once.
        """
        if self.load_config is None:
            log.warning("reload requested, but this daemon runs without a config file (demo)")
            return "this daemon was started without a config file"
        async with self._reload_lock:
            try:
                new = self.load_config()
                credentials = {target.name: read_credentials(target.auth) for target in new.targets}
            except ConfigError as error:
                return self._reload_failed(str(error))
            except Exception as error:  # an unreadable file, a bug: never take the daemon down
                log.debug("reload failed", exc_info=True)
                return self._reload_failed(f"{type(error).__name__}: {error}")
            previous = self.config
            try:
                return await self._apply(new, credentials)
            except Exception as error:  # a bug while applying: say so, never take the daemon down
                log.exception("reload failed while applying the new configuration")
                self.config = previous
                self._resume_stopped_loops()
                return self._reload_failed(f"{type(error).__name__}: {error}")

    async def _apply(self, new: Config, credentials: dict[str, tuple[str, ...]]) -> str | None:
        """Switch the running targets over to a validated config."""
        old, self.config = self.config, new
        assert self.session is not None
        for each in self.runs.values():
            await self._stop_discovery(each)
        (old_urls, old_concurrency), (new_urls, new_concurrency) = map(session_key, (old, new))
        # The session's proxy choice depends on the endpoints and its pool size on the
        # concurrency and the number of targets. A new endpoint, or a larger pool, needs a new
        # session and so every client goes; a removed target alone does not.
        rebuild_all = (
            not new_urls <= old_urls
            or new_concurrency != old_concurrency
            or len(new.targets) > self._session_targets
        )
        if rebuild_all:
            for each in self.runs.values():
                await self._stop_polling(each)
            # The old session is closed only once every poller has moved off it: should this
            # reload fail half-way, the pollers it did not replace keep polling on it.
            self._retired_sessions.append(self.session)
            self.session = open_session(new)
            self._session_targets = len(new.targets)
        wanted = {target.name: target for target in new.targets}
        for name in [name for name in self.runs if name not in wanted]:
            removed = self.runs.pop(name)
            await self._stop_polling(removed)
            removed.poller.set_tasks(())  # its tasks lose their series
            self.state.clock_skew_seconds.pop(name, None)
            log.info("target %s removed", name)
        # First let go of tasks that another target now configures, so that no poller drops a
        # task from the state after another one has taken it over.
        for name, kept in self.runs.items():
            theirs = {
                task.id.lower()
                for target in new.targets
                if target.name != name
                for task in target.tasks
            }
            kept.poller.set_tasks(
                TaskConfig(task_id, self.state.tasks[task_id].configured_name)
                for task_id in kept.poller.task_ids
                if task_id.lower() not in theirs and task_id in self.state.tasks
            )
        for target in new.targets:
            run = self.runs.get(target.name)
            if run is None:
                self.runs[target.name] = run = self._new_run(target, credentials[target.name], ())
                self._start_polling(run)
                log.info("target %s added", target.name)
            else:
                same = (run.target.cloud, run.target.auth, old.polling) == (
                    target.cloud,
                    target.auth,
                    new.polling,
                )
                run.target = target
                if same and not rebuild_all and credentials[target.name] == run.credentials:
                    run.poller.set_tasks(self._tasks_for(run.target, run.discovery))
                else:
                    # A new client (no cached token, new throttle) and scheduler; the task
                    # states carry over, removed tasks are dropped.
                    await self._stop_polling(run)
                    previous_poller = run.poller
                    run.poller = build_poller(
                        new,
                        self.session,
                        self.state,
                        self._tasks_for(run.target, run.discovery),
                        target=target,
                        owned=previous_poller.task_ids,
                    )
                    run.poller.carry_over(previous_poller)
                    run.credentials = credentials[target.name]
                    self._start_polling(run)
            self._start_discovery(run, first_delay=0.0)  # new filters apply at once
        self.runs = {target.name: self.runs[target.name] for target in new.targets}
        if rebuild_all:  # every poller was rebuilt on the new session
            await self._close_retired_sessions()
        self._sum_discovery()
        self.state.config_reload_ok = True
        self.state.changed()
        log.info(
            "configuration reloaded: %d tasks in %d target%s",
            len(self.task_ids),
            len(self.runs),
            "" if len(self.runs) == 1 else "s",
        )
        return None

    def _new_run(
        self, target: Target, credentials: tuple[str, ...], owned: Iterable[str]
    ) -> TargetRun:
        assert self.session is not None
        run = TargetRun(
            target,
            build_poller(self.config, self.session, self.state, (), target=target, owned=owned),
            credentials,
        )
        run.poller.set_tasks(self._tasks_for(run.target, run.discovery))
        return run

    def _tasks_for(self, target: Target, discovery: Discovery | None) -> tuple[TaskConfig, ...]:
        """A target's tasks this replica polls: configured and discovered ones, in its shard.

        A discovered task that another target configures or already polls stays with that one
        (two targets can list the same project).
        """
        tasks = target.tasks
        if target.discovery is not None and discovery is not None:
            mine = {task.id.lower() for task in target.tasks}
            others = {
                task.id.lower()
                for other in self.config.targets
                if other.name != target.name
                for task in other.tasks
            }
            others.update(
                task_id.lower()
                for name, other_run in self.runs.items()
                if name != target.name
                for task_id in other_run.poller.task_ids
            )
            tasks = tuple(
                task
                for task in merge(tasks, discovery.found)
                if task.id.lower() in mine or task.id.lower() not in others
            )
        return self.shard.select(tasks) if self.shard is not None else tasks

    def watched(self, config: Config) -> tuple[TaskConfig, ...]:
        """The tasks this replica polls for ``config``, over all targets (``_tasks_for`` each)."""
        watched: list[TaskConfig] = []
        for target in config.targets:
            run = self.runs.get(target.name)
            watched.extend(self._tasks_for(target, run.discovery if run is not None else None))
        return tuple(watched)

    # ---- discovery ----------------------------------------------------------------------------

    def _discovered(self, name: str) -> None:
        run = self.runs.get(name)
        if run is not None:
            run.poller.set_tasks(self._tasks_for(run.target, run.discovery))

    def _discovery_refreshed(self, discovery: Discovery, ok: bool) -> None:
        if not ok:
            self.state.discovery_failures_total += 1
        self._sum_discovery()

    def _sum_discovery(self) -> None:
        """Sum the targets' discovery results into the state (one set of discovery metrics)."""
        state = self.state
        discoveries = [run.discovery for run in self.runs.values() if run.discovery is not None]
        listed = [d for d in discoveries if d.last_success_time is not None]
        state.discovery_enabled = bool(discoveries)
        if listed:
            state.discovered_tasks = sum(len(d.found) for d in listed)
            # The oldest of the targets' last listings: a target whose listing fails shows.
            state.discovery_last_success_time = min(
                d.last_success_time for d in listed if d.last_success_time is not None
            )
        state.changed()

    def _start_discovery(self, run: TargetRun, first_delay: float) -> None:
        """Run discovery for the run's target, keeping the last result across reloads."""
        config = run.target.discovery
        if config is None:
            run.discovery = None
            self._sum_discovery()
            return
        found = run.discovery.found if run.discovery is not None else ()
        last = run.discovery.last_success_time if run.discovery is not None else None
        name = run.target.name

        async def list_tasks() -> list[TaskDetails]:
            return await self.runs[name].poller.client.list_tasks()  # the current client

        run.discovery = Discovery(
            config,
            list_tasks,
            lambda _found: self._discovered(name),
            on_refresh=self._discovery_refreshed,
        )
        run.discovery.found, run.discovery.last_success_time = found, last
        self._sum_discovery()
        run.discovery_loop = asyncio.get_running_loop().create_task(
            run.discovery.run(first_delay=first_delay)
        )

    async def _stop_discovery(self, run: TargetRun) -> None:
        if run.discovery_loop is not None:
            run.discovery_loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await run.discovery_loop
            run.discovery_loop = None

    async def _close_retired_sessions(self) -> None:
        while self._retired_sessions:
            await self._retired_sessions.pop().close()

    def _reload_failed(self, problem: str) -> str:
        self.state.config_reload_ok = False
        self.state.config_reload_failures_total += 1
        self.state.changed()
        log_each_line(
            log, logging.ERROR, "configuration reload failed; keeping the running one", problem
        )
        return problem

    # ---- polling ------------------------------------------------------------------------------

    def _resume_stopped_loops(self) -> None:
        """After a failed reload, start again every loop it had stopped, with its old poller."""
        for run in self.runs.values():
            if run.poll_loop is None:
                self._start_polling(run)
            if run.discovery is not None and run.discovery_loop is None:
                self._start_discovery(run, first_delay=0.0)

    def _start_polling(self, run: TargetRun) -> None:
        run.poll_loop = asyncio.get_running_loop().create_task(self._keep_polling(run))

    async def _keep_polling(self, run: TargetRun) -> None:
        """Run the target's poller loop; should it ever fail, log why and start it again."""
        while True:
            try:
                await run.poller.run()
            except Exception:
                self.poll_loop_restarts += 1
                log.exception(
                    "target %s: the polling loop failed; starting it again", run.target.name
                )
                await run.poller.stop()
                await asyncio.sleep(RESTART_DELAY_SECONDS)

    async def _stop_polling(self, run: TargetRun) -> None:
        if run.poll_loop is not None:
            run.poll_loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await run.poll_loop
            run.poll_loop = None
        await run.poller.stop()

    # ---- lifecycle ----------------------------------------------------------------------------

    async def start(self, host: str | None, port: int) -> None:
        """Open the session, start the web server and the background polling of every target."""
        self.session = open_session(self.config)
        self._session_targets = len(self.config.targets)  # the pool is sized for these
        for target in self.config.targets:
            self.runs[target.name] = self._new_run(target, read_credentials(target.auth), ())
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
        count = len(self.task_ids)
        log.info(
            "listening on %s://%s:%d/metrics, watching %d task%s%s",
            scheme,
            shown_host,
            self.port,
            count,
            "" if count == 1 else "s",
            f" in {len(self.runs)} targets" if len(self.runs) > 1 else "",
        )
        if self.shard is not None:
            log.info(
                "shard %s: polling %d of the %d configured tasks",
                self.shard,
                count,
                len(self.config.all_tasks),
            )
        for run in self.runs.values():
            self._start_discovery(run, first_delay=0.0)  # the loops list at once
        # Wait for the first listings, so that discovered tasks are in the first round, but for
        # one request timeout at most: a slow or endless listing (1,000 pages) must not hold up
        # the configured tasks, /healthz or SIGTERM. It goes on in its loop; what it finds joins
        # the next round.
        first = [
            run.discovery.first_listing_done.wait() for run in self.runs.values() if run.discovery
        ]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*first), timeout=self.config.polling.timeout)
        for run in self.runs.values():
            self._start_polling(run)

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
        for run in self.runs.values():
            await self._stop_discovery(run)
            await self._stop_polling(run)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self._close_retired_sessions()
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
