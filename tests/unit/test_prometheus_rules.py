"""Prometheus rules: promtool checks and unit tests, and every rule covered by a test."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import yaml

from powerd.daemon import EFFICIENCY_WINDOW_TICKS
from tests.conftest import require_program

RULES_DIR = Path(__file__).resolve().parents[2] / "config" / "prometheus"
RULES = RULES_DIR / "powerd.rules.yml"
RULES_TEST = RULES_DIR / "powerd.rules.test.yml"
DASHBOARD = RULES_DIR.parent / "grafana" / "powerd.json"


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def all_rules() -> list[dict[str, Any]]:
    return [rule for group in load(RULES)["groups"] for rule in group["rules"]]


def promtool() -> str:
    return require_program("promtool", "prometheus")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args],
        cwd=RULES_DIR,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_promtool_check_rules() -> None:
    result = run("check", "rules", RULES.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(all_rules())} rules found" in result.stdout


def test_promtool_test_rules() -> None:
    result = run("test", "rules", RULES_TEST.name)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_severity_summary_and_description() -> None:
    alerts = [rule for rule in all_rules() if "alert" in rule]
    assert {rule["alert"] for rule in alerts} >= {
        "PowerdSourceDown",
        "PowerdGpuLeftThrottled",
        "PowerdSloAttainmentLow",
        "PowerdRestoreFailed",
    }
    for rule in alerts:
        assert rule["alert"].startswith("Powerd"), rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        assert rule["annotations"]["description"], rule["alert"]


def test_every_rule_is_exercised_by_the_unit_tests() -> None:
    tests = load(RULES_TEST)
    assert tests["rule_files"] == [RULES.name]
    firing = set()
    queried = ""
    for case in tests["tests"]:
        for alert_test in case.get("alert_rule_test", []):
            if alert_test["exp_alerts"]:
                firing.add(alert_test["alertname"])
        for expr_test in case.get("promql_expr_test", []):
            queried += expr_test["expr"] + "\n"
    for rule in all_rules():
        if "alert" in rule:
            assert rule["alert"] in firing, f"no test sees {rule['alert']} fire"
        else:
            assert rule["record"] in queried, f"no test queries {rule['record']}"


def test_recording_rule_names_follow_the_convention() -> None:
    for rule in all_rules():
        if "record" in rule:
            level, metric, operation = rule["record"].split(":")
            assert level in ("instance", "group")
            assert metric.startswith("powerd_")
            assert operation == "rate5m"


def test_the_window_said_of_the_group_gauges_is_the_daemons() -> None:
    header = " ".join(
        RULES.read_text(encoding="utf-8").split("\ngroups:")[0].replace("#", " ").split()
    )
    assert f"over its last {EFFICIENCY_WINDOW_TICKS} ticks" in header
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    legends = {
        target["expr"].split("{")[0]: target.get("legendFormat", "")
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    }
    assert (
        legends["powerd_group_tokens_per_joule"]
        == f"{{{{group}}}} ({EFFICIENCY_WINDOW_TICKS} ticks)"
    )
