"""CPU and memory overhead of the powerd daemon on an 8-GPU, 4-server node at a 1-s tick.

Three processes, so that only the daemon is measured:

- `--role serve`: a simulated node (8 GPUs, TP 2, so 4 servers, vLLM unless `--server-kind`)
  advancing in real time and serving each server's endpoints over HTTP, as real inference
  servers would;
- `--role daemon` (the measured one): the production `Daemon` with its exporter, reading an
  8-GPU fake NVML (`NvmlBackend(FakeNvml(plant))`) and scraping the 4 servers over HTTP every
  tick. Its plant is stepped once per tick (one compiled call, timed on its own thread's CPU
  clock and reported, so it can be subtracted);
- the parent: starts both, lets the daemon settle, then measures the daemon from outside with
  psutil (CPU time of all its threads over the window / wall time; RSS sampled every 0.5 s)
  while scraping the daemon's own /metrics as a Prometheus server would.

It also reports, for reference, the RSS of a bare interpreter, of `import numba`, and of
`import numba` with powerd's controller kernels loaded (`--role numba-baseline`).

Usage: python benchmarks/overhead.py [--duration 90] [--gpus 8] [--tp 2] [--interval 1.0]
       [--server-kind vllm|sglang|...] [--cold-cache] [--energy-read-cpu-ms 4.5] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MIB = 1024 * 1024
SETTLE_S = 5.0
"""Ticks left out of the window: the first scrapes, allocator growth, the first decisions."""


# ------------------------------------------------------------------------------- roles


def _rss_mib() -> float:
    import psutil

    return float(psutil.Process().memory_info().rss) / MIB


def _peak_rss_mib() -> float:
    """The process's peak RSS so far (Linux reports ru_maxrss in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def role_serve(args: argparse.Namespace) -> int:
    """The simulated servers: print their URLs as one JSON line, serve until stdin closes."""
    from powerd.config import SimConfig
    from powerd.sim.node import RealTimeDriver, serve_node
    from powerd.simulation import build_node

    sim = SimConfig(
        gpu_model=args.gpu_model,
        gpus=args.gpus,
        tp=args.tp,
        trace=args.trace,
        time_compression=args.time_compression,
        peak_load=args.peak_load,
        seed=args.seed,
        server_kind=args.server_kind,
    )
    node = build_node(sim)
    node.advance(0.1)  # compile the node's kernels before the servers are announced
    http = serve_node(node)
    driver = RealTimeDriver(node)
    driver.start()
    servers = [
        {"name": server.name, "url": endpoint.url, "gpus": list(server.gpu_indices)}
        for server, endpoint in zip(node.servers, http, strict=True)
    ]
    print(json.dumps({"servers": servers, "kind": sim.server_kind}), flush=True)
    try:
        sys.stdin.read()
    finally:
        driver.stop()
        for endpoint in http:
            endpoint.stop()
    return 0


def _spin_in_energy_reads(fake: Any, cpu_s: float) -> None:
    """Make each energy-counter read busy the calling thread for `cpu_s`, as a real driver
    does (a real H200's read costs 3.3 ms of CPU at the median, 4.5 ms on average)."""
    read = fake.nvmlDeviceGetTotalEnergyConsumption

    def spinning_read(handle: Any) -> int:
        until_s = time.thread_time() + cpu_s
        while time.thread_time() < until_s:
            pass
        return int(read(handle))

    fake.nvmlDeviceGetTotalEnergyConsumption = spinning_read


def role_daemon(args: argparse.Namespace) -> int:
    """The measured daemon: print `READY <metrics port>`, run until SIGTERM, write stats."""
    import numpy as np

    from powerd import __version__
    from powerd.config import Config, MetricsConfig, ServerConfig, SloConfig
    from powerd.daemon import Daemon
    from powerd.exporter import Exporter
    from powerd.gpu.nvml import NvmlBackend
    from powerd.journal import Journal
    from powerd.model import Snapshot
    from powerd.sim.fake_nvml import FakeNvml
    from powerd.sim.plant import GpuPlant, load_gpu_profile

    servers_info = json.loads(args.servers_json)
    plant = GpuPlant(load_gpu_profile(args.gpu_model), args.gpus, seed=args.seed)
    fake = FakeNvml(plant)
    if args.energy_read_cpu_ms > 0:
        _spin_in_energy_reads(fake, args.energy_read_cpu_ms / 1000.0)
    backend = NvmlBackend(fake)
    servers = tuple(
        ServerConfig(
            name=info["name"],
            url=info["url"],
            kind=servers_info["kind"],
            gpus=tuple(info["gpus"]),
            slo=SloConfig(ttft_s=2.0, itl_s=0.1),
        )
        for info in servers_info["servers"]
    )
    with tempfile.TemporaryDirectory(prefix="powerd-overhead-") as tmp:
        config = Config(
            servers=servers,
            interval_s=args.interval,
            state_dir=tmp,
            metrics=MetricsConfig(port=0),
        )
        exporter = Exporter(config.metrics, build_info={"version": __version__})
        daemon = Daemon(
            config, backend, journal=Journal(Path(tmp) / "journal.json"), publish=exporter.publish
        )
        daemon.install_signal_handlers()
        daemon.warmup()
        exporter.start()

        # A steady decode-like load on every GPU; the plant turns it into power and energy.
        activity = np.full(args.gpus, 0.6)
        mem_util = np.full(args.gpus, 0.5)
        ctx = np.ones(args.gpus)
        step = {"cpu_s": 0.0, "count": 0, "last_s": time.monotonic()}
        loop_s: list[float] = []

        def step_plant(snapshot: Snapshot) -> None:
            now_s = time.monotonic()
            started = time.thread_time()
            with fake.lock:
                plant.step(max(now_s - step["last_s"], 1e-3), activity, mem_util, ctx)
            step["cpu_s"] += time.thread_time() - started
            step["count"] += 1
            step["last_s"] = now_s
            if snapshot.loop_duration_s is not None:
                loop_s.append(snapshot.loop_duration_s)

        # Before the fake plant's own kernel loads: what the daemon's kernels alone cost.
        after_warmup = {"rss_mib": _rss_mib(), "peak_rss_mib": _peak_rss_mib()}
        with fake.lock:
            plant.step(1e-3, activity, mem_util, ctx)  # load the plant's kernel before READY
        step["last_s"] = time.monotonic()
        print(f"READY {exporter.port} {json.dumps(after_warmup)}", flush=True)
        try:
            daemon.run_forever(on_tick=step_plant)
        finally:
            exporter.stop()
        stats = {
            "ticks": daemon.ticks_total,
            "plant_step_cpu_s": step["cpu_s"],
            "plant_steps": step["count"],
            "loop_duration_p50_s": float(np.median(loop_s)) if loop_s else None,
            "loop_duration_max_s": max(loop_s) if loop_s else None,
            "nvml_writes": len(fake.writes),
            "kind": servers_info["kind"],
        }
    Path(args.stats_file).write_text(json.dumps(stats))
    return 0


def role_numba_baseline(args: argparse.Namespace) -> int:
    """RSS (MiB) of a bare interpreter, after `import numba`, and with the kernels loaded."""
    bare = _rss_mib()
    import numba  # noqa: F401

    imported = _rss_mib()
    from powerd.config import Config
    from powerd.control.policy import Controller

    Controller(Config(), []).warmup()
    compiled = _rss_mib()
    result = {
        "bare": bare,
        "import_numba": imported,
        "numba_kernels": compiled,
        "numba_kernels_peak": _peak_rss_mib(),
    }
    print(json.dumps(result))
    return 0


# ------------------------------------------------------------------------------- parent


def _child(role: str, args: argparse.Namespace, *extra: str) -> list[str]:
    return [
        sys.executable,
        __file__,
        f"--role={role}",
        f"--gpus={args.gpus}",
        f"--tp={args.tp}",
        f"--interval={args.interval}",
        f"--gpu-model={args.gpu_model}",
        f"--trace={args.trace}",
        f"--time-compression={args.time_compression}",
        f"--peak-load={args.peak_load}",
        f"--seed={args.seed}",
        f"--server-kind={args.server_kind}",
        f"--energy-read-cpu-ms={args.energy_read_cpu_ms}",
        *extra,
    ]


def _read_line(process: subprocess.Popen[str], what: str, timeout_s: float) -> str:
    """The next stdout line of a child, or SystemExit naming what did not come."""
    stream = process.stdout
    assert stream is not None
    box: list[str] = []
    reader = threading.Thread(target=lambda: box.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout_s)
    if not box or not box[0]:
        raise SystemExit(f"overhead: no {what} from the child within {timeout_s:.0f} s")
    return box[0].strip()


def _stop(process: subprocess.Popen[str] | None) -> None:
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


def _baseline(args: argparse.Namespace, env: dict[str, str]) -> dict[str, float]:
    completed = subprocess.run(
        _child("numba-baseline", args),
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
        check=False,
    )
    if completed.returncode != 0:
        raise SystemExit(f"overhead: the numba baseline failed:\n{completed.stderr}")
    return dict(json.loads(completed.stdout))


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Run the three processes and return the figures (see the module docstring)."""
    import psutil

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    serve: subprocess.Popen[str] | None = None
    daemon: subprocess.Popen[str] | None = None
    with tempfile.TemporaryDirectory(prefix="powerd-overhead-") as tmp:
        if args.cold_cache:
            # Every kernel the daemon uses compiles at its start, as on a node's first start.
            daemon_env = dict(env, NUMBA_CACHE_DIR=str(Path(tmp) / "numba-daemon"))
            baseline = _baseline(args, dict(env, NUMBA_CACHE_DIR=str(Path(tmp) / "numba-ref")))
        else:
            daemon_env = env
            _baseline(args, env)  # fills the on-disk cache, so the next run only loads
            baseline = _baseline(args, env)
        stats_file = Path(tmp) / "stats.json"
        try:
            serve = subprocess.Popen(
                _child("serve", args), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                env=env,
            )  # fmt: skip
            servers_json = _read_line(serve, "server URLs", 900)
            daemon = subprocess.Popen(
                _child(
                    "daemon", args, f"--servers-json={servers_json}", f"--stats-file={stats_file}"
                ),
                stdout=subprocess.PIPE,
                text=True,
                env=daemon_env,
            )
            ready = _read_line(daemon, "READY", 900).split(" ", 2)
            if len(ready) != 3 or ready[0] != "READY":
                raise SystemExit(f"overhead: unexpected daemon output {' '.join(ready)!r}")
            metrics_url = f"http://127.0.0.1:{int(ready[1])}/metrics"
            after_warmup = json.loads(ready[2])
            proc = psutil.Process(daemon.pid)
            rss_ready = proc.memory_info().rss / MIB
            time.sleep(SETTLE_S)

            cpu0 = proc.cpu_times()
            wall0 = time.monotonic()
            rss_samples: list[float] = []
            scrapes = 0
            next_scrape = wall0
            while time.monotonic() - wall0 < args.duration:
                rss_samples.append(proc.memory_info().rss / MIB)
                if time.monotonic() >= next_scrape:
                    with urllib.request.urlopen(metrics_url, timeout=5) as response:
                        response.read()
                    scrapes += 1
                    next_scrape += args.scrape_interval
                time.sleep(0.5)
            cpu1 = proc.cpu_times()
            wall_s = time.monotonic() - wall0
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=60)
            if daemon.returncode != 0:
                raise SystemExit(f"overhead: the daemon exited with status {daemon.returncode}")
            stats = json.loads(stats_file.read_text())
        finally:
            _stop(daemon)
            _stop(serve)
    cpu_s = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    return {
        "cold_cache": bool(args.cold_cache),
        "window_s": wall_s,
        "cpu_percent_of_one_core": 100.0 * cpu_s / wall_s,
        "cpu_user_s": cpu1.user - cpu0.user,
        "cpu_system_s": cpu1.system - cpu0.system,
        "plant_step_cpu_ms_per_tick": 1e3
        * stats["plant_step_cpu_s"]
        / max(stats["plant_steps"], 1),
        "rss_after_kernels_mib": after_warmup["rss_mib"],
        "peak_rss_after_kernels_mib": after_warmup["peak_rss_mib"],
        "rss_ready_mib": rss_ready,
        "rss_max_mib": max(rss_samples),
        "rss_last_mib": rss_samples[-1],
        "scrapes_of_daemon": scrapes,
        "daemon": stats,
        "reference_rss_mib": baseline,
    }


def _mem(mib: float) -> str:
    return f"{mib:.1f} MiB ({mib * MIB / 1e6:.0f} MB)"


def format_result(result: dict[str, Any], args: argparse.Namespace, argv: list[str] | None) -> str:
    ref = result["reference_rss_mib"]
    daemon = result["daemon"]
    command = " ".join(["python", "benchmarks/overhead.py", *(argv or sys.argv[1:])])
    plant_percent = result["plant_step_cpu_ms_per_tick"] / (10.0 * args.interval)
    loop_p50 = 1e3 * (daemon["loop_duration_p50_s"] or 0.0)
    loop_max = 1e3 * (daemon["loop_duration_max_s"] or 0.0)
    cache = "cold (kernels compiled at start)" if result["cold_cache"] else "warm"
    return "\n".join(
        [
            f"$ {command}",
            f"daemon: {args.gpus} GPUs (fake NVML"
            + (
                f", {args.energy_read_cpu_ms:g} ms of CPU an energy read"
                if args.energy_read_cpu_ms > 0
                else ""
            )
            + f"), {args.gpus // args.tp} {daemon['kind']} "
            f"servers over HTTP, tick {args.interval:g} s, numba cache {cache}; measured over "
            f"{result['window_s']:.0f} s after {SETTLE_S:.0f} s settling ({daemon['ticks']} ticks "
            f"in all, {result['scrapes_of_daemon']} scrapes of its /metrics)",
            f"  CPU: {result['cpu_percent_of_one_core']:.2f} % of one core "
            f"(user {result['cpu_user_s']:.2f} s, system {result['cpu_system_s']:.2f} s), "
            f"of which stepping its fake plant {plant_percent:.3f} %",
            f"  RSS: max {_mem(result['rss_max_mib'])}, at READY {_mem(result['rss_ready_mib'])}; "
            f"after its kernels {_mem(result['rss_after_kernels_mib'])} "
            f"(peak so far {_mem(result['peak_rss_after_kernels_mib'])})",
            f"  loop duration: median {loop_p50:.1f} ms, max {loop_max:.1f} ms",
            f"reference RSS: bare Python {_mem(ref['bare'])}, import numba "
            f"{_mem(ref['import_numba'])}, numba + powerd kernels {_mem(ref['numba_kernels'])} "
            f"(peak {_mem(ref['numba_kernels_peak'])})",
        ]
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=90.0, help="measured window, s")
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--tp", type=int, default=2, help="GPUs per server")
    parser.add_argument("--interval", type=float, default=1.0, help="daemon tick, s")
    parser.add_argument("--scrape-interval", type=float, default=15.0, help="of the daemon, s")
    parser.add_argument("--gpu-model", default="h100-sxm")
    parser.add_argument("--trace", default="azure-conv")
    parser.add_argument("--time-compression", type=float, default=1.0)
    parser.add_argument("--peak-load", type=float, default=0.7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--server-kind",
        default="vllm",
        help="what the servers present themselves as (sglang: the daemon also reads /v1/loads "
        "four times a second between ticks)",
    )
    parser.add_argument(
        "--cold-cache", action="store_true", help="the daemon compiles its kernels from scratch"
    )
    parser.add_argument(
        "--energy-read-cpu-ms",
        type=float,
        default=0.0,
        help="CPU each energy-counter read costs in the driver, which the fake NVML does not "
        "(4.5 on average on a real H200; see benchmarks/RESULTS.md)",
    )
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--role", choices=("parent", "serve", "daemon", "numba-baseline"))
    parser.add_argument("--servers-json", help=argparse.SUPPRESS)
    parser.add_argument("--stats-file", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.role == "serve":
        return role_serve(args)
    if args.role == "daemon":
        return role_daemon(args)
    if args.role == "numba-baseline":
        return role_numba_baseline(args)
    if args.gpus % args.tp:
        raise SystemExit(f"overhead: --tp ({args.tp}) must divide --gpus ({args.gpus})")
    if not 0 <= args.energy_read_cpu_ms <= 1000:
        raise SystemExit("overhead: --energy-read-cpu-ms must be within [0, 1000]")
    result = measure(args)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(format_result(result, args, argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
