"""`powerd demo`: the daemon on a simulated node in real time, then a side-by-side summary.

The controlled run is the production loop against the fake NVML and the simulated servers'
HTTP /metrics. The comparison replays the very same requests on an identical node with the
controller off (maximum clocks, default power limit), in virtual time, and both are judged as
the benchmark judges a policy (powerd.bench.measure): the simulator's true energy, every
finished request's latencies, and requests still waiting past the TTFT SLO as misses.
"""

from __future__ import annotations

import logging
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from powerd.bench.measure import Outcome, outcome
from powerd.config import (
    MODES,
    REPLAY_TRACE_DEFAULT,
    Config,
    ConfigError,
    MetricsConfig,
    SimConfig,
    SloConfig,
)
from powerd.control.kernels import CACHE_WARM
from powerd.daemon import Daemon
from powerd.exporter import Exporter, ExporterError
from powerd.journal import Journal
from powerd.model import Snapshot
from powerd.sim.node import SimNode
from powerd.simulation import build_node, server_configs, start_simulation
from powerd.wording import counted, plural

if TYPE_CHECKING:
    from powerd.config import ServerConfig

log = logging.getLogger(__name__)

DEMO_SLO = SloConfig(ttft_s=2.0, itl_s=0.1)


@dataclass(frozen=True)
class DemoOptions:
    gpus: int = 4
    tp: int = 2
    duration_s: float = 60.0
    metrics_port: int = 9863
    server_kind: str = "vllm"
    gpu_model: str = "h100-sxm"
    gpu_profile_file: str | None = None
    model: str | None = None
    trace: str = REPLAY_TRACE_DEFAULT
    time_compression: float = 10.0
    peak_load: float = 0.7
    mode: str = "efficiency"
    target_tokens_per_joule: float | None = None
    node_power_budget_w: float | None = None
    seed: int = 0
    quiet: bool = False

    def validate(self) -> None:
        """ValueError naming the command-line option when the demo cannot run as asked."""
        from powerd.runtime import check_sim_config

        if self.mode not in MODES:
            raise ValueError(f"--mode: must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.mode == "target" and self.target_tokens_per_joule is None:
            raise ValueError("--mode target needs --target-tokens-per-joule")
        if self.mode == "budget" and self.node_power_budget_w is None:
            raise ValueError("--mode budget needs --node-power-budget-w")
        if self.gpus < 1 or self.tp < 1 or self.gpus % self.tp:
            raise ValueError(f"--tp ({self.tp}) must divide --gpus ({self.gpus})")
        for option, value in (
            ("--duration", self.duration_s),
            ("--time-compression", self.time_compression),
            ("--peak-load", self.peak_load),
        ):
            if not 0 < value < float("inf"):
                raise ValueError(f"{option}: must be a positive number, got {value}")
        if not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"--metrics-port: must be in [0, 65535], got {self.metrics_port}")
        sim = sim_config_for(self)
        check_sim_config(sim, keys=_SIM_OPTIONS)
        try:
            # The run keeps its state in a temporary folder, made when it starts.
            demo_config(self, sim, servers=(), state_dir=tempfile.gettempdir()).validate()
        except ConfigError as exc:
            raise ValueError(str(exc)) from None


_SIM_OPTIONS = {
    "gpu_model": "--gpu-model",
    "gpu_profile_file": "--gpu-profile",
    "model": "--model",
    "tp": "--tp",
    "trace": "--trace",
}


def demo_config(
    options: DemoOptions, sim: SimConfig, *, servers: tuple[ServerConfig, ...], state_dir: str
) -> Config:
    """The daemon's config for the demo's simulated node."""
    return Config(
        servers=servers,
        mode=options.mode,
        target_tokens_per_joule=options.target_tokens_per_joule,
        node_power_budget_w=options.node_power_budget_w,
        state_dir=state_dir,
        gpu_backend="sim",
        metrics=MetricsConfig(port=options.metrics_port),
        sim=sim,
    )


def sim_config_for(options: DemoOptions, state_file: str | None = None) -> SimConfig:
    return SimConfig(
        gpu_model=options.gpu_model,
        gpu_profile_file=options.gpu_profile_file,
        gpus=options.gpus,
        model=options.model,
        tp=options.tp,
        server_kind=options.server_kind,
        trace=options.trace,
        time_compression=options.time_compression,
        peak_load=options.peak_load,
        state_file=state_file,
        seed=options.seed,
    )


def run_demo(options: DemoOptions) -> int:
    """Run the demo (options.validate() first); exit status, 1 with one sentence when the
    metrics port cannot be bound."""
    with tempfile.TemporaryDirectory(prefix="powerd-demo-") as tmp:
        sim = sim_config_for(options, state_file=str(Path(tmp) / "gpus.json"))
        exporter = Exporter(MetricsConfig(port=options.metrics_port))
        try:
            exporter.start()
        except ExporterError as exc:
            print(f"powerd demo: {exc} (--metrics-port)", file=sys.stderr)
            return 1
        if not CACHE_WARM:
            print(
                "powerd demo: compiling the simulator's and the controller's kernels (once "
                "for each version; up to a minute on a small machine)",
                flush=True,
            )
        simulation = start_simulation(sim, duration_s=options.duration_s)
        servers = server_configs(simulation.node, simulation.urls(), DEMO_SLO)
        config = demo_config(options, sim, servers=servers, state_dir=tmp)
        journal = Journal(Path(tmp) / "journal.json")
        daemon = Daemon(config, simulation.backend, journal=journal, publish=exporter.publish)
        daemon.install_signal_handlers()
        daemon.warmup()
        simulation.driver.start()
        gpus = counted(options.gpus, f"simulated {sim.gpu_model} GPU")
        served = counted(len(daemon.groups), f"{options.server_kind} server")
        print(
            f"powerd demo: {gpus}, {served}, mode {options.mode}; "
            f"metrics on http://127.0.0.1:{exporter.port}/metrics"
        )
        try:
            daemon.run_forever(
                duration_s=options.duration_s,
                on_tick=None if options.quiet else _print_tick,
            )
        finally:
            exporter.stop()
            simulation.stop()
        elapsed_s = simulation.node.now_s
        controlled = outcome(simulation.node, DEMO_SLO)

    baseline_node = build_node(replace(sim, state_file=None), options.duration_s)
    _advance(baseline_node, elapsed_s)
    uncontrolled = outcome(baseline_node, DEMO_SLO)
    print(format_summary(controlled, uncontrolled, elapsed_s))
    return 0


def _advance(node: SimNode, duration_s: float, step_s: float = 1.0) -> None:
    remaining = duration_s
    while remaining > 1e-9:
        dt = min(step_s, remaining)
        node.advance(dt)
        remaining -= dt


def _print_tick(snapshot: Snapshot) -> None:
    parts = []
    for group in snapshot.groups:
        tokens = group.generation_tokens_per_s
        power = group.power_w
        tpj = group.tokens_per_joule
        parts.append(
            f"{group.group}: {tokens or 0:7.0f} tok/s {power or 0:6.0f} W "
            f"{tpj or 0:5.2f} tok/J cap {group.sm_clock_max_mhz:4d} MHz"
        )
    print(f"[{snapshot.ticks_total:4d}] " + " | ".join(parts), flush=True)


def format_summary(controlled: Outcome, uncontrolled: Outcome, duration_s: float) -> str:
    def row(name: str, c: str, u: str) -> str:
        return f"  {name:<24}{c:>14}{u:>16}"

    gain = (
        (controlled.tokens_per_joule / uncontrolled.tokens_per_joule - 1) * 100
        if uncontrolled.tokens_per_joule > 0
        else 0.0
    )
    requests = plural("request", controlled.finished, uncontrolled.finished)
    lines = [
        f"\nSummary over {duration_s:.0f} s of the same load ({controlled.finished} "
        f"vs {uncontrolled.finished} {requests} finished):",
        row("", "powerd", "controller off"),
        row(
            "tokens per joule",
            f"{controlled.tokens_per_joule:.3f}",
            f"{uncontrolled.tokens_per_joule:.3f}",
        ),
        row(
            "energy (kJ)", f"{controlled.energy_j / 1e3:.1f}", f"{uncontrolled.energy_j / 1e3:.1f}"
        ),
        row(
            "generated tokens",
            f"{controlled.generated_tokens:.0f}",
            f"{uncontrolled.generated_tokens:.0f}",
        ),
        row("TTFT p95 (s)", f"{controlled.ttft_p95_s:.3f}", f"{uncontrolled.ttft_p95_s:.3f}"),
        row("ITL p95 (s)", f"{controlled.itl_p95_s:.4f}", f"{uncontrolled.itl_p95_s:.4f}"),
        row(
            "requests within SLO",
            f"{controlled.attainment:.1%}",
            f"{uncontrolled.attainment:.1%}",
        ),
        f"  tokens per joule: {gain:+.1f} % with powerd",
    ]
    return "\n".join(lines)
