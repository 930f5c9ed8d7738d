"""The simulated node: GPUs (plant) and inference servers (engine) advancing together.

`SimNode.advance(dt)` runs one compiled loop over substeps of at most `substep_s`: in each, the
servers' iterations run at the GPUs' current clocks and report their activity and HBM use, then
the plant steps with those inputs. Time is simulated; `RealTimeDriver` ties it to the wall clock
and `serve_node` puts every server's metrics endpoint on HTTP.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from powerd.control.kernels import jit
from powerd.sim.buckets import check_server_kind, histogram_bounds
from powerd.sim.engine import (
    FINISHED_DTYPE,
    M_GEN_TOKENS,
    M_PREEMPTIONS,
    M_PROMPT_TOKENS,
    M_REQ_ABORTED,
    M_REQ_ARRIVED,
    M_REQ_SUCCESS,
    SI_RUN_N,
    SI_WQ_LEN,
    EngineBank,
    EngineView,
    build_config,
    engine_run_until,
)
from powerd.sim.exposition import (
    SGLANG_LOADS_PATH,
    metrics_path,
    render_metrics,
    render_sglang_loads,
)
from powerd.sim.http_server import RenderFn, SimServerHttp
from powerd.sim.models import ModelProfile, served_model_name
from powerd.sim.plant import S_CLOCK_MHZ, GpuPlant, GpuProfile, plant_step
from powerd.sim.traces import Arrivals

log = logging.getLogger(__name__)

MAX_CALL_S = 1.0
"""Longest stretch one compiled call covers (bounds the arrival slice and finished buffer)."""


@jit
def _node_advance(
    t0: float,
    dt: float,
    n_sub: int,
    params: np.ndarray,
    pstate: np.ndarray,
    clocks: np.ndarray,
    activity: np.ndarray,
    mem_util: np.ndarray,
    ctx: np.ndarray,
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
    """Servers and GPUs over [t0, t0 + dt] in n_sub equal substeps (engine first, then plant)."""
    h = dt / n_sub
    for k in range(n_sub):
        t_a = t0 + k * h
        t_b = t0 + dt if k == n_sub - 1 else t0 + (k + 1) * h
        for g in range(clocks.shape[0]):
            clocks[g] = pstate[g, S_CLOCK_MHZ]
        engine_run_until(
            t_a,
            t_b,
            clocks,
            activity,
            mem_util,
            cfg,
            req_i,
            req_f,
            free_stack,
            srv_i,
            srv_f,
            run_idx,
            run_tok,
            gpu_map,
            gpu_f,
            metrics,
            hist_c,
            hist_s,
            hist_b,
            rng,
            node_i,
            arr_t,
            arr_p,
            arr_g,
            fin,
        )
        plant_step(params, pstate, activity, mem_util, ctx, t_b - t_a)


class SimServer:
    """One simulated inference server: a TP group of GPUs running an engine of the bank."""

    def __init__(
        self,
        name: str,
        kind: str,
        model_name: str,
        gpu_indices: tuple[int, ...],
        engine: EngineView,
        *,
        triton_histograms: bool = False,
    ) -> None:
        self.name = name
        self.kind = kind
        self.model_name = model_name
        self.gpu_indices = gpu_indices
        self.engine = engine
        self.triton_histograms = triton_histograms

    @property
    def metrics_path(self) -> str:
        return metrics_path(self.kind)

    def render(self) -> tuple[bytes, str, dict[str, str]]:
        """(body, content type, headers) of a scrape of this server. Call under the node lock.

        A llama.cpp server resets its throughput bucket on every scrape, as the real one does.
        """
        out = render_metrics(
            self.engine.metrics(),
            self.kind,
            self.model_name,
            triton_histograms=self.triton_histograms,
        )
        if self.kind == "llamacpp":
            self.engine.reset_scrape_bucket()
        return out

    def render_loads(self) -> tuple[bytes, str, dict[str, str]]:
        """(body, content type, headers) of SGLang's GET /v1/loads of this server. Call under
        the node lock."""
        running, queued, _ = self.engine.prefill_backlog_parts()
        return render_sglang_loads(self.engine.metrics(), running + queued, queued)

    def routes(self) -> dict[str, RenderFn]:
        """Every GET path this server answers (query string aside) and its renderer: the
        metrics path, and /v1/loads on SGLang. Call the renderers under the node lock."""
        out: dict[str, RenderFn] = {self.metrics_path: self.render}
        if self.kind == "sglang":
            out[SGLANG_LOADS_PATH] = self.render_loads
        return out

    def restart(self) -> None:
        """The server process restarts: its exposed counters start again from zero."""
        self.engine.reset_counters()


class SimNode:
    """n_gpus GPUs of `profile` serving `model` with one server per `tp` GPUs.

    `arrivals` is the node's request stream (times from 0); each request goes to the
    least-loaded server (or round-robin, `dispatch`). With repeat_arrivals the stream is replayed
    end to end, every arrivals.duration_s, for as long as the node runs; it is fed to the servers
    one replay at a time, so memory does not grow with the run. keep_finished: keep every
    finished request's record (finished_requests, finished_records); a node that runs without
    end keeps none. engine_options: keyword arguments of engine.build_config (max_batch,
    chunk_tokens, eta_mem, ...). `lock` guards the node for concurrent readers (HTTP threads,
    fake NVML) while a driver advances it.
    """

    def __init__(
        self,
        profile: GpuProfile,
        n_gpus: int,
        model: ModelProfile,
        tp: int,
        arrivals: Arrivals,
        *,
        seed: int = 0,
        server_kind: str = "vllm",
        dispatch: str = "least_loaded",
        substep_s: float = 0.01,
        engine_options: Mapping[str, Any] | None = None,
        triton_histograms: bool = False,
        repeat_arrivals: bool = False,
        keep_finished: bool = True,
    ) -> None:
        if tp < 1 or n_gpus < 1 or n_gpus % tp:
            raise ValueError(f"tp ({tp}) must divide n_gpus ({n_gpus}), both at least 1")
        check_server_kind(server_kind)
        if not (math.isfinite(substep_s) and 0 < substep_s <= 0.05):
            raise ValueError(f"substep_s must be in (0, 0.05] s, got {substep_s!r}")
        self.profile = profile
        self.model = model
        self.tp = tp
        self.n_gpus = n_gpus
        self.seed = seed
        self.server_kind = server_kind
        self.substep_s = substep_s
        self.arrivals = arrivals
        self.plant = GpuPlant(profile, n_gpus, seed)
        n_servers = n_gpus // tp
        options: dict[str, Any] = dict(engine_options or {})
        cfg = build_config(profile, model, tp, dispatch=dispatch, **options)
        self.bank = EngineBank(
            profile,
            model,
            tp,
            n_servers,
            n_gpus=n_gpus,
            seed=seed,
            cfg=cfg,
            hist_bounds=histogram_bounds(server_kind, model.max_model_len),
            keep_finished=keep_finished,
        )
        self._repeat = repeat_arrivals and len(arrivals) > 0 and arrivals.duration_s > 0
        self._replays_fed = 0
        self._last_fed_s = 0.0
        if self._repeat:
            self._feed_through(0.0)
        else:
            self.bank.feed(arrivals.time_s, arrivals.prompt_tokens, arrivals.gen_tokens)
        self.ctx = np.ones(n_gpus, dtype=np.float64)
        self._clocks = np.zeros(n_gpus, dtype=np.float64)
        self._activity = np.zeros(n_gpus, dtype=np.float64)
        self._mem_util = np.zeros(n_gpus, dtype=np.float64)
        self.lock = threading.RLock()
        self.servers = self._make_servers(triton_histograms)

    def _make_servers(self, triton_histograms: bool) -> list[SimServer]:
        name = served_model_name(self.model.name)
        return [
            SimServer(
                f"{self.server_kind}-{s}",
                self.server_kind,
                name,
                tuple(int(g) for g in self.bank.gpu_map[s]),
                EngineView(self.bank, s),
                triton_histograms=triton_histograms,
            )
            for s in range(self.bank.n_servers)
        ]

    @property
    def now_s(self) -> float:
        """Simulated seconds since the node was built."""
        return self.bank.now_s

    def advance(self, dt_s: float) -> None:
        """Advance servers and GPUs together by dt_s simulated seconds."""
        if not (math.isfinite(dt_s) and dt_s >= 0):
            raise ValueError(f"dt_s must be a non-negative number of seconds, got {dt_s!r}")
        with self.lock:
            remaining = dt_s
            while remaining > 1e-12:
                step = min(remaining, MAX_CALL_S)
                self._advance_call(step)
                remaining -= step

    def _feed_through(self, t_s: float) -> None:
        """Feed every replay of the repeated stream that starts at or before t_s."""
        a = self.arrivals
        while self._replays_fed * a.duration_s <= t_s:
            times = a.time_s + self._replays_fed * a.duration_s
            # An arrival at the very end of the span can round past the next replay's first.
            np.maximum(times, self._last_fed_s, out=times)
            self.bank.feed(times, a.prompt_tokens, a.gen_tokens)
            self._last_fed_s = float(times[-1])
            self._replays_fed += 1

    def _advance_call(self, dt_s: float) -> None:
        bank = self.bank
        t0 = bank.now_s
        t1 = t0 + dt_s
        n_sub = max(math.ceil(dt_s / self.substep_s - 1e-9), 1)
        if self._repeat:
            self._feed_through(t1)
        args = bank.kernel_args(*bank.take_arrivals(t1))
        plant = self.plant
        _node_advance(
            t0, dt_s, n_sub, plant.params, plant.state, self._clocks, self._activity,
            self._mem_util, self.ctx, *args,
        )  # fmt: skip
        bank.collect_finished()
        bank.now_s = t1

    def clone(self) -> SimNode:
        """An independent copy (own plant, engines, lock and servers) that evolves identically."""
        with self.lock:
            other = object.__new__(SimNode)
            other.__dict__.update(self.__dict__)
            other.plant = self.plant.clone()
            other.bank = self.bank.copy()
            other.ctx = self.ctx.copy()
            other._clocks = self._clocks.copy()
            other._activity = self._activity.copy()
            other._mem_util = self._mem_util.copy()
            other.lock = threading.RLock()
            other.servers = [
                SimServer(
                    s.name,
                    s.kind,
                    s.model_name,
                    s.gpu_indices,
                    EngineView(other.bank, i),
                    triton_histograms=s.triton_histograms,
                )
                for i, s in enumerate(self.servers)
            ]
            return other

    def finished_requests(self) -> np.ndarray:
        """float64[n, 2]: (TTFT s, mean inter-token latency s) of every finished request, all
        servers, in completion order. A one-token answer has mean ITL 0."""
        with self.lock:
            rec = self.bank.finished_requests()
        return np.column_stack([rec["ttft_s"], rec["itl_mean_s"]]).astype(np.float64)

    def finished_records(self) -> np.ndarray:
        """Every finished request as engine.FINISHED_DTYPE records (server, arrival, TTFT,
        mean ITL, queue, e2e, tokens)."""
        with self.lock:
            rec = self.bank.finished_requests()
        return rec.astype(FINISHED_DTYPE, copy=True)

    def totals(self) -> dict[str, float]:
        """Ground truth since the node was built (simulated server restarts do not reset it).

        energy_j: true GPU energy of all GPUs; generated_tokens / prompt_tokens: tokens
        computed; requests_*: counts; running / waiting: requests in the servers now.
        """
        with self.lock:
            m = self.bank.metrics + self.bank.metrics_carry
            energy = self.plant.true_energy_j()
            return {
                "now_s": self.now_s,
                "energy_j": float(energy.sum()),
                "generated_tokens": float(m[:, M_GEN_TOKENS].sum()),
                "prompt_tokens": float(m[:, M_PROMPT_TOKENS].sum()),
                "requests_arrived": float(m[:, M_REQ_ARRIVED].sum()),
                "requests_finished": float(m[:, M_REQ_SUCCESS].sum()),
                "requests_aborted": float(m[:, M_REQ_ABORTED].sum()),
                "preemptions": float(m[:, M_PREEMPTIONS].sum()),
                "running": float(self.bank.srv_i[:, SI_RUN_N].sum()),
                "waiting": float(self.bank.srv_i[:, SI_WQ_LEN].sum()),
            }

    def gpu_energy_j(self) -> np.ndarray:
        """True energy per GPU since the node was built, J."""
        with self.lock:
            return self.plant.true_energy_j()


class RealTimeDriver:
    """Advances a node by wall time × time_compression every period_s, in a daemon thread."""

    def __init__(
        self, node: SimNode, time_compression: float = 1.0, period_s: float = 0.02
    ) -> None:
        if not (math.isfinite(time_compression) and time_compression > 0):
            raise ValueError(f"time_compression must be positive, got {time_compression!r}")
        if not (math.isfinite(period_s) and period_s > 0):
            raise ValueError(f"period_s must be positive, got {period_s!r}")
        self.node = node
        self.time_compression = time_compression
        self.period_s = period_s
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="sim-driver", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(self.period_s):
            now = time.monotonic()
            dt = (now - last) * self.time_compression
            last = now
            try:
                self.node.advance(dt)
            except Exception as exc:  # keep the failure for the owner; stop advancing
                log.exception("simulated node stopped advancing")
                self.error = exc
                return

    def stop(self) -> None:
        """Stop advancing (idempotent); simulated time stays where it is."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10.0)
        self._thread = None


def serve_node(node: SimNode, host: str = "127.0.0.1") -> list[SimServerHttp]:
    """Start one HTTP endpoint per server of `node` serving its routes (rendering under the
    node lock); each endpoint's `url` is the metrics URL."""

    def locked(render: RenderFn) -> RenderFn:
        def call() -> tuple[bytes, str, dict[str, str]]:
            with node.lock:
                return render()

        return call

    out: list[SimServerHttp] = []
    for server in node.servers:

        def restart(s: SimServer = server) -> None:
            with node.lock:
                s.restart()

        routes = server.routes()
        render = routes.pop(server.metrics_path)
        extra = {path: locked(fn) for path, fn in routes.items()}
        out.append(
            SimServerHttp(
                locked(render),
                host=host,
                path=server.metrics_path,
                on_restart=restart,
                extra_routes=extra,
            ).start()
        )
    return out
