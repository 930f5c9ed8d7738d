"""Token throughput and latency signals from inference servers' Prometheus metrics.

make_source(config) gives a Source whose poll(now_s) scrapes the server once and returns a
ServerSample of rates since the previous scrape; ScrapePool polls many sources concurrently under
a deadline. One module per server family: vllm, sglang, tgi, llamacpp, triton, nim, lmdeploy,
generic; detect_kind recognises a family from one scrape.
"""

from __future__ import annotations

from powerd.sources.base import (
    Fetcher,
    FetchResponse,
    Source,
    SourceError,
    first_token_blind_warning,
)
from powerd.sources.detect import detect_kind
from powerd.sources.fetch import http_fetch
from powerd.sources.pool import InlineScrapePool, ScrapePool
from powerd.sources.probe import format_probe, probe
from powerd.sources.registry import KINDS, make_source

__all__ = [
    "KINDS",
    "FetchResponse",
    "Fetcher",
    "InlineScrapePool",
    "ScrapePool",
    "Source",
    "SourceError",
    "detect_kind",
    "first_token_blind_warning",
    "format_probe",
    "http_fetch",
    "make_source",
    "probe",
]
