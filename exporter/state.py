"""What the exporter knows right now: written by the poller, read by the collector and the web pages.

Everything runs on one event loop, so readers see a consistent picture without locks. ``version``
goes up on every change, so a rendering of this state can be reused until it moves.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from exporter.client import TaskDetails
from exporter.stats import StatsRecord

MAX_ERROR_CODES = 20  # distinct error-code label values before the rest become "other"


@dataclass
class TaskState:
    """One watched task: its last good reading and how polling it has gone."""

    task_id: str
    configured_name: str | None = None
    record: StatsRecord | None = None  # last good values; None once stale or gone
    details: TaskDetails | None = None
    polled: bool = False  # at least one stats poll finished
    up: bool = False  # the last stats poll succeeded
    gone: bool = False  # the cloud says the task does not exist
    last_success_time: float | None = None  # Unix time
    last_success_monotonic: float | None = None
    last_poll_duration: float | None = None
    last_error: str | None = None
    last_reason: str | None = None
    consecutive_failures: int = 0
    backoff_failures: int = (
        0  # consecutive-ish failures of a kind that is backed off (404, 403, 401)
    )
    polls_total: int = 0
    poll_errors: Counter[str] = field(default_factory=Counter)  # reason -> count
    api_errors: Counter[tuple[str, str]] = field(default_factory=Counter)  # (status, code)
    parse_errors: Counter[str] = field(default_factory=Counter)  # API field -> count

    @property
    def display_name(self) -> str:
        """The configured name, else the cloud's task name, else the ID."""
        if self.configured_name:
            return self.configured_name
        if self.details is not None and self.details.task_name:
            return self.details.task_name
        return self.task_id


@dataclass
class ExporterState:
    """All tasks plus the exporter's own health."""

    tasks: dict[str, TaskState] = field(default_factory=dict)
    version: int = 0
    poll_cycles_total: int = 0
    last_cycle_end_monotonic: float | None = None
    last_poll_end_monotonic: float | None = None  # any task's poll, failed or not
    token_refreshes_total: int = 0  # summed over every client, also those replaced by a reload
    clock_skew_seconds: dict[str, float] = field(default_factory=dict)  # by target, once measured
    config_reload_ok: bool = True
    config_reload_failures_total: int = 0
    discovery_enabled: bool = False  # the config has a discovery section (exporter.discovery)
    discovered_tasks: int | None = None  # tasks the last good listing matched; None before one
    discovery_last_success_time: float | None = None  # Unix time
    discovery_failures_total: int = 0
    _error_codes: set[str] = field(default_factory=set)

    def changed(self) -> None:
        """Mark the state as changed (invalidates cached renderings)."""
        self.version += 1

    def code_label(self, code: str | None) -> str:
        """Bound the error-code label: the first MAX_ERROR_CODES distinct codes, then "other"."""
        if not code:
            return "none"
        if code in self._error_codes:
            return code
        if len(self._error_codes) < MAX_ERROR_CODES:
            self._error_codes.add(code)
            return code
        return "other"
