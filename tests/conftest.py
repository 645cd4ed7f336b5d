"""Shared fixtures: a simulator on loopback, an HTTP session like the daemon's, app test clients."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from tests.support import Clients, SimServer, baseline_sim_server


@pytest.fixture
async def sim_server() -> AsyncIterator[SimServer]:
    """A simulator for project PROJ with TASK_A and TASK_B serving the baseline body."""
    async with baseline_sim_server() as server:
        yield server


@pytest.fixture
async def http_session() -> AsyncIterator[aiohttp.ClientSession]:
    """A client session like the daemon's (proxy settings from the environment)."""
    async with aiohttp.ClientSession(trust_env=True) as session:
        yield session


@pytest.fixture
async def clients() -> AsyncIterator[Clients]:
    """Start test clients for apps; all are closed at the end."""
    started: list[TestClient] = []

    async def make(app: web.Application) -> TestClient:
        client = TestClient(TestServer(app))
        await client.start_server()
        started.append(client)
        return client

    yield make
    for client in started:
        await client.close()
