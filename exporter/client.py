"""The only module that speaks HTTP to DCS and IAM.

Every call returns a decoded, typed result or raises ApiError with a kind from a fixed set, the
HTTP status and the DCS error code, so that the poller can count and log failures without
looking at raw responses. Secrets never reach an exception or a log line, and the task details
body (which carries Redis passwords) is reduced to the few fields the exporter shows.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from enum import StrEnum
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp

from exporter import __version__
from exporter.auth import IssuedToken, TokenCache, canonical_query, parse_expires_at, sign_request
from exporter.config import AkSkAuth, Auth, CloudConfig, PasswordAuth
from exporter.throttle import Throttle

log = logging.getLogger(__name__)

USER_AGENT = f"dcs-migration-exporter/{__version__}"
MAX_BODY_BYTES = 1 << 20  # a stats body is a few hundred bytes; refuse to buffer a runaway one
GONE_CODES = frozenset({"DCS.4133"})  # "Instance job is not found": the task no longer exists
# Signatures are checked against the gateway's clock; beyond this the gateway rejects them.
SKEW_LIMIT_SECONDS = 300.0
LIST_PAGE_SIZE = 100


class ErrorKind(StrEnum):
    """Why a call failed; the fixed set used as the ``reason`` label."""

    TIMEOUT = "timeout"
    CONNECTION = "connection"
    THROTTLED = "throttled"
    AUTH = "auth"
    PERMISSION = "permission"
    NOT_FOUND = "not_found"
    SERVER_ERROR = "server_error"
    CLIENT_ERROR = "client_error"
    INVALID_JSON = "invalid_json"
    EMPTY_BODY = "empty_body"
    UNEXPECTED_SHAPE = "unexpected_shape"
    INTERNAL = "internal"


class ApiError(Exception):
    """A failed call, classified; ``str()`` is a log line without secrets."""

    def __init__(
        self,
        kind: ErrorKind,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        retry_after: float | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.status = status
        self.code = code
        self.retry_after = retry_after
        self.request_id = request_id

    @property
    def status_label(self) -> str:
        """The HTTP status, or the kind when no answer came (timeout, connection)."""
        return str(self.status) if self.status is not None else self.kind.value

    @property
    def gone(self) -> bool:
        """True when the cloud says the task does not exist (any more)."""
        return self.code in GONE_CODES


@dataclass(frozen=True)
class TaskDetails:
    """What the exporter keeps of the task details API: no addresses, no passwords."""

    task_id: str
    task_name: str
    status: str
    migration_type: str
    migration_method: str
    source_instance_name: str
    target_instance_name: str


@dataclass(frozen=True)
class ErrorBody:
    """The code and message of an error answer, whichever of the known shapes it had."""

    code: str | None
    message: str | None


def parse_error_body(body: Any) -> ErrorBody:
    """Read an error body in any shape the DCS and gateway APIs use.

    Shapes seen: ``{"error_code","error_msg"}`` (DCS v2), ``{"errorCode","errorMsg"}``,
    ``{"code","message"}``, and nested ``{"error": {"code","message"}}`` (v1 and Keystone).
    """
    if not isinstance(body, dict):
        return ErrorBody(None, None)
    for code_key, message_key in (
        ("error_code", "error_msg"),
        ("errorCode", "errorMsg"),
        ("code", "message"),
    ):
        if code_key in body or message_key in body:
            code, message = body.get(code_key), body.get(message_key)
            return ErrorBody(
                str(code)[:32] if code is not None else None,
                str(message)[:300] if message is not None else None,
            )
    nested = body.get("error")
    if isinstance(nested, dict):
        return parse_error_body(nested)
    return ErrorBody(None, None)


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - now).total_seconds())


def _text_preview(raw: bytes) -> str:
    """The first ~200 characters of a body, on one line, for the log."""
    text = raw[:400].decode("utf-8", errors="replace")
    return " ".join(text.split())[:200]


def _looks_like_token_rejection(status: int, error: ErrorBody) -> bool:
    """401, or a 403 whose message says the token itself is bad (not a missing permission)."""
    if status == 401:
        return True
    message = (error.message or "").lower()
    return status == 403 and "token" in message and ("invalid" in message or "expired" in message)


@dataclass(frozen=True)
class _Answer:
    status: int
    headers: Mapping[str, str]
    raw: bytes
    content_type: str


class DcsClient:
    """DCS calls for one project, with its auth, timeouts and throttle."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        cloud: CloudConfig,
        auth: Auth,
        *,
        timeout: float,
        throttle: Throttle,
        token_refresh_margin: float = 3600.0,
        wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._session = session
        self._cloud = cloud
        self._auth = auth
        self._timeout = timeout
        self._throttle = throttle
        self._wall_clock = wall_clock
        self._project_id = cloud.project_id
        self._project_lock = asyncio.Lock()
        self.clock_skew: float | None = None  # server Date minus local clock, once measured
        self._clock_correction = 0.0
        self.tokens: TokenCache | None = None
        if isinstance(auth, PasswordAuth):
            self.tokens = TokenCache(
                self._fetch_token,
                clock=self._wall_clock,
                refresh_margin=timedelta(seconds=token_refresh_margin),
            )

    @property
    def token_fetches(self) -> int:
        """IAM token requests made so far."""
        return self.tokens.fetch_count if self.tokens else 0

    # ---- public calls -------------------------------------------------------------------

    async def get_stats(self, task_id: str) -> Any:
        """The decoded stats body of one task (shape checked by stats.parse_stats)."""
        project = await self.project_id()
        return await self._dcs_get(f"/v2/{project}/migration-task/{quote(task_id)}/stats")

    async def get_task(self, task_id: str) -> TaskDetails:
        """The task's name, status and instance names; the rest of the body is dropped."""
        project = await self.project_id()
        body = await self._dcs_get(f"/v2/{project}/migration-task/{quote(task_id)}")
        if not isinstance(body, dict):
            raise ApiError(ErrorKind.UNEXPECTED_SHAPE, "task details: expected a JSON object")
        return _details_from(body, task_id)

    async def list_tasks(self, name: str | None = None) -> list[TaskDetails]:
        """Every migration task of the project, following the offset/limit pages."""
        project = await self.project_id()
        tasks: list[TaskDetails] = []
        offset = 0
        while True:
            query: list[tuple[str, str]] = [("offset", str(offset)), ("limit", str(LIST_PAGE_SIZE))]
            if name:
                query.append(("name", name))
            body = await self._dcs_get(f"/v2/{project}/migration-tasks", query)
            entries = body.get("migration_tasks") if isinstance(body, dict) else None
            if not isinstance(entries, list):
                raise ApiError(ErrorKind.UNEXPECTED_SHAPE, "task list: no migration_tasks list")
            tasks.extend(
                _details_from(entry, str(entry.get("task_id", "")))
                for entry in entries
                if isinstance(entry, dict) and entry.get("task_id")
            )
            count = body.get("count") if isinstance(body, dict) else None
            offset += len(entries)
            if not entries or (isinstance(count, int) and offset >= count):
                return tasks

    async def project_id(self) -> str:
        """The configured project ID, or the one IAM knows by the project's name (looked up once)."""
        if self._project_id is not None:
            return self._project_id
        async with self._project_lock:
            if self._project_id is None:
                self._project_id = await self._resolve_project_id()
        return self._project_id

    # ---- auth -----------------------------------------------------------------------------

    @property
    def _project_name(self) -> str:
        return self._cloud.project_name or self._cloud.region

    async def _resolve_project_id(self) -> str:
        """Find the project's ID: from the token's scope, or by name through the IAM API."""
        if self.tokens is not None:
            token = await self.tokens.get()
            if token.project_id:
                return token.project_id
        url = f"{self._cloud.iam_endpoint}/projects"
        body = await self._get_json(url, [("name", self._project_name)], project_header=False)
        projects = body.get("projects") if isinstance(body, dict) else None
        if (
            not isinstance(projects, list)
            or len(projects) != 1
            or not isinstance(projects[0], dict)
        ):
            found = len(projects) if isinstance(projects, list) else 0
            raise ApiError(
                ErrorKind.CLIENT_ERROR,
                f"IAM knows {found} projects named {self._project_name!r}; "
                "set cloud.project_id or cloud.project_name",
            )
        return str(projects[0].get("id"))

    async def _fetch_token(self) -> IssuedToken:
        """Ask IAM for a project-scoped token with the configured password."""
        auth = self._auth
        assert isinstance(auth, PasswordAuth)
        scope: dict[str, str] = (
            {"id": self._cloud.project_id}
            if self._cloud.project_id
            else {"name": self._project_name}
        )
        payload = {
            "auth": {
                "identity": {
                    "methods": ["password"],
                    "password": {
                        "user": {
                            "name": auth.username,
                            "password": auth.password.read(),
                            "domain": {"name": auth.domain_name},
                        }
                    },
                },
                "scope": {"project": scope},
            }
        }
        url = f"{self._cloud.iam_endpoint}/auth/tokens?nocatalog=true"
        headers = {"Content-Type": "application/json;charset=utf8", "User-Agent": USER_AGENT}
        answer = await self._send("POST", url, headers, json.dumps(payload).encode())
        if answer.status not in (200, 201):
            raise self._error_for(answer, what="IAM token request")
        token = answer.headers.get("X-Subject-Token")
        body = _decode(answer)
        expires = body.get("token", {}).get("expires_at") if isinstance(body, dict) else None
        if not token or not isinstance(expires, str):
            raise ApiError(ErrorKind.AUTH, "IAM token answer lacks X-Subject-Token or expires_at")
        project = body["token"].get("project") if isinstance(body["token"], dict) else None
        project_id = project.get("id") if isinstance(project, dict) else None
        log.info("obtained an IAM token for user %s, valid until %s", auth.username, expires)
        return IssuedToken(value=token, expires_at=parse_expires_at(expires), project_id=project_id)

    async def _auth_headers(self, method: str, url: str, project_header: bool) -> dict[str, str]:
        """Headers that authenticate one attempt; a signature is always made fresh."""
        headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT}
        auth = self._auth
        if isinstance(auth, AkSkAuth):
            if project_header and self._project_id:
                headers["X-Project-Id"] = self._project_id
            if auth.security_token is not None:
                headers["X-Security-Token"] = auth.security_token.read()
            now = self._wall_clock() + timedelta(seconds=self._clock_correction)
            return sign_request(
                method, url, headers, b"", auth.access_key, auth.secret_key.read(), now
            )
        assert self.tokens is not None
        headers["X-Auth-Token"] = (await self.tokens.get()).value
        return headers

    # ---- transport ------------------------------------------------------------------------

    async def _dcs_get(self, path: str, query: Sequence[tuple[str, str]] = ()) -> Any:
        return await self._get_json(f"{self._cloud.dcs_endpoint}{path}", query, project_header=True)

    async def _get_json(
        self, url: str, query: Sequence[tuple[str, str]], *, project_header: bool
    ) -> Any:
        """GET with auth, one retry after a token refresh or skew correction, then decode."""
        if query:
            url = f"{url}?{canonical_query(query)}"
        retried = False
        while True:
            await self._throttle.acquire()
            headers = await self._auth_headers("GET", url, project_header)
            answer = await self._send("GET", url, headers, b"")
            if 200 <= answer.status < 300:
                self._throttle.succeeded()
                return _decode(answer)
            error = self._error_for(answer, what=f"GET {urlsplit(url).path}")
            if answer.status == 429:
                pause = self._throttle.throttled(error.retry_after)
                log.warning(
                    "throttled by the API (%s); pausing the project for %.1fs", error, pause
                )
                raise error
            if not retried and await self._recover(answer, headers, error):
                retried = True
                continue
            raise error

    async def _recover(self, answer: _Answer, sent: Mapping[str, str], error: ApiError) -> bool:
        """After an auth failure, fix what can be fixed (token, clock) and say whether to retry."""
        body_error = parse_error_body(_decode_quietly(answer))
        if not _looks_like_token_rejection(answer.status, body_error):
            return False
        if self.tokens is not None:
            rejected = sent.get("X-Auth-Token", "")
            fresh = await self.tokens.refresh_after_rejection(rejected)
            if fresh is None:
                log.error("token rejected again after a recent refresh: %s", error)
            return fresh is not None
        return self._correct_clock(answer)

    def _correct_clock(self, answer: _Answer) -> bool:
        """Measure skew from the server's Date header; correct signing time when it is too large."""
        date = answer.headers.get("Date")
        if not date:
            return False
        try:
            server_time = parsedate_to_datetime(date)
        except (TypeError, ValueError):
            return False
        if server_time.tzinfo is None:
            server_time = server_time.replace(tzinfo=UTC)
        skew = (server_time - self._wall_clock()).total_seconds()
        self.clock_skew = skew
        if abs(skew) < SKEW_LIMIT_SECONDS or abs(skew - self._clock_correction) < 2.0:
            return False
        log.error(
            "signature rejected and the local clock differs from the API server's Date header by "
            "%.0f s; fix the host clock (NTP). Signing with the server's time from now on.",
            skew,
        )
        self._clock_correction = skew
        return True

    async def _send(
        self, method: str, url: str, headers: Mapping[str, str], body: bytes
    ) -> _Answer:
        """One HTTP exchange with a hard deadline; a reset keep-alive connection is retried once."""
        timeout = aiohttp.ClientTimeout(total=self._timeout)
        for attempt in (1, 2):
            try:
                async with self._session.request(
                    method, url, headers=headers, data=body or None, timeout=timeout
                ) as response:
                    raw = await _read_bounded(response)
                    if raw is None:
                        raise ApiError(
                            ErrorKind.INVALID_JSON,
                            f"{method} {urlsplit(url).path}: body larger than {MAX_BODY_BYTES} bytes",
                            status=response.status,
                        )
                    return _Answer(
                        status=response.status,
                        headers=response.headers,
                        raw=raw,
                        content_type=response.headers.get("Content-Type", ""),
                    )
            except TimeoutError:
                raise ApiError(
                    ErrorKind.TIMEOUT,
                    f"{method} {urlsplit(url).path}: no complete answer within {self._timeout:g}s",
                ) from None
            except aiohttp.ServerDisconnectedError:
                # A pooled connection the server had already closed; safe to repeat a GET once.
                if attempt == 1 and method == "GET":
                    continue
                raise ApiError(
                    ErrorKind.CONNECTION, f"{method} {urlsplit(url).path}: server disconnected"
                ) from None
            except aiohttp.ClientError as exc:
                raise ApiError(
                    ErrorKind.CONNECTION,
                    f"{method} {urlsplit(url).path}: {type(exc).__name__}: {exc}",
                ) from None
        raise AssertionError("unreachable")

    def _error_for(self, answer: _Answer, *, what: str) -> ApiError:
        """Classify a non-2xx answer."""
        error = parse_error_body(_decode_quietly(answer))
        status = answer.status
        if error.code in GONE_CODES or status == 404:
            kind = ErrorKind.NOT_FOUND
        elif status == 429:
            kind = ErrorKind.THROTTLED
        elif status == 401 or _looks_like_token_rejection(status, error):
            kind = ErrorKind.AUTH
        elif status == 403:
            kind = ErrorKind.PERMISSION
        elif status >= 500:
            kind = ErrorKind.SERVER_ERROR
        else:
            kind = ErrorKind.CLIENT_ERROR
        if error.code or error.message:
            detail = f"{error.code or '-'}: {error.message or '-'}"
        else:
            detail = (
                f"content-type {answer.content_type or 'none'}, body {_text_preview(answer.raw)!r}"
            )
        request_id = answer.headers.get("X-Request-Id")
        return ApiError(
            kind,
            f"{what}: HTTP {status} {detail}"
            + (f" (request id {request_id})" if request_id else ""),
            status=status,
            code=error.code,
            retry_after=parse_retry_after(answer.headers.get("Retry-After"), self._wall_clock()),
            request_id=request_id,
        )


async def _read_bounded(response: aiohttp.ClientResponse) -> bytes | None:
    """The whole body, or None when it is larger than MAX_BODY_BYTES."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _decode(answer: _Answer) -> Any:
    """Decode a successful answer's JSON body, classifying empty and broken bodies."""
    if not answer.raw.strip():
        raise ApiError(
            ErrorKind.EMPTY_BODY, f"HTTP {answer.status} with an empty body", status=answer.status
        )
    try:
        return json.loads(answer.raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(
            ErrorKind.INVALID_JSON,
            f"HTTP {answer.status} body is not JSON ({exc}); content-type "
            f"{answer.content_type or 'none'}, body {_text_preview(answer.raw)!r}",
            status=answer.status,
        ) from None


def _decode_quietly(answer: _Answer) -> Any:
    """An error answer's JSON body, or None when it has none (HTML from a proxy, say)."""
    try:
        return json.loads(answer.raw) if answer.raw.strip() else None
    except (ValueError, UnicodeDecodeError):
        return None


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _details_from(body: dict[str, Any], task_id: str) -> TaskDetails:
    """Keep only the display fields of a details or list entry."""

    def instance_name(key: str, flat_key: str) -> str:
        nested = body.get(key)
        if isinstance(nested, dict) and isinstance(nested.get("name"), str):
            return str(nested["name"])
        return _text(body.get(flat_key))

    return TaskDetails(
        task_id=task_id,
        task_name=_text(body.get("task_name")),
        status=_text(body.get("status")),
        migration_type=_text(body.get("migration_type")),
        migration_method=_text(body.get("migration_method")),
        source_instance_name=instance_name("source_instance", "source_instance_name"),
        target_instance_name=instance_name("target_instance", "target_instance_name"),
    )
