"""End-to-end: ``--demo.redis`` migrates between two real redis-servers and the daemon sees it.

The daemon runs as a subprocess with a small data set; the test reads what the on-call person
would (``/api/v1/tasks``, ``/metrics``), drives the demo through its control endpoints, and checks
the target's data against the source's with its own connections.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from exporter.redis_demo import DEMO_TASK_ID, Redis
from tests.e2e.conftest import Processes

pytestmark = pytest.mark.e2e

KEYS = 4000
COPY_RATE = 800  # keys per second: a full phase of ~5 s, seen by two or three 2 s polls


def port_open(port: int) -> bool:
    """Whether something accepts connections on a loopback port."""
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def get_json(url: str) -> Any:
    """GET a JSON document."""
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


def post(url: str) -> Any:
    """POST with no body; returns the JSON answer."""
    request = urllib.request.Request(url, data=b"", method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


async def dump_all(port: int) -> dict[bytes, object]:
    """Every key of a server with its type and value, in comparable form."""
    redis = await Redis.connect("127.0.0.1", port)
    data: dict[bytes, object] = {}
    try:
        cursor: Any = b"0"
        while True:
            cursor, keys = await redis.execute("SCAN", cursor, "COUNT", 500)  # type: ignore[misc]
            for key in keys:
                kind = await redis.execute("TYPE", key)
                if kind == b"string":
                    data[key] = await redis.execute("GET", key)
                elif kind == b"hash":
                    flat = await redis.execute("HGETALL", key)
                    assert isinstance(flat, list)
                    data[key] = dict(zip(flat[::2], flat[1::2], strict=True))
                elif kind == b"list":
                    data[key] = await redis.execute("LRANGE", key, 0, -1)
                elif kind == b"set":
                    members = await redis.execute("SMEMBERS", key)
                    assert isinstance(members, list)
                    data[key] = frozenset(m for m in members if isinstance(m, bytes))
                else:
                    data[key] = kind
            if cursor == b"0":
                return data
    finally:
        await redis.close()


def test_real_redis_migration_progress_sync_and_stall(
    processes: Processes,
    free_port: Callable[[], int],
    wait_until: Callable[..., Any],
    tool: Callable[[str], str],
) -> None:
    """Progress climbs to 100 %, the target catches up, the offset drains to 0, and a stall holds it."""
    tool("redis-server")
    web, api = free_port(), free_port()
    daemon = processes.start(
        "daemon",
        [
            sys.executable, "-m", "exporter", "--demo.redis",
            "--demo.redis.keys", str(KEYS),
            "--demo.redis.copy-rate", str(COPY_RATE),
            "--demo.redis.write-rate", "100",
            "--demo.redis.api-address", f"127.0.0.1:{api}",
            "--web.listen-address", f"127.0.0.1:{web}",
        ],
    )  # fmt: skip
    feed, control = f"http://127.0.0.1:{web}/api/v1/tasks", f"http://127.0.0.1:{api}/demo"
    readings: dict[float, dict[str, Any]] = {}  # one per successful poll of the daemon

    def task() -> dict[str, Any]:
        assert daemon.poll() is None, processes.output(daemon)
        (entry,) = get_json(feed)["tasks"]
        assert entry["task_id"] == DEMO_TASK_ID
        if entry["last_success_time"] is not None:
            readings[entry["last_success_time"]] = entry
        return dict(entry)

    def polled_after(moment: float, check: Callable[[dict[str, Any]], bool]) -> Any:
        entry = task()
        fresh = entry["last_success_time"] is not None and entry["last_success_time"] > moment
        return entry if fresh and check(entry) else None

    try:
        # Full phase: progress read from the servers climbs, then the task is incremental.
        wait_until(lambda: task()["progress"] == 1.0, 60, "the full phase to finish", 0.2)
        progress = [r["progress"] for _, r in sorted(readings.items()) if r["progress"] is not None]
        assert progress == sorted(progress), progress
        assert any(0 < p < 1 for p in progress), progress
        assert all(r["migrating"] for r in readings.values())

        # Writes stop: the stream drains, the offset is 0 and the key counts meet.
        stopped = time.time()
        post(f"{control}/writes/stop")
        synced = wait_until(
            lambda: polled_after(
                stopped + 1.5, lambda e: e["offset"] == 0 and e["target_keys"] == e["source_keys"]
            ),
            30,
            "offset 0 and equal key counts after writes stop",
        )
        assert synced["source_keys"] >= KEYS
        ports = get_json(control)
        source, target = (
            asyncio.run(dump_all(ports[side]["port"])) for side in ("source", "target")
        )
        assert len(source) == synced["source_keys"]
        assert target == source  # every key, type and value, not only the counts

        # Stall with writes going on: the offset stops at a non-zero value, the task still migrates.
        post(f"{control}/writes/start")
        wait_until(lambda: task()["offset"] != 0, 20, "writes to move the offset again")
        assert post(f"{control}/stall")["stalled"] is True
        stalled_at = time.time()
        frozen = [
            wait_until(
                lambda after=after: polled_after(after, lambda e: e["offset"] > 0),
                20,
                "a poll during the stall",
            )
            for after in (stalled_at + 1.5, stalled_at + 4, stalled_at + 6)
        ]
        offsets = {entry["offset"] for entry in frozen}
        assert len(offsets) == 1 and offsets.pop() > 0, frozen
        assert all(e["migrating"] and e["health"] == "up" for e in frozen)
        assert frozen[-1]["offset_trend"] == "flat"
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{web}/metrics", timeout=5).read()
        assert (
            f'dcs_migration_offset{{task_id="{DEMO_TASK_ID}"}} {float(frozen[-1]["offset"])}'.encode()
            in metrics
        )

        # Resume: the backlog is applied and, once writes stop, the offset is 0 again.
        post(f"{control}/resume")
        post(f"{control}/writes/stop")
        resumed = time.time()
        wait_until(
            lambda: polled_after(resumed + 1.5, lambda e: e["offset"] == 0),
            30,
            "offset 0 after the stall ends",
        )

        # SIGTERM: the daemon exits 0 and takes its redis-servers and their files with it.
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=15) == 0
        assert not any(port_open(ports[side]["port"]) for side in ("source", "target"))
        match = re.search(r"files in (\S+)\)", processes.output(daemon))
        assert match is not None and not Path(match.group(1)).exists()
    except BaseException:
        print(processes.all_output())
        raise


def test_redis_servers_die_with_a_killed_daemon(
    tmp_path: Path,
    processes: Processes,
    free_port: Callable[[], int],
    wait_until: Callable[..., Any],
    tool: Callable[[str], str],
) -> None:
    """Even a SIGKILLed daemon, which cleans nothing up, leaves no redis-server behind."""
    tool("redis-server")
    api = free_port()
    daemon = processes.start(
        "daemon",
        [
            sys.executable, "-m", "exporter", "--demo.redis", "--demo.redis.keys", "100",
            "--demo.redis.api-address", f"127.0.0.1:{api}",
            "--web.listen-address", f"127.0.0.1:{free_port()}",
        ],
        env={"TMPDIR": str(tmp_path)},  # a killed daemon cannot remove its files: keep them here
    )  # fmt: skip
    ports = wait_until(lambda: get_json(f"http://127.0.0.1:{api}/demo"), 30, "the demo to start")
    servers = [ports[side]["port"] for side in ("source", "target")]
    assert all(port_open(port) for port in servers)
    daemon.kill()
    daemon.wait(timeout=10)
    wait_until(lambda: not any(port_open(port) for port in servers), 10, "the servers to exit")
