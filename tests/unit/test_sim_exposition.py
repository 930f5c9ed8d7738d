"""Every server kind's metrics text, parsed back with prometheus_client's own parser."""

from __future__ import annotations

import json
from datetime import datetime

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from powerd.config import NAMED_SERVER_KINDS
from powerd.sim.buckets import (
    SGLANG_TTFT_BUCKETS,
    TRTLLM_TTFT_BUCKETS,
    VLLM_ITL_BUCKETS,
    VLLM_TTFT_BUCKETS,
    histogram_bounds,
)
from powerd.sim.engine import EngineBank, EngineMetrics, EngineView
from powerd.sim.exposition import metrics_path, render_metrics, render_sglang_loads
from powerd.sim.models import get_model_profile
from powerd.sim.node import SimServer
from powerd.sim.plant import load_gpu_profile

H100 = load_gpu_profile("h100-sxm")
LLAMA_8B = get_model_profile("llama-3.1-8b")
MODEL = "meta-llama/Llama-3.1-8B-Instruct"


def loaded_bank(kind: str, until_s: float = 6.0) -> EngineBank:
    """A server mid-run: some requests finished, some in flight, some waiting."""
    bank = EngineBank(H100, LLAMA_8B, 1, 1, hist_bounds=histogram_bounds(kind), seed=2)
    rng = np.random.default_rng(0)
    t = np.sort(rng.uniform(0.0, 8.0, 160))
    bank.feed(t, rng.integers(50, 2000, t.size), rng.integers(5, 300, t.size))
    k = 0
    while bank.now_s < until_s - 1e-9:
        k += 1
        bank.run_until(min(k * 0.05, until_s), 1980.0)
    return bank


def parse(body: bytes) -> dict[str, tuple[str, list[Sample]]]:
    return {f.name: (f.type, f.samples) for f in text_string_to_metric_families(body.decode())}


def value(samples: list[Sample], name: str, **labels: str) -> float:
    hits = [
        s.value
        for s in samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert len(hits) == 1, (name, labels, samples)
    return hits[0]


def bucket_bounds(samples: list[Sample], name: str, **labels: str) -> list[float]:
    return [
        float(s.labels["le"])
        for s in samples
        if s.name == name
        and s.labels["le"] != "+Inf"
        and all(s.labels.get(k) == v for k, v in labels.items())
    ]


@pytest.mark.parametrize("kind", NAMED_SERVER_KINDS)
def test_every_kind_parses_and_reports_the_load(kind: str) -> None:
    bank = loaded_bank(kind)
    snap = bank.snapshot(0)
    assert snap.values["requests_success"] > 10 and snap.values["num_running"] > 0
    body, content_type, headers = render_metrics(snap, kind, MODEL, triton_histograms=True)
    assert content_type.startswith("text/plain; version=0.0.4")
    families = parse(body)
    assert len(families) >= 8
    for typ, samples in families.values():
        assert typ in ("counter", "gauge", "histogram")
        assert samples
        assert all(np.isfinite(s.value) for s in samples)
    assert ("Process-Start-Time-Unix" in headers) == (kind == "llamacpp")


def test_vllm_names_labels_and_buckets() -> None:
    snap = loaded_bank("vllm").snapshot(0)
    fam = parse(render_metrics(snap, "vllm", MODEL)[0])
    labels = {"model_name": MODEL, "engine": "0"}
    typ, samples = fam["vllm:generation_tokens"]
    assert typ == "counter"
    assert (
        value(samples, "vllm:generation_tokens_total", **labels) == snap.values["generation_tokens"]
    )
    # prometheus_client writes a counter's _created sample as a gauge family of its own.
    typ, samples = fam["vllm:generation_tokens_created"]
    assert typ == "gauge"
    assert value(samples, "vllm:generation_tokens_created", **labels) == snap.start_time_unix
    _, samples = fam["vllm:prompt_tokens"]
    prompt = value(samples, "vllm:prompt_tokens_total", **labels)
    assert prompt == snap.values["prompt_done_tokens"] > 0
    for name, key in (
        ("vllm:num_requests_running", "num_running"),
        ("vllm:num_requests_waiting", "num_waiting"),
        ("vllm:kv_cache_usage_perc", "kv_usage"),
    ):
        typ, samples = fam[name]
        assert typ == "gauge" and value(samples, name, **labels) == snap.values[key]
    _, samples = fam["vllm:request_success"]
    assert (
        value(samples, "vllm:request_success_total", finished_reason="stop")
        == snap.values["requests_success"]
    )
    _, samples = fam["vllm:time_to_first_token_seconds_created"]
    assert value(samples, "vllm:time_to_first_token_seconds_created") == snap.start_time_unix
    typ, samples = fam["vllm:time_to_first_token_seconds"]
    assert typ == "histogram"
    assert bucket_bounds(samples, "vllm:time_to_first_token_seconds_bucket") == list(
        VLLM_TTFT_BUCKETS
    )
    ttft_count = value(samples, "vllm:time_to_first_token_seconds_count", **labels)
    assert ttft_count == snap.histograms["ttft_s"].count >= snap.values["requests_success"]
    _, samples = fam["vllm:inter_token_latency_seconds"]
    assert bucket_bounds(samples, "vllm:inter_token_latency_seconds_bucket") == list(
        VLLM_ITL_BUCKETS
    )
    itl = snap.histograms["itl_s"]
    assert value(samples, "vllm:inter_token_latency_seconds_count") == itl.count
    assert value(samples, "vllm:inter_token_latency_seconds_sum") == pytest.approx(itl.sum)
    typ, samples = fam["vllm:iteration_tokens_total"]
    assert typ == "histogram"
    # Each step observes its whole prompts (at their first token) plus its generated tokens.
    assert value(samples, "vllm:iteration_tokens_total_sum", **labels) == (
        snap.values["prompt_done_tokens"] + snap.values["generation_tokens"]
    )
    assert "process_start_time_seconds" in fam


@pytest.mark.parametrize(
    ("kind", "counter"),
    [
        ("vllm", "vllm:prompt_tokens_total"),
        ("nim", "prompt_tokens_total"),
        ("lmdeploy", "lmdeploy:prompt_tokens_total"),
    ],
)
def test_a_chunked_prompt_is_counted_whole_at_its_first_token(kind: str, counter: str) -> None:
    """vLLM V1 and the servers that copy its logger add a request's prompt in the step that
    gives its first token, not chunk by chunk."""
    bank = EngineBank(H100, LLAMA_8B, 1, 1, hist_bounds=histogram_bounds(kind), seed=2)
    bank.feed(np.array([0.0]), np.array([8192]), np.array([4]))
    name = counter.removesuffix("_total")
    seen = []
    while bank.snapshot(0).histograms["ttft_s"].count == 0:
        snap = bank.snapshot(0)
        seen.append(
            (
                snap.values["prompt_tokens"],
                value(parse(render_metrics(snap, kind, MODEL)[0])[name][1], counter),
            )
        )
        bank.run_until(bank.now_s + 0.01, 1980.0)
    computed_mid_prefill = [c for c, _ in seen if 0 < c < 8192]
    assert computed_mid_prefill, "the prompt should take several chunks"
    assert all(exported == 0.0 for _, exported in seen)
    snap = bank.snapshot(0)
    assert value(parse(render_metrics(snap, kind, MODEL)[0])[name][1], counter) == 8192.0


def test_sglang_token_counters_move_at_request_end() -> None:
    snap = loaded_bank("sglang").snapshot(0)
    fam = parse(render_metrics(snap, "sglang", MODEL)[0])
    labels = {"model_name": MODEL, "tp_rank": "0"}
    _, samples = fam["sglang:generation_tokens"]
    finished = value(samples, "sglang:generation_tokens_total", **labels)
    assert finished == snap.values["finished_generation_tokens"]
    assert finished < snap.values["generation_tokens"]  # tokens of running requests are missing
    _, samples = fam["sglang:realtime_tokens"]
    decode = value(samples, "sglang:realtime_tokens_total", mode="decode")
    assert 0 < decode <= snap.values["generation_tokens"]
    assert value(samples, "sglang:realtime_tokens_total", mode="prefill_compute") > 0
    _, samples = fam["sglang:gen_throughput"]
    assert value(samples, "sglang:gen_throughput", **labels) > 0
    _, samples = fam["sglang:num_queue_reqs"]
    assert value(samples, "sglang:num_queue_reqs") == snap.values["num_waiting"]
    _, samples = fam["sglang:time_to_first_token_seconds"]
    assert bucket_bounds(samples, "sglang:time_to_first_token_seconds_bucket") == [
        float(x) for x in SGLANG_TTFT_BUCKETS
    ]
    assert not any(s.name.endswith("_created") for _, ss in fam.values() for s in ss)


def test_tgi_counters_have_no_total_suffix() -> None:
    snap = loaded_bank("tgi").snapshot(0)
    text = render_metrics(snap, "tgi", MODEL)[0].decode()
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line[0] != "#"}
    assert not any(name.endswith("_total") for name in names)
    arrived = int(snap.values["requests_arrived"])
    assert f"# TYPE tgi_request_count counter\ntgi_request_count {arrived}\n" in text
    fam = parse(text.encode())
    _, samples = fam["tgi_request_generated_tokens"]
    assert value(samples, "tgi_request_generated_tokens_count") == snap.values["requests_success"]
    assert (
        value(samples, "tgi_request_generated_tokens_sum")
        == snap.values["finished_generation_tokens"]
    )
    assert len(bucket_bounds(samples, "tgi_request_generated_tokens_bucket")) == 100
    _, samples = fam["tgi_queue_size"]
    assert value(samples, "tgi_queue_size") == snap.values["num_waiting"]
    _, samples = fam["tgi_batch_current_size"]
    assert value(samples, "tgi_batch_current_size") == snap.values["num_running"]
    _, samples = fam["tgi_request_duration"]
    assert len(bucket_bounds(samples, "tgi_request_duration_bucket")) == 35
    # Every request admitted to a batch is in tgi_batch_next_size once, in batches that carry
    # prefill, with a bucket for each batch size 1..1024.
    _, samples = fam["tgi_batch_next_size"]
    assert snap.values["preemptions"] == 0
    admitted = snap.values["requests_arrived"] - snap.values["num_waiting"]
    assert value(samples, "tgi_batch_next_size_sum") == admitted > 0
    assert 0 < value(samples, "tgi_batch_next_size_count") <= snap.values["prefill_batches"]
    assert bucket_bounds(samples, "tgi_batch_next_size_bucket") == [
        float(x) for x in range(1, 1025)
    ]
    _, samples = fam["tgi_batch_inference_count"]
    calls = sum(
        value(samples, "tgi_batch_inference_count_total", method=m) for m in ("prefill", "decode")
    )
    assert calls == snap.values["iterations"]
    # Every generation sent is in tgi_request_skipped_tokens, none speculated: its count is
    # the tokens generated so far, running requests' included.
    _, samples = fam["tgi_request_skipped_tokens"]
    sent = value(samples, "tgi_request_skipped_tokens_count")
    assert sent == snap.values["generation_tokens"] > snap.values["finished_generation_tokens"]
    assert value(samples, "tgi_request_skipped_tokens_sum") == 0
    # Each call's forward pass is timed, per method: every iteration once, together the time the
    # engine was busy, with TGI's 35 duration buckets for each method.
    _, samples = fam["tgi_batch_forward_duration"]
    for method, batches in (("prefill", "prefill_batches"), ("decode", "decode_batches")):
        count = value(samples, "tgi_batch_forward_duration_count", method=method)
        assert count == snap.values[batches] > 0
        bounds = bucket_bounds(samples, "tgi_batch_forward_duration_bucket", method=method)
        assert len(bounds) == 35
    forward_s = sum(
        value(samples, "tgi_batch_forward_duration_sum", method=m) for m in ("prefill", "decode")
    )
    assert forward_s == pytest.approx(snap.values["busy_s"])
    assert "model_name" not in text


def test_llamacpp_counters_header_and_scrape_reset() -> None:
    bank = loaded_bank("llamacpp")
    server = SimServer("llamacpp-0", "llamacpp", MODEL, (0,), EngineView(bank, 0))
    body, content_type, headers = server.render()
    assert content_type == "text/plain; version=0.0.4"
    assert headers["Process-Start-Time-Unix"] == str(int(bank.start_time_unix[0]))
    text = body.decode()
    assert (
        "# TYPE llamacpp:tokens_predicted_total counter\nllamacpp:tokens_predicted_total " in text
    )
    fam = parse(body)
    snap = bank.snapshot(0)
    assert (
        value(fam["llamacpp:tokens_predicted"][1], "llamacpp:tokens_predicted_total")
        == (snap.values["finished_generation_tokens"])
    )
    assert (
        value(fam["llamacpp:n_decode"][1], "llamacpp:n_decode_total") == snap.values["iterations"]
    )
    assert (
        value(fam["llamacpp:requests_deferred"][1], "llamacpp:requests_deferred")
        == (snap.values["num_waiting"])
    )
    assert (
        value(fam["llamacpp:predicted_tokens_seconds"][1], "llamacpp:predicted_tokens_seconds") > 0
    )
    again = parse(server.render()[0])
    assert (
        value(again["llamacpp:predicted_tokens_seconds"][1], "llamacpp:predicted_tokens_seconds")
        == 0
    )
    assert (
        value(again["llamacpp:tokens_predicted"][1], "llamacpp:tokens_predicted_total")
        == (snap.values["finished_generation_tokens"])
    )


def test_triton_gauges_and_opt_in_histogram() -> None:
    snap = loaded_bank("triton").snapshot(0)
    plain = parse(render_metrics(snap, "triton", MODEL)[0])
    assert "nv_inference_first_response_histogram_ms" not in plain
    typ, samples = plain["nv_trt_llm_general_metrics"]
    assert typ == "gauge"
    assert (
        value(samples, "nv_trt_llm_general_metrics", general_type="iteration_counter")
        == (snap.values["iterations"])
    )
    _, samples = plain["nv_trt_llm_request_metrics"]
    assert (
        value(samples, "nv_trt_llm_request_metrics", request_type="waiting")
        == snap.values["num_waiting"]
    )
    assert (
        value(samples, "nv_trt_llm_request_metrics", request_type="active")
        == snap.values["num_running"]
    )
    _, samples = plain["nv_trt_llm_inflight_batcher_metrics"]
    assert (
        value(
            samples,
            "nv_trt_llm_inflight_batcher_metrics",
            inflight_batcher_specific_metric="generation_requests",
            model="tensorrt_llm",
            version="1",
        )
        == snap.values["iter_generation_requests"]
    )
    text = render_metrics(snap, "triton", MODEL, triton_histograms=True)[0].decode()
    assert "\nnv_inference_count{" in text and "nv_inference_count_total" not in text
    hist = parse(text.encode())["nv_inference_first_response_histogram_ms"][1]
    assert bucket_bounds(hist, "nv_inference_first_response_histogram_ms_bucket") == [
        100.0,
        500.0,
        2000.0,
        5000.0,
    ]
    assert value(hist, "nv_inference_first_response_histogram_ms_sum") == pytest.approx(
        snap.histograms["ttft_s"].sum * 1e3
    )


def test_nim_uses_vllm_names_without_prefix() -> None:
    snap = loaded_bank("nim").snapshot(0)
    fam = parse(render_metrics(snap, "nim", MODEL)[0])
    assert not any(name.startswith("vllm:") for name in fam)
    assert (
        value(fam["generation_tokens"][1], "generation_tokens_total", model_name=MODEL)
        == (snap.values["generation_tokens"])
    )
    assert (
        value(fam["num_requests_waiting"][1], "num_requests_waiting") == snap.values["num_waiting"]
    )
    assert fam["time_per_output_token_seconds"][0] == "histogram"
    assert metrics_path("nim") == "/v1/metrics" and metrics_path("vllm") == "/metrics"


def test_trtllm_serve_records_requests_when_they_end() -> None:
    snap = loaded_bank("trtllm").snapshot(0)
    fam = parse(render_metrics(snap, "trtllm", MODEL)[0])
    assert metrics_path("trtllm") == "/prometheus/metrics"
    labels = {"model_name": MODEL, "engine_type": "trtllm"}
    finished = snap.values["requests_success"]
    assert 0 < finished < snap.values["requests_arrived"]
    # Tokens and first tokens count finished requests only, as collector.py logs them.
    _, samples = fam["trtllm_generation_tokens"]
    generated = value(samples, "trtllm_generation_tokens_total", **labels)
    assert generated == snap.values["finished_generation_tokens"]
    assert generated < snap.values["generation_tokens"]
    _, samples = fam["trtllm_time_to_first_token_seconds"]
    assert value(samples, "trtllm_time_to_first_token_seconds_count", **labels) == finished
    assert snap.histograms["ttft_s"].count > finished  # first tokens of running requests
    assert bucket_bounds(samples, "trtllm_time_to_first_token_seconds_bucket") == list(
        TRTLLM_TTFT_BUCKETS
    )
    _, samples = fam["trtllm_kv_cache_utilization"]
    assert value(samples, "trtllm_kv_cache_utilization", **labels) == snap.values["kv_usage"]


LOADS_INT_FIELDS = (
    "dp_rank",
    "num_running_reqs",
    "num_waiting_reqs",
    "num_waiting_uncached_tokens",
    "num_used_tokens",
    "num_total_tokens",
    "max_total_num_tokens",
    "max_running_requests",
)
LOADS_FLOAT_FIELDS = ("timestamp", "token_usage", "gen_throughput", "cache_hit_rate", "utilization")


def bursting_sglang_bank() -> EngineBank:
    """An SGLang server decoding a steady load when a burst of 48 long prompts arrives."""
    bank = EngineBank(H100, LLAMA_8B, 1, 1, hist_bounds=histogram_bounds("sglang"), seed=2)
    steady_s = np.arange(0.0, 6.0, 0.1)
    t = np.concatenate([steady_s, np.full(48, 6.0)])
    prompts = np.concatenate([np.full(steady_s.size, 500), np.full(48, 8000)])
    bank.feed(t, prompts, np.full(t.size, 200))
    for k in range(1, 122):
        bank.run_until(k * 0.05, 1980.0)
    return bank


def test_sglang_loads_json_shape_types_and_values() -> None:
    bank = bursting_sglang_bank()
    snap = bank.snapshot(0)
    running, queued, _ = bank.prefill_backlog_parts(0)
    now_unix = 1736678400.123
    body, content_type, headers = render_sglang_loads(
        snap, running + queued, queued, now_unix=now_unix
    )
    assert content_type == "application/json" and headers == {}
    document = json.loads(body)
    assert set(document) == {"timestamp", "version", "loads"}
    stamp = datetime.fromisoformat(document["timestamp"])
    offset = stamp.utcoffset()
    assert offset is not None and offset.total_seconds() == 0
    assert stamp.timestamp() == pytest.approx(now_unix, abs=1e-6)
    assert isinstance(document["version"], str) and document["version"]
    (rank,) = document["loads"]
    assert set(rank) == set(LOADS_INT_FIELDS) | set(LOADS_FLOAT_FIELDS)
    for key in LOADS_INT_FIELDS:
        assert type(rank[key]) is int, key
    for key in LOADS_FLOAT_FIELDS:
        assert type(rank[key]) is float, key
    v = snap.values
    assert rank["dp_rank"] == 0 and rank["timestamp"] == now_unix
    assert rank["num_running_reqs"] == v["num_running"] > 0
    assert rank["num_waiting_reqs"] == v["num_waiting"] > 0
    assert rank["num_waiting_uncached_tokens"] == bank.prefill_backlog(0)[0] > 0
    assert rank["num_used_tokens"] == v["kv_used_tokens"] > 0
    assert rank["num_total_tokens"] == v["kv_used_tokens"] + queued > rank["num_used_tokens"]
    assert rank["max_total_num_tokens"] == v["kv_capacity_tokens"]
    assert rank["max_running_requests"] == v["max_batch"]
    assert rank["token_usage"] == v["kv_usage"]
    assert rank["gen_throughput"] == v["gen_throughput_tokens_per_s"] > 0
    assert rank["cache_hit_rate"] == 0.0 and rank["utilization"] == 0.0
    server = SimServer("sglang-0", "sglang", MODEL, (0,), EngineView(bank, 0))
    served = json.loads(server.render_loads()[0])["loads"][0]
    assert {k: served[k] for k in LOADS_INT_FIELDS} == {k: rank[k] for k in LOADS_INT_FIELDS}


def test_sglang_loads_of_an_idle_server_has_no_backlog() -> None:
    bank = EngineBank(H100, LLAMA_8B, 1, 1, hist_bounds=histogram_bounds("sglang"))
    server = SimServer("sglang-0", "sglang", MODEL, (0,), EngineView(bank, 0))
    (rank,) = json.loads(server.render_loads()[0])["loads"]
    assert rank["num_waiting_uncached_tokens"] == 0
    assert rank["num_running_reqs"] == rank["num_waiting_reqs"] == 0
    assert rank["num_used_tokens"] == rank["num_total_tokens"] == 0
    assert rank["max_total_num_tokens"] == bank.snapshot(0).values["kv_capacity_tokens"] > 0


@pytest.mark.parametrize("kind", NAMED_SERVER_KINDS)
def test_routes_are_the_metrics_path_and_loads_on_sglang_only(kind: str) -> None:
    server = SimServer(f"{kind}-0", kind, MODEL, (0,), EngineView(loaded_bank(kind, 1.0), 0))
    routes = server.routes()
    expected = {metrics_path(kind), "/v1/loads"} if kind == "sglang" else {metrics_path(kind)}
    assert set(routes) == expected
    body, content_type, _ = routes[metrics_path(kind)]()
    assert content_type.startswith("text/plain; version=0.0.4") and parse(body)
    if kind == "sglang":
        assert json.loads(routes["/v1/loads"]()[0])["loads"][0]["num_running_reqs"] > 0


def test_lmdeploy_has_engine_label_and_no_created_series() -> None:
    snap = loaded_bank("lmdeploy").snapshot(0)
    fam = parse(render_metrics(snap, "lmdeploy", MODEL)[0])
    assert (
        value(
            fam["lmdeploy:generation_tokens"][1],
            "lmdeploy:generation_tokens_total",
            model_name=MODEL,
            engine="0",
        )
        == snap.values["generation_tokens"]
    )
    assert not any(s.name.endswith("_created") for _, ss in fam.values() for s in ss)
    _, samples = fam["lmdeploy:request_prompt_tokens"]
    assert bucket_bounds(samples, "lmdeploy:request_prompt_tokens_bucket")[-1] == 2000.0


def test_a_fresh_server_renders_zeros() -> None:
    bank = EngineBank(H100, LLAMA_8B, 1, 1)
    snap: EngineMetrics = bank.snapshot(0)
    for kind in NAMED_SERVER_KINDS:
        fam = parse(render_metrics(snap, kind, MODEL)[0])
        assert fam


def test_unknown_kind_is_rejected() -> None:
    snap = EngineBank(H100, LLAMA_8B, 1, 1).snapshot(0)
    with pytest.raises(ValueError, match="unknown server kind"):
        render_metrics(snap, "ollama", MODEL)
