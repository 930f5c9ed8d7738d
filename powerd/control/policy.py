"""The controller around the kernels: value types in, arrays through controller_step, decisions out.

Everything numerical lives in kernels.py; this module only maps GroupObservation and config
values onto the kernel arrays and back, and keeps learned state across reconfiguration.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from powerd.config import Config, SloConfig
from powerd.control import kernels as k
from powerd.control.numba_cache import compile_apart, mark_compiled
from powerd.model import BLIND_PREFILL_SHARE, GpuInfo, GroupDecision, GroupObservation

log = logging.getLogger(__name__)

_MODE_CODES = {
    "efficiency": k.MODE_EFFICIENCY,
    "target": k.MODE_TARGET,
    "budget": k.MODE_BUDGET,
    "off": k.MODE_OFF,
}

REASONS: dict[int, tuple[str, str]] = {
    k.REASON_STEADY: ("steady", "steady"),
    k.REASON_LOWER: ("lower_slack", "lower: latency slack"),
    k.REASON_RAISE_ITL: ("raise_itl", "raise: inter-token latency"),
    k.REASON_RAISE_TTFT: ("raise_ttft", "raise: time to first token"),
    k.REASON_RAISE_QUEUE: ("raise_queue", "raise: queue"),
    k.REASON_STALE: ("stale", "stale: default clocks"),
    k.REASON_OFF: ("off", "off: observe only"),
    k.REASON_HOLD: ("hold_after_raise", "hold after raise"),
    k.REASON_ENERGY: ("raise_energy", "raise: energy optimum above"),
    k.REASON_TARGET: ("target", "target: above efficient point"),
    k.REASON_ENERGY_FLOOR: ("hold_energy", "hold: energy optimum"),
    k.REASON_RAISE_KV: ("raise_kv", "raise: KV cache full"),
}
"""The kernel's reason codes: (label, one of model.DECISION_REASONS; words)."""

_FLOOR_SHARE = 0.5
"""Default floor as a share of f_max: the plant model is low-fidelity below (dvfs_plant_model 6)."""


@dataclass(frozen=True)
class GroupSpec:
    """One controlled group: the GPUs one inference server spans, and its SLO."""

    name: str
    server: str
    gpus: tuple[GpuInfo, ...]
    slo: SloConfig


class Policy(Protocol):
    """Anything that turns one tick's observations into one decision per group.

    Controller is the daemon's own, and the only one it reconfigures in place on a reload; a
    policy a caller hands the daemon through a factory is made again through the factory, and
    may take PolicyBase's defaults for what it does not do."""

    name: str

    def decide(
        self, now_s: float, observations: Sequence[GroupObservation]
    ) -> list[GroupDecision]: ...

    @property
    def budget_feasible(self) -> bool:
        """False when the last decision could not keep within the node power budget."""
        ...

    def warmup(self) -> None:
        """Compile or load whatever decide() needs, before READY=1; no state changes."""
        ...

    @property
    def guards_prefill(self) -> bool:
        """Whether prefill_guard() acts: without it the daemon reads no prompt backlogs."""
        ...

    def prefill_guard(self, backlog_tokens: Mapping[str, float]) -> dict[str, int]:
        """Caps to raise now, by group name, for the prompt backlogs given (tokens, by group
        name); between ticks."""
        ...

    def group_state(self) -> list[dict[str, Any]]:
        """What the policy knows of each group, one dict with a "group" key per group."""
        ...


class PolicyBase:
    """Defaults for a Policy that has no kernels to compile, no budget to miss, no prefill
    guard (unless it defines prefill_guard) and nothing to report per group. Subclasses set
    `name` and define decide()."""

    @property
    def budget_feasible(self) -> bool:
        return True

    def warmup(self) -> None:
        pass

    @property
    def guards_prefill(self) -> bool:
        # A subclass that defines its own guard is asked for it; one that keeps the no-op is
        # read no backlogs for.
        return type(self).prefill_guard is not PolicyBase.prefill_guard

    def prefill_guard(self, backlog_tokens: Mapping[str, float]) -> dict[str, int]:
        return {}

    def group_state(self) -> list[dict[str, Any]]:
        return []


@dataclass
class KernelArrays:
    """The structure of arrays controller_step works on (layouts in kernels.py)."""

    obs: np.ndarray
    params: np.ndarray
    clocks: np.ndarray
    n_clocks: np.ndarray
    knobs: np.ndarray
    state: np.ndarray
    efit: np.ndarray
    cells: np.ndarray
    misses: np.ndarray
    out: np.ndarray

    def step(self) -> bool:
        """Run one controller_step over all groups; False when a node budget is infeasible."""
        return bool(
            k.controller_step(
                self.obs,
                self.params,
                self.clocks,
                self.n_clocks,
                self.knobs,
                self.state,
                self.efit,
                self.cells,
                self.misses,
                self.out,
            )
        )

    def prefill_guard(self, backlog_tokens: np.ndarray) -> np.ndarray:
        """Run prefill_guard over all groups: the cap to raise each to now, NaN where none."""
        raise_mhz = np.full(backlog_tokens.shape[0], np.nan)
        k.prefill_guard(
            backlog_tokens,
            self.params,
            self.clocks,
            self.n_clocks,
            self.state,
            self.out,
            raise_mhz,
        )
        return raise_mhz

    def copy(self) -> KernelArrays:
        return KernelArrays(
            self.obs.copy(),
            self.params.copy(),
            self.clocks.copy(),
            self.n_clocks.copy(),
            self.knobs.copy(),
            self.state.copy(),
            self.efit.copy(),
            self.cells.copy(),
            self.misses.copy(),
            self.out.copy(),
        )


def group_clocks(gpus: Sequence[GpuInfo]) -> tuple[int, ...]:
    """SM clocks all the group's GPUs support, ascending (the first GPU's list if none shared)."""
    if not gpus:
        raise ValueError("a GPU group needs at least one GPU")
    shared = set(gpus[0].supported_sm_clocks_mhz)
    for gpu in gpus[1:]:
        shared &= set(gpu.supported_sm_clocks_mhz)
    if not shared:
        shared = set(gpus[0].supported_sm_clocks_mhz)
    return tuple(sorted(shared))


def group_floor_mhz(clocks: Sequence[int], f_max: int, min_clock_mhz: int | None) -> int:
    """The lowest clock the controller may lock: the configured floor or half f_max, rounded up."""
    wanted = min_clock_mhz if min_clock_mhz is not None else _FLOOR_SHARE * f_max
    for clock in clocks:
        if clock >= wanted:
            return min(clock, f_max)
    return f_max


def _num(value: Any) -> float:
    """A finite float, or NaN for None and anything that is not a finite number."""
    if value is None or isinstance(value, bool):
        return math.nan
    try:
        x = float(value)
    except (TypeError, ValueError):
        return math.nan
    return x if math.isfinite(x) else math.nan


def build_arrays(
    config: Config,
    groups: Sequence[GroupSpec],
    load_bins: int = k.DEFAULT_LOAD_BINS,
    clock_bins: int = k.DEFAULT_CLOCK_BINS,
) -> KernelArrays:
    """Fresh kernel arrays for these groups under this config (no learned state)."""
    names = [spec.name for spec in groups]
    for name in names:
        if names.count(name) > 1:
            raise ValueError(f"group {name!r} is listed twice")
    n_groups = len(groups)
    clock_lists = [group_clocks(spec.gpus) for spec in groups]
    width = max((len(c) for c in clock_lists), default=1) or 1
    params = np.full((k.N_PAR, n_groups), np.nan)
    clocks = np.full((n_groups, width), np.nan)
    n_clocks = np.zeros(n_groups, dtype=np.int64)
    for g, (spec, supported) in enumerate(zip(groups, clock_lists, strict=True)):
        f_max = supported[-1] if supported else min(gpu.sm_clock_max_mhz for gpu in spec.gpus)
        clocks[g, : len(supported)] = supported
        n_clocks[g] = len(supported)
        params[k.PAR_CLOCK_MAX_MHZ, g] = f_max
        params[k.PAR_FLOOR_MHZ, g] = group_floor_mhz(
            supported or (f_max,), f_max, config.control.min_clock_mhz
        )
        params[k.PAR_ITL_SLO_S, g] = spec.slo.itl_s
        params[k.PAR_TTFT_SLO_S, g] = spec.slo.ttft_s
        params[k.PAR_MAX_WAITING, g] = spec.slo.max_waiting
        # A GPU whose limit range NVML does not report (min = max: its limit as found) takes
        # no limit from powerd; it must not pin its partners' range.
        settable = [gpu for gpu in spec.gpus if gpu.power_limit_range_known]
        params[k.PAR_PL_MIN_MW, g] = max(gpu.power_limit_min_mw for gpu in settable or spec.gpus)
        params[k.PAR_PL_MAX_MW, g] = min(gpu.power_limit_max_mw for gpu in settable or spec.gpus)
        params[k.PAR_PL_DEFAULT_MW, g] = min(gpu.power_limit_default_mw for gpu in spec.gpus)
        params[k.PAR_BLIND_MIN_MHZ, g] = group_floor_mhz(
            supported or (f_max,), f_max, math.ceil(BLIND_PREFILL_SHARE * f_max)
        )
    knobs = np.zeros(k.N_KNOB)
    knobs[k.KNOB_MODE] = _MODE_CODES[config.mode]
    knobs[k.KNOB_SLO_MARGIN] = config.control.slo_margin
    knobs[k.KNOB_STEP_DOWN_MHZ] = config.control.max_step_down_mhz
    knobs[k.KNOB_DITHER_MHZ] = config.control.dither_mhz
    knobs[k.KNOB_TARGET_TPJ] = _num(config.target_tokens_per_joule)
    knobs[k.KNOB_BUDGET_W] = _num(config.node_power_budget_w)
    knobs[k.KNOB_TRACK_LIMIT] = 1.0 if config.control.power_limit == "track" else 0.0
    knobs[k.KNOB_INTERVAL_S] = config.interval_s
    return KernelArrays(
        obs=np.full((k.N_OBS, n_groups), np.nan),
        params=params,
        clocks=clocks,
        n_clocks=n_clocks,
        knobs=knobs,
        state=np.zeros((k.N_ST, n_groups)),
        efit=np.zeros((n_groups, k.N_EFIT)),
        cells=np.zeros((n_groups, load_bins, clock_bins, k.N_CELL)),
        misses=np.zeros((n_groups, load_bins, k.N_MISS)),
        out=np.full((k.N_OUT, n_groups), np.nan),
    )


def fill_observations(
    obs: np.ndarray, groups: Sequence[GroupSpec], observations: Sequence[GroupObservation]
) -> None:
    """Write observations into obs by group name; a group without one is marked stale."""
    by_name = {o.group: o for o in observations}
    obs.fill(np.nan)
    for g, spec in enumerate(groups):
        o = by_name.get(spec.name)
        if o is None:
            obs[k.OBS_STALE, g] = 1.0
            obs[k.OBS_GPU_COUNT, g] = len(spec.gpus)
            continue
        obs[k.OBS_INTERVAL_S, g] = _num(o.interval_s)
        count = _num(o.gpu_count)
        obs[k.OBS_GPU_COUNT, g] = count if count >= 1 else len(spec.gpus)
        obs[k.OBS_ENERGY_J, g] = _num(o.energy_j)
        obs[k.OBS_POWER_W, g] = _num(o.power_w)
        obs[k.OBS_GEN_TPS, g] = _num(o.generation_tokens_per_s)
        obs[k.OBS_PROMPT_TPS, g] = _num(o.prompt_tokens_per_s)
        obs[k.OBS_RUNNING, g] = _num(o.running)
        obs[k.OBS_WAITING, g] = _num(o.waiting)
        obs[k.OBS_TTFT_Q_S, g] = _num(o.ttft_q_s)
        obs[k.OBS_ITL_Q_S, g] = _num(o.itl_q_s)
        obs[k.OBS_SM_CLOCK_MHZ, g] = _num(o.sm_clock_mhz)
        reasons = _num(o.clock_event_reasons)
        obs[k.OBS_REASONS, g] = reasons if reasons == reasons else 0.0
        obs[k.OBS_STALE, g] = 1.0 if o.stale else 0.0
        obs[k.OBS_REALTIME, g] = 1.0 if o.realtime else 0.0
        obs[k.OBS_PROMPT_PER_CHUNK, g] = 1.0 if o.prompt_per_chunk else 0.0
        obs[k.OBS_TTFT_SLOWEST_S, g] = _num(o.ttft_slowest_s)
        obs[k.OBS_KV_USAGE, g] = _num(o.kv_cache_usage)
        obs[k.OBS_PREEMPTIONS, g] = _num(o.preemptions)
        obs[k.OBS_PREFILL_BUSY_S, g] = _num(o.prefill_busy_s)
        obs[k.OBS_FIRST_TOKEN_BLIND, g] = 1.0 if o.first_token_blind else 0.0
        obs[k.OBS_PROMPT_WEIGHTED_TOKENS, g] = _num(o.prompt_tokens_weighted_mean)
        obs[k.OBS_FINISHED_RPS, g] = _num(o.finished_requests_per_s)
        obs[k.OBS_INTERVAL_CAP_MHZ, g] = _num(o.interval_clock_cap_mhz)
        obs[k.OBS_LOWERED_CAP, g] = 1.0 if o.held_by_lowered_cap else 0.0
        obs[k.OBS_LIMITED_GPUS, g] = _num(o.limited_gpu_count)


def _opt_float(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


_cache_filled = False
"""Whether this process has filled a cold cache (compiled apart, whatever came of that, then
loaded and marked): once a process, not at every warmup."""


class Controller:
    """powerd's own policy: learned clock-vs-latency and power models, SLO guards, modes.

    decide() returns one GroupDecision per group, in the order of `groups`.
    """

    name = "powerd"

    def __init__(
        self,
        config: Config,
        groups: Sequence[GroupSpec],
        load_bins: int = k.DEFAULT_LOAD_BINS,
        clock_bins: int = k.DEFAULT_CLOCK_BINS,
    ) -> None:
        if load_bins < 1 or clock_bins < 2:
            raise ValueError("the controller needs at least 1 load bin and 2 clock bins")
        self._load_bins = load_bins
        self._clock_bins = clock_bins
        self._config = config
        self._groups: tuple[GroupSpec, ...] = tuple(groups)
        self.arrays = build_arrays(config, self._groups, load_bins, clock_bins)
        self._budget_ok = True

    @property
    def groups(self) -> tuple[GroupSpec, ...]:
        return self._groups

    def warmup(self) -> None:
        """Compile every kernel (numba caches on disk), on copies so no state changes. Where
        the cache does not hold them yet, a child process compiles them once, and this one
        loads them from the cache, without the compiler's memory."""
        global _cache_filled
        cold = k.JIT_ENABLED and not k.CACHE_WARM and not _cache_filled
        _cache_filled = True
        if cold:
            log.info(
                "compiling the control kernels into %s (once for each version; up to a "
                "minute on a small machine)",
                k.CACHE_DIR,
            )
            compile_apart(
                k.CACHE_DIR, "import powerd.control.policy as p; p.Controller.compile_kernels()"
            )
        self._exercise_kernels()
        if cold:
            mark_compiled(k.CACHE_DIR, k.CACHE_STAMP)  # every kernel is in the cache now

    def _exercise_kernels(self) -> None:
        """Run every kernel a tick uses once, on copies of the arrays (compiling each that
        this process has not loaded yet)."""
        if self._groups:
            arrays = self.arrays.copy()
        else:
            gpu = GpuInfo(0, "warmup", "warmup", 100_000, 700_000, 700_000, 345, 1980, (345, 1980))
            spec = GroupSpec("warmup", "warmup", (gpu,), SloConfig())
            arrays = build_arrays(self._config, (spec,), self._load_bins, self._clock_bins)
        arrays.obs.fill(np.nan)
        arrays.obs[k.OBS_STALE] = 1.0
        arrays.step()
        arrays.obs[k.OBS_STALE] = 0.0
        arrays.knobs[k.KNOB_MODE] = k.MODE_BUDGET
        arrays.knobs[k.KNOB_BUDGET_W] = 1e9
        arrays.step()
        arrays.prefill_guard(np.ones(arrays.obs.shape[1]))

    @classmethod
    def compile_kernels(cls) -> None:
        """Compile every kernel a tick uses into the cache, in this process: what warmup's
        child runs. A controller without groups uses the kernels of any other (the same array
        types)."""
        cls(Config(), ())._exercise_kernels()

    @property
    def budget_feasible(self) -> bool:
        """False when the last tick's node budget was below the groups' minimum limits (each
        GPU then sits at its minimum); True otherwise and outside budget mode."""
        return self._budget_ok

    def decide(self, now_s: float, observations: Sequence[GroupObservation]) -> list[GroupDecision]:
        """One decision per group (same order as the groups) from this tick's observations."""
        arrays = self.arrays
        fill_observations(arrays.obs, self._groups, observations)
        self._budget_ok = arrays.step()
        decisions = []
        mode = self._config.mode
        for g, spec in enumerate(self._groups):
            cap = round(float(arrays.out[k.OUT_CAP_MHZ, g]))
            if cap >= arrays.params[k.PAR_CLOCK_MAX_MHZ, g]:
                # Unlocked: the group's top shared clock would keep a faster model locked.
                cap = max(cap, *(gpu.sm_clock_max_mhz for gpu in spec.gpus))
            limit = arrays.out[k.OUT_LIMIT_MW, g]
            label, reason = REASONS.get(int(arrays.out[k.OUT_REASON, g]), REASONS[k.REASON_STEADY])
            if mode == "budget" and not self._budget_ok:
                reason += "; budget below the minimum limits"
            decisions.append(
                GroupDecision(
                    group=spec.name,
                    sm_clock_max_mhz=cap,
                    power_limit_mw=None if math.isnan(limit) else int(limit),
                    mode=mode,
                    reason=reason,
                    reason_label=label,
                )
            )
        return decisions

    @property
    def guards_prefill(self) -> bool:
        return self._config.mode in ("efficiency", "target")

    def prefill_guard(self, backlog_tokens: Mapping[str, float]) -> dict[str, int]:
        """Caps to raise now, by group name: where a group's prompt backlog (tokens its server
        still has to prefill, by group name) would outlast the guard's share of the TTFT SLO at
        the cap last decided. Nothing in budget and off modes: between ticks a node budget is
        not re-shared and an observing daemon does not act."""
        if self._config.mode not in ("efficiency", "target") or not backlog_tokens:
            return {}
        names = [spec.name for spec in self._groups]
        backlog = np.array([_num(backlog_tokens.get(name)) for name in names])
        raise_mhz = self.arrays.prefill_guard(backlog)
        return {
            name: round(float(mhz))
            for name, mhz in zip(names, raise_mhz, strict=True)
            if math.isfinite(mhz)
        }

    def reconfigure(self, config: Config, groups: Sequence[GroupSpec]) -> None:
        """Apply a new config (SIGHUP); remaining groups on unchanged clocks keep their learning."""
        old = self.arrays
        old_index = {spec.name: g for g, spec in enumerate(self._groups)}
        new_groups = tuple(groups)
        new = build_arrays(config, new_groups, self._load_bins, self._clock_bins)
        for g, spec in enumerate(new_groups):
            i = old_index.get(spec.name)
            if i is None:
                continue
            same_clocks = (
                old.params[k.PAR_CLOCK_MAX_MHZ, i] == new.params[k.PAR_CLOCK_MAX_MHZ, g]
                and old.params[k.PAR_FLOOR_MHZ, i] == new.params[k.PAR_FLOOR_MHZ, g]
                and old.n_clocks[i] == new.n_clocks[g]
            )
            if not same_clocks:
                continue
            new.state[:, g] = old.state[:, i]
            new.efit[g] = old.efit[i]
            new.cells[g] = old.cells[i]
            new.misses[g] = old.misses[i]
        self._config = config
        self._groups = new_groups
        self.arrays = new

    def group_state(self) -> list[dict[str, Any]]:
        """Per group: mode, target and whether it is reached, floor, and the learned figures."""
        arrays = self.arrays
        mode = self._config.mode
        result = []
        for g, spec in enumerate(self._groups):
            st = arrays.state[:, g]
            f_max = float(arrays.params[k.PAR_CLOCK_MAX_MHZ, g])
            reached = arrays.out[k.OUT_TARGET_REACHED, g]
            kappa = st[k.ST_KAPPA]
            ready = st[k.ST_READY] > 0.5
            result.append(
                {
                    "group": spec.name,
                    "server": spec.server,
                    "mode": mode,
                    "target_tokens_per_joule": self._config.target_tokens_per_joule
                    if mode == "target"
                    else None,
                    "target_reached": None
                    if mode != "target" or math.isnan(reached)
                    else bool(reached > 0.5),
                    "floor_mhz": int(arrays.params[k.PAR_FLOOR_MHZ, g]),
                    "max_clock_mhz": int(f_max),
                    "sm_clock_max_mhz": _opt_int(st[k.ST_CAP_MHZ]) if ready else None,
                    "base_clock_mhz": _opt_int(st[k.ST_BASE_MHZ]) if ready else None,
                    "power_limit_mw": _opt_int(st[k.ST_LIMIT_MW]) if ready else None,
                    "tokens_per_joule": _opt_float(st[k.ST_TPJ]) if ready else None,
                    "itl_estimate_s": _opt_float(st[k.ST_ITL_EST_S]) if ready else None,
                    "knee_mhz": _opt_float(kappa * f_max) if ready else None,
                    "slo_min_clock_mhz": _opt_float(st[k.ST_SLO_MIN_MHZ]) if ready else None,
                    "power_slope_w_per_mhz": _opt_float(st[k.ST_SLOPE_W_PER_MHZ])
                    if ready
                    else None,
                    "power_slope_t": _opt_float(st[k.ST_SLOPE_T]) if ready else None,
                    "energy_opt_clock_mhz": _opt_float(st[k.ST_ENERGY_OPT_MHZ]) if ready else None,
                    "safe_clock_mhz": _opt_float(st[k.ST_SAFE_MHZ]) if ready else None,
                    "prefill_min_clock_mhz": _opt_float(st[k.ST_PREFILL_MIN_MHZ])
                    if ready
                    else None,
                    "prefill_tokens_per_s_per_mhz": _opt_float(st[k.ST_PREFILL_K])
                    if ready
                    else None,
                    "load_bin": _opt_int(st[k.ST_LOAD_BIN]) if ready else None,
                    # The hold is kept in seconds; ticks of the configured interval left.
                    "hold_ticks": _opt_int(st[k.ST_HOLD_S] / self._config.interval_s)
                    if ready
                    else None,
                    "budget_feasible": self._budget_ok if mode == "budget" else None,
                }
            )
        return result


def _opt_int(x: float) -> int | None:
    return round(x) if math.isfinite(x) else None
