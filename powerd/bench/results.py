"""Value types of a benchmark run: per-policy ground truth, time series and the whole result."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True, slots=True)
class Series:
    """Per-tick ground truth of one policy's run (one entry per control interval).

    Arrays are float64 of equal length; `time_s` is the end of each interval.
    """

    time_s: np.ndarray
    load: np.ndarray
    """Requests in the node (running + waiting) at the end of the interval."""
    clock_mhz: np.ndarray
    """Mean actual SM clock across the node's GPUs."""
    power_w: np.ndarray
    """Node GPU power (true energy over the interval / interval)."""
    energy_j: np.ndarray
    """Node GPU energy over the interval."""
    tokens: np.ndarray
    """Tokens generated over the interval."""

    @staticmethod
    def empty() -> Series:
        z = np.zeros(0)
        return Series(z, z, z, z, z, z)

    def tokens_per_joule(self, bucket: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """(time_s, tokens per joule) over buckets of `bucket` intervals."""
        n = len(self.time_s) // bucket
        if n == 0:
            return np.zeros(0), np.zeros(0)
        tokens = self.tokens[: n * bucket].reshape(n, bucket).sum(axis=1)
        energy = self.energy_j[: n * bucket].reshape(n, bucket).sum(axis=1)
        times = self.time_s[bucket - 1 : n * bucket : bucket]
        with np.errstate(divide="ignore", invalid="ignore"):
            tpj = np.where(energy > 0, tokens / np.maximum(energy, 1e-12), 0.0)
        return times, tpj


@dataclass(frozen=True, slots=True)
class PolicyResult:
    """Ground truth of one policy over the whole run (the simulator's, not what powerd saw)."""

    name: str
    energy_j: float
    generated_tokens: int
    finished_requests: int
    slo_attainment: float
    """Fraction of finished requests that met both the TTFT and the mean inter-token SLO."""
    ttft_p95_s: float
    itl_p95_s: float
    duration_s: float
    wall_s: float
    """Wall time spent on this policy, its own re-simulations included."""
    series: Series = field(default_factory=Series.empty)
    notes: str = ""
    """What the policy chose (a clock, a limit), for the table."""
    decisions: dict[str, float] = field(default_factory=dict)
    """Share of group-ticks by the controller's reason for its setting (model.DECISION_REASONS),
    for policies that give one (powerd); empty for the others."""

    @property
    def tokens_per_joule(self) -> float:
        return self.generated_tokens / self.energy_j if self.energy_j > 0 else 0.0

    @property
    def mean_power_w(self) -> float:
        return self.energy_j / self.duration_s if self.duration_s > 0 else 0.0


@dataclass(frozen=True, slots=True)
class BenchInfo:
    """What was benchmarked."""

    trace: str
    gpu_model: str
    model: str
    gpus: int
    tp: int
    duration_s: float
    ttft_slo_s: float
    itl_slo_s: float
    server_kind: str
    seed: int
    load: str
    """How the trace was scaled, in words (`peak load 0.70` or `rate x1.5`)."""
    interval_s: float = 1.0
    """The control tick of every policy."""


@dataclass(frozen=True, slots=True)
class BenchResult:
    info: BenchInfo
    policies: dict[str, PolicyResult]
    wall_s: float
    sweep: dict[int, PolicyResult] = field(default_factory=dict)
    """The static-clock sweep's runs by clock cap (MHz), when it ran."""

    def share_of_oracle_saving(self) -> float | None:
        """(E_default - E_powerd) / (E_default - E_oracle); None without the three policies or
        when the oracle saves nothing."""
        try:
            e_default = self.policies["default"].energy_j
            e_powerd = self.policies["powerd"].energy_j
            e_oracle = self.policies["oracle"].energy_j
        except KeyError:
            return None
        saving = e_default - e_oracle
        if saving <= 0:
            return None
        return (e_default - e_powerd) / saving
