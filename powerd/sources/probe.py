"""`powerd probe URL`: what powerd reads from one server, from two scrapes."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from powerd.config import ServerConfig, url_problem
from powerd.sources.base import Fetcher, SourceError, first_token_blind_warning
from powerd.sources.fetch import http_fetch
from powerd.sources.registry import make_source

PROBE_TIMEOUT_S = 5.0


def probe(
    url: str,
    kind: str = "auto",
    interval_s: float = 2.0,
    fetch: Fetcher = http_fetch,
    *,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> dict[str, Any]:
    """Scrape url twice, interval_s apart, and report the kind and the rates between.

    Raises SourceError with one sentence when the server cannot be read or recognised.
    """
    if kind == "generic":
        raise SourceError("probe cannot read kind generic; it needs metric names from a config")
    if not interval_s > 0:
        raise SourceError(f"probe interval must be a positive number of seconds, got {interval_s}")
    problem = url_problem(url)
    if problem is not None:
        raise SourceError(f"url: {problem}")
    config = ServerConfig(name="probe", url=url, kind=kind, timeout_s=PROBE_TIMEOUT_S)
    source = make_source(config, fetch)
    first = source.poll(clock())
    if not first.up:
        raise SourceError(first.error or f"cannot read {url}")
    sleep(interval_s)
    second = source.poll(clock())
    if not second.up:
        raise SourceError(second.error or f"cannot read {url}")
    if second.generation_tokens_per_s is None:
        reason = source.no_rate_reason or "the server gave no generation figure"
        raise SourceError(f"{url} gave no generation rate from two scrapes: {reason}")
    window_s = second.timestamp_s - first.timestamp_s
    busy_s = second.prefill_busy_s
    return {
        "url": url,
        "kind": source.kind,
        "realtime": second.realtime,
        "generation_tokens_per_s": second.generation_tokens_per_s,
        "prompt_tokens_per_s": second.prompt_tokens_per_s,
        "running": second.running,
        "waiting": second.waiting,
        "ttft_p95_s": second.ttft_q_s,
        "itl_p95_s": second.itl_q_s,
        "kv_cache_usage": second.kv_cache_usage,
        "exports_ttft": second.exports_ttft,
        "exports_prompt_lengths": second.exports_prompt_lengths,
        "first_token_blind": second.first_token_blind,
        "prefill_busy_share": busy_s / window_s if busy_s is not None and window_s > 0 else None,
    }


def _fmt(value: float | None, unit: str, digits: int = 1) -> str:
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}{unit}"


def format_probe(result: dict[str, Any]) -> str:
    """Human text for a probe result, one figure per line."""
    cadence = "per engine step" if result["realtime"] else "at request end"
    ttft = _fmt(result.get("ttft_p95_s"), " s", 3) if result["exports_ttft"] else "not exported"
    kv = result.get("kv_cache_usage")
    mix = "exported" if result["exports_prompt_lengths"] else "not exported"
    busy = result.get("prefill_busy_share")
    prefill = "not timed" if busy is None else f"{100 * busy:.1f} % of the time"
    lines = [
        f"kind:                 {result['kind']} (token counters move {cadence})",
        f"generation tokens/s:  {_fmt(result['generation_tokens_per_s'], '')}",
        f"prompt tokens/s:      {_fmt(result.get('prompt_tokens_per_s'), '')}",
        f"running requests:     {_fmt(result.get('running'), '', 0)}",
        f"waiting requests:     {_fmt(result.get('waiting'), '', 0)}",
        f"TTFT p95:             {ttft}",
        f"inter-token p95:      {_fmt(result.get('itl_p95_s'), ' s', 4)}",
        f"KV cache in use:      {_fmt(None if kv is None else 100 * kv, ' %')}",
        f"prompt-length mix:    {mix}",
        f"prefill passes:       {prefill}",
    ]
    if result["first_token_blind"]:
        lines.append("warning: " + first_token_blind_warning(result["url"], result["kind"]))
    return "\n".join(lines)
