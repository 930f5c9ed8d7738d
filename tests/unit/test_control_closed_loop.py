"""Closed-loop tests: the controller against a small synthetic serving plant defined here.

The plant follows reference/dvfs_plant_model.md section 6 in miniature: a roofline iteration time
t(f) = [t_m^4 + (t_c f_max/f)^4]^(1/4), demand-driven tokens through continuous batching
(Little's law sets the batch), power from P_static + P_dyn * (f/f_max) * v(f)^2, and noise on
power and on the latency quantiles. The true optimum is found by brute force over the plant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pytest

from powerd.config import Config, ControlConfig, SloConfig
from powerd.control.policy import Controller, GroupSpec, group_floor_mhz
from powerd.model import GroupObservation
from tests.unit.snapshots import gpu_info

GPU = gpu_info(0)  # an H100: 345-1980 MHz in 15 MHz steps
F_MAX = 1980.0
CLOCKS = GPU.supported_sm_clocks_mhz
FLOOR_MHZ = group_floor_mhz(CLOCKS, int(F_MAX), None)  # the controller's default floor


def voltage_share(clock_mhz: float) -> float:
    """Normalised voltage: flat at 0.7 below 1260 MHz, linear up to 1 at f_max (section 6b)."""
    return 0.7 + 0.3 * min(max((clock_mhz - 1260.0) / (F_MAX - 1260.0), 0.0), 1.0)


def dynamic_share(clock_mhz: float) -> float:
    return clock_mhz / F_MAX * voltage_share(clock_mhz) ** 2


@dataclass
class Plant:
    """One GPU serving one model.

    race_to_idle=False: the GPU is always busy while requests run, power follows batch activity
    and memory traffic (energy per token falls monotonically with the clock while it keeps up).
    race_to_idle=True: the GPU works at full batch and idles in between at low power, so energy
    per token is U-shaped in the clock (busy-time static power against dynamic power).
    """

    race_to_idle: bool = False
    t_mem_s: float = 0.008
    t_mem_per_seq_s: float = 4e-5
    kappa: float = 0.65
    max_batch: float = 256.0
    tokens_per_request: float = 200.0
    prefill_s: float = 0.05
    noise: float = 0.03
    seed: int = 0
    queue_tokens: float = 0.0
    rng: np.random.Generator = field(init=False)

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)

    def iteration_s(self, clock_mhz: float, batch: float) -> float:
        t_mem = self.t_mem_s + self.t_mem_per_seq_s * batch
        t_compute = self.kappa * t_mem * F_MAX / clock_mhz
        return float((t_mem**4 + t_compute**4) ** 0.25)

    def steady(self, clock_mhz: float, demand_tps: float) -> tuple[float, float]:
        """Batch and iteration time when serving demand_tps (batch capped at max_batch)."""
        batch = 1.0
        for _ in range(80):
            batch = min(self.max_batch, demand_tps * self.iteration_s(clock_mhz, batch))
        return batch, self.iteration_s(clock_mhz, batch)

    def capacity_tps(self, clock_mhz: float) -> float:
        return self.max_batch / self.iteration_s(clock_mhz, self.max_batch)

    def request_itl_s(self, clock_mhz: float, demand_tps: float) -> float:
        """Requests' mean inter-token latency: every running request gets a token per iteration."""
        return self.steady(clock_mhz, demand_tps)[1]

    def power_w(self, clock_mhz: float, demand_tps: float) -> float:
        batch, iteration = self.steady(clock_mhz, demand_tps)
        if self.race_to_idle:
            busy = min(1.0, demand_tps / self.capacity_tps(clock_mhz))
            return 60.0 + busy * (300.0 + 300.0 * dynamic_share(clock_mhz))
        activity = 0.08 + 0.6 * batch / (batch + 300.0)
        memory_busy = (self.t_mem_s + self.t_mem_per_seq_s * batch) / iteration
        return 70.0 + (52.0 + activity * 750.0) * dynamic_share(clock_mhz) + 90.0 * memory_busy

    def optimum_mhz(self, demand_tps: float, itl_line_s: float) -> int:
        """The supported clock >= the floor of least energy per token whose requests' mean ITL
        meets the line."""
        feasible = [
            f
            for f in CLOCKS
            if f >= FLOOR_MHZ
            and self.capacity_tps(f) >= demand_tps
            and self.request_itl_s(f, demand_tps) <= itl_line_s
        ]
        return min(feasible, key=lambda f: self.power_w(f, demand_tps))

    def tick(self, clock_mhz: float, demand_tps: float, group: str = "g0") -> GroupObservation:
        """Serve one second at clock_mhz and report what a server and NVML would."""
        capacity = self.capacity_tps(clock_mhz)
        served = min(demand_tps + self.queue_tokens, capacity)
        self.queue_tokens = max(0.0, self.queue_tokens + demand_tps - served)
        batch, iteration = self.steady(clock_mhz, min(demand_tps, capacity))
        # The token-level p95 sits above the mean (prefill stalls), and is noisy.
        itl = 1.1 * iteration * math.exp(self.rng.normal(0.0, self.noise))
        ttft = self.prefill_s * F_MAX / clock_mhz + self.queue_tokens / capacity + iteration
        power = self.power_w(clock_mhz, min(demand_tps, capacity))
        power *= 1.0 + self.rng.normal(0.0, self.noise / 3)
        return GroupObservation(
            group=group,
            interval_s=1.0,
            gpu_count=1,
            energy_j=power,
            power_w=power,
            generation_tokens_per_s=served * (1.0 + self.rng.normal(0.0, 0.02)),
            prompt_tokens_per_s=0.0,
            running=batch,
            waiting=self.queue_tokens / self.tokens_per_request,
            ttft_q_s=ttft * math.exp(self.rng.normal(0.0, self.noise)),
            itl_q_s=itl,
            sm_clock_mhz=clock_mhz,
            clock_event_reasons=0,
            stale=False,
        )


def make_controller(slo: SloConfig, config: Config | None = None) -> Controller:
    return Controller(config or Config(), [GroupSpec("g0", "server", (GPU,), slo)])


def run_loop(
    plant: Plant, controller: Controller, demand_at: list[float]
) -> tuple[list[int], list[GroupObservation]]:
    clock = F_MAX
    clocks: list[int] = []
    observations: list[GroupObservation] = []
    for tick, demand in enumerate(demand_at):
        obs = plant.tick(clock, demand)
        observations.append(obs)
        clock = controller.decide(float(tick), [obs])[0].sm_clock_max_mhz
        clocks.append(clock)
    return clocks, observations


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("itl_slo_s", [0.0145, 0.1])
def test_converges_to_lowest_clock_meeting_the_slo(seed: int, itl_slo_s: float) -> None:
    plant = Plant(seed=seed)
    demand = 0.3 * plant.capacity_tps(F_MAX)
    slo = SloConfig(itl_s=itl_slo_s, ttft_s=2.0)
    truth = plant.optimum_mhz(demand, 0.85 * itl_slo_s)
    # The tight SLO binds inside the clock range; the loose one leaves the floor optimal.
    assert (truth > FLOOR_MHZ + 100) == (itl_slo_s < 0.05)
    clocks, _ = run_loop(plant, make_controller(slo), [demand] * 300)
    settled = np.mean(clocks[-150:])
    assert abs(settled - truth) <= 60, (settled, truth)
    misses = [f for f in clocks[30:] if plant.request_itl_s(f, demand) > itl_slo_s]
    assert len(misses) <= 0.01 * len(clocks[30:])


@pytest.mark.parametrize(("seed", "load"), [(0, 0.3), (1, 0.5)])
def test_finds_the_energy_optimum_of_a_u_shaped_plant(seed: int, load: float) -> None:
    plant = Plant(race_to_idle=True, seed=seed)
    demand = load * plant.capacity_tps(F_MAX)
    truth = plant.optimum_mhz(demand, 0.085)
    # The optimum is interior: both the floor and f_max cost clearly more energy.
    assert plant.power_w(FLOOR_MHZ, demand) > 1.03 * plant.power_w(truth, demand)
    assert plant.power_w(F_MAX, demand) > 1.1 * plant.power_w(truth, demand)
    clocks, _ = run_loop(plant, make_controller(SloConfig()), [demand] * 600)
    settled = np.mean(clocks[-200:])
    assert abs(settled - truth) <= 60, (settled, truth)


def test_load_step_meets_the_slo_again_within_five_ticks() -> None:
    plant = Plant(seed=3)
    capacity = plant.capacity_tps(F_MAX)
    slo = SloConfig(itl_s=0.03, ttft_s=0.5)
    step_at = 150
    demand = [0.2 * capacity] * step_at + [0.9 * capacity] * 100
    # At the low-load clock the high load would overrun: the step is a real test.
    assert plant.capacity_tps(FLOOR_MHZ) < 0.9 * capacity
    clocks, observations = run_loop(plant, make_controller(slo), demand)
    assert clocks[step_at - 1] < 1300
    assert clocks[step_at] > clocks[step_at - 1]
    for tick in range(step_at + 5, len(demand)):
        obs = observations[tick]
        assert plant.request_itl_s(clocks[tick - 1], demand[tick]) <= slo.itl_s
        assert obs.ttft_q_s is not None and obs.ttft_q_s <= slo.ttft_s
        assert obs.waiting is not None and obs.waiting <= slo.max_waiting
    # Still efficient after the step: well below f_max on average.
    assert np.mean(clocks[-50:]) < F_MAX - 100


def test_slower_descent_setting_is_respected_in_the_loop() -> None:
    plant = Plant(seed=4)
    demand = 0.3 * plant.capacity_tps(F_MAX)
    config = Config(control=ControlConfig(max_step_down_mhz=15, dither_mhz=0))
    clocks, _ = run_loop(plant, make_controller(SloConfig(), config), [demand] * 40)
    steps = np.diff([int(F_MAX), *clocks])
    assert steps.min() >= -15
    assert clocks[-1] == F_MAX - 15 * 40
