"""The Dockerfile: hadolint, its hardening by inspection, and its HEALTHCHECK command for real.

Building and running the image needs a Docker daemon and a base image: ``scripts/image-smoke.sh``
does that, as a step of ``.ci/run`` after the tests (docs/DEPLOY.md).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            result.append((word.upper(), rest.strip()))
    return result


def _final_stage() -> list[tuple[str, str]]:
    instructions = _instructions()
    last_from = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    return instructions[last_from:]


def _healthcheck_python() -> str:
    """The Python one-liner of the HEALTHCHECK."""
    (args,) = [rest for word, rest in _instructions() if word == "HEALTHCHECK"]
    exec_form = json.loads(args[args.index("CMD") + 3 :].strip())
    assert exec_form[:2] == ["python", "-c"]
    code: str = exec_form[2]
    return code


def test_hadolint_is_clean(tool: Callable[[str], str]) -> None:
    """hadolint reports nothing at its default threshold."""
    result = subprocess.run([tool("hadolint"), str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""


def test_multi_stage_on_python_slim() -> None:
    """Two stages, both on python:3.11-slim; the runtime copies only the built virtualenv."""
    instructions = _instructions()
    assert ("ARG", "PYTHON_IMAGE=python:3.11-slim") in instructions
    froms = [rest for word, rest in instructions if word == "FROM"]
    assert froms == ["${PYTHON_IMAGE} AS build", "${PYTHON_IMAGE}"]
    copies = [rest for word, rest in _final_stage() if word == "COPY"]
    assert copies == ["--from=build /opt/dcs-migration-exporter /opt/dcs-migration-exporter"]


def test_runtime_is_non_root_and_read_only_friendly() -> None:
    """USER is a numeric non-root UID:GID; nothing at run time needs to write bytecode."""
    final = _final_stage()
    (user,) = [rest for word, rest in final if word == "USER"]
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) > 0 and gid.isdigit()
    env = " ".join(rest for word, rest in final if word == "ENV")
    assert "PYTHONDONTWRITEBYTECODE=1" in env
    assert "compileall" in DOCKERFILE.read_text()


def test_port_entrypoint_and_config_path() -> None:
    """EXPOSE 9713, the console script as entrypoint, config at /etc/dcs-migration-exporter."""
    final = dict(_final_stage())
    assert final["EXPOSE"] == "9713"
    assert json.loads(final["ENTRYPOINT"]) == ["dcs-migration-exporter"]
    assert json.loads(final["CMD"]) == ["--config.file=/etc/dcs-migration-exporter/config.yaml"]


def test_dockerignore_sends_only_the_package() -> None:
    """The build context excludes everything but pyproject.toml, README.md and exporter/."""
    lines = [
        line
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert lines[0] == "*"
    assert {line for line in lines if line.startswith("!")} == {
        "!pyproject.toml",
        "!README.md",
        "!exporter/",
    }


def test_healthcheck_command_follows_healthz(free_port: Callable[[], int], tmp_path: Path) -> None:
    """The HEALTHCHECK one-liner exits 0 against a live daemon's /healthz and 1 with none."""
    code = _healthcheck_python()
    env_lines = " ".join(rest for word, rest in _final_stage() if word == "ENV")
    assert "DCS_EXPORTER_HEALTHCHECK_URL=http://127.0.0.1:9713/healthz" in env_lines
    port = free_port()
    # The image's default URL names 9713; the variable moves the probe, as a user would.
    probe_env = {**os.environ, "DCS_EXPORTER_HEALTHCHECK_URL": f"http://127.0.0.1:{port}/healthz"}
    down = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, timeout=30, env=probe_env
    )
    assert down.returncode == 1
    log = (tmp_path / "exporter.log").open("wb")
    daemon = subprocess.Popen(
        [sys.executable, "-m", "exporter", "--demo", "--web.listen-address", f"127.0.0.1:{port}"],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail((tmp_path / "exporter.log").read_text())
                time.sleep(0.2)
        up = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, timeout=30, env=probe_env
        )
        assert up.returncode == 0, up.stderr
    finally:
        daemon.terminate()
        daemon.wait(timeout=10)
        log.close()


@pytest.fixture
def free_port() -> Callable[[], int]:
    """Return a function that gives a currently free loopback port."""

    def pick() -> int:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
            return port

    return pick
