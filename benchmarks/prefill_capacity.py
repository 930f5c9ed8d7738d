"""The prefill capacity powerd's groups learn over a benchmark run, and the bound it sets.

Runs powerd alone on the simulated node and prints, every --every seconds of the run, each
group's learned prefill capacity (prompt tokens/s per MHz), its prefill-headroom bound and
its clock cap: how fast a server kind's signals teach the capacity, and how far it drifts.

Usage: python benchmarks/prefill_capacity.py [powerd bench's options, --trace diurnal by
       default] [--every S]
(--policies, --workers and the output files of `powerd bench` are ignored.)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from powerd.bench.cli import add_bench_arguments, setup_from_args
from powerd.bench.measure import drive
from powerd.bench.policies import PowerdPolicy
from powerd.bench.runner import _template
from powerd.control.policy import Controller


def _row(values: list[float | int | None], digits: int) -> str:
    return " ".join("    -" if v is None else f"{v:5.{digits}f}" for v in values)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_bench_arguments(parser)
    parser.set_defaults(trace="diurnal")
    parser.add_argument("--every", type=float, default=300.0, metavar="S")
    args = parser.parse_args()
    try:
        setup = setup_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    if not args.every > 0:
        parser.error("--every must be a positive number of seconds")
    node = _template(setup).clone()
    policy = PowerdPolicy(setup.sim_config(), setup.slo, setup.interval_s)
    policy.start(node)
    assert policy.daemon is not None
    controller = policy.daemon.policy
    assert isinstance(controller, Controller)
    print(
        f"{setup.trace}, {setup.gpus} x {setup.gpu_model}, {setup.model_name} TP={setup.tp} "
        f"({setup.server_kind}), {setup.load_description()}"
    )
    print("time s  | capacity tokens/s per MHz, per group | prefill bound MHz | clock cap MHz")
    t_s = 0.0
    while t_s < setup.duration_s - 1e-9:
        t_s = min(t_s + args.every, setup.duration_s)
        drive(node, t_s, setup.interval_s, policy)
        groups = controller.group_state()
        capacity = [g["prefill_tokens_per_s_per_mhz"] for g in groups]
        bound = [g["prefill_min_clock_mhz"] for g in groups]
        cap = [g["sm_clock_max_mhz"] for g in groups]
        print(f"{t_s:6.0f}  | {_row(capacity, 1)} | {_row(bound, 0)} | {_row(cap, 0)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
