"""Where a policy's SLO misses are: by time of day, and request by request against default's.

Runs default, the oracle and one policy (powerd unless told) on the same arrivals, then prints
1. misses by arrival time in equal segments of the run, with each policy's energy and mean
   clock cap over the segment;
2. the policy's misses that default does not have (same request, matched by arrival time and
   prompt length), by cause: waited in the queue, its own prefill too slow, or only its mean
   inter-token latency late.

Usage: python benchmarks/miss_analysis.py [powerd bench's options, --trace diurnal and
       --gpu-model a100-sxm4-80gb by default] [--segments 12] [--policy powerd]
(--policies, --workers and the output files of `powerd bench` are ignored.)
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from powerd.bench.cli import add_bench_arguments, setup_from_args
from powerd.bench.measure import slo_met
from powerd.bench.results import PolicyResult
from powerd.bench.runner import BenchSetup, Job, _template, run_job_records

QUEUED_MIN_S = 0.05
"""A late first token that waited at least this long in the queue counts as queued."""


def _run(setup: BenchSetup, kind: str) -> tuple[str, PolicyResult, np.ndarray]:
    result, records = run_job_records(setup, Job(kind))
    return kind, result, records


def missed(records: np.ndarray, setup: BenchSetup) -> np.ndarray:
    """Per record: True where the request missed its TTFT or mean inter-token SLO."""
    return ~slo_met(records["ttft_s"], records["itl_mean_s"], setup.slo)


def by_segment(
    setup: BenchSetup, runs: dict[str, tuple[PolicyResult, np.ndarray]], n_segments: int
) -> list[str]:
    """Misses, energy (kJ) and mean clock cap per segment, one line per segment; the request
    count is default's finished requests that arrived in the segment."""
    edges = np.linspace(0.0, setup.duration_s, n_segments + 1)
    names = " / ".join(runs)
    per_run = [
        (
            records["arrival_s"],
            missed(records, setup),
            np.asarray(result.series.time_s),
            np.asarray(result.series.energy_j),
            np.asarray(result.series.clock_mhz),
        )
        for result, records in runs.values()
    ]
    default_arrival = runs["default"][1]["arrival_s"]
    lines = [f"segment (s)    requests  misses {names}   energy kJ {names}   clock MHz {names}"]
    for t0, t1 in itertools.pairwise(edges):
        counts, energies, clocks = [], [], []
        for arrival, miss, times, energy_j, clock_mhz in per_run:
            arrived = (arrival >= t0) & (arrival < t1)
            counts.append(str(int((miss & arrived).sum())))
            in_segment = (times >= t0) & (times < t1)
            energies.append(f"{energy_j[in_segment].sum() / 1e3:.1f}")
            clocks.append(f"{clock_mhz[in_segment].mean():.0f}")
        n_requests = int(((default_arrival >= t0) & (default_arrival < t1)).sum())
        lines.append(
            f"{t0:5.0f}-{t1:<5.0f}  {n_requests:9d}  "
            f"{' / '.join(counts)}   {' / '.join(energies)}   {' / '.join(clocks)}"
        )
    totals = [str(int(miss.sum())) for _, miss, *_ in per_run]
    lines.append("whole run             misses " + " / ".join(totals))
    return lines


def extra_misses(setup: BenchSetup, policy: np.ndarray, default: np.ndarray) -> list[str]:
    """The policy's misses that default met, by cause, with their medians."""
    index = {
        (round(float(a), 4), int(p)): i
        for i, (a, p) in enumerate(zip(default["arrival_s"], default["prompt_tokens"], strict=True))
    }
    match = np.array(
        [
            index.get((round(float(a), 4), int(p)), -1)
            for a, p in zip(policy["arrival_s"], policy["prompt_tokens"], strict=True)
        ],
        dtype=np.int64,
    )
    default_missed = missed(default, setup)
    met_by_default = (match >= 0) & ~default_missed[np.maximum(match, 0)]
    policy_missed = missed(policy, setup)
    extra = policy_missed & met_by_default
    late_first = policy["ttft_s"] > setup.slo.ttft_s
    causes = {
        "queued": extra & late_first & (policy["queue_s"] >= QUEUED_MIN_S),
        "own prefill": extra & late_first & (policy["queue_s"] < QUEUED_MIN_S),
        "ITL only": extra & ~late_first,
    }
    lines = [
        f"misses default met: {int(extra.sum())} "
        f"(of {int(policy_missed.sum())}; default missed {int(default_missed.sum())})"
    ]
    for cause, chosen in causes.items():
        if not chosen.any():
            lines.append(f"  {cause:12s}     0")
            continue
        twin = match[chosen]
        lines.append(
            f"  {cause:12s} {int(chosen.sum()):5d}  median prompt "
            f"{np.median(policy['prompt_tokens'][chosen]):.0f} tokens, queue "
            f"{np.median(policy['queue_s'][chosen]):.2f} s (default "
            f"{np.median(default['queue_s'][twin]):.2f} s), TTFT "
            f"{np.median(policy['ttft_s'][chosen]):.2f} s (default "
            f"{np.median(default['ttft_s'][twin]):.2f} s)"
        )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_bench_arguments(parser)
    parser.set_defaults(trace="diurnal", gpu_model="a100-sxm4-80gb")
    parser.add_argument("--segments", type=int, default=12, metavar="N")
    parser.add_argument(
        "--policy", default="powerd", choices=("powerd", "slo-lowest-clock", "static-power-cap"),
        help="the policy to compare with default (default: powerd)",
    )  # fmt: skip
    args = parser.parse_args()
    try:
        setup = setup_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    _template(setup)  # built once here; the workers inherit it
    kinds = [args.policy, "oracle", "default"]
    # Forked workers share the template node instead of rebuilding it.
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("fork")) as pool:
        done = {k: (r, rec) for k, r, rec in pool.map(_run, [setup] * 3, kinds)}
    runs = {k: done[k] for k in kinds}
    print(f"{setup.trace}, {setup.gpus} x {setup.gpu_model}, {setup.model_name} TP={setup.tp}")
    print("\n".join(by_segment(setup, runs, args.segments)))
    print()
    print(f"{args.policy} against default, request by request:")
    print("\n".join(extra_misses(setup, runs[args.policy][1], runs["default"][1])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
