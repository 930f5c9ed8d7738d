"""TensorRT-LLM's OpenAI server, trtllm-serve: Prometheus text on /prometheus/metrics.

`tensorrt_llm/metrics/collector.py` (MetricsCollector, "adapted from vLLM") names its metrics
like vLLM's with a `trtllm_` prefix and labels `model_name` and `engine_type`. The per-request
figures are recorded when a request ends, and only with `return_perf_metrics: true` in the LLM
API options: `trtllm_generation_tokens_total`, `trtllm_prompt_tokens_total`,
`trtllm_request_success_total{finished_reason}`, the histograms
`trtllm_time_to_first_token_seconds` and `trtllm_time_per_output_token_seconds` (a request's
mean time per output token). So generated tokens move in request-sized steps (realtime=False)
and a late first token shows when its request ends. The iteration statistics, with
`enable_iter_perf_stats: true`, give `trtllm_num_requests_running`, `_waiting`,
`trtllm_kv_cache_utilization` (used over max KV blocks) and `trtllm_prefill_batch_tokens`, a
histogram of the context tokens of every iteration that has some: its `_sum` counts prompt
tokens chunk by chunk as they are prefilled, and is read instead of the request-end counter
wherever the server has one (a labelled series appears at the first prefill, so the switch
costs one window). Its /metrics is JSON iteration stats, not this. Releases before the
`trtllm_` names served a few unprefixed request histograms and no token counter; they cannot
be read (detect.py says so).
"""

from __future__ import annotations

from collections.abc import Mapping

from powerd.sources.base import Reading, series_values
from powerd.sources.exposition import Samples, Wanted
from powerd.sources.vllm import CounterServerExtractor

_PREFILL_TOKENS = "trtllm_prefill_batch_tokens_sum"


class TrtllmExtractor(CounterServerExtractor):
    """The vLLM-style reading, with prompt tokens per iteration where the server logs them."""

    def __init__(self) -> None:
        super().__init__(
            "trtllm",
            "trtllm_",
            ("time_per_output_token_seconds",),
            "trtllm-serve",
            realtime=False,
            kv_gauges=("kv_cache_utilization",),
        )
        self.wanted = Wanted.of([*self.wanted.samples, _PREFILL_TOKENS])

    def extract(self, samples: Samples, headers: Mapping[str, str]) -> Reading:
        reading = super().extract(samples, headers)
        prefill = series_values(samples, _PREFILL_TOKENS)
        if prefill is not None:
            reading.counters["prompt"] = prefill
            reading.prompt_per_chunk = True
        return reading


def trtllm_extractor() -> TrtllmExtractor:
    return TrtllmExtractor()
