"""Tests for exporter.redis_demo without Redis: RESP, INFO parsing, the data set, the stats hook.

The migration itself runs against real redis-server processes in tests/e2e/test_redis_demo.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path

import aiohttp
import pytest

from exporter import redis_demo
from exporter.cli import main as cli_main
from exporter.redis_demo import RedisError, RespReader, encode_command, replica_offset
from exporter.simulator import CannedResponse, Simulator, start
from tests.support import PROJ, TASK_A, make_client, make_config


def reader_of(data: bytes) -> RespReader:
    """A RESP reader over fixed bytes."""
    stream = asyncio.StreamReader()
    stream.feed_data(data)
    stream.feed_eof()
    return RespReader(stream)


def test_encode_command() -> None:
    """Commands are arrays of bulk strings; numbers and bytes are sent as their text/bytes."""
    assert encode_command("SET", b"k\r\n", 42) == b"*3\r\n$3\r\nSET\r\n$3\r\nk\r\n\r\n$2\r\n42\r\n"


async def test_reader_reads_every_type_and_counts_bytes() -> None:
    """Each value comes back with its exact size: replication offsets are counted in bytes."""
    parts = [
        (b"+OK\r\n", b"OK"),
        (b"-ERR wrong\r\n", None),
        (b":-12\r\n", -12),
        (b"$5\r\nhe\r\no\r\n", b"he\r\no"),
        (b"$-1\r\n", None),
        (b"*2\r\n$3\r\nSET\r\n:1\r\n", [b"SET", 1]),
        (b"*-1\r\n", None),
    ]
    reader = reader_of(b"".join(raw for raw, _ in parts))
    for raw, expected in parts:
        value, size = await reader.read()
        assert size == len(raw)
        if raw.startswith(b"-"):
            assert isinstance(value, RedisError) and str(value) == "ERR wrong"
        else:
            assert value == expected


async def test_reader_sizes_add_up_to_a_replication_stream() -> None:
    """Summing sizes over a stream of commands gives its length, as a replica's offset must."""
    stream = (
        encode_command("SELECT", 0) + encode_command("SET", "a", "x" * 300) + encode_command("PING")
    )
    reader = reader_of(stream)
    total = 0
    for _ in range(3):
        total += (await reader.read())[1]
    assert total == len(stream)


async def test_reader_rejects_garbage_and_reports_a_closed_connection() -> None:
    """Bytes that are not RESP raise ProtocolError; a cut connection is a ConnectionError."""
    with pytest.raises(redis_demo.ProtocolError):
        await reader_of(b"hello\r\n").read()
    with pytest.raises(ConnectionError):
        await reader_of(b"$10\r\nabc").read()


def test_replica_offset_from_info() -> None:
    """The acknowledged offset is read from the slave0 line; no replica means unknown."""
    info = {
        "master_repl_offset": "900",
        "slave0": "ip=127.0.0.1,port=1,state=online,offset=850,lag=0",
    }
    assert replica_offset(info) == 850
    assert replica_offset({"master_repl_offset": "900"}) is None
    assert replica_offset({"slave0": "ip=127.0.0.1,state=wait_bgsave"}) is None


def test_dataset_is_deterministic_and_mixed() -> None:
    """The data set is the same every run and has strings, hashes, lists and sets."""
    first, second = redis_demo.dataset_commands(8), redis_demo.dataset_commands(8)
    assert first == second
    assert [command[0] for command in first[:4]] == ["SET", "HSET", "RPUSH", "SADD"]
    assert len({command[1] for command in first}) == 8


async def test_simulator_serves_stats_from_a_callable() -> None:
    """A task's stats can come from an async callable, read anew on each call, after scripts."""
    calls: list[int] = []

    async def live() -> Mapping[str, object]:
        calls.append(1)
        return {"offset": str(len(calls)), "is_migrating": True}

    sim = Simulator(project_id=PROJ)
    sim.add_task(TASK_A, "live", stats=live)
    sim.push(TASK_A, CannedResponse(status=200, body={"offset": "scripted"}))
    runner, url = await start(sim)
    try:
        async with aiohttp.ClientSession() as session:
            client = make_client(session, make_config(url, (TASK_A,)))
            bodies = [await client.get_stats(TASK_A) for _ in range(3)]
    finally:
        await runner.cleanup()
    assert [body["offset"] for body in bodies] == ["scripted", "1", "2"]


def test_missing_redis_server_names_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without redis-server on PATH, --demo.redis says which package to install and exits 1."""
    monkeypatch.setenv("PATH", str(tmp_path))
    assert cli_main(["--demo.redis", "--log.format", "logfmt"]) == 1
    output = capsys.readouterr()
    assert "apt-get install redis-server" in output.err + output.out
