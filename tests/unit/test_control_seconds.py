"""The controller's time constants are in seconds: the same scenario at 0.5, 1 and 2 s ticks
follows the same time course.

The daemon's interval_s may be 0.1 to 10 s. A controller that counts ticks would hold after a
raise, smooth its latency estimate, lower its clock and remember a miss over 4x more seconds at
2 s ticks than at 0.5 s ones; each scenario below would then differ by a factor of 4 across
ticks. The same scenarios also run as plain Python (NUMBA_DISABLE_JIT=1, in a subprocess, since
numba reads it at import) and must give the same figures.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from powerd.config import Config, SloConfig
from powerd.control import kernels as k
from powerd.control.policy import Controller, GroupSpec
from powerd.model import GroupObservation
from tests.unit.plain_python import run_without_jit
from tests.unit.snapshots import gpu_info
from tests.unit.test_control_kernels import obs

GPU = gpu_info(0)
SLO = SloConfig(itl_s=0.1, ttft_s=2.0, max_waiting=32)
INTERVALS_S = (0.5, 1.0, 2.0)


def _obs(interval_s: float, clock_mhz: float | None, **kw: Any) -> GroupObservation:
    """A slack observation over interval_s (latencies far below the SLO, no queue)."""
    values: dict[str, Any] = {"energy_j": 300.0 * interval_s, **kw}
    return obs("g0", interval_s=interval_s, sm_clock_mhz=clock_mhz, **values)


class _Loop:
    """One group's controller fed at a fixed tick; the actual clock follows the last cap."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.controller = Controller(
            Config(interval_s=interval_s), [GroupSpec("g0", "s0", (GPU,), SLO)]
        )
        self.ticks = 0
        self.cap: float | None = None

    @property
    def now_s(self) -> float:
        return self.ticks * self.interval_s

    def step(self, **kw: Any) -> tuple[int, str]:
        self.ticks += 1
        decision = self.controller.decide(self.now_s, [_obs(self.interval_s, self.cap, **kw)])[0]
        self.cap = decision.sm_clock_max_mhz
        return decision.sm_clock_max_mhz, decision.reason

    def run_for(self, seconds: float, **kw: Any) -> list[tuple[float, int, str]]:
        """Ticks until `seconds` have passed: (time, cap, reason) of each."""
        end_s = self.now_s + seconds
        out = []
        while self.now_s < end_s - 1e-9:
            cap, reason = self.step(**kw)
            out.append((self.now_s, cap, reason))
        return out

    def state(self) -> dict[str, Any]:
        return self.controller.group_state()[0]


def descent_cap_mhz(interval_s: float) -> int:
    """The cap after 12 s of slack from f_max (lowering at three clock steps a second)."""
    loop = _Loop(interval_s)
    return loop.run_for(12.0)[-1][1]


def itl_estimate_share(interval_s: float) -> float:
    """How far requests' smoothed ITL estimate has gone, 6 s after a step in running requests
    from 40 to 120 (0: not moved, 1: all the way)."""
    loop = _Loop(interval_s)
    loop.run_for(10.0)
    before = loop.state()["itl_estimate_s"]
    loop.run_for(6.0, running=120.0)
    after = loop.state()["itl_estimate_s"]
    return float((after - before) / (120.0 / 3000.0 - before))


def queue_raise(interval_s: float) -> dict[str, float]:
    """A queue past max_waiting for one tick at a lowered clock, then slack: seconds from the
    raise to the first lowering (the hold after it) and until the clock blamed for the miss is
    no longer avoided."""
    loop = _Loop(interval_s)
    loop.run_for(20.0)
    lowered = loop.cap
    raised_cap, reason = loop.step(waiting=50.0)
    raised_s = loop.now_s
    assert lowered is not None and raised_cap > lowered and "queue" in reason
    first_lower_s = math.nan
    safe_until_s = math.nan
    while loop.now_s < raised_s + 100.0 - 1e-9:
        _cap, reason = loop.step()
        if math.isnan(first_lower_s) and reason.startswith("lower"):
            first_lower_s = loop.now_s
        if math.isnan(safe_until_s) and loop.state()["safe_clock_mhz"] is None:
            safe_until_s = loop.now_s
    return {"hold_s": first_lower_s - raised_s, "safe_s": safe_until_s - raised_s}


def scenarios() -> dict[str, Any]:
    """Every scenario at every tick, JSON-ready."""
    return {
        str(dt): {
            "descent_cap_mhz": descent_cap_mhz(dt),
            "itl_share": itl_estimate_share(dt),
            **queue_raise(dt),
        }
        for dt in INTERVALS_S
    }


def check_consistent_in_seconds(result: dict[str, Any]) -> None:
    fast, slow = result["0.5"], result["2.0"]
    for figures in result.values():
        # 8 s of hold after a queue raise, ended at the tick nearest its end; then the tick
        # that lowers (every figure is a multiple of the tick).
        assert 8.0 <= figures["hold_s"] <= 10.0, figures
        # A miss is avoided while 0.99^s of it is at least half: about 69 s.
        assert 68.0 <= figures["safe_s"] <= 71.0, figures
        # 1 - 0.8^6: the estimate's smoothing is 0.2 a second.
        assert figures["itl_share"] == pytest.approx(1.0 - 0.8**6, abs=0.01), figures
        # Three 15-MHz clock steps a second for 12 s.
        assert abs(figures["descent_cap_mhz"] - (1980 - 36 * 15)) <= 15, figures
    assert abs(fast["hold_s"] - slow["hold_s"]) <= 2.0
    assert abs(fast["safe_s"] - slow["safe_s"]) <= 2.0
    assert abs(fast["descent_cap_mhz"] - slow["descent_cap_mhz"]) <= 15


def test_a_tick_a_few_ms_either_side_of_a_second_descends_as_one_second_ticks() -> None:
    """A real loop's ticks jitter around its interval: those just short of it must not each
    lose a clock step to rounding (before, 0.998-s ticks came down at two steps a tick)."""
    for nominal_s, interval_s in ((1.0, 0.998), (1.0, 1.002), (2.0, 1.996), (2.0, 2.004)):
        config = Config(interval_s=nominal_s)
        controller = Controller(config, [GroupSpec("g0", "s0", (GPU,), SLO)])
        cap: float | None = None
        ticks = round(12.0 / nominal_s)  # as many ticks as 12 s of exact ones
        for tick in range(1, ticks + 1):
            now_s = tick * interval_s
            cap = controller.decide(now_s, [_obs(interval_s, cap)])[0].sm_clock_max_mhz
        assert cap == descent_cap_mhz(nominal_s), (nominal_s, interval_s)


def test_conversions_are_exact_at_one_second() -> None:
    for alpha in (0.05, 0.2, 0.3, 0.5):
        assert k._alpha_for(alpha, 1.0) == alpha
    for decay in (0.9, 0.98, 0.99):
        assert k._decay_for(decay, 1.0) == decay
    assert k._alpha_for(0.2, 0.5) == pytest.approx(1.0 - 0.8**0.5)
    assert k._decay_for(0.98, 2.0) == pytest.approx(0.98**2)


def test_same_time_course_at_half_one_and_two_second_ticks() -> None:
    check_consistent_in_seconds(json.loads(json.dumps(scenarios())))


def test_plain_python_gives_the_same_time_course() -> None:
    jitted = json.loads(json.dumps(scenarios()))
    plain = run_without_jit("tests.unit.test_control_seconds")
    assert plain.pop("jit_disabled") is True
    check_consistent_in_seconds(plain)
    for dt, figures in jitted.items():
        assert plain[dt] == pytest.approx(figures, rel=1e-9)


def main() -> None:
    from numba.core import config as numba_config

    result = scenarios()
    result["jit_disabled"] = bool(numba_config.DISABLE_JIT)  # type: ignore[attr-defined]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
