"""The seeded simulated run behind tests/fixtures/metrics.golden, and its normalisation.

One place builds the run for both the test (tests/unit/test_metrics_golden.py) and the
regenerator (`make golden`, tests/regen_golden.py), so the two cannot drift apart.

The run: a 4-GPU simulated H100 node serving llama-3.1-8b on two TP=2 vLLM servers, under the
synthetic diurnal load (no trace file needed), seed 0; the production Daemon with the default
Controller over NvmlBackend(FakeNvml) and the servers' /metrics read in-process; 60 ticks of
one virtual second each; then the exporter's whole /metrics.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from powerd.config import Config, GridConfig, SimConfig, SloConfig
from powerd.daemon import Daemon
from powerd.exporter import Exporter, default_build_info
from powerd.gpu.nvml import NvmlBackend
from powerd.simulation import build_node, fake_nvml_for, inprocess_fetch, server_configs

GOLDEN_PATH = Path(__file__).resolve().parent / "fixtures" / "metrics.golden"

TICKS = 60
TICK_S = 1.0
SIM = SimConfig(
    gpu_model="h100-sxm",
    gpus=4,
    tp=2,
    model="llama-3.1-8b",
    server_kind="vllm",
    trace="diurnal",
    # An hour of the diurnal pattern in the minute, so the load moves and the controller acts.
    time_compression=60.0,
    peak_load=0.7,
    seed=0,
)
SLO = SloConfig(ttft_s=2.0, itl_s=0.1)
GRID = GridConfig(price_per_kwh=0.12, carbon_g_per_kwh=380.0, pue=1.3)

PLACEHOLDER = "<normalised>"

NORMALISED_SERIES: dict[str, str] = {
    "powerd_source_scrape_duration_seconds": "wall-clock time of a scrape",
    "powerd_loop_duration_seconds_bucket": "wall-clock tick durations (except le=+Inf)",
    "powerd_loop_duration_seconds_sum": "wall-clock tick durations",
}
"""Sample names whose values depend on the machine's speed, and why; their values are replaced
by PLACEHOLDER. powerd_loop_duration_seconds_count and its le="+Inf" bucket (the tick count)
are kept. powerd_build_info keeps its label names; its label values (versions of powerd, Python
and libraries) are replaced too."""

HEADER = (
    "# Golden /metrics of a seeded simulated run (tests/golden_run.py); regenerate with\n"
    "# `make golden` and review the diff. Machine-dependent values are replaced by\n"
    f"# {PLACEHOLDER}: powerd_build_info label values (versions), and the values of\n"
    + "".join(f"#   {name} ({why})\n" for name, why in NORMALISED_SERIES.items())
    + "# Everything else is compared exactly.\n"
)

_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?P<labels>\{.*\})? (?P<value>\S+)$")
_LABEL_VALUE = re.compile(r'(?P<key>[a-zA-Z_][a-zA-Z0-9_]*)="(?:[^"\\]|\\.)*"')


@dataclass(frozen=True)
class GoldenRun:
    exposition: str
    """The exporter's /metrics text as rendered, before normalisation."""


def run_seeded(ticks: int = TICKS) -> GoldenRun:
    """Run the seeded node and daemon for `ticks` virtual seconds; return the exposition."""
    node = build_node(SIM, duration_s=ticks * TICK_S)
    backend = NvmlBackend(fake_nvml_for(node, SIM), clock=lambda: node.now_s)
    config = Config(
        servers=server_configs(node, slo=SLO),
        interval_s=TICK_S,
        gpu_backend="sim",
        grid=GRID,
        sim=SIM,
    )
    exporter = Exporter(config.metrics, build_info=default_build_info())
    # Scrape inline: a wall-clock deadline on a busy machine must not change a virtual run.
    daemon = Daemon(
        config,
        backend,
        publish=exporter.publish,
        fetch=inprocess_fetch(node),
        inline_scrape=True,
    )
    daemon.warmup()
    for _ in range(ticks):
        node.advance(TICK_S)
        daemon.tick(node.now_s)
    return GoldenRun(exposition=exporter.render().decode("utf-8"))


def normalise(exposition: str) -> str:
    """The exposition with machine-dependent values replaced by PLACEHOLDER, HEADER first."""
    lines = []
    for line in exposition.splitlines():
        match = _SAMPLE.match(line)
        if match is not None:
            name, labels = match["name"], match["labels"] or ""
            if name == "powerd_build_info":
                labels = _LABEL_VALUE.sub(rf'\g<key>="{PLACEHOLDER}"', labels)
                line = f"{name}{labels} {match['value']}"
            elif name in NORMALISED_SERIES and 'le="+Inf"' not in labels:
                line = f"{name}{labels} {PLACEHOLDER}"
        lines.append(line)
    return HEADER + "\n".join(lines) + "\n"


def golden_text() -> str:
    """The normalised exposition of the seeded run: what metrics.golden holds."""
    return normalise(run_seeded().exposition)
