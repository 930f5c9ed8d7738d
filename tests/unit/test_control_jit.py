"""The compiled kernels and the same code run as plain Python (NUMBA_DISABLE_JIT=1) agree.

The scenario drives every path: closed loops on both test plants, a load step, a stale server,
the queue guard, the prefill guard between ticks, then budget, target and off modes after
reconfiguration. The plain-Python run happens in a subprocess because numba reads
NUMBA_DISABLE_JIT when it is first imported.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from powerd.config import Config, SloConfig
from powerd.control.policy import Controller, GroupSpec
from powerd.model import GroupObservation
from tests.unit.plain_python import run_without_jit
from tests.unit.test_control_closed_loop import F_MAX, GPU, Plant


def scenario() -> dict[str, Any]:
    """Run the scenario; return every decision and the learned figures, JSON-ready."""
    plants = [Plant(seed=10), Plant(race_to_idle=True, seed=11), Plant(seed=12)]
    slos = [SloConfig(itl_s=0.016, ttft_s=1.0), SloConfig(), SloConfig(itl_s=0.03, ttft_s=0.5)]
    specs = [GroupSpec(f"g{i}", f"s{i}", (GPU,), slo) for i, slo in enumerate(slos)]
    capacity = plants[0].capacity_tps(F_MAX)
    configs = [
        (0, Config()),
        (120, Config(mode="budget", node_power_budget_w=700.0)),
        (160, Config(mode="target", target_tokens_per_joule=25.0)),
        (200, Config(mode="off")),
    ]
    controller = Controller(configs[0][1], specs)
    clocks = [F_MAX] * len(plants)
    decisions: list[list[Any]] = []
    guards: list[list[Any]] = []
    states: list[list[Any]] = []
    for tick in range(220):
        for start, config in configs[1:]:
            if tick == start:
                controller.reconfigure(config, specs)
        load = 0.3 if tick < 60 else 0.85
        observations: list[GroupObservation] = []
        for i, plant in enumerate(plants):
            o = plant.tick(clocks[i], load * capacity * (1.0 + 0.1 * i), group=f"g{i}")
            if i == 2 and 40 <= tick < 44:
                o = GroupObservation(**{**_fields(o), "stale": True})
            if i == 1 and tick == 90:
                o = GroupObservation(**{**_fields(o), "waiting": 50.0})
            if o.generation_tokens_per_s is not None:
                # Prompts at twice the output rate: the prefill capacity is learned while
                # requests wait, which the guard between ticks scales from; some intervals
                # had a raise between ticks.
                prompt_tps = 2.0 * o.generation_tokens_per_s
                raised = clocks[i] + 150.0 if tick % 3 == 0 else None
                o = GroupObservation(
                    **{
                        **_fields(o),
                        "prompt_tokens_per_s": prompt_tps,
                        "interval_clock_cap_mhz": raised,
                        # Both ways of counting prompts: chunk by chunk, and whole at the
                        # first token (learned over runs of ticks).
                        "prompt_per_chunk": i == 1,
                    }
                )
            observations.append(o)
        for i, d in enumerate(controller.decide(float(tick), observations)):
            clocks[i] = d.sm_clock_max_mhz
            decisions.append([tick, d.group, d.sm_clock_max_mhz, d.power_limit_mw, d.reason])
        backlogs = {spec.name: 4000.0 * (tick % 5) * (i + 1) for i, spec in enumerate(specs)}
        guards.append([tick, sorted(controller.prefill_guard(backlogs).items())])
        states.append(
            [
                [v for key, v in sorted(s.items()) if isinstance(v, (int, float)) or v is None]
                for s in controller.group_state()
            ]
        )
    return {"decisions": decisions, "states": states, "guards": guards}


def _fields(o: GroupObservation) -> dict[str, Any]:
    return {name: getattr(o, name) for name in o.__slots__}


def test_jitted_and_plain_python_agree() -> None:
    jitted = json.loads(json.dumps(scenario()))
    plain = run_without_jit("tests.unit.test_control_jit")
    assert plain["jit_disabled"] is True
    assert plain["decisions"] == jitted["decisions"]
    assert plain["guards"] == jitted["guards"]
    assert any(raised for _, raised in jitted["guards"]), "the prefill guard never raised"
    assert len(plain["states"]) == len(jitted["states"])
    for row_jit, row_plain in zip(jitted["states"], plain["states"], strict=True):
        for group_jit, group_plain in zip(row_jit, row_plain, strict=True):
            assert [v is None for v in group_plain] == [v is None for v in group_jit]
            numbers_jit = [v for v in group_jit if v is not None]
            numbers_plain = [v for v in group_plain if v is not None]
            assert numbers_plain == pytest.approx(numbers_jit, rel=1e-9, abs=1e-12)
    # The scenario is not trivial: it moved clocks, set limits and went through every mode.
    reasons = {d[4].split(":")[0] for d in jitted["decisions"]}
    assert {"lower", "raise", "stale", "off"} <= reasons
    assert any(d[3] is not None for d in jitted["decisions"])


def main() -> None:
    from numba.core import config as numba_config

    result = scenario()
    result["jit_disabled"] = bool(numba_config.DISABLE_JIT)  # type: ignore[attr-defined]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
