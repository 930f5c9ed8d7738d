"""`powerd demo`'s side-by-side summary: powerd's run against the same load with the controller
off, the README's headline comparison."""

from __future__ import annotations

from typing import Any

import pytest

from powerd import demo
from powerd.bench.measure import Outcome
from powerd.config import SloConfig
from powerd.sim.node import SimNode


def test_the_controller_off_column_is_the_same_load_at_maximum_clocks_and_default_limits(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The second column must come from a node of its own that replayed the same load for as
    long with nothing set on its GPUs; judging powerd's node twice would compare powerd with
    itself."""
    started: list[Any] = []
    judged: list[tuple[SimNode, Outcome]] = []
    summarised: list[tuple[Outcome, Outcome, float]] = []
    real_start, real_outcome, real_format = (
        demo.start_simulation,
        demo.outcome,
        demo.format_summary,
    )

    def start(*args: Any, **kwargs: Any) -> Any:
        started.append(real_start(*args, **kwargs))
        return started[-1]

    def judge(node: SimNode, slo: SloConfig) -> Outcome:
        judged.append((node, real_outcome(node, slo)))
        return judged[-1][1]

    def summary(controlled: Outcome, uncontrolled: Outcome, duration_s: float) -> str:
        summarised.append((controlled, uncontrolled, duration_s))
        return real_format(controlled, uncontrolled, duration_s)

    monkeypatch.setattr(demo, "start_simulation", start)
    monkeypatch.setattr(demo, "outcome", judge)
    monkeypatch.setattr(demo, "format_summary", summary)
    options = demo.DemoOptions(gpus=2, tp=1, duration_s=2.0, metrics_port=0, quiet=True)
    assert demo.run_demo(options) == 0

    (simulation,) = started
    assert len(judged) == 2, "powerd's node and the baseline's, each judged once"
    (controlled_node, controlled), (baseline_node, baseline) = judged
    assert controlled_node is simulation.node
    assert baseline_node is not controlled_node
    assert summarised == [(controlled, baseline, controlled_node.now_s)]
    assert baseline_node.now_s == pytest.approx(controlled_node.now_s), "as long"
    assert baseline_node.n_gpus == controlled_node.n_gpus == 2
    assert len(baseline_node.arrivals) == len(controlled_node.arrivals) > 0, "the same load"
    plant = baseline_node.plant
    default_limit_mw = round(plant.profile.power_limit_default_w * 1000)
    for i in range(plant.n_gpus):
        assert plant.locked_clocks(i) is None, "clocks never locked: up to f_max"
        assert plant.power_limit_mw(i) == default_limit_mw
    assert baseline.energy_j > 0 and baseline.generated_tokens > 0
    assert "controller off" in capsys.readouterr().out


def test_one_gpu_one_server_and_one_request_are_counted_in_the_singular(
    capsys: pytest.CaptureFixture[str],
) -> None:
    options = demo.DemoOptions(gpus=1, tp=1, duration_s=1.0, metrics_port=0, quiet=True)
    assert demo.run_demo(options) == 0
    assert "powerd demo: 1 simulated h100-sxm GPU, 1 vllm server, mode" in capsys.readouterr().out
    one = _outcome(energy_j=1_000.0, tokens=100.0, finished=1, met=1)
    assert "(1 vs 1 request finished)" in demo.format_summary(one, one, 1.0)
    two = _outcome(energy_j=1_000.0, tokens=100.0, finished=2, met=2)
    assert "(1 vs 2 requests finished)" in demo.format_summary(one, two, 1.0)


def _outcome(energy_j: float, tokens: float, finished: int, met: int) -> Outcome:
    return Outcome(
        energy_j=energy_j,
        generated_tokens=tokens,
        finished=finished,
        met=met,
        ttft_p95_s=0.25,
        itl_p95_s=0.03,
    )


def test_the_summary_puts_powerd_first_and_the_controller_off_second() -> None:
    """Swapped columns would print the baseline's figures as powerd's, and the gain inverted."""
    controlled = _outcome(energy_j=100_000.0, tokens=300_000.0, finished=90, met=90)
    uncontrolled = _outcome(energy_j=150_000.0, tokens=300_000.0, finished=80, met=72)
    text = demo.format_summary(controlled, uncontrolled, 60.0)
    lines = text.splitlines()
    assert "Summary over 60 s of the same load (90 vs 80 requests finished):" in lines
    (header,) = [line for line in lines if "controller off" in line]
    assert header.split() == ["powerd", "controller", "off"]

    def row(name: str) -> list[str]:
        (line,) = [line for line in lines if line.startswith(f"  {name}  ")]
        return line.removeprefix(f"  {name}").split()

    assert row("tokens per joule") == ["3.000", "2.000"]
    assert row("energy (kJ)") == ["100.0", "150.0"]
    assert row("requests within SLO") == ["100.0%", "90.0%"]
    assert lines[-1] == "  tokens per joule: +50.0 % with powerd"
