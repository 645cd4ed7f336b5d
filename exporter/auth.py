"""Authentication for the DCS and IAM APIs: the AK/SK signer, its verifier, and the IAM token cache.

Nothing here speaks HTTP. ``client.py`` asks :func:`sign_request` for the headers of a signed call
(AK/SK), or :class:`TokenCache` for an ``X-Auth-Token`` (IAM password login); the simulator checks
signatures with :func:`verify_request`.

The signer is ``SDK-HMAC-SHA256`` exactly as ``huaweicloudsdkcore.signer.signer.Signer`` computes it
(``dcs-api/FACTS.md`` 5b): every header present when signing is signed except names that contain
``_``; the canonical URI is the percent-decoded path re-encoded segment by segment with a
trailing ``/`` (for signing only); the canonical query is the sorted, encoded pairs and is also
the query that must be sent; a body whose ``Content-Type`` is neither JSON nor BSON is signed as
``UNSIGNED-PAYLOAD``.

No secret (secret key, token, password) ever goes into an exception message or a ``repr``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from urllib.parse import quote, unquote, urlsplit

__all__ = [
    "ALGORITHM",
    "IssuedToken",
    "TokenCache",
    "canonical_query",
    "parse_expires_at",
    "parse_query_string",
    "sign_request",
    "utc_now",
    "verify_request",
]

log = logging.getLogger(__name__)

ALGORITHM = "SDK-HMAC-SHA256"
SDK_DATE_FORMAT = "%Y%m%dT%H%M%SZ"
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
EMPTY_BODY_SHA256 = hashlib.sha256(b"").hexdigest()

_HEADER_DATE = "X-Sdk-Date"
_HEADER_CONTENT_SHA256 = "X-Sdk-Content-Sha256"
_SDK_DATE_RE = re.compile(r"[0-9]{8}T[0-9]{6}Z")
_HEX64_RE = re.compile(r"[0-9a-f]{64}")


def utc_now() -> datetime:
    """Return the current time as an aware UTC datetime."""
    return datetime.now(UTC)


def _as_utc(moment: datetime) -> datetime:
    """Return ``moment`` in UTC; a naive datetime is taken to be UTC already."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


# --------------------------------------------------------------------------------------------------
# AK/SK signing


def _encode(text: str) -> str:
    """Percent-encode as the SDK does: only unreserved characters and ``~`` stay as they are."""
    return quote(text, safe="~")


def canonical_query(pairs: Sequence[tuple[str, str]]) -> str:
    """Return the canonical query string: the query to sign *and* the query to send.

    Pairs are sorted by raw key, then raw value (not by their encoded form, as the SDK does), and
    both halves are percent-encoded with only unreserved characters kept.
    """
    return "&".join(f"{_encode(key)}={_encode(value)}" for key, value in sorted(pairs))


def parse_query_string(query_string: str) -> list[tuple[str, str]]:
    """Split a raw query string into decoded pairs, the inverse of :func:`canonical_query`.

    ``+`` is kept as a literal plus (RFC 3986), since the canonical form never produces it; a part
    without ``=`` becomes a pair with an empty value.
    """
    pairs: list[tuple[str, str]] = []
    for part in query_string.split("&"):
        if not part:
            continue
        key, _, value = part.partition("=")
        pairs.append((unquote(key), unquote(value)))
    return pairs


def _canonical_uri(path: str) -> str:
    """Return the canonical URI of ``path`` (encoded or not), ending in ``/`` as signing wants."""
    uri = "/".join(_encode(segment) for segment in unquote(path).split("/"))
    if not uri.endswith("/"):
        uri += "/"
    return uri


def _find_header(headers: Mapping[str, str], name: str) -> str | None:
    """Return the key under which ``name`` is present in ``headers``, ignoring case."""
    wanted = name.lower()
    for key in headers:
        if key.lower() == wanted:
            return key
    return None


def _signed_header_names(headers: Mapping[str, str]) -> list[str]:
    """Lower-cased, sorted names of the headers to sign: all but names that contain ``_``."""
    return sorted(key.lower() for key in headers if "_" not in key)


def _payload_hash(body: bytes, content_sha256: str | None) -> str:
    """The payload hash of the canonical request, as the SDK computes it."""
    if not body:
        return EMPTY_BODY_SHA256
    if content_sha256:
        return content_sha256
    return hashlib.sha256(body).hexdigest()


def _signature(
    method: str,
    canonical_uri: str,
    query: str,
    headers: Mapping[str, str],
    signed: Sequence[str],
    payload_hash: str,
    sdk_date: str,
    secret_key: str,
) -> str:
    """Hex HMAC-SHA256 of the string to sign; ``headers``: lower-case name -> stripped value."""
    canonical_headers = "".join(f"{name}:{headers[name]}\n" for name in signed)
    canonical_request = "\n".join(
        [method.upper(), canonical_uri, query, canonical_headers, ";".join(signed), payload_hash]
    )
    digest = hashlib.sha256(canonical_request.encode("utf-8")).hexdigest()
    string_to_sign = f"{ALGORITHM}\n{sdk_date}\n{digest}"
    return hmac.new(
        secret_key.encode("utf-8"), string_to_sign.encode("utf-8"), hashlib.sha256
    ).hexdigest()


def _check_sdk_date(value: str) -> str:
    """Return ``value`` if it is a valid ``X-Sdk-Date`` (``YYYYMMDDTHHMMSSZ``), else raise."""
    if _SDK_DATE_RE.fullmatch(value) is None:
        raise ValueError(f"X-Sdk-Date {value!r} is not in the form YYYYMMDDTHHMMSSZ")
    datetime.strptime(value, SDK_DATE_FORMAT)  # rejects month 13 and the like
    return value


def sign_request(
    method: str,
    url: str,
    headers: Mapping[str, str],
    body: bytes,
    access_key: str,
    secret_key: str,
    now: datetime,
) -> dict[str, str]:
    """Return the headers to send: the given ones plus Host (if missing), X-Sdk-Date (from `now`
    unless already given) and Authorization.

    ``url`` may carry a query string; send it in the :func:`canonical_query` form, since that form
    is what gets signed. Header values are returned stripped, as they are signed. A given
    ``Authorization`` header is replaced. For a ``Content-Type`` other than JSON or BSON the header
    ``X-Sdk-Content-Sha256: UNSIGNED-PAYLOAD`` is added and the body is not hashed, as in the SDK.
    Raises ValueError for an unusable URL, a malformed given ``X-Sdk-Date`` or two headers whose
    names differ only in case.
    """
    if not access_key or not secret_key:
        raise ValueError("access key and secret key are required")
    parts = urlsplit(url)
    if not parts.hostname:
        raise ValueError(f"URL {url!r} has no host")

    out: dict[str, str] = {}
    seen: set[str] = set()
    for key, value in headers.items():
        lowered = key.lower()
        if lowered in seen:
            raise ValueError(f"header {key!r} is given more than once")
        seen.add(lowered)
        if lowered == "authorization":
            continue
        out[key] = str(value).strip()

    content_type = out.get(_find_header(out, "Content-Type") or "")
    if (
        content_type
        and not content_type.startswith("application/json")
        and not content_type.startswith("application/bson")
    ):
        existing = _find_header(out, _HEADER_CONTENT_SHA256)
        out[existing or _HEADER_CONTENT_SHA256] = UNSIGNED_PAYLOAD

    date_key = _find_header(out, _HEADER_DATE)
    if date_key is None:
        sdk_date = _as_utc(now).strftime(SDK_DATE_FORMAT)
        out[_HEADER_DATE] = sdk_date
    else:
        sdk_date = _check_sdk_date(out[date_key])

    if _find_header(out, "Host") is None:
        out["Host"] = parts.netloc.rpartition("@")[2]

    lowered_values = {key.lower(): value for key, value in out.items()}
    signed = _signed_header_names(out)
    content_sha256_key = _find_header(out, _HEADER_CONTENT_SHA256)
    payload_hash = _payload_hash(body, out[content_sha256_key] if content_sha256_key else None)
    signature = _signature(
        method,
        _canonical_uri(parts.path),
        canonical_query(parse_query_string(parts.query)),
        lowered_values,
        signed,
        payload_hash,
        sdk_date,
        secret_key,
    )
    out["Authorization"] = (
        f"{ALGORITHM} Access={access_key}, SignedHeaders={';'.join(signed)}, Signature={signature}"
    )
    return out


def _parse_authorization(value: str) -> tuple[str, list[str], str] | str:
    """Split an Authorization value into (access key, signed headers, signature), or a reason."""
    algorithm, _, rest = value.strip().partition(" ")
    if algorithm != ALGORITHM:
        return "unsupported algorithm"
    fields: dict[str, str] = {}
    for item in rest.split(","):
        name, sep, content = item.strip().partition("=")
        if not sep or name in fields:
            return "malformed authorization"
        fields[name] = content.strip()
    access = fields.get("Access")
    signed = fields.get("SignedHeaders")
    signature = fields.get("Signature")
    if (
        not access
        or not signed
        or not signature
        or set(fields)
        != {
            "Access",
            "SignedHeaders",
            "Signature",
        }
    ):
        return "malformed authorization"
    return access, signed.split(";"), signature


def verify_request(
    method: str,
    path: str,
    query_string: str,
    headers: Mapping[str, str],
    body: bytes,
    secret_for: Callable[[str], str | None],
    now: datetime,
    max_skew: timedelta = timedelta(minutes=15),
) -> str | None:
    """Server side (used by the test simulator): return None if the Authorization header is a
    valid signature, else a short reason ("missing authorization", "unknown access key", "signature
    mismatch", "signature expired", ...). Header lookup case-insensitive.

    ``path`` is the request path without the query, percent-encoded or not; ``query_string`` is
    the raw query as received (it is canonicalised here, so its order does not matter). Only the
    headers named in ``SignedHeaders`` are used, and ``x-sdk-date`` must be one of them.
    """
    received: dict[str, str] = {}
    for key, value in headers.items():
        received.setdefault(key.lower(), str(value).strip())

    authorization = received.get("authorization")
    if not authorization:
        return "missing authorization"
    parsed = _parse_authorization(authorization)
    if isinstance(parsed, str):
        return parsed
    access_key, signed, signature = parsed
    if signed != sorted(set(signed)) or any(not name or "_" in name for name in signed):
        return "malformed authorization"

    secret_key = secret_for(access_key)
    if not secret_key:
        return "unknown access key"

    if "x-sdk-date" not in signed:
        return "x-sdk-date not signed"
    for name in signed:
        if name not in received:
            return f"signed header {name} missing"
    sdk_date = received["x-sdk-date"]
    if _SDK_DATE_RE.fullmatch(sdk_date) is None:
        return "malformed x-sdk-date"
    try:
        signed_at = datetime.strptime(sdk_date, SDK_DATE_FORMAT).replace(tzinfo=UTC)
    except ValueError:
        return "malformed x-sdk-date"
    skew = abs(_as_utc(now) - signed_at)
    if skew > max_skew:
        return (
            f"signature expired: X-Sdk-Date is {int(skew.total_seconds())} s off the server clock"
            f" (clock skew allowed: {int(max_skew.total_seconds())} s)"
        )

    claimed = received.get(_HEADER_CONTENT_SHA256.lower())
    if (
        body
        and claimed
        and claimed != UNSIGNED_PAYLOAD
        and claimed != hashlib.sha256(body).hexdigest()
    ):
        return "payload hash mismatch"

    expected = _signature(
        method,
        _canonical_uri(path),
        canonical_query(parse_query_string(query_string)),
        received,
        signed,
        _payload_hash(body, claimed),
        sdk_date,
        secret_key,
    )
    if _HEX64_RE.fullmatch(signature) is None or not hmac.compare_digest(expected, signature):
        return "signature mismatch"
    return None


# --------------------------------------------------------------------------------------------------
# IAM tokens

_EXPIRES_AT_RE = re.compile(
    r"(?P<date>[0-9]{4}-[0-9]{2}-[0-9]{2})[Tt ](?P<time>[0-9]{2}:[0-9]{2}:[0-9]{2})"
    r"(?:\.(?P<fraction>[0-9]+))?"
    r"(?P<zone>[Zz]|[+-][0-9]{2}:?[0-9]{2})?"
)


def parse_expires_at(text: str) -> datetime:
    """Parse an IAM timestamp such as ``2015-11-09T01:42:57.527363Z`` into an aware UTC datetime.

    Accepts ``Z`` or a ``±HH:MM`` / ``±HHMM`` offset, any number of fraction digits (cut to
    microseconds), a space instead of ``T``; a timestamp without a zone is taken as UTC.
    Raises ValueError naming the text otherwise.
    """
    match = _EXPIRES_AT_RE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"unrecognised timestamp {text[:64]!r}")
    fraction = (match["fraction"] or "")[:6].ljust(6, "0")
    zone = match["zone"] or "Z"
    if zone in ("Z", "z"):
        zone = "+00:00"
    elif ":" not in zone:
        zone = f"{zone[:3]}:{zone[3:]}"
    try:
        parsed = datetime.fromisoformat(f"{match['date']}T{match['time']}.{fraction}{zone}")
    except ValueError:
        raise ValueError(f"unrecognised timestamp {text[:64]!r}") from None
    return parsed.astimezone(UTC)


@dataclass(frozen=True)
class IssuedToken:
    """An IAM token as issued: the ``X-Subject-Token`` value, its expiry and its project scope."""

    value: str = field(repr=False)
    expires_at: datetime  # aware UTC
    project_id: str | None  # token.project.id when the token is project-scoped

    def __post_init__(self) -> None:
        if self.expires_at.tzinfo is None:
            raise ValueError("IssuedToken.expires_at must be timezone-aware")


class TokenCache:
    """Caches one IAM token and refreshes it with single-flight fetches.

    ``get()`` fetches when there is no token or when ``expires_at - now`` is below the refresh
    margin, which is capped at 10 % of the token's lifetime (measured from when it was fetched), so
    a 24 h token is refreshed 1 h early and a 120 s token 12 s early. Concurrent callers share one
    fetch, and a caller that is cancelled does not cancel the fetch for the others. A failed fetch
    is not cached; it raises in every caller waiting for it, except while the current token is
    still valid and was not rejected by the API: then the failure is logged once as a warning, the
    current token is returned, and the next refresh is tried after ``refresh_retry_interval``
    (at most half the token's remaining life), so that an IAM outage during the refresh margin
    neither fails the polls nor turns every poll into a token request.
    """

    def __init__(
        self,
        fetch: Callable[[], Awaitable[IssuedToken]],
        clock: Callable[[], datetime] = utc_now,
        refresh_margin: timedelta = timedelta(hours=1),
        min_forced_refresh_interval: timedelta = timedelta(minutes=5),
        refresh_retry_interval: timedelta = timedelta(seconds=30),
    ) -> None:
        self._fetch = fetch
        self._clock = clock
        self._refresh_margin = refresh_margin
        self._min_forced_refresh_interval = min_forced_refresh_interval
        self._refresh_retry_interval = refresh_retry_interval
        self._token: IssuedToken | None = None
        self._fetched_at: datetime | None = None
        self._inflight: asyncio.Task[IssuedToken] | None = None
        self._last_forced: datetime | None = None
        self._rejected: str | None = None  # the value the API last refused
        self._retry_refresh_at: datetime | None = None  # after a failed refresh of a valid token
        self._fetch_count = 0

    def __repr__(self) -> str:
        expires = self._token.expires_at.isoformat() if self._token else None
        return f"<TokenCache expires_at={expires} fetch_count={self._fetch_count}>"

    @property
    def fetch_count(self) -> int:
        """How many fetches were started (successful or not)."""
        return self._fetch_count

    def _is_fresh(self, token: IssuedToken, fetched_at: datetime) -> bool:
        lifetime = max(token.expires_at - fetched_at, timedelta(0))
        margin = min(self._refresh_margin, lifetime / 10)
        return token.expires_at - _as_utc(self._clock()) >= margin

    def _still_usable(self) -> IssuedToken | None:
        """The current token if it has not expired and the API has not refused it."""
        token = self._token
        if token is None or token.value == self._rejected:
            return None
        return token if token.expires_at > _as_utc(self._clock()) else None

    async def _run_fetch(self) -> IssuedToken:
        try:
            token = await self._fetch()
        except Exception as exc:
            current = self._still_usable()
            if current is not None:
                now = _as_utc(self._clock())
                remaining = current.expires_at - now
                self._retry_refresh_at = now + min(self._refresh_retry_interval, remaining / 2)
                log.warning(
                    "IAM token refresh failed (%s: %s); still using the current token, which is "
                    "valid for another %.0f s",
                    type(exc).__name__,
                    exc,
                    remaining.total_seconds(),
                )
            raise
        else:
            self._token = token
            self._fetched_at = _as_utc(self._clock())
            self._retry_refresh_at = None
            return token
        finally:
            self._inflight = None

    async def _shared_fetch(self) -> IssuedToken:
        if self._inflight is None:
            self._fetch_count += 1
            self._inflight = asyncio.get_running_loop().create_task(self._run_fetch())
        return await asyncio.shield(self._inflight)

    async def get(self) -> IssuedToken:
        """Return the cached token, fetching one when there is none or it is about to expire.

        While a fetch is in flight (also a forced one after a rejection) the caller joins it
        rather than being handed a token that is about to be replaced. When the refresh fails but
        the current token is still usable, that token is returned (see the class docstring).
        """
        try:
            if self._inflight is not None:
                return await asyncio.shield(self._inflight)
            token, fetched_at = self._token, self._fetched_at
            if token is not None and fetched_at is not None and self._is_fresh(token, fetched_at):
                return token
            retry_at = self._retry_refresh_at
            usable = self._still_usable()
            if usable is not None and retry_at is not None and _as_utc(self._clock()) < retry_at:
                return usable
            return await self._shared_fetch()
        except Exception:
            usable = self._still_usable()
            if usable is None:
                raise
            return usable

    async def refresh_after_rejection(self, rejected: str) -> IssuedToken | None:
        """Return a token to retry with after the API rejected the token ``rejected``, or None.

        A newer cached token is returned without fetching; a fetch already in flight is joined;
        otherwise one forced fetch is made, unless the last forced fetch was less than
        ``min_forced_refresh_interval`` ago: then None tells the caller to give up this poll.
        """
        self._rejected = rejected
        current = self._token
        if current is not None and current.value != rejected:
            return current
        if self._inflight is not None:
            return await asyncio.shield(self._inflight)
        now = _as_utc(self._clock())
        if (
            self._last_forced is not None
            and now - self._last_forced < self._min_forced_refresh_interval
        ):
            return None
        self._last_forced = now
        return await self._shared_fetch()
