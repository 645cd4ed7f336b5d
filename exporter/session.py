"""The one HTTP session of the process: its connection pool and the proxy it takes from the env.

aiohttp can look up HTTPS_PROXY/NO_PROXY on every request (``trust_env``), but that costs a worker
thread hop per request, about half the CPU of a poll; the proxy is decided once per session
instead, and said in the log, so that nobody has to guess which way the requests go.
"""

from __future__ import annotations

import logging
from urllib.request import getproxies, proxy_bypass

import aiohttp
from aiohttp.helpers import get_env_proxy_for_url
from yarl import URL

from exporter.config import Config

log = logging.getLogger(__name__)

# Proxy schemes aiohttp cannot speak to (TLS to the proxy itself): it drops them and goes direct.
_UNSUPPORTED_PROXY_SCHEMES = frozenset({"https", "wss"})


def session_key(config: Config) -> tuple[frozenset[str], int]:
    """What the HTTP session depends on: the endpoints (its proxy choice) and the pool size."""
    endpoints = {
        url
        for target in config.targets
        for url in (target.cloud.dcs_endpoint, target.cloud.iam_endpoint)
    }
    return frozenset(endpoints), config.polling.concurrency


def env_proxy(url: str) -> tuple[URL | None, aiohttp.BasicAuth | None]:
    """The proxy (and its credentials) that HTTPS_PROXY/NO_PROXY give for ``url``, if any."""
    try:
        return get_env_proxy_for_url(URL(url))
    except LookupError:
        return None, None


def describe_route(url: str) -> tuple[int, str]:
    """How requests to the endpoint ``url`` leave the process: a log level and one line.

    Never shows the proxy's credentials (``http://user:secret@proxy``): scheme, host, port only.
    """
    endpoint = URL(url)
    origin = f"{endpoint.scheme}://{endpoint.host}:{endpoint.port}"
    variable = f"{endpoint.scheme.upper()}_PROXY"
    if endpoint.host is not None and proxy_bypass(endpoint.host):
        return logging.INFO, f"{origin}: direct (NO_PROXY)"
    configured = getproxies().get(endpoint.scheme)
    if not configured:
        return logging.DEBUG, f"{origin}: direct (no {variable} set)"
    proxy = URL(configured)
    shown = f"{proxy.scheme}://{proxy.host}:{proxy.port}"
    if proxy.scheme in _UNSUPPORTED_PROXY_SCHEMES:
        return logging.WARNING, (
            f"{origin}: {variable} is {shown}, a proxy spoken to over TLS, which the HTTP client "
            f"cannot use: requests to this endpoint go DIRECT, not through the proxy. Set "
            f"{variable}=http://{proxy.host}:{proxy.port} (the connection to the API stays TLS, "
            "tunnelled with CONNECT)"
        )
    return logging.INFO, f"{origin}: through the proxy {shown} ({variable})"


def pool_size(config: Config) -> int:
    """Connections the session keeps at most: each target's poller runs up to ``concurrency``
    polls at once, and a poll may hold a second connection (a token request, say)."""
    return max(4, config.polling.concurrency * 2) * len(config.targets)


def open_session(config: Config) -> aiohttp.ClientSession:
    """One HTTP session for the process and every target: pooled connections, proxy from the env."""
    endpoints, _ = session_key(config)
    # DCS and IAM often share an origin (differing only in path): one line for each origin.
    for level, line in dict.fromkeys(describe_route(endpoint) for endpoint in sorted(endpoints)):
        log.log(level, "%s", line)
    connector = aiohttp.TCPConnector(limit=pool_size(config))
    proxies = {env_proxy(url) for url in endpoints}
    if len(proxies) == 1:
        proxy, proxy_auth = proxies.pop()
        return aiohttp.ClientSession(connector=connector, proxy=proxy, proxy_auth=proxy_auth)
    # NO_PROXY covers one endpoint but not the other: let aiohttp decide per request.
    return aiohttp.ClientSession(connector=connector, trust_env=True)
