"""The DCS client over real HTTP: error shapes, classification, Retry-After, encoding, secrets."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

import exporter.client as client_module
from exporter.auth import IssuedToken, TokenCache, canonical_query
from exporter.client import (
    CREDENTIALS_REFUSED_HOLD_SECONDS,
    ApiError,
    DcsClient,
    ErrorBody,
    ErrorKind,
    parse_error_body,
    parse_retry_after,
)
from exporter.config import AkSkAuth, CloudConfig, Config, PasswordAuth, Secret
from exporter.simulator import (
    DEMO_ACCESS_KEY,
    DEMO_DOMAIN,
    DEMO_PASSWORD,
    DEMO_SECRET_KEY,
    DEMO_USER,
    CannedResponse,
    Simulator,
    start,
)
from exporter.throttle import Throttle
from tests.support import BASELINE_BODY, PROJ, TASK_A, TASK_B, SimServer, make_client, make_config

# ---- helpers shared with test_cases_client.py ------------------------------------------------


class FakeClock:
    """Seconds since the epoch that move only when told; readable as float or aware datetime."""

    def __init__(self, start: float | None = None) -> None:
        self.now = time.time() if start is None else start

    def time(self) -> float:
        return self.now

    def wall(self) -> datetime:
        return datetime.fromtimestamp(self.now, UTC)

    def advance(self, seconds: float) -> None:
        self.now += seconds


def password_config(config: Config, password: Secret | None = None) -> Config:
    """The same config with IAM password auth for the simulator's demo user."""
    auth = PasswordAuth(DEMO_USER, password or Secret(value=DEMO_PASSWORD), DEMO_DOMAIN)
    return replace(config, auth=auth)


def client_for(
    session: aiohttp.ClientSession,
    config: Config,
    clock: FakeClock | None = None,
    throttle: Throttle | None = None,
) -> DcsClient:
    """A DcsClient whose wall clock (signing, token expiry) is ``clock`` when given."""
    if clock is None and throttle is None:
        return make_client(session, config)
    return DcsClient(
        session,
        config.cloud,
        config.auth,
        timeout=config.polling.timeout,
        throttle=throttle or Throttle(1000.0),
        token_refresh_margin=config.polling.token_refresh_margin,
        wall_clock=clock.wall if clock else (lambda: datetime.now(UTC)),
    )


@dataclass
class Recorder:
    """A loopback HTTP server that answers every request with one handler and records them."""

    handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    seen: list[tuple[str, str, str, dict[str, str]]] = field(default_factory=list)
    url: str = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(
            (
                request.method,
                request.rel_url.raw_path,
                request.rel_url.raw_query_string,
                dict(request.headers),
            )
        )
        return await self.handler(request)


RecorderFactory = Callable[
    [Callable[[web.Request], Awaitable[web.StreamResponse]]], Awaitable[Recorder]
]


@contextlib.asynccontextmanager
async def recorders() -> AsyncIterator[RecorderFactory]:
    """Start Recorder servers on loopback; all are stopped on exit."""
    runners: list[web.AppRunner] = []

    async def serve(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> Recorder:
        recorder = Recorder(handler)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", recorder.handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        recorder.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        return recorder

    try:
        yield serve
    finally:
        for runner in runners:
            await runner.cleanup()


@pytest.fixture
async def recorder() -> AsyncIterator[RecorderFactory]:
    """Start Recorder servers on loopback; all are stopped after the test."""
    async with recorders() as serve:
        yield serve


async def call(client: DcsClient, task_id: str = TASK_A) -> Any:
    """get_stats that returns the ApiError instead of raising it."""
    try:
        return await client.get_stats(task_id)
    except ApiError as error:
        return error


# ---- error bodies (FACTS.md 6) ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            {
                "error_code": "DCS.4133",
                "error_msg": "Instance job is not found.",
                "error_ext_msg": None,
            },
            ErrorBody("DCS.4133", "Instance job is not found."),
        ),
        (
            {"errorCode": "DCS.4070", "errorMsg": "Invalid task ID"},
            ErrorBody("DCS.4070", "Invalid task ID"),
        ),
        ({"code": "APIG.0308", "message": "throttled"}, ErrorBody("APIG.0308", "throttled")),
        (
            {"error": {"code": "111404022", "message": "v1 style"}},
            ErrorBody("111404022", "v1 style"),
        ),
        (
            {
                "error": {
                    "code": 403,
                    "message": "X-Auth-Token is invalid in the request",
                    "title": "Forbidden",
                }
            },
            ErrorBody("403", "X-Auth-Token is invalid in the request"),
        ),
        (
            {"badRequest": {"message": "nested under any key", "code": 400}},
            ErrorBody("400", "nested under any key"),
        ),
        ({"error_code": 4133, "error_msg": "numeric code"}, ErrorBody("4133", "numeric code")),
        ({"error_code": "DCS.5000"}, ErrorBody("DCS.5000", None)),
        ({"error_msg": "message only"}, ErrorBody(None, "message only")),
        (
            {"error_code": None, "error_msg": None, "errorCode": "X.1", "errorMsg": "second shape"},
            ErrorBody("X.1", "second shape"),
        ),
        (
            {"error_code": "APIG.0308", "error_msg": "m", "request_id": "req-1"},
            ErrorBody("APIG.0308", "m", "req-1"),
        ),
        ({"error_msg": "line one\nFAKE LOG LINE\r\x00"}, ErrorBody(None, "line one FAKE LOG LINE")),
        ({"error_msg": {"detail": [1, 2]}}, ErrorBody(None, '{"detail": [1, 2]}')),
        ({"error": "a string"}, ErrorBody(None, None)),
        ({}, ErrorBody(None, None)),
        ([], ErrorBody(None, None)),
        ("text", ErrorBody(None, None)),
        (None, ErrorBody(None, None)),
    ],
)
def test_parse_error_body_shapes(body: Any, expected: ErrorBody) -> None:
    """Every error-body shape of FACTS.md 6 is read; others give no code, never a KeyError."""
    assert parse_error_body(body) == expected


def test_parse_error_body_bounds_lengths() -> None:
    """Codes are cut to 32 characters and messages to 300, so a body cannot flood logs or labels."""
    parsed = parse_error_body({"error_code": "C" * 100, "error_msg": "m" * 5000})
    assert (len(parsed.code or ""), len(parsed.message or "")) == (32, 300)


def test_parse_error_body_deep_nesting() -> None:
    """A deeply nested body is given up on, not recursed into without end."""
    body: Any = {"error_code": "DEEP"}
    for _ in range(10_000):
        body = {"x": body}
    assert parse_error_body(body) == ErrorBody(None, None)


# ---- Retry-After --------------------------------------------------------------------------------

NOW = datetime(2015, 10, 21, 7, 27, 50, tzinfo=UTC)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2", 2.0),
        (" 120 ", 120.0),
        ("2.5", 2.5),
        ("0", 0.0),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 10.0),
        ("Wed, 21 Oct 2015 07:27:00 GMT", 0.0),
        ("Wednesday, 21-Oct-15 07:28:00 GMT", 10.0),
        ("-5", None),
        ("nan", None),
        ("inf", None),
        ("1e3", None),
        ("soon", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    """Retry-After as delta-seconds or as an HTTP date; anything else is no advice at all."""
    assert parse_retry_after(value, NOW) == expected


# ---- classification over HTTP ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("canned", "kind", "code"),
    [
        (
            CannedResponse(400, {"error_code": "DCS.4070", "error_msg": "bad id"}),
            ErrorKind.CLIENT_ERROR,
            "DCS.4070",
        ),
        (
            CannedResponse(400, {"error_code": "DCS.4133", "error_msg": "gone"}),
            ErrorKind.NOT_FOUND,
            "DCS.4133",
        ),
        (
            CannedResponse(401, {"error_code": "DCS.1001", "error_msg": "bad token"}),
            ErrorKind.AUTH,
            "DCS.1001",
        ),
        (
            CannedResponse(403, {"error_code": "DCS.2003", "error_msg": "no permission"}),
            ErrorKind.PERMISSION,
            "DCS.2003",
        ),
        (
            CannedResponse(403, {"error": {"code": 403, "message": "The token has expired"}}),
            ErrorKind.AUTH,
            "403",
        ),
        (
            CannedResponse(404, {"error_code": "DCS.4001", "error_msg": "no such URL"}),
            ErrorKind.NOT_FOUND,
            "DCS.4001",
        ),
        (
            CannedResponse(405, {"error_code": "DCS.5001", "error_msg": "method"}),
            ErrorKind.CLIENT_ERROR,
            "DCS.5001",
        ),
        (
            CannedResponse(429, {"error_code": "APIG.0308", "error_msg": "limit"}),
            ErrorKind.THROTTLED,
            "APIG.0308",
        ),
        (
            CannedResponse(500, {"error_code": "DCS.5000", "error_msg": "internal"}),
            ErrorKind.SERVER_ERROR,
            "DCS.5000",
        ),
        (
            CannedResponse(503, "<html>busy</html>", content_type="text/html"),
            ErrorKind.SERVER_ERROR,
            None,
        ),
        (CannedResponse(504, None), ErrorKind.SERVER_ERROR, None),
        (
            CannedResponse(302, None, headers={"Location": "/elsewhere"}),
            ErrorKind.CLIENT_ERROR,
            None,
        ),
    ],
)
async def test_status_classification(
    sim_server: SimServer,
    http_session: aiohttp.ClientSession,
    canned: CannedResponse,
    kind: ErrorKind,
    code: str | None,
) -> None:
    """Each status (and code) maps to one ErrorKind; the error carries status and code."""
    client = make_client(http_session, make_config(sim_server.url))
    sim_server.sim.push(TASK_A, canned)
    error = await call(client)
    assert isinstance(error, ApiError)
    assert (error.kind, error.status, error.code) == (kind, canned.status, code)
    assert error.status_label == str(canned.status)
    assert error.gone == (code == "DCS.4133")
    assert f"HTTP {canned.status}" in str(error)
    assert await client.get_stats(TASK_A) == BASELINE_BODY


async def test_permission_error_says_permission_denied(
    sim_server: SimServer, http_session: aiohttp.ClientSession
) -> None:
    """A 403 that is not about the token is logged as "permission denied", with code and message."""
    client = make_client(http_session, make_config(sim_server.url))
    sim_server.sim.push(TASK_A, CannedResponse(403, {"error_code": "DCS.4030", "error_msg": "no"}))
    error = await call(client)
    assert "HTTP 403 DCS.4030: no; permission denied" in str(error)


@pytest.mark.parametrize(
    ("header", "expected"),
    [("2", 2.0), ("date+7", 7.0), ("date-30", 0.0), ("garbage", None)],
)
async def test_retry_after_header_over_http(
    http_session: aiohttp.ClientSession, header: str, expected: float | None
) -> None:
    """Retry-After is read as seconds or as an HTTP date judged against the server's own Date,
    so the pause is right even though the server's clock is 20 minutes ahead of ours."""
    clock = FakeClock()
    sim = Simulator(project_id=PROJ, clock=clock.time, clock_offset=1200)
    sim.add_task(TASK_A, "a", body=dict(BASELINE_BODY))
    runner, url = await start(sim)
    try:
        if header.startswith("date"):
            moment = datetime.fromtimestamp(sim.now() + float(header[4:]), UTC)
            header = format_datetime(moment, usegmt=True)
        sim.push(
            TASK_A,
            CannedResponse(
                429, {"error_code": "APIG.0308", "error_msg": "x"}, headers={"Retry-After": header}
            ),
        )
        client = client_for(http_session, make_config(url), clock)
        client._clock_correction = 1200.0  # already corrected: this test is about Retry-After
        error = await call(client)
        assert isinstance(error, ApiError)
        assert error.kind is ErrorKind.THROTTLED
        assert error.retry_after == expected
    finally:
        await runner.cleanup()


async def test_redirect_not_followed_token_not_leaked(
    sim_server: SimServer,
    http_session: aiohttp.ClientSession,
    recorder: Callable[..., Awaitable[Recorder]],
) -> None:
    """A 3xx from the API is an error naming where it pointed; X-Auth-Token is not sent there."""

    async def ok(request: web.Request) -> web.Response:
        return web.json_response(BASELINE_BODY)

    elsewhere = await recorder(ok)
    client = make_client(http_session, password_config(make_config(sim_server.url)))
    sim_server.sim.push(
        TASK_A, CannedResponse(302, None, headers={"Location": f"{elsewhere.url}/steal"})
    )
    error = await call(client)
    assert isinstance(error, ApiError)
    assert (error.kind, error.status) == (ErrorKind.CLIENT_ERROR, 302)
    assert f"redirect to {elsewhere.url} not followed" in str(error)
    assert elsewhere.seen == []


# ---- bodies that are not what they claim ----------------------------------------------------


@pytest.mark.parametrize(
    ("canned", "kind", "fragment"),
    [
        (CannedResponse(200, None), ErrorKind.EMPTY_BODY, "HTTP 200 with an empty body"),
        (CannedResponse(204, None), ErrorKind.EMPTY_BODY, "HTTP 204 with an empty body"),
        (CannedResponse(200, b"[" * 200_000), ErrorKind.INVALID_JSON, "nested too deeply"),
        (CannedResponse(200, b"\xff\xfe\x00garbage"), ErrorKind.INVALID_JSON, "body is not JSON"),
        (
            CannedResponse(200, "<html>login</html>", content_type="text/html"),
            ErrorKind.INVALID_JSON,
            "content-type text/html, body '<html>login</html>'",
        ),
        (
            CannedResponse(200, b" " * (client_module.MAX_BODY_BYTES + 1)),
            ErrorKind.INVALID_JSON,
            "body larger than",
        ),
    ],
)
async def test_broken_success_bodies(
    sim_server: SimServer,
    http_session: aiohttp.ClientSession,
    canned: CannedResponse,
    kind: ErrorKind,
    fragment: str,
) -> None:
    """A 2xx whose body is empty, not JSON, too deep or too big is a classified ApiError."""
    client = make_client(http_session, make_config(sim_server.url))
    sim_server.sim.push(TASK_A, canned)
    error = await call(client)
    assert isinstance(error, ApiError)
    assert error.kind is kind
    assert fragment in str(error)


async def test_connection_refused_is_connection_error(http_session: aiohttp.ClientSession) -> None:
    """Nobody listening is a CONNECTION error with no status."""
    client = make_client(http_session, make_config("http://127.0.0.1:9"))
    error = await call(client)
    assert isinstance(error, ApiError)
    assert (error.kind, error.status, error.status_label) == (
        ErrorKind.CONNECTION,
        None,
        "connection",
    )


# ---- what is sent is what was signed (known issue 3a) ----------------------------------------


async def sim_with_raw_log(sim: Simulator) -> tuple[web.AppRunner, str, list[tuple[str, str]]]:
    """Serve ``sim`` with a middleware that records each request's raw path and raw query."""
    seen: list[tuple[str, str]] = []

    @web.middleware
    async def raw_log(request: web.Request, handler: Any) -> web.StreamResponse:
        seen.append((request.rel_url.raw_path, request.rel_url.raw_query_string))
        response: web.StreamResponse = await handler(request)
        return response

    app = sim.app()
    app.middlewares.insert(0, raw_log)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}", seen


ODD = "m*y (task)!'~"


async def test_query_sent_byte_for_byte_as_signed(http_session: aiohttp.ClientSession) -> None:
    """A list query with *, (, ), !, ' and a space reaches the server exactly in the signed
    canonical form (aiohttp would otherwise turn %2A into *), and the simulator's verify passes."""
    sim = Simulator(project_id=PROJ)
    sim.add_task(TASK_A, ODD, body=dict(BASELINE_BODY))
    sim.add_task(TASK_B, "other", body=dict(BASELINE_BODY))
    runner, url, seen = await sim_with_raw_log(sim)
    try:
        client = make_client(http_session, make_config(url))
        tasks = await client.list_tasks(name=ODD)
        assert [task.task_id for task in tasks] == [TASK_A]
        sent = canonical_query([("offset", "0"), ("limit", "100"), ("name", ODD)])
        assert sent == "limit=100&name=m%2Ay%20%28task%29%21%27~&offset=0"
        assert seen == [(f"/v2/{PROJ}/migration-tasks", sent)]
    finally:
        await runner.cleanup()


async def test_path_sent_byte_for_byte_as_signed(http_session: aiohttp.ClientSession) -> None:
    """A task ID with characters that need encoding, even a slash, is sent as one percent-encoded
    path segment exactly as signed; the simulator verifies it and routes it to that task."""
    sim = Simulator(project_id=PROJ)
    odd_id = "a*b(1)/c"
    sim.push(odd_id, CannedResponse(body=dict(BASELINE_BODY)))
    runner, url, seen = await sim_with_raw_log(sim)
    try:
        client = make_client(http_session, make_config(url))
        assert await client.get_stats(odd_id) == BASELINE_BODY
        assert seen == [(f"/v2/{PROJ}/migration-task/a%2Ab%281%29%2Fc/stats", "")]
        assert [r.task_id for r in sim.requests] == [odd_id]
    finally:
        await runner.cleanup()


async def test_odd_task_id_round_trip(http_session: aiohttp.ClientSession) -> None:
    """A task whose ID needs encoding (but has no slash) is signed, verified and answered."""
    sim = Simulator(project_id=PROJ)
    odd_id = "x*y(1)!"
    sim.add_task(odd_id, "odd", body=dict(BASELINE_BODY))
    runner, url, seen = await sim_with_raw_log(sim)
    try:
        client = make_client(http_session, make_config(url))
        assert await client.get_stats(odd_id) == BASELINE_BODY
        assert seen == [(f"/v2/{PROJ}/migration-task/x%2Ay%281%29%21/stats", "")]
    finally:
        await runner.cleanup()


# ---- no secret in any exception text ----------------------------------------------------------


async def test_secrets_scrubbed_from_errors_aksk(
    sim_server: SimServer, http_session: aiohttp.ClientSession
) -> None:
    """A gateway page that echoes the secret key is reported with the secret replaced."""
    client = make_client(http_session, make_config(sim_server.url))
    echo = f"<html>debug: sk={DEMO_SECRET_KEY}</html>"
    sim_server.sim.push(TASK_A, CannedResponse(400, echo, content_type="text/html"))
    sim_server.sim.push(
        TASK_A, CannedResponse(500, {"error_code": "X", "error_msg": DEMO_SECRET_KEY})
    )
    for _ in range(2):
        error = await call(client)
        assert isinstance(error, ApiError)
        assert DEMO_SECRET_KEY not in str(error)
        assert "<redacted>" in str(error)


async def test_secrets_scrubbed_from_errors_token(
    sim_server: SimServer, http_session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    """Error bodies echoing the IAM token or the password never put them in exceptions or logs."""
    caplog.set_level(logging.DEBUG)
    client = make_client(http_session, password_config(make_config(sim_server.url)))
    assert await client.get_stats(TASK_A) == BASELINE_BODY
    assert client.tokens is not None
    token = (await client.tokens.get()).value
    bodies = [
        CannedResponse(401, {"error_code": "APIGW.0301", "error_msg": f"token {token} expired"}),
        CannedResponse(400, {"error_code": "DCS.4000", "error_msg": f"password {DEMO_PASSWORD}"}),
        CannedResponse(429, f"throttled {token}", content_type="text/plain"),
    ]
    texts = []
    for canned in bodies:
        sim_server.sim.push(TASK_A, canned)
        sim_server.sim.push(TASK_A, canned)  # also the retry after a refresh
        error = await call(client)
        assert isinstance(error, ApiError)
        texts.append(str(error))
    new_token = (await client.tokens.get()).value
    for text in [*texts, caplog.text]:
        for secret in (token, new_token, DEMO_PASSWORD):
            assert secret not in text


async def test_unreadable_secret_file_is_auth_error_without_request(
    sim_server: SimServer, http_session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """A secret file removed or emptied after start is an AUTH error naming the file; nothing sent."""
    secret = tmp_path / "sk"
    secret.write_text(DEMO_SECRET_KEY, encoding="utf-8")
    config = replace(
        make_config(sim_server.url),
        auth=AkSkAuth(access_key=DEMO_ACCESS_KEY, secret_key=Secret(file=str(secret))),
    )
    client = make_client(http_session, config)
    assert await client.get_stats(TASK_A) == BASELINE_BODY
    secret.write_text("", encoding="utf-8")
    empty = await call(client)
    secret.unlink()
    missing = await call(client)
    for error, fragment in ((empty, "is empty"), (missing, "No such file")):
        assert isinstance(error, ApiError)
        assert (error.kind, error.sent, error.status) == (ErrorKind.AUTH, False, None)
        assert str(secret) in str(error)
        assert fragment in str(error)
    assert len(sim_server.sim.requests) == 1


# ---- IAM answers that are not what they should be ----------------------------------------------


@pytest.mark.parametrize(
    ("status", "body", "headers", "fragment"),
    [
        (201, {"token": "not-an-object"}, {"X-Subject-Token": "T"}, "lacks X-Subject-Token"),
        (
            201,
            {"token": {"expires_at": "tomorrow"}},
            {"X-Subject-Token": "T"},
            "unrecognised timestamp",
        ),
        (201, {"token": {"expires_at": "2030-01-01T00:00:00Z"}}, {}, "lacks X-Subject-Token"),
        (201, [], {"X-Subject-Token": "T"}, "lacks X-Subject-Token"),
        (
            401,
            {"error": {"code": 401, "message": "The username or password is wrong."}},
            {},
            "HTTP 401 The username or password is wrong.",
        ),
    ],
)
async def test_bad_token_answers(
    http_session: aiohttp.ClientSession,
    recorder: Callable[..., Awaitable[Recorder]],
    status: int,
    body: Any,
    headers: dict[str, str],
    fragment: str,
) -> None:
    """A token answer without a token object, header or readable expiry is an AUTH ApiError."""

    async def iam(request: web.Request) -> web.Response:
        return web.json_response(body, status=status, headers=headers)

    server = await recorder(iam)
    config = password_config(make_config(server.url))
    client = make_client(
        http_session, replace(config, cloud=replace(config.cloud, iam_endpoint=server.url))
    )
    error = await call(client)
    assert isinstance(error, ApiError)
    assert error.kind is ErrorKind.AUTH
    assert fragment in str(error)
    assert DEMO_PASSWORD not in str(error)


async def test_a_refused_password_is_tried_once_per_hold_for_all_tasks(
    sim_server: SimServer, http_session: aiohttp.ClientSession
) -> None:
    """With a wrong IAM password, ten tasks polling together cost IAM one failed login; polls in
    the next 5 minutes fail at once with that answer (no login), and then one login is tried
    again: a wrong password never locks the IAM user out."""
    clock = FakeClock()
    wrong = password_config(make_config(sim_server.url), Secret(value="not-the-password"))
    client = client_for(http_session, wrong, clock)
    errors = await asyncio.gather(*(call(client) for _ in range(10)))
    assert all(isinstance(e, ApiError) and e.kind is ErrorKind.AUTH for e in errors)
    assert sim_server.sim.token_requests == 1
    clock.advance(CREDENTIALS_REFUSED_HOLD_SECONDS - 1)
    held = await call(client)
    assert isinstance(held, ApiError) and held.kind is ErrorKind.AUTH and not held.sent
    assert "The username or password is wrong" in str(held)
    assert "not asked again for another 1s" in str(held)
    assert sim_server.sim.token_requests == 1
    assert client.token_fetches == 1  # the refreshes metric counts logins, not held polls
    clock.advance(2)
    await call(client)
    assert sim_server.sim.token_requests == 2


async def test_a_token_refused_again_is_logged_once_not_per_task(
    sim_server: SimServer, http_session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    """When the API keeps refusing a freshly refreshed token, the error saying so is logged
    once for that token, not once for each of the tasks' polls."""
    client = client_for(http_session, password_config(make_config(sim_server.url)), FakeClock())
    refused = CannedResponse(
        401, {"error_code": "APIGW.0301", "error_msg": "token expired (illustrative)"}
    )
    sim_server.sim.push_all(*[refused] * 40)
    with caplog.at_level(logging.ERROR, logger="exporter.client"):
        for _ in range(4):
            await asyncio.gather(call(client, TASK_A), call(client, TASK_B))
    again = [r for r in caplog.records if "token rejected again" in r.getMessage()]
    assert len(again) == 1
    assert sim_server.sim.token_requests == 2  # the first token and one forced refresh


async def test_an_iam_outage_is_asked_again_after_a_doubling_hold(
    http_session: aiohttp.ClientSession, recorder: Callable[..., Awaitable[Recorder]]
) -> None:
    """IAM answering 500 is asked again after 5 s, then 10 s: a short outage heals quickly, and
    a long one costs IAM a request a minute at most, whatever the number of tasks."""
    clock = FakeClock()

    async def iam(request: web.Request) -> web.Response:
        return web.json_response({"error": {"code": 500, "message": "busy"}}, status=500)

    server = await recorder(iam)
    config = password_config(make_config(server.url))
    config = replace(config, cloud=replace(config.cloud, iam_endpoint=server.url))
    client = client_for(http_session, config, clock)
    for advance, expected_requests in ((0, 1), (4, 1), (1.5, 2), (9, 2), (1.5, 3)):
        clock.advance(advance)
        await asyncio.gather(*(call(client) for _ in range(5)))
        assert len(server.seen) == expected_requests, advance


async def test_a_failed_project_lookup_is_shared_by_the_tasks(
    http_session: aiohttp.ClientSession, recorder: Callable[..., Awaitable[Recorder]]
) -> None:
    """Without a project_id, five tasks whose project lookup fails (IAM 500) cost IAM one
    lookup, not five."""

    async def iam(request: web.Request) -> web.Response:
        return web.Response(status=500, text="down")

    server = await recorder(iam)
    config = make_config(server.url)
    cloud = CloudConfig(region="eu-de", dcs_endpoint=server.url, iam_endpoint=server.url)
    client = client_for(http_session, replace(config, cloud=cloud), FakeClock())
    errors = await asyncio.gather(*(call(client, task) for task in (TASK_A, TASK_B) * 3))
    assert all(isinstance(e, ApiError) and e.kind is ErrorKind.SERVER_ERROR for e in errors)
    assert [path for _, path, _, _ in server.seen] == ["/projects"]


@pytest.mark.parametrize("project_id", ["abc\r\nX-Evil: 1", "", "0123", 12])
async def test_a_project_id_from_iam_that_is_not_one_is_refused(
    http_session: aiohttp.ClientSession,
    recorder: Callable[..., Awaitable[Recorder]],
    project_id: object,
) -> None:
    """A project lookup answer whose id is not 32 hex digits is an UNEXPECTED_SHAPE error naming
    it, never a header built from it (a CR/LF there was a traceback on every poll)."""

    async def iam(request: web.Request) -> web.Response:
        return web.json_response({"projects": [{"name": "eu-de", "id": project_id}]})

    server = await recorder(iam)
    config = make_config(server.url)
    cloud = CloudConfig(region="eu-de", dcs_endpoint=server.url, iam_endpoint=server.url)
    client = make_client(http_session, replace(config, cloud=cloud))
    error = await call(client)
    assert isinstance(error, ApiError) and error.kind is ErrorKind.UNEXPECTED_SHAPE
    assert "is not 32 hex digits" in str(error) and "\n" not in str(error)


async def test_project_lookup_without_id(
    http_session: aiohttp.ClientSession, recorder: Callable[..., Awaitable[Recorder]]
) -> None:
    """An IAM project entry without an id is refused, not turned into the project "None"."""

    async def iam(request: web.Request) -> web.Response:
        return web.json_response({"projects": [{"name": "eu-de"}]})

    server = await recorder(iam)
    config = make_config(server.url)
    cloud = CloudConfig(region="eu-de", dcs_endpoint=server.url, iam_endpoint=server.url)
    client = make_client(http_session, replace(config, cloud=cloud))
    with pytest.raises(ApiError) as caught:
        await client.project_id()
    assert caught.value.kind is ErrorKind.UNEXPECTED_SHAPE
    assert [path for _, path, _, _ in server.seen] == ["/projects"]


async def test_project_lookup_by_name(
    sim_server: SimServer, http_session: aiohttp.ClientSession
) -> None:
    """Without project_id the client asks IAM by the region's name, once."""
    sim = sim_server.sim
    sim.project_name = "eu-de"
    config = make_config(sim_server.url)
    client = make_client(
        http_session, replace(config, cloud=replace(config.cloud, project_id=None))
    )
    assert await client.get_stats(TASK_A) == BASELINE_BODY
    assert await client.get_stats(TASK_B) == BASELINE_BODY
    assert [r.path for r in sim.requests] == [
        "/v3/projects",
        f"/v2/{PROJ}/migration-task/{TASK_A}/stats",
        f"/v2/{PROJ}/migration-task/{TASK_B}/stats",
    ]


async def test_list_tasks_stops_on_a_server_that_ignores_offset(
    http_session: aiohttp.ClientSession,
    recorder: Callable[..., Awaitable[Recorder]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A list endpoint that repeats its first page with a string count ends in an error, not a loop."""
    monkeypatch.setattr(client_module, "MAX_LIST_PAGES", 5)

    async def same_page(request: web.Request) -> web.Response:
        return web.json_response({"count": "many", "migration_tasks": [{"task_id": TASK_A}]})

    server = await recorder(same_page)
    client = client_for(http_session, make_config(server.url), throttle=Throttle(1000.0))
    with pytest.raises(ApiError, match="still not complete after 5 pages"):
        await client.list_tasks()
    assert len(server.seen) == 5


async def test_list_tasks_count_as_string(
    http_session: aiohttp.ClientSession,
    recorder: Callable[..., Awaitable[Recorder]],
) -> None:
    """A count sent as a string still ends paging at the count."""

    async def page(request: web.Request) -> web.Response:
        offset = int(request.query["offset"])
        entries = [{"task_id": f"t{offset}", "task_name": "n"}] if offset < 2 else []
        return web.json_response({"count": "2", "migration_tasks": entries})

    server = await recorder(page)
    client = client_for(http_session, make_config(server.url), throttle=Throttle(1000.0))
    assert [t.task_id for t in await client.list_tasks()] == ["t0", "t1"]
    assert len(server.seen) == 2


async def test_nested_instance_names_are_bounded_display_strings(
    http_session: aiohttp.ClientSession, recorder: Callable[..., Awaitable[Recorder]]
) -> None:
    """Instance names inside source_instance/target_instance get the same one-line, 200-character
    treatment as the flat fields: they become label values of dcs_migration_task_info."""

    async def details(request: web.Request) -> web.Response:
        return web.json_response(
            {
                "task_name": "t",
                "source_instance": {"name": "src\n\u2028" + "s" * 500, "password": "x"},
                "target_instance": {"name": "dst\x1b[31m"},
            }
        )

    server = await recorder(details)
    client = client_for(http_session, make_config(server.url), throttle=Throttle(1000.0))
    found = await client.get_task(TASK_A)
    assert found.source_instance_name.startswith("src ")
    assert len(found.source_instance_name) == 200
    assert "\n" not in found.source_instance_name and "\u2028" not in found.source_instance_name
    assert "\x1b" not in found.target_instance_name
    assert found.target_instance_name.startswith("dst")


_REDIS_PASSWORD = "redis-Passw0rd-in-details"


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (200, '{"task_name":"t","source_instance":{"password":"%s","addrs":"10.0.0.1:6379"'),
        (200, '<html>{"source_instance":{"password":"%s"}}</html>'),
        (500, '<html>{"target_instance":{"password":"%s"}}</html>'),
    ],
    ids=["truncated-json", "not-json", "server-error-page"],
)
@pytest.mark.parametrize("call_name", ["get_task", "list_tasks"])
async def test_details_and_list_bodies_are_never_quoted_in_errors(
    http_session: aiohttp.ClientSession,
    recorder: Callable[..., Awaitable[Recorder]],
    status: int,
    body: str,
    call_name: str,
) -> None:
    """A broken details or list answer is an error that gives the body's size, not its text: those
    bodies carry the Redis passwords in plaintext (FACTS 1b), and error texts reach the log."""

    async def broken(request: web.Request) -> web.Response:
        return web.Response(status=status, text=body % _REDIS_PASSWORD, content_type="text/html")

    server = await recorder(broken)
    client = client_for(http_session, make_config(server.url), throttle=Throttle(1000.0))
    call_api = client.get_task(TASK_A) if call_name == "get_task" else client.list_tasks()
    with pytest.raises(ApiError) as caught:
        await call_api
    message = str(caught.value)
    assert _REDIS_PASSWORD not in message
    assert f"{len(body % _REDIS_PASSWORD)} bytes, not shown" in message
    assert f"HTTP {status}" in message


async def test_a_broken_stats_body_is_still_quoted(
    http_session: aiohttp.ClientSession, recorder: Callable[..., Awaitable[Recorder]]
) -> None:
    """Stats bodies hold no secrets, so their start stays in the error for diagnosis (C08)."""

    async def truncated(request: web.Request) -> web.Response:
        return web.Response(text='{"full_migration_progress":"45","offset":"50')

    server = await recorder(truncated)
    client = client_for(http_session, make_config(server.url), throttle=Throttle(1000.0))
    error = await call(client)
    assert isinstance(error, ApiError)
    assert """'{"full_migration_progress":"45","offset":"50'""" in str(error)


# ---- throttle integration ----------------------------------------------------------------------


async def test_long_pause_fails_fast_without_sending(
    sim_server: SimServer, http_session: aiohttp.ClientSession
) -> None:
    """During a pause longer than the timeout a call fails at once as THROTTLED, sent=False."""
    client = make_client(http_session, make_config(sim_server.url))
    sim_server.sim.push(
        TASK_A,
        CannedResponse(
            429, {"error_code": "APIG.0308", "error_msg": "x"}, headers={"Retry-After": "120"}
        ),
    )
    first = await call(client)
    started = time.monotonic()
    second = await call(client, TASK_B)
    assert time.monotonic() - started < 0.5
    assert isinstance(first, ApiError)
    assert isinstance(second, ApiError)
    assert (first.kind, first.sent, first.retry_after) == (ErrorKind.THROTTLED, True, 120.0)
    assert (second.kind, second.sent, second.status) == (ErrorKind.THROTTLED, False, None)
    assert "not sent" in str(second)
    assert len(sim_server.sim.requests) == 1


# ---- token cache: fall back to a still-valid token (known issue 3b) -----------------------------


class FlakyIam:
    """A token fetcher on a fake clock that can be told to fail."""

    def __init__(self, clock: FakeClock, lifetime: float = 3600.0) -> None:
        self.clock = clock
        self.lifetime = lifetime
        self.calls = 0
        self.failing = False

    async def __call__(self) -> IssuedToken:
        self.calls += 1
        await asyncio.sleep(0)
        if self.failing:
            raise ApiError(ErrorKind.SERVER_ERROR, "IAM token request: HTTP 503")
        expires = self.clock.wall() + timedelta(seconds=self.lifetime)
        return IssuedToken(value=f"TOKEN_{self.calls}", expires_at=expires, project_id=PROJ)


async def test_failed_refresh_falls_back_to_valid_token(caplog: pytest.LogCaptureFixture) -> None:
    """In the refresh margin, an IAM failure returns the still-valid token with one warning, and
    the next try waits the retry interval instead of hitting IAM on every call."""
    clock = FakeClock()
    iam = FlakyIam(clock, lifetime=3600)
    cache = TokenCache(
        iam,
        clock=clock.wall,
        refresh_margin=timedelta(minutes=10),
        refresh_retry_interval=timedelta(seconds=30),
    )
    assert (await cache.get()).value == "TOKEN_1"
    clock.advance(3600 - 300)  # 5 min left: inside the 10 min margin
    iam.failing = True
    with caplog.at_level(logging.WARNING, logger="exporter.auth"):
        results = await asyncio.gather(*(cache.get() for _ in range(3)))
        assert [token.value for token in results] == ["TOKEN_1"] * 3
        for _ in range(5):  # within the retry interval: no new IAM call
            clock.advance(5)
            assert (await cache.get()).value == "TOKEN_1"
    assert iam.calls == 2
    warnings = [r for r in caplog.records if "refresh failed" in r.getMessage()]
    assert len(warnings) == 1
    assert "valid for another 300 s" in warnings[0].getMessage()
    clock.advance(10)  # 35 s after the failure: try again
    iam.failing = False
    assert (await cache.get()).value == "TOKEN_3"


async def test_failed_refresh_of_expired_token_raises() -> None:
    """Once the token has expired there is nothing to fall back to: the failure is raised."""
    clock = FakeClock()
    iam = FlakyIam(clock, lifetime=100)
    cache = TokenCache(iam, clock=clock.wall)
    await cache.get()
    clock.advance(100)
    iam.failing = True
    with pytest.raises(ApiError, match="HTTP 503"):
        await cache.get()


async def test_failed_forced_refresh_raises_and_does_not_hammer_iam() -> None:
    """A forced refresh after a rejection that fails is raised (the refused token is no fallback),
    and later calls do not ask IAM again before the forced-refresh interval has passed."""
    clock = FakeClock()
    iam = FlakyIam(clock)
    cache = TokenCache(iam, clock=clock.wall, min_forced_refresh_interval=timedelta(minutes=5))
    await cache.get()
    iam.failing = True
    with pytest.raises(ApiError, match="HTTP 503"):
        await cache.refresh_after_rejection("TOKEN_1")
    for _ in range(5):
        clock.advance(30)
        await cache.get()
        assert await cache.refresh_after_rejection("TOKEN_1") is None
    assert iam.calls == 2
    clock.advance(150)  # 5 min after the forced refresh
    iam.failing = False
    fresh = await cache.refresh_after_rejection("TOKEN_1")
    assert fresh is not None
    assert fresh.value == "TOKEN_3"


async def test_client_keeps_polling_while_iam_refuses_a_refresh(
    sim_server: SimServer, http_session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """Over HTTP: with the password file changed to a wrong one, a refresh due in the margin
    fails, yet stats calls keep working with the current token; IAM is asked once, not per call."""
    clock = FakeClock()
    sim = Simulator(project_id=PROJ, clock=clock.time, token_ttl=3600)
    sim.add_task(TASK_A, "a", body=dict(BASELINE_BODY))
    runner, url = await start(sim)
    try:
        password = tmp_path / "pw"
        password.write_text(DEMO_PASSWORD, encoding="utf-8")
        config = password_config(make_config(url), Secret(file=str(password)))
        client = client_for(http_session, config, clock)
        assert await client.get_stats(TASK_A) == BASELINE_BODY
        clock.advance(3600 - 120)  # inside the 360 s margin (10 % of an hour)
        password.write_text("wrong-password", encoding="utf-8")
        for _ in range(4):
            assert await client.get_stats(TASK_A) == BASELINE_BODY
            clock.advance(2)
        assert sim.token_requests == 2
    finally:
        await runner.cleanup()


async def test_token_expiry_judged_on_local_clock(http_session: aiohttp.ClientSession) -> None:
    """A host clock 2 h ahead of IAM does not make a 1 h token look expired on every call."""
    server_clock = FakeClock()
    host_clock = FakeClock(server_clock.now + 7200)
    sim = Simulator(project_id=PROJ, clock=server_clock.time, token_ttl=3600)
    sim.add_task(TASK_A, "a", body=dict(BASELINE_BODY))
    runner, url = await start(sim)
    try:
        client = client_for(http_session, password_config(make_config(url)), host_clock)
        for _ in range(5):
            assert await client.get_stats(TASK_A) == BASELINE_BODY
        assert sim.token_requests == 1
    finally:
        await runner.cleanup()


# ---- odd answers found while testing ----------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "kind", "gone"),
    [
        (
            {
                "error_code": "DCS.4133",
                "error_msg": "Instance job is not found.",
                "error_ext_msg": None,
            },
            ErrorKind.NOT_FOUND,
            True,
        ),
        ({"error_code": "DCS.5000", "error_msg": "internal"}, ErrorKind.CLIENT_ERROR, False),
    ],
)
async def test_error_body_with_success_status(
    sim_server: SimServer,
    http_session: aiohttp.ClientSession,
    body: dict[str, Any],
    kind: ErrorKind,
    gone: bool,
) -> None:
    """A 200 whose body is a DCS error object is raised as that error (DCS.4133 still means
    gone), not handed on as a stats body without any stats."""
    client = make_client(http_session, make_config(sim_server.url))
    sim_server.sim.push(TASK_A, CannedResponse(200, body))
    error = await call(client)
    assert isinstance(error, ApiError)
    assert (error.kind, error.status, error.code, error.gone) == (
        kind,
        200,
        body["error_code"],
        gone,
    )


async def test_stats_body_with_null_error_code_is_stats(
    sim_server: SimServer, http_session: aiohttp.ClientSession
) -> None:
    """A stats body that also carries error_code: null is a normal stats body."""
    client = make_client(http_session, make_config(sim_server.url))
    body = {**BASELINE_BODY, "error_code": None, "error_msg": None}
    sim_server.sim.push(TASK_A, CannedResponse(200, body))
    assert await client.get_stats(TASK_A) == body


async def test_one_reset_connection_is_retried_and_two_fail(
    sim_server: SimServer, http_session: aiohttp.ClientSession
) -> None:
    """A keep-alive connection that the server resets before answering costs one retry of the
    GET, and the poll succeeds; two resets in a row are a CONNECTION error, not a hang."""
    client = make_client(http_session, make_config(sim_server.url))
    assert await client.get_stats(TASK_A) == BASELINE_BODY  # a pooled connection now exists
    sim_server.sim.push(TASK_A, CannedResponse(reset=True))
    assert await client.get_stats(TASK_A) == BASELINE_BODY
    stats = [r for r in sim_server.sim.requests if r.path.endswith(f"{TASK_A}/stats")]
    assert [r.status for r in stats] == [200, 0, 200]
    sim_server.sim.push(TASK_A, CannedResponse(reset=True), CannedResponse(reset=True))
    error = await call(client)
    assert isinstance(error, ApiError) and error.kind is ErrorKind.CONNECTION


async def test_unreadable_redirect_location(
    sim_server: SimServer, http_session: aiohttp.ClientSession
) -> None:
    """A redirect whose Location cannot be parsed is still a classified error."""
    client = make_client(http_session, make_config(sim_server.url))
    sim_server.sim.push(TASK_A, CannedResponse(301, None, headers={"Location": "http://[::1"}))
    error = await call(client)
    assert isinstance(error, ApiError)
    assert "redirect to an unreadable URL not followed" in str(error)


async def test_task_details_are_bounded_display_strings(
    sim_server: SimServer, http_session: aiohttp.ClientSession
) -> None:
    """Names from the details API become one-line strings of at most 200 characters (they end
    up as label values), and nothing of the body's passwords is kept."""
    sim_server.sim.add_task(TASK_A, "orders\ncache" + "x" * 1000, body=dict(BASELINE_BODY))
    client = make_client(http_session, make_config(sim_server.url))
    details = await client.get_task(TASK_A)
    assert details.task_name.startswith("orders cache")
    assert len(details.task_name) == 200
    assert details.status == "INCRMIGEATING"
    assert "passw0rd" not in repr(details)
