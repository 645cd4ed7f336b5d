"""Fixtures for end-to-end tests that run real processes (the daemon, Prometheus, Alertmanager).

- ``tool(name)``: path of an external tool (``.tools/bin``, the venv, then ``PATH``). A missing tool
  skips the test locally and fails it when the ``CI`` environment variable is set, so nothing
  silently skips in CI (``scripts/install-test-tools.sh`` installs them all).
- ``free_port()``: a free TCP port on 127.0.0.1.
- ``processes``: starts subprocesses with their output in files under ``tmp_path`` and stops each
  one (by its own PID) at teardown; ``processes.output(proc)`` returns what it printed.
- ``wait_until(check, timeout, what)``: polls ``check()`` until it returns a truthy value.
- ``start_exporter(*flags)``: runs ``python -m exporter`` on a free loopback port, waits for
  ``/metrics``, returns its base URL.
- ``start_prometheus(config)``: runs a real Prometheus (Debian package) with ``config`` (a dict for
  prometheus.yml) on a free loopback port with its TSDB in ``tmp_path``; returns a ``Prometheus``
  with ``query(expr)`` over ``/api/v1/query``.
- ``launch_exporter`` and ``launch_prometheus`` are those two starters as plain functions, for
  scripts outside pytest (``scripts/render_dashboard.py``).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.tools import ROOT, find_tool


@pytest.fixture
def tool() -> Callable[[str], str]:
    """Return a lookup that finds an external tool or skips (locally) / fails (under CI)."""
    return find_tool


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def free_port() -> Callable[[], int]:
    """Return a function that gives a currently free loopback port."""
    return _free_port


class Processes:
    """Subprocesses started by one test, stopped by PID at teardown."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self._started: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(
        self, name: str, argv: Sequence[str], *, env: dict[str, str] | None = None, **kw: Any
    ) -> subprocess.Popen[bytes]:
        log = self._directory / f"{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                list(argv),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})},
                start_new_session=True,
                **kw,
            )
        self._started.append((proc, log))
        return proc

    def output(self, proc: subprocess.Popen[bytes]) -> str:
        for started, log in self._started:
            if started is proc:
                return log.read_text(errors="replace")
        raise KeyError(proc)

    def all_output(self) -> str:
        return "\n".join(
            f"--- {log.name} (pid {proc.pid}, rc {proc.poll()}) ---\n"
            + log.read_text(errors="replace")[-4000:]
            for proc, log in self._started
        )

    def stop_all(self) -> None:
        for proc, _ in reversed(self._started):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc, _ in reversed(self._started):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    """Start subprocesses whose output lands in tmp_path; all are stopped at teardown."""
    procs = Processes(tmp_path)
    try:
        yield procs
    finally:
        procs.stop_all()


def _wait_until(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            result = check()
        except AssertionError:
            raise
        except Exception as exc:  # the thing we wait for may not accept connections yet
            last_error = exc
            result = None
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}: {last_error!r}")
        time.sleep(interval)


@pytest.fixture
def wait_until() -> Callable[..., Any]:
    """Return a poller: wait_until(check, timeout, what) -> check()'s first truthy result."""
    return _wait_until


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """GET ``url``; returns (status, body) for any HTTP status, raises on connection errors."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def launch_exporter(processes: Processes, *flags: str) -> tuple[str, subprocess.Popen[bytes]]:
    """Run the real daemon (``python -m exporter FLAGS``) on a free loopback port under
    ``processes``; wait for ``/metrics``; return its base URL and process."""
    port = _free_port()
    proc = processes.start(
        "exporter",
        [sys.executable, "-m", "exporter", *flags, "--web.listen-address", f"127.0.0.1:{port}"],
        cwd=ROOT,
    )
    url = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"exporter exited:\n{processes.output(proc)}")
        return http_get(f"{url}/metrics")[0] == 200

    try:
        _wait_until(answers, 20, "the exporter's /metrics")
    except AssertionError as error:
        raise AssertionError(f"{error}\n{processes.all_output()}") from None
    return url, proc


@pytest.fixture
def start_exporter(processes: Processes) -> Callable[..., tuple[str, subprocess.Popen[bytes]]]:
    """Return a starter for the real daemon (``python -m exporter FLAGS``) on a loopback port."""

    def start(*flags: str) -> tuple[str, subprocess.Popen[bytes]]:
        return launch_exporter(processes, *flags)

    return start


class Prometheus:
    """A running Prometheus reachable over its HTTP API."""

    def __init__(self, url: str, proc: subprocess.Popen[bytes]) -> None:
        self.url = url
        self.proc = proc

    def api(self, path: str, **params: str) -> tuple[int, dict[str, Any]]:
        """GET /api/v1/<path> with query parameters; returns (HTTP status, decoded JSON)."""
        query = urllib.parse.urlencode(params)
        status, body = http_get(f"{self.url}/api/v1/{path}?{query}")
        return status, json.loads(body)

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Run an instant query that must succeed; return its result list."""
        status, body = self.api("query", query=expr)
        assert status == 200 and body["status"] == "success", f"{expr}: {status} {body}"
        result: list[dict[str, Any]] = body["data"]["result"]
        return result


def launch_prometheus(
    processes: Processes,
    directory: Path,
    config: dict[str, Any],
    *,
    prometheus: str,
    promtool: str,
) -> Prometheus:
    """Run a real Prometheus under ``processes`` with ``config`` (prometheus.yml content, checked
    by promtool) on a free loopback port, its config and TSDB in ``directory``; wait until ready."""
    config_file = directory / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    check = subprocess.run(
        [promtool, "check", "config", str(config_file)], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    port = _free_port()
    proc = processes.start(
        "prometheus",
        [
            prometheus,
            f"--config.file={config_file}",
            f"--storage.tsdb.path={directory / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--web.enable-lifecycle",
        ],
    )
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"prometheus exited:\n{processes.output(proc)}")
        return http_get(f"{url}/-/ready")[0] == 200

    _wait_until(ready, 20, "Prometheus /-/ready")
    return Prometheus(url, proc)


@pytest.fixture
def start_prometheus(
    processes: Processes, tool: Callable[[str], str], tmp_path: Path
) -> Callable[[dict[str, Any]], Prometheus]:
    """Return a starter for a real Prometheus with the given prometheus.yml content."""

    def start(config: dict[str, Any]) -> Prometheus:
        return launch_prometheus(
            processes, tmp_path, config, prometheus=tool("prometheus"), promtool=tool("promtool")
        )

    return start
