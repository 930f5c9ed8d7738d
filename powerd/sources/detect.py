"""Recognise a server family from one scrape of its metrics."""

from __future__ import annotations

from powerd.sources.base import SourceError
from powerd.sources.exposition import ExpositionError, sample_names

# Checked in order: Triton's vllm_backend re-exports `vllm:*` next to `nv_inference_*`, so the
# TensorRT-LLM gauges must decide before the vLLM names do.
_PREFIXES = (
    ("nv_trt_llm_", "triton"),
    ("sglang:", "sglang"),
    ("lmdeploy:", "lmdeploy"),
    ("llamacpp:", "llamacpp"),
    ("vllm:", "vllm"),
    ("tgi_", "tgi"),
    ("trtllm_", "trtllm"),
)
# NIM for LLMs serves vLLM's names without the prefix.
_NIM_NAMES = frozenset({"generation_tokens_total", "num_requests_running"})
# trtllm-serve releases before the `trtllm_` names served a few request histograms under
# vLLM's unprefixed names and no token counter.
_UNPREFIXED_TTFT = "time_to_first_token_seconds_count"


def detect_kind(body: bytes | str, url: str = "the server") -> str:
    """The kind of server that produced a metrics body.

    Raises SourceError (one sentence) when the body is not an exposition or carries no metric
    family that powerd knows.
    """
    try:
        names = sample_names(body)
    except ExpositionError as exc:
        raise SourceError(f"{url} is not a Prometheus exposition: {exc}") from None
    for prefix, kind in _PREFIXES:
        if any(name.startswith(prefix) for name in names):
            return kind
    if names & _NIM_NAMES:
        return "nim"
    if _UNPREFIXED_TTFT in names:
        raise SourceError(
            f"{url} looks like an early trtllm-serve, which exports no token counter; powerd "
            "reads releases with the trtllm_* metrics (kind: trtllm)"
        )
    if not names:
        raise SourceError(f"{url} serves no metrics yet; set kind explicitly or retry later")
    shown = ", ".join(sorted(names)[:3])
    raise SourceError(
        f"{url} serves no metrics of a known inference server (vLLM, SGLang, TGI, llama.cpp, "
        f"Triton TensorRT-LLM, NIM, LMDeploy, trtllm-serve; first names seen: {shown}); "
        "set kind: generic and name its metrics"
    )
