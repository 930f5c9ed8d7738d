"""Unit tests of the control kernels and the Controller on synthetic observations."""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from powerd.config import Config, ControlConfig, SloConfig
from powerd.control import kernels as k
from powerd.control import policy
from powerd.control.numba_cache import cache_dir, compile_apart
from powerd.control.policy import Controller, GroupSpec, Policy, group_floor_mhz
from powerd.model import (
    BLIND_PREFILL_SHARE,
    DECISION_REASONS,
    GpuInfo,
    GroupDecision,
    GroupObservation,
)
from tests.unit.plain_python import REPO

H100_CLOCKS = tuple(range(345, 1981, 15))
ODD_CLOCKS = (600, 810, 1005, 1200, 1410, 1500, 1650, 1755, 1980)
SLO = SloConfig(itl_s=0.1, ttft_s=2.0, max_waiting=32)
FLOOR_MHZ = group_floor_mhz(H100_CLOCKS, 1980, None)
"""The controller's default floor on an H100 clock table."""


def gpu(index: int = 0, clocks: tuple[int, ...] = H100_CLOCKS) -> GpuInfo:
    return GpuInfo(
        index, f"GPU-{index}", "H100", 200_000, 700_000, 700_000, clocks[0], clocks[-1], clocks
    )


def spec(name: str = "g0", gpus: int = 1, clocks: tuple[int, ...] = H100_CLOCKS) -> GroupSpec:
    return GroupSpec(name, f"srv-{name}", tuple(gpu(i, clocks) for i in range(gpus)), SLO)


def obs(group: str = "g0", **kw: object) -> GroupObservation:
    """A healthy, slack observation at moderate load (ITL and TTFT far below the SLO)."""
    values: dict[str, object] = {
        "group": group,
        "interval_s": 1.0,
        "gpu_count": 1,
        "energy_j": 300.0,
        "power_w": 300.0,
        "generation_tokens_per_s": 3000.0,
        "prompt_tokens_per_s": 6000.0,
        "running": 40.0,
        "waiting": 0.0,
        "ttft_q_s": 0.2,
        "itl_q_s": 0.02,
        "sm_clock_mhz": None,
        "clock_event_reasons": 0,
        "stale": False,
        "realtime": True,
        "prompt_per_chunk": True,
    }
    values.update(kw)
    return GroupObservation(**values)  # type: ignore[arg-type]


def drive(controller: Controller, ticks: int, **kw: object) -> list[int]:
    """Feed `ticks` slack observations (actual clock = last cap); return the caps."""
    caps: list[int] = []
    clock: float | None = None
    for t in range(ticks):
        names = [s.name for s in controller.groups]
        decisions = controller.decide(
            float(t), [obs(name, sm_clock_mhz=clock, **kw) for name in names]
        )
        caps.append(decisions[0].sm_clock_max_mhz)
        clock = caps[-1]
    return caps


def lowered(config: Config | None = None, ticks: int = 40) -> tuple[Controller, int]:
    """A controller that has come down to its floor on slack observations."""
    controller = Controller(config or Config(), [spec()])
    caps = drive(controller, ticks)
    return controller, caps[-1]


def test_controller_satisfies_the_policy_protocol() -> None:
    controller: Policy = Controller(Config(), [spec()])
    assert controller.name == "powerd"


def test_lowers_at_most_max_step_down_per_tick_and_stops_at_the_floor() -> None:
    for step in (45, 20):
        config = Config(control=ControlConfig(max_step_down_mhz=step))
        caps = drive(Controller(config, [spec()]), 100)
        drops = np.diff([1980, *caps])
        assert drops.min() >= -step
        assert min(caps) >= FLOOR_MHZ
        assert caps[-1] <= FLOOR_MHZ + 15  # at the floor, give or take the dither
        assert caps[0] < 1980  # slack is used from the first tick


def test_configured_floor_is_never_crossed() -> None:
    config = Config(control=ControlConfig(min_clock_mhz=1400))
    caps = drive(Controller(config, [spec()]), 40)
    assert min(caps) == 1410
    # The default: the lowest supported clock at or above its share of f_max, well below f_max.
    assert FLOOR_MHZ in H100_CLOCKS
    assert FLOOR_MHZ - 15 < policy._FLOOR_SHARE * 1980 <= FLOOR_MHZ


def test_itl_p95_over_the_slo_raises_within_one_tick() -> None:
    controller, low = lowered()
    decision = controller.decide(100.0, [obs(itl_q_s=0.12, sm_clock_mhz=low)])[0]
    assert decision.sm_clock_max_mhz > low
    assert "inter-token" in decision.reason


def test_requests_itl_over_the_slo_jumps_to_a_safe_clock() -> None:
    """Requests' mean ITL (running / tokens per second: 150 ms) stays past the 100 ms SLO."""
    controller, low = lowered()
    caps = [low]
    for t in range(6):
        decision = controller.decide(
            100.0 + t, [obs(running=450.0, itl_q_s=0.15, sm_clock_mhz=caps[-1])]
        )[0]
        caps.append(decision.sm_clock_max_mhz)
        assert caps[-1] > caps[-2] or caps[-1] == 1980  # up at every tick
    assert caps[-1] >= low + (1980 - low) / 2
    state = controller.group_state()[0]
    assert state["itl_estimate_s"] == pytest.approx(0.1, abs=0.03)


def test_requests_itl_between_margin_and_slo_raises_modestly() -> None:
    """Requests' ITL 90 ms at the floor, compute-bound: past the 85 ms line, within the SLO."""
    controller, low = lowered()
    cap = low
    caps = []
    for t in range(25):
        running = 3000.0 * 0.09 * low / cap
        decision = controller.decide(100.0 + t, [obs(running=running, sm_clock_mhz=cap)])[0]
        cap = decision.sm_clock_max_mhz
        caps.append(cap)
    assert max(caps) > low
    assert max(caps) < 1300  # 5 % over the line needs about 5 % more clock, not f_max


def test_ttft_over_the_slo_raises_at_once_and_to_f_max_when_it_persists() -> None:
    controller, low = lowered()
    first = controller.decide(100.0, [obs(ttft_q_s=2.5, sm_clock_mhz=low)])[0]
    assert first.sm_clock_max_mhz > low
    assert "first token" in first.reason
    caps = [first.sm_clock_max_mhz]
    for t in range(8):
        decision = controller.decide(101.0 + t, [obs(ttft_q_s=2.5, sm_clock_mhz=caps[-1])])[0]
        caps.append(decision.sm_clock_max_mhz)
    assert caps[-1] == 1980


def test_queue_guard_raises_to_f_max_within_one_tick() -> None:
    controller, low = lowered()
    decision = controller.decide(100.0, [obs(waiting=33.0, sm_clock_mhz=low)])[0]
    assert decision.sm_clock_max_mhz == 1980
    assert "queue" in decision.reason


def test_growing_queue_below_the_guard_raises() -> None:
    controller, low = lowered()
    caps = []
    for t, waiting in enumerate((4.0, 9.0, 14.0)):
        caps.append(controller.decide(100.0 + t, [obs(waiting=waiting, sm_clock_mhz=low)])[0])
    assert caps[-1].sm_clock_max_mhz > low
    assert "queue" in caps[-1].reason


def test_prompt_burst_boosts_one_tick_without_moving_the_chosen_clock() -> None:
    controller, low = lowered()
    # Requests wait while prefill runs 6000 prompt tokens/s at `low`: that is the capacity.
    controller.decide(100.0, [obs(waiting=1.0, sm_clock_mhz=low)])
    base = controller.group_state()[0]["base_clock_mhz"]
    assert base is not None
    # Without a queue, prefill at capacity is absorbed: no boost.
    absorbed = controller.decide(101.0, [obs(sm_clock_mhz=low)])[0]
    assert absorbed.sm_clock_max_mhz <= base + 15
    burst = controller.decide(102.0, [obs(waiting=1.0, sm_clock_mhz=low)])[0]
    # At capacity with requests waiting: boosted so the burst uses at most 80 % of it.
    assert burst.sm_clock_max_mhz >= low / 0.8 - 15
    assert "time to first token" in burst.reason
    assert controller.group_state()[0]["base_clock_mhz"] == base
    calm = controller.decide(
        103.0, [obs(prompt_tokens_per_s=1000.0, sm_clock_mhz=burst.sm_clock_max_mhz)]
    )[0]
    # Back at once: the boost is not slew-limited and did not move the chosen clock.
    assert calm.sm_clock_max_mhz <= base + 15


def test_no_burst_boost_where_a_prompt_is_counted_at_its_first_token() -> None:
    """There a tick's prompt count is prefill already done: boosting for it comes too late."""
    controller, low = lowered()
    decisions = [
        controller.decide(100.0 + t, [obs(waiting=1.0, sm_clock_mhz=low, prompt_per_chunk=False)])[
            0
        ]
        for t in range(4)
    ]
    assert not math.isnan(controller.arrays.state[k.ST_PREFILL_K, 0])
    assert all(d.sm_clock_max_mhz <= low + 15 for d in decisions)
    assert not any("time to first token" in d.reason for d in decisions)


def learn_and_exceed(itl_at: Callable[[float], float]) -> tuple[float, int]:
    """Descend with requests' ITL itl_at(clock); then one tick lifts it just past the margin line.

    Returns the learned knee and the clock the controller raises to.
    """
    controller = Controller(Config(), [spec()])
    cap = 1980
    # 20 ticks of 45 MHz: both groups descend to about 1100 MHz, well above the floor.
    for t in range(20):
        itl = itl_at(cap)
        decision = controller.decide(
            float(t), [obs(running=3000.0 * itl, itl_q_s=itl, sm_clock_mhz=cap)]
        )[0]
        cap = decision.sm_clock_max_mhz
    knee = controller.group_state()[0]["knee_mhz"]
    # Running jumps so that the smoothed estimate lands just past 85 ms (SLO 100 ms).
    smoothed = controller.arrays.state[k.ST_RUNNING_EW, 0]
    running = (0.0875 * 3000.0 - 0.8 * smoothed) / 0.2
    decision = controller.decide(21.0, [obs(running=running, itl_q_s=0.09, sm_clock_mhz=cap)])[0]
    assert "inter-token" in decision.reason
    return knee, decision.sm_clock_max_mhz


def test_learned_knee_sizes_the_raise() -> None:
    """Past the margin line, a memory-bound group needs a bigger raise than a compute-bound one."""
    knee_memory, raised_memory = learn_and_exceed(
        lambda f: 0.03 * (1 + (0.3 * 1980 / f) ** 4) ** 0.25
    )
    knee_compute, raised_compute = learn_and_exceed(lambda f: 0.03 * 1980 / f)
    assert 500 <= knee_memory <= 900
    assert 2500 <= knee_compute <= 2970
    assert raised_memory > raised_compute + 150


def run_cliff(bad_itl_s: float) -> tuple[list[bool], list[int], Controller]:
    """Requests' ITL is 50 ms down to 1400 MHz and bad_itl_s below: a cliff no smooth model
    foresees. Returns per tick whether requests missed the SLO, the caps, the controller."""
    controller = Controller(Config(), [spec()])
    cap = 1980
    misses = []
    caps = []
    request_itl = 0.05
    for t in range(300):
        itl = 0.05 if cap >= 1400 else bad_itl_s
        # What requests see: the mean over their last few seconds.
        request_itl = 0.8 * request_itl + 0.2 * itl
        misses.append(request_itl > SLO.itl_s)
        decision = controller.decide(
            float(t), [obs(running=3000.0 * itl, itl_q_s=itl, sm_clock_mhz=cap)]
        )[0]
        cap = decision.sm_clock_max_mhz
        caps.append(cap)
    return misses, caps, controller


def test_a_miss_jumps_at_least_halfway_even_when_the_model_says_less() -> None:
    """Compute-bound: the roofline says about 1400 MHz fixes 105 ms; a miss still takes half
    the way to f_max at once (the model may be wrong exactly when it matters)."""
    controller = Controller(Config(), [spec()])
    cap = 1980
    for t in range(30):
        itl = 0.03 * 1980 / cap
        decision = controller.decide(
            float(t), [obs(running=3000.0 * itl, itl_q_s=itl, sm_clock_mhz=cap)]
        )[0]
        cap = decision.sm_clock_max_mhz
    low = cap
    smoothed = controller.arrays.state[k.ST_RUNNING_EW, 0]
    running = (0.105 * 3000.0 - 0.8 * smoothed) / 0.2
    decision = controller.decide(21.0, [obs(running=running, itl_q_s=0.09, sm_clock_mhz=cap)])[0]
    assert decision.sm_clock_max_mhz >= low + (1980 - low) / 2


def test_a_clock_that_missed_the_slo_is_avoided_for_a_while() -> None:
    misses, caps, _ = run_cliff(0.3)
    falls = sum(1 for a, b in itertools.pairwise(misses) if b and not a)
    assert 1 <= falls <= 4
    assert sum(misses) <= 6
    # Between falls it sits just above the cliff, not back at f_max.
    assert 1400 <= np.median(caps[100:]) <= 1600


def test_a_shallow_cliff_is_handled_by_the_tail_guard_without_misses() -> None:
    misses, caps, controller = run_cliff(0.12)
    assert not any(misses)
    assert np.mean(caps[50:]) >= 1400
    assert controller.group_state()[0]["safe_clock_mhz"] is None


def test_prefill_headroom_learned_from_a_saturated_queue_bounds_the_descent() -> None:
    """Requests waited while prompts ran at 20k tok/s at f_max: prefill capacity ~10 tok/s/MHz.
    A 10k tok/s prompt load then needs ~1650 MHz to keep 40 % headroom for bursts."""
    controller = Controller(Config(), [spec()])
    cap = 1980
    for t in range(3):
        decision = controller.decide(
            float(t), [obs(prompt_tokens_per_s=20000.0, waiting=2.0, sm_clock_mhz=cap)]
        )[0]
        cap = decision.sm_clock_max_mhz
    caps = []
    for t in range(100):
        decision = controller.decide(
            10.0 + t, [obs(prompt_tokens_per_s=10000.0, sm_clock_mhz=cap)]
        )[0]
        cap = decision.sm_clock_max_mhz
        caps.append(cap)
    headroom = controller.group_state()[0]["prefill_min_clock_mhz"]
    assert headroom == pytest.approx(10000.0 / (20000.0 / 1980.0 * 0.6), rel=0.02)
    assert headroom - 15 <= min(caps[-30:]) <= headroom + 45


def learned_prefill_per_mhz(ticks: list[tuple[float, float]], per_chunk: bool) -> float:
    """The prefill capacity (prompt tokens/s per MHz) learned at f_max from (waiting, prompt
    tokens/s) ticks."""
    controller = Controller(Config(), [spec()])
    for t, (waiting, prompt_tps) in enumerate(ticks):
        controller.decide(
            float(t),
            [
                obs(
                    waiting=waiting,
                    prompt_tokens_per_s=prompt_tps,
                    sm_clock_mhz=1980,
                    prompt_per_chunk=per_chunk,
                )
            ],
        )
    return float(controller.arrays.state[k.ST_PREFILL_K, 0])


def test_a_prompt_counted_whole_at_its_first_token_is_learned_over_three_ticks() -> None:
    """vLLM counts a chunked prompt in the tick of its first token: 30k tokens after two ticks of
    none are three ticks of prefill, not a capacity of 30k tokens/s."""
    lumped = [(2.0, 0.0), (2.0, 0.0), (2.0, 30000.0)]
    assert learned_prefill_per_mhz(lumped, per_chunk=True) == pytest.approx(30000.0 / 1980)
    assert learned_prefill_per_mhz(lumped, per_chunk=False) == pytest.approx(10000.0 / 1980)
    # A tick without a queue ends the run: prefill may have idled in it.
    broken = [(2.0, 0.0), (0.0, 0.0), (2.0, 0.0), (2.0, 30000.0)]
    assert math.isnan(learned_prefill_per_mhz(broken, per_chunk=False))
    assert learned_prefill_per_mhz([*broken, (2.0, 15000.0)], per_chunk=False) == pytest.approx(
        15000.0 / 1980
    )


def test_where_prompts_are_counted_whole_the_headroom_waits_for_four_samples() -> None:
    """The first runs with a queue read the capacity low; per-chunk counters bind at once."""
    bounds: dict[bool, list[object]] = {}
    for per_chunk in (True, False):
        controller = Controller(Config(), [spec()])
        bounds[per_chunk] = []
        for t in range(8):
            tick = obs(
                waiting=2.0,
                prompt_tokens_per_s=10000.0,
                sm_clock_mhz=1980,
                prompt_per_chunk=per_chunk,
            )
            controller.decide(float(t), [tick])
            bounds[per_chunk].append(controller.group_state()[0]["prefill_min_clock_mhz"])
    assert all(b is not None for b in bounds[True])
    # Samples from the third tick on (runs of three): the fourth comes at the sixth tick.
    assert bounds[False][:5] == [None] * 5
    assert all(b is not None for b in bounds[False][5:])


def test_a_sudden_queue_raises_within_one_tick_in_proportion() -> None:
    raised = []
    for waiting in (10.0, 16.0, 28.0):
        controller, low = lowered()
        decision = controller.decide(100.0, [obs(waiting=waiting, sm_clock_mhz=low)])[0]
        assert "queue" in decision.reason
        raised.append(decision.sm_clock_max_mhz - low)
    assert 0 < raised[0] < raised[1] < raised[2]
    assert raised[2] >= 0.7 * (1980 - low)


def test_settles_at_the_least_power_clock_and_dithers_within_the_slew_limit() -> None:
    """Power is U-shaped in the clock (least at 1500 MHz) and latency is slack throughout."""
    config = Config(control=ControlConfig(max_step_down_mhz=20, dither_mhz=15))
    controller = Controller(config, [spec()])
    rng = np.random.default_rng(0)
    cap = 1980
    caps = []
    for t in range(300):
        power = 300.0 * (1.0 + ((cap - 1500.0) / 500.0) ** 2) * (1.0 + rng.normal(0.0, 0.005))
        decision = controller.decide(
            float(t), [obs(energy_j=power, power_w=power, sm_clock_mhz=cap)]
        )[0]
        cap = decision.sm_clock_max_mhz
        caps.append(cap)
    assert abs(np.mean(caps[-100:]) - 1500.0) <= 30
    assert controller.group_state()[0]["energy_opt_clock_mhz"] == pytest.approx(1500, abs=40)
    # The +15/-15 dither would be a 30 MHz drop; the 20 MHz slew limit holds.
    assert len(set(caps[-50:])) > 1
    assert min(np.diff(caps)) >= -20


def test_after_a_raise_holds_then_comes_back_geometrically() -> None:
    controller, low = lowered()
    cap = low
    for t in range(10):  # requests' ITL past the SLO until the controller jumps
        decision = controller.decide(100.0 + t, [obs(running=450.0, sm_clock_mhz=cap)])[0]
        cap = decision.sm_clock_max_mhz
        if cap >= low + (1980 - low) / 2:
            break
    caps = [cap]
    for t in range(14):
        caps.append(controller.decide(120.0 + t, [obs(sm_clock_mhz=caps[-1])])[0].sm_clock_max_mhz)
    assert caps[0] >= low + (1980 - low) / 2
    # Requests' ITL estimate lags, so it may still raise a little; after the last raise it holds
    # (hysteresis), then comes back a share of the way per tick: the biggest steps first, none
    # past the slew limit.
    last = max(i for i in range(1, len(caps)) if caps[i] > caps[i - 1]) if caps[1] > caps[0] else 0
    assert caps[last : last + 4] == [caps[last]] * 4
    drops = [a - b for a, b in itertools.pairwise(caps[last:]) if b < a]
    assert len(drops) >= 3
    assert max(drops) <= ControlConfig().max_step_down_mhz
    assert drops[0] > drops[-1]
    assert drops == sorted(drops, reverse=True)
    assert caps[-1] < caps[last]


def test_no_chatter_when_settled() -> None:
    caps = drive(Controller(Config(), [spec()]), 120)
    settled = caps[60:]
    assert max(settled) - min(settled) <= 2 * 15  # only the dither moves it
    still = drive(Controller(Config(control=ControlConfig(dither_mhz=0)), [spec()]), 120)
    assert len(set(still[60:])) == 1


def test_stale_goes_to_defaults_at_once() -> None:
    controller, low = lowered(Config(control=ControlConfig(power_limit="track")))
    assert controller.decide(50.0, [obs(sm_clock_mhz=low)])[0].power_limit_mw is not None
    decision = controller.decide(51.0, [obs(stale=True, sm_clock_mhz=low)])[0]
    assert decision.sm_clock_max_mhz == 1980
    assert decision.power_limit_mw is None
    assert "stale" in decision.reason


def test_missing_observation_counts_as_stale_and_unknown_groups_are_ignored() -> None:
    controller = Controller(Config(), [spec("a"), spec("b")])
    drive(controller, 30)
    decisions = controller.decide(40.0, [obs("b"), obs("nobody")])
    assert [d.group for d in decisions] == ["a", "b"]
    assert decisions[0].sm_clock_max_mhz == 1980
    assert "stale" in decisions[0].reason
    assert decisions[1].sm_clock_max_mhz < 1980


def test_caps_are_supported_clocks_and_limits_within_constraints() -> None:
    config = Config(control=ControlConfig(power_limit="track"))
    controller = Controller(config, [spec(clocks=ODD_CLOCKS)])
    caps = drive(controller, 30)
    odd_floor = group_floor_mhz(ODD_CLOCKS, 1980, None)
    assert caps[-10:] == [odd_floor] * 10  # settled; no dither on a table coarser than it
    caps.append(controller.decide(31.0, [obs(itl_q_s=0.094)])[0].sm_clock_max_mhz)
    caps.append(controller.decide(32.0, [obs(itl_q_s=0.2)])[0].sm_clock_max_mhz)
    assert set(caps) <= set(ODD_CLOCKS)
    assert min(caps) == odd_floor  # the floor rounded up to a supported clock
    # A coarse table still comes down: within the slew limit, or one supported clock per tick
    # where a single step is wider than that.
    slew_mhz = ControlConfig().max_step_down_mhz
    for a, b in itertools.pairwise(caps[:30]):
        assert b >= a or a - b <= slew_mhz or ODD_CLOCKS.index(a) - ODD_CLOCKS.index(b) == 1
    high = Controller(config, [spec()])
    limits = [
        high.decide(float(t), [obs(energy_j=e, power_w=e)])[0].power_limit_mw
        for t, e in enumerate((50.0, 900.0, 300.0))
    ]
    assert all(lim is not None and 200_000 <= lim <= 700_000 for lim in limits)
    assert limits[0] == 200_000 and limits[1] == 700_000


def test_missing_and_bad_fields_do_not_break_the_tick() -> None:
    controller = Controller(Config(), [spec()])
    weird = obs(
        energy_j=None,
        power_w=float("nan"),
        generation_tokens_per_s=-5.0,
        itl_q_s=None,
        ttft_q_s=float("inf"),
        running=None,
        waiting=None,
        interval_s=0.0,
        gpu_count=0,
    )
    for t in range(5):
        decision = controller.decide(float(t), [weird])[0]
        assert decision.sm_clock_max_mhz in H100_CLOCKS
    state = controller.group_state()[0]
    assert state["tokens_per_joule"] is None


def test_off_mode_observes_only() -> None:
    config = Config(mode="off")
    controller = Controller(config, [spec(), spec("g1")])
    for t in range(30):
        decisions = controller.decide(float(t), [obs(), obs("g1", itl_q_s=0.5)])
        for d in decisions:
            assert d.sm_clock_max_mhz == 1980
            assert d.power_limit_mw is None
            assert d.mode == "off"


def target_plant(cap_mhz: float) -> GroupObservation:
    """Energy falls with the clock: tokens/J rises from 5 at 1980 MHz to 10 at 990 MHz."""
    tokens = 3000.0
    tpj = 5.0 + 5.0 * (1980.0 - cap_mhz) / 990.0
    return obs(energy_j=tokens / tpj, power_w=tokens / tpj, sm_clock_mhz=cap_mhz)


def run_target(target: float, ticks: int = 150) -> tuple[list[int], Controller]:
    controller = Controller(Config(mode="target", target_tokens_per_joule=target), [spec()])
    cap = 1980.0
    caps = []
    for t in range(ticks):
        cap = controller.decide(float(t), [target_plant(cap)])[0].sm_clock_max_mhz
        caps.append(int(cap))
    return caps, controller


def test_target_mode_reaches_a_reachable_target_with_the_least_clock_reduction() -> None:
    caps, controller = run_target(7.0)
    state = controller.group_state()[0]
    assert state["target_reached"] is True
    assert state["target_tokens_per_joule"] == 7.0
    # 7 tokens/J needs <= 1584 MHz here; it stays near that, well above the floor.
    settled = np.mean(caps[-50:])
    assert 1450 <= settled <= 1600


def test_target_mode_unreachable_holds_the_efficient_point() -> None:
    caps, controller = run_target(50.0)
    state = controller.group_state()[0]
    assert state["target_reached"] is False
    assert max(caps[-30:]) <= 990 + 15


def test_budget_mode_shares_the_budget_and_favours_the_group_under_pressure() -> None:
    budget_w = 1000.0
    config = Config(mode="budget", node_power_budget_w=budget_w)
    groups = [spec("a", gpus=2), spec("b", gpus=2)]
    controller = Controller(config, groups)
    for t in range(20):
        decisions = controller.decide(
            float(t),
            [obs("a", energy_j=500.0, gpu_count=2), obs("b", energy_j=300.0, gpu_count=2)],
        )
        limits = [d.power_limit_mw for d in decisions]
        assert all(lim is not None and 200_000 <= lim <= 700_000 for lim in limits)
        assert sum(2 * lim for lim in limits if lim is not None) <= budget_w * 1000
    assert limits[0] is not None and limits[1] is not None and limits[0] > limits[1]
    squeezed = controller.decide(
        30.0,
        [obs("a", energy_j=500.0, gpu_count=2), obs("b", itl_q_s=0.2, gpu_count=2)],
    )
    lim_a, lim_b = (d.power_limit_mw for d in squeezed)
    assert lim_a is not None and lim_b is not None and lim_b > lim_a
    assert 2 * (lim_a + lim_b) <= budget_w * 1000


def test_in_budget_mode_a_stale_group_keeps_a_share_within_the_budget() -> None:
    """A server that stops answering still draws: its group goes back to default clocks, but
    its GPUs keep the share they had (an even one if they never had one), and the other
    groups share only what is left. Before, it went to its 700 W default and the others to
    their minimum: 900 W of limits on a 600 W budget."""
    budget_w = 600.0
    config = Config(mode="budget", node_power_budget_w=budget_w)
    controller = Controller(config, [spec("a"), spec("b")])
    for t in range(20):
        before = controller.decide(float(t), [obs("a", energy_j=400.0), obs("b", energy_j=300.0)])
    assert before[0].power_limit_mw is not None
    held = min(before[0].power_limit_mw, 300_000)  # up to an even share of the budget
    for t in range(20, 40):
        decisions = controller.decide(float(t), [obs("a", stale=True), obs("b", itl_q_s=0.2)])
        stale, other = decisions
        assert "stale" in stale.reason and stale.sm_clock_max_mhz == 1980
        assert stale.power_limit_mw == held
        assert other.power_limit_mw is not None
        assert stale.power_limit_mw + other.power_limit_mw <= budget_w * 1000
    # The budget cut (a reload) while the group is stale: its share shrinks with the rest.
    controller.reconfigure(Config(mode="budget", node_power_budget_w=450.0), [spec("a"), spec("b")])
    cut = controller.decide(40.0, [obs("a", stale=True), obs("b", itl_q_s=0.2)])
    assert all(d.power_limit_mw is not None for d in cut)
    assert sum(d.power_limit_mw or 0 for d in cut) <= 450_000
    assert "budget below" not in cut[0].reason
    # Stale from the first tick: an even share.
    fresh = Controller(config, [spec("a"), spec("b")])
    first = fresh.decide(0.0, [obs("a", stale=True), obs("b", energy_j=300.0)])
    assert first[0].power_limit_mw == 300_000
    assert sum(d.power_limit_mw or 700_000 for d in first) <= budget_w * 1000


def test_budget_below_the_minimum_limits_says_so() -> None:
    config = Config(mode="budget", node_power_budget_w=300.0)
    controller = Controller(config, [spec("a", gpus=2)])
    decision = controller.decide(0.0, [obs("a", gpu_count=2)])[0]
    assert decision.power_limit_mw == 200_000
    assert "budget" in decision.reason
    assert controller.group_state()[0]["budget_feasible"] is False


def test_reconfigure_keeps_learned_state_of_remaining_groups() -> None:
    controller = Controller(Config(), [spec("a"), spec("b")])
    drive(controller, 40)
    before = controller.group_state()
    config = Config(mode="efficiency", control=ControlConfig(slo_margin=0.8))
    controller.reconfigure(config, [spec("b"), spec("c")])
    after = controller.group_state()
    assert [s["group"] for s in after] == ["b", "c"]
    assert after[0]["base_clock_mhz"] == before[1]["base_clock_mhz"]
    assert after[0]["knee_mhz"] == before[1]["knee_mhz"]
    assert after[1]["base_clock_mhz"] is None
    decisions = controller.decide(50.0, [obs("b"), obs("c")])
    assert decisions[0].sm_clock_max_mhz < 1100
    assert decisions[1].sm_clock_max_mhz >= 1980 - 45
    controller.reconfigure(Config(control=ControlConfig(min_clock_mhz=1500)), [spec("b")])
    assert controller.group_state()[0]["base_clock_mhz"] is None


def test_group_state_reports_mode_target_floor_and_learned_figures() -> None:
    controller = Controller(Config(), [spec()])
    drive(controller, 30)
    state = controller.group_state()[0]
    assert state["mode"] == "efficiency"
    assert state["target_reached"] is None
    assert state["floor_mhz"] == FLOOR_MHZ
    assert 0.2 * 1980 <= state["knee_mhz"] <= 1.5 * 1980
    assert state["tokens_per_joule"] == pytest.approx(3000.0 / 300.0)
    for key in ("slo_min_clock_mhz", "power_slope_w_per_mhz", "load_bin", "sm_clock_max_mhz"):
        assert state[key] is not None


def test_duplicate_group_names_are_rejected_with_a_sentence() -> None:
    with pytest.raises(ValueError, match="listed twice"):
        Controller(Config(), [spec("a"), spec("a")])
    with pytest.raises(ValueError, match="at least one GPU"):
        Controller(Config(), [replace(spec(), gpus=())])


def test_warmup_leaves_state_untouched() -> None:
    controller = Controller(Config(), [spec()])
    controller.warmup()
    assert not controller.arrays.state.any()
    Controller(Config(), []).warmup()


_WARMUP_PROBE = """
import json
from powerd.config import Config
from powerd.control import kernels as k
from powerd.control.policy import Controller
from tests.unit.test_control_kernels import obs, spec

def compiled():
    return {f.__name__: len(f.signatures) for f in (k.controller_step, k.prefill_guard)}

controller = Controller(Config(), [spec()])
before = compiled()
controller.warmup()
warm = compiled()
controller.decide(0.0, [obs()])
controller.prefill_guard({"g0": 1e9})
print(json.dumps({"before": before, "warm": warm, "used": compiled()}))
"""


def test_warmup_compiles_every_kernel_a_tick_uses() -> None:
    """DESIGN: kernels are compiled before READY=1, so the first tick does not stall for the
    compiler. In a fresh interpreter (here any earlier test may have compiled them): nothing
    compiled before warmup, everything after, and a tick and a guard read compile nothing more."""
    proc = subprocess.run(
        [sys.executable, "-c", _WARMUP_PROBE],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    counts = json.loads(proc.stdout)
    assert counts["before"] == {"controller_step": 0, "prefill_guard": 0}
    assert counts["warm"] == {"controller_step": 1, "prefill_guard": 1}
    assert counts["used"] == counts["warm"]


_COLD_PROBE = """
import json, logging
logging.basicConfig(level=logging.INFO, format="%(message)s")
from powerd.config import Config
from powerd.control import kernels as k
from powerd.control.numba_cache import holds_kernels
from powerd.control.policy import Controller
from tests.unit.test_control_kernels import spec

assert not k.CACHE_WARM
Controller(Config(), [spec()]).warmup()
counts = {
    f.__name__: [sum(f.stats.cache_hits.values()), sum(f.stats.cache_misses.values())]
    for f in (k.controller_step, k.prefill_guard)
}
counts["marked"] = holds_kernels(k.CACHE_DIR, k.CACHE_STAMP)
print(json.dumps(counts))
"""


def test_a_cold_start_compiles_the_kernels_in_a_child_and_loads_them() -> None:
    """The compiler keeps about 110 MiB in the process that compiled (256 MiB of RSS after a
    cold warmup against 144 MiB warm), which a daemon would carry to its end: the first start
    compiles in a child, and the daemon loads every kernel from the cache, compiling none."""
    with tempfile.TemporaryDirectory() as cache:
        # What a child killed part-way leaves: kernel files, no mark that they are all there.
        partial = cache_dir(cache)
        partial.mkdir(parents=True)
        (partial / "policy.controller_step-1.py311.nbi").write_bytes(b"")
        proc = subprocess.run(
            [sys.executable, "-c", _COLD_PROBE],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO), "NUMBA_CACHE_DIR": cache},
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
    assert proc.returncode == 0, proc.stderr
    assert "compiling the control kernels into" in proc.stderr
    assert "failed" not in proc.stderr
    hits_misses = json.loads(proc.stdout)
    assert hits_misses == {"controller_step": [1, 0], "prefill_guard": [1, 0], "marked": True}


def test_a_child_that_cannot_compile_leaves_the_compiling_here(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(k, "CACHE_WARM", False)
    monkeypatch.setattr(policy, "_cache_filled", False)
    monkeypatch.setattr(sys, "executable", "/nonexistent/python3")
    controller = Controller(Config(), [spec()])
    with caplog.at_level(logging.INFO, logger="powerd.control"):
        controller.warmup()
        controller.warmup()
    assert [r.getMessage()[:52] for r in caplog.records if r.levelno >= logging.WARNING] == [
        "compiling the kernels in a child process failed ([Er"
    ], "tried once a process, then compiled here"
    assert not controller.arrays.state.any()


def test_compile_apart_runs_this_powerd_with_the_folder_and_says_how_it_ended(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The child imports the powerd the daemon runs, wherever the daemon was started: the
    README has operators run powerd from a source tree, which may be another version."""
    package = Path(policy.__file__).resolve().parent.parent
    decoy = tmp_path / "elsewhere" / "powerd"
    decoy.mkdir(parents=True)
    (decoy / "__init__.py").write_text("raise ImportError('another checkout')\n")
    monkeypatch.chdir(decoy.parent)
    code = (
        "import os, powerd; from pathlib import Path; "
        f"assert Path(powerd.__file__).resolve().parent == Path({str(package)!r}); "
        f"assert os.environ['NUMBA_CACHE_DIR'] == {str(tmp_path)!r}"
    )
    assert compile_apart(tmp_path, code)
    with caplog.at_level(logging.WARNING, logger="powerd.control"):
        assert not compile_apart(tmp_path, "raise SystemExit('no compiler here')")
        assert not compile_apart(tmp_path, "import time; time.sleep(5)", timeout_s=0.5)
    messages = [r.getMessage() for r in caplog.records]
    assert "failed (no compiler here); compiling here" in messages[0]
    assert "failed (it took longer than 0.5 s); compiling here" in messages[1]


@given(st.floats(min_value=0.0, max_value=3000.0))
def test_clamp_clock_down_matches_gpu_info(clock: float) -> None:
    info = gpu(0, ODD_CLOCKS)
    row = np.array(ODD_CLOCKS, dtype=np.float64)
    assert k.clamp_clock_down(row, len(row), clock) == info.clamp_clock_mhz(clock)
    up = k.clamp_clock_up(row, len(row), clock)
    assert up in ODD_CLOCKS
    assert up >= clock or up == ODD_CLOCKS[-1]
    assert all(c < clock for c in ODD_CLOCKS if c < up)


@given(
    st.floats(min_value=0.2, max_value=1.5),
    st.floats(min_value=600.0, max_value=1980.0),
    st.floats(min_value=0.5, max_value=1.2),
)
def test_roofline_inverse_inverts_the_ratio(kappa: float, f_from: float, share: float) -> None:
    latency = 0.02
    aim = latency * share
    f = k.roofline_inverse(kappa, 1980.0, f_from, latency, aim)
    if math.isinf(f):
        # Not even an infinite clock gets there: the memory-bound part alone exceeds aim.
        assert latency * k.roofline_ratio(kappa, 1980.0, 1e9, f_from) >= aim * (1 - 1e-9)
    else:
        assert latency * k.roofline_ratio(kappa, 1980.0, f, f_from) == pytest.approx(aim)
        # Never better than 1/f scaling (roofline bound).
        assert f >= f_from * share**-1 * (1 - 1e-9) or share >= 1.0


@settings(max_examples=200, deadline=None)  # the first example may compile the kernel
@given(
    st.lists(
        st.tuples(
            st.integers(min_value=1, max_value=8),
            st.floats(min_value=0.0, max_value=900_000.0),
            st.booleans(),
            st.floats(min_value=0.5, max_value=2.0),
        ),
        min_size=1,
        max_size=6,
    ),
    st.floats(min_value=0.0, max_value=20_000_000.0),
)
def test_allocate_budget_stays_within_budget_and_constraints(
    groups: list[tuple[int, float, bool, float]], budget_mw: float
) -> None:
    n = len(groups)
    count = np.array([g[0] for g in groups], dtype=np.float64)
    need = np.array([g[1] for g in groups])
    fixed = np.array([700_000.0 if g[2] else np.nan for g in groups])
    weight = np.array([g[3] for g in groups])
    lo = np.full(n, 200_000.0)
    hi = np.full(n, 700_000.0)
    limit = np.zeros(n)
    ok = k.allocate_budget(budget_mw, count, lo, hi, need, fixed, weight, limit)
    assert np.all(limit >= lo) and np.all(limit <= hi)
    assert np.all(limit == np.floor(limit))
    minimum = float(np.sum(np.where(np.isnan(fixed), lo, fixed) * count))
    assert ok == (minimum <= budget_mw)
    if ok:
        assert float(np.sum(limit * count)) <= budget_mw + 1e-6
        free = np.isnan(fixed)
        # A group never gets more than its need while another still lacks part of its own.
        short = free & (limit < np.clip(need, lo, hi) - 1)
        if short.any():
            assert np.all(limit[free] <= np.clip(need[free], lo[free], hi[free]) + 1)


def kappa_cells(kappa: float, weight: float = 5.0) -> np.ndarray:
    """One demand bin of cells filled from an exact roofline with this knee."""
    cells = np.zeros((16, k.N_CELL))
    width = (1980.0 - 990.0) / 16
    for c in range(0, 16, 2):
        f = 990.0 + (c + 0.5) * width
        latency = 0.01 * (1.0 + (kappa * 1980.0 / f) ** 4) ** 0.25
        cells[c, k.CELL_W_ITL] = weight
        cells[c, k.CELL_ITL_SUM] = weight * latency
    return cells


@pytest.mark.parametrize("kappa", [0.4, 0.7, 1.0])
def test_fit_kappa_learns_the_knee_shrunk_to_the_prior(kappa: float) -> None:
    width = (1980.0 - 990.0) / 16
    fitted = k.fit_kappa(kappa_cells(kappa), 990.0, width, 1980.0)
    shrunk = (30 * kappa + 3 * 0.7) / 33  # evidence capped at 30 against a prior weight of 3
    assert fitted == pytest.approx(shrunk, abs=0.02)
    one_bin = np.zeros((16, k.N_CELL))
    one_bin[5] = kappa_cells(kappa)[4]
    assert k.fit_kappa(one_bin, 990.0, width, 1980.0) == pytest.approx(0.7)


def test_power_model_finds_the_clock_of_least_power() -> None:
    """Exponentially weighted fit of P = a + b*demand + c*(f - f*)^2 recovers f* and the slope."""
    rng = np.random.default_rng(0)
    efit = np.zeros(k.N_EFIT)
    for _ in range(300):
        f = rng.uniform(990.0, 1980.0)
        demand = rng.uniform(1000.0, 5000.0)
        power = 100.0 + 0.01 * demand + 1e-4 * (f - 1400.0) ** 2 + rng.normal(0.0, 0.5)
        phi = np.array([1.0, demand / 1000.0, 0.0, (f - 1980.0) / 1000.0, 0.0])
        phi[4] = phi[3] ** 2
        y = power / 100.0
        efit *= 0.98
        efit[: k.EFIT_B] += np.outer(phi, phi).ravel()
        efit[k.EFIT_B : k.EFIT_B + k.EFIT_N] += phi * y
        efit[k.EFIT_YY] += y * y
        efit[k.EFIT_W] += 1.0
    fit = np.zeros(k.N_FIT)
    assert k.power_fit(efit, np.zeros((k.EFIT_N, k.EFIT_N)), fit)
    assert k.power_vertex_mhz(fit, 1980.0) == pytest.approx(1400.0, abs=30.0)
    slope, t = k.power_slope_at(fit, 1800.0, 1980.0)
    assert slope == pytest.approx(2e-4 * 400.0, rel=0.1)
    assert t > 10
    assert k.power_slope_at(fit, 1100.0, 1980.0)[1] < -10
    assert not k.power_fit(np.zeros(k.N_EFIT), np.zeros((k.EFIT_N, k.EFIT_N)), fit)
    assert math.isnan(k.power_vertex_mhz(fit, 1980.0))


def test_power_fit_matches_the_ridge_solution_and_its_inverse_normal_matrix() -> None:
    """Coefficients and the clock block of the inverse are those of the ridged normal equations."""
    rng = np.random.default_rng(1)
    phis = rng.normal(size=(200, k.EFIT_N))
    phis[:, 0] = 1.0
    phis[:, k.EFIT_XX] = phis[:, k.EFIT_X] ** 2
    y = phis @ np.array([1.2, 0.3, -0.1, 0.05, 0.4]) + rng.normal(0.0, 0.01, 200)
    efit = np.zeros(k.N_EFIT)
    efit[: k.EFIT_B] = (phis.T @ phis).ravel()
    efit[k.EFIT_B : k.EFIT_B + k.EFIT_N] = phis.T @ y
    efit[k.EFIT_YY] = y @ y
    efit[k.EFIT_W] = 200.0
    fit = np.zeros(k.N_FIT)
    assert k.power_fit(efit, np.zeros((k.EFIT_N, k.EFIT_N)), fit)
    ridged = phis.T @ phis + np.diag([0.0] + [1e-6 * 200.0] * (k.EFIT_N - 1))
    inverse = np.linalg.inv(ridged)
    theta = inverse @ (phis.T @ y)
    np.testing.assert_allclose(fit[k.FIT_THETA : k.FIT_THETA + k.EFIT_N], theta, rtol=1e-9)
    assert fit[k.FIT_V_X] == pytest.approx(inverse[k.EFIT_X, k.EFIT_X], rel=1e-9)
    assert fit[k.FIT_V_X_XX] == pytest.approx(inverse[k.EFIT_X, k.EFIT_XX], rel=1e-9)
    assert fit[k.FIT_V_XX] == pytest.approx(inverse[k.EFIT_XX, k.EFIT_XX], rel=1e-9)


def test_a_late_first_token_raises_to_the_clock_that_serves_it_and_bounds_the_descent() -> None:
    """TTFT of a long prompt scales as 1/f: 2.4 s near the floor (about 1000 MHz) needs about
    2.4 x 1000 / (0.9 x 2 s) = 1330 MHz. The controller goes there within the tick, and the
    memory of that prompt keeps it from lowering back to the floor for a while."""
    controller, low = lowered()
    assert low <= FLOOR_MHZ + 15
    decision = controller.decide(100.0, [obs(ttft_q_s=2.45, ttft_slowest_s=2.4, sm_clock_mhz=low)])[
        0
    ]
    needed = 2.4 * low / (0.9 * SLO.ttft_s)
    assert "first token" in decision.reason
    assert needed <= decision.sm_clock_max_mhz <= needed + 15
    caps = [decision.sm_clock_max_mhz]
    for t in range(10):
        caps.append(controller.decide(101.0 + t, [obs(sm_clock_mhz=caps[-1])])[0].sm_clock_max_mhz)
    # Slack again, but the slowest recent first token still needs most of that clock.
    assert min(caps) >= 0.8 * needed


def test_the_slowest_first_token_estimate_outranks_the_bucketed_p95() -> None:
    """A p95 read near the top of vLLM's 1-2.5 s bucket is not a miss when the histogram's sum
    places the slow request at 1.1 s: no raise for the time to first token."""
    controller, low = lowered()
    decision = controller.decide(100.0, [obs(ttft_q_s=2.4, ttft_slowest_s=1.1, sm_clock_mhz=low)])[
        0
    ]
    assert "first token" not in decision.reason
    assert decision.sm_clock_max_mhz <= low + 15


def queue_decision(finished_per_s: float) -> tuple[int, GroupDecision]:
    """Lowered on slack ticks finishing `finished_per_s` requests at 6000 prompt tokens/s, then
    six requests wait: a tick with one waiting teaches the prefill capacity first."""
    controller = Controller(Config(), [spec()])
    low = drive(controller, 40, finished_requests_per_s=finished_per_s)[-1]
    controller.decide(
        40.0, [obs(waiting=1.0, finished_requests_per_s=finished_per_s, sm_clock_mhz=low)]
    )
    decision = controller.decide(
        41.0, [obs(waiting=6.0, finished_requests_per_s=finished_per_s, sm_clock_mhz=low)]
    )[0]
    return low, decision


def test_a_queue_of_long_prompts_raises_to_the_clock_that_drains_it_in_time() -> None:
    """5 requests/s at 6000 prompt tokens/s: 1200 tokens each. Six waiting are 7200 tokens; at
    the learned 6000 tokens/s at this clock that is 1.2 s of prefill, past the queue's share of
    the 2-s TTFT SLO: within the tick the clock goes up by 1.2 s over that budget (prefill time
    scales as 1/f)."""
    low, decision = queue_decision(5.0)
    budget_s = k._QUEUE_WAIT_SHARE * SLO.ttft_s
    assert budget_s < 1.2
    assert decision.reason == "raise: queue"
    needed = low * 1.2 / budget_s
    assert needed <= decision.sm_clock_max_mhz <= needed + 15


def test_a_queue_of_short_prompts_is_no_reason_to_raise() -> None:
    """120 tokens each: 0.12 s of prefill. Only the one-tick burst boost (prefill at its learned
    capacity while requests wait) lifts this tick's cap; the chosen clock stays."""
    low, decision = queue_decision(50.0)
    assert "queue" not in decision.reason
    assert decision.sm_clock_max_mhz <= 1.25 * low + 15


def test_a_miss_under_an_unlocked_cap_teaches_no_safe_clock() -> None:
    """A full queue at the floor is blamed on the floor. After the raise to f_max the GPUs run
    at 1935 MHz, held by their power limit, and the queue is still full: those misses happened
    with the clock unlocked, so they say nothing about any clock."""
    controller, low = lowered()
    decision = controller.decide(100.0, [obs(waiting=100.0, sm_clock_mhz=low)])[0]
    assert decision.sm_clock_max_mhz == 1980
    for t in range(4):
        controller.decide(101.0 + t, [obs(waiting=100.0, sm_clock_mhz=1935)])
    safe = controller.group_state()[0]["safe_clock_mhz"]
    assert safe is not None and safe <= low + 15


def prefill_bound(weighted: float | None) -> tuple[int, float]:
    """Lowered at 6000 prompt tokens/s; one tick with a request waiting teaches the prefill
    capacity (6000 tokens/s at this clock). Returns the clock and the prefill-headroom bound."""
    controller = Controller(Config(), [spec()])
    low = drive(controller, 40, prompt_tokens_weighted_mean=weighted)[-1]
    controller.decide(
        40.0, [obs(waiting=1.0, sm_clock_mhz=low, prompt_tokens_weighted_mean=weighted)]
    )
    bound = controller.group_state()[0]["prefill_min_clock_mhz"]
    assert bound is not None
    return low, bound


@pytest.mark.parametrize("weighted", [1000.0, 8000.0])
def test_prefill_headroom_is_the_queue_capacity_for_the_prompt_mix(weighted: float) -> None:
    """Prefill as a first-come queue at load a = 6000 tokens/s: a new request waits
    a*L / (2c(c - a)) on average at capacity c (Pollaczek-Khinchine, L = E[P^2]/E[P]). The bound
    is the clock whose capacity makes that 0.1 of the 2-s TTFT SLO."""
    low, bound = prefill_bound(weighted)
    a, wait_s = 6000.0, k._PREFILL_WAIT_SHARE * SLO.ttft_s
    c = bound * 6000.0 / low
    assert a * weighted / (2 * c * (c - a)) == pytest.approx(wait_s, rel=1e-6)


def test_a_longer_prompt_tail_needs_more_prefill_headroom() -> None:
    _, short_tail = prefill_bound(1000.0)
    _, long_tail = prefill_bound(8000.0)
    assert long_tail > 1.5 * short_tail


def test_without_a_prompt_mix_the_prefill_headroom_is_a_utilisation() -> None:
    low, bound = prefill_bound(None)
    assert bound == pytest.approx(low / k._PREFILL_UTIL)


def test_a_lone_late_first_token_teaches_the_safe_clock() -> None:
    """One first token at 2.6 s leaves the smoothed TTFT under the SLO, but a request missed:
    the clocks allowed over the last few ticks are not safe at this demand."""
    controller, low = lowered()
    assert controller.group_state()[0]["safe_clock_mhz"] is None
    controller.decide(100.0, [obs(sm_clock_mhz=low, ttft_slowest_s=2.6)])
    safe = controller.group_state()[0]["safe_clock_mhz"]
    assert safe is not None and safe > low


@pytest.mark.parametrize("weighted", [1e15, 1e-9])
def test_an_absurd_prompt_mix_keeps_the_clock_within_the_device(weighted: float) -> None:
    _, bound = prefill_bound(weighted)
    controller = Controller(Config(), [spec()])
    caps = drive(controller, 30, prompt_tokens_weighted_mean=weighted, waiting=1.0)
    assert all(FLOOR_MHZ <= cap <= 1980 for cap in caps)
    assert math.isfinite(bound) and bound > 0


def test_a_tick_without_a_token_count_keeps_the_requests_itl_estimate() -> None:
    """SGLang counts decode tokens in batches: a tick with none counted while requests run
    says nothing about their inter-token latency, and the token-level quantile (chunked-prefill
    stalls) must not stand in for it."""
    controller, _ = lowered()
    state = controller.arrays.state
    estimate = float(state[k.ST_ITL_EST_S, 0])
    smoothed = float(state[k.ST_ITL_S, 0])
    assert estimate == pytest.approx(40.0 / 3000.0, rel=0.05)
    decision = controller.decide(
        100.0, [obs(generation_tokens_per_s=None, itl_q_s=0.09, sm_clock_mhz=FLOOR_MHZ)]
    )[0]
    assert float(state[k.ST_ITL_EST_S, 0]) == estimate
    assert float(state[k.ST_ITL_S, 0]) == pytest.approx(smoothed)
    assert not decision.reason.startswith("raise")


def test_prefill_capacity_is_learned_at_the_clock_the_prompt_work_ran_at() -> None:
    """A raise between ticks did part of the interval's prefill above the chosen cap: the
    capacity per MHz is the rate over the interval's clock, not over the chosen one."""
    plain = Controller(Config(), [spec()])
    raised = Controller(Config(), [spec()])
    for t in range(3):
        seen = obs(prompt_tokens_per_s=15000.0, waiting=2.0, sm_clock_mhz=1200.0)
        plain.decide(float(t), [seen])
        raised.decide(float(t), [replace(seen, interval_clock_cap_mhz=1500.0)])
    assert plain.arrays.state[k.ST_PREFILL_K, 0] == pytest.approx(15000.0 / 1200.0)
    assert raised.arrays.state[k.ST_PREFILL_K, 0] == pytest.approx(15000.0 / 1500.0)


def test_a_server_that_times_its_prefill_gives_the_capacity_without_a_queue() -> None:
    """TGI times its prefill passes: 0.5 s of prefill a second at 1200 MHz for 6000 prompt
    tokens/s (counted whole, 12000 every other tick) is a capacity of 10 tokens/s per MHz,
    learned once 5 s of prefill are in, with no request ever waiting."""
    controller = Controller(Config(), [spec()])
    state = controller.arrays.state
    for t in range(16):
        seen = obs(
            prompt_tokens_per_s=12000.0 if t % 2 else 0.0,
            prefill_busy_s=0.5,
            sm_clock_mhz=1200.0,
            prompt_per_chunk=False,
        )
        controller.decide(float(t), [seen])
        if t < 9:  # under 5 s of prefill
            assert math.isnan(float(state[k.ST_PREFILL_K, 0]))
    learned = controller.group_state()[0]
    assert learned["prefill_tokens_per_s_per_mhz"] == pytest.approx(10.0, rel=0.01)
    assert learned["prefill_min_clock_mhz"] is not None
    # Without the timing, whole prompts counted with no queue teach nothing.
    untimed = Controller(Config(), [spec()])
    for t in range(16):
        seen = obs(prompt_tokens_per_s=6000.0, sm_clock_mhz=1200.0, prompt_per_chunk=False)
        untimed.decide(float(t), [seen])
    assert math.isnan(float(untimed.arrays.state[k.ST_PREFILL_K, 0]))
    assert untimed.group_state()[0]["prefill_min_clock_mhz"] is None


def test_a_preemption_raises_to_f_max_and_teaches_the_safe_clock() -> None:
    """A server out of KV evicts requests to recompute later: more clock, fewer at once."""
    controller, low = lowered()
    decision = controller.decide(
        100.0, [obs(preemptions=3.0, kv_cache_usage=0.99, sm_clock_mhz=low)]
    )[0]
    assert decision.sm_clock_max_mhz == 1980
    assert "KV" in decision.reason
    safe = controller.group_state()[0]["safe_clock_mhz"]
    assert safe is not None and safe > low


def test_a_nearly_full_kv_cache_raises_in_proportion_and_stops_the_descent() -> None:
    controller, low = lowered()
    calm = controller.decide(100.0, [obs(kv_cache_usage=0.85, sm_clock_mhz=low)])[0]
    assert calm.sm_clock_max_mhz <= low + 15
    decision = controller.decide(101.0, [obs(kv_cache_usage=0.95, sm_clock_mhz=low)])[0]
    half_way = low + 0.5 * (1980 - low)
    assert half_way - 15 <= decision.sm_clock_max_mhz <= half_way + 15
    assert "KV" in decision.reason
    # At the line: up a clock step a tick until the cache drains below it, never down.
    caps = [decision.sm_clock_max_mhz]
    for t in range(10):
        tick = obs(kv_cache_usage=0.9, sm_clock_mhz=caps[-1])
        caps.append(controller.decide(102.0 + t, [tick])[0].sm_clock_max_mhz)
    assert np.all(np.diff(caps) >= 15)


def test_a_server_that_shows_first_tokens_neither_way_keeps_the_blind_minimum() -> None:
    blind_min = group_floor_mhz(H100_CLOCKS, 1980, math.ceil(BLIND_PREFILL_SHARE * 1980))
    blind = drive(Controller(Config(), [spec()]), 100, first_token_blind=True)
    assert min(blind) == blind_min
    assert blind[-1] <= blind_min + 15  # it settles there, give or take the dither
    assert blind_min - 15 < BLIND_PREFILL_SHARE * 1980 <= blind_min
    # The same slack from a server that does show them goes lower.
    seeing = drive(Controller(Config(), [spec()]), 100)
    assert min(seeing) < blind_min - 200
    # A queue still raises above it, at once.
    controller = Controller(Config(), [spec()])
    caps = drive(controller, 60, first_token_blind=True)
    decision = controller.decide(
        100.0, [obs(waiting=40.0, sm_clock_mhz=caps[-1], first_token_blind=True)]
    )[0]
    assert decision.sm_clock_max_mhz == 1980


def test_every_kernel_reason_has_one_of_the_exported_labels() -> None:
    codes = {v for name, v in vars(k).items() if name.startswith("REASON_")}
    assert set(policy.REASONS) == codes
    labels = [label for label, _ in policy.REASONS.values()]
    assert sorted(labels) == sorted(DECISION_REASONS)
    # A queue raise says so in both forms.
    controller = Controller(Config(), [spec()])
    drive(controller, 20)
    decision = controller.decide(20.0, [obs(waiting=60.0, sm_clock_mhz=1200.0)])[0]
    assert decision.reason_label == "raise_queue" and "queue" in decision.reason


def test_a_server_that_cannot_be_read_is_no_evidence_of_slack() -> None:
    controller, low = lowered(ticks=10)
    blank = obs(sm_clock_mhz=low, running=None, waiting=None, ttft_q_s=None, itl_q_s=None)
    silent = [controller.decide(100.0 + t, [blank])[0].sm_clock_max_mhz for t in range(8)]
    assert min(silent) >= low, "no signal must not lower the clock before it turns stale"


def test_a_boosted_tick_has_no_tracked_power_limit() -> None:
    config = Config(control=ControlConfig(power_limit="track"))
    controller, low = lowered(config, ticks=60)
    quiet = controller.decide(100.0, [obs(sm_clock_mhz=low)])[0]
    assert quiet.power_limit_mw is not None, "a quiet group tracks its drawn power"
    controller.decide(101.0, [obs(waiting=1.0, sm_clock_mhz=low)])
    burst = controller.decide(102.0, [obs(waiting=1.0, sm_clock_mhz=low)])[0]
    assert burst.sm_clock_max_mhz > low
    assert burst.power_limit_mw is None, "prefill at the boosted clock draws near the default"


def test_an_unlocked_group_of_mixed_models_unlocks_its_fastest_gpu() -> None:
    a100_clocks = tuple(c for c in H100_CLOCKS if c <= 1410)
    fast, slow = gpu(0), gpu(1, a100_clocks)
    mixed = GroupSpec("g0", "srv-g0", (fast, slow), SLO)
    for config in (Config(mode="off"), Config()):
        controller = Controller(config, [mixed])
        stale = controller.decide(0.0, [obs(gpu_count=2, stale=True)])[0]
        assert stale.sm_clock_max_mhz >= fast.sm_clock_max_mhz, "off and stale mean unlocked"


def test_a_reload_into_target_mode_starts_from_the_clock_held() -> None:
    """Efficiency settles low, where 7 tokens/J is met; target mode keeps it met from there."""
    controller = Controller(Config(mode="efficiency"), [spec()])
    cap = 1980.0
    for t in range(150):
        cap = controller.decide(float(t), [target_plant(cap)])[0].sm_clock_max_mhz
    settled_mhz = cap
    assert settled_mhz <= 1584, "7 tokens/J is met at 1584 MHz and below"
    controller.reconfigure(Config(mode="target", target_tokens_per_joule=7.0), [spec()])
    caps = []
    for t in range(150, 170):
        cap = controller.decide(float(t), [target_plant(cap)])[0].sm_clock_max_mhz
        caps.append(cap)
    # It climbs towards the target's clock a step at a time, never jumping to f_max.
    assert max(caps) <= 1600
    assert caps[0] <= settled_mhz + 60
    assert controller.group_state()[0]["target_reached"] is True
