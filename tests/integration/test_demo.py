"""`powerd demo` end to end: a real process, real HTTP /metrics, the summary at the end."""

from __future__ import annotations

import re

import pytest

from tests.integration.helpers import powerd

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("kind", ["sglang", "llamacpp"])
def test_demo_runs_through_a_server_kind_and_compares(kind: str) -> None:
    result = powerd(
        "demo", "--duration", "6", "--metrics-port", "0", "--server-kind", kind, "--gpus", "2"
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"1 {kind} server," in out  # 2 GPUs at TP=2
    assert re.search(r"^\[\s*\d+\] ", out, re.MULTILINE), "a line per tick"
    columns = {name: _columns(out, name) for name in SUMMARY_ROWS}
    controlled, uncontrolled = columns["tokens per joule"]
    assert controlled > 0 and uncontrolled > 0
    # The baseline replays the load on a node of its own at maximum clocks: were the second
    # column powerd's run again, every row would read the same.
    assert any(c != u for c, u in columns.values()), out
    gain = re.search(r"tokens per joule: ([+-][\d.]+) % with powerd", out)
    assert gain, out
    rounding = 100 * 0.001 / uncontrolled  # both figures are printed to 3 decimals
    assert float(gain.group(1)) == pytest.approx(
        (controlled / uncontrolled - 1) * 100, abs=rounding + 0.05
    )


SUMMARY_ROWS = (
    "tokens per joule",
    "energy (kJ)",
    "generated tokens",
    "TTFT p95 (s)",
    "ITL p95 (s)",
    "requests within SLO",
)


def _columns(out: str, row: str) -> tuple[float, float]:
    """(powerd, controller off) of a row of the summary."""
    match = re.search(rf"^  {re.escape(row)}\s+([\d.]+)%?\s+([\d.]+)%?$", out, re.MULTILINE)
    assert match, (row, out)
    return float(match.group(1)), float(match.group(2))
