"""End-to-end: the landing page in headless Chromium, against the real daemon.

Chromium runs with the flags of TOOLING.md section 7. ``--dump-dom`` after a virtual-time budget
gives the DOM once landing.js has fetched ``/api/v1/tasks`` and rebuilt the table; ``--screenshot``
gives the picture. Set ``UPDATE_DOC_IMAGES=1`` to copy the screenshots to ``docs/images/``.
"""

from __future__ import annotations

import html.parser
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from exporter.landing import COLUMNS
from exporter.simulator import DEMO_TASKS
from tests.e2e.conftest import ROOT, Processes
from tests.e2e.test_redis_demo import get_json

pytestmark = pytest.mark.e2e

HOSTILE = "<img src=x onerror=alert(1)>"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def chromium(binary: str, url: str, *extra: str, timeout: float = 60) -> str:
    """Run headless Chromium on ``url``; returns what it printed on stdout."""
    with tempfile.TemporaryDirectory() as profile:
        result = subprocess.run(
            [
                binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync",
                f"--user-data-dir={profile}", *extra, url,
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
        )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


class Table(html.parser.HTMLParser):
    """Collects the task rows (attributes and cell texts), images and the #updated text."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[dict[str, str | None], list[str]]] = []
        self.progress_bars = 0
        self.images = 0
        self.updated = ""
        self._in_cell = self._in_updated = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        """Track rows, cells, progress bars, images and the status line."""
        attributes = dict(attrs)
        if tag == "tr" and "data-task-id" in attributes:
            self.rows.append((attributes, []))
        elif tag == "td" and self.rows:
            self.rows[-1][1].append("")
            self._in_cell = True
        elif tag == "progress":
            self.progress_bars += 1
        elif tag == "img":
            self.images += 1
        elif attributes.get("id") == "updated":
            self._in_updated = True

    def handle_endtag(self, tag: str) -> None:
        """Leave a cell or the status line."""
        if tag == "td":
            self._in_cell = False
        elif tag == "p":
            self._in_updated = False

    def handle_data(self, data: str) -> None:
        """Text goes to the open cell or the status line."""
        if self._in_cell and self.rows:
            self.rows[-1][1][-1] += data
        elif self._in_updated:
            self.updated += data


def rendered(binary: str, url: str) -> Table:
    """The DOM after landing.js ran, parsed."""
    table = Table()
    table.feed(chromium(binary, url, "--virtual-time-budget=5000", "--dump-dom"))
    return table


def test_landing_page_renders_live_table(
    processes: Processes,
    free_port: Callable[[], int],
    wait_until: Callable[..., Any],
    tool: Callable[[str], str],
    tmp_path: Path,
) -> None:
    """In --demo mode the page shows every task, refreshed by its script; screenshots look right."""
    browser = tool("chromium")
    port = free_port()
    processes.start(
        "daemon",
        [sys.executable, "-m", "exporter", "--demo", "--web.listen-address", f"127.0.0.1:{port}"],
    )
    url = f"http://127.0.0.1:{port}/"
    # Two polls (5 s apart in --demo) give every task a trend, which the screenshot should show.
    wait_until(
        lambda: all(
            t["offset_trend"] != "unknown" for t in get_json(url + "api/v1/tasks")["tasks"]
        ),
        30,
        "two polls of every demo task",
    )

    table = rendered(browser, url)
    assert table.updated.startswith("Live · updated"), table.updated  # the script's fetch worked
    assert [attributes["data-task-id"] for attributes, _ in table.rows] == [
        t for t, _ in DEMO_TASKS
    ]
    assert all(attributes["class"] == "health-up" for attributes, _ in table.rows)
    for (_, cells), (task_id, name) in zip(table.rows, DEMO_TASKS, strict=True):
        assert len(cells) == len(COLUMNS)
        assert cells[0] == name + task_id
        assert cells[2].endswith("%") or "% · ETA" in cells[2]
        assert cells[3].replace(",", "").isdigit()
        assert "→" in cells[5]
    assert table.progress_bars == len(DEMO_TASKS)

    for name, size in (("landing.png", "1280,420"), ("landing-phone.png", "390,1100")):
        shot = tmp_path / name
        chromium(
            browser,
            url,
            f"--window-size={size}",
            "--virtual-time-budget=3000",
            f"--screenshot={shot}",
        )
        data = shot.read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 20_000, name
        width = int.from_bytes(data[16:20], "big")
        assert width == int(size.split(",")[0])
        if os.environ.get("UPDATE_DOC_IMAGES"):
            shutil.copyfile(shot, ROOT / "docs" / "images" / name)


def test_landing_page_keeps_hostile_names_as_text(
    processes: Processes,
    free_port: Callable[[], int],
    wait_until: Callable[..., Any],
    tool: Callable[[str], str],
    tmp_path: Path,
) -> None:
    """A task name made of markup stays text after the script has rebuilt the table."""
    browser = tool("chromium")
    api, port = free_port(), free_port()
    processes.start(
        "simulator", [sys.executable, "-m", "exporter.simulator", "--listen", f"127.0.0.1:{api}"]
    )
    (task_id, _), *_ = DEMO_TASKS
    config = tmp_path / "config.yaml"
    config.write_text(
        f"""\
cloud:
  region: eu-de
  project_id: "666486c2d9b948c1bbea57e714d744fa"
  dcs_endpoint: http://127.0.0.1:{api}
  iam_endpoint: http://127.0.0.1:{api}/v3
auth:
  access_key: DEMOACCESSKEY0000001
  secret_key: demoSecretKeyOnlyValidAgainstTheSimulator
tasks:
  - id: "{task_id}"
    name: '{HOSTILE}'
"""
    )
    processes.start(
        "daemon",
        [
            sys.executable,
            "-m",
            "exporter",
            f"--config.file={config}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
    )
    url = f"http://127.0.0.1:{port}/"
    wait_until(lambda: get_json(url + "api/v1/tasks")["tasks"][0]["health"] == "up", 30, "a poll")

    table = rendered(browser, url)
    assert table.updated.startswith("Live · updated"), table.updated
    assert table.images == 0
    ((_, cells),) = table.rows
    assert cells[0] == HOSTILE + task_id
