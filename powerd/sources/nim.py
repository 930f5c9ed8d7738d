"""NVIDIA NIM for LLMs: vLLM's metric names without the `vllm:` prefix, served at /v1/metrics.

docs.nvidia.com/nim/large-language-models/latest/observability.html lists
`generation_tokens_total`, `prompt_tokens_total`, `num_requests_running`/`_waiting`,
`time_to_first_token_seconds` and `time_per_output_token_seconds`; builds on newer vLLM also carry
`inter_token_latency_seconds`, which is preferred when present. The counters move per engine step.
Reference: shared/reference/inference_server_metrics.md section 6.
"""

from __future__ import annotations

from powerd.sources.vllm import CounterServerExtractor


def nim_extractor() -> CounterServerExtractor:
    return CounterServerExtractor(
        "nim",
        "",
        ("inter_token_latency_seconds", "time_per_output_token_seconds"),
        "NIM (LLM)",
    )
