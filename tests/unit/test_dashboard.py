"""Grafana dashboard and rules use only metrics the exporter actually exposes."""

from __future__ import annotations

import json
import math
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from powerd.config import MetricsConfig
from powerd.exporter import Exporter
from tests.unit.snapshots import BUILD_INFO, full_snapshot
from tests.unit.test_prometheus_rules import promtool

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "config" / "grafana" / "powerd.json"
RULES = ROOT / "config" / "prometheus" / "powerd.rules.yml"

# Metrics of other exporters the expressions may use.
EXTERNAL = {"up"}
_KEYWORDS = {
    "and",
    "or",
    "unless",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "offset",
    "bool",
    "inf",
    "nan",
}


def metric_names(expr: str) -> set[str]:
    """Metric names referenced by a PromQL (or Grafana label_values) expression."""
    text = re.sub(r"label_values\(\s*([^,]+?)\s*,\s*\w+\s*\)", r"\1", expr)
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', "", text)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names = set()
    for match in re.finditer(r"(?<![\w.$:])[A-Za-z_:][\w:]*", text):
        is_call = text[match.end() :].lstrip().startswith("(")
        if not is_call and match.group(0) not in _KEYWORDS:
            names.add(match.group(0))
    return names


def test_metric_names_extraction() -> None:
    assert metric_names(
        'sum by (le, instance) (rate(powerd_loop_duration_seconds_bucket{instance=~"$i"}'
        "[$__rate_interval])) / on (job) group_left (x) a:b:c offset 5m > bool 1e6"
    ) == {"powerd_loop_duration_seconds_bucket", "a:b:c"}
    assert metric_names('label_values(powerd_build_info{x="y"}, instance)') == {"powerd_build_info"}


def exposed_names() -> set[str]:
    exporter = Exporter(MetricsConfig(), build_info=BUILD_INFO)
    exporter.publish(full_snapshot())
    return {
        sample.name
        for family in text_string_to_metric_families(exporter.render().decode())
        for sample in family.samples
    }


def rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    return [rule for group in data["groups"] for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def dashboard_exprs(data: dict[str, Any]) -> Iterator[str]:
    for panel in data["panels"]:
        for target in panel.get("targets", []):
            yield target["expr"]
    for variable in data["templating"]["list"]:
        query = variable["query"]
        yield query["query"] if isinstance(query, dict) else query


def unknown_names(exprs: list[str], known: set[str]) -> list[str]:
    return sorted({name for expr in exprs for name in metric_names(expr)} - known)


def test_rules_and_dashboard_use_only_exposed_metrics() -> None:
    recorded = {rule["record"] for rule in rules() if "record" in rule}
    known = exposed_names() | EXTERNAL | recorded
    exprs = [rule["expr"] for rule in rules()] + list(dashboard_exprs(dashboard()))
    assert unknown_names(exprs, known) == []
    used = {name for expr in exprs for name in metric_names(expr)}
    assert {
        "powerd_gpu_energy_joules_total",
        "powerd_server_generation_tokens_total",
        "powerd_gpu_power_watts",
        "powerd_gpu_clock_limit_hertz",
        "powerd_group_slo_attainment_ratio",
        "instance:powerd_tokens_per_joule:rate5m",
    } <= used


def test_a_misspelt_or_missing_metric_is_caught() -> None:
    known = exposed_names() | EXTERNAL
    exprs = [
        "rate(powerd_gpu_energy_joule_total[5m])",
        "powerd_server_ttft_seconds > 1",
        "instance:powerd_tokens_per_joule:rate5m",
        "up == 0",
    ]
    assert unknown_names(exprs, known) == [
        "instance:powerd_tokens_per_joule:rate5m",
        "powerd_gpu_energy_joule_total",
        "powerd_server_ttft_seconds",
    ]


def test_dashboard_panels_lie_on_the_grid_without_overlapping() -> None:
    cells: dict[tuple[int, int], int] = {}
    for panel in dashboard()["panels"]:
        grid = panel["gridPos"]
        assert all(type(grid[key]) is int for key in ("x", "y", "w", "h")), panel["title"]
        assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] >= 0 and grid["x"] + grid["w"] <= 24
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, (panel["title"], cells[(x, y)])
                cells[(x, y)] = panel["id"]


def test_dashboard_uses_the_datasource_input() -> None:
    data = dashboard()
    assert [i["name"] for i in data["__inputs"]] == ["DS_PROMETHEUS"]
    assert data["__inputs"][0]["pluginId"] == "prometheus"
    ids = []
    for panel in data["panels"]:
        ids.append(panel["id"])
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"])
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}"
    assert len(ids) == len(set(ids))
    titles = " ".join(panel["title"].lower() for panel in data["panels"])
    for topic in ("tokens per joule", "power against limit", "clock", "slo", "tokens per second"):
        assert topic in titles, topic


def panel(data: dict[str, Any], title: str) -> dict[str, Any]:
    (found,) = [p for p in data["panels"] if p["title"] == title]
    return found


def _promql_round(value: float, to_nearest: float) -> float:
    """PromQL's round(value, to_nearest), to compare with what promtool computes."""
    inverse = 1.0 / to_nearest
    return math.floor(value * inverse + 0.5) / inverse


def test_cost_stats_price_each_tick_at_the_price_then_in_force(tmp_path: Path) -> None:
    """The cost stats' PromQL, run by promtool over an hour in which the price rises from 0.12
    to 0.30 per kWh: 1000 J/s of GPU energy at PUE 1.3 and 4000 tokens/s, with the counters the
    daemon keeps (each minute's energy x PUE / 3.6e6 x the price of that minute). The hour's
    cost is the sum of its minutes' costs, not the hour's energy at the last price."""
    data = dashboard()
    node = 'job="powerd",instance="n1:9863"'
    group = f'{node},group="s",server="s",model_name="m"'
    kwh_per_min = 60_000 * 1.3 / 3.6e6
    low, high = kwh_per_min * 0.12, kwh_per_min * 0.30
    tokens_per_min = 240_000
    # 1-minute samples from 0 to 120m; the price rises after the sample at 90m. The window of
    # the hour ending at 120m30s holds the samples from 61m to 120m: 29 increments at the low
    # price and 30 at the high one; both counters are extrapolated alike to the hour.
    increments = 29 * low + 30 * high
    per_million = increments / (59 * tokens_per_min) * 1e6
    total = increments * 60 / 59
    exprs = {
        "Cost per million tokens": (1e-6, per_million),
        "Electricity cost": (1e-6, total),
    }
    tests = []
    for title, (to_nearest, expected) in exprs.items():
        (target,) = panel(data, title)["targets"]
        expr = target["expr"].replace('instance=~"$instance"', 'instance=~".+"')
        expr = expr.replace("$__range", "1h")
        tests.append(
            {
                "expr": f"round({expr}, {to_nearest})",
                "eval_time": "120m30s",
                "exp_samples": [
                    {
                        "labels": f'{{{node},currency="EUR"}}',
                        "value": _promql_round(expected, to_nearest),
                    }
                ],
            }
        )
    series = {
        f'powerd_gpu_energy_joules_total{{{node},gpu="0",UUID="GPU-a"}}': "0+60000x120",
        f'powerd_server_generation_tokens_total{{{node},server="s"}}': f"0+{tokens_per_min}x120",
        # A server observed only (no GPUs known): its tokens cost nothing powerd counts, so
        # they must not dilute the cost of those it does.
        f'powerd_server_generation_tokens_total{{{node},server="o"}}': f"0+{tokens_per_min}x120",
        f'powerd_group_energy_cost_total{{{group},currency="EUR"}}': (
            f"0+{low!r}x90 {90 * low + high!r}+{high!r}x29"
        ),
        f'powerd_group_energy_credit_total{{{group},currency="EUR"}}': "0x120",
    }
    test_file = tmp_path / "cost.test.yml"
    test_file.write_text(
        yaml.safe_dump(
            {
                "rule_files": [str(RULES)],
                "evaluation_interval": "1m",
                "tests": [
                    {
                        "interval": "1m",
                        "input_series": [{"series": k, "values": v} for k, v in series.items()],
                        "promql_expr_test": tests,
                    }
                ],
            }
        ),
        encoding="utf-8",
    )
    result = subprocess.run(
        [promtool(), "test", "rules", str(test_file)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # What pricing the hour's energy at the price in force at its end would have shown.
    at_last_price = kwh_per_min * 0.30 / tokens_per_min * 1e6
    assert per_million < 0.8 * at_last_price
