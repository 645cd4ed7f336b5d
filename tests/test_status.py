"""Tests for exporter.status: formatting, ETA, both sources, watch mode and the CLI dispatch."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from exporter import status
from exporter.cli import main as cli_main
from exporter.simulator import CannedResponse
from exporter.state import ExporterState
from exporter.status import EtaTracker, StatusError, TaskLine, format_lines, progress_bar
from exporter.web import create_app
from tests.support import TASK_A, TASK_B, SimServer, basic_auth_web_config, write_config
from tests.test_landing import polled_task

Servers = Callable[[web.Application], Awaitable[str]]


def args_for(*argv: str) -> argparse.Namespace:
    """Parsed ``status`` flags."""
    return status.build_parser().parse_args(list(argv))


def entry(task_id: str = TASK_A, **fields: Any) -> dict[str, Any]:
    """A feed entry of a healthy task, with ``fields`` overriding it."""
    base: dict[str, Any] = {
        "task_id": task_id,
        "name": "orders-cache",
        "status": "FULLMIGRATING",
        "health": "up",
        "progress": 0.45,
        "offset": 5000,
        "offset_trend": "falling",
        "offset_rate": -120.0,
        "offset_held_seconds": 0.0,
        "last_success_time": 1000.0,
        "last_reason": None,
        "consecutive_failures": 0,
        "full_eta_seconds": None,
        "display": {"task": "ignored"},
    }
    base.update(fields)
    return base


class FakeSource:
    """A source that answers from a list of documents, one per fetch."""

    name = "fake"

    def __init__(self, documents: Sequence[dict[str, Any] | StatusError]) -> None:
        self.documents = list(documents)
        self.closed = False

    async def fetch(self) -> list[TaskLine]:
        """The next document's tasks (or its error)."""
        document = self.documents.pop(0)
        if isinstance(document, StatusError):
            raise document
        return status.parse_document(document)

    async def close(self) -> None:
        """Nothing to release."""
        self.closed = True


class Terminal(io.StringIO):
    """A StringIO that says it is a terminal."""

    def isatty(self) -> bool:
        """Pretend to be a TTY."""
        return True


async def no_sleep(seconds: float) -> None:
    """Watch without waiting."""


@pytest.fixture
async def servers() -> AsyncIterator[Servers]:
    """Serve apps on loopback; returns their base URLs; all closed at the end."""
    started: list[TestServer] = []

    async def serve(app: web.Application) -> str:
        server = TestServer(app)
        await server.start_server()
        started.append(server)
        return str(server.make_url("")).rstrip("/")

    yield serve
    for server in started:
        await server.close()


# ---- formatting --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ratio", "bar"),
    [
        (None, "[          ]"),
        (0.0, "[░░░░░░░░░░]"),
        (0.45, "[████░░░░░░]"),
        (0.999, "[█████████░]"),  # not full before it is done
        (1.0, "[██████████]"),
    ],
)
def test_progress_bar(ratio: float | None, bar: str) -> None:
    """The bar fills by whole cells, floor-rounded, and stays blank when unknown."""
    assert progress_bar(ratio, 10) == bar


def test_progress_bar_ascii() -> None:
    """Without Unicode the bar uses # and dots."""
    assert progress_bar(0.5, 4, unicode=False) == "[##..]"


def test_lines_one_per_task_aligned() -> None:
    """A header, then one aligned line per task: bar, percent, offset, trend, ETA, health."""
    tasks = status.parse_document(
        {
            "tasks": [
                entry(),
                entry(
                    TASK_B,
                    name="sessions",
                    health="down",
                    last_reason="timeout",
                    consecutive_failures=3,
                    progress=None,
                    offset=None,
                    offset_trend="unknown",
                ),
            ]
        }
    )
    lines = format_lines(tasks, EtaTracker())
    assert lines == [
        "TASK          FULL SYNC                     OFFSET  TREND    ETA  HEALTH",
        "orders-cache  [█████████░░░░░░░░░░░]  45 %   5,000  ↓ 120/s  –    up",
        "sessions      [                    ]     –       –  –        –    down: timeout ×3",
    ]


def test_lines_neutralise_terminal_escapes() -> None:
    """A name with an escape sequence cannot move the cursor or recolour the terminal."""
    tasks = status.parse_document({"tasks": [entry(name="evil\x1b[2J\x1b]0;pwned\x07")]})
    (_, line) = format_lines(tasks, EtaTracker())
    assert "\x1b" not in line and "\x07" not in line
    assert line.startswith("evil?[2J?]0;pwned?")


def test_lines_ascii_fallback() -> None:
    """For an ASCII-only terminal the dash, arrows and bar are plain ASCII."""
    lines = format_lines(status.parse_document({"tasks": [entry()]}), EtaTracker(), unicode=False)
    assert all(line.isascii() for line in lines)
    assert "v 120/s" in lines[1] and "[#########...........]" in lines[1]


def test_no_tasks_is_said() -> None:
    """An exporter without tasks prints a header and says so."""
    assert format_lines([], EtaTracker())[-1] == "(no tasks)"


def test_bad_entries_become_unknowns() -> None:
    """Fields of the wrong type are unknown, not a crash; a non-feed document is an error."""
    (task,) = status.parse_document(
        {"tasks": [{"task_id": TASK_A, "progress": "45", "offset": True, "offset_trend": "weird"}]}
    )
    assert (task.name, task.progress, task.offset, task.trend.kind) == (
        TASK_A,
        None,
        None,
        "unknown",
    )
    with pytest.raises(StatusError, match="not an /api/v1/tasks document"):
        status.parse_document({"metrics": []})


# ---- ETA ---------------------------------------------------------------------------------------


def test_eta_from_two_polls() -> None:
    """Two polls 100 s apart, 40 % then 50 %: 500 s to go; the same poll twice adds nothing."""
    tracker = EtaTracker()
    first = TaskLine.from_json(entry(progress=0.40, last_success_time=1000.0))
    second = TaskLine.from_json(entry(progress=0.50, last_success_time=1100.0))
    tracker.add([first])
    tracker.add([first])
    assert tracker.eta(first) is None
    tracker.add([second])
    assert tracker.eta(second) == pytest.approx(500.0)


def test_eta_falls_back_to_the_exporters_estimate_then_done() -> None:
    """With one poll the exporter's estimate is used; at 100 % the full phase is done."""
    tracker = EtaTracker()
    task = TaskLine.from_json(entry(full_eta_seconds=42.0))
    tracker.add([task])
    assert tracker.eta(task) == 42.0
    done = TaskLine.from_json(entry(progress=1.0))
    assert tracker.eta(done) == 0.0
    assert status.eta_text(0.0, 1.0) == "done"
    assert status.eta_text(None, 0.5) == "–"


async def test_watch_shows_eta_from_the_second_refresh() -> None:
    """Watching, the ETA appears once two polls with different progress have been seen."""
    source = FakeSource(
        [
            {"tasks": [entry(progress=0.40, last_success_time=1000.0)]},
            {"tasks": [entry(progress=0.50, last_success_time=1100.0)]},
        ]
    )
    out = io.StringIO()
    code = await status.run(args_for("--watch"), source, out, sleep=no_sleep, refreshes=2)
    first, second = out.getvalue().strip().split("\n\n")
    assert code == 0
    assert first.splitlines()[2].split()[-2] == "–"
    assert "8m 20s" in second.splitlines()[2]


async def test_watch_redraws_on_a_terminal_and_survives_errors() -> None:
    """On a TTY every refresh clears the screen; a failed fetch is shown and watching goes on."""
    source = FakeSource([StatusError("connection refused"), {"tasks": [entry()]}])
    out = Terminal()
    code = await status.run(args_for("--watch"), source, out, sleep=no_sleep, refreshes=2)
    frames = out.getvalue().split("\x1b[H\x1b[J")
    assert len(frames) == 3 and frames[0] == ""
    assert "status: connection refused" in frames[1]
    assert "orders-cache" in frames[2]
    assert code == 0


async def test_json_output_per_refresh() -> None:
    """--output json prints one document per refresh, without display strings, with the ETA."""
    source = FakeSource(
        [
            {"tasks": [entry(progress=0.40, last_success_time=1000.0)]},
            {"tasks": [entry(progress=0.50, last_success_time=1100.0)]},
        ]
    )
    out = io.StringIO()
    await status.run(
        args_for("--watch", "--output", "json"), source, out, sleep=no_sleep, refreshes=2
    )
    documents = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [d["tasks"][0]["full_eta_seconds"] for d in documents] == [None, 500.0]
    assert "display" not in documents[0]["tasks"][0]
    assert documents[0]["source"] == "fake"


async def test_exit_codes() -> None:
    """0 when all tasks are up, 1 when one is not, 2 when nothing could be read."""
    up = FakeSource([{"tasks": [entry()]}])
    down = FakeSource([{"tasks": [entry(), entry(TASK_B, health="down")]}])
    broken = FakeSource([StatusError("nope")])
    results = [await status.run(args_for(), s, io.StringIO()) for s in (up, down, broken)]
    assert results == [0, 1, 2]


# ---- from a running exporter -------------------------------------------------------------------


async def test_url_source_reads_a_running_exporter(servers: Servers) -> None:
    """The URL source prints the tasks the exporter's feed has."""
    state = ExporterState()
    state.tasks[TASK_A] = polled_task()
    state.changed()
    url = await servers(create_app(state))
    source = status.make_source(args_for("--url", url + "/"), environ={})
    out = io.StringIO()
    try:
        assert await status.run(args_for(), source, out) == 0
    finally:
        await source.close()
    _header, line = out.getvalue().splitlines()
    assert line.startswith("orders-cache  [█████████░░░░░░░░░░░]  45 %   5,000")
    assert line.endswith("up")


async def test_url_source_with_basic_auth(servers: Servers, tmp_path: Path) -> None:
    """Credentials come from the environment or a password file; without them, a clear error."""
    web_config = basic_auth_web_config(tmp_path, "alice", "s3cret")
    state = ExporterState()
    state.tasks[TASK_A] = polled_task()
    url = await servers(create_app(state, web_config=web_config))

    anonymous = status.make_source(args_for("--url", url), environ={})
    with pytest.raises(StatusError, match="401, credentials missing; set DCS_EXPORTER_USERNAME"):
        await anonymous.fetch()
    await anonymous.close()

    from_env = status.make_source(
        args_for("--url", url),
        environ={"DCS_EXPORTER_USERNAME": "alice", "DCS_EXPORTER_PASSWORD": "s3cret"},
    )
    assert [t.task_id for t in await from_env.fetch()] == [TASK_A]
    await from_env.close()

    password_file = tmp_path / "password"
    password_file.write_text("s3cret\n")
    from_file = status.make_source(
        args_for("--url", url, "--username", "alice", "--password-file", str(password_file)),
        environ={},
    )
    assert [t.task_id for t in await from_file.fetch()] == [TASK_A]
    await from_file.close()

    wrong = status.make_source(
        args_for("--url", url),
        environ={"DCS_EXPORTER_USERNAME": "alice", "DCS_EXPORTER_PASSWORD": "nope"},
    )
    with pytest.raises(StatusError, match="credentials wrong"):
        await wrong.fetch()
    await wrong.close()


async def test_url_credentials_are_used_and_never_shown(servers: Servers, tmp_path: Path) -> None:
    """`user:password@` in --url authenticates, a wrong one is called wrong, and no message
    shows the password."""
    web_config = basic_auth_web_config(tmp_path, "alice", "s3cret")
    state = ExporterState()
    state.tasks[TASK_A] = polled_task()
    url = await servers(create_app(state, web_config=web_config))
    scheme, rest = url.split("://", 1)

    good = status.make_source(args_for("--url", f"{scheme}://alice:s3cret@{rest}"), environ={})
    assert [t.task_id for t in await good.fetch()] == [TASK_A]
    await good.close()

    wrong = status.make_source(args_for("--url", f"{scheme}://alice:WRONGpw@{rest}"), environ={})
    with pytest.raises(StatusError, match="credentials wrong") as caught:
        await wrong.fetch()
    assert "WRONGpw" not in str(caught.value)
    await wrong.close()


def test_password_without_user_is_refused() -> None:
    """A password alone is a mistake worth saying, not a silent anonymous request."""
    with pytest.raises(StatusError, match="no user"):
        status.basic_auth(args_for(), {"DCS_EXPORTER_PASSWORD": "x"})


async def test_url_source_not_an_exporter(servers: Servers) -> None:
    """A URL that does not serve the feed gives an error naming the endpoint."""
    url = await servers(web.Application())
    source = status.make_source(args_for("--url", url), environ={})
    with pytest.raises(StatusError, match=r"/api/v1/tasks: HTTP 404"):
        await source.fetch()
    await source.close()


def test_cli_dispatches_status_and_reports_unreachable(capsys: pytest.CaptureFixture[str]) -> None:
    """`dcs-migration-exporter status` reaches this module; an unreachable URL exits 2."""
    code = cli_main(["status", "--url", "http://127.0.0.1:1"])
    assert code == 2
    assert (
        "status: http://127.0.0.1:1/api/v1/tasks: ClientConnectorError" in capsys.readouterr().err
    )


# ---- straight from the cloud -------------------------------------------------------------------


async def test_cloud_source_polls_through_the_real_client(
    sim_server: SimServer, tmp_path: Path
) -> None:
    """With --config.file the tasks are polled once through the client, signed, and shown."""
    sim_server.sim.push(TASK_B, CannedResponse(status=500, body={"error_code": "DCS.5000"}))
    config = write_config(tmp_path, sim_server.url)
    source = status.make_source(args_for("--config.file", str(config)))
    out = io.StringIO()
    try:
        code = await status.run(args_for(), source, out)
    finally:
        await source.close()
    _header, task_a, task_b = out.getvalue().splitlines()
    assert task_a.split()[:6] == ["task-a", "[█████████░░░░░░░░░░░]", "45", "%", "5,000", "–"]
    assert task_a.endswith("up")
    assert task_b.split()[0] in {"task-b", TASK_B}  # the name may not be known yet
    assert task_b.endswith("down: server_error ×1")
    assert code == 1
    stats_calls = [r for r in sim_server.sim.requests if r.path.endswith("/stats")]
    assert {(r.task_id, r.auth) for r in stats_calls} == {(TASK_A, "aksk"), (TASK_B, "aksk")}


async def test_cloud_source_json_matches_the_feed_shape(
    sim_server: SimServer, tmp_path: Path
) -> None:
    """The cloud source's JSON has the same fields as the exporter's feed."""
    config = write_config(tmp_path, sim_server.url)
    source = status.make_source(args_for("--config.file", str(config)))
    out = io.StringIO()
    try:
        await status.run(args_for("--output", "json"), source, out)
    finally:
        await source.close()
    (task_a, _) = json.loads(out.getvalue())["tasks"]
    assert task_a["offset"] == 5000 and task_a["progress"] == 0.45
    assert task_a["source_keys"] == 1000 and task_a["target_keys"] == 450
    assert task_a["health"] == "up"


def test_cloud_source_bad_config(tmp_path: Path) -> None:
    """A broken config file is reported with its problem, not a traceback."""
    path = tmp_path / "config.yaml"
    path.write_text("cloud: [\n")
    with pytest.raises(StatusError, match=str(path)):
        status.make_source(args_for("--config.file", str(path)))


@pytest.mark.parametrize(
    ("typed", "base"),
    [
        ("127.0.0.1:9713", "http://127.0.0.1:9713"),
        ("http://host:9713/", "http://host:9713"),
        ("https://host:9713/metrics", "https://host:9713"),
        ("http://host:9713/api/v1/tasks", "http://host:9713"),
        ("http://alice:pw@host:9713/?x=1", "http://host:9713"),
    ],
)
def test_url_as_typed_becomes_the_exporter_base(typed: str, base: str) -> None:
    """A URL without a scheme, or one pointing at /metrics, still finds the exporter's feed."""
    assert status.exporter_base_url(typed) == base


def test_interval_zero_is_refused_as_not_positive() -> None:
    """`--interval 0` is refused for being zero, not for not being a duration."""
    with pytest.raises(argparse.ArgumentTypeError, match="must be greater than 0"):
        status._interval("0")


async def test_url_source_timeout_says_what_happened(servers: Servers) -> None:
    """An exporter that never answers gives a message with the wait, not an empty TimeoutError."""

    async def silent(request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.Response()

    app = web.Application()
    app.router.add_get("/api/v1/tasks", silent)
    server = TestServer(app)
    await server.start_server()
    source = status.UrlSource(str(server.make_url("/")), timeout=0.3)
    try:
        with pytest.raises(StatusError, match=r"no answer within 0.3s"):
            await source.fetch()
    finally:
        await source.close()
        await server.close()
