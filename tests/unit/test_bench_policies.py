"""Unit tests of the benchmark's pieces that need no simulation: grids, Zeus's selector,
the oracle's SLO budget, policy-list parsing and the report formats."""

from __future__ import annotations

import json

import numpy as np
import pytest

from powerd.bench.options import POLICY_NAMES, OracleOptions, parse_policies
from powerd.bench.oracle import Oracle, Reference, _Candidate
from powerd.bench.policies import (
    StaticPowerCapPolicy,
    _Measurement,
    coarse_grid_mhz,
    refine_around,
)
from powerd.bench.report import format_markdown, format_table, to_json
from powerd.bench.results import BenchInfo, BenchResult, PolicyResult, Series
from powerd.config import SloConfig

TABLE = list(range(345, 1981, 15))


def test_coarse_grid_spans_the_range_on_the_clock_table() -> None:
    grid = coarse_grid_mhz(TABLE, 891, 1980, 8)
    assert grid[0] in (885, 900) and grid[-1] == 1980
    assert len(grid) == 8
    assert all(c in TABLE for c in grid)
    assert grid == sorted(grid)


def test_refine_puts_points_between_the_best_and_its_neighbours() -> None:
    grid = coarse_grid_mhz(TABLE, 891, 1980, 8)
    best = grid[3]
    extra = refine_around(TABLE, grid, best, 2)
    assert len(extra) == 4
    assert all(grid[2] < c < grid[4] and c not in grid for c in extra)
    top = refine_around(TABLE, grid, grid[-1], 2)
    assert len(top) == 2
    assert all(grid[-2] < c < grid[-1] for c in top)


def test_parse_policies_validates_and_keeps_order() -> None:
    assert parse_policies("oracle, default,oracle") == ["oracle", "default"]
    assert parse_policies(",".join(POLICY_NAMES)) == list(POLICY_NAMES)
    with pytest.raises(ValueError, match="unknown policy 'fastest'"):
        parse_policies("default,fastest")
    with pytest.raises(ValueError, match="no policy"):
        parse_policies(" , ")


def test_zeus_cost_picks_the_limit_with_the_least_cost_per_token() -> None:
    policy = StaticPowerCapPolicy()
    policy.limits_w = [700.0, 675.0, 650.0]
    # 650 W: least energy per token but much slower; 675 W: the ZeusCost optimum.
    policy.measurements = [
        _Measurement(700.0, energy_j=5000.0, time_s=5.0, tokens=10000.0),
        _Measurement(675.0, energy_j=4500.0, time_s=5.0, tokens=10000.0),
        _Measurement(650.0, energy_j=4000.0, time_s=5.0, tokens=5000.0),
    ]
    assert policy._select(n_gpus=4) == 675.0
    # eta = 1 is pure energy per token.
    policy.eta = 1.0
    assert policy._select(n_gpus=4) == 675.0
    policy.measurements[2] = _Measurement(650.0, energy_j=4000.0, time_s=5.0, tokens=9990.0)
    assert policy._select(n_gpus=4) == 650.0


def test_zeus_skips_windows_without_tokens() -> None:
    policy = StaticPowerCapPolicy()
    policy.limits_w = [700.0, 675.0]
    policy.measurements = [
        _Measurement(700.0, 5000.0, 5.0, 100.0),
        _Measurement(675.0, 10.0, 5.0, 0.0),
    ]
    assert policy._select(n_gpus=1) == 700.0


def _candidate(clock: int, energy: float, misses: int, window_misses: int = 0) -> _Candidate:
    return _Candidate(clock, energy, misses, window_misses, state=None, recorder=None)  # type: ignore[arg-type]


def _reference(n: int, missed_at: list[int], energy_per_request: float = 1.0) -> Reference:
    """Default finishing one request per second from t = 1, missing those at missed_at (each
    miss certain at its finish)."""
    finish = np.arange(1.0, n + 1.0)
    missed = np.isin(np.arange(1, n + 1), missed_at)
    return Reference(finish, finish[missed], energy_per_request)


def test_reference_counts_requests_in_a_half_open_span() -> None:
    ref = _reference(100, [10, 20, 30])
    assert ref.counts(0.0, 100.0) == (100, 3)
    assert ref.counts(10.0, 20.0) == (10, 1)  # (10, 20]: 11..20
    assert ref.counts(9.5, 10.0) == (1, 1)
    assert ref.counts(100.0, 200.0) == (0, 0)


def test_oracle_budget_follows_defaults_misses_plus_slack() -> None:
    oracle = Oracle(SloConfig(), options=OracleOptions(slack=0.01, miss_price=0.0))
    ref = _reference(1000, [5])
    # By t = 500 default missed 1 of 500: the oracle may miss 1 + 5.
    assert oracle.budget(ref, 500.0) == pytest.approx(6.0)
    oracle.misses = 4
    assert oracle.budget(ref, 500.0) == pytest.approx(2.0)


def test_oracle_spends_its_budget_only_where_it_saves_energy() -> None:
    oracle = Oracle(SloConfig(), options=OracleOptions(slack=0.01, miss_price=0.0))
    ref = _reference(1000, [])
    cands = {
        1980: _candidate(1980, 1000.0, 0),
        1500: _candidate(1500, 800.0, 5),
        1200: _candidate(1200, 700.0, 20),
    }
    # Window (0, 500]: default finishes 500 with no miss, so 5 misses are allowed.
    assert oracle.choose(cands, ref, 0.0, 500.0).clock_mhz == 1500
    # After the oracle has spent 4, only 1 is left.
    oracle.misses = 4
    cands[1400] = _candidate(1400, 900.0, 1)
    assert oracle.choose(cands, ref, 0.0, 500.0).clock_mhz == 1400
    # Over-spent: nothing beyond default's misses is admissible, the fewest misses win.
    oracle.misses = 50
    assert oracle.choose(cands, ref, 0.0, 10.0).clock_mhz == 1980


def test_oracle_prices_misses() -> None:
    # Default's energy per request is 1 J; with price 0.5 a miss must save at least 0.5 J.
    oracle = Oracle(SloConfig(), options=OracleOptions(slack=0.5, miss_price=0.5))
    ref = _reference(1000, [])
    cands = {1980: _candidate(1980, 1000.0, 0), 1500: _candidate(1500, 999.0, 10)}
    assert oracle.choose(cands, ref, 0.0, 100.0).clock_mhz == 1980
    cands[1500] = _candidate(1500, 990.0, 10)
    assert oracle.choose(cands, ref, 0.0, 100.0).clock_mhz == 1500


def _result(name: str, energy: float, attainment: float = 1.0) -> PolicyResult:
    t = np.arange(1.0, 11.0)
    series = Series(t, t * 0 + 3, t * 0 + 1500, t * 0 + energy / 10, t * 0 + energy / 10, t * 100)
    return PolicyResult(
        name=name,
        energy_j=energy,
        generated_tokens=1000,
        finished_requests=10,
        slo_attainment=attainment,
        ttft_p95_s=0.5,
        itl_p95_s=0.02,
        duration_s=10.0,
        wall_s=0.1,
        series=series,
        notes="x",
    )


def _bench(*names_energies: tuple[str, float]) -> BenchResult:
    info = BenchInfo("diurnal", "h100-sxm", "llama-3.1-8b", 2, 1, 10.0, 2.0, 0.1, "vllm", 0, "p")
    return BenchResult(info, {n: _result(n, e) for n, e in names_energies}, wall_s=1.0)


def test_share_of_oracle_saving() -> None:
    bench = _bench(("default", 1000.0), ("powerd", 800.0), ("oracle", 600.0))
    assert bench.share_of_oracle_saving() == pytest.approx(0.5)
    assert _bench(("default", 1000.0), ("powerd", 800.0)).share_of_oracle_saving() is None
    assert to_json(_bench(("default", 1.0)))["powerd_share_of_oracle_saving"] is None


def test_json_document_is_serialisable_and_complete() -> None:
    doc = to_json(_bench(("default", 1000.0), ("powerd", 800.0), ("oracle", 600.0)))
    text = json.dumps(doc, allow_nan=False)
    assert json.loads(text)["policies"]["powerd"]["tokens_per_joule"] == pytest.approx(1.25)
    assert doc["policies"]["default"]["mean_power_w"] == pytest.approx(100.0)


def test_table_and_markdown_list_every_policy() -> None:
    bench = _bench(("default", 1000.0), ("powerd", 800.0), ("oracle", 600.0))
    table = format_table(bench)
    markdown = format_markdown(bench)
    for name in ("default", "powerd", "oracle"):
        assert name in table
        assert f"| {name} |" in markdown
    assert "+25.0%" in table
    assert "share of the oracle's saving: 0.50" in table
    # Two tables (totals, then by load); every row of each has its header's column count.
    tables = [block.splitlines() for block in markdown.split("\n\n") if block.startswith("| ")]
    assert [t[0].split(" | ")[0] for t in tables] == ["| policy", "| policy"]
    for rows in tables:
        assert len(rows) == 2 + 3
        assert all(row.count("|") == rows[0].count("|") for row in rows)
