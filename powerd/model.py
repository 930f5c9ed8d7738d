"""Frozen value types passed between layers.

Every quantity carries its unit in its name. Values that a sensor or a server could not give
are None, never a made-up zero.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Clock event reason bits (nvmlClocksEventReason*), as NVML defines them.
REASON_GPU_IDLE = 0x1
REASON_APPLICATIONS_CLOCKS = 0x2
REASON_SW_POWER_CAP = 0x4
REASON_HW_SLOWDOWN = 0x8
REASON_SYNC_BOOST = 0x10
REASON_SW_THERMAL = 0x20
REASON_HW_THERMAL = 0x40
REASON_HW_POWER_BRAKE = 0x80
REASON_DISPLAY_CLOCK = 0x100
POWER_CAP_REASONS = REASON_SW_POWER_CAP | REASON_HW_POWER_BRAKE
"""The reasons under which a power limit, not the clock lock, sets the clock."""

CLOCK_EVENT_REASON_NAMES: dict[int, str] = {
    REASON_GPU_IDLE: "gpu_idle",
    REASON_APPLICATIONS_CLOCKS: "applications_clocks_setting",
    REASON_SW_POWER_CAP: "sw_power_cap",
    REASON_HW_SLOWDOWN: "hw_slowdown",
    REASON_SYNC_BOOST: "sync_boost",
    REASON_SW_THERMAL: "sw_thermal_slowdown",
    REASON_HW_THERMAL: "hw_thermal_slowdown",
    REASON_HW_POWER_BRAKE: "hw_power_brake_slowdown",
    REASON_DISPLAY_CLOCK: "display_clock_setting",
}

DECISION_REASONS: tuple[str, ...] = (
    "steady",
    "lower_slack",
    "raise_itl",
    "raise_ttft",
    "raise_queue",
    "raise_kv",
    "raise_energy",
    "hold_after_raise",
    "hold_energy",
    "target",
    "stale",
    "off",
)
"""Why powerd's controller set a group as it did, one word each: the label values of
powerd_group_decision_reason (GroupDecision.reason_label)."""

# The daemon's pace and thresholds behind figures of the snapshot: here, so that the exporter's
# help texts state them without importing the daemon.
DISCOVERY_RETRY_S = 10.0
"""How often the daemon looks for its lost GPUs, opens again the GPUs NVML counts but could not
open (Snapshot.gpus_unopened) and reads again power-limit ranges a passing error kept unread;
how soon the GPUs of a server that has none yet are first looked for again (at boot a server
that is still loading its model does not listen, and discovery finds nothing); and how soon a
restarted server's lookup that found none is tried again."""
TARGET_WINDOW_S = 60.0
"""Tokens per joule over this long tell whether a group reaches its target
(GroupStatus.target_reached): one tick's or ten's swing with every batch."""
TARGET_REACHED_AT = 0.98
TARGET_LOST_BELOW = 0.95
"""Reached from 0.98 x the target on, and no longer below 0.95 x: a figure near the target
does not flip the report at every tick."""
SHARED_WHY = (
    "one clock limit cannot keep two servers' latency, so powerd controls such a GPU for "
    "neither until a reload"
)
"""Why a GPU two servers run on is controlled for neither (their tokens cannot price its
energy either); the roster takes such GPUs from every group."""


@dataclass(frozen=True, slots=True)
class GpuInfo:
    """Identity and constraints of one GPU, read once at start-up."""

    index: int
    uuid: str
    name: str
    power_limit_min_mw: int
    power_limit_max_mw: int
    power_limit_default_mw: int
    sm_clock_min_mhz: int
    sm_clock_max_mhz: int
    supported_sm_clocks_mhz: tuple[int, ...]
    """Ascending; the values SetGpuLockedClocks accepts exactly."""

    def clamp_clock_mhz(self, clock_mhz: float) -> int:
        """The highest supported clock at or below clock_mhz (the lowest supported if none)."""
        best = self.supported_sm_clocks_mhz[0]
        for supported in self.supported_sm_clocks_mhz:
            if supported <= clock_mhz:
                best = supported
            else:
                break
        return best

    @property
    def power_limit_range_known(self) -> bool:
        """Whether NVML reported a range to set the power limit in; without one (min = max,
        pinned to the limit the GPU held) powerd sets no limit on it."""
        return self.power_limit_min_mw < self.power_limit_max_mw

    def clamp_power_limit_mw(self, power_limit_mw: float) -> int:
        return int(min(max(power_limit_mw, self.power_limit_min_mw), self.power_limit_max_mw))


@dataclass(frozen=True, slots=True)
class GpuReading:
    """One tick's telemetry of one GPU. Any field the device could not report is None."""

    uuid: str
    index: int
    timestamp_s: float
    power_mw: int | None
    """nvmlDeviceGetPowerUsage: a 1-s average on Hopper/Ada, instantaneous on A100."""
    energy_mj: int | None
    """Total energy counter since driver load."""
    sm_clock_mhz: int | None
    power_limit_mw: int | None
    """Requested (in-band) power limit."""
    enforced_power_limit_mw: int | None
    """The limit actually applied, out-of-band limiters included."""
    clock_event_reasons: int | None
    temperature_c: int | None


@dataclass(frozen=True, slots=True)
class ServerSample:
    """One scrape of one inference server, turned into rates over the last scrape interval.

    Rates are None on the first scrape and after a reset, until two comparable scrapes exist.
    """

    server: str
    kind: str
    model_name: str
    up: bool
    timestamp_s: float
    scrape_duration_s: float
    realtime: bool
    """True when token counters move every iteration; False when they move at request end."""
    prompt_per_chunk: bool = False
    """True when prompt tokens are counted chunk by chunk as they are prefilled; False when a
    whole prompt is counted at once (at its first token, or at request end)."""
    generation_tokens_per_s: float | None = None
    prompt_tokens_per_s: float | None = None
    running: float | None = None
    waiting: float | None = None
    ttft_q_s: float | None = None
    """Time to first token at the SLO's quantile (`slo.quantile`, p95 by default)."""
    itl_q_s: float | None = None
    """Inter-token latency at the SLO's quantile."""
    ttft_mean_s: float | None = None
    itl_mean_s: float | None = None
    ttft_slowest_s: float | None = None
    """Mean TTFT of the slowest histogram bucket's requests over the window (sum-placed)."""
    kv_cache_usage: float | None = None
    """Share of the KV cache in use now, 0-1 (the fullest engine's), where the server says."""
    preemptions: float | None = None
    """Requests the server preempted over the window (evicted for KV space), where it counts."""
    finished_requests: float | None = None
    """Requests finished over the window, where the server counts them."""
    window_s: float | None = None
    """Seconds between the two answers the window's counts (finished_requests, preemptions,
    prefill_busy_s) span; None without a window. Not the tick's interval: a scrape missed, or
    answered later in one tick than in the next, makes them differ."""
    prefill_busy_s: float | None = None
    """Seconds the server spent in prefill forward passes over the window, where it times them
    (TGI): prompt tokens over these seconds are its prefill capacity."""
    prompt_tokens_weighted_mean: float | None = None
    """E[P^2]/E[P] of recent finished requests' prompt lengths P (tokens): the mean length of
    the prompt a prompt token belongs to, which sets how long a new request waits behind
    prefill; None where the server has no prompt-length histogram."""
    generation_tokens_total: float | None = None
    """The server's own cumulative generated-token count, where it has one."""
    exports_ttft: bool = False
    """The scrape has a time-to-first-token histogram (some servers create theirs at their
    first request)."""
    exports_prompt_lengths: bool = False
    """The scrape has a prompt-length histogram (the prompt mix)."""
    error: str | None = None
    """Why the source is down, one sentence; None when up."""

    @property
    def first_token_blind(self) -> bool:
        """Read, with neither a TTFT nor a prompt-length histogram: first-token latency can be
        neither seen nor modelled (its group keeps BLIND_PREFILL_SHARE of its maximum clock)."""
        return self.up and not self.exports_ttft and not self.exports_prompt_lengths


BLIND_PREFILL_SHARE = 0.7
"""Where a server exports neither a TTFT nor a prompt-length histogram, its group's clocks stay
at or above this share of their maximum: prefill runs at 1/0.7 of its fastest at worst, while
decode keeps most of its saving (its energy knee sits near 0.6-0.7 f_max, dvfs_plant_model.md
section 6c)."""


@dataclass(frozen=True, slots=True)
class GroupObservation:
    """What the controller sees of one GPU group (the GPUs one server spans) over one tick."""

    group: str
    interval_s: float
    gpu_count: int
    energy_j: float | None
    """Energy of all the group's GPUs over the interval, from the energy counters."""
    power_w: float | None
    generation_tokens_per_s: float | None
    prompt_tokens_per_s: float | None
    running: float | None
    waiting: float | None
    ttft_q_s: float | None
    itl_q_s: float | None
    sm_clock_mhz: float | None
    """Mean actual SM clock across the group's GPUs."""
    clock_event_reasons: int
    stale: bool
    """True when the server's signals are missing or older than the configured stale time."""
    realtime: bool = True
    prompt_per_chunk: bool = False
    """See ServerSample.prompt_per_chunk."""
    ttft_slowest_s: float | None = None
    """The slowest first tokens' latency over the tick (see ServerSample.ttft_slowest_s)."""
    kv_cache_usage: float | None = None
    """See ServerSample.kv_cache_usage."""
    preemptions: float | None = None
    """See ServerSample.preemptions."""
    prefill_busy_s: float | None = None
    """ServerSample.prefill_busy_s scaled from its window to the tick's interval (the share of
    the window the server spent in prefill, times interval_s)."""
    finished_requests_per_s: float | None = None
    """Requests the server finished per second over its last window (ServerSample.window_s),
    where it counts them."""
    prompt_tokens_weighted_mean: float | None = None
    """See ServerSample.prompt_tokens_weighted_mean."""
    first_token_blind: bool = False
    """The server exports neither a TTFT nor a prompt-length histogram: first-token latency can
    be neither seen nor modelled."""
    interval_clock_cap_mhz: float | None = None
    """The time-weighted clock cap over the interval where raises for the backlog moved it
    (None otherwise): the clock the interval's prompt work was done at."""
    limited_gpu_count: int | None = None
    """In budget mode, how many of the group's GPUs take a power limit from powerd (the
    others' limits are kept out of the budget); None: all of them."""
    held_by_lowered_cap: bool = False
    """A GPU of the group had its clock held by a power limit below its default (an
    operator's or the budget's): its power was the cap's, not the clock's."""


@dataclass(frozen=True, slots=True)
class GroupDecision:
    """The controller's setting for one group; applied to every GPU of the group."""

    group: str
    sm_clock_max_mhz: int
    """Upper end of the locked SM clock range; the device maximum means 'unlocked'."""
    power_limit_mw: int | None
    """Per-GPU power limit; None leaves the default limit."""
    mode: str
    reason: str = ""
    """Why, in words."""
    reason_label: str = ""
    """Why, as one of DECISION_REASONS ("" from a policy that does not say)."""


@dataclass(frozen=True, slots=True)
class GroupStatus:
    """Per-group figures the exporter publishes."""

    group: str
    server: str
    model_name: str
    gpu_uuids: tuple[str, ...]
    mode: str
    sm_clock_max_mhz: int | None
    """The clock powerd chose; None before its first decision (observed only, or not yet
    decided)."""
    power_limit_mw: int | None
    tokens_per_joule: float | None
    energy_per_token_j: float | None
    generation_tokens_per_s: float | None
    power_w: float | None
    ttft_q_s: float | None
    itl_q_s: float | None
    ttft_slo_s: float
    itl_slo_s: float
    slo_met: bool | None
    slo_attainment: float | None
    """Fraction of recent ticks whose latency quantiles met the SLO."""
    target_tokens_per_joule: float | None = None
    target_reached: bool | None = None
    observe_only: bool = False
    dry_run: bool = False
    cost_per_million_tokens: float | None = None
    """Electricity cost of a million tokens at the facility (GPU energy x PUE x price)."""
    carbon_g_per_million_tokens: float | None = None
    """Grams CO2e of a million tokens at the facility (GPU energy x PUE x intensity)."""
    prompt_backlog_tokens: float | None = None
    """Prompt tokens the server still had to prefill at the last read (None: the server does not
    report it, or the group is at its maximum clock and it is not read)."""
    decision_reason: str = ""
    """The controller's reason for the group's setting this tick (DECISION_REASONS; "" where
    the policy gives none)."""
    prefill_guard_raises_total: int | None = None
    """Raises of the cap for that backlog, at ticks and between them (None: the server reports
    none)."""
    slo_quantile: float | None = None
    """The latency quantile ttft_slo_s and itl_slo_s limit (slo.quantile), 0.5-1."""
    energy_cost_total: float | None = None
    """Electricity cost of the group's GPU energy since start (energy x PUE x the price in
    force at each tick, at prices >= 0), in the grid currency; None while no price has been in
    force."""
    energy_credit_total: float | None = None
    """What the group's energy earned at negative prices since start (energy x PUE x -price),
    in the grid currency: the net cost is energy_cost_total - energy_credit_total."""
    carbon_g_total: float | None = None
    """Grams CO2e of the group's GPU energy since start, likewise; None while no carbon
    intensity has been in force."""


GRID_SIGNALS: tuple[str, ...] = ("price", "carbon")
GRID_SOURCES: tuple[str, ...] = ("file", "schedule", "flat")
"""Where a grid signal's value in force comes from, in the order they are tried."""


@dataclass(frozen=True, slots=True)
class GridSignalStatus:
    """One grid signal at one moment: its value in force and where that came from."""

    signal: str
    """One of GRID_SIGNALS."""
    value: float | None
    """Currency per kWh (price) or gCO2e per kWh (carbon); None when no source has one now."""
    source: str | None
    """One of GRID_SOURCES; None with no value."""
    age_s: float | None = None
    """Seconds since a value from the file began to apply (its timestamp, or the start of
    its interval); None for the config's values."""


@dataclass(frozen=True, slots=True)
class GpuStatus:
    """Per-GPU figures the exporter publishes: the reading plus what powerd set."""

    reading: GpuReading
    info: GpuInfo
    configured_power_limit_mw: int | None
    """The limit powerd asked for (None when it has not set one)."""
    sm_clock_lock_max_mhz: int | None
    """Upper end of the locked range powerd set (None when unlocked)."""
    observe_only: bool
    observe_only_reason: str = ""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything the exporter renders, published once per tick. The exporter reads only this."""

    timestamp_s: float
    """Unix time of the tick in a running daemon (a simulation's virtual time in its runs)."""
    gpus: tuple[GpuStatus, ...] = ()
    servers: tuple[ServerSample, ...] = ()
    groups: tuple[GroupStatus, ...] = ()
    nvml_errors: dict[tuple[str, str], int] = field(default_factory=dict)
    """Cumulative NVML errors keyed by (operation, kind)."""
    gpus_unopened: int = 0
    """GPUs NVML counts but powerd cannot open (lost before it started, no permission)."""
    gpus_shared: int = 0
    """GPUs two servers run on, controlled for neither (see SHARED_WHY)."""
    restores_total: int = 0
    restore_failures_total: int = 0
    ticks_total: int = 0
    loop_duration_s: float | None = None
    """Duration of the tick that produced this snapshot; the exporter feeds its histogram."""
    mode: str = "efficiency"
    dry_run: bool = False
    grid_price_per_kwh: float | None = None
    grid_carbon_g_per_kwh: float | None = None
    grid_currency: str = "USD"
    grid_pue: float = 1.0
    """Facility power usage effectiveness that cost and carbon apply to GPU energy."""
    grid_signals: tuple[GridSignalStatus, ...] = ()
    """The grid signals that have any source configured."""
    grid_file_errors_total: int | None = None
    """Problems met reading grid.file since start; None without a file."""
    node_power_budget_w: float | None = None
    """The configured node power budget (budget mode only)."""
    node_power_budget_feasible: bool | None = None
    """False while the budget, less what GPUs out of reach keep, is below the controlled GPUs'
    minimum power limits (budget mode only)."""
    grid_file_problems: int | None = None
    """Problems of grid.file as last read (or 1 while its file system hangs); None without."""
