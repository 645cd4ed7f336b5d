"""Turn the exporter state into fresh metric families on every collection.

No labelled gauge lives beyond one scrape, so a task that is removed or gone simply stops being
yielded (CASES C26). Values are validated by ``stats.parse_stats`` before they get here; a field
it could not read is None and yields no sample at all. Exposition sample::

    # HELP dcs_migration_offset Incremental offset between source and target; 0 means in sync.
    # TYPE dcs_migration_offset gauge
    dcs_migration_offset{task_id="31c6fd2b-2893-430b-90ff-d1adb8060585"} 100.0
    # HELP dcs_migration_up 1 if the last stats poll of the task succeeded.
    # TYPE dcs_migration_up gauge
    dcs_migration_up{task_id="31c6fd2b-2893-430b-90ff-d1adb8060585"} 1.0
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from exporter import __version__
from exporter.client import ErrorKind
from exporter.state import ExporterState

# (metric name, StatsRecord attribute, help)
VALUE_METRICS = (
    (
        "dcs_migration_progress_ratio",
        "progress_ratio",
        "Progress of the full migration phase, 0 to 1.",
    ),
    (
        "dcs_migration_offset",
        "offset",
        "Incremental offset between source and target; 0 means in sync.",
    ),
    ("dcs_migration_source_keys", "source_keys", "Number of keys in the source."),
    ("dcs_migration_target_keys", "target_keys", "Number of keys in the target."),
    (
        "dcs_migration_target_input_bytes_per_second",
        "target_input_bytes_per_second",
        "Data written into the target, bytes per second.",
    ),
    (
        "dcs_migration_target_ops_per_second",
        "target_ops_per_second",
        "Operations per second on the target.",
    ),
    ("dcs_migration_migrating", "migrating", "1 while the task is migrating."),
)
TASK_INFO_LABELS = (
    "task_id",
    "task_name",
    "status",
    "migration_method",
    "source_instance_name",
    "target_instance_name",
)
POLL_ERROR_REASONS = tuple(kind.value for kind in ErrorKind)


class DcsCollector(Collector):
    """A prometheus_client collector reading an ExporterState."""

    def __init__(self, state: ExporterState) -> None:
        self.state = state

    def describe(self) -> list[Metric]:
        """Nothing up front: families depend on the state, which changes."""
        return []

    def collect(self) -> Iterator[Metric]:
        """Yield every family, built from the current state."""
        yield from self._values()
        yield from self._health()
        yield from self._errors()
        yield from self._exporter()

    def _values(self) -> Iterator[Metric]:
        tasks = list(self.state.tasks.values())
        for name, attribute, help_text in VALUE_METRICS:
            family = GaugeMetricFamily(name, help_text, labels=["task_id"])
            for task in tasks:
                value = getattr(task.record, attribute) if task.record is not None else None
                if value is not None:
                    family.add_metric([task.task_id], value)
            yield family
        info = GaugeMetricFamily(
            "dcs_migration_task_info",
            "Task details from the API; always 1.",
            labels=list(TASK_INFO_LABELS),
        )
        for task in tasks:
            details = task.details
            if task.gone or (details is None and not task.configured_name):
                continue
            info.add_metric(
                [
                    task.task_id,
                    task.display_name,
                    details.status if details else "",
                    details.migration_method if details else "",
                    details.source_instance_name if details else "",
                    details.target_instance_name if details else "",
                ],
                1.0,
            )
        yield info

    def _health(self) -> Iterator[Metric]:
        tasks = [task for task in self.state.tasks.values() if task.polled]
        up = GaugeMetricFamily(
            "dcs_migration_up",
            "1 if the last stats poll of the task succeeded.",
            labels=["task_id"],
        )
        last = GaugeMetricFamily(
            "dcs_migration_last_success_timestamp_seconds",
            "Unix time of the last successful stats poll.",
            labels=["task_id"],
        )
        duration = GaugeMetricFamily(
            "dcs_migration_poll_duration_seconds",
            "Wall time of the last stats poll.",
            labels=["task_id"],
        )
        for task in tasks:
            up.add_metric([task.task_id], 1.0 if task.up else 0.0)
            if task.last_success_time is not None:
                last.add_metric([task.task_id], task.last_success_time)
            if task.last_poll_duration is not None:
                duration.add_metric([task.task_id], task.last_poll_duration)
        yield from (up, last, duration)

    def _errors(self) -> Iterator[Metric]:
        tasks = list(self.state.tasks.values())
        polls = CounterMetricFamily(
            "dcs_migration_polls", "Stats polls attempted.", labels=["task_id"]
        )
        poll_errors = CounterMetricFamily(
            "dcs_migration_poll_errors",
            "Failed stats polls by reason.",
            labels=["task_id", "reason"],
        )
        api_errors = CounterMetricFamily(
            "dcs_migration_api_errors",
            "Error answers by HTTP status (or timeout/connection) and DCS error code.",
            labels=["task_id", "status", "code"],
        )
        parse_errors = CounterMetricFamily(
            "dcs_migration_parse_errors",
            "Stats fields that were missing or unreadable.",
            labels=["task_id", "field"],
        )
        for task in tasks:
            polls.add_metric([task.task_id], task.polls_total)
            for reason, count in sorted(task.poll_errors.items()):
                poll_errors.add_metric([task.task_id, reason], count)
            for (status, code), count in sorted(task.api_errors.items()):
                api_errors.add_metric([task.task_id, status, code], count)
            for field, count in sorted(task.parse_errors.items()):
                parse_errors.add_metric([task.task_id, field], count)
        yield from (polls, poll_errors, api_errors, parse_errors)

    def _exporter(self) -> Iterator[Metric]:
        state = self.state
        yield CounterMetricFamily(
            "dcs_migration_poll_cycles",
            "Completed polling rounds (a heartbeat of the scheduler).",
            value=state.poll_cycles_total,
        )
        yield CounterMetricFamily(
            "dcs_migration_token_refreshes",
            "IAM token requests, summed over every target's client.",
            value=state.token_refreshes_total,
        )
        if state.clock_skew_seconds:
            skew = GaugeMetricFamily(
                "dcs_migration_clock_skew_seconds",
                "API server Date minus the local clock, measured when a signature was rejected.",
                labels=["target"],
            )
            for target, seconds in sorted(state.clock_skew_seconds.items()):
                skew.add_metric([target], seconds)
            yield skew
        yield GaugeMetricFamily(
            "dcs_migration_config_last_reload_successful",
            "1 if the last configuration load succeeded.",
            value=1.0 if state.config_reload_ok else 0.0,
        )
        yield CounterMetricFamily(
            "dcs_migration_config_reload_failures",
            "Rejected configuration reloads.",
            value=state.config_reload_failures_total,
        )
        if state.discovery_enabled:
            yield from self._discovery()
        build = GaugeMetricFamily(
            "dcs_migration_exporter_build_info", "Exporter version; always 1.", labels=["version"]
        )
        build.add_metric([__version__], 1.0)
        yield build

    def _discovery(self) -> Iterator[Metric]:
        state = self.state
        if state.discovered_tasks is not None:
            yield GaugeMetricFamily(
                "dcs_migration_discovered_tasks",
                "Tasks the last successful discovery listing matched (all shards).",
                value=state.discovered_tasks,
            )
        if state.discovery_last_success_time is not None:
            yield GaugeMetricFamily(
                "dcs_migration_discovery_last_success_timestamp_seconds",
                "Unix time of the last successful discovery listing.",
                value=state.discovery_last_success_time,
            )
        yield CounterMetricFamily(
            "dcs_migration_discovery_failures",
            "Discovery listings that failed (the previous result was kept).",
            value=state.discovery_failures_total,
        )
