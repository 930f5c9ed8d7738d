"""Hugging Face text-generation-inference (`router/src/server.rs`, /metrics on the main port).

TGI renders its metrics with the Rust metrics-exporter-prometheus: counters carry no `_total`
(`tgi_request_success`), there is no model label, and a series exists only once it was first
recorded, so a fresh server may serve an almost empty body: any one TGI series read makes it an
idle TGI (the v3 router sets `tgi_batch_max_total_tokens` after its warmup, before it serves,
but other backends need not), and a body with none is not a TGI.

There is no token counter: `tgi_request_generated_tokens` and `tgi_request_input_length` are
histograms observed when a request ends (their `_sum` is the exported total; the prompt buckets
give the prompt-length mix). Rates come from what the batching task records as it runs:
- generated tokens = Δ(`tgi_request_skipped_tokens_count` + `_sum`): every generation sent (a
  request's tokens from one forward call) is observed with the number of its tokens past the
  first, so count + sum are the tokens generated, speculated ones (`--speculate`) included.
  Where the series is missing with forward calls counted, Δ forward calls
  (`tgi_batch_inference_count{method="prefill|decode"}`) x the running batch
  (`tgi_batch_current_size`, a snapshot averaged over the two scrapes), as for Triton: each
  call gives a token to every request of the batch (on backends that pause the running batch
  for a prefill call, one token per running request too many).
- prompt tokens/s = requests admitted to prefill (`tgi_batch_next_size_sum`, observed per batch
  the queue hands over) x the recent mix's mean prompt (prompt_mode "admissions" in base.py).
- seconds of prefill = Δ`tgi_batch_forward_duration_sum{method="prefill"}` (every prefill call's
  forward pass, timed by the batching task): prompt tokens over them are the prefill capacity,
  learned from every tick with prompt work, with or without a queue.
There is no TTFT; the inter-token figure is `tgi_request_mean_time_per_token_duration`
(inference time / generated tokens per request, which includes the prefill). Queue:
`tgi_queue_size`; running: `tgi_batch_current_size`.
Reference: shared/reference/inference_server_metrics.md section 4.
"""

from __future__ import annotations

from collections.abc import Mapping

from powerd.sources.base import Reading, SourceError, gauge_total, histogram, series_values, total
from powerd.sources.exposition import Samples, Wanted
from powerd.sources.vllm import hist_names

_ITL = "tgi_request_mean_time_per_token_duration"


class TgiExtractor:
    kind = "tgi"

    def __init__(self) -> None:
        self.wanted = Wanted.of(
            [
                "tgi_request_generated_tokens_sum",
                "tgi_request_skipped_tokens_count",
                "tgi_request_skipped_tokens_sum",
                *hist_names("tgi_request_input_length"),
                "tgi_request_count",
                "tgi_request_success",
                "tgi_request_success_total",
                "tgi_batch_inference_count",
                "tgi_batch_inference_count_total",
                "tgi_batch_next_size_sum",
                "tgi_batch_forward_duration_sum",
                "tgi_batch_current_size",
                "tgi_queue_size",
                "tgi_batch_current_max_tokens",
                "tgi_batch_max_total_tokens",
                *hist_names(_ITL),
            ]
        )

    def extract(self, samples: Samples, headers: Mapping[str, str]) -> Reading:
        if not samples:
            raise SourceError(
                "has no tgi_ metrics (is it text-generation-inference, read on its main port?)"
            )
        calls = gauge_total(samples, "tgi_batch_inference_count")
        if calls is None:
            calls = gauge_total(samples, "tgi_batch_inference_count_total")
        sent = gauge_total(samples, "tgi_request_skipped_tokens_count")
        speculated = gauge_total(samples, "tgi_request_skipped_tokens_sum")
        if sent is not None and speculated is not None:
            reading = _generations(sent + speculated)
        elif calls is None:
            # Before its first forward call a server has none of these series: no tokens yet,
            # and the generations' series counts from zero once created.
            reading = _generations(0.0)
        else:
            reading = Reading(realtime=True, gen_mode="iterations", prompt_mode="admissions")
            generated = series_values(samples, "tgi_request_generated_tokens_sum") or {}
            reading.counters["generation"] = generated
            reading.generation_tokens_total = total(generated) if generated else None
            batch = gauge_total(samples, "tgi_batch_current_size")
            reading.counters["iterations"] = {(): calls}
            reading.per_iteration["generation"] = {} if batch is None else {(): batch}
        reading.counters["prompt"] = series_values(samples, "tgi_request_input_length_sum") or {}
        admitted = series_values(samples, "tgi_batch_next_size_sum")
        if admitted is not None:
            reading.counters["admitted"] = admitted
        # A series created since the last scrape counts from zero; a server without it (before
        # its first prefill call, or a TGI that does not time them) gives no prefill time.
        prefill_s = series_values(
            samples,
            "tgi_batch_forward_duration_sum",
            select={"method": "prefill"},
            drop=frozenset({"method"}),
        )
        if prefill_s:
            reading.counters["prefill_busy_s"] = prefill_s
        reading.counters["finished"] = (
            series_values(samples, "tgi_request_success")
            or series_values(samples, "tgi_request_success_total")
            or {}
        )
        for gauge, name in (("running", "tgi_batch_current_size"), ("waiting", "tgi_queue_size")):
            value = gauge_total(samples, name)
            if value is not None:
                reading.gauges[gauge] = value
        # The tokens the running batch may grow to, of all the server can hold: TGI admits a
        # request only when its whole budget fits, so this is its KV-cache usage.
        reserved = gauge_total(samples, "tgi_batch_current_max_tokens")
        capacity = gauge_total(samples, "tgi_batch_max_total_tokens")
        if reserved is not None and capacity:
            reading.gauges["kv_usage"] = reserved / capacity
        itl = histogram(samples, _ITL)
        reading.hists["itl"] = itl or {}
        prompt_len = histogram(samples, "tgi_request_input_length")
        if prompt_len is not None:
            reading.hists["prompt_len"] = prompt_len
        return reading


def _generations(tokens: float) -> Reading:
    """A reading whose generated tokens are the server's own count of them."""
    reading = Reading(realtime=True, gen_mode="counter", prompt_mode="admissions")
    reading.counters["generation"] = {(): tokens}
    reading.generation_tokens_total = tokens
    return reading


def tgi_extractor() -> TgiExtractor:
    return TgiExtractor()
