"""Helpers shared by tests: CASES.md placeholders and configs that point at a simulator."""

from __future__ import annotations

import base64
import secrets
import ssl
import subprocess
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import bcrypt
from aiohttp import web
from aiohttp.test_utils import TestClient

from exporter.client import DcsClient
from exporter.config import AkSkAuth, CloudConfig, Config, PollingConfig, Secret, TaskConfig
from exporter.simulator import (
    DEMO_ACCESS_KEY,
    DEMO_DOMAIN,
    DEMO_SECRET_KEY,
    DEMO_USER,
    Simulator,
    start,
)
from exporter.throttle import Throttle
from exporter.web_config import WebConfig, load_web_config

TASK_A = "aaaaaaaa-0000-4000-8000-000000000001"
TASK_B = "aaaaaaaa-0000-4000-8000-000000000002"
TASK_C = "aaaaaaaa-0000-4000-8000-000000000003"
PROJ = "0000000000000000000000000000abcd"
BASELINE_BODY: dict[str, Any] = {
    "full_migration_progress": "45",
    "offset": "5000",
    "source_dbsize": "1000",
    "target_dbsize": "450",
    "target_input_kbps": "12.5",
    "target_ops": "300",
    "is_migrating": True,
}
# What the baseline body reads as, by API field, in the units of the metrics.
BASELINE_SAMPLES: dict[str, float | None] = {
    "full_migration_progress": 0.45,
    "offset": 5000.0,
    "source_dbsize": 1000.0,
    "target_dbsize": 450.0,
    "target_input_kbps": 12.5 * 1024,
    "target_ops": 300.0,
    "is_migrating": 1.0,
}
# The baseline as bare JSON numbers instead of the documented strings.
BASELINE_NUMBERS_BODY: dict[str, Any] = {
    "full_migration_progress": 45,
    "offset": 5000,
    "source_dbsize": 1000,
    "target_dbsize": 450,
    "target_input_kbps": 12.5,
    "target_ops": 300,
    "is_migrating": True,
}
# The task and the 200 example of the API reference page (dcs-api/ShowMigrationTaskStats.html), as
# published (bare numbers, not strings).
DOC_TASK = "31c6fd2b-2893-430b-90ff-d1adb8060585"
DOC_EXAMPLE_BODY: dict[str, Any] = {
    "full_migration_progress": 100,
    "offset": 100,
    "source_dbsize": 531221,
    "target_dbsize": 531211,
    "target_input_kbps": 50,
    "target_ops": 5300,
    "is_migrating": True,
}

Clients = Callable[[web.Application], Awaitable[TestClient[web.Request, web.Application]]]
"""The ``clients`` fixture: start a test client for an app (closed at the end of the test)."""


@dataclass
class SimServer:
    """A running simulator and the URL it answers on."""

    sim: Simulator
    url: str


@asynccontextmanager
async def serving(sim: Simulator, ssl_context: ssl.SSLContext | None = None) -> AsyncIterator[str]:
    """Serve ``sim`` on loopback for the block (over TLS with ``ssl_context``); yields its URL."""
    runner, url = await start(sim, ssl_context=ssl_context)
    try:
        yield url
    finally:
        await runner.cleanup()


@asynccontextmanager
async def baseline_sim_server(project_id: str = PROJ) -> AsyncIterator[SimServer]:
    """A simulator for ``project_id`` with TASK_A and TASK_B serving the baseline body."""
    sim = Simulator(project_id=project_id)
    sim.add_task(TASK_A, "task-a", body=dict(BASELINE_BODY))
    sim.add_task(TASK_B, "task-b", body=dict(BASELINE_BODY))
    async with serving(sim) as url:
        yield SimServer(sim, url)


def make_config(url: str, task_ids: tuple[str, ...] = (TASK_A, TASK_B), **polling: Any) -> Config:
    """A config with AK/SK auth against a simulator; ``polling`` overrides PollingConfig fields."""
    return Config(
        cloud=CloudConfig(
            region="eu-de", dcs_endpoint=url, iam_endpoint=f"{url}/v3", project_id=PROJ
        ),
        auth=AkSkAuth(access_key=DEMO_ACCESS_KEY, secret_key=Secret(value=DEMO_SECRET_KEY)),
        polling=replace(PollingConfig(interval=10.0, timeout=2.0), **polling),
        tasks=tuple(TaskConfig(id=task_id) for task_id in task_ids),
    )


def config_yaml(
    url: str,
    task_ids: tuple[str, ...] = (TASK_A, TASK_B),
    extra: str = "",
    *,
    project_id: str = PROJ,
    password_file: Path | None = None,
) -> str:
    """The same config as YAML text, for tests that start the daemon from a file.

    ``extra`` goes between auth and tasks (a polling section, say). With ``password_file`` the
    simulator's IAM user signs in with the password in that file instead of AK/SK.
    """
    auth: dict[str, object] = (
        {"access_key": DEMO_ACCESS_KEY, "secret_key": DEMO_SECRET_KEY}
        if password_file is None
        else {"username": DEMO_USER, "password_file": password_file, "domain_name": DEMO_DOMAIN}
    )
    tasks = "\n".join(f'  - id: "{task_id}"' for task_id in task_ids)
    text = f"""\
    cloud:
      region: eu-de
      project_id: "{project_id}"
      dcs_endpoint: {url}
      iam_endpoint: {url}/v3
    auth:
    """
    auth_lines = "".join(f"  {key}: {value}\n" for key, value in auth.items())
    return textwrap.dedent(text) + auth_lines + extra + f"tasks:\n{tasks}\n"


def write_config(directory: Path, url: str, *args: Any, **kwargs: Any) -> Path:
    """Write config_yaml(...) to directory/config.yaml and return its path."""
    path = directory / "config.yaml"
    path.write_text(config_yaml(url, *args, **kwargs), encoding="utf-8")
    return path


def make_client(session: aiohttp.ClientSession, config: Config) -> DcsClient:
    """A DcsClient for a config, with its own throttle."""
    return DcsClient(
        session,
        config.cloud,
        config.auth,
        timeout=config.polling.timeout,
        throttle=Throttle(config.polling.max_requests_per_second),
        token_refresh_margin=config.polling.token_refresh_margin,
    )


def basic_auth(user: str, password: str) -> dict[str, str]:
    """An Authorization header for HTTP basic auth."""
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def basic_auth_web_config(directory: Path, user: str, password: str) -> WebConfig:
    """A web config, loaded from ``directory/web.yml``, with one basic-auth user."""
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()  # cost 4: fast
    path = directory / "web.yml"
    path.write_text(f"basic_auth_users:\n  {user}: '{hashed}'\n")
    return load_web_config(str(path))


# ---- throwaway certificates (openssl CLI) -------------------------------------------------------


def run_openssl(cwd: Path, *args: str) -> None:
    """Run the openssl CLI in ``cwd``; a failure raises with its output."""
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_test_ca(cwd: Path, name: str) -> None:
    """A throwaway EC CA, ``name``.crt and ``name``.key in ``cwd``, valid for two days."""
    run_openssl(
        cwd,
        *("req", "-x509", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"),
        *("-nodes", "-keyout", f"{name}.key", "-out", f"{name}.crt", "-subj", f"/CN={name}"),
        *("-days", "2", "-addext", "basicConstraints=critical,CA:TRUE"),
        *("-addext", "keyUsage=critical,keyCertSign,cRLSign"),
    )


def make_test_leaf(cwd: Path, ca: str, name: str, extensions: str) -> None:
    """A certificate ``name``.crt/.key signed by the CA ``ca``, with extra x509v3 ``extensions``."""
    (cwd / f"{name}.ext").write_text(
        "basicConstraints=CA:FALSE\nsubjectKeyIdentifier=hash\n"
        f"authorityKeyIdentifier=keyid\n{extensions}\n"
    )
    run_openssl(
        cwd,
        *("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"),
        *("-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}"),
    )
    run_openssl(
        cwd,
        *("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key"),
        *("-set_serial", str(secrets.randbits(63)), "-days", "2", "-out", f"{name}.crt"),
        *("-extfile", f"{name}.ext"),
    )
