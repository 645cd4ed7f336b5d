"""Tests for exporter.auth: signer (FACTS.md 5d, official SDK), verifier, token cache."""

from __future__ import annotations

import asyncio
import string
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from types import SimpleNamespace
from urllib.parse import quote, urlsplit

import pytest
from huaweicloudsdkcore.sdk_request import SdkRequest
from huaweicloudsdkcore.signer.signer import Signer
from hypothesis import given, settings
from hypothesis import strategies as st

from exporter.auth import (
    IssuedToken,
    TokenCache,
    canonical_query,
    parse_expires_at,
    parse_query_string,
    sign_request,
    utc_now,
    verify_request,
)

AK = "AKTESTEXAMPLE0000001"
SK = "SKtestexampleSecretKey0000000000000000001"
PROJECT = "0123456789abcdef0123456789abcdef"
STATS_URL = (
    f"https://dcs.eu-de.otc.t-systems.com/v2/{PROJECT}"
    "/migration-task/a1b2c3d4-0000-1111-2222-333344445555/stats"
)
ANY_TIME = datetime(2030, 1, 1, tzinfo=UTC)  # ignored whenever X-Sdk-Date is given

V1_HEADERS = {
    "X-Sdk-Date": "20240101T000000Z",
    "Content-Type": "application/json",
    "X-Project-Id": PROJECT,
}


# --------------------------------------------------------------------------------------------------
# FACTS.md 5d test vectors


def test_v0_documentation_example() -> None:
    """V0, the signing guide's own example, gives the documented signature."""
    headers = sign_request(
        "GET",
        "https://service.region.example.com/v1/77b6a44cba5143ab91d13ab9a8ff44fd/vpcs"
        "?limit=2&marker=13551d6b-755d-4757-b956-536f674975c0",
        {"Content-Type": "application/json", "X-Sdk-Date": "20191115T033655Z"},
        b"",
        "QTWAOYTTINDUT2QVKYUC",
        "MFyfvK41ba2giqM7Uio6PznpdUKGpownRZlmVmHc",
        ANY_TIME,
    )
    assert headers["Authorization"] == (
        "SDK-HMAC-SHA256 Access=QTWAOYTTINDUT2QVKYUC, SignedHeaders=content-type;host;x-sdk-date, "
        "Signature=7be6668032f70418fcc22abc52071e57aff61b84a1d2381bb430d6870f4f6ebe"
    )
    assert headers["Host"] == "service.region.example.com"


def test_v1_stats_call() -> None:
    """V1, a stats call with X-Project-Id, gives the exact Authorization value."""
    headers = sign_request("GET", STATS_URL, V1_HEADERS, b"", AK, SK, ANY_TIME)
    assert headers["Authorization"] == (
        "SDK-HMAC-SHA256 Access=AKTESTEXAMPLE0000001, "
        "SignedHeaders=content-type;host;x-project-id;x-sdk-date, "
        "Signature=c54d4e92497b0f2ae8fd4b6e6f03ee09be1d2e9d19642336e94c89a55965bdab"
    )
    assert headers["X-Sdk-Date"] == "20240101T000000Z"
    assert headers["Host"] == "dcs.eu-de.otc.t-systems.com"


def test_v2_list_call_with_query() -> None:
    """V2, a list call, gets the documented canonical query and the exact Authorization value."""
    query = canonical_query([("offset", "0"), ("limit", "10"), ("name", "my task")])
    assert query == "limit=10&name=my%20task&offset=0"
    headers = sign_request(
        "GET",
        f"https://dcs.ap-southeast-1.myhuaweicloud.com/v2/{PROJECT}/migration-tasks?{query}",
        {"X-Sdk-Date": "20240615T123045Z", "Content-Type": "application/json"},
        b"",
        AK,
        SK,
        ANY_TIME,
    )
    assert headers["Authorization"] == (
        "SDK-HMAC-SHA256 Access=AKTESTEXAMPLE0000001, SignedHeaders=content-type;host;x-sdk-date, "
        "Signature=6e696e32edb22961a5679eb2c57908844ce0c063584105f93f7c28bd498605ce"
    )


def test_v3_security_token_signed_underscore_header_not() -> None:
    """V3 signs X-Security-Token but not a header whose name contains an underscore."""
    headers = sign_request(
        "GET",
        STATS_URL,
        {**V1_HEADERS, "X-Security-Token": "tok123", "X_Custom": "skipped"},
        b"",
        AK,
        SK,
        ANY_TIME,
    )
    assert headers["Authorization"] == (
        "SDK-HMAC-SHA256 Access=AKTESTEXAMPLE0000001, "
        "SignedHeaders=content-type;host;x-project-id;x-sdk-date;x-security-token, "
        "Signature=ed8a9683f51ab39d0d45b69913a333ed40ba576caa1b940f832add2ec79e4493"
    )
    assert headers["X_Custom"] == "skipped"


# --------------------------------------------------------------------------------------------------
# Signer details


def test_x_sdk_date_comes_from_now_in_utc() -> None:
    """Without a given X-Sdk-Date the header is `now` converted to UTC in the basic format."""
    now = datetime(2024, 1, 1, 2, 30, 5, tzinfo=timezone(timedelta(hours=2)))
    headers = sign_request("GET", STATS_URL, {}, b"", AK, SK, now)
    assert headers["X-Sdk-Date"] == "20240101T003005Z"
    assert set(headers) == {"X-Sdk-Date", "Host", "Authorization"}


def test_given_host_and_date_are_kept_and_inputs_untouched() -> None:
    """A given Host and X-Sdk-Date (any case) are reused; the caller's mapping is left as it was."""
    given_headers = {"host": "proxy.example:8443", "x-sdk-date": "20240101T000000Z"}
    snapshot = dict(given_headers)
    headers = sign_request("GET", STATS_URL, given_headers, b"", AK, SK, ANY_TIME)
    assert given_headers == snapshot
    assert headers["host"] == "proxy.example:8443"
    assert "Host" not in headers
    assert headers["x-sdk-date"] == "20240101T000000Z"


def test_host_header_keeps_port_and_drops_userinfo() -> None:
    """The added Host is host[:port] of the URL, without any userinfo."""
    headers = sign_request("GET", "http://user@127.0.0.1:8080/v2/x", {}, b"", AK, SK, ANY_TIME)
    assert headers["Host"] == "127.0.0.1:8080"


def test_trailing_slash_is_only_for_signing() -> None:
    """A path with or without a trailing slash signs the same: the canonical URI ends in '/'."""
    with_slash = sign_request("GET", STATS_URL + "/", V1_HEADERS, b"", AK, SK, ANY_TIME)
    without = sign_request("GET", STATS_URL, V1_HEADERS, b"", AK, SK, ANY_TIME)
    assert with_slash["Authorization"] == without["Authorization"]


def test_non_json_content_type_is_unsigned_payload() -> None:
    """A non-JSON Content-Type signs UNSIGNED-PAYLOAD, so the body does not change the signature."""
    base = {"Content-Type": "text/plain", "X-Sdk-Date": "20240101T000000Z"}
    one = sign_request("POST", STATS_URL, base, b"one", AK, SK, ANY_TIME)
    two = sign_request("POST", STATS_URL, base, b"two", AK, SK, ANY_TIME)
    assert one["X-Sdk-Content-Sha256"] == "UNSIGNED-PAYLOAD"
    assert "x-sdk-content-sha256" in one["Authorization"]
    assert one["Authorization"] == two["Authorization"]


def test_json_body_is_hashed() -> None:
    """With a JSON Content-Type the body is hashed into the signature."""
    one = sign_request("POST", STATS_URL, V1_HEADERS, b'{"a":1}', AK, SK, ANY_TIME)
    two = sign_request("POST", STATS_URL, V1_HEADERS, b'{"a":2}', AK, SK, ANY_TIME)
    assert "X-Sdk-Content-Sha256" not in one
    assert one["Authorization"] != two["Authorization"]


def test_given_authorization_is_replaced() -> None:
    """A stale Authorization among the given headers is neither signed nor kept."""
    headers = sign_request(
        "GET", STATS_URL, {**V1_HEADERS, "authorization": "old"}, b"", AK, SK, ANY_TIME
    )
    fresh = sign_request("GET", STATS_URL, V1_HEADERS, b"", AK, SK, ANY_TIME)
    assert "authorization" not in headers
    assert headers["Authorization"] == fresh["Authorization"]


def test_header_values_are_stripped() -> None:
    """Header values are returned stripped, exactly as they were signed."""
    padded = {**V1_HEADERS, "X-Project-Id": f"  {PROJECT} "}
    headers = sign_request("GET", STATS_URL, padded, b"", AK, SK, ANY_TIME)
    assert headers["X-Project-Id"] == PROJECT
    assert (
        headers["Authorization"]
        == sign_request("GET", STATS_URL, V1_HEADERS, b"", AK, SK, ANY_TIME)["Authorization"]
    )


@pytest.mark.parametrize(
    ("headers", "url"),
    [
        ({"X-Sdk-Date": "2024-01-01T00:00:00Z"}, STATS_URL),
        ({"X-Sdk-Date": "20241301T000000Z"}, STATS_URL),
        ({"X-A": "1", "x-a": "2"}, STATS_URL),
        ({}, "/v2/no-host"),
    ],
)
def test_bad_input_raises_without_secret(headers: dict[str, str], url: str) -> None:
    """A bad X-Sdk-Date, case-duplicate headers or a host-less URL raise ValueError sans SK."""
    with pytest.raises(ValueError) as caught:
        sign_request("GET", url, headers, b"", AK, SK, ANY_TIME)
    assert SK not in str(caught.value)


def test_canonical_query_sorts_raw_pairs() -> None:
    """Pairs sort by raw key then value; all but unreserved characters and '~' is encoded."""
    pairs = [("a/", "1"), ("a.", "2"), ("b", "x y"), ("b", "+~&=ä")]
    assert canonical_query(pairs) == "a.=2&a%2F=1&b=%2B~%26%3D%C3%A4&b=x%20y"
    assert parse_query_string(canonical_query(pairs)) == sorted(pairs)
    assert canonical_query([]) == ""


# --------------------------------------------------------------------------------------------------
# Cross-check against the official SDK signer

_TCHAR = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"
_RESERVED = {"host", "x-sdk-date", "content-type", "authorization", "x-sdk-content-sha256"}

header_names = st.text(alphabet=_TCHAR, min_size=1, max_size=12).filter(
    lambda name: name.lower() not in _RESERVED
)
header_values = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=20)
# Characters the encoding rules treat specially, drawn often; any other character now and then.
_TRICKY = " ~-._!$&'()*+,;=:@[]äé€😀"
path_segments = st.text(
    alphabet=st.sampled_from(_TRICKY + "az09")
    | st.characters(exclude_categories=["Cs", "Cc"], exclude_characters="/?#%"),
    max_size=10,
)
query_text = st.text(
    alphabet=st.sampled_from(_TRICKY + "/?#%az09") | st.characters(exclude_categories=["Cs"]),
    max_size=8,
)
hosts = st.sampled_from(
    ["dcs.eu-de.otc.t-systems.com", "127.0.0.1:8443", "dcs.ap-southeast-1.myhuaweicloud.com"]
)
times = st.datetimes(
    min_value=datetime(1990, 1, 1),
    max_value=datetime(2100, 1, 1),
    timezones=st.sampled_from([UTC, timezone(timedelta(hours=5, minutes=30))]),
)
content_types = st.sampled_from(
    [
        None,
        "application/json",
        "application/json;charset=utf8",
        "application/bson",
        "text/plain",
        "application/octet-stream",
        "application/x-www-form-urlencoded",
    ]
)


@st.composite
def random_requests(draw: st.DrawFn) -> dict[str, object]:
    """A random request: method, URL (path raw or encoded, query canonical), headers, body, time."""
    segments = draw(st.lists(path_segments, min_size=1, max_size=5))
    path = "/" + "/".join(segments) + draw(st.sampled_from(["", "/"]))
    pairs = draw(st.lists(st.tuples(query_text, query_text), max_size=5))
    host = draw(hosts)
    url_path = quote(path, safe="/") if draw(st.booleans()) else path
    query = canonical_query(pairs)
    url = f"https://{host}{url_path}" + (f"?{query}" if query else "")

    headers: dict[str, str] = {}
    for name in draw(st.lists(header_names, max_size=6, unique_by=str.lower)):
        headers[name] = draw(header_values)
    content_type = draw(content_types)
    if content_type is not None:
        headers["Content-Type"] = content_type
    now = draw(times)
    if draw(st.booleans()):
        name = draw(st.sampled_from(["X-Sdk-Date", "x-sdk-date", "X-SDK-DATE"]))
        headers[name] = now.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
    if draw(st.booleans()):
        headers[draw(st.sampled_from(["Host", "host"]))] = draw(hosts)
    return {
        "method": draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "get"])),
        "url": url,
        "path": path,
        "host": host,
        "pairs": pairs,
        "headers": headers,
        "body": draw(st.binary(max_size=48)),
        "now": now,
        "ak": draw(st.text(alphabet=string.ascii_letters + string.digits, min_size=1, max_size=20)),
        "sk": draw(st.text(min_size=1, max_size=40)),
    }


def _sdk_sign(req: dict[str, object], headers: dict[str, str]) -> SdkRequest:
    """Sign with huaweicloudsdkcore's own Signer, fixing the time through the X-Sdk-Date we sent."""
    pairs = req["pairs"]
    assert isinstance(pairs, list)
    sdk_request = SdkRequest(
        method=req["method"],
        schema="https",
        host=req["host"],
        resource_path=req["path"],
        query_params=list(pairs),
        header_params=dict(headers),
        body=req["body"],
    )
    credentials = SimpleNamespace(ak=req["ak"], sk=req["sk"])
    signed: SdkRequest = Signer(credentials).sign(sdk_request)
    return signed


def _ours(req: dict[str, object]) -> dict[str, str]:
    headers = req["headers"]
    assert isinstance(headers, dict)
    return sign_request(
        str(req["method"]),
        str(req["url"]),
        headers,
        req["body"],  # type: ignore[arg-type]
        str(req["ak"]),
        str(req["sk"]),
        req["now"],  # type: ignore[arg-type]
    )


@settings(max_examples=400, deadline=None)
@given(random_requests())
def test_signature_matches_official_sdk(req: dict[str, object]) -> None:
    """For random paths, queries, headers, bodies and times our Authorization equals the SDK's."""
    ours = _ours(req)
    given_headers = req["headers"]
    assert isinstance(given_headers, dict)
    # The SDK takes its time from X-Sdk-Date when present; give it the one we sent.
    sdk_input = dict(given_headers)
    if not any(name.lower() == "x-sdk-date" for name in sdk_input):
        sdk_input["X-Sdk-Date"] = ours["X-Sdk-Date"]
    sdk = _sdk_sign(req, sdk_input)
    assert ours["Authorization"] == sdk.header_params["Authorization"]
    # The query the SDK sends is exactly the canonical query in our URL.
    assert sdk.uri.partition("?")[2] == urlsplit(str(req["url"])).query


@settings(max_examples=200, deadline=None)
@given(random_requests())
def test_verify_accepts_any_signed_request(req: dict[str, object]) -> None:
    """Whatever sign_request produces, verify_request accepts at the same moment."""
    sent = _ours(req)
    parts = urlsplit(str(req["url"]))
    reason = verify_request(
        str(req["method"]),
        parts.path,
        parts.query,
        sent,
        req["body"],  # type: ignore[arg-type]
        {str(req["ak"]): str(req["sk"])}.get,
        datetime.strptime(sent_date(sent), "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC),
    )
    assert reason is None


def sent_date(headers: dict[str, str]) -> str:
    """The X-Sdk-Date among ``headers``, whatever its case."""
    return next(value for name, value in headers.items() if name.lower() == "x-sdk-date")


# --------------------------------------------------------------------------------------------------
# verify_request

SIGNED_AT = datetime(2024, 1, 1, tzinfo=UTC)
BODY = b'{"task_id_list":["a"]}'
SECRETS = {AK: SK}.get


def _signed_post() -> tuple[str, str, dict[str, str]]:
    """A signed JSON POST with a query: returns its path, query and headers."""
    query = canonical_query([("limit", "10"), ("name", "my task")])
    url = f"https://dcs.eu-de.otc.t-systems.com/v2/{PROJECT}/migration-tasks?{query}"
    headers = sign_request(
        "POST",
        url,
        {"Content-Type": "application/json", "X-Project-Id": PROJECT, "X_Trace": "1"},
        BODY,
        AK,
        SK,
        SIGNED_AT,
    )
    parts = urlsplit(url)
    return parts.path, parts.query, headers


def test_verify_accepts_signed_request() -> None:
    """A request as signed verifies, with header names in any case and the query in any order."""
    path, query, headers = _signed_post()
    assert verify_request("POST", path, query, headers, BODY, SECRETS, SIGNED_AT) is None
    lowered = {name.lower(): value for name, value in headers.items()}
    reordered = "&".join(reversed(query.split("&")))
    assert verify_request("POST", path, reordered, lowered, BODY, SECRETS, SIGNED_AT) is None


def test_verify_ignores_unsigned_underscore_header() -> None:
    """Changing a header whose name contains '_' does not matter, since it is not signed."""
    path, query, headers = _signed_post()
    headers["X_Trace"] = "2"
    assert verify_request("POST", path, query, headers, BODY, SECRETS, SIGNED_AT) is None


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(lambda r: r.update(path=r["path"] + "x"), id="path"),
        pytest.param(lambda r: r.update(query="limit=11&name=my%20task"), id="query"),
        pytest.param(lambda r: r.update(method="PUT"), id="method"),
        pytest.param(lambda r: r["headers"].update({"X-Project-Id": "f" * 32}), id="header"),
        pytest.param(lambda r: r.update(body=b'{"task_id_list":["b"]}'), id="body"),
    ],
)
def test_verify_rejects_tampering(tamper: Callable[[dict[str, object]], None]) -> None:
    """A changed path, query, method, signed header or body is a signature mismatch."""
    path, query, headers = _signed_post()
    r: dict[str, object] = {
        "method": "POST",
        "path": path,
        "query": query,
        "headers": headers,
        "body": BODY,
    }
    tamper(r)
    reason = verify_request(
        r["method"],  # type: ignore[arg-type]
        r["path"],  # type: ignore[arg-type]
        r["query"],  # type: ignore[arg-type]
        r["headers"],  # type: ignore[arg-type]
        r["body"],  # type: ignore[arg-type]
        SECRETS,
        SIGNED_AT,
    )
    assert reason == "signature mismatch"


def test_verify_rejects_claimed_payload_hash_for_other_body() -> None:
    """An X-Sdk-Content-Sha256 that is neither UNSIGNED-PAYLOAD nor the body's hash is refused."""
    path, query, headers = _signed_post()
    headers["X-Sdk-Content-Sha256"] = "0" * 64
    reason = verify_request("POST", path, query, headers, BODY, SECRETS, SIGNED_AT)
    assert reason == "payload hash mismatch"


def test_verify_rejects_unknown_access_key() -> None:
    """A signature by an access key the server does not know is refused as such."""
    path, query, headers = _signed_post()
    assert verify_request("POST", path, query, headers, BODY, lambda _: None, SIGNED_AT) == (
        "unknown access key"
    )


def test_verify_rejects_wrong_secret() -> None:
    """A signature made with another secret key is a mismatch."""
    path, query, headers = _signed_post()
    other = {AK: SK + "x"}.get
    assert verify_request("POST", path, query, headers, BODY, other, SIGNED_AT) == (
        "signature mismatch"
    )


@pytest.mark.parametrize("offset", [timedelta(minutes=20), timedelta(minutes=-20)])
def test_verify_rejects_date_20_minutes_off(offset: timedelta) -> None:
    """An X-Sdk-Date 20 min off the server clock is refused as expired, naming the skew (C19)."""
    path, query, headers = _signed_post()
    reason = verify_request("POST", path, query, headers, BODY, SECRETS, SIGNED_AT + offset)
    assert reason is not None
    assert "expired" in reason
    assert "1200 s" in reason
    assert "skew" in reason
    within = SIGNED_AT + timedelta(minutes=14)
    assert verify_request("POST", path, query, headers, BODY, SECRETS, within) is None


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda h: h.pop("Authorization"), "missing authorization"),
        (lambda h: h.update(Authorization="Basic dXNlcjpwYXNz"), "unsupported algorithm"),
        (
            lambda h: h.update(Authorization="SDK-HMAC-SHA256 Access=x, Signature=y"),
            "malformed authorization",
        ),
        (lambda h: h.pop("X-Project-Id"), "signed header x-project-id missing"),
        (lambda h: h.update({"X-Sdk-Date": "yesterday"}), "malformed x-sdk-date"),
    ],
)
def test_verify_reports_reason(change: Callable[[dict[str, str]], object], reason: str) -> None:
    """Missing or malformed parts are refused with a short reason."""
    path, query, headers = _signed_post()
    change(headers)
    assert verify_request("POST", path, query, headers, BODY, SECRETS, SIGNED_AT) == reason


def test_verify_requires_signed_date() -> None:
    """A signature whose SignedHeaders leave out x-sdk-date is refused."""
    url = f"https://dcs.eu-de.otc.t-systems.com/v2/{PROJECT}/migration-tasks"
    headers = sign_request("GET", url, {"X_Sdk_Date": "x"}, b"", AK, SK, SIGNED_AT)
    headers["Authorization"] = headers["Authorization"].replace(";x-sdk-date", "")
    reason = verify_request("GET", urlsplit(url).path, "", headers, b"", SECRETS, SIGNED_AT)
    assert reason == "x-sdk-date not signed"


# --------------------------------------------------------------------------------------------------
# parse_expires_at, utc_now


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2015-11-09T01:42:57.527363Z", datetime(2015, 11, 9, 1, 42, 57, 527363, tzinfo=UTC)),
        ("2015-11-09T01:42:57Z", datetime(2015, 11, 9, 1, 42, 57, tzinfo=UTC)),
        ("2015-11-09T01:42:57.5Z", datetime(2015, 11, 9, 1, 42, 57, 500000, tzinfo=UTC)),
        ("2015-11-09T01:42:57.123456789Z", datetime(2015, 11, 9, 1, 42, 57, 123456, tzinfo=UTC)),
        ("2015-11-09T01:42:57+00:00", datetime(2015, 11, 9, 1, 42, 57, tzinfo=UTC)),
        ("2015-11-09T03:42:57.000+02:00", datetime(2015, 11, 9, 1, 42, 57, tzinfo=UTC)),
        ("2015-11-09T03:42:57+0200", datetime(2015, 11, 9, 1, 42, 57, tzinfo=UTC)),
        ("2015-11-09 01:42:57", datetime(2015, 11, 9, 1, 42, 57, tzinfo=UTC)),
    ],
)
def test_parse_expires_at_formats(text: str, expected: datetime) -> None:
    """IAM timestamps with or without fraction, with Z or an offset, parse to aware UTC."""
    parsed = parse_expires_at(text)
    assert parsed == expected
    assert parsed.tzinfo is UTC


@pytest.mark.parametrize(
    "text", ["", "tomorrow", "2015-13-09T01:42:57Z", "2015-11-09", "20151109T014257Z"]
)
def test_parse_expires_at_rejects_and_names_text(text: str) -> None:
    """Anything else raises ValueError naming the text."""
    with pytest.raises(ValueError, match="unrecognised timestamp") as caught:
        parse_expires_at(text)
    assert repr(text) in str(caught.value)


def test_utc_now_is_aware_utc() -> None:
    """utc_now returns an aware datetime in UTC."""
    assert utc_now().tzinfo is UTC


# --------------------------------------------------------------------------------------------------
# TokenCache

T0 = datetime(2024, 1, 1, tzinfo=UTC)


class FakeClock:
    """A clock that moves only when told."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **kwargs: float) -> None:
        self.now += timedelta(**kwargs)


class FakeIam:
    """A token source issuing TOKEN_1, TOKEN_2, ... valid for `lifetime`; can be gated or fail."""

    def __init__(self, clock: FakeClock, lifetime: timedelta = timedelta(hours=24)) -> None:
        self.clock = clock
        self.lifetime = lifetime
        self.calls = 0
        self.gate: asyncio.Event | None = None
        self.fail_next = 0

    async def __call__(self) -> IssuedToken:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_next:
            self.fail_next -= 1
            raise ConnectionError("IAM unreachable")
        return IssuedToken(f"TOKEN_{self.calls}", self.clock() + self.lifetime, PROJECT)


async def test_single_flight_get() -> None:
    """Ten concurrent get() calls on an empty cache share one fetch."""
    clock = FakeClock()
    iam = FakeIam(clock)
    iam.gate = asyncio.Event()
    cache = TokenCache(iam, clock=clock)
    waiters = [asyncio.create_task(cache.get()) for _ in range(10)]
    await asyncio.sleep(0)
    iam.gate.set()
    tokens = await asyncio.gather(*waiters)
    assert {token.value for token in tokens} == {"TOKEN_1"}
    assert cache.fetch_count == 1
    assert iam.calls == 1
    assert (await cache.get()).value == "TOKEN_1"
    assert cache.fetch_count == 1


async def test_refresh_ahead_of_expiry_24h_token() -> None:
    """A 24 h token is reused until 1 h before it expires, then refreshed."""
    clock = FakeClock()
    cache = TokenCache(FakeIam(clock), clock=clock)
    assert (await cache.get()).value == "TOKEN_1"
    clock.advance(hours=22, minutes=59)
    assert (await cache.get()).value == "TOKEN_1"
    clock.advance(minutes=2)
    assert (await cache.get()).value == "TOKEN_2"
    assert cache.fetch_count == 2


async def test_refresh_margin_capped_at_tenth_of_lifetime() -> None:
    """A 120 s token is refreshed about 12 s early, not an hour early on every call (C16)."""
    clock = FakeClock()
    cache = TokenCache(FakeIam(clock, lifetime=timedelta(seconds=120)), clock=clock)
    assert (await cache.get()).value == "TOKEN_1"
    clock.advance(seconds=107)
    assert (await cache.get()).value == "TOKEN_1"
    clock.advance(seconds=2)
    assert (await cache.get()).value == "TOKEN_2"
    assert cache.fetch_count == 2


async def test_c16_rejection_by_three_callers_fetches_once() -> None:
    """Three tasks rejected with one token cause one extra fetch; a late one reuses it (C16)."""
    clock = FakeClock()
    iam = FakeIam(clock, lifetime=timedelta(seconds=120))
    cache = TokenCache(iam, clock=clock)
    stale = (await cache.get()).value
    iam.gate = asyncio.Event()
    waiters = [asyncio.create_task(cache.refresh_after_rejection(stale)) for _ in range(3)]
    await asyncio.sleep(0)
    iam.gate.set()
    tokens = await asyncio.gather(*waiters)
    assert [token.value if token else None for token in tokens] == ["TOKEN_2"] * 3
    late = await cache.refresh_after_rejection(stale)
    assert late is not None and late.value == "TOKEN_2"
    assert cache.fetch_count == 2
    assert iam.calls == 2


async def test_c17b_forced_refresh_is_rate_limited() -> None:
    """A token rejected again soon after a forced refresh gets None, not another IAM call (C17b)."""
    clock = FakeClock()
    iam = FakeIam(clock)
    cache = TokenCache(iam, clock=clock, min_forced_refresh_interval=timedelta(minutes=5))
    first = await cache.get()
    second = await cache.refresh_after_rejection(first.value)
    assert second is not None and second.value == "TOKEN_2"
    for _ in range(10):  # every poll of the next minutes is refused again
        clock.advance(seconds=10)
        assert await cache.refresh_after_rejection(second.value) is None
    assert cache.fetch_count == 2
    clock.advance(minutes=5)
    third = await cache.refresh_after_rejection(second.value)
    assert third is not None and third.value == "TOKEN_3"
    assert cache.fetch_count == 3


async def test_rejection_joins_fetch_in_flight() -> None:
    """A rejection while a get() fetch is in flight joins that fetch instead of starting another."""
    clock = FakeClock()
    iam = FakeIam(clock)
    iam.gate = asyncio.Event()
    cache = TokenCache(iam, clock=clock)
    getter = asyncio.create_task(cache.get())
    await asyncio.sleep(0)
    rejecter = asyncio.create_task(cache.refresh_after_rejection("TOKEN_0"))
    await asyncio.sleep(0)
    iam.gate.set()
    got, refreshed = await asyncio.gather(getter, rejecter)
    assert got.value == "TOKEN_1"
    assert refreshed is not None and refreshed.value == "TOKEN_1"
    assert cache.fetch_count == 1


async def test_get_joins_forced_refresh_in_flight() -> None:
    """A get() during a forced refresh waits for the new token instead of returning the rejected one."""
    clock = FakeClock()
    iam = FakeIam(clock)
    cache = TokenCache(iam, clock=clock)
    stale = await cache.get()
    iam.gate = asyncio.Event()
    rejecter = asyncio.create_task(cache.refresh_after_rejection(stale.value))
    await asyncio.sleep(0)
    getter = asyncio.create_task(cache.get())
    await asyncio.sleep(0)
    iam.gate.set()
    refreshed, got = await asyncio.gather(rejecter, getter)
    assert refreshed is not None and refreshed.value == "TOKEN_2"
    assert got.value == "TOKEN_2"
    assert cache.fetch_count == 2


async def test_fetch_failure_is_not_cached() -> None:
    """A failed fetch raises in every waiting caller, and the next get() fetches again."""
    clock = FakeClock()
    iam = FakeIam(clock)
    iam.fail_next = 1
    iam.gate = asyncio.Event()
    cache = TokenCache(iam, clock=clock)
    waiters = [asyncio.create_task(cache.get()) for _ in range(3)]
    await asyncio.sleep(0)
    iam.gate.set()
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(result, ConnectionError) for result in results)
    assert cache.fetch_count == 1
    assert (await cache.get()).value == "TOKEN_2"
    assert cache.fetch_count == 2


async def test_cancelled_caller_does_not_cancel_shared_fetch() -> None:
    """Cancelling one waiting caller (a poll timeout) leaves the shared fetch running for others."""
    clock = FakeClock()
    iam = FakeIam(clock)
    iam.gate = asyncio.Event()
    cache = TokenCache(iam, clock=clock)
    impatient = asyncio.create_task(cache.get())
    patient = asyncio.create_task(cache.get())
    await asyncio.sleep(0)
    impatient.cancel()
    await asyncio.sleep(0)
    iam.gate.set()
    assert (await patient).value == "TOKEN_1"
    assert impatient.cancelled()
    assert cache.fetch_count == 1


async def test_token_value_absent_from_repr() -> None:
    """Neither IssuedToken's nor TokenCache's repr shows the token value."""
    token = IssuedToken("s3cr3t-token-value", T0 + timedelta(hours=24), PROJECT)
    assert "s3cr3t-token-value" not in repr(token)
    assert PROJECT in repr(token)

    async def fetch() -> IssuedToken:
        return token

    cache = TokenCache(fetch, clock=lambda: T0)
    await cache.get()
    assert "s3cr3t-token-value" not in repr(cache)


def test_issued_token_requires_aware_expiry() -> None:
    """A naive expires_at is refused, so expiry comparisons cannot fail later."""
    with pytest.raises(ValueError, match="timezone-aware"):
        IssuedToken("t", datetime(2024, 1, 1), None)
