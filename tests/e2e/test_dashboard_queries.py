"""Every query of the Grafana dashboard runs against a real Prometheus scraping the real daemon.

The daemon runs with ``--demo`` (three healthy simulated tasks). Prometheus scrapes it every second
and evaluates the shipped recording rules every second. Grafana itself cannot run here, so the
dashboard's variables are substituted the way TOOLING.md section 5 describes: ``$__rate_interval``
and ``$__interval`` become ``1m``, ``$__range`` becomes ``1h``, and ``$var``/``${var}`` become ``.*``.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from exporter.simulator import DEMO_TASKS

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "dcs-migration-exporter.json"
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"

DEMO_TASK_IDS = {task_id for task_id, _ in DEMO_TASKS}

# Queries that may legitimately be empty against the healthy demo, and why. Each must still parse,
# and every metric it names must exist (checked in tests/deploy/test_dashboard.py).
MAY_BE_EMPTY = {
    "dcs_migration_poll_errors_total": "error counters appear only after a failed poll",
    "dcs_migration_api_errors_total": "error counters appear only after an error answer",
    "dcs_migration_parse_errors_total": "error counters appear only after an unreadable field",
    "task:dcs_migration_full_sync_eta_seconds:deriv5m": (
        "the demo's full-phase task gains 1 % every 144 s: no movement within the test"
    ),
    "task:dcs_migration_offset_catchup_eta_seconds:deriv5m": (
        "exists only while a random demo offset happens to shrink over 5 minutes"
    ),
}


def substitute(expr: str) -> str:
    """Replace Grafana's built-in and dashboard variables as TOOLING.md section 5 says."""
    expr = expr.replace("$__rate_interval", "1m").replace("$__interval", "1m")
    expr = expr.replace("$__range", "1h")
    return re.sub(r"\$\{\w+\}|\$\w+", ".*", expr)


def panel_targets(dashboard: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield (panel title, target) for every query target, rows included."""
    for panel in dashboard["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            for target in inner.get("targets", []):
                yield inner["title"], target


def test_every_dashboard_query_parses_and_returns_data(
    start_exporter: Callable[..., tuple[str, Any]],
    start_prometheus: Callable[[dict[str, Any]], Any],
    tmp_path: Path,
) -> None:
    """Each panel query parses, and each returns series from the demo unless listed as may-be-empty."""
    exporter_url, _ = start_exporter("--demo")
    rules = tmp_path / "rules.yml"
    rules.write_text(RULES.read_text())
    prometheus = start_prometheus(
        {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(rules)],
            "scrape_configs": [
                {
                    "job_name": "dcs-migration-exporter",
                    "static_configs": [{"targets": [exporter_url.removeprefix("http://")]}],
                }
            ],
        }
    )
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [
        (title, target["refId"], substitute(target["expr"]))
        for title, target in panel_targets(dashboard)
    ]
    assert len(queries) >= 15

    # The first scrape lands ~5-6 s after Prometheus starts; rate()/deriv() need two samples more.
    deadline = time.monotonic() + 30
    while True:
        empty: list[str] = []
        for title, ref, expr in queries:
            status, body = prometheus.api("query", query=expr)
            assert status == 200, f"{title} [{ref}] does not parse: {expr}\n{body}"
            assert body["status"] == "success", f"{title} [{ref}]: {body}"
            if not body["data"]["result"] and not any(name in expr for name in MAY_BE_EMPTY):
                empty.append(f"{title} [{ref}]: {expr}")
        if not empty or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert empty == [], "queries without data after 30 s:\n" + "\n".join(empty)

    # The task table shows the demo tasks by name, with their status.
    rows = prometheus.query(
        substitute(
            next(
                t["expr"]
                for _, t in panel_targets(dashboard)
                if "dcs_migration_task_info" in t["expr"]
            )
        )
    )
    assert {row["metric"]["task_id"] for row in rows} == DEMO_TASK_IDS
    assert {row["metric"]["task_name"] for row in rows} == {
        "orders-cache",
        "sessions-cache",
        "catalog-cache",
    }
    assert all(row["metric"]["status"] for row in rows)


def test_dashboard_variables_resolve_to_the_demo_job_and_tasks(
    start_exporter: Callable[..., tuple[str, Any]],
    start_prometheus: Callable[[dict[str, Any]], Any],
    wait_until: Callable[..., Any],
) -> None:
    """The job and task variables' label_values() queries list the scraped job and the 3 task IDs."""
    exporter_url, _ = start_exporter("--demo")
    prometheus = start_prometheus(
        {
            "global": {"scrape_interval": "1s"},
            "scrape_configs": [
                {
                    "job_name": "dcs-migration-exporter",
                    "static_configs": [{"targets": [exporter_url.removeprefix("http://")]}],
                }
            ],
        }
    )
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"

    def label_values(name: str) -> set[str]:
        match = re.fullmatch(r"label_values\((.+), *(\w+)\)", variables[name]["definition"])
        assert match, variables[name]["definition"]
        selector, label = substitute(match.group(1)), match.group(2)
        status, body = prometheus.api(f"label/{label}/values", **{"match[]": selector})
        assert status == 200, body
        return set(body["data"])

    wait_until(lambda: label_values("task") == DEMO_TASK_IDS, 30, "the demo task IDs")
    assert label_values("job") == {"dcs-migration-exporter"}
