"""scripts/render_dashboard.py draws every panel of the real dashboard from canned query results."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from scripts import render_dashboard as rd  # scripts/ is no package: a namespace import

DASHBOARD = json.loads(rd.DASHBOARD.read_text())
START = 1_700_000_000.0
TIME_RANGE = (START, START + 180.0)
LABELS = {
    "job": "dcs-migration-exporter",
    "instance": "127.0.0.1:9713",
    "status": "INCRMIGRATING",
    "migration_method": "incremental_migration",
    "version": "1.2.3",
    "reason": "timeout",
    "code": "DCS.4133",
    "field": "offset",
}
TASKS = [("orders-cache", 0.25), ("sessions-cache", 1.0), ("catalog-cache", 1.0)]
EMPTY_PANEL = "Full-sync ETA"


def canned(panel: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """One series per demo task for each target: 60 points for range panels, one for instant."""
    answer: dict[str, list[dict[str, Any]]] = {}
    for target in panel.get("targets", []):
        items = []
        for number, (name, value) in enumerate(TASKS):
            labels = {
                **LABELS,
                "task_id": f"task-{number}",
                "task_name": name,
                "source_instance_name": f"{name}-src",
                "target_instance_name": f"{name}-dst",
            }
            grouped = re.search(r"\bby \(([^)]*)\)", target["expr"])
            if grouped:  # aggregations keep only their grouping labels
                kept = {label.strip() for label in grouped.group(1).split(",")}
                labels = {key: text for key, text in labels.items() if key in kept}
            if panel["type"] in rd.INSTANT_TYPES:
                items.append({"metric": labels, "value": [TIME_RANGE[1], str(value)]})
            else:
                values = [[START + 3 * i, str(value * (0.5 + i / 118))] for i in range(60)]
                items.append({"metric": labels, "values": values})
        answer[target["refId"]] = [] if panel["title"] == EMPTY_PANEL else items
    return answer


def texts(ax: Any) -> list[str]:
    return [text.get_text() for text in ax.texts]


def test_every_panel_is_drawn_with_its_title_and_the_png_is_written(tmp_path: Path) -> None:
    results = {panel["id"]: canned(panel) for panel in rd.iter_panels(DASHBOARD)}
    figure, drawn = rd.draw_dashboard(DASHBOARD, results, time_range=TIME_RANGE)
    panels = list(rd.iter_panels(DASHBOARD))
    assert set(drawn) == {panel["id"] for panel in panels}
    for panel in panels:
        assert panel["title"] in drawn[panel["id"]].get_title(loc="left"), panel["title"]
    by_title = {panel["title"]: drawn[panel["id"]] for panel in panels}
    assert "No data" in texts(by_title[EMPTY_PANEL])
    assert "No data" not in texts(by_title["Full-sync progress"])
    # Legends substitute {{task_name}} and show the last value in the panel's unit (percentunit).
    progress = texts(by_title["Full-sync progress"])
    assert {"orders-cache", "sessions-cache", "catalog-cache", "25%", "100%"} <= set(progress)
    # The table shows merged rows, renamed columns and value mappings.
    table = texts(by_title["Migration tasks"])
    assert {"Task", "Task ID", "Full sync", "Poll OK", "orders-cache", "25%", "ok"} <= set(table)
    output = tmp_path / "images" / "dashboard.png"
    rd.save_png(figure, output)
    assert output.read_bytes().startswith(b"\x89PNG") and output.stat().st_size > 10_000


def test_no_results_at_all_draws_no_data_everywhere(tmp_path: Path) -> None:
    figure, drawn = rd.draw_dashboard(DASHBOARD, {})
    for panel in rd.iter_panels(DASHBOARD):
        if panel["type"] != "row":
            assert "No data" in texts(drawn[panel["id"]]), panel["title"]
    rd.save_png(figure, tmp_path / "empty.png")
    assert (tmp_path / "empty.png").stat().st_size > 0


def test_collapsed_row_panels_are_drawn_below_its_header() -> None:
    inner = {
        "id": 2,
        "type": "timeseries",
        "title": "Inside",
        "gridPos": {"x": 0, "y": 5, "w": 24, "h": 8},
        "targets": [{"refId": "A", "expr": "up", "legendFormat": "{{instance}}"}],
    }
    dashboard = {
        "panels": [
            {"id": 1, "type": "row", "title": "Hidden", "collapsed": True, "panels": [inner],
             "gridPos": {"x": 0, "y": 0, "w": 24, "h": 1}},
            {"id": 3, "type": "row", "title": "Next", "collapsed": False, "panels": [],
             "gridPos": {"x": 0, "y": 1, "w": 24, "h": 1}},
        ]
    }  # fmt: skip
    assert [(p["id"], pos[1]) for p, pos in rd.layout(dashboard)] == [(1, 0), (2, 1), (3, 9)]
    _, drawn = rd.draw_dashboard(dashboard, {2: {"A": []}})
    assert "Hidden" in drawn[1].get_title(loc="left")
    assert "No data" in texts(drawn[2])


@pytest.mark.parametrize(
    ("value", "unit", "shown"),
    [
        (0.4567, "percentunit", "45.7%"),
        (531_221.0, "short", "531 K"),
        (1_250_000.0, "short", "1.25 Mil"),
        (0.003, "s", "3 ms"),
        (150.0, "s", "2.5 min"),
        (2_400_000.0, "Bps", "2.4 MB/s"),
        (1800.0, "ops", "1.8K ops/s"),
        (0.0, "reqps", "0 req/s"),
        (-12.5, None, "-12.5"),
    ],
)
def test_format_value_follows_grafana_units(value: float, unit: str | None, shown: str) -> None:
    assert rd.format_value(value, unit) == shown


def test_legend_name_substitutes_labels_or_falls_back_to_the_series() -> None:
    labels = {"__name__": "up", "instance": "a:1"}
    assert rd.legend_name("scrape {{instance}}/{{ missing }}", labels) == "scrape a:1/"
    assert rd.legend_name("", labels) == 'up{instance="a:1"}'
    assert rd.legend_name(None, {}, "sum(x)") == "sum(x)"
