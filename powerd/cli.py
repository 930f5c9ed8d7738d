"""The `powerd` command: parses arguments, builds objects, and hands over. No logic of its own."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from powerd import __version__
from powerd.config import (
    DEFAULT_METRICS_PORT,
    MODES,
    NAMED_SERVER_KINDS,
    REPLAY_TRACE_DEFAULT,
    SERVER_KINDS,
    SIM_TRACE_DEFAULT,
    ConfigError,
    load_config,
    load_restore_config,
)
from powerd.logging_setup import LEVEL_ENV, LEVEL_NAMES, level_name
from powerd.validation import is_positive_finite
from powerd.wording import counted

EX_CONFIG = 78
"""sysexits.h EX_CONFIG: systemd shows it as 'CONFIG' and Restart=on-failure still applies."""

log = logging.getLogger("powerd")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"powerd: {exc}", file=sys.stderr)
        return EX_CONFIG
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="powerd", description="GPU power controller for LLM inference nodes."
    )
    parser.add_argument("--version", action="version", version=f"powerd {__version__}")
    level_help = f"default: ${LEVEL_ENV}, else info"
    parser.add_argument("--log-level", type=level_name, choices=LEVEL_NAMES, help=level_help)
    # Also after the subcommand (`powerd restore --log-level debug`); SUPPRESS keeps a value
    # given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--log-level",
        type=level_name,
        choices=LEVEL_NAMES,
        default=argparse.SUPPRESS,
        help=level_help,
    )
    sub = parser.add_subparsers(dest="command")

    run = sub.add_parser(
        "run",
        parents=[common],
        help="run the daemon on this node's GPUs",
        description="Run the daemon on this node's GPUs; with `gpu_backend: sim` in the config, "
        "on a simulated node whose servers replay the config's sim.trace (default: "
        f"{SIM_TRACE_DEFAULT}).",
    )
    run.add_argument("--config", default="/etc/powerd/powerd.yaml")
    run.add_argument("--dry-run", action="store_true", help="decide and export, write nothing")
    run.set_defaults(func=_cmd_run)

    check = sub.add_parser("check-config", parents=[common], help="validate a config file and exit")
    check.add_argument("config")
    check.set_defaults(func=_cmd_check_config)

    restore = sub.add_parser(
        "restore", parents=[common], help="put back every GPU setting powerd changed"
    )
    restore.add_argument(
        "--config",
        default="/etc/powerd/powerd.yaml",
        help="read for state_dir, gpu_backend and sim only; when it is invalid, what can be "
        "read of those (defaults otherwise), with a warning",
    )
    restore.add_argument(
        "--state-dir",
        type=_non_empty,
        default=None,
        metavar="DIR",
        help="the saved settings' folder (overrides the config's)",
    )
    restore.add_argument(
        "--forget",
        action="append",
        type=_non_empty,
        metavar="UUID",
        help="instead of restoring, remove this GPU's saved settings without touching any GPU "
        "(a card replaced or taken out); repeatable",
    )
    restore.set_defaults(func=_cmd_restore)

    demo = sub.add_parser(
        "demo", parents=[common], help="run the daemon on a simulated node, then compare"
    )
    demo.add_argument("--gpus", type=_positive_int, default=4)
    demo.add_argument("--tp", type=_positive_int, default=2, help="GPUs per simulated server")
    demo.add_argument("--duration", type=_positive_float, default=60.0, help="seconds of wall time")
    demo.add_argument(
        "--metrics-port", type=_port, default=DEFAULT_METRICS_PORT, help="0: any free port"
    )
    demo.add_argument("--server-kind", default="vllm", choices=NAMED_SERVER_KINDS)
    demo.add_argument("--gpu-model", default="h100-sxm")
    demo.add_argument("--gpu-profile", default=None, help="a GPU profile YAML file")
    demo.add_argument("--model", default=None)
    demo.add_argument(
        "--trace",
        default=REPLAY_TRACE_DEFAULT,
        help="a trace file or a name: azure-conv, diurnal, step, burst, constant "
        "(default: %(default)s)",
    )
    demo.add_argument("--time-compression", type=_positive_float, default=10.0)
    demo.add_argument("--peak-load", type=_positive_float, default=0.7)
    demo.add_argument("--mode", default="efficiency", choices=MODES)
    demo.add_argument(
        "--target-tokens-per-joule",
        type=_positive_float,
        default=None,
        metavar="X",
        help="the target of --mode target",
    )
    demo.add_argument(
        "--node-power-budget-w",
        type=_positive_float,
        default=None,
        metavar="W",
        help="the budget of --mode budget",
    )
    demo.add_argument("--seed", type=_non_negative_int, default=0)
    demo.add_argument("--quiet", action="store_true", help="no line per tick")
    demo.set_defaults(func=_cmd_demo)

    probe = sub.add_parser(
        "probe", parents=[common], help="read one inference server's signals and print them"
    )
    probe.add_argument("url")
    probe.add_argument("--kind", default="auto", choices=SERVER_KINDS)
    probe.add_argument("--interval", type=float, default=2.0)
    probe.add_argument("--json", action="store_true")
    probe.set_defaults(func=_cmd_probe)

    status = sub.add_parser("status", parents=[common], help="show the running daemon's groups")
    status.add_argument(
        "--url",
        help="the daemon's metrics URL (default: from --config, else "
        f"http://127.0.0.1:{DEFAULT_METRICS_PORT}/metrics)",
    )
    status.add_argument(
        "--config",
        metavar="FILE",
        help="the daemon's config: its metrics address, port and web config",
    )
    status.add_argument("--user", help="basic-auth user (with --password-file)")
    status.add_argument(
        "--password-file", metavar="FILE", help="file holding the basic-auth password"
    )
    status.add_argument(
        "--ca-file", metavar="FILE", help="CA certificate(s) to verify an https daemon"
    )
    status.add_argument(
        "--cert-file",
        metavar="FILE",
        help="client certificate (PEM) for a daemon that requires one",
    )
    status.add_argument(
        "--key-file", metavar="FILE", help="the client certificate's key, if not in --cert-file"
    )
    status.set_defaults(func=_cmd_status)

    bench = sub.add_parser(
        "bench", parents=[common], help="compare control policies on the simulated node"
    )
    from powerd.bench.cli import add_bench_arguments

    add_bench_arguments(bench)
    bench.set_defaults(func=_cmd_bench)
    return parser


def _number(
    cast: Callable[[str], float], what: str, fits: Callable[[float], bool], bounds: str
) -> Callable[[str], float]:
    """An argparse type: `cast` of the text, refused in one line unless `fits` holds."""

    def parse(text: str) -> float:
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not fits(value):
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {text}")
        return value

    return parse


_positive_int = _number(int, "an integer", lambda v: v >= 1, "at least 1")
_non_negative_int = _number(int, "an integer", lambda v: v >= 0, "at least 0")
_positive_float = _number(float, "a number", is_positive_finite, "a positive number")
_port = _number(int, "a port number", lambda v: 0 <= v <= 65535, "in [0, 65535]")


def _non_empty(text: str) -> str:
    """An argparse type: the text, refused when empty or blank."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def _setup_logging(args: argparse.Namespace) -> None:
    from powerd.logging_setup import setup_logging
    from powerd.systemd import under_systemd

    setup_logging(args.log_level, under_systemd=under_systemd())


def _cmd_check_config(args: argparse.Namespace) -> int:
    from powerd.runtime import check_config, check_config_gpus

    _setup_logging(args)
    config = load_config(args.config)
    check_config(config)
    gpus = check_config_gpus(config)
    servers = counted(len(config.servers), "server")
    print(f"{args.config}: OK ({servers}, mode {config.mode}; {gpus})")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from powerd.runtime import run_daemon

    _setup_logging(args)
    config = load_config(args.config)
    return run_daemon(config, config_path=Path(args.config), force_dry_run=args.dry_run)


def _cmd_restore(args: argparse.Namespace) -> int:
    from powerd.runtime import forget_gpus, restore_node

    _setup_logging(args)
    config, problems = load_restore_config(args.config, state_dir=args.state_dir)
    for problem in problems:
        log.warning("%s", problem)
    if args.forget:
        return forget_gpus(config, args.forget)
    return restore_node(config)


def _cmd_demo(args: argparse.Namespace) -> int:
    from powerd.demo import DemoOptions, run_demo

    _setup_logging(args)
    options = DemoOptions(
        gpus=args.gpus,
        tp=args.tp,
        duration_s=args.duration,
        metrics_port=args.metrics_port,
        server_kind=args.server_kind,
        gpu_model=args.gpu_model,
        gpu_profile_file=args.gpu_profile,
        model=args.model,
        trace=args.trace,
        time_compression=args.time_compression,
        peak_load=args.peak_load,
        mode=args.mode,
        target_tokens_per_joule=args.target_tokens_per_joule,
        node_power_budget_w=args.node_power_budget_w,
        seed=args.seed,
        quiet=args.quiet,
    )
    try:
        options.validate()
    except ValueError as exc:
        print(f"powerd demo: {exc}", file=sys.stderr)
        return 2
    return run_demo(options)


def _cmd_probe(args: argparse.Namespace) -> int:
    from powerd.sources import SourceError
    from powerd.sources.probe import format_probe, probe

    _setup_logging(args)
    try:
        result = probe(args.url, kind=args.kind, interval_s=args.interval)
    except SourceError as exc:
        print(f"powerd probe: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result) if args.json else format_probe(result))
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from powerd.status import StatusError, endpoint, fetch_status, format_status

    _setup_logging(args)
    try:
        target = endpoint(
            args.url,
            metrics=load_config(args.config).metrics if args.config else None,
            user=args.user,
            password_file=args.password_file,
            ca_file=args.ca_file,
            cert_file=args.cert_file,
            key_file=args.key_file,
        )
        rows = fetch_status(target.url, auth=target.auth, ssl_context=target.ssl_context)
    except StatusError as exc:
        print(f"powerd status: {exc}", file=sys.stderr)
        return 1
    print(format_status(rows))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from powerd.bench.cli import run_bench_command

    _setup_logging(args)
    return run_bench_command(args)


if __name__ == "__main__":
    raise SystemExit(main())
