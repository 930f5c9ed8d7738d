"""Time one controller_step for 8 and for 10,000 groups (after warm-up; median of many runs).

Usage: python benchmarks/kernel_speed.py [--runs N]

Each run feeds fresh synthetic observations (load, latency and power vary per group and tick),
so the timed work includes learning, the power-model solve and the decision for every group.
The budget mode figure adds the node-wide power-limit allocation.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

from powerd.config import Config, SloConfig
from powerd.control import kernels as k
from powerd.control.policy import Controller, GroupSpec, KernelArrays
from powerd.model import GpuInfo

H100_CLOCKS = tuple(range(345, 1981, 15))


def make_controller(n_groups: int, mode: str) -> Controller:
    gpus = [
        GpuInfo(i, f"GPU-{i}", "H100", 200_000, 700_000, 700_000, 345, 1980, H100_CLOCKS)
        for i in range(2)
    ]
    specs = [GroupSpec(f"g{i}", f"s{i}", tuple(gpus), SloConfig()) for i in range(n_groups)]
    config = Config(mode=mode, node_power_budget_w=300.0 * 2 * n_groups)
    return Controller(config, specs)


def fill(arrays: KernelArrays, rng: np.random.Generator, tick: int) -> None:
    g = arrays.obs.shape[1]
    load = 0.5 + 0.4 * np.sin(0.01 * tick + np.arange(g))
    clock = arrays.state[k.ST_CAP_MHZ].copy()
    clock[~(clock > 0)] = 1980.0
    obs = arrays.obs
    obs[k.OBS_INTERVAL_S] = 1.0
    obs[k.OBS_GPU_COUNT] = 2.0
    obs[k.OBS_GEN_TPS] = 8000.0 * load * rng.uniform(0.95, 1.05, g)
    obs[k.OBS_PROMPT_TPS] = 20000.0 * load * rng.uniform(0.9, 1.1, g)
    power = 2 * (120.0 + 200.0 * load * (clock / 1980.0) ** 2) * rng.uniform(0.98, 1.02, g)
    obs[k.OBS_ENERGY_J] = power
    obs[k.OBS_POWER_W] = power
    obs[k.OBS_RUNNING] = 100.0 * load
    obs[k.OBS_WAITING] = np.where(rng.uniform(size=g) < 0.05, 10.0, 0.0)
    obs[k.OBS_TTFT_Q_S] = 0.2 * 1980.0 / clock * rng.uniform(0.9, 1.1, g)
    obs[k.OBS_ITL_Q_S] = 0.02 * (1 + (1300.0 / clock) ** 4) ** 0.25 * rng.uniform(0.95, 1.05, g)
    obs[k.OBS_SM_CLOCK_MHZ] = clock
    obs[k.OBS_REASONS] = 0.0
    obs[k.OBS_STALE] = np.where(rng.uniform(size=g) < 0.01, 1.0, 0.0)
    obs[k.OBS_REALTIME] = 1.0


def time_step(n_groups: int, runs: int, mode: str) -> tuple[float, float]:
    """Median wall-clock and median thread-CPU seconds of one controller_step over n_groups."""
    controller = make_controller(n_groups, mode)
    arrays = controller.arrays
    rng = np.random.default_rng(0)
    for tick in range(50):
        fill(arrays, rng, tick)
        arrays.step()
    samples = []
    cpu_samples = []
    for tick in range(runs):
        fill(arrays, rng, 50 + tick)
        c0 = time.thread_time()
        t0 = time.perf_counter()
        k.controller_step(
            arrays.obs,
            arrays.params,
            arrays.clocks,
            arrays.n_clocks,
            arrays.knobs,
            arrays.state,
            arrays.efit,
            arrays.cells,
            arrays.misses,
            arrays.out,
        )
        samples.append(time.perf_counter() - t0)
        cpu_samples.append(time.thread_time() - c0)
    return statistics.median(samples), statistics.median(cpu_samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    make_controller(1, "efficiency").warmup()
    print(f"os.getloadavg() before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    for mode in ("efficiency", "budget"):
        t8, c8 = time_step(8, args.runs * 10, mode)
        t10k, c10k = time_step(10_000, args.runs, mode)
        print(
            f"controller_step {mode:10s}  8 groups: {t8 * 1e6:7.1f} us (cpu {c8 * 1e6:7.1f} us)"
            f"   10,000 groups: {t10k * 1e3:6.2f} ms (cpu {c10k * 1e3:6.2f} ms)"
        )


if __name__ == "__main__":
    main()
