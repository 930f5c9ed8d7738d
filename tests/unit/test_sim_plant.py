"""The GPU plant against the published figures of dvfs_plant_model.md §3-§6, and its mechanics.

Calibration figures are printed (run with -s to see them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from powerd.control.kernels import jit
from powerd.model import REASON_GPU_IDLE, REASON_SW_POWER_CAP, REASON_SW_THERMAL
from powerd.sim.plant import (
    PROFILE_DIR,
    S_CLOCK_MHZ,
    S_GAIN,
    S_TEMP_C,
    S_TH_FAST_K,
    S_TH_SLOW_K,
    GpuPlant,
    GpuProfile,
    decode_activity,
    gpu_profile_from_dict,
    list_gpu_profiles,
    load_gpu_profile,
    plant_step,
    simulate_steady,
)
from powerd.sim.roofline import iteration_time_s, memory_utilisation, roofline_terms_s

H100 = load_gpu_profile("h100-sxm")
H200 = load_gpu_profile("h200")
A100 = load_gpu_profile("a100-sxm4-80gb")


def _plant(profile: GpuProfile, n: int = 1, *, lock_mhz: int | None = None, seed: int = 0):
    """A plant with unit sensor gain (so measured power equals true power) and an optional lock."""
    plant = GpuPlant(profile, n, seed)
    plant.state[:, S_GAIN] = 1.0
    if lock_mhz is not None:
        for i in range(n):
            plant.set_locked_clocks(i, lock_mhz, lock_mhz, dead_time_s=0.0)
    return plant


def _run(plant: GpuPlant, seconds: float, a: float, m: float, ctx: float = 1.0, dt: float = 0.01):
    n = plant.n_gpus
    for _ in range(round(seconds / dt)):
        plant.step(dt, np.full(n, a), np.full(n, m), np.full(n, ctx))


# -- profiles -----------------------------------------------------------------------------------


def test_builtin_profiles_load_and_match_the_envelopes_of_section_1() -> None:
    assert list_gpu_profiles() == ["a100-sxm4-80gb", "h100-sxm", "h200", "l40s"]
    for name in list_gpu_profiles():
        p = load_gpu_profile(name)
        assert p.name == name
        assert p.clock_step_mhz == 15
        assert p.supported_sm_clocks_mhz[0] == p.sm_clock_max_mhz
        assert p.supported_sm_clocks_mhz[-1] == p.sm_clock_min_mhz
    assert len(A100.supported_sm_clocks_mhz) == 81  # §1 [S1]: 81 values 1410..210
    assert (H100.power_limit_min_w, H100.power_limit_max_w) == (200, 700)
    assert A100.power_reading == "instant" and H100.power_reading == "average"


def _h100_dict() -> dict[str, object]:
    return {f: getattr(H100, f) for f in H100.__dataclass_fields__}


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"bogus_key": 1}, "bogus_key"),
        ({"p_sm_w": -5}, "p_sm_w"),
        ({"p_sm_w": "lots"}, "p_sm_w"),
        ({"sm_clock_max_mhz": 1981}, "sm_clock_max_mhz"),
        ({"power_limit_default_w": 800}, "power_limit_default_w"),
        ({"power_reading": "smoothed"}, "power_reading"),
        ({"v_min": 1.5}, "v_min"),
        ({"t_slowdown_c": 95}, "t_slowdown_c"),
    ],
)
def test_bad_profile_values_name_the_key(change: dict[str, object], key: str) -> None:
    data = _h100_dict()
    data.update(change)
    with pytest.raises(ValueError, match=key):
        gpu_profile_from_dict(data)


def test_missing_key_and_unknown_name_are_clear_errors(tmp_path: Path) -> None:
    data = _h100_dict()
    del data["kappa0"]
    with pytest.raises(ValueError, match="kappa0"):
        gpu_profile_from_dict(data)
    with pytest.raises(ValueError, match="known profiles"):
        load_gpu_profile("b200")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_gpu_profile(bad)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda text: text + b"memory_gb: 40\n", "key 'memory_gb' is given twice (first on line"),
        (lambda text: text + b"# 80 GB \xb7 HBM3\n", "not UTF-8 (byte 0xb7 on line"),
    ],
    ids=["duplicate-key", "not-utf8"],
)
def test_a_profile_file_is_read_as_strictly_as_the_config(
    tmp_path: Path, edit: Callable[[bytes], bytes], message: str
) -> None:
    """A key given twice would silently keep the last value (the simulated GPU then has half
    the memory the operator read at the top); a byte that is not UTF-8 names the file."""
    path = tmp_path / "custom.yaml"
    path.write_bytes(edit((PROFILE_DIR / "h100-sxm.yaml").read_bytes()))
    with pytest.raises(ValueError) as info:
        load_gpu_profile(path)
    assert str(info.value).startswith(f"{path}: ") and message in str(info.value)


# -- calibration against published figures -------------------------------------------------------


def _decode_memory_util(profile: GpuProfile, clock_mhz: float, m_at_fmax: float) -> float:
    """HBM utilisation falls as the iteration stretches: m ∝ 1/t_it (bytes per step fixed)."""
    t_m, t_cs = 1.0, profile.kappa0  # small-batch decode: FLOP time negligible, t_cs = κ0·t_m
    f_max = float(profile.sm_clock_max_mhz)
    return (
        m_at_fmax
        * iteration_time_s(t_m, t_cs, f_max, f_max)
        / iteration_time_s(t_m, t_cs, clock_mhz, f_max)
    )


def test_h100_decode_at_1600_vs_1980_mhz_costs_27_percent_power_for_3_5_percent_throughput() -> (
    None
):
    """Towards Greener LLMs [S16] and §6 checks: −27 % power (±5 pt), −3.5 % throughput."""
    t_m, t_cs = 1.0, H100.kappa0
    rows = []
    for batch in (8, 32, 64, 128):
        a = decode_activity(batch)
        result = {}
        for lock in (1980, 1600):
            plant = _plant(H100, lock_mhz=lock)
            m = _decode_memory_util(H100, lock, 0.3)
            steady = simulate_steady(plant, a, m, settle_s=1.0, measure_s=2.0)
            t_it = iteration_time_s(t_m, t_cs, float(steady.clock_mhz[0]), 1980.0)
            result[lock] = (float(steady.power_w[0]), batch / t_it, float(steady.clock_mhz[0]))
        d_power = result[1600][0] / result[1980][0] - 1.0
        d_tput = result[1600][1] / result[1980][1] - 1.0
        rows.append((batch, result[1980][0], result[1600][0], d_power, d_tput, result[1600][2]))
        assert -0.32 <= d_power <= -0.22, (batch, d_power)
        assert -0.045 <= d_tput <= -0.025, (batch, d_tput)
    for batch, p_hi, p_lo, d_power, d_tput, clock in rows:
        print(
            f"H100 decode B={batch}: {p_hi:.0f} W @1980 -> {p_lo:.0f} W @{clock:.0f} MHz "
            f"({100 * d_power:+.1f} % power, {100 * d_tput:+.1f} % throughput, "
            f"energy x{(1 + d_power) / (1 + d_tput):.2f})"
        )
    mean_power = np.mean([r[3] for r in rows])
    assert abs(mean_power - (-0.27)) <= 0.05


@pytest.mark.parametrize("activity", [1.0, 1.2])
def test_h100_full_activity_prefill_under_700_w_settles_between_1650_and_1800_mhz(
    activity: float,
) -> None:
    """§6 checks: ≈1.77 GHz at a=1, ≈1.65 GHz at a=1.2 (observed 1.59-1.75 GHz, §1 [S2e])."""
    plant = _plant(H100)
    steady = simulate_steady(plant, activity, 0.2, settle_s=3.0, measure_s=3.0)
    clock = float(steady.clock_mhz[0])
    print(f"H100 prefill a={activity}: {clock:.0f} MHz at {steady.power_w[0]:.0f} W")
    assert 1650.0 <= clock <= 1800.0
    assert steady.power_w[0] == pytest.approx(700.0, rel=0.02)
    assert steady.reasons[0] & REASON_SW_POWER_CAP


def test_h200_decode_power_at_batch_1_and_4096() -> None:
    """§3 [S2h]: 232 / 611 W measured; §6 model 204 / 636 W. Required: 200 / 600 W ±12 %.
    m is the DCGM DRAM-active share of that sweep, 14 % at B=1 and 28 % at B=4096."""
    got = {}
    for batch, m in ((1, 0.14), (4096, 0.28)):
        steady = simulate_steady(_plant(H200), decode_activity(batch), m)
        got[batch] = float(steady.power_w[0])
    print(f"H200 decode: {got[1]:.0f} W at B=1, {got[4096]:.0f} W at B=4096")
    assert got[1] == pytest.approx(200.0, rel=0.12)
    assert got[4096] == pytest.approx(600.0, rel=0.12)


def test_a100_small_batch_decode_energy_per_token_is_lowest_between_930_and_1170_mhz() -> None:
    """§3 [S2i]: measured energy/step 0.77 at 930 MHz and 0.78 at 1170 MHz (normalised to 1410).

    The two points differ by 1.3 %, less than the ±5 % sensor gain error and the model's stated
    under-prediction of the 1410→1170 saving (§6), so the measured minimum is only located to
    the 930-1170 MHz interval; the model's minimum must fall inside it.
    """
    t_m, t_cs = 1.0, A100.kappa0
    clocks = list(range(690, 1411, 60))
    energy = []
    for clock in clocks:
        plant = _plant(A100, lock_mhz=clock)
        m = _decode_memory_util(A100, clock, 0.7)
        steady = simulate_steady(plant, decode_activity(1), m, settle_s=0.5, measure_s=1.5)
        energy.append(float(steady.power_w[0]) * iteration_time_s(t_m, t_cs, clock, 1410.0))
    norm = np.array(energy) / energy[-1]
    best = clocks[int(np.argmin(norm))]
    print(
        "A100 bs=1 energy/token vs clock: "
        + ", ".join(f"{c}:{e:.2f}" for c, e in zip(clocks, norm, strict=True))
        + f"; minimum at {best} MHz ({norm.min():.2f}x)"
    )
    assert 930 <= best <= 1170
    assert 0.7 <= norm.min() <= 0.9


def test_idle_power_with_and_without_context_matches_section_1() -> None:
    """H100 bare idle 71.8 W at the minimum clock, 121.7 W with a context at 1980 MHz [S4]."""
    plant = _plant(H100)
    bare = simulate_steady(plant, 0.0, 0.0, ctx=0.0)
    assert bare.clock_mhz[0] == pytest.approx(H100.sm_clock_min_mhz)
    assert bare.power_w[0] == pytest.approx(71.8, rel=0.1)
    assert bare.reasons[0] & REASON_GPU_IDLE
    ctx = simulate_steady(plant, 0.0, 0.0, ctx=1.0)
    assert ctx.clock_mhz[0] == pytest.approx(H100.sm_clock_max_mhz)
    assert ctx.power_w[0] == pytest.approx(121.7, rel=0.1)
    print(f"H100 idle: {bare.power_w[0]:.1f} W bare, {ctx.power_w[0]:.1f} W with a context")


# -- sensors ------------------------------------------------------------------------------------


def test_one_second_average_lags_the_instant_reading() -> None:
    plant = _plant(H100)
    _run(plant, 2.0, 0.0, 0.0)
    before = plant.power_instant_mw(0)
    t0 = plant.now_s
    cross_instant = cross_average = None
    samples = []
    while plant.now_s - t0 < 2.5:
        _run(plant, 0.01, 0.5, 0.3)
        instant, average = plant.power_instant_mw(0), plant.power_average_mw(0)
        samples.append((plant.now_s - t0, instant, average))
    final = np.mean([s[1] for s in samples[-50:]])
    half = before + 0.5 * (final - before)
    for t, instant, average in samples:
        if cross_instant is None and instant >= half:
            cross_instant = t
        if cross_average is None and average >= half:
            cross_average = t
    print(
        f"step response to 50 %: instant {cross_instant:.2f} s, 1-s average {cross_average:.2f} s"
    )
    assert cross_instant is not None and cross_average is not None
    assert cross_instant <= 0.15
    assert 0.4 <= cross_average <= 0.75
    assert cross_average - cross_instant >= 0.3
    assert H100.power_reading == "average"
    assert plant.power_usage_mw(0) == plant.power_average_mw(0)
    a100 = _plant(A100)
    _run(a100, 0.5, 0.5, 0.3)
    assert a100.power_usage_mw(0) == a100.power_instant_mw(0)


def test_energy_counter_is_the_integral_of_true_power_in_whole_mj_every_100_ms() -> None:
    plant = GpuPlant(H100, 2, seed=5)
    dt = H100.substep_s  # one substep per step: the true power is exact over each step
    e0 = [plant.energy_mj(i) for i in range(2)]
    assert min(e0) >= 10**9  # a counter that has run since driver load
    integral = np.zeros(2)
    changes = []
    last = e0[0]
    rng = np.random.default_rng(1)
    for k in range(2000):
        a = 0.0 if (k // 200) % 2 else rng.uniform(0.2, 1.1)
        plant.step(dt, np.full(2, a), np.full(2, 0.3), np.ones(2))
        integral += plant.true_power_w() * dt
        if plant.energy_mj(0) != last:
            changes.append(plant.now_s)
            last = plant.energy_mj(0)
    counted_j = np.array([plant.energy_mj(i) - e0[i] for i in range(2)]) / 1000.0
    # The counter lags the integral by at most one publication period of power.
    assert np.all(counted_j <= integral + 1e-3)
    assert np.all(integral - counted_j <= 0.1 * 1000.0 + 1e-3)
    np.testing.assert_allclose(counted_j, integral, rtol=0.01)
    assert np.all(np.isclose(plant.true_energy_j(), integral, rtol=1e-9))
    periods = np.diff(changes)
    assert periods.min() == pytest.approx(0.1, abs=dt + 1e-9)
    print(f"energy: counter {counted_j[0]:.1f} J vs integral {integral[0]:.1f} J")


def test_board_gain_error_is_within_5_percent_and_differs_between_boards() -> None:
    """§2 [S8]: readings carry a per-board gain error of about ±5 %; the energy counter does not."""
    n = 64
    plant = GpuPlant(H100, n, seed=11)
    _run(plant, 1.5, 0.5, 0.3)
    e0 = plant.true_energy_j()
    averages = np.zeros(n)
    instants = np.zeros(n)
    samples = 40
    for _ in range(samples):
        _run(plant, 0.1, 0.5, 0.3)
        averages += [plant.power_average_mw(i) / 1000.0 for i in range(n)]
        instants += [plant.power_instant_mw(i) / 1000.0 for i in range(n)]
    true_mean = (plant.true_energy_j() - e0) / (0.1 * samples)
    ratio = averages / samples / true_mean
    gains = np.array([plant.board_gain(i) for i in range(n)])
    print(f"sensor/true ratio over {n} boards: {ratio.min():.3f}..{ratio.max():.3f}")
    assert np.all(np.abs(gains - 1.0) <= 0.05)
    np.testing.assert_allclose(ratio, gains, atol=0.02)
    np.testing.assert_allclose(instants / samples / true_mean, gains, atol=0.04)
    assert ratio.max() - ratio.min() >= 0.05


# -- actuation ----------------------------------------------------------------------------------


def test_clock_lock_acts_after_a_50_to_200_ms_dead_time() -> None:
    plant = GpuPlant(H100, 16, seed=2)
    _run(plant, 0.5, 0.3, 0.3)
    assert all(plant.sm_clock_readback_mhz(i) == 1980 for i in range(16))
    for i in range(16):
        plant.set_locked_clocks(i, 1200, 1200)
    assert plant.locked_clocks(0) == (1200, 1200)  # the request reads back at once
    t0 = plant.now_s
    delays: list[float | None] = [None] * 16
    while plant.now_s - t0 < 0.4:
        _run(plant, 0.005, 0.3, 0.3, dt=0.005)
        for i in range(16):
            if delays[i] is None and plant.sm_clock_readback_mhz(i) < 1980:
                delays[i] = plant.now_s - t0
    got = np.array(delays, dtype=float)
    print(f"lock dead time: {1000 * got.min():.0f}..{1000 * got.max():.0f} ms")
    assert got.min() >= 0.050
    assert got.max() <= 0.200 + 0.015
    assert got.max() - got.min() >= 0.03
    _run(plant, 0.1, 0.3, 0.3)
    assert all(plant.sm_clock_readback_mhz(i) == 1200 for i in range(16))


def test_power_limit_reads_back_at_once_and_is_enforced_after_the_dead_time() -> None:
    plant = _plant(H100)
    _run(plant, 1.0, 1.0, 0.3)
    plant.set_power_limit_mw(0, 400_000)
    assert plant.power_limit_mw(0) == 400_000
    assert plant.enforced_power_limit_mw(0) == 700_000
    _run(plant, 0.21, 1.0, 0.3)
    assert plant.enforced_power_limit_mw(0) == 400_000
    with pytest.raises(ValueError, match="outside"):
        plant.set_power_limit_mw(0, 100_000)
    plant.set_out_of_band_limit_mw(0, 300_000)
    assert plant.enforced_power_limit_mw(0) == 300_000
    assert plant.power_limit_mw(0) == 400_000


def test_cap_transient_ends_within_one_second() -> None:
    """§2 [S10]: spikes above the cap last < 1 s before the internal loop acts (noise off, so
    that the 3 % sensor noise does not count as overshoot)."""
    plant = _plant(gpu_profile_from_dict({**_h100_dict(), "noise_sigma": 0.0}))
    _run(plant, 1.0, 0.0, 0.0)
    t0 = plant.now_s
    last_over = 0.0
    peak = 0.0
    e_prev = plant.true_energy_j()[0]
    while plant.now_s - t0 < 4.0:
        _run(plant, 0.1, 1.2, 0.3)
        e = plant.true_energy_j()[0]
        mean_w = (e - e_prev) / 0.1
        e_prev = e
        peak = max(peak, mean_w)
        if mean_w > 700.0 * 1.02:
            last_over = plant.now_s - t0
    print(f"cap transient: peak {peak:.0f} W (100-ms mean), above cap until {last_over:.2f} s")
    assert peak > 750.0
    assert last_over < 1.0


def test_thermal_slowdown_sets_bit_0x20_and_lowers_the_clock_15_mhz_per_100_ms() -> None:
    # A board with a low slowdown threshold: at 700 W it settles at 30 + 0.08·700 = 86 °C.
    hot = gpu_profile_from_dict(
        {
            **_h100_dict(),
            "r_th_k_per_w": 0.08,
            "t_max_operating_c": 78.0,
            "t_slowdown_c": 80.0,
            "t_hw_slowdown_c": 90.0,
        }
    )
    plant = _plant(hot)
    _run(plant, 1.0, 0.9, 0.3)
    assert not plant.clock_event_reasons(0) & REASON_SW_THERMAL
    plant.state[0, S_TH_FAST_K] = plant.state[0, S_TH_SLOW_K] = 56.0
    _run(plant, 0.1, 0.9, 0.3)
    assert plant.temperature_c(0) > hot.t_slowdown_c
    assert plant.clock_event_reasons(0) & REASON_SW_THERMAL
    f0 = plant.clock_mhz()[0]
    _run(plant, 1.0, 0.9, 0.3)
    drop = f0 - plant.clock_mhz()[0]
    print(f"thermal slowdown: {drop:.0f} MHz in 1 s at {plant.temperature_c(0)} °C")
    assert 100.0 <= drop <= 200.0
    # Cooling below T_slowdown minus the hysteresis lets the clock climb back at the same rate.
    plant.state[0, S_TH_FAST_K] = plant.state[0, S_TH_SLOW_K] = 10.0
    _run(plant, 3.0, 0.0, 0.0)
    assert not plant.clock_event_reasons(0) & REASON_SW_THERMAL
    assert plant.sm_clock_readback_mhz(0) == hot.sm_clock_max_mhz


def test_thermal_shutdown_turns_the_board_off() -> None:
    plant = _plant(H100)
    plant.state[0, S_TH_FAST_K] = plant.state[0, S_TH_SLOW_K] = 70.0
    plant.state[0, S_TEMP_C] = H100.t_inlet_c + 70.0
    _run(plant, 0.1, 1.0, 0.3)
    assert plant.is_shut_down(0)
    assert plant.true_power_w()[0] == 0.0


# -- mechanics ----------------------------------------------------------------------------------


def test_same_seed_same_trajectory_and_clone_is_independent() -> None:
    a, b = GpuPlant(H100, 3, seed=7), GpuPlant(H100, 3, seed=7)
    for plant in (a, b):
        plant.set_locked_clocks(1, 900, 1500)
        _run(plant, 1.0, 0.6, 0.4)
    np.testing.assert_array_equal(a.state, b.state)
    copy = a.clone()
    _run(a, 0.5, 0.9, 0.2)
    _run(copy, 0.5, 0.9, 0.2)
    np.testing.assert_array_equal(a.state, copy.state)
    _run(copy, 0.1, 0.0, 0.0)
    assert not np.array_equal(a.state, copy.state)
    c = GpuPlant(H100, 3, seed=8)
    _run(c, 1.0, 0.6, 0.4)
    assert not np.array_equal(a.true_power_w(), c.true_power_w())


def test_steady_state_is_the_same_at_5_and_50_ms_steps() -> None:
    fine = simulate_steady(_plant(H100), 1.1, 0.3, dt_s=0.005, settle_s=3.0)
    coarse = simulate_steady(_plant(H100), 1.1, 0.3, dt_s=0.05, settle_s=3.0)
    assert coarse.power_w[0] == pytest.approx(fine.power_w[0], rel=0.02)
    assert coarse.clock_mhz[0] == pytest.approx(fine.clock_mhz[0], abs=20.0)


def test_step_rejects_bad_inputs() -> None:
    plant = GpuPlant(H100, 2)
    with pytest.raises(ValueError, match="activity"):
        plant.step(0.01, np.ones(3), np.ones(2), np.ones(2))
    with pytest.raises(ValueError, match="dt_s"):
        plant.step(0.0, np.ones(2), np.ones(2), np.ones(2))
    with pytest.raises(ValueError, match="mem_util"):
        plant.step(0.01, np.ones(2), np.array([np.nan, 0.0]), np.ones(2))


@jit
def _drive(params: np.ndarray, state: np.ndarray, steps: int) -> float:
    n = state.shape[0]
    a = np.full(n, 0.5)
    m = np.full(n, 0.3)
    c = np.ones(n)
    for _ in range(steps):
        plant_step(params, state, a, m, c, 0.01)
    return state[0, S_CLOCK_MHZ]


def test_plant_step_is_callable_from_other_compiled_code() -> None:
    a, b = GpuPlant(H100, 2, seed=3), GpuPlant(H100, 2, seed=3)
    _drive(a.params, a.state, 100)
    _run(b, 1.0, 0.5, 0.3)
    np.testing.assert_array_equal(a.state, b.state)


def test_jitted_and_interpreted_plant_agree(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import json, sys
        import numpy as np
        from powerd.sim.plant import GpuPlant, load_gpu_profile
        plant = GpuPlant(load_gpu_profile("h100-sxm"), 2, seed=4)
        plant.set_locked_clocks(1, 600, 1400, dead_time_s=0.1)
        for k in range(150):
            a = 1.1 if k < 80 else 0.2
            plant.step(0.01, np.full(2, a), np.full(2, 0.3), np.ones(2))
        json.dump(plant.state.tolist(), sys.stdout)
        """
    )
    out = {}
    for mode in ("0", "1"):
        env = {**os.environ, "NUMBA_DISABLE_JIT": mode}
        proc = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
        )
        out[mode] = np.array(json.loads(proc.stdout))
    np.testing.assert_allclose(out["0"], out["1"], rtol=1e-9, atol=1e-6)


def test_roofline_decode_is_flat_above_the_knee_and_prefill_scales_with_clock() -> None:
    # Llama-3.1-8B-like decode at B=8 on H100: 16 GB of weights, 2·8e9·8 FLOPs.
    t_m, t_cs = roofline_terms_s(16e9, 2 * 8e9 * 8, 3.35, 989.0, 0.6)
    decode = [iteration_time_s(t_m, t_cs, f, 1980.0) for f in (1980.0, 1600.0, 1200.0, 600.0)]
    assert decode[1] / decode[0] < 1.05
    assert decode[3] / decode[0] > 1.5
    t_m, t_cs = roofline_terms_s(16e9, 2 * 8e9 * 4096, 3.35, 989.0, 0.6)  # 4k-token prefill
    ratio = iteration_time_s(t_m, t_cs, 990.0, 1980.0) / iteration_time_s(t_m, t_cs, 1980.0, 1980.0)
    assert ratio == pytest.approx(2.0, rel=0.02)
    assert 0.0 < memory_utilisation(16e9, 3.35, decode[0]) <= 1.0
    assert iteration_time_s(t_m, t_cs, 1980.0, 1980.0, 0.002) == pytest.approx(
        iteration_time_s(t_m, t_cs, 1980.0, 1980.0) + 0.002
    )
