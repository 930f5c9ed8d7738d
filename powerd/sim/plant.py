"""The simulated GPU ("plant"): clocks, power, temperature and the sensors NVML reads.

The model is dvfs_plant_model.md §6, with ranges from §1 and sensor semantics from §2:

(a) clock: f_tgt = min(lock max, f_cap, f_th) clamped to [max(lock min, f_min), f_max] and
    quantised to the 15-MHz grid; lock and power-limit changes act after a dead time
    ~U(50, 200) ms, the clock then follows a 10-ms first-order lag; f_cap comes from an
    integral loop on the filtered measured power; f_th drops 15 MHz per 100 ms above T_slowdown;
    without a CUDA context the clock idles at f_min, with one it goes to f_max.
(b) power: P = P_st·(1 + λ·(T − 40)) + (P_clk·ctx + a·P_sm)·g(f) + m·P_mem, times (1 + ε),
    ε an AR(1) noise with 3 % deviation and ρ = 0.9 per 10 ms.
(d) temperature: T = T_in + R_th·P through two lags (3 s, share 0.6; 120 s, share 0.4).
(e) sensors: `instant` = 25-ms boxcar of the true power, published every 100 ms, times a
    per-board gain ~U(0.95, 1.05); `average` = 1-s boxcar published every 100 ms (what
    nvmlDeviceGetPowerUsage returns on Hopper/Ada; A100 returns `instant`); the energy counter
    is the integral of the true power in whole mJ, published every 100 ms, from a large offset.

All evolving quantities of N GPUs live in one float64 array `state[N, NS]` and the profile's
constants in `params[NP]`, so `plant_step` is a compiled pure function that other compiled
code can call. The random generator is a 48-bit LCG whose state is a column of `state`, so a
copied state re-simulates identically.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from powerd.config import read_yaml
from powerd.control.kernels import jit
from powerd.model import (
    REASON_GPU_IDLE,
    REASON_HW_THERMAL,
    REASON_SW_POWER_CAP,
    REASON_SW_THERMAL,
)

PROFILE_DIR = Path(__file__).resolve().parent / "profiles"

# ---------------------------------------------------------------------------------------------
# Profiles


@dataclass(frozen=True, slots=True)
class GpuProfile:
    """Constants of one GPU model. Watts at g(f) = 1, i.e. at f_max (§6 parameter table)."""

    name: str
    nvml_name: str
    memory_gb: float
    power_limit_min_w: float
    power_limit_max_w: float
    power_limit_default_w: float
    sm_clock_min_mhz: int
    sm_clock_max_mhz: int
    clock_step_mhz: int
    mem_clock_mhz: int
    p_static_w: float
    p_clk_w: float
    p_sm_w: float
    p_mem_w: float
    v_min: float
    f_v_mhz: float
    hbm_bandwidth_tb_s: float
    peak_tflops: float
    kappa0: float
    r_th_k_per_w: float
    t_inlet_c: float
    t_slowdown_c: float
    t_shutdown_c: float
    power_reading: str
    """"average" (1-s average, Hopper/Ada) or "instant" (A100) for nvmlDeviceGetPowerUsage."""
    t_max_operating_c: float | None = None
    t_hw_slowdown_c: float | None = None
    """HW thermal slowdown (clock to f_min, bit 0x40); default midway to shutdown [A]."""
    lambda_per_k: float = 0.005
    """Static power temperature coefficient, §6(b) [A]."""
    noise_sigma: float = 0.03
    noise_rho_10ms: float = 0.9
    clock_tau_s: float = 0.010
    dead_time_min_s: float = 0.050
    dead_time_max_s: float = 0.200
    cap_filter_tau_s: float = 0.050
    """§6(a): the internal loop acts on a 25-100 ms filtered power [A]."""
    cap_loop_tau_s: float = 0.15
    """Time constant of the internal cap loop [A]: its integral gain k_I is scheduled on the
    board's own estimate of dP/df so a transient above the cap ends within 1 s at any clock
    (§2 [S10])."""
    thermal_tau_fast_s: float = 3.0
    thermal_tau_slow_s: float = 120.0
    thermal_fast_share: float = 0.6
    thermal_slowdown_mhz_per_s: float = 150.0
    """§6(a): 15 MHz per 100 ms above T_slowdown [A]."""
    thermal_hysteresis_k: float = 2.0
    sensor_period_s: float = 0.1
    instant_window_s: float = 0.025
    gain_spread: float = 0.05
    substep_s: float = 0.005

    @property
    def supported_sm_clocks_mhz(self) -> tuple[int, ...]:
        """Every SM clock SetGpuLockedClocks accepts, descending (as NVML lists them)."""
        return tuple(range(self.sm_clock_max_mhz, self.sm_clock_min_mhz - 1, -self.clock_step_mhz))

    @property
    def hw_slowdown_c(self) -> float:
        if self.t_hw_slowdown_c is not None:
            return self.t_hw_slowdown_c
        return 0.5 * (self.t_slowdown_c + self.t_shutdown_c)


_FIELDS = {f.name: f for f in dataclasses.fields(GpuProfile)}
_REQUIRED = [f.name for f in dataclasses.fields(GpuProfile) if f.default is dataclasses.MISSING]
_INT_FIELDS = {"sm_clock_min_mhz", "sm_clock_max_mhz", "clock_step_mhz", "mem_clock_mhz"}
_STR_FIELDS = {"name", "nvml_name", "power_reading"}
_NON_NEGATIVE = {
    "p_clk_w",
    "p_mem_w",
    "lambda_per_k",
    "noise_sigma",
    "noise_rho_10ms",
    "gain_spread",
    "thermal_hysteresis_k",
}


def _check_profile_values(values: dict[str, Any], where: str) -> None:
    for key, value in values.items():
        if key in _STR_FIELDS:
            if not isinstance(value, str) or not value:
                raise ValueError(f"{where}: {key} must be a non-empty string, got {value!r}")
            continue
        if value is None and _FIELDS[key].default is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: {key} must be a number, got {value!r}")
        if key in _INT_FIELDS and not float(value).is_integer():
            raise ValueError(f"{where}: {key} must be a whole number of MHz, got {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"{where}: {key} must be finite, got {value!r}")
        if key in _NON_NEGATIVE:
            if value < 0:
                raise ValueError(f"{where}: {key} must be >= 0, got {value!r}")
        elif key not in ("t_inlet_c",) and value <= 0:
            raise ValueError(f"{where}: {key} must be > 0, got {value!r}")


def _check_profile_relations(p: GpuProfile, where: str) -> None:
    def bad(key: str, why: str) -> ValueError:
        return ValueError(f"{where}: {key} {why}")

    if p.power_reading not in ("average", "instant"):
        raise bad("power_reading", f"must be 'average' or 'instant', got {p.power_reading!r}")
    if not p.power_limit_min_w <= p.power_limit_default_w <= p.power_limit_max_w:
        raise bad("power_limit_default_w", "must lie within [power_limit_min_w, power_limit_max_w]")
    if p.sm_clock_min_mhz >= p.sm_clock_max_mhz:
        raise bad("sm_clock_min_mhz", "must be below sm_clock_max_mhz")
    for key in ("sm_clock_min_mhz", "sm_clock_max_mhz"):
        if getattr(p, key) % p.clock_step_mhz:
            raise bad(key, f"must be a multiple of clock_step_mhz ({p.clock_step_mhz})")
    if not p.sm_clock_min_mhz <= p.f_v_mhz < p.sm_clock_max_mhz:
        raise bad("f_v_mhz", "must lie within [sm_clock_min_mhz, sm_clock_max_mhz)")
    if p.v_min > 1.0:
        raise bad("v_min", f"must be <= 1 (normalised voltage), got {p.v_min}")
    if not p.t_slowdown_c < p.t_shutdown_c:
        raise bad("t_slowdown_c", "must be below t_shutdown_c")
    if not p.t_inlet_c < p.t_slowdown_c:
        raise bad("t_inlet_c", "must be below t_slowdown_c")
    if not p.t_slowdown_c < p.hw_slowdown_c <= p.t_shutdown_c:
        raise bad("t_hw_slowdown_c", "must lie within (t_slowdown_c, t_shutdown_c]")
    if p.dead_time_min_s > p.dead_time_max_s:
        raise bad("dead_time_min_s", "must not exceed dead_time_max_s")
    if p.noise_rho_10ms >= 1.0:
        raise bad("noise_rho_10ms", "must be below 1")
    if p.thermal_fast_share > 1.0:
        raise bad("thermal_fast_share", "must be <= 1")
    if p.gain_spread >= 1.0:
        raise bad("gain_spread", "must be below 1")
    if not p.instant_window_s < p.sensor_period_s:
        raise bad("instant_window_s", "must be shorter than sensor_period_s")
    if p.substep_s > p.instant_window_s:
        raise bad("substep_s", "must not exceed instant_window_s")


def gpu_profile_from_dict(data: object, where: str = "profile") -> GpuProfile:
    """Build and validate a profile; unknown keys and bad values raise ValueError naming the key."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping of profile keys, got {type(data).__name__}")
    for key in data:
        if key not in _FIELDS:
            raise ValueError(f"{where}: unknown key {key!r}")
    for key in _REQUIRED:
        if key not in data:
            raise ValueError(f"{where}: missing key {key!r}")
    _check_profile_values(data, where)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key in _INT_FIELDS:
            kwargs[key] = int(value)
        elif key in _STR_FIELDS or value is None:
            kwargs[key] = value
        else:
            kwargs[key] = float(value)
    profile = GpuProfile(**kwargs)
    _check_profile_relations(profile, where)
    return profile


def list_gpu_profiles() -> list[str]:
    """Names of the built-in profiles."""
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def load_gpu_profile(name_or_path: str | Path) -> GpuProfile:
    """A built-in profile by name (see list_gpu_profiles) or a YAML file by path, read as a
    config is (config.read_yaml); ValueError naming the file and the key otherwise."""
    text = str(name_or_path)
    path = Path(text)
    if not (text.endswith((".yaml", ".yml")) or path.is_file()):
        if text not in list_gpu_profiles():
            if path.is_dir():
                raise ValueError(f"GPU profile {text} is a folder; name a profile's YAML file")
            known = ", ".join(list_gpu_profiles())
            raise ValueError(f"unknown GPU profile {text!r}; known profiles: {known}")
        path = PROFILE_DIR / f"{text}.yaml"
    data = read_yaml(path, what="GPU profile")
    return gpu_profile_from_dict(data, where=str(path))


def find_gpu_profile(nvml_name: str) -> GpuProfile | None:
    """The built-in profile whose nvml_name equals the device name NVML reports, if any."""
    for name in list_gpu_profiles():
        profile = load_gpu_profile(name)
        if profile.nvml_name == nvml_name:
            return profile
    return None


# ---------------------------------------------------------------------------------------------
# Parameter vector (profile constants, in the units the kernel uses)

P_F_MIN = 0
P_F_MAX = 1
P_F_STEP = 2
P_P_ST = 3
P_P_CLK = 4
P_P_SM = 5
P_P_MEM = 6
P_V_MIN = 7
P_F_V = 8
P_LAMBDA = 9
P_NOISE_SIGMA = 10
P_NOISE_RHO = 11
P_TAU_CLOCK = 12
P_CAP_TAU_LOOP = 13
P_CAP_TAU = 14
P_R_TH = 15
P_T_IN = 16
P_TAU_FAST = 17
P_TAU_SLOW = 18
P_FAST_SHARE = 19
P_T_SLOWDOWN = 20
P_T_HW = 21
P_T_SHUTDOWN = 22
P_TH_RATE = 23
P_TH_HYST = 24
P_SENSOR_PERIOD = 25
P_INSTANT_WINDOW = 26
P_SUBSTEP = 27
NP = 28

# ---------------------------------------------------------------------------------------------
# State columns (one row per GPU)

S_TIME_S = 0
S_CLOCK_MHZ = 1
"""Actual SM clock (continuous during the 10-ms lag)."""
S_TARGET_MHZ = 2
S_FCAP_MHZ = 3
S_FTH_MHZ = 4
S_TEMP_C = 5
S_TH_FAST_K = 6
S_TH_SLOW_K = 7
S_POWER_W = 8
"""True board power over the last substep."""
S_PFILT_W = 9
S_NOISE = 10
S_ENERGY_J = 11
"""True energy since the plant was created."""
S_GAIN = 12
S_RNG = 13
S_LOCK_MIN_MHZ = 14
S_LOCK_MAX_MHZ = 15
S_REQ_LOCK_SET = 16
S_REQ_LOCK_MIN_MHZ = 17
S_REQ_LOCK_MAX_MHZ = 18
S_PEND_LOCK_AT_S = 19
S_PEND_LOCK_MIN_MHZ = 20
S_PEND_LOCK_MAX_MHZ = 21
S_PLIMIT_REQ_W = 22
S_PLIMIT_W = 23
S_PEND_PLIMIT_AT_S = 24
S_PEND_PLIMIT_W = 25
S_OOB_LIMIT_W = 26
S_NEXT_PUB_S = 27
S_WIN_E_J = 28
S_INSTANT_W = 29
S_AVERAGE_W = 30
S_ECOUNT_MJ = 31
S_EOFFSET_MJ = 32
S_PUB_TIME_S = 33
S_REASONS = 34
S_ACTIVITY = 35
S_MEM_UTIL = 36
S_CTX = 37
S_UTIL_GPU = 38
S_UTIL_MEM = 39
S_SHUTDOWN = 40
S_RING_IDX = 41
S_RING0 = 42
RING = 10
"""1-s average = 10 publish periods of 100 ms (§2 [S8])."""
NS = S_RING0 + RING

_LCG_A = 25214903917
_LCG_C = 11
_LCG_MASK = (1 << 48) - 1
_LCG_SCALE = 1.0 / float(1 << 48)
_UTIL_TAU_S = 1.0


@jit
def rng_uniform(state: np.ndarray, i: int) -> float:
    """A uniform draw in (0, 1) from GPU i's 48-bit LCG (drand48 constants), kept in `state`."""
    x = int(state[i, S_RNG])
    x = (x * _LCG_A + _LCG_C) & _LCG_MASK
    state[i, S_RNG] = float(x)
    return (float(x) + 0.5) * _LCG_SCALE


@jit
def rng_normal(state: np.ndarray, i: int) -> float:
    """A standard normal draw (Box-Muller) from GPU i's generator."""
    u1 = rng_uniform(state, i)
    u2 = rng_uniform(state, i)
    return math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2)


@jit
def decode_activity(batch_size: float) -> float:
    """SM activity of decode at batch B: a_d(B) = 0.08 + 0.6·B/(B + 300) (§6(b), fit to [S2h])."""
    b = max(batch_size, 0.0)
    return 0.08 + 0.6 * b / (b + 300.0)


@jit
def voltage_factor(params: np.ndarray, clock_mhz: float) -> float:
    """g(f) = (f/f_max)·v(f)², v the normalised voltage; g(f_max) = 1 (§6(b))."""
    f_max = params[P_F_MAX]
    f_v = params[P_F_V]
    v_min = params[P_V_MIN]
    x = (clock_mhz - f_v) / (f_max - f_v)
    x = min(max(x, 0.0), 1.0)
    v = v_min + (1.0 - v_min) * x
    return clock_mhz / f_max * v * v


@jit
def model_power_w(
    params: np.ndarray,
    clock_mhz: float,
    temp_c: float,
    activity: float,
    mem_util: float,
    ctx: float,
) -> float:
    """Noise-free board power in W (§6(b))."""
    static = params[P_P_ST] * (1.0 + params[P_LAMBDA] * (temp_c - 40.0))
    dynamic = (params[P_P_CLK] * ctx + activity * params[P_P_SM]) * voltage_factor(
        params, clock_mhz
    )
    return static + dynamic + mem_util * params[P_P_MEM]


@jit
def _power_slope_w_per_mhz(params: np.ndarray, power_w: float, clock_mhz: float) -> float:
    """The board's estimate of dP/df: the power above static times d ln g / df (§6(b))."""
    f = max(clock_mhz, params[P_F_MIN])
    dlng = 1.0 / f
    if params[P_F_V] < f < params[P_F_MAX]:
        slope_v = (1.0 - params[P_V_MIN]) / (params[P_F_MAX] - params[P_F_V])
        v = params[P_V_MIN] + slope_v * (f - params[P_F_V])
        dlng += 2.0 * slope_v / v
    dynamic_w = max(power_w - params[P_P_ST], 0.1 * params[P_P_SM])
    return dynamic_w * dlng


@jit
def _substep(
    params: np.ndarray,
    st: np.ndarray,
    i: int,
    activity: float,
    mem_util: float,
    ctx: float,
    dt_s: float,
) -> None:
    """Advance GPU i of the state `st` by dt_s seconds (one substep of plant_step, whose
    docstring defines the inputs): actuations due, clock, power, sensors, the board's power
    cap and thermal loops, utilisation."""
    t0 = st[i, S_TIME_S]
    t1 = t0 + dt_s
    f_min = params[P_F_MIN]
    f_max = params[P_F_MAX]
    step = params[P_F_STEP]
    st[i, S_ACTIVITY] = activity
    st[i, S_MEM_UTIL] = mem_util
    st[i, S_CTX] = ctx
    if st[i, S_SHUTDOWN] > 0.5:
        # A thermal shutdown is a failure: the board is off until the plant is rebuilt.
        st[i, S_CLOCK_MHZ] = 0.0
        st[i, S_TARGET_MHZ] = 0.0
        st[i, S_POWER_W] = 0.0
        st[i, S_TIME_S] = t1
        return

    # Actuations take effect after their dead time (§6(a), §2: 50-200 ms).
    if st[i, S_PEND_LOCK_AT_S] >= 0.0 and t0 >= st[i, S_PEND_LOCK_AT_S]:
        st[i, S_LOCK_MIN_MHZ] = st[i, S_PEND_LOCK_MIN_MHZ]
        st[i, S_LOCK_MAX_MHZ] = st[i, S_PEND_LOCK_MAX_MHZ]
        st[i, S_PEND_LOCK_AT_S] = -1.0
    if st[i, S_PEND_PLIMIT_AT_S] >= 0.0 and t0 >= st[i, S_PEND_PLIMIT_AT_S]:
        st[i, S_PLIMIT_W] = st[i, S_PEND_PLIMIT_W]
        st[i, S_PEND_PLIMIT_AT_S] = -1.0

    # (a) Clock selection: min(lock max, f_cap, f_th), clamped, quantised.
    upper = f_max if ctx > 0.5 else f_min
    lo = max(st[i, S_LOCK_MIN_MHZ], f_min)
    f_other = min(st[i, S_LOCK_MAX_MHZ], st[i, S_FTH_MHZ], upper)
    f_other_c = min(max(f_other, lo), f_max)
    # The cap loop's ceiling never winds up beyond one step around the clock it can influence.
    fcap = min(max(st[i, S_FCAP_MHZ], lo - step), f_other_c + step)
    tgt = min(max(min(f_other, fcap), lo), f_max)
    tgt = math.floor(tgt / step + 1e-9) * step
    if tgt < lo:
        tgt = math.ceil(lo / step - 1e-9) * step
    temp = st[i, S_TEMP_C]
    hw_thermal = temp >= params[P_T_HW]
    if hw_thermal:
        tgt = f_min
    st[i, S_TARGET_MHZ] = tgt
    f = st[i, S_CLOCK_MHZ]
    f += (tgt - f) * (1.0 - math.exp(-dt_s / params[P_TAU_CLOCK]))
    st[i, S_CLOCK_MHZ] = f

    # (b) Power with AR(1) multiplicative noise (ρ per 10 ms, 3 % stationary deviation).
    rho = params[P_NOISE_RHO] ** (dt_s / 0.01)
    noise = rho * st[i, S_NOISE] + params[P_NOISE_SIGMA] * math.sqrt(1.0 - rho * rho) * rng_normal(
        st, i
    )
    st[i, S_NOISE] = noise
    p = max(model_power_w(params, f, temp, activity, mem_util, ctx) * (1.0 + noise), 0.0)
    st[i, S_POWER_W] = p

    # (e) Sensors: exact integrals of the piecewise-constant true power.
    e0 = st[i, S_ENERGY_J]
    period = params[P_SENSOR_PERIOD]
    window = params[P_INSTANT_WINDOW]
    t_pub = st[i, S_NEXT_PUB_S]
    w_start = t_pub - window
    if t0 < w_start <= t1:
        st[i, S_WIN_E_J] = e0 + p * (w_start - t0)
    if t0 < t_pub <= t1:
        e_pub = e0 + p * (t_pub - t0)
        gain = st[i, S_GAIN]
        st[i, S_INSTANT_W] = gain * (e_pub - st[i, S_WIN_E_J]) / window
        idx = int(st[i, S_RING_IDX])
        st[i, S_AVERAGE_W] = gain * (e_pub - st[i, S_RING0 + idx]) / (RING * period)
        st[i, S_RING0 + idx] = e_pub
        st[i, S_RING_IDX] = float((idx + 1) % RING)
        st[i, S_ECOUNT_MJ] = st[i, S_EOFFSET_MJ] + math.floor(e_pub * 1000.0)
        st[i, S_PUB_TIME_S] = t_pub
        st[i, S_NEXT_PUB_S] = t_pub + period
    st[i, S_ENERGY_J] = e0 + p * dt_s

    # Internal cap loop: integral action on the board's own (gained) filtered power reading, so
    # the reported power sits at the cap as on real boards (699.8 W at 700 W, §1 [S2e]).
    pf = st[i, S_PFILT_W]
    pf += (st[i, S_GAIN] * p - pf) * (1.0 - math.exp(-dt_s / params[P_CAP_TAU]))
    st[i, S_PFILT_W] = pf
    cap_w = min(st[i, S_PLIMIT_W], st[i, S_OOB_LIMIT_W])
    fcap -= (pf - cap_w) * dt_s / (params[P_CAP_TAU_LOOP] * _power_slope_w_per_mhz(params, pf, f))
    st[i, S_FCAP_MHZ] = min(max(fcap, f_min), f_max)

    # (d) Two-lag thermal model.
    target_k = params[P_R_TH] * p
    th_fast = st[i, S_TH_FAST_K]
    th_slow = st[i, S_TH_SLOW_K]
    th_fast += (target_k - th_fast) * (1.0 - math.exp(-dt_s / params[P_TAU_FAST]))
    th_slow += (target_k - th_slow) * (1.0 - math.exp(-dt_s / params[P_TAU_SLOW]))
    st[i, S_TH_FAST_K] = th_fast
    st[i, S_TH_SLOW_K] = th_slow
    share = params[P_FAST_SHARE]
    temp = params[P_T_IN] + share * th_fast + (1.0 - share) * th_slow
    st[i, S_TEMP_C] = temp
    fth = st[i, S_FTH_MHZ]
    if temp > params[P_T_SLOWDOWN]:
        fth = min(fth, f + step) - params[P_TH_RATE] * dt_s
    elif temp < params[P_T_SLOWDOWN] - params[P_TH_HYST]:
        fth += params[P_TH_RATE] * dt_s
    st[i, S_FTH_MHZ] = min(max(fth, f_min), f_max)
    if temp >= params[P_T_SHUTDOWN]:
        st[i, S_SHUTDOWN] = 1.0

    # Clock-event reason bits (§6(e), nvml_api.md §3).
    reasons = 0
    if activity <= 0.0 and mem_util <= 0.0:
        reasons |= REASON_GPU_IDLE
    f_nocap = min(max(min(st[i, S_LOCK_MAX_MHZ], st[i, S_FTH_MHZ], upper), lo), f_max)
    if st[i, S_FCAP_MHZ] < f_nocap - 0.5 * step and ctx > 0.5:
        reasons |= REASON_SW_POWER_CAP
    if temp > params[P_T_SLOWDOWN] or st[i, S_FTH_MHZ] < min(st[i, S_LOCK_MAX_MHZ], upper):
        reasons |= REASON_SW_THERMAL
    if hw_thermal:
        reasons |= REASON_HW_THERMAL
    st[i, S_REASONS] = float(reasons)

    k = 1.0 - math.exp(-dt_s / _UTIL_TAU_S)
    busy = 1.0 if activity > 0.0 else 0.0
    st[i, S_UTIL_GPU] += (busy - st[i, S_UTIL_GPU]) * k
    st[i, S_UTIL_MEM] += (mem_util - st[i, S_UTIL_MEM]) * k
    st[i, S_TIME_S] = t1


@jit
def plant_step(
    params: np.ndarray,
    state: np.ndarray,
    activity: np.ndarray,
    mem_util: np.ndarray,
    ctx: np.ndarray,
    dt_s: float,
) -> None:
    """Advance every GPU by dt_s seconds, in place.

    activity: SM activity a per GPU (prefill ~0.9-1.2, decode a_d(B), idle 0; §6(b));
    mem_util: achieved/peak HBM bandwidth m in [0, 1]; ctx: 1.0 where a CUDA context is open.
    Inputs are held constant over dt_s, which is split into substeps of at most params[P_SUBSTEP].
    """
    if dt_s <= 0.0:
        return
    h_max = params[P_SUBSTEP]
    n_sub = max(math.ceil(dt_s / h_max - 1e-9), 1)
    h = dt_s / n_sub
    for i in range(state.shape[0]):
        a = max(activity[i], 0.0)
        m = min(max(mem_util[i], 0.0), 1.0)
        c = 1.0 if ctx[i] > 0.5 else 0.0
        for _ in range(n_sub):
            _substep(params, state, i, a, m, c, h)


def profile_params(profile: GpuProfile) -> np.ndarray:
    """The kernel's parameter vector for a profile."""
    params = np.zeros(NP, dtype=np.float64)
    params[P_F_MIN] = profile.sm_clock_min_mhz
    params[P_F_MAX] = profile.sm_clock_max_mhz
    params[P_F_STEP] = profile.clock_step_mhz
    params[P_P_ST] = profile.p_static_w
    params[P_P_CLK] = profile.p_clk_w
    params[P_P_SM] = profile.p_sm_w
    params[P_P_MEM] = profile.p_mem_w
    params[P_V_MIN] = profile.v_min
    params[P_F_V] = profile.f_v_mhz
    params[P_LAMBDA] = profile.lambda_per_k
    params[P_NOISE_SIGMA] = profile.noise_sigma
    params[P_NOISE_RHO] = profile.noise_rho_10ms
    params[P_TAU_CLOCK] = profile.clock_tau_s
    params[P_CAP_TAU_LOOP] = profile.cap_loop_tau_s
    params[P_CAP_TAU] = profile.cap_filter_tau_s
    params[P_R_TH] = profile.r_th_k_per_w
    params[P_T_IN] = profile.t_inlet_c
    params[P_TAU_FAST] = profile.thermal_tau_fast_s
    params[P_TAU_SLOW] = profile.thermal_tau_slow_s
    params[P_FAST_SHARE] = profile.thermal_fast_share
    params[P_T_SLOWDOWN] = profile.t_slowdown_c
    params[P_T_HW] = profile.hw_slowdown_c
    params[P_T_SHUTDOWN] = profile.t_shutdown_c
    params[P_TH_RATE] = profile.thermal_slowdown_mhz_per_s
    params[P_TH_HYST] = profile.thermal_hysteresis_k
    params[P_SENSOR_PERIOD] = profile.sensor_period_s
    params[P_INSTANT_WINDOW] = profile.instant_window_s
    params[P_SUBSTEP] = profile.substep_s
    return params


# ---------------------------------------------------------------------------------------------
# The Python face of the plant


class GpuPlant:
    """N simulated GPUs of one profile. Not thread-safe: callers (FakeNvml) hold a lock.

    Indices i are 0-based GPU indices. Sensor methods return what NVML would (ints in mW, mJ,
    MHz, °C); true_power_w / true_energy_j are the ground truth for benchmarks.
    """

    def __init__(self, profile: GpuProfile, n_gpus: int, seed: int = 0) -> None:
        if n_gpus < 1:
            raise ValueError(f"n_gpus must be at least 1, got {n_gpus}")
        self.profile = profile
        self.n_gpus = n_gpus
        self.seed = seed
        self.params = profile_params(profile)
        self.state = np.zeros((n_gpus, NS), dtype=np.float64)
        rng = np.random.default_rng(seed)
        st = self.state
        p = profile
        st[:, S_GAIN] = rng.uniform(1.0 - p.gain_spread, 1.0 + p.gain_spread, n_gpus)
        st[:, S_RNG] = rng.integers(0, 1 << 48, n_gpus).astype(np.float64)
        # A counter that has run since driver load: 10^9..10^11 mJ (hours to weeks of idle).
        st[:, S_EOFFSET_MJ] = rng.integers(10**9, 10**11, n_gpus).astype(np.float64)
        # Boards publish on their own 100-ms grid.
        first_pub = p.instant_window_s + p.substep_s + rng.uniform(0.0, p.sensor_period_s, n_gpus)
        # Bare idle in thermal equilibrium: P = P_st·(1 + λ·(T_in + R_th·P − 40)).
        idle_w = (p.p_static_w * (1.0 + p.lambda_per_k * (p.t_inlet_c - 40.0))) / (
            1.0 - p.p_static_w * p.lambda_per_k * p.r_th_k_per_w
        )
        st[:, S_CLOCK_MHZ] = p.sm_clock_min_mhz
        st[:, S_TARGET_MHZ] = p.sm_clock_min_mhz
        st[:, S_FCAP_MHZ] = p.sm_clock_max_mhz
        st[:, S_FTH_MHZ] = p.sm_clock_max_mhz
        st[:, S_TH_FAST_K] = p.r_th_k_per_w * idle_w
        st[:, S_TH_SLOW_K] = p.r_th_k_per_w * idle_w
        st[:, S_TEMP_C] = p.t_inlet_c + p.r_th_k_per_w * idle_w
        st[:, S_POWER_W] = idle_w
        st[:, S_PFILT_W] = st[:, S_GAIN] * idle_w
        st[:, S_LOCK_MIN_MHZ] = p.sm_clock_min_mhz
        st[:, S_LOCK_MAX_MHZ] = p.sm_clock_max_mhz
        st[:, S_PEND_LOCK_AT_S] = -1.0
        st[:, S_PLIMIT_REQ_W] = p.power_limit_default_w
        st[:, S_PLIMIT_W] = p.power_limit_default_w
        st[:, S_PEND_PLIMIT_AT_S] = -1.0
        st[:, S_OOB_LIMIT_W] = p.power_limit_max_w
        st[:, S_NEXT_PUB_S] = first_pub
        st[:, S_WIN_E_J] = idle_w * (first_pub - p.instant_window_s)
        st[:, S_INSTANT_W] = st[:, S_GAIN] * idle_w
        st[:, S_AVERAGE_W] = st[:, S_GAIN] * idle_w
        st[:, S_ECOUNT_MJ] = st[:, S_EOFFSET_MJ]
        st[:, S_PUB_TIME_S] = first_pub - p.sensor_period_s
        st[:, S_REASONS] = REASON_GPU_IDLE
        for j in range(RING):
            st[:, S_RING0 + j] = idle_w * (first_pub - p.sensor_period_s * (RING - j))

    # -- time ------------------------------------------------------------------------------

    @property
    def now_s(self) -> float:
        """Simulated seconds since the plant was created."""
        return float(self.state[0, S_TIME_S])

    def step(
        self,
        dt_s: float,
        activity: np.ndarray,
        mem_util: np.ndarray,
        ctx: np.ndarray,
    ) -> None:
        """Advance all GPUs by dt_s with per-GPU inputs held constant (see plant_step)."""
        if not (math.isfinite(dt_s) and dt_s > 0.0):
            raise ValueError(f"dt_s must be a positive number of seconds, got {dt_s!r}")
        plant_step(
            self.params,
            self.state,
            self._vector(activity, "activity"),
            self._vector(mem_util, "mem_util"),
            self._vector(ctx, "ctx"),
            float(dt_s),
        )

    def _vector(self, values: np.ndarray, name: str) -> np.ndarray:
        arr = np.ascontiguousarray(values, dtype=np.float64)
        if arr.shape != (self.n_gpus,):
            raise ValueError(f"{name} must have shape ({self.n_gpus},), got {arr.shape}")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{name} must be finite")
        return arr

    def clone(self) -> GpuPlant:
        """An independent deep copy (same profile, copied state and random generator)."""
        other = object.__new__(GpuPlant)
        other.profile = self.profile
        other.n_gpus = self.n_gpus
        other.seed = self.seed
        other.params = self.params.copy()
        other.state = self.state.copy()
        return other

    def _index(self, i: int) -> int:
        if not 0 <= i < self.n_gpus:
            raise IndexError(f"GPU index {i} out of range 0..{self.n_gpus - 1}")
        return int(i)

    def _dead_time_s(self, i: int, dead_time_s: float | None) -> float:
        if dead_time_s is not None:
            return max(float(dead_time_s), 0.0)
        lo, hi = self.profile.dead_time_min_s, self.profile.dead_time_max_s
        return lo + (hi - lo) * rng_uniform(self.state, i)

    # -- actuation -------------------------------------------------------------------------

    def set_locked_clocks(
        self, i: int, min_mhz: int, max_mhz: int, *, dead_time_s: float | None = None
    ) -> None:
        """Lock GPU i's SM clock into [min_mhz, max_mhz] (clamped to the device range, rounded to
        the clock table), effective after the dead time (U(50, 200) ms unless dead_time_s is
        given; 0 applies it at once)."""
        i = self._index(i)
        p = self.profile
        if min_mhz > max_mhz:
            raise ValueError(f"min_mhz ({min_mhz}) must not exceed max_mhz ({max_mhz})")
        # Requests land on the nearest entry of the 15-MHz clock table.
        step = p.clock_step_mhz
        lo = round(min(max(min_mhz, p.sm_clock_min_mhz), p.sm_clock_max_mhz) / step) * step
        hi = round(min(max(max_mhz, p.sm_clock_min_mhz), p.sm_clock_max_mhz) / step) * step
        st = self.state
        st[i, S_REQ_LOCK_SET] = 1.0
        st[i, S_REQ_LOCK_MIN_MHZ] = lo
        st[i, S_REQ_LOCK_MAX_MHZ] = hi
        self._schedule_lock(i, lo, hi, dead_time_s)

    def reset_locked_clocks(self, i: int, *, dead_time_s: float | None = None) -> None:
        """Remove GPU i's clock lock (after the dead time)."""
        i = self._index(i)
        self.state[i, S_REQ_LOCK_SET] = 0.0
        p = self.profile
        self._schedule_lock(i, p.sm_clock_min_mhz, p.sm_clock_max_mhz, dead_time_s)

    def _schedule_lock(self, i: int, lo: float, hi: float, dead_time_s: float | None) -> None:
        st = self.state
        held = (st[i, S_LOCK_MIN_MHZ], st[i, S_LOCK_MAX_MHZ])
        if st[i, S_PEND_LOCK_AT_S] < 0.0 and held == (lo, hi):
            return  # the range it holds, nothing pending: nothing changes, no dead time passes
        st[i, S_PEND_LOCK_MIN_MHZ] = lo
        st[i, S_PEND_LOCK_MAX_MHZ] = hi
        st[i, S_PEND_LOCK_AT_S] = st[i, S_TIME_S] + self._dead_time_s(i, dead_time_s)
        if dead_time_s is not None and dead_time_s <= 0.0:
            st[i, S_LOCK_MIN_MHZ] = lo
            st[i, S_LOCK_MAX_MHZ] = hi
            st[i, S_PEND_LOCK_AT_S] = -1.0

    def set_power_limit_mw(
        self, i: int, power_limit_mw: int, *, dead_time_s: float | None = None
    ) -> None:
        """Request GPU i's power limit (reads back at once; enforced after the dead time)."""
        i = self._index(i)
        p = self.profile
        limit_w = power_limit_mw / 1000.0
        if not p.power_limit_min_w <= limit_w <= p.power_limit_max_w:
            raise ValueError(
                f"power limit {power_limit_mw} mW outside [{p.power_limit_min_w * 1000:.0f}, "
                f"{p.power_limit_max_w * 1000:.0f}] mW"
            )
        st = self.state
        st[i, S_PLIMIT_REQ_W] = limit_w
        st[i, S_PEND_PLIMIT_W] = limit_w
        st[i, S_PEND_PLIMIT_AT_S] = st[i, S_TIME_S] + self._dead_time_s(i, dead_time_s)
        if dead_time_s is not None and dead_time_s <= 0.0:
            st[i, S_PLIMIT_W] = limit_w
            st[i, S_PEND_PLIMIT_AT_S] = -1.0

    def set_out_of_band_limit_mw(self, i: int, power_limit_mw: int | None) -> None:
        """Set an out-of-band (BMC/SMBPBI) cap, None to remove it.

        The enforced limit is min(in-band, out-of-band) (§1, DGX user guide ch. 7)."""
        i = self._index(i)
        limit_w = self.profile.power_limit_max_w if power_limit_mw is None else power_limit_mw / 1e3
        self.state[i, S_OOB_LIMIT_W] = limit_w

    # -- sensors (what NVML returns) --------------------------------------------------------

    def power_instant_mw(self, i: int) -> int:
        return round(self.state[self._index(i), S_INSTANT_W] * 1000.0)

    def power_average_mw(self, i: int) -> int:
        return round(self.state[self._index(i), S_AVERAGE_W] * 1000.0)

    def power_usage_mw(self, i: int) -> int:
        """nvmlDeviceGetPowerUsage: the 1-s average, or the instant reading on A100 (§2)."""
        if self.profile.power_reading == "instant":
            return self.power_instant_mw(i)
        return self.power_average_mw(i)

    def energy_mj(self, i: int) -> int:
        return int(self.state[self._index(i), S_ECOUNT_MJ])

    def sensor_timestamp_us(self, i: int) -> int:
        """Time of GPU i's last sensor publication, µs of simulated time."""
        return round(self.state[self._index(i), S_PUB_TIME_S] * 1e6)

    def sm_clock_readback_mhz(self, i: int) -> int:
        """The actual SM clock, on the 15-MHz table as NVML reports it."""
        f = self.state[self._index(i), S_CLOCK_MHZ]
        step = self.profile.clock_step_mhz
        return round(f / step) * step

    def clock_event_reasons(self, i: int) -> int:
        return int(self.state[self._index(i), S_REASONS])

    def temperature_c(self, i: int) -> int:
        return round(self.state[self._index(i), S_TEMP_C])

    def power_limit_mw(self, i: int) -> int:
        """The requested (in-band) limit; reads back the new value at once."""
        return round(self.state[self._index(i), S_PLIMIT_REQ_W] * 1000.0)

    def enforced_power_limit_mw(self, i: int) -> int:
        """The limit the board applies: min(in-band after its dead time, out-of-band)."""
        i = self._index(i)
        return round(min(self.state[i, S_PLIMIT_W], self.state[i, S_OOB_LIMIT_W]) * 1000.0)

    def locked_clocks(self, i: int) -> tuple[int, int] | None:
        """The requested clock lock (min, max) in MHz, or None when unlocked."""
        i = self._index(i)
        if self.state[i, S_REQ_LOCK_SET] < 0.5:
            return None
        return int(self.state[i, S_REQ_LOCK_MIN_MHZ]), int(self.state[i, S_REQ_LOCK_MAX_MHZ])

    def utilization_percent(self, i: int) -> tuple[int, int]:
        """(gpu, memory) utilisation in percent, 1-s smoothed, as nvmlDeviceGetUtilizationRates."""
        i = self._index(i)
        return (
            round(100.0 * self.state[i, S_UTIL_GPU]),
            round(100.0 * self.state[i, S_UTIL_MEM]),
        )

    def is_shut_down(self, i: int) -> bool:
        """True after a thermal shutdown (T ≥ T_shutdown): the board is off."""
        return bool(self.state[self._index(i), S_SHUTDOWN] > 0.5)

    def board_gain(self, i: int) -> float:
        """The per-board power-sensor gain (ground truth; real boards hide it)."""
        return float(self.state[self._index(i), S_GAIN])

    # -- ground truth ------------------------------------------------------------------------

    def clock_mhz(self) -> np.ndarray:
        """Actual SM clocks, MHz (a copy)."""
        return self.state[:, S_CLOCK_MHZ].copy()

    def true_power_w(self) -> np.ndarray:
        """True board power over the last substep, W (a copy)."""
        return self.state[:, S_POWER_W].copy()

    def true_energy_j(self) -> np.ndarray:
        """True energy since the plant was created, J (a copy)."""
        return self.state[:, S_ENERGY_J].copy()


# ---------------------------------------------------------------------------------------------
# Steady-state helper (the calibration tests in test_sim_plant)


@dataclass(frozen=True, slots=True)
class SteadyResult:
    """Means over the measurement window of a steady simulation, per GPU."""

    power_w: np.ndarray
    clock_mhz: np.ndarray
    temperature_c: np.ndarray
    reasons: np.ndarray
    """OR of the reason bits seen during the window."""


def simulate_steady(
    plant: GpuPlant,
    activity: np.ndarray | float,
    mem_util: np.ndarray | float,
    *,
    ctx: np.ndarray | float = 1.0,
    settle_s: float = 2.0,
    measure_s: float = 3.0,
    dt_s: float = 0.01,
    thermal_equilibrium: bool = True,
) -> SteadyResult:
    """Run `plant` at constant inputs; return window means of true power, clock, temperature.

    With thermal_equilibrium the slow thermal states are set to the settled power's steady
    state (saving the minutes of the 120-s lag) before measuring.
    """
    n = plant.n_gpus
    a = np.broadcast_to(np.asarray(activity, dtype=np.float64), (n,)).copy()
    m = np.broadcast_to(np.asarray(mem_util, dtype=np.float64), (n,)).copy()
    c = np.broadcast_to(np.asarray(ctx, dtype=np.float64), (n,)).copy()

    def run(duration_s: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        steps = max(round(duration_s / dt_s), 1)
        e0 = plant.true_energy_j()
        clock = np.zeros(n)
        temp = np.zeros(n)
        reasons = np.zeros(n, dtype=np.int64)
        for _ in range(steps):
            plant.step(dt_s, a, m, c)
            clock += plant.state[:, S_CLOCK_MHZ]
            temp += plant.state[:, S_TEMP_C]
            reasons |= plant.state[:, S_REASONS].astype(np.int64)
        span = steps * dt_s
        return (plant.true_energy_j() - e0) / span, clock / steps, temp / steps, reasons

    power, _, _, _ = run(settle_s)
    if thermal_equilibrium:
        for _ in range(3):
            k = plant.profile.r_th_k_per_w * power
            plant.state[:, S_TH_FAST_K] = k
            plant.state[:, S_TH_SLOW_K] = k
            plant.state[:, S_TEMP_C] = plant.profile.t_inlet_c + k
            power, _, _, _ = run(1.0)
    power, clock, temp, reasons = run(measure_s)
    return SteadyResult(power_w=power, clock_mhz=clock, temperature_c=temp, reasons=reasons)
