"""The only module that speaks HTTP to DCS and IAM.

Every call returns a decoded, typed result or raises ApiError with a kind from a fixed set, the
HTTP status and the DCS error code, so that the poller can count and log failures without
looking at raw responses. Secrets never reach an exception or a log line, and the task details
body (which carries Redis passwords) is reduced to the few fields the exporter shows.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from enum import StrEnum
from typing import Any, TypeVar
from urllib.parse import quote

import aiohttp
import yarl

from exporter import __version__
from exporter.auth import IssuedToken, TokenCache, canonical_query, parse_expires_at, sign_request
from exporter.config import AkSkAuth, Auth, CloudConfig, PasswordAuth, Secret, is_project_id
from exporter.throttle import Throttle, WaitTooLong

log = logging.getLogger(__name__)
T = TypeVar("T")

USER_AGENT = f"dcs-migration-exporter/{__version__}"
MAX_BODY_BYTES = 1 << 20  # a stats body is a few hundred bytes; refuse to buffer a runaway one
GONE_CODES = frozenset({"DCS.4133"})  # "Instance job is not found": the task no longer exists
# Signatures are checked against the gateway's clock; beyond this the gateway rejects them.
SKEW_LIMIT_SECONDS = 300.0
# After IAM refuses the credentials, ask again only this much later: every task of the project
# shares the answer, so that a wrong password costs one failed login per 5 minutes, not one per
# poll (IAM locks a user out after a few failed logins).
CREDENTIALS_REFUSED_HOLD_SECONDS = 300.0
# After IAM did not answer (timeout, 5xx), the hold doubles from the first to the last value.
IAM_OUTAGE_HOLD_SECONDS = (5.0, 60.0)
LIST_PAGE_SIZE = 100
MAX_LIST_PAGES = 1000  # a server that ignores ``offset`` must not keep the lister going for ever
_DELTA_SECONDS = re.compile(r"\s*[0-9]+(?:\.[0-9]+)?\s*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")  # C0, DEL, C1 and Unicode line breaks
_REDACTED = "<redacted>"
# A body made of these keys only, with an error_code, is an error even under a 2xx status.
_ERROR_ONLY_KEYS = frozenset(
    {"error_code", "error_msg", "error_ext_msg", "request_id", "encoded_authorization_message"}
)


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
        sent: bool = True,
        held: bool = False,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.status = status
        self.code = code
        self.retry_after = retry_after
        self.request_id = request_id
        self.sent = sent  # False: failed before a request went out (pause in force, secret file)
        # True: refused at once because of an earlier failure that was logged when it happened
        # (a 429 pause, an IAM hold); the poller does not log each of these again.
        self.held = held

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
    request_id: str | None = None


_ERROR_SHAPES = (("error_code", "error_msg"), ("errorCode", "errorMsg"), ("code", "message"))


def _clip(value: Any, limit: int) -> str | None:
    """A body value as one printable line of at most ``limit`` characters (None stays None)."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value
    else:
        try:
            text = json.dumps(value, default=str)[: limit * 2]
        except (RecursionError, ValueError):
            text = f"<{type(value).__name__}>"
    text = _CONTROL.sub(" ", text).strip()  # no forged log lines from a body
    return text[:limit] or None


def parse_error_body(body: Any, _depth: int = 0) -> ErrorBody:
    """Read an error body in any shape the DCS and gateway APIs use; never raises.

    Shapes, in the order the official SDK tries them: ``{"error_code","error_msg"}`` (DCS v2,
    API gateway), ``{"errorCode","errorMsg"}``, ``{"code","message"}``, then the same inside any
    nested object (``{"error": {...}}`` of v1 and IAM, ``{"badRequest": {...}}``). A shape whose
    values are both null does not count. ``request_id`` comes from the body when it has one.
    """
    if not isinstance(body, dict) or _depth > 4:
        return ErrorBody(None, None)
    request_id = (
        _clip(body.get("request_id"), 64) if isinstance(body.get("request_id"), str) else None
    )
    for code_key, message_key in _ERROR_SHAPES:
        code, message = body.get(code_key), body.get(message_key)
        if code is not None or message is not None:
            return ErrorBody(_clip(code, 32), _clip(message, 300), request_id)
    for value in body.values():
        nested = parse_error_body(value, _depth + 1)
        if nested.code is not None or nested.message is not None:
            return ErrorBody(nested.code, nested.message, nested.request_id or request_id)
    return ErrorBody(None, None, request_id)


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date).

    ``now`` should be the server's time (its ``Date`` header) so that a skewed local clock does
    not distort an HTTP date. Anything else (negative, ``nan``, garbage) gives None, which means
    the caller's own backoff applies.
    """
    if value is None:
        return None
    if _DELTA_SECONDS.fullmatch(value):
        return float(value)
    try:
        when = parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - now).total_seconds())


def _server_time(headers: Mapping[str, str]) -> datetime | None:
    """The server's clock from its ``Date`` header, if it sent a readable one."""
    date = headers.get("Date")
    if not date:
        return None
    try:
        moment = parsedate_to_datetime(date)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def encode_segment(segment: str) -> str:
    """Percent-encode one path segment exactly as the signer's canonical URI does."""
    return quote(segment, safe="~")


def _text_preview(raw: bytes) -> str:
    """The first ~200 characters of a body, on one line, for the log."""
    text = _CONTROL.sub(" ", raw[:400].decode("utf-8", errors="replace"))
    return " ".join(text.split())[:200]


def _looks_like_token_rejection(status: int, error: ErrorBody) -> bool:
    """401, or a 403 whose message says the token itself is bad (not a missing permission)."""
    if status == 401:
        return True
    message = (error.message or "").lower()
    return status == 403 and "token" in message and ("invalid" in message or "expired" in message)


@dataclass(frozen=True)
class _HeldFailure:
    """An IAM call that failed, and until when it is not repeated (wall clock)."""

    error: ApiError
    until: datetime
    failures: int  # in a row, for the doubling hold after an outage


@dataclass(frozen=True)
class _Answer:
    status: int
    headers: Mapping[str, str]
    raw: bytes
    content_type: str
    private: bool = False  # the body may hold secrets (task details): never quote it

    def body_preview(self) -> str:
        """What a message may say of the body: its start, or only its size when it is private."""
        if self.private:
            return f"{len(self.raw)} bytes, not shown: task details can hold Redis passwords"
        return repr(_text_preview(self.raw))


class DcsClient:
    """DCS calls for one project, with its auth, timeouts and throttle.

    Bounds on one public call: waiting for the project's throttle takes at most ``timeout`` (else
    ApiError THROTTLED with ``sent=False``), each HTTP exchange at most ``timeout``, and there is
    at most one retry (after a token refresh or a clock correction). 429s are never retried here:
    the poller asks again on its schedule, after the pause.
    """

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
        self._dcs_base = _normalised_base(cloud.dcs_endpoint)
        self._iam_base = _normalised_base(cloud.iam_endpoint)
        self._project_id = cloud.project_id
        self._project_lock = asyncio.Lock()
        self.clock_skew: float | None = None  # server Date minus local clock, once measured
        self._clock_correction = 0.0
        self._recent_tokens: deque[str] = deque(maxlen=4)  # for scrubbing error texts
        self._held: dict[str, _HeldFailure] = {}  # by IAM call: "token", "project lookup"
        self._token_requests = 0
        self._rejection_logged: str | None = None  # the token last reported as refused again
        self.tokens: TokenCache | None = None
        if isinstance(auth, PasswordAuth):
            self.tokens = TokenCache(
                self._fetch_token,
                clock=self._wall_clock,
                refresh_margin=timedelta(seconds=token_refresh_margin),
            )

    @property
    def throttle(self) -> Throttle:
        """The project's rate ceiling and 429 pause, shared by this client's calls."""
        return self._throttle

    @property
    def token_fetches(self) -> int:
        """IAM token requests made so far."""
        return self._token_requests

    # ---- public calls -------------------------------------------------------------------

    async def get_stats(self, task_id: str) -> Any:
        """The decoded stats body of one task (shape checked by stats.parse_stats)."""
        with self._scrubbed():
            project = await self.project_id()
            return await self._dcs_get(("v2", project, "migration-task", task_id, "stats"))

    async def get_task(self, task_id: str) -> TaskDetails:
        """The task's name, status and instance names; the rest of the body is dropped."""
        with self._scrubbed():
            project = await self.project_id()
            # The details body carries the Redis passwords of both instances.
            body = await self._dcs_get(("v2", project, "migration-task", task_id), private=True)
            if not isinstance(body, dict):
                raise ApiError(ErrorKind.UNEXPECTED_SHAPE, "task details: expected a JSON object")
            return _details_from(body, task_id)

    async def list_tasks(self, name: str | None = None) -> list[TaskDetails]:
        """Every migration task of the project, following the offset/limit pages."""
        with self._scrubbed():
            project = await self.project_id()
            tasks: list[TaskDetails] = []
            offset = 0
            for _ in range(MAX_LIST_PAGES):
                query = [("offset", str(offset)), ("limit", str(LIST_PAGE_SIZE))]
                if name:
                    query.append(("name", name))
                body = await self._dcs_get(("v2", project, "migration-tasks"), query, private=True)
                entries = body.get("migration_tasks") if isinstance(body, dict) else None
                if not isinstance(entries, list):
                    raise ApiError(ErrorKind.UNEXPECTED_SHAPE, "task list: no migration_tasks list")
                tasks.extend(
                    _details_from(entry, _listed_id(entry["task_id"]))
                    for entry in entries
                    if isinstance(entry, dict) and entry.get("task_id")
                )
                count = body.get("count")
                if isinstance(count, str) and count.strip().isdigit():
                    count = int(count)
                offset += len(entries)
                if not entries or (isinstance(count, int) and offset >= count):
                    return tasks
            raise ApiError(
                ErrorKind.UNEXPECTED_SHAPE,
                f"task list: still not complete after {MAX_LIST_PAGES} pages",
            )

    async def project_id(self) -> str:
        """The configured project ID, or the one IAM knows by the project's name (looked up once)."""
        if self._project_id is not None:
            return self._project_id
        with self._scrubbed():
            async with self._project_lock:
                if self._project_id is None:
                    self._project_id = await self._resolve_project_id()
            return self._project_id

    # ---- secrets --------------------------------------------------------------------------

    def _secret_values(self) -> Iterator[str]:
        """Every secret this client might have put on the wire, for scrubbing texts."""
        yield from self._recent_tokens
        auth = self._auth
        secrets: list[Secret | None] = (
            [auth.secret_key, auth.security_token]
            if isinstance(auth, AkSkAuth)
            else [auth.password]
        )
        for secret in secrets:
            if secret is None:
                continue
            try:
                value = secret.read()
            except (OSError, ValueError):
                continue
            if value:
                yield value

    def scrub(self, text: str) -> str:
        """``text`` with every known secret replaced: no secret leaves this module in a message."""
        for value in self._secret_values():
            if len(value) >= 4:
                text = text.replace(value, _REDACTED)
        return text

    @contextlib.contextmanager
    def _scrubbed(self) -> Iterator[None]:
        """A context in which an escaping ApiError has its message scrubbed of secrets."""
        try:
            yield
        except ApiError as error:
            text = str(error)
            clean = self.scrub(text)
            if clean != text:
                error.args = (clean,)
            raise

    @staticmethod
    def _read_secret(secret: Secret, what: str) -> str:
        """A secret's current value; a missing or empty file is an AUTH error naming the file."""
        where = f" from {secret.file}" if secret.file else ""
        try:
            value = secret.read()
        except OSError as exc:
            raise ApiError(
                ErrorKind.AUTH, f"cannot read the {what}{where}: {exc.strerror}", sent=False
            ) from None
        except ValueError:
            raise ApiError(
                ErrorKind.AUTH, f"cannot read the {what}{where}: not UTF-8 text", sent=False
            ) from None
        if not value:
            raise ApiError(ErrorKind.AUTH, f"the {what}{where} is empty", sent=False)
        return value

    # ---- auth -----------------------------------------------------------------------------

    @property
    def _project_name(self) -> str:
        return self._cloud.project_name or self._cloud.region

    async def _resolve_project_id(self) -> str:
        """Find the project's ID: from the token's scope, or by name through the IAM API."""
        return await self._held_off("IAM project lookup", self._look_up_project_id)

    async def _held_off(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """Run an IAM call unless it failed a moment ago: then fail at once with that error.

        The hold is shared by every task of the client: credentials that IAM refused are not
        tried again for CREDENTIALS_REFUSED_HOLD_SECONDS, and an IAM that did not answer is
        asked again after a hold that doubles within IAM_OUTAGE_HOLD_SECONDS.
        """
        now = self._wall_clock()
        held = self._held.get(what)
        if held is not None and now < held.until:
            wait = (held.until - now).total_seconds()
            raise ApiError(
                held.error.kind,
                self.scrub(f"{held.error} (not asked again for another {wait:.0f}s)"),
                status=held.error.status,
                code=held.error.code,
                sent=False,
                held=True,
            )
        try:
            result = await call()
        except ApiError as error:
            if not error.sent:  # an unreadable password file, say: nothing reached IAM
                raise
            failures = held.failures + 1 if held is not None else 1
            if error.kind in (ErrorKind.AUTH, ErrorKind.PERMISSION, ErrorKind.CLIENT_ERROR):
                hold = CREDENTIALS_REFUSED_HOLD_SECONDS
            else:
                first, last = IAM_OUTAGE_HOLD_SECONDS
                hold = min(last, first * 2 ** min(failures - 1, 16))
            self._held[what] = _HeldFailure(error, now + timedelta(seconds=hold), failures)
            log.warning(
                "%s failed; not asked again for %.0fs: %s", what, hold, self.scrub(str(error))
            )
            raise
        self._held.pop(what, None)
        return result

    async def _look_up_project_id(self) -> str:
        if self.tokens is not None:
            token = await self.tokens.get()
            if token.project_id:
                return token.project_id
        body = await self._get_json(
            f"{self._iam_base}/projects", [("name", self._project_name)], project_header=False
        )
        projects = body.get("projects") if isinstance(body, dict) else None
        if not isinstance(projects, list) or len(projects) != 1:
            found = len(projects) if isinstance(projects, list) else 0
            raise ApiError(
                ErrorKind.CLIENT_ERROR,
                f"IAM knows {found} projects named {self._project_name!r}; "
                "set cloud.project_id or cloud.project_name",
            )
        project = projects[0]
        project_id = project.get("id") if isinstance(project, dict) else None
        if not isinstance(project_id, str) or not is_project_id(project_id):
            raise ApiError(
                ErrorKind.UNEXPECTED_SHAPE,
                f"IAM project lookup: the project's id {_clip(project_id, 40)!r} is not 32 hex "
                "digits",
            )
        return project_id

    async def _fetch_token(self) -> IssuedToken:
        """Ask IAM for a project-scoped token with the configured password.

        The token's expiry is moved onto the local clock (issue time on the local clock plus the
        lifetime IAM gave), so that a host clock that is off neither makes every call refetch a
        token that looks expired nor keeps using one that has expired.
        """
        with self._scrubbed():
            return await self._held_off("IAM token request", self._fetch_token_unscrubbed)

    async def _fetch_token_unscrubbed(self) -> IssuedToken:
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
                            "password": self._read_secret(auth.password, "IAM password"),
                            "domain": {"name": auth.domain_name},
                        }
                    },
                },
                "scope": {"project": scope},
            }
        }
        url = f"{self._iam_base}/auth/tokens?nocatalog=true"
        headers = {"Content-Type": "application/json;charset=utf8", "User-Agent": USER_AGENT}
        asked_at = self._wall_clock()
        self._token_requests += 1
        answer = await self._send("POST", url, headers, json.dumps(payload).encode())
        if answer.status not in (200, 201):
            raise self._error_for(answer, what="IAM token request")
        token = answer.headers.get("X-Subject-Token")
        body = _decode(answer)
        info = body.get("token") if isinstance(body, dict) else None
        if not token or not isinstance(info, dict) or not isinstance(info.get("expires_at"), str):
            raise ApiError(ErrorKind.AUTH, "IAM token answer lacks X-Subject-Token or expires_at")
        self._recent_tokens.append(token)
        try:
            expires_at = parse_expires_at(info["expires_at"])
            issued_at = (
                parse_expires_at(info["issued_at"])
                if isinstance(info.get("issued_at"), str)
                else None
            )
        except ValueError as exc:
            raise ApiError(ErrorKind.AUTH, f"IAM token answer: {exc}") from None
        local_expiry = expires_at
        if issued_at is not None and issued_at <= expires_at:
            local_expiry = asked_at + (expires_at - issued_at)
        project = info.get("project")
        project_id = project.get("id") if isinstance(project, dict) else None
        log.info(
            "obtained an IAM token for user %s, valid until %s",
            auth.username,
            info["expires_at"],
        )
        return IssuedToken(
            value=token,
            expires_at=local_expiry,
            # A scope id that is not one is looked up by name instead of sent as a header.
            project_id=project_id if is_project_id(project_id) else None,
        )

    async def _auth_headers(self, method: str, url: str, project_header: bool) -> dict[str, str]:
        """Headers that authenticate one attempt; a signature is always made fresh."""
        headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT}
        auth = self._auth
        if isinstance(auth, AkSkAuth):
            if project_header and self._project_id:
                headers["X-Project-Id"] = self._project_id
            if auth.security_token is not None:
                headers["X-Security-Token"] = self._read_secret(
                    auth.security_token, "security token"
                )
            secret_key = self._read_secret(auth.secret_key, "secret key")
            now = self._wall_clock() + timedelta(seconds=self._clock_correction)
            return sign_request(method, url, headers, b"", auth.access_key, secret_key, now)
        assert self.tokens is not None
        token = (await self.tokens.get()).value
        if token not in self._recent_tokens:
            self._recent_tokens.append(token)
        headers["X-Auth-Token"] = token
        return headers

    # ---- transport ------------------------------------------------------------------------

    async def _dcs_get(
        self,
        segments: Sequence[str],
        query: Sequence[tuple[str, str]] = (),
        *,
        private: bool = False,
    ) -> Any:
        path = "/".join(encode_segment(segment) for segment in segments)
        return await self._get_json(
            f"{self._dcs_base}/{path}", query, project_header=True, private=private
        )

    async def _get_json(
        self,
        url: str,
        query: Sequence[tuple[str, str]],
        *,
        project_header: bool,
        private: bool = False,
    ) -> Any:
        """GET with auth, one retry after a token refresh or skew correction, then decode.

        ``url`` is already percent-encoded; the query is sent in the canonical form that is
        signed, and nothing re-encodes either on the way out.
        """
        if query:
            url = f"{url}?{canonical_query(query)}"
        what = f"GET {_display_path(url)}"
        retried = False
        while True:
            try:
                granted = await self._throttle.acquire(max_wait=self._timeout)
            except WaitTooLong as exc:
                raise ApiError(
                    ErrorKind.THROTTLED,
                    f"{what}: not sent: {exc}",
                    retry_after=exc.wait,
                    sent=False,
                    held=exc.paused,
                ) from None
            signed_with = self._clock_correction
            headers = await self._auth_headers("GET", url, project_header)
            answer = await self._send("GET", url, headers, b"")
            if private:
                answer = replace(answer, private=True)
            if 200 <= answer.status < 300:
                self._throttle.succeeded(sent_at=granted)
                body = _decode(answer)
                if _is_error_body(body):  # a gateway that says 200 but means an error
                    raise self._error_for(answer, what=what)
                return body
            error = self._error_for(answer, what=what)
            if answer.status == 429:
                pause = self._throttle.throttled(error.retry_after, sent_at=granted)
                log.warning(
                    "throttled by the API (%s); pausing the project for %.1fs", error, pause
                )
                raise error
            if not retried and await self._recover(answer, headers, error, signed_with):
                retried = True
                continue
            raise error

    async def _recover(
        self, answer: _Answer, sent: Mapping[str, str], error: ApiError, signed_with: float
    ) -> bool:
        """After an auth failure, fix what can be fixed (token, clock) and say whether to retry."""
        body_error = parse_error_body(_decode_quietly(answer))
        if not _looks_like_token_rejection(answer.status, body_error):
            return False
        if self.tokens is not None:
            rejected = sent.get("X-Auth-Token", "")
            fresh = await self.tokens.refresh_after_rejection(rejected)
            if fresh is None and rejected != self._rejection_logged:
                # Once per token, not once per task and poll: every task hits the same refusal.
                self._rejection_logged = rejected
                log.error("token rejected again after a recent refresh: %s", error)
            return fresh is not None
        return self._correct_clock(answer, signed_with)

    def _correct_clock(self, answer: _Answer, signed_with: float) -> bool:
        """Measure skew from the server's Date header after a rejected signature.

        Beyond SKEW_LIMIT_SECONDS the gateway refuses signatures, so the signing time follows
        the server's clock from then on; when the host clock has been fixed (skew back under the
        limit) the correction is dropped again. True when the request was signed with another
        correction than the one wanted now (set by this answer or, for requests that were in
        flight together, by an earlier one), so a retry can succeed; a rejection of a request
        already signed with the wanted correction is not retried.
        """
        server_time = _server_time(answer.headers)
        if server_time is None:
            return False
        skew = (server_time - self._wall_clock()).total_seconds()
        self.clock_skew = skew
        wanted = skew if abs(skew) >= SKEW_LIMIT_SECONDS else 0.0
        if abs(wanted - signed_with) < 2.0:
            return False
        if abs(wanted - self._clock_correction) < 2.0:
            return True  # another request has corrected it already: retry quietly
        if wanted:
            log.error(
                "signature rejected and the local clock differs from the API server's Date "
                "header by %.0f s; fix the host clock (NTP). Signing with the server's time "
                "from now on.",
                skew,
            )
        else:
            log.warning(
                "signature rejected; the local clock now agrees with the API server's Date "
                "header (%.0f s apart), so the earlier correction of %.0f s is dropped",
                skew,
                self._clock_correction,
            )
        self._clock_correction = wanted
        return True

    async def _send(
        self, method: str, url: str, headers: Mapping[str, str], body: bytes
    ) -> _Answer:
        """One HTTP exchange with a hard deadline, sent byte for byte as signed.

        ``url`` is already encoded, so it is handed over as ``yarl.URL(..., encoded=True)``: a
        plain string would be re-quoted (``%2A`` becomes ``*``) and differ from what was signed.
        Redirects are not followed: they would carry X-Auth-Token to wherever they point. aiohttp
        itself repeats an idempotent request once when a pooled connection turns out closed.
        """
        timeout = aiohttp.ClientTimeout(total=self._timeout)
        target = yarl.URL(url, encoded=True)
        what = f"{method} {_display_path(url)}"
        try:
            async with self._session.request(
                method,
                target,
                headers=headers,
                data=body or None,
                timeout=timeout,
                allow_redirects=False,
            ) as response:
                raw = await _read_bounded(response)
                if raw is None:
                    raise ApiError(
                        ErrorKind.INVALID_JSON,
                        f"{what}: body larger than {MAX_BODY_BYTES} bytes",
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
                ErrorKind.TIMEOUT, f"{what}: no complete answer within {self._timeout:g}s"
            ) from None
        except aiohttp.ClientError as exc:
            raise ApiError(ErrorKind.CONNECTION, f"{what}: {type(exc).__name__}: {exc}") from None

    def _error_for(self, answer: _Answer, *, what: str) -> ApiError:
        """Classify a non-2xx answer; the message is scrubbed of secrets."""
        error = parse_error_body(_decode_quietly(answer))
        status = answer.status
        hint = ""
        if error.code in GONE_CODES or status == 404:
            kind = ErrorKind.NOT_FOUND
        elif status == 429:
            kind = ErrorKind.THROTTLED
        elif status == 401 or _looks_like_token_rejection(status, error):
            kind = ErrorKind.AUTH
        elif status == 403:
            kind = ErrorKind.PERMISSION
            hint = "; permission denied: the credentials may not read DCS migration tasks"
        elif status >= 500:
            kind = ErrorKind.SERVER_ERROR
        elif 300 <= status < 400:
            kind = ErrorKind.CLIENT_ERROR
            hint = f"; redirect to {_origin(answer.headers.get('Location'))} not followed (check the endpoint)"
        else:
            kind = ErrorKind.CLIENT_ERROR
        if error.code and error.code != str(status):
            detail = f"{error.code}: {error.message or '-'}"
        elif error.message:
            # IAM puts the HTTP status in its "code"; saying it twice helps nobody.
            detail = error.message
        else:
            detail = f"content-type {answer.content_type or 'none'}, body {answer.body_preview()}"
        request_id = _clip(answer.headers.get("X-Request-Id"), 64) or error.request_id
        server_now = _server_time(answer.headers) or self._wall_clock()
        message = f"{what}: HTTP {status} {detail}{hint}" + (
            f" (request id {request_id})" if request_id else ""
        )
        return ApiError(
            kind,
            self.scrub(message),
            status=status,
            code=error.code,
            retry_after=parse_retry_after(answer.headers.get("Retry-After"), server_now),
            request_id=request_id,
        )


def _is_error_body(body: Any) -> bool:
    """True for a DCS error object: an error_code and nothing but the error fields."""
    return (
        isinstance(body, dict)
        and body.get("error_code") is not None
        and body.keys() <= _ERROR_ONLY_KEYS
    )


def _origin(location: str | None) -> str:
    """Where a redirect points, as scheme://host:port only (a query could carry anything)."""
    try:
        url = yarl.URL(location or "")
        return str(url.origin()) if url.absolute else "a relative URL"
    except ValueError:
        return "an unreadable URL"


def _normalised_base(endpoint: str) -> str:
    """An endpoint in its encoded form (IDNA host, quoted path), without a trailing slash."""
    return str(yarl.URL(endpoint)).rstrip("/")


def _display_path(url: str) -> str:
    """The path of an encoded URL, for messages."""
    return yarl.URL(url, encoded=True).raw_path


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
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise ApiError(
            ErrorKind.INVALID_JSON,
            f"HTTP {answer.status} body is not JSON ({reason}); content-type "
            f"{answer.content_type or 'none'}, body {answer.body_preview()}",
            status=answer.status,
        ) from None


def _decode_quietly(answer: _Answer) -> Any:
    """An error answer's JSON body, or None when it has none (HTML from a proxy, say)."""
    try:
        return json.loads(answer.raw) if answer.raw.strip() else None
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None


def _listed_id(value: Any) -> str:
    """A listed task_id as sent when it is a string; anything else (``true``, ``12345``) as a
    text that no task ID matches, so that discovery skips it with a warning."""
    return value if isinstance(value, str) else f"<{type(value).__name__} {_clip(value, 40)}>"


def _text(value: Any) -> str:
    """A display string from the API (a label value): one line, at most 200 characters."""
    return (_clip(value, 200) or "") if isinstance(value, str) else ""


def _details_from(body: dict[str, Any], task_id: str) -> TaskDetails:
    """Keep only the display fields of a details or list entry."""

    def instance_name(key: str, flat_key: str) -> str:
        nested = body.get(key)
        if isinstance(nested, dict) and isinstance(nested.get("name"), str):
            return _text(nested["name"])
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
