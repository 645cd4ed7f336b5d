"""``--demo.redis``: a DCS online migration between two real, local ``redis-server`` processes.

The demo starts a *source* and a *target* Redis in a temporary directory on free loopback ports,
loads a data set into the source and migrates it the way a DCS online migration does: a migration
process registers with the source as a replica (``PSYNC``), copies the existing keys into the
target (``SCAN`` + ``DUMP``/``RESTORE``, at a set rate so that the full phase can be watched), then
replays the source's replication stream into the target and acknowledges what it applied
(``REPLCONF ACK``), like any replica. Meanwhile a writer keeps changing the source.

The fake DCS API of :mod:`exporter.simulator` serves the task's stats from the two servers:
``source_dbsize``/``target_dbsize`` from ``DBSIZE``, ``offset`` from the source's
``master_repl_offset`` minus the replica offset the migration acknowledged, ``target_input_kbps``
and ``target_ops`` from the target's ``INFO stats``, progress from the keys copied. The daemon then
polls that API as it would poll the cloud.

Control endpoints on the fake API's address (loopback only, no auth, demo data only):

- ``POST /demo/stall``: the migration stops applying the stream, and ``CLIENT PAUSE ... WRITE``
  freezes the source, so the offset stays constant and non-zero while the task still says it is
  migrating: what ``DcsMigrationOffsetStalled`` looks for. ``POST /demo/resume`` ends it.
- ``POST /demo/writes/stop`` and ``/demo/writes/start``: pause and restart the writer; with no
  writes the offset drains to 0.
- ``GET /demo``: the demo's own view, including the two servers' ports.

Redis is spoken with a few dozen lines of RESP2 over asyncio streams instead of a client library:
the replication stream needs byte-exact offsets, which client libraries do not expose, and the demo
then adds no runtime dependency.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import logging
import random
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, TypeAlias

from aiohttp import web

from exporter.web_config import WebConfig

log = logging.getLogger(__name__)

__all__ = [
    "DEMO_TASK_ID",
    "DEMO_TASK_NAME",
    "DemoOptions",
    "Migrator",
    "ProtocolError",
    "Redis",
    "RedisDemo",
    "RedisError",
    "RedisNotFound",
    "RespReader",
    "add_arguments",
    "encode_command",
    "run",
    "run_cli",
]

DEMO_TASK_ID = "d3e1b2c4-0000-4000-8000-00000000da7a"
DEMO_TASK_NAME = "redis-demo"
REDIS_PACKAGE = "redis-server"  # the Debian (and Ubuntu) package that has the binary
ACK_EVERY_SECONDS = 1.0  # like a real replica's replicationCron
WRITER_TICK_SECONDS = 0.05
PAUSE_MILLISECONDS = 24 * 3600 * 1000  # a stall lasts until resumed; CLIENT PAUSE needs a timeout
STARTUP_SECONDS = 10.0
STALL_BACKLOG_SECONDS = 1.0

Arg: TypeAlias = "bytes | str | int | float"
Reply: TypeAlias = "bytes | int | RedisError | list[Reply] | None"
Phase = Literal["starting", "full", "incremental", "failed"]


# --------------------------------------------------------------------------------------------------
# RESP2


class RedisError(Exception):
    """An error reply from Redis (``-ERR ...``)."""


class ProtocolError(Exception):
    """Bytes that are not RESP2."""


class RedisNotFound(Exception):
    """The redis-server binary is not installed."""


def encode_command(*args: Arg) -> bytes:
    """A command as a RESP array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class RespReader:
    """Reads RESP2 values and says how many bytes each took (replication offsets count bytes)."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self._reader = reader

    async def line(self) -> bytes:
        """One CRLF-terminated line, terminator included."""
        try:
            return await self._reader.readuntil(b"\r\n")
        except asyncio.IncompleteReadError as error:
            raise ConnectionError("Redis closed the connection") from error

    async def exactly(self, size: int) -> bytes:
        """``size`` raw bytes."""
        try:
            return await self._reader.readexactly(size)
        except asyncio.IncompleteReadError as error:
            raise ConnectionError("Redis closed the connection") from error

    async def read(self) -> tuple[Reply, int]:
        """The next value and its size in bytes; error replies are returned, not raised."""
        line = await self.line()
        kind, body, size = line[:1], line[1:-2], len(line)
        if kind == b"+":
            return body, size
        if kind == b"-":
            return RedisError(body.decode(errors="replace")), size
        if kind == b":":
            return int(body), size
        if kind == b"$":
            length = int(body)
            if length < 0:
                return None, size
            data = await self.exactly(length + 2)
            return data[:-2], size + length + 2
        if kind == b"*":
            count = int(body)
            if count < 0:
                return None, size
            items: list[Reply] = []
            for _ in range(count):
                item, item_size = await self.read()
                items.append(item)
                size += item_size
            return items, size
        raise ProtocolError(f"unexpected RESP line {line[:40]!r}")


class Redis:
    """One connection; commands are serialised by a lock, pipelines keep their order."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.resp = RespReader(reader)
        self.writer = writer
        self._lock = asyncio.Lock()

    @classmethod
    async def connect(cls, host: str, port: int, timeout: float = 5.0) -> Redis:
        """Open a connection."""
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        return cls(reader, writer)

    async def execute(self, *args: Arg) -> Reply:
        """Run one command; an error reply raises RedisError."""
        (reply,) = await self.pipeline([args])
        if isinstance(reply, RedisError):
            raise reply
        return reply

    async def pipeline(self, commands: Iterable[Sequence[Arg]]) -> list[Reply]:
        """Send all commands, then read all replies; error replies are returned in place."""
        encoded = [encode_command(*command) for command in commands]
        if not encoded:
            return []
        async with self._lock:
            self.writer.write(b"".join(encoded))
            await self.writer.drain()
            return [(await self.resp.read())[0] for _ in encoded]

    async def info(self, section: str) -> dict[str, str]:
        """``INFO section`` as a dict."""
        reply = await self.execute("INFO", section)
        assert isinstance(reply, bytes)
        fields: dict[str, str] = {}
        for line in reply.decode().splitlines():
            name, sep, value = line.partition(":")
            if sep and not line.startswith("#"):
                fields[name] = value
        return fields

    async def close(self) -> None:
        """Close the connection."""
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


def as_int(reply: Reply) -> int:
    """An integer reply (or a numeric bulk string)."""
    if isinstance(reply, int):
        return reply
    if isinstance(reply, bytes):
        return int(reply)
    raise ProtocolError(f"expected an integer, got {reply!r}")


def replica_offset(info: Mapping[str, str]) -> int | None:
    """The acknowledged offset of the first replica in ``INFO replication``, if one is attached."""
    entry = info.get("slave0")
    if entry is None:
        return None
    for part in entry.split(","):
        name, _, value = part.partition("=")
        if name == "offset":
            return int(value) if value.isdigit() else None
    return None


# --------------------------------------------------------------------------------------------------
# redis-server processes


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _die_with_parent() -> None:
    """In the child: get SIGTERM if the demo dies without cleaning up (Linux only)."""
    if sys.platform == "linux":
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


@dataclass
class RedisServer:
    """A redis-server process on a loopback port."""

    name: str
    port: int
    process: asyncio.subprocess.Process
    log_path: Path

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not gone after a few seconds."""
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.terminate()
            try:
                await asyncio.wait_for(self.process.wait(), 5.0)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
                await self.process.wait()


async def start_redis_server(binary: str, directory: Path, name: str) -> RedisServer:
    """Start a throwaway redis-server in ``directory`` and wait until it answers PING."""
    log_path = directory / f"{name}.log"
    last_problem = ""
    for _ in range(5):  # a free port can be taken between looking and binding
        port = _free_port()
        process = await asyncio.create_subprocess_exec(
            binary,
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--dir", str(directory),
            "--dbfilename", f"{name}.rdb",
            "--logfile", str(log_path),
            "--daemonize", "no",
            "--save", "",
            "--appendonly", "no",
            # A replica without "capa eof" gets a disk-based full sync: an RDB with its length.
            "--repl-diskless-sync", "no",
            # The master's PINGs to replicas advance its offset; a stalled offset must not move.
            "--repl-ping-replica-period", "86400",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C reaches the demo, which stops the servers in order
            preexec_fn=_die_with_parent,
        )  # fmt: skip
        server = RedisServer(name, port, process, log_path)
        deadline = time.monotonic() + STARTUP_SECONDS
        while process.returncode is None and time.monotonic() < deadline:
            try:
                connection = await Redis.connect("127.0.0.1", port, timeout=1.0)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            try:
                if await connection.execute("PING") == b"PONG":
                    return server
            except (RedisError, ConnectionError):
                await asyncio.sleep(0.05)  # still loading
            finally:
                await connection.close()
        await server.stop()
        last_problem = log_path.read_text(errors="replace")[-500:] if log_path.exists() else ""
        if "Address already in use" not in last_problem:
            break
    raise RuntimeError(f"redis-server ({name}) did not start; its log ends:\n{last_problem}")


# --------------------------------------------------------------------------------------------------
# Data set and writer


def dataset_commands(count: int, seed: int = 7) -> list[tuple[Arg, ...]]:
    """``count`` keys of four types, like a small shop's cache."""
    rng = random.Random(seed)
    commands: list[tuple[Arg, ...]] = []
    for i in range(count):
        kind = i % 4
        if kind == 0:
            commands.append(("SET", f"session:{i}", rng.randbytes(rng.randint(24, 160)).hex()))
        elif kind == 1:
            commands.append(
                ("HSET", f"user:{i}", "name", f"user {i}", "email", f"u{i}@example.com", "visits", rng.randint(1, 900))
            )  # fmt: skip
        elif kind == 2:
            commands.append(
                ("RPUSH", f"cart:{i}", *(f"sku-{rng.randint(1, 5000)}" for _ in range(3)))
            )
        else:
            commands.append(("SADD", f"tags:{i}", *(f"tag-{rng.randint(1, 50)}" for _ in range(3))))
    return commands


async def load_dataset(redis: Redis, count: int, batch: int = 1000) -> None:
    """Load the data set into ``redis`` in pipelined batches."""
    commands = dataset_commands(count)
    for start in range(0, len(commands), batch):
        for reply in await redis.pipeline(commands[start : start + batch]):
            if isinstance(reply, RedisError):
                raise reply


class Writer:
    """Keeps writing to the source at a steady rate, with commands that replay idempotently.

    Only SET, HSET and DEL: replaying them over a key copied later gives the same final value,
    which the full copy relies on (it runs while the stream is already recorded).
    """

    def __init__(self, redis: Redis, rate: float, key_space: int, seed: int = 11) -> None:
        self.redis = redis
        self.rate = rate
        self.key_space = max(4, key_space)
        self.enabled = asyncio.Event()
        self.enabled.set()
        self.writes = 0
        self._rng = random.Random(seed)

    def _command(self) -> tuple[Arg, ...]:
        rng = self._rng
        key = rng.randrange(self.key_space * 5 // 4)  # a quarter new keys: the source grows
        roll = rng.random()
        if roll < 0.7:
            return ("SET", f"session:{key - key % 4}", rng.randbytes(32).hex())
        if roll < 0.9:
            return ("HSET", f"user:{key - key % 4 + 1}", "visits", rng.randint(1, 10_000))
        return ("DEL", f"session:{key - key % 4}")

    async def run(self) -> None:
        """Write until cancelled; waits while disabled."""
        loop = asyncio.get_running_loop()
        started, done = loop.time(), 0
        while True:
            if not self.enabled.is_set():
                await self.enabled.wait()
                started, done = loop.time(), 0
            due = int((loop.time() - started) * self.rate) - done
            if due > self.rate:
                # Blocked for a while (a stall pauses the source): carry on at the rate, no burst.
                started, done, due = loop.time(), 0, 0
            if due > 0:
                await self.redis.pipeline([self._command() for _ in range(due)])
                done += due
                self.writes += due
            await asyncio.sleep(WRITER_TICK_SECONDS)


# --------------------------------------------------------------------------------------------------
# The migration


class Migrator:
    """Full copy, then incremental replication, from a source to a target Redis.

    It registers with the source as a replica, so the source keeps every write from that moment
    in its replication stream. The keys that exist are copied with DUMP/RESTORE (at
    ``copy_rate`` keys per second), then the stream is replayed into the target with ordinary
    commands, and the offset applied so far is acknowledged to the source every second.
    """

    def __init__(self, host: str, source_port: int, target_port: int, copy_rate: float) -> None:
        self.host = host
        self.source_port = source_port
        self.target_port = target_port
        self.copy_rate = copy_rate
        self.phase: Phase = "starting"
        self.error: str | None = None
        self.total_keys = 0
        self.copied_keys = 0
        self.applied_offset = 0
        self.applied_commands = 0
        self._running = asyncio.Event()
        self._running.set()
        self._replication: Redis | None = None

    @property
    def progress(self) -> int:
        """Full-phase progress in whole percent, as the API reports it (100 once incremental)."""
        if self.phase == "incremental":
            return 100
        if self.phase == "starting" or self.total_keys == 0:
            return 0
        return min(99, self.copied_keys * 100 // self.total_keys)

    @property
    def held(self) -> bool:
        """True while the stream is not being applied (a stall)."""
        return not self._running.is_set()

    def hold(self) -> None:
        """Stop applying the stream after the command in progress; acknowledgements continue."""
        self._running.clear()

    def release(self) -> None:
        """Apply the stream again."""
        self._running.set()

    async def run(self) -> None:
        """Migrate until cancelled; a failure is logged and leaves the phase ``failed``."""
        acks: asyncio.Task[None] | None = None
        try:
            self._replication = await Redis.connect(self.host, self.source_port)
            offset = await self._handshake(self._replication)
            self.applied_offset = offset
            acks = asyncio.get_running_loop().create_task(self._acknowledge(self._replication))
            await self._skip_rdb(self._replication.resp)
            self.phase = "full"
            await self._copy()
            self.phase = "incremental"
            log.info("redis demo: full copy done (%d keys), replaying the stream", self.copied_keys)
            await self._replay(self._replication.resp)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            self.phase, self.error = "failed", f"{type(error).__name__}: {error}"
            log.exception("redis demo: the migration failed")
        finally:
            if acks is not None:
                acks.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await acks
            if self._replication is not None:
                await self._replication.close()

    async def _handshake(self, source: Redis) -> int:
        """Register as a replica and ask for a full sync; returns the stream's start offset."""
        await source.execute("REPLCONF", "listening-port", self.target_port)
        await source.execute("REPLCONF", "capa", "psync2")  # no "capa eof": we want an RDB length
        source.writer.write(encode_command("PSYNC", "?", "-1"))
        line = (await source.resp.line()).strip()
        parts = line.split()
        if len(parts) != 3 or parts[0] != b"+FULLRESYNC":
            raise ProtocolError(f"expected +FULLRESYNC, got {line[:80]!r}")
        return int(parts[2])

    @staticmethod
    async def _skip_rdb(resp: RespReader) -> None:
        """Read past the RDB snapshot; the copy reads the keys from the source instead."""
        line = (await resp.line()).lstrip(b"\n")  # newlines keep the link alive during BGSAVE
        if not line.startswith(b"$"):
            raise ProtocolError(f"expected the RDB length, got {line[:80]!r}")
        remaining = int(line[1:-2])
        while remaining:
            chunk = await resp.exactly(min(remaining, 1 << 16))
            remaining -= len(chunk)

    async def _copy(self, batch: int = 100) -> None:
        """SCAN + DUMP/RESTORE every key, at ``copy_rate`` keys per second."""
        source = await Redis.connect(self.host, self.source_port)
        target = await Redis.connect(self.host, self.target_port)
        try:
            self.total_keys = as_int(await source.execute("DBSIZE"))
            batch = max(
                1, min(batch, int(self.copy_rate / 10))
            )  # progress moves ~10 times a second
            loop = asyncio.get_running_loop()
            started, cursor = loop.time(), b"0"
            while True:
                reply = await source.execute("SCAN", cursor, "COUNT", batch)
                assert isinstance(reply, list) and isinstance(reply[0], bytes)
                cursor, keys = reply[0], reply[1]
                assert isinstance(keys, list)
                await self._copy_keys(
                    source, target, [key for key in keys if isinstance(key, bytes)]
                )
                self.copied_keys += len(keys)
                ahead = self.copied_keys / self.copy_rate - (loop.time() - started)
                if ahead > 0:
                    await asyncio.sleep(ahead)
                if cursor == b"0":
                    return
        finally:
            await source.close()
            await target.close()

    @staticmethod
    async def _copy_keys(source: Redis, target: Redis, keys: list[bytes]) -> None:
        if not keys:
            return
        replies = await source.pipeline([(verb, key) for key in keys for verb in ("PTTL", "DUMP")])
        restores: list[tuple[Arg, ...]] = []
        for key, ttl, payload in zip(keys, replies[::2], replies[1::2], strict=True):
            if isinstance(payload, bytes) and isinstance(ttl, int) and ttl != -2:
                restores.append(("RESTORE", key, max(ttl, 0), payload, "REPLACE"))
        for result in await target.pipeline(restores):
            if isinstance(result, RedisError):
                raise result

    async def _replay(self, stream: RespReader) -> None:
        """Apply the replication stream to the target, one command at a time, in order."""
        target = await Redis.connect(self.host, self.target_port)
        try:
            while True:
                command, size = await stream.read()
                await self._running.wait()  # a stall holds the command it has read
                if isinstance(command, list) and command and isinstance(command[0], bytes):
                    name = command[0].lower()
                    if name == b"replconf":
                        self._send_ack()  # GETACK
                    elif name != b"ping":
                        args = [part for part in command if isinstance(part, bytes)]
                        (reply,) = await target.pipeline([args])
                        if isinstance(reply, RedisError):
                            log.warning("redis demo: target refused %r: %s", args[:2], reply)
                        self.applied_commands += 1
                self.applied_offset += size
        finally:
            await target.close()

    def _send_ack(self) -> None:
        if self._replication is not None:
            self._replication.writer.write(encode_command("REPLCONF", "ACK", self.applied_offset))

    async def _acknowledge(self, source: Redis) -> None:
        """Tell the source what has been applied, as replicas do; also keeps the link alive."""
        while True:
            self._send_ack()
            await source.writer.drain()
            await asyncio.sleep(ACK_EVERY_SECONDS)


# --------------------------------------------------------------------------------------------------
# The demo


@dataclass(frozen=True)
class DemoOptions:
    """What the demo migrates and how fast."""

    keys: int = 100_000
    copy_rate: float = 2_000.0  # keys per second in the full phase
    write_rate: float = 200.0  # writes per second to the source
    api_host: str = "127.0.0.1"
    api_port: int = 9714
    poll_interval: float = 2.0


@dataclass
class RedisDemo:
    """Two redis-servers, a migration between them and a writer; stats in the DCS API's shape."""

    binary: str
    options: DemoOptions
    host: str = "127.0.0.1"
    source: RedisServer | None = None
    target: RedisServer | None = None
    migrator: Migrator | None = None
    writer: Writer | None = None
    stalled: bool = False
    _stack: contextlib.AsyncExitStack = field(default_factory=contextlib.AsyncExitStack)
    _source_control: Redis | None = None
    _target_control: Redis | None = None

    async def __aenter__(self) -> RedisDemo:
        try:
            await self._start()
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._stack.aclose()

    async def _start(self) -> None:
        directory = Path(
            self._stack.enter_context(tempfile.TemporaryDirectory(prefix="dcs-redis-demo-"))
        )
        self.source = await start_redis_server(self.binary, directory, "source")
        self._stack.push_async_callback(self.source.stop)
        self.target = await start_redis_server(self.binary, directory, "target")
        self._stack.push_async_callback(self.target.stop)
        log.info(
            "redis demo: source redis-server on %s:%d, target on %s:%d (files in %s)",
            self.host, self.source.port, self.host, self.target.port, directory,
        )  # fmt: skip
        self._source_control = await self._connect(self.source.port)
        self._target_control = await self._connect(self.target.port)
        await load_dataset(self._source_control, self.options.keys)
        log.info("redis demo: loaded %d keys into the source", self.options.keys)

        self.migrator = Migrator(
            self.host, self.source.port, self.target.port, self.options.copy_rate
        )
        self.writer = Writer(
            await self._connect(self.source.port), self.options.write_rate, self.options.keys
        )
        for job in (self.migrator.run(), self.writer.run()):
            self._background(job)

    async def _connect(self, port: int) -> Redis:
        connection = await Redis.connect(self.host, port)
        self._stack.push_async_callback(connection.close)
        return connection

    def _background(self, job: Awaitable[None]) -> None:
        task = asyncio.ensure_future(job)

        async def cancel() -> None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

        self._stack.push_async_callback(cancel)

    # ---- what the fake API serves ------------------------------------------------------------

    @property
    def dcs_status(self) -> str:
        """The task status the details API shows."""
        assert self.migrator is not None
        return {
            "starting": "MIGRATING",
            "full": "FULLMIGRATING",
            "incremental": "INCRMIGEATING",  # sic: the live API's spelling
            "failed": "FAILED",
        }[self.migrator.phase]

    async def stats(self) -> dict[str, object]:
        """The stats body of the DCS API, read from the two servers (numbers as strings)."""
        assert self._source_control and self._target_control and self.migrator
        replication = await self._source_control.info("replication")
        source_keys = as_int(await self._source_control.execute("DBSIZE"))
        target_keys = as_int(await self._target_control.execute("DBSIZE"))
        target_stats = await self._target_control.info("stats")
        body: dict[str, object] = {
            "full_migration_progress": str(self.migrator.progress),
            "source_dbsize": str(source_keys),
            "target_dbsize": str(target_keys),
            "target_input_kbps": target_stats.get("instantaneous_input_kbps", ""),
            "target_ops": target_stats.get("instantaneous_ops_per_sec", ""),
            "is_migrating": self.migrator.phase in ("starting", "full", "incremental"),
        }
        acknowledged = replica_offset(replication)
        if self.migrator.phase in ("starting", "full"):
            body["offset"] = "0"  # as DCS: the offset only means something once incremental
        elif acknowledged is not None:
            body["offset"] = str(int(replication["master_repl_offset"]) - acknowledged)
        return body  # with no replica attached, "offset" is left out rather than made up

    def describe(self) -> dict[str, object]:
        """The demo's own view, for ``GET /demo``."""
        assert self.migrator and self.writer and self.source and self.target
        return {
            "phase": self.migrator.phase,
            "error": self.migrator.error,
            "stalled": self.stalled,
            "writing": self.writer.enabled.is_set(),
            "writes": self.writer.writes,
            "progress": self.migrator.progress,
            "copied_keys": self.migrator.copied_keys,
            "total_keys": self.migrator.total_keys,
            "applied_offset": self.migrator.applied_offset,
            "source": {"host": self.host, "port": self.source.port},
            "target": {"host": self.host, "port": self.target.port},
        }

    # ---- controls ----------------------------------------------------------------------------

    async def stall(self) -> None:
        """Freeze the incremental phase with a constant, non-zero offset."""
        assert self._source_control and self.migrator
        if self.stalled:
            return
        self.stalled = True
        self.migrator.hold()
        if self.writer is not None and self.writer.enabled.is_set():
            await asyncio.sleep(STALL_BACKLOG_SECONDS)  # let a backlog build up, as in a real stall
        # One write the migration will not apply: the frozen offset is never 0.
        await self._source_control.execute("SET", "redis-demo:stalled-at", str(time.time()))
        await self._source_control.execute("CLIENT", "PAUSE", PAUSE_MILLISECONDS, "WRITE")
        log.info("redis demo: incremental phase stalled")

    async def resume(self) -> None:
        """End a stall: the source takes writes again and the migration catches up."""
        assert self._source_control and self.migrator
        await self._source_control.execute("CLIENT", "UNPAUSE")
        self.migrator.release()
        self.stalled = False
        log.info("redis demo: incremental phase resumed")

    def set_writing(self, enabled: bool) -> None:
        """Start or stop the writer."""
        assert self.writer is not None
        if enabled:
            self.writer.enabled.set()
        else:
            self.writer.enabled.clear()
        log.info("redis demo: writes to the source %s", "started" if enabled else "stopped")

    def add_routes(self, app: web.Application) -> None:
        """The control endpoints, on the fake API's application."""

        def action(
            do: Callable[[], Awaitable[None]],
        ) -> Callable[[web.Request], Awaitable[web.Response]]:
            async def handler(request: web.Request) -> web.Response:
                await do()
                return web.json_response(self.describe())

            return handler

        async def show(request: web.Request) -> web.Response:
            return web.json_response(self.describe())

        async def writes_on() -> None:
            self.set_writing(True)

        async def writes_off() -> None:
            self.set_writing(False)

        app.router.add_get("/demo", show)
        app.router.add_post("/demo/stall", action(self.stall))
        app.router.add_post("/demo/resume", action(self.resume))
        app.router.add_post("/demo/writes/start", action(writes_on))
        app.router.add_post("/demo/writes/stop", action(writes_off))


# --------------------------------------------------------------------------------------------------
# Running it


def find_redis_server() -> str:
    """The redis-server binary, or RedisNotFound naming the package to install."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RedisNotFound(
            "redis-server not found on PATH; --demo.redis needs it: install the Debian package "
            f"{REDIS_PACKAGE} (apt-get install {REDIS_PACKAGE})"
        )
    return binary


async def run(
    options: DemoOptions,
    listen: tuple[str | None, int],
    web_config: WebConfig | None,
    binary: str,
) -> None:
    """Start the demo, serve the fake DCS API over it and run the daemon against that API."""
    from exporter.cli import demo_config
    from exporter.daemon import Daemon
    from exporter.simulator import Simulator

    # Until the daemon installs its own handlers, SIGTERM/SIGINT still clean up.
    main_task = asyncio.current_task()
    assert main_task is not None
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, main_task.cancel)

    async with RedisDemo(binary, options) as demo:
        assert demo.source is not None and demo.target is not None
        simulator = Simulator()

        async def stats() -> Mapping[str, object]:
            simulator.set_status(DEMO_TASK_ID, demo.dcs_status)
            return await demo.stats()

        simulator.add_task(
            DEMO_TASK_ID,
            DEMO_TASK_NAME,
            stats=stats,
            status=demo.dcs_status,
            migration_method="full_incr_migration",
            source_name=f"redis-server {demo.host}:{demo.source.port}",
            target_name=f"redis-server {demo.host}:{demo.target.port}",
        )
        app = simulator.app()
        demo.add_routes(app)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        try:
            await web.TCPSite(runner, options.api_host, options.api_port).start()
            api = f"http://{options.api_host}:{options.api_port}"
            log.info(
                "redis demo: fake DCS API on %s; stall the migration with: curl -X POST %s/demo/stall",
                api,
                api,
            )
            config = demo_config(api, ((DEMO_TASK_ID, DEMO_TASK_NAME),))
            polling = replace(config.polling, interval=options.poll_interval, details_interval=5.0)
            await Daemon(replace(config, polling=polling), None, web_config).serve(*listen)
        finally:
            await runner.cleanup()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--demo.redis*`` flags."""
    group = parser.add_argument_group("demo on real Redis")
    group.add_argument(
        "--demo.redis",
        dest="demo_redis",
        action="store_true",
        help="like --demo, but the task is a real migration between two local redis-servers",
    )
    defaults = DemoOptions()
    group.add_argument(
        "--demo.redis.keys",
        dest="demo_redis_keys",
        type=int,
        default=defaults.keys,
        metavar="N",
        help=f"keys loaded into the source (default {defaults.keys})",
    )
    group.add_argument(
        "--demo.redis.copy-rate",
        dest="demo_redis_copy_rate",
        type=float,
        default=defaults.copy_rate,
        metavar="KEYS_PER_SECOND",
        help=f"speed of the full copy (default {defaults.copy_rate:.0f})",
    )
    group.add_argument(
        "--demo.redis.write-rate",
        dest="demo_redis_write_rate",
        type=float,
        default=defaults.write_rate,
        metavar="WRITES_PER_SECOND",
        help=f"writes to the source during the migration (default {defaults.write_rate:.0f})",
    )
    group.add_argument(
        "--demo.redis.api-address",
        dest="demo_redis_api",
        default=f"{defaults.api_host}:{defaults.api_port}",
        metavar="HOST:PORT",
        help="fake DCS API and the /demo control endpoints (default %(default)s)",
    )


def run_cli(args: argparse.Namespace, web_config: WebConfig | None) -> int:
    """``--demo.redis`` from the command line; returns the exit code."""
    from exporter.cli import parse_listen_address

    try:
        binary = find_redis_server()
    except RedisNotFound as error:
        log.error("%s", error)
        return 1
    api_host, api_port = parse_listen_address(args.demo_redis_api)
    options = DemoOptions(
        keys=args.demo_redis_keys,
        copy_rate=args.demo_redis_copy_rate,
        write_rate=args.demo_redis_write_rate,
        api_host=api_host or "127.0.0.1",
        api_port=api_port,
    )
    try:
        asyncio.run(run(options, args.listen, web_config, binary))
    except asyncio.CancelledError:
        pass  # SIGTERM/SIGINT during start-up; everything has been cleaned up
    except (OSError, RuntimeError, RedisError, ProtocolError) as error:
        log.error("redis demo failed: %s", error)
        return 1
    return 0
