"""SGLang's `/v1/loads`: the prompt work a server still has to prefill, read between ticks.

A server's /metrics tells how many requests wait, not how long their prompts are; a burst of
long prompts is only seen once it has been prefilled (or has missed its first-token SLO).
SGLang (from early 2026, `python/sglang/srt/entrypoints/v1_loads.py`) also answers
`GET /v1/loads` with one JSON object per data-parallel rank. Its `num_waiting_uncached_tokens`
is that work: the waiting queue's input tokens not in the prefix cache plus the remainder of the
request being prefilled in chunks (`SchedulerLoadInquirer.get_num_waiting_uncached_tokens`).
Builds that have /v1/loads without that field give `num_total_tokens - num_used_tokens`, the
waiting queue's sequence lengths (the shim behind the deprecated /get_load reports exactly that
as `num_pending_tokens`). The answer is a small JSON document, cheap enough to read several
times a second.
"""

from __future__ import annotations

import json
import logging
import math
import urllib.parse

from powerd.sources.base import Fetcher, SourceError, close_fetcher, describe_error

log = logging.getLogger(__name__)

LOADS_PATH = "/v1/loads"
LOADS_QUERY = "include=core"
RETRY_AFTER_ERROR_S = 10.0
"""A server whose /v1/loads failed is not read again for this long (the tick's scrape carries
on): a hung endpoint must not stall the loop every quarter second."""


def loads_url(metrics_url: str) -> str:
    """The /v1/loads URL of the server whose metrics are at metrics_url (same scheme and host)."""
    parts = urllib.parse.urlsplit(metrics_url)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, LOADS_PATH, LOADS_QUERY, ""))


def _count(rank: dict, key: str, where: str) -> float | None:
    value = rank.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SourceError(f"{where}: {key} is not a number: {value!r}")
    if not math.isfinite(value) or value < 0:
        raise SourceError(f"{where}: {key} must be a finite count >= 0, got {value!r}")
    return float(value)


def parse_prompt_backlog(body: bytes) -> float:
    """Prompt tokens still to prefill, summed over the ranks of one /v1/loads answer.

    Raises SourceError when the body is not such an answer or a rank has neither figure.
    """
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise SourceError(f"not JSON: {exc}") from None
    loads = document.get("loads") if isinstance(document, dict) else None
    if not isinstance(loads, list) or not loads:
        raise SourceError("has no list of per-rank loads")
    backlog = 0.0
    for i, rank in enumerate(loads):
        where = f"loads[{i}]"
        if not isinstance(rank, dict):
            raise SourceError(f"{where} is not an object")
        waiting = _count(rank, "num_waiting_uncached_tokens", where)
        if waiting is None:
            total = _count(rank, "num_total_tokens", where)
            used = _count(rank, "num_used_tokens", where)
            if total is None or used is None:
                raise SourceError(
                    f"{where} has neither num_waiting_uncached_tokens nor "
                    "num_total_tokens and num_used_tokens"
                )
            waiting = max(total - used, 0.0)
        backlog += waiting
    return backlog


class PromptBacklogProbe:
    """Reads one SGLang server's prompt backlog; never raises.

    A server without /v1/loads (404: an older SGLang) is not asked again: `supported` turns
    False and read() returns None from then on. Other failures return None and pause reads for
    RETRY_AFTER_ERROR_S; each change between working and failing is logged once.
    """

    def __init__(self, server: str, metrics_url: str, fetch: Fetcher, timeout_s: float) -> None:
        self.server = server
        self.url = loads_url(metrics_url)
        self.fetch = fetch
        self.timeout_s = timeout_s
        self.supported = True
        self._retry_at_s = -math.inf
        self._failing = False

    def read(self, now_s: float) -> float | None:
        """The backlog in prompt tokens now, or None when it cannot be had."""
        if not self.supported or now_s < self._retry_at_s:
            return None
        try:
            response = self.fetch(self.url, self.timeout_s)
        except Exception as exc:
            self._failed(now_s, describe_error(exc, self.timeout_s))
            return None
        if response.status == 404:
            self.supported = False
            log.info(
                "%s: %s is not served (SGLang before /v1/loads); "
                "its clocks are raised for prompt bursts only at each tick",
                self.server,
                self.url,
            )
            return None
        if response.status != 200:
            self._failed(now_s, f"{self.url} answered HTTP {response.status}")
            return None
        try:
            backlog = parse_prompt_backlog(response.body)
        except SourceError as exc:
            self._failed(now_s, f"{self.url} {exc}")
            return None
        if self._failing:
            log.info("%s: %s answers again", self.server, self.url)
            self._failing = False
        return backlog

    def close(self) -> None:
        """Close the fetcher's kept connection, if it keeps one (the next read opens another)."""
        close_fetcher(self.fetch)

    def _failed(self, now_s: float, error: str) -> None:
        if not self._failing:
            log.warning(
                "%s: cannot read the prompt backlog (%s); retrying in %.0f s",
                self.server,
                error,
                RETRY_AFTER_ERROR_S,
            )
            self._failing = True
        self._retry_at_s = now_s + RETRY_AFTER_ERROR_S
