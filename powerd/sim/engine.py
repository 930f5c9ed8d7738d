"""Simulated continuous-batching inference engine (vLLM-style), numba-compiled.

A bank of S servers of one model: each is a tensor-parallel group of `tp` GPUs with a FCFS
waiting queue and a running batch bounded by `max_batch` and by its KV-cache capacity. Every
iteration schedules the running requests first (decode: 1 token; unfinished prefill: the next
chunk), then admits waiting requests while the chunked-prefill token budget, the batch bound and
the KV cache allow; when the cache cannot hold the next tokens the most recently admitted request
is preempted (recompute, as vLLM V1). Iteration time is the smooth roofline of
dvfs_plant_model.md §6(c) at the slowest rank's clock, with log-normal jitter (CV 3 %) and a CPU
share; the plant gets each rank's activity and HBM utilisation per iteration (§6(b)).

All state lives in numpy arrays so that one compiled call advances every server, and a copy of
the arrays is an independent engine. Times are simulated seconds from the start of the run.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from powerd.control.kernels import jit
from powerd.sim.buckets import histogram_bounds
from powerd.sim.models import ModelProfile
from powerd.sim.plant import decode_activity
from powerd.sim.roofline import iteration_time_s, roofline_terms_s

# ---------------------------------------------------------------------------------------------
# Array layouts (column indices). Kept as module constants so the compiled code sees literals.

# cfg: float64[N_CFG]
C_W_RANK_BYTES = 0
C_KV_RANK_BYTES_PER_TOKEN = 1
C_FLOPS_RANK_PER_TOKEN = 2
C_ATTN_RANK_FLOPS_PER_CTX = 3
C_HBM_TB_S = 4
C_ETA_M = 5
C_PEAK_TFLOPS = 6
C_ETA_C = 7
C_KAPPA0 = 8
C_F_MAX_MHZ = 9
C_T_CPU_S = 10
C_T_CPU_FRAC = 11
C_JITTER_SIGMA = 12
C_CHUNK_TOKENS = 13
C_MAX_BATCH = 14
C_KV_CAP_TOKENS = 15
C_TP = 16
C_ALLREDUCE_S = 17
C_ALLREDUCE_BYTES_PER_TOKEN = 18
C_LINK_BYTES_S = 19
C_N_LAYERS = 20
C_DISPATCH = 21
C_SG_LOG_INTERVAL = 22
C_MAX_MODEL_LEN = 23
N_CFG = 24

# Request pool, int64[C, N_RI]
R_PROMPT = 0
R_GEN = 1
R_NEED = 2  # tokens to prefill (prompt, or prompt + generated after a preemption)
R_DONE = 3  # tokens prefilled so far
R_GEN_DONE = 4
R_KV = 5  # KV-cache tokens held
R_SERVER = 6
R_NEXT = 7  # next request in its server's waiting queue
R_STARTED = 8
N_RI = 9
# Request pool, float64[C, N_RF]
RF_ARRIVAL = 0
RF_SCHED = 1
RF_FIRST = 2
RF_LAST = 3
N_RF = 4

# Servers, int64[S, N_SI]
SI_WQ_HEAD = 0
SI_WQ_TAIL = 1
SI_WQ_LEN = 2
SI_RUN_N = 3
SI_BUSY = 4
SI_KV_USED = 5
SI_ITER_GEN_REQS = 6
SI_ITER_CTX_REQS = 7
SI_ITER_CTX_TOKENS = 8
SI_SG_STEPS = 9
SI_DONE_GEN_REQS = 10
SI_DONE_CTX_REQS = 11
SI_DONE_CTX_TOKENS = 12
"""The last completed iteration's batch, which TensorRT-LLM's iteration stats report."""
N_SI = 13
# Servers, float64[S, N_SF]
SF_BUSY_UNTIL = 0
SF_MARK = 1
SF_SG_LAST_LOG = 2
SF_ITER_START = 3
N_SF = 4

# GPUs, float64[G, N_GF]
GF_ITER_ACT = 0
GF_ITER_MEM = 1
GF_ACC_ACT = 2
GF_ACC_MEM = 3
N_GF = 4

# Bank-wide ints, int64[N_NI]
NI_FREE_TOP = 0
NI_ARR_POS = 1
NI_RR_NEXT = 2
NI_FIN_N = 3
N_NI = 4

# Finished-request records, float64[C, N_FF]
FF_SERVER = 0
FF_ARRIVAL = 1
FF_SCHED = 2
FF_FIRST = 3
FF_FINISH = 4
FF_PROMPT = 5
FF_GEN = 6
N_FF = 7

# Per-server metrics, float64[S, N_M]. Counters unless noted.
M_PROMPT_TOKENS = 0  # prefill tokens computed, per iteration (chunk by chunk)
M_GEN_TOKENS = 1  # tokens generated, per iteration
M_REQ_ARRIVED = 2
M_REQ_SUCCESS = 3
M_REQ_ABORTED = 4
M_PREEMPTIONS = 5
M_ITERATIONS = 6
M_BUSY_SLOTS = 7  # sum over iterations of the sequences in the batch
M_FIN_PROMPT_TOKENS = 8  # added when a request finishes
M_FIN_GEN_TOKENS = 9
M_FIN_E2E_S = 10
M_FIN_QUEUE_S = 11
M_FIN_INFERENCE_S = 12
M_PROMPT_DONE_TOKENS = 13  # a whole prompt, added when its first token comes (vLLM V1)
M_PROMPT_DONE_S = 14
M_N_TOKENS_MAX = 15  # largest sequence seen (a high-water mark)
M_PREFILL_BATCHES = 16
M_DECODE_BATCHES = 17
M_RT_PREFILL_TOKENS = 18  # SGLang realtime_tokens_total, flushed per prefill batch
M_RT_DECODE_TOKENS = 19  # flushed every decode_log_interval decode batches
M_SG_PENDING_DECODE = 20  # gauge: tokens not yet flushed
M_GEN_THROUGHPUT_TPS = 21  # gauge: SGLang gen_throughput
M_LC_PROMPT_TOKENS = 22  # llama.cpp bucket since the last scrape
M_LC_PROMPT_S = 23
M_LC_PRED_TOKENS = 24
M_LC_PRED_S = 25
M_BUSY_S = 26  # time with an iteration in flight
M_FIN_DECODE_S = 27  # first token to last token, added when a request finishes
N_M = 28

METRIC_NAMES: tuple[str, ...] = (
    "prompt_tokens",
    "generation_tokens",
    "requests_arrived",
    "requests_success",
    "requests_aborted",
    "preemptions",
    "iterations",
    "busy_slots",
    "finished_prompt_tokens",
    "finished_generation_tokens",
    "finished_e2e_s",
    "finished_queue_s",
    "finished_inference_s",
    "prompt_done_tokens",
    "prompt_done_s",
    "n_tokens_max",
    "prefill_batches",
    "decode_batches",
    "realtime_prefill_tokens",
    "realtime_decode_tokens",
    "sglang_pending_decode_tokens",
    "gen_throughput_tokens_per_s",
    "llamacpp_bucket_prompt_tokens",
    "llamacpp_bucket_prompt_s",
    "llamacpp_bucket_predicted_tokens",
    "llamacpp_bucket_predicted_s",
    "busy_s",
    "finished_decode_s",
)
_SCRAPE_BUCKET = (M_LC_PROMPT_TOKENS, M_LC_PROMPT_S, M_LC_PRED_TOKENS, M_LC_PRED_S)

# Histograms, float64[S, N_H, NB + 1] counts per bucket (the last used index is +Inf).
H_TTFT = 0
H_ITL = 1
H_TPOT = 2
H_E2E = 3
H_QUEUE = 4
H_INFERENCE = 5
H_PREFILL = 6
H_DECODE = 7
H_PROMPT_TOKENS = 8
H_GEN_TOKENS = 9
H_ITER_TOKENS = 10
H_MEAN_TPT = 11
H_NEXT_BATCH = 12  # requests admitted by one iteration (TGI's tgi_batch_next_size)
H_TTFT_AT_END = 13  # time to first token, observed when the request ends (trtllm-serve)
H_FORWARD_PREFILL = 14  # duration of each iteration with prompt work (TGI's method="prefill")
H_FORWARD_DECODE = 15  # duration of each decode-only iteration (TGI's method="decode")
N_H = 16
HISTOGRAM_NAMES: tuple[str, ...] = (
    "ttft_s",
    "itl_s",
    "tpot_s",
    "e2e_s",
    "queue_s",
    "inference_s",
    "prefill_s",
    "decode_s",
    "prompt_tokens",
    "generation_tokens",
    "iteration_tokens",
    "mean_time_per_token_s",
    "next_batch_size",
    "ttft_at_end_s",
    "forward_prefill_s",
    "forward_decode_s",
)

DISPATCH_POLICIES = {"least_loaded": 0, "round_robin": 1}

# Per-request records returned by finished_requests() of the node and the bank.
FINISHED_DTYPE = np.dtype(
    [
        ("server", np.int64),
        ("arrival_s", np.float64),
        ("ttft_s", np.float64),
        ("itl_mean_s", np.float64),
        ("queue_s", np.float64),
        ("e2e_s", np.float64),
        ("prompt_tokens", np.int64),
        ("gen_tokens", np.int64),
    ]
)

# Prefill activity rises to ~1 once a chunk fills the SMs: 0.93 at 512 tokens, 1.02 at 2048
# (§6(b): 0.9-1.2 for prefill of 512 tokens or more).
_A_PF_MAX = 1.05
_A_PF_HALF = 64.0


class GpuSpec(Protocol):
    """What the engine needs of a GPU profile (powerd.sim.plant.GpuProfile satisfies it)."""

    @property
    def sm_clock_max_mhz(self) -> float: ...
    @property
    def hbm_bandwidth_tb_s(self) -> float: ...
    @property
    def peak_tflops(self) -> float: ...
    @property
    def kappa0(self) -> float: ...
    @property
    def memory_gb(self) -> float: ...


# ---------------------------------------------------------------------------------------------
# Compiled kernels


@jit
def _rng_uniform(rng: np.ndarray, s: int) -> float:
    """splitmix64 step on rng[s]; a uniform in (0, 1). Deterministic and copyable state."""
    x = rng[s] + np.uint64(0x9E3779B97F4A7C15)
    rng[s] = x
    z = x
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (float(z >> np.uint64(11)) + 0.5) * (1.0 / 9007199254740992.0)


@jit
def _rng_normal(rng: np.ndarray, s: int) -> float:
    u1 = _rng_uniform(rng, s)
    u2 = _rng_uniform(rng, s)
    return math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2)


@jit
def _bucket(hist_b: np.ndarray, h: int, v: float) -> int:
    """Index of the first bound >= v in histogram h (Prometheus `le`); the +Inf slot if none."""
    lo = 0
    hi = hist_b.shape[1]
    while lo < hi:
        mid = (lo + hi) // 2
        if hist_b[h, mid] < v:
            lo = mid + 1
        else:
            hi = mid
    return lo


@jit
def _observe(
    hist_c: np.ndarray, hist_s: np.ndarray, hist_b: np.ndarray, s: int, h: int, v: float
) -> None:
    """Add one observation of value v to histogram h of server s."""
    hist_c[s, h, _bucket(hist_b, h, v)] += 1.0
    hist_s[s, h] += v


@jit
def gpu_time_s(
    cfg: np.ndarray, n_tokens: float, kv_tokens: float, attn_ctx: float, clock_mhz: float
) -> float:
    """GPU time of one iteration on one rank at `clock_mhz` (roofline §6(c), no jitter/CPU).

    n_tokens: tokens computed; kv_tokens: KV-cache tokens read or written; attn_ctx: sum over
    computed tokens of the context each attends to.
    """
    bytes_rank = cfg[C_W_RANK_BYTES] + kv_tokens * cfg[C_KV_RANK_BYTES_PER_TOKEN]
    flops_rank = n_tokens * cfg[C_FLOPS_RANK_PER_TOKEN] + attn_ctx * cfg[C_ATTN_RANK_FLOPS_PER_CTX]
    t_m, t_cs = roofline_terms_s(
        bytes_rank,
        flops_rank,
        cfg[C_HBM_TB_S],
        cfg[C_PEAK_TFLOPS],
        cfg[C_KAPPA0],
        cfg[C_ETA_M],
        cfg[C_ETA_C],
    )
    return iteration_time_s(t_m, t_cs, clock_mhz, cfg[C_F_MAX_MHZ], 0.0)


@jit
def comm_time_s(cfg: np.ndarray, n_tokens: float) -> float:
    """Tensor-parallel all-reduce time of one iteration (two per layer, ring), clock-free."""
    tp = cfg[C_TP]
    if tp <= 1.0:
        return 0.0
    ring_bytes = n_tokens * cfg[C_ALLREDUCE_BYTES_PER_TOKEN] * 2.0 * (tp - 1.0) / tp
    return 2.0 * cfg[C_N_LAYERS] * (cfg[C_ALLREDUCE_S] + ring_bytes / cfg[C_LINK_BYTES_S])


@jit
def _activity(n_seqs: float, n_prefill_tokens: float) -> float:
    """SM activity of an iteration: the decode fit a_d(B) over its sequences, or the prefill
    level when its chunk is larger (§6(b))."""
    a = decode_activity(n_seqs)
    if n_prefill_tokens > 0.0:
        a_pf = _A_PF_MAX * n_prefill_tokens / (n_prefill_tokens + _A_PF_HALF)
        if a_pf > a:
            a = a_pf
    return a


@jit
def _wq_push_back(req_i: np.ndarray, srv_i: np.ndarray, s: int, r: int) -> None:
    req_i[r, R_NEXT] = -1
    if srv_i[s, SI_WQ_LEN] == 0:
        srv_i[s, SI_WQ_HEAD] = r
    else:
        req_i[srv_i[s, SI_WQ_TAIL], R_NEXT] = r
    srv_i[s, SI_WQ_TAIL] = r
    srv_i[s, SI_WQ_LEN] += 1


@jit
def _wq_push_front(req_i: np.ndarray, srv_i: np.ndarray, s: int, r: int) -> None:
    if srv_i[s, SI_WQ_LEN] == 0:
        req_i[r, R_NEXT] = -1
        srv_i[s, SI_WQ_TAIL] = r
    else:
        req_i[r, R_NEXT] = srv_i[s, SI_WQ_HEAD]
    srv_i[s, SI_WQ_HEAD] = r
    srv_i[s, SI_WQ_LEN] += 1


@jit
def _wq_pop_front(req_i: np.ndarray, srv_i: np.ndarray, s: int) -> int:
    r = srv_i[s, SI_WQ_HEAD]
    srv_i[s, SI_WQ_HEAD] = req_i[r, R_NEXT]
    srv_i[s, SI_WQ_LEN] -= 1
    if srv_i[s, SI_WQ_LEN] == 0:
        srv_i[s, SI_WQ_TAIL] = -1
        srv_i[s, SI_WQ_HEAD] = -1
    return r


@jit
def _start_iteration(
    s: int,
    t0: float,
    clocks_mhz: np.ndarray,
    cfg: np.ndarray,
    req_i: np.ndarray,
    req_f: np.ndarray,
    srv_i: np.ndarray,
    srv_f: np.ndarray,
    run_idx: np.ndarray,
    run_tok: np.ndarray,
    gpu_map: np.ndarray,
    gpu_f: np.ndarray,
    metrics: np.ndarray,
    hist_c: np.ndarray,
    hist_s: np.ndarray,
    hist_b: np.ndarray,
    rng: np.ndarray,
) -> bool:
    """Schedule and launch the next iteration of server s at t0; False when there is no work."""
    budget0 = int(cfg[C_CHUNK_TOKENS])
    cap = cfg[C_KV_CAP_TOKENS]
    max_batch = int(cfg[C_MAX_BATCH])
    n_run = srv_i[s, SI_RUN_N]

    # Running requests first; preempt from the tail while their next tokens do not fit.
    while n_run > 0:
        b = budget0
        add = 0
        for j in range(n_run):
            r = run_idx[s, j]
            rem = req_i[r, R_NEED] - req_i[r, R_DONE]
            tok = min(rem, b) if rem > 0 else min(1, b)
            add += tok
            b -= tok
        if srv_i[s, SI_KV_USED] + add <= cap or n_run == 1:
            break
        r = run_idx[s, n_run - 1]
        srv_i[s, SI_KV_USED] -= req_i[r, R_KV]
        req_i[r, R_KV] = 0
        req_i[r, R_NEED] = req_i[r, R_PROMPT] + req_i[r, R_GEN_DONE]
        req_i[r, R_DONE] = 0
        _wq_push_front(req_i, srv_i, s, r)
        n_run -= 1
        metrics[s, M_PREEMPTIONS] += 1.0

    b = budget0
    add = 0
    for j in range(n_run):
        r = run_idx[s, j]
        rem = req_i[r, R_NEED] - req_i[r, R_DONE]
        tok = min(rem, b) if rem > 0 else min(1, b)
        run_tok[s, j] = tok
        add += tok
        b -= tok

    # Admit waiting requests (FCFS) while budget, batch bound and KV cache allow.
    admitted = 0
    while srv_i[s, SI_WQ_LEN] > 0 and b > 0 and n_run < max_batch:
        r = srv_i[s, SI_WQ_HEAD]
        tok = min(req_i[r, R_NEED] - req_i[r, R_DONE], b)
        if srv_i[s, SI_KV_USED] + add + tok > cap:
            break
        _wq_pop_front(req_i, srv_i, s)
        run_idx[s, n_run] = r
        run_tok[s, n_run] = tok
        n_run += 1
        add += tok
        b -= tok
        if req_i[r, R_STARTED] == 0:
            req_i[r, R_STARTED] = 1
            req_f[r, RF_SCHED] = t0
            admitted += 1
    if admitted > 0:
        _observe(hist_c, hist_s, hist_b, s, H_NEXT_BATCH, float(admitted))
    srv_i[s, SI_RUN_N] = n_run
    if n_run == 0:
        srv_i[s, SI_BUSY] = 0
        return False

    n_pf = 0.0
    n_dec = 0.0
    n_ctx_reqs = 0
    kv_tokens = 0.0
    attn_ctx = 0.0
    for j in range(n_run):
        tok = run_tok[s, j]
        if tok == 0:
            continue
        r = run_idx[s, j]
        done = req_i[r, R_DONE]
        if done < req_i[r, R_NEED]:
            n_pf += tok
            n_ctx_reqs += 1
            kv_tokens += done + tok
            attn_ctx += tok * (done + 0.5 * tok)
        else:
            ctx = req_i[r, R_PROMPT] + req_i[r, R_GEN_DONE]
            n_dec += 1.0
            kv_tokens += ctx
            attn_ctx += ctx
        req_i[r, R_KV] += tok
    srv_i[s, SI_KV_USED] += add
    n_tokens = n_pf + n_dec

    tp = gpu_map.shape[1]
    f_group = clocks_mhz[gpu_map[s, 0]]
    for k in range(1, tp):
        f_k = clocks_mhz[gpu_map[s, k]]
        if f_k < f_group:
            f_group = f_k
    sigma = cfg[C_JITTER_SIGMA]
    jitter = math.exp(sigma * _rng_normal(rng, s) - 0.5 * sigma * sigma)
    t_gpu = gpu_time_s(cfg, n_tokens, kv_tokens, attn_ctx, f_group) * jitter
    t_it = t_gpu + comm_time_s(cfg, n_tokens) + cfg[C_T_CPU_S] + cfg[C_T_CPU_FRAC] * t_gpu

    a = _activity(n_dec + n_ctx_reqs, n_pf)
    bytes_rank = cfg[C_W_RANK_BYTES] + kv_tokens * cfg[C_KV_RANK_BYTES_PER_TOKEN]
    mem = bytes_rank / (cfg[C_HBM_TB_S] * 1e12 * t_it)
    if mem > 1.0:
        mem = 1.0
    for k in range(tp):
        g = gpu_map[s, k]
        t_rank = t_gpu
        if clocks_mhz[g] != f_group:
            # A faster rank finishes its share early and waits at the all-reduce barrier.
            t_rank = gpu_time_s(cfg, n_tokens, kv_tokens, attn_ctx, clocks_mhz[g]) * jitter
        gpu_f[g, GF_ITER_ACT] = a * min(t_rank / t_it, 1.0)
        gpu_f[g, GF_ITER_MEM] = mem

    srv_i[s, SI_BUSY] = 1
    srv_i[s, SI_ITER_GEN_REQS] = int(n_dec)
    srv_i[s, SI_ITER_CTX_REQS] = n_ctx_reqs
    srv_i[s, SI_ITER_CTX_TOKENS] = int(n_pf)
    srv_f[s, SF_BUSY_UNTIL] = t0 + t_it
    srv_f[s, SF_MARK] = t0
    srv_f[s, SF_ITER_START] = t0
    return True


@jit
def _accumulate(
    s: int, t: float, srv_f: np.ndarray, gpu_map: np.ndarray, gpu_f: np.ndarray
) -> None:
    """Credit server s's current iteration activity up to time t."""
    dt = t - srv_f[s, SF_MARK]
    if dt > 0.0:
        for k in range(gpu_map.shape[1]):
            g = gpu_map[s, k]
            gpu_f[g, GF_ACC_ACT] += gpu_f[g, GF_ITER_ACT] * dt
            gpu_f[g, GF_ACC_MEM] += gpu_f[g, GF_ITER_MEM] * dt
    srv_f[s, SF_MARK] = t


@jit
def _finish_request(
    s: int,
    r: int,
    t1: float,
    req_i: np.ndarray,
    req_f: np.ndarray,
    free_stack: np.ndarray,
    srv_i: np.ndarray,
    metrics: np.ndarray,
    hist_c: np.ndarray,
    hist_s: np.ndarray,
    hist_b: np.ndarray,
    node_i: np.ndarray,
    fin: np.ndarray,
) -> None:
    """Request r of server s finished at t1: count it in s's metrics and request histograms,
    append its record to fin, and return its KV cache and pool slot."""
    arrival = req_f[r, RF_ARRIVAL]
    sched = req_f[r, RF_SCHED]
    first = req_f[r, RF_FIRST]
    gen = req_i[r, R_GEN]
    prompt = req_i[r, R_PROMPT]
    e2e = t1 - arrival
    metrics[s, M_REQ_SUCCESS] += 1.0
    metrics[s, M_FIN_PROMPT_TOKENS] += prompt
    metrics[s, M_FIN_GEN_TOKENS] += gen
    metrics[s, M_FIN_E2E_S] += e2e
    metrics[s, M_FIN_QUEUE_S] += sched - arrival
    metrics[s, M_FIN_INFERENCE_S] += t1 - sched
    metrics[s, M_LC_PRED_TOKENS] += gen
    metrics[s, M_LC_PRED_S] += t1 - first
    metrics[s, M_FIN_DECODE_S] += t1 - first
    # One observation per request-level histogram; -1 marks "no value" (TPOT of a one-token
    # answer). A loop keeps a single copy of the bucket search.
    obs = np.empty(N_H)
    obs[:] = -1.0
    obs[H_E2E] = e2e
    obs[H_QUEUE] = sched - arrival
    obs[H_INFERENCE] = t1 - sched
    obs[H_PREFILL] = first - sched
    obs[H_DECODE] = t1 - first
    obs[H_PROMPT_TOKENS] = prompt
    obs[H_GEN_TOKENS] = gen
    obs[H_MEAN_TPT] = (t1 - sched) / gen
    obs[H_TTFT_AT_END] = first - arrival
    if gen > 1:
        obs[H_TPOT] = (t1 - first) / (gen - 1)
    for h in range(N_H):
        if obs[h] >= 0.0:
            _observe(hist_c, hist_s, hist_b, s, h, obs[h])
    k = node_i[NI_FIN_N]
    fin[k, FF_SERVER] = s
    fin[k, FF_ARRIVAL] = arrival
    fin[k, FF_SCHED] = sched
    fin[k, FF_FIRST] = first
    fin[k, FF_FINISH] = t1
    fin[k, FF_PROMPT] = prompt
    fin[k, FF_GEN] = gen
    node_i[NI_FIN_N] = k + 1
    srv_i[s, SI_KV_USED] -= req_i[r, R_KV]
    req_i[r, R_KV] = 0
    free_stack[node_i[NI_FREE_TOP]] = r
    node_i[NI_FREE_TOP] += 1


@jit
def _complete_iteration(
    s: int,
    t1: float,
    cfg: np.ndarray,
    req_i: np.ndarray,
    req_f: np.ndarray,
    free_stack: np.ndarray,
    srv_i: np.ndarray,
    srv_f: np.ndarray,
    run_idx: np.ndarray,
    run_tok: np.ndarray,
    gpu_map: np.ndarray,
    gpu_f: np.ndarray,
    metrics: np.ndarray,
    hist_c: np.ndarray,
    hist_s: np.ndarray,
    hist_b: np.ndarray,
    node_i: np.ndarray,
    fin: np.ndarray,
) -> None:
    """Apply the effects of server s's iteration that ends at t1 (tokens are emitted at t1)."""
    _accumulate(s, t1, srv_f, gpu_map, gpu_f)
    n_run = srv_i[s, SI_RUN_N]
    gen_this = 0
    pf_this = 0
    pf_done_this = 0
    n_seqs = 0
    last_itl = -1.0
    last_bucket = 0
    keep = 0
    for j in range(n_run):
        r = run_idx[s, j]
        tok = run_tok[s, j]
        finished = False
        if tok > 0:
            n_seqs += 1
            if req_i[r, R_DONE] < req_i[r, R_NEED]:
                req_i[r, R_DONE] += tok
                pf_this += tok
                if req_i[r, R_DONE] >= req_i[r, R_NEED]:
                    req_i[r, R_GEN_DONE] += 1
                    gen_this += 1
                    if req_i[r, R_GEN_DONE] == 1:
                        req_f[r, RF_FIRST] = t1
                        _observe(hist_c, hist_s, hist_b, s, H_TTFT, t1 - req_f[r, RF_ARRIVAL])
                        pf_done_this += req_i[r, R_PROMPT]
                        metrics[s, M_PROMPT_DONE_S] += t1 - req_f[r, RF_SCHED]
                        metrics[s, M_LC_PROMPT_TOKENS] += req_i[r, R_PROMPT]
                        metrics[s, M_LC_PROMPT_S] += t1 - req_f[r, RF_SCHED]
                    else:
                        _observe(hist_c, hist_s, hist_b, s, H_ITL, t1 - req_f[r, RF_LAST])
                    req_f[r, RF_LAST] = t1
            else:
                req_i[r, R_GEN_DONE] += 1
                gen_this += 1
                itl = t1 - req_f[r, RF_LAST]
                # Requests decoded together share their last token time: reuse the bucket.
                if itl != last_itl:
                    last_itl = itl
                    last_bucket = _bucket(hist_b, H_ITL, itl)
                hist_c[s, H_ITL, last_bucket] += 1.0
                hist_s[s, H_ITL] += itl
                req_f[r, RF_LAST] = t1
            seq = req_i[r, R_PROMPT] + req_i[r, R_GEN_DONE]
            if seq > metrics[s, M_N_TOKENS_MAX]:
                metrics[s, M_N_TOKENS_MAX] = seq
            finished = req_i[r, R_GEN_DONE] >= req_i[r, R_GEN]
        if finished:
            _finish_request(
                s, r, t1, req_i, req_f, free_stack, srv_i, metrics, hist_c, hist_s, hist_b, node_i,
                fin,
            )  # fmt: skip
        else:
            run_idx[s, keep] = r
            keep += 1
    srv_i[s, SI_RUN_N] = keep

    metrics[s, M_PROMPT_TOKENS] += pf_this
    metrics[s, M_PROMPT_DONE_TOKENS] += pf_done_this
    metrics[s, M_GEN_TOKENS] += gen_this
    metrics[s, M_ITERATIONS] += 1.0
    srv_i[s, SI_DONE_GEN_REQS] = srv_i[s, SI_ITER_GEN_REQS]
    srv_i[s, SI_DONE_CTX_REQS] = srv_i[s, SI_ITER_CTX_REQS]
    srv_i[s, SI_DONE_CTX_TOKENS] = srv_i[s, SI_ITER_CTX_TOKENS]
    metrics[s, M_BUSY_SLOTS] += n_seqs
    iteration_s = t1 - srv_f[s, SF_ITER_START]
    metrics[s, M_BUSY_S] += iteration_s
    # vLLM V1 observes the step's IterationStats: whole prompts at their first token, plus the
    # tokens the step generated.
    _observe(hist_c, hist_s, hist_b, s, H_ITER_TOKENS, float(pf_done_this + gen_this))
    if pf_this > 0:
        metrics[s, M_PREFILL_BATCHES] += 1.0
        metrics[s, M_RT_PREFILL_TOKENS] += pf_this
        _observe(hist_c, hist_s, hist_b, s, H_FORWARD_PREFILL, iteration_s)
    else:
        metrics[s, M_DECODE_BATCHES] += 1.0
        _observe(hist_c, hist_s, hist_b, s, H_FORWARD_DECODE, iteration_s)
    # SGLang logs decode statistics every decode_log_interval decode batches.
    metrics[s, M_SG_PENDING_DECODE] += gen_this
    if srv_i[s, SI_ITER_GEN_REQS] > 0:
        srv_i[s, SI_SG_STEPS] += 1
        if srv_i[s, SI_SG_STEPS] >= int(cfg[C_SG_LOG_INTERVAL]):
            gap = t1 - srv_f[s, SF_SG_LAST_LOG]
            if gap > 0.0:
                metrics[s, M_GEN_THROUGHPUT_TPS] = metrics[s, M_SG_PENDING_DECODE] / gap
            metrics[s, M_RT_DECODE_TOKENS] += metrics[s, M_SG_PENDING_DECODE]
            metrics[s, M_SG_PENDING_DECODE] = 0.0
            srv_i[s, SI_SG_STEPS] = 0
            srv_f[s, SF_SG_LAST_LOG] = t1


@jit
def _dispatch(
    ta: float,
    prompt: int,
    gen: int,
    cfg: np.ndarray,
    req_i: np.ndarray,
    req_f: np.ndarray,
    free_stack: np.ndarray,
    srv_i: np.ndarray,
    metrics: np.ndarray,
    node_i: np.ndarray,
) -> int:
    """Queue one arriving request on a server; returns the server, or -1 if it was rejected."""
    n_srv = srv_i.shape[0]
    start = node_i[NI_RR_NEXT] % n_srv
    node_i[NI_RR_NEXT] = (start + 1) % n_srv
    s = start
    if cfg[C_DISPATCH] == 0.0:
        best = srv_i[s, SI_RUN_N] + srv_i[s, SI_WQ_LEN]
        for i in range(1, n_srv):
            c = (start + i) % n_srv
            load = srv_i[c, SI_RUN_N] + srv_i[c, SI_WQ_LEN]
            if load < best:
                best = load
                s = c
    metrics[s, M_REQ_ARRIVED] += 1.0
    if gen < 1:
        gen = 1
    if prompt < 1:
        prompt = 1
    if prompt + gen > cfg[C_KV_CAP_TOKENS] or prompt + gen > cfg[C_MAX_MODEL_LEN]:
        metrics[s, M_REQ_ABORTED] += 1.0
        return -1
    node_i[NI_FREE_TOP] -= 1
    r = free_stack[node_i[NI_FREE_TOP]]
    req_i[r, R_PROMPT] = prompt
    req_i[r, R_GEN] = gen
    req_i[r, R_NEED] = prompt
    req_i[r, R_DONE] = 0
    req_i[r, R_GEN_DONE] = 0
    req_i[r, R_KV] = 0
    req_i[r, R_SERVER] = s
    req_i[r, R_STARTED] = 0
    req_f[r, RF_ARRIVAL] = ta
    req_f[r, RF_SCHED] = ta
    req_f[r, RF_FIRST] = ta
    req_f[r, RF_LAST] = ta
    _wq_push_back(req_i, srv_i, s, r)
    return s


@jit
def engine_run_until(
    t_start: float,
    t_end: float,
    clocks_mhz: np.ndarray,
    activity: np.ndarray,
    mem_util: np.ndarray,
    cfg: np.ndarray,
    req_i: np.ndarray,
    req_f: np.ndarray,
    free_stack: np.ndarray,
    srv_i: np.ndarray,
    srv_f: np.ndarray,
    run_idx: np.ndarray,
    run_tok: np.ndarray,
    gpu_map: np.ndarray,
    gpu_f: np.ndarray,
    metrics: np.ndarray,
    hist_c: np.ndarray,
    hist_s: np.ndarray,
    hist_b: np.ndarray,
    rng: np.ndarray,
    node_i: np.ndarray,
    arr_t: np.ndarray,
    arr_p: np.ndarray,
    arr_g: np.ndarray,
    fin: np.ndarray,
) -> None:
    """Advance every server from t_start to t_end at fixed SM clocks (MHz, per GPU).

    Consumes arrivals arr_*[node_i[NI_ARR_POS]:] with time <= t_end, appends finished requests
    to fin[node_i[NI_FIN_N]:], and writes each GPU's time-averaged activity and HBM utilisation
    over [t_start, t_end) into activity and mem_util (GPUs of no server get 0).
    """
    n_srv = srv_i.shape[0]
    n_arr = arr_t.shape[0]
    while True:
        pos = node_i[NI_ARR_POS]
        ta = arr_t[pos] if pos < n_arr else np.inf
        tb = np.inf
        sb = -1
        for s in range(n_srv):
            if srv_i[s, SI_BUSY] == 1 and srv_f[s, SF_BUSY_UNTIL] < tb:
                tb = srv_f[s, SF_BUSY_UNTIL]
                sb = s
        if tb <= ta:
            if tb > t_end:
                break
            _complete_iteration(
                sb, tb, cfg, req_i, req_f, free_stack, srv_i, srv_f, run_idx, run_tok, gpu_map,
                gpu_f, metrics, hist_c, hist_s, hist_b, node_i, fin,
            )  # fmt: skip
            s = sb
            t = tb
        else:
            if ta > t_end:
                break
            node_i[NI_ARR_POS] = pos + 1
            s = _dispatch(
                ta, arr_p[pos], arr_g[pos], cfg, req_i, req_f, free_stack, srv_i, metrics, node_i
            )
            if s < 0 or srv_i[s, SI_BUSY] == 1:
                continue
            t = ta
        _start_iteration(
            s, t, clocks_mhz, cfg, req_i, req_f, srv_i, srv_f, run_idx, run_tok, gpu_map, gpu_f,
            metrics, hist_c, hist_s, hist_b, rng,
        )  # fmt: skip
    span = t_end - t_start
    for s in range(n_srv):
        if srv_i[s, SI_BUSY] == 1:
            _accumulate(s, t_end, srv_f, gpu_map, gpu_f)
        else:
            srv_f[s, SF_MARK] = t_end
    for g in range(gpu_f.shape[0]):
        if span > 0.0:
            activity[g] = gpu_f[g, GF_ACC_ACT] / span
            mem_util[g] = gpu_f[g, GF_ACC_MEM] / span
        else:
            activity[g] = gpu_f[g, GF_ITER_ACT]
            mem_util[g] = gpu_f[g, GF_ITER_MEM]
        gpu_f[g, GF_ACC_ACT] = 0.0
        gpu_f[g, GF_ACC_MEM] = 0.0


# ---------------------------------------------------------------------------------------------
# Python side


def lognormal_jitter_sigma(cv: float) -> float:
    """σ of a log-normal with coefficient of variation cv (mean 1)."""
    return math.sqrt(math.log1p(cv * cv))


def build_config(
    gpu: GpuSpec,
    model: ModelProfile,
    tp: int,
    *,
    max_batch: int | None = None,
    chunk_tokens: int = 2048,
    kv_capacity_tokens: int | None = None,
    gpu_memory_utilization: float = 0.9,
    eta_mem: float = 0.8,
    eta_compute: float = 0.6,
    t_cpu_s: float = 2e-4,
    t_cpu_frac: float = 0.03,
    jitter_cv: float = 0.03,
    dispatch: str = "least_loaded",
    sglang_log_interval: int = 40,
) -> np.ndarray:
    """The engine's float64[N_CFG] parameter vector for `model` on TP groups of `gpu`.

    eta_mem/eta_compute: achieved shares of peak HBM bandwidth and tensor FLOPs (§6(c)
    assumptions); t_cpu_s + t_cpu_frac·t_gpu: the scheduler's CPU gap per iteration (§6(b):
    2-5 % of each iteration); chunk_tokens: the chunked-prefill token budget per iteration.
    """
    if tp < 1:
        raise ValueError(f"tp must be at least 1, got {tp}")
    if dispatch not in DISPATCH_POLICIES:
        raise ValueError(f"dispatch must be one of {sorted(DISPATCH_POLICIES)}, got {dispatch!r}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be at least 1, got {chunk_tokens}")
    kv_cap = (
        kv_capacity_tokens
        if kv_capacity_tokens is not None
        else model.kv_capacity_tokens(float(gpu.memory_gb), tp, gpu_memory_utilization)
    )
    cfg = np.zeros(N_CFG, dtype=np.float64)
    cfg[C_W_RANK_BYTES] = model.weight_bytes / tp
    cfg[C_KV_RANK_BYTES_PER_TOKEN] = model.kv_bytes_per_token / tp
    cfg[C_FLOPS_RANK_PER_TOKEN] = model.flops_per_token / tp
    cfg[C_ATTN_RANK_FLOPS_PER_CTX] = model.attn_flops_per_token_per_ctx / tp
    cfg[C_HBM_TB_S] = float(gpu.hbm_bandwidth_tb_s)
    cfg[C_ETA_M] = eta_mem
    cfg[C_PEAK_TFLOPS] = float(gpu.peak_tflops)
    cfg[C_ETA_C] = eta_compute
    cfg[C_KAPPA0] = float(gpu.kappa0)
    cfg[C_F_MAX_MHZ] = float(gpu.sm_clock_max_mhz)
    cfg[C_T_CPU_S] = t_cpu_s
    cfg[C_T_CPU_FRAC] = t_cpu_frac
    cfg[C_JITTER_SIGMA] = lognormal_jitter_sigma(jitter_cv)
    cfg[C_CHUNK_TOKENS] = chunk_tokens
    cfg[C_MAX_BATCH] = max_batch if max_batch is not None else model.max_batch
    cfg[C_KV_CAP_TOKENS] = kv_cap
    cfg[C_TP] = tp
    # NVLink-class all-reduce: ~5 µs per call with custom kernels, 450 GB/s per direction [A].
    cfg[C_ALLREDUCE_S] = 5e-6
    cfg[C_ALLREDUCE_BYTES_PER_TOKEN] = model.hidden_size * 2.0
    cfg[C_LINK_BYTES_S] = 450e9
    cfg[C_N_LAYERS] = model.n_layers
    cfg[C_DISPATCH] = DISPATCH_POLICIES[dispatch]
    cfg[C_SG_LOG_INTERVAL] = sglang_log_interval
    cfg[C_MAX_MODEL_LEN] = model.max_model_len
    return cfg


def default_histogram_bounds() -> dict[str, list[float]]:
    """vLLM's bucket boundaries for every histogram slot (vllm/v1/metrics/loggers.py)."""
    return histogram_bounds("vllm")


@dataclass(frozen=True, slots=True)
class HistogramSnapshot:
    """One histogram: finite upper bounds, cumulative counts per bound then +Inf, and the sum."""

    bounds: tuple[float, ...]
    cumulative_counts: tuple[float, ...]
    sum: float

    @property
    def count(self) -> float:
        return self.cumulative_counts[-1]


@dataclass(frozen=True, slots=True)
class EngineMetrics:
    """A consistent snapshot of one server's counters, gauges and histograms.

    values: METRIC_NAMES counters plus the gauges num_running, num_waiting, kv_used_tokens,
    kv_capacity_tokens, kv_usage (0-1), max_batch, iter_generation_requests,
    iter_context_requests, iter_context_tokens, now_s. histograms: keyed by HISTOGRAM_NAMES.
    """

    values: Mapping[str, float]
    histograms: Mapping[str, HistogramSnapshot]
    start_time_unix: float


class EngineBank:
    """S simulated servers of one model, each a TP group of `tp` GPUs, fed one arrival stream.

    gpu_map: int64[S, tp] GPU index of each rank (default: consecutive); cfg: build_config(...)
    (default: its defaults); hist_bounds: bucket bounds per HISTOGRAM_NAMES slot (default:
    vLLM's). Arrivals are queued with `feed()`; the dispatch policy (cfg) picks a server per
    request at its arrival time. keep_finished: keep a record of every finished request (for
    finished_requests); a bank that runs without end keeps none, so it does not grow.
    """

    def __init__(
        self,
        gpu: GpuSpec,
        model: ModelProfile,
        tp: int,
        n_servers: int,
        *,
        gpu_map: np.ndarray | None = None,
        n_gpus: int | None = None,
        seed: int = 0,
        cfg: np.ndarray | None = None,
        hist_bounds: Mapping[str, Sequence[float]] | None = None,
        initial_capacity: int = 1024,
        keep_finished: bool = True,
    ) -> None:
        if n_servers < 1:
            raise ValueError(f"n_servers must be at least 1, got {n_servers}")
        self.model = model
        self.tp = tp
        self.n_servers = n_servers
        self.cfg = build_config(gpu, model, tp) if cfg is None else np.array(cfg, dtype=np.float64)
        if self.cfg.shape != (N_CFG,) or int(self.cfg[C_TP]) != tp:
            raise ValueError(f"cfg must be build_config(...) for tp={tp}")
        if gpu_map is None:
            gpu_map = np.arange(n_servers * tp, dtype=np.int64).reshape(n_servers, tp)
        self.gpu_map = np.ascontiguousarray(gpu_map, dtype=np.int64)
        if self.gpu_map.shape != (n_servers, tp):
            raise ValueError(f"gpu_map must have shape ({n_servers}, {tp}), got {gpu_map.shape}")
        self.n_gpus = int(n_gpus if n_gpus is not None else self.gpu_map.max() + 1)
        if self.gpu_map.min() < 0 or self.gpu_map.max() >= self.n_gpus:
            raise ValueError("gpu_map names a GPU index outside 0..n_gpus-1")
        max_batch = int(self.cfg[C_MAX_BATCH])
        bounds = dict(default_histogram_bounds())
        if hist_bounds is not None:
            bounds.update({k: list(v) for k, v in hist_bounds.items()})
        unknown = set(bounds) - set(HISTOGRAM_NAMES)
        if unknown:
            raise ValueError(f"unknown histogram slots: {sorted(unknown)}")
        nb = max(len(bounds[name]) for name in HISTOGRAM_NAMES)
        self.hist_b = np.full((N_H, nb), np.inf, dtype=np.float64)
        self._nb = np.zeros(N_H, dtype=np.int64)
        for h, name in enumerate(HISTOGRAM_NAMES):
            b = np.asarray(sorted(float(x) for x in bounds[name]), dtype=np.float64)
            self.hist_b[h, : b.size] = b
            self._nb[h] = b.size
        cap = max(16, initial_capacity)
        self.req_i = np.zeros((cap, N_RI), dtype=np.int64)
        self.req_f = np.zeros((cap, N_RF), dtype=np.float64)
        self.free_stack = np.arange(cap - 1, -1, -1, dtype=np.int64)
        self.fin = np.zeros((cap, N_FF), dtype=np.float64)
        self.srv_i = np.zeros((n_servers, N_SI), dtype=np.int64)
        self.srv_i[:, SI_WQ_HEAD] = -1
        self.srv_i[:, SI_WQ_TAIL] = -1
        self.srv_f = np.zeros((n_servers, N_SF), dtype=np.float64)
        self.run_idx = np.zeros((n_servers, max_batch), dtype=np.int64)
        self.run_tok = np.zeros((n_servers, max_batch), dtype=np.int64)
        self.gpu_f = np.zeros((self.n_gpus, N_GF), dtype=np.float64)
        self.metrics = np.zeros((n_servers, N_M), dtype=np.float64)
        self.metrics_carry = np.zeros((n_servers, N_M), dtype=np.float64)
        """Counts from before simulated restarts: metrics + metrics_carry is the ground truth."""
        self.hist_c = np.zeros((n_servers, N_H, nb + 1), dtype=np.float64)
        self.hist_s = np.zeros((n_servers, N_H), dtype=np.float64)
        ss = np.random.SeedSequence([seed, 0x5E7])
        self.rng = ss.generate_state(n_servers, dtype=np.uint64)
        self.node_i = np.zeros(N_NI, dtype=np.int64)
        self.node_i[NI_FREE_TOP] = cap
        self.now_s = 0.0
        self.start_time_unix = np.full(n_servers, time.time(), dtype=np.float64)
        self.keep_finished = keep_finished
        self._finished: list[np.ndarray] = []
        self._pending_t = np.zeros(0, dtype=np.float64)
        self._pending_p = np.zeros(0, dtype=np.int64)
        self._pending_g = np.zeros(0, dtype=np.int64)

    # -- capacity ------------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return int(self.req_i.shape[0])

    def ensure_free(self, n_new: int) -> None:
        """Grow the request pool so n_new more requests fit (the pool never shrinks)."""
        free = int(self.node_i[NI_FREE_TOP])
        if free >= n_new:
            return
        old = self.capacity
        new = max(2 * old, old + n_new - free + 16)
        self.req_i = np.concatenate([self.req_i, np.zeros((new - old, N_RI), np.int64)])
        self.req_f = np.concatenate([self.req_f, np.zeros((new - old, N_RF), np.float64)])
        stack = np.empty(new, dtype=np.int64)
        stack[:free] = self.free_stack[:free]
        stack[free : free + new - old] = np.arange(new - 1, old - 1, -1, dtype=np.int64)
        self.free_stack = stack
        self.node_i[NI_FREE_TOP] = free + new - old
        self.fin = np.zeros((new, N_FF), dtype=np.float64)

    # -- running -------------------------------------------------------------------------------

    def feed(self, time_s: np.ndarray, prompt_tokens: np.ndarray, gen_tokens: np.ndarray) -> None:
        """Queue arrivals (sorted times, all later than now_s) for the next run_until calls."""
        t = np.asarray(time_s, dtype=np.float64)
        if t.size and (np.any(np.diff(t) < 0) or t[0] < self.now_s):
            raise ValueError("arrivals must be sorted and not earlier than the engine's time")
        if self._pending_t.size and t.size and t[0] < self._pending_t[-1]:
            raise ValueError("arrivals must come after those already fed")
        self._pending_t = np.concatenate([self._pending_t, t])
        self._pending_p = np.concatenate([self._pending_p, np.asarray(prompt_tokens, np.int64)])
        self._pending_g = np.concatenate([self._pending_g, np.asarray(gen_tokens, np.int64)])

    @property
    def pending_arrivals(self) -> int:
        """Arrivals fed and not yet taken by a run."""
        return int(self._pending_t.size)

    def take_arrivals(self, t_end_s: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Pop the fed arrivals with time <= t_end_s, sized into the pool."""
        k = int(np.searchsorted(self._pending_t, t_end_s, side="right"))
        out = (self._pending_t[:k], self._pending_p[:k], self._pending_g[:k])
        self._pending_t = self._pending_t[k:]
        self._pending_p = self._pending_p[k:]
        self._pending_g = self._pending_g[k:]
        self.ensure_free(k)
        self.node_i[NI_ARR_POS] = 0
        self.node_i[NI_FIN_N] = 0
        return out

    def kernel_args(
        self, arr_t: np.ndarray, arr_p: np.ndarray, arr_g: np.ndarray
    ) -> tuple[np.ndarray, ...]:
        """The arrays engine_run_until takes after (activity, mem_util), in order.

        This order is the kernels' canonical one: every kernel of this module takes the subset
        it needs in it, since a swap of two same-typed arrays would still compile.
        """
        return (
            self.cfg, self.req_i, self.req_f, self.free_stack, self.srv_i, self.srv_f,
            self.run_idx, self.run_tok, self.gpu_map, self.gpu_f, self.metrics, self.hist_c,
            self.hist_s, self.hist_b, self.rng, self.node_i, arr_t, arr_p, arr_g, self.fin,
        )  # fmt: skip

    def collect_finished(self) -> None:
        """Move the records the last kernel call wrote into fin to the finished list (drop
        them without keep_finished)."""
        n = int(self.node_i[NI_FIN_N])
        if n:
            if self.keep_finished:
                self._finished.append(self.fin[:n].copy())
            self.node_i[NI_FIN_N] = 0

    def run_until(
        self, t_end_s: float, clock_mhz: np.ndarray | float
    ) -> tuple[np.ndarray, np.ndarray]:
        """Advance to t_end_s at fixed clocks; returns each GPU's mean activity and HBM use."""
        if t_end_s < self.now_s:
            raise ValueError(f"cannot run backwards from {self.now_s} to {t_end_s}")
        clocks = np.broadcast_to(np.asarray(clock_mhz, dtype=np.float64), (self.n_gpus,)).copy()
        activity = np.zeros(self.n_gpus, dtype=np.float64)
        mem = np.zeros(self.n_gpus, dtype=np.float64)
        args = self.kernel_args(*self.take_arrivals(t_end_s))
        engine_run_until(self.now_s, t_end_s, clocks, activity, mem, *args)
        self.collect_finished()
        self.now_s = t_end_s
        return activity, mem

    # -- results -------------------------------------------------------------------------------

    def finished_requests(self) -> np.ndarray:
        """Every finished request so far, FINISHED_DTYPE records in completion order.

        Raises ValueError on a bank built without keep_finished.
        """
        if not self.keep_finished:
            raise ValueError("this engine bank keeps no finished-request records")
        if not self._finished:
            return np.zeros(0, dtype=FINISHED_DTYPE)
        f = np.concatenate(self._finished)
        self._finished = [f]
        out = np.zeros(f.shape[0], dtype=FINISHED_DTYPE)
        gen = f[:, FF_GEN]
        out["server"] = f[:, FF_SERVER].astype(np.int64)
        out["arrival_s"] = f[:, FF_ARRIVAL]
        out["ttft_s"] = f[:, FF_FIRST] - f[:, FF_ARRIVAL]
        # A one-token answer has no inter-token gap; it counts as meeting any ITL objective.
        with np.errstate(divide="ignore", invalid="ignore"):
            out["itl_mean_s"] = np.where(
                gen > 1, (f[:, FF_FINISH] - f[:, FF_FIRST]) / np.maximum(gen - 1, 1), 0.0
            )
        out["queue_s"] = f[:, FF_SCHED] - f[:, FF_ARRIVAL]
        out["e2e_s"] = f[:, FF_FINISH] - f[:, FF_ARRIVAL]
        out["prompt_tokens"] = f[:, FF_PROMPT].astype(np.int64)
        out["gen_tokens"] = gen.astype(np.int64)
        return out

    def num_running(self, s: int) -> int:
        return int(self.srv_i[s, SI_RUN_N])

    def num_waiting(self, s: int) -> int:
        return int(self.srv_i[s, SI_WQ_LEN])

    def waiting_requests(self, s: int) -> np.ndarray:
        """Pool indices of server s's waiting queue, the next to be admitted first."""
        n = int(self.srv_i[s, SI_WQ_LEN])
        out = np.empty(n, dtype=np.int64)
        r = int(self.srv_i[s, SI_WQ_HEAD])
        k = 0
        while k < n and r >= 0:
            out[k] = r
            k += 1
            r = int(self.req_i[r, R_NEXT])
        return out[:k]

    def prefill_backlog_parts(self, s: int) -> tuple[float, float, float | None]:
        """Server s's prompt work not yet prefilled, in tokens: (the running requests'
        unprefilled remainders, the waiting queue's), and the arrival time (simulated s) of
        the oldest request still without its first token, or None.

        A waiting request holds no KV (a preempted one recomputes prompt and output), so the
        waiting queue's tokens are also its sequence lengths.
        """
        n_run = int(self.srv_i[s, SI_RUN_N])
        idx = self.run_idx[s, :n_run]
        remaining = self.req_i[idx, R_NEED] - self.req_i[idx, R_DONE]
        running = float(remaining[remaining > 0].sum())
        no_token = idx[self.req_i[idx, R_GEN_DONE] == 0]
        queue = self.waiting_requests(s)
        queued = float((self.req_i[queue, R_NEED] - self.req_i[queue, R_DONE]).sum())
        no_token = np.concatenate([no_token, queue[self.req_i[queue, R_GEN_DONE] == 0]])
        oldest = float(self.req_f[no_token, RF_ARRIVAL].min()) if no_token.size else None
        return running, queued, oldest

    def prefill_backlog(self, s: int) -> tuple[float, float | None]:
        """Prompt tokens server s still has to prefill (the running requests' remainders plus
        the waiting queue), and the arrival time (simulated s) of the oldest request still
        without its first token, or None."""
        running, queued, oldest = self.prefill_backlog_parts(s)
        return running + queued, oldest

    def snapshot(self, s: int) -> EngineMetrics:
        """Server s's metrics now (a copy)."""
        row = self.metrics[s]
        values = {name: float(row[i]) for i, name in enumerate(METRIC_NAMES)}
        cap = float(self.cfg[C_KV_CAP_TOKENS])
        used = float(self.srv_i[s, SI_KV_USED])
        values.update(
            num_running=float(self.srv_i[s, SI_RUN_N]),
            num_waiting=float(self.srv_i[s, SI_WQ_LEN]),
            kv_used_tokens=used,
            kv_capacity_tokens=cap,
            kv_usage=used / cap if cap > 0 else 0.0,
            max_batch=float(self.cfg[C_MAX_BATCH]),
            iter_generation_requests=float(self.srv_i[s, SI_DONE_GEN_REQS]),
            iter_context_requests=float(self.srv_i[s, SI_DONE_CTX_REQS]),
            iter_context_tokens=float(self.srv_i[s, SI_DONE_CTX_TOKENS]),
            now_s=self.now_s,
        )
        hists: dict[str, HistogramSnapshot] = {}
        for h, name in enumerate(HISTOGRAM_NAMES):
            nb = int(self._nb[h])
            cum = np.cumsum(self.hist_c[s, h, : nb + 1])
            hists[name] = HistogramSnapshot(
                bounds=tuple(self.hist_b[h, :nb].tolist()),
                cumulative_counts=tuple(cum.tolist()),
                sum=float(self.hist_s[s, h]),
            )
        return EngineMetrics(values, hists, float(self.start_time_unix[s]))

    def reset_scrape_bucket(self, s: int) -> None:
        """Zero llama.cpp's per-scrape bucket (its /metrics handler resets it on every read)."""
        for i in _SCRAPE_BUCKET:
            self.metrics[s, i] = 0.0

    def reset_counters(self, s: int, start_time_unix: float | None = None) -> None:
        """Server s restarts its process: counters and histograms from zero, new start time."""
        self.metrics_carry[s, :] += self.metrics[s, :]
        self.metrics[s, :] = 0.0
        self.hist_c[s] = 0.0
        self.hist_s[s] = 0.0
        self.srv_i[s, SI_SG_STEPS] = 0
        self.srv_f[s, SF_SG_LAST_LOG] = self.now_s
        self.start_time_unix[s] = time.time() if start_time_unix is None else start_time_unix

    def copy(self) -> EngineBank:
        """An independent deep copy (arrays, pending arrivals and finished records)."""
        other = object.__new__(EngineBank)
        for k, v in self.__dict__.items():
            if isinstance(v, np.ndarray):
                setattr(other, k, v.copy())
            elif isinstance(v, list):
                setattr(other, k, [a.copy() for a in v])
            else:
                setattr(other, k, v)
        return other


class EngineView:
    """One server of a bank, the object a SimServer calls `engine`."""

    def __init__(self, bank: EngineBank, index: int) -> None:
        self.bank = bank
        self.index = index

    def metrics(self) -> EngineMetrics:
        return self.bank.snapshot(self.index)

    @property
    def num_running(self) -> int:
        return self.bank.num_running(self.index)

    @property
    def num_waiting(self) -> int:
        return self.bank.num_waiting(self.index)

    def prefill_backlog_parts(self) -> tuple[float, float, float | None]:
        return self.bank.prefill_backlog_parts(self.index)

    def reset_counters(self, start_time_unix: float | None = None) -> None:
        self.bank.reset_counters(self.index, start_time_unix)

    def reset_scrape_bucket(self) -> None:
        self.bank.reset_scrape_bucket(self.index)
