"""The real daemon as a subprocess (``python -m exporter``) against the simulator in this process.

Covers what only a process shows: the API's documented example end to end, a real Prometheus
scraping it, signals (SIGTERM with a poll in flight, SIGHUP reload), ``--once``,
``--config.check``, ``--web.config.file`` with TLS and basic auth, and that no secret ever
reaches the output or an HTTP page.
"""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import bcrypt
import pytest

from exporter.simulator import (
    DEMO_PASSWORD,
    DEMO_PROJECT_ID,
    DEMO_SECRET_KEY,
    SOURCE_PASSWORD,
    TARGET_PASSWORD,
    CannedResponse,
    Simulator,
    start,
)
from tests.e2e.conftest import Processes
from tests.support import (
    DOC_EXAMPLE_BODY,
    DOC_TASK,
    TASK_A,
    TASK_B,
    SimServer,
    baseline_sim_server,
    config_yaml,
)
from tests.test_poller import Scrape

pytestmark = pytest.mark.e2e

# The example body of the API reference page in its documented string form, and its error body.
DOC_EXAMPLE_STRINGS = {
    key: (value if isinstance(value, bool) else str(value))
    for key, value in DOC_EXAMPLE_BODY.items()
}
DOC_ERROR = {"error_code": "DCS.4133", "error_msg": "Instance job is not found."}
DOC_EXPECTED = {
    "dcs_migration_progress_ratio": 1.0,
    "dcs_migration_offset": 100.0,
    "dcs_migration_source_keys": 531221.0,
    "dcs_migration_target_keys": 531211.0,
    "dcs_migration_target_input_bytes_per_second": 51200.0,
    "dcs_migration_target_ops_per_second": 5300.0,
    "dcs_migration_migrating": 1.0,
}
FAST = "polling:\n  interval: 200ms\n  timeout: 2s\n  max_requests_per_second: 1000\n"
SHUTDOWN_NOISE = (
    "Unclosed client session",
    "Unclosed connector",
    "Task was destroyed",
    "Task exception was never retrieved",
    "Traceback",
)


async def eventually(check: Callable[[], Awaitable[Any]], timeout: float, what: str) -> Any:
    """Await ``check()`` until it returns something truthy, without blocking the event loop."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            result = await check()
        except (aiohttp.ClientError, OSError, AssertionError) as exc:
            last, result = exc, None
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}: {last!r}")
        await asyncio.sleep(0.1)


async def wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> int | None:
    """The exit code once the process has ended, or None after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return proc.poll()


@pytest.fixture
async def sim() -> AsyncIterator[SimServer]:
    """A simulator for the docs' project with TASK_A and TASK_B on the baseline body."""
    async with baseline_sim_server(DEMO_PROJECT_ID) as server:
        yield server


def aksk_yaml(url: str, tasks: tuple[str, ...] = (TASK_A, TASK_B), polling: str = FAST) -> str:
    """A config for the simulator's demo project with AK/SK auth."""
    return config_yaml(url, tasks, polling, project_id=DEMO_PROJECT_ID)


def password_yaml(url: str, password_file: Path, tasks: tuple[str, ...] = (TASK_A, TASK_B)) -> str:
    """A config for the simulator's demo project with an IAM password from a file."""
    return config_yaml(url, tasks, FAST, project_id=DEMO_PROJECT_ID, password_file=password_file)


class Exporter:
    """A daemon subprocess and an HTTP session to talk to it."""

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        port: int,
        session: aiohttp.ClientSession,
        scheme: str = "http",
    ) -> None:
        self.proc = proc
        self.base = f"{scheme}://127.0.0.1:{port}"
        self.session = session

    async def get(self, path: str, **kwargs: Any) -> tuple[int, str]:
        async with self.session.get(f"{self.base}{path}", **kwargs) as response:
            return response.status, await response.text()

    async def metrics(self) -> Scrape:
        status, text = await self.get("/metrics")
        assert status == 200, text
        return Scrape(text)

    async def until(
        self, check: Callable[[Scrape], bool], what: str, timeout: float = 10
    ) -> Scrape:
        async def scrape_and_check() -> Scrape | None:
            assert self.proc.poll() is None, "the daemon exited"
            metrics = await self.metrics()
            return metrics if check(metrics) else None

        return await eventually(scrape_and_check, timeout, what)  # type: ignore[no-any-return]


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """An HTTP session for talking to daemons."""
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def launch(
    processes: Processes,
    free_port: Callable[[], int],
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> Callable[..., Awaitable[Exporter]]:
    """Start ``python -m exporter`` on a free port with a config text; wait until it serves."""

    async def run(
        config_text: str,
        *extra: str,
        name: str = "daemon",
        scheme: str = "http",
        ssl_context: ssl.SSLContext | None = None,
        python_flags: tuple[str, ...] = (),
    ) -> Exporter:
        path = tmp_path / f"{name}.yaml"
        path.write_text(config_text)
        port = free_port()
        argv = [sys.executable, *python_flags, "-m", "exporter", "--config.file", str(path)]
        argv += ["--web.listen-address", f"127.0.0.1:{port}", *extra]
        proc = processes.start(name, argv, cwd=tmp_path)
        exporter = Exporter(proc, port, http, scheme)

        async def serving() -> bool:
            assert proc.poll() is None, processes.output(proc)
            status, _ = await exporter.get("/healthz", ssl=ssl_context if ssl_context else True)
            return status in (200, 503)

        await eventually(serving, 15, "the daemon to serve")
        return exporter

    return run


def doc_values(metrics: Scrape, task_id: str = DOC_TASK) -> dict[str, float]:
    return metrics.values(task_id)


# ---- the documented example ----------------------------------------------------------------------


async def test_documented_example_end_to_end(
    launch: Callable[..., Awaitable[Exporter]],
) -> None:
    """The docs' example body (numbers), its documented String form, then the docs' 400 DCS.4133
    error: the values, then the same values, then no values and up 0 with the error counted."""
    simulator = Simulator()
    simulator.add_task(DOC_TASK, "docs-example", body=DOC_EXAMPLE_BODY)
    runner, url = await start(simulator)
    try:
        daemon = await launch(aksk_yaml(url, (DOC_TASK,)))
        metrics = await daemon.until(lambda m: doc_values(m) == DOC_EXPECTED, "the example values")
        assert metrics.get("dcs_migration_up", task_id=DOC_TASK) == 1
        info = metrics.series("dcs_migration_task_info", task_id=DOC_TASK)
        assert [dict(labels)["task_name"] for _, labels in info] == ["docs-example"]

        simulator.set_body(DOC_TASK, DOC_EXAMPLE_STRINGS)
        polls = metrics.get("dcs_migration_polls_total", task_id=DOC_TASK) or 0
        metrics = await daemon.until(
            lambda m: (m.get("dcs_migration_polls_total", task_id=DOC_TASK) or 0) >= polls + 2,
            "two polls of the String form",
        )
        assert doc_values(metrics) == DOC_EXPECTED
        assert metrics.series("dcs_migration_parse_errors_total", task_id=DOC_TASK) == {}

        simulator.push(DOC_TASK, *[CannedResponse(status=400, body=DOC_ERROR)] * 100)
        metrics = await daemon.until(
            lambda m: m.get("dcs_migration_up", task_id=DOC_TASK) == 0, "up 0 after the error"
        )
        assert doc_values(metrics) == {}
        assert metrics.series("dcs_migration_task_info", task_id=DOC_TASK) == {}
        errors = metrics.get(
            "dcs_migration_api_errors_total", task_id=DOC_TASK, status="400", code="DCS.4133"
        )
        assert errors is not None and errors >= 1
        assert metrics.get("dcs_migration_poll_errors_total", task_id=DOC_TASK, reason="not_found")
        assert daemon.proc.poll() is None
    finally:
        await runner.cleanup()


# ---- Prometheus ------------------------------------------------------------------------------


async def test_prometheus_scrapes_the_daemon_and_promtool_accepts_it(
    sim: SimServer,
    launch: Callable[..., Awaitable[Exporter]],
    processes: Processes,
    free_port: Callable[[], int],
    tool: Callable[[str], str],
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """A real Prometheus scraping the daemon answers /api/v1/query with the exported values, and
    `promtool check metrics` finds nothing wrong with the exposition."""
    prometheus, promtool = tool("prometheus"), tool("promtool")
    daemon = await launch(aksk_yaml(sim.url))
    await daemon.until(lambda m: m.get("dcs_migration_up", task_id=TASK_A) == 1, "a first poll")

    _, text = await daemon.get("/metrics")
    check = subprocess.run(
        [promtool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=30
    )
    assert check.returncode == 0, (check.stdout + check.stderr).decode()

    config = tmp_path / "prometheus.yml"
    target = daemon.base.removeprefix("http://")
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"scrape_configs: [{{job_name: dcs, static_configs: [{{targets: ['{target}']}}]}}]\n"
    )
    port = free_port()
    processes.start(
        "prometheus",
        [
            prometheus,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
    )

    async def query(expr: str) -> dict[str, float]:
        url = f"http://127.0.0.1:{port}/api/v1/query"
        async with http.get(url, params={"query": expr}) as response:
            body = await response.json()
        return {
            item["metric"].get("task_id", ""): float(item["value"][1])
            for item in body["data"]["result"]
        }

    offsets = await eventually(
        lambda: query("dcs_migration_offset"), 30, "Prometheus to have the offset"
    )
    assert offsets == {TASK_A: 5000.0, TASK_B: 5000.0}
    assert await query("dcs_migration_target_input_bytes_per_second") == {
        TASK_A: 12800.0,
        TASK_B: 12800.0,
    }
    assert await query("dcs_migration_up") == {TASK_A: 1.0, TASK_B: 1.0}
    assert await query('up{job="dcs"}') == {"": 1.0}


# ---- signals ----------------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_sigterm_with_a_poll_in_flight_exits_cleanly(
    sim: SimServer,
    launch: Callable[..., Awaitable[Exporter]],
    processes: Processes,
    signum: signal.Signals,
) -> None:
    """SIGTERM (or SIGINT) while TASK_A's request hangs: exit 0 within 5 s, with no unclosed
    session, no destroyed pending task and no traceback in the output (run under python -X dev)."""
    sim.sim.push(TASK_A, *[CannedResponse(hang=True)] * 10)
    daemon = await launch(
        aksk_yaml(sim.url, polling="polling:\n  interval: 1s\n  timeout: 60s\n"),
        "--log.level",
        "debug",
        python_flags=("-X", "dev"),
    )

    async def hanging() -> bool:
        return sim.sim.in_flight(TASK_A) == 1

    await eventually(hanging, 10, "TASK_A's request to hang")
    started = time.monotonic()
    daemon.proc.send_signal(signum)
    code = await wait_exit(daemon.proc, 5)
    output = processes.output(daemon.proc)
    assert code == 0, output
    assert time.monotonic() - started < 5
    for noise in SHUTDOWN_NOISE:
        assert noise not in output, output
    assert "shutting down" in output


async def test_sighup_reloads_and_a_bad_config_keeps_the_old_one(
    sim: SimServer, launch: Callable[..., Awaitable[Exporter]], tmp_path: Path, processes: Processes
) -> None:
    """SIGHUP with a broken file: an ERROR is logged, reload_failures +1, last_reload_successful 0,
    and the old tasks keep polling; SIGHUP with a good file then adopts it."""
    daemon = await launch(aksk_yaml(sim.url, (TASK_A,)))
    metrics = await daemon.until(lambda m: m.get("dcs_migration_up", task_id=TASK_A) == 1, "up")
    path = tmp_path / "daemon.yaml"
    path.write_text("tasks:\n  - id: [\n")
    daemon.proc.send_signal(signal.SIGHUP)
    metrics = await daemon.until(
        lambda m: m.get("dcs_migration_config_reload_failures_total") == 1, "the failed reload"
    )
    assert metrics.get("dcs_migration_config_last_reload_successful") == 0
    polls = metrics.get("dcs_migration_polls_total", task_id=TASK_A) or 0
    await daemon.until(
        lambda m: (m.get("dcs_migration_polls_total", task_id=TASK_A) or 0) >= polls + 2,
        "the old config to keep polling",
    )
    assert "level=error" in processes.output(daemon.proc)
    assert "configuration reload failed" in processes.output(daemon.proc)

    path.write_text(aksk_yaml(sim.url, (TASK_B,)))
    daemon.proc.send_signal(signal.SIGHUP)
    metrics = await daemon.until(
        lambda m: m.get("dcs_migration_up", task_id=TASK_B) == 1, "the new task polled"
    )
    assert metrics.series(task_id=TASK_A) == {}
    assert metrics.get("dcs_migration_config_last_reload_successful") == 1
    assert daemon.proc.poll() is None


# ---- --once and --config.check -----------------------------------------------------------------


async def run_cli(*argv: str, cwd: Path) -> tuple[int, str, str]:
    """Run ``python -m exporter`` without blocking the loop the simulator runs on."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "exporter",
        *argv,
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_once_prints_the_exposition_and_fails_if_a_task_failed(
    sim: SimServer, tmp_path: Path
) -> None:
    """--once exits 0 with both tasks' values on stdout; with TASK_B answering 500 it exits 1 and
    still prints TASK_A's values and TASK_B's up 0; logs never mix into stdout."""
    path = tmp_path / "config.yaml"
    path.write_text(aksk_yaml(sim.url))
    code, out, err = await run_cli("--once", "--config.file", str(path), cwd=tmp_path)
    assert code == 0, err
    metrics = Scrape(out)
    assert metrics.get("dcs_migration_offset", task_id=TASK_A) == 5000
    assert metrics.get("dcs_migration_up", task_id=TASK_B) == 1

    sim.sim.push(TASK_B, CannedResponse(status=500, body={"error_code": "DCS.5000"}))
    code, out, err = await run_cli("--once", "--config.file", str(path), cwd=tmp_path)
    assert code == 1
    metrics = Scrape(out)  # parses: nothing but exposition on stdout
    assert metrics.get("dcs_migration_up", task_id=TASK_B) == 0
    assert metrics.get("dcs_migration_offset", task_id=TASK_A) == 5000
    assert "poll failed" in err


@pytest.mark.parametrize(
    ("text", "code", "expected"),
    [
        pytest.param(None, 0, "OK, 2 tasks", id="valid"),
        pytest.param('tasks:\n\t- id: "x"\n', 1, "tab", id="tab"),
        pytest.param("", 1, "empty", id="empty-file"),
        pytest.param("tasks: []\n", 1, "tasks", id="no-tasks"),
    ],
)
def test_config_check_exit_codes(
    tmp_path: Path, text: str | None, code: int, expected: str
) -> None:
    """--config.check exits 0 for a valid file and 1 with a located message for a broken one."""
    path = tmp_path / "config.yaml"
    path.write_text(aksk_yaml("http://127.0.0.1:9") if text is None else text)
    result = subprocess.run(
        [sys.executable, "-m", "exporter", "--config.check", "--config.file", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == code, result.stdout + result.stderr
    assert expected.lower() in (result.stdout + result.stderr).lower()
    assert "Traceback" not in result.stderr
    if code:
        assert str(path) in result.stderr or "config.yaml" in result.stderr


def test_config_check_missing_file_and_bad_flag(tmp_path: Path) -> None:
    """A missing file exits 1 naming it; an unknown flag is a usage error (exit 2)."""
    missing = tmp_path / "nope.yaml"
    result = subprocess.run(
        [sys.executable, "-m", "exporter", "--config.check", "--config.file", str(missing)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert "nope.yaml" in result.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "exporter", "--config.chek"], capture_output=True, timeout=30
    )
    assert bad.returncode == 2


# ---- TLS and basic auth ----------------------------------------------------------------------


def _openssl(cwd: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(directory: Path) -> None:
    """A throwaway CA and a server certificate for 127.0.0.1 (ca.crt, server.crt, server.key)."""
    _openssl(
        directory,
        *("req", "-x509", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"),
        *("-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-subj", "/CN=test-ca", "-days", "2"),
        *("-addext", "basicConstraints=critical,CA:TRUE"),
        *("-addext", "keyUsage=critical,keyCertSign,cRLSign"),
    )
    (directory / "server.ext").write_text(
        "basicConstraints=CA:FALSE\nsubjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"
    )
    _openssl(
        directory,
        *("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"),
        *("-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1"),
    )
    _openssl(
        directory,
        *("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key"),
        *("-CAcreateserial", "-days", "2", "-out", "server.crt", "-extfile", "server.ext"),
    )


async def test_web_config_tls_and_basic_auth(
    sim: SimServer,
    launch: Callable[..., Awaitable[Exporter]],
    tmp_path: Path,
    tool: Callable[[str], str],
    http: aiohttp.ClientSession,
) -> None:
    """With --web.config.file the daemon serves HTTPS only; /metrics needs the bcrypt user while
    /healthz stays open for probes."""
    tool("openssl")
    make_pki(tmp_path)
    hashed = bcrypt.hashpw(b"scrape-pass", bcrypt.gensalt(rounds=4)).decode()
    web_config = tmp_path / "web.yml"
    web_config.write_text(
        "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
        f"basic_auth_users:\n  prometheus: '{hashed}'\n"
    )
    context = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))
    daemon = await launch(
        aksk_yaml(sim.url),
        "--web.config.file",
        str(web_config),
        scheme="https",
        ssl_context=context,
    )
    good = "Basic " + base64.b64encode(b"prometheus:scrape-pass").decode()
    bad = "Basic " + base64.b64encode(b"prometheus:wrong").decode()
    assert (await daemon.get("/metrics", ssl=context))[0] == 401
    assert (await daemon.get("/metrics", ssl=context, headers={"Authorization": bad}))[0] == 401
    assert (await daemon.get("/healthz", ssl=context))[0] in (200, 503)

    async def scraped() -> Scrape | None:
        status, text = await daemon.get("/metrics", ssl=context, headers={"Authorization": good})
        assert status == 200
        metrics = Scrape(text)
        return metrics if metrics.get("dcs_migration_up", task_id=TASK_A) == 1 else None

    metrics = await eventually(scraped, 10, "an authenticated scrape with values")
    assert metrics.get("dcs_migration_offset", task_id=TASK_A) == 5000
    plain = daemon.base.replace("https://", "http://")
    with pytest.raises(aiohttp.ClientError):
        async with http.get(f"{plain}/metrics", headers={"Authorization": good}) as response:
            await response.read()


# ---- secrets ----------------------------------------------------------------------------------


async def test_no_secret_reaches_output_or_pages(
    sim: SimServer,
    launch: Callable[..., Awaitable[Exporter]],
    processes: Processes,
    tmp_path: Path,
) -> None:
    """Two daemons at debug level (AK/SK with logfmt, IAM password with JSON logs) and a --once
    run go through details with Redis passwords, token expiry and refresh, 401/403/500/502 and
    garbage answers, a reload and shutdown; neither the secret key, the password, any issued token
    nor the Redis passwords appear in anything they printed or served."""
    password_file = tmp_path / "password"
    password_file.write_text(DEMO_PASSWORD)
    faults = [
        CannedResponse(status=500, body={"error_code": "DCS.5000", "error_msg": "internal"}),
        CannedResponse(status=502, body="<html>bad gateway</html>", content_type="text/html"),
        CannedResponse(
            status=403,
            body={"error": {"code": 403, "message": "X-Auth-Token is invalid in the request"}},
        ),
        CannedResponse(status=200, body={"offset": {"nested": 1}}),
    ]
    printed: list[str] = []
    pages: list[str] = []
    daemons = {
        "aksk": (aksk_yaml(sim.url), ()),
        "iam": (password_yaml(sim.url, password_file), ("--log.format", "json")),
    }
    for name, (config_text, flags) in daemons.items():
        daemon = await launch(config_text, "--log.level", "debug", *flags, name=name)
        await daemon.until(lambda m: m.get("dcs_migration_up", task_id=TASK_B) == 1, "up")
        sim.sim.push(TASK_A, *faults)
        sim.sim.expire_tokens()
        daemon.proc.send_signal(signal.SIGHUP)
        metrics = await daemon.until(
            lambda m: (
                sum(m.series("dcs_migration_poll_errors_total", task_id=TASK_A).values())
                >= len(faults)
                and m.get("dcs_migration_up", task_id=TASK_A) == 1
            ),
            "every fault seen, then a good poll",
        )
        if name == "iam":
            assert (metrics.get("dcs_migration_token_refreshes_total") or 0) >= 2
        for path in ("/metrics", "/", "/healthz", "/ready"):
            pages.append((await daemon.get(path))[1])
        daemon.proc.send_signal(signal.SIGTERM)
        assert await wait_exit(daemon.proc, 5) == 0
        printed.append(processes.output(daemon.proc))
    config = tmp_path / "once.yaml"
    config.write_text(password_yaml(sim.url, password_file))
    sim.sim.expire_tokens()
    _, out, err = await run_cli(
        "--once", "--config.file", str(config), "--log.level", "debug", cwd=tmp_path
    )
    printed += [out, err]

    tokens = list(sim.sim._tokens)
    assert len(tokens) >= 3, "the IAM daemon and --once should have fetched tokens"
    secrets = {
        "secret key": DEMO_SECRET_KEY,
        "IAM password": DEMO_PASSWORD,
        "source Redis password": SOURCE_PASSWORD,
        "target Redis password": TARGET_PASSWORD,
        **{f"token {n}": token for n, token in enumerate(tokens)},
    }
    everything = "\n".join(printed + pages)
    assert "level=debug" in everything and '"level": "debug"' in everything  # really debug
    assert "obtained an IAM token" in everything and "bad gateway" in everything
    for what, secret in secrets.items():
        assert secret not in everything, f"{what} leaked"
        assert json.dumps(secret)[1:-1] not in everything, f"{what} leaked (escaped)"
