"""llama.cpp `llama-server --metrics` (`tools/server/server-context.cpp`; /metrics is an error
without the flag).

Names start with `llamacpp:` and carry no labels. `tokens_predicted_total` and
`prompt_tokens_total` are added when a slot finishes (`on_prediction`), so they move in
request-sized steps. The real-time figure comes from the decode loop instead: the server keeps
`n_decode_total` (llama_decode calls) and `n_busy_slots_total` (the slots busy in each call,
summed) since start, and exposes `n_busy_slots_per_decode` = n_busy_slots_total / n_decode_total.
Their product restores n_busy_slots_total, whose rate is one generated token per busy slot per
decode (prompt chunks count once per call): realtime=True. Every value is printed through a
std::stringstream at its default precision, 6 significant digits (12345678 prints as
1.23457e+07), so once `n_decode_total` reaches 1e6 (hours of decoding) the product is off
by up to half a unit in the 6th digit of each factor: tens of tokens at 1e6 decodes, hundreds at
1e7, against ~100 tokens/s. From 1e6 decodes on the product is therefore a flushed counter
with that rounding (base.py): rated over the time since its baseline once it moved ten times
the rounding of both ends, unknown (None) before that while requests run. Below 1e6 decodes
the count prints in full and the ratio's rounding is a few tokens, so every scrape is rated. A
small decrease of the product is rounding and counts as 0; a decrease of `n_decode_total` is a
restart.

The gauges `prompt_tokens_seconds` / `predicted_tokens_seconds` are reset by every scrape
(`metrics_reset_bucket`), so they are not read. Restarts also show as a changed
`Process-Start-Time-Unix` response header (an opaque token, not necessarily a Unix time).
Queue: `requests_deferred`; running: `requests_processing`. No TTFT, no ITL.
Reference: shared/reference/inference_server_metrics.md section 5.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from powerd.sources.base import Reading, SourceError, gauge_total, header, series_values, total
from powerd.sources.exposition import Samples, Wanted

P = "llamacpp:"
START_HEADER = "Process-Start-Time-Unix"
SIGNIFICANT_DIGITS = 6
"""std::stringstream's default precision, with which llama-server prints every value."""
EXACT_BELOW = 1e6
"""Below this many decodes the product's rounding is a few tokens at most and it is rated every
scrape; from it on, only once it moved measurably."""


def printed_rounding(value: float) -> float:
    """The most `value` can be off after printing with SIGNIFICANT_DIGITS: half a unit in its
    last printed digit."""
    magnitude = abs(value)
    if not math.isfinite(magnitude):
        return math.inf
    if magnitude == 0.0:
        return 0.0
    return 0.5 * 10.0 ** (math.floor(math.log10(magnitude)) - (SIGNIFICANT_DIGITS - 1))


class LlamacppExtractor:
    kind = "llamacpp"

    def __init__(self) -> None:
        self.wanted = Wanted.of(
            [
                P + "n_decode_total",
                P + "n_busy_slots_per_decode",
                P + "tokens_predicted_total",
                P + "prompt_tokens_total",
                P + "requests_processing",
                P + "requests_deferred",
            ]
        )

    def extract(self, samples: Samples, headers: Mapping[str, str]) -> Reading:
        if not samples:
            raise SourceError("has no llamacpp: metrics (is it llama-server with --metrics?)")
        predicted = series_values(samples, P + "tokens_predicted_total")
        decodes = gauge_total(samples, P + "n_decode_total")
        per_decode = gauge_total(samples, P + "n_busy_slots_per_decode")
        reading = Reading(realtime=True)
        if decodes is not None and per_decode is not None:
            reading.counters["decodes"] = {(): decodes}
            reading.counters["generation"] = {(): decodes * per_decode}
            reading.clamped = frozenset({"generation"})
            if decodes >= EXACT_BELOW:
                reading.flushed = frozenset({"generation"})
                reading.rounding["generation"] = per_decode * printed_rounding(
                    decodes
                ) + decodes * printed_rounding(per_decode)
        elif predicted is not None:
            reading.realtime = False
            reading.counters["generation"] = predicted
        reading.generation_tokens_total = total(predicted)
        prompt = series_values(samples, P + "prompt_tokens_total")
        if prompt is not None:
            reading.counters["prompt"] = prompt
        for gauge, name in (("running", "requests_processing"), ("waiting", "requests_deferred")):
            value = gauge_total(samples, P + name)
            if value is not None:
                reading.gauges[gauge] = value
        reading.markers["start"] = header(headers, START_HEADER)
        return reading


def llamacpp_extractor() -> LlamacppExtractor:
    return LlamacppExtractor()
