"""The simulated continuous-batching engine: roofline timing, scheduling, KV cache, TP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from powerd.sim.engine import (
    C_T_CPU_FRAC,
    C_T_CPU_S,
    HISTOGRAM_NAMES,
    M_GEN_TOKENS,
    M_PREEMPTIONS,
    M_PROMPT_TOKENS,
    RF_ARRIVAL,
    SI_KV_USED,
    EngineBank,
    build_config,
    gpu_time_s,
)
from powerd.sim.models import get_model_profile
from powerd.sim.plant import load_gpu_profile

H100 = load_gpu_profile("h100-sxm")
LLAMA_8B = get_model_profile("llama-3.1-8b")
LLAMA_70B = get_model_profile("llama-3.1-70b")


def make_bank(
    n_servers: int = 1, tp: int = 1, seed: int = 0, model=LLAMA_8B, **cfg_kwargs
) -> EngineBank:
    cfg = build_config(H100, model, tp, **cfg_kwargs)
    return EngineBank(H100, model, tp, n_servers, seed=seed, cfg=cfg)


def burst(n: int, prompt: int, gen: int, t_s: float = 0.0):
    return np.full(n, t_s), np.full(n, prompt), np.full(n, gen)


def run(bank: EngineBank, until_s: float, clock_mhz, step_s: float = 0.1) -> None:
    t = bank.now_s
    while t < until_s - 1e-9:
        t = min(t + step_s, until_s)
        bank.run_until(t, clock_mhz)


def test_decode_slows_at_low_clock_as_the_roofline_predicts() -> None:
    itl = {}
    for f in (1980.0, 800.0):
        bank = make_bank(jitter_cv=0.0)
        bank.feed(*burst(32, prompt=128, gen=300))
        run(bank, 30.0, f)
        rec = bank.finished_requests()
        assert len(rec) == 32
        itl[f] = float(np.median(rec["itl_mean_s"]))
    cfg = make_bank().cfg
    ctx = 128 + 150
    expected = {}
    for f in (1980.0, 800.0):
        t_gpu = gpu_time_s(cfg, 32, 32 * ctx, 32 * ctx, f)
        expected[f] = t_gpu * (1 + cfg[C_T_CPU_FRAC]) + cfg[C_T_CPU_S]
    assert itl[800.0] > 1.3 * itl[1980.0]
    assert itl[800.0] / itl[1980.0] == pytest.approx(expected[800.0] / expected[1980.0], rel=0.03)


def test_decode_is_flatter_in_clock_than_prefill() -> None:
    """Above the knee decode barely slows while compute-bound prefill scales with 1/f."""
    ttft, itl = {}, {}
    for f in (1980.0, 1600.0):
        bank = make_bank(jitter_cv=0.0)
        bank.feed(*burst(1, prompt=8192, gen=2))
        bank.feed(*burst(64, prompt=64, gen=200, t_s=2.0))
        run(bank, 20.0, f)
        rec = bank.finished_requests()
        ttft[f] = float(rec["ttft_s"][rec["prompt_tokens"] == 8192][0])
        itl[f] = float(np.median(rec["itl_mean_s"][rec["prompt_tokens"] == 64]))
    clock_ratio = 1980.0 / 1600.0
    assert ttft[1600.0] / ttft[1980.0] == pytest.approx(clock_ratio, rel=0.03)
    assert 1.0 < itl[1600.0] / itl[1980.0] < 1.0 + 0.5 * (clock_ratio - 1.0)


def test_queue_grows_when_overloaded() -> None:
    bank = make_bank()
    t = np.arange(0.0, 30.0, 1.0 / 200.0)
    bank.feed(t, np.full(t.size, 2000), np.full(t.size, 100))
    waiting = []
    for until in (5.0, 10.0, 15.0, 20.0):
        run(bank, until, 1980.0)
        waiting.append(bank.num_waiting(0))
    assert np.all(np.diff(waiting) > 0)
    rec = bank.finished_requests()
    early, late = rec["ttft_s"][: len(rec) // 4], rec["ttft_s"][-len(rec) // 4 :]
    assert np.median(late) > 3 * np.median(early)


def test_light_load_has_no_queue() -> None:
    bank = make_bank()
    t = np.arange(0.0, 20.0, 0.5)
    bank.feed(t, np.full(t.size, 500), np.full(t.size, 50))
    run(bank, 25.0, 1980.0)
    rec = bank.finished_requests()
    assert len(rec) == t.size
    assert float(rec["queue_s"].max()) < 0.05
    assert bank.num_waiting(0) == 0 and bank.num_running(0) == 0


def test_kv_capacity_bounds_the_batch_and_preempts() -> None:
    cap = 6000
    bank = make_bank(kv_capacity_tokens=cap)
    bank.feed(*burst(50, prompt=1000, gen=400))
    max_running = 0
    max_kv = 0
    t = 0.0
    while t < 120.0 and len(bank.finished_requests()) < 50:
        t += 0.02
        bank.run_until(t, 1980.0)
        max_running = max(max_running, bank.num_running(0))
        max_kv = max(max_kv, int(bank.srv_i[0, SI_KV_USED]))
    assert len(bank.finished_requests()) == 50
    assert max_kv <= cap
    assert max_running <= cap // 1000
    assert bank.metrics[0, M_PREEMPTIONS] > 0
    # Preempted requests recompute their prefill but emit every token once.
    assert bank.metrics[0, M_GEN_TOKENS] == 50 * 400
    assert bank.metrics[0, M_PROMPT_TOKENS] > 50 * 1000


def test_max_batch_bounds_the_batch() -> None:
    bank = make_bank(max_batch=8)
    bank.feed(*burst(40, prompt=100, gen=100))
    seen = 0
    for k in range(1, 200):
        bank.run_until(k * 0.02, 1980.0)
        seen = max(seen, bank.num_running(0))
    assert seen == 8


def test_request_longer_than_the_cache_is_rejected() -> None:
    bank = make_bank(kv_capacity_tokens=4000)
    bank.feed(np.array([0.0, 0.1]), np.array([5000, 100]), np.array([10, 10]))
    run(bank, 2.0, 1980.0)
    snap = bank.snapshot(0)
    assert snap.values["requests_aborted"] == 1
    assert snap.values["requests_success"] == 1


def test_slowest_rank_sets_the_pace_of_a_tp_group() -> None:
    results = {}
    activity = {}
    for clocks in ((1980.0, 900.0), (900.0, 900.0), (1980.0, 1980.0)):
        bank = make_bank(tp=2, model=LLAMA_70B, seed=7)
        bank.feed(*burst(16, prompt=512, gen=100))
        acts = []
        t = 0.0
        while t < 20.0:
            t += 0.1
            a, _ = bank.run_until(t, np.array(clocks))
            if bank.num_running(0):
                acts.append(a)
        results[clocks] = bank.finished_requests()["e2e_s"]
        activity[clocks] = np.mean(acts, axis=0)
    np.testing.assert_array_equal(results[(1980.0, 900.0)], results[(900.0, 900.0)])
    assert results[(1980.0, 1980.0)].mean() < results[(900.0, 900.0)].mean()
    # The fast rank waits at the barrier: lower activity than its slow peer.
    a_fast, a_slow = activity[(1980.0, 900.0)]
    assert a_fast < a_slow


def test_counters_and_histograms_agree_with_the_requests() -> None:
    bank = make_bank(n_servers=2)
    rng = np.random.default_rng(1)
    n = 300
    t = np.sort(rng.uniform(0.0, 20.0, n))
    prompt = rng.integers(10, 3000, n)
    gen = rng.integers(1, 300, n)
    bank.feed(t, prompt, gen)
    run(bank, 60.0, 1980.0)
    rec = bank.finished_requests()
    assert len(rec) == n
    assert sorted(rec["gen_tokens"].tolist()) == sorted(gen.tolist())
    assert np.all(rec["e2e_s"] >= rec["ttft_s"]) and np.all(rec["ttft_s"] > rec["queue_s"])
    snaps = [bank.snapshot(s) for s in range(2)]
    assert sum(s.values["generation_tokens"] for s in snaps) == gen.sum()
    assert sum(s.values["prompt_tokens"] for s in snaps) == prompt.sum()
    assert sum(s.values["requests_success"] for s in snaps) == n
    assert sum(s.histograms["ttft_s"].count for s in snaps) == n
    assert sum(s.histograms["itl_s"].count for s in snaps) == (gen - 1).sum()
    assert sum(s.histograms["ttft_s"].sum for s in snaps) == pytest.approx(rec["ttft_s"].sum())
    for s in snaps:
        assert set(s.histograms) == set(HISTOGRAM_NAMES)
        for h in s.histograms.values():
            assert list(h.cumulative_counts) == sorted(h.cumulative_counts)
    # Least-loaded dispatch spreads the requests.
    assert min(s.values["requests_arrived"] for s in snaps) > 0.3 * n


def test_same_seed_same_run_other_seed_other_jitter() -> None:
    def once(seed: int) -> np.ndarray:
        bank = make_bank(seed=seed)
        bank.feed(*burst(20, prompt=300, gen=50))
        run(bank, 10.0, 1700.0)
        return bank.finished_requests()["e2e_s"]

    np.testing.assert_array_equal(once(3), once(3))
    assert not np.array_equal(once(3), once(4))


def test_copy_is_independent() -> None:
    bank = make_bank()
    bank.feed(*burst(20, prompt=300, gen=200))
    run(bank, 1.0, 1980.0)
    twin = bank.copy()
    run(twin, 5.0, 1980.0)
    assert bank.now_s == pytest.approx(1.0) and twin.now_s == pytest.approx(5.0)
    run(bank, 5.0, 1980.0)
    np.testing.assert_array_equal(bank.metrics, twin.metrics)
    np.testing.assert_array_equal(bank.finished_requests(), twin.finished_requests())


def test_prefill_backlog_counts_the_prompts_not_yet_prefilled() -> None:
    bank = make_bank()
    assert bank.prefill_backlog(0) == (0.0, None)
    assert bank.waiting_requests(0).size == 0
    n, prompt = 64, 6000
    arrival_s = np.arange(n) * 1e-3
    bank.feed(arrival_s, np.full(n, prompt), np.full(n, 50))
    run(bank, 0.2, 1980.0, step_s=0.05)
    running, queued, oldest = bank.prefill_backlog_parts(0)
    assert bank.metrics[0, M_PREEMPTIONS] == 0
    assert bank.num_waiting(0) > 0
    # Every prompt token arrived is either prefilled (the prompt counter) or still pending.
    assert running + queued == n * prompt - bank.metrics[0, M_PROMPT_TOKENS]
    assert queued == bank.num_waiting(0) * prompt
    # FCFS: the oldest request without a first token comes right after those that have one.
    first_tokens = int(bank.snapshot(0).histograms["ttft_s"].count)
    assert 0 < first_tokens < n and oldest == arrival_s[first_tokens]
    assert bank.prefill_backlog(0) == (running + queued, oldest)
    queue = bank.waiting_requests(0)
    assert queue.size == bank.num_waiting(0)
    assert np.all(np.diff(bank.req_f[queue, RF_ARRIVAL]) > 0)
    run(bank, 120.0, 1980.0, step_s=1.0)
    assert len(bank.finished_requests()) == n
    assert bank.prefill_backlog(0) == (0.0, None)


def test_feed_rejects_unsorted_or_past_arrivals() -> None:
    bank = make_bank()
    with pytest.raises(ValueError, match="sorted"):
        bank.feed(np.array([1.0, 0.5]), np.array([1, 1]), np.array([1, 1]))
    bank.run_until(2.0, 1980.0)
    with pytest.raises(ValueError):
        bank.feed(np.array([1.0]), np.array([1]), np.array([1]))


_NOJIT_SCRIPT = """
import json, numpy as np
from powerd.sim.engine import EngineBank
from powerd.sim.models import get_model_profile
from powerd.sim.plant import load_gpu_profile
bank = EngineBank(load_gpu_profile("h100-sxm"), get_model_profile("llama-3.1-8b"), 1, 2, seed=3)
rng = np.random.default_rng(0)
n = 30
bank.feed(np.sort(rng.uniform(0, 1, n)), rng.integers(50, 3000, n), rng.integers(1, 40, n))
for k in range(1, 31):
    bank.run_until(k * 0.1, np.array([1980.0, 1500.0]))
rec = bank.finished_requests()
print(json.dumps([rec["e2e_s"].tolist(), bank.metrics.tolist()]))
"""


def test_compiled_and_pure_python_engines_agree() -> None:
    repo = Path(__file__).resolve().parents[2]
    out = {}
    for disable in ("0", "1"):
        env = {**os.environ, "NUMBA_DISABLE_JIT": disable}
        proc = subprocess.run(
            [sys.executable, "-W", "ignore", "-c", _NOJIT_SCRIPT],
            cwd=repo,
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        )
        out[disable] = json.loads(proc.stdout)
    assert out["0"] == out["1"]
