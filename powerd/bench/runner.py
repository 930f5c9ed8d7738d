"""Runs the benchmark: every policy on an identical simulated node, in virtual time, in parallel.

Every policy starts from a copy of one template node, so every policy sees the same requests
(same seed, same arrivals) and the same GPUs. The jobs run in `workers` processes: the oracle
(the longest: many re-simulations per window) in one, the rest (single runs and the static-
clock sweep) in the others. The static-clock sweep runs the whole trace at a coarse grid of
clock caps, then finer grids around the best down to the clock table's step; its clock with
the most tokens per joule is the util-governor's efficient frequency Fe, as GEOPM takes Fe
from a frequency sweep of the workload.
"""

from __future__ import annotations

import logging
import multiprocessing
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field, replace

import numpy as np

from powerd.bench import measure
from powerd.bench.options import POLICY_NAMES, OracleOptions
from powerd.bench.oracle import Oracle
from powerd.bench.policies import (
    BenchPolicy,
    DefaultPolicy,
    FixedClockPolicy,
    PowerdPolicy,
    SloLowestClockPolicy,
    StaticPowerCapPolicy,
    UtilGovernorPolicy,
    coarse_grid_mhz,
    refine_around,
)
from powerd.bench.results import BenchInfo, BenchResult, PolicyResult
from powerd.config import INTERVAL_RANGE_S, REPLAY_TRACE_DEFAULT, SimConfig, SloConfig
from powerd.sim.models import get_model_profile
from powerd.sim.node import SimNode
from powerd.sim.plant import GpuProfile, load_gpu_profile
from powerd.sim.traces import Arrivals, resolve_trace, scale_for_peak_load, trace_label
from powerd.simulation import DEFAULT_MODEL_FOR_TP
from powerd.validation import is_positive_finite

log = logging.getLogger(__name__)

ATTAINMENT_TOLERANCE = 0.005
"""A policy "meets the SLO" when its attainment is within 0.5 points of default's."""


def positive_finite(option: str, value: float) -> None:
    """ValueError naming the option unless value is a positive, finite number."""
    if not is_positive_finite(value):
        raise ValueError(f"{option} must be positive, got {value}")


@dataclass(frozen=True)
class BenchSetup:
    """What to benchmark and how. `peak_load` (when set) overrides `rate_scale`."""

    trace: str = REPLAY_TRACE_DEFAULT
    duration_s: float = 3600.0
    gpu_model: str = "h100-sxm"
    gpu_profile_file: str | None = None
    model: str | None = None
    gpus: int = 4
    tp: int = 1
    server_kind: str = "vllm"
    seed: int = 0
    peak_load: float | None = 0.7
    rate_scale: float = 1.0
    slo: SloConfig = field(default_factory=lambda: SloConfig(ttft_s=2.0, itl_s=0.1))
    interval_s: float = 1.0
    workers: int = 2
    sweep_coarse: int = 10
    sweep_refine_per_side: int = 2
    sweep_low_fraction: float = 0.35
    oracle: OracleOptions = field(default_factory=OracleOptions)
    zeus_warmup_s: float = 2.0
    zeus_profile_s: float = 5.0

    def validate(self) -> None:
        """Raise ValueError with one sentence for a setting that cannot work."""
        positive_finite("--duration", self.duration_s)
        if self.gpus < 1 or self.tp < 1:
            raise ValueError("--gpus and --tp must be at least 1")
        if self.gpus % self.tp:
            raise ValueError(f"--tp ({self.tp}) must divide --gpus ({self.gpus})")
        if self.peak_load is not None:
            positive_finite("--peak-load", self.peak_load)
        positive_finite("--rate-scale", self.rate_scale)
        positive_finite("--ttft-slo", self.slo.ttft_s)
        positive_finite("--itl-slo", self.slo.itl_s)
        positive_finite("--oracle-window", self.oracle.window_s)
        low_s, high_s = INTERVAL_RANGE_S
        if not low_s <= self.interval_s <= high_s:
            raise ValueError(
                f"--interval must be in [{low_s:g}, {high_s:g}], got {self.interval_s:g}"
            )
        if self.duration_s < self.interval_s:
            raise ValueError(
                f"--duration ({self.duration_s:g} s) must be at least one --interval "
                f"({self.interval_s:g} s): a shorter run has no tick to compare"
            )
        if self.seed < 0:
            raise ValueError(f"--seed must be at least 0, got {self.seed}")
        if self.workers < 1:
            raise ValueError(f"--workers must be at least 1, got {self.workers}")

    @property
    def model_name(self) -> str:
        return self.model or DEFAULT_MODEL_FOR_TP.get(self.tp, "llama-3.1-70b")

    def gpu_profile(self) -> GpuProfile:
        return load_gpu_profile(self.gpu_profile_file or self.gpu_model)

    def sim_config(self) -> SimConfig:
        return SimConfig(
            gpu_model=self.gpu_model,
            gpu_profile_file=self.gpu_profile_file,
            gpus=self.gpus,
            model=self.model_name,
            tp=self.tp,
            server_kind=self.server_kind,
            trace=self.trace,
            time_compression=1.0,
            peak_load=self.peak_load if self.peak_load is not None else 1.0,
            seed=self.seed,
        )

    def load_description(self) -> str:
        if self.peak_load is not None:
            return f"peak load {self.peak_load:.2f}"
        return f"rate x{self.rate_scale:g}"


def build_arrivals(setup: BenchSetup) -> Arrivals:
    """The request stream every policy replays."""
    arrivals = resolve_trace(
        setup.trace,
        rate_scale=1.0 if setup.peak_load is not None else setup.rate_scale,
        duration_s=setup.duration_s,
        seed=setup.seed,
    )
    if setup.peak_load is not None:
        arrivals = scale_for_peak_load(
            arrivals,
            setup.peak_load,
            profile=setup.gpu_profile(),
            model=get_model_profile(setup.model_name),
            tp=setup.tp,
            n_servers=setup.gpus // setup.tp,
        )
    return arrivals


def build_template_node(setup: BenchSetup) -> SimNode:
    """The node every policy starts from (a copy of it)."""
    return SimNode(
        setup.gpu_profile(),
        setup.gpus,
        get_model_profile(setup.model_name),
        setup.tp,
        build_arrivals(setup),
        seed=setup.seed,
        server_kind=setup.server_kind,
    )


# ---------------------------------------------------------------------------------------------
# One run


def _result(
    name: str,
    node: SimNode,
    setup: BenchSetup,
    recorder: measure.Recorder,
    wall_s: float,
    notes: str,
    decisions: dict[str, float] | None = None,
) -> PolicyResult:
    out = measure.outcome(node, setup.slo)
    return PolicyResult(
        name=name,
        energy_j=out.energy_j,
        generated_tokens=round(out.generated_tokens),
        finished_requests=out.finished,
        slo_attainment=out.attainment,
        ttft_p95_s=out.ttft_p95_s,
        itl_p95_s=out.itl_p95_s,
        duration_s=node.now_s,
        wall_s=wall_s,
        series=recorder.series(),
        notes=notes,
        decisions=decisions or {},
    )


def run_policy(setup: BenchSetup, node: SimNode, policy: BenchPolicy) -> PolicyResult:
    """Drive a fresh node (a template copy) to the end of the run under one policy."""
    started = time.perf_counter()
    recorder = measure.Recorder(node)
    policy.start(node)
    measure.drive(node, setup.duration_s, setup.interval_s, policy, recorder)
    wall_s = time.perf_counter() - started
    decisions = policy.decision_shares() if isinstance(policy, PowerdPolicy) else {}
    return _result(policy.name, node, setup, recorder, wall_s, policy.notes(), decisions)


def run_oracle(setup: BenchSetup, node: SimNode) -> PolicyResult:
    return _run_oracle(setup, node)[0]


def _run_oracle(setup: BenchSetup, node: SimNode) -> tuple[PolicyResult, SimNode]:
    """The oracle's result and the node at the end of its committed trajectory."""
    started = time.perf_counter()
    oracle = Oracle(setup.slo, setup.interval_s, setup.oracle)
    final, recorder = oracle.run(node, setup.duration_s)
    wall_s = time.perf_counter() - started
    return _result("oracle", final, setup, recorder, wall_s, oracle.notes()), final


@dataclass(frozen=True)
class Job:
    """One unit of work for a worker process."""

    kind: str
    """A policy name, or "sweep" (a fixed clock for the whole run)."""
    clock_mhz: int = 0


def _make_policy(setup: BenchSetup, job: Job) -> BenchPolicy:
    if job.kind == "default":
        return DefaultPolicy()
    if job.kind == "sweep":
        return FixedClockPolicy(job.clock_mhz)
    if job.kind == "util-governor":
        return UtilGovernorPolicy(job.clock_mhz)
    if job.kind == "static-power-cap":
        return StaticPowerCapPolicy(warmup_s=setup.zeus_warmup_s, profile_s=setup.zeus_profile_s)
    if job.kind == "slo-lowest-clock":
        return SloLowestClockPolicy(setup.slo)
    if job.kind == "powerd":
        return PowerdPolicy(setup.sim_config(), setup.slo, setup.interval_s)
    raise ValueError(f"no such benchmark job: {job.kind}")


_TEMPLATE: SimNode | None = None
"""The template node, inherited by forked workers (built once, in the parent)."""
_TEMPLATE_SETUP: BenchSetup | None = None


def _template(setup: BenchSetup) -> SimNode:
    global _TEMPLATE, _TEMPLATE_SETUP
    if _TEMPLATE is None or setup != _TEMPLATE_SETUP:
        _TEMPLATE = build_template_node(setup)
        _TEMPLATE_SETUP = setup
    return _TEMPLATE


def run_job(setup: BenchSetup, job: Job) -> PolicyResult:
    """Run one job on a copy of the template node."""
    return run_job_records(setup, job)[0]


def run_job_records(setup: BenchSetup, job: Job) -> tuple[PolicyResult, np.ndarray]:
    """Run one job on a copy of the template node; also its finished requests, one record
    each (engine.FINISHED_DTYPE: server, arrival, TTFT, mean ITL, queue, e2e, tokens)."""
    node = _template(setup).clone()
    if job.kind == "oracle":
        result, node = _run_oracle(setup, node)
    else:
        result = run_policy(setup, node, _make_policy(setup, job))
    return result, node.finished_records()


# ---------------------------------------------------------------------------------------------
# The whole benchmark


class _Executor:
    """A process pool, or in-process execution for one worker."""

    def __init__(self, setup: BenchSetup) -> None:
        self.setup = setup
        self.pool: ProcessPoolExecutor | None = None
        if setup.workers > 1:
            methods = multiprocessing.get_all_start_methods()
            context = multiprocessing.get_context("fork" if "fork" in methods else None)
            self.pool = ProcessPoolExecutor(max_workers=setup.workers, mp_context=context)

    def submit(self, job: Job) -> Future[PolicyResult]:
        if self.pool is not None:
            return self.pool.submit(run_job, self.setup, job)
        future: Future[PolicyResult] = Future()
        future.set_result(run_job(self.setup, job))
        return future

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def run_bench(
    setup: BenchSetup,
    policies: Sequence[str] = POLICY_NAMES,
    progress: Callable[[str], None] | None = None,
) -> BenchResult:
    """Run the named policies (in the order given) and return their ground truth."""
    setup.validate()
    started = time.perf_counter()
    say = progress or (lambda _msg: None)
    template = _template(setup)  # built before forking, so workers inherit it
    profile = template.plant.profile
    table = [int(c) for c in measure.clock_table_mhz(template)]
    f_max = int(profile.sm_clock_max_mhz)
    wanted = list(policies)
    need_sweep = "static-clock" in wanted or "util-governor" in wanted
    need_default = "default" in wanted or "static-clock" in wanted

    executor = _Executor(setup)
    futures: dict[Future[PolicyResult], Job] = {}
    results: dict[str, PolicyResult] = {}
    sweep: dict[int, PolicyResult] = {}
    sweep_wall_s = 0.0

    def submit(job: Job) -> None:
        futures[executor.submit(job)] = job

    grid = coarse_grid_mhz(
        table, max(profile.sm_clock_min_mhz, setup.sweep_low_fraction * f_max), f_max,
        setup.sweep_coarse,
    )  # fmt: skip
    try:
        # Longest first, so the pool's tail is short.
        if "oracle" in wanted:
            submit(Job("oracle"))
        if need_default:
            submit(Job("default"))
        for name in ("powerd", "slo-lowest-clock", "static-power-cap"):
            if name in wanted:
                submit(Job(name))
        if need_sweep:
            for clock in grid:
                # Unlocked at f_max is the default run itself; reuse it when it runs anyway.
                if not (clock >= f_max and need_default):
                    submit(Job("sweep", clock))
        state = {"refined": not need_sweep, "util": "util-governor" not in wanted}

        def schedule() -> None:
            sweeping = any(j.kind == "sweep" for j in futures.values())
            if need_sweep and not sweeping and not state["refined"]:
                if need_default and "default" not in results:
                    return
                # Finer grids around the best until its swept neighbours are the table's
                # next steps: the hindsight clock is the table's, not the grid's.
                best = _best_static(sweep, results.get("default"))
                for clock in refine_around(table, sorted(sweep), best, setup.sweep_refine_per_side):
                    submit(Job("sweep", clock))
                    sweeping = True
                state["refined"] = not sweeping
            if not sweeping and state["refined"] and not state["util"]:
                state["util"] = True
                submit(Job("util-governor", _efficient_clock(sweep)))

        schedule()
        while futures:
            done, _ = wait(list(futures), return_when=FIRST_COMPLETED)
            for future in done:
                job = futures.pop(future)
                result = future.result()
                if job.kind == "sweep":
                    sweep[job.clock_mhz] = result
                    sweep_wall_s += result.wall_s
                    label = f"static-clock sweep {job.clock_mhz} MHz"
                else:
                    results[job.kind] = result
                    label = job.kind
                    if job.kind == "default" and need_sweep and f_max in grid:
                        sweep[f_max] = result
                say(
                    f"{label}: {result.energy_j / 1e3:.1f} kJ, {result.tokens_per_joule:.3f} "
                    f"tok/J, SLO {result.slo_attainment:.2%} ({result.wall_s:.0f} s)"
                )
            schedule()
    finally:
        executor.close()

    if "static-clock" in wanted:
        best = _best_static(sweep, results.get("default"))
        chosen = sweep[best]
        results["static-clock"] = replace(
            chosen,
            name="static-clock",
            wall_s=sweep_wall_s,
            notes=f"{best} MHz of {len(sweep)} swept",
        )
    ordered = {name: results[name] for name in wanted if name in results}
    info = BenchInfo(
        trace=trace_label(setup.trace),
        gpu_model=profile.name,
        model=setup.model_name,
        gpus=setup.gpus,
        tp=setup.tp,
        duration_s=setup.duration_s,
        ttft_slo_s=setup.slo.ttft_s,
        itl_slo_s=setup.slo.itl_s,
        server_kind=setup.server_kind,
        seed=setup.seed,
        load=setup.load_description(),
        interval_s=setup.interval_s,
    )
    return BenchResult(info, ordered, time.perf_counter() - started, dict(sorted(sweep.items())))


def meets_slo(result: PolicyResult, default: PolicyResult | None) -> bool:
    """Attainment within ATTAINMENT_TOLERANCE of default's (always true without default)."""
    if default is None:
        return True
    return result.slo_attainment >= default.slo_attainment - ATTAINMENT_TOLERANCE - 1e-12


def _best_static(sweep: dict[int, PolicyResult], default: PolicyResult | None) -> int:
    """The least-energy swept clock that meets the SLO (the highest clock if none does)."""
    feasible = [c for c, r in sweep.items() if meets_slo(r, default)]
    if not feasible:
        return max(sweep)
    return min(feasible, key=lambda c: (sweep[c].energy_j, -c))


def _efficient_clock(sweep: dict[int, PolicyResult]) -> int:
    """GEOPM's Fe: the swept clock with the most tokens per joule."""
    return max(sweep, key=lambda c: (sweep[c].tokens_per_joule, c))
