"""The command line: flag handling that needs no running daemon, and --demo --once end to end."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

import exporter.cli
from exporter.cli import format_listen_address, main, parse_listen_address
from exporter.config import Config
from exporter.simulator import DEMO_SECRET_KEY, DEMO_TASKS
from tests.support import config_yaml, write_config


@pytest.mark.parametrize(
    ("typed", "shown"),
    [(":9713", ":9713"), ("127.0.0.1:80", "127.0.0.1:80"), ("[::1]:9", "[::1]:9")],
)
def test_listen_address_round_trips(typed: str, shown: str) -> None:
    """A listen address is shown in messages the way it is written on the command line."""
    assert format_listen_address(parse_listen_address(typed)) == shown


def test_config_check_also_checks_the_web_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--config.check fails on a broken --web.config.file instead of passing and failing at start."""
    config = write_config(tmp_path, "http://127.0.0.1:1")
    web = tmp_path / "web.yml"
    web.write_text("basic_auth_userz: {}\n", encoding="utf-8")
    assert (
        main(["--config.check", "--config.file", str(config), "--web.config.file", str(web)]) == 1
    )
    captured = capsys.readouterr()
    assert "OK, 2 tasks" in captured.out
    assert "basic_auth_userz" in captured.err


def test_demo_once_prints_the_demo_tasks(capsys: pytest.CaptureFixture[str]) -> None:
    """--demo --once polls the simulator's tasks once and prints their metrics, exit 0."""
    assert main(["--demo", "--once"]) == 0
    families = {f.name: f for f in text_string_to_metric_families(capsys.readouterr().out)}
    up = {s.labels["task_id"]: s.value for s in families["dcs_migration_up"].samples}
    assert up == {task_id: 1.0 for task_id, _ in DEMO_TASKS}
    offsets = families["dcs_migration_offset"].samples
    assert {s.labels["task_id"] for s in offsets} == {task_id for task_id, _ in DEMO_TASKS}


def test_demo_says_that_it_ignores_a_config_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A --config.file given together with --demo is named as ignored, not silently dropped."""
    config = write_config(tmp_path, "http://127.0.0.1:1")
    assert main(["--demo", "--once", "--config.file", str(config)]) == 0
    assert f"--config.file {config} is ignored in demo mode" in capsys.readouterr().err


def test_a_secret_file_gone_before_start_is_named_not_blamed_on_the_port(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A secret file that disappears between reading the config and starting is reported as that
    file, not as "cannot serve on :9713"."""
    secret = tmp_path / "secret_key"
    secret.write_text("s3cret-value\n", encoding="utf-8")
    config = tmp_path / "config.yaml"
    config.write_text(
        config_yaml("http://127.0.0.1:1").replace(
            f"secret_key: {DEMO_SECRET_KEY}", f"secret_key_file: {secret}"
        ),
        encoding="utf-8",
    )
    real_load = exporter.cli.load_config

    def load_then_lose_the_secret(path: str) -> Config:
        loaded = real_load(path)
        secret.unlink()
        return loaded

    monkeypatch.setattr(exporter.cli, "load_config", load_then_lose_the_secret)
    assert main(["--config.file", str(config), "--web.listen-address", "127.0.0.1:0"]) == 1
    err = capsys.readouterr().err
    assert f"cannot read {secret}: No such file or directory" in err
    assert "cannot serve" not in err
