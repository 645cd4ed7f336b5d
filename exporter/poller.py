"""Poll every task in the background and keep its state.

One scheduler runs per project. Every ``interval`` (on a fixed grid, so the cadence does not drift)
it starts a poll for each task that is due and not still busy with its previous poll, so a slow
answer never stacks a second request on the same task (CASES C13) and never delays the other tasks.
A poll never raises: whatever goes wrong is classified, counted and logged, and the task shows
``up 0``.

Series lifecycle: a failed poll sets ``up 0`` at once. The last good values stay until
``stale_intervals`` polls in a row have failed or ``stale_intervals`` intervals have passed since
the last success, whichever comes first, and are then dropped (CASES C29). A task the cloud says
is gone (DCS.4133) loses its values at the first such answer (C11); a task removed from the config
loses every series (C26).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import time
from collections.abc import Awaitable, Callable, Iterable

from exporter.client import ApiError, DcsClient, ErrorKind
from exporter.config import DEFAULT_TARGET_NAME, PollingConfig, TaskConfig
from exporter.state import ExporterState, TaskState
from exporter.stats import StatsRecord, UnexpectedShape, parse_stats

log = logging.getLogger(__name__)

MAX_BACKOFF_SECONDS = 300.0
# Failures that will not heal by asking again soon: poll these less often.
_BACKOFF_KINDS = frozenset({ErrorKind.NOT_FOUND, ErrorKind.PERMISSION, ErrorKind.AUTH})
_LOG_EVERY_NTH_REPEAT = 20
# What varies between two reports of the same problem: a request id, a number of seconds.
_REQUEST_ID = re.compile(r" \(request id [^)]*\)")
_SECONDS = re.compile(r"\d+(?:\.\d+)?s\b")
# A task whose due time is this close (as a fraction of the interval) to the round is polled in it:
# timers fire a little early or late, and a task must not slip to the round after.
_DUE_SLACK = 0.1


def _same_problem(previous: str | None, message: str) -> bool:
    """Whether two failure messages report the same problem, so the second need not be logged:
    equal but for request ids and seconds ("paused for another 3.0s" after "5.0s")."""
    if previous is None:
        return False

    def shape(text: str) -> str:
        return _SECONDS.sub("Ns", _REQUEST_ID.sub("", text))

    return shape(previous) == shape(message)


class Poller:
    """Schedules and runs the polls of one project's tasks (one target of the config).

    Several pollers may share one state, one per target; each owns only its own tasks.
    """

    def __init__(
        self,
        state: ExporterState,
        client: DcsClient,
        polling: PollingConfig,
        tasks: Iterable[TaskConfig],
        *,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
        target: str = DEFAULT_TARGET_NAME,
        owned: Iterable[str] | None = None,
    ) -> None:
        self.state = state
        self.client = client
        self.target = target
        # The client's token fetches already added to state.token_refreshes_total.
        self._token_fetches_counted = 0
        self.polling = polling
        self._monotonic = monotonic
        self._wall = wall
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._semaphore = asyncio.Semaphore(polling.concurrency)
        self._busy: set[str] = set()
        self._next_due: dict[str, float] = {}
        self._details_due: dict[str, float] = {}
        self._overrun_logged: set[str] = set()
        self._running: set[asyncio.Task[None]] = set()
        self._abandoned: set[str] = set()  # tasks whose poll stop() cancelled
        # Not before then: a cancelled request of the task may still be with the API.
        self._hold_until: dict[str, float] = {}
        # The tasks of the poller this one replaces (a reload), by default every task already in
        # the state, are this poller's to keep or drop: one missing from the new list must lose
        # its series here too. Other targets' pollers pass their own.
        self._task_ids: list[str] = [
            task_id
            for task_id in (state.tasks if owned is None else owned)
            if task_id in state.tasks
        ]
        self.set_tasks(tasks)

    # ---- task set ---------------------------------------------------------------------------

    @property
    def task_ids(self) -> list[str]:
        """IDs of the tasks this poller owns, in config order."""
        return list(self._task_ids)

    def set_tasks(self, tasks: Iterable[TaskConfig]) -> None:
        """Adopt a new task list: new tasks start fresh, removed tasks lose all their series."""
        wanted = {task.id: task for task in tasks}
        for task_id in self._task_ids:
            if task_id not in wanted:
                self.state.tasks.pop(task_id, None)
                for table in (self._next_due, self._details_due):
                    table.pop(task_id, None)
                self._overrun_logged.discard(task_id)
                log.info("stopped watching task %s", task_id)
        for task_id, task in wanted.items():
            existing = self.state.tasks.get(task_id)
            if existing is None:
                self.state.tasks[task_id] = TaskState(task_id=task_id, configured_name=task.name)
                # Due at the next round; run() already starts with a little jitter.
                self._next_due[task_id] = 0.0
            else:
                existing.configured_name = task.name
        self._task_ids = list(wanted)
        self.state.changed()

    def carry_over(self, previous: Poller) -> None:
        """Continue the schedule of the poller this one replaces (a reload rebuilt the client).

        Tasks polled a moment ago are not polled again at once (a new interval shortens the wait
        but never makes it longer than that interval), and the project's 429 pause and backoff
        stay in force.
        """
        now = self._monotonic()
        latest = now + self.polling.interval
        for task_id in self._task_ids:
            if task_id in previous._next_due:
                self._next_due[task_id] = min(previous._next_due[task_id], latest)
            # A cancelled request may still be with the API until its timeout: at most one
            # request in flight per task (CASES C13), however many reloads come in between.
            hold = previous._hold_until.get(task_id, 0.0)
            if task_id in previous._abandoned:
                hold = max(hold, now + previous.polling.timeout)
            if hold > now:
                self._hold_until[task_id] = hold
                self._next_due[task_id] = max(self._next_due.get(task_id, 0.0), hold)
            if task_id in previous._details_due:
                self._details_due[task_id] = previous._details_due[task_id]
        self.client.throttle.carry_over(previous.client.throttle)

    # ---- scheduling -------------------------------------------------------------------------

    async def run(self) -> None:
        """Poll forever, one round per interval."""
        # A little jitter so that replicas or exporters started together do not poll in step.
        await self._sleep(self._rng.uniform(0, min(1.0, self.polling.interval / 10)))
        next_round = self._monotonic()
        while True:
            self.start_round()
            # Rounds sit on a fixed grid; after a stall (a blocked loop) skip the missed ones.
            next_round += self.polling.interval
            now = self._monotonic()
            if next_round < now:
                next_round = now
            await self._sleep(next_round - now)

    def start_round(self) -> asyncio.Task[None]:
        """Start the polls that are due now; the returned task ends when they have all ended."""
        now = self._monotonic()
        self._expire_stale(now)
        due: list[TaskState] = []
        horizon = now + _DUE_SLACK * self.polling.interval
        for task_id in self._task_ids:
            task = self.state.tasks.get(task_id)
            if task is None or self._next_due.get(task_id, 0.0) > horizon:
                continue
            if task_id in self._busy:
                if task_id not in self._overrun_logged:
                    log.warning(
                        "task %s: previous poll still running after %gs; skipping this round",
                        task_id,
                        self.polling.interval,
                    )
                    self._overrun_logged.add(task_id)
                continue
            self._overrun_logged.discard(task_id)
            self._busy.add(task_id)  # now, not when the round starts running: no double start
            due.append(task)
        round_task = asyncio.get_running_loop().create_task(self._round(due, now))
        self._running.add(round_task)
        round_task.add_done_callback(self._running.discard)
        return round_task

    async def poll_all_once(self) -> bool:
        """Poll every task now, ignoring the schedule; True when every poll succeeded."""
        for task_id in self._task_ids:
            self._next_due[task_id] = 0.0
        await self.start_round()
        return all(self.state.tasks[t].up for t in self._task_ids if t in self.state.tasks)

    async def stop(self) -> None:
        """Cancel polls in flight and wait for them to finish cancelling."""
        # The API may still be working on their requests; a successor must not ask again at once.
        self._abandoned |= self._busy
        for task in list(self._running):
            task.cancel()
        for task in list(self._running):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._busy.clear()  # a round cancelled before it ran never reached its cleanup

    def _expire_stale(self, now: float) -> None:
        """Drop the values of failing tasks once they are too old, even while no poll ends."""
        for task_id in self._task_ids:
            task = self.state.tasks.get(task_id)
            if (
                task is not None
                and task.record is not None
                and not task.up
                and self._is_stale(task, now)
            ):
                log.info("task %s: dropping its last values, they are too old", task.task_id)
                task.record = None
                self.state.changed()

    async def _round(self, due: list[TaskState], scheduled: float) -> None:
        await asyncio.gather(*(self._guarded_poll(task, scheduled) for task in due))
        self.state.poll_cycles_total += 1
        self.state.last_cycle_end_monotonic = self._monotonic()
        self.state.changed()

    async def _guarded_poll(self, task: TaskState, scheduled: float) -> None:
        try:
            async with self._semaphore:
                if self.state.tasks.get(task.task_id) is not task:
                    return  # removed by a reload while it waited
                await self.poll_task(task, scheduled)
                self.state.last_poll_end_monotonic = self._monotonic()  # a heartbeat (web.health)
        except Exception:  # poll_task never raises; if it does, the round must still end
            log.exception("task %s: bug in the poller", task.task_id)
        finally:
            # Per task, not per round: a slow task must not hold back the others' next polls.
            self._busy.discard(task.task_id)
            self.record_client_health()

    def record_client_health(self) -> None:
        """Add the client's new token fetches to the state's sum, and note its clock skew.

        The state's counter is a sum over every target's client and never goes back, also when a
        reload replaces a client (whose own count starts again at 0).
        """
        fetches, skew = self.client.token_fetches, self.client.clock_skew
        changed = False
        if fetches > self._token_fetches_counted:
            self.state.token_refreshes_total += fetches - self._token_fetches_counted
            changed = True
        self._token_fetches_counted = max(self._token_fetches_counted, fetches)
        if skew is not None and self.state.clock_skew_seconds.get(self.target) != skew:
            self.state.clock_skew_seconds[self.target] = skew
            changed = True
        if changed:
            self.state.changed()

    # ---- one poll ---------------------------------------------------------------------------

    async def poll_task(self, task: TaskState, scheduled: float | None = None) -> None:
        """Poll one task's stats (then its details when due) and record the outcome; never raises.

        ``scheduled`` is the round the poll belongs to; the next poll is due an interval (or a
        backoff) after it, so that the task stays on the round grid.
        """
        started = self._monotonic()
        if scheduled is None:
            scheduled = started
        task.polls_total += 1
        try:
            body = await self.client.get_stats(task.task_id)
            record = parse_stats(body)
        except ApiError as error:
            self._record_failure(task, error.kind, str(error), started, scheduled, error)
        except UnexpectedShape as error:
            self._record_failure(task, ErrorKind.UNEXPECTED_SHAPE, str(error), started, scheduled)
        except Exception as error:  # a bug must not end the loop (CASES C30)
            log.exception("task %s: unexpected error while polling", task.task_id)
            message = f"{type(error).__name__}: {error}"
            self._record_failure(task, ErrorKind.INTERNAL, message, started, scheduled, logged=True)
        else:
            self._record_success(task, record, started, scheduled)
        self.state.changed()
        if self.state.tasks.get(task.task_id) is not task:
            # Removed by a reload while the poll was out: keep no schedule for it.
            self._next_due.pop(task.task_id, None)
            self._details_due.pop(task.task_id, None)
            return
        if not task.gone:
            # After the stats, so that a slow details call never delays or fails a stats poll.
            # Also after a failed stats poll: a task whose stats fail may still report its status
            # (FAILED, say), which is what the task-failed alert reads.
            await self._refresh_details(task, started)

    async def _refresh_details(self, task: TaskState, now: float) -> None:
        """Fetch name and status now and then; a failure here does not fail the stats poll."""
        if self._details_due.get(task.task_id, 0.0) > now:
            return
        try:
            task.details = await self.client.get_task(task.task_id)
            self._details_due[task.task_id] = now + self.polling.details_interval
        except ApiError as error:
            self._count_api_error(task, error)
            log.log(
                logging.DEBUG if error.held else logging.WARNING,
                "task %s: details unavailable: %s",
                task.task_id,
                error,
            )
            if error.gone:
                task.details = None
            # Try again after one interval rather than a whole details interval.
            self._details_due[task.task_id] = now + self.polling.interval
        except Exception:
            log.exception("task %s: unexpected error while reading its details", task.task_id)
            self._details_due[task.task_id] = now + self.polling.interval
        self.state.changed()

    def _record_success(
        self, task: TaskState, record: StatsRecord, started: float, scheduled: float
    ) -> None:
        now = self._monotonic()
        log.debug("task %s: polled in %.3fs", task.task_id, now - started)
        if not task.up and task.consecutive_failures:
            log.info(
                "task %s: polling works again after %d failures",
                task.task_id,
                task.consecutive_failures,
            )
        self._log_field_problems(task, record)
        task.record = record
        task.polled = task.up = True
        task.gone = False
        task.consecutive_failures = task.backoff_failures = 0
        task.last_error = task.last_reason = None
        task.last_success_time = self._wall()
        task.last_success_monotonic = now
        task.last_poll_duration = now - started
        for problem in record.problems:
            task.parse_errors[problem.field] += 1
        self._next_due[task.task_id] = scheduled + self.polling.interval

    def _log_field_problems(self, task: TaskState, record: StatsRecord) -> None:
        """Warn when a field's problem first appears or changes; repeats stay quiet."""
        previous = task.record
        before = {p.field: p for p in previous.problems} if previous else {}
        for problem in record.problems:
            if before.get(problem.field) != problem:
                log.warning("task %s: %s", task.task_id, problem.describe())
        earlier_imprecise = set(previous.imprecise_fields) if previous else set()
        for name in record.imprecise_fields:
            if name not in earlier_imprecise:
                log.warning(
                    "task %s: field %s is above 2^53; Prometheus stores float64, so changes "
                    "smaller than its precision are invisible and a stalled-offset alert may fire",
                    task.task_id,
                    name,
                )

    def _record_failure(
        self,
        task: TaskState,
        kind: ErrorKind,
        message: str,
        started: float,
        scheduled: float,
        error: ApiError | None = None,
        *,
        logged: bool = False,
    ) -> None:
        now = self._monotonic()
        task.polled = True
        task.up = False
        task.consecutive_failures += 1
        task.last_poll_duration = now - started
        task.poll_errors[kind.value] += 1
        if error is not None:
            self._count_api_error(task, error)
        repeated = task.last_reason == kind.value and _same_problem(task.last_error, message)
        task.last_error, task.last_reason = message, kind.value
        if error is not None and error.held:
            # The pause or hold was logged once when it began; one line per task and round
            # would bury it (5 tasks in a 60 s pause: dozens of lines).
            log.debug("task %s: poll not sent [%s]: %s", task.task_id, kind.value, message)
        elif not logged and (
            not repeated or task.consecutive_failures % _LOG_EVERY_NTH_REPEAT == 0
        ):
            suffix = f" ({task.consecutive_failures} failures in a row)" if repeated else ""
            log.warning(
                "task %s: poll failed [%s]: %s%s", task.task_id, kind.value, message, suffix
            )
        if error is not None and error.gone:
            if not task.gone:
                log.warning(
                    "task %s: the cloud says it does not exist; dropping its values", task.task_id
                )
            task.gone = True
            task.record = task.details = None
            self._details_due[task.task_id] = 0.0  # should it come back, show its details soon
        elif task.record is not None and (
            task.consecutive_failures >= self.polling.stale_intervals or self._is_stale(task, now)
        ):
            log.info(
                "task %s: dropping its last values after %d failed polls",
                task.task_id,
                task.consecutive_failures,
            )
            task.record = None
        delay = self.polling.interval
        if kind in _BACKOFF_KINDS:
            # Doubling counts only failures that backoff is for: timeouts or a throttled project
            # before a single 404 must not push the next poll minutes away.
            task.backoff_failures += 1
            delay = min(MAX_BACKOFF_SECONDS, delay * 2 ** min(task.backoff_failures - 1, 16))
            delay = max(delay, self.polling.interval)
        self._next_due[task.task_id] = scheduled + delay

    def _is_stale(self, task: TaskState, now: float) -> bool:
        """Whether the last good values are older than ``stale_intervals`` intervals."""
        if task.last_success_monotonic is None:
            return True
        return (
            now - task.last_success_monotonic
            >= self.polling.stale_intervals * self.polling.interval
        )

    def _count_api_error(self, task: TaskState, error: ApiError) -> None:
        """Count error answers (and timeouts, connection failures); a broken 200 is not one, nor is
        a request that never went out (the project was paused)."""
        if not error.sent or (error.status is not None and 200 <= error.status < 300):
            return
        code = self.state.code_label(error.code)
        task.api_errors[(error.status_label, code)] += 1
