"""The policies the benchmark compares, each driving a simulated node in virtual time.

A policy is told `start(node)` once at t = 0 and `step(node, now_s)` at the start of every
control interval, before the node advances. Baselines act on the plant's setters (the same
actuation dead time NVML writes see); `powerd` runs the production daemon end to end: NVML
through the fake NVML, the servers through their own /metrics exposition.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np

from powerd.bench import measure
from powerd.config import Config, SimConfig, SloConfig
from powerd.control.policy import group_floor_mhz
from powerd.daemon import Daemon
from powerd.gpu.nvml import NvmlBackend
from powerd.sim.node import SimNode
from powerd.simulation import fake_nvml_for, inprocess_fetch, server_configs


class BenchPolicy(Protocol):
    name: str
    samples_per_interval: int
    """Parts of each control interval, each ended by sample() when there are more than one."""

    def start(self, node: SimNode) -> None: ...

    def step(self, node: SimNode, now_s: float) -> None: ...

    def sample(self, node: SimNode) -> None:
        """Look at the node between steps, at the end of each part of an interval."""
        ...

    def notes(self) -> str:
        """What the policy chose, in a few words, for the table."""
        ...


class BenchPolicyBase:
    """For a policy that acts only at the start of each interval."""

    samples_per_interval: int = 1

    def sample(self, node: SimNode) -> None:
        pass


# ---------------------------------------------------------------------------------------------
# default and a fixed clock


class DefaultPolicy(BenchPolicyBase):
    """No control: the clocks boost to f_max, the power limit stays at its default."""

    name = "default"

    def start(self, node: SimNode) -> None:
        pass

    def step(self, node: SimNode, now_s: float) -> None:
        pass

    def notes(self) -> str:
        return "unlocked, default limit"


@dataclass
class FixedClockPolicy(BenchPolicyBase):
    """One clock cap on every GPU for the whole run (a point of the static-clock sweep)."""

    clock_mhz: int
    name: str = "static-clock"

    def start(self, node: SimNode) -> None:
        measure.set_clock_cap(node, self.clock_mhz)

    def step(self, node: SimNode, now_s: float) -> None:
        pass

    def notes(self) -> str:
        return f"{self.clock_mhz} MHz"


# ---------------------------------------------------------------------------------------------
# static-power-cap: Zeus's GlobalPowerLimitOptimizer


@dataclass
class _Measurement:
    limit_w: float
    energy_j: float
    time_s: float
    tokens: float


@dataclass
class StaticPowerCapPolicy(BenchPolicyBase):
    """Zeus's GlobalPowerLimitOptimizer on the live run.

    From the maximum limit down to the minimum in `step_w` steps, each limit is held for
    `warmup_s` then measured for `profile_s` (energy of all GPUs, time and tokens). Zeus's
    ZeusCost selector (eta 0.5) then picks the limit with the least
    eta·energy + (1 − eta)·max_power·time, per generated token, with max_power the highest
    profiled limit times the number of GPUs, and holds it for the rest of the run. Windows
    that generated no token cannot be scored and are skipped.
    """

    step_w: float = 25.0
    warmup_s: float = 2.0
    profile_s: float = 5.0
    eta: float = 0.5
    name: str = "static-power-cap"
    limits_w: list[float] = field(default_factory=list)
    measurements: list[_Measurement] = field(default_factory=list)
    chosen_w: float | None = None
    _index: int = 0
    _phase_end_s: float = 0.0
    _profiling: bool = False
    _mark: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def start(self, node: SimNode) -> None:
        profile = node.plant.profile
        top, bottom = profile.power_limit_max_w, profile.power_limit_min_w
        self.limits_w = []
        limit = top
        while limit >= bottom - 1e-9:
            self.limits_w.append(limit)
            limit -= self.step_w
        self._index = 0
        self._begin_warmup(node, 0.0)

    def _begin_warmup(self, node: SimNode, now_s: float) -> None:
        measure.set_power_limit_w(node, self.limits_w[self._index])
        self._profiling = False
        self._phase_end_s = now_s + self.warmup_s

    def step(self, node: SimNode, now_s: float) -> None:
        if self.chosen_w is not None or now_s + 1e-9 < self._phase_end_s:
            return
        if not self._profiling:
            self._profiling = True
            self._phase_end_s = now_s + self.profile_s
            self._mark = (now_s, measure.energy_j(node), measure.generated_tokens(node))
            return
        t0, e0, k0 = self._mark
        self.measurements.append(
            _Measurement(
                self.limits_w[self._index],
                measure.energy_j(node) - e0,
                now_s - t0,
                measure.generated_tokens(node) - k0,
            )
        )
        self._index += 1
        if self._index < len(self.limits_w):
            self._begin_warmup(node, now_s)
            return
        self.chosen_w = self._select(node.plant.n_gpus)
        measure.set_power_limit_w(node, self.chosen_w)

    def _select(self, n_gpus: int) -> float:
        scored = [m for m in self.measurements if m.tokens > 0]
        if not scored:
            return self.limits_w[0]
        max_power_w = max(m.limit_w for m in self.measurements) * n_gpus

        def cost(m: _Measurement) -> float:
            energy = m.energy_j / m.tokens
            time = m.time_s / m.tokens
            return self.eta * energy + (1.0 - self.eta) * max_power_w * time

        return min(scored, key=cost).limit_w

    def notes(self) -> str:
        if self.chosen_w is None:
            return f"profiling ({len(self.measurements)}/{len(self.limits_w)} limits)"
        return f"{self.chosen_w:.0f} W"


# ---------------------------------------------------------------------------------------------
# util-governor: GEOPM's gpu_activity agent


@dataclass
class UtilGovernorPolicy:
    """GEOPM's gpu_activity agent: F = Fe + (Fmax − Fe) × activity, per GPU group.

    `efficient_clock_mhz` (Fe) comes from a frequency sweep of the workload (the benchmark
    uses its static-clock sweep's clock with the most tokens per joule). Activity is the
    group's mean activity over the last interval, read from the simulated plant: its activity
    factor a (dvfs_plant_model: about 0.1-0.3 in decode, 0.9-1.2 in prefill), averaged over
    `samples_per_interval` samples and clipped to [0, 1]. It stands in for DCGM's SM_ACTIVE,
    which the plant does not model; SM_ACTIVE likely reads higher in memory-bound decode, where
    GEOPM's agent would then run higher clocks than this one.
    """

    efficient_clock_mhz: int
    name: str = "util-governor"
    samples_per_interval: int = 10
    """Activity samples per control interval (100 ms at 1 s, DCGM's usual update period)."""
    _clock_sum: float = 0.0
    _steps: int = 0
    _groups: list[list[int]] = field(default_factory=list)
    _activity_sum: np.ndarray = field(default_factory=lambda: np.zeros(0))
    _samples: int = 0

    def start(self, node: SimNode) -> None:
        self._groups = [list(server.gpu_indices) for server in node.servers]
        self._activity_sum = np.zeros(node.plant.n_gpus)

    def sample(self, node: SimNode) -> None:
        self._activity_sum += measure.gpu_activity(node)
        self._samples += 1

    def step(self, node: SimNode, now_s: float) -> None:
        f_max = node.plant.profile.sm_clock_max_mhz
        fe = min(self.efficient_clock_mhz, f_max)
        if self._samples:
            activity = self._activity_sum / self._samples
        else:
            activity = measure.gpu_activity(node)
        self._activity_sum[:] = 0.0
        self._samples = 0
        for gpus in self._groups:
            a = float(np.clip(np.mean(activity[gpus]), 0.0, 1.0))
            target = fe + (f_max - fe) * a
            clock = measure.snap_clock_mhz(node, target)
            measure.set_clock_cap(node, clock, gpus)
            self._clock_sum += clock
            self._steps += 1

    def notes(self) -> str:
        mean = self._clock_sum / self._steps if self._steps else 0.0
        return f"Fe {self.efficient_clock_mhz} MHz, mean cap {mean:.0f} MHz"


# ---------------------------------------------------------------------------------------------
# slo-lowest-clock: throttLL'eM's rule with a perfect model of the plant


@dataclass
class SloLowestClockPolicy(BenchPolicyBase):
    """throttLL'eM: each interval, per group, the lowest clock whose predicted iteration
    rate meets the SLO, predicted by the simulator's own roofline with the current batch.

    The inter-token constraint: the next iteration (the running batch's decodes plus the next
    prefill chunk) takes at most `margin`·ITL SLO. The TTFT constraint: the oldest waiting
    request's age plus the time to prefill every queued prompt token, at that iteration time,
    stays within `margin`·TTFT SLO. `margin` is powerd's default slo_margin, so both aim at
    the same latency. The clocks searched start at powerd's default floor (half f_max): below
    it the plant model over-predicts power (dvfs_plant_model §6), which would charge this
    policy alone for the model's error.
    """

    slo: SloConfig
    margin: float = 0.85
    name: str = "slo-lowest-clock"
    _clock_sum: float = 0.0
    _steps: int = 0
    _table_mhz: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def start(self, node: SimNode) -> None:
        table = measure.clock_table_mhz(node)
        f_max = int(node.plant.profile.sm_clock_max_mhz)
        floor_mhz = group_floor_mhz([int(c) for c in table], f_max, None)
        self._table_mhz = table[table >= floor_mhz]

    def step(self, node: SimNode, now_s: float) -> None:
        table = self._table_mhz
        for server in node.servers:
            clock = measure.lowest_clock_meeting_slo(
                node, server, table, self.slo.itl_s * self.margin, self.slo.ttft_s * self.margin
            )
            measure.set_clock_cap(node, clock, server.gpu_indices)
            self._clock_sum += clock
            self._steps += 1

    def notes(self) -> str:
        mean = self._clock_sum / self._steps if self._steps else 0.0
        return f"mean cap {mean:.0f} MHz"


# ---------------------------------------------------------------------------------------------
# powerd: the production daemon, end to end


@dataclass
class PowerdPolicy:
    """The daemon with the default controller: Daemon.tick over NvmlBackend(FakeNvml) and the
    sources reading each simulated server's exposition in-process (its own kind's format).
    No journal: the node is thrown away after the run."""

    sim: SimConfig
    slo: SloConfig
    interval_s: float = 1.0
    name: str = "powerd"
    daemon: Daemon | None = None
    samples_per_interval: int = 1
    """Between ticks the daemon reads prompt backlogs every guard interval (SGLang servers)."""
    _clock_sum: float = 0.0
    _steps: int = 0
    _part: int = 0
    _reasons: Counter[str] = field(default_factory=Counter)

    def start(self, node: SimNode) -> None:
        sim = replace(self.sim, state_file=None)
        # Virtual time: a pause of this process (a busy machine, a debugger) is no hung GPU.
        backend = NvmlBackend(fake_nvml_for(node, sim), clock=lambda: node.now_s, stall_s=math.inf)
        config = Config(
            servers=server_configs(node, slo=self.slo),
            interval_s=self.interval_s,
            gpu_backend="sim",
            sim=sim,
        )
        # Inline scraping: in virtual time a wall-clock scrape deadline would make the result
        # depend on how loaded this machine is.
        daemon = Daemon(config, backend, fetch=inprocess_fetch(node), inline_scrape=True)
        daemon.warmup()
        self.daemon = daemon
        guard_s = config.control.prefill_guard_interval_s
        if daemon.guards_backlog:
            self.samples_per_interval = max(round(self.interval_s / guard_s), 1)

    def step(self, node: SimNode, now_s: float) -> None:
        if self.daemon is None:
            raise RuntimeError("PowerdPolicy.step before start")
        snapshot = self.daemon.tick(now_s)
        self._part = 0
        for group in snapshot.groups:
            if group.sm_clock_max_mhz is not None:
                self._clock_sum += group.sm_clock_max_mhz
                self._steps += 1
            self._reasons[group.decision_reason or "none"] += 1

    def sample(self, node: SimNode) -> None:
        """The daemon between ticks; the last part of an interval ends where the next tick is."""
        self._part += 1
        if self.daemon is not None and self._part < self.samples_per_interval:
            self.daemon.guard(node.now_s)

    def notes(self) -> str:
        mean = self._clock_sum / self._steps if self._steps else 0.0
        return f"mean cap {mean:.0f} MHz"

    def decision_shares(self) -> dict[str, float]:
        """Share of group-ticks by the controller's reason for its setting, most held first."""
        total = sum(self._reasons.values())
        return {reason: n / total for reason, n in self._reasons.most_common()} if total else {}


def coarse_grid_mhz(table: Sequence[int], low_mhz: float, high_mhz: float, n: int) -> list[int]:
    """n clocks from the (ascending) table, evenly spread over [low_mhz, high_mhz], both ends
    included, de-duplicated, ascending."""
    arr = np.asarray(table, dtype=np.float64)
    points = np.linspace(low_mhz, high_mhz, max(n, 2))
    out = sorted({int(arr[int(np.argmin(np.abs(arr - p)))]) for p in points})
    return out


def refine_around(table: Sequence[int], grid: Sequence[int], best: int, per_side: int) -> list[int]:
    """Up to `per_side` clocks of the table on each side of `best`, evenly spaced between it
    and its grid neighbours (the grid's own points excluded)."""
    arr = np.asarray(table, dtype=np.float64)
    ordered = sorted(grid)
    k = ordered.index(best)
    out: set[int] = set()
    for neighbour in (
        ordered[k - 1] if k > 0 else None,
        ordered[k + 1] if k + 1 < len(ordered) else None,
    ):
        if neighbour is None:
            continue
        for j in range(1, per_side + 1):
            target = best + (neighbour - best) * j / (per_side + 1)
            clock = int(arr[int(np.argmin(np.abs(arr - target)))])
            if clock not in ordered and not math.isclose(clock, best):
                out.add(clock)
    return sorted(out)
