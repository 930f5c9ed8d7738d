"""`powerd bench` on a short run: every policy, ground truth, JSON schema, determinism."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from powerd.bench import measure
from powerd.bench.options import OracleOptions
from powerd.bench.policies import DefaultPolicy, PowerdPolicy
from powerd.bench.report import format_table, to_json
from powerd.bench.results import BenchResult
from powerd.bench.runner import (
    ATTAINMENT_TOLERANCE,
    BenchSetup,
    Job,
    build_template_node,
    meets_slo,
    run_bench,
    run_job_records,
    run_policy,
)
from powerd.config import NAMED_SERVER_KINDS, SloConfig
from powerd.model import DECISION_REASONS

SETUP = BenchSetup(
    trace="diurnal",
    duration_s=150.0,
    gpus=2,
    tp=1,
    peak_load=0.8,
    slo=SloConfig(ttft_s=2.0, itl_s=0.1),
    workers=1,
    oracle=OracleOptions(window_s=30.0, tail_s=10.0),
    zeus_warmup_s=1.0,
    zeus_profile_s=2.0,
)


@pytest.fixture(scope="module")
def bench() -> BenchResult:
    return run_bench(SETUP)


def test_json_schema_is_exactly_the_documented_one(bench: BenchResult) -> None:
    doc = json.loads(json.dumps(to_json(bench), allow_nan=False))
    assert set(doc) == {
        "trace", "gpu_model", "model", "gpus", "duration_s", "slo", "policies",
        "powerd_share_of_oracle_saving",
    }  # fmt: skip
    assert isinstance(doc["trace"], str) and doc["trace"] == "diurnal"
    assert doc["gpu_model"] == "h100-sxm" and doc["model"] == "llama-3.1-8b"
    assert doc["gpus"] == 2 and doc["duration_s"] == 150.0
    assert doc["slo"] == {"ttft_p95_s": 2.0, "itl_p95_s": 0.1}
    assert list(doc["policies"]) == [
        "default", "static-power-cap", "util-governor", "static-clock", "slo-lowest-clock",
        "powerd", "oracle",
    ]  # fmt: skip
    keys = {
        "energy_j", "generated_tokens", "tokens_per_joule", "slo_attainment", "ttft_p95_s",
        "itl_p95_s", "mean_power_w",
    }  # fmt: skip
    for name, entry in doc["policies"].items():
        assert set(entry) == keys, name
        assert isinstance(entry["generated_tokens"], int)
        for key in keys - {"generated_tokens"}:
            assert isinstance(entry[key], float), (name, key)
        assert entry["energy_j"] > 0 and entry["generated_tokens"] > 0
        assert entry["tokens_per_joule"] == pytest.approx(
            entry["generated_tokens"] / entry["energy_j"]
        )
        assert entry["mean_power_w"] == pytest.approx(entry["energy_j"] / 150.0)
        assert 0.0 <= entry["slo_attainment"] <= 1.0
    share = doc["powerd_share_of_oracle_saving"]
    assert isinstance(share, float)
    p = doc["policies"]
    expected = (p["default"]["energy_j"] - p["powerd"]["energy_j"]) / (
        p["default"]["energy_j"] - p["oracle"]["energy_j"]
    )
    assert share == pytest.approx(expected)


def test_default_runs_at_maximum_clocks(bench: BenchResult) -> None:
    series = bench.policies["default"].series
    f_max = 1980
    assert len(series.time_s) == 150
    # Unlocked with a context open the clock sits at f_max; only the power cap may briefly
    # pull it down during large prefills.
    assert np.median(series.clock_mhz) == pytest.approx(f_max, abs=1)
    assert np.mean(series.clock_mhz) > 0.97 * f_max
    node = build_template_node(SETUP)
    run_policy(replace(SETUP, duration_s=20.0), node, DefaultPolicy())
    plant = node.plant
    for i in range(plant.n_gpus):
        assert plant.locked_clocks(i) is None
        assert plant.power_limit_mw(i) == plant.profile.power_limit_default_w * 1000


def test_oracle_uses_no_more_energy_than_any_policy_meeting_the_slo(bench: BenchResult) -> None:
    default = bench.policies["default"]
    oracle = bench.policies["oracle"]
    assert meets_slo(oracle, default)
    contenders = [p for p in bench.policies.values() if p.name != "oracle"]
    contenders += list(bench.sweep.values())
    meeting = [p for p in contenders if meets_slo(p, default)]
    assert default in meeting
    for p in meeting:
        assert oracle.energy_j <= p.energy_j, p.name
    assert oracle.energy_j < 0.9 * default.energy_j


def test_static_clock_is_the_least_energy_sweep_point_meeting_the_slo(bench: BenchResult) -> None:
    default = bench.policies["default"]
    static = bench.policies["static-clock"]
    assert static.slo_attainment >= default.slo_attainment - ATTAINMENT_TOLERANCE
    feasible = [r for r in bench.sweep.values() if meets_slo(r, default)]
    assert static.energy_j == min(r.energy_j for r in feasible)
    assert len(bench.sweep) >= 8
    # The sweep found SLO-breaking clocks too, so the SLO constrained the choice.
    assert any(not meets_slo(r, default) for r in bench.sweep.values())
    # The hindsight clock is the table's: its swept neighbours are the table's next steps.
    best = next(c for c, r in bench.sweep.items() if r.energy_j == static.energy_j)
    table = [int(c) for c in measure.clock_table_mhz(build_template_node(SETUP))]
    swept = sorted(bench.sweep)
    k = swept.index(best)
    for neighbour in swept[max(k - 1, 0) : k] + swept[k + 1 : k + 2]:
        assert abs(table.index(neighbour) - table.index(best)) == 1, (best, swept)


def test_slo_lowest_clock_stays_at_or_above_powerds_floor(bench: BenchResult) -> None:
    """Below half f_max the plant over-predicts power: the baseline is not charged for that."""
    f_max = build_template_node(SETUP).plant.profile.sm_clock_max_mhz
    clocks = bench.policies["slo-lowest-clock"].series.clock_mhz
    assert clocks.min() >= 0.5 * f_max - 15
    assert clocks.min() < 0.6 * f_max, "it still goes down to the floor when it can"


def test_baselines_act(bench: BenchResult) -> None:
    p = bench.policies
    for result in p.values():
        assert len(result.series.time_s) == 150, result.name
        assert result.series.time_s[-1] == 150.0
        assert result.series.energy_j.sum() == pytest.approx(result.energy_j, rel=1e-9)
    assert p["static-power-cap"].notes.endswith(" W") or "profiling" in p["static-power-cap"].notes
    for name in ("util-governor", "slo-lowest-clock", "static-clock", "powerd"):
        assert p[name].energy_j < p["default"].energy_j, name


@pytest.mark.parametrize("kind", ["default", "oracle"])
def test_job_records_are_the_requests_its_result_counts(kind: str) -> None:
    # The oracle commits clones of the node it is given: the records must come from the end of
    # its committed trajectory, not from the node it started with.
    setup = replace(SETUP, duration_s=60.0)
    result, records = run_job_records(setup, Job(kind))
    assert len(records) == result.finished_requests > 0
    assert records["arrival_s"].max() < setup.duration_s


def test_same_seed_same_result_other_seed_other_arrivals() -> None:
    setup = replace(SETUP, duration_s=40.0, oracle=OracleOptions(window_s=20.0, tail_s=5.0))
    names = ["default", "powerd", "oracle"]
    first = run_bench(setup, names)
    second = run_bench(setup, names)
    for name in names:
        assert to_json(first)["policies"][name] == to_json(second)["policies"][name], name
    other = run_bench(replace(setup, seed=1), ["default"])
    assert other.policies["default"].energy_j != first.policies["default"].energy_j


def test_parallel_workers_give_the_same_result_as_one() -> None:
    setup = replace(SETUP, duration_s=30.0, workers=1)
    names = ["default", "slo-lowest-clock", "static-clock"]
    serial = run_bench(setup, names)
    parallel = run_bench(replace(setup, workers=2), names)
    assert to_json(serial) == to_json(parallel)


def test_powerd_says_why_it_set_the_clocks(bench: BenchResult) -> None:
    decisions = bench.policies["powerd"].decisions
    assert set(decisions) <= set(DECISION_REASONS) and decisions
    assert sum(decisions.values()) == pytest.approx(1.0)
    assert list(decisions.values()) == sorted(decisions.values(), reverse=True)
    assert all(not p.decisions for name, p in bench.policies.items() if name != "powerd")
    line = next(x for x in format_table(bench).splitlines() if x.startswith("powerd's decisions"))
    top, share = next(iter(decisions.items()))
    assert f"{top} {100 * share:.1f} %" in line


def test_json_and_markdown_files(tmp_path: Path, bench: BenchResult) -> None:
    from powerd.bench.report import write_json, write_markdown

    write_json(bench, tmp_path / "out.json")
    write_markdown(bench, tmp_path / "out.md")
    assert json.loads((tmp_path / "out.json").read_text())["gpus"] == 2
    markdown = (tmp_path / "out.md").read_text()
    assert "| oracle |" in markdown and "| powerd |" in markdown


def test_plot_has_load_clock_power_and_tokens_per_joule_over_time_per_policy(
    bench: BenchResult,
) -> None:
    """The issue's --plot: four panels, a line per policy in each, over the whole run (150 s
    of 30-s buckets would be five points; a short run gets shorter buckets)."""
    import matplotlib.pyplot as plt

    from powerd.bench.report import plot_figure

    fig = plot_figure(bench)
    try:
        axes = fig.get_axes()
        assert [ax.get_ylabel() for ax in axes] == [
            "requests in the node",
            "mean SM clock (MHz)",
            "node GPU power (W)",
            "tokens / J",
        ]
        for ax in axes:
            lines = ax.get_lines()
            assert [line.get_label() for line in lines] == list(bench.policies)
            for line in lines:
                t_min = np.asarray(line.get_xdata(), dtype=float)
                assert len(t_min) >= 20 and t_min[-1] == pytest.approx(
                    SETUP.duration_s / 60, rel=0.05
                )
                assert np.isfinite(np.asarray(line.get_ydata(), dtype=float)).any()
        clocks = {line.get_label(): line.get_ydata() for line in axes[1].get_lines()}
        # default runs unlocked at the top clock, powerd below it.
        assert np.mean(clocks["powerd"]) < np.mean(clocks["default"])
    finally:
        plt.close(fig)


@pytest.mark.parametrize("kind", NAMED_SERVER_KINDS)
def test_powerd_reads_each_server_kind_end_to_end(kind: str) -> None:
    setup = replace(SETUP, duration_s=15.0, gpus=1, server_kind=kind)
    node = build_template_node(setup)
    policy = PowerdPolicy(setup.sim_config(), setup.slo)
    result = run_policy(setup, node, policy)
    assert policy.daemon is not None and policy.daemon.last_snapshot is not None
    (server,) = policy.daemon.last_snapshot.servers
    assert server.kind == kind
    assert server.up and server.error is None
    assert server.generation_tokens_per_s is not None
    # Kinds that count tokens at request end may show none in the last tick.
    assert server.generation_tokens_per_s > 0 or (server.generation_tokens_total or 0) > 0
    assert result.generated_tokens > 0
