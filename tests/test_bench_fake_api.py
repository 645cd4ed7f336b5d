"""bench/fake_api.py answers the exporter's own client as the API would, late by the latency."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from types import ModuleType

import aiohttp
import pytest

from exporter.client import ApiError
from exporter.stats import parse_stats
from tests.support import PROJ, TASK_A, TASK_B, make_client, make_config

FAKE_API = Path(__file__).resolve().parents[1] / "bench" / "fake_api.py"
STATS = {"full_migration_progress": "100", "offset": "1234", "is_migrating": True}
LATENCY = 0.05


def load_fake_api() -> ModuleType:
    """bench/ is scripts, not a package: load the module from its file."""
    spec = importlib.util.spec_from_file_location("fake_api", FAKE_API)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_fake_api_serves_stats_details_and_not_found_through_the_real_client() -> None:
    fake_api = load_fake_api()
    server = await fake_api.start_fake_api(fake_api.build_answers(PROJ, [TASK_A], STATS), LATENCY)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        async with aiohttp.ClientSession() as session:
            client = make_client(session, make_config(url, (TASK_A, TASK_B)))
            started = time.monotonic()
            record = parse_stats(await client.get_stats(TASK_A))
            assert time.monotonic() - started >= LATENCY
            assert (record.progress_ratio, record.offset, record.migrating) == (1.0, 1234.0, 1.0)
            # Second request on the same keep-alive connection.
            details = await client.get_task(TASK_A)
            assert (details.task_name, details.status) == ("bench-0", "MIGRATING")
            assert details.source_instance_name == "source-0"
            with pytest.raises(ApiError) as raised:
                await client.get_stats(TASK_B)
            assert raised.value.gone
    finally:
        server.close()
        await server.wait_closed()
