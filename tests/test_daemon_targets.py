"""Several targets in one daemon: two simulators with their own projects and credentials, polled
by one exporter into one exposition, with per-target reload (config ``targets:``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest

from exporter.cli import run_once
from exporter.config import load_config
from exporter.daemon import Daemon
from exporter.simulator import DEMO_DOMAIN, DEMO_PASSWORD, DEMO_USER, Simulator
from tests.support import BASELINE_BODY, PROJ, TASK_A, TASK_B, TASK_C, serving
from tests.test_daemon import FAST, Running
from tests.test_poller import Scrape

OTHER_PROJ = "0000000000000000000000000000ef01"
OTHER_AK, OTHER_SK = "AKOTHERPROJECT", "sk-other-project"


def target_yaml(name: str, url: str, project_id: str, auth: dict[str, str], tasks: str) -> str:
    """One entry of ``targets:``, indented under it."""
    auth_lines = "".join(f"      {key}: {value}\n" for key, value in auth.items())
    task_lines = "".join(f'      - id: "{task_id}"\n' for task_id in tasks.split())
    return (
        f"  - name: {name}\n"
        f'    cloud:\n      region: eu-de\n      project_id: "{project_id}"\n'
        f"      dcs_endpoint: {url}\n      iam_endpoint: {url}/v3\n"
        f"    auth:\n{auth_lines}    tasks:\n{task_lines}"
    )


class TwoProjects:
    """Two simulators: project PROJ (TASK_A, TASK_B, demo AK/SK) and OTHER_PROJ (TASK_C, its
    own AK/SK and the demo IAM user)."""

    def __init__(self, first: str, second: str, directory: Path) -> None:
        self.first, self.second = first, second
        self.path = directory / "config.yaml"
        self.password_file = directory / "password"
        self.password_file.write_text(DEMO_PASSWORD + "\n")

    def write(self, *entries: str, polling: str = FAST) -> Path:
        """Write a config with these target entries."""
        self.path.write_text(polling + "targets:\n" + "".join(entries))
        return self.path

    def one(self, tasks: str = f"{TASK_A} {TASK_B}") -> str:
        """The entry for the first project, with the demo access key."""
        from exporter.simulator import DEMO_ACCESS_KEY, DEMO_SECRET_KEY

        auth = {"access_key": DEMO_ACCESS_KEY, "secret_key": DEMO_SECRET_KEY}
        return target_yaml("one", self.first, PROJ, auth, tasks)

    def two(self, secret_key: str = OTHER_SK) -> str:
        """The entry for the second project, signing with its access key."""
        auth = {"access_key": OTHER_AK, "secret_key": secret_key}
        return target_yaml("two", self.second, OTHER_PROJ, auth, TASK_C)

    def two_by_password(self) -> str:
        """The entry for the second project, signing in as the IAM user."""
        auth = {
            "username": DEMO_USER,
            "password_file": str(self.password_file),
            "domain_name": DEMO_DOMAIN,
        }
        return target_yaml("two", self.second, OTHER_PROJ, auth, TASK_C)


@asynccontextmanager
async def two_projects(directory: Path) -> AsyncIterator[tuple[TwoProjects, Simulator]]:
    """Serve both simulators for the block; yields the config writer and the second simulator."""
    first = Simulator(project_id=PROJ)
    first.add_task(TASK_A, "task-a", body=dict(BASELINE_BODY))
    first.add_task(TASK_B, "task-b", body=dict(BASELINE_BODY))
    second = Simulator(project_id=OTHER_PROJ, credentials={OTHER_AK: OTHER_SK})
    second.add_task(TASK_C, "task-c", body={**BASELINE_BODY, "offset": "7"})
    async with serving(first) as first_url, serving(second) as second_url:
        yield TwoProjects(first_url, second_url, directory), second


@asynccontextmanager
async def daemon_for(path: Path) -> AsyncIterator[Running]:
    """A daemon started from ``path`` on a free port (reloads re-read it)."""
    daemon = Daemon(load_config(str(path)), lambda: load_config(str(path)), None)
    async with aiohttp.ClientSession() as session:
        try:
            await daemon.start("127.0.0.1", 0)
            yield Running(daemon, session)
        finally:
            await daemon.close()


def up_values(metrics: Scrape) -> dict[str, float | None]:
    """dcs_migration_up of the three tasks."""
    return {t: metrics.get("dcs_migration_up", task_id=t) for t in (TASK_A, TASK_B, TASK_C)}


async def test_one_daemon_exports_both_projects_and_a_wrong_key_fails_only_its_tasks(
    tmp_path: Path,
) -> None:
    """Tasks of both projects are in one exposition; the target with a wrong secret key has its
    task up 0 (auth) while the other's are up 1, and a reload with the right key brings it up."""
    async with two_projects(tmp_path) as (projects, _):
        path = projects.write(projects.one(), projects.two(secret_key="wrong-secret"))
        async with daemon_for(path) as running:
            metrics = await running.until(
                lambda m: up_values(m) == {TASK_A: 1, TASK_B: 1, TASK_C: 0}
            )
            assert metrics.get("dcs_migration_poll_errors_total", task_id=TASK_C, reason="auth")
            assert metrics.get("dcs_migration_offset", task_id=TASK_A) == 5000
            assert [run.target.name for run in running.daemon.runs.values()] == ["one", "two"]

            projects.write(projects.one(), projects.two())
            assert (await running.reload())[0] == 200
            metrics = await running.until(lambda m: up_values(m)[TASK_C] == 1)
            assert metrics.get("dcs_migration_offset", task_id=TASK_C) == 7
            assert up_values(metrics)[TASK_A] == 1


async def test_reload_without_a_target_drops_its_series_and_keeps_the_other(
    tmp_path: Path,
) -> None:
    """Removing a target at reload removes every series of its tasks; the remaining target keeps
    its poller (same client) and its tasks keep being polled."""
    async with two_projects(tmp_path) as (projects, _):
        path = projects.write(projects.one(), projects.two())
        async with daemon_for(path) as running:
            await running.until(lambda m: up_values(m) == {TASK_A: 1, TASK_B: 1, TASK_C: 1})
            kept = running.daemon.runs["two"].poller
            projects.write(projects.two())
            assert (await running.reload())[0] == 200
            metrics = await running.metrics()
            assert not metrics.series(task_id=TASK_A) and not metrics.series(task_id=TASK_B)
            assert list(running.daemon.runs) == ["two"]
            assert running.daemon.runs["two"].poller is kept
            polls = await running.polls(TASK_C)
            await running.until(
                lambda m: (m.get("dcs_migration_polls_total", task_id=TASK_C) or 0) > polls
            )


async def test_token_refreshes_are_summed_over_clients_and_never_go_back(
    tmp_path: Path,
) -> None:
    """With one target signing in by password, the token counter counts its fetch; a reload that
    replaces every client (new polling settings) adds the new client's fetch instead of starting
    again from it, and the skew gauge is absent while no target measured one."""
    async with two_projects(tmp_path) as (projects, second):
        path = projects.write(projects.one(), projects.two_by_password())
        async with daemon_for(path) as running:
            metrics = await running.until(lambda m: up_values(m)[TASK_C] == 1)
            assert metrics.get("dcs_migration_token_refreshes_total") == 1
            assert not metrics.series("dcs_migration_clock_skew_seconds")
            slower = FAST.replace("interval: 200ms", "interval: 300ms")
            projects.write(projects.one(), projects.two_by_password(), polling=slower)
            assert (await running.reload())[0] == 200
            await running.until(lambda m: m.get("dcs_migration_token_refreshes_total") == 2)
            assert second.token_requests == 2


async def test_once_polls_every_target(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--once with targets prints the tasks of both projects and exits 1 when one target's
    credentials are wrong, 0 when both work."""
    async with two_projects(tmp_path) as (projects, _):
        path = projects.write(projects.one(), projects.two(secret_key="wrong-secret"))
        assert await run_once(load_config(str(path))) == 1
        metrics = Scrape(capsys.readouterr().out)
        assert up_values(metrics) == {TASK_A: 1, TASK_B: 1, TASK_C: 0}
        path = projects.write(projects.one(), projects.two())
        assert await run_once(load_config(str(path))) == 0
        assert up_values(Scrape(capsys.readouterr().out)) == {TASK_A: 1, TASK_B: 1, TASK_C: 1}
