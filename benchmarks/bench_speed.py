"""Wall time of `powerd bench`: each policy alone (one worker), then the whole benchmark.

The issue's budget is one hour of the 4-GPU node with every policy in under 5 minutes on a
2-core machine. This script times each job kind on its own (CPU seconds in one process, so
the figure does not depend on what else the machine runs) and then the full run with the
default two workers, and prints both.

Usage: python benchmarks/bench_speed.py [--duration 3600] [--gpus 4] [--tp 1] [--skip-full]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from powerd.bench.runner import BenchSetup, Job, _template, run_bench, run_job


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=3600.0)
    parser.add_argument("--gpus", type=int, default=4)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--trace", default="azure-conv")
    parser.add_argument("--skip-full", action="store_true")
    args = parser.parse_args()
    setup = BenchSetup(
        trace=args.trace, duration_s=args.duration, gpus=args.gpus, tp=args.tp, workers=1
    )
    started = time.process_time()
    _template(setup)
    print(f"template node (trace, scaling, compile): {time.process_time() - started:.1f} s CPU")
    f_max = int(setup.gpu_profile().sm_clock_max_mhz)
    jobs = [
        Job("default"),
        Job("sweep", f_max * 3 // 4 // 15 * 15),
        Job("util-governor", f_max // 2 // 15 * 15),
        Job("slo-lowest-clock"),
        Job("static-power-cap"),
        Job("powerd"),
        Job("oracle"),
    ]
    for job in jobs:
        started = time.process_time()
        run_job(setup, job)
        label = job.kind if job.kind != "sweep" else "one static-clock sweep point"
        print(f"{label:<30} {time.process_time() - started:7.1f} s CPU")
    if not args.skip_full:
        full = replace(setup, workers=2)
        started = time.perf_counter()
        result = run_bench(full)
        print(
            f"full bench, 2 workers: {time.perf_counter() - started:.1f} s wall "
            f"({len(result.sweep)} sweep points)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
