"""``--web.config.file``: TLS and basic auth in the Prometheus exporter-toolkit format.

The format is the one of
https://github.com/prometheus/exporter-toolkit/blob/master/docs/web-configuration.md::

    tls_server_config:
      cert_file: server.crt             # relative paths are relative to the config file
      key_file: server.key
      client_auth_type: RequireAndVerifyClientCert
      client_ca_file: clients-ca.crt
      min_version: TLS12                # TLS10 .. TLS13, default TLS12
      max_version: TLS13
      prefer_server_cipher_suites: true
    http_server_config:
      http2: true                       # accepted and ignored: aiohttp speaks HTTP/1.1
      headers:
        X-Frame-Options: deny
    basic_auth_users:
      alice: $2y$10$...                 # bcrypt; $2a$, $2b$ and $2y$ are accepted

Differences from the Go implementation, all fail-closed:

- The file is read once, at start-up, so that a broken file stops the daemon instead of every
  scrape.
- Keys of the format that Python's ``ssl`` module cannot honour (``cert``/``key``/``client_ca``
  inline, ``cipher_suites``, ``curve_preferences``, ``client_allowed_sans``, ``rate_limit``) are
  errors rather than silently ignored: ignoring ``client_allowed_sans`` would let in clients the
  operator meant to keep out.
- ``RequireAnyClientCert`` (Go: any certificate, unverified) needs ``client_ca_file`` and verifies
  against it, because ``ssl`` cannot require a certificate without verifying it.
  ``RequestClientCert`` (Go: ask, never check) does not ask at all: nothing here reads the
  client certificate, so the two let in exactly the same clients.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import logging
import os
import secrets
import ssl
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, NoReturn

import bcrypt
import yaml
from aiohttp import hdrs, web
from aiohttp.typedefs import Handler, Middleware

from exporter.yamlnodes import compose

__all__ = ["WebConfig", "WebConfigError", "auth_middleware", "load_web_config"]

log = logging.getLogger(__name__)

REALM = "dcs-migration-exporter"

_TOP_KEYS = frozenset({"tls_server_config", "basic_auth_users", "http_server_config"})
_TLS_KEYS = frozenset(
    {
        "cert_file",
        "key_file",
        "client_auth_type",
        "client_ca_file",
        "min_version",
        "max_version",
        "prefer_server_cipher_suites",
    }
)
_HTTP_KEYS = frozenset({"headers", "http2"})

# Keys of the exporter-toolkit format that this implementation refuses, with the reason.
_UNSUPPORTED: Mapping[tuple[str, ...], str] = {
    ("rate_limit",): "is not supported by this exporter",
    ("tls_server_config", "cert"): "inline PEM is not supported; use cert_file",
    ("tls_server_config", "key"): "inline PEM is not supported; use key_file",
    ("tls_server_config", "client_ca"): "inline PEM is not supported; use client_ca_file",
    ("tls_server_config", "cipher_suites"): "is not supported by this exporter",
    ("tls_server_config", "curve_preferences"): "is not supported by this exporter",
    ("tls_server_config", "client_allowed_sans"): "is not supported by this exporter",
}

_TLS_VERSIONS: Mapping[str, ssl.TLSVersion] = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}

# client_auth_type -> (verify mode, whether client_ca_file is required). See the module docstring
# for why RequestClientCert and RequireAnyClientCert map the way they do.
_CLIENT_AUTH: Mapping[str, tuple[ssl.VerifyMode, bool]] = {
    "NoClientCert": (ssl.CERT_NONE, False),
    "RequestClientCert": (ssl.CERT_NONE, False),
    "RequireAnyClientCert": (ssl.CERT_REQUIRED, True),
    "VerifyClientCertIfGiven": (ssl.CERT_OPTIONAL, True),
    "RequireAndVerifyClientCert": (ssl.CERT_REQUIRED, True),
}

# The headers exporter-toolkit allows, with the values it allows (None: any value). Blank = unset.
_HEADERS: Mapping[str, frozenset[str] | None] = {
    "Content-Security-Policy": None,
    "X-Frame-Options": frozenset({"deny", "sameorigin"}),
    "X-Content-Type-Options": frozenset({"nosniff"}),
    "X-XSS-Protection": None,
    "Strict-Transport-Security": None,
}

_BCRYPT_PREFIXES = ("$2a$", "$2b$", "$2y$")
_BCRYPT_COSTS = range(4, 32)  # the costs the bcrypt library accepts; others raise "Invalid salt"
_BCRYPT_ALPHABET = "./ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
_NOT_BCRYPT = "not a bcrypt hash ($2a$, $2b$ or $2y$)"
_BCRYPT_MAX_PASSWORD = 72  # bcrypt ignores (bcrypt 5: rejects) bytes beyond this
# bcrypt checks running or queued at once; a login beyond them is refused without one, so that a
# flood of wrong passwords costs at most one core and a short queue, never an unbounded backlog.
MAX_PENDING_PASSWORD_CHECKS = 8


class WebConfigError(Exception):
    """The web config file is unusable; the message names the file and key, never a secret."""


@dataclass(frozen=True)
class WebConfig:
    """What ``--web.config.file`` asks for; the default is plain HTTP without auth."""

    ssl_context: ssl.SSLContext | None = None
    # repr=False: bcrypt hashes are secrets in the toolkit format and must not reach logs.
    basic_auth_users: Mapping[str, bytes] = field(
        default_factory=lambda: MappingProxyType({}), repr=False
    )
    headers: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))


class _Doc:
    """A parsed file plus its node tree, so that errors can name the line of a key."""

    def __init__(self, path: str, root: yaml.Node | None) -> None:
        self.path = path
        self.root = root

    def line(self, keys: tuple[str, ...]) -> int | None:
        node = self.root
        line: int | None = None
        for key in keys:
            if not isinstance(node, yaml.MappingNode):
                return line
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode) and k.value == key:
                    line, node = k.start_mark.line + 1, v
                    break
            else:
                return line
        return line

    def fail(self, keys: tuple[str, ...], message: str) -> NoReturn:
        line = self.line(keys)
        where = self.path if line is None else f"{self.path}:{line}"
        raise WebConfigError(f"{where}: {'.'.join(keys) or 'top level'}: {message}")

    def file(self, keys: tuple[str, ...], value: str) -> str:
        """Resolve a path the way exporter-toolkit does: relative to the config file."""
        resolved = os.path.join(os.path.dirname(self.path), value)
        if not os.path.isfile(resolved):
            what = "not a file" if os.path.exists(resolved) else "file not found"
            self.fail(keys, f"{what}: {resolved}")
        if not os.access(resolved, os.R_OK):
            self.fail(keys, f"cannot read {resolved}")
        return resolved


def load_web_config(path: str | None) -> WebConfig:
    """Read and check ``path``; ``None`` means plain HTTP without auth.

    Certificates and keys are loaded here, so that every mistake shows at start-up.
    """
    if path is None:
        return WebConfig()
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise WebConfigError(f"{path}: file not found") from None
    except OSError as e:
        raise WebConfigError(f"{path}: cannot read: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise WebConfigError(f"{path}: not UTF-8 text") from None

    root, data = _parse_yaml(path, text)
    doc = _Doc(path, root)
    _check_duplicates(doc, root, ())
    if data is None:
        return WebConfig()  # an empty file is valid in exporter-toolkit too
    top = _mapping(doc, (), data)
    _check_keys(doc, (), top, _TOP_KEYS)

    return WebConfig(
        ssl_context=_tls(doc, top.get("tls_server_config")),
        basic_auth_users=MappingProxyType(_users(doc, top.get("basic_auth_users"))),
        headers=MappingProxyType(_http(doc, top.get("http_server_config"))),
    )


def _parse_yaml(path: str, text: str) -> tuple[yaml.Node | None, Any]:
    # The same syntax report as the main config (place, and a plain word on tabs); it names the
    # problem only, never the line, which may hold a password hash.
    root, problem = compose(text)
    if problem is not None:
        raise WebConfigError(problem.render(path))
    loader = yaml.SafeLoader("")
    try:
        data = None if root is None else loader.construct_document(root)
    except yaml.YAMLError:
        raise WebConfigError(f"{path}: invalid YAML") from None
    finally:
        loader.dispose()
    return root, data


def _check_duplicates(doc: _Doc, node: yaml.Node | None, keys: tuple[str, ...]) -> None:
    # PyYAML keeps the last of duplicate keys silently; a second `basic_auth_users` or a repeated
    # user would then quietly replace the first.
    if isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _check_duplicates(doc, item, keys)
    if not isinstance(node, yaml.MappingNode):
        return
    seen: set[str] = set()
    for k, v in node.value:
        name = str(k.value) if isinstance(k, yaml.ScalarNode) else "?"
        if name in seen:
            where = f"{doc.path}:{k.start_mark.line + 1}"
            raise WebConfigError(f"{where}: {'.'.join((*keys, name))}: duplicate key")
        seen.add(name)
        _check_duplicates(doc, v, (*keys, name))


def _mapping(doc: _Doc, keys: tuple[str, ...], value: object) -> dict[str, Any]:
    if value is None:
        return {}  # `section:` with nothing under it is the same as no section
    if not isinstance(value, dict):
        doc.fail(keys, "must be a mapping")
    for k in value:
        if not isinstance(k, str):
            doc.fail((*keys, str(k)), "key must be a string")
    return value


def _check_keys(
    doc: _Doc, keys: tuple[str, ...], section: Mapping[str, Any], known: frozenset[str]
) -> None:
    for k in section:
        where = (*keys, k)
        if where in _UNSUPPORTED:
            doc.fail(where, _UNSUPPORTED[where])
        if k not in known:
            doc.fail(where, "unknown key")


def _string(doc: _Doc, keys: tuple[str, ...], value: object) -> str:
    if not isinstance(value, str) or not value:
        doc.fail(keys, "must be a non-empty string")
    return value


def _bool(doc: _Doc, keys: tuple[str, ...], value: object) -> bool:
    if not isinstance(value, bool):
        doc.fail(keys, "must be true or false")
    return value


def _tls(doc: _Doc, value: object) -> ssl.SSLContext | None:
    section = ("tls_server_config",)
    tls = _mapping(doc, section, value)
    if not tls:
        return None
    _check_keys(doc, section, tls, _TLS_KEYS)

    def key(name: str) -> tuple[str, ...]:
        return (*section, name)

    for name in ("cert_file", "key_file"):
        if name not in tls:
            doc.fail(key(name), "required when tls_server_config is set")
    cert_file = doc.file(key("cert_file"), _string(doc, key("cert_file"), tls["cert_file"]))
    key_file = doc.file(key("key_file"), _string(doc, key("key_file"), tls["key_file"]))

    auth_type = _string(doc, key("client_auth_type"), tls.get("client_auth_type", "NoClientCert"))
    if auth_type not in _CLIENT_AUTH:
        doc.fail(
            key("client_auth_type"),
            f"unknown value {auth_type!r}; one of {', '.join(_CLIENT_AUTH)}",
        )
    verify_mode, needs_ca = _CLIENT_AUTH[auth_type]
    ca_file: str | None = None
    if "client_ca_file" in tls:
        ca_file = doc.file(
            key("client_ca_file"), _string(doc, key("client_ca_file"), tls["client_ca_file"])
        )
        if auth_type == "NoClientCert":
            # As exporter-toolkit: a CA without a policy is almost certainly a forgotten line.
            doc.fail(key("client_ca_file"), "set, but client_auth_type is NoClientCert")
    elif needs_ca:
        doc.fail(key("client_ca_file"), f"required with client_auth_type {auth_type}")

    versions: dict[str, ssl.TLSVersion] = {}
    for name, default in (("min_version", "TLS12"), ("max_version", "TLS13")):
        text = _string(doc, key(name), tls.get(name, default))
        if text not in _TLS_VERSIONS:
            doc.fail(key(name), f"unknown value {text!r}; one of {', '.join(_TLS_VERSIONS)}")
        versions[name] = _TLS_VERSIONS[text]
    if versions["min_version"] > versions["max_version"]:
        doc.fail(key("min_version"), "is above max_version")

    # A bare server context, not ssl.create_default_context(Purpose.CLIENT_AUTH): that one trusts
    # the system CA store for client certificates, so any publicly issued cert would get in.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = versions["min_version"]
    ctx.maximum_version = versions["max_version"]
    if not _bool(
        doc, key("prefer_server_cipher_suites"), tls.get("prefer_server_cipher_suites", True)
    ):
        ctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE

    def no_password() -> bytes:
        # Without a callback OpenSSL would prompt on the terminal for an encrypted key.
        doc.fail(key("key_file"), "encrypted keys are not supported")

    _require_pem(doc, key("cert_file"), cert_file, b"CERTIFICATE-----")
    _require_pem(doc, key("key_file"), key_file, b"PRIVATE KEY-----")
    try:
        ctx.load_cert_chain(cert_file, key_file, password=no_password)
    except ssl.SSLError as e:
        # The SSL error text is a library reason code, never key material.
        doc.fail(key("key_file"), f"cannot use with cert_file {cert_file}: {e}")
    if ca_file is not None:
        try:
            ctx.load_verify_locations(cafile=ca_file)
        except ssl.SSLError as e:
            doc.fail(key("client_ca_file"), f"cannot load {ca_file}: {e}")
    ctx.verify_mode = verify_mode
    return ctx


def _require_pem(doc: _Doc, keys: tuple[str, ...], path: str, marker: bytes) -> None:
    # OpenSSL says only "PEM lib" for either file; look first so the error names the right one.
    with open(path, "rb") as f:
        if marker not in f.read():
            doc.fail(keys, f"no PEM {marker.decode().rstrip('-')} in {path}")


def _users(doc: _Doc, value: object) -> dict[str, bytes]:
    section = ("basic_auth_users",)
    users: dict[str, bytes] = {}
    for user, hashed in _mapping(doc, section, value).items():
        keys = (*section, user)
        if not user or ":" in user:
            doc.fail(keys, "a user name must be non-empty and without ':'")
        # Never echo the value: it is a secret in the toolkit format.
        if not isinstance(hashed, str):
            doc.fail(keys, _NOT_BCRYPT)
        problem = _bcrypt_problem(hashed)
        if problem is not None:
            doc.fail(keys, problem)
        # The bcrypt library only takes $2b$; $2a$ and $2y$ (htpasswd) are the same algorithm for
        # passwords of at most 72 bytes, the only ones we check.
        users[user] = b"$2b$" + hashed.encode()[4:]
    return users


def _bcrypt_problem(hashed: str) -> str | None:
    """What makes ``hashed`` unusable by bcrypt, or None; the words never quote the value, which
    is a secret in the toolkit format.

    Everything bcrypt refuses at login (``ValueError: Invalid salt``) is refused here, at load,
    plus a corrupt checksum, which bcrypt takes but no password can ever match.
    """
    if not hashed.startswith(_BCRYPT_PREFIXES):
        return _NOT_BCRYPT
    cost, sep, rest = hashed[4:].partition("$")
    if not sep or len(cost) != 2 or not (cost.isascii() and cost.isdigit()):
        return "not a bcrypt hash: no two-digit cost after the prefix"
    if int(cost) not in _BCRYPT_COSTS:
        return f"bcrypt cost {cost} is outside 04..31"
    if len(rest) != 53:
        return f"bcrypt hash has {len(hashed)} characters, not 60 (truncated or pasted twice?)"
    for i, c in enumerate(rest):
        if c not in _BCRYPT_ALPHABET:
            return f"bcrypt hash has a character outside ./A-Za-z0-9 at position {8 + i}"
    # 22 characters carry the 16-byte salt and 31 the 23-byte checksum, leaving 4 and 2 unused
    # bits in the last character of each that bcrypt always writes as 0.
    if _BCRYPT_ALPHABET.index(rest[21]) % 16:
        return "bcrypt salt is corrupt (position 29 is not a character bcrypt writes there)"
    if _BCRYPT_ALPHABET.index(rest[52]) % 4:
        return "bcrypt checksum is corrupt (position 60 is not a character bcrypt writes there)"
    return None


def _http(doc: _Doc, value: object) -> dict[str, str]:
    section = ("http_server_config",)
    http = _mapping(doc, section, value)
    _check_keys(doc, section, http, _HTTP_KEYS)
    if "http2" in http:
        _bool(doc, (*section, "http2"), http["http2"])  # checked, then ignored: HTTP/1.1 only
    headers_keys = (*section, "headers")
    headers: dict[str, str] = {}
    for name, v in _mapping(doc, headers_keys, http.get("headers")).items():
        keys = (*headers_keys, name)
        if name not in _HEADERS:
            doc.fail(keys, f"header cannot be configured; one of {', '.join(_HEADERS)}")
        if v is None or v == "":
            continue  # blank means unset, as in exporter-toolkit
        if not isinstance(v, str) or "\r" in v or "\n" in v:
            doc.fail(keys, "must be a single-line string")
        allowed = _HEADERS[name]
        if allowed is not None and v.lower() not in allowed:
            doc.fail(keys, f"value {v!r} not allowed; one of {', '.join(sorted(allowed))}")
        headers[name] = v
    return headers


def _checkpw(password: bytes, hashed: bytes) -> bool:
    # Looked up on the module at call time, so that tests can count calls.
    return bcrypt.checkpw(password, hashed)


class _Verifier:
    """Checks Basic credentials against bcrypt hashes, remembering the ones that passed."""

    def __init__(self, users: Mapping[str, bytes]) -> None:
        self._users = users
        # Unknown users are checked against a hash as costly as the costliest real one, so that
        # the response time does not tell which user names exist. The all-'.' digest decodes to
        # zero bytes: no password will match it.
        cost = max(_cost(h) for h in users.values())
        self._dummy = b"$2b$%02d$" % cost + b"." * 53
        # Verified passwords are remembered as HMAC-SHA-256 under a per-process key, never in
        # plain text and not as a bare SHA-256 that a memory dump could brute-force quickly.
        self._key = secrets.token_bytes(32)
        # One entry per configured user at most (only a user's own password passes), so the cache
        # is bounded by the config, not by what clients send.
        self._verified: dict[str, bytes] = {}
        # bcrypt takes ~50-100 ms of CPU: keep it off the event loop and off the default executor
        # (which DNS lookups share), on one thread, so a flood of wrong passwords cannot starve
        # the poller of both cores.
        self._executor: ThreadPoolExecutor | None = None
        self._pending = 0
        self._warned = False
        self._flood_logged = False

    async def check(self, authorization: str | None) -> bool:
        credentials = _parse_basic(authorization)
        if credentials is None:
            return False
        user, password = credentials
        digest = hmac.new(self._key, password, hashlib.sha256).digest()
        cached = self._verified.get(user)
        if cached is not None and hmac.compare_digest(cached, digest):
            return True
        hashed = self._users.get(user)
        usable = hashed is not None and len(password) <= _BCRYPT_MAX_PASSWORD
        # The same bcrypt work on every failing path: unknown user, over-long password, wrong one.
        target = hashed if usable and hashed is not None else self._dummy
        if self._pending >= MAX_PENDING_PASSWORD_CHECKS:
            if not self._flood_logged:  # once per flood: the log must not grow with it
                self._flood_logged = True
                log.warning(
                    "basic auth: %d password checks already running; refusing further logins "
                    "until they end (a password-guessing flood?)",
                    self._pending,
                )
            return False
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bcrypt")
        loop = asyncio.get_running_loop()
        self._pending += 1
        try:
            ok = await loop.run_in_executor(
                self._executor, _checkpw, password[:_BCRYPT_MAX_PASSWORD], target
            )
        except ValueError as e:
            # load_web_config refuses every hash bcrypt refuses; should one get here anyway, a
            # 401 rather than a 500, and one log line rather than one per (unauthenticated) try.
            if not self._warned:
                self._warned = True
                # Only a configured user is named: any other name is what the client sent.
                whose = f"of user {user!r} " if target is hashed else ""
                log.error(
                    "basic auth: bcrypt refused the hash %s(%s); every login with it fails, "
                    "logged only once",
                    whose,
                    e,
                )
            ok = False
        finally:
            self._pending -= 1
            if self._pending == 0:
                self._flood_logged = False
        if ok and usable:
            self._verified[user] = digest
            return True
        return False


def _cost(hashed: bytes) -> int:
    """The cost of a ``$2b$NN$`` hash; bcrypt's minimum if the hash has none bcrypt takes, so that
    a dummy hash of that cost never raises (and a cost of 99 never becomes 31, hours a check)."""
    digits = hashed[4:6]
    cost = int(digits) if digits.isdigit() else 0
    return cost if cost in _BCRYPT_COSTS else _BCRYPT_COSTS[0]


def _parse_basic(authorization: str | None) -> tuple[str, bytes] | None:
    if not authorization:
        return None
    scheme, _, param = authorization.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        raw = base64.b64decode(param.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, sep, password = raw.partition(b":")
    if not sep:
        return None
    try:
        return user.decode("utf-8"), password
    except UnicodeDecodeError:
        return None


def _add_headers(response: web.StreamResponse, headers: Mapping[str, str]) -> None:
    # A handler that streamed its response has sent the headers already.
    if not response.prepared:
        response.headers.update(headers)


def auth_middleware(config: WebConfig, exempt_paths: frozenset[str] = frozenset()) -> Middleware:
    """Basic auth (when users are configured) plus the configured response headers.

    Paths in ``exempt_paths`` (exact match, e.g. ``/healthz`` for a kubelet probe) skip auth but
    still get the headers. Missing or wrong credentials get a 401 with a ``WWW-Authenticate``
    challenge.
    """
    verifier = _Verifier(config.basic_auth_users) if config.basic_auth_users else None
    headers = dict(config.headers)
    challenge = f'Basic realm="{REALM}"'

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if (
            verifier is not None
            and request.path not in exempt_paths
            and not await verifier.check(request.headers.get(hdrs.AUTHORIZATION))
        ):
            denied = web.Response(
                status=401, text="Unauthorized\n", headers={hdrs.WWW_AUTHENTICATE: challenge}
            )
            _add_headers(denied, headers)
            return denied
        try:
            response = await handler(request)
        except web.HTTPException as e:
            _add_headers(e, headers)
            raise
        _add_headers(response, headers)
        return response

    return middleware
