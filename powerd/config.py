"""YAML configuration -> frozen dataclasses.

Every key is checked: an unknown key or a bad value raises ConfigError with the dotted path of
the key (`servers[1].slo.ttft_s: must be > 0, got -1`).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import re
import socket
import types
import typing
import urllib.parse
import zoneinfo
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

from powerd.validation import is_positive_finite

DEFAULT_METRICS_PORT = 9863
"""Next to dcgm-exporter's 9400 family but not on it; unassigned in Prometheus's port list."""

INTERVAL_RANGE_S = (0.1, 10.0)
"""Bounds of interval_s: below, the loop spins; above, a stale server or a missed SLO goes
unanswered for too long (and the unit's WatchdogSec=30 wants more than one tick per period)."""

MODES = ("efficiency", "target", "budget", "off")
NAMED_SERVER_KINDS = ("vllm", "sglang", "tgi", "llamacpp", "triton", "nim", "lmdeploy", "trtllm")
"""The servers read by their own metric names; the simulator serves each of them."""
SERVER_KINDS = ("auto", *NAMED_SERVER_KINDS, "generic")


_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
"""Prometheus's names, the only ones powerd's exposition parser reads."""


class ConfigError(ValueError):
    """A configuration problem; the message names the key."""


@dataclass(frozen=True, slots=True)
class SloConfig:
    ttft_s: float = 2.0
    """Limit on the TTFT quantile."""
    itl_s: float = 0.1
    """Limit on the inter-token latency quantile."""
    quantile: float = 0.95
    max_waiting: float = 32.0
    """Queue guard: more waiting requests than this raise clocks at once."""

    def validate(self, path: str) -> None:
        _positive(f"{path}.ttft_s", self.ttft_s)
        _positive(f"{path}.itl_s", self.itl_s)
        if not 0.5 <= self.quantile < 1.0:
            raise ConfigError(f"{path}.quantile: must be in [0.5, 1), got {self.quantile}")
        _non_negative(f"{path}.max_waiting", self.max_waiting)


@dataclass(frozen=True, slots=True)
class GenericMetricsConfig:
    """Metric names for `kind: generic`. Counters are rated; gauges are read as they are."""

    generation_tokens: str
    generation_tokens_type: Literal["counter", "gauge"] = "counter"
    """`gauge` means the metric already is a tokens-per-second rate."""
    prompt_tokens: str | None = None
    running: str | None = None
    waiting: str | None = None
    ttft_histogram: str | None = None
    itl_histogram: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    """Only series carrying all of these label values are read."""
    realtime: bool = True

    def validate(self, path: str) -> None:
        for key in (
            "generation_tokens",
            "prompt_tokens",
            "running",
            "waiting",
            "ttft_histogram",
            "itl_histogram",
        ):
            name = getattr(self, key)
            if name is not None and not _METRIC_NAME.fullmatch(name):
                raise ConfigError(
                    f"{path}.{key}: not a Prometheus metric name (letters, digits, _ and :; "
                    f"select series with labels:), got {name!r}"
                )
        for label in self.labels:
            if not _LABEL_NAME.fullmatch(label):
                raise ConfigError(f"{path}.labels: not a Prometheus label name, got {label!r}")


def url_problem(url: str) -> str | None:
    """What makes `url` unusable as a server's metrics URL, or None: the scheme, blanks or
    control characters, a port out of range, no host."""
    if not url.startswith(("http://", "https://")):
        return f"must start with http:// or https://, got {url!r}"
    if any(c.isspace() or not c.isprintable() for c in url):
        return f"must not contain spaces or control characters, got {url!r}"
    try:
        parts = urllib.parse.urlsplit(url)
        host, _ = parts.hostname, parts.port  # .port raises for a port out of range
    except ValueError as exc:
        return f"not a URL ({exc}), got {url!r}"
    if not host:
        return f"names no host, got {url!r}"
    return None


@dataclass(frozen=True, slots=True)
class ServerConfig:
    name: str
    url: str
    kind: str = "auto"
    gpus: tuple[int | str, ...] | None = None
    """GPU indices or UUIDs; None discovers them from the server's processes."""
    slo: SloConfig = field(default_factory=SloConfig)
    timeout_s: float = 0.5
    generic: GenericMetricsConfig | None = None

    def validate(self, path: str) -> None:
        if not self.name.strip():
            raise ConfigError(f"{path}.name: must not be empty")
        problem = url_problem(self.url)
        if problem is not None:
            raise ConfigError(f"{path}.url: {problem}")
        if self.kind not in SERVER_KINDS:
            raise ConfigError(f"{path}.kind: must be one of {', '.join(SERVER_KINDS)}")
        if self.kind == "generic" and self.generic is None:
            raise ConfigError(f"{path}.generic: required when kind is generic")
        if self.kind != "generic" and self.generic is not None:
            raise ConfigError(f"{path}.generic: read only with kind: generic (kind is {self.kind})")
        if self.generic is not None:
            self.generic.validate(f"{path}.generic")
        _positive(f"{path}.timeout_s", self.timeout_s)
        self.slo.validate(f"{path}.slo")
        if self.gpus is None:
            return
        if not self.gpus:
            raise ConfigError(
                f"{path}.gpus: must list at least one GPU; leave the key out to discover them"
            )
        seen: set[int | str] = set()
        for i, gpu in enumerate(self.gpus):
            if isinstance(gpu, int) and gpu < 0:
                raise ConfigError(f"{path}.gpus[{i}]: a GPU index must be >= 0, got {gpu}")
            if isinstance(gpu, str) and not gpu.strip():
                raise ConfigError(f"{path}.gpus[{i}]: a GPU UUID must not be empty")
            if gpu in seen:
                raise ConfigError(f"{path}.gpus[{i}]: GPU {gpu!r} is listed twice")
            seen.add(gpu)


@dataclass(frozen=True, slots=True)
class ControlConfig:
    """Tuning of the controller. The defaults are meant to work without change."""

    min_clock_mhz: int | None = None
    """Never lock below this clock (None: the controller's own floor, a share of f_max)."""
    max_step_down_mhz: int = 240
    """Slew limit when lowering the clock, per tick. Within it the controller comes down three
    clock steps a second, or after a raise a quarter of the way back to the clock before it
    each second (its time constants are in seconds, whatever interval_s)."""
    dither_mhz: int = 15
    """Amplitude of the small regular probe that keeps the clock model identifiable."""
    slo_margin: float = 0.85
    """Aim for latencies below this share of the SLO."""
    power_limit: Literal["default", "track"] = "default"
    """`track` also lowers the power limit towards the group's drawn power."""
    prefill_guard_interval_s: float = 0.33
    """At each tick and this often between ticks, read the prompt backlog of servers that report
    one (SGLang's /v1/loads) and raise a group's clock cap at once when it would not be
    prefilled within a share of the TTFT SLO; 0 turns this off, as does a tick interval under
    twice this."""

    def validate(self, path: str) -> None:
        interval = self.prefill_guard_interval_s
        if interval != 0 and not 0.05 <= interval <= 10.0:
            raise ConfigError(
                f"{path}.prefill_guard_interval_s: must be 0 (off) or in [0.05, 10], got {interval}"
            )
        if self.min_clock_mhz is not None:
            _positive(f"{path}.min_clock_mhz", self.min_clock_mhz)
        _positive(f"{path}.max_step_down_mhz", self.max_step_down_mhz)
        if self.dither_mhz < 0:
            raise ConfigError(f"{path}.dither_mhz: must be >= 0, got {self.dither_mhz}")
        if not 0.1 <= self.slo_margin <= 1.0:
            raise ConfigError(f"{path}.slo_margin: must be in [0.1, 1], got {self.slo_margin}")


FINAL_SCRAPE_WAIT_MAX_S = 85.0
"""The unit's TimeoutStopSec is 90 s; restoring the GPUs before the wait takes well under one."""


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    listen_address: str = "127.0.0.1"
    port: int = DEFAULT_METRICS_PORT
    web_config_file: str | None = None
    """Prometheus exporter-toolkit web-config file (TLS, basic auth)."""
    final_scrape_wait_s: float = 75.0
    """On a clean stop, after restoring the GPUs, wait up to this long for Prometheus to scrape
    the restored settings once more (only when a scrape is due within it); 0 turns it off. The
    default covers Prometheus's default 1-min scrape interval (a scrape due in up to 60 s,
    plus a quarter interval of grace)."""

    def validate(self, path: str) -> None:
        _check_listen_address(f"{path}.listen_address", self.listen_address)
        _not_blank(
            f"{path}.web_config_file", self.web_config_file, "to serve plain HTTP without auth"
        )
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"{path}.port: must be in [0, 65535], got {self.port}")
        if not 0 <= self.final_scrape_wait_s <= FINAL_SCRAPE_WAIT_MAX_S:
            raise ConfigError(
                f"{path}.final_scrape_wait_s: must be in [0, {FINAL_SCRAPE_WAIT_MAX_S:g}], "
                f"got {self.final_scrape_wait_s}"
            )


@dataclass(frozen=True, slots=True)
class GridConfig:
    """Electricity price and carbon intensity, for the cost and carbon of a token.

    Each signal is taken from the first of these that has a value now: `file` (a live value
    another job keeps up to date), the schedule, the flat value; else it is unknown and no cost
    or carbon is reported for that time."""

    price_per_kwh: float | None = None
    """Flat price, in the currency of `currency`."""
    price_schedule_per_kwh: tuple[float, ...] | None = None
    """24 hourly prices in `timezone` (a time-of-use tariff); overrides price_per_kwh."""
    price_weekend_schedule_per_kwh: tuple[float, ...] | None = None
    """24 hourly prices for Saturday and Sunday; price_schedule_per_kwh then holds Monday to
    Friday."""
    carbon_g_per_kwh: float | None = None
    carbon_schedule_g_per_kwh: tuple[float, ...] | None = None
    """24 hourly carbon intensities in `timezone`; overrides carbon_g_per_kwh."""
    carbon_weekend_schedule_g_per_kwh: tuple[float, ...] | None = None
    """24 hourly carbon intensities for Saturday and Sunday."""
    currency: str = "USD"
    pue: float = 1.0
    """Facility power usage effectiveness applied to GPU energy."""
    timezone: str | None = None
    """IANA time zone of the hourly schedules (Europe/Berlin); None: the system's local time."""
    file: str | None = None
    """JSON file of live or forecast values (price_per_kwh, carbon_g_per_kwh) that an
    operator's job keeps up to date; read again whenever it changes."""
    max_age_s: float = 7200.0
    """A value from `file` older than this is stale: the schedule or flat value applies."""

    def validate(self, path: str) -> None:
        for key in ("price_per_kwh", "carbon_g_per_kwh"):
            value = getattr(self, key)
            if value is not None:
                _non_negative(f"{path}.{key}", value)
        for key, weekdays in (
            ("price_schedule_per_kwh", None),
            ("price_weekend_schedule_per_kwh", "price_schedule_per_kwh"),
            ("carbon_schedule_g_per_kwh", None),
            ("carbon_weekend_schedule_g_per_kwh", "carbon_schedule_g_per_kwh"),
        ):
            schedule = getattr(self, key)
            if schedule is None:
                continue
            if weekdays is not None and getattr(self, weekdays) is None:
                raise ConfigError(
                    f"{path}.{key}: needs {weekdays} too (the hours of Monday to Friday)"
                )
            if len(schedule) != 24:
                raise ConfigError(f"{path}.{key}: needs 24 hourly values, got {len(schedule)}")
            for hour, value in enumerate(schedule):
                _non_negative(f"{path}.{key}[{hour}]", value)
        if not 1.0 <= self.pue < math.inf:
            raise ConfigError(f"{path}.pue: must be a finite number >= 1, got {self.pue}")
        if not self.currency.strip():
            raise ConfigError(f"{path}.currency: must not be empty")
        if self.timezone is not None:
            check_timezone(f"{path}.timezone", self.timezone)
        _not_blank(f"{path}.file", self.file, "for no file")
        _positive(f"{path}.max_age_s", self.max_age_s)


def check_timezone(path: str, name: str) -> zoneinfo.ZoneInfo:
    """The IANA time zone `name`; ConfigError naming `path` when there is none such."""
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        raise ConfigError(
            f"{path}: not an IANA time zone name (such as Europe/Berlin, America/Chicago or "
            f"UTC), got {name!r}"
        ) from None


SIM_TRACE_DEFAULT = "diurnal"
"""The load of a simulated node whose config names no sim.trace (`powerd run` with
`gpu_backend: sim`); `powerd demo` and `powerd bench` give theirs on the command line."""

REPLAY_TRACE_DEFAULT = "azure-conv"
"""The trace `powerd demo` and `powerd bench` replay when no --trace is given."""


@dataclass(frozen=True, slots=True)
class SimConfig:
    """The simulated node used by `gpu_backend: sim` and `powerd demo`."""

    gpu_model: str = "h100-sxm"
    gpu_profile_file: str | None = None
    gpus: int = 4
    model: str | None = None
    """Model profile name; None picks the 8B model for TP=1 and the 70B model otherwise."""
    tp: int = 2
    """GPUs per simulated server."""
    server_kind: str = "vllm"
    trace: str | None = None
    """An Azure-format trace file or a built-in trace's name; None: SIM_TRACE_DEFAULT."""
    time_compression: float = 1.0
    peak_load: float = 0.7
    state_file: str | None = None
    """Device state shared with later processes (powerd restore), as on real hardware."""
    seed: int = 0

    def validate(self, path: str) -> None:
        """The values alone; the names of GPU and model profiles and the trace are checked
        where the simulator is known (powerd.runtime.check_config)."""
        if self.server_kind not in NAMED_SERVER_KINDS:
            raise ConfigError(
                f"{path}.server_kind: must be one of {', '.join(NAMED_SERVER_KINDS)}, "
                f"got {self.server_kind!r}"
            )
        _positive(f"{path}.gpus", self.gpus)
        _positive(f"{path}.tp", self.tp)
        if self.gpus % self.tp:
            raise ConfigError(f"{path}.tp: must divide gpus ({self.gpus}), got {self.tp}")
        _positive(f"{path}.time_compression", self.time_compression)
        _positive(f"{path}.peak_load", self.peak_load)
        if self.seed < 0:
            raise ConfigError(f"{path}.seed: must be >= 0, got {self.seed}")
        _not_blank(f"{path}.state_file", self.state_file, "for no state file")


@dataclass(frozen=True, slots=True)
class Config:
    servers: tuple[ServerConfig, ...] = ()
    interval_s: float = 1.0
    mode: str = "efficiency"
    target_tokens_per_joule: float | None = None
    node_power_budget_w: float | None = None
    stale_after_s: float = 10.0
    dry_run: bool = False
    state_dir: str = "/var/lib/powerd"
    gpu_backend: Literal["nvml", "sim"] = "nvml"
    control: ControlConfig = field(default_factory=ControlConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    grid: GridConfig = field(default_factory=GridConfig)
    sim: SimConfig = field(default_factory=SimConfig)

    def validate(self) -> None:
        _check_state_dir("state_dir", self.state_dir)
        low_s, high_s = INTERVAL_RANGE_S
        if not low_s <= self.interval_s <= high_s:
            raise ConfigError(
                f"interval_s: must be in [{low_s:g}, {high_s:g}], got {self.interval_s}"
            )
        _positive("stale_after_s", self.stale_after_s)
        if self.stale_after_s < self.interval_s:
            raise ConfigError(
                f"stale_after_s: must be at least interval_s ({self.interval_s:g}), "
                f"got {self.stale_after_s:g}"
            )
        if self.mode not in MODES:
            raise ConfigError(f"mode: must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.mode == "target" and self.target_tokens_per_joule is None:
            raise ConfigError("target_tokens_per_joule: required when mode is target")
        if self.target_tokens_per_joule is not None:
            _positive("target_tokens_per_joule", self.target_tokens_per_joule)
        if self.mode == "budget" and self.node_power_budget_w is None:
            raise ConfigError("node_power_budget_w: required when mode is budget")
        if self.node_power_budget_w is not None:
            _positive("node_power_budget_w", self.node_power_budget_w)
        seen: set[str] = set()
        for i, server in enumerate(self.servers):
            server.validate(f"servers[{i}]")
            if server.name in seen:
                raise ConfigError(f"servers[{i}].name: {server.name!r} is used twice")
            seen.add(server.name)
            # A scrape that outlasts the tick delays every decision behind it.
            if server.timeout_s > self.interval_s:
                raise ConfigError(
                    f"servers[{i}].timeout_s: must be at most interval_s ({self.interval_s:g}), "
                    f"got {server.timeout_s:g}"
                )
        self.control.validate("control")
        self.metrics.validate("metrics")
        self.grid.validate("grid")
        self.sim.validate("sim")


def _not_blank(path: str, value: str | None, without: str) -> None:
    """ConfigError for an optional file setting given as empty or blank: it names no file, and
    leaving the key out is how to say none (`without` says what that does: "for no file")."""
    if value is not None and not value.strip():
        raise ConfigError(f"{path}: must not be empty; leave the key out {without}")


def _check_state_dir(path: str, value: str) -> None:
    """An empty state_dir would put the journal in whatever folder powerd starts in."""
    if not value.strip():
        raise ConfigError(f"{path}: must not be empty (the folder of the saved GPU settings)")


def _positive(path: str, value: float) -> None:
    if not is_positive_finite(value):
        raise ConfigError(f"{path}: must be a positive number, got {value}")


def _non_negative(path: str, value: float) -> None:
    if not 0 <= value < math.inf:
        raise ConfigError(f"{path}: must be a finite number >= 0, got {value}")


_HOST_NAME = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?")


def _check_listen_address(path: str, address: str) -> None:
    """An IP address, empty (every IPv4 interface), or a host name that resolves here."""
    if address == "":
        return
    try:
        ipaddress.ip_address(address)
        return
    except ValueError:
        pass
    # A name whose last label is all digits is a mistyped address, not a host (RFC 3696 2).
    last_label = address.rstrip(".").rsplit(".", 1)[-1]
    if len(address) > 253 or not _HOST_NAME.fullmatch(address) or last_label.isdigit():
        raise ConfigError(f"{path}: not an IP address or a host name, got {address!r}")
    try:
        socket.getaddrinfo(address, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError) as exc:
        raise ConfigError(f"{path}: cannot resolve {address!r}: {exc}") from None


def parse_config(data: object) -> Config:
    """Build and validate a Config from parsed YAML (a mapping, or None for all defaults)."""
    if data is None:
        data = {}
    config = _build(Config, _mode_from_yaml_bool(data), "")
    config.validate()
    return config


def _mode_from_yaml_bool(data: object) -> object:
    """`mode: off` unquoted is the boolean false in YAML 1.1 (what PyYAML reads): take it as
    the mode "off" the example documents."""
    if isinstance(data, Mapping) and data.get("mode") is False:
        return {**data, "mode": "off"}
    return data


def load_config(path: str | Path) -> Config:
    """Read, parse and validate a YAML config file. A file with no document (empty, or only
    comments) is a ConfigError: a truncated file would otherwise run with every default."""
    data = read_yaml(path)
    if data is None:
        raise ConfigError(
            f"{path}: holds no settings (empty, or only comments); write `{{}}` for every default"
        )
    return parse_config(data)


RESTORE_KEYS = ("state_dir", "gpu_backend", "sim")
"""What `powerd restore` reads of a config: where the journal is and which GPUs to open."""


def load_restore_config(
    path: str | Path, *, state_dir: str | None = None
) -> tuple[Config, list[str]]:
    """The config `powerd restore` works with, read so that nothing but the RESTORE_KEYS can
    keep the GPUs from being put back: the whole file when it is valid; otherwise each of
    RESTORE_KEYS alone, its default where it is missing or bad, and every other key left at
    its default. `state_dir` (--state-dir) replaces the file's. Never raises ConfigError;
    returns the config and one sentence per problem met, for warnings."""
    try:
        config = load_config(path)
        problems: list[str] = []
    except ConfigError as exc:
        error = str(exc) if str(path) in str(exc) else f"{path}: {exc}"
        config, problems = _restore_keys(path, error, state_dir)
    if state_dir is not None:
        config = dataclasses.replace(config, state_dir=state_dir)
    return config, problems


def _restore_keys(path: str | Path, error: str, state_dir: str | None) -> tuple[Config, list[str]]:
    default = Config() if state_dir is None else Config(state_dir=state_dir)
    try:
        data = read_yaml(path, strict=False)
    except ConfigError:
        data = None
    if not isinstance(data, Mapping):
        using = f"state_dir {default.state_dir}, gpu_backend {default.gpu_backend}"
        return default, [f"{error}; restoring with the defaults ({using})"]
    problems = [f"{error}; reading only {', '.join(RESTORE_KEYS)} from it"]
    hints = get_type_hints(Config)
    values: dict[str, Any] = {}
    for key in ("state_dir", "gpu_backend"):
        if key not in data:
            continue
        try:
            value = _convert(hints[key], data[key], key)
            if key == "state_dir":
                _check_state_dir(key, value)
            values[key] = value
        except ConfigError as exc:
            problems.append(f"{exc}; using the default {key} {getattr(default, key)}")
    if "sim" in data:
        values["sim"] = _lenient_sim(data["sim"], problems)
    return dataclasses.replace(default, **values), problems


def _lenient_sim(data: object, problems: list[str]) -> SimConfig:
    """SimConfig from the keys of `data` that are valid on their own; the defaults, with the
    state file kept, when together they are not."""
    if not isinstance(data, Mapping):
        problems.append(f"sim: expected a mapping, got {type(data).__name__}; using the defaults")
        return SimConfig()
    hints = get_type_hints(SimConfig)
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key not in hints:
            continue
        try:
            values[key] = _convert(hints[key], value, f"sim.{key}")
        except ConfigError as exc:
            problems.append(f"{exc}; using its default")
    state_file = values.get("state_file")
    if state_file is not None and not state_file.strip():
        problems.append("sim.state_file: must not be empty; using no state file")
        del values["state_file"]
    sim = SimConfig(**values)
    try:
        sim.validate("sim")
    except ConfigError as exc:
        problems.append(f"{exc}; using the default sim settings but its state_file")
        sim = SimConfig(state_file=sim.state_file)
    return sim


def read_yaml(path: str | Path, *, strict: bool = True, what: str = "config") -> object:
    """The parsed YAML document of a config file (`what` names its kind in messages);
    ConfigError naming the file when it cannot be read, is not UTF-8, is not YAML, or repeats
    a key within one mapping. Not `strict`, bytes that are not UTF-8 become U+FFFD and the
    last of a repeated key wins (plain PyYAML), so what is still legible can be read."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8", errors="strict" if strict else "replace")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: {utf8_problem(raw, exc)}; save it as UTF-8") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader if strict else yaml.SafeLoader)
    except _DuplicateKey as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {yaml_problem(exc)}") from None


def utf8_problem(raw: bytes, exc: UnicodeDecodeError) -> str:
    """Where `raw` stops being UTF-8, for a message: "not UTF-8 (byte 0xe9 on line 6)"."""
    line = raw[: exc.start].count(b"\n") + 1
    return f"not UTF-8 (byte 0x{raw[exc.start]:02x} on line {line})"


def yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's error on one line: where and what ("line 2, column 2: expected ',' or ']' ...
    (while parsing a flow sequence from line 1, column 4)"); its own text spans five."""
    if not isinstance(exc, yaml.MarkedYAMLError) or exc.problem_mark is None:
        return " ".join(str(exc).split())
    mark = exc.problem_mark
    text = f"line {mark.line + 1}, column {mark.column + 1}: {exc.problem}"
    if exc.context:
        text += f" ({exc.context}"
        if exc.context_mark is not None:
            context = exc.context_mark
            text += f" from line {context.line + 1}, column {context.column + 1}"
        text += ")"
    return text


class _DuplicateKey(yaml.YAMLError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping; PyYAML keeps the last one
    silently, which drops what the first one set. Keys a merge (`<<:`) brings in may be given
    again: that is how a merge is overridden."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._checked: set[int] = set()

    def _check_unique(self, node: yaml.MappingNode) -> None:
        """Check the keys `node` states itself, once: flatten_mapping rewrites a merged node
        in place with the keys it merges, which must not read as given twice later."""
        if id(node) in self._checked:
            return
        self._checked.add(id(node))
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = first_line.get(key)
            except TypeError:
                continue  # an unhashable key: the constructor says so
            if first is not None:
                raise _DuplicateKey(
                    f"line {line}: key {key!r} is given twice (first on line {first}); "
                    "YAML would keep only the last one"
                )
            first_line[key] = line

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        self._check_unique(node)
        super().flatten_mapping(node)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            self._check_unique(node)
        return super().construct_mapping(node, deep=deep)


def _build(cls: type, data: object, path: str) -> Any:
    where = path or "the top level"
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        key_path = f"{path}.{key}" if path else str(key)
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"{key_path}: unknown key (known keys: {known})")
        kwargs[key] = _convert(hints[key], value, key_path)
    missing = [
        name
        for name, f in fields.items()
        if name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        prefix = f"{path}." if path else ""
        raise ConfigError(f"{prefix}{missing[0]}: required")
    return cls(**kwargs)


def _is_float_text(text: str) -> bool:
    """Whether Python reads `text` as a finite number (what YAML left as text: 1e3)."""
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _label_text(value: object, path: str) -> str:
    """A label name or value as Prometheus writes it: text, or an unquoted YAML number."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ConfigError(f"{path}: expected a string, got {value!r}")
    return str(value)


def _convert(hint: Any, value: object, path: str) -> Any:
    origin = get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(option, value, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: bad value {value!r}")
    if origin is Literal:
        allowed = get_args(hint)
        if value not in allowed:
            raise ConfigError(f"{path}: must be one of {', '.join(map(str, allowed))}")
        return value
    if origin is tuple:
        item_hint = get_args(hint)[0]
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__}")
        return tuple(_convert(item_hint, item, f"{path}[{i}]") for i, item in enumerate(value))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__}")
        return {_label_text(k, path): _label_text(v, f"{path}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, path)  # type: ignore[arg-type]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str) and _is_float_text(value):
            raise ConfigError(
                f"{path}: expected a number, got the text {value!r} (YAML reads 1e3 and 1.0e3 "
                "as text: write 1000 or 1.0e+3, unquoted)"
            )
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        if math.isnan(value):
            raise ConfigError(f"{path}: expected a number, got NaN")
        return float(value)
    if hint is str:
        if isinstance(value, bool):
            raise ConfigError(
                f"{path}: expected a string, got {value!r} (YAML reads unquoted yes, no, on "
                "and off as true or false: quote the value)"
            )
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported value {value!r}")
