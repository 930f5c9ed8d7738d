"""Prometheus exporter: renders the last published Snapshot, serves it over HTTP(S).

The mapping of a Snapshot onto metric families and the Exporter's lifecycle are here; the HTTP
server, its limits on what a client can hold and its TLS and basic auth are in metrics_http.

The collector never calls NVML or a server; the loop publishes a Snapshot once per tick and a
scrape renders whatever was published last. Values are converted to Prometheus base units here
(mW -> W, mJ -> J, MHz -> Hz). A value the daemon does not know (None) is not emitted at all,
never as a made-up zero.

GPU series carry the labels `gpu` (the index, as a string) and `UUID`, spelled as dcgm-exporter
spells them, so `* on (UUID)` joins the two. dcgm-exporter's `modelName` is left out of GPU
series because `promtool check metrics` rejects camelCase label names; the GPU's name is in
`powerd_gpu_info{gpu,UUID,name,group,server}`, which also maps GPUs to groups for joins.
"""

from __future__ import annotations

import bisect
import importlib.metadata
import itertools
import logging
import math
import platform
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

import powerd
from powerd.config import MODES, MetricsConfig
from powerd.metrics_http import MetricsServer, bind
from powerd.model import (
    CLOCK_EVENT_REASON_NAMES,
    DECISION_REASONS,
    DISCOVERY_RETRY_S,
    GRID_SOURCES,
    TARGET_LOST_BELOW,
    TARGET_REACHED_AT,
    TARGET_WINDOW_S,
    GpuStatus,
    GroupStatus,
    ServerSample,
    Snapshot,
)
from powerd.webconfig import BasicAuth, WebConfig, load_web_config

log = logging.getLogger(__name__)

LOOP_DURATION_BUCKETS_S: tuple[float, ...] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.0,
)

OBSERVE_ONLY_REASONS: tuple[str, ...] = (
    "no_permission",
    "not_supported",
    "gpu_lost",
    "dry_run",
    "error",
    "other",
)
"""The fixed set of `reason` label values of powerd_gpu_observe_only."""

NVML_TICK_OPERATIONS: tuple[str, ...] = (
    "nvmlDeviceGetHandleByUUID",
    "nvmlDeviceGetPowerUsage",
    "nvmlDeviceGetTotalEnergyConsumption",
    "nvmlDeviceGetClockInfo",
    "nvmlDeviceGetPowerManagementLimit",
    "nvmlDeviceGetEnforcedPowerLimit",
    "nvmlDeviceGetCurrentClocksEventReasons",
    "nvmlDeviceGetCurrentClocksThrottleReasons",
    "nvmlDeviceGetTemperatureV",
    "nvmlDeviceGetTemperature",
    "nvmlDeviceSetGpuLockedClocks",
    "nvmlDeviceResetGpuLockedClocks",
    "nvmlDeviceSetPowerManagementLimit",
)
"""The NVML calls of a tick's reads and writes (gpu/nvml.py), the `operation` values of
powerd_nvml_errors_total known before any error. A read with an older name is counted under
the name that answered: the clock event reasons under ...ThrottleReasons on drivers before
R535, the temperature under nvmlDeviceGetTemperature on nvidia-ml-py before 12.570."""

NVML_ERROR_KINDS: tuple[str, ...] = (
    "error",
    "not_supported",
    "no_permission",
    "gpu_lost",
    "invalid_argument",
    "unavailable",
)
"""The GpuError kinds (gpu/errors.py), the `kind` values of powerd_nvml_errors_total."""

_MW_PER_W = 1000.0
_MJ_PER_J = 1000.0
_HZ_PER_MHZ = 1e6


class ExporterError(RuntimeError):
    """The exporter could not start (the address is in use or cannot be bound)."""


def default_build_info() -> dict[str, str]:
    """Labels of powerd_build_info: powerd, Python, numba and prometheus_client versions."""
    info = {"version": powerd.__version__, "python": platform.python_version()}
    for dist in ("numba", "prometheus-client", "nvidia-ml-py"):
        try:
            info[dist.replace("-", "_")] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return info


def observe_only_reason_label(reason: str) -> str:
    """Map a free-text observe-only reason onto OBSERVE_ONLY_REASONS (bounded label values)."""
    text = reason.strip().lower().replace("-", "_").replace(" ", "_")
    if text in OBSERVE_ONLY_REASONS:
        return text
    if "permission" in text or "privilege" in text:
        return "no_permission"
    if "not_supported" in text or "unsupported" in text:
        return "not_supported"
    if "lost" in text or "fallen_off" in text:
        return "gpu_lost"
    if "dry_run" in text:
        return "dry_run"
    if "error" in text or "fail" in text:
        return "error"
    return "other"


@dataclass(slots=True)
class _ServerTotals:
    """The counters the exporter keeps for one server from its answers."""

    tokens: float | None = None
    own_tokens_last: float | None = None
    """The server's own token count at its last answer that carried one."""
    preemptions: float | None = None
    answered_s: float | None = None
    """When its last answer was stamped: an answer a snapshot carries again adds nothing."""


@dataclass
class _State:
    """Everything a scrape renders, swapped as a whole under the exporter's lock."""

    snapshot: Snapshot | None = None
    loop_bucket_counts: list[int] = field(
        default_factory=lambda: [0] * (len(LOOP_DURATION_BUCKETS_S) + 1)
    )
    loop_sum_s: float = 0.0
    loop_count: int = 0
    servers: dict[str, _ServerTotals] = field(default_factory=dict)

    def copy(self) -> _State:
        return _State(
            snapshot=self.snapshot,
            loop_bucket_counts=list(self.loop_bucket_counts),
            loop_sum_s=self.loop_sum_s,
            loop_count=self.loop_count,
            servers={name: replace(totals) for name, totals in self.servers.items()},
        )


class ScrapeTimes:
    """When scrapes of /metrics began rendering (monotonic seconds): how often Prometheus
    comes, and whether it has come since a given moment. Thread-safe."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, keep: int = 8) -> None:
        self._clock = clock
        self._starts: deque[float] = deque(maxlen=keep)
        self._changed = threading.Condition()

    def now_s(self) -> float:
        return self._clock()

    def record(self, started_s: float) -> None:
        with self._changed:
            self._starts.append(started_s)
            self._changed.notify_all()

    def interval_s(self) -> float | None:
        """The median time between recent scrapes; None before the second one."""
        with self._changed:
            starts = list(self._starts)
        if len(starts) < 2:
            return None
        return statistics.median(b - a for a, b in itertools.pairwise(starts))

    def next_wait_s(self, limit_s: float) -> float:
        """How long to wait for a scrape, from the rhythm of the last ones: 0 when the rhythm is
        unknown or the next scrape is not due (with a quarter interval of grace) within limit_s;
        else until one interval after it, at most limit_s, in case it began too early to count."""
        interval_s = self.interval_s()
        if interval_s is None or limit_s <= 0:
            return 0.0
        with self._changed:
            last_s = self._starts[-1]
        due_s = max(last_s + interval_s - self._clock(), 0.0)
        if due_s + 0.25 * interval_s > limit_s:
            return 0.0
        return min(due_s + 1.25 * interval_s, limit_s)

    def wait_since(self, since_s: float, timeout_s: float) -> bool:
        """Block until a scrape has begun at or after since_s, at most timeout_s."""
        deadline_s = self._clock() + timeout_s
        with self._changed:
            while not (self._starts and self._starts[-1] >= since_s):
                left_s = deadline_s - self._clock()
                if left_s <= 0:
                    return False
                self._changed.wait(left_s)
            return True


class Exporter:
    """Prometheus collector of the last published Snapshot, with its own registry and server.

    publish() is called by the control loop; render() and the HTTP server may run on other
    threads at the same time.
    """

    def __init__(self, config: MetricsConfig, *, build_info: dict[str, str] | None = None) -> None:
        self._config = config
        self._build_info = dict(build_info) if build_info is not None else default_build_info()
        self._lock = threading.Lock()
        self._state = _State()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_SnapshotCollector(self))
        self._server: MetricsServer | None = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None
        """The bound port after start() (useful with port 0)."""
        self.scrapes = ScrapeTimes()
        self._published_s = self.scrapes.now_s()

    def publish(self, snapshot: Snapshot) -> None:
        """Make snapshot the one scrapes render; feed its loop duration and token counters."""
        with self._lock:
            self._published_s = self.scrapes.now_s()
            state = self._state.copy()
            state.snapshot = snapshot
            duration_s = snapshot.loop_duration_s
            if duration_s is not None and math.isfinite(duration_s) and duration_s >= 0:
                # A bucket counts the durations <= its bound (`le`), so a duration equal to a
                # bound is in that bucket; len(LOOP_DURATION_BUCKETS_S) is the +Inf one.
                index = bisect.bisect_left(LOOP_DURATION_BUCKETS_S, duration_s)
                state.loop_bucket_counts[index] += 1
                state.loop_sum_s += duration_s
                state.loop_count += 1
            # A server a reload removed: its series are gone too.
            state.servers = {
                sample.server: state.servers.get(sample.server) or _ServerTotals()
                for sample in snapshot.servers
            }
            for sample in snapshot.servers:
                _accumulate(state.servers[sample.server], sample)
            self._state = state

    def render(self) -> bytes:
        """The exposition of the last published snapshot, text format 0.0.4."""
        return generate_latest(self.registry)

    def scrape(self) -> bytes:
        """render() for a scrape of /metrics, recorded in `scrapes` as begun before it."""
        started_s = self.scrapes.now_s()
        body = self.render()
        self.scrapes.record(started_s)
        return body

    def wait_for_scrape(self, timeout_s: float) -> bool:
        """Block until a scrape has rendered what was published last, at most timeout_s."""
        with self._lock:
            published_s = self._published_s
        return self.scrapes.wait_since(published_s, timeout_s)

    def _current_state(self) -> _State:
        with self._lock:
            return self._state

    @property
    def build_info(self) -> dict[str, str]:
        return dict(self._build_info)

    @property
    def open_connections(self) -> int:
        """Connections the metrics endpoint is serving now; 0 when not started."""
        server = self._server
        return server.open_connections if server is not None else 0

    def start(self) -> None:
        """Serve /metrics on config.listen_address:config.port in a background thread.

        Raises WebConfigError (a ConfigError) for a bad web-config file and ExporterError when
        the address cannot be bound.
        """
        if self._server is not None:
            return
        web = (
            load_web_config(self._config.web_config_file)
            if self._config.web_config_file
            else WebConfig()
        )
        context = web.tls.ssl_context() if web.tls is not None else None
        host, port = self._config.listen_address, self._config.port
        auth = BasicAuth(web.basic_auth_users)
        try:
            server = bind(
                host, port, self, ssl_context=context, auth=auth, extra_headers=dict(web.headers)
            )
        except OSError as exc:
            where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            raise ExporterError(f"cannot listen on {where}: {exc.strerror or exc}") from None
        self._server = server
        self.port = int(server.server_address[1])
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="powerd-exporter",
            daemon=True,
        )
        self._thread.start()
        scheme = "https" if context is not None else "http"
        log.info("serving metrics on %s://%s:%d/metrics", scheme, host, self.port)

    def stop(self) -> None:
        """Stop serving and close the socket; a no-op when not started."""
        server, thread = self._server, self._thread
        self._server = None
        self._thread = None
        if server is None:
            return
        server.shutdown()
        server.close_waiting()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5.0)


def _accumulate(totals: _ServerTotals, sample: ServerSample) -> None:
    """Keep a server's generated-token and preemption counters, which never go back.

    The token counter starts at the server's own cumulative count where the first answer
    carries one (so the two read alike) and grows by that count's increase (all of it after a
    server restart, which starts it from 0). Where an answer carries no count, the rate times
    the time since the previous answer is added, so `rate()` over it gives back the server's
    token rate; an own count that appears only later (TGI creates its token histogram at the
    first finished request) is followed from there, never jumped to. Preemptions add each new
    answer's, from 0 at the first answer that counts them.
    """
    new_answer = sample.up and (totals.answered_s is None or sample.timestamp_s > totals.answered_s)
    if new_answer and sample.preemptions is not None and math.isfinite(sample.preemptions):
        totals.preemptions = (totals.preemptions or 0.0) + max(sample.preemptions, 0.0)
    own = sample.generation_tokens_total
    if own is not None:
        own = float(own)
        last_own = totals.own_tokens_last
        if totals.tokens is None:
            totals.tokens = own
        elif last_own is not None:
            totals.tokens += own - last_own if own >= last_own else own
        else:
            totals.tokens += _tokens_since_last_answer(totals, sample)
        totals.own_tokens_last = own
    elif sample.up:
        totals.own_tokens_last = None
        totals.tokens = (totals.tokens or 0.0) + _tokens_since_last_answer(totals, sample)
    if sample.up:
        totals.answered_s = sample.timestamp_s


def _tokens_since_last_answer(totals: _ServerTotals, sample: ServerSample) -> float:
    """The sample's token rate times the time since the server's previous answer; 0 when
    either is unknown."""
    rate = sample.generation_tokens_per_s
    if totals.answered_s is None or rate is None or not math.isfinite(rate) or rate < 0:
        return 0.0
    return rate * max(sample.timestamp_s - totals.answered_s, 0.0)


class _Family:
    """One metric family; samples whose value is None are skipped."""

    def __init__(self, name: str, documentation: str, typ: str = "gauge") -> None:
        self.metric = Metric(name, documentation, typ)
        self._suffix = "_total" if typ == "counter" else ""

    def add(self, labels: dict[str, str], value: float | bool | None) -> None:
        if value is None:
            return
        number = float(value)
        if math.isnan(number):
            return
        self.metric.add_sample(self.metric.name + self._suffix, labels, number)


class _Families:
    """Families in first-use order, so the exposition is stable for golden tests."""

    def __init__(self) -> None:
        self._families: dict[str, _Family] = {}

    def __call__(self, name: str, documentation: str, typ: str = "gauge") -> _Family:
        family = self._families.get(name)
        if family is None:
            family = self._families[name] = _Family(name, documentation, typ)
        return family

    def metrics(self) -> Iterator[Metric]:
        for family in self._families.values():
            if family.metric.samples:
                yield family.metric


class _SnapshotCollector(Collector):
    def __init__(self, exporter: Exporter) -> None:
        self._exporter = exporter

    def collect(self) -> Iterable[Metric]:
        state = self._exporter._current_state()
        families = _Families()
        _collect_node(families, state, self._exporter.build_info)
        snapshot = state.snapshot
        if snapshot is not None:
            group_of: dict[str, GroupStatus] = {}
            for group in snapshot.groups:
                for uuid in group.gpu_uuids:
                    group_of[uuid] = group
            for gpu in snapshot.gpus:
                _collect_gpu(families, gpu, group_of.get(gpu.info.uuid))
            for sample in snapshot.servers:
                _collect_server(families, sample, state.servers.get(sample.server))
            for group in snapshot.groups:
                _collect_group(families, group, snapshot.grid_currency)
        return list(families.metrics())


def _collect_node(families: _Families, state: _State, build_info: dict[str, str]) -> None:
    families("powerd_build_info", "powerd's version and the versions it runs on; always 1.").add(
        build_info, 1
    )
    snapshot = state.snapshot
    if snapshot is not None:
        families(
            "powerd_last_tick_timestamp_seconds",
            "Unix time of the tick that produced the published snapshot.",
        ).add({}, snapshot.timestamp_s)
        families("powerd_ticks", "Control-loop ticks since start.", "counter").add(
            {}, snapshot.ticks_total
        )
        families(
            "powerd_restores",
            "Restores of saved GPU settings performed since start.",
            "counter",
        ).add({}, snapshot.restores_total)
        families(
            "powerd_restore_failures",
            "Restores of saved GPU settings that failed since start; GPUs may be left changed.",
            "counter",
        ).add({}, snapshot.restore_failures_total)
        errors = families(
            "powerd_nvml_errors",
            "NVML calls that failed, by operation and error kind.",
            "counter",
        )
        # A counter that appears at its first error hides that error from rate() and
        # increase(), so the pairs a tick can produce start at 0.
        counts = dict.fromkeys(itertools.product(NVML_TICK_OPERATIONS, NVML_ERROR_KINDS), 0)
        counts.update(snapshot.nvml_errors)
        for (operation, kind), count in sorted(counts.items()):
            errors.add({"operation": operation, "kind": kind}, count)
        families(
            "powerd_gpus_unopened",
            "GPUs NVML counts but powerd cannot open (off the bus since before it started, "
            "no permission): neither read nor controlled; tried again every "
            f"{DISCOVERY_RETRY_S:g} s.",
        ).add({}, snapshot.gpus_unopened)
        families(
            "powerd_gpus_shared",
            "GPUs two servers run on (configured or discovered): read, and controlled for "
            "neither until a reload, as one clock limit cannot keep two servers' latency.",
        ).add({}, snapshot.gpus_shared)
        node_mode = families(
            "powerd_node_mode", "Configured control mode of the node; 1 for the active one."
        )
        for mode in _known_and(MODES, snapshot.mode):
            node_mode.add({"mode": mode}, mode == snapshot.mode)
        families("powerd_dry_run", "1 when powerd decides but does not write GPU settings.").add(
            {}, snapshot.dry_run
        )
        families(
            "powerd_grid_price_per_kwh",
            "Electricity price per kilowatt-hour in force now (grid.file, schedule or flat "
            "value; powerd_grid_signal_source says which), in the currency labelled.",
        ).add({"currency": snapshot.grid_currency}, snapshot.grid_price_per_kwh)
        families(
            "powerd_grid_carbon_grams_per_kwh",
            "Carbon intensity of grid electricity in force now, in grams CO2e per kilowatt-hour.",
        ).add({}, snapshot.grid_carbon_g_per_kwh)
        if snapshot.grid_price_per_kwh is not None or snapshot.grid_carbon_g_per_kwh is not None:
            families(
                "powerd_grid_pue",
                "Facility power usage effectiveness: the factor from GPU energy to the energy "
                "that price and carbon apply to.",
            ).add({}, snapshot.grid_pue)
        _collect_grid_signals(families, snapshot)
        families(
            "powerd_node_power_budget_watts",
            "The node power budget the groups share (mode budget).",
        ).add({}, snapshot.node_power_budget_w)
        families(
            "powerd_node_power_budget_feasible",
            "0 while the budget, less what GPUs out of reach keep, is below the controlled "
            "GPUs' minimum power limits: every GPU is at its minimum (mode budget).",
        ).add({}, snapshot.node_power_budget_feasible)
        powers_mw = [gpu.reading.power_mw for gpu in snapshot.gpus]
        if powers_mw and all(power_mw is not None for power_mw in powers_mw):
            families("powerd_node_power_watts", "Summed power draw of the node's GPUs.").add(
                {}, sum(p for p in powers_mw if p is not None) / _MW_PER_W
            )
    _collect_loop_histogram(families, state)


def _collect_grid_signals(families: _Families, snapshot: Snapshot) -> None:
    """Where each configured grid signal's value in force comes from, and how old a value from
    grid.file is."""
    source_family = families(
        "powerd_grid_signal_source",
        "1 for the source of the grid signal's value in force (file, schedule or flat value); "
        "all 0 while no source has a value.",
    )
    age_family = families(
        "powerd_grid_signal_age_seconds",
        "Age of a grid signal's value in force from grid.file (since its timestamp or the "
        "start of its interval); absent for the config's values.",
    )
    for status in snapshot.grid_signals:
        for source in GRID_SOURCES:
            source_family.add({"signal": status.signal, "source": source}, source == status.source)
        age_family.add({"signal": status.signal}, status.age_s)
    families(
        "powerd_grid_file_errors",
        "Problems met reading grid.file (unreadable, not JSON, a bad or missing value).",
        "counter",
    ).add({}, snapshot.grid_file_errors_total)
    families(
        "powerd_grid_file_problems",
        "Problems of grid.file as last read, or 1 while its file system does not answer; "
        "0 when it was read without one or is absent.",
    ).add({}, snapshot.grid_file_problems)


def _collect_loop_histogram(families: _Families, state: _State) -> None:
    family = families(
        "powerd_loop_duration_seconds",
        "Duration of one control-loop tick (sense, decide, act, publish).",
        "histogram",
    )
    cumulative = 0
    for i, bound in enumerate(LOOP_DURATION_BUCKETS_S):
        cumulative += state.loop_bucket_counts[i]
        family.metric.add_sample(
            "powerd_loop_duration_seconds_bucket", {"le": floatToGoString(bound)}, cumulative
        )
    family.metric.add_sample(
        "powerd_loop_duration_seconds_bucket", {"le": "+Inf"}, state.loop_count
    )
    family.metric.add_sample("powerd_loop_duration_seconds_count", {}, state.loop_count)
    family.metric.add_sample("powerd_loop_duration_seconds_sum", {}, state.loop_sum_s)


def _collect_gpu(families: _Families, gpu: GpuStatus, group: GroupStatus | None) -> None:
    info, reading = gpu.info, gpu.reading
    labels = {"gpu": str(info.index), "UUID": info.uuid}
    meta = dict(labels, name=info.name)
    if group is not None:
        meta.update(group=group.group, server=group.server)
    families(
        "powerd_gpu_info",
        "GPU identity and the group and server it belongs to; always 1.",
    ).add(meta, 1)
    families("powerd_gpu_power_watts", "GPU power draw (NVML power usage).").add(
        labels, _scaled(reading.power_mw, _MW_PER_W)
    )
    families(
        "powerd_gpu_energy_joules",
        "GPU energy consumed since the driver loaded (NVML total energy counter).",
        "counter",
    ).add(labels, _scaled(reading.energy_mj, _MJ_PER_J))
    enforced_mw = reading.enforced_power_limit_mw
    if enforced_mw is None:
        enforced_mw = reading.power_limit_mw
    families(
        "powerd_gpu_power_limit_watts",
        "Power limit the GPU enforces (the in-band limit where the enforced one is unknown).",
    ).add(labels, _scaled(enforced_mw, _MW_PER_W))
    families(
        "powerd_gpu_configured_power_limit_watts",
        "Power limit powerd set on the GPU; absent while powerd has not set one.",
    ).add(labels, _scaled(gpu.configured_power_limit_mw, _MW_PER_W))
    families(
        "powerd_gpu_power_limit_lowered",
        "1 while a power limit powerd set holds the GPU below the one it had before powerd "
        "(an operator's, else its default: what a restore puts back), else 0.",
    ).add(labels, gpu.configured_power_limit_mw is not None)
    families("powerd_gpu_default_power_limit_watts", "The GPU's default power limit.").add(
        labels, info.power_limit_default_mw / _MW_PER_W
    )
    families("powerd_gpu_sm_clock_hertz", "Current SM clock of the GPU.").add(
        labels, _hertz(reading.sm_clock_mhz)
    )
    lock_mhz = gpu.sm_clock_lock_max_mhz
    families(
        "powerd_gpu_clock_limit_hertz",
        "Upper end of the SM clock range powerd locked; the device maximum when powerd holds "
        "no lock (NVML cannot read back a lock set by another tool).",
    ).add(labels, (lock_mhz if lock_mhz is not None else info.sm_clock_max_mhz) * _HZ_PER_MHZ)
    families("powerd_gpu_max_clock_hertz", "The GPU's maximum SM clock.").add(
        labels, info.sm_clock_max_mhz * _HZ_PER_MHZ
    )
    families("powerd_gpu_temperature_celsius", "GPU core temperature.").add(
        labels, reading.temperature_c
    )
    if reading.clock_event_reasons is not None:
        reasons = families(
            "powerd_gpu_clock_event_reason",
            "1 while NVML reports this reason for holding the clocks down, else 0.",
        )
        for bit, name in CLOCK_EVENT_REASON_NAMES.items():
            reasons.add(dict(labels, reason=name), bool(reading.clock_event_reasons & bit))
    observe = families(
        "powerd_gpu_observe_only",
        "1 when powerd only observes this GPU (it cannot or must not write its settings).",
    )
    if gpu.observe_only:
        observe.add(dict(labels, reason=observe_only_reason_label(gpu.observe_only_reason)), 1)
    else:
        observe.add(labels, 0)


def _collect_server(
    families: _Families, sample: ServerSample, totals: _ServerTotals | None
) -> None:
    labels = {"server": sample.server, "model_name": sample.model_name, "kind": sample.kind}
    families("powerd_source_up", "1 when the last scrape of the inference server worked.").add(
        labels, sample.up
    )
    families(
        "powerd_source_scrape_duration_seconds", "Duration of the last scrape of the server."
    ).add(labels, sample.scrape_duration_s)
    families(
        "powerd_source_realtime",
        "1 when the server's token counters move every iteration, 0 when at request end.",
    ).add(labels, sample.realtime)
    for name, help_text, exported in (
        (
            "powerd_source_exports_ttft",
            "1 when the server exports a time-to-first-token histogram.",
            sample.exports_ttft,
        ),
        (
            "powerd_source_exports_prompt_lengths",
            "1 when the server exports a prompt-length histogram (its prompt mix).",
            sample.exports_prompt_lengths,
        ),
    ):
        families(name, help_text).add(labels, exported if sample.up else None)
    families(
        "powerd_server_generation_tokens",
        "Tokens the server generated (its own counter, or its rate integrated by powerd).",
        "counter",
    ).add(labels, totals.tokens if totals else None)
    for name, help_text, value in (
        (
            "powerd_server_generation_tokens_per_second",
            "Generated tokens per second over the last scrape interval.",
            sample.generation_tokens_per_s,
        ),
        (
            "powerd_server_prompt_tokens_per_second",
            "Prompt (prefill) tokens per second over the last scrape interval.",
            sample.prompt_tokens_per_s,
        ),
        ("powerd_server_requests_running", "Requests the server is running.", sample.running),
        (
            "powerd_server_requests_waiting",
            "Requests waiting in the server's queue.",
            sample.waiting,
        ),
        # A quantile label is reserved for summaries (promtool rejects it on gauges), so the
        # quantile's value is powerd_group_slo_quantile.
        (
            "powerd_server_ttft_slo_quantile_seconds",
            "Time to first token at the SLO's quantile (powerd_group_slo_quantile) over the "
            "last scrape interval.",
            sample.ttft_q_s,
        ),
        (
            "powerd_server_itl_slo_quantile_seconds",
            "Inter-token latency at the SLO's quantile (powerd_group_slo_quantile) over the "
            "last scrape interval.",
            sample.itl_q_s,
        ),
        (
            "powerd_server_ttft_mean_seconds",
            "Mean time to first token over the last interval.",
            sample.ttft_mean_s,
        ),
        (
            "powerd_server_itl_mean_seconds",
            "Mean inter-token latency over the last interval.",
            sample.itl_mean_s,
        ),
        (
            "powerd_server_kv_cache_usage_ratio",
            "Share of the server's KV cache in use (its fullest engine's), 0-1.",
            sample.kv_cache_usage,
        ),
    ):
        families(name, help_text).add(labels, value)
    families(
        "powerd_server_preemptions",
        "Requests the server preempted for KV space (evicted to prefill again later), counted "
        "by powerd from each answer since it started; absent where the server does not say.",
        "counter",
    ).add(labels, totals.preemptions if totals else None)


def _collect_group(families: _Families, group: GroupStatus, currency: str) -> None:
    labels = {"group": group.group, "server": group.server, "model_name": group.model_name}
    families(
        "powerd_group_energy_cost",
        "Electricity cost of the group's GPU energy x PUE at the price in force at each tick, "
        "at prices >= 0; the net cost is this minus powerd_group_energy_credit_total.",
        "counter",
    ).add({**labels, "currency": currency}, group.energy_cost_total)
    families(
        "powerd_group_energy_credit",
        "What the group's GPU energy x PUE earned at negative prices (energy x -price).",
        "counter",
    ).add({**labels, "currency": currency}, group.energy_credit_total)
    families(
        "powerd_group_carbon_grams",
        "Grams CO2e of the group's GPU energy x PUE at the carbon intensity in force at each tick.",
        "counter",
    ).add(labels, group.carbon_g_total)
    families(
        "powerd_group_cost_per_million_tokens",
        "Electricity cost of a million generated tokens (GPU energy x PUE x grid price).",
    ).add({**labels, "currency": currency}, group.cost_per_million_tokens)
    families(
        "powerd_group_carbon_grams_per_million_tokens",
        "Grams CO2e of a million generated tokens (GPU energy x PUE x grid intensity).",
    ).add(labels, group.carbon_g_per_million_tokens)
    families(
        "powerd_group_tokens_per_joule", "Generated tokens per joule of the group's GPUs."
    ).add(labels, group.tokens_per_joule)
    families(
        "powerd_group_energy_per_token_joules", "GPU energy per generated token of the group."
    ).add(labels, group.energy_per_token_j)
    families(
        "powerd_group_generation_tokens_per_second", "Generated tokens per second of the group."
    ).add(labels, group.generation_tokens_per_s)
    families("powerd_group_power_watts", "Summed power draw of the group's GPUs.").add(
        labels, group.power_w
    )
    families(
        "powerd_group_clock_limit_hertz",
        "Upper end of the locked SM clock range powerd chose for the group; absent before its "
        "first decision (a group observed only).",
    ).add(labels, _hertz(group.sm_clock_max_mhz))
    families(
        "powerd_group_power_limit_watts",
        "Per-GPU power limit powerd chose for the group; absent when left at the default.",
    ).add(labels, _scaled(group.power_limit_mw, _MW_PER_W))
    families("powerd_group_slo_met", "1 when the group's latency quantiles meet the SLO.").add(
        labels, group.slo_met
    )
    families(
        "powerd_group_slo_attainment_ratio",
        "Share of recent ticks whose latency quantiles met the SLO (0-1).",
    ).add(labels, group.slo_attainment)
    families("powerd_group_ttft_slo_seconds", "The group's time-to-first-token SLO.").add(
        labels, group.ttft_slo_s
    )
    families("powerd_group_itl_slo_seconds", "The group's inter-token latency SLO.").add(
        labels, group.itl_slo_s
    )
    families(
        "powerd_group_slo_quantile",
        "Latency quantile the group's SLOs limit (e.g. 0.95); the quantile of its server's "
        "*_slo_quantile_seconds.",
    ).add(labels, group.slo_quantile)
    families("powerd_group_target_tokens_per_joule", "Tokens-per-joule target in target mode.").add(
        labels, group.target_tokens_per_joule
    )
    families(
        "powerd_group_target_reached",
        f"1 when the group's tokens per joule over the last {TARGET_WINDOW_S:g} s reach its "
        f"target (from {TARGET_REACHED_AT:g} of it on; 0 again below {TARGET_LOST_BELOW:g}); "
        f"absent for its first {TARGET_WINDOW_S / 2:g} s in mode target.",
    ).add(labels, group.target_reached)
    mode_family = families(
        "powerd_controller_mode", "Controller mode of the group; 1 for the active one."
    )
    for mode in _known_and(MODES, group.mode):
        mode_family.add(dict(labels, mode=mode), mode == group.mode)
    if group.decision_reason:
        reason_family = families(
            "powerd_group_decision_reason",
            "Why the controller set the group's clock and power limit as it did this tick; 1 for "
            "the current reason.",
        )
        for reason in _known_and(DECISION_REASONS, group.decision_reason):
            reason_family.add(dict(labels, reason=reason), reason == group.decision_reason)
    families(
        "powerd_group_prompt_backlog_tokens",
        "Prompt tokens the group's server still had to prefill at the last read; "
        "absent while the group's clock cap is at its maximum (not read then).",
    ).add(labels, group.prompt_backlog_tokens)
    families(
        "powerd_group_prefill_guard_raises",
        "Raises of the group's clock cap, at ticks and between them, for a prompt backlog its "
        "server reported.",
        "counter",
    ).add(labels, group.prefill_guard_raises_total)
    families("powerd_group_observe_only", "1 when powerd only observes the group's GPUs.").add(
        labels, group.observe_only
    )
    families(
        "powerd_group_dry_run", "1 when the group's settings are decided but not written."
    ).add(labels, group.dry_run)


def _known_and(known: tuple[str, ...], current: str) -> tuple[str, ...]:
    """The label values of a state set: the known ones, and the current one if it is not."""
    return known if current in known else (*known, current)


def _scaled(value: float | None, divisor: float) -> float | None:
    return None if value is None else value / divisor


def _hertz(clock_mhz: float | None) -> float | None:
    return None if clock_mhz is None else clock_mhz * _HZ_PER_MHZ
