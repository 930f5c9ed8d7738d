"""LMDeploy `api_server` (/metrics, default on since v0.11.0; opt-in from v0.9.2).

`lmdeploy/metrics/loggers.py` copies vLLM's V1 logger: `lmdeploy:generation_tokens_total` and
`lmdeploy:prompt_tokens_total` are incremented per engine iteration (`record_iteration`; a
prompt whole at its first token, as in vLLM), series carry `model_name` and `engine` (the DP
rank) and are summed. Inter-token latency is `lmdeploy:iter_token_latency` (no unit suffix,
seconds) where present, else the per-request `lmdeploy:time_per_output_token_seconds`.
prometheus_client's `_created` series are disabled (`disable_created_metrics()`), so restarts
show as counters going down.
Reference: shared/reference/inference_server_metrics.md section 7.
"""

from __future__ import annotations

from powerd.sources.vllm import CounterServerExtractor


def lmdeploy_extractor() -> CounterServerExtractor:
    return CounterServerExtractor(
        "lmdeploy",
        "lmdeploy:",
        ("iter_token_latency", "time_per_output_token_seconds"),
        "LMDeploy",
    )
