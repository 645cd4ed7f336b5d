"""The obvious alternative, for the benchmark: an exporter that asks the API at scrape time.

What a user would write in an afternoon with ``requests`` and ``prometheus_client``: a custom
collector whose ``collect()`` fetches every task's stats, one after the other, on every scrape,
served by ``prometheus_client.start_http_server`` (a thread per scrape). It is kinder than the
most naive version in one way: each scrape reuses one ``requests.Session`` (keep-alive) instead of
a new connection per call. Requests are signed with AK/SK like the exporter's.

    python bench/scrape_time_exporter.py --url http://127.0.0.1:PORT --task-ids-file ids.txt

Prints ``{"port": N, "cpu_seconds": ..}`` once listening; on SIGTERM prints ``{"calls": .., "errors": ..,
"cpu_seconds": .., "maxrss_kb": ..}`` and exits. ``requests`` is a benchmark-only dependency.
"""

from __future__ import annotations

import argparse
import json
import resource
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType

import requests
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from exporter.auth import sign_request
from exporter.simulator import DEMO_ACCESS_KEY, DEMO_PROJECT_ID, DEMO_SECRET_KEY

FIELDS = (
    ("dcs_migration_progress_ratio", "full_migration_progress", 0.01),
    ("dcs_migration_offset", "offset", 1.0),
    ("dcs_migration_source_keys", "source_dbsize", 1.0),
    ("dcs_migration_target_keys", "target_dbsize", 1.0),
    ("dcs_migration_target_input_bytes_per_second", "target_input_kbps", 1024.0),
    ("dcs_migration_target_ops_per_second", "target_ops", 1.0),
)


class ScrapeTimeCollector(Collector):
    """Calls the stats API for every task whenever Prometheus scrapes."""

    def __init__(self, base_url: str, task_ids: Sequence[str], timeout: float) -> None:
        self.base_url = base_url
        self.task_ids = list(task_ids)
        self.timeout = timeout
        self.calls = 0
        self.errors = 0
        self._lock = threading.Lock()  # scrapes run in parallel threads

    def collect(self) -> Iterator[Metric]:
        """Fetch every task's stats now and yield the gauges."""
        families = {
            name: GaugeMetricFamily(name, f"API field {field}", labels=["task_id"])
            for name, field, _ in FIELDS
        }
        up = GaugeMetricFamily("dcs_migration_up", "1 if the call worked", labels=["task_id"])
        with requests.Session() as session:
            for task_id in self.task_ids:
                ok = self._fetch(session, task_id, families)
                up.add_metric([task_id], 1.0 if ok else 0.0)
        yield from families.values()
        yield up

    def _fetch(
        self, session: requests.Session, task_id: str, families: dict[str, GaugeMetricFamily]
    ) -> bool:
        url = f"{self.base_url}/v2/{DEMO_PROJECT_ID}/migration-task/{task_id}/stats"
        headers = sign_request(
            "GET",
            url,
            {"Content-Type": "application/json", "X-Project-Id": DEMO_PROJECT_ID},
            b"",
            DEMO_ACCESS_KEY,
            DEMO_SECRET_KEY,
            datetime.now(UTC),
        )
        with self._lock:
            self.calls += 1
        try:
            response = session.get(url, headers=headers, timeout=self.timeout)
            response.raise_for_status()
            body = response.json()
            for name, field, scale in FIELDS:
                families[name].add_metric([task_id], float(body[field]) * scale)
        except (requests.RequestException, ValueError, KeyError, TypeError):
            with self._lock:
                self.errors += 1
            return False
        return True


def main(argv: Sequence[str] | None = None) -> int:
    """Serve /metrics until SIGTERM, then print the call count, CPU time and peak RSS."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="simulator base URL")
    parser.add_argument("--task-ids-file", required=True, type=Path)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=10.0, help="per API call")
    args = parser.parse_args(argv)
    task_ids = args.task_ids_file.read_text(encoding="utf-8").split()
    collector = ScrapeTimeCollector(args.url, task_ids, args.timeout)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    server, _ = start_http_server(args.port, addr="127.0.0.1", registry=registry)
    # CPU spent so far (imports, start-up) is subtracted from the final figure by the benchmark.
    print(json.dumps({"port": server.server_port, "cpu_seconds": time.process_time()}), flush=True)
    stopped = threading.Event()

    def stop(signum: int, frame: FrameType | None) -> None:
        stopped.set()

    signal.signal(signal.SIGTERM, stop)
    while not stopped.wait(0.2):
        pass
    usage = resource.getrusage(resource.RUSAGE_SELF)
    report = {
        "calls": collector.calls,
        "errors": collector.errors,
        "cpu_seconds": time.process_time(),
        "maxrss_kb": usage.ru_maxrss,
    }
    print(json.dumps(report), flush=True)
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
