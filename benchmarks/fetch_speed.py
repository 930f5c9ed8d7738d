"""What one read of a server costs the daemon: a new connection each time or one kept open.

A child process serves, over HTTP, the bodies a simulated node's first server answers after
a minute of load: vLLM's /metrics and SGLang's /metrics and /v1/loads. This process reads each
of them --rounds times with `http_fetch` (urllib, a new connection per read, as a one-off
probe does) and with `KeepAliveFetcher` (one HTTP/1.1 connection kept between reads, as the
daemon reads its servers), in turn, twice, and prints per read the CPU time of this process
(the server's excluded), the system's part of it, and the wall time.

    NUMBA_CACHE_DIR=.numba_cache .venv/bin/python benchmarks/fetch_speed.py [--rounds 2000]
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from powerd.config import SimConfig
from powerd.simulation import build_node
from powerd.sources import Fetcher, http_fetch
from powerd.sources.fetch import KeepAliveFetcher

SERVE = """
import sys, time
from pathlib import Path
from powerd.sim.http_server import SimServerHttp
bodies = {p.name: p.read_bytes() for p in Path(sys.argv[1]).iterdir()}
first, *rest = sorted(bodies)
page = lambda name: (lambda: (bodies[name], "text/plain; version=0.0.4", {}))
http = SimServerHttp(page(first), path="/" + first,
                     extra_routes={"/" + name: page(name) for name in rest}).start()
print(http.url.rsplit("/", 1)[0], flush=True)
time.sleep(3600)
"""


def bodies_after_a_minute() -> dict[str, bytes]:
    """Route name -> body, from the first server of a small simulated node of each kind."""
    out = {}
    for kind in ("vllm", "sglang"):
        sim = SimConfig(gpus=1, tp=1, trace="constant", peak_load=0.6, server_kind=kind)
        node = build_node(sim, 120.0)
        node.advance(60.0)
        for path, render in node.servers[0].routes().items():
            out[f"{kind}{path.replace('/', '_')}"] = render()[0]
    return out


def time_reads(fetch: Fetcher, url: str, rounds: int) -> tuple[float, float, float]:
    """Per read: CPU time, the system's part of it, and wall time, in ms."""
    fetch(url, 5.0)
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    c0, w0 = time.process_time(), time.perf_counter()
    for _ in range(rounds):
        fetch(url, 5.0)
    c1, w1 = time.process_time(), time.perf_counter()
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    scale = 1e3 / rounds
    return (c1 - c0) * scale, (r1.ru_stime - r0.ru_stime) * scale, (w1 - w0) * scale


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2000)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        for name, body in bodies_after_a_minute().items():
            (Path(tmp) / name).write_bytes(body)
        server = subprocess.Popen(
            [sys.executable, "-c", SERVE, tmp],
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parents[1],
        )
        try:
            assert server.stdout is not None
            base = server.stdout.readline().strip()
            print(f"os.getloadavg() before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
            for name in sorted(os.listdir(tmp)):
                size_kb = (Path(tmp) / name).stat().st_size / 1024
                for _ in range(2):
                    kept = KeepAliveFetcher()
                    for label, fetch in (("new connection", http_fetch), ("kept", kept)):
                        cpu, system, wall = time_reads(fetch, f"{base}/{name}", args.rounds)
                        print(
                            f"{name:16s} {size_kb:5.1f} KB  {label:14s}  cpu {cpu:.3f} ms"
                            f" (system {system:.3f})  wall {wall:.3f} ms"
                        )
                    kept.close()
        finally:
            server.kill()
            server.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
