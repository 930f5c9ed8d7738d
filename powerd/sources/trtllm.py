"""TensorRT-LLM's OpenAI server, trtllm-serve: Prometheus text on /prometheus/metrics.

`tensorrt_llm/metrics/collector.py` (MetricsCollector, "adapted from vLLM") names its metrics
like vLLM's with a `trtllm_` prefix and labels `model_name` and `engine_type`. The per-request
figures are recorded when a request ends, and only with `return_perf_metrics: true` in the LLM
API options: `trtllm_generation_tokens_total`, `trtllm_prompt_tokens_total`,
`trtllm_request_success_total{finished_reason}`, the histograms
`trtllm_time_to_first_token_seconds` and `trtllm_time_per_output_token_seconds` (a request's
mean time per output token). So token rates move in request-sized steps (realtime=False) and a
late first token shows when its request ends. The iteration statistics, with
`enable_iter_perf_stats: true`, give `trtllm_num_requests_running`, `_waiting` and
`trtllm_kv_cache_utilization` (used over max KV blocks). They also give
`trtllm_prefill_batch_tokens`, the context tokens of each iteration, which would count prompts
chunk by chunk; it is not read: with first tokens seen only as requests end, the prefill
headroom that the request-end prompt count leaves is what keeps slow-prefill GPUs within their
TTFT objective (benchmarks/RESULTS.md, "trtllm-serve"). Its /metrics is JSON iteration stats,
not this. Releases before the `trtllm_` names served a few unprefixed request histograms and no
token counter; they cannot be read (detect.py says so).
"""

from __future__ import annotations

from powerd.sources.vllm import CounterServerExtractor


def trtllm_extractor() -> CounterServerExtractor:
    return CounterServerExtractor(
        "trtllm",
        "trtllm_",
        ("time_per_output_token_seconds",),
        "trtllm-serve",
        realtime=False,
        kv_gauges=("kv_cache_utilization",),
    )
