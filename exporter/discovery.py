"""Find the tasks to watch through the paginated list API, besides (or instead of) listing them.

With a ``discovery:`` section the daemon lists the project's migration tasks every
``discovery.interval`` (``GET /v2/{project_id}/migration-tasks``, all pages: ``client.list_tasks``),
keeps those that match every filter given (a regular expression searched in the task name, the
statuses, the migration types), and merges them with the configured ``tasks``: a task in both keeps
its configured entry, so a configured name wins. A task that is no longer listed, or no longer
matches, is dropped at the next refresh, and the poller drops its series with it. A failed listing
keeps the previous result: an API hiccup must not make every discovered task's series vanish.
A listed ``task_id`` that is not a task ID by the rule of configured ones (``config.is_task_id``)
is skipped with one warning per listing: it would become a label value and a request path.

Sharding (exporter.sharding) applies to the merged list, so each replica lists the whole project
and keeps its share.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence

from exporter.client import ApiError, TaskDetails
from exporter.config import DiscoveryConfig, TaskConfig, is_task_id
from exporter.yamlnodes import shorten

log = logging.getLogger(__name__)

# After a failed listing, try again sooner than a whole interval (but not in a tight loop).
RETRY_SECONDS = 30.0

Lister = Callable[[], Awaitable[list[TaskDetails]]]


def matches(task: TaskDetails, config: DiscoveryConfig) -> bool:
    """Whether a listed task passes every filter of ``config`` (statuses ignore case)."""
    if config.name_regex is not None and not re.search(config.name_regex, task.task_name):
        return False
    if config.statuses and task.status.upper() not in {s.upper() for s in config.statuses}:
        return False
    return not config.migration_types or task.migration_type in config.migration_types


def select(found: Iterable[TaskDetails], config: DiscoveryConfig) -> tuple[TaskConfig, ...]:
    """The listed tasks that match, as task entries without a configured name, in list order.

    Entries whose ID is not a task ID are skipped, with one warning showing the first of them.
    """
    seen: set[str] = set()
    selected: list[TaskConfig] = []
    skipped: list[str] = []
    for task in found:
        if not is_task_id(task.task_id):
            skipped.append(task.task_id)
            continue
        key = task.task_id.lower()
        if key not in seen and matches(task, config):
            seen.add(key)
            selected.append(TaskConfig(id=task.task_id))
    if skipped:
        log.warning(
            "discovery: skipped %d listed tasks whose task_id is not a task ID, such as %s",
            len(skipped),
            ascii(shorten(skipped[0])),  # cut, then escaped: one short printable line
        )
    return tuple(selected)


def merge(static: Sequence[TaskConfig], discovered: Iterable[TaskConfig]) -> tuple[TaskConfig, ...]:
    """The configured tasks, then the discovered ones not configured (IDs compare ignoring case)."""
    known = {task.id.lower() for task in static}
    return (*static, *(task for task in discovered if task.id.lower() not in known))


class Discovery:
    """Lists and filters the project's tasks now and then; tells ``on_change`` the new result."""

    def __init__(
        self,
        config: DiscoveryConfig,
        list_tasks: Lister,
        on_change: Callable[[tuple[TaskConfig, ...]], None],
        *,
        on_refresh: Callable[[Discovery, bool], None] | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self._list_tasks = list_tasks
        self._on_change = on_change
        self._on_refresh = on_refresh  # after every listing, with whether it worked
        self._sleep = sleep
        self._wall = wall
        self.found: tuple[TaskConfig, ...] = ()  # the last good result
        self.listed = 0  # tasks in the last good listing, before the filters
        self.refreshes = 0
        self.failures = 0
        self.last_success_time: float | None = None
        self.first_listing_done = asyncio.Event()  # set once the first listing ended, either way

    async def refresh(self) -> bool:
        """List once; on success adopt the result (calling on_change if it differs)."""
        try:
            listed = await self._list_tasks()
        except ApiError as error:
            self.failures += 1
            log.warning("discovery: listing the tasks failed, keeping the last result: %s", error)
            if self._on_refresh is not None:
                self._on_refresh(self, False)
            return False
        found = select(listed, self.config)
        self.refreshes += 1
        self.listed = len(listed)
        self.last_success_time = self._wall()
        if found != self.found:
            before = {task.id for task in self.found}
            after = {task.id for task in found}
            log.info(
                "discovery: %d of %d listed tasks match (%d new, %d gone)",
                len(found),
                len(listed),
                len(after - before),
                len(before - after),
            )
            self.found = found
            self._on_change(found)
        if self._on_refresh is not None:
            self._on_refresh(self, True)
        return True

    async def refresh_guarded(self) -> bool:
        """refresh(), but a bug is logged and counted as a failed listing instead of raised."""
        try:
            return await self.refresh()
        except Exception:  # a bug must not stop discovery, or the daemon's start
            log.exception("discovery: unexpected error")
            self.failures += 1
            if self._on_refresh is not None:
                self._on_refresh(self, False)
            return False
        finally:
            self.first_listing_done.set()

    async def run(self, *, first_delay: float = 0.0) -> None:
        """Refresh forever: every interval, or sooner after a failure; never raises."""
        await self._sleep(first_delay)
        while True:
            ok = await self.refresh_guarded()
            await self._sleep(
                self.config.interval if ok else min(RETRY_SECONDS, self.config.interval)
            )
