"""Fault-injection soak: the real daemon (a subprocess) against the simulator, in compressed time.

Many tasks on a short interval; meanwhile random stats answers are replaced by faults: hangs
(client timeouts), bodies cut off mid-way, TCP resets, 5xx with JSON or HTML, 429 with and
without Retry-After, 401 "token expired", transient DCS.4133, and malformed 200 bodies (empty,
truncated, HTML, non-object, nested garbage, NaN, oversized). IAM tokens live 20 s, so they are
refreshed on the way. The task set is changed twice by SIGHUP reloads. At the end the faults stop,
every configured task must poll fine again, and the report says:

- polls made and failures by kind (from the daemon's own counters),
- process restarts (the daemon is restarted if it ever exits; must be 0),
- RSS and open fds at start (after warm-up) and end (growth < 10 %, fds within 2),
- series at the end: exactly the live tasks' series, none for removed tasks,
- the slowest /metrics answer seen, and the exit code after SIGTERM (must be 0).

Usage: ``.venv/bin/python bench/soak.py [--polls 20000] [--tasks 60] [--interval 0.3]``.
Exit status 0 when every check holds, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from exporter.config import load_config  # noqa: E402
from exporter.exposition import VALUE_FAMILIES  # noqa: E402
from exporter.session import pool_size  # noqa: E402
from exporter.simulator import (  # noqa: E402
    DEMO_PASSWORD,
    CannedResponse,
    Simulator,
    start,
)
from tests.support import PROJ, config_yaml  # noqa: E402

# Series every healthy task has: 7 values, info, up, last success, poll duration, polls_total.
STEADY_PER_TASK = (
    *VALUE_FAMILIES,
    "dcs_migration_task_info",
    "dcs_migration_up",
    "dcs_migration_last_success_timestamp_seconds",
    "dcs_migration_poll_duration_seconds",
    "dcs_migration_polls_total",
)
ERROR_FAMILIES = (
    "dcs_migration_poll_errors_total",
    "dcs_migration_api_errors_total",
    "dcs_migration_parse_errors_total",
)


def task_id(n: int) -> str:
    return f"bbbbbbbb-0000-4000-8000-{n:012d}"


def error_body(status: int, code: str, message: str) -> CannedResponse:
    return CannedResponse(
        status=status, body={"error_code": code, "error_msg": message, "error_ext_msg": None}
    )


# kind -> (weight, replies to queue for one task)
def fault_catalogue(rng: random.Random) -> dict[str, tuple[float, list[CannedResponse]]]:
    html = "<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>"
    return {
        "hang": (6, [CannedResponse(hang=True)]),
        "partial": (3, [CannedResponse(partial=b'{"full_migration_progress":"4')]),
        "slow": (4, [CannedResponse(body=None, delay=0.5)]),  # replaced below by a good body
        "reset": (4, [CannedResponse(reset=True)] * 3),
        "500": (8, [error_body(500, f"DCS.{rng.randint(5000, 5060)}", f"internal {rng.random()}")]),
        "502-html": (4, [CannedResponse(status=502, body=html, content_type="text/html")]),
        "503": (3, [CannedResponse(status=503, body="", content_type="text/plain")]),
        "429-retry-after": (
            2,
            [
                CannedResponse(
                    status=429,
                    headers={"Retry-After": "0.2"},
                    body={"error_code": "APIG.0308", "error_msg": "throttled"},
                )
            ],
        ),
        "429-no-header": (0.3, [CannedResponse(status=429, body=html, content_type="text/html")]),
        "401-expired": (
            3,
            [error_body(401, "APIGW.0301", "Incorrect IAM authentication information: expired")],
        ),
        "gone": (2, [error_body(404, "DCS.4133", "task not found")]),
        "empty": (3, [CannedResponse(status=200, body=b"")]),
        "truncated": (
            4,
            [CannedResponse(status=200, body=b'{"full_migration_progress":"45","off')],
        ),
        "html-200": (2, [CannedResponse(status=200, body=html, content_type="text/html")]),
        "not-object": (3, [CannedResponse(status=200, body=rng.choice([b"[]", b'"ok"', b"null"]))]),
        "garbage": (
            4,
            [CannedResponse(body={"offset": {"nested": 1}, "full_migration_progress": ["45"]})],
        ),
        "nan": (2, [CannedResponse(body=b'{"offset":NaN,"full_migration_progress":"45"}')]),
        "odd-fields": (
            3,
            [
                CannedResponse(
                    body={
                        "full_migration_progress": "100%",
                        "offset": "1,234",
                        "source_dbsize": None,
                        "target_dbsize": "450",
                        "target_input_kbps": [],
                        "target_ops": "300 ops",
                        "is_migrating": "paused",
                    }
                )
            ],
        ),
        "oversized": (0.5, [CannedResponse(body=b'{"offset":"' + b"9" * (2 << 20) + b'"}')]),
    }


@dataclass
class Totals:
    """Counters seen on the daemon, kept per task so that removed tasks still count."""

    polls: dict[str, float] = field(default_factory=dict)
    failures: dict[tuple[str, str], float] = field(default_factory=dict)
    slowest_scrape: float = 0.0

    def update(self, text: str) -> None:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = sample.labels
                if sample.name == "dcs_migration_polls_total":
                    key = labels["task_id"]
                    self.polls[key] = max(self.polls.get(key, 0.0), sample.value)
                elif sample.name == "dcs_migration_poll_errors_total":
                    fkey = (labels["task_id"], labels["reason"])
                    self.failures[fkey] = max(self.failures.get(fkey, 0.0), sample.value)

    @property
    def total_polls(self) -> int:
        return int(sum(self.polls.values()))

    def failures_by_kind(self) -> dict[str, int]:
        kinds: collections.Counter[str] = collections.Counter()
        for (_, reason), count in self.failures.items():
            kinds[reason] += int(count)
        return dict(kinds.most_common())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _sockets_to_port(port: int) -> set[str]:
    """Inodes of the TCP sockets on this machine whose remote end is ``port`` (/proc/net/tcp*)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if int(fields[2].rsplit(":", 1)[1], 16) == port:
                    inodes.add(fields[9])
    return inodes


@dataclass(frozen=True)
class FdCount:
    """A process's open fds, split into its pooled connections to the API and all the others.

    The pool opens and closes keep-alive connections as polls come and go (up to its limit), so
    only the other fds must stay equal: a leak shows there, or as a pool beyond its limit.
    """

    other: int
    api_connections: int

    @property
    def total(self) -> int:
        return self.other + self.api_connections


def count_fds(pid: int, api_port: int) -> FdCount:
    api = {f"socket:[{inode}]" for inode in _sockets_to_port(api_port)}
    links = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):  # an fd closed while we look
            links.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    pooled = sum(1 for link in links if link in api)
    return FdCount(len(links) - pooled, pooled)


def config_text(url: str, password_file: Path, tasks: list[str], interval: float) -> str:
    polling = f"""\
    polling:
      interval: {int(interval * 1000)}ms
      timeout: 1s
      concurrency: 16
      details_interval: 30s
      max_requests_per_second: 5000
    """
    return config_yaml(url, tuple(tasks), textwrap.dedent(polling), password_file=password_file)


class Daemon:
    """The daemon subprocess; restarted (and counted) should it ever exit."""

    def __init__(self, config: Path, port: int, log: Path) -> None:
        self.argv = [
            sys.executable,
            "-m",
            "exporter",
            "--config.file",
            str(config),
            "--web.listen-address",
            f"127.0.0.1:{port}",
        ]
        self.log = log
        self.restarts = 0
        self.exits: list[int] = []
        self.proc = self._spawn()

    def _spawn(self) -> subprocess.Popen[bytes]:
        with self.log.open("ab") as out:
            return subprocess.Popen(
                self.argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True
            )

    def check(self) -> None:
        code = self.proc.poll()
        if code is not None:
            self.exits.append(code)
            self.restarts += 1
            print(f"!! daemon exited with {code}; restarting", flush=True)
            self.proc = self._spawn()

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)


async def run(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    workdir = Path(tempfile.mkdtemp(prefix="dcs-soak-"))
    sim = Simulator(project_id=PROJ, token_ttl=20.0)
    all_tasks = [task_id(n) for n in range(args.tasks + 20)]
    for n, tid in enumerate(all_tasks):
        sim.add_task(tid, f"soak-{n}", started_ago=rng.uniform(0, 1200))
    runner, url = await start(sim)
    api_port = int(url.rsplit(":", 1)[1])
    password_file = workdir / "password"
    password_file.write_text(DEMO_PASSWORD)
    config = workdir / "config.yaml"
    live = all_tasks[: args.tasks]
    config.write_text(config_text(url, password_file, live, args.interval))
    pool_limit = pool_size(load_config(str(config)))
    port = free_port()
    daemon = Daemon(config, port, workdir / "daemon.log")
    catalogue = fault_catalogue(rng)
    kinds = list(catalogue)
    weights = [catalogue[k][0] for k in kinds]
    injected: collections.Counter[str] = collections.Counter()
    totals = Totals()
    removed: set[str] = set()
    faults_on = asyncio.Event()
    faults_on.set()
    started = time.monotonic()
    print(
        f"soak: {args.tasks} tasks every {args.interval}s, target {args.polls} polls, "
        f"~{args.fault_rate:.0%} of polls faulty; work dir {workdir}",
        flush=True,
    )

    async with aiohttp.ClientSession() as http:

        async def scrape() -> str:
            t0 = time.monotonic()
            async with http.get(f"http://127.0.0.1:{port}/metrics") as response:
                text = await response.text()
                assert response.status == 200, response.status
            totals.slowest_scrape = max(totals.slowest_scrape, time.monotonic() - t0)
            totals.update(text)
            return text

        async def until_serving() -> None:
            for _ in range(200):
                try:
                    await scrape()
                    return
                except (aiohttp.ClientError, OSError):
                    await asyncio.sleep(0.05)
            raise RuntimeError("the daemon never served /metrics")

        async def inject() -> None:
            polls_per_second = args.tasks / args.interval
            per_tick = polls_per_second * args.fault_rate * 0.05
            while True:
                await asyncio.sleep(0.05)
                if not faults_on.is_set():
                    continue
                count = int(per_tick) + (rng.random() < per_tick % 1)
                for _ in range(count):
                    kind = rng.choices(kinds, weights)[0]
                    target = rng.choice(live)
                    replies = catalogue[kind][1]
                    if kind == "slow":
                        replies = [CannedResponse(body=sim_body(target), delay=0.5)]
                    sim.push(target, *replies)
                    injected[kind] += 1

        def sim_body(tid: str) -> object:
            task = sim._tasks[tid]  # the model's current body, served late
            return task.model.stats_at(time.time() - task.started)

        async def watch() -> None:
            while True:
                await asyncio.sleep(0.5)
                daemon.check()
                try:
                    await scrape()
                except (aiohttp.ClientError, OSError, AssertionError) as exc:
                    print(f"!! scrape failed: {exc!r}", flush=True)

        async def quiesce() -> str:
            """Stop faults, drop queued ones, wait until every live task polls fine again."""
            faults_on.clear()
            for tid in all_tasks:
                sim._queues.pop(tid, None)
            quiet_since = time.monotonic()
            text = ""
            while time.monotonic() - quiet_since < 60:
                await asyncio.sleep(0.5)
                text = await scrape()
                samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
                ups = {
                    s.labels["task_id"]: s.value for s in samples if s.name == "dcs_migration_up"
                }
                values = sum(1 for s in samples if s.name in VALUE_FAMILIES)
                if all(ups.get(t) == 1 for t in live) and values == 7 * len(live):
                    break
            await asyncio.sleep(2.0)  # a few clean rounds: the connection pool settles
            return await scrape()

        def resources() -> tuple[int, FdCount]:
            """RSS (KiB) and open fds of the daemon, the fds as the median of five readings."""
            fds = sorted(
                (count_fds(daemon.proc.pid, api_port) for _ in range(5)), key=lambda c: c.other
            )
            return rss_kib(daemon.proc.pid), fds[2]

        await until_serving()
        loops = [asyncio.create_task(inject()), asyncio.create_task(watch())]
        try:
            # Warm-up: connection pool, code paths and caches settle before the start sample,
            # which is taken like the end one: faults off, every task healthy, pool settled.
            while totals.total_polls < min(2000, args.polls // 10):
                await asyncio.sleep(0.5)
            await quiesce()
            rss_start, fds_start = resources()
            pid_start = daemon.proc.pid
            faults_on.set()
            print(f"warm: {totals.total_polls} polls, RSS {rss_start} KiB, {fds_start.total} fds")

            reloads = [0.4, 0.7]
            last_report = time.monotonic()
            while totals.total_polls < args.polls:
                await asyncio.sleep(0.5)
                if reloads and totals.total_polls >= reloads[0] * args.polls:
                    reloads.pop(0)
                    # Swap 10 tasks for others: their series must go, the new ones appear.
                    out = rng.sample(live, 10)
                    incoming = [t for t in all_tasks if t not in live and t not in removed][:10]
                    removed.update(out)
                    live = [t for t in live if t not in out] + incoming
                    config.write_text(config_text(url, password_file, live, args.interval))
                    daemon.signal(signal.SIGHUP)
                    print(f"reload: -{len(out)} +{len(incoming)} tasks", flush=True)
                if time.monotonic() - last_report > 15:
                    last_report = time.monotonic()
                    print(
                        f"  {totals.total_polls} polls, {time.monotonic() - started:.0f}s, "
                        f"RSS {rss_kib(daemon.proc.pid)} KiB, {open_fds(daemon.proc.pid)} fds",
                        flush=True,
                    )
                if time.monotonic() - started > args.max_seconds:
                    print("!! time limit reached", flush=True)
                    break

            # Quiesce as for the start sample, then measure.
            text = await quiesce()
            rss_end, fds_end = resources()
        finally:
            for loop in loops:
                loop.cancel()

        daemon.signal(signal.SIGTERM)
        exit_started = time.monotonic()
        while daemon.proc.poll() is None and time.monotonic() - exit_started < 10:
            await asyncio.sleep(0.05)
        exit_code = daemon.proc.poll()
        exit_seconds = time.monotonic() - exit_started
    await runner.cleanup()

    # ---- series at the end ---------------------------------------------------------------------
    steady: collections.Counter[str] = collections.Counter()
    errors = 0
    stray: list[str] = []
    total_series = 0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            total_series += 1
            owner = sample.labels.get("task_id")
            if owner is None:
                continue
            if owner not in live:
                stray.append(f"{sample.name}{{task_id={owner}}}")
            elif sample.name in ERROR_FAMILIES:
                errors += 1
            else:
                steady[sample.name] += 1
    steady_ok = all(steady[name] == len(live) for name in STEADY_PER_TASK) and sum(
        steady.values()
    ) == len(STEADY_PER_TASK) * len(live)
    error_bound = len(live) * (12 + 7 + 2 * 21)  # reasons + fields + (status, code) pairs seen

    log_text = (workdir / "daemon.log").read_text(errors="replace")
    tracebacks = log_text.count("Traceback")
    rss_growth = (rss_end - rss_start) / rss_start
    checks = {
        "polls >= target": totals.total_polls >= args.polls,
        "process restarts == 0": daemon.restarts == 0 and daemon.proc.pid == pid_start,
        "RSS growth < 10 %": rss_growth < 0.10,
        "fds equal within 2 (pooled API connections aside)": abs(fds_end.other - fds_start.other)
        <= 2,
        "API connections within the pool limit": max(
            fds_start.api_connections, fds_end.api_connections
        )
        <= pool_limit,
        "series: exactly the live tasks'": steady_ok and not stray and errors <= error_bound,
        "every live task up at the end": all(
            s.value == 1
            for f in text_string_to_metric_families(text)
            for s in f.samples
            if s.name == "dcs_migration_up"
        ),
        "SIGTERM exit 0 within 5 s": exit_code == 0 and exit_seconds < 5,
        "/metrics always < 1 s": totals.slowest_scrape < 1.0,
        "no traceback in the log": tracebacks == 0,
    }

    elapsed = time.monotonic() - started
    print()
    print(f"duration:          {elapsed:.0f} s")
    print(
        f"polls made:        {totals.total_polls} (daemon counters; simulator saw "
        f"{sum(1 for r in sim.requests if r.path.endswith('/stats'))} stats requests, "
        f"{sim.token_requests} token requests)"
    )
    print(
        f"faults injected:   {sum(injected.values())}: "
        + ", ".join(f"{k} {v}" for k, v in injected.most_common())
    )
    print(
        "failures by kind:  " + ", ".join(f"{k} {v}" for k, v in totals.failures_by_kind().items())
    )
    print(f"process restarts:  {daemon.restarts}")
    print(f"RSS:               start {rss_start} KiB, end {rss_end} KiB ({rss_growth:+.1%})")
    print(
        f"open fds:          start {fds_start.total}, end {fds_end.total}; without the pooled "
        f"API connections start {fds_start.other}, end {fds_end.other}; pooled start "
        f"{fds_start.api_connections}, end {fds_end.api_connections} (limit {pool_limit})"
    )
    print(
        f"series at end:     {total_series} in all; {sum(steady.values())} per-task steady series "
        f"= {len(STEADY_PER_TASK)} x {len(live)} live tasks; {errors} error-counter series "
        f"(bound {error_bound}); {len(stray)} for the {len(removed)} removed tasks"
    )
    print(f"slowest /metrics:  {totals.slowest_scrape * 1000:.0f} ms")
    print(f"SIGTERM:           exit {exit_code} after {exit_seconds:.2f} s")
    print(f"tracebacks in log: {tracebacks}")
    print()
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    if stray:
        print("stray series:", *stray[:10], sep="\n  ")
    return 0 if all(checks.values()) else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--polls", type=int, default=20_000)
    parser.add_argument("--tasks", type=int, default=60)
    parser.add_argument("--interval", type=float, default=0.3)
    parser.add_argument("--fault-rate", type=float, default=0.1)
    parser.add_argument("--max-seconds", type=float, default=300)
    parser.add_argument("--seed", type=int, default=3)
    return asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    raise SystemExit(main())
