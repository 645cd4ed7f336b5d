"""Tests for session.open_session: the proxy from the environment, decided once per process."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from exporter.session import describe_route, open_session
from tests.support import SimServer, make_config


@pytest.fixture
async def fake_proxy() -> AsyncIterator[tuple[str, list[str]]]:
    """A loopback HTTP proxy stand-in that answers 200 and records the request targets it got."""
    seen: list[str] = []

    async def anything(request: web.Request) -> web.Response:
        seen.append(request.raw_path)  # a proxy is sent the absolute URL
        return web.json_response({})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", anything)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield f"http://127.0.0.1:{server.port}", seen
    finally:
        await server.close()


async def test_requests_go_through_the_environment_proxy(
    fake_proxy: tuple[str, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With HTTP_PROXY set, a request to the DCS endpoint is sent to the proxy in absolute form."""
    proxy_url, seen = fake_proxy
    for name in ("NO_PROXY", "no_proxy", "HTTPS_PROXY", "https_proxy", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", proxy_url)
    config = make_config("http://dcs.invalid")
    async with open_session(config) as session:
        assert not session.trust_env  # no per-request lookups
        async with session.get("http://dcs.invalid/v2/x/migration-tasks") as response:
            assert response.status == 200
    assert seen == ["http://dcs.invalid/v2/x/migration-tasks"]


async def test_no_proxy_for_both_endpoints_goes_direct(
    sim_server: SimServer, fake_proxy: tuple[str, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """When NO_PROXY covers the endpoints, requests go straight to them, not to the proxy."""
    proxy_url, seen = fake_proxy
    monkeypatch.setenv("HTTP_PROXY", proxy_url)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    config = make_config(sim_server.url)
    async with (
        open_session(config) as session,
        session.get(f"{sim_server.url}/v2/x/migration-tasks") as response,
    ):
        assert response.status == 401  # the simulator itself, asking for credentials
    assert seen == []


async def test_endpoints_with_different_proxies_fall_back_to_per_request_lookup(
    fake_proxy: tuple[str, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """If NO_PROXY covers one endpoint but not the other, aiohttp decides per request."""
    proxy_url, _ = fake_proxy
    monkeypatch.setenv("HTTP_PROXY", proxy_url)
    monkeypatch.setenv("NO_PROXY", "iam.invalid")
    config = make_config("http://dcs.invalid")
    config = replace(config, cloud=replace(config.cloud, iam_endpoint="http://iam.invalid/v3"))
    async with open_session(config) as session:
        assert session.trust_env


def test_the_route_line_never_shows_proxy_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """A proxy URL with user:password in it is shown as scheme://host:port only, in the info line
    and in the warning for an https:// proxy."""
    for name in ("NO_PROXY", "no_proxy", "HTTPS_PROXY", "https_proxy", "http_proxy", "HTTP_PROXY"):
        monkeypatch.delenv(name, raising=False)
    for scheme, level in (("http", logging.INFO), ("https", logging.WARNING)):
        monkeypatch.setenv("HTTPS_PROXY", f"{scheme}://alice:pr0xy-Secret@proxy.corp:3128")
        got_level, line = describe_route("https://dcs.eu-de.otc.t-systems.com")
        assert got_level == level
        assert "pr0xy-Secret" not in line and "alice" not in line
        assert f"{scheme}://proxy.corp:3128" in line


async def test_endpoints_of_one_origin_are_described_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """DCS and IAM on one origin (paths differ) give one route line, not two identical ones."""
    for name in ("NO_PROXY", "no_proxy", "HTTPS_PROXY", "https_proxy", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.corp:3128")
    config = make_config("http://dcs.invalid")  # IAM is http://dcs.invalid/v3
    with caplog.at_level(logging.INFO, logger="exporter.session"):
        async with open_session(config):
            pass
    lines = [r.getMessage() for r in caplog.records if r.name == "exporter.session"]
    assert lines == ["http://dcs.invalid:80: through the proxy http://proxy.corp:3128 (HTTP_PROXY)"]
