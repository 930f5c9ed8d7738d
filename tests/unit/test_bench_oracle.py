"""The oracle pays for the work it leaves unfinished; every policy's end-of-run accounting
counts unfinished requests already past the TTFT SLO as misses."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from powerd.bench import measure
from powerd.bench.options import OracleOptions
from powerd.bench.oracle import Oracle, reference_run
from powerd.bench.policies import DefaultPolicy, FixedClockPolicy
from powerd.bench.runner import (
    ATTAINMENT_TOLERANCE,
    BenchSetup,
    build_template_node,
    meets_slo,
    run_oracle,
    run_policy,
)
from powerd.config import SloConfig

# A small A100 node at a load where a slow clock builds a queue within a window: an oracle
# that counted only finished requests ran it at low clocks and left most requests unserved.
SETUP = BenchSetup(
    trace="diurnal",
    duration_s=300.0,
    gpu_model="a100-sxm4-80gb",
    gpus=1,
    tp=1,
    peak_load=0.7,
    slo=SloConfig(ttft_s=2.0, itl_s=0.1),
    workers=1,
    oracle=OracleOptions(window_s=30.0, tail_s=10.0),
)


def test_oracle_meets_the_slo_and_serves_the_load_where_a_slow_clock_builds_a_backlog() -> None:
    template = build_template_node(SETUP)
    default = run_policy(SETUP, template.clone(), DefaultPolicy())
    oracle = run_oracle(SETUP, template.clone())
    assert default.slo_attainment > 0.9
    assert oracle.slo_attainment >= default.slo_attainment - ATTAINMENT_TOLERANCE
    assert meets_slo(oracle, default)
    assert oracle.generated_tokens == pytest.approx(default.generated_tokens, rel=0.01)
    assert oracle.finished_requests >= 0.99 * default.finished_requests
    assert oracle.energy_j < 0.95 * default.energy_j
    # The SLO constrained the choice: the lowest candidate clock loses most requests here.
    low = measure.snap_clock_mhz(
        template, SETUP.oracle.low_fraction * template.plant.profile.sm_clock_max_mhz
    )
    slow = run_policy(SETUP, template.clone(), FixedClockPolicy(low))
    assert slow.slo_attainment < default.slo_attainment - 0.1


def test_oracle_keeps_within_its_miss_budget_counting_certain_misses() -> None:
    template = build_template_node(SETUP)
    oracle = Oracle(SETUP.slo, SETUP.interval_s, SETUP.oracle)
    final, _ = oracle.run(template.clone(), SETUP.duration_s)
    out = measure.outcome(final, SETUP.slo)
    # The committed count (misses as they became certain) is the run's own truth at the end.
    assert oracle.misses == out.misses


def test_an_oracle_without_slack_misses_no_more_than_default_and_says_so() -> None:
    setup = replace(SETUP, oracle=replace(SETUP.oracle, slack=0.0))
    template = build_template_node(setup)
    reference = reference_run(template.clone(), setup.duration_s, setup.slo, setup.interval_s)
    oracle = Oracle(setup.slo, setup.interval_s, setup.oracle)
    oracle.run(template.clone(), setup.duration_s)
    assert oracle.misses <= len(reference.miss_s)
    assert "slack 0.0 % of requests" in oracle.notes()


def test_unfinished_requests_past_the_ttft_slo_are_certain_misses_for_every_policy() -> None:
    template = build_template_node(SETUP)
    low = int(measure.clock_table_mhz(template)[0])
    node = template.clone()
    run_policy(SETUP, node, FixedClockPolicy(low))
    slo = SETUP.slo
    out = measure.outcome(node, slo)
    assert out.late_unfinished > 0
    assert out.attainment == pytest.approx(out.met / (out.finished + out.late_unfinished))
    assert out.misses == out.finished + out.late_unfinished - out.met
    # Let every request finish (no arrivals after the run) and check the verdicts at the end
    # of the run against the completed latencies.
    end_s = node.now_s
    drained = node.clone()
    measure.set_clock_cap(drained, int(measure.clock_table_mhz(drained)[-1]))
    while measure.unfinished_ttft_s(drained)[0].size:
        drained.advance(10.0)
    rec = drained.finished_records()
    finish = rec["arrival_s"] + rec["e2e_s"]
    open_at_end = finish > end_s
    late_at_end = (
        open_at_end & (rec["ttft_s"] > slo.ttft_s) & (rec["arrival_s"] + slo.ttft_s < end_s)
    )
    assert out.late_unfinished == int(late_at_end.sum())
    assert out.finished + int(open_at_end.sum()) == len(rec)
    # Each unfinished request's TTFT bound at the end is a true lower bound of its TTFT.
    arrival, ttft_bound = measure.unfinished_ttft_s(node)
    order = np.argsort(arrival, kind="stable")
    done = np.argsort(rec["arrival_s"][open_at_end], kind="stable")
    assert np.array_equal(arrival[order], rec["arrival_s"][open_at_end][done])
    assert np.all(ttft_bound[order] <= rec["ttft_s"][open_at_end][done] + 1e-9)


def test_reference_counts_defaults_certain_misses_as_the_end_of_run_accounting_does() -> None:
    setup_slo = SloConfig(ttft_s=0.5, itl_s=0.1)  # tight, so default misses some
    node = build_template_node(SETUP)
    ref = reference_run(node, SETUP.duration_s, setup_slo, SETUP.interval_s)
    out = measure.outcome(node, setup_slo)
    assert out.misses > 0
    assert ref.counts(-1.0, SETUP.duration_s) == (out.finished, out.misses)
    # A late first token is certain once the request's age passes the SLO, before it finishes.
    rec = node.finished_records()
    late = rec["ttft_s"] > setup_slo.ttft_s
    first_certain = float(np.min(rec["arrival_s"][late])) + setup_slo.ttft_s
    assert ref.counts(-1.0, first_certain)[1] >= 1
