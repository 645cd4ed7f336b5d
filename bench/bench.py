"""Benchmark the exporter against a fake API on loopback, and against a scrape-time exporter.

    .venv/bin/python bench/bench.py            # 10, 100, 1,000 and 10,000 tasks: a few minutes
    .venv/bin/python bench/bench.py --quick    # 10, 100 and 1,000 tasks, short phases: < 60 s

For every size three processes run on 127.0.0.1: the fake API (``bench/fake_api.py``: fixed answers,
each ``--latency`` late, so that the cloud's stand-in takes next to no CPU from the process under
test; ``--api simulator`` uses the full simulator instead, which checks every signature), the
process under test, and this one, which drives the scrapes (an aiohttp client loop) and prints the
tables.

The exporter under test is wired from the daemon's own parts (``session.open_session``,
``daemon.build_poller``, ``web.create_app``). It first polls every task once to warm up (the first
round also fetches every task's details), then measures whole rounds of ``poll_all_once`` with no
scrapes: the wall time of one round against the ideal ``ceil(tasks / concurrency) × latency`` (and
against a bare aiohttp client's round of unsigned GETs, the floor on this machine), and
the process's CPU time per 1,000 polls. Then it serves ``/metrics`` while it keeps polling at the
steady rate of ``tasks / --interval`` polls a second (so the state changes all the time, as in
production), and ``--scrapers`` concurrent clients scrape it like Prometheus (OpenMetrics, gzip) for
``--scrape-seconds``. Peak RSS is the process's high-water mark over both phases.

The alternative (``bench/scrape_time_exporter.py``: ``requests`` + ``prometheus_client``, every
task's stats fetched on every scrape) gets the same scrape load with a scrape timeout; its CPU is per
API call, its latency is what Prometheus would wait.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import resource
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

HERE = Path(__file__).resolve().parent
# What Prometheus 2.x/3.x sends by default: OpenMetrics preferred, gzip accepted.
PROMETHEUS_HEADERS = {
    "Accept": "application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
    "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
    "Accept-Encoding": "gzip",
}
# A fixed stats body: the simulator's stats model would spend its CPU on random numbers.
STATS_BODY = {
    "full_migration_progress": "100",
    "offset": "1234",
    "source_dbsize": "5312210",
    "target_dbsize": "5312100",
    "target_input_kbps": "64.5",
    "target_ops": "1800",
    "is_migrating": True,
}
TARGETS_AT = 10_000
P99_TARGET_MS = 50.0
CYCLE_TARGET_RATIO = 1.2
CPU_TARGET_MS_PER_POLL = 0.5
RSS_TARGET_MB = 150.0
API_NAMES = {"fake": "fixed-answer fake API", "simulator": "full simulator"}
API_CHOICES = tuple(API_NAMES)


def bench_task_ids(count: int) -> list[str]:
    """Stable task IDs, the same in every process."""
    return [str(uuid.uuid5(uuid.NAMESPACE_URL, f"dcs-bench/{index}")) for index in range(count)]


def emit(payload: dict[str, Any]) -> None:
    """One JSON line to the parent."""
    print(json.dumps(payload), flush=True)


async def wait_for_sigterm() -> None:
    """Return when SIGTERM (or SIGINT) arrives."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()


# --------------------------------------------------------------------------------------------------
# Child: the fake API


async def serve_api(tasks: int, latency: float, api: str) -> None:
    """The fake API with ``tasks`` tasks, every answer ``latency`` seconds late."""
    if api == "simulator":
        await serve_simulator(tasks, latency)
        return
    from fake_api import build_answers, start_fake_api

    from exporter.simulator import DEMO_PROJECT_ID

    answers = build_answers(DEMO_PROJECT_ID, bench_task_ids(tasks), STATS_BODY)
    server = await start_fake_api(answers, latency)
    emit({"url": f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"})
    await wait_for_sigterm()
    server.close()
    await server.wait_closed()


async def serve_simulator(tasks: int, latency: float) -> None:
    """The full simulator (signatures checked) behind an aiohttp server."""
    from aiohttp import web

    from exporter.simulator import Simulator

    sim = Simulator()
    for index, task_id in enumerate(bench_task_ids(tasks)):
        sim.add_task(task_id, f"bench-{index}", body=STATS_BODY)
    app = sim.app()

    @web.middleware
    async def delay(request: web.Request, handler: Any) -> web.StreamResponse:
        await asyncio.sleep(latency)
        response: web.StreamResponse = await handler(request)
        return response

    if latency > 0:
        app.middlewares.append(delay)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, backlog=1024).start()
    emit({"url": f"http://127.0.0.1:{runner.addresses[0][1]}"})
    await wait_for_sigterm()
    await runner.cleanup()


# --------------------------------------------------------------------------------------------------
# Child: the exporter under test


async def steady_polls(poller: Any, task_states: list[Any], rate: float) -> None:
    """Poll tasks round robin at ``rate`` a second, as the scheduler does between rounds."""
    loop = asyncio.get_running_loop()
    running: set[asyncio.Task[None]] = set()
    started, started_polls = loop.time(), 0
    while True:
        await asyncio.sleep(0.01)
        due = int((loop.time() - started) * rate) - started_polls
        for _ in range(due):
            task = task_states[started_polls % len(task_states)]
            job = loop.create_task(poller.poll_task(task))
            running.add(job)
            job.add_done_callback(running.discard)
            started_polls += 1


async def run_exporter(args: argparse.Namespace) -> None:
    """Measure poll rounds, then serve /metrics while polling steadily, until SIGTERM."""
    from aiohttp import web

    from exporter.config import AkSkAuth, CloudConfig, Config, PollingConfig, Secret, TaskConfig
    from exporter.daemon import build_poller
    from exporter.session import open_session
    from exporter.simulator import DEMO_ACCESS_KEY, DEMO_PROJECT_ID, DEMO_SECRET_KEY
    from exporter.state import ExporterState
    from exporter.web import create_app

    config = Config(
        cloud=CloudConfig(
            region="eu-de",
            dcs_endpoint=args.url,
            iam_endpoint=f"{args.url}/v3",
            project_id=DEMO_PROJECT_ID,
        ),
        auth=AkSkAuth(access_key=DEMO_ACCESS_KEY, secret_key=Secret(value=DEMO_SECRET_KEY)),
        # No request-rate ceiling: the point is the exporter's own cost, not the API's quota.
        polling=PollingConfig(
            interval=args.interval,
            timeout=10.0,
            concurrency=args.concurrency,
            max_requests_per_second=1e9,
        ),
        tasks=tuple(TaskConfig(id=task_id) for task_id in bench_task_ids(args.tasks)),
    )
    state = ExporterState()
    async with open_session(config) as session:
        poller = build_poller(config, session, state)
        await poller.poll_all_once()  # warm-up: connections, and every task's details
        cycles: list[float] = []
        cpu, failed_rounds = 0.0, 0
        measuring = time.perf_counter()
        while not cycles or (
            len(cycles) * args.tasks < args.min_polls
            and time.perf_counter() - measuring < args.cycle_budget
        ):
            cpu_before, wall_before = time.process_time(), time.perf_counter()
            ok = await poller.poll_all_once()
            cycles.append(time.perf_counter() - wall_before)
            cpu += time.process_time() - cpu_before
            failed_rounds += not ok
        emit(
            {
                "cycles": cycles,
                "cpu_seconds": cpu,
                "polls": len(cycles) * args.tasks,
                "failed_rounds": failed_rounds,
            }
        )

        app = create_app(state)
        handled: list[float] = []  # seconds in the /metrics handler, as the server sees it

        @web.middleware
        async def timed(request: web.Request, handler: Any) -> web.StreamResponse:
            started = time.perf_counter()
            response: web.StreamResponse = await handler(request)
            if request.path == "/metrics":
                handled.append(time.perf_counter() - started)
            return response

        app.middlewares.append(timed)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0, backlog=1024).start()
        emit({"port": runner.addresses[0][1]})
        steady = asyncio.get_running_loop().create_task(
            steady_polls(poller, list(state.tasks.values()), args.tasks / args.interval)
        )
        await wait_for_sigterm()
        steady.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await steady
        await poller.stop()
        await runner.cleanup()
    emit({"maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "handled": handled})


# --------------------------------------------------------------------------------------------------
# Parent: processes, load, tables


class Child:
    """A child process that talks JSON lines on stdout; its stderr goes to a log file."""

    def __init__(self, process: asyncio.subprocess.Process, log: Path, name: str) -> None:
        self.process = process
        self.log = log
        self.name = name

    @classmethod
    async def start(cls, name: str, argv: Sequence[str], directory: Path) -> Child:
        """Start ``argv`` with stdout piped and stderr to ``directory/name.log``."""
        log = directory / f"{name}.log"
        with log.open("wb") as stderr:
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr,
                cwd=HERE.parent,
                limit=1 << 24,  # a line may carry every scrape's handler time
            )
        return cls(process, log, name)

    async def read_json(self, timeout: float) -> dict[str, Any]:
        """The next JSON line, or an error that shows the end of the child's log."""
        assert self.process.stdout is not None
        try:
            line = await asyncio.wait_for(self.process.stdout.readline(), timeout)
        except TimeoutError:
            raise RuntimeError(
                f"{self.name}: no answer within {timeout:.0f}s{self._tail()}"
            ) from None
        if not line:
            raise RuntimeError(f"{self.name}: exited early{self._tail()}")
        result: dict[str, Any] = json.loads(line)
        return result

    async def stop(self, timeout: float = 30.0) -> dict[str, Any] | None:
        """SIGTERM, then the final JSON line if it prints one; killed if it does not end in time."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            final = await self.read_json(timeout)
        except RuntimeError:
            final = None
        try:
            await asyncio.wait_for(self.process.wait(), timeout)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()
        return final

    def _tail(self) -> str:
        text = self.log.read_text(encoding="utf-8", errors="replace")
        return f"; its log ends:\n{text[-2000:]}" if text else ""


@dataclass
class LoadResult:
    """Latencies of the scrapes that completed, and how many did not."""

    latencies: list[float] = field(default_factory=list)
    failures: int = 0
    body_bytes: int = 0  # size of the last response body as sent (gzip)

    def percentile(self, q: float) -> float | None:
        """Nearest-rank percentile in seconds; None without any completed scrape."""
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


async def scrape_load(port: int, clients: int, seconds: float, timeout: float) -> LoadResult:
    """``clients`` loops scraping /metrics back to back for ``seconds`` (each bounded by timeout)."""
    result = LoadResult()
    url = f"http://127.0.0.1:{port}/metrics"
    deadline = time.perf_counter() + seconds
    connector = aiohttp.TCPConnector(limit=clients)
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    async with aiohttp.ClientSession(
        connector=connector, auto_decompress=False, timeout=client_timeout, read_bufsize=1 << 20
    ) as session:

        async def loop() -> None:
            first = True  # at least one scrape per loop, even with the deadline passed
            while first or time.perf_counter() < deadline:
                first = False
                started = time.perf_counter()
                try:
                    async with session.get(url, headers=PROMETHEUS_HEADERS) as response:
                        # Read and drop: joining megabytes per scrape would make this process,
                        # not the server, the bottleneck.
                        size = 0
                        while chunk := await response.content.readany():
                            size += len(chunk)
                        ok = response.status == 200
                except (aiohttp.ClientError, TimeoutError):
                    ok = False
                if ok:
                    result.latencies.append(time.perf_counter() - started)
                    result.body_bytes = size
                else:
                    result.failures += 1

        await asyncio.gather(*(loop() for _ in range(clients)))
    return result


@dataclass
class ExporterRow:
    """What was measured for the exporter at one size."""

    tasks: int
    ideal_cycle: float
    bare_cycle: float  # the same round by a bare aiohttp client: what the API and HTTP cost
    cycles: list[float]
    cpu_seconds: float
    polls: int
    failed_rounds: int
    first_scrape: float
    load: LoadResult
    server: LoadResult  # time inside the /metrics handler, first scrape excluded
    maxrss_kb: int

    @property
    def cycle(self) -> float:
        """The median measured round."""
        ordered = sorted(self.cycles)
        return ordered[len(ordered) // 2]

    @property
    def cpu_ms_per_poll(self) -> float:
        """CPU milliseconds per poll."""
        return self.cpu_seconds / self.polls * 1000


@dataclass
class AlternativeRow:
    """What was measured for the scrape-time exporter at one size."""

    tasks: int
    load: LoadResult
    calls: int
    cpu_seconds: float
    maxrss_kb: int

    @property
    def cpu_ms_per_call(self) -> float | None:
        """CPU milliseconds per API call, None when it made none."""
        return self.cpu_seconds / self.calls * 1000 if self.calls else None


def child_argv(role: str, *args: object) -> list[str]:
    """The command line of a child role of this script."""
    return [sys.executable, str(Path(__file__).resolve()), role, *(str(a) for a in args)]


async def bare_client_round(url: str, tasks: int, concurrency: int) -> float:
    """Seconds for one round of stats GETs by a plain aiohttp client: no signing, no parsing.

    The floor under the exporter's round on this machine: the latency, the API's answering and
    HTTP. The first pass opens the connections and is not timed.
    """
    from exporter.simulator import DEMO_PROJECT_ID

    urls = [f"{url}/v2/{DEMO_PROJECT_ID}/migration-task/{t}/stats" for t in bench_task_ids(tasks)]
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        gate = asyncio.Semaphore(concurrency)

        async def fetch(target: str) -> None:
            async with gate, session.get(target) as response:
                await response.read()

        await asyncio.gather(*(fetch(target) for target in urls[:concurrency]))
        started = time.perf_counter()
        await asyncio.gather(*(fetch(target) for target in urls))
        return time.perf_counter() - started


async def measure_exporter(
    tasks: int, url: str, options: argparse.Namespace, directory: Path
) -> ExporterRow:
    """Start the exporter under test, read its rounds, scrape it, stop it."""
    ideal = math.ceil(tasks / options.concurrency) * options.latency
    bare = await bare_client_round(url, tasks, options.concurrency)
    child = await Child.start(
        "exporter",
        child_argv(
            "_exporter",
            "--url",
            url,
            "--tasks",
            tasks,
            "--concurrency",
            options.concurrency,
            "--interval",
            options.interval,
            "--min-polls",
            options.min_polls,
            "--cycle-budget",
            options.cycle_budget,
        ),
        directory,
    )
    try:
        # Warm-up (stats + details) and the measured rounds, with a wide margin.
        rounds = await child.read_json(60 + 10 * (3 * ideal + options.cycle_budget))
        port = (await child.read_json(30))["port"]
        first = await scrape_load(port, 1, 0.0, 60)  # deadline passed: exactly one scrape
        load = await scrape_load(port, options.scrapers, options.scrape_seconds, 30)
    finally:
        final = await child.stop()
    return ExporterRow(
        tasks=tasks,
        ideal_cycle=ideal,
        bare_cycle=bare,
        cycles=rounds["cycles"],
        cpu_seconds=rounds["cpu_seconds"],
        polls=rounds["polls"],
        failed_rounds=rounds["failed_rounds"],
        first_scrape=first.latencies[0] if first.latencies else math.nan,
        load=load,
        server=LoadResult(latencies=final["handled"][1:] if final else []),
        maxrss_kb=final["maxrss_kb"] if final else 0,
    )


async def measure_alternative(
    tasks: int, url: str, options: argparse.Namespace, directory: Path
) -> AlternativeRow:
    """Start the scrape-time exporter, scrape it with the same load, stop it."""
    ids_file = directory / "task_ids.txt"
    ids_file.write_text("\n".join(bench_task_ids(tasks)), encoding="utf-8")
    argv = [sys.executable, str(HERE / "scrape_time_exporter.py"), "--url", url]
    child = await Child.start("alternative", [*argv, "--task-ids-file", str(ids_file)], directory)
    try:
        started = await child.read_json(60)
        load = await scrape_load(
            started["port"], options.scrapers, options.alt_scrape_seconds, options.scrape_timeout
        )
    finally:
        final = await child.stop()
    return AlternativeRow(
        tasks=tasks,
        load=load,
        calls=final["calls"] if final else 0,
        cpu_seconds=(final["cpu_seconds"] - started["cpu_seconds"]) if final else 0.0,
        maxrss_kb=final["maxrss_kb"] if final else 0,
    )


async def measure(
    tasks: int, options: argparse.Namespace
) -> tuple[ExporterRow, AlternativeRow | None]:
    """One size: fake API, exporter, alternative."""
    with tempfile.TemporaryDirectory(prefix="dcs-bench-") as tmp:
        directory = Path(tmp)
        api = await Child.start(
            "api",
            child_argv(
                "_api", "--tasks", tasks, "--latency", options.latency, "--api", options.api
            ),
            directory,
        )
        try:
            url = (await api.read_json(60))["url"]
            exporter_row = await measure_exporter(tasks, url, options, directory)
            alternative_row = None
            if not options.no_alternative:
                alternative_row = await measure_alternative(tasks, url, options, directory)
        finally:
            await api.stop()
    return exporter_row, alternative_row


def ms(seconds: float | None) -> str:
    """Milliseconds for a table cell."""
    if seconds is None or math.isnan(seconds):
        return "-"
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def ratio(numerator: float | None, denominator: float | None, floor: bool = False) -> str:
    """``a / b`` for a table cell; ``>=`` when the numerator is only a lower bound."""
    if numerator is None or not denominator:
        return "-"
    return f"{'>=' if floor else ''}{numerator / denominator:,.0f}x"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain text table with aligned columns."""
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows, strict=True)]
    lines = [
        "  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
        for line in (header, *rows)
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def verdict(name: str, value: float, limit: float, unit: str, lower_is_better: bool = True) -> str:
    """One target line: met, or missed and by how much."""
    met = value < limit if lower_is_better else value > limit
    if met:
        return f"  {name:<34} met: {value:.3g} {unit} (target < {limit:g} {unit})"
    over = (value - limit) / limit * 100
    return f"  {name:<34} MISSED by {over:.0f} %: {value:.3g} {unit} (target < {limit:g} {unit})"


def report(
    options: argparse.Namespace, results: list[tuple[ExporterRow, AlternativeRow | None]]
) -> str:
    """The three tables and the target verdicts."""
    out = [
        f"dcs-migration-exporter benchmark: {os.cpu_count()} cores, {API_NAMES[options.api]} on "
        f"loopback, API latency "
        f"{options.latency * 1000:g} ms, poll concurrency {options.concurrency}, {options.scrapers} "
        f"concurrent scrapers (OpenMetrics + gzip) for {options.scrape_seconds:g} s, steady polling "
        f"every {options.interval:g} s per task; load average {' '.join(f'{x:.1f}' for x in options.load_before)} before, "
        f"{' '.join(f'{x:.1f}' for x in options.load_after)} after",
        "",
        "Exporter (background polling, cached /metrics)",
        table(
            [
                "tasks",
                "p50",
                "p99",
                "scrapes",
                "failed",
                "handler p50",
                "handler p99",
                "gzip size",
                "first scrape",
                "poll round",
                "ideal",
                "bare client",
                "round/ideal",
                "CPU s/1k polls",
                "peak RSS",
            ],
            [
                [
                    f"{row.tasks}",
                    ms(row.load.percentile(50)),
                    ms(row.load.percentile(99)),
                    f"{len(row.load.latencies)}",
                    f"{row.load.failures}",
                    ms(row.server.percentile(50)),
                    ms(row.server.percentile(99)),
                    f"{row.load.body_bytes / 1e6:.2f} MB"
                    if row.load.body_bytes >= 100_000
                    else f"{row.load.body_bytes / 1e3:.1f} kB",
                    ms(row.first_scrape),
                    f"{row.cycle:.3f} s",
                    f"{row.ideal_cycle:.3f} s",
                    f"{row.bare_cycle:.3f} s",
                    f"{row.cycle / row.ideal_cycle:.2f}",
                    f"{row.cpu_ms_per_poll:.3f}",
                    f"{row.maxrss_kb / 1024:.0f} MB",
                ]
                for row, _ in results
            ],
        ),
    ]
    alternatives = [(row, alt) for row, alt in results if alt is not None]
    if alternatives:
        out += [
            "",
            "Alternative: scrape-time exporter (requests + prometheus_client, every task fetched on "
            f"every scrape; scrape timeout {options.scrape_timeout:g} s, {options.alt_scrape_seconds:g} s of load)",
            table(
                [
                    "tasks",
                    "p50",
                    "p99",
                    "scrapes",
                    "timed out",
                    "API calls",
                    "CPU s/1k calls",
                    "peak RSS",
                ],
                [
                    [
                        f"{alt.tasks}",
                        ms(alt.load.percentile(50))
                        if alt.load.latencies
                        else f"> {options.scrape_timeout:g} s",
                        ms(alt.load.percentile(99))
                        if not alt.load.failures
                        else f"> {options.scrape_timeout:g} s",
                        f"{len(alt.load.latencies)}",
                        f"{alt.load.failures}",
                        f"{alt.calls}",
                        f"{alt.cpu_ms_per_call:.3f}" if alt.cpu_ms_per_call is not None else "-",
                        f"{alt.maxrss_kb / 1024:.0f} MB",
                    ]
                    for _, alt in alternatives
                ],
            ),
            "",
            "Ratios, alternative / exporter (>= where the alternative timed out)",
            table(
                ["tasks", "p50", "p99", "CPU per API call", "peak RSS"],
                [
                    [
                        f"{row.tasks}",
                        ratio(
                            alt.load.percentile(50) or options.scrape_timeout,
                            row.load.percentile(50),
                            floor=not alt.load.latencies,
                        ),
                        ratio(
                            alt.load.percentile(99)
                            if not alt.load.failures
                            else options.scrape_timeout,
                            row.load.percentile(99),
                            floor=bool(alt.load.failures),
                        ),
                        f"{alt.cpu_ms_per_call / row.cpu_ms_per_poll:.1f}x"
                        if alt.cpu_ms_per_call is not None
                        else "-",
                        f"{alt.maxrss_kb / max(1, row.maxrss_kb):.2f}x",
                    ]
                    for row, alt in alternatives
                ],
            ),
        ]
    largest = max(results, key=lambda pair: pair[0].tasks)[0]
    scope = (
        f"at {largest.tasks} tasks"
        if largest.tasks == TARGETS_AT
        else f"at {largest.tasks} tasks (the targets are set for {TARGETS_AT}; run without --quick)"
    )
    p99 = largest.load.percentile(99)
    out += [
        "",
        f"Targets {scope}:",
        verdict("/metrics p99", (p99 or math.inf) * 1000, P99_TARGET_MS, "ms"),
        verdict("poll round / ideal", largest.cycle / largest.ideal_cycle, CYCLE_TARGET_RATIO, "x"),
        verdict("CPU per poll", largest.cpu_ms_per_poll, CPU_TARGET_MS_PER_POLL, "ms"),
        verdict("peak RSS", largest.maxrss_kb / 1024, RSS_TARGET_MB, "MB"),
        polls_verdict([row for row, _ in results]),
    ]
    return "\n".join(out)


def polls_verdict(rows: Sequence[ExporterRow]) -> str:
    """Whether every measured poll worked: rounds of failing polls would time nothing useful."""
    failing = [
        f"{row.failed_rounds} of {len(row.cycles)} rounds at {row.tasks} tasks"
        for row in rows
        if row.failed_rounds
    ]
    if not failing:
        return "  every measured poll succeeded"
    return f"  FAILED polls in {', '.join(failing)}: those figures do not time working polls"


async def run_all(options: argparse.Namespace) -> int:
    """Measure every size, print the report."""
    options.load_before = os.getloadavg()  # other work on the machine skews every number
    results = []
    for tasks in options.sizes:
        print(f"measuring {tasks} tasks ...", file=sys.stderr, flush=True)
        results.append(await measure(tasks, options))
    options.load_after = os.getloadavg()
    print(report(options, results), flush=True)
    return 0


def parse_sizes(text: str) -> list[int]:
    """``10,100,1000`` → [10, 100, 1000]."""
    sizes = [int(part) for part in text.split(",") if part.strip()]
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError("sizes are positive task counts, e.g. 10,100,1000")
    return sizes


def build_parser() -> argparse.ArgumentParser:
    """Flags of the benchmark and of its child roles."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="role")
    api = sub.add_parser("_api", help=argparse.SUPPRESS)
    api.add_argument("--tasks", type=int, required=True)
    api.add_argument("--latency", type=float, required=True)
    api.add_argument("--api", choices=API_CHOICES, required=True)
    exp = sub.add_parser("_exporter", help=argparse.SUPPRESS)
    exp.add_argument("--url", required=True)
    exp.add_argument("--tasks", type=int, required=True)
    exp.add_argument("--concurrency", type=int, required=True)
    exp.add_argument("--interval", type=float, required=True)
    exp.add_argument("--min-polls", type=int, required=True)
    exp.add_argument("--cycle-budget", type=float, required=True)

    parser.add_argument("--quick", action="store_true", help="small sizes, short phases (< 60 s)")
    parser.add_argument("--sizes", type=parse_sizes, help="task counts (default 10,100,1000,10000)")
    parser.add_argument("--latency", type=float, default=0.02, help="API latency, s (0.02)")
    parser.add_argument(
        "--api",
        choices=API_CHOICES,
        default="fake",
        help="the cloud stand-in: fixed answers from bench/fake_api.py (fake), or the full "
        "simulator, whose own CPU shares the cores (simulator)",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=32,
        help="polls in flight (32: what 10,000 tasks every 30 s need at real API latencies)",
    )
    parser.add_argument("--interval", type=float, default=30.0, help="steady poll interval (30)")
    parser.add_argument("--scrapers", type=int, default=4, help="concurrent scrape loops (4)")
    parser.add_argument("--scrape-seconds", type=float, help="scrape load per size (10; quick 2)")
    parser.add_argument("--alt-scrape-seconds", type=float, help="same for the alternative (5; 1)")
    parser.add_argument("--scrape-timeout", type=float, help="alternative's scrape timeout (10; 3)")
    parser.add_argument("--min-polls", type=int, help="polls to measure per size (2000; 300)")
    parser.add_argument("--cycle-budget", type=float, help="seconds of measured rounds (10; 2)")
    parser.add_argument("--no-alternative", action="store_true", help="skip the alternative")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, or one of its child roles."""
    args = build_parser().parse_args(argv)
    if args.role == "_api":
        asyncio.run(serve_api(args.tasks, args.latency, args.api))
        return 0
    if args.role == "_exporter":
        asyncio.run(run_exporter(args))
        return 0
    quick = args.quick
    defaults: dict[str, Any] = {
        "sizes": [10, 100, 1000] if quick else [10, 100, 1000, 10_000],
        "scrape_seconds": 2.0 if quick else 10.0,
        "alt_scrape_seconds": 1.0 if quick else 5.0,
        "scrape_timeout": 3.0 if quick else 10.0,
        "min_polls": 300 if quick else 2000,
        "cycle_budget": 2.0 if quick else 10.0,
    }
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return asyncio.run(run_all(args))


if __name__ == "__main__":
    raise SystemExit(main())
