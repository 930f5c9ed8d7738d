"""Golden /metrics: the whole exposition of a seeded simulated run against a reviewed fixture.

The run (tests/golden_run.py) is the production daemon, controller and exporter over the
simulated node in virtual time, so every value is a function of the seed. The few values that
measure this machine's speed, and build_info's versions, are normalised in both the fixture and
the fresh render (the list is at the top of tests/fixtures/metrics.golden). Everything else
must match: names, labels, order and help texts exactly, and values exactly too on the machine
that wrote the fixture. Values may differ by REL_TOL on another CPU, where libm's and numpy's
vectorised exp/log/pow can round the last bit differently; any real change in what powerd
computes or exports moves a value by far more than that. Two runs in one process must agree bit
for bit.
"""

from __future__ import annotations

import difflib
import math
import re

import pytest

from tests.golden_run import (
    GOLDEN_PATH,
    HEADER,
    NORMALISED_SERIES,
    PLACEHOLDER,
    GoldenRun,
    normalise,
    run_seeded,
)

_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?P<labels>\{.*\})? (?P<value>\S+)$")
REL_TOL = 1e-9
REGENERATE = "run `make golden` and review the diff (git diff tests/fixtures/metrics.golden)"


@pytest.fixture(scope="module")
def run() -> GoldenRun:
    return run_seeded()


def test_metrics_match_golden(run: GoldenRun) -> None:
    if not GOLDEN_PATH.exists():
        pytest.fail(f"{GOLDEN_PATH} is missing; {REGENERATE}")
    expected = GOLDEN_PATH.read_text(encoding="utf-8")
    actual = normalise(run.exposition)
    if not same_up_to_rounding(expected, actual):
        diff = "".join(
            difflib.unified_diff(
                expected.splitlines(keepends=True),
                actual.splitlines(keepends=True),
                fromfile="tests/fixtures/metrics.golden",
                tofile="fresh /metrics of the seeded run",
            )
        )
        pytest.fail(f"/metrics differs from the golden file; {REGENERATE}.\n{diff}", False)


def same_up_to_rounding(expected: str, actual: str) -> bool:
    """Equal texts, or equal but for sample values within REL_TOL of each other."""
    if expected == actual:
        return True
    expected_lines, actual_lines = expected.splitlines(), actual.splitlines()
    if len(expected_lines) != len(actual_lines):
        return False
    for want, got in zip(expected_lines, actual_lines, strict=True):
        if want == got:
            continue
        a, b = _SAMPLE.match(want), _SAMPLE.match(got)
        if a is None or b is None or (a["name"], a["labels"]) != (b["name"], b["labels"]):
            return False
        try:
            x, y = float(a["value"]), float(b["value"])
        except ValueError:
            return False
        if not math.isclose(x, y, rel_tol=REL_TOL, abs_tol=1e-12):
            return False
    return True


def test_rounding_tolerance_is_tight() -> None:
    line = 'powerd_gpu_power_watts{gpu="0"} '
    assert same_up_to_rounding(line + "155.583", line + "155.58300000000003")
    assert not same_up_to_rounding(line + "155.583", line + "155.584")
    assert not same_up_to_rounding(line + "121698.0", line + "121699.0")
    assert not same_up_to_rounding(line + "1.0", 'powerd_gpu_power_watts{gpu="1"} 1.0')
    assert not same_up_to_rounding("# HELP a x\n", "# HELP a y\n")


def test_second_run_in_the_same_process_is_identical(run: GoldenRun) -> None:
    """No state leaks between runs (module caches, RNG state, counters); floats bit for bit."""
    assert normalise(run_seeded().exposition) == normalise(run.exposition)


def test_only_machine_dependent_values_are_normalised(run: GoldenRun) -> None:
    raw = run.exposition.splitlines()
    normalised = normalise(run.exposition)
    assert normalised.startswith(HEADER)
    body = normalised[len(HEADER) :].splitlines()
    assert len(body) == len(raw)
    seen: set[str] = set()
    for before, after in zip(raw, body, strict=True):
        if before == after:
            continue
        match = _SAMPLE.match(before)
        assert match is not None, f"a non-sample line was changed: {before!r}"
        name = match["name"]
        seen.add(name)
        if name == "powerd_build_info":
            assert after.endswith(" 1.0")
            assert re.sub(r'="[^"]*"', f'="{PLACEHOLDER}"', before) == after
        else:
            assert name in NORMALISED_SERIES, f"{name} was normalised but is not listed"
            assert 'le="+Inf"' not in before
            float(match["value"])  # the replaced value was a number
            assert after == f"{name}{match['labels'] or ''} {PLACEHOLDER}"
    # A stale entry (a series renamed or gone) would silently stop being compared.
    assert seen == {"powerd_build_info", *NORMALISED_SERIES}


def test_golden_run_exercises_every_part_of_the_exposition(run: GoldenRun) -> None:
    """The seeded run ends in a state where the controller has acted and every signal is known,
    so the golden file covers the series a quiet node would leave out."""
    names = {m["name"] for line in run.exposition.splitlines() if (m := _SAMPLE.match(line))}
    for name in (
        "powerd_grid_price_per_kwh",
        "powerd_grid_carbon_grams_per_kwh",
        "powerd_grid_pue",
        "powerd_gpu_energy_joules_total",
        "powerd_gpu_clock_event_reason",
        "powerd_server_generation_tokens_total",
        "powerd_server_ttft_slo_quantile_seconds",
        "powerd_server_itl_slo_quantile_seconds",
        "powerd_group_slo_quantile",
        "powerd_group_tokens_per_joule",
        "powerd_group_energy_per_token_joules",
        "powerd_group_slo_attainment_ratio",
    ):
        assert name in names, name
    limits = [
        float(m["value"])
        for line in run.exposition.splitlines()
        if (m := _SAMPLE.match(line)) and m["name"] == "powerd_group_clock_limit_hertz"
    ]
    maxima = [
        float(m["value"])
        for line in run.exposition.splitlines()
        if (m := _SAMPLE.match(line)) and m["name"] == "powerd_gpu_max_clock_hertz"
    ]
    assert limits and max(limits) < max(maxima), "the controller never lowered a clock"
