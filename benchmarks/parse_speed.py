"""Parse speed of powerd's selective exposition parser on a big vLLM scrape.

Builds a ~200 KB vLLM V1 /metrics body with prometheus_client (the library vLLM uses), with the
metric families and bucket layouts of `vllm/v1/metrics/loggers.py`, several `model_name` values
(LoRA adapters) and data-parallel `engine` labels, plus the process, Python and HTTP families a
real vLLM API server adds. Then it times:

- powerd: parse + extract + rates, the work of one `Source.poll` without the HTTP fetch, with a
  fresh label cache each round ("cold") and with the cache a running daemon keeps ("warm");
- prometheus_client's `text_string_to_metric_families` (a full parse, no extraction).

Usage: python benchmarks/parse_speed.py [--engines 3] [--models 2] [--rounds 200]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from powerd.config import ServerConfig
from powerd.model import ServerSample
from powerd.sources import FetchResponse, make_source

TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5]
TTFT_BUCKETS += [5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5]
ITL_BUCKETS += [5.0, 7.5, 10.0, 20.0, 40.0, 80.0]
REQUEST_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0]
REQUEST_BUCKETS += [60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]
TOKEN_BUCKETS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000]
TOKEN_BUCKETS += [100000]


def build_vllm_bodies(engines: int, models: int, scrapes: int, seed: int = 0) -> list[bytes]:
    """Consecutive scrapes of a vLLM V1 exposition with engines x models series per family.

    Every scrape adds tokens and latency observations, so rates and quantiles are computed.
    """
    rng = random.Random(seed)
    reg = CollectorRegistry()
    labels = ["model_name", "engine"]
    gauges = [
        Gauge(name, "doc", labels, registry=reg)
        for name in (
            "vllm:num_requests_running",
            "vllm:num_requests_waiting",
            "vllm:gpu_cache_usage_perc",
            "vllm:kv_cache_usage_perc",
        )
    ]
    counters = [
        Counter(name, "doc", labels, registry=reg)
        for name in (
            "vllm:gpu_prefix_cache_queries",
            "vllm:gpu_prefix_cache_hits",
            "vllm:prefix_cache_queries",
            "vllm:prefix_cache_hits",
            "vllm:num_preemptions",
            "vllm:prompt_tokens",
            "vllm:generation_tokens",
        )
    ]
    success = Counter("vllm:request_success", "doc", [*labels, "finished_reason"], registry=reg)
    hists = [
        Histogram(name, "doc", labels, buckets=buckets, registry=reg)
        for name, buckets in (
            ("vllm:request_prompt_tokens", TOKEN_BUCKETS),
            ("vllm:request_generation_tokens", TOKEN_BUCKETS),
            ("vllm:iteration_tokens_total", [1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048]),
            ("vllm:request_params_n", [1, 2, 5, 10, 20]),
            ("vllm:request_params_max_tokens", TOKEN_BUCKETS),
            ("vllm:time_to_first_token_seconds", TTFT_BUCKETS),
            ("vllm:time_per_output_token_seconds", ITL_BUCKETS),
            ("vllm:inter_token_latency_seconds", ITL_BUCKETS),
            ("vllm:request_time_per_output_token_seconds", ITL_BUCKETS),
            ("vllm:e2e_request_latency_seconds", REQUEST_BUCKETS),
            ("vllm:request_queue_time_seconds", REQUEST_BUCKETS),
            ("vllm:request_inference_time_seconds", REQUEST_BUCKETS),
            ("vllm:request_prefill_time_seconds", REQUEST_BUCKETS),
            ("vllm:request_decode_time_seconds", REQUEST_BUCKETS),
        )
    ]
    http = Histogram(
        "http_request_duration_seconds",
        "doc",
        ["handler", "method"],
        buckets=[0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 2.5, 3, 5, 10],
        registry=reg,
    )
    for handler in ("/v1/completions", "/v1/chat/completions", "/metrics", "/health"):
        http.labels(handler, "POST").observe(rng.random())
    bodies = []
    for _ in range(scrapes):
        for m in range(models):
            model = "meta-llama/Llama-3.1-8B-Instruct" if m == 0 else f"lora-adapter-{m}"
            for e in range(engines):
                values = (model, str(e))
                for g in gauges:
                    g.labels(*values).set(rng.random() * 10)
                for c in counters:
                    c.labels(*values).inc(rng.randint(1, 10**4))
                for reason in ("stop", "length", "abort"):
                    success.labels(*values, reason).inc(rng.randint(1, 10))
                for h in hists:
                    series = h.labels(*values)
                    for _ in range(20):
                        series.observe(rng.expovariate(2.0))
        bodies.append(generate_latest(reg))
    return bodies


def _time(fn: Callable[[], object], rounds: int) -> list[float]:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--engines", type=int, default=3)
    ap.add_argument("--models", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=200)
    args = ap.parse_args(argv)

    scrapes = 20
    bodies = build_vllm_bodies(args.engines, args.models, scrapes)
    body = bodies[0]
    text = body.decode()
    lines = body.count(b"\n")
    print(
        f"body: {len(body) / 1024:.0f} KiB, {lines} lines, {args.engines} engines x "
        f"{args.models} model_name values"
    )

    config = ServerConfig(name="bench", url="http://127.0.0.1:8000/metrics", kind="vllm")
    responses = [FetchResponse(status=200, body=b, headers={}) for b in bodies]
    state = {"i": 0}
    clock = {"now_s": 0.0}

    def rotating(url: str, timeout_s: float) -> FetchResponse:
        # Wraps around after the last scrape: one reset in `scrapes` polls.
        response = responses[state["i"] % scrapes]
        state["i"] += 1
        return response

    warm_source = make_source(config, fetch=rotating)

    def warm() -> ServerSample:
        clock["now_s"] += 1.0
        return warm_source.poll(clock["now_s"])

    def cold() -> ServerSample:
        source = make_source(config, fetch=lambda url, timeout_s: responses[0])
        return source.poll(1.0)

    def reference() -> int:
        return sum(1 for _ in text_string_to_metric_families(text))

    warm()
    results = {
        "powerd (cold label cache)": _time(cold, args.rounds),
        "powerd (warm, as polled)": _time(warm, args.rounds),
        "prometheus_client": _time(reference, max(10, args.rounds // 10)),
    }
    print(f"{'parse + extract':28s} {'min ms':>8s} {'median ms':>10s}")
    for name, times in results.items():
        print(f"{name:28s} {min(times):8.2f} {statistics.median(times):10.2f}")
    sample = warm()
    print(
        f"last sample: {sample.generation_tokens_per_s} tokens/s, "
        f"TTFT p95 {sample.ttft_q_s} s, ITL p95 {sample.itl_q_s} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
