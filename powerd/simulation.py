"""Wires the simulated node to the daemon: fake NVML under the real backend, servers on HTTP.

Used by `gpu_backend: sim`, `powerd demo`, `powerd restore` on a simulated node and the
benchmark. The daemon code that runs here is the production code; only NVML and the servers
are simulated.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from powerd.config import SIM_TRACE_DEFAULT, ServerConfig, SimConfig, SloConfig
from powerd.gpu.nvml import NvmlBackend
from powerd.sim.fake_nvml import FakeNvml
from powerd.sim.http_server import SimServerHttp
from powerd.sim.models import get_model_profile
from powerd.sim.node import RealTimeDriver, SimNode, serve_node
from powerd.sim.plant import GpuPlant, GpuProfile, load_gpu_profile
from powerd.sim.traces import Arrivals, resolve_trace, scale_for_peak_load
from powerd.sources import FetchResponse, SourceError

log = logging.getLogger(__name__)

INPROCESS_SCHEME = "sim://"
"""URLs of simulated servers read in-process (virtual time), without HTTP."""

DEFAULT_MODEL_FOR_TP = {1: "llama-3.1-8b", 2: "llama-3.1-70b", 4: "llama-3.1-70b"}


def gpu_profile_for(sim: SimConfig) -> GpuProfile:
    return load_gpu_profile(sim.gpu_profile_file or sim.gpu_model)


def model_name_for(sim: SimConfig) -> str:
    return sim.model or DEFAULT_MODEL_FOR_TP.get(sim.tp, "llama-3.1-70b")


def build_arrivals(sim: SimConfig, duration_s: float | None) -> Arrivals:
    """The request stream: a trace (time-compressed) scaled to the configured peak load."""
    profile = gpu_profile_for(sim)
    model = get_model_profile(model_name_for(sim))
    arrivals = resolve_trace(
        sim.trace or SIM_TRACE_DEFAULT,
        time_compression=sim.time_compression,
        duration_s=duration_s,
        seed=sim.seed,
    )
    return scale_for_peak_load(
        arrivals,
        sim.peak_load,
        profile=profile,
        model=model,
        n_servers=sim.gpus // sim.tp,
        tp=sim.tp,
    )


def build_node(sim: SimConfig, duration_s: float | None = None) -> SimNode:
    """A simulated node as the SimConfig describes it, with its load ready to replay.

    With duration_s the load spans that long (the trace cut or repeated to it). Without, the
    trace repeats for as long as the node runs and the node keeps no per-request records,
    which would grow without end: the node of `powerd run` with `gpu_backend: sim`.
    """
    endless = duration_s is None
    return SimNode(
        gpu_profile_for(sim),
        sim.gpus,
        get_model_profile(model_name_for(sim)),
        sim.tp,
        build_arrivals(sim, duration_s),
        seed=sim.seed,
        server_kind=sim.server_kind,
        repeat_arrivals=endless,
        keep_finished=not endless,
    )


def fake_nvml_for(node: SimNode, sim: SimConfig) -> FakeNvml:
    return FakeNvml(node.plant, lock=node.lock, state_file=sim.state_file)


def detached_fake_nvml(sim: SimConfig) -> FakeNvml:
    """A fake NVML over idle simulated GPUs whose settings come from the state file.

    This is what `powerd restore` sees on a simulated node: the GPUs as the last process
    left them, as on real hardware.
    """
    plant = GpuPlant(gpu_profile_for(sim), sim.gpus, seed=sim.seed)
    return FakeNvml(plant, state_file=sim.state_file)


def inprocess_fetch(node: SimNode) -> Callable[[str, float], FetchResponse]:
    """A fetcher that reads `sim://NAME/PATH` straight from the node's servers: PATH (query
    string aside) is one of the server's routes (its metrics path; /v1/loads on SGLang),
    anything else answers 404 as the HTTP endpoint does."""
    routes = {server.name: server.routes() for server in node.servers}

    def fetch(url: str, timeout_s: float) -> FetchResponse:
        if not url.startswith(INPROCESS_SCHEME):
            raise SourceError(f"{url}: not a simulated server URL")
        name, _, rest = url[len(INPROCESS_SCHEME) :].partition("/")
        server_routes = routes.get(name)
        if server_routes is None:
            raise SourceError(f"{url}: no simulated server named {name!r}")
        render = server_routes.get("/" + rest.split("?", 1)[0])
        if render is None:
            return FetchResponse(
                404, b"404 page not found\n", {"Content-Type": "text/plain; charset=utf-8"}
            )
        with node.lock:
            body, content_type, headers = render()
        return FetchResponse(200, body, {"Content-Type": content_type, **headers})

    return fetch


def server_configs(
    node: SimNode, urls: dict[str, str] | None = None, slo: SloConfig | None = None
) -> tuple[ServerConfig, ...]:
    """One ServerConfig per simulated server, pointing at its HTTP URL or in-process URL."""
    configs = []
    for server in node.servers:
        inprocess = f"{INPROCESS_SCHEME}{server.name}{server.metrics_path}"
        url = (urls or {}).get(server.name) or inprocess
        configs.append(
            ServerConfig(
                name=server.name,
                url=url,
                kind=server.kind,
                gpus=tuple(server.gpu_indices),
                slo=slo or SloConfig(),
            )
        )
    return tuple(configs)


@dataclass
class RunningSimulation:
    """A simulated node advancing in real time with its servers on HTTP."""

    node: SimNode
    fake: FakeNvml
    backend: NvmlBackend
    driver: RealTimeDriver
    http: list[SimServerHttp] = field(default_factory=list)

    def urls(self) -> dict[str, str]:
        return {
            server.name: http.url for server, http in zip(self.node.servers, self.http, strict=True)
        }

    def stop(self) -> None:
        self.driver.stop()
        for http in self.http:
            http.stop()


def start_simulation(sim: SimConfig, duration_s: float | None = None) -> RunningSimulation:
    """Build a node (build_node: without duration_s its load never ends), serve its servers
    on HTTP and open NVML on it.

    Simulated time stands still until the caller starts `driver` (after compiling kernels,
    so the load does not run ahead of the controller).
    """
    node = build_node(sim, duration_s)
    # Compile the node's kernels on a throw-away copy: compiling inside the driver thread
    # would hold the node's lock for seconds and then jump simulated time forward.
    node.clone().advance(0.1)
    fake = fake_nvml_for(node, sim)
    backend = NvmlBackend(fake)
    driver = RealTimeDriver(node)
    http = serve_node(node)
    return RunningSimulation(node, fake, backend, driver, http)
