"""`powerd bench`: its arguments and the command; powerd/cli.py mounts them. What runs the
benchmark is imported by the command alone: building the command line loads no simulator."""

from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING

from powerd.bench.options import POLICY_NAMES, OracleOptions, parse_policies, workers_default
from powerd.config import NAMED_SERVER_KINDS, REPLAY_TRACE_DEFAULT, SloConfig
from powerd.wording import counted

if TYPE_CHECKING:
    from powerd.bench.runner import BenchSetup


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `powerd bench`."""
    oracle = OracleOptions()
    parser.add_argument(
        "--trace", default=REPLAY_TRACE_DEFAULT, help="a trace file or a name: azure-conv, "
        "diurnal, step, burst, constant (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--rate-scale", type=float, default=None, metavar="X",
        help="multiply the trace's request rate by X",
    )  # fmt: skip
    parser.add_argument(
        "--peak-load", type=float, default=None, metavar="X",
        help="scale the rate so the uncontrolled node's busiest minute uses this share of its "
        "capacity; overrides --rate-scale (default 0.7 when neither is given)",
    )  # fmt: skip
    parser.add_argument(
        "--duration", type=float, default=3600.0, metavar="S",
        help="simulated seconds (default 3600)",
    )  # fmt: skip
    parser.add_argument("--gpu-model", default="h100-sxm", help="built-in GPU profile name")
    parser.add_argument("--gpu-profile", default=None, metavar="FILE", help="GPU profile YAML")
    parser.add_argument(
        "--model", default=None,
        help="model profile (default: llama-3.1-8b for --tp 1, llama-3.1-70b otherwise)",
    )  # fmt: skip
    parser.add_argument("--gpus", type=int, default=4, metavar="N")
    parser.add_argument("--tp", type=int, default=1, metavar="N", help="GPUs per server")
    parser.add_argument(
        "--server-kind", default="vllm", choices=NAMED_SERVER_KINDS,
        help="what the simulated servers present themselves as (powerd reads that source)",
    )  # fmt: skip
    parser.add_argument(
        "--policies", default=",".join(POLICY_NAMES), metavar="LIST",
        help=f"comma-separated, from: {', '.join(POLICY_NAMES)} (default: all)",
    )  # fmt: skip
    parser.add_argument(
        "--interval", type=float, default=1.0, metavar="S",
        help="control tick of every policy, as the daemon's interval_s (default 1 s)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, metavar="N")
    parser.add_argument("--ttft-slo", type=float, default=2.0, metavar="S", help="default 2 s")
    parser.add_argument(
        "--itl-slo", type=float, default=0.1, metavar="S",
        help="mean inter-token latency per request, default 0.1 s",
    )  # fmt: skip
    parser.add_argument(
        "--oracle-window", type=float, default=oracle.window_s, metavar="S",
        help=f"the oracle's window (default {oracle.window_s:.0f} s)",
    )  # fmt: skip
    parser.add_argument(
        "--oracle-slack", type=float, default=oracle.slack, metavar="X",
        help="misses the oracle may spend beyond default's, as a share of default's finished "
        f"requests (default {oracle.slack}, inside the 0.5-point tolerance; 0: none)",
    )  # fmt: skip
    parser.add_argument(
        "--workers", type=int, default=workers_default(), metavar="N",
        help="processes running policies in parallel (default 2)",
    )  # fmt: skip
    parser.add_argument("--json", default=None, metavar="PATH", help="write the JSON result")
    parser.add_argument("--markdown", default=None, metavar="PATH", help="write a Markdown table")
    parser.add_argument(
        "--plot", default=None, metavar="PATH.png",
        help="plot load, clock, power and tokens/J over time (needs matplotlib)",
    )  # fmt: skip
    parser.add_argument("--quiet", action="store_true", help="no progress lines")


def setup_from_args(args: argparse.Namespace) -> BenchSetup:
    """A validated BenchSetup; ValueError with one sentence otherwise."""
    from powerd.bench.runner import BenchSetup

    if not 0.0 <= args.oracle_slack < 1.0:
        raise ValueError(f"--oracle-slack must be in [0, 1), got {args.oracle_slack}")
    peak = args.peak_load
    if peak is None and args.rate_scale is None:
        peak = 0.7
    setup = BenchSetup(
        trace=args.trace,
        duration_s=float(args.duration),
        gpu_model=args.gpu_model,
        gpu_profile_file=args.gpu_profile,
        model=args.model,
        gpus=args.gpus,
        tp=args.tp,
        server_kind=args.server_kind,
        seed=args.seed,
        peak_load=peak,
        rate_scale=args.rate_scale if args.rate_scale is not None else 1.0,
        slo=SloConfig(ttft_s=args.ttft_slo, itl_s=args.itl_slo),
        interval_s=float(args.interval),
        workers=args.workers,
        oracle=OracleOptions(window_s=float(args.oracle_window), slack=float(args.oracle_slack)),
    )
    setup.validate()
    setup.gpu_profile()  # a bad profile name or file fails here, before any work
    from powerd.sim.models import get_model_profile

    get_model_profile(setup.model_name)
    return setup


def run_bench_command(args: argparse.Namespace) -> int:
    """`powerd bench`: run, print the table, write the requested files. Exit status."""
    from powerd.bench.report import (
        PLOT_MISSING,
        format_table,
        matplotlib_available,
        prepare_output,
        write_json,
        write_markdown,
        write_plot,
    )
    from powerd.bench.runner import run_bench
    from powerd.sim.traces import trace_label

    try:
        policies = parse_policies(args.policies)
        setup = setup_from_args(args)
    except ValueError as exc:
        print(f"powerd bench: {exc}", file=sys.stderr)
        return 2
    if args.plot and not matplotlib_available():
        print(f"powerd bench: {PLOT_MISSING}", file=sys.stderr)
        return 2
    for option, path in (
        ("--json", args.json),
        ("--markdown", args.markdown),
        ("--plot", args.plot),
    ):
        if not path:
            continue
        try:
            prepare_output(path)
        except OSError as exc:
            print(f"powerd bench: {option} {path}: {exc.strerror or exc}", file=sys.stderr)
            return 2

    def progress(message: str) -> None:
        if not args.quiet:
            print(f"  [{time.perf_counter() - started:6.1f} s] {message}", file=sys.stderr)

    started = time.perf_counter()
    if not args.quiet:
        print(
            f"powerd bench: {', '.join(policies)} on {setup.gpus} x {setup.gpu_profile().name}, "
            f"{setup.model_name} TP={setup.tp}, {trace_label(setup.trace)}, "
            f"{setup.duration_s:.0f} s, {counted(setup.workers, 'worker')}",
            file=sys.stderr,
        )
    try:
        result = run_bench(setup, policies, progress=progress)
    except (ValueError, OSError) as exc:
        print(f"powerd bench: {exc}", file=sys.stderr)
        return 1
    print(format_table(result))
    status = 0
    for option, path, write in (
        ("--json", args.json, write_json),
        ("--markdown", args.markdown, write_markdown),
        ("--plot", args.plot, write_plot),
    ):
        if not path:
            continue
        try:
            write(result, path)
        except OSError as exc:
            # The table above is the run's result; the other files are still written.
            print(f"powerd bench: {option} {path}: {exc.strerror or exc}", file=sys.stderr)
            status = 1
    return status
