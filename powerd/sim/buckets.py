"""Histogram bucket bounds of each simulated server kind, as the servers' own code sets them.

The engine takes vLLM's as its default and the exposition renders each kind's; both import
this module, which imports neither.
"""

from __future__ import annotations

from powerd.config import NAMED_SERVER_KINDS

# fmt: off
# vllm/v1/metrics/loggers.py
VLLM_TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)
VLLM_ITL_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
)
VLLM_REQUEST_LATENCY_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
    240.0, 480.0, 960.0, 1920.0, 7680.0,
)
VLLM_ITERATION_TOKENS_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
# python/sglang/srt/metrics/collector.py (TokenizerMetricsCollector defaults)
SGLANG_TTFT_BUCKETS = (
    0.1, 0.2, 0.4, 0.6, 0.8, 1, 2, 4, 6, 8, 10, 20, 40, 60, 80, 100, 200, 400,
)
SGLANG_E2E_BUCKETS = (
    0.1, 0.2, 0.4, 0.6, 0.8, 1, 2, 4, 6, 8, 10, 20, 40, 60, 80, 100, 200, 400, 600, 1200, 1800,
    2400,
)
SGLANG_ITL_BUCKETS = (
    0.002, 0.004, 0.006, 0.008, 0.010, 0.015, 0.020, 0.025, 0.030, 0.035, 0.040, 0.060, 0.080,
    0.100, 0.200, 0.400, 0.600, 0.800, 1.000, 2.000, 4.000, 6.000, 8.000,
)
# With --collect-tokens-histogram.
SGLANG_PROMPT_TOKENS_BUCKETS = (
    100, 300, 500, 700, 1000, 1500, 2000, 3000, 4000, 5000, 6000, 7000, 8000, 9000, 10000, 12000,
    15000, 20000, 22000, 25000, 30000, 35000, 40000, 66000, 99000, 132000, 300000, 600000, 900000,
    1100000,
)
# fmt: on
# Triton `--metrics-config histogram_latencies=true`: nv_inference_first_response_histogram_ms.
TRITON_FIRST_RESPONSE_BUCKETS_MS = (100.0, 500.0, 2000.0, 5000.0)
# TGI's --max-input-tokens / --max-total-tokens defaults (4095 / 4096) size its token buckets.
TGI_MAX_INPUT_TOKENS = 4095
TGI_MAX_TOTAL_TOKENS = 4096
# tgi_batch_next_size has a bucket for every batch size from 1 to 1024 (router/src/server.rs).
TGI_BATCH_SIZE_BUCKETS = 1024
# trtllm-serve's default buckets (tensorrt_llm/metrics/collector.py).
TRTLLM_TTFT_BUCKETS: tuple[float, ...] = (
    *(0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0),
    *(2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0),
)
TRTLLM_TPOT_BUCKETS: tuple[float, ...] = (
    *(0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5),
    *(5.0, 7.5, 10.0, 20.0, 40.0, 80.0),
)
TRTLLM_LATENCY_BUCKETS: tuple[float, ...] = (
    *(0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0),
    *(120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0),
)
# LMDeploy hard-codes max_model_len = 4096 for its token histograms.
LMDEPLOY_MAX_MODEL_LEN = 4096


def build_1_2_5_buckets(max_value: int) -> list[float]:
    """1, 2, 5, 10, 20, 50, ... up to max_value (vLLM's and LMDeploy's token buckets)."""
    out: list[float] = []
    exponent = 0
    while True:
        for m in (1, 2, 5):
            value = m * 10**exponent
            if value > max_value:
                return out
            out.append(float(value))
        exponent += 1


def tgi_duration_buckets() -> list[float]:
    """TGI's 35 geometric duration buckets: 0.0001·1.5^k, k = 1..35 (router/src/server.rs)."""
    out: list[float] = []
    value = 0.0001
    for _ in range(35):
        value *= 1.5
        out.append(value)
    return out


def _linear_buckets(max_value: int, n: int = 100) -> list[float]:
    return [(max_value / n) * (x + 1) for x in range(n)]


def histogram_bounds(kind: str, max_model_len: int = 131072) -> dict[str, list[float]]:
    """Bucket bounds of every engine histogram slot as server `kind` reports them: in seconds
    for the slots named *_s, in tokens for *_tokens, in requests for next_batch_size."""
    check_server_kind(kind)
    tokens = build_1_2_5_buckets(max_model_len)
    b: dict[str, list[float]] = {
        "ttft_s": list(VLLM_TTFT_BUCKETS),
        "itl_s": list(VLLM_ITL_BUCKETS),
        "tpot_s": list(VLLM_ITL_BUCKETS),
        "e2e_s": list(VLLM_REQUEST_LATENCY_BUCKETS),
        "queue_s": list(VLLM_REQUEST_LATENCY_BUCKETS),
        "inference_s": list(VLLM_REQUEST_LATENCY_BUCKETS),
        "prefill_s": list(VLLM_REQUEST_LATENCY_BUCKETS),
        "decode_s": list(VLLM_REQUEST_LATENCY_BUCKETS),
        "prompt_tokens": tokens,
        "generation_tokens": list(tokens),
        "iteration_tokens": [float(x) for x in VLLM_ITERATION_TOKENS_BUCKETS],
        "mean_time_per_token_s": list(VLLM_ITL_BUCKETS),
        "next_batch_size": [float(x) for x in VLLM_ITERATION_TOKENS_BUCKETS],  # served by TGI only
        "ttft_at_end_s": list(TRTLLM_TTFT_BUCKETS),  # served by trtllm-serve only
        "forward_prefill_s": tgi_duration_buckets(),  # served by TGI only
        "forward_decode_s": tgi_duration_buckets(),  # served by TGI only
    }
    if kind == "sglang":
        b["ttft_s"] = [float(x) for x in SGLANG_TTFT_BUCKETS]
        b["itl_s"] = list(SGLANG_ITL_BUCKETS)
        b["e2e_s"] = [float(x) for x in SGLANG_E2E_BUCKETS]
        b["prompt_tokens"] = [float(x) for x in SGLANG_PROMPT_TOKENS_BUCKETS]
    elif kind == "tgi":
        for name in (
            "ttft_s",
            "itl_s",
            "tpot_s",
            "e2e_s",
            "queue_s",
            "inference_s",
            "prefill_s",
            "decode_s",
            "mean_time_per_token_s",
        ):
            b[name] = tgi_duration_buckets()
        b["prompt_tokens"] = _linear_buckets(TGI_MAX_INPUT_TOKENS)
        b["generation_tokens"] = _linear_buckets(TGI_MAX_TOTAL_TOKENS)
        b["next_batch_size"] = [float(x + 1) for x in range(TGI_BATCH_SIZE_BUCKETS)]
    elif kind == "triton":
        b["ttft_s"] = [ms / 1000.0 for ms in TRITON_FIRST_RESPONSE_BUCKETS_MS]
    elif kind == "trtllm":
        b["tpot_s"] = list(TRTLLM_TPOT_BUCKETS)
        b["e2e_s"] = list(TRTLLM_LATENCY_BUCKETS)
        b["queue_s"] = list(TRTLLM_LATENCY_BUCKETS)
    elif kind == "lmdeploy":
        b["prompt_tokens"] = build_1_2_5_buckets(LMDEPLOY_MAX_MODEL_LEN)
        b["generation_tokens"] = build_1_2_5_buckets(LMDEPLOY_MAX_MODEL_LEN)
    return b


def check_server_kind(kind: str) -> None:
    """Raise ValueError naming the kinds the simulator serves when it serves no `kind`."""
    if kind not in NAMED_SERVER_KINDS:
        known = ", ".join(NAMED_SERVER_KINDS)
        raise ValueError(f"unknown server kind {kind!r}; known: {known}")
