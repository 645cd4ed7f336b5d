"""A fake DCS + IAM HTTP API: the upstream for ``--demo`` and for every test that needs one.

It speaks the three read-only DCS migration endpoints and the two IAM calls the exporter uses
(``dcs-api/FACTS.md`` 1a-1c, 4, 5a), checks AK/SK signatures with :func:`exporter.auth.verify_request`
and tokens it issued itself, and can replay scripted faults (``CASES.md``): a canned status or body,
a delay, a request that is never answered, a body cut off mid-way, a reset connection.

Tests drive it through its Python API (:class:`Simulator`) while the exporter talks HTTP to it::

    sim = Simulator(clock=fake_clock)
    sim.add_task(TASK_A, "orders-cache", body=BASELINE)
    sim.push(TASK_A, CannedResponse(status=502, body="<html>...</html>", content_type="text/html"))
    runner, base_url = await start(sim)        # http://127.0.0.1:PORT, DCS and IAM (/v3) alike
    ...
    assert sim.max_in_flight(TASK_A) == 1
    await runner.cleanup()

``python -m exporter.simulator --listen 127.0.0.1:8080`` serves the demo tasks standalone.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import random
import secrets
import signal
import socket
import ssl
import struct
import sys
import time
import uuid
import zlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from email.utils import formatdate
from typing import Literal, NamedTuple

from aiohttp import web

from exporter.auth import verify_request

__all__ = [
    "DEMO_ACCESS_KEY",
    "DEMO_DOMAIN",
    "DEMO_PASSWORD",
    "DEMO_PROJECT_ID",
    "DEMO_PROJECT_NAME",
    "DEMO_SECRET_KEY",
    "DEMO_TASKS",
    "DEMO_USER",
    "SOURCE_PASSWORD",
    "TARGET_PASSWORD",
    "AuthKind",
    "CannedResponse",
    "MigrationModel",
    "RequestRecord",
    "Simulator",
    "StatsSource",
    "demo_simulator",
    "main",
    "start",
]

# Demo identity. Only ever valid against this simulator; printed by ``python -m exporter.simulator``.
DEMO_PROJECT_ID = "666486c2d9b948c1bbea57e714d744fa"  # the project of the API docs' examples
DEMO_PROJECT_NAME = "eu-de"
DEMO_ACCESS_KEY = "DEMOACCESSKEY0000001"
DEMO_SECRET_KEY = "demoSecretKeyOnlyValidAgainstTheSimulator"
DEMO_USER = "demo-user"
DEMO_PASSWORD = "demo-password"
DEMO_DOMAIN = "demo-domain"

# The Redis passwords the details endpoint returns in plaintext, as the real one does (FACTS 1b).
# Distinctive, so that a test can grep logs and /metrics for them.
SOURCE_PASSWORD = "sim-source-Redis-passw0rd"
TARGET_PASSWORD = "sim-target-Redis-passw0rd"

# (task_id, name) of the tasks that demo_simulator() creates.
DEMO_TASKS: tuple[tuple[str, str], ...] = (
    ("31c6fd2b-2893-430b-90ff-d1adb8060585", "orders-cache"),
    ("5b0d7c1e-6a43-4d1f-9c7e-2f8a1b3c4d5e", "sessions-cache"),
    ("9e8f7a6b-5c4d-4e3f-8a2b-1c0d9e8f7a6b", "catalog-cache"),
)

AuthKind = Literal["aksk", "token", "password", "none"]
# A live stats body, e.g. read from real Redis servers (exporter.redis_demo).
StatsSource = Callable[[], Awaitable[Mapping[str, object]]]

_POLL_SECONDS = 0.05  # how often a stalled reply looks whether its client has gone
_PARTIAL_MISSING = 64  # bytes a partial reply promises in Content-Length but never sends
_IAM_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"

# The list endpoint documents only four statuses (FACTS 1a, 2); running ones show as MIGRATING there.
_LIST_STATUS = {
    "FULLMIGRATING": "MIGRATING",
    "INCRMIGEATING": "MIGRATING",
    "INCRMIGRATING": "MIGRATING",
    "RUNNING": "MIGRATING",
}


# --------------------------------------------------------------------------------------------------
# Scripted replies and the stats model


@dataclass
class CannedResponse:
    """One scripted reply to a stats call.

    ``body`` is JSON-serialised unless it is ``bytes`` or ``str`` (sent as is); ``None`` sends an
    empty body (pass ``"null"`` for a JSON null). ``delay`` is real time, since the client's timeout
    is. ``hang``, ``partial`` and ``reset`` happen after the delay; a stalled reply ends when the
    client goes away or the server shuts down. Note that aiohttp's client (3.14) silently retries an
    idempotent request once after a disconnect, so a GET only fails after two resets in a row.
    """

    status: int = 200
    body: object = None
    headers: Mapping[str, str] = field(default_factory=dict)
    content_type: str = "application/json"
    delay: float = 0.0
    hang: bool = False  # accept and read the request, never answer (C12a)
    partial: bytes | None = None  # headers + these bytes, then stall (C12b)
    reset: bool = False  # close the connection with a TCP reset and no response (see above)


@dataclass(frozen=True)
class MigrationModel:
    """How a healthy task's stats evolve with time; the same (model, elapsed) gives the same body.

    Full phase (``elapsed < full_phase_seconds``): progress climbs 0 to 99, target keys grow in step,
    offset is 0. Incremental phase: progress 100, target keys within a small lag of the source,
    offset moving every second (sometimes 0), ``is_migrating`` true. ``stalled`` freezes the
    incremental offset at a non-zero value and stops the traffic, while the task still says it is
    migrating (the C33 stall); it does not change the full phase.
    """

    source_keys: int
    full_phase_seconds: float
    ops: float
    kbps: float
    seed: int
    numbers_as_strings: bool = True  # the documented String form; False sends bare numbers (C01)
    stalled: bool = False

    def stats_at(self, elapsed: float) -> dict[str, object]:
        """The stats body ``elapsed`` seconds after the task started."""
        elapsed = max(0.0, elapsed)
        # One generator per whole second: values hold still within a second and move between them.
        rng = random.Random(f"{self.seed}:{int(elapsed)}")
        if elapsed < self.full_phase_seconds:
            fraction = elapsed / self.full_phase_seconds
            progress, offset = min(99, int(fraction * 100)), 0
            target_keys = int(self.source_keys * fraction)
            ops, kbps = self._load(rng)
        elif self.stalled:
            progress, offset = 100, self.stalled_offset
            target_keys = max(0, self.source_keys - offset // 10)
            ops, kbps = 0, 0.0
        else:
            progress = 100
            offset = 0 if rng.random() < 0.2 else rng.randint(1, 5000)
            target_keys = max(0, self.source_keys - rng.randint(0, offset // 10))
            ops, kbps = self._load(rng)
        return {
            "full_migration_progress": self._number(progress),
            "offset": self._number(offset),
            "source_dbsize": self._number(self.source_keys),
            "target_dbsize": self._number(target_keys),
            "target_input_kbps": self._number(kbps),
            "target_ops": self._number(ops),
            "is_migrating": True,
        }

    @property
    def stalled_offset(self) -> int:
        """The non-zero offset a stalled task reports, fixed per seed."""
        return random.Random(f"{self.seed}:stall").randint(1000, 9000)

    def _load(self, rng: random.Random) -> tuple[int, float]:
        """Target ops and KB/s, jittered by up to 20 %."""
        return round(self.ops * rng.uniform(0.8, 1.2)), round(self.kbps * rng.uniform(0.8, 1.2), 1)

    def _number(self, value: float) -> object:
        return str(value) if self.numbers_as_strings else value


def _default_model(task_id: str) -> MigrationModel:
    """The model of a task added with neither model nor body: a small migration seeded by its id."""
    return MigrationModel(
        source_keys=100_000,
        full_phase_seconds=600,
        ops=500,
        kbps=64.0,
        seed=zlib.crc32(task_id.encode()),
    )


# --------------------------------------------------------------------------------------------------
# State


class RequestRecord(NamedTuple):
    """One request as the simulator saw it.

    ``time`` is the arrival time on the clock passed to the simulator (without ``clock_offset``);
    ``status`` is the status answered, 0 when no response was sent (hang, reset, client gone).
    """

    time: float
    method: str
    path: str
    task_id: str | None
    auth: AuthKind
    status: int


@dataclass
class _Task:
    task_id: str
    name: str
    status: str
    migration_method: str
    source_name: str
    target_name: str
    started: float  # clock() when the model's elapsed time was 0
    model: MigrationModel
    fixed: CannedResponse | None  # set_body(): served instead of the model
    source: StatsSource | None = None  # add_task(stats=...): a live body, before fixed and model


@dataclass
class _Token:
    project_id: str | None
    expires_at: float  # server time


@dataclass
class _Exchange:
    """Per-request bookkeeping, filled in by the handler and recorded once."""

    arrived: float
    task_id: str | None = None
    auth: AuthKind = "none"
    recorded: bool = False


_EXCHANGE = web.RequestKey("simulator_exchange", _Exchange)
_CLOSING = web.AppKey("simulator_closing", asyncio.Event)

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# --------------------------------------------------------------------------------------------------
# Response helpers


def _dcs_error(status: int, code: str, message: str) -> web.Response:
    """A DCS v2 error body (FACTS 6)."""
    body = {"error_code": code, "error_msg": message, "error_ext_msg": None}
    return web.json_response(body, status=status)


def _task_not_found() -> web.Response:
    """DCS's answer for a task id it does not know."""
    return _dcs_error(400, "DCS.4133", "Instance job is not found.")


def _auth_error(detail: str) -> web.Response:
    """The API gateway's answer to bad credentials."""
    return _dcs_error(401, "APIGW.0301", f"Incorrect IAM authentication information: {detail}")


def _iam_error(status: int, title: str, message: str) -> web.Response:
    """An IAM (Keystone-style) error body."""
    return web.json_response(
        {"error": {"code": status, "message": message, "title": title}}, status=status
    )


def _encode_body(body: object) -> bytes | None:
    if body is None:
        return None
    if isinstance(body, bytes):
        return body
    if isinstance(body, str):
        return body.encode()
    return json.dumps(body).encode()


def _canned_headers(canned: CannedResponse) -> dict[str, str]:
    headers = dict(canned.headers)
    if canned.content_type and not any(name.lower() == "content-type" for name in headers):
        headers["Content-Type"] = canned.content_type
    return headers


def _disconnected(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def _reset(request: web.Request) -> None:
    """Close the connection with a TCP RST (SO_LINGER 0), as a crashed peer or middlebox would."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def _iso(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).strftime(_IAM_TIME_FORMAT)


def _dig(data: object, *keys: str) -> object:
    """``data[k1][k2]...`` through nested dicts, or None where the path does not exist."""
    for key in keys:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def _int_param(query: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    """A query integer within [low, high]; raises ValueError otherwise."""
    raw = query.get(name)
    if raw is None or raw == "":
        return default
    value = int(raw)
    if not low <= value <= high:
        raise ValueError(name)
    return value


# --------------------------------------------------------------------------------------------------
# The simulator


class Simulator:
    """A fake DCS + IAM API for one project, with scripted stats and request accounting.

    All times (``Date`` header, signature skew, token expiry) come from ``clock() + clock_offset``,
    the server's clock; ``clock_offset`` may be changed at any time (C19). Models age on ``clock()``.
    """

    def __init__(
        self,
        *,
        project_id: str = DEMO_PROJECT_ID,
        project_name: str = DEMO_PROJECT_NAME,
        credentials: Mapping[str, str] | None = None,
        users: Mapping[tuple[str, str], str] | None = None,
        clock: Callable[[], float] = time.time,
        clock_offset: float = 0.0,
        token_ttl: float = 86400,
    ) -> None:
        """``credentials`` maps access key to secret key; ``users`` maps (domain, user) to password."""
        self.project_id = project_id
        self.project_name = project_name
        self.domain_id = uuid.uuid5(uuid.NAMESPACE_URL, f"simulator/{project_id}").hex
        self._credentials = dict(
            {DEMO_ACCESS_KEY: DEMO_SECRET_KEY} if credentials is None else credentials
        )
        self._users = dict({(DEMO_DOMAIN, DEMO_USER): DEMO_PASSWORD} if users is None else users)
        self._clock = clock
        self.clock_offset = clock_offset
        self.token_ttl = token_ttl

        self._tasks: dict[str, _Task] = {}
        self._tokens: dict[str, _Token] = {}
        self._queue_all: collections.deque[CannedResponse] = collections.deque()
        self._queues: collections.defaultdict[str, collections.deque[CannedResponse]] = (
            collections.defaultdict(collections.deque)
        )
        self._in_flight: collections.Counter[str] = collections.Counter()
        self._max_in_flight: collections.Counter[str] = collections.Counter()

        self.requests: list[RequestRecord] = []
        self.token_requests = 0

    # ---- scripting -------------------------------------------------------------------------------

    def now(self) -> float:
        """The server's time: ``clock() + clock_offset``."""
        return self._clock() + self.clock_offset

    def add_task(
        self,
        task_id: str,
        name: str,
        *,
        model: MigrationModel | None = None,
        body: object = None,
        status: str = "INCRMIGEATING",  # sic: the live API's spelling (FACTS 2)
        migration_method: str = "incremental_migration",
        source_name: str | None = None,
        target_name: str | None = None,
        started_ago: float = 0.0,
        stats: StatsSource | None = None,
    ) -> None:
        """Add (or replace) a task; its stats come from ``stats``, else ``body``, else ``model``.

        Without any, a default model seeded by the task id is used. ``started_ago`` ages the
        model, e.g. past ``full_phase_seconds`` to start in the incremental phase. ``stats`` is
        awaited on every stats call (scripted replies still come first).
        """
        self._tasks[task_id] = _Task(
            task_id=task_id,
            name=name,
            status=status,
            migration_method=migration_method,
            source_name=f"{name}-source" if source_name is None else source_name,
            target_name=f"{name}-dcs" if target_name is None else target_name,
            started=self._clock() - started_ago,
            model=model or _default_model(task_id),
            fixed=None if body is None else CannedResponse(body=body),
            source=stats,
        )

    def set_body(self, task_id: str, body: object) -> None:
        """Serve this fixed 200 stats body from now on instead of the model (None = empty body)."""
        self._task(task_id).fixed = CannedResponse(body=body)

    def set_model(self, task_id: str, model: MigrationModel, *, started_ago: float = 0.0) -> None:
        """Serve stats from ``model`` from now on (drops a fixed body)."""
        task = self._task(task_id)
        task.model, task.fixed, task.started = model, None, self._clock() - started_ago

    def set_stalled(self, task_id: str, stalled: bool) -> None:
        """Freeze (or release) the task's incremental offset; the model keeps its age."""
        task = self._task(task_id)
        task.model = replace(task.model, stalled=stalled)

    def set_status(self, task_id: str, status: str) -> None:
        """Change the status the list and details endpoints report."""
        self._task(task_id).status = status

    def push(self, task_id: str, *responses: CannedResponse) -> None:
        """Queue replies for the next stats calls of ``task_id``, before its body or model.

        Works for any id, known or not, so a script can answer for a task the cloud does not have.
        """
        self._queues[task_id].extend(responses)

    def push_all(self, *responses: CannedResponse) -> None:
        """Queue replies for the next stats calls of any task, before per-task ones (e.g. a 429)."""
        self._queue_all.extend(responses)

    def remove_task(self, task_id: str) -> None:
        """Delete the task: gone from the list, DCS.4133 from details and stats."""
        self._tasks.pop(task_id, None)

    def expire_tokens(self) -> None:
        """Make every token issued so far invalid ("token expired"); new ones work."""
        now = self.now()
        for token in self._tokens.values():
            token.expires_at = min(token.expires_at, now)

    def task_ids(self) -> list[str]:
        """Ids of the current tasks, in the order they were added."""
        return list(self._tasks)

    # ---- observability ---------------------------------------------------------------------------

    def in_flight(self, task_id: str) -> int:
        """Stats requests for ``task_id`` being answered right now (a delayed or stalled one counts)."""
        return self._in_flight[task_id]

    def max_in_flight(self, task_id: str) -> int:
        """The most stats requests for ``task_id`` that were ever open at the same time."""
        return self._max_in_flight[task_id]

    # ---- the application -------------------------------------------------------------------------

    def app(self) -> web.Application:
        """A new aiohttp application serving this simulator's state (DCS and IAM on one port)."""
        app = web.Application(middlewares=[self._middleware])
        app[_CLOSING] = asyncio.Event()

        async def on_shutdown(app: web.Application) -> None:
            app[_CLOSING].set()  # releases hanging replies so that shutdown does not wait on them

        app.on_shutdown.append(on_shutdown)
        app.router.add_post("/v3/auth/tokens", self._issue_token)
        app.router.add_get("/v3/projects", self._projects)
        app.router.add_get("/v2/{project_id}/migration-tasks", self._list_tasks)
        app.router.add_get("/v2/{project_id}/migration-task/{task_id}", self._task_details)
        app.router.add_get("/v2/{project_id}/migration-task/{task_id}/stats", self._task_stats)
        return app

    @web.middleware
    async def _middleware(self, request: web.Request, handler: _Handler) -> web.StreamResponse:
        """Record every request and stamp the server's Date on every response."""
        exchange = _Exchange(arrived=self._clock())
        request[_EXCHANGE] = exchange
        try:
            response = await handler(request)
        except web.HTTPException as exc:  # the router's 404 and 405
            code = "DCS.5001" if exc.status == 405 else "DCS.4001"
            response = _dcs_error(exc.status, code, exc.reason)
        except Exception:
            self._record(request, 500)
            raise
        self._record(request, response.status)
        if not response.prepared:
            response.headers.setdefault("Date", self._http_date())
        return response

    def _record(self, request: web.Request, status: int) -> None:
        exchange = request[_EXCHANGE]
        if exchange.recorded:
            return
        exchange.recorded = True
        self.requests.append(
            RequestRecord(
                exchange.arrived,
                request.method,
                request.path,
                exchange.task_id,
                exchange.auth,
                status,
            )
        )

    def _http_date(self) -> str:
        return formatdate(self.now(), usegmt=True)

    def _task(self, task_id: str) -> _Task:
        try:
            return self._tasks[task_id]
        except KeyError:
            raise KeyError(f"no task {task_id!r} in the simulator") from None

    # ---- authentication --------------------------------------------------------------------------

    async def _authenticate(
        self, request: web.Request, project_id: str | None
    ) -> web.Response | None:
        """None if the request may proceed, else the 401 to send; ``project_id`` from the path."""
        exchange = request[_EXCHANGE]
        body = await request.read()
        token_value = request.headers.get("X-Auth-Token")
        if "Authorization" in request.headers:
            exchange.auth = "aksk"
            reason = verify_request(
                request.method,
                request.rel_url.raw_path,
                request.rel_url.raw_query_string,
                request.headers,
                body,
                self._credentials.get,
                datetime.fromtimestamp(self.now(), UTC),
            )
            if reason is not None:
                return _auth_error(reason)
            header_project = request.headers.get("X-Project-Id")
            if project_id is not None and header_project not in (None, project_id):
                return _dcs_error(401, "DCS.1004", "X-Project-Id does not match the URL.")
            token_project: str | None = self.project_id
        elif token_value is not None:
            exchange.auth = "token"
            token = self._tokens.get(token_value)
            if token is None:
                return _auth_error("token invalid")
            if self.now() >= token.expires_at:
                return _auth_error("token expired")
            token_project = token.project_id
        else:
            return _auth_error("no X-Auth-Token or AK/SK signature")
        if project_id is not None and not project_id == token_project == self.project_id:
            return _dcs_error(401, "DCS.1004", "The project ID does not match the token.")
        return None

    # ---- IAM -------------------------------------------------------------------------------------

    async def _issue_token(self, request: web.Request) -> web.Response:
        """``POST /v3/auth/tokens``: password auth, scoped to the project by name or id (FACTS 5a)."""
        self.token_requests += 1
        request[_EXCHANGE].auth = "password"
        try:
            payload = json.loads(await request.read())
        except ValueError:
            return _iam_error(400, "Bad Request", "The request body is not valid JSON.")
        identity = _dig(payload, "auth", "identity")
        methods = _dig(identity, "methods")
        user = _dig(identity, "password", "user")
        if not isinstance(methods, list) or "password" not in methods or not isinstance(user, dict):
            return _iam_error(400, "Bad Request", "Expecting password authentication.")
        domain, name = _dig(user, "domain", "name"), user.get("name")
        if (
            not isinstance(domain, str)
            or not isinstance(name, str)
            or self._users.get((domain, name)) != user.get("password")
        ):
            return _iam_error(401, "Unauthorized", "The username or password is wrong.")

        # Project scope gives a project token; a domain scope (or none) gives one DCS refuses.
        scope = _dig(payload, "auth", "scope", "project")
        project_id: str | None = None
        if isinstance(scope, dict):
            if not self._is_project(scope):
                return _iam_error(401, "Unauthorized", "The project in the scope does not exist.")
            project_id = self.project_id

        value = secrets.token_urlsafe(48)
        issued = self.now()
        self._tokens[value] = _Token(project_id, issued + self.token_ttl)
        body = {"token": self._token_body(issued, project_id, domain, name)}
        if request.query.get("nocatalog") != "true":
            body["token"]["catalog"] = self._catalog(request)
        return web.json_response(body, status=201, headers={"X-Subject-Token": value})

    def _is_project(self, scope: dict[str, object]) -> bool:
        """Whether a scope's ``{"id": ...}`` or ``{"name": ...}`` (or both) names this project."""
        if "id" not in scope and "name" not in scope:
            return False
        return scope.get("id", self.project_id) == self.project_id and scope.get(
            "name", self.project_name
        ) == (self.project_name)

    def _token_body(
        self, issued: float, project_id: str | None, domain: str, user: str
    ) -> dict[str, object]:
        domain_ref = {"id": self.domain_id, "name": domain}
        body: dict[str, object] = {
            "expires_at": _iso(issued + self.token_ttl),
            "issued_at": _iso(issued),
            "methods": ["password"],
            "user": {
                "id": uuid.uuid5(uuid.NAMESPACE_URL, user).hex,
                "name": user,
                "domain": domain_ref,
            },
        }
        if project_id is not None:
            body["project"] = {"id": project_id, "name": self.project_name, "domain": domain_ref}
        else:
            body["domain"] = domain_ref
        return body

    def _catalog(self, request: web.Request) -> list[dict[str, object]]:
        base = f"{request.scheme}://{request.host}"
        return [
            {"type": kind, "name": kind, "endpoints": [{"interface": "public", "url": url}]}
            for kind, url in (("identity", f"{base}/v3"), ("dcsv2", f"{base}/v2/{self.project_id}"))
        ]

    async def _projects(self, request: web.Request) -> web.Response:
        """``GET /v3/projects?name=NAME`` (FACTS 4): the project if the name matches."""
        if (denied := await self._authenticate(request, None)) is not None:
            return denied
        name = request.query.get("name")
        projects = []
        if name in (None, self.project_name):
            projects.append(
                {
                    "id": self.project_id,
                    "name": self.project_name,
                    "domain_id": self.domain_id,
                    "parent_id": self.domain_id,
                    "enabled": True,
                    "is_domain": False,
                    "description": "",
                }
            )
        return web.json_response({"projects": projects})

    # ---- DCS -------------------------------------------------------------------------------------

    async def _list_tasks(self, request: web.Request) -> web.Response:
        """``GET /v2/{project_id}/migration-tasks`` with offset/limit paging and a name filter (FACTS 1a)."""
        if (
            denied := await self._authenticate(request, request.match_info["project_id"])
        ) is not None:
            return denied
        try:
            offset = _int_param(request.query, "offset", 0, 0, sys.maxsize)
            limit = _int_param(request.query, "limit", 10, 1, 1000)
        except ValueError:
            # The code is illustrative: the docs give none for a bad paging parameter.
            return _dcs_error(400, "DCS.4800", "Invalid offset or limit.")
        name = request.query.get("name", "")
        matches = [task for task in self._tasks.values() if name in task.name]
        page = matches[offset : offset + limit]
        return web.json_response(
            {"count": len(matches), "migration_tasks": [self._list_entry(task) for task in page]}
        )

    async def _task_request(self, request: web.Request) -> tuple[str, web.Response | None]:
        """The path's task id (recorded for the request log), and the 401 to send if any."""
        task_id = request.match_info["task_id"]
        request[_EXCHANGE].task_id = task_id
        return task_id, await self._authenticate(request, request.match_info["project_id"])

    async def _task_details(self, request: web.Request) -> web.Response:
        """``GET /v2/{project_id}/migration-task/{task_id}``, passwords included (FACTS 1b)."""
        task_id, denied = await self._task_request(request)
        if denied is not None:
            return denied
        task = self._tasks.get(task_id)
        if task is None:
            return _task_not_found()
        return web.json_response(self._details(task))

    async def _task_stats(self, request: web.Request) -> web.StreamResponse:
        """``GET /v2/{project_id}/migration-task/{task_id}/stats``: scripts first, then body or model."""
        task_id, denied = await self._task_request(request)
        if denied is not None:
            return denied
        self._in_flight[task_id] += 1
        self._max_in_flight[task_id] = max(self._max_in_flight[task_id], self._in_flight[task_id])
        try:
            canned = self._next_canned(task_id)
            if canned is not None:
                return await self._play(request, canned)
            task = self._tasks.get(task_id)
            if task is None:
                return _task_not_found()
            if task.source is not None:
                return web.json_response(dict(await task.source()))
            if task.fixed is not None:
                return await self._play(request, task.fixed)
            return web.json_response(task.model.stats_at(self._clock() - task.started))
        finally:
            self._in_flight[task_id] -= 1

    def _next_canned(self, task_id: str) -> CannedResponse | None:
        if self._queue_all:
            return self._queue_all.popleft()
        queue = self._queues.get(task_id)
        return queue.popleft() if queue else None

    # ---- playing a scripted reply ----------------------------------------------------------------

    async def _play(self, request: web.Request, canned: CannedResponse) -> web.StreamResponse:
        """Send ``canned``, or misbehave as it says."""
        silent = canned.hang or canned.reset
        self._record(
            request, 0 if silent else canned.status
        )  # now: arrival order, not finish order
        if canned.delay > 0 and not await self._wait(request, canned.delay):
            return self._abandon(request)
        if canned.reset:
            _reset(request)
            return web.Response()  # never written: the connection is gone
        if canned.hang:
            await self._wait(request, None)
            return self._abandon(request)
        if canned.partial is not None:
            return await self._send_partial(request, canned, canned.partial)
        return web.Response(
            status=canned.status, body=_encode_body(canned.body), headers=_canned_headers(canned)
        )

    async def _send_partial(
        self, request: web.Request, canned: CannedResponse, partial: bytes
    ) -> web.StreamResponse:
        """Headers promising more than ``partial``, then ``partial``, then silence (C12b)."""
        response = web.StreamResponse(status=canned.status, headers=_canned_headers(canned))
        response.content_length = len(partial) + _PARTIAL_MISSING
        response.headers.setdefault("Date", self._http_date())
        await response.prepare(request)
        await response.write(partial)
        await self._wait(request, None)
        self._abandon(request)
        return response  # aiohttp's final write_eof fails quietly on the closed transport

    async def _wait(self, request: web.Request, seconds: float | None) -> bool:
        """Sleep ``seconds`` (None: forever); False early if the client left or the server stops.

        Polls the transport rather than relying on handler cancellation, which aiohttp leaves off
        by default; without this a timed-out client would leave its request "in flight" for ever.
        """
        loop = asyncio.get_running_loop()
        deadline = None if seconds is None else loop.time() + seconds
        closing = request.app[_CLOSING]
        while not (_disconnected(request) or closing.is_set()):
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                return True
            step = _POLL_SECONDS if remaining is None else min(_POLL_SECONDS, remaining)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(closing.wait(), step)
        return False

    @staticmethod
    def _abandon(request: web.Request) -> web.Response:
        """Drop the connection of a reply that will not be sent; the returned response never is."""
        if request.transport is not None:
            request.transport.abort()
        return web.Response()

    # ---- bodies ----------------------------------------------------------------------------------

    def _list_entry(self, task: _Task) -> dict[str, object]:
        """A MigrationTaskList entry (FACTS 1a); its created_at uses the list's ISO format."""
        source, target = self._instance(task, "source"), self._instance(task, "target")
        return {
            "task_id": task.task_id,
            "task_name": task.name,
            "status": _LIST_STATUS.get(task.status, task.status),
            "migration_type": "online_migration",
            "migration_method": task.migration_method,
            "ecs_tenant_private_ip": "192.168.0.5",
            "data_source": source["addrs"],
            "source_instance_name": task.source_name,
            "source_instance_id": source["id"],
            "target_instance_addrs": target["addrs"],
            "target_instance_name": task.target_name,
            "target_instance_id": target["id"],
            "created_at": datetime.fromtimestamp(task.started + self.clock_offset, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "description": "",
            "source_instance_status": "RUNNING",
            "target_instance_status": "RUNNING",
            "source_instance_subnet_id": self._uuid(task, "subnet"),
            "target_instance_subnet_id": self._uuid(task, "subnet"),
            "source_instance_spec_code": "redis.ha.xu1.large.r2.4",
            "target_instance_spec_code": "redis.ha.xu1.large.r2.4",
            "error_message": None,
            "released_at": "",
            "version": "6.0.21",
            "resume_mode": "auto",
            "supported_features": [],
        }

    def _details(self, task: _Task) -> dict[str, object]:
        """The details body (FACTS 1b), with the documented slash-separated created_at."""
        created = datetime.fromtimestamp(task.started + self.clock_offset, UTC)
        return {
            "task_id": task.task_id,
            "task_name": task.name,
            "description": "",
            "status": task.status,
            "migration_type": "online_migration",
            "migration_method": task.migration_method,
            "ecs_tenant_private_ip": "192.168.0.5",
            "backup_files": {"file_source": "", "bucket_name": "", "files": [], "backup_id": ""},
            "network_type": "vpc",
            "source_instance": self._instance(task, "source"),
            "target_instance": self._instance(task, "target"),
            "created_at": created.strftime("%Y/%m/%d %H:%M:%S"),
            "updated_at": datetime.fromtimestamp(self.now(), UTC).strftime("%Y/%m/%d %H:%M:%S"),
            "released_at": "",
            "version": "6.0.21",
            "resume_mode": "auto",
            "supported_features": [],
            "tenant_vpc_id": self._uuid(task, "vpc"),
            "tenant_subnet_id": self._uuid(task, "subnet"),
            "tenant_security_group_id": self._uuid(task, "security-group"),
            "bandwidth_limit_mb": "0",
            "task_status": "",
        }

    def _instance(self, task: _Task, role: Literal["source", "target"]) -> dict[str, object]:
        ip = f"192.168.{1 if role == 'source' else 2}.{zlib.crc32(task.task_id.encode()) % 250 + 2}"
        return {
            "addrs": f"{ip}:6379",
            "password": SOURCE_PASSWORD if role == "source" else TARGET_PASSWORD,
            "task_status": "",
            "id": self._uuid(task, role),
            "ip": ip,
            "port": "6379",
            "name": task.source_name if role == "source" else task.target_name,
            "proxy_multi_db": False,
            "db": "0",
        }

    @staticmethod
    def _uuid(task: _Task, what: str) -> str:
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"simulator/{task.task_id}/{what}"))


# --------------------------------------------------------------------------------------------------
# Demo and serving


def demo_simulator(clock: Callable[[], float] = time.time) -> Simulator:
    """A simulator with three healthy tasks: one in the full phase, one incremental, one that sends
    bare numbers instead of the documented strings."""
    sim = Simulator(clock=clock)
    (orders_id, orders), (sessions_id, sessions), (catalog_id, catalog) = DEMO_TASKS
    sim.add_task(
        orders_id,
        orders,
        # Four hours of full copy, 10 min in: progress visibly climbs during a demo.
        model=MigrationModel(1_250_000, full_phase_seconds=14_400, ops=1800, kbps=2400.0, seed=1),
        status="FULLMIGRATING",
        started_ago=600,
    )
    sim.add_task(
        sessions_id,
        sessions,
        model=MigrationModel(531_221, full_phase_seconds=900, ops=5300, kbps=50.0, seed=2),
        started_ago=7200,
    )
    sim.add_task(
        catalog_id,
        catalog,
        model=MigrationModel(
            88_000, full_phase_seconds=600, ops=300, kbps=12.5, seed=3, numbers_as_strings=False
        ),
        started_ago=3600,
    )
    return sim


async def start(
    sim: Simulator,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    ssl_context: ssl.SSLContext | None = None,
) -> tuple[web.AppRunner, str]:
    """Serve ``sim`` on host:port (0 = any free port); returns the runner and ``http://HOST:PORT``
    (``https://`` with ``ssl_context``, as the real API is served).

    Stop it with ``await runner.cleanup()``.
    """
    runner = web.AppRunner(sim.app(), access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, ssl_context=ssl_context).start()
    except BaseException:
        await runner.cleanup()
        raise
    bound_port = runner.addresses[0][1]
    shown = f"[{host}]" if ":" in host else host
    scheme = "https" if ssl_context is not None else "http"
    return runner, f"{scheme}://{shown}:{bound_port}"


def _parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _banner(sim: Simulator, base_url: str) -> str:
    tasks = "\n".join(f"    - id: {task_id!r}\n      name: {name}" for task_id, name in DEMO_TASKS)
    return f"""\
DCS migration API simulator listening on {base_url} (demo data and demo credentials only)
  DCS endpoint: {base_url}
  IAM endpoint: {base_url}/v3
  project:      {sim.project_name} ({sim.project_id})
  AK/SK:        {DEMO_ACCESS_KEY} / {DEMO_SECRET_KEY}
  IAM user:     {DEMO_USER} / {DEMO_PASSWORD} (domain {DEMO_DOMAIN})

Exporter config for it:
  cloud:
    region: {sim.project_name}
    project_id: {sim.project_id!r}
    dcs_endpoint: {base_url}
    iam_endpoint: {base_url}/v3
  auth:
    access_key: {DEMO_ACCESS_KEY}
    secret_key: {DEMO_SECRET_KEY}
  tasks:
{tasks}
"""


async def _serve(host: str, port: int) -> None:
    sim = demo_simulator()
    runner, base_url = await start(sim, host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    print(_banner(sim, base_url), flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m exporter.simulator``: serve the demo tasks until SIGINT or SIGTERM."""
    parser = argparse.ArgumentParser(
        prog="python -m exporter.simulator",
        description="Fake DCS + IAM API serving three demo migration tasks.",
    )
    parser.add_argument(
        "--listen",
        type=_parse_listen,
        default=("127.0.0.1", 8080),
        metavar="HOST:PORT",
        help="address to listen on (default 127.0.0.1:8080; port 0 picks a free one)",
    )
    args = parser.parse_args(argv)
    host, port = args.listen
    asyncio.run(_serve(host, port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
