"""Iteration time of an LLM forward pass as a function of the SM clock (smooth roofline).

dvfs_plant_model.md §6(c): the memory time t_m does not depend on the SM clock; the SM-side
time t_cs (FLOPs plus the SM-issue and latency-bound share κ0·t_m) scales with f_max/f; the two
combine as a p-norm (p = 4, fitted), so decode is flat in f above the knee f_k ≈ f_max·t_cs/t_m
and prefill (t_cs ≫ t_m) runs in proportion to 1/f.

All functions are numba-compiled and pure, so the simulated server's own compiled loops can call
them; from Python they are ordinary functions.
"""

from __future__ import annotations

from powerd.control.kernels import jit

ROOFLINE_P = 4.0
"""Exponent of the smooth roofline (§6(c), fitted)."""
ETA_MEM = 0.8
"""Achieved share of peak HBM bandwidth (§6(c): 0.75-0.85, assumed)."""
ETA_COMPUTE = 0.6
"""Achieved share of peak tensor throughput (§6(c): 0.5-0.7, assumed)."""


@jit
def roofline_terms_s(
    bytes_moved: float,
    flops: float,
    hbm_bandwidth_tb_s: float,
    peak_tflops: float,
    kappa0: float,
    eta_mem: float = ETA_MEM,
    eta_compute: float = ETA_COMPUTE,
) -> tuple[float, float]:
    """(t_m, t_cs) in seconds at f_max for one iteration moving `bytes_moved` bytes of weights
    and KV cache through HBM and doing `flops` floating-point operations (§6(c))."""
    t_mem_s = bytes_moved / (hbm_bandwidth_tb_s * 1e12 * eta_mem)
    t_compute_s = flops / (peak_tflops * 1e12 * eta_compute) + kappa0 * t_mem_s
    return t_mem_s, t_compute_s


@jit
def iteration_time_s(
    t_mem_s: float,
    t_compute_s: float,
    clock_mhz: float,
    clock_max_mhz: float,
    t_cpu_s: float = 0.0,
    p: float = ROOFLINE_P,
) -> float:
    """Iteration time in seconds at SM clock `clock_mhz`:
    t = [t_m^p + (t_cs·f_max/f)^p]^(1/p) + t_cpu (§6(c)). t_cs is the SM-side time at f_max."""
    scaled_s = t_compute_s * clock_max_mhz / max(clock_mhz, 1.0)
    return (t_mem_s**p + scaled_s**p) ** (1.0 / p) + t_cpu_s


@jit
def memory_utilisation(bytes_moved: float, hbm_bandwidth_tb_s: float, iteration_s: float) -> float:
    """Achieved over peak HBM bandwidth (the plant's m input, DCGM DRAM_ACTIVE), in [0, 1]."""
    if iteration_s <= 0.0:
        return 0.0
    m = bytes_moved / (hbm_bandwidth_tb_s * 1e12 * iteration_s)
    return min(max(m, 0.0), 1.0)
