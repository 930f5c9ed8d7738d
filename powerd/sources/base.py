"""The shared machinery of every source: fetch, parse, extract, compare with the last scrape.

A kind (vllm.py, sglang.py, ...) only says which samples it reads and how they map onto a
`Reading`: cumulative counters per series, gauges, histograms per series, restart markers. This
module turns two consecutive Readings into a ServerSample: per-series counter deltas over the
caller's clock (the times the answers came, on it; never wall time), histogram-bucket deltas for
quantiles, Δsum/Δcount for means, and reset detection (a counter going down, a changed restart
marker).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal, Protocol

from powerd.config import ServerConfig
from powerd.model import BLIND_PREFILL_SHARE, ServerSample
from powerd.sources.exposition import (
    ExpositionError,
    LabelInfo,
    Samples,
    SeriesKey,
    Wanted,
    ends_mid_line,
    parse_exposition,
)

MAX_BODY_BYTES = 8 * 1024 * 1024
DEFAULT_MAX_WINDOW_S = 60.0
"""Rates over a longer gap than this are not reported; the scrape becomes the new baseline."""
PROMPT_MIX_HALF_LIFE_S = 300.0
"""The prompt-length mix is read over the last minutes of finished requests."""
PROMPT_MIX_MIN_REQUESTS = 20.0
STALE_REPORT_S = 5.0
"""How long an engine report (Reading.report) and every counter must stand still, once the
requests the report counted have ended, before the server is read as idle. SGLang publishes its
scheduler gauges every 40 decode steps (seconds apart on a slow model) and, in many builds, not
again once idle (sglang#26495: num_running_reqs held at 24 for 30 s; builds without an idle
report hold it for good): a few seconds lets a report that is due arrive, and still sees an
idle server as idle within a few ticks."""
ROUNDING_MARGIN = 10.0
"""A flushed counter with rounding is rated once it moved this many times the rounding of both
ends of the window, so rounding is at most a tenth of the rate."""


class SourceError(Exception):
    """A server could not be read or understood; str() is one sentence for the operator."""


@dataclass(frozen=True, slots=True)
class FetchResponse:
    status: int
    body: bytes
    headers: Mapping[str, str] = field(default_factory=dict)
    close_delimited: bool = False
    """True when only the server's closing the connection ended the body (neither a
    Content-Length nor chunked encoding): HTTP cannot tell a cut body from a whole one, so the
    body's format has to (a metrics body must not stop inside a line)."""


Fetcher = Callable[[str, float], FetchResponse]
"""(url, timeout_s) -> response; raises SourceError or OSError when there is no response."""


def close_fetcher(fetch: Fetcher) -> None:
    """Close the fetcher's kept connection, if it keeps one (the next read opens another)."""
    close = getattr(fetch, "close", None)
    if callable(close):
        close()


def header(headers: Mapping[str, str], name: str) -> str | None:
    """A header value by case-insensitive name."""
    value = headers.get(name)
    if value is not None:
        return value
    lowered = name.lower()
    for key, value in headers.items():
        if key.lower() == lowered:
            return value
    return None


@dataclass(slots=True)
class Hist:
    """One histogram series: cumulative bucket counts by upper bound, count and sum."""

    count: float = 0.0
    sum: float = 0.0
    buckets: dict[float, float] = field(default_factory=dict)


GenMode = Literal["counter", "gauge", "iterations", "admissions"]


@dataclass(slots=True)
class Reading:
    """What one scrape says, before it is compared with the previous one.

    counters: logical name ("generation", "prompt", "finished", "iterations", "admitted") ->
    series -> value.
    A name that is present (even with no series) is read by the kind; a series missing from the
    previous scrape counts from 0, as servers create series lazily (TGI).
    gauges: "running", "waiting", "generation_rate" / "prompt_rate" (tokens/s gauges).
    per_iteration: "generation" / "prompt" -> series -> tokens per engine iteration, keyed like
    counters["iterations"] (Triton TRT-LLM).
    hists: "ttft", "itl" -> series -> Hist, in seconds; "prompt_len" -> series -> Hist of
    finished requests' prompt lengths in tokens.
    markers: values whose change means the server restarted; a dict marker is compared per key
    (per-series `_created` timestamps), so a series that appears is not a restart.
    clamped: counters whose small decreases are rounding, not restarts (llama.cpp products).
    flushed: counters whose every change is not worth a rate: SGLang adds realtime_tokens in
    batches every few engine steps, llama.cpp prints values rounded (see rounding). Their rate
    is taken over the time since the baseline was last taken, once they moved measurably; it is
    unknown (None) until then while requests run and 0 when none run (a new baseline). A counter
    with rounding that has not moved measurably within the source's max_window_s also gets a new
    baseline.
    rounding: flushed counter -> the most its total can be off through the server's printing
    (0 when it prints exactly); a change is measurable once it is ROUNDING_MARGIN times the
    rounding of both ends.
    request_copies: a label whose values may each count the same requests in hists["ttft"] and
    counters["finished"] (Triton's models: an ensemble or BLS front and its tensorrt_llm model).
    A window reads those two figures from one value at both of its ends: the one with the most
    first tokens in the window, then the most finished requests, then the lowest.
    report: the gauges a server publishes together from its engine loop, every few steps and not
    necessarily once idle (SGLang's scheduler: running, waiting, token usage, gen_throughput);
    None where gauges are read live. A report that stayed bit-identical while at least its
    `running` requests finished is stale once no counter has moved for STALE_REPORT_S: nothing
    runs or waits, generation reads 0, and so do the gauges named in report_gauges.
    report_gauges: the keys of `gauges` whose values come from `report` ("running", "waiting",
    "kv_usage"): a stale report's figures, so a sample reads them as an idle server's, 0.
    prompt_per_chunk: prompt tokens are counted as each chunk is prefilled; otherwise a whole
    prompt lands at once, when its first token comes (vLLM V1) or when the request ends.
    prompt_mode "admissions": the server counts the requests it admits to prefill
    (counters["admitted"]) but their prompt tokens only when each ends (counters["prompt"]); the
    prompt rate is the admissions times the mean prompt of the recent prompt-length mix, and
    the request-end count until that mix is known or where admissions are not counted (TGI).
    """

    realtime: bool
    gen_mode: GenMode = "counter"
    prompt_mode: GenMode = "counter"
    prompt_per_chunk: bool = False
    counters: dict[str, dict[SeriesKey, float]] = field(default_factory=dict)
    gauges: dict[str, float] = field(default_factory=dict)
    per_iteration: dict[str, dict[SeriesKey, float]] = field(default_factory=dict)
    hists: dict[str, dict[SeriesKey, Hist]] = field(default_factory=dict)
    markers: dict[str, object] = field(default_factory=dict)
    clamped: frozenset[str] = frozenset()
    flushed: frozenset[str] = frozenset()
    rounding: dict[str, float] = field(default_factory=dict)
    request_copies: str | None = None
    report: tuple[float | None, ...] | None = None
    report_gauges: frozenset[str] = frozenset()
    model_names: tuple[str, ...] = ()
    generation_tokens_total: float | None = None


class Extractor(Protocol):
    """One server family: the samples it reads and how they become a Reading."""

    kind: str
    wanted: Wanted

    def extract(self, samples: Samples, headers: Mapping[str, str]) -> Reading:
        """Raises SourceError when the body lacks the family's metrics."""
        ...


# ---------------------------------------------------------------------------------------------
# Helpers for extractors


def _drop(key: SeriesKey, names: frozenset[str]) -> SeriesKey:
    return tuple(item for item in key if item[0] not in names)


def _dropper(names: frozenset[str]) -> Callable[[SeriesKey], SeriesKey]:
    """_drop(key, names), worked out once per distinct key: a histogram's bucket rows share
    their series' key, and one read looks at a few keys over many rows."""
    done: dict[SeriesKey, SeriesKey] = {}

    def drop(key: SeriesKey) -> SeriesKey:
        short = done.get(key)
        if short is None:
            short = done[key] = _drop(key, names)
        return short

    return drop


def _matches(labels: Mapping[str, str], select: Mapping[str, str] | None) -> bool:
    if not select:
        return True
    return all(labels.get(k) == v for k, v in select.items())


def series_values(
    samples: Samples,
    name: str,
    *,
    mirrors: frozenset[str] = frozenset(),
    select: Mapping[str, str] | None = None,
    drop: frozenset[str] = frozenset(),
) -> dict[SeriesKey, float] | None:
    """Values of one sample name per series (None when the name is absent).

    Labels in `mirrors` (e.g. SGLang's tp_rank) name copies of one value: they are removed from
    the key and the copies collapse to their maximum. Labels in `drop` are removed from the key
    after `select` filtered on them. NaN values are skipped.
    """
    rows = samples.get(name)
    if rows is None:
        return None
    removed = mirrors | drop
    shorten = _dropper(removed) if removed else None
    out: dict[SeriesKey, float] = {}
    for (labels, key, _le), value in rows:
        if value != value or (select and not _matches(labels, select)):
            continue
        if shorten is not None:
            key = shorten(key)
        old = out.get(key)
        out[key] = value if old is None or value > old else old
    return out


def gauge_total(
    samples: Samples,
    name: str,
    *,
    mirrors: frozenset[str] = frozenset(),
    select: Mapping[str, str] | None = None,
) -> float | None:
    """Sum over series of a gauge, mirrors collapsed; None when absent."""
    values = series_values(samples, name, mirrors=mirrors, select=select)
    if values is None:
        return None
    return float(sum(values.values()))


def histogram(
    samples: Samples,
    base: str,
    *,
    mirrors: frozenset[str] = frozenset(),
    select: Mapping[str, str] | None = None,
    scale: float = 1.0,
) -> dict[SeriesKey, Hist] | None:
    """The `base_bucket/_sum/_count` series of a histogram; None when it has no buckets.

    `scale` converts units (0.001 for a histogram in milliseconds).
    """
    rows = samples.get(base + "_bucket")
    if rows is None:
        return None
    shorten = _dropper(mirrors) if mirrors else None
    out: dict[SeriesKey, Hist] = {}
    for (labels, key, le), value in rows:
        if le != le or value != value or (select and not _matches(labels, select)):
            continue
        if shorten is not None:
            key = shorten(key)
        hist = out.get(key)
        if hist is None:
            hist = out[key] = Hist()
        bound = le * scale
        old = hist.buckets.get(bound)
        hist.buckets[bound] = value if old is None or value > old else old
    for suffix in ("_sum", "_count"):
        values = series_values(samples, base + suffix, mirrors=mirrors, select=select)
        if not values:
            continue
        for key, value in values.items():
            hist = out.get(key)
            if hist is None:
                continue
            if suffix == "_sum":
                hist.sum = value * scale
            else:
                hist.count = value
    for hist in out.values():
        if not hist.count and hist.buckets:
            hist.count = max(hist.buckets.values())
    return out


def label_values(samples: Samples, names: Iterable[str], labels: Iterable[str]) -> tuple[str, ...]:
    """Distinct values of the first present label of `labels`, across the samples of `names`."""
    found: dict[str, None] = {}
    label_list = tuple(labels)
    for name in names:
        for (lab, _key, _le), _value in samples.get(name, ()):
            for label in label_list:
                value = lab.get(label)
                if value:
                    found[value] = None
                    break
    return tuple(sorted(found))


def first_present(samples: Samples, *names: str) -> str | None:
    for name in names:
        if name in samples:
            return name
    return None


def first_histogram(
    samples: Samples, *bases: str, mirrors: frozenset[str] = frozenset()
) -> dict[SeriesKey, Hist] | None:
    """The histogram of the first of `bases` that has `_bucket` series; None when none has."""
    name = first_present(samples, *(base + "_bucket" for base in bases))
    if name is None:
        return None
    return histogram(samples, name[: -len("_bucket")], mirrors=mirrors)


def gauge_max(samples: Samples, *names: str, mirrors: frozenset[str] = frozenset()) -> float | None:
    """The largest value over series of the first of names present (a per-engine fraction such
    as KV-cache usage: the fullest engine is the one that runs out); None when none is."""
    for name in names:
        values = series_values(samples, name, mirrors=mirrors)
        if values:
            return float(max(values.values()))
    return None


def total(values: Mapping[SeriesKey, float] | None) -> float | None:
    return None if values is None else float(sum(values.values()))


# ---------------------------------------------------------------------------------------------
# Windows


def _monotone(buckets: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """(upper bound, cumulative count) pairs sorted by bound, each count at least the one below
    (a scrape can catch a bucket before the one under it has caught up)."""
    running = 0.0
    fixed = []
    for bound, count in sorted(buckets):
        running = max(running, count)
        fixed.append((bound, running))
    return fixed


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus's histogram_quantile over (upper bound, cumulative count) pairs.

    Linear interpolation inside the bucket holding the rank; the lowest bucket starts at 0; a
    rank in the +Inf bucket returns the highest finite bound. None without observations.
    """
    fixed = _monotone(buckets)
    if not fixed or not math.isinf(fixed[-1][0]):
        return None
    if len(fixed) < 2:
        return None
    observations = fixed[-1][1]
    if observations <= 0:
        return None
    rank = q * observations
    b = next(i for i, (_bound, count) in enumerate(fixed) if count >= rank)
    if b == len(fixed) - 1:
        return fixed[-2][0]
    if b == 0 and fixed[0][0] <= 0:
        return fixed[0][0]
    start, end, count = 0.0, fixed[b][0], fixed[b][1]
    if b > 0:
        start = fixed[b - 1][0]
        count -= fixed[b - 1][1]
        rank -= fixed[b - 1][1]
    if count <= 0:
        return end
    return start + (end - start) * (rank / count)


class _Reset(Exception):
    """The server restarted between two scrapes."""


def _counter_delta(
    prev: Mapping[SeriesKey, float] | None, cur: Mapping[SeriesKey, float], clamp: bool
) -> float:
    delta = 0.0
    for key, value in cur.items():
        before = 0.0 if prev is None else prev.get(key, 0.0)
        if value < before:
            if clamp:
                continue
            raise _Reset
        delta += value - before
    return delta


def _bucket_counts(buckets: list[tuple[float, float]]) -> list[tuple[float, float, float]]:
    """(lower bound, upper bound, observations) of each non-empty bucket, lowest first, from
    (upper bound, cumulative count) pairs; the lowest bucket starts at 0."""
    counts = []
    lower = cumulative = 0.0
    for bound, count in _monotone(buckets):
        if count > cumulative:
            counts.append((lower, bound, count - cumulative))
        lower, cumulative = bound, count
    return counts


def _top_mean(total_sum: float, counts: list[tuple[float, float, float]]) -> float:
    """The mean of the highest bucket's observations: the sum less every lower observation at
    its bucket's midpoint, shared among them and clamped to the bucket's bounds."""
    low, high, n_top = counts[-1]
    below = sum(n * (lo + hi) / 2 for lo, hi, n in counts[:-1])
    estimate = max((total_sum - below) / n_top, low)
    return estimate if math.isinf(high) else min(estimate, high)


def slowest_bucket_mean(total_sum: float, buckets: list[tuple[float, float]]) -> float | None:
    """The mean of the observations in the highest non-empty bucket of a histogram window.

    buckets are (upper bound, cumulative count) pairs ending at +Inf. The window's sum less
    every lower observation at its bucket's midpoint (the lowest bucket starts at 0), shared
    among the top bucket's observations and clamped to its bounds. Where histogram_quantile
    reads a lone slow request anywhere in a wide bucket (vLLM's TTFT buckets run 1 s to 2.5 s)
    as near the bucket's top, the sum places it. None without observations.
    """
    counts = _bucket_counts(buckets)
    return _top_mean(total_sum, counts) if counts else None


def token_weighted_mean(total_sum: float, buckets: list[tuple[float, float]]) -> float | None:
    """E[P^2] / E[P] of a histogram of sizes P: the mean size of the item a unit belongs to.

    For prompt lengths it sets how long a new request waits behind prefill in a first-come
    queue (twice the mean residual work in the Pollaczek-Khinchine formula), and a long tail
    raises it far above the mean. Inside a bucket sizes are taken as uniform, scaled so the
    first moment matches the histogram's sum; the +Inf bucket is placed by the sum as in
    slowest_bucket_mean. None without observations.
    """
    counts = _bucket_counts(buckets)
    if not counts or total_sum <= 0.0:
        return None
    first = second = 0.0
    for lo, hi, n in counts:
        if math.isinf(hi):
            mean = _top_mean(total_sum, counts)
            first += n * mean
            second += n * mean * mean
        else:
            first += n * (lo + hi) / 2.0
            second += n * (lo * lo + lo * hi + hi * hi) / 3.0
    # Uniform placement inside a wide bucket is off by up to its width: rescale to the sum.
    scale = min(max(total_sum / first, 0.5), 2.0)
    return second * scale * scale / total_sum


@dataclass(slots=True)
class DecayingHistogram:
    """Cumulative bucket counts and sum of recent observations, each weighing half as much
    every half_life_s."""

    half_life_s: float
    count: float = 0.0
    sum: float = 0.0
    buckets: dict[float, float] = field(default_factory=dict)

    def add(
        self, dt_s: float, count: float, total_sum: float, buckets: Mapping[float, float]
    ) -> None:
        values = (count, total_sum, *buckets.values())
        if not all(math.isfinite(v) and v >= 0.0 for v in values):
            return  # a garbage window must not poison the mix for good
        keep = 0.5 ** (max(dt_s, 0.0) / self.half_life_s)
        self.count = self.count * keep + count
        self.sum = self.sum * keep + total_sum
        for bound in set(self.buckets) | set(buckets):
            self.buckets[bound] = self.buckets.get(bound, 0.0) * keep + buckets.get(bound, 0.0)


def _hist_delta(
    prev: Mapping[SeriesKey, Hist] | None, cur: Mapping[SeriesKey, Hist]
) -> tuple[float, float, dict[float, float]]:
    count = total_sum = 0.0
    buckets: dict[float, float] = {}
    for key, hist in cur.items():
        before = None if prev is None else prev.get(key)
        if before is not None and hist.count < before.count:
            raise _Reset
        count += hist.count - (before.count if before else 0.0)
        total_sum += hist.sum - (before.sum if before else 0.0)
        for bound, value in hist.buckets.items():
            d = value - (before.buckets.get(bound, 0.0) if before else 0.0)
            if d < 0:
                raise _Reset
            buckets[bound] = buckets.get(bound, 0.0) + d
    return count, total_sum, buckets


def _per_iteration_tokens(prev: Reading, cur: Reading, name: str) -> float | None:
    iterations = cur.counters.get("iterations")
    per_now = cur.per_iteration.get(name)
    if iterations is None or per_now is None:
        return None
    iter_before = prev.counters.get("iterations", {})
    per_before = prev.per_iteration.get(name, {})
    tokens = 0.0
    for key, value in iterations.items():
        before = iter_before.get(key)
        if before is None:
            if "iterations" not in prev.counters:
                continue
            before = 0.0  # a series created since the last scrape counts from zero
        if value < before:
            raise _Reset
        now_tokens = per_now.get(key, 0.0)
        # The gauge is a snapshot at each scrape; the mean of both ends tracks ramps better.
        tokens += (value - before) * 0.5 * (now_tokens + per_before.get(key, now_tokens))
    return tokens


def _one_copy(prev: Reading, cur: Reading, label: str) -> tuple[Reading, Reading]:
    """Both readings with hists["ttft"] and counters["finished"] cut to one value of `label`
    (Reading.request_copies), chosen by what it counted between them."""

    def only(series: Mapping[SeriesKey, Any] | None, value: str) -> dict[SeriesKey, Any]:
        return {k: v for k, v in (series or {}).items() if dict(k).get(label, "") == value}

    def rank(value: str) -> tuple[float, float, str]:
        try:
            first_tokens = finished = 0.0
            if "ttft" in cur.hists:
                first_tokens = _hist_delta(
                    only(prev.hists.get("ttft"), value), only(cur.hists["ttft"], value)
                )[0]
            if "finished" in cur.counters:
                finished = _counter_delta(
                    only(prev.counters.get("finished"), value),
                    only(cur.counters["finished"], value),
                    clamp=False,
                )
        except _Reset:
            return (math.inf, math.inf, value)  # this copy restarted: read another
        return (-first_tokens, -finished, value)

    found = {
        dict(key).get(label, "")
        for series in (cur.hists.get("ttft", {}), cur.counters.get("finished", {}))
        for key in series
    }
    if not found:
        return prev, cur
    value = min(found, key=rank)

    def cut(reading: Reading) -> Reading:
        hists, counters = dict(reading.hists), dict(reading.counters)
        if "ttft" in hists:
            hists["ttft"] = only(hists["ttft"], value)
        if "finished" in counters:
            counters["finished"] = only(counters["finished"], value)
        return replace(reading, hists=hists, counters=counters)

    return cut(prev), cut(cur)


def _finite(value: float | None) -> float | None:
    """None for NaN and infinities: a broken exporter must not feed them to the controller."""
    return value if value is not None and math.isfinite(value) else None


def _share(value: float | None) -> float | None:
    """A 0-1 share, or None for anything else: a usage of 40 is a percent or garbage, and read
    as a share it would hold the clocks at their maximum."""
    value = _finite(value)
    return value if value is not None and 0.0 <= value <= 1.0 else None


@dataclass(frozen=True, slots=True)
class Window:
    """Rates and latency figures between two Readings."""

    span_s: float
    """Seconds between the two answers: what the window's counts (finished_requests,
    preemptions, prefill_busy_s) are over."""
    generation_tokens_per_s: float | None
    prompt_tokens_per_s: float | None
    finished_requests: float | None
    ttft_q_s: float | None
    itl_q_s: float | None
    ttft_mean_s: float | None
    itl_mean_s: float | None
    ttft_slowest_s: float | None = None
    preemptions: float | None = None
    prompt_len: tuple[float, float, dict[float, float]] | None = None
    """Finished requests' prompt lengths over the window: count, sum, cumulative buckets."""
    admitted_per_s: float | None = None
    """Requests admitted to prefill per second (prompt_mode "admissions")."""
    prefill_busy_s: float | None = None
    """Seconds of prefill forward passes over the window, where the server times them."""


RESTARTED = (
    "the server restarted between the two scrapes (its start marker changed or a counter went "
    "down): probe again"
)


def _no_window_reason(prev: Reading, cur: Reading) -> str:
    """Why compare(prev, cur) gives no window, in words, for when it gives none."""
    if prev.gen_mode != cur.gen_mode or prev.prompt_mode != cur.prompt_mode:
        return "the server changed which token figures it exports between the two scrapes"
    return RESTARTED


def compare(prev: Reading, cur: Reading, dt_s: float, quantile: float) -> Window | None:
    """The window between two scrapes dt_s apart; None when the server restarted in between or
    changed which token figures it exports (_no_window_reason says which, in words)."""
    if prev.gen_mode != cur.gen_mode or prev.prompt_mode != cur.prompt_mode:
        return None
    for name, marker in cur.markers.items():
        before = prev.markers.get(name)
        if before is None or marker is None:
            continue
        if isinstance(marker, dict) and isinstance(before, dict):
            # Per-series markers (`_created`): a series that appeared is not a restart.
            if any(before[k] != v for k, v in marker.items() if k in before):
                return None
        elif before != marker:
            return None
    if cur.request_copies is not None:
        prev, cur = _one_copy(prev, cur, cur.request_copies)
    try:
        deltas: dict[str, float] = {}
        for name, series in cur.counters.items():
            deltas[name] = _counter_delta(
                prev.counters.get(name), series, clamp=name in cur.clamped
            )
        figures: dict[str, tuple[float | None, float | None]] = {}
        ttft_slowest_s: float | None = None
        for name in ("ttft", "itl"):
            series_h = cur.hists.get(name)
            if series_h is None:
                figures[name] = (None, None)
                continue
            count, total_sum, buckets = _hist_delta(prev.hists.get(name), series_h)
            if count <= 0:
                figures[name] = (None, None)
                continue
            pairs = list(buckets.items())
            figures[name] = (histogram_quantile(quantile, pairs), total_sum / count)
            if name == "ttft":
                ttft_slowest_s = slowest_bucket_mean(total_sum, pairs)
        prompt_len = None
        if "prompt_len" in cur.hists:
            prompt_len = _hist_delta(prev.hists.get("prompt_len"), cur.hists["prompt_len"])
        rates: dict[str, float | None] = {}
        for name, mode in (("generation", cur.gen_mode), ("prompt", cur.prompt_mode)):
            value: float | None
            if mode == "gauge":
                value = cur.gauges.get(name + "_rate")
            elif mode == "iterations":
                tokens = _per_iteration_tokens(prev, cur, name)
                value = None if tokens is None else tokens / dt_s
            else:  # counter; "admissions" starts from the request-end count (Source._process)
                value = deltas[name] / dt_s if name in deltas else None
            rates[name] = value
    except _Reset:
        return None
    return Window(
        span_s=dt_s,
        generation_tokens_per_s=rates["generation"],
        prompt_tokens_per_s=rates["prompt"],
        finished_requests=deltas.get("finished"),
        ttft_q_s=figures["ttft"][0],
        itl_q_s=figures["itl"][0],
        ttft_mean_s=figures["ttft"][1],
        itl_mean_s=figures["itl"][1],
        ttft_slowest_s=ttft_slowest_s,
        preemptions=deltas.get("preemptions"),
        prompt_len=prompt_len,
        admitted_per_s=deltas["admitted"] / dt_s if "admitted" in deltas else None,
        prefill_busy_s=deltas.get("prefill_busy_s"),
    )


# ---------------------------------------------------------------------------------------------
# The source


LATENCY_HISTOGRAM_HINTS: dict[str, str] = {
    "triton": "; start tritonserver with --metrics-config histogram_latencies=true for its TTFT"
    " histogram (nv_inference_first_response_histogram_ms)",
    "sglang": "; start SGLang with --collect-tokens-histogram for its prompt-length histogram",
    "llamacpp": "; llama-server exports neither",
    "generic": "; set `generic.ttft_histogram` if the server exports one",
}
"""Per server kind: how to make it export a TTFT or prompt-length histogram, after '; '."""


def first_token_blind_warning(server: str, kind: str) -> str:
    """What a server exporting neither a TTFT nor a prompt-length histogram costs, and the fix."""
    return (
        f"server {server} ({kind}) exports no time-to-first-token histogram and no "
        "prompt-length histogram: powerd can neither see nor model its first-token latency, so "
        f"it keeps the group's clocks at or above {100 * BLIND_PREFILL_SHARE:.0f} % of their "
        f"maximum{LATENCY_HISTOGRAM_HINTS.get(kind, '')}"
    )


def _status_error(url: str, status: int, kind: str) -> str:
    hints = {
        "sglang": " (SGLang serves /metrics only with --enable-metrics)",
        "llamacpp": " (llama-server serves /metrics only with --metrics)",
        "nim": " (NIM for LLMs serves its metrics at /v1/metrics)",
        "triton": " (Triton serves metrics on --metrics-port, 8002 by default)",
    }
    hint = hints.get(kind, "")
    if status in (404, 501) and not hint:
        hint = " (is this the server's metrics URL, and are its metrics enabled?)"
    return f"HTTP {status} from {url}{hint}"


def describe_error(exc: BaseException, timeout_s: float) -> str:
    """One sentence for a failed fetch."""
    if isinstance(exc, SourceError):
        return str(exc)
    if isinstance(exc, TimeoutError):
        return f"timed out after {timeout_s:g} s"
    if isinstance(exc, OSError):
        reason = exc.strerror or str(exc) or type(exc).__name__
        return f"cannot read metrics: {reason}"
    return f"cannot read metrics: {type(exc).__name__}: {exc}"


class Source:
    """One inference server's metrics endpoint, read once per poll.

    `kind` is the resolved kind ("auto" until the first good scrape of an auto source). poll()
    never raises: a server that cannot be read gives a sample with up=False and a one-sentence
    error. Rates compare with the previous good scrape on the caller's clock: the time each
    answer came (`answered_s` of process(), `now_s` when not given).
    """

    def __init__(
        self,
        config: ServerConfig,
        fetch: Fetcher,
        extractor: Extractor | None,
        resolve: Callable[[str], Extractor],
        *,
        max_window_s: float = DEFAULT_MAX_WINDOW_S,
        max_bytes: int = MAX_BODY_BYTES,
    ) -> None:
        self.config = config
        self.name = config.name
        self.fetch = fetch
        self._extractor = extractor
        self._resolve = resolve
        self.kind = extractor.kind if extractor is not None else "auto"
        self.max_window_s = max_window_s
        self.max_bytes = max_bytes
        self._labels: dict[str, LabelInfo] = {}
        self._prev: Reading | None = None
        self._prev_s: float | None = None
        self._model_name = ""
        self._prompt_mix = DecayingHistogram(PROMPT_MIX_HALF_LIFE_S)
        self._flush_marks: dict[str, tuple[float, float, float]] = {}
        """Flushed counter -> (its total at the baseline, when, its rounding then)."""
        self._report: tuple[float | None, ...] | None = None
        self._report_finished = 0.0
        """Finished requests when the engine report last changed."""
        self._totals: dict[str, float | None] = {}
        self._moved_s: float | None = None
        """When a counter or the engine report last changed."""
        self.no_rate_reason: str | None = None
        """Why the last good scrape gave no generation rate, in words; None when it gave one."""
        self.restarts = 0
        """Restarts of the server seen between two scrapes since this reader was made."""

    def fetch_response(self) -> FetchResponse:
        """One HTTP read of the metrics URL; raises on failure (the pool runs this in a thread)."""
        return self.fetch(self.config.url, self.config.timeout_s)

    def close(self) -> None:
        """Close the fetcher's kept connection, if it keeps one (the next read opens another)."""
        close_fetcher(self.fetch)

    def poll(self, now_s: float) -> ServerSample:
        """Scrape now and return the sample for the window since the previous good scrape."""
        start = time.perf_counter()
        result: FetchResponse | BaseException
        try:
            result = self.fetch_response()
        except Exception as exc:
            result = exc
        return self.process(result, now_s, time.perf_counter() - start)

    def down(self, now_s: float, error: str, scrape_duration_s: float = 0.0) -> ServerSample:
        """A sample for a server that could not be read. The rate baseline is kept."""
        return ServerSample(
            server=self.name,
            kind=self.kind,
            model_name=self._model_name,
            up=False,
            timestamp_s=now_s,
            scrape_duration_s=scrape_duration_s,
            realtime=self._prev.realtime if self._prev is not None else False,
            error=error,
        )

    def process(
        self,
        result: FetchResponse | BaseException,
        now_s: float,
        scrape_duration_s: float,
        answered_s: float | None = None,
    ) -> ServerSample:
        """Turn one fetch result into a sample stamped now_s (the tick); never raises.

        answered_s: when the answer came, on now_s's clock (now_s when not given). Rates are
        taken between the answered_s of good scrapes: a server that answers 20 ms into one tick
        and 300 ms into the next has counted for 1.28 s, not 1 s.
        """
        if isinstance(result, BaseException):
            return self.down(
                now_s, describe_error(result, self.config.timeout_s), scrape_duration_s
            )
        try:
            return self._process(
                result, now_s, scrape_duration_s, now_s if answered_s is None else answered_s
            )
        except SourceError as exc:
            return self.down(now_s, str(exc), scrape_duration_s)
        except ExpositionError as exc:
            message = f"{self.config.url} is not a Prometheus exposition: {exc}"
            return self.down(now_s, message, scrape_duration_s)
        except Exception as exc:
            message = f"cannot interpret metrics from {self.config.url}: {type(exc).__name__}"
            return self.down(now_s, f"{message}: {exc}", scrape_duration_s)

    def _process(
        self, response: FetchResponse, now_s: float, scrape_duration_s: float, answered_s: float
    ) -> ServerSample:
        start = time.perf_counter() - scrape_duration_s
        url = self.config.url
        if response.status != 200:
            raise SourceError(_status_error(url, response.status, self.kind))
        body = response.body
        if len(body) > self.max_bytes:
            raise SourceError(
                f"{url} sent more than {self.max_bytes // (1024 * 1024)} MiB of metrics"
            )
        if response.close_delimited and ends_mid_line(body):
            # Parsed, a cut value would be read as a smaller one: a counter reset, then a rate.
            raise SourceError(
                f"{url} closed the connection after {len(body)} bytes of a body without a "
                "length, inside a line"
            )
        extractor = self._extractor
        if extractor is None:
            from powerd.sources.detect import detect_kind

            kind = detect_kind(body, url=url)
            extractor = self._resolve(kind)
            self._extractor = extractor
            self.kind = extractor.kind
        samples = parse_exposition(body, extractor.wanted, self._labels)
        try:
            reading = extractor.extract(samples, response.headers)
        except SourceError as exc:
            raise SourceError(f"{url} {exc}") from None
        if reading.model_names:
            self._model_name = ",".join(reading.model_names)
        window: Window | None = None
        why = "there is no earlier scrape to compare with"
        prev, prev_s = self._prev, self._prev_s
        if prev is not None and prev_s is not None:
            dt_s = answered_s - prev_s
            if dt_s <= 0:
                # Two polls at one instant: keep the older baseline and report no rates.
                self.no_rate_reason = "the two scrapes came at one instant"
                return self._sample(reading, None, now_s, time.perf_counter() - start)
            # Compared whatever the gap, to count a restart: a server a scheduler restarts
            # (loading a model) is often away for longer than a window may last.
            window = compare(prev, reading, dt_s, self.config.slo.quantile)
            why = _no_window_reason(prev, reading)
            if window is None and why == RESTARTED:
                self.restarts += 1
            if dt_s > self.max_window_s:
                window = None
                why = f"the scrapes were more than {self.max_window_s:g} s apart"
            if window is not None and window.prompt_len is not None:
                self._prompt_mix.add(dt_s, *window.prompt_len)
            if window is not None and reading.prompt_mode == "admissions":
                window = self._admitted_prompt_rate(window)
        stale = self._stale_report(reading, answered_s)
        if reading.flushed:
            window = self._flushed_rates(reading, window, answered_s, stale)
        if stale and window is not None:
            window = replace(window, generation_tokens_per_s=0.0)
        if window is not None:
            why = "the server gave no usable generation figure for the window"
            if "generation" in reading.flushed and window.generation_tokens_per_s is None:
                why = (
                    "its token counter has not moved past its rounding while requests ran"
                    if reading.rounding.get("generation")
                    else "its token counter has not moved while requests ran (the server adds "
                    "to it in batches)"
                ) + ": probe again with a longer --interval"
        self._prev, self._prev_s = reading, answered_s
        sample = self._sample(reading, window, now_s, time.perf_counter() - start, stale)
        self.no_rate_reason = None if sample.generation_tokens_per_s is not None else why
        return sample

    def _admitted_prompt_rate(self, window: Window) -> Window:
        """The window's prompt rate as admissions x the recent mix's mean prompt."""
        mix = self._prompt_mix
        admitted = window.admitted_per_s
        if admitted is None or mix.count < PROMPT_MIX_MIN_REQUESTS:
            return window
        return replace(window, prompt_tokens_per_s=admitted * mix.sum / mix.count)

    def _stale_report(self, reading: Reading, answered_s: float) -> bool:
        """Whether the reading's engine report is stale (Reading.report); follows its changes."""
        report = reading.report
        if report is None:
            self._report = None
            return False
        finished = sum(reading.counters.get("finished", {}).values())
        totals: dict[str, float | None] = {
            name: sum(series.values()) for name, series in reading.counters.items()
        }
        totals["generation_tokens_total"] = reading.generation_tokens_total
        if report != self._report:
            self._report, self._report_finished = report, finished
            self._moved_s = answered_s
        elif totals != self._totals or self._moved_s is None:
            self._moved_s = answered_s
        self._totals = totals
        running = reading.gauges.get("running") or 0.0
        return (
            running > 0.0
            and "finished" in reading.counters
            and finished - self._report_finished >= running
            and answered_s - self._moved_s > STALE_REPORT_S
        )

    def _flushed_rates(
        self, reading: Reading, window: Window | None, answered_s: float, stale: bool
    ) -> Window | None:
        """The window with the rates of flushed counters taken since their baselines."""
        running = reading.gauges.get("running")
        rates: dict[str, float | None] = {}
        for name in reading.flushed:
            total = sum(reading.counters.get(name, {}).values())
            rounding = reading.rounding.get(name, 0.0)
            mark = self._flush_marks.get(name)
            new_mark = (total, answered_s, rounding)
            if window is None or mark is None:
                self._flush_marks[name] = new_mark
                continue
            moved = total - mark[0]
            noise = mark[2] + rounding
            if moved < -noise:
                self._flush_marks[name] = new_mark  # counted again from a lower value
                continue
            if moved > 0.0 and moved >= ROUNDING_MARGIN * noise:
                rates[name] = moved / (answered_s - mark[1])
            elif not running or stale:
                rates[name] = 0.0
            else:
                rates[name] = None  # generating, but not counted (measurably) yet
                if not (noise > 0.0 and answered_s - mark[1] > self.max_window_s):
                    continue
            self._flush_marks[name] = new_mark
        if window is None or not rates:
            return window
        return replace(
            window,
            generation_tokens_per_s=rates.get("generation", window.generation_tokens_per_s),
            prompt_tokens_per_s=rates.get("prompt", window.prompt_tokens_per_s),
        )

    def _sample(
        self,
        reading: Reading,
        window: Window | None,
        now_s: float,
        scrape_duration_s: float,
        stale: bool = False,
    ) -> ServerSample:
        """The sample of a reading and its window; with a stale engine report (Reading.report),
        the gauges it carries read 0."""
        gauges = reading.gauges
        if stale:
            gauges = gauges | dict.fromkeys(reading.report_gauges & gauges.keys(), 0.0)
        if window is not None:
            figures: dict[str, Any] = {
                f.name: _finite(getattr(window, f.name))
                for f in fields(Window)
                if f.name != "prompt_len"
            }
            window = replace(window, **figures)
        mix = self._prompt_mix
        prompt_weighted = None
        if mix.count >= PROMPT_MIX_MIN_REQUESTS:
            prompt_weighted = _finite(token_weighted_mean(mix.sum, list(mix.buckets.items())))
        return ServerSample(
            server=self.name,
            kind=self.kind,
            model_name=self._model_name,
            up=True,
            timestamp_s=now_s,
            scrape_duration_s=scrape_duration_s,
            realtime=reading.realtime,
            prompt_per_chunk=reading.prompt_per_chunk,
            generation_tokens_per_s=window.generation_tokens_per_s if window else None,
            prompt_tokens_per_s=window.prompt_tokens_per_s if window else None,
            running=_finite(gauges.get("running")),
            waiting=_finite(gauges.get("waiting")),
            ttft_q_s=window.ttft_q_s if window else None,
            itl_q_s=window.itl_q_s if window else None,
            ttft_mean_s=window.ttft_mean_s if window else None,
            ttft_slowest_s=window.ttft_slowest_s if window else None,
            kv_cache_usage=_share(gauges.get("kv_usage")),
            preemptions=window.preemptions if window else None,
            prefill_busy_s=window.prefill_busy_s if window else None,
            itl_mean_s=window.itl_mean_s if window else None,
            finished_requests=window.finished_requests if window else None,
            window_s=window.span_s if window else None,
            prompt_tokens_weighted_mean=prompt_weighted,
            generation_tokens_total=_finite(reading.generation_tokens_total),
            exports_ttft="ttft" in reading.hists,
            exports_prompt_lengths="prompt_len" in reading.hists,
        )
