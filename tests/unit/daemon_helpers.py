"""A daemon over a simulated node, driven in virtual time, with faults the tests switch on.

The daemon, actuator, controller, NVML backend and sources are the production code; only NVML
(FakeNvml over the GPU plant) and the inference servers (the simulated node, read in-process)
are simulated.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from powerd.config import Config, SimConfig
from powerd.control.policy import Controller, GroupSpec, PolicyBase
from powerd.daemon import Daemon
from powerd.exporter import Exporter
from powerd.gpu.backend import STALL_S
from powerd.gpu.nvml import NvmlBackend
from powerd.journal import Journal
from powerd.model import GroupDecision, GroupObservation, Snapshot
from powerd.sim.fake_nvml import FakeNvml
from powerd.sim.node import SimNode
from powerd.simulation import INPROCESS_SCHEME, build_node, inprocess_fetch, server_configs
from powerd.sources import FetchResponse, SourceError

SMALL_NODE = SimConfig(gpus=2, tp=1, model="llama-3.1-8b", trace="constant", peak_load=0.5)
"""Two H100s, one 8B server on each, steady load at half the node's capacity."""

HTTP_PREFIX = "http://sim.invalid/"
"""Config files must name http(s) URLs; `http://sim.invalid/NAME/metrics` reads server NAME
in-process (`.invalid` never resolves, so nothing can reach the network by mistake)."""
HOST_SUFFIX = ".sim.invalid"
"""`http://NAME.sim.invalid/PATH` reads PATH of server NAME in-process: each server has a host
of its own, so an SGLang server's /v1/loads (on its metrics host) reaches that server."""

SET_CLOCKS = "nvmlDeviceSetGpuLockedClocks"
RESET_CLOCKS = "nvmlDeviceResetGpuLockedClocks"
SET_LIMIT = "nvmlDeviceSetPowerManagementLimit"


class SwitchableFetch:
    """The in-process fetch of a node, with per-server faults.

    `down`: server names whose fetch raises (connection refused). `garbage`: server names that
    answer 200 with a body that is not a Prometheus exposition. `urls`: every URL fetched.
    """

    def __init__(self, node: SimNode) -> None:
        self._inner = inprocess_fetch(node)
        self.down: set[str] = set()
        self.garbage: set[str] = set()
        self.urls: list[str] = []

    def __call__(self, url: str, timeout_s: float) -> FetchResponse:
        self.urls.append(url)
        if url.startswith(HTTP_PREFIX):
            url = INPROCESS_SCHEME + url[len(HTTP_PREFIX) :]
        elif url.startswith("http://"):
            host, _, path = url[len("http://") :].partition("/")
            if host.endswith(HOST_SUFFIX):
                url = f"{INPROCESS_SCHEME}{host.removesuffix(HOST_SUFFIX)}/{path}"
        name = url[len(INPROCESS_SCHEME) :].split("/", 1)[0]
        if name in self.down:
            raise SourceError(f"cannot connect to {url}: Connection refused")
        if name in self.garbage:
            return FetchResponse(200, b"<html>502 Bad Gateway</html>\n{{{", {})
        return self._inner(url, timeout_s)


class RecordingController(PolicyBase):
    """The real Controller, keeping every tick's observations and decisions."""

    name = "powerd"

    def __init__(self, config: Config, groups: Sequence[GroupSpec]) -> None:
        self.controller = Controller(config, groups)
        self.observations: list[list[GroupObservation]] = []
        self.decisions: list[list[GroupDecision]] = []

    def decide(self, now_s: float, observations: Sequence[GroupObservation]) -> list[GroupDecision]:
        decisions = self.controller.decide(now_s, observations)
        self.observations.append(list(observations))
        self.decisions.append(list(decisions))
        return decisions

    def group_state(self) -> list[dict[str, Any]]:
        return self.controller.group_state()

    @property
    def guards_prefill(self) -> bool:
        return self.controller.guards_prefill

    def prefill_guard(self, backlog_tokens: Mapping[str, float]) -> dict[str, int]:
        return self.controller.prefill_guard(backlog_tokens)

    @property
    def budget_feasible(self) -> bool:
        return self.controller.budget_feasible

    def warmup(self) -> None:
        self.controller.warmup()


@dataclass
class Rig:
    """A daemon ticking over a simulated node in virtual time."""

    node: SimNode
    fake: FakeNvml
    backend: NvmlBackend
    daemon: Daemon
    fetch: SwitchableFetch
    journal_path: Path
    exporter: Exporter
    recorders: list[RecordingController] = field(default_factory=list)
    """Every controller the daemon made (a reload makes a new one), oldest first."""
    snapshots: list[Snapshot] = field(default_factory=list)

    @property
    def recorder(self) -> RecordingController:
        assert self.recorders, "make the rig with record=True"
        return self.recorders[-1]

    def run(self, ticks: int, dt_s: float = 1.0) -> Snapshot:
        """Advance the node and tick the daemon `ticks` times; the last snapshot."""
        for _ in range(ticks):
            self.node.advance(dt_s)
            self.snapshots.append(self.daemon.tick(self.node.now_s))
        return self.snapshots[-1]

    def run_until(
        self, predicate: Callable[[Snapshot], bool], max_ticks: int, dt_s: float = 1.0
    ) -> int:
        """Tick until predicate(snapshot) holds; the number of ticks it took. Fails after
        max_ticks."""
        for n in range(1, max_ticks + 1):
            if predicate(self.run(1, dt_s)):
                return n
        raise AssertionError(f"condition not reached within {max_ticks} ticks")

    def uuid(self, index: int) -> str:
        return self.fake.uuids[index]

    def writes_to(self, index: int, since: int = 0) -> list[tuple[str, tuple[Any, ...]]]:
        """Successful NVML setting changes on GPU `index`, from fake.writes[since:]."""
        return [(fn, args) for fn, i, args in self.fake.writes[since:] if i == index]

    def metrics(self) -> str:
        return self.exporter.render().decode()


def make_rig(
    tmp_path: Path,
    *,
    sim: SimConfig = SMALL_NODE,
    duration_s: float = 300.0,
    record: bool = False,
    nvml_factory: Callable[[SimNode], FakeNvml] | None = None,
    configure: Callable[[SimNode], Config] | None = None,
    notifier: Any = None,
    stall_s: float = STALL_S,
    **config_fields: Any,
) -> Rig:
    """A node built from `sim`, a FakeNvml over its plant, and a Daemon with a journal in
    tmp_path, publishing to an Exporter. Sources are polled inline, so no wall-clock scrape
    deadline can turn a server down on a busy machine.

    The config has one server per simulated server (in-process URLs, default SLO) plus
    `config_fields`, unless `configure` builds it. `nvml_factory` replaces the plain FakeNvml;
    `notifier` stands for systemd's; `stall_s` is the backend's.
    """
    node = build_node(sim, duration_s)
    fake = nvml_factory(node) if nvml_factory is not None else FakeNvml(node.plant, lock=node.lock)
    backend = NvmlBackend(fake, stall_s=stall_s)
    fetch = SwitchableFetch(node)
    if configure is not None:
        config = configure(node)
    else:
        config = Config(servers=server_configs(node), sim=sim, **config_fields)
    exporter = Exporter(config.metrics, build_info={"version": "test"})
    recorders: list[RecordingController] = []
    factory = None
    if record:

        def factory(config: Config, specs: Sequence[GroupSpec]) -> RecordingController:
            recorders.append(RecordingController(config, specs))
            return recorders[-1]

    journal_path = tmp_path / "journal.json"
    daemon = Daemon(
        config,
        backend,
        journal=Journal(journal_path),
        publish=exporter.publish,
        fetch=fetch,
        policy_factory=factory,
        notifier=notifier,
        inline_scrape=True,
    )
    return Rig(node, fake, backend, daemon, fetch, journal_path, exporter, recorders)


def metric_lines(text: str, name: str, **labels: str) -> list[str]:
    """Exposition lines of metric `name` whose labels include every given label=value."""
    out = []
    for line in text.splitlines():
        if not line.startswith(name) or line[len(name) : len(name) + 1] not in ("{", " "):
            continue
        if all(f'{key}="{value}"' in line for key, value in labels.items()):
            out.append(line)
    return out


def metric_value(line: str) -> float:
    return float(line.rsplit(" ", 1)[1])
