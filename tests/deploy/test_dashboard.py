"""Static checks of the Grafana dashboard deploy/grafana/dcs-migration-exporter.json.

Its queries are run against a real Prometheus in tests/e2e/test_dashboard_queries.py.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "dcs-migration-exporter.json"
METRICS_DOC = ROOT / "docs" / "METRICS.md"
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"


def _dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def _panels() -> Iterator[dict[str, Any]]:
    for panel in _dashboard()["panels"]:
        yield panel
        yield from panel.get("panels", [])


def _exprs() -> list[str]:
    return [target["expr"] for panel in _panels() for target in panel.get("targets", [])]


def _documented_metrics() -> set[str]:
    return set(re.findall(r"^\| `(dcs_migration_\w+)` \|", METRICS_DOC.read_text(), re.MULTILINE))


def _recorded_metrics() -> set[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {rule["record"] for group in groups for rule in group["rules"] if "record" in rule}


def test_every_query_names_only_documented_or_recorded_metrics() -> None:
    """Each metric a panel queries is in docs/METRICS.md or is a recording rule of rules.yml."""
    known = _documented_metrics() | _recorded_metrics()
    assert "dcs_migration_offset" in known and "task:dcs_migration_offset:deriv5m" in known
    used = {
        name
        for expr in _exprs()
        for name in re.findall(r"\b(dcs_migration_\w+|task\w*:[\w:]+)", expr)
    }
    assert used - known == set()
    assert len(used) >= 15


def test_every_recording_rule_is_used_by_the_dashboard() -> None:
    """No recording rule is dead weight: the dashboard or another rule queries each one."""
    groups = yaml.safe_load(RULES.read_text())["groups"]
    text = "\n".join(_exprs() + [rule["expr"] for group in groups for rule in group["rules"]])
    assert {name for name in _recorded_metrics() if name not in text} == set()


def test_panels_cover_what_an_operator_looks_at() -> None:
    """Progress, offset, keys, ops, bytes/s, poll health, error reasons and a task table exist."""
    text = "\n".join(_exprs())
    for metric in (
        "dcs_migration_progress_ratio",
        "dcs_migration_offset",
        "dcs_migration_source_keys",
        "dcs_migration_target_keys",
        "dcs_migration_target_ops_per_second",
        "dcs_migration_target_input_bytes_per_second",
        "dcs_migration_up",
        "dcs_migration_poll_errors_total",
        "task:dcs_migration_offset:deriv5m",
        "task:dcs_migration_full_sync_eta_seconds:deriv5m",
    ):
        assert metric in text, metric
    assert "sum by (reason)" in text
    tables = [panel for panel in _panels() if panel["type"] == "table"]
    assert len(tables) == 1
    table_exprs = " ".join(target["expr"] for target in tables[0]["targets"])
    assert "dcs_migration_task_info" in table_exprs and "status" in table_exprs


def test_datasource_and_task_variables() -> None:
    """A Prometheus datasource variable feeds every panel; the task variable lists task IDs."""
    variables = {v["name"]: v for v in _dashboard()["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert re.fullmatch(
        r"label_values\(dcs_migration_task_info(\{[^}]*\})?, *task_id\)",
        variables["task"]["definition"],
    )
    assert variables["task"]["multi"] and variables["task"]["includeAll"]
    for panel in _panels():
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"


def test_per_task_queries_filter_by_the_task_variable() -> None:
    """Every query over a per-task metric honours the task selection."""
    for expr in _exprs():
        per_task = re.search(
            r"dcs_migration_(?!exporter_build_info|poll_cycles|token|config)", expr
        )
        if per_task:
            assert 'task_id=~"$task"' in expr, expr


def test_dashboard_identity() -> None:
    """The dashboard has a stable uid and title, unique panel IDs and no hard-coded datasource."""
    dashboard = _dashboard()
    assert dashboard["uid"] == "dcs-migration-exporter"
    assert dashboard["title"] == "DCS migration"
    ids = [panel["id"] for panel in _panels()]
    assert len(ids) == len(set(ids))
    assert "__inputs" not in dashboard  # the Grafana sidecar cannot fill import inputs
