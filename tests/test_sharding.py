"""Tests for exporter.sharding: every task in exactly one shard, minimal movement, stable hashing."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exporter.config import TaskConfig, load_config
from exporter.daemon import Daemon
from exporter.sharding import Shard, parse_shard, shard_of
from tests.support import BASELINE_BODY, SimServer, write_config

FAST = "polling:\n  interval: 10s\n  timeout: 2s\n  max_requests_per_second: 1000\n"

TASK_IDS = [str(uuid.uuid5(uuid.NAMESPACE_URL, f"sharding-test/{n}")) for n in range(4000)]
# Pinned answers: a change here reshuffles every deployment's tasks during a rolling upgrade.
GOLDEN = {
    ("31c6fd2b-2893-430b-90ff-d1adb8060585", 3): 0,
    ("5b0d7c1e-6a43-4d1f-9c7e-2f8a1b3c4d5e", 3): 1,
    ("9e8f7a6b-5c4d-4e3f-8a2b-1c0d9e8f7a6b", 3): 0,
    ("31c6fd2b-2893-430b-90ff-d1adb8060585", 7): 3,
}


@settings(max_examples=200)
@given(st.sets(st.text(min_size=1, max_size=40), max_size=60), st.integers(1, 12))
def test_shards_cover_every_task_exactly_once(task_ids: set[str], count: int) -> None:
    """Over all n shards, each task is selected by exactly one of them."""
    tasks = [TaskConfig(id=task_id) for task_id in sorted(task_ids)]
    picked = Counter(
        task.id for index in range(count) for task in Shard(index, count).select(tasks)
    )
    assert picked == Counter(task_ids)


def test_one_more_shard_moves_about_its_share_and_only_to_itself() -> None:
    """From 3 to 4 shards about a quarter of the tasks move, every one of them to the new shard."""
    before = {task_id: shard_of(task_id, 3) for task_id in TASK_IDS}
    after = {task_id: shard_of(task_id, 4) for task_id in TASK_IDS}
    moved = [task_id for task_id in TASK_IDS if before[task_id] != after[task_id]]
    assert 0.22 <= len(moved) / len(TASK_IDS) <= 0.28
    assert {after[task_id] for task_id in moved} == {3}


@pytest.mark.parametrize("count", [2, 3, 5, 8])
def test_shards_are_balanced(count: int) -> None:
    """Each shard gets 1/n of 4,000 tasks, within four standard deviations of a fair draw."""
    sizes = Counter(shard_of(task_id, count) for task_id in TASK_IDS)
    assert sorted(sizes) == list(range(count))
    expected = len(TASK_IDS) / count
    spread = 4 * math.sqrt(len(TASK_IDS) * (1 / count) * (1 - 1 / count))
    assert all(abs(size - expected) < spread for size in sizes.values()), sizes


def test_same_answer_in_another_process() -> None:
    """A process with a different hash seed assigns the same shards (no use of hash())."""
    sample = TASK_IDS[:50]
    code = (
        "import json, sys; from exporter.sharding import shard_of; "
        "print(json.dumps([shard_of(t, 5) for t in json.load(sys.stdin)]))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    result = subprocess.run(
        [sys.executable, "-c", code],
        input=json.dumps(sample),
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    assert json.loads(result.stdout) == [shard_of(task_id, 5) for task_id in sample]


@pytest.mark.parametrize(("task_id", "count"), list(GOLDEN))
def test_assignment_is_pinned(task_id: str, count: int) -> None:
    """The hash does not change between versions: replicas of mixed versions agree."""
    assert shard_of(task_id, count) == GOLDEN[(task_id, count)]


def test_ids_compare_ignoring_case_and_spaces() -> None:
    """An upper-case copy of an ID lands where the cloud's lower-case one does."""
    assert all(
        shard_of(t.upper(), 6) == shard_of(f" {t} ", 6) == shard_of(t, 6) for t in TASK_IDS[:200]
    )


def test_one_shard_owns_everything() -> None:
    """``0/1`` selects every task, in order."""
    tasks = [TaskConfig(id=task_id) for task_id in TASK_IDS[:10]]
    assert Shard(0, 1).select(tasks) == tuple(tasks)


@pytest.mark.parametrize(
    ("text", "hostname", "expected"),
    [
        ("0/3", None, Shard(0, 3)),
        ("2/3", None, Shard(2, 3)),
        (" 1/2 ", None, Shard(1, 2)),
        ("auto/3", "dcs-migration-exporter-2", Shard(2, 3)),
        ("auto/4", "exporter-0", Shard(0, 4)),
    ],
)
def test_parse_shard(text: str, hostname: str | None, expected: Shard) -> None:
    """INDEX/COUNT is 0-based; auto/COUNT reads the index from the host name's -K suffix."""
    assert parse_shard(text, hostname) == expected


@pytest.mark.parametrize(
    ("text", "hostname", "message"),
    [
        ("3/3", None, "0-based"),
        ("-1/3", None, "INDEX/COUNT"),
        ("1/0", None, "INDEX/COUNT"),
        ("1", None, "INDEX/COUNT"),
        ("a/3", None, "INDEX/COUNT"),
        ("auto/3", "exporter", "does not end in -K"),
        ("auto/3", "exporter-3", "only 3"),
    ],
)
def test_parse_shard_errors(text: str, hostname: str | None, message: str) -> None:
    """Bad shard specifications are refused with a message saying what is wrong."""
    with pytest.raises(ValueError, match=message):
        parse_shard(text, hostname)


def test_auto_reads_hostname_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without an explicit host name, auto uses HOSTNAME (the pod name in Kubernetes)."""
    monkeypatch.setenv("HOSTNAME", "dcs-exporter-1")
    assert parse_shard("auto/2") == Shard(1, 2)


async def test_daemons_with_three_shards_split_the_tasks(
    sim_server: SimServer, tmp_path: Path
) -> None:
    """Three daemons started with --shard 0/3, 1/3, 2/3 poll disjoint sets covering all tasks,
    also after a reload adds tasks."""
    ids = tuple(TASK_IDS[:12])
    for task_id in ids:
        sim_server.sim.add_task(task_id, f"t-{task_id[:4]}", body=dict(BASELINE_BODY))
    path = write_config(tmp_path, sim_server.url, ids[:9], extra=FAST)
    daemons = [
        Daemon(load_config(str(path)), lambda: load_config(str(path)), None, shard=Shard(i, 3))
        for i in range(3)
    ]
    try:
        for daemon in daemons:
            await daemon.start("127.0.0.1", 0)
        assert_partition([d.poller.task_ids for d in daemons if d.poller], ids[:9])
        write_config(tmp_path, sim_server.url, ids, extra=FAST)
        assert [await daemon.reload() for daemon in daemons] == [None, None, None]
        assert_partition([d.poller.task_ids for d in daemons if d.poller], ids)
        for index, daemon in enumerate(daemons):
            assert daemon.poller is not None
            await daemon.poller.poll_all_once()
            assert set(daemon.state.tasks) == {t for t in ids if shard_of(t, 3) == index}
    finally:
        for daemon in daemons:
            await daemon.close()
    polled = {r.task_id for r in sim_server.sim.requests if r.path.endswith("/stats")}
    assert polled == set(ids)


def assert_partition(parts: list[list[str]], everything: tuple[str, ...]) -> None:
    """``parts`` are disjoint and together hold exactly ``everything``."""
    assert len(parts) == 3
    assert sorted(task_id for part in parts for task_id in part) == sorted(everything)
