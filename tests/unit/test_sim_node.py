"""The simulated node: engines and plant together, clones, determinism, HTTP, real time."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from powerd.bench.measure import batch_state
from powerd.config import SimConfig
from powerd.sim import node as node_module
from powerd.sim.http_server import SimServerHttp
from powerd.sim.models import get_model_profile
from powerd.sim.node import RealTimeDriver, SimNode, serve_node
from powerd.sim.plant import S_TIME_S, load_gpu_profile
from powerd.sim.traces import Arrivals, synthetic, tile
from powerd.simulation import build_node, inprocess_fetch, server_configs
from powerd.sources import SourceError
from powerd.sources.fetch import KeepAliveFetcher

H100 = load_gpu_profile("h100-sxm")
LLAMA_8B = get_model_profile("llama-3.1-8b")
LLAMA_70B = get_model_profile("llama-3.1-70b")


def load(rate_per_s: float = 10.0, duration_s: float = 120.0, seed: int = 0) -> Arrivals:
    return synthetic("constant", duration_s=duration_s, mean_rate_per_s=rate_per_s, seed=seed)


def make_node(seed: int = 0, kind: str = "vllm", gpus: int = 2, tp: int = 1, **kw) -> SimNode:
    model = LLAMA_70B if tp > 1 else LLAMA_8B
    return SimNode(
        H100, gpus, model, tp, kw.pop("arrivals", load()), seed=seed, server_kind=kind, **kw
    )


def test_advance_moves_servers_and_gpus_together() -> None:
    node = make_node()
    e0 = node.totals()["energy_j"]
    node.advance(20.0)
    totals = node.totals()
    assert node.now_s == pytest.approx(20.0)
    np.testing.assert_allclose(node.plant.state[:, S_TIME_S], 20.0, atol=1e-6)
    assert totals["generated_tokens"] > 0 and totals["requests_finished"] > 0
    assert totals["energy_j"] > e0
    # Serving GPUs draw more than ctx-idle (52 + 70 W) and stay under the 700 W limit.
    power_w = (totals["energy_j"] - e0) / 20.0 / node.n_gpus
    assert 150.0 < power_w < 700.0
    finished = node.finished_requests()
    assert finished.shape == (int(totals["requests_finished"]), 2)
    assert np.all(finished[:, 0] > 0) and np.all(finished[:, 1] >= 0)
    records = node.finished_records()
    np.testing.assert_array_equal(records["ttft_s"], finished[:, 0])


def test_servers_map_to_tp_groups() -> None:
    node = make_node(gpus=4, tp=2, arrivals=load(rate_per_s=2.0, duration_s=10.0))
    assert [s.gpu_indices for s in node.servers] == [(0, 1), (2, 3)]
    assert [s.name for s in node.servers] == ["vllm-0", "vllm-1"]
    assert node.servers[0].model_name == "meta-llama/Llama-3.1-70B-Instruct"
    with pytest.raises(ValueError, match="must divide"):
        SimNode(H100, 3, LLAMA_70B, 2, load())
    with pytest.raises(ValueError, match="unknown server kind"):
        SimNode(H100, 2, LLAMA_8B, 1, load(), server_kind="ollama")


def test_same_seed_same_run() -> None:
    a, b, c = make_node(seed=5), make_node(seed=5), make_node(seed=6)
    for node in (a, b, c):
        for _ in range(10):
            node.advance(1.0)
    assert a.totals() == b.totals()
    np.testing.assert_array_equal(a.finished_requests(), b.finished_requests())
    assert a.totals()["energy_j"] != c.totals()["energy_j"]


def test_clone_is_independent_and_evolves_identically() -> None:
    node = make_node(seed=1)
    node.advance(5.0)
    twin = node.clone()
    assert twin.lock is not node.lock and twin.plant is not node.plant
    twin.advance(10.0)
    assert node.now_s == pytest.approx(5.0)
    twin_totals = twin.totals()
    twin.plant.set_locked_clocks(0, 900, 900, dead_time_s=0.0)
    twin.servers[0].restart()
    assert node.plant.locked_clocks(0) is None
    assert node.servers[0].engine.metrics().values["generation_tokens"] > 0
    node.advance(10.0)
    assert node.totals() == twin_totals
    np.testing.assert_array_equal(node.finished_requests(), twin.finished_requests())
    fresh = make_node(seed=1)
    fresh.advance(5.0)
    fresh.advance(10.0)
    assert fresh.totals() == node.totals()


def test_a_repeated_stream_replays_as_the_whole_tiled_one() -> None:
    arrivals = load(rate_per_s=6.0, duration_s=20.0, seed=3)
    looped = make_node(seed=4, arrivals=arrivals, repeat_arrivals=True)
    tiled = make_node(seed=4, arrivals=tile(arrivals, 200.0))
    for node in (looped, tiled):
        for _ in range(130):
            node.advance(1.0)
    assert looped.totals() == tiled.totals()
    assert looped.totals()["requests_arrived"] > 6 * len(arrivals)
    np.testing.assert_array_equal(looped.finished_requests(), tiled.finished_requests())
    assert looped.bank.pending_arrivals <= len(arrivals), "fed one replay at a time"


def test_an_endless_node_keeps_its_load_and_no_request_records() -> None:
    # time_compression 360: the one-hour diurnal trace spans 10 s.
    sim = SimConfig(gpus=2, tp=1, time_compression=360.0, peak_load=0.5)
    node = build_node(sim)
    arrived = []
    for _ in range(6):
        node.advance(10.0)
        arrived.append(node.totals()["requests_arrived"])
    per_span = np.diff([0.0, *arrived])
    assert per_span.min() > 0.8 * per_span.max(), f"arrivals per 10-s span: {per_span}"
    assert node.bank.pending_arrivals <= len(node.arrivals)
    with pytest.raises(ValueError, match="keeps no finished-request records"):
        node.finished_requests()
    bounded = build_node(sim, 30.0)
    bounded.advance(30.0)
    assert len(bounded.finished_requests()) == bounded.totals()["requests_finished"] > 0


def test_lower_clock_lock_saves_energy_at_the_same_tokens() -> None:
    """Load-following throughput: a moderate clock lock keeps tokens/s and cuts joules."""
    arrivals = synthetic("constant", duration_s=60.0, mean_rate_per_s=6.0, seed=9)
    runs = {}
    for clock in (None, 1500):
        node = SimNode(H100, 1, LLAMA_8B, 1, arrivals, seed=2)
        if clock is not None:
            node.plant.set_locked_clocks(0, clock, clock, dead_time_s=0.0)
        node.advance(75.0)
        runs[clock] = node.totals()
    assert runs[1500]["requests_finished"] == runs[None]["requests_finished"] == len(arrivals)
    assert runs[1500]["generated_tokens"] == runs[None]["generated_tokens"]
    assert runs[1500]["energy_j"] < 0.9 * runs[None]["energy_j"]


def test_restart_resets_exposed_counters_but_not_ground_truth() -> None:
    node = make_node()
    node.advance(5.0)
    server = node.servers[0]
    before = node.totals()
    assert server.engine.metrics().values["generation_tokens"] > 0
    server.restart()
    assert server.engine.metrics().values["generation_tokens"] == 0
    assert node.totals() == before
    node.advance(2.0)
    assert node.totals()["generated_tokens"] > before["generated_tokens"]


def parse(text: str) -> dict[str, list]:
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def test_http_serves_each_server_on_localhost() -> None:
    node = make_node(kind="vllm")
    node.advance(3.0)
    endpoints = serve_node(node)
    try:
        assert len(endpoints) == len(node.servers)
        for server, http in zip(node.servers, endpoints, strict=True):
            assert http.url.startswith("http://127.0.0.1:") and http.url.endswith("/metrics")
            with urllib.request.urlopen(http.url, timeout=5) as resp:
                assert resp.status == 200
                assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
                fam = parse(resp.read().decode())
            tokens = [s.value for s in fam["vllm:generation_tokens"] if s.name.endswith("_total")]
            assert tokens == [server.engine.metrics().values["generation_tokens"]]
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(endpoints[0].url.replace("/metrics", "/health"), timeout=5)
        assert err.value.code == 404
        endpoints[0].restart()
        with urllib.request.urlopen(endpoints[0].url, timeout=5) as resp:
            fam = parse(resp.read().decode())
        assert [s.value for s in fam["vllm:generation_tokens"] if s.name.endswith("_total")] == [0]
    finally:
        for http in endpoints:
            http.stop()


def test_nim_and_llamacpp_over_http() -> None:
    for kind, path in (("nim", "/v1/metrics"), ("llamacpp", "/metrics")):
        node = make_node(kind=kind, gpus=1)
        node.advance(3.0)
        (http,) = serve_node(node)
        try:
            assert http.url.endswith(path)
            with urllib.request.urlopen(http.url, timeout=5) as resp:
                body = resp.read().decode()
                if kind == "llamacpp":
                    assert int(resp.headers["Process-Start-Time-Unix"]) > 0
            assert parse(body)
            if kind == "nim":
                with pytest.raises(urllib.error.HTTPError):
                    urllib.request.urlopen(http.url.replace("/v1/metrics", "/metrics"), timeout=5)
        finally:
            http.stop()


def long_prompt_burst(n: int = 40, prompt_tokens: int = 8000, at_s: float = 1.0) -> Arrivals:
    """Steady short requests, then n long prompts at once."""
    steady = load(rate_per_s=5.0, duration_s=10.0)
    time_s = np.concatenate([steady.time_s, np.full(n, at_s)])
    order = np.argsort(time_s, kind="stable")
    prompts = np.concatenate([steady.prompt_tokens, np.full(n, prompt_tokens)])
    gens = np.concatenate([steady.gen_tokens, np.full(n, 100)])
    return Arrivals(time_s[order], prompts[order], gens[order], steady.duration_s)


def loads_of(fetch, url: str) -> dict:
    response = fetch(url, 1.0)
    assert response.status == 200 and response.headers["Content-Type"] == "application/json"
    (rank,) = json.loads(response.body)["loads"]
    return rank


def test_loads_backlog_is_the_benchmarks_pending_prefill() -> None:
    node = make_node(kind="sglang", gpus=1, arrivals=long_prompt_burst())
    fetch = inprocess_fetch(node)
    url = "sim://sglang-0/v1/loads?include=core"
    assert loads_of(fetch, url)["num_waiting_uncached_tokens"] == 0
    backlogs = []
    for _ in range(30):
        node.advance(0.1)
        rank = loads_of(fetch, url)
        pending = batch_state(node.servers[0]).pending_prefill_tokens
        assert rank["num_waiting_uncached_tokens"] == pending
        backlogs.append(pending)
    assert max(backlogs) > 100_000  # the burst waited ...
    node.advance(30.0)
    rank = loads_of(fetch, url)
    assert rank["num_waiting_uncached_tokens"] == 0  # ... and was served
    assert rank["num_waiting_reqs"] == 0


def test_inprocess_fetch_routes_by_path() -> None:
    sglang = make_node(kind="sglang", gpus=1)
    sglang.advance(2.0)
    fetch = inprocess_fetch(sglang)
    assert loads_of(fetch, "sim://sglang-0/v1/loads?include=core")["max_running_requests"] > 0
    metrics = fetch("sim://sglang-0/metrics", 1.0)
    assert metrics.status == 200 and "sglang:num_running_reqs" in parse(metrics.body.decode())
    for path in ("/health", "/v1/loads/x", "/", ""):
        missing = fetch(f"sim://sglang-0{path}", 1.0)
        assert (missing.status, missing.body) == (404, b"404 page not found\n"), path
    with pytest.raises(SourceError, match="no simulated server"):
        fetch("sim://sglang-9/v1/loads", 1.0)
    vllm = make_node(kind="vllm", gpus=1)
    fetch = inprocess_fetch(vllm)
    assert fetch("sim://vllm-0/v1/loads?include=core", 1.0).status == 404
    assert fetch("sim://vllm-0/metrics?x=1", 1.0).status == 200


def test_inprocess_urls_name_each_kinds_metrics_path() -> None:
    node = make_node(kind="nim", gpus=1)
    (config,) = server_configs(node)
    assert config.url == "sim://nim-0/v1/metrics"
    fetch = inprocess_fetch(node)
    assert fetch(config.url, 1.0).status == 200
    assert fetch("sim://nim-0/metrics", 1.0).status == 404


def test_loads_over_http_on_sglang_only() -> None:
    node = make_node(kind="sglang", gpus=1, arrivals=long_prompt_burst(at_s=0.5))
    node.advance(1.0)
    (http,) = serve_node(node)
    try:
        loads_url = http.url.replace("/metrics", "/v1/loads?include=core")
        with urllib.request.urlopen(loads_url, timeout=5) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == "application/json"
            document = json.loads(resp.read())
        (rank,) = document["loads"]
        assert rank["num_waiting_uncached_tokens"] > 0 and rank["num_waiting_reqs"] > 0
        with node.lock:
            assert rank["num_waiting_uncached_tokens"] == node.bank.prefill_backlog(0)[0]
        with urllib.request.urlopen(http.url, timeout=5) as resp:
            assert "sglang:num_queue_reqs" in parse(resp.read().decode())
    finally:
        http.stop()
    node = make_node(kind="vllm", gpus=1)
    (http,) = serve_node(node)
    try:
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(http.url.replace("/metrics", "/v1/loads"), timeout=5)
        assert err.value.code == 404
    finally:
        http.stop()


def test_http_extra_routes_ignore_the_query_and_must_be_paths() -> None:
    def page(text: bytes) -> Callable[[], tuple[bytes, str, dict[str, str]]]:
        return lambda: (text, "text/plain", {})

    with SimServerHttp(page(b"m\n"), extra_routes={"/other": page(b"o\n")}) as http:
        base = http.url.removesuffix("/metrics")
        for path, body in (("/metrics", b"m\n"), ("/other?a=1", b"o\n"), ("/other", b"o\n")):
            with urllib.request.urlopen(base + path, timeout=5) as resp:
                assert resp.read() == body
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(base + "/others", timeout=5)
        assert err.value.code == 404
        assert http.requests_served == 3
    with pytest.raises(ValueError, match="must start with '/'"):
        SimServerHttp(page(b""), extra_routes={"other": page(b"")})
    with pytest.raises(ValueError, match="also in extra_routes"):
        SimServerHttp(page(b""), extra_routes={"/metrics": page(b"")})


def test_a_stopped_server_closes_the_connections_kept_open() -> None:
    fetch = KeepAliveFetcher()
    with SimServerHttp(lambda: (b"up 1\n", "text/plain", {})) as http:
        for _ in range(3):
            assert fetch(http.url, 5.0).body == b"up 1\n"
        assert (http.requests_served, http.connections_accepted) == (3, 1)
    # A server that exits serves nothing more, on a kept connection or a new one.
    with pytest.raises(SourceError, match="cannot connect"):
        fetch(http.url, 5.0)
    fetch.close()


def test_render_errors_become_500_not_a_dead_server() -> None:
    calls = []

    def render() -> tuple[bytes, str, dict[str, str]]:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return b"up 1\n", "text/plain; version=0.0.4", {}

    with SimServerHttp(render) as http:
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(http.url, timeout=5)
        assert err.value.code == 500
        with urllib.request.urlopen(http.url, timeout=5) as resp:
            assert resp.read() == b"up 1\n"
    assert not http.running


class _WallClock:
    """The time module as powerd.sim.node sees it, with a monotonic clock that moves only when
    the test moves it; `read` is set once the driver has read it."""

    def __init__(self) -> None:
        self.now_s = 1000.0
        self.read = threading.Event()

    def monotonic(self) -> float:
        self.read.set()
        return self.now_s

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def test_real_time_driver_advances_by_wall_time_times_the_compression(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Simulated time is the wall time between the driver's reads times time_compression.
    Wall time here is a clock the test moves, so neither a starved driver thread nor a late
    main thread on a busy machine changes what the driver must have done."""
    clock = _WallClock()
    monkeypatch.setattr(node_module, "time", clock)
    node = make_node()
    steps: list[float] = []
    three_more = threading.Event()
    real_advance = node.advance

    def advance(dt_s: float) -> None:
        real_advance(dt_s)
        steps.append(dt_s)
        moved = [i for i, dt in enumerate(steps) if dt > 0]
        if moved and len(steps) - moved[0] > 3:
            three_more.set()

    monkeypatch.setattr(node, "advance", advance)
    driver = RealTimeDriver(node, time_compression=20.0, period_s=0.02)
    driver.start()
    try:
        assert clock.read.wait(30), "the driver notes when it started"
        assert node.now_s == 0.0, "no wall time has passed"
        clock.now_s += 0.5
        assert three_more.wait(60), ("the driver advances the node every period", steps)
    finally:
        driver.stop()
    assert driver.error is None and not driver.running
    assert [dt for dt in steps if dt] == [0.5 * 20.0], "each stretch of wall time counted once"
    assert node.now_s == pytest.approx(0.5 * 20.0, abs=1e-6)
    clock.now_s += 1.0
    assert node.now_s == pytest.approx(0.5 * 20.0, abs=1e-6), "a stopped driver moves nothing"
