"""The cheapest stand-in for the DCS API: fixed answers, each sent ``latency`` seconds late.

The benchmark measures the exporter's own cost. Against the full simulator
(``exporter.simulator``: an aiohttp server that verifies every signature) the fake cloud spends
about as much CPU per request as the exporter does, on the same two cores, and its wake-ups add
to every request's latency; a poll round then measures both processes. A real API's cost is not on
the exporter's machine: ``latency`` stands for it. This server parses just enough HTTP/1.1 to
answer GETs on keep-alive connections and schedules each answer with one timer, so what remains
of a round above ``tasks / concurrency × latency`` is the exporter's (and its HTTP client's).

It does not check signatures; ``tests/`` cover that against the simulator.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable, Mapping

_HEAD_END = b"\r\n\r\n"
# A request head larger than this is not one the exporter sends: drop the connection.
_MAX_HEAD = 64 * 1024


def _response(status: str, body: object) -> bytes:
    payload = json.dumps(body).encode()
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    )
    return head.encode("ascii") + payload


_NOT_FOUND = _response(
    "400 Bad Request", {"error_code": "DCS.4133", "error_msg": "Migration task not found."}
)


def build_answers(
    project_id: str, task_ids: Iterable[str], stats: Mapping[str, object]
) -> dict[bytes, bytes]:
    """Request path → whole HTTP response, for every task's stats and details."""
    answers: dict[bytes, bytes] = {}
    stats_answer = _response("200 OK", dict(stats))
    for index, task_id in enumerate(task_ids):
        base = f"/v2/{project_id}/migration-task/{task_id}"
        details = {
            "task_id": task_id,
            "task_name": f"bench-{index}",
            "status": "MIGRATING",
            "migration_type": "online_migration",
            "migration_method": "incremental_migration",
            "source_instance": {"name": f"source-{index}"},
            "target_instance": {"name": f"target-{index}"},
        }
        answers[f"{base}/stats".encode()] = stats_answer
        answers[base.encode()] = _response("200 OK", details)
    return answers


class _FixedAnswers(asyncio.Protocol):
    """One connection: every complete request head gets its answer after the latency."""

    def __init__(self, answers: Mapping[bytes, bytes], latency: float) -> None:
        self._answers = answers
        self._latency = latency
        self._buffer = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        loop = asyncio.get_running_loop()
        while (end := self._buffer.find(_HEAD_END)) >= 0:
            head, self._buffer = self._buffer[:end], self._buffer[end + len(_HEAD_END) :]
            # "GET /path?query HTTP/1.1": GETs carry no body, so the head is the whole request.
            target = head.split(b" ", 2)[1] if head.count(b" ") >= 2 else b""
            answer = self._answers.get(target.split(b"?", 1)[0], _NOT_FOUND)
            loop.call_later(self._latency, self._send, answer)
        if len(self._buffer) > _MAX_HEAD and self._transport is not None:
            self._transport.close()

    def _send(self, answer: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(answer)


async def start_fake_api(answers: Mapping[bytes, bytes], latency: float) -> asyncio.Server:
    """Listen on a free loopback port; ``server.sockets[0]`` tells which."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(
        lambda: _FixedAnswers(answers, latency), "127.0.0.1", 0, backlog=1024
    )
