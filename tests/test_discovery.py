"""Tests for exporter.discovery and the discovery section: filters, merging, paging through the
simulator's list API, tasks appearing and vanishing, and three shards sharing discovered tasks."""

from __future__ import annotations

import logging
import textwrap
import uuid
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from exporter.cli import run_once
from exporter.client import ApiError, ErrorKind, TaskDetails
from exporter.config import ConfigError, DiscoveryConfig, TaskConfig, load_config, parse_config
from exporter.daemon import Daemon
from exporter.discovery import Discovery, matches, merge, select
from exporter.sharding import Shard, shard_of
from exporter.simulator import DEMO_ACCESS_KEY, DEMO_SECRET_KEY
from exporter.web import MetricsRenderer
from tests.support import BASELINE_BODY, PROJ, Clients, SimServer, make_client, make_config

IDS = [str(uuid.uuid5(uuid.NAMESPACE_URL, f"discovery-test/{n}")) for n in range(250)]
# task_id values a list API might send that must not become label values or request paths.
BAD_IDS: list[object] = ["ok-xD2\n\u001b[31m", "ok-x" + "L" * 3000, {"a": 1}, "ok-x\n"]
HEAD = f"""\
cloud:
  region: eu-de
  project_id: "{PROJ}"
  dcs_endpoint: URL
  iam_endpoint: URL/v3
auth:
  access_key: {DEMO_ACCESS_KEY}
  secret_key: {DEMO_SECRET_KEY}
polling:
  interval: 10s
  timeout: 2s
  max_requests_per_second: 10000
"""


def details(
    task_id: str, name: str, status: str = "MIGRATING", kind: str = "online_migration"
) -> TaskDetails:
    """A list entry as the client returns it."""
    return TaskDetails(task_id, name, status, kind, "incremental_migration", "src", "dst")


def write(directory: Path, url: str, extra: str) -> Path:
    """A config file for the simulator at ``url`` with ``extra`` appended."""
    path = directory / "config.yaml"
    path.write_text(HEAD.replace("URL", url) + textwrap.dedent(extra), encoding="utf-8")
    return path


# ---- filters and merging -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (DiscoveryConfig(), ["orders-1", "sessions", "orders-2", "import"]),
        (DiscoveryConfig(name_regex="^orders-"), ["orders-1", "orders-2"]),
        (DiscoveryConfig(statuses=("migrating",)), ["orders-1", "sessions", "import"]),
        (DiscoveryConfig(migration_types=("backupfile_import",)), ["import"]),
        (
            DiscoveryConfig(name_regex="s", statuses=("MIGRATING", "SUCCESS")),
            ["orders-1", "sessions", "orders-2"],
        ),
    ],
)
def test_filters_combine(config: DiscoveryConfig, expected: list[str]) -> None:
    """Name regex (searched), statuses (any case) and migration types must all match."""
    listed = [
        details("a", "orders-1"),
        details("b", "sessions"),
        details("c", "orders-2", status="SUCCESS"),
        details("d", "import", kind="backupfile_import"),
    ]
    assert [task.task_name for task in listed if matches(task, config)] == expected


def test_select_drops_repeated_ids() -> None:
    """A task listed twice (pages shifting while listed) is watched once."""
    listed = [details("A1", "x"), details("a1", "x"), details("b2", "y")]
    assert select(listed, DiscoveryConfig()) == (TaskConfig("A1"), TaskConfig("b2"))


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The warnings discovery logged, as their messages."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "exporter.discovery" and r.levelno == logging.WARNING
    ]


def test_select_skips_ids_that_are_not_task_ids(caplog: pytest.LogCaptureFixture) -> None:
    """Listed IDs that fail the config's ID rule are skipped with one short, escaped warning."""
    listed = [details("ok-xD2\n\u001b[31m", "x"), details("good-1", "x")]
    listed += [details("ok-x" + "L" * 3000, "x"), details("good-2", "x")]
    with caplog.at_level(logging.WARNING, logger="exporter.discovery"):
        assert select(listed, DiscoveryConfig()) == (TaskConfig("good-1"), TaskConfig("good-2"))
    (warning,) = warnings_of(caplog)
    assert "skipped 2 listed tasks" in warning and "'ok-xD2\\n\\x1b[31m'" in warning
    assert warning.isprintable() and len(warning) < 200


def test_configured_entries_win_over_discovered_ones() -> None:
    """A task both configured and discovered keeps its configured name; the rest are appended."""
    static = (TaskConfig("AAA", name="mine"),)
    found = (TaskConfig("aaa"), TaskConfig("bbb"))
    assert merge(static, found) == (TaskConfig("AAA", name="mine"), TaskConfig("bbb"))


# ---- the config section --------------------------------------------------------------------------


def test_discovery_section_is_read() -> None:
    """Every key of the discovery section is read; a single string is a one-item list."""
    config = parse_config(
        HEAD.replace("URL", "https://dcs.example.com")
        + "discovery:\n  interval: 2m\n  name_regex: '^orders'\n"
        "  status: [MIGRATING, SUCCESS]\n  migration_type: online_migration\n"
    )
    assert config.tasks == ()
    assert config.discovery == DiscoveryConfig(
        interval=120.0,
        name_regex="^orders",
        statuses=("MIGRATING", "SUCCESS"),
        migration_types=("online_migration",),
    )


def test_empty_discovery_section_finds_everything() -> None:
    """``discovery:`` alone discovers every task, and the tasks list may then be empty."""
    config = parse_config(HEAD.replace("URL", "https://x.example") + "discovery:\ntasks: []\n")
    assert config.discovery == DiscoveryConfig()


def test_discovery_problems_are_located() -> None:
    """A bad regex and a number where a status belongs are reported with their lines."""
    text = HEAD.replace("URL", "https://x.example") + "discovery:\n  name_regex: '('\n  status: 3\n"
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    lines = str(caught.value).splitlines()
    assert lines[0].startswith("config.yaml:14:") and "not a regular expression" in lines[0]
    assert lines[1].startswith("config.yaml:15:") and "discovery.status" in lines[1]


def test_without_discovery_tasks_stay_required() -> None:
    """No discovery section and no tasks is still an error."""
    with pytest.raises(ConfigError, match="non-empty list of tasks"):
        parse_config(HEAD.replace("URL", "https://x.example"))


# ---- against the simulator -----------------------------------------------------------------------


async def test_refresh_reads_every_page(
    sim_server: SimServer, http_session: aiohttp.ClientSession
) -> None:
    """250 tasks come in three pages of at most 100, and all 250 are found."""
    for index, task_id in enumerate(IDS):
        sim_server.sim.add_task(task_id, f"bulk-{index}", body=dict(BASELINE_BODY))
    client = make_client(http_session, make_config(sim_server.url))
    changes: list[tuple[TaskConfig, ...]] = []
    discovery = Discovery(DiscoveryConfig(name_regex="^bulk-"), client.list_tasks, changes.append)
    assert await discovery.refresh()
    assert {task.id for task in discovery.found} == set(IDS)
    assert discovery.listed == 252  # and the fixture's two tasks, filtered out by name
    assert len(changes) == 1
    pages = [r for r in sim_server.sim.requests if r.path.endswith("/migration-tasks")]
    assert len(pages) == 3


async def test_bad_ids_from_the_list_api_are_skipped_once_per_listing(
    clients: Clients, http_session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    """A list API sending control characters, a huge string, an object, a number or a boolean
    as task_id: those entries are skipped, the good ones kept, and each listing logs one
    bounded warning."""
    bad = [*BAD_IDS, 12345, True]
    entries = [{"task_id": value, "task_name": "x"} for value in [*bad, "good-1"]]

    async def page(request: web.Request) -> web.Response:
        shown = entries if request.query["offset"] == "0" else []
        return web.json_response({"count": len(entries), "migration_tasks": shown})

    app = web.Application()
    app.router.add_get(f"/v2/{PROJ}/migration-tasks", page)
    server = await clients(app)
    client = make_client(http_session, make_config(f"http://{server.host}:{server.port}"))
    discovery = Discovery(DiscoveryConfig(), client.list_tasks, lambda found: None)
    with caplog.at_level(logging.WARNING, logger="exporter.discovery"):
        assert await discovery.refresh() and await discovery.refresh()
    # A JSON number or boolean is no task ID either, though "12345" or "True" would be.
    assert discovery.found == (TaskConfig("good-1"),)
    assert discovery.listed == len(entries)
    warnings = warnings_of(caplog)
    assert len(warnings) == 2 and all(f"skipped {len(bad)} " in w for w in warnings)
    assert all(w.isprintable() and len(w) < 200 for w in warnings)


async def test_failed_listing_keeps_the_last_result() -> None:
    """An error while listing leaves the found tasks as they were and reports no change."""
    answers: list[list[TaskDetails] | ApiError] = [
        [details("a", "x"), details("b", "y")],
        ApiError(ErrorKind.SERVER_ERROR, "HTTP 503", status=503),
    ]

    async def lister() -> list[TaskDetails]:
        answer = answers.pop(0)
        if isinstance(answer, ApiError):
            raise answer
        return answer

    changes: list[tuple[TaskConfig, ...]] = []
    outcomes: list[bool] = []
    discovery = Discovery(
        DiscoveryConfig(), lister, changes.append, on_refresh=lambda _, ok: outcomes.append(ok)
    )
    assert await discovery.refresh()
    assert not await discovery.refresh()
    assert discovery.found == (TaskConfig("a"), TaskConfig("b"))
    assert (len(changes), discovery.failures, outcomes) == (1, 1, [True, False])


async def test_daemon_follows_tasks_appearing_and_vanishing(
    sim_server: SimServer, tmp_path: Path
) -> None:
    """Discovered tasks are polled; a new one is picked up and a deleted one loses its series."""
    for index, task_id in enumerate(IDS[:5]):
        sim_server.sim.add_task(task_id, f"orders-{index}", body=dict(BASELINE_BODY))
    path = write(tmp_path, sim_server.url, "discovery:\n  name_regex: '^orders-'\n")
    daemon = Daemon(load_config(str(path)), lambda: load_config(str(path)), None)
    try:
        await daemon.start("127.0.0.1", 0)
        assert daemon.poller is not None and daemon.discovery is not None
        assert sorted(daemon.poller.task_ids) == sorted(IDS[:5])
        sim_server.sim.add_task(IDS[5], "orders-5", body=dict(BASELINE_BODY))
        sim_server.sim.remove_task(IDS[0])
        assert await daemon.discovery.refresh()
        assert sorted(daemon.poller.task_ids) == sorted(IDS[1:6])
        await daemon.poller.poll_all_once()
        exposition = MetricsRenderer(daemon.state).render(openmetrics=False).decode()
        assert f'task_id="{IDS[5]}"' in exposition
        assert f'task_id="{IDS[0]}"' not in exposition
        assert "\ndcs_migration_discovered_tasks 5.0\n" in exposition
        assert "\ndcs_migration_discovery_failures_total 0.0\n" in exposition
        assert "\ndcs_migration_discovery_last_success_timestamp_seconds " in exposition
    finally:
        await daemon.close()


async def test_configured_names_win_in_the_daemon(sim_server: SimServer, tmp_path: Path) -> None:
    """A task both listed and configured is polled once, under its configured name."""
    sim_server.sim.add_task(IDS[0], "orders-0", body=dict(BASELINE_BODY))
    extra = f'discovery:\n  name_regex: "^orders-"\ntasks:\n  - id: "{IDS[0]}"\n    name: mine\n'
    path = write(tmp_path, sim_server.url, extra)
    daemon = Daemon(load_config(str(path)), None, None)
    try:
        await daemon.start("127.0.0.1", 0)
        assert daemon.watched(daemon.config) == (TaskConfig(IDS[0], name="mine"),)
    finally:
        await daemon.close()


async def test_three_shards_share_discovered_tasks(sim_server: SimServer, tmp_path: Path) -> None:
    """Three daemons with --shard 0/3..2/3 and discovery poll disjoint shares of all 250 tasks,
    and a task that appears later goes to exactly one of them."""
    for index, task_id in enumerate(IDS[:-1]):
        sim_server.sim.add_task(task_id, f"bulk-{index}", body=dict(BASELINE_BODY))
    path = write(tmp_path, sim_server.url, "discovery:\n  name_regex: '^bulk-'\n")
    daemons = [Daemon(load_config(str(path)), None, None, shard=Shard(i, 3)) for i in range(3)]
    try:
        for daemon in daemons:
            await daemon.start("127.0.0.1", 0)
        shares = [set(d.poller.task_ids) for d in daemons if d.poller is not None]
        assert all(shares)  # every replica has a share
        assert set().union(*shares) == set(IDS[:-1]) and sum(map(len, shares)) == 249
        assert all(shard_of(t, 3) == i for i, share in enumerate(shares) for t in share)
        sim_server.sim.add_task(IDS[-1], "bulk-late", body=dict(BASELINE_BODY))
        for daemon in daemons:
            assert daemon.discovery is not None and await daemon.discovery.refresh()
        owners = [i for i, d in enumerate(daemons) if d.poller and IDS[-1] in d.poller.task_ids]
        assert owners == [shard_of(IDS[-1], 3)]
    finally:
        for daemon in daemons:
            await daemon.close()


async def test_once_polls_discovered_tasks_of_its_shard(
    sim_server: SimServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--once --shard 1/2`` with discovery prints exactly the discovered tasks of shard 1."""
    for index, task_id in enumerate(IDS[:20]):
        sim_server.sim.add_task(task_id, f"orders-{index}", body=dict(BASELINE_BODY))
    path = write(tmp_path, sim_server.url, "discovery:\n  name_regex: '^orders-'\n")
    assert await run_once(load_config(str(path)), Shard(1, 2)) == 0
    printed = capsys.readouterr().out
    shown = {t for t in IDS[:20] if f'dcs_migration_up{{task_id="{t}"}} 1.0' in printed}
    assert shown == {t for t in IDS[:20] if shard_of(t, 2) == 1}


def test_no_discovery_families_without_discovery() -> None:
    """Without a discovery section the exposition has no discovery series at all."""
    daemon = Daemon(make_config("http://dcs.invalid"), None, None)
    assert b"discover" not in MetricsRenderer(daemon.state).render(openmetrics=False)


async def test_a_bug_while_listing_is_a_failed_listing() -> None:
    """An unexpected exception is logged and counted, and does not escape refresh_guarded."""

    async def broken() -> list[TaskDetails]:
        raise KeyError("bug")

    outcomes: list[bool] = []
    discovery = Discovery(
        DiscoveryConfig(), broken, lambda found: None, on_refresh=lambda _, ok: outcomes.append(ok)
    )
    assert not await discovery.refresh_guarded()
    assert (discovery.failures, outcomes) == (1, [False])
