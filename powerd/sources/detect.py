"""Recognise a server family from one scrape of its metrics.

Detection keys on the names a server family owns. A malformed line elsewhere in the body (a
third-party collector's) does not hide them: the kind is found, the line is logged once, and the
source then reads the body as it would with that kind configured, which rejects a bad line only
in the families it reads. Without a known family, the first malformed line is the error.
"""

from __future__ import annotations

import logging

from powerd.sources.base import SourceError
from powerd.sources.exposition import scan_names

log = logging.getLogger(__name__)

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
    """The kind of server that produced a metrics body, from its well-formed samples.

    Raises SourceError (one sentence) when the body carries no metric family that powerd knows:
    naming its first malformed line when it has one, as the body is then not an exposition.
    """
    names, bad = scan_names(body)
    kind = _known_kind(names)
    if kind is not None:
        if bad is not None:
            log.warning(
                "%s reads as kind %s; its metrics have a malformed line (%s), an error only if "
                "it is among the lines powerd reads for that kind",
                url,
                kind,
                bad,
            )
        return kind
    if bad is not None:
        raise SourceError(f"{url} is not a Prometheus exposition: {bad}")
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


def _known_kind(names: set[str]) -> str | None:
    for prefix, kind in _PREFIXES:
        if any(name.startswith(prefix) for name in names):
            return kind
    if names & _NIM_NAMES:
        return "nim"
    return None
