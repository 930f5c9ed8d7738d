"""A load step from 20 % to 90 % of capacity on the simulated node, the controller in the loop.

Requests are judged as the benchmark judges them: TTFT and mean inter-token latency of each
finished request against the SLO, from the simulator's ground truth.
"""

from __future__ import annotations

import numpy as np

from powerd.config import Config, SloConfig
from powerd.daemon import Daemon
from powerd.gpu.nvml import NvmlBackend
from powerd.sim.fake_nvml import FakeNvml
from powerd.sim.models import get_model_profile
from powerd.sim.node import SimNode
from powerd.sim.plant import load_gpu_profile
from powerd.sim.traces import Arrivals, scale_for_peak_load, synthetic
from powerd.simulation import inprocess_fetch, server_configs

STEP_S = 150.0
END_S = 300.0
RECOVERY_TICKS = 5
JUDGED_S = 15.0
"""Requests arriving in this span, from RECOVERY_TICKS after the step, are judged."""
SLO = SloConfig(ttft_s=2.0, itl_s=0.1)


def _step_arrivals() -> Arrivals:
    profile = load_gpu_profile("h100-sxm")
    model = get_model_profile("llama-3.1-8b")
    full = scale_for_peak_load(
        synthetic("constant", duration_s=END_S, seed=3),
        0.9,
        profile=profile,
        model=model,
        tp=1,
        n_servers=1,
    )
    keep = np.random.default_rng(4).uniform(size=len(full.time_s)) < 0.2 / 0.9
    keep |= full.time_s >= STEP_S
    return Arrivals(
        full.time_s[keep], full.prompt_tokens[keep], full.gen_tokens[keep], END_S, "step"
    )


def _node() -> SimNode:
    return SimNode(
        load_gpu_profile("h100-sxm"),
        1,
        get_model_profile("llama-3.1-8b"),
        1,
        _step_arrivals(),
        seed=0,
    )


def _attainment_between(node: SimNode, start_s: float, end_s: float) -> tuple[float, int]:
    records = node.finished_records()
    late = records[(records["arrival_s"] >= start_s) & (records["arrival_s"] < end_s)]
    met = (late["ttft_s"] <= SLO.ttft_s) & (late["itl_mean_s"] <= SLO.itl_s)
    return float(met.mean()), len(late)


def test_slo_attainment_recovers_within_five_ticks_of_a_load_step() -> None:
    node = _node()
    backend = NvmlBackend(FakeNvml(node.plant), clock=lambda: node.now_s)
    config = Config(servers=server_configs(node, slo=SLO), gpu_backend="sim")
    daemon = Daemon(config, backend, fetch=inprocess_fetch(node), inline_scrape=True)
    daemon.warmup()
    caps: list[int] = []
    while node.now_s < END_S - 1e-9:
        node.advance(1.0)
        snapshot = daemon.tick(node.now_s)
        cap_mhz = snapshot.groups[0].sm_clock_max_mhz
        assert cap_mhz is not None, "a controlled group has a decision every tick"
        caps.append(cap_mhz)
    f_max = daemon.infos[next(iter(daemon.infos))].sm_clock_max_mhz
    assert caps[int(STEP_S) - 1] < f_max - 300, "at 20 % load the clock is well below f_max"

    uncontrolled = _node()
    while uncontrolled.now_s < END_S - 1e-9:
        uncontrolled.advance(1.0)

    start = STEP_S + RECOVERY_TICKS
    powerd, n = _attainment_between(node, start, start + JUDGED_S)
    default, _ = _attainment_between(uncontrolled, start, start + JUDGED_S)
    assert n > 100, "enough requests after the step to judge"
    assert powerd >= default - 0.005, (
        f"requests arriving {RECOVERY_TICKS} ticks after the step: {powerd:.2%} met the SLO "
        f"with powerd, {default:.2%} with the controller off"
    )
