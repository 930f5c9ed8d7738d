"""NVIDIA Triton with the TensorRT-LLM backend (:8002/metrics, `tensorrtllm_backend` README).

Since 23.11 the batch manager's statistics are gauges `nv_trt_llm_*_metrics` (the first releases
named them `nv_trt_llm_*_statistics`; both are read), labelled `model`, `version` and one
dimension label. There is no token counter. Each engine iteration gives one token to every
generation request (without speculative decoding), so

    generation tokens/s = Δ iteration_counter / Δt × generation_requests

per model, with `generation_requests` (`inflight_batcher_specific_metric`) averaged over the two
scrapes because it is a snapshot; V1 (non-inflight) models report
`v1_specific_metric="total_generation_tokens"` instead. Prompt tokens use `total_context_tokens`
the same way. Running: `request_type="active"`; waiting: `request_type="waiting"` where the
build reports it.

TTFT comes from `nv_inference_first_response_histogram_ms` (in ms; opt-in with
`--metrics-config histogram_latencies=true`). Triton reports it per model, and with an ensemble
or BLS front the same requests show under several models (the `tensorrt_llm` model may read 0,
tensorrtllm_backend#49), so one model is read, not the sum: each window takes the model with the
most first responses in that window (Reading.request_copies), at both of its ends, and finished
requests from the same model's `nv_inference_request_success`. A choice by lifetime count would
flip between models whose counts cross, and the window of a flip would hold the other model's
whole history.
Reference: shared/reference/inference_server_metrics.md section 6.
"""

from __future__ import annotations

from collections.abc import Mapping

from powerd.sources.base import (
    Reading,
    SourceError,
    first_present,
    gauge_total,
    histogram,
    label_values,
    series_values,
)
from powerd.sources.exposition import Samples, Wanted
from powerd.sources.vllm import hist_names

_GENERAL = ("nv_trt_llm_general_metrics", "nv_trt_llm_general_statistics")
_BATCHER = ("nv_trt_llm_inflight_batcher_metrics", "nv_trt_llm_inflight_batcher_statistics")
_V1 = ("nv_trt_llm_v1_metrics", "nv_trt_llm_v1_statistics")
_REQUESTS = ("nv_trt_llm_request_metrics", "nv_trt_llm_request_statistics")
_FIRST_RESPONSE = "nv_inference_first_response_histogram_ms"
_SUCCESS = "nv_inference_request_success"
_KV_BLOCKS = ("nv_trt_llm_kv_cache_block_metrics", "nv_trt_llm_kv_cache_block_statistics")


def _first(samples: Samples, names: tuple[str, ...]) -> str:
    return first_present(samples, *names) or names[0]


def _per_iteration(
    samples: Samples, batcher_metric: str, v1_metric: str
) -> dict[tuple[tuple[str, str], ...], float] | None:
    values = series_values(
        samples,
        _first(samples, _BATCHER),
        select={"inflight_batcher_specific_metric": batcher_metric},
        drop=frozenset({"inflight_batcher_specific_metric"}),
    )
    if values:
        return values
    return series_values(
        samples,
        _first(samples, _V1),
        select={"v1_specific_metric": v1_metric},
        drop=frozenset({"v1_specific_metric"}),
    )


class TritonExtractor:
    kind = "triton"

    def __init__(self) -> None:
        self.wanted = Wanted.of(
            [
                *_GENERAL,
                *_BATCHER,
                *_V1,
                *_REQUESTS,
                *_KV_BLOCKS,
                _SUCCESS,
                *hist_names(_FIRST_RESPONSE),
            ]
        )

    def extract(self, samples: Samples, headers: Mapping[str, str]) -> Reading:
        general = _first(samples, _GENERAL)
        iterations = series_values(
            samples,
            general,
            select={"general_type": "iteration_counter"},
            drop=frozenset({"general_type"}),
        )
        if not iterations:
            raise SourceError(
                'has no nv_trt_llm_general_metrics{general_type="iteration_counter"} '
                "(is it Triton with the TensorRT-LLM backend?)"
            )
        reading = Reading(
            realtime=True, gen_mode="iterations", prompt_mode="iterations", prompt_per_chunk=True
        )
        reading.counters["iterations"] = iterations
        for name, batcher, v1 in (
            ("generation", "generation_requests", "total_generation_tokens"),
            ("prompt", "total_context_tokens", "total_context_tokens"),
        ):
            per = _per_iteration(samples, batcher, v1)
            if per is not None:
                reading.per_iteration[name] = per
        requests = _first(samples, _REQUESTS)
        for gauge, request_type in (("running", "active"), ("waiting", "waiting")):
            value = gauge_total(samples, requests, select={"request_type": request_type})
            if value is not None and _has(samples, requests, "request_type", request_type):
                reading.gauges[gauge] = value
        kv_usage = _kv_usage(samples)
        if kv_usage is not None:
            reading.gauges["kv_usage"] = kv_usage
        reading.request_copies = "model"
        ttft = histogram(samples, _FIRST_RESPONSE, scale=0.001)
        if ttft:
            reading.hists["ttft"] = ttft
        finished = series_values(samples, _SUCCESS)
        if finished:
            reading.counters["finished"] = finished
        reading.model_names = label_values(samples, (general,), ("model",))
        return reading


def _kv_usage(samples: Samples) -> float | None:
    """Used over max KV-cache blocks of the fullest model (None without both)."""
    blocks = _first(samples, _KV_BLOCKS)
    counts = {
        kind: series_values(
            samples,
            blocks,
            select={"kv_cache_block_type": kind},
            drop=frozenset({"kv_cache_block_type"}),
        )
        or {}
        for kind in ("used", "max")
    }
    used, most = counts["used"], counts["max"]
    usages = [used[key] / most[key] for key in used.keys() & most.keys() if most[key] > 0]
    return max(usages) if usages else None


def _has(samples: Samples, name: str, label: str, value: str) -> bool:
    return any(labels.get(label) == value for (labels, _k, _le), _v in samples.get(name, ()))


def triton_extractor() -> TritonExtractor:
    return TritonExtractor()
