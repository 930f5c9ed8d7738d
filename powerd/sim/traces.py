"""Request arrival streams for the simulated node: the Azure trace and synthetic load patterns.

An `Arrivals` holds, per request, its arrival time (seconds from the start of the stream), its
prompt tokens and the tokens it generates. Rates are changed by deterministic thinning or
replication, time by compression; `scale_for_peak_load` sizes a stream so its busiest window
uses a given share of the node's capacity, estimated from the engine's roofline at f_max.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from powerd.config import utf8_problem
from powerd.sim.engine import (
    C_F_MAX_MHZ,
    C_KV_CAP_TOKENS,
    C_MAX_BATCH,
    C_T_CPU_FRAC,
    C_T_CPU_S,
    GpuSpec,
    build_config,
    comm_time_s,
    gpu_time_s,
)
from powerd.sim.models import ModelProfile
from powerd.wording import counted

log = logging.getLogger(__name__)

AZURE_CONV_FILE = "azure_conv_2023.csv"
TRACE_DIR_ENV = "POWERD_TRACE_DIR"
SYNTHETIC_PATTERNS = ("diurnal", "step", "burst", "constant")
TRACE_NAMES = ("azure-conv", *SYNTHETIC_PATTERNS)
AZURE_CONV_NAMES = ("azure-conv", "azure_conv")
"""The names of the Azure conversation trace (its file, found by find_trace_file)."""

# Log-normal request lengths fitted to the Azure conversation trace (19,366 requests): prompt
# median 1020 tokens, σ(ln) 0.99; generated median 129 tokens, σ(ln) 0.86; its ranges bound them.
PROMPT_MEDIAN_TOKENS = 1020.0
PROMPT_SIGMA_LN = 0.985
GEN_MEDIAN_TOKENS = 129.0
GEN_SIGMA_LN = 0.859
PROMPT_RANGE_TOKENS = (2, 14050)
GEN_RANGE_TOKENS = (1, 1000)
# The Azure conversation trace's mean rate: 19,366 requests in one hour.
AZURE_CONV_RATE_PER_S = 19366 / 3600.0


@dataclass(frozen=True, eq=False)
class Arrivals:
    """A request stream: arrival times (s, sorted, from 0), prompt and generated tokens."""

    time_s: np.ndarray
    prompt_tokens: np.ndarray
    gen_tokens: np.ndarray
    duration_s: float
    """Length of the stream's time span (at least the last arrival time)."""
    name: str = field(default="")

    def __post_init__(self) -> None:
        t = np.ascontiguousarray(self.time_s, dtype=np.float64)
        p = np.ascontiguousarray(self.prompt_tokens, dtype=np.int64)
        g = np.ascontiguousarray(self.gen_tokens, dtype=np.int64)
        if not (t.ndim == 1 and t.shape == p.shape == g.shape):
            raise ValueError("arrival times, prompt and generated tokens must be equal-length 1-D")
        if t.size and (not np.all(np.isfinite(t)) or t[0] < 0 or np.any(np.diff(t) < 0)):
            raise ValueError("arrival times must be finite, non-negative and sorted")
        if np.any(p < 1) or np.any(g < 1):
            raise ValueError("every request needs at least one prompt and one generated token")
        object.__setattr__(self, "time_s", t)
        object.__setattr__(self, "prompt_tokens", p)
        object.__setattr__(self, "gen_tokens", g)
        last = float(t[-1]) if t.size else 0.0
        object.__setattr__(self, "duration_s", max(float(self.duration_s), last))

    def __len__(self) -> int:
        return int(self.time_s.size)

    @property
    def mean_rate_per_s(self) -> float:
        return len(self) / self.duration_s if self.duration_s > 0 else 0.0

    def window(self, t0_s: float, t1_s: float) -> Arrivals:
        """Requests arriving in [t0_s, t1_s), times shifted to start at 0."""
        i0, i1 = np.searchsorted(self.time_s, [t0_s, t1_s], side="left")
        return Arrivals(
            self.time_s[i0:i1] - t0_s,
            self.prompt_tokens[i0:i1],
            self.gen_tokens[i0:i1],
            t1_s - t0_s,
            self.name,
        )


# ---------------------------------------------------------------------------------------------
# The Azure trace


def load_azure_trace(
    path: str | Path, *, rate_scale: float = 1.0, time_compression: float = 1.0
) -> Arrivals:
    """Read an Azure LLM inference trace (TIMESTAMP,ContextTokens,GeneratedTokens).

    Timestamps are datetimes (any fractional digits), each with or without a UTC offset (one
    without is UTC); times are seconds from the first. Blank lines and a byte-order mark are
    ignored; token counts of 0 count as 1. rate_scale thins (<1) or replicates (>1) requests
    deterministically; time_compression divides every inter-arrival time. Raises ValueError
    naming the file and line for anything it cannot read, and for requests that all arrive at
    one instant.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read trace {path}: {exc.strerror or exc}") from exc
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"trace {path}: {utf8_problem(raw, exc)}") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    rows: list[tuple[int, list[str]]] = []  # (the line a record starts on, its fields)
    try:
        start = 1
        for row in reader:
            if any(f.strip() for f in row):
                rows.append((start, row))
            start = reader.line_num + 1  # a quoted field may span lines
    except csv.Error as exc:
        raise ValueError(f"trace {path}, line {reader.line_num}: {exc}") from None
    if not rows:
        raise ValueError(f"trace {path} is empty")
    header = [h.strip() for h in rows[0][1]]
    try:
        i_ts = header.index("TIMESTAMP")
        i_ctx = header.index("ContextTokens")
        i_gen = header.index("GeneratedTokens")
    except ValueError:
        raise ValueError(
            f"trace {path}: header must name TIMESTAMP, ContextTokens and GeneratedTokens, "
            f"got {','.join(header)}"
        ) from None
    lines = [line for line, _ in rows[1:]]
    stamps: list[str] = []
    prompt = np.empty(len(lines), dtype=np.int64)
    gen = np.empty(len(lines), dtype=np.int64)
    for n, (line, row) in enumerate(rows[1:]):
        try:
            stamps.append(row[i_ts].strip())
            prompt[n] = int(row[i_ctx])
            gen[n] = int(row[i_gen])
        except (IndexError, ValueError, OverflowError):
            raise ValueError(f"trace {path}, line {line}: cannot read {row!r}") from None
        if prompt[n] < 0 or gen[n] < 0:
            raise ValueError(f"trace {path}, line {line}: a negative token count in {row!r}")
    if not stamps:
        raise ValueError(f"trace {path} has no requests")
    ts = _timestamps(path, stamps, lines)
    order = np.argsort(ts, kind="stable")
    rel_s = (ts[order] - ts[order[0]]).astype(np.int64) / 1e9
    if rel_s[-1] <= 0:
        raise ValueError(
            f"trace {path}: no time passes between its first and last request "
            f"({counted(len(stamps), 'request')} at {stamps[0]}); a replay needs arrivals "
            "spread over time"
        )
    prompt = np.maximum(prompt[order], 1)
    gen = np.maximum(gen[order], 1)
    # The span runs one mean gap past the last request, so a replayed loop keeps its rate.
    span = float(rel_s[-1]) * len(rel_s) / max(len(rel_s) - 1, 1)
    arrivals = Arrivals(rel_s, prompt, gen, span, name=path.stem)
    return compress_time(scale_rate(arrivals, rate_scale), time_compression)


_ZONED = re.compile(
    r"^(?P<local>.*\d{2}:\d{2}(?::\d{2}(?:\.\d*)?)?)\s*"
    r"(?:[Zz]|(?P<sign>[+-])(?P<hours>[01]\d|2[0-3])(?::?(?P<minutes>[0-5]\d))?)$"
)
"""A date and time with a UTC offset after its time of day: Z, +HH, +HHMM or +HH:MM (the
Azure traces of 2024 write +00:00)."""


def _timestamps(path: Path, stamps: list[str], lines: list[int]) -> np.ndarray:
    """The TIMESTAMP column as UTC datetime64[ns]: dates and times, each with or without a UTC
    offset (one without is taken as UTC). ValueError naming the first line whose time is not
    one."""
    ts = _datetimes(stamps)  # times without an offset, as the 2023 traces write them: at once
    if ts is not None:
        return ts
    local = list(stamps)
    offsets_s = np.zeros(len(stamps), dtype=np.int64)
    for n, stamp in enumerate(stamps):
        zoned = _ZONED.match(stamp)
        if zoned:
            local[n] = zoned["local"]
            if zoned["sign"]:
                offset_s = int(zoned["hours"]) * 3600 + int(zoned["minutes"] or 0) * 60
                offsets_s[n] = offset_s if zoned["sign"] == "+" else -offset_s
    ts = _datetimes(local)
    if ts is not None:
        return ts - offsets_s.astype("timedelta64[s]")
    for stamp, time_of_day, line in zip(stamps, local, lines, strict=True):
        if _datetimes([time_of_day]) is None:
            raise ValueError(
                f"trace {path}, line {line}: TIMESTAMP {stamp[:40]!r} is not a date and time "
                "in the years 1678-2261 (such as 2023-11-16 18:15:46.68, or 2024-05-10 "
                "00:00:00.009930+00:00)"
            )
    raise ValueError(f"trace {path}: cannot read its TIMESTAMP column")


def _datetimes(texts: list[str]) -> np.ndarray | None:
    """`texts` as datetime64[ns], or None when any is not a date and time without an offset
    (numpy reads an empty field or "NaT" as not-a-time, and an offset only with a warning) or
    lies outside the years datetime64[ns] holds (1678-2261)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            ts = np.array(texts, dtype="datetime64[ns]")
            # numpy wraps a time past the range of nanoseconds silently; microseconds reach
            # far enough to tell.
            wide = np.array(texts, dtype="datetime64[us]")
        except (ValueError, UserWarning, DeprecationWarning):
            return None
    if np.isnat(ts).any() or (ts.astype("datetime64[us]") != wide).any():
        return None
    return ts


# ---------------------------------------------------------------------------------------------
# Transformations


def scale_rate(arrivals: Arrivals, rate_scale: float) -> Arrivals:
    """Thin (rate_scale < 1) or replicate (> 1) requests, deterministically.

    Request i is kept floor((i+1)·k) − floor(i·k) times, so the count is exact and evenly
    spread; the copies of a request are spaced evenly up to the next arrival.
    """
    if not (math.isfinite(rate_scale) and rate_scale > 0):
        raise ValueError(f"rate_scale must be a positive number, got {rate_scale!r}")
    if rate_scale == 1.0 or len(arrivals) == 0:
        return arrivals
    n = len(arrivals)
    idx = np.arange(n + 1, dtype=np.float64)
    copies = np.diff(np.floor(idx * rate_scale + 1e-9)).astype(np.int64)
    t = arrivals.time_s
    nxt = np.append(t[1:], arrivals.duration_s)
    gap = np.maximum(nxt - t, 0.0)
    src = np.repeat(np.arange(n), copies)
    first = np.cumsum(copies) - copies
    k = np.arange(src.size) - np.repeat(first, copies)
    times = t[src] + gap[src] * k / np.repeat(np.maximum(copies, 1), copies)
    order = np.argsort(times, kind="stable")
    return Arrivals(
        times[order],
        arrivals.prompt_tokens[src][order],
        arrivals.gen_tokens[src][order],
        arrivals.duration_s,
        arrivals.name,
    )


def compress_time(arrivals: Arrivals, time_compression: float) -> Arrivals:
    """Divide every arrival time (and the span) by time_compression."""
    if not (math.isfinite(time_compression) and time_compression > 0):
        raise ValueError(f"time_compression must be a positive number, got {time_compression!r}")
    if time_compression == 1.0:
        return arrivals
    return Arrivals(
        arrivals.time_s / time_compression,
        arrivals.prompt_tokens,
        arrivals.gen_tokens,
        arrivals.duration_s / time_compression,
        arrivals.name,
    )


def tile(arrivals: Arrivals, duration_s: float) -> Arrivals:
    """The stream cut to duration_s, repeated end to end first if it is shorter."""
    if not (math.isfinite(duration_s) and duration_s > 0):
        raise ValueError(f"duration_s must be a positive number, got {duration_s!r}")
    span = arrivals.duration_s
    if span <= 0 or len(arrivals) == 0:
        return Arrivals(
            arrivals.time_s[:0],
            arrivals.prompt_tokens[:0],
            arrivals.gen_tokens[:0],
            duration_s,
            arrivals.name,
        )
    reps = max(math.ceil(duration_s / span), 1)
    times = np.concatenate([arrivals.time_s + r * span for r in range(reps)])
    keep = times < duration_s
    return Arrivals(
        times[keep],
        np.tile(arrivals.prompt_tokens, reps)[keep],
        np.tile(arrivals.gen_tokens, reps)[keep],
        duration_s,
        arrivals.name,
    )


# ---------------------------------------------------------------------------------------------
# Synthetic patterns


def _rate_shape(pattern: str, t: np.ndarray, duration_s: float, period_s: float) -> np.ndarray:
    """Relative rate λ(t)/λ_mean of a pattern (mean 1 over a whole period)."""
    if pattern == "constant":
        return np.ones_like(t)
    if pattern == "diurnal":
        # Trough at the start, peak half a period later; peak/trough = 4.
        return 1.0 + 0.6 * np.sin(2.0 * np.pi * t / period_s - 0.5 * np.pi)
    if pattern == "step":
        third = duration_s / 3.0
        high = (t >= third) & (t < 2.0 * third)
        return np.where(high, 1.0, 0.4) / 0.6
    if pattern == "burst":
        # A 60-s burst at 3x the base rate every 10 minutes.
        in_burst = np.mod(t, 600.0) >= 540.0
        return np.where(in_burst, 3.0, 1.0) / 1.2
    raise ValueError(f"unknown load pattern {pattern!r}; known: {', '.join(SYNTHETIC_PATTERNS)}")


def synthetic(
    pattern: str,
    *,
    duration_s: float = 3600.0,
    mean_rate_per_s: float = AZURE_CONV_RATE_PER_S,
    seed: int = 0,
    period_s: float | None = None,
) -> Arrivals:
    """Poisson arrivals whose rate follows `pattern` (diurnal, step, burst, constant).

    Lengths are log-normal fitted to the Azure conversation trace. The diurnal period defaults
    to the whole duration (one day compressed into the run).
    """
    if not (math.isfinite(duration_s) and duration_s > 0):
        raise ValueError(f"duration_s must be a positive number, got {duration_s!r}")
    if not (math.isfinite(mean_rate_per_s) and mean_rate_per_s > 0):
        raise ValueError(f"mean_rate_per_s must be a positive number, got {mean_rate_per_s!r}")
    period = duration_s if period_s is None else period_s
    rng = np.random.default_rng(seed)
    peak = 3.0 * mean_rate_per_s  # above every pattern's maximum relative rate (2.5)
    n = rng.poisson(peak * duration_s)
    t = np.sort(rng.uniform(0.0, duration_s, n))
    accept = rng.uniform(0.0, peak, n) < mean_rate_per_s * _rate_shape(
        pattern, t, duration_s, period
    )
    t = t[accept]
    prompt = np.clip(
        np.rint(PROMPT_MEDIAN_TOKENS * np.exp(PROMPT_SIGMA_LN * rng.standard_normal(t.size))),
        *PROMPT_RANGE_TOKENS,
    ).astype(np.int64)
    gen = np.clip(
        np.rint(GEN_MEDIAN_TOKENS * np.exp(GEN_SIGMA_LN * rng.standard_normal(t.size))),
        *GEN_RANGE_TOKENS,
    ).astype(np.int64)
    return Arrivals(t, prompt, gen, duration_s, name=pattern)


# ---------------------------------------------------------------------------------------------
# Resolving a configured trace


def _repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def find_trace_file(file_name: str = AZURE_CONV_FILE) -> Path | None:
    """$POWERD_TRACE_DIR/<file>, else <repo>/../shared/traces/<file> or <repo>/shared/traces."""
    candidates = []
    env = os.environ.get(TRACE_DIR_ENV)
    if env:
        candidates.append(Path(env) / file_name)
    root = _repo_root()
    candidates += [
        root.parent / "shared" / "traces" / file_name,
        root / "shared" / "traces" / file_name,
    ]
    for path in candidates:
        if path.is_file():
            return path
    return None


def _where_looked() -> str:
    """For a trace file not found: where $POWERD_TRACE_DIR pointed, or that it is unset."""
    env = os.environ.get(TRACE_DIR_ENV)
    if env:
        return f"not in {TRACE_DIR_ENV}={env}"
    return f"set {TRACE_DIR_ENV} to the folder that holds it"


def trace_label(name_or_path: str) -> str:
    """What resolve_trace replays for this name, to label results with: the name, or for
    "azure-conv" without its file the pattern that stands in for it, saying so."""
    name = name_or_path.strip()
    if name in AZURE_CONV_NAMES and find_trace_file() is None:
        return f"diurnal (no {AZURE_CONV_FILE}; set {TRACE_DIR_ENV})"
    return name


def resolve_trace(
    name_or_path: str,
    *,
    time_compression: float = 1.0,
    rate_scale: float = 1.0,
    duration_s: float | None = None,
    seed: int = 0,
) -> Arrivals:
    """The stream a config names: "azure-conv", a synthetic pattern, or a trace file path.

    "azure-conv" is looked up with find_trace_file; without the file it falls back to "diurnal"
    (logged). Synthetic patterns span duration_s·time_compression of trace time before
    compression (default one hour). With duration_s the result is cut or repeated to it.
    """
    name = name_or_path.strip()
    if name in AZURE_CONV_NAMES:
        path = find_trace_file()
        if path is None:
            log.warning(
                "trace %s not found (%s); using the diurnal pattern instead",
                AZURE_CONV_FILE,
                _where_looked(),
            )
            name = "diurnal"
        else:
            name = str(path)
    if name in SYNTHETIC_PATTERNS:
        span = 3600.0 if duration_s is None else duration_s * time_compression
        arrivals = synthetic(name, duration_s=span, seed=seed)
        arrivals = compress_time(scale_rate(arrivals, rate_scale), time_compression)
    else:
        path = Path(name)
        if not path.is_file():
            raise ValueError(
                f"trace {name_or_path!r} is neither a file nor one of {', '.join(TRACE_NAMES)}"
            )
        arrivals = load_azure_trace(path, rate_scale=rate_scale, time_compression=time_compression)
    if duration_s is not None:
        arrivals = tile(arrivals, duration_s)
    return arrivals


# ---------------------------------------------------------------------------------------------
# Splitting and sizing


def split_arrivals(
    arrivals: Arrivals,
    n_servers: int,
    policy: str = "round_robin",
    *,
    work_s: np.ndarray | None = None,
) -> list[Arrivals]:
    """One stream per server. round_robin deals requests in turn; least_loaded gives each to
    the server with the least backlog of work (work_s per request, server-seconds; default
    prompt + generated tokens), the backlog draining at one second per second."""
    if n_servers < 1:
        raise ValueError(f"n_servers must be at least 1, got {n_servers}")
    n = len(arrivals)
    if policy == "round_robin":
        owner = np.arange(n) % n_servers
    elif policy == "least_loaded":
        w = (
            (arrivals.prompt_tokens + arrivals.gen_tokens).astype(np.float64)
            if work_s is None
            else np.asarray(work_s, dtype=np.float64)
        )
        if w.shape != (n,):
            raise ValueError(f"work_s must have one entry per request ({n})")
        owner = np.empty(n, dtype=np.int64)
        backlog = np.zeros(n_servers)
        last_t = 0.0
        for i in range(n):
            t = arrivals.time_s[i]
            backlog = np.maximum(backlog - (t - last_t), 0.0)
            last_t = t
            s = int(np.argmin(backlog))
            owner[i] = s
            backlog[s] += w[i]
    else:
        raise ValueError(f"policy must be 'round_robin' or 'least_loaded', got {policy!r}")
    return [
        Arrivals(
            arrivals.time_s[owner == s],
            arrivals.prompt_tokens[owner == s],
            arrivals.gen_tokens[owner == s],
            arrivals.duration_s,
            f"{arrivals.name}[{s}]",
        )
        for s in range(n_servers)
    ]


@dataclass(frozen=True, slots=True)
class ServiceCosts:
    """Server-seconds per token at f_max when the server is saturated."""

    prefill_s_per_token: float
    decode_s_per_token: float
    saturated_batch: int

    def work_s(self, prompt_tokens: np.ndarray, gen_tokens: np.ndarray) -> np.ndarray:
        return prompt_tokens * self.prefill_s_per_token + gen_tokens * self.decode_s_per_token


def service_costs(
    profile: GpuSpec,
    model: ModelProfile,
    tp: int,
    *,
    prompt_tokens_mean: float = PROMPT_MEDIAN_TOKENS,
    gen_tokens_mean: float = GEN_MEDIAN_TOKENS,
    cfg: np.ndarray | None = None,
) -> ServiceCosts:
    """Roofline costs at f_max: a 2048-token prefill chunk half-way into its prompt, and a
    decode batch as large as max_batch and the KV cache allow at the mean sequence length."""
    c = build_config(profile, model, tp) if cfg is None else cfg
    f_max = float(c[C_F_MAX_MHZ])
    chunk = 2048.0
    t_pf = float(gpu_time_s(c, chunk, chunk, chunk * chunk / 2.0, f_max))
    t_pf += float(comm_time_s(c, chunk)) + c[C_T_CPU_S] + c[C_T_CPU_FRAC] * t_pf
    ctx = prompt_tokens_mean + 0.5 * gen_tokens_mean
    batch = int(
        max(1, min(c[C_MAX_BATCH], c[C_KV_CAP_TOKENS] / (prompt_tokens_mean + gen_tokens_mean)))
    )
    t_dec = float(gpu_time_s(c, batch, batch * ctx, batch * ctx, f_max))
    t_dec += float(comm_time_s(c, batch)) + c[C_T_CPU_S] + c[C_T_CPU_FRAC] * t_dec
    return ServiceCosts(t_pf / chunk, t_dec / batch, batch)


def capacity_tokens_per_s(
    profile: GpuSpec,
    model: ModelProfile,
    tp: int,
    n_servers: int,
    *,
    prompt_tokens_mean: float = PROMPT_MEDIAN_TOKENS,
    gen_tokens_mean: float = GEN_MEDIAN_TOKENS,
) -> float:
    """Generated tokens/s the uncontrolled node (f_max) sustains on this request mix."""
    costs = service_costs(
        profile, model, tp, prompt_tokens_mean=prompt_tokens_mean, gen_tokens_mean=gen_tokens_mean
    )
    per_request_s = (
        prompt_tokens_mean * costs.prefill_s_per_token + gen_tokens_mean * costs.decode_s_per_token
    )
    return n_servers * gen_tokens_mean / per_request_s


def window_loads(
    arrivals: Arrivals, costs: ServiceCosts, n_servers: int, window_s: float = 60.0
) -> np.ndarray:
    """Offered load per window: the work arriving in it over the node's server-seconds."""
    if len(arrivals) == 0:
        return np.zeros(1)
    n_win = max(math.ceil(arrivals.duration_s / window_s), 1)
    bins = np.minimum((arrivals.time_s / window_s).astype(np.int64), n_win - 1)
    work = costs.work_s(arrivals.prompt_tokens, arrivals.gen_tokens)
    return np.bincount(bins, weights=work, minlength=n_win) / (window_s * n_servers)


def scale_for_peak_load(
    arrivals: Arrivals,
    peak_load: float,
    *,
    profile: GpuSpec,
    model: ModelProfile,
    tp: int,
    n_servers: int,
    window_s: float = 60.0,
) -> Arrivals:
    """Rescale the rate so the busiest window offers `peak_load` of the node's capacity.

    Capacity is the roofline's at f_max (service_costs); windows are window_s long, or a tenth
    of the stream when it is shorter than ten windows.
    """
    if not (math.isfinite(peak_load) and peak_load > 0):
        raise ValueError(f"peak_load must be a positive number, got {peak_load!r}")
    if len(arrivals) == 0:
        return arrivals
    costs = service_costs(
        profile,
        model,
        tp,
        prompt_tokens_mean=float(arrivals.prompt_tokens.mean()),
        gen_tokens_mean=float(arrivals.gen_tokens.mean()),
    )
    window = min(window_s, arrivals.duration_s / 10.0) if arrivals.duration_s > 0 else window_s
    peak = float(window_loads(arrivals, costs, n_servers, max(window, 1e-3)).max())
    if peak <= 0:
        return arrivals
    return scale_rate(arrivals, peak_load / peak)
