"""Checks of deploy/prometheus/rules.yml with the real promtool and by reading the rules."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

RULES_DIR = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
RULES = RULES_DIR / "rules.yml"
RULES_TEST = RULES_DIR / "rules_test.yml"

ALERTS = {
    "DcsMigrationOffsetStalled",
    "DcsMigrationFullSyncStuck",
    "DcsMigrationTaskFailed",
    "DcsMigrationPollFailing",
    "DcsMigrationExporterDown",
}
TASK_ALERTS = ALERTS - {"DcsMigrationExporterDown"}


def _rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def _alerts() -> dict[str, dict[str, Any]]:
    return {rule["alert"]: rule for rule in _rules() if "alert" in rule}


def test_promtool_check_rules(tool: Callable[[str], str]) -> None:
    """promtool accepts the rules file and counts all its recording and alerting rules."""
    result = subprocess.run(
        [tool("promtool"), "check", "rules", str(RULES)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in result.stdout


def test_promtool_unit_tests_pass(tool: Callable[[str], str]) -> None:
    """promtool test rules passes for C29, C33 (a)-(f), C34 and every alert's silent cases."""
    result = subprocess.run(
        [tool("promtool"), "test", "rules", str(RULES_TEST)],
        capture_output=True,
        text=True,
        cwd=RULES_DIR,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def _promtool_case(case: str, tool: Callable[[str], str], tmp_path: Path) -> str:
    """Run only the rules_test.yml groups of one CASES.md case; return promtool's output."""
    document = yaml.safe_load(RULES_TEST.read_text())
    document["tests"] = [t for t in document["tests"] if t["name"].split()[0].startswith(case)]
    assert document["tests"], f"rules_test.yml has no group for {case}"
    (tmp_path / "rules.yml").write_text(RULES.read_text())
    (tmp_path / "rules_test.yml").write_text(yaml.safe_dump(document, sort_keys=False))
    result = subprocess.run(
        [tool("promtool"), "test", "rules", "rules_test.yml"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_c29_failing_upstream_fires_poll_failing_not_the_stall(
    tool: Callable[[str], str], tmp_path: Path
) -> None:
    """C29: 4 good polls then 40 failures: PollFailing fires, OffsetStalled never does, whether
    the values are dropped or frozen."""
    assert "SUCCESS" in _promtool_case("C29", tool, tmp_path)


def test_c33_stall_alert_on_stuck_zero_oscillating_idle_absent_and_huge_offsets(
    tool: Callable[[str], str], tmp_path: Path
) -> None:
    """C33 (a)-(f): only a constant non-zero offset while migrating and polling fires, at ~15 min;
    the >2^53 false positive is pinned."""
    assert "SUCCESS" in _promtool_case("C33", tool, tmp_path)


def test_c34_full_sync_stuck_fires_for_stuck_tasks_not_the_incremental_phase(
    tool: Callable[[str], str], tmp_path: Path
) -> None:
    """C34: FullSyncStuck fires for the tasks held at 49 % and 0 %, not for 100 % incremental."""
    assert "SUCCESS" in _promtool_case("C34", tool, tmp_path)


def test_promtool_unit_tests_catch_a_broken_stall_rule(
    tool: Callable[[str], str], tmp_path: Path
) -> None:
    """A deriv()-based stall rule, which misfires on an oscillating offset, fails the unit tests."""
    broken = RULES.read_text().replace(
        "changes(dcs_migration_offset[10m]) == 0", "deriv(dcs_migration_offset[10m]) <= 0"
    )
    assert broken != RULES.read_text()
    (tmp_path / "rules.yml").write_text(broken)
    (tmp_path / "rules_test.yml").write_text(RULES_TEST.read_text())
    result = subprocess.run(
        [tool("promtool"), "test", "rules", "rules_test.yml"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 1
    assert "C33c oscillating offset never fires" in result.stdout + result.stderr


def test_the_five_alerts_exist() -> None:
    """The rules file defines exactly the documented alerts."""
    assert set(_alerts()) == ALERTS


@pytest.mark.parametrize("name", sorted(ALERTS))
def test_alert_has_severity_summary_description_and_runbook(name: str) -> None:
    """Every alert carries a severity label and summary, description and runbook annotations."""
    alert = _alerts()[name]
    assert alert["labels"]["severity"] in {"warning", "critical"}
    for key in ("summary", "description", "runbook"):
        assert alert["annotations"][key].strip(), key
    assert re.fullmatch(r"\d+[smh]", alert["for"])


@pytest.mark.parametrize("name", sorted(TASK_ALERTS))
def test_task_alert_summary_names_the_task(name: str) -> None:
    """A per-task alert's summary shows the task name and ID, and its expression yields task_name."""
    alert = _alerts()[name]
    assert "{{ $labels.task_name }}" in alert["annotations"]["summary"]
    assert "{{ $labels.task_id }}" in alert["annotations"]["summary"]
    assert "task_name" in alert["expr"]


def test_stall_rule_has_the_c33_shape() -> None:
    """The stall alert requires an unchanged non-zero offset, is_migrating 1 and a working poll."""
    alert = _alerts()["DcsMigrationOffsetStalled"]
    expr = " ".join(alert["expr"].split())
    assert "changes(dcs_migration_offset[10m]) == 0" in expr
    assert "dcs_migration_offset > 0" in expr
    assert "and on (job, instance, task_id) dcs_migration_migrating == 1" in expr
    assert "and on (job, instance, task_id) dcs_migration_up == 1" in expr
    assert alert["for"] == "5m"


def test_full_sync_rule_compares_the_ratio_not_percent() -> None:
    """The full-sync alert compares dcs_migration_progress_ratio with 1, not 100."""
    expr = " ".join(_alerts()["DcsMigrationFullSyncStuck"]["expr"].split())
    assert "dcs_migration_progress_ratio < 1 " in expr
    assert "100" not in expr


def test_every_alert_is_tested_firing_and_silent() -> None:
    """rules_test.yml has, for every alert, a check where it fires and one where it stays silent."""
    tests = yaml.safe_load(RULES_TEST.read_text())["tests"]
    firing: set[str] = set()
    silent: set[str] = set()
    for test in tests:
        for check in test.get("alert_rule_test", []):
            (firing if check["exp_alerts"] else silent).add(check["alertname"])
    assert firing == ALERTS
    assert silent == ALERTS


def test_yamllint_accepts_the_rules(tool: Callable[[str], str]) -> None:
    """yamllint finds no problem in the rules and their unit tests (long series lines allowed)."""
    for path, max_line in ((RULES, "{max: 160}"), (RULES_TEST, "disable")):
        config = (
            f"{{extends: default, rules: {{line-length: {max_line}, document-start: disable}}}}"
        )
        result = subprocess.run(
            [tool("yamllint"), "-s", "-d", config, str(path)], capture_output=True, text=True
        )
        assert result.returncode == 0, result.stdout + result.stderr
