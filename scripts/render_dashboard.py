"""Render the Grafana dashboard's panels from real demo data into one PNG (docs/images/dashboard.png).

Grafana itself cannot run here, so this draws what it would show: the daemon runs with ``--demo``
on a free loopback port, a real Prometheus (Debian package) scrapes it with the shipped recording
rules loaded, and after ``--minutes`` of collection every panel's queries of
deploy/grafana/dcs-migration-exporter.json run through the Prometheus HTTP API (``query_range``
for time series panels, an instant ``query`` for table/stat/gauge panels), with the dashboard
variables substituted as tests/e2e/test_dashboard_queries.py does (all jobs and tasks selected).
matplotlib then lays the panels out by their ``gridPos`` on Grafana's 24-column grid, in Grafana's
dark theme: titles, ``legendFormat`` legends with the last value, the panels' units, value mappings
and gauge cells in tables, "No data" where a query returned nothing. Collapsed rows are drawn
expanded, below their header. Every process started is stopped at the end, on errors and on Ctrl-C.

The drawing (``draw_dashboard``) is pure: it takes the query results, so tests draw from canned data.

Usage: ``.venv/bin/python scripts/render_dashboard.py [--minutes 3] [--output docs/images/dashboard.png]``.
Needs matplotlib (the ``test`` extra) and prometheus/promtool (scripts/install-test-tools.sh).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import signal
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

import numpy as np
import pytest
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.patches import Rectangle
from matplotlib.ticker import Formatter, FuncFormatter, MaxNLocator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.e2e.conftest import (  # noqa: E402
    Processes,
    Prometheus,
    launch_exporter,
    launch_prometheus,
)
from tests.e2e.test_dashboard_queries import DASHBOARD, RULES, substitute  # noqa: E402
from tests.tools import find_tool  # noqa: E402

OUTPUT = ROOT / "docs" / "images" / "dashboard.png"
JOB = "dcs-migration-exporter"

# Panel types whose queries are instant queries; every other type with targets gets query_range.
INSTANT_TYPES = frozenset({"table", "stat", "gauge", "bargauge", "piechart"})

# Query results: panel id -> refId -> the ``data.result`` list of the Prometheus API answer
# (items with ``metric`` and ``values`` for range queries, ``value`` for instant queries).
Results = Mapping[int, Mapping[str, Sequence[Mapping[str, Any]]]]

# --------------------------------------------------------------------------------------------------
# Theme and geometry (logical pixels: 1/100 inch; the PNG has ``scale`` device pixels per one)

CANVAS = "#111217"
PANEL = "#181b1f"
BORDER = "#2c3036"
TEXT = "#ccccdc"
TEXT_WEAK = "#8e8e9e"
GRID = "#2a2d33"
HEADER_ROW = "#22252b"
PALETTE = (
    "#73bf69",
    "#f2cc0c",
    "#8ab8ff",
    "#ff780a",
    "#f2495c",
    "#5794f2",
    "#b877d9",
    "#705da0",
    "#37872d",
    "#fade2a",
)
NAMED_COLORS = {
    "green": "#73bf69",
    "red": "#f2495c",
    "orange": "#ff9830",
    "yellow": "#fade2a",
    "blue": "#5794f2",
    "purple": "#b877d9",
    "text": TEXT,
}

PAGE_PAD = 12.0  # around the grid
GAP = 8.0  # between panels (Grafana's grid margin)
UNIT_HEIGHT = 38.0  # one grid row: 30 px cell + 8 px margin, as in Grafana
HEADER = 58.0  # dashboard title and variable bar above the grid
PANEL_PAD = 8.0
TITLE_HEIGHT = 30.0
LEGEND_LINE = 16.0
TABLE_LINE = 30.0

TITLE_PT = 10.5
TICK_PT = 8.0
LEGEND_PT = 8.5
TABLE_PT = 8.0
CELL_PAD = 14.0  # left + right padding of a table cell
GAUGE_BAR = 70.0  # room for the bar of a gauge cell
ROW_PT = 11.5
NO_DATA_PT = 13.0
NICE_SECONDS = (
    1,
    2,
    5,
    10,
    15,
    30,
    60,
    120,
    300,
    600,
    900,
    1800,
    3600,
    7200,
    10800,
    21600,
    43200,
    86400,
)


@dataclass(frozen=True)
class Box:
    """A rectangle in logical pixels, measured from the page's top-left corner."""

    left: float
    top: float
    width: float
    height: float

    def inset(
        self, left: float = 0.0, top: float = 0.0, right: float = 0.0, bottom: float = 0.0
    ) -> Box:
        return Box(
            self.left + left,
            self.top + top,
            max(1.0, self.width - left - right),
            max(1.0, self.height - top - bottom),
        )


@dataclass
class Page:
    """The figure and its size in logical pixels."""

    figure: Figure
    width: float
    height: float
    canvas: FigureCanvasAgg = field(init=False)

    def __post_init__(self) -> None:
        self.canvas = FigureCanvasAgg(self.figure)

    def axes(self, box: Box, facecolor: str = "none") -> Axes:
        """New axes covering ``box``."""
        rect = (
            box.left / self.width,
            1.0 - (box.top + box.height) / self.height,
            box.width / self.width,
            box.height / self.height,
        )
        return self.figure.add_axes(rect, facecolor=facecolor)

    def text_width(self, text: str, points: float, weight: str = "normal") -> float:
        """Width of ``text`` at ``points`` (and ``weight``) in logical pixels."""
        renderer = self.canvas.get_renderer()  # type: ignore[no-untyped-call]  # untyped in matplotlib
        width, _, _ = renderer.get_text_width_height_descent(
            text, FontProperties(size=points, weight=weight), ismath=False
        )
        return float(width) * 100.0 / self.figure.dpi


# --------------------------------------------------------------------------------------------------
# Units, legends and field config


def _scaled(suffix: str) -> tuple[tuple[float, str], ...]:
    return tuple((1000.0**i, prefix + suffix) for i, prefix in enumerate(("", "K", "M", "B", "T")))


# unit -> (factor, suffix) steps, smallest first; a value is shown in the largest step it reaches.
UNITS: dict[str, tuple[tuple[float, str], ...]] = {
    "percentunit": ((0.01, "%"),),
    "percent": ((1.0, "%"),),
    "s": (
        (1e-6, " µs"),
        (1e-3, " ms"),
        (1.0, " s"),
        (60.0, " min"),
        (3600.0, " hour"),
        (86400.0, " day"),
    ),
    "short": tuple(
        zip((1.0, 1e3, 1e6, 1e9, 1e12), ("", " K", " Mil", " Bil", " Tri"), strict=True)
    ),
    "ops": _scaled(" ops/s"),
    "reqps": _scaled(" req/s"),
    "Bps": tuple(zip((1.0, 1e3, 1e6, 1e9), (" B/s", " kB/s", " MB/s", " GB/s"), strict=True)),
    "bytes": tuple(
        zip((1.0, 1024.0, 1024.0**2, 1024.0**3), (" B", " KiB", " MiB", " GiB"), strict=True)
    ),
}


def _number(value: float) -> str:
    magnitude = abs(value)
    decimals = 0 if magnitude >= 100 else 1 if magnitude >= 10 else 2
    text = f"{value:.{decimals}f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def unit_step(unit: str | None, magnitude: float) -> tuple[float, str]:
    """The (factor, suffix) ``unit`` shows a value of ``magnitude`` in."""
    steps = UNITS.get(unit or "", ((1.0, ""),))
    if magnitude == 0 or not math.isfinite(magnitude):
        return next((step for step in steps if step[0] == 1.0), steps[0])
    chosen = steps[0]
    for step in steps:
        if magnitude >= step[0]:
            chosen = step
    return chosen


def format_value(value: float, unit: str | None, magnitude: float | None = None) -> str:
    """``value`` as Grafana shows it in ``unit``; ``magnitude`` picks the scale (for axis ticks)."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    # Zero reads "0 s", "0%", "0" whatever the scale of its neighbours.
    factor, suffix = unit_step(unit, abs(value) if magnitude is None or value == 0 else magnitude)
    return _number(value / factor) + suffix


def legend_name(legend_format: str | None, labels: Mapping[str, str], expr: str = "") -> str:
    """The series name: ``legendFormat`` with ``{{label}}`` substituted, else metric{labels}."""
    if legend_format and legend_format != "__auto":
        return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), legend_format)
    rest = ", ".join(f'{key}="{value}"' for key, value in labels.items() if key != "__name__")
    name = labels.get("__name__", "")
    if not name and not rest:
        return expr
    return f"{name}{{{rest}}}" if rest else name


@dataclass(frozen=True)
class FieldConfig:
    """The field-config properties this renderer honours, after overrides."""

    unit: str | None = None
    min: float | None = None
    max: float | None = None
    axis_placement: str = "auto"
    cell_type: str = "auto"
    mappings: tuple[Mapping[str, Any], ...] = ()


def field_config(panel: Mapping[str, Any], ref_id: str, name: str) -> FieldConfig:
    """Defaults of ``panel`` plus the overrides matching the field (by refId, name or regexp)."""
    config = panel.get("fieldConfig", {})
    props: dict[str, Any] = {**config.get("defaults", {})}
    props["custom"] = dict(props.get("custom", {}))
    for override in config.get("overrides", []):
        matcher = override.get("matcher", {})
        kind, option = matcher.get("id"), matcher.get("options")
        if (
            (kind == "byFrameRefID" and option == ref_id)
            or (kind == "byName" and option == name)
            or (kind == "byRegexp" and isinstance(option, str) and re.search(option, name))
        ):
            for prop in override.get("properties", []):
                key, value = prop["id"], prop.get("value")
                if key.startswith("custom."):
                    props["custom"][key.removeprefix("custom.")] = value
                else:
                    props[key] = value
    custom = props["custom"]
    return FieldConfig(
        unit=props.get("unit"),
        min=props.get("min"),
        max=props.get("max"),
        axis_placement=custom.get("axisPlacement", "auto"),
        cell_type=custom.get("cellOptions", {}).get("type", "auto"),
        mappings=tuple(props.get("mappings", [])),
    )


def apply_mappings(
    value: float | str, mappings: Sequence[Mapping[str, Any]]
) -> tuple[str | None, str | None]:
    """(text, color) of the first value/regex mapping matching ``value``; (None, None) if none."""
    plain = _number(value) if isinstance(value, float) else value
    for mapping in mappings:
        options = mapping.get("options", {})
        result: Mapping[str, Any] | None = None
        if mapping.get("type") == "value":
            result = options.get(plain)
        elif mapping.get("type") == "regex" and re.search(options.get("pattern", "^$"), plain):
            result = options.get("result", {})
        if result is not None:
            color = result.get("color")
            return result.get("text"), NAMED_COLORS.get(color, color) if color else None
    return None, None


# --------------------------------------------------------------------------------------------------
# Panels and layout


def iter_panels(dashboard: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    """Every panel, rows and the panels inside (collapsed) rows included."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def _grid(panel: Mapping[str, Any]) -> tuple[int, int, int, int]:
    pos = panel.get("gridPos", {})
    return pos.get("x", 0), pos.get("y", 0), pos.get("w", 12), pos.get("h", 8)


def layout(
    dashboard: Mapping[str, Any],
) -> list[tuple[Mapping[str, Any], tuple[int, int, int, int]]]:
    """(panel, (x, y, w, h)) in grid units; a collapsed row's panels are placed under its header
    and everything below moves down by their height."""
    placed: list[tuple[Mapping[str, Any], tuple[int, int, int, int]]] = []
    shift = 0
    for panel in sorted(dashboard.get("panels", []), key=lambda p: _grid(p)[1::-1]):
        x, y, w, h = _grid(panel)
        placed.append((panel, (x, y + shift, w, h)))
        children = panel.get("panels", []) if panel.get("type") == "row" else []
        if panel.get("collapsed") and children:
            first = min(_grid(child)[1] for child in children)
            base, bottom = y + shift + h, y + shift + h
            for child in sorted(children, key=lambda p: _grid(p)[1::-1]):
                cx, cy, cw, ch = _grid(child)
                placed.append((child, (cx, base + cy - first, cw, ch)))
                bottom = max(bottom, base + cy - first + ch)
            shift += bottom - base
    return placed


@dataclass(frozen=True, eq=False)  # compared by identity, not by the arrays
class Series:
    """One drawn line: its name, field config, and points (NaN where Grafana leaves a gap)."""

    name: str
    config: FieldConfig
    times: np.ndarray[Any, np.dtype[np.float64]]
    values: np.ndarray[Any, np.dtype[np.float64]]

    @property
    def last(self) -> float:
        finite = self.values[np.isfinite(self.values)]
        return float(finite[-1]) if finite.size else math.nan


def _points(item: Mapping[str, Any]) -> list[tuple[float, float]]:
    samples = item.get("values") or ([item["value"]] if "value" in item else [])
    return [(float(t), float(v)) for t, v in samples]


def panel_series(
    panel: Mapping[str, Any], results: Mapping[str, Sequence[Mapping[str, Any]]]
) -> list[Series]:
    """The series of a time series panel, target by target, with gaps (spanNulls false) as NaN."""
    series: list[Series] = []
    for target in panel.get("targets", []):
        ref_id = target.get("refId", "A")
        items = [
            (
                legend_name(
                    target.get("legendFormat"), item.get("metric", {}), target.get("expr", "")
                ),
                item,
            )
            for item in results.get(ref_id, [])
        ]
        for name, item in sorted(items, key=lambda pair: pair[0]):
            points = _points(item)
            if not points:
                continue
            times = np.array([t for t, _ in points])
            values = np.array([v for _, v in points])
            if len(times) > 2:
                step = float(np.min(np.diff(times)))
                gaps = np.nonzero(np.diff(times) > 1.5 * step)[0] + 1
                times = np.insert(times, gaps, times[gaps - 1] + step)
                values = np.insert(values, gaps, math.nan)
            series.append(Series(name, field_config(panel, ref_id, name), times, values))
    return series


def table_rows(
    panel: Mapping[str, Any], results: Mapping[str, Sequence[Mapping[str, Any]]]
) -> tuple[list[str], list[dict[str, float | str]]]:
    """Columns and rows of a table panel: one frame per target (labels + ``Value #refId``), joined
    by the ``merge`` transformation on shared labels, then ``organize`` (exclude, order, rename)."""
    targets = panel.get("targets", [])
    rows: list[dict[str, float | str]] = []
    columns: list[str] = []
    for target in targets:
        ref_id = target.get("refId", "A")
        value_column = f"Value #{ref_id}" if len(targets) > 1 else "Value"
        for item in results.get(ref_id, []):
            points = _points(item)
            row: dict[str, float | str] = dict(item.get("metric", {}))
            if points:
                row[value_column] = points[-1][1]
            columns.extend(key for key in row if key not in columns)
            match = next(
                (
                    old
                    for old in rows
                    if any(key in old for key in row)
                    and all(old[key] == row[key] for key in row if key in old)
                ),
                None,
            )
            if match is None:
                rows.append(row)
            else:
                match.update(row)
    organize: Mapping[str, Any] = next(
        (
            t.get("options", {})
            for t in panel.get("transformations", [])
            if t.get("id") == "organize"
        ),
        {},
    )
    excluded = organize.get("excludeByName", {})
    index = organize.get("indexByName", {})
    rename = organize.get("renameByName", {})
    kept = sorted(
        (column for column in columns if not excluded.get(column)),
        key=lambda column: (index.get(column, len(index)), columns.index(column)),
    )
    shown = [rename.get(column) or column for column in kept]
    renamed = [
        {rename.get(key) or key: value for key, value in row.items() if key in kept} for row in rows
    ]
    renamed.sort(key=lambda row: tuple(str(row.get(column, "")) for column in shown))
    return shown, renamed


# --------------------------------------------------------------------------------------------------
# Drawing


def _panel_axes(page: Page, box: Box, title: str) -> Axes:
    """The panel's frame: background, border, title; data coordinates are pixels from its corner."""
    ax = page.axes(box, facecolor=PANEL)
    ax.set_xlim(0, box.width)
    ax.set_ylim(box.height, 0)
    ax.set_autoscale_on(False)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_color(BORDER)
    ax.set_title(
        title,
        loc="left",
        x=PANEL_PAD / box.width,
        y=1.0 - (PANEL_PAD + 2) / box.height,
        pad=0,
        va="top",
        color=TEXT,
        fontsize=TITLE_PT,
        fontweight="bold",
    )
    return ax


def _fit(page: Page, text: str, width: float, points: float, weight: str = "normal") -> str:
    """``text`` cut with an ellipsis to fit ``width`` logical pixels."""
    if page.text_width(text, points, weight) <= width:
        return text
    while text and page.text_width(text + "…", points, weight) > width:
        text = text[:-1]
    return text + "…"


def _style_axes(ax: Axes, unit: str | None, *, right: bool = False) -> None:
    ax.set_facecolor("none")
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.tick_params(colors=TEXT_WEAK, labelsize=TICK_PT, length=0, pad=4)
    ax.yaxis.set_major_locator(ScaledLocator(unit))
    ax.yaxis.set_major_formatter(UnitFormatter(unit))
    if right:
        ax.yaxis.tick_right()
    else:
        ax.grid(True, color=GRID, linewidth=0.8)
        ax.set_axisbelow(True)


class UnitFormatter(Formatter):
    """Axis ticks in a unit, all scaled alike (by the axis' largest magnitude)."""

    def __init__(self, unit: str | None) -> None:
        self.unit = unit

    def __call__(self, x: float, pos: int | None = None) -> str:
        if self.axis is None:
            return format_value(x, self.unit)
        low, high = self.axis.get_view_interval()
        return format_value(x, self.unit, magnitude=max(abs(low), abs(high)))


class ScaledLocator(MaxNLocator):
    """Round tick steps in the unit's scale (e.g. 30 s, 1 min, 2.5 Mil), not in raw numbers."""

    def __init__(self, unit: str | None) -> None:
        super().__init__(nbins=4, steps=[1, 2, 2.5, 5, 10])
        self.unit = unit

    def tick_values(self, vmin: float, vmax: float) -> Sequence[float]:
        factor = unit_step(self.unit, max(abs(vmin), abs(vmax)))[0]
        return [tick * factor for tick in super().tick_values(vmin / factor, vmax / factor)]


def _time_axis(ax: Axes, time_range: tuple[float, float]) -> None:
    """Local wall-clock ticks at a round step (30 s, 1 min, 5 min, ...), at most seven."""
    start, end = time_range
    step = next((nice for nice in NICE_SECONDS if (end - start) / nice <= 7), NICE_SECONDS[-1])
    pattern = "%H:%M:%S" if step < 60 else "%H:%M"
    ax.set_xlim(start, end)
    margin = (end - start) * 0.05  # no label half outside the plot or on the y-axis labels
    ticks = np.arange(math.ceil((start + margin) / step) * step, end - margin + 1e-6, step)
    ax.set_xticks(ticks)
    ax.xaxis.set_major_formatter(
        FuncFormatter(lambda x, _pos: time.strftime(pattern, time.localtime(x)))
    )


def _legend(page: Page, ax: Axes, box: Box, series: Sequence[Series], top: float) -> None:
    """Grafana's table legend (name, last value) from ``top`` down, in one or two columns."""
    columns = 2 if len(series) > 4 else 1
    per_column = math.ceil(len(series) / columns)
    width = (box.width - 2 * PANEL_PAD) / columns
    for column in range(columns):
        left = PANEL_PAD + column * width
        right = left + width - (12 if columns > 1 and column == 0 else 4)
        ax.text(right, top, "Last *", ha="right", va="top", color=TEXT_WEAK, fontsize=LEGEND_PT)
        chunk = series[column * per_column : (column + 1) * per_column]
        for row, line in enumerate(chunk, start=1):
            y = top + row * LEGEND_LINE
            color = PALETTE[list(series).index(line) % len(PALETTE)]
            ax.plot(
                [left, left + 14], [y + 6, y + 6], color=color, linewidth=3, solid_capstyle="butt"
            )
            last = format_value(line.last, line.config.unit) if math.isfinite(line.last) else "-"
            room = right - left - 22 - page.text_width(last, LEGEND_PT) - 10
            ax.text(
                left + 20,
                y,
                _fit(page, line.name, room, LEGEND_PT),
                va="top",
                color=TEXT,
                fontsize=LEGEND_PT,
            )
            ax.text(right, y, last, ha="right", va="top", color=TEXT, fontsize=LEGEND_PT)


def draw_timeseries(
    page: Page, ax: Axes, box: Box, series: Sequence[Series], time_range: tuple[float, float] | None
) -> None:
    """Lines with 10 % fill, left and right axes in their units, and the table legend."""
    if time_range is None:
        time_range = (
            min(float(line.times[0]) for line in series),
            max(float(line.times[-1]) for line in series),
        )
    legend_rows = math.ceil(len(series) / (2 if len(series) > 4 else 1)) + 1
    legend_height = legend_rows * LEGEND_LINE + 6
    right_side = [line for line in series if line.config.axis_placement == "right"]
    plot_box = box.inset(
        left=62, top=TITLE_HEIGHT + 4, right=62 if right_side else 14, bottom=legend_height + 24
    )
    plot = page.axes(plot_box)
    axes: dict[bool, Axes] = {False: plot}
    if right_side:
        axes[True] = plot.twinx()
    for is_right, target_ax in axes.items():
        lines = [line for line in series if (line in right_side) == is_right]
        config = lines[0].config if lines else series[0].config
        _style_axes(target_ax, config.unit, right=is_right)
        for line in lines:
            color = PALETTE[series.index(line) % len(PALETTE)]
            target_ax.plot(line.times, line.values, color=color, linewidth=1.3)
            target_ax.fill_between(
                line.times,
                np.ma.masked_invalid(line.values),
                config.min if config.min is not None else 0.0,
                color=color,
                alpha=0.1,
                linewidth=0,
            )
        if config.min is not None:
            target_ax.set_ylim(bottom=config.min)
        if config.max is not None:
            target_ax.set_ylim(top=config.max)
        _time_axis(target_ax, time_range)
    _legend(page, ax, box, series, box.height - legend_height - 4)


def column_widths(
    headers: Sequence[float], contents: Sequence[float], available: float
) -> list[float]:
    """Column widths filling ``available``: spare room shared out evenly; when too narrow, the
    widest contents are cut to a common cap (never below their header), as Grafana truncates."""
    natural = [max(header, content) for header, content in zip(headers, contents, strict=True)]
    if sum(natural) <= available:
        extra = (available - sum(natural)) / len(natural)
        return [width + extra for width in natural]
    low, high = 0.0, max(natural)
    for _ in range(40):
        cap = (low + high) / 2
        total = sum(max(h, min(c, cap)) for h, c in zip(headers, contents, strict=True))
        low, high = (cap, high) if total <= available else (low, cap)
    widths = [max(h, min(c, low)) for h, c in zip(headers, contents, strict=True)]
    shrink = min(1.0, available / sum(widths))
    return [width * shrink for width in widths]


def _cell_text(value: float | str | None, config: FieldConfig) -> tuple[str, str]:
    if value is None:
        return "", TEXT
    text, color = apply_mappings(value, config.mappings)
    if text is None:
        text = format_value(value, config.unit) if isinstance(value, float) else value
    return text, color if color and config.cell_type == "color-text" else TEXT


def draw_table(
    page: Page,
    ax: Axes,
    box: Box,
    panel: Mapping[str, Any],
    columns: Sequence[str],
    rows: Sequence[Mapping[str, float | str]],
) -> None:
    """A text table: bold header row, one line per row, mapped colours, gauge cells."""
    configs = [field_config(panel, "", column) for column in columns]
    cells = [
        [
            _cell_text(row.get(column), config)
            for column, config in zip(columns, configs, strict=True)
        ]
        for row in rows
    ]
    available = box.width - 2 * PANEL_PAD
    points = TABLE_PT
    headers = [page.text_width(column, points, "bold") + CELL_PAD for column in columns]
    contents = [
        max(
            page.text_width(row[i][0], points)
            + (GAUGE_BAR if configs[i].cell_type == "gauge" else 0)
            for row in cells
        )
        + CELL_PAD
        for i in range(len(columns))
    ]
    widths = column_widths(headers, contents, available)
    lefts = [PANEL_PAD + sum(widths[:i]) for i in range(len(widths))]
    top = TITLE_HEIGHT + 2
    ax.add_patch(Rectangle((PANEL_PAD, top), available, TABLE_LINE, color=HEADER_ROW, linewidth=0))
    for left, width, column in zip(lefts, widths, columns, strict=True):
        header = _fit(page, column, width - CELL_PAD, points, "bold")
        ax.text(
            left + CELL_PAD / 2,
            top + TABLE_LINE / 2,
            header,
            va="center",
            color=TEXT,
            fontsize=points,
            fontweight="bold",
        )
    for number, (row, values) in enumerate(zip(cells, rows, strict=True), start=1):
        y = top + number * TABLE_LINE
        if y + TABLE_LINE > box.height - 4:
            break
        bottom = [y + TABLE_LINE, y + TABLE_LINE]
        ax.plot([PANEL_PAD, PANEL_PAD + available], bottom, color=GRID, linewidth=0.8)
        for i, (text, color) in enumerate(row):
            cell = Box(lefts[i] + CELL_PAD / 2, y, widths[i] - CELL_PAD, TABLE_LINE)
            value = values.get(columns[i])
            if configs[i].cell_type == "gauge" and isinstance(value, float):
                _gauge_cell(page, ax, cell, value, text, configs[i], points)
            else:
                shown = _fit(page, text, cell.width, points)
                ax.text(
                    cell.left, y + TABLE_LINE / 2, shown, va="center", color=color, fontsize=points
                )


def _gauge_cell(
    page: Page, ax: Axes, cell: Box, value: float, text: str, config: FieldConfig, points: float
) -> None:
    """A basic gauge cell: a bar filled from min to max, the value at its right."""
    low = config.min if config.min is not None else 0.0
    high = config.max if config.max is not None else 1.0
    share = min(1.0, max(0.0, (value - low) / (high - low))) if high > low else 0.0
    bar = max(0.0, cell.width - page.text_width(text, points) - 8)
    for length, color in ((bar, GRID), (bar * share, PALETTE[0])):
        ax.add_patch(
            Rectangle((cell.left, cell.top + 9), length, cell.height - 18, color=color, linewidth=0)
        )
    middle = cell.top + cell.height / 2
    ax.text(
        cell.left + cell.width, middle, text, ha="right", va="center", color=TEXT, fontsize=points
    )


def draw_stat(page: Page, ax: Axes, box: Box, series: Sequence[Series]) -> None:
    """Stat/gauge-like panels: each series' last value, big, with its name under it."""
    width = (box.width - 2 * PANEL_PAD) / len(series)
    middle = (box.height + TITLE_HEIGHT) / 2
    for i, line in enumerate(series):
        center = PANEL_PAD + (i + 0.5) * width
        text, color = _cell_text(line.last, line.config)
        big = max(10.0, min(28.0, box.height / 6))
        ax.text(
            center,
            middle,
            text,
            ha="center",
            va="center",
            color=color if color != TEXT else PALETTE[0],
            fontsize=big,
            fontweight="bold",
        )
        ax.text(
            center,
            middle + big * 1.4 + 4,
            _fit(page, line.name, width - 8, LEGEND_PT),
            ha="center",
            va="top",
            color=TEXT_WEAK,
            fontsize=LEGEND_PT,
        )


def draw_dashboard(
    dashboard: Mapping[str, Any],
    results: Results,
    *,
    time_range: tuple[float, float] | None = None,
    width_px: int = 2400,
    scale: float = 2.0,
) -> tuple[Figure, dict[int, Axes]]:
    """Draw every panel of ``dashboard`` from ``results``; returns the figure and, per panel id,
    the axes of its frame (whose left title is the panel's title)."""
    placed = layout(dashboard)
    width = width_px / scale
    bottom = max((y + h for _, (_, y, _, h) in placed), default=1)
    height = HEADER + PAGE_PAD + bottom * UNIT_HEIGHT - GAP + PAGE_PAD
    figure = Figure(figsize=(width / 100, height / 100), dpi=100 * scale, facecolor=CANVAS)
    page = Page(figure, width, height)
    figure.text(
        PAGE_PAD / width,
        1 - 14 / height,
        dashboard.get("title", ""),
        va="top",
        color=TEXT,
        fontsize=15,
        fontweight="bold",
    )
    variables = "    ".join(
        f"{v.get('label') or v['name']}: All"
        for v in dashboard.get("templating", {}).get("list", [])
        if v.get("type") != "datasource"
    )
    if time_range is not None:
        start, end = (time.localtime(moment) for moment in time_range)
        minutes = (time_range[1] - time_range[0]) / 60
        variables += (
            f"    {time.strftime('%Y-%m-%d %H:%M:%S', start)} to"
            f" {time.strftime('%H:%M:%S %Z', end)} ({minutes:.0f} min of demo data)"
        )
    figure.text(PAGE_PAD / width, 1 - 40 / height, variables, va="top", color=TEXT_WEAK, fontsize=9)
    column = (width - 2 * PAGE_PAD + GAP) / 24
    drawn: dict[int, Axes] = {}
    for panel, (x, y, w, h) in placed:
        box = Box(
            PAGE_PAD + x * column,
            HEADER + PAGE_PAD + y * UNIT_HEIGHT,
            w * column - GAP,
            h * UNIT_HEIGHT - GAP,
        )
        kind = panel.get("type")
        title = panel.get("title", "")
        if kind == "row":
            ax = page.axes(box)
            ax.set_axis_off()
            marker = "▸" if panel.get("collapsed") else "▾"
            ax.set_title(
                f"{marker} {title}",
                loc="left",
                y=0.5,
                pad=0,
                va="center",
                color=TEXT,
                fontsize=ROW_PT,
                fontweight="bold",
            )
            drawn[panel["id"]] = ax
            continue
        ax = _panel_axes(page, box, title)
        drawn[panel["id"]] = ax
        draw_panel(page, ax, box, panel, results.get(panel["id"], {}), time_range)
    return figure, drawn


def draw_panel(
    page: Page,
    ax: Axes,
    box: Box,
    panel: Mapping[str, Any],
    results: Mapping[str, Sequence[Mapping[str, Any]]],
    time_range: tuple[float, float] | None,
) -> None:
    """Draw one panel's content into its frame ``ax``, or "No data" when its queries gave none."""
    kind = panel.get("type")
    if kind == "table":
        columns, rows = table_rows(panel, results)
        if rows:
            draw_table(page, ax, box, panel, columns, rows)
            return
    elif panel.get("targets"):
        series = panel_series(panel, results)
        if series and kind in INSTANT_TYPES:
            draw_stat(page, ax, box, series)
            return
        if series:
            draw_timeseries(page, ax, box, series, time_range)
            return
    else:
        message = f"({kind} panel: not drawn)"
        ax.text(box.width / 2, box.height / 2, message, ha="center", va="center", color=TEXT_WEAK)
        return
    ax.text(
        box.width / 2,
        (box.height + TITLE_HEIGHT) / 2,
        "No data",
        ha="center",
        va="center",
        color=TEXT_WEAK,
        fontsize=NO_DATA_PT,
    )


def save_png(figure: Figure, path: Path) -> None:
    """Write ``figure`` as a PNG, creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, facecolor=figure.get_facecolor())


# --------------------------------------------------------------------------------------------------
# Collecting real data


def query_panels(
    prometheus: Prometheus, dashboard: Mapping[str, Any], start: float, end: float, step: float
) -> dict[int, dict[str, list[dict[str, Any]]]]:
    """Run every target of every panel: instant at ``end`` for table/stat-like panels, else range."""
    results: dict[int, dict[str, list[dict[str, Any]]]] = {}
    for panel in iter_panels(dashboard):
        for target in panel.get("targets", []):
            expr = substitute(target["expr"])
            if panel.get("type") in INSTANT_TYPES:
                status, body = prometheus.api("query", query=expr, time=f"{end:.3f}")
            else:
                status, body = prometheus.api(
                    "query_range",
                    query=expr,
                    start=f"{start:.3f}",
                    end=f"{end:.3f}",
                    step=f"{step:g}s",
                )
            if status != 200 or body.get("status") != "success":
                raise RuntimeError(f"{panel['title']} [{target['refId']}] {expr}: {status} {body}")
            results.setdefault(panel["id"], {})[target["refId"]] = body["data"]["result"]
    return results


def prometheus_config(exporter_url: str, interval: float) -> dict[str, Any]:
    interval_text = f"{interval:g}s"
    return {
        "global": {"scrape_interval": interval_text, "evaluation_interval": interval_text},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {
                "job_name": JOB,
                "static_configs": [{"targets": [exporter_url.removeprefix("http://")]}],
            }
        ],
    }


def tool(name: str) -> str:
    """find_tool outside pytest: a missing tool ends the script with its message."""
    try:
        return find_tool(name)
    except (pytest.skip.Exception, pytest.fail.Exception) as missing:
        raise SystemExit(f"render_dashboard: {missing.msg}") from None


def _interrupt(signum: int, frame: FrameType | None) -> NoReturn:
    raise KeyboardInterrupt


def collect(
    dashboard: Mapping[str, Any], minutes: float, interval: float
) -> tuple[dict[int, dict[str, list[dict[str, Any]]]], tuple[float, float]]:
    """Run the demo daemon and Prometheus for ``minutes``, query every panel, stop both."""
    with tempfile.TemporaryDirectory(prefix="render-dashboard-") as directory:
        processes = Processes(Path(directory))
        try:
            exporter_url, _ = launch_exporter(processes, "--demo")
            prometheus = launch_prometheus(
                processes,
                Path(directory),
                prometheus_config(exporter_url, interval),
                prometheus=tool("prometheus"),
                promtool=tool("promtool"),
            )
            print(f"demo daemon at {exporter_url}, Prometheus at {prometheus.url}", file=sys.stderr)
            start = time.time()
            end = start + minutes * 60
            while (left := end - time.time()) > 0:
                print(f"collecting: {left:.0f} s left", file=sys.stderr)
                time.sleep(min(30.0, left))
            end = time.time()
            step = max(1.0, round((end - start) / 300))
            return query_panels(prometheus, dashboard, start, end, step), (start, end)
        except AssertionError as error:  # a helper saw a process exit or time out
            raise SystemExit(f"render_dashboard: {error}\n{processes.all_output()}") from None
        finally:
            processes.stop_all()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=3.0, help="collection time (default 3)")
    parser.add_argument(
        "--output",
        type=Path,
        default=OUTPUT,
        help=f"PNG to write (default {OUTPUT.relative_to(ROOT)})",
    )
    parser.add_argument(
        "--interval",
        type=float,
        default=2.0,
        help="scrape and rule evaluation interval, seconds (default 2)",
    )
    parser.add_argument(
        "--width", type=int, default=2400, help="PNG width in pixels (default 2400)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    dashboard = json.loads(DASHBOARD.read_text())
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        results, time_range = collect(dashboard, args.minutes, args.interval)
    except KeyboardInterrupt:
        print("render_dashboard: interrupted; every started process is stopped", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    figure, _ = draw_dashboard(dashboard, results, time_range=time_range, width_px=args.width)
    save_png(figure, args.output)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
