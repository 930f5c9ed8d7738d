"""How fast the simulated node runs in virtual time (no HTTP, no controller).

One hour of a 4-GPU H100 node serving Llama-3.1-8B (one server per GPU) on the Azure
conversation trace, its rate scaled so the busiest minute offers --peak-load of the node's
capacity at f_max. Advances in 1-s steps as the benchmark's control loop does. Compilation is
timed separately (a short warm-up run of a throwaway node).

    NUMBA_CACHE_DIR=/tmp/numba-bench .venv/bin/python benchmarks/sim_speed.py
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from powerd.sim.models import get_model_profile
from powerd.sim.node import SimNode
from powerd.sim.plant import load_gpu_profile
from powerd.sim.traces import capacity_tokens_per_s, resolve_trace, scale_for_peak_load


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", default="h100-sxm")
    ap.add_argument("--gpus", type=int, default=4)
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--trace", default="azure-conv")
    ap.add_argument("--duration-s", type=float, default=3600.0)
    ap.add_argument("--peak-load", type=float, default=0.7)
    ap.add_argument("--step-s", type=float, default=1.0)
    ap.add_argument("--substep-s", type=float, default=0.01)
    ap.add_argument("--json", action="store_true", help="print one JSON line of figures")
    args = ap.parse_args(argv)

    profile = load_gpu_profile(args.gpu)
    model = get_model_profile(args.model)
    n_servers = args.gpus // args.tp
    base = resolve_trace(args.trace, duration_s=args.duration_s)
    arrivals = scale_for_peak_load(
        base, args.peak_load, profile=profile, model=model, tp=args.tp, n_servers=n_servers
    )

    t = time.perf_counter()
    warm = SimNode(profile, args.gpus, model, args.tp, arrivals.window(0.0, 5.0))
    warm.advance(2.0)
    warm.clone().advance(0.5)
    compile_s = time.perf_counter() - t

    node = SimNode(profile, args.gpus, model, args.tp, arrivals, substep_s=args.substep_s)
    t = time.perf_counter()
    steps = round(args.duration_s / args.step_s)
    for _ in range(steps):
        node.advance(args.step_s)
    run_s = time.perf_counter() - t

    totals = node.totals()
    finished = node.finished_requests()
    figures = {
        "trace": base.name,
        "requests": len(arrivals),
        "rate_scale_vs_trace": len(arrivals) / max(len(base), 1),
        "simulated_s": node.now_s,
        "compile_s": round(compile_s, 2),
        "run_s": round(run_s, 2),
        "speedup_x": round(node.now_s / run_s, 1),
        "finished": int(totals["requests_finished"]),
        "generated_tokens": int(totals["generated_tokens"]),
        "tokens_per_s": round(totals["generated_tokens"] / node.now_s, 1),
        "capacity_tokens_per_s": round(
            capacity_tokens_per_s(
                profile,
                model,
                args.tp,
                n_servers,
                prompt_tokens_mean=float(arrivals.prompt_tokens.mean()),
                gen_tokens_mean=float(arrivals.gen_tokens.mean()),
            ),
            1,
        ),
        "energy_kj": round(totals["energy_j"] / 1e3, 1),
        "tokens_per_j": round(totals["generated_tokens"] / totals["energy_j"], 3),
        "ttft_p50_s": round(float(np.median(finished[:, 0])), 4),
        "ttft_p99_s": round(float(np.quantile(finished[:, 0], 0.99)), 4),
        "itl_p50_s": round(float(np.median(finished[:, 1])), 4),
        "itl_p99_s": round(float(np.quantile(finished[:, 1], 0.99)), 4),
        "waiting_at_end": int(totals["waiting"]),
    }
    if args.json:
        print(json.dumps(figures))
    else:
        for key, value in figures.items():
            print(f"{key:>22}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
