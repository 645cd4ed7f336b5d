"""Tests for exporter.web_config: real TLS handshakes and basic auth against a loopback server."""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import bcrypt
import pytest
from aiohttp import web
from multidict import CIMultiDictProxy

from exporter.web_config import (
    MAX_PENDING_PASSWORD_CHECKS,
    WebConfig,
    WebConfigError,
    auth_middleware,
    load_web_config,
)
from tests.support import basic_auth, make_test_ca, make_test_leaf, run_openssl

PASSWORD = "correct horse battery staple"
# Cost 4 (the minimum) keeps the tests fast; the code path is the same as for cost 10.
HASH_2B = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
HASH_2Y = "$2y$" + HASH_2B[4:]  # what htpasswd writes
CHALLENGE = 'Basic realm="dcs-migration-exporter"'
# The hash of the bug report: well-formed but for its cost, which bcrypt refuses ("Invalid salt").
HASH_COST_99 = "$2b$99$Wrn/lZRP.MWHHZkRoGW0jONlo.FkX3Xm4RT7L8XQuVSY3eQ3cc/Ja"


@dataclass(frozen=True)
class Pki:
    """Paths of a throwaway CA, a server certificate and client certificates."""

    dir: Path
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path  # a client certificate from an unrelated CA
    stranger_key: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Generate the CA, server and client certificates once per module with the openssl CLI."""
    d = tmp_path_factory.mktemp("pki")
    make_test_ca(d, "ca")
    make_test_ca(d, "other-ca")
    make_test_leaf(d, "ca", "server", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth")
    make_test_leaf(d, "ca", "client", "extendedKeyUsage=clientAuth")
    make_test_leaf(d, "other-ca", "stranger", "extendedKeyUsage=clientAuth")
    return Pki(
        dir=d,
        ca=d / "ca.crt",
        server_cert=d / "server.crt",
        server_key=d / "server.key",
        client_cert=d / "client.crt",
        client_key=d / "client.key",
        stranger_cert=d / "stranger.crt",
        stranger_key=d / "stranger.key",
    )


def _write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "web-config.yml"
    path.write_text(text)
    return str(path)


def _tls_yaml(
    pki: Pki, extra: str = "", *, cert: Path | None = None, key: Path | None = None
) -> str:
    """A TLS section with the server's certificate and key, or ``cert`` / ``key`` in their place."""
    # JSON strings are YAML strings, which quotes the temporary paths safely.
    return (
        "tls_server_config:\n"
        f"  cert_file: {json.dumps(str(cert or pki.server_cert))}\n"
        f"  key_file: {json.dumps(str(key or pki.server_key))}\n" + extra
    )


def _client_ctx(pki: Pki, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    if cert is not None and key is not None:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


async def _ok(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


@asynccontextmanager
async def _serve(config: WebConfig, exempt: frozenset[str] = frozenset()) -> AsyncIterator[str]:
    """Run an app with /metrics and /healthz on 127.0.0.1:0 and yield its base URL."""
    app = web.Application(middlewares=[auth_middleware(config, exempt)])
    app.router.add_get("/metrics", _ok)
    app.router.add_get("/healthz", _ok)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=config.ssl_context)
    await site.start()
    port = runner.addresses[0][1]
    scheme = "https" if config.ssl_context is not None else "http"
    try:
        yield f"{scheme}://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def _get(
    url: str, ssl_ctx: ssl.SSLContext | bool = True, headers: dict[str, str] | None = None
) -> tuple[int, CIMultiDictProxy[str]]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(url, ssl=ssl_ctx, headers=headers) as resp,
    ):
        await resp.read()
        return resp.status, resp.headers


def _count_bcrypt(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    calls: list[bytes] = []
    real: Callable[[bytes, bytes], bool] = bcrypt.checkpw

    def counting(password: bytes, hashed: bytes) -> bool:
        calls.append(hashed)
        return real(password, hashed)

    # web_config calls bcrypt.checkpw through the module at call time, so this catches every call.
    monkeypatch.setattr(bcrypt, "checkpw", counting)
    return calls


# --- loading ---------------------------------------------------------------------------------


def test_none_means_plain_http_without_auth() -> None:
    """No --web.config.file gives no TLS, no users and no extra headers."""
    config = load_web_config(None)
    assert config.ssl_context is None
    assert dict(config.basic_auth_users) == {}
    assert dict(config.headers) == {}


def test_empty_file_is_plain_http(tmp_path: Path) -> None:
    """An empty file is valid and configures nothing, as in exporter-toolkit."""
    assert load_web_config(_write(tmp_path, "")) == WebConfig()


@pytest.mark.parametrize("prefix", ["$2a$", "$2b$", "$2y$"])
def test_bcrypt_prefixes_are_normalised(tmp_path: Path, prefix: str) -> None:
    """$2a$, $2b$ and $2y$ hashes all load as $2b$ hashes that verify the password."""
    config = load_web_config(
        _write(tmp_path, f"basic_auth_users:\n  alice: '{prefix}{HASH_2B[4:]}'\n")
    )
    stored = config.basic_auth_users["alice"]
    assert stored.startswith(b"$2b$")
    assert bcrypt.checkpw(PASSWORD.encode(), stored)


def test_hashes_stay_out_of_repr(tmp_path: Path) -> None:
    """The repr of a WebConfig, which may be logged, does not contain password hashes."""
    config = load_web_config(_write(tmp_path, f"basic_auth_users:\n  alice: '{HASH_2Y}'\n"))
    assert HASH_2B[7:] not in repr(config)


def test_bad_yaml_names_file_and_line_not_the_hash(tmp_path: Path) -> None:
    """Invalid YAML names the file and line but never quotes the line, which may hold a hash."""
    path = _write(tmp_path, f"basic_auth_users:\n  alice: '{HASH_2Y}'\n  bob: [\n")
    with pytest.raises(WebConfigError) as err:
        load_web_config(path)
    assert path in str(err.value)
    assert "invalid YAML" in str(err.value)
    assert HASH_2B[7:] not in str(err.value)


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("basic_auth_user:\n  alice: x\n", "basic_auth_user"),
        ("http_server_config:\n  headerz: {}\n", "http_server_config.headerz"),
        ("tls_server_config:\n  certfile: a.crt\n", "tls_server_config.certfile"),
    ],
)
def test_unknown_key_is_named(tmp_path: Path, text: str, named: str) -> None:
    """An unknown key, at any level, is an error naming the file, its line and the full key."""
    path = _write(tmp_path, text)
    with pytest.raises(WebConfigError, match="unknown key") as err:
        load_web_config(path)
    assert f"{path}:" in str(err.value)
    assert f"{named}:" in str(err.value)


def test_unsupported_toolkit_key_is_refused(tmp_path: Path, pki: Pki) -> None:
    """A toolkit key this exporter cannot honour, like client_allowed_sans, fails instead of
    being ignored."""
    path = _write(tmp_path, _tls_yaml(pki, "  client_allowed_sans: [scraper]\n"))
    with pytest.raises(WebConfigError, match=r"tls_server_config\.client_allowed_sans: .*not"):
        load_web_config(path)


def test_missing_file_is_named(tmp_path: Path) -> None:
    """A missing --web.config.file is an error naming that file."""
    missing = str(tmp_path / "nope.yml")
    with pytest.raises(WebConfigError, match="file not found") as err:
        load_web_config(missing)
    assert missing in str(err.value)


def test_missing_cert_file_is_named(tmp_path: Path, pki: Pki) -> None:
    """A missing cert_file is an error at load time naming the key and the file."""
    missing = tmp_path / "missing.crt"
    text = _tls_yaml(pki, cert=missing)
    with pytest.raises(WebConfigError, match=r"tls_server_config\.cert_file: file not found") as e:
        load_web_config(_write(tmp_path, text))
    assert str(missing) in str(e.value)


def test_relative_paths_are_relative_to_the_config_file(pki: Pki) -> None:
    """cert_file and key_file without a directory are found next to the config file."""
    path = pki.dir / "relative.yml"
    path.write_text("tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n")
    assert load_web_config(str(path)).ssl_context is not None


def test_mismatched_key_is_refused(tmp_path: Path, pki: Pki) -> None:
    """A key that does not belong to the certificate fails at load time, naming key_file."""
    text = _tls_yaml(pki, key=pki.client_key)
    with pytest.raises(WebConfigError, match=r"tls_server_config\.key_file: "):
        load_web_config(_write(tmp_path, text))


def test_certificate_as_key_names_key_file(tmp_path: Path, pki: Pki) -> None:
    """A key_file holding no private key is named as such, not as an opaque OpenSSL error."""
    text = _tls_yaml(pki, key=pki.server_cert)
    with pytest.raises(WebConfigError, match=r"tls_server_config\.key_file: no PEM PRIVATE KEY"):
        load_web_config(_write(tmp_path, text))


def test_encrypted_key_is_refused_without_prompting(tmp_path: Path, pki: Pki) -> None:
    """An encrypted key fails with an error instead of OpenSSL prompting for a passphrase."""
    encrypted = tmp_path / "encrypted.key"
    run_openssl(
        tmp_path,
        *("pkey", "-in", str(pki.server_key), "-aes256", "-passout", "pass:secret"),
        *("-out", str(encrypted)),
    )
    text = _tls_yaml(pki, key=encrypted)
    with pytest.raises(WebConfigError, match=r"key_file: encrypted keys are not supported"):
        load_web_config(_write(tmp_path, text))


@pytest.mark.parametrize("auth_type", ["VerifyClientCertIfGiven", "RequireAndVerifyClientCert"])
def test_verifying_client_auth_needs_client_ca_file(
    tmp_path: Path, pki: Pki, auth_type: str
) -> None:
    """A client_auth_type that verifies certificates without client_ca_file is an error."""
    path = _write(tmp_path, _tls_yaml(pki, f"  client_auth_type: {auth_type}\n"))
    with pytest.raises(WebConfigError, match=r"tls_server_config\.client_ca_file: required"):
        load_web_config(path)


def test_unknown_client_auth_type_is_named(tmp_path: Path, pki: Pki) -> None:
    """An unknown client_auth_type names the key and lists the valid values."""
    path = _write(tmp_path, _tls_yaml(pki, "  client_auth_type: Always\n"))
    with pytest.raises(WebConfigError, match=r"client_auth_type: unknown value 'Always'.*Require"):
        load_web_config(path)


def test_min_version_above_max_version_is_refused(tmp_path: Path, pki: Pki) -> None:
    """min_version above max_version is an error naming min_version."""
    path = _write(tmp_path, _tls_yaml(pki, "  min_version: TLS13\n  max_version: TLS12\n"))
    with pytest.raises(WebConfigError, match=r"tls_server_config\.min_version: is above"):
        load_web_config(path)


def test_invalid_hash_is_named_but_not_echoed(tmp_path: Path) -> None:
    """A value that is not a bcrypt hash names the user but never echoes the value."""
    path = _write(tmp_path, "basic_auth_users:\n  alice: plaintext-secret\n")
    with pytest.raises(WebConfigError, match=r"basic_auth_users\.alice: not a bcrypt hash") as e:
        load_web_config(path)
    assert "plaintext-secret" not in str(e.value)


@pytest.mark.parametrize(
    ("hashed", "problem"),
    [
        (HASH_COST_99, "bcrypt cost 99 is outside 04..31"),
        (f"$2b$03${HASH_2B[7:]}", "bcrypt cost 03 is outside 04..31"),
        (f"$2y$32${HASH_2B[7:]}", "bcrypt cost 32 is outside 04..31"),
        (f"$2b$4${HASH_2B[7:]}", "not a bcrypt hash: no two-digit cost after the prefix"),
        (f"$2x${HASH_2B[4:]}", "not a bcrypt hash ($2a$, $2b$ or $2y$)"),
        ("$1$saltsalt$qjZ4dVYXCbHUmvbf8.bQ31", "not a bcrypt hash ($2a$, $2b$ or $2y$)"),
        (HASH_2B[:-1], "bcrypt hash has 59 characters, not 60"),
        (HASH_2B + HASH_2B[-1], "bcrypt hash has 61 characters, not 60"),
        (f"{HASH_2B[:9]}+{HASH_2B[10:]}", "character outside ./A-Za-z0-9 at position 10"),
        (f"{HASH_2B[:28]}/{HASH_2B[29:]}", "bcrypt salt is corrupt (position 29"),
        (f"{HASH_2B[:59]}/", "bcrypt checksum is corrupt (position 60"),
    ],
    ids=[
        *("cost-99", "cost-03", "cost-32", "one-digit-cost", "2x", "md5crypt", "short", "long"),
        *("alphabet", "salt-tail", "checksum-tail"),
    ],
)
def test_unusable_hash_is_refused_at_load(tmp_path: Path, hashed: str, problem: str) -> None:
    """A hash bcrypt cannot use fails --config.check and start-up with the file, line, user and
    what is wrong, instead of a 500 on every login."""
    path = _write(tmp_path, f"basic_auth_users:\n  alice: '{HASH_2Y}'\n  bob: '{hashed}'\n")
    with pytest.raises(WebConfigError) as e:
        load_web_config(path)
    assert str(e.value).startswith(f"{path}:3: basic_auth_users.bob: ")
    assert problem in str(e.value)
    assert hashed[7:] not in str(e.value)


@pytest.mark.parametrize("cost", ["04", "31"])
def test_bcrypt_cost_bounds_load(tmp_path: Path, cost: str) -> None:
    """Hashes of cost 04 and 31, the bounds bcrypt takes, load."""
    path = _write(tmp_path, f"basic_auth_users:\n  alice: '$2y${cost}${HASH_2B[7:]}'\n")
    assert load_web_config(path).basic_auth_users["alice"].startswith(f"$2b${cost}$".encode())


def test_duplicate_user_is_refused(tmp_path: Path) -> None:
    """A user listed twice is an error rather than the last entry silently winning."""
    path = _write(tmp_path, f"basic_auth_users:\n  alice: '{HASH_2Y}'\n  alice: '{HASH_2Y}'\n")
    with pytest.raises(WebConfigError, match=r":3: basic_auth_users\.alice: duplicate key"):
        load_web_config(path)


def test_header_outside_the_toolkit_list_is_refused(tmp_path: Path) -> None:
    """Only the headers exporter-toolkit allows can be set, with the values it allows."""
    bad_name = _write(tmp_path, "http_server_config:\n  headers:\n    X-Powered-By: me\n")
    with pytest.raises(WebConfigError, match=r"headers\.X-Powered-By: header cannot be"):
        load_web_config(bad_name)
    bad_value = _write(tmp_path, "http_server_config:\n  headers:\n    X-Frame-Options: allow\n")
    with pytest.raises(WebConfigError, match=r"headers\.X-Frame-Options: value 'allow'"):
        load_web_config(bad_value)


# --- TLS -------------------------------------------------------------------------------------


async def test_tls_handshake_with_the_ca(tmp_path: Path, pki: Pki) -> None:
    """A client that trusts the CA completes the TLS handshake and gets /metrics."""
    config = load_web_config(_write(tmp_path, _tls_yaml(pki)))
    async with _serve(config) as url:
        status, _ = await _get(f"{url}/metrics", _client_ctx(pki))
    assert status == 200


async def test_tls_client_without_the_ca_refuses_the_server(tmp_path: Path, pki: Pki) -> None:
    """A client that does not trust the CA rejects the server's certificate."""
    config = load_web_config(_write(tmp_path, _tls_yaml(pki)))
    async with _serve(config) as url:
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await _get(f"{url}/metrics", ssl.create_default_context())


async def test_plain_http_to_the_tls_port_fails(tmp_path: Path, pki: Pki) -> None:
    """Plain HTTP to the TLS port gets no HTTP response."""
    config = load_web_config(_write(tmp_path, _tls_yaml(pki)))
    async with _serve(config) as url:
        with pytest.raises(aiohttp.ClientError):
            await _get(url.replace("https://", "http://") + "/metrics")


async def test_mtls_requires_a_client_certificate(tmp_path: Path, pki: Pki) -> None:
    """RequireAndVerifyClientCert rejects clients without a certificate or with one from another
    CA, and accepts one signed by client_ca_file."""
    extra = f"  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: '{pki.ca}'\n"
    config = load_web_config(_write(tmp_path, _tls_yaml(pki, extra)))
    async with _serve(config) as url:
        with pytest.raises(aiohttp.ClientConnectionError):
            await _get(f"{url}/metrics", _client_ctx(pki))
        with pytest.raises(aiohttp.ClientConnectionError):
            await _get(f"{url}/metrics", _client_ctx(pki, pki.stranger_cert, pki.stranger_key))
        status, _ = await _get(f"{url}/metrics", _client_ctx(pki, pki.client_cert, pki.client_key))
    assert status == 200


async def test_verify_if_given_accepts_clients_without_certificate(
    tmp_path: Path, pki: Pki
) -> None:
    """VerifyClientCertIfGiven lets a client without a certificate in but not a stranger's."""
    extra = f"  client_auth_type: VerifyClientCertIfGiven\n  client_ca_file: '{pki.ca}'\n"
    config = load_web_config(_write(tmp_path, _tls_yaml(pki, extra)))
    async with _serve(config) as url:
        status, _ = await _get(f"{url}/metrics", _client_ctx(pki))
        with pytest.raises(aiohttp.ClientConnectionError):
            await _get(f"{url}/metrics", _client_ctx(pki, pki.stranger_cert, pki.stranger_key))
    assert status == 200


async def test_min_version_tls13_refuses_a_tls12_client(tmp_path: Path, pki: Pki) -> None:
    """With min_version TLS13 a client limited to TLS 1.2 fails the handshake, a TLS 1.3 one
    succeeds."""
    config = load_web_config(_write(tmp_path, _tls_yaml(pki, "  min_version: TLS13\n")))
    tls12_only = _client_ctx(pki)
    tls12_only.maximum_version = ssl.TLSVersion.TLSv1_2
    async with _serve(config) as url:
        with pytest.raises(aiohttp.ClientConnectorError):  # fails in the handshake itself
            await _get(f"{url}/metrics", tls12_only)
        status, _ = await _get(f"{url}/metrics", _client_ctx(pki))
    assert status == 200


# --- basic auth and headers ------------------------------------------------------------------


async def test_basic_auth_ok_wrong_missing(tmp_path: Path, pki: Pki) -> None:
    """Right credentials get 200; wrong, unknown-user or missing ones get 401 with the challenge."""
    text = _tls_yaml(pki, f"basic_auth_users:\n  alice: '{HASH_2Y}'\n")
    config = load_web_config(_write(tmp_path, text))
    ctx = _client_ctx(pki)
    async with _serve(config) as url:
        ok, _ = await _get(f"{url}/metrics", ctx, basic_auth("alice", PASSWORD))
        wrong = await _get(f"{url}/metrics", ctx, basic_auth("alice", "guess"))
        unknown = await _get(f"{url}/metrics", ctx, basic_auth("mallory", PASSWORD))
        missing = await _get(f"{url}/metrics", ctx)
        garbage = await _get(f"{url}/metrics", ctx, {"Authorization": "Basic !!!"})
    assert ok == 200
    for status, headers in (wrong, unknown, missing, garbage):
        assert status == 401
        assert headers["WWW-Authenticate"] == CHALLENGE


async def test_unknown_user_costs_a_bcrypt_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unknown user is checked against a dummy hash, so timing does not reveal user names."""
    config = load_web_config(_write(tmp_path, f"basic_auth_users:\n  alice: '{HASH_2Y}'\n"))
    calls = _count_bcrypt(monkeypatch)
    async with _serve(config) as url:
        status, _ = await _get(f"{url}/metrics", headers=basic_auth("mallory", PASSWORD))
    assert status == 401
    assert len(calls) == 1
    assert calls[0] != config.basic_auth_users["alice"]


async def test_bcrypt_result_is_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A repeated request with the same good credentials does not call bcrypt again; wrong
    ones always do."""
    config = load_web_config(_write(tmp_path, f"basic_auth_users:\n  alice: '{HASH_2Y}'\n"))
    calls = _count_bcrypt(monkeypatch)
    async with _serve(config) as url:
        for _ in range(3):
            status, _ = await _get(f"{url}/metrics", headers=basic_auth("alice", PASSWORD))
            assert status == 200
        assert len(calls) == 1
        for _ in range(2):
            status, _ = await _get(f"{url}/metrics", headers=basic_auth("alice", PASSWORD + "x"))
            assert status == 401
    assert len(calls) == 3


async def test_overlong_password_is_refused(tmp_path: Path) -> None:
    """A password past bcrypt's 72-byte limit gets 401, not a server error."""
    config = load_web_config(_write(tmp_path, f"basic_auth_users:\n  alice: '{HASH_2Y}'\n"))
    async with _serve(config) as url:
        status, _ = await _get(f"{url}/metrics", headers=basic_auth("alice", PASSWORD * 4))
    assert status == 401


async def test_unusable_hash_past_loading_gets_401_and_one_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Should a hash bcrypt refuses reach the server anyway, its logins get 401 instead of 500,
    other users still get in, and the log gets one line naming the user, not the hash."""
    config = WebConfig(basic_auth_users={"alice": HASH_2B.encode(), "bob": HASH_COST_99.encode()})
    with caplog.at_level(logging.ERROR, logger="exporter.web_config"):
        async with _serve(config) as url:
            bob = [
                await _get(f"{url}/metrics", headers=basic_auth("bob", PASSWORD)) for _ in range(2)
            ]
            unknown = await _get(f"{url}/metrics", headers=basic_auth("mallory", PASSWORD))
            alice, _ = await _get(f"{url}/metrics", headers=basic_auth("alice", PASSWORD))
    for status, headers in (*bob, unknown):
        assert status == 401
        assert headers["WWW-Authenticate"] == CHALLENGE
    assert alice == 200
    logged = [r.getMessage() for r in caplog.records if r.name == "exporter.web_config"]
    assert len(logged) == 1
    assert "'bob'" in logged[0]
    assert HASH_COST_99[7:] not in logged[0]


async def test_a_flood_of_wrong_passwords_is_cut_off_at_a_short_queue(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Forty wrong passwords at once run at most MAX_PENDING_PASSWORD_CHECKS bcrypt checks; the
    rest get 401 without one, the log says so once, and a user verified before keeps getting in."""
    config = WebConfig(basic_auth_users={"alice": HASH_2B.encode()})
    calls: list[bytes] = []

    def slow_wrong(password: bytes, hashed: bytes) -> bool:
        calls.append(hashed)
        time.sleep(0.3)  # in the bcrypt thread, like a costly hash
        return False

    with caplog.at_level(logging.WARNING, logger="exporter.web_config"):
        async with _serve(config) as url, aiohttp.ClientSession() as session:

            async def status(user: str, password: str) -> int:
                async with session.get(f"{url}/metrics", headers=basic_auth(user, password)) as r:
                    return r.status

            assert await status("alice", PASSWORD) == 200  # verified once, then remembered
            monkeypatch.setattr(bcrypt, "checkpw", slow_wrong)
            flood = await asyncio.gather(*(status("alice", f"guess-{i}") for i in range(40)))
            assert await status("alice", PASSWORD) == 200
    assert flood == [401] * 40
    assert 1 <= len(calls) <= 2 * MAX_PENDING_PASSWORD_CHECKS
    flood_lines = [r for r in caplog.records if "refusing further logins" in r.getMessage()]
    assert len(flood_lines) == 1


async def test_exempt_path_skips_auth(tmp_path: Path) -> None:
    """A path in exempt_paths is served without credentials while others still need them."""
    config = load_web_config(_write(tmp_path, f"basic_auth_users:\n  alice: '{HASH_2Y}'\n"))
    async with _serve(config, frozenset({"/healthz"})) as url:
        health, _ = await _get(f"{url}/healthz")
        metrics, _ = await _get(f"{url}/metrics")
    assert (health, metrics) == (200, 401)


async def test_configured_headers_on_every_response(tmp_path: Path) -> None:
    """Configured headers are on 200, 401 and 404 responses alike; blank ones are unset."""
    text = (
        f"basic_auth_users:\n  alice: '{HASH_2Y}'\n"
        "http_server_config:\n  http2: false\n  headers:\n"
        "    X-Frame-Options: deny\n    X-Content-Type-Options: nosniff\n"
        "    Content-Security-Policy: ''\n"
    )
    config = load_web_config(_write(tmp_path, text))
    assert dict(config.headers) == {"X-Frame-Options": "deny", "X-Content-Type-Options": "nosniff"}
    auth = basic_auth("alice", PASSWORD)
    async with _serve(config) as url:
        responses = [
            await _get(f"{url}/metrics", headers=auth),
            await _get(f"{url}/metrics"),
            await _get(f"{url}/nowhere", headers=auth),
        ]
    assert [status for status, _ in responses] == [200, 401, 404]
    for _, headers in responses:
        assert headers["X-Frame-Options"] == "deny"
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert "Content-Security-Policy" not in headers


def test_tab_in_web_config_is_named_plainly(tmp_path: Path) -> None:
    """A tab in the web config gets the same plain, located message as in the main config."""
    path = tmp_path / "web.yml"
    path.write_text("basic_auth_users:\n\talice: x\n", encoding="utf-8")
    with pytest.raises(WebConfigError) as caught:
        load_web_config(str(path))
    assert str(caught.value) == (
        f"{path}:2:1: invalid YAML: tab character; "
        "YAML allows only spaces for indentation and before comments"
    )
