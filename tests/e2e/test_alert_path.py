"""The alert path end to end: simulator → daemon → Prometheus (shipped rules) → Alertmanager → webhook.

The simulator serves two tasks, one whose incremental offset is stalled and one whose offset moves.
The real daemon polls them every second; a real Prometheus scrapes it every second and evaluates a
time-compressed copy of deploy/prometheus/rules.yml (see ``compress_durations``: every duration in
``for:`` and in range selectors / ``offset`` is divided by 60, so minutes become seconds); a real
Alertmanager (Debian prometheus-alertmanager) delivers to an aiohttp webhook receiver in this test.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml
from aiohttp import web

from exporter.simulator import (
    DEMO_ACCESS_KEY,
    DEMO_PROJECT_ID,
    DEMO_SECRET_KEY,
    MigrationModel,
    Simulator,
    start,
)

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"

STALLED = "aaaaaaaa-0000-4000-8000-000000000001"
MOVING = "aaaaaaaa-0000-4000-8000-000000000002"
JOB = "dcs-migration-exporter"

T = TypeVar("T")

_DURATION = re.compile(r"(\d+)(ms|s|m|h|d|w|y)")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
_UNIT_MS |= {"w": 7 * _UNIT_MS["d"], "y": 365 * _UNIT_MS["d"]}


def _scale(duration: str, factor: int) -> str:
    """Divide a Prometheus duration such as ``10m`` or ``1h30m`` by ``factor``."""
    assert _DURATION.sub("", duration) == "", duration
    ms = sum(int(n) * _UNIT_MS[unit] for n, unit in _DURATION.findall(duration)) // factor
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def compress_durations(rules_text: str, factor: int = 60) -> str:
    """Return the rules with ``for:``, ``[range]`` and ``offset`` durations divided by ``factor``.

    Only those three places hold time windows in rules.yml; names, labels, annotations and
    thresholds are untouched, so the rules that fire are the shipped ones on a faster clock.
    """
    doc = yaml.safe_load(rules_text)
    for group in doc["groups"]:
        for rule in group["rules"]:
            expr = re.sub(r"\[(\w+)\]", lambda m: f"[{_scale(m.group(1), factor)}]", rule["expr"])
            expr = re.sub(
                r"\boffset\s+(\w+)", lambda m: f"offset {_scale(m.group(1), factor)}", expr
            )
            rule["expr"] = expr
            if "for" in rule:
                rule["for"] = _scale(rule["for"], factor)
    return yaml.safe_dump(doc, sort_keys=False)


def test_compress_durations_divides_every_window_by_sixty() -> None:
    """The stall rule's 10m window, 10m offset and 5m for: become 10s, 10s and 5s."""
    compressed = yaml.safe_load(compress_durations(RULES.read_text()))
    rules = {
        rule.get("alert") or rule["record"]: rule
        for group in compressed["groups"]
        for rule in group["rules"]
    }
    stalled = rules["DcsMigrationOffsetStalled"]
    assert "changes(dcs_migration_offset[10s]) == 0" in stalled["expr"]
    assert "dcs_migration_offset offset 10s" in stalled["expr"]
    assert stalled["for"] == "5s"
    assert rules["DcsMigrationFullSyncStuck"]["for"] == "5s"
    assert "[30s]" in rules["DcsMigrationFullSyncStuck"]["expr"]
    assert rules["DcsMigrationPollFailing"]["for"] == "10s"
    assert rules["task:dcs_migration_offset:deriv5m"]["expr"] == ("deriv(dcs_migration_offset[5s])")
    for rule in rules.values():
        assert not re.search(r"\[\d+[mhd]\]|offset \d+[mhd]", rule["expr"]), rule["expr"]


class LoopThread:
    """An asyncio loop in a background thread, so the simulator and webhook keep serving while the
    test waits with plain blocking calls."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@pytest.fixture
def loop_thread() -> Iterator[LoopThread]:
    """A background event loop, stopped at teardown."""
    thread = LoopThread()
    try:
        yield thread
    finally:
        thread.close()


def _status(url: str, method: str = "GET") -> int:
    """HTTP status of a request to ``url``."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=10) as r:
            status: int = r.status
            return status
    except urllib.error.HTTPError as error:
        return error.code


async def _start_webhook(received: list[dict[str, Any]], port: int) -> web.AppRunner:
    async def alerts(request: web.Request) -> web.Response:
        received.append(await request.json())
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/alerts", alerts)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


def test_only_the_stalled_task_alerts_through_alertmanager(
    loop_thread: LoopThread,
    processes: Any,
    tool: Callable[[str], str],
    free_port: Callable[[], int],
    start_exporter: Callable[..., tuple[str, Any]],
    start_prometheus: Callable[[dict[str, Any]], Any],
    wait_until: Callable[..., Any],
    tmp_path: Path,
) -> None:
    """Exactly one notification arrives: DcsMigrationOffsetStalled for the stalled task, by name."""
    alertmanager_bin, amtool = tool("prometheus-alertmanager"), tool("amtool")

    # Upstream: one stalled and one moving task, both in the incremental phase.
    sim = Simulator()
    stalled_model = MigrationModel(
        source_keys=200_000, full_phase_seconds=60, ops=900, kbps=128.0, seed=11, stalled=True
    )
    moving_model = MigrationModel(
        source_keys=150_000, full_phase_seconds=60, ops=700, kbps=96.0, seed=12
    )
    sim.add_task(STALLED, "orders-cache", model=stalled_model, started_ago=3600)
    sim.add_task(MOVING, "sessions-cache", model=moving_model, started_ago=3600)
    sim_runner, sim_url = loop_thread.run(start(sim))

    received: list[dict[str, Any]] = []
    webhook_port = free_port()
    webhook_runner = loop_thread.run(_start_webhook(received, webhook_port))
    try:
        # The daemon, polling every second.
        config = tmp_path / "exporter.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "cloud": {
                        "region": "eu-de",
                        "project_id": DEMO_PROJECT_ID,
                        "dcs_endpoint": sim_url,
                        "iam_endpoint": f"{sim_url}/v3",
                    },
                    "auth": {"access_key": DEMO_ACCESS_KEY, "secret_key": DEMO_SECRET_KEY},
                    "polling": {"interval": "1s", "timeout": "2s"},
                    "tasks": [
                        {"id": STALLED, "name": "orders-cache"},
                        {"id": MOVING, "name": "sessions-cache"},
                    ],
                }
            )
        )
        exporter_url, _ = start_exporter("--config.file", str(config))

        # Alertmanager: every alert to the webhook at once, one notification per alert.
        am_config = tmp_path / "alertmanager.yml"
        am_config.write_text(
            yaml.safe_dump(
                {
                    "route": {
                        "receiver": "webhook",
                        "group_by": ["alertname", "task_id"],
                        "group_wait": "1s",
                        "group_interval": "1s",
                        "repeat_interval": "1h",
                    },
                    "receivers": [
                        {
                            "name": "webhook",
                            "webhook_configs": [
                                {
                                    "url": f"http://127.0.0.1:{webhook_port}/alerts",
                                    "send_resolved": False,
                                }
                            ],
                        }
                    ],
                }
            )
        )
        check = subprocess.run(
            [amtool, "check-config", str(am_config)], capture_output=True, text=True
        )
        assert check.returncode == 0, check.stdout + check.stderr
        am_port = free_port()
        processes.start(
            "alertmanager",
            [
                alertmanager_bin,
                f"--config.file={am_config}",
                f"--storage.path={tmp_path / 'am-data'}",
                f"--web.listen-address=127.0.0.1:{am_port}",
                "--cluster.listen-address=",
            ],
        )
        wait_until(
            lambda: _status(f"http://127.0.0.1:{am_port}/-/ready") == 200, 20, "Alertmanager"
        )

        # Prometheus: the rules are loaded only once the exporter is scraped, so that the
        # compressed 5 s `for:` of DcsMigrationExporterDown cannot fire on the ~5 s it takes
        # Prometheus to scrape for the first time.
        rules_dir = tmp_path / "rules"
        rules_dir.mkdir()
        prometheus = start_prometheus(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(rules_dir / "*.yml")],
                "alerting": {
                    "alertmanagers": [{"static_configs": [{"targets": [f"127.0.0.1:{am_port}"]}]}]
                },
                "scrape_configs": [
                    {
                        "job_name": JOB,
                        "static_configs": [{"targets": [exporter_url.removeprefix("http://")]}],
                    }
                ],
            }
        )
        wait_until(
            lambda: prometheus.query(f'up{{job="{JOB}"}} == 1'),
            30,
            "the first scrape of the exporter",
        )
        compressed = rules_dir / "rules.yml"
        compressed.write_text(compress_durations(RULES.read_text()))
        check = subprocess.run(
            [tool("promtool"), "check", "rules", str(compressed)], capture_output=True, text=True
        )
        assert check.returncode == 0, check.stdout + check.stderr
        assert _status(f"{prometheus.url}/-/reload", method="POST") == 200
        wait_until(lambda: prometheus.api("rules")[1]["data"]["groups"], 10, "the rules to load")

        # Stall: 10 s without change + for: 5 s, then Alertmanager's 1 s group_wait.
        try:
            wait_until(lambda: received, 60, "a webhook notification", interval=0.5)
        except AssertionError as error:
            raise AssertionError(f"{error}\n{processes.all_output()}") from None
        time.sleep(5)  # give any wrong alert (moving task, other rules) time to arrive too

        alerts = [alert for message in received for alert in message["alerts"]]
        assert [(a["labels"]["alertname"], a["labels"]["task_id"]) for a in alerts] == [
            ("DcsMigrationOffsetStalled", STALLED)
        ]
        alert = alerts[0]
        assert alert["status"] == "firing"
        assert alert["labels"]["task_name"] == "orders-cache"
        assert alert["labels"]["severity"] == "warning"
        assert alert["labels"]["job"] == JOB
        assert alert["annotations"]["summary"] == (
            f"DCS migration orders-cache ({STALLED}): incremental offset stalled at "
            f"{stalled_model.stalled_offset}"
        )
        assert "runbook" in alert["annotations"]

        # Prometheus agrees: the only firing or pending alert is the stalled task's.
        active = prometheus.api("alerts")[1]["data"]["alerts"]
        assert [
            (a["labels"]["alertname"], a["labels"].get("task_id"), a["state"]) for a in active
        ] == [("DcsMigrationOffsetStalled", STALLED, "firing")]
    finally:
        loop_thread.run(webhook_runner.cleanup())
        loop_thread.run(sim_runner.cleanup())
