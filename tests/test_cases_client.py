"""CASES.md on the client side: the real DcsClient (and parse_stats) over HTTP against the simulator."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import re
import ssl
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
from aiohttp import web

from exporter.client import ApiError, DcsClient, ErrorKind
from exporter.config import AkSkAuth, Secret
from exporter.simulator import (
    DEMO_ACCESS_KEY,
    DEMO_PASSWORD,
    CannedResponse,
    RequestRecord,
    Simulator,
)
from exporter.stats import StatsRecord, UnexpectedShape, parse_stats
from exporter.throttle import Throttle
from tests.support import (
    BASELINE_BODY,
    BASELINE_NUMBERS_BODY,
    BASELINE_SAMPLES,
    PROJ,
    TASK_A,
    TASK_B,
    TASK_C,
    SimServer,
    config_yaml,
    make_client,
    make_config,
    make_test_ca,
    make_test_leaf,
    serving,
)
from tests.test_client import FakeClock, client_for, password_config, recorders


def samples(record: StatsRecord) -> dict[str, float | None]:
    """The seven exported values by API field, in the units of the metrics."""
    return {
        "full_migration_progress": record.progress_ratio,
        "offset": record.offset,
        "source_dbsize": record.source_keys,
        "target_dbsize": record.target_keys,
        "target_input_kbps": record.target_input_bytes_per_second,
        "target_ops": record.target_ops_per_second,
        "is_migrating": record.migrating,
    }


def problems(record: StatsRecord) -> dict[str, str]:
    """Field -> reason of the parse problems that feed parse_errors_total{field}."""
    return {problem.field: problem.reason for problem in record.problems}


async def poll(client: DcsClient, task_id: str = TASK_A) -> StatsRecord:
    """What one poll yields: the client's body through parse_stats."""
    return parse_stats(await client.get_stats(task_id))


async def poll_error(client: DcsClient, task_id: str = TASK_A) -> ApiError:
    """A poll that must fail with an ApiError."""
    with pytest.raises(ApiError) as caught:
        await client.get_stats(task_id)
    return caught.value


@pytest.fixture
def client(sim_server: SimServer, http_session: aiohttp.ClientSession) -> DcsClient:
    """An AK/SK client for the sim_server simulator."""
    return make_client(http_session, make_config(sim_server.url))


# ---- C01 ------------------------------------------------------------------------------------


async def test_c01_numbers_as_strings_and_bare_numbers(
    sim_server: SimServer, client: DcsClient
) -> None:
    """C01: the documented strings (poll 1) and bare JSON numbers (poll 2) give the same samples."""
    first = await poll(client)
    sim_server.sim.set_body(TASK_A, dict(BASELINE_NUMBERS_BODY))
    second = await poll(client)
    assert samples(first) == samples(second) == BASELINE_SAMPLES
    assert first.problems == second.problems == ()


# ---- C02 ------------------------------------------------------------------------------------


async def test_c02_formatted_numeric_strings(sim_server: SimServer, client: DcsClient) -> None:
    """C02: "100%" is read as 1.0; "1,234,567", "1,5" and "300 ops" are refused (no sample, a
    problem naming field and raw value), never read as 1.234567 or 1.5."""
    sim_server.sim.set_body(
        TASK_A,
        {
            "full_migration_progress": "100%",
            "offset": "5000",
            "source_dbsize": "1,234,567",
            "target_dbsize": "450",
            "target_input_kbps": "1,5",
            "target_ops": "300 ops",
            "is_migrating": True,
        },
    )
    record = await poll(client)
    assert samples(record) == {
        "full_migration_progress": 1.0,
        "offset": 5000.0,
        "source_dbsize": None,
        "target_dbsize": 450.0,
        "target_input_kbps": None,
        "target_ops": None,
        "is_migrating": 1.0,
    }
    assert problems(record) == {
        "source_dbsize": "invalid",
        "target_input_kbps": "invalid",
        "target_ops": "invalid",
    }
    described = sorted(p.describe() for p in record.problems)
    assert described == [
        "field source_dbsize has unreadable value '1,234,567'",
        "field target_input_kbps has unreadable value '1,5'",
        "field target_ops has unreadable value '300 ops'",
    ]


@pytest.mark.parametrize(
    ("progress", "ratio"),
    [(" 99.5 % ", 0.995), ("0%", 0.0), ("101", None), ("-1", None), ("100.1%", None)],
)
async def test_c02_progress_percent_and_range(
    sim_server: SimServer, client: DcsClient, progress: str, ratio: float | None
) -> None:
    """C02: a trailing % with spaces is stripped; progress outside 0-100 is refused as a problem."""
    sim_server.sim.set_body(TASK_A, {**BASELINE_BODY, "full_migration_progress": progress})
    record = await poll(client)
    assert record.progress_ratio == ratio
    assert problems(record) == ({} if ratio is not None else {"full_migration_progress": "invalid"})


# ---- C04 ------------------------------------------------------------------------------------


async def test_c04_nulls_and_containers(sim_server: SimServer, client: DcsClient) -> None:
    """C04: null, [] and {"v":1} are validated away before any sample: target_keys 450 and
    progress 0.45 remain, the four bad fields are absent, and exactly four problems are counted."""
    sim_server.sim.set_body(
        TASK_A,
        {
            "full_migration_progress": "45",
            "offset": None,
            "source_dbsize": None,
            "target_dbsize": "450",
            "target_input_kbps": [],
            "target_ops": {"v": 1},
            "is_migrating": True,
        },
    )
    record = await poll(client)
    assert samples(record) == {
        "full_migration_progress": 0.45,
        "offset": None,
        "source_dbsize": None,
        "target_dbsize": 450.0,
        "target_input_kbps": None,
        "target_ops": None,
        "is_migrating": 1.0,
    }
    assert problems(record) == dict.fromkeys(
        ("offset", "source_dbsize", "target_input_kbps", "target_ops"), "invalid"
    )
    assert all(isinstance(value, float) for value in samples(record).values() if value is not None)


# ---- C05 ------------------------------------------------------------------------------------


async def test_c05_boolean_encodings(sim_server: SimServer, client: DcsClient) -> None:
    """C05: is_migrating true,false,"true","false","False",1,0,"1","0" gives 1,0,1,0,0,1,0,1,0;
    null, "yes" and "paused" give no sample and one is_migrating problem each."""
    encodings: list[Any] = [
        True,
        False,
        "true",
        "false",
        "False",
        1,
        0,
        "1",
        "0",
        None,
        "yes",
        "paused",
    ]
    sim_server.sim.push(
        TASK_A, *(CannedResponse(body={**BASELINE_BODY, "is_migrating": v}) for v in encodings)
    )
    records = [await poll(client) for _ in encodings]
    assert [r.migrating for r in records] == [1, 0, 1, 0, 0, 1, 0, 1, 0, None, None, None]
    assert [problems(r) for r in records[9:]] == [{"is_migrating": "invalid"}] * 3
    assert all(r.problems == () for r in records[:9])


# ---- C07 ------------------------------------------------------------------------------------


async def test_c07a_missing_fields(sim_server: SimServer, client: DcsClient) -> None:
    """C07 (a): progress 100 and is_migrating 0 are exported; the five others are absent and
    counted as missing, without a traceback."""
    sim_server.sim.set_body(TASK_A, {"full_migration_progress": "100", "is_migrating": False})
    record = await poll(client)
    assert (record.progress_ratio, record.migrating) == (1.0, 0.0)
    assert problems(record) == dict.fromkeys(
        ("offset", "source_dbsize", "target_dbsize", "target_input_kbps", "target_ops"), "missing"
    )


async def test_c07b_extra_fields_ignored(sim_server: SimServer, client: DcsClient) -> None:
    """C07 (b): new keys and a null error_ext_msg change nothing: the baseline samples, no problems."""
    sim_server.sim.set_body(TASK_A, {**BASELINE_BODY, "new_field": {"x": 1}, "error_ext_msg": None})
    record = await poll(client)
    assert samples(record) == BASELINE_SAMPLES
    assert record.problems == ()


@pytest.mark.parametrize(
    "body", [{}, [], "ok", "null"], ids=["c-object", "d-array", "e-string", "f-null"]
)
async def test_c07c_to_f_not_a_stats_object(
    sim_server: SimServer, client: DcsClient, body: object
) -> None:
    """C07 (c)-(f): {}, [], "ok" and null are UnexpectedShape (the unexpected_shape reason),
    never an AttributeError; the next poll is fine again."""
    raw = '"ok"' if body == "ok" else body
    sim_server.sim.push(TASK_A, CannedResponse(body=raw))
    decoded = await client.get_stats(TASK_A)
    with pytest.raises(UnexpectedShape):
        parse_stats(decoded)
    assert samples(await poll(client)) == BASELINE_SAMPLES


# ---- C08 ------------------------------------------------------------------------------------

NGINX_502 = (
    "<html><head><title>502 Bad Gateway</title></head><body><center>nginx</center></body></html>"
)


async def test_c08_html_error_page(sim_server: SimServer, client: DcsClient) -> None:
    """C08: a 502 HTML page is reported with status 502, its content type and the start of the
    body (not "Expecting value"), code none; the next poll succeeds."""
    sim_server.sim.push(TASK_A, CannedResponse(502, NGINX_502, content_type="text/html"))
    error = await poll_error(client)
    assert (error.kind, error.status, error.code, error.status_label) == (
        ErrorKind.SERVER_ERROR,
        502,
        None,
        "502",
    )
    text = str(error)
    assert "HTTP 502" in text
    assert "content-type text/html" in text
    assert "<title>502 Bad Gateway</title>" in text and "nginx" in text
    assert "Expecting value" not in text
    assert samples(await poll(client)) == BASELINE_SAMPLES


# ---- C10 ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("canned", "kind"),
    [
        (CannedResponse(200, None), ErrorKind.EMPTY_BODY),
        (CannedResponse(204, None), ErrorKind.EMPTY_BODY),
        (
            CannedResponse(200, '{"full_migration_progress":"45","offset":"50'),
            ErrorKind.INVALID_JSON,
        ),
    ],
    ids=["a-empty-200", "b-204", "c-truncated"],
)
async def test_c10_empty_and_truncated(
    sim_server: SimServer, client: DcsClient, canned: CannedResponse, kind: ErrorKind
) -> None:
    """C10 (a)-(c): an empty 200, a 204 and a truncated body are empty_body / invalid_json
    errors, so no partial values get in; the next poll is fine."""
    sim_server.sim.push(TASK_A, canned)
    error = await poll_error(client)
    assert error.kind is kind
    assert error.status == canned.status
    assert samples(await poll(client)) == BASELINE_SAMPLES


async def test_c10d_nan(sim_server: SimServer, client: DcsClient) -> None:
    """C10 (d): offset NaN (which json.loads accepts) is an invalid field, not a NaN sample."""
    sim_server.sim.push(
        TASK_A, CannedResponse(body=b'{"offset":NaN,"full_migration_progress":"45"}')
    )
    record = await poll(client)
    assert record.offset is None
    assert record.progress_ratio == 0.45
    assert problems(record)["offset"] == "invalid"


# ---- C12 ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "canned",
    [CannedResponse(hang=True), CannedResponse(partial=b'{"full_migration_progress":"4')],
    ids=["a-hang", "b-partial-body"],
)
async def test_c12_server_never_answers(
    sim_server: SimServer, http_session: aiohttp.ClientSession, canned: CannedResponse
) -> None:
    """C12: a request that is never answered, or whose body stalls, ends as a timeout after the
    configured timeout (±1 s), TASK_B is answered meanwhile, and TASK_A never has more than one
    request open. The timeout is 1 s instead of the case's 10 s so the test is quick; what is
    checked is that the whole exchange, body included, is bounded by it on a real socket."""
    client = make_client(http_session, make_config(sim_server.url, timeout=1.0))
    sim_server.sim.push(TASK_A, canned)
    started = time.monotonic()
    hung = asyncio.create_task(client.get_stats(TASK_A))
    other_started = time.monotonic()
    assert await client.get_stats(TASK_B) == BASELINE_BODY
    assert time.monotonic() - other_started < 0.5
    with pytest.raises(ApiError) as caught:
        await hung
    elapsed = time.monotonic() - started
    assert 0.9 <= elapsed <= 2.0
    assert (caught.value.kind, caught.value.status_label) == (ErrorKind.TIMEOUT, "timeout")
    assert "no complete answer within 1s" in str(caught.value)
    assert sim_server.sim.max_in_flight(TASK_A) == 1
    for _ in range(100):  # the simulator notices the closed connection within ~50 ms
        if sim_server.sim.in_flight(TASK_A) == 0:
            break
        await asyncio.sleep(0.02)
    assert sim_server.sim.in_flight(TASK_A) == 0
    assert samples(await poll(client)) == BASELINE_SAMPLES


# ---- C15 ------------------------------------------------------------------------------------


class ForwardProxy:
    """A minimal HTTP forward proxy on loopback that logs each request line it relays.

    Absolute-form requests (``GET http://host/path``) are relayed; ``CONNECT host:port`` opens a
    tunnel, to ``hosts[host]`` when the name is mapped (names like ``dcs.test`` resolve only
    here, as a cloud endpoint resolves only behind a corporate proxy). With ``ssl_context`` the
    proxy itself speaks TLS (an ``https://`` proxy).
    """

    def __init__(
        self, hosts: dict[str, str] | None = None, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        self.request_lines: list[str] = []
        self.server: asyncio.Server | None = None
        self.url = ""
        self._hosts = hosts or {}
        self._ssl = ssl_context

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self._ssl)
        port = self.server.sockets[0].getsockname()[1]
        self.url = f"{'https' if self._ssl else 'http'}://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line = (await reader.readline()).decode("latin-1").strip()
            if not request_line:
                return
            self.request_lines.append(request_line)
            method, target, _ = request_line.split(" ", 2)
            headers: list[str] = []
            length = 0
            while (line := (await reader.readline()).decode("latin-1")) not in ("\r\n", "\n", ""):
                name, _, value = line.partition(":")
                if name.lower() in ("proxy-connection", "connection"):
                    continue
                if name.lower() == "content-length":
                    length = int(value)
                headers.append(line.rstrip("\r\n"))
            if method == "CONNECT":
                await self._tunnel(target, reader, writer)
                return
            body = await reader.readexactly(length) if length else b""
            parts = urlsplit(target)
            up_reader, up_writer = await asyncio.open_connection(parts.hostname, parts.port or 80)
            path = parts.path + (f"?{parts.query}" if parts.query else "")
            head = "\r\n".join([f"{method} {path} HTTP/1.1", *headers, "Connection: close", "", ""])
            up_writer.write(head.encode("latin-1") + body)
            await up_writer.drain()
            writer.write(await up_reader.read())
            await writer.drain()
            up_writer.close()
        finally:
            writer.close()

    async def _tunnel(
        self, target: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        host, _, port = target.rpartition(":")
        up_reader, up_writer = await asyncio.open_connection(self._hosts.get(host, host), int(port))
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await writer.drain()

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            except (ConnectionError, ssl.SSLError):
                pass
            finally:
                sink.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


@pytest.fixture
async def forward_proxy() -> AsyncIterator[ForwardProxy]:
    proxy = ForwardProxy()
    await proxy.start()
    yield proxy
    await proxy.stop()


async def test_c15_proxy_from_environment(
    sim_server: SimServer, forward_proxy: ForwardProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """C15: with HTTP_PROXY set, DCS calls go through the proxy, and IAM (named in NO_PROXY)
    goes direct. The simulator speaks plain http, so HTTP_PROXY stands in for HTTPS_PROXY; DCS
    is reached as 127.0.0.1 and IAM as localhost, so NO_PROXY can tell them apart. The session
    is configured like the daemon's (trust_env=True)."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    monkeypatch.setenv("HTTP_PROXY", forward_proxy.url)
    monkeypatch.setenv("NO_PROXY", "localhost")
    port = urlsplit(sim_server.url).port
    config = password_config(make_config(sim_server.url))
    cloud = replace(
        config.cloud,
        dcs_endpoint=f"http://127.0.0.1:{port}",
        iam_endpoint=f"http://localhost:{port}/v3",
    )
    config = replace(config, cloud=cloud)
    async with aiohttp.ClientSession(trust_env=True) as session:
        client = make_client(session, config)
        assert await client.get_stats(TASK_A) == BASELINE_BODY
        assert await client.get_stats(TASK_B) == BASELINE_BODY
    assert forward_proxy.request_lines == [
        f"GET http://127.0.0.1:{port}/v2/{PROJ}/migration-task/{TASK_A}/stats HTTP/1.1",
        f"GET http://127.0.0.1:{port}/v2/{PROJ}/migration-task/{TASK_B}/stats HTTP/1.1",
    ]
    assert sim_server.sim.token_requests == 1
    assert sim_server.sim.requests[0].path == "/v3/auth/tokens"


@dataclass(frozen=True)
class ProxyPki:
    """A throwaway CA and one certificate for the API's names and the proxy's address."""

    ca: Path
    context: ssl.SSLContext  # server side, for the simulator and the TLS proxy


@pytest.fixture(scope="module")
def proxy_pki(tmp_path_factory: pytest.TempPathFactory) -> ProxyPki:
    directory = tmp_path_factory.mktemp("proxy-pki")
    make_test_ca(directory, "ca")
    names = "subjectAltName=DNS:dcs.test,DNS:localhost,IP:127.0.0.1"
    make_test_leaf(directory, "ca", "server", f"{names}\nextendedKeyUsage=serverAuth")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(directory / "server.crt", directory / "server.key")
    return ProxyPki(directory / "ca.crt", context)


async def run_once_through_proxy(
    proxy_pki: ProxyPki, tmp_path: Path, proxy: ForwardProxy, no_proxy: str
) -> tuple[int, str, str, int, int]:
    """Run ``--once`` (a subprocess, as a user would) against a TLS simulator whose DCS name,
    dcs.test, only the proxy resolves; IAM is ``localhost``. HTTPS_PROXY is the proxy and
    NO_PROXY is ``no_proxy``. Returns exit code, stdout, stderr, the port, and the simulator's
    token requests."""
    sim = Simulator(project_id=PROJ)
    for task_id in (TASK_A, TASK_B):
        sim.add_task(task_id, task_id[-1], body=dict(BASELINE_BODY))
    password = tmp_path / "password"
    password.write_text(DEMO_PASSWORD)
    await proxy.start()
    try:
        async with serving(sim, ssl_context=proxy_pki.context) as url:
            port = urlsplit(url).port
            assert port is not None
            config = config_yaml(f"https://dcs.test:{port}", password_file=password)
            config = config.replace(
                f"iam_endpoint: https://dcs.test:{port}/v3",
                f"iam_endpoint: https://localhost:{port}/v3",
            )
            (tmp_path / "config.yaml").write_text(config)
            env = {
                name: value
                for name, value in os.environ.items()
                if name.lower() not in ("http_proxy", "https_proxy", "no_proxy", "all_proxy")
            }
            env.update(HTTPS_PROXY=proxy.url, NO_PROXY=no_proxy, SSL_CERT_FILE=str(proxy_pki.ca))
            daemon = await asyncio.create_subprocess_exec(
                *(sys.executable, "-m", "exporter", "--once"),
                *("--config.file", str(tmp_path / "config.yaml")),
                env=env,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            stdout, stderr = await asyncio.wait_for(daemon.communicate(), timeout=60)
    finally:
        await proxy.stop()
    assert daemon.returncode is not None
    return daemon.returncode, stdout.decode(), stderr.decode(), port, sim.token_requests


@pytest.mark.parametrize("no_proxy", ["localhost", ""], ids=["iam-in-no-proxy", "all-proxied"])
async def test_c15_daemon_tunnels_https_through_the_environment_proxy(
    proxy_pki: ProxyPki, tmp_path: Path, no_proxy: str
) -> None:
    """C15 as a user runs it: with HTTPS_PROXY set, the exporter reaches an https DCS endpoint
    that only the proxy can resolve through ``CONNECT dcs.test:PORT`` and polls every task; IAM,
    when NO_PROXY names it, goes direct. The log says which way each endpoint goes."""
    proxy = ForwardProxy(hosts={"dcs.test": "127.0.0.1"})
    code, stdout, stderr, port, token_requests = await run_once_through_proxy(
        proxy_pki, tmp_path, proxy, no_proxy
    )
    assert code == 0, stderr
    for task_id in (TASK_A, TASK_B):
        assert f'dcs_migration_up{{task_id="{task_id}"}} 1.0' in stdout
    dcs_tunnel = f"CONNECT dcs.test:{port} HTTP/1.1"
    iam_tunnel = f"CONNECT localhost:{port} HTTP/1.1"
    assert set(proxy.request_lines) == ({dcs_tunnel} if no_proxy else {dcs_tunnel, iam_tunnel})
    assert token_requests == 1
    assert f"https://dcs.test:{port}: through the proxy {proxy.url} (HTTPS_PROXY)" in stderr
    if no_proxy:
        assert f"https://localhost:{port}: direct (NO_PROXY)" in stderr


async def test_c15_https_proxy_is_named_in_a_warning_not_skipped_silently(
    proxy_pki: ProxyPki, tmp_path: Path
) -> None:
    """C15 variant, HTTPS_PROXY=https://...: the HTTP client cannot speak TLS to a proxy, so
    the exporter warns, per endpoint, that requests go direct and how to fix the variable; here
    direct egress cannot resolve dcs.test, so the polls fail and --once exits 1."""
    proxy = ForwardProxy(hosts={"dcs.test": "127.0.0.1"}, ssl_context=proxy_pki.context)
    code, stdout, stderr, port, _ = await run_once_through_proxy(
        proxy_pki, tmp_path, proxy, "localhost"
    )
    assert code == 1
    proxy_port = urlsplit(proxy.url).port
    warning = next(line for line in stderr.splitlines() if "level=warn" in line and "PROXY" in line)
    assert f"https://dcs.test:{port}: HTTPS_PROXY is https://127.0.0.1:{proxy_port}" in warning
    assert "go DIRECT" in warning
    assert f"HTTPS_PROXY=http://127.0.0.1:{proxy_port}" in warning
    assert proxy.request_lines == []
    assert 'dcs_migration_up{task_id="' + TASK_A + '"} 0.0' in stdout


# ---- C16 ------------------------------------------------------------------------------------


def three_task_sim(clock: FakeClock, token_ttl: float) -> Simulator:
    sim = Simulator(project_id=PROJ, clock=clock.time, token_ttl=token_ttl)
    for task_id in (TASK_A, TASK_B, TASK_C):
        sim.add_task(task_id, task_id[-1], body=dict(BASELINE_BODY))
    return sim


async def poll_three(client: DcsClient) -> list[Any]:
    return await asyncio.gather(*(client.get_stats(t) for t in (TASK_A, TASK_B, TASK_C)))


async def test_c16_token_refreshed_ahead_of_expiry(http_session: aiohttp.ClientSession) -> None:
    """C16: a 120 s token is refreshed once, ahead of expires_at (10 % margin), although three
    tasks ask for it at the same moment, and once more after it has long expired; no call
    fails."""
    clock = FakeClock()
    sim = three_task_sim(clock, token_ttl=120)
    async with serving(sim) as url:
        client = client_for(http_session, password_config(make_config(url)), clock)
        assert await poll_three(client) == [BASELINE_BODY] * 3
        clock.advance(100)  # 20 s left, more than the 12 s margin
        assert await poll_three(client) == [BASELINE_BODY] * 3
        assert sim.token_requests == 1
        clock.advance(10)  # 10 s left: refresh now, once for all three
        assert await poll_three(client) == [BASELINE_BODY] * 3
        assert sim.token_requests == 2
        clock.advance(300)  # long past expiry (the process was suspended, say): once again
        assert await poll_three(client) == [BASELINE_BODY] * 3
        assert sim.token_requests == 3
        assert {r.status for r in sim.requests} == {200, 201}


async def test_c16_token_expired_early_three_tasks_hit_401(
    http_session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    """C16: when the API answers 401 "token expired" to three tasks at once, IAM sees exactly one
    extra token request, each task retries once and recovers, and no token value appears in the
    log. The three 401s are held back 0.2 s (real time) so that all three requests are out with
    the old token before the first rejection comes back, as when polls coincide in production."""
    caplog.set_level(logging.DEBUG)
    clock = FakeClock()
    sim = three_task_sim(clock, token_ttl=86400)
    expired = {
        "error_code": "APIGW.0301",
        "error_msg": "Incorrect IAM authentication information: token expired (illustrative)",
    }
    async with serving(sim) as url:
        client = client_for(http_session, password_config(make_config(url)), clock)
        assert await poll_three(client) == [BASELINE_BODY] * 3
        assert client.tokens is not None
        first = (await client.tokens.get()).value
        for task_id in (TASK_A, TASK_B, TASK_C):
            sim.push(task_id, CannedResponse(401, expired, delay=0.2))
        assert await poll_three(client) == [BASELINE_BODY] * 3
        second = (await client.tokens.get()).value
        assert sim.token_requests == 2
        stats = [r.status for r in sim.requests if r.task_id]
        assert stats[3:6] == [401, 401, 401]
        assert stats[6:] == [200, 200, 200]
        assert await poll_three(client) == [BASELINE_BODY] * 3
        assert sim.token_requests == 2
    assert first != second
    assert first not in caplog.text and second not in caplog.text


async def test_c16_simulator_expiry_recovers_within_one_poll(
    http_session: aiohttp.ClientSession,
) -> None:
    """C16: when the simulator itself invalidates every token, the next poll of each task still
    succeeds (refresh on the 401, one retry), with at most one token request per rejected token."""
    clock = FakeClock()
    sim = three_task_sim(clock, token_ttl=86400)
    async with serving(sim) as url:
        client = client_for(http_session, password_config(make_config(url)), clock)
        assert await poll_three(client) == [BASELINE_BODY] * 3
        sim.expire_tokens()
        assert await poll_three(client) == [BASELINE_BODY] * 3
        assert sim.token_requests == 2


# ---- C17 ------------------------------------------------------------------------------------


async def test_c17a_403_token_invalid_other_body_shape(http_session: aiohttp.ClientSession) -> None:
    """C17 (a): a 403 with the Keystone-style body "X-Auth-Token is invalid" is understood as a
    token rejection: one refresh, one retry, success."""
    clock = FakeClock()
    sim = three_task_sim(clock, token_ttl=86400)
    body = {
        "error": {
            "code": 403,
            "message": "X-Auth-Token is invalid in the request",
            "title": "Forbidden",
        }
    }
    sim.push(TASK_A, CannedResponse(403, body))
    async with serving(sim) as url:
        client = client_for(http_session, password_config(make_config(url)), clock)
        assert await client.get_stats(TASK_A) == BASELINE_BODY
    assert sim.token_requests == 2
    assert [r.status for r in sim.requests if r.task_id] == [403, 200]


def token_requests_per_window(requests: list[RequestRecord], window: float) -> int:
    """The most token requests in any window of ``window`` seconds (by simulator clock)."""
    times = sorted(r.time for r in requests if r.path == "/v3/auth/tokens")
    return max((sum(1 for t in times if start <= t < start + window) for start in times), default=0)


async def test_c17b_permanent_403_permission(http_session: aiohttp.ClientSession) -> None:
    """C17 (b): a 403 DCS.4030 on every call is a PERMISSION error ("permission denied"), polled
    every 30 s for 10 min; IAM is never asked for more than the first token."""
    clock = FakeClock()
    sim = three_task_sim(clock, token_ttl=86400)
    sim.push(
        TASK_A,
        *[CannedResponse(403, {"error_code": "DCS.4030", "error_msg": "no permission"})] * 20,
    )
    async with serving(sim) as url:
        client = client_for(http_session, password_config(make_config(url)), clock)
        for _ in range(20):
            error = await poll_error(client)
            assert (error.kind, error.status, error.code) == (ErrorKind.PERMISSION, 403, "DCS.4030")
            assert "permission denied" in str(error)
            clock.advance(30)
    assert sim.token_requests == 1
    assert len([r for r in sim.requests if r.task_id]) == 20


async def test_c17b_token_refused_even_after_refresh(http_session: aiohttp.ClientSession) -> None:
    """C17 (b), token variant: a 403 "token is invalid" that persists after a refresh makes the
    client refresh at most once per 5 minutes (not once per poll) while polling every 30 s."""
    clock = FakeClock()
    sim = three_task_sim(clock, token_ttl=86400)
    refused = {"error": {"code": 403, "message": "X-Auth-Token is invalid in the request"}}
    sim.push(TASK_A, *[CannedResponse(403, refused)] * 60)
    async with serving(sim) as url:
        client = client_for(http_session, password_config(make_config(url)), clock)
        for _ in range(20):  # 10 minutes
            error = await poll_error(client)
            assert (error.kind, error.status) == (ErrorKind.AUTH, 403)
            clock.advance(30)
    assert sim.token_requests <= 1 + 2  # the first token, then at most one per 5 min
    assert token_requests_per_window(sim.requests[1:], 300) <= 1


# ---- C19 ------------------------------------------------------------------------------------

SKEW_LOG = re.compile(r"differs from the API server's Date header by (\d+) s")


async def test_c19_clock_skew_detected_and_corrected(
    http_session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    """C19: with the gateway's clock 20 min ahead, the client logs one ERROR naming ~1200 s,
    reports clock_skew ≈ 1200, signs with the server's time, and the retry and all later polls
    succeed with one request each: no retry loop."""
    sim = Simulator(project_id=PROJ, clock_offset=1200)
    sim.add_task(TASK_A, "a", body=dict(BASELINE_BODY))
    async with serving(sim) as url:
        client = make_client(http_session, make_config(url))
        with caplog.at_level(logging.ERROR, logger="exporter.client"):
            assert await client.get_stats(TASK_A) == BASELINE_BODY
            for _ in range(5):
                assert await client.get_stats(TASK_A) == BASELINE_BODY
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    match = SKEW_LOG.search(errors[0].getMessage())
    assert match and 1198 <= int(match[1]) <= 1201
    assert client.clock_skew is not None and abs(client.clock_skew - 1200) < 2
    assert [r.status for r in sim.requests] == [401, 200, 200, 200, 200, 200, 200]


async def test_c19_uncorrectable_skew_no_tight_loop(
    http_session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    """C19: when correcting the clock does not help (here the key is also wrong), the first poll
    makes two requests and every later poll one; the ERROR about the clock is logged once."""
    sim = Simulator(project_id=PROJ, clock_offset=1200)
    sim.add_task(TASK_A, "a", body=dict(BASELINE_BODY))
    async with serving(sim) as url:
        config = make_config(url)
        config = replace(config, auth=AkSkAuth(DEMO_ACCESS_KEY, Secret(value="not-the-secret-key")))
        client = make_client(http_session, config)
        with caplog.at_level(logging.ERROR, logger="exporter.client"):
            for _ in range(4):
                error = await poll_error(client)
                assert (error.kind, error.status, error.code) == (ErrorKind.AUTH, 401, "APIGW.0301")
    assert [r.status for r in sim.requests] == [401] * (2 + 3)
    assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 1
    assert client.clock_skew is not None and abs(client.clock_skew - 1200) < 2


async def test_c19_requests_in_flight_together_all_recover(
    http_session: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """C19: five polls signed with the skewed clock and refused together each retry once with the
    corrected time and succeed (not only the one that noticed the skew); one ERROR in all. The
    gateway here holds its refusals until all five requests have arrived."""
    arrived = 0
    all_in = asyncio.Event()

    async def gateway(request: web.Request) -> web.Response:
        nonlocal arrived
        server_now = datetime.now(UTC) + timedelta(seconds=1200)
        signed = datetime.strptime(request.headers["X-Sdk-Date"], "%Y%m%dT%H%M%SZ")
        date = {"Date": format_datetime(server_now, usegmt=True)}
        if abs((server_now - signed.replace(tzinfo=UTC)).total_seconds()) > 900:
            arrived += 1
            if arrived == 5:
                all_in.set()
            await asyncio.wait_for(all_in.wait(), 5)
            expired = {"error_code": "APIGW.0301", "error_msg": "signature expired"}
            return web.json_response(expired, status=401, headers=date)
        return web.json_response(BASELINE_BODY, headers=date)

    async with recorders() as serve:
        server = await serve(gateway)
        client = make_client(http_session, make_config(server.url))
        with caplog.at_level(logging.ERROR, logger="exporter.client"):
            results = await asyncio.gather(*(client.get_stats(TASK_A) for _ in range(5)))
    assert results == [BASELINE_BODY] * 5
    assert len(server.seen) == 10
    assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 1


async def test_c19_correction_dropped_when_host_clock_is_fixed(
    http_session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    """C19: after the host clock is fixed (the skew is gone) the earlier correction would make
    every signature 20 min off; the client notices on the next refusal, drops it and recovers."""
    sim = Simulator(project_id=PROJ, clock_offset=1200)
    sim.add_task(TASK_A, "a", body=dict(BASELINE_BODY))
    async with serving(sim) as url:
        client = make_client(http_session, make_config(url))
        assert await client.get_stats(TASK_A) == BASELINE_BODY
        sim.clock_offset = 0  # NTP fixed: host and gateway agree now
        with caplog.at_level(logging.WARNING, logger="exporter.client"):
            assert await client.get_stats(TASK_A) == BASELINE_BODY
            assert await client.get_stats(TASK_A) == BASELINE_BODY
    assert [r.status for r in sim.requests] == [401, 200, 401, 200, 200]
    assert client.clock_skew is not None and abs(client.clock_skew) < 2
    assert "earlier correction" in caplog.text


# ---- C21 ------------------------------------------------------------------------------------


class LockstepTime:
    """A fake clock for the throttle and the simulator. A sleep first waits (in real time) until
    no HTTP exchange is open, then moves the clock: every exchange happens at one instant of fake
    time, so request times recorded by the simulator are exact and the test needs no real sleeps."""

    def __init__(self) -> None:
        self.now = time.time()
        self.open_exchanges = 0

    def clock(self) -> float:
        return self.now

    def wall(self) -> datetime:
        return datetime.fromtimestamp(self.now, UTC)

    async def sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + 5
        while self.open_exchanges and time.monotonic() < deadline:
            await asyncio.sleep(0.001)
        self.now += max(0.0, seconds)
        await asyncio.sleep(0)


class HighRandom:
    """Full jitter at its upper bound, so the backoff sequence is exact (2, 4, 8 s ...)."""

    def uniform(self, a: float, b: float) -> float:
        return b


def throttling_429(retry_after: str | None) -> CannedResponse:
    if retry_after is not None:
        return CannedResponse(
            429,
            {"error_code": "APIG.0308", "error_msg": "throttling threshold reached (illustrative)"},
            headers={"Retry-After": retry_after},
        )
    return CannedResponse(
        429, "<html><body>Too Many Requests</body></html>", content_type="text/html"
    )


async def test_c21_throttling_shared_by_twenty_tasks(http_session: aiohttp.ClientSession) -> None:
    """C21: 20 tasks share one throttle. After 429 + Retry-After: 2 no request goes out for 2 s
    (for any task); 429s without Retry-After back off exponentially (4 s, then 8 s, jitter at
    its upper bound); after the first 200 the backoff is reset (the next bare 429 waits 2 s);
    the 10/s ceiling is never exceeded. Timeout 60 s so that no task gives up while waiting."""
    lockstep = LockstepTime()
    task_ids = [f"aaaaaaaa-0000-4000-8000-0000000001{n:02d}" for n in range(20)]
    sim = Simulator(project_id=PROJ, clock=lockstep.clock)
    for task_id in task_ids:
        sim.add_task(task_id, task_id[-2:], body=dict(BASELINE_BODY))
    async with serving(sim) as url:
        throttle = Throttle(10.0, clock=lockstep.clock, sleep=lockstep.sleep, rng=HighRandom())  # type: ignore[arg-type]
        client = client_for(http_session, make_config(url, timeout=60.0), throttle=throttle)
        client._wall_clock = lockstep.wall
        send = client._send

        async def counted_send(*args: Any, **kwargs: Any) -> Any:
            lockstep.open_exchanges += 1
            try:
                return await send(*args, **kwargs)
            finally:
                lockstep.open_exchanges -= 1

        client._send = counted_send  # type: ignore[method-assign]

        async with asyncio.timeout(30):  # a regression must fail here, not hang the suite
            sim.push_all(throttling_429("2"), throttling_429(None), throttling_429(None))
            round_one = await asyncio.gather(
                *(client.get_stats(t) for t in task_ids), return_exceptions=True
            )
            sim.push_all(throttling_429(None))
            round_two = await asyncio.gather(
                *(client.get_stats(t) for t in task_ids), return_exceptions=True
            )

    errors = [r for r in [*round_one, *round_two] if isinstance(r, BaseException)]
    assert all(isinstance(e, ApiError) and e.kind is ErrorKind.THROTTLED for e in errors)
    assert [(e.status, e.code, e.retry_after) for e in errors if isinstance(e, ApiError)] == [
        (429, "APIG.0308", 2.0),
        (429, None, None),
        (429, None, None),
        (429, None, None),
    ]
    assert sum(1 for r in [*round_one, *round_two] if r == BASELINE_BODY) == 36

    times = [r.time for r in sim.requests]
    statuses = [r.status for r in sim.requests]
    assert statuses[:4] == [429, 429, 429, 200]
    gaps = [round(b - a, 6) for a, b in itertools.pairwise(times)]
    assert gaps[0] == 2.0  # Retry-After honoured across all tasks
    assert gaps[1:3] == [4.0, 8.0]  # exponential without Retry-After
    second_429 = statuses.index(429, 4)
    assert gaps[second_429] == 2.0  # reset by the 200s in between: back to the base
    assert min(gaps) >= 0.1 - 1e-6  # the ceiling: 10 requests per second
    assert max(sum(1 for t in times if s <= t < s + 1.0 - 1e-5) for s in times) <= 10
