"""Render a simulated engine's metrics the way a given inference server exposes them.

Names, labels, types, histogram buckets and which counters move at request end follow
inference_server_metrics.md and the servers' own code: vLLM `vllm/v1/metrics/loggers.py`,
SGLang `python/sglang/srt/metrics/collector.py`, TGI `router/src/server.rs` (rendered by
metrics-exporter-prometheus), llama.cpp `tools/server/server-context.cpp`, the TensorRT-LLM
backend README (Triton), NIM's observability page, LMDeploy `lmdeploy/metrics/loggers.py`.
The Python servers (vLLM, SGLang, NIM, LMDeploy) go through prometheus_client as they do
themselves; the others are written as their exporters write text.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timezone

import numpy as np
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from powerd.sim.buckets import check_server_kind
from powerd.sim.engine import EngineMetrics, HistogramSnapshot

CONTENT_TYPE_PROMETHEUS_0_0_4 = "text/plain; version=0.0.4; charset=utf-8"
# llama.cpp sets exactly this (server-context.cpp); metrics-exporter-prometheus and prometheus-cpp
# answer with the 0.0.4 text type.
CONTENT_TYPE_LLAMACPP = "text/plain; version=0.0.4"

SGLANG_LOADS_PATH = "/v1/loads"
SGLANG_VERSION = "0.5.8"
"""What a simulated SGLang reports as its version (a release that serves /v1/loads)."""
CONTENT_TYPE_JSON = "application/json"

TRITON_MODEL = "tensorrt_llm"


def metrics_path(kind: str) -> str:
    """The HTTP path server `kind` serves its metrics on (NIM: /v1/metrics, trtllm-serve:
    /prometheus/metrics)."""
    check_server_kind(kind)
    return {"nim": "/v1/metrics", "trtllm": "/prometheus/metrics"}.get(kind, "/metrics")


# ---------------------------------------------------------------------------------------------
# prometheus_client families


def _buckets(h: HistogramSnapshot, scale: float = 1.0) -> list[tuple[str, float]]:
    out = [
        (floatToGoString(b * scale), c)
        for b, c in zip(h.bounds, h.cumulative_counts[:-1], strict=True)
    ]
    out.append(("+Inf", h.count))
    return out


class _FamilyCollector(Collector):
    """Yields the families a builder makes from one snapshot (a registry per render)."""

    def __init__(self, build: Callable[[], Iterable[Metric]]) -> None:
        self._build = build

    def collect(self) -> Iterable[Metric]:
        return self._build()


class _Families:
    """Builds prometheus_client families with one fixed label set."""

    def __init__(
        self, label_names: Sequence[str], label_values: Sequence[str], created: float | None
    ) -> None:
        self.names = list(label_names)
        self.values = list(label_values)
        self.created = created
        self.out: list[Metric] = []

    def gauge(self, name: str, doc: str, value: float) -> None:
        g = GaugeMetricFamily(name, doc, labels=self.names)
        g.add_metric(self.values, value)
        self.out.append(g)

    def counter(
        self,
        name: str,
        doc: str,
        values: Sequence[tuple[Sequence[str], float]] | float,
        extra_labels: Sequence[str] = (),
    ) -> None:
        c = CounterMetricFamily(name, doc, labels=self.names + list(extra_labels))
        rows = [((), values)] if isinstance(values, (int, float)) else values
        for extra, v in rows:
            c.add_metric(self.values + list(extra), v, created=self.created)
        self.out.append(c)

    def histogram(self, name: str, doc: str, h: HistogramSnapshot, scale: float = 1.0) -> None:
        f = HistogramMetricFamily(name, doc, labels=self.names)
        f.add_metric(self.values, _buckets(h, scale), h.sum * scale)
        if self.created is not None:
            f.add_sample(
                name + "_created", dict(zip(self.names, self.values, strict=True)), self.created
            )
        self.out.append(f)


def _render_client(families: list[Metric]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_FamilyCollector(lambda: families))
    return generate_latest(registry)


def _process_start(f: _Families, m: EngineMetrics) -> None:
    g = GaugeMetricFamily(
        "process_start_time_seconds", "Start time of the process since unix epoch in seconds."
    )
    g.add_metric([], m.start_time_unix)
    f.out.append(g)


def _vllm(m: EngineMetrics, model_name: str) -> list[Metric]:
    v, h = m.values, m.histograms
    f = _Families(["model_name", "engine"], [model_name, "0"], m.start_time_unix)
    _process_start(f, m)
    f.gauge(
        "vllm:num_requests_running",
        "Number of requests in model execution batches.",
        v["num_running"],
    )
    f.gauge(
        "vllm:num_requests_waiting", "Number of requests waiting to be processed.", v["num_waiting"]
    )
    f.gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", v["kv_usage"])
    f.counter(
        "vllm:num_preemptions", "Cumulative number of preemption from the engine.", v["preemptions"]
    )
    # V1 adds a request's whole prompt in the step that gives its first token
    # (IterationStats.update_from_output), not chunk by chunk: a long prompt lands at once.
    f.counter("vllm:prompt_tokens", "Number of prefill tokens processed.", v["prompt_done_tokens"])
    f.counter(
        "vllm:generation_tokens", "Number of generation tokens processed.", v["generation_tokens"]
    )
    f.counter(
        "vllm:request_success",
        "Count of successfully processed requests.",
        [
            (("stop",), v["requests_success"]),
            (("length",), 0.0),
            (("abort",), v["requests_aborted"]),
        ],
        extra_labels=["finished_reason"],
    )
    f.histogram(
        "vllm:request_prompt_tokens", "Number of prefill tokens processed.", h["prompt_tokens"]
    )
    f.histogram(
        "vllm:request_generation_tokens",
        "Number of generation tokens processed.",
        h["generation_tokens"],
    )
    f.histogram(
        "vllm:iteration_tokens_total",
        "Histogram of number of tokens per engine_step.",
        h["iteration_tokens"],
    )
    f.histogram(
        "vllm:time_to_first_token_seconds",
        "Histogram of time to first token in seconds.",
        h["ttft_s"],
    )
    f.histogram(
        "vllm:inter_token_latency_seconds",
        "Histogram of inter-token latency in seconds.",
        h["itl_s"],
    )
    f.histogram(
        "vllm:request_time_per_output_token_seconds",
        "Histogram of time_per_output_token_seconds per request.",
        h["tpot_s"],
    )
    f.histogram(
        "vllm:e2e_request_latency_seconds",
        "Histogram of e2e request latency in seconds.",
        h["e2e_s"],
    )
    f.histogram(
        "vllm:request_queue_time_seconds",
        "Histogram of time spent in WAITING phase for request.",
        h["queue_s"],
    )
    f.histogram(
        "vllm:request_inference_time_seconds",
        "Histogram of time spent in RUNNING phase for request.",
        h["inference_s"],
    )
    f.histogram(
        "vllm:request_prefill_time_seconds",
        "Histogram of time spent in PREFILL phase for request.",
        h["prefill_s"],
    )
    f.histogram(
        "vllm:request_decode_time_seconds",
        "Histogram of time spent in DECODE phase for request.",
        h["decode_s"],
    )
    return f.out


def _nim(m: EngineMetrics, model_name: str) -> list[Metric]:
    v, h = m.values, m.histograms
    f = _Families(["model_name"], [model_name], None)
    _process_start(f, m)
    f.gauge(
        "num_requests_running", "Number of requests currently running on GPU.", v["num_running"]
    )
    f.gauge("num_requests_waiting", "Number of requests waiting to be processed.", v["num_waiting"])
    f.gauge("num_request_max", "Max number of concurrently running requests.", v["max_batch"])
    f.gauge("gpu_cache_usage_perc", "GPU KV-cache usage. 1 means 100 percent usage.", v["kv_usage"])
    f.counter("prompt_tokens", "Number of prefill tokens processed.", v["prompt_done_tokens"])
    f.counter("generation_tokens", "Number of generation tokens processed.", v["generation_tokens"])
    f.counter(
        "request_success",
        "Count of successfully processed requests.",
        [(("stop",), v["requests_success"])],
        extra_labels=["finished_reason"],
    )
    f.histogram(
        "time_to_first_token_seconds", "Histogram of time to first token in seconds.", h["ttft_s"]
    )
    f.histogram(
        "time_per_output_token_seconds",
        "Histogram of time per output token in seconds.",
        h["itl_s"],
    )
    f.histogram(
        "e2e_request_latency_seconds",
        "Histogram of end to end request latency in seconds.",
        h["e2e_s"],
    )
    f.histogram("request_prompt_tokens", "Number of prefill tokens processed.", h["prompt_tokens"])
    f.histogram(
        "request_generation_tokens",
        "Number of generation tokens processed.",
        h["generation_tokens"],
    )
    return f.out


def _trtllm(m: EngineMetrics, model_name: str) -> list[Metric]:
    """trtllm-serve with return_perf_metrics and enable_iter_perf_stats on (collector.py)."""
    v, h = m.values, m.histograms
    f = _Families(["model_name", "engine_type"], [model_name, "trtllm"], m.start_time_unix)
    f.gauge("trtllm_num_requests_running", "Number of active requests", v["num_running"])
    f.gauge("trtllm_num_requests_waiting", "Number of queued requests", v["num_waiting"])
    f.gauge("trtllm_kv_cache_utilization", "KV cache utilization", v["kv_usage"])
    # log_request_metrics_dict: every per-request figure is recorded when the request ends.
    f.counter(
        "trtllm_request_success",
        "Count of successfully processed requests.",
        [(("stop",), v["requests_success"])],
        extra_labels=["finished_reason"],
    )
    f.counter(
        "trtllm_prompt_tokens",
        "Cumulative number of prompt (input) tokens processed.",
        v["finished_prompt_tokens"],
    )
    f.counter(
        "trtllm_generation_tokens",
        "Cumulative number of generation (output) tokens produced.",
        v["finished_generation_tokens"],
    )
    f.histogram(
        "trtllm_time_to_first_token_seconds",
        "Histogram of time to first token in seconds.",
        h["ttft_at_end_s"],
    )
    f.histogram(
        "trtllm_time_per_output_token_seconds",
        "Histogram of time per output token in seconds.",
        h["tpot_s"],
    )
    f.histogram(
        "trtllm_e2e_request_latency_seconds",
        "Histogram of end to end request latency in seconds.",
        h["e2e_s"],
    )
    f.histogram(
        "trtllm_request_queue_time_seconds",
        "Histogram of time spent in WAITING phase for request.",
        h["queue_s"],
    )
    return f.out


def _sglang(m: EngineMetrics, model_name: str) -> list[Metric]:
    """A server launched with --enable-metrics --collect-tokens-histogram."""
    v, h = m.values, m.histograms
    # SGLang runs prometheus_client in multiprocess mode, which writes no _created series.
    f = _Families(
        ["model_name", "engine_type", "tp_rank", "pp_rank"], [model_name, "unified", "0", "0"], None
    )
    _process_start(f, m)
    f.gauge("sglang:num_running_reqs", "The number of running requests.", v["num_running"])
    f.gauge("sglang:num_used_tokens", "The number of used tokens.", v["kv_used_tokens"])
    f.gauge("sglang:token_usage", "The token usage.", v["kv_usage"])
    f.gauge(
        "sglang:gen_throughput",
        "The generation throughput (token/s).",
        v["gen_throughput_tokens_per_s"],
    )
    f.gauge(
        "sglang:num_queue_reqs", "The number of requests in the waiting queue.", v["num_waiting"]
    )
    f.gauge("sglang:cache_hit_rate", "The prefix cache hit rate.", 0.0)
    f.gauge(
        "sglang:max_total_num_tokens",
        "Maximum total number of tokens in the KV cache pool.",
        v["kv_capacity_tokens"],
    )
    # Token counters move when a request finishes (observe_one_finished_request).
    f.counter(
        "sglang:prompt_tokens", "Number of prefill tokens processed.", v["finished_prompt_tokens"]
    )
    f.counter(
        "sglang:generation_tokens",
        "Number of generation tokens processed.",
        v["finished_generation_tokens"],
    )
    f.counter("sglang:cached_tokens", "Number of cached prompt tokens.", 0.0)
    f.counter("sglang:num_requests", "Number of requests processed.", v["requests_success"])
    f.counter("sglang:num_aborted_requests", "Number of requests aborted.", v["requests_aborted"])
    f.counter(
        "sglang:realtime_tokens",
        "Number of tokens processed, updated on each log interval.",
        [
            (("prefill_compute",), v["realtime_prefill_tokens"]),
            (("prefill_cache",), 0.0),
            (("decode",), v["realtime_decode_tokens"]),
        ],
        extra_labels=["mode"],
    )
    f.histogram(
        "sglang:time_to_first_token_seconds",
        "Histogram of time to first token in seconds.",
        h["ttft_s"],
    )
    f.histogram(
        "sglang:inter_token_latency_seconds",
        "Histogram of inter-token latency in seconds.",
        h["itl_s"],
    )
    f.histogram(
        "sglang:e2e_request_latency_seconds",
        "Histogram of End-to-end request latency in seconds",
        h["e2e_s"],
    )
    f.histogram(
        "sglang:prompt_tokens_histogram", "Histogram of prompt token length.", h["prompt_tokens"]
    )
    return f.out


def _lmdeploy(m: EngineMetrics, model_name: str) -> list[Metric]:
    v, h = m.values, m.histograms
    # lmdeploy calls prometheus_client.disable_created_metrics().
    f = _Families(["model_name", "engine"], [model_name, "0"], None)
    _process_start(f, m)
    f.gauge(
        "lmdeploy:num_requests_running",
        "Number of requests in model execution batches.",
        v["num_running"],
    )
    f.gauge(
        "lmdeploy:num_requests_waiting",
        "Number of requests waiting to be processed.",
        v["num_waiting"],
    )
    f.gauge(
        "lmdeploy:num_api_requests_waiting",
        "Number of API requests waiting to be processed.",
        v["num_waiting"],
    )
    f.gauge(
        "lmdeploy:gpu_cache_usage_perc",
        "GPU KV-cache usage. 1 means 100 percent usage.",
        v["kv_usage"],
    )
    f.counter(
        "lmdeploy:prompt_tokens", "Number of prefill tokens processed.", v["prompt_done_tokens"]
    )
    f.counter(
        "lmdeploy:generation_tokens",
        "Number of generation tokens processed.",
        v["generation_tokens"],
    )
    f.counter(
        "lmdeploy:request_success",
        "Count of successfully processed requests.",
        v["requests_success"],
    )
    f.histogram(
        "lmdeploy:request_prompt_tokens", "Number of prefill tokens processed.", h["prompt_tokens"]
    )
    f.histogram(
        "lmdeploy:request_generation_tokens",
        "Number of generation tokens processed.",
        h["generation_tokens"],
    )
    f.histogram(
        "lmdeploy:time_to_first_token_seconds",
        "Histogram of time to first token in seconds.",
        h["ttft_s"],
    )
    f.histogram(
        "lmdeploy:time_per_output_token_seconds",
        "Histogram of time per output token in seconds.",
        h["tpot_s"],
    )
    f.histogram(
        "lmdeploy:iter_token_latency", "Histogram of inter-token latency in seconds.", h["itl_s"]
    )
    f.histogram(
        "lmdeploy:e2e_request_latency_seconds",
        "Histogram of e2e request latency in seconds.",
        h["e2e_s"],
    )
    f.histogram(
        "lmdeploy:request_queue_time_seconds",
        "Histogram of time spent in WAITING phase for request.",
        h["queue_s"],
    )
    return f.out


def render_sglang_loads(
    engine_metrics: EngineMetrics,
    waiting_uncached_tokens: float,
    waiting_queue_tokens: float,
    *,
    now_unix: float | None = None,
    version: str = SGLANG_VERSION,
) -> tuple[bytes, str, dict[str, str]]:
    """(body, content type, extra headers) of SGLang's `GET /v1/loads` for one server (a
    single data-parallel rank, dp_rank 0).

    waiting_uncached_tokens: prompt tokens still to prefill (running remainders plus the
    waiting queue; the simulator has no prefix cache). waiting_queue_tokens: the waiting
    queue's sequence lengths, which num_total_tokens adds to the KV tokens in use.
    gen_throughput is the engine's SGLang gen_throughput gauge (decode tokens per second over
    the last decode log interval), the figure sglang:gen_throughput reports.
    """
    now = time.time() if now_unix is None else now_unix
    v = engine_metrics.values
    used = int(v["kv_used_tokens"])
    rank = {
        "dp_rank": 0,
        "timestamp": now,
        "num_running_reqs": int(v["num_running"]),
        "num_waiting_reqs": int(v["num_waiting"]),
        "num_waiting_uncached_tokens": int(waiting_uncached_tokens),
        "num_used_tokens": used,
        "num_total_tokens": used + int(waiting_queue_tokens),
        "max_total_num_tokens": int(v["kv_capacity_tokens"]),
        "max_running_requests": int(v["max_batch"]),
        "token_usage": float(v["kv_usage"]),
        "gen_throughput": float(v["gen_throughput_tokens_per_s"]),
        "cache_hit_rate": 0.0,
        "utilization": 0.0,
    }
    document = {
        "timestamp": datetime.fromtimestamp(now, tz=timezone.utc).isoformat(),
        "version": version,
        "loads": [rank],
    }
    return json.dumps(document, separators=(",", ":")).encode(), CONTENT_TYPE_JSON, {}


# ---------------------------------------------------------------------------------------------
# Hand-written text formats


def _rust_number(v: float) -> str:
    """f64/u64 as Rust's Display prints them (metrics-exporter-prometheus): no exponent."""
    if float(v).is_integer() and abs(v) < 1e16:
        return str(int(v))
    return np.format_float_positional(v, trim="-")


@functools.lru_cache(maxsize=64)
def _rust_bucket_prefixes(
    name: str, bounds: tuple[float, ...], labels: str = ""
) -> tuple[str, ...]:
    """`name_bucket{labels,le="..."} ` for every finite bound, as TGI renders them."""
    before = f"{labels}," if labels else ""
    return tuple(f'{name}_bucket{{{before}le="{_rust_number(b)}"}} ' for b in bounds)


def _tgi(m: EngineMetrics) -> bytes:
    v, h = m.values, m.histograms
    lines: list[str] = []

    def scalar(name: str, typ: str, value: float, labels: str = "") -> None:
        lines.append(f"# TYPE {name} {typ}")
        lines.append(f"{name}{labels} {_rust_number(value)}")

    scalar("tgi_request_count", "counter", v["requests_arrived"])
    scalar("tgi_request_success", "counter", v["requests_success"])
    lines.append("# TYPE tgi_request_failure counter")
    lines.append(f'tgi_request_failure{{err="validation"}} {_rust_number(v["requests_aborted"])}')
    lines.append("# TYPE tgi_batch_inference_count counter")
    lines.append(
        f'tgi_batch_inference_count{{method="prefill"}} {_rust_number(v["prefill_batches"])}'
    )
    lines.append(
        f'tgi_batch_inference_count{{method="decode"}} {_rust_number(v["decode_batches"])}'
    )
    # Every generation sent (a request's tokens from one forward call) is observed with the
    # tokens past its first (backend.rs); without --speculate that is none, in bucket 0.
    generations = _rust_number(v["generation_tokens"])
    lines.append("# TYPE tgi_request_skipped_tokens histogram")
    lines.append(f'tgi_request_skipped_tokens_bucket{{le="0"}} {generations}')
    lines.append(f'tgi_request_skipped_tokens_bucket{{le="+Inf"}} {generations}')
    lines.append("tgi_request_skipped_tokens_sum 0")
    lines.append(f"tgi_request_skipped_tokens_count {generations}")
    scalar("tgi_queue_size", "gauge", v["num_waiting"])
    scalar("tgi_batch_current_size", "gauge", v["num_running"])
    scalar("tgi_batch_current_max_tokens", "gauge", v["kv_used_tokens"])
    scalar("tgi_batch_max_total_tokens", "gauge", v["kv_capacity_tokens"])
    # Request-level histograms are recorded once per finished request (server.rs); the size of
    # each batch of queued requests admitted, when the queue hands it over (queue.rs).
    # The forward pass of every prefill and decode call, as its batching task times them
    # (backend.rs): an iteration with prompt work is a prefill call.
    typed: set[str] = set()
    for name, slot, labels in (
        ("tgi_request_queue_duration", "queue_s", ""),
        ("tgi_request_inference_duration", "inference_s", ""),
        ("tgi_request_duration", "e2e_s", ""),
        ("tgi_request_mean_time_per_token_duration", "mean_time_per_token_s", ""),
        ("tgi_request_input_length", "prompt_tokens", ""),
        ("tgi_request_generated_tokens", "generation_tokens", ""),
        ("tgi_batch_next_size", "next_batch_size", ""),
        ("tgi_batch_forward_duration", "forward_prefill_s", 'method="prefill"'),
        ("tgi_batch_forward_duration", "forward_decode_s", 'method="decode"'),
    ):
        hist = h[slot]
        if name not in typed:
            lines.append(f"# TYPE {name} histogram")
            typed.add(name)
        prefixes = _rust_bucket_prefixes(name, hist.bounds, labels)
        counts = hist.cumulative_counts
        lines.extend(
            prefix + (str(int(c)) if c.is_integer() else _rust_number(c))
            for prefix, c in zip(prefixes, counts[:-1], strict=True)
        )
        series = f"{{{labels}}}" if labels else ""
        inf_labels = f"{labels}," if labels else ""
        lines.append(f'{name}_bucket{{{inf_labels}le="+Inf"}} {_rust_number(hist.count)}')
        lines.append(f"{name}_sum{series} {_rust_number(hist.sum)}")
        lines.append(f"{name}_count{series} {_rust_number(hist.count)}")
    return ("\n".join(lines) + "\n").encode()


def _llamacpp(m: EngineMetrics) -> bytes:
    v = m.values
    iterations = v["iterations"]
    prompt_s = v["llamacpp_bucket_prompt_s"]
    pred_s = v["llamacpp_bucket_predicted_s"]
    # Seconds totals are whole milliseconds / 1e3 (a uint64 cast before the division).
    defs = (
        (
            "counter",
            "prompt_tokens_total",
            "Number of prompt tokens processed.",
            v["prompt_done_tokens"],
        ),
        (
            "counter",
            "prompt_seconds_total",
            "Prompt process time",
            float(int(v["prompt_done_s"] * 1e3)) / 1e3,
        ),
        (
            "counter",
            "tokens_predicted_total",
            "Number of generation tokens processed.",
            v["finished_generation_tokens"],
        ),
        (
            "counter",
            "tokens_predicted_seconds_total",
            "Predict process time",
            float(int(v["finished_decode_s"] * 1e3)) / 1e3,
        ),
        ("counter", "n_decode_total", "Total number of llama_decode() calls", iterations),
        ("counter", "n_tokens_max", "Largest observed n_tokens.", v["n_tokens_max"]),
        (
            "counter",
            "n_busy_slots_per_decode",
            "Average number of busy slots per llama_decode() call",
            v["busy_slots"] / max(iterations, 1.0),
        ),
        (
            "gauge",
            "prompt_tokens_seconds",
            "Average prompt throughput in tokens/s.",
            v["llamacpp_bucket_prompt_tokens"] / prompt_s if prompt_s > 0 else 0.0,
        ),
        (
            "gauge",
            "predicted_tokens_seconds",
            "Average generation throughput in tokens/s.",
            v["llamacpp_bucket_predicted_tokens"] / pred_s if pred_s > 0 else 0.0,
        ),
        ("gauge", "requests_processing", "Number of requests processing.", v["num_running"]),
        ("gauge", "requests_deferred", "Number of requests deferred.", v["num_waiting"]),
    )
    lines: list[str] = []
    for typ, name, doc, value in defs:
        lines.append(f"# HELP llamacpp:{name} {doc}")
        lines.append(f"# TYPE llamacpp:{name} {typ}")
        lines.append(f"llamacpp:{name} {value:g}")
    return ("\n".join(lines) + "\n").encode()


def _cpp_number(v: float) -> str:
    """A double as prometheus-cpp writes it (max_digits10 - 1 significant digits)."""
    return f"{v:.16g}"


def _triton(m: EngineMetrics, histograms: bool, now_unix: float) -> bytes:
    v, h = m.values, m.histograms
    base = f'model="{TRITON_MODEL}",version="1"'
    lines: list[str] = []

    def family(name: str, doc: str, typ: str, rows: Sequence[tuple[str, float]]) -> None:
        lines.append(f"# HELP {name} {doc}")
        lines.append(f"# TYPE {name} {typ}")
        for labels, value in rows:
            lines.append(f"{name}{{{labels}}} {_cpp_number(value)}")

    def dim(key: str, value: str) -> str:
        # prometheus-cpp writes labels sorted by name.
        pairs = sorted([("model", TRITON_MODEL), ("version", "1"), (key, value)])
        return ",".join(f'{k}="{x}"' for k, x in pairs)

    tokens_per_block = 64.0
    max_blocks = float(int(v["kv_capacity_tokens"] // tokens_per_block))
    used_blocks = float(int(-(-v["kv_used_tokens"] // tokens_per_block)))
    family(
        "nv_trt_llm_request_metrics",
        "TRT LLM request metrics",
        "gauge",
        [
            (dim("request_type", "waiting"), v["num_waiting"]),
            (dim("request_type", "context"), v["iter_context_requests"]),
            (
                dim("request_type", "scheduled"),
                v["iter_context_requests"] + v["iter_generation_requests"],
            ),
            (dim("request_type", "max"), v["max_batch"]),
            (dim("request_type", "active"), v["num_running"]),
        ],
    )
    family(
        "nv_trt_llm_kv_cache_block_metrics",
        "TRT LLM KV cache block metrics",
        "gauge",
        [
            (
                dim("kv_cache_block_type", "fraction"),
                used_blocks / max_blocks if max_blocks else 0.0,
            ),
            (dim("kv_cache_block_type", "tokens_per"), tokens_per_block),
            (dim("kv_cache_block_type", "used"), used_blocks),
            (dim("kv_cache_block_type", "free"), max(max_blocks - used_blocks, 0.0)),
            (dim("kv_cache_block_type", "max"), max_blocks),
        ],
    )
    family(
        "nv_trt_llm_inflight_batcher_metrics",
        "TRT LLM inflight_batcher-specific metrics",
        "gauge",
        [
            (dim("inflight_batcher_specific_metric", "paused_requests"), 0.0),
            (dim("inflight_batcher_specific_metric", "micro_batch_id"), 0.0),
            (
                dim("inflight_batcher_specific_metric", "generation_requests"),
                v["iter_generation_requests"],
            ),
            (
                dim("inflight_batcher_specific_metric", "total_context_tokens"),
                v["iter_context_tokens"],
            ),
        ],
    )
    family(
        "nv_trt_llm_general_metrics",
        "General TRT LLM metrics",
        "gauge",
        [
            (dim("general_type", "iteration_counter"), v["iterations"]),
            (dim("general_type", "timestamp"), float(int(now_unix))),
        ],
    )
    # Triton core counters are cumulative per model, in microseconds, without _total.
    for name, doc, value in (
        (
            "nv_inference_request_success",
            "Number of successful inference requests, all batch sizes",
            v["requests_success"],
        ),
        (
            "nv_inference_request_failure",
            "Number of failed inference requests, all batch sizes",
            v["requests_aborted"],
        ),
        (
            "nv_inference_count",
            "Number of inferences performed (does not include cached requests)",
            v["requests_success"],
        ),
        (
            "nv_inference_exec_count",
            "Number of model executions performed (does not include cached requests)",
            v["requests_success"],
        ),
        (
            "nv_inference_request_duration_us",
            "Cumulative inference request duration in microseconds (includes cached requests)",
            float(int(v["finished_e2e_s"] * 1e6)),
        ),
        (
            "nv_inference_queue_duration_us",
            "Cumulative inference queuing duration in microseconds (includes cached requests)",
            float(int(v["finished_queue_s"] * 1e6)),
        ),
        (
            "nv_inference_compute_infer_duration_us",
            "Cumulative compute inference duration in microseconds (does not include cached "
            "requests)",
            float(int(v["finished_inference_s"] * 1e6)),
        ),
    ):
        family(name, doc, "counter", [(base, value)])
    family(
        "nv_inference_pending_request_count",
        "Instantaneous number of pending requests awaiting execution per-model.",
        "gauge",
        [(base, v["num_waiting"])],
    )
    if histograms:
        ttft = h["ttft_s"]
        name = "nv_inference_first_response_histogram_ms"
        lines.append(f"# HELP {name} Duration from request to first response in milliseconds")
        lines.append(f"# TYPE {name} histogram")
        lines.append(f"{name}_count{{{base}}} {_cpp_number(ttft.count)}")
        lines.append(f"{name}_sum{{{base}}} {_cpp_number(ttft.sum * 1e3)}")
        for b, c in zip(ttft.bounds, ttft.cumulative_counts[:-1], strict=True):
            lines.append(f'{name}_bucket{{{base},le="{_cpp_number(b * 1e3)}"}} {_cpp_number(c)}')
        lines.append(f'{name}_bucket{{{base},le="+Inf"}} {_cpp_number(ttft.count)}')
    return ("\n".join(lines) + "\n").encode()


def render_metrics(
    engine_metrics: EngineMetrics,
    kind: str,
    model_name: str,
    *,
    triton_histograms: bool = False,
    now_unix: float | None = None,
) -> tuple[bytes, str, dict[str, str]]:
    """(body, content type, extra headers) of a GET of server `kind`'s metrics endpoint.

    model_name is the served model name (label `model_name`); Triton reports its model
    repository name (`tensorrt_llm`) instead and TGI/llama.cpp carry no model label.
    triton_histograms adds Triton's opt-in nv_inference_first_response_histogram_ms.
    """
    check_server_kind(kind)
    now = time.time() if now_unix is None else now_unix
    if kind == "vllm":
        return _render_client(_vllm(engine_metrics, model_name)), CONTENT_TYPE_PROMETHEUS_0_0_4, {}
    if kind == "nim":
        return _render_client(_nim(engine_metrics, model_name)), CONTENT_TYPE_PROMETHEUS_0_0_4, {}
    if kind == "trtllm":
        families = _trtllm(engine_metrics, model_name)
        return _render_client(families), CONTENT_TYPE_PROMETHEUS_0_0_4, {}
    if kind == "sglang":
        body = _render_client(_sglang(engine_metrics, model_name))
        return body, CONTENT_TYPE_PROMETHEUS_0_0_4, {}
    if kind == "lmdeploy":
        body = _render_client(_lmdeploy(engine_metrics, model_name))
        return body, CONTENT_TYPE_PROMETHEUS_0_0_4, {}
    if kind == "tgi":
        return _tgi(engine_metrics), CONTENT_TYPE_PROMETHEUS_0_0_4, {}
    if kind == "llamacpp":
        headers = {"Process-Start-Time-Unix": str(int(engine_metrics.start_time_unix))}
        return _llamacpp(engine_metrics), CONTENT_TYPE_LLAMACPP, headers
    return _triton(engine_metrics, triton_histograms, now), CONTENT_TYPE_PROMETHEUS_0_0_4, {}
