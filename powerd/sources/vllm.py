"""vLLM, and the servers that copy its metric names (NIM for LLMs, LMDeploy, trtllm-serve).

vLLM V1 (`vllm/v1/metrics/loggers.py`) increments `vllm:generation_tokens_total` and
`vllm:prompt_tokens_total` in `PrometheusStatLogger.record()` on every engine step, so rates are
real time; a request's prompt is added whole in the step of its first token
(`IterationStats.update_from_output`), so a prompt prefilled in chunks over several ticks lands
in one (`prompt_per_chunk` False). Series carry `model_name` and, since about v0.10, `engine`
(the data-parallel index): every series is rated on its own and the rates are summed, over
engines and over model names (LoRA adapters in V0). The prompt rate stands for prefill work,
and `vllm:prompt_tokens_total` counts every prompt token, prefix-cache hits and KV-connector
transfers included: where a build exports `vllm:prompt_tokens_by_source_total` (sources
local_compute, local_cache_hit and external_kv_transfer, adding up to the total), the prompt
rate is its `local_compute` series, the tokens vLLM's own logger rates as computed. A decode
instance of a prefill/decode split then shows no prefill work. Inter-token latency is
`vllm:inter_token_latency_seconds`; until it was renamed (deprecated in 0.11, removed in 2026) it
was `vllm:time_per_output_token_seconds`, which is also the V0 name. `vllm:request_prompt_tokens`
(observed at each request's end) gives the prompt-length mix. V0 servers without token counters
are read through their `vllm:avg_generation_throughput_toks_per_s` gauges. Triton's vllm_backend
re-exports `vllm:*` with a `model` label instead of `model_name`.

A restart shows as a changed `process_start_time_seconds` (absent with --api-server-count > 1),
a changed `vllm:generation_tokens_created`, or a counter that went down.
Reference: shared/reference/inference_server_metrics.md sections 2, 6, 7, 10.
"""

from __future__ import annotations

from collections.abc import Mapping

from powerd.sources.base import (
    Reading,
    SourceError,
    first_histogram,
    gauge_max,
    gauge_total,
    histogram,
    label_values,
    series_values,
    total,
)
from powerd.sources.exposition import Samples, Wanted

HIST_SUFFIXES = ("_bucket", "_sum", "_count")
_SOURCE = frozenset({"source"})
MODEL_LABELS = ("model_name", "model", "name")


def start_time_marker(samples: Samples) -> object:
    """process_start_time_seconds when the body has exactly one (single-process servers)."""
    rows = samples.get("process_start_time_seconds")
    if rows is None or len(rows) != 1:
        return None
    return rows[0][1]


def hist_names(*bases: str) -> list[str]:
    return [base + suffix for base in bases for suffix in HIST_SUFFIXES]


class CounterServerExtractor:
    """A server with per-step token counters named `<prefix>generation_tokens_total` etc."""

    def __init__(
        self,
        kind: str,
        prefix: str,
        itl_histograms: tuple[str, ...],
        server: str,
        throughput_gauges: bool = False,
        realtime: bool = True,
        kv_gauges: tuple[str, ...] = ("kv_cache_usage_perc", "gpu_cache_usage_perc"),
    ) -> None:
        self.kind = kind
        self.prefix = p = prefix
        self.server = server
        self.throughput_gauges = throughput_gauges
        self.realtime = realtime
        self.kv_gauges = tuple(p + name for name in kv_gauges)
        self.itl_histograms = tuple(p + name for name in itl_histograms)
        self.ttft_histogram = p + "time_to_first_token_seconds"
        self.prompt_histogram = p + "request_prompt_tokens"
        names = [
            p + "generation_tokens_total",
            p + "generation_tokens_created",
            p + "prompt_tokens_total",
            p + "prompt_tokens_by_source_total",
            p + "request_success_total",
            p + "num_requests_running",
            p + "num_requests_waiting",
            *self.kv_gauges,
            p + "num_preemptions_total",
            "process_start_time_seconds",
            *hist_names(self.ttft_histogram, self.prompt_histogram, *self.itl_histograms),
        ]
        if throughput_gauges:
            names += [
                p + "avg_generation_throughput_toks_per_s",
                p + "avg_prompt_throughput_toks_per_s",
            ]
        self.wanted = Wanted.of(names)

    def extract(self, samples: Samples, headers: Mapping[str, str]) -> Reading:
        p = self.prefix
        generation = series_values(samples, p + "generation_tokens_total")
        running = gauge_total(samples, p + "num_requests_running")
        reading = Reading(realtime=self.realtime)
        if generation is not None:
            reading.counters["generation"] = generation
            reading.generation_tokens_total = total(generation)
        elif self.throughput_gauges and p + "avg_generation_throughput_toks_per_s" in samples:
            reading.gen_mode = reading.prompt_mode = "gauge"
            rate = gauge_total(samples, p + "avg_generation_throughput_toks_per_s")
            reading.gauges["generation_rate"] = rate or 0.0
            prompt_rate = gauge_total(samples, p + "avg_prompt_throughput_toks_per_s")
            if prompt_rate is not None:
                reading.gauges["prompt_rate"] = prompt_rate
        elif running is None:
            raise SourceError(f"has no {p}generation_tokens_total (is it a {self.server} server?)")
        prompt = series_values(
            samples,
            p + "prompt_tokens_by_source_total",
            select={"source": "local_compute"},
            drop=_SOURCE,
        )
        # A window between a computed-prompt count and an all-prompt count would rate their
        # difference: a switch between them is no window, as a restart is.
        reading.markers["prompt"] = "local_compute" if prompt else "all"
        if not prompt:
            prompt = series_values(samples, p + "prompt_tokens_total")
        if prompt is not None:
            reading.counters["prompt"] = prompt
        finished = series_values(samples, p + "request_success_total")
        if finished is not None:
            reading.counters["finished"] = finished
        if running is not None:
            reading.gauges["running"] = running
        waiting = gauge_total(samples, p + "num_requests_waiting")
        if waiting is not None:
            reading.gauges["waiting"] = waiting
        kv_usage = gauge_max(samples, *self.kv_gauges)
        if kv_usage is not None:
            reading.gauges["kv_usage"] = kv_usage
        preemptions = series_values(samples, p + "num_preemptions_total")
        if preemptions is not None:
            reading.counters["preemptions"] = preemptions
        ttft = histogram(samples, self.ttft_histogram)
        if ttft is not None:
            reading.hists["ttft"] = ttft
        prompt_len = histogram(samples, self.prompt_histogram)
        if prompt_len is not None:
            reading.hists["prompt_len"] = prompt_len
        itl = first_histogram(samples, *self.itl_histograms)
        if itl is not None:
            reading.hists["itl"] = itl
        reading.markers["start"] = start_time_marker(samples)
        created = series_values(samples, p + "generation_tokens_created")
        if created:
            reading.markers["created"] = created
        reading.model_names = label_values(
            samples, (p + "generation_tokens_total", p + "num_requests_running"), MODEL_LABELS
        )
        return reading


def vllm_extractor() -> CounterServerExtractor:
    return CounterServerExtractor(
        "vllm",
        "vllm:",
        ("inter_token_latency_seconds", "time_per_output_token_seconds"),
        "vLLM",
        throughput_gauges=True,
    )
