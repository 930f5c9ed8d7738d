#!/usr/bin/env python3
"""Check a real NVIDIA machine's NVML against what powerd assumes, and against the plant model.

    python tools/gpu_check.py --out out/gpu-check            # read-only (the default)
    python tools/gpu_check.py --out out/gpu-check --sweep    # also steps clocks and limits

Default run: READ-ONLY. It reads every NVML value the daemon uses on every GPU, samples them
every 25 ms while idle and while a compute-bound and a memory-bound PyTorch load run at the
current settings (skipped, with a note, when torch or CUDA is missing), and checks the sensor
semantics of dvfs_plant_model.md §2: the energy counter against the integral of the power
readings, the averaging window and lag of nvmlDeviceGetPowerUsage (fitted against the
POWER_INSTANT series), the publication periods, and the clock read-back. It writes
`calibration.csv` (each figure measured here next to the same procedure run on the simulated
plant with the matching profile) and `summary.json` to --out. It never changes a setting:
for the run, every NVML function that could is replaced by one that refuses (check
read_only_held names any call refused).

The default run also reads through powerd's own code ("powerd_backend" in summary.json): it
opens NvmlBackend as the daemon does, compares one read() per GPU at idle and under the compute
load, and its GpuInfo, with the raw calls above; it lists each GPU's compute processes through
the backend (the list gpumap uses) and through the raw call, flagging PIDs of 0 or at least
pid_max (a driver whose process struct differs from the binding's), and looks for its own PID
under load; it records the driver, NVML, CUDA and nvidia-ml-py versions and which symbol of
each fallback list the backend used; it times ten reads of each GPU, wall and CPU (a driver
may busy-wait inside a call). It uses no write method, and is skipped with a note when powerd
is not importable.

Then it runs the daemon itself ("powerd_dry_run"): `powerd run` with `dry_run: true` on the
GPUs for --daemon-seconds, fed by a simulated vLLM server per GPU, the compute load on for the
first half, and checks that it reports ready, exports the power NVML reads, counts no NVML
error, logs no warning, exits 0 on SIGTERM and leaves every setting as it found it.

--sweep (explicit only) locks a series of SM clocks and steps the power limit (§6 "calibrate
first"), fits v_min, f_v and the dynamic power of the compute load, κ from the memory load,
the lock dead time and the cap loop's settling time, and restores every setting it touched in
a `finally` block, also on error, SIGINT or SIGTERM.

Runs on Python 3.12 with only nvidia-ml-py and numpy (torch optional); the simulated column,
powerd's backend and the dry run need powerd importable and are skipped otherwise (the dry run
fails if powerd imports but its own dependencies do not). `--simulate PROFILE` runs the whole check
against the fake NVML instead of a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import importlib.metadata
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar, Protocol

import numpy as np

REASON_SW_POWER_CAP = 0x4
PRE_S = 4.0
"""Idle seconds sampled before each load starts: the window fit looks back up to 3 s."""
POST_S = 3.0
"""Seconds sampled after each load stops."""
SETTLE_S = 2.0
"""Seconds at the start of a load excluded from its means."""
SIM_STEP_S = 0.005

SERIES = ("usage_mw", "energy_mj", "instant_mw", "average_mw", "sm_mhz", "temp_c", "reasons")
SLOW_CALL_S = 1.0
"""An NVML call slower than this is flagged: powerd's tick makes seven a GPU, and takes a GPU
whose reading passes 5 s (powerd.gpu.backend.STALL_S) for lost."""
CALL_SECONDS: dict[str, list[tuple[float, float]]] = {}
"""(wall, this thread's CPU) seconds of each NVML call made through _call since run_check
began, by function: a driver may busy-wait inside a call, which costs the daemon CPU."""


# ---------------------------------------------------------------------------------------------
# Clocks and loads: real ones, and simulated ones that drive the fake NVML in virtual time


class Clock(Protocol):
    def now(self) -> float: ...

    def sleep(self, seconds: float) -> None: ...


class RealClock:
    def now(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)


class Load(Protocol):
    """A workload on every GPU. `start` must return at once; `stop` returns iterations/s."""

    def open_context(self) -> None: ...

    def start(self, kind: str) -> None: ...

    def stop(self) -> dict[int, float]: ...


class TorchLoad:
    """BF16 8192² matmuls ("compute") or 1-GiB device copies ("memory"), one thread per GPU."""

    def __init__(self, nvml_uuids: list[str]) -> None:
        os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")  # the order NVML uses
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("torch is installed but CUDA is not available")
        self.torch = torch
        self.devices: dict[int, int] = {}
        for d in range(torch.cuda.device_count()):
            uuid = getattr(torch.cuda.get_device_properties(d), "uuid", None)
            text = f"GPU-{uuid}" if uuid is not None else None
            index = nvml_uuids.index(text) if text in nvml_uuids else d
            if index < len(nvml_uuids):
                self.devices[index] = d
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._counts: dict[int, int] = {}
        self._started = 0.0

    @classmethod
    def create(cls, nvml_uuids: list[str]) -> tuple[TorchLoad | None, str]:
        try:
            return cls(nvml_uuids), ""
        except ImportError:
            return None, "torch is not importable: loads skipped, idle readings only"
        except Exception as exc:  # any CUDA initialisation failure means: no loads
            return None, f"loads skipped: {exc}"

    def open_context(self) -> None:
        for d in self.devices.values():
            self.torch.empty(1, device=f"cuda:{d}")
            self.torch.cuda.synchronize(d)

    def _work(self, index: int, d: int, kind: str) -> None:
        torch = self.torch
        with torch.cuda.device(d):
            if kind == "compute":
                a = torch.randn(8192, 8192, device=f"cuda:{d}", dtype=torch.bfloat16)
                b = torch.randn_like(a)
                out = torch.empty_like(a)

                def op() -> None:
                    torch.matmul(a, b, out=out)

            else:
                x = torch.empty(1 << 28, device=f"cuda:{d}", dtype=torch.float32)
                y = torch.empty_like(x)

                def op() -> None:
                    y.copy_(x)

            n = 0
            while not self._stop.is_set():
                for _ in range(8):
                    op()
                torch.cuda.synchronize(d)
                n += 8
            self._counts[index] = n

    def start(self, kind: str) -> None:
        self._stop.clear()
        self._counts = {}
        self._started = time.monotonic()
        self._threads = [
            threading.Thread(target=self._work, args=(i, d, kind), daemon=True)
            for i, d in self.devices.items()
        ]
        for t in self._threads:
            t.start()

    def stop(self) -> dict[int, float]:
        self._stop.set()
        for t in self._threads:
            t.join()
        span = max(time.monotonic() - self._started, 1e-9)
        return {i: n / span for i, n in self._counts.items()}


class SimNode:
    """The fake NVML's plant advanced in virtual time; it is both the Clock and the Load.

    Loads: "compute" a = 1.0, m = 0.25; "memory" (a copy kernel) a = 0.15, m = 0.85 [A].
    Iteration rates of the TorchLoad kernels come from the roofline of §6(c) at the plant's
    actual clock.
    """

    LOADS: ClassVar[dict[str, tuple[float, float]]] = {
        "compute": (1.0, 0.25),
        "memory": (0.15, 0.85),
    }

    def __init__(self, fake: Any) -> None:
        self.fake = fake
        self.plant = fake.plant
        n = self.plant.n_gpus
        self.activity = np.zeros(n)
        self.mem_util = np.zeros(n)
        self.ctx = np.zeros(n)
        self._kind = ""
        self._iterations = np.zeros(n)
        self._started = 0.0

    def now(self) -> float:
        with self.fake.lock:
            return float(self.plant.now_s)

    def sleep(self, seconds: float) -> None:
        from powerd.sim.roofline import iteration_time_s, roofline_terms_s

        p = self.plant.profile
        # The TorchLoad kernels: a BF16 8192³ matmul, a 1-GiB float32 copy (read + write).
        bytes_moved, flops = (
            (3 * 8192**2 * 2, 2 * 8192**3)
            if self._kind == "compute"
            else (
                2 << 30,
                0,
            )
        )
        t_m, t_cs = roofline_terms_s(
            float(bytes_moved), float(flops), p.hbm_bandwidth_tb_s, p.peak_tflops, p.kappa0
        )
        with self.fake.lock:
            remaining = seconds
            while remaining > 1e-9:
                dt = min(SIM_STEP_S, remaining)
                self.plant.step(dt, self.activity, self.mem_util, self.ctx)
                if self._kind:
                    for i, f in enumerate(self.plant.clock_mhz()):
                        self._iterations[i] += dt / iteration_time_s(
                            t_m, t_cs, float(f), float(p.sm_clock_max_mhz)
                        )
                remaining -= dt

    def open_context(self) -> None:
        """Every GPU now runs this process, as NVML lists a process holding a context."""
        self.ctx[:] = 1.0
        for i in range(self.plant.n_gpus):
            self.fake.set_compute_pids(i, [os.getpid()])

    def start(self, kind: str) -> None:
        a, m = self.LOADS[kind]
        self._kind = kind
        self.activity[:] = a
        self.mem_util[:] = m
        self.ctx[:] = 1.0
        self._iterations[:] = 0.0
        self._started = self.now()

    def stop(self) -> dict[int, float]:
        span = max(self.now() - self._started, 1e-9)
        rates = {i: float(n / span) for i, n in enumerate(self._iterations)}
        self._kind = ""
        self.activity[:] = 0.0
        self.mem_util[:] = 0.0
        return rates


# ---------------------------------------------------------------------------------------------
# Reading NVML

_READ_CALL = re.compile(
    r"^nvml(Device|Unit|System|GpuInstance|ComputeInstance|VgpuInstance|VgpuType|Vgpu|Gpm|Event)?"
    r"(Get|Query|Is|Validate)"
)
"""NVML functions that only read: an object's getters, queries and tests."""
_READ_OTHER = frozenset(
    {
        "nvmlInit",
        "nvmlInit_v2",
        "nvmlInitWithFlags",
        "nvmlShutdown",
        "nvmlErrorString",
        "nvmlExceptionClass",
        "nvmlStructToFriendlyObject",
        "nvmlFriendlyObjectToStruct",
        "nvmlDeviceOnSameBoard",
        "nvmlDevicePerfMetricsGetSamples_v1",
        "nvmlDeviceReadPRMCounters_v1",
        "nvmlDeviceWorkloadPowerProfileGetCurrentProfiles",
        "nvmlDeviceWorkloadPowerProfileGetProfilesInfo",
        "nvmlGpmMetricsGet",
        "nvmlGpmSampleGet",
        "nvmlGpmMigSampleGet",
    }
)
"""The other NVML functions that only read or only manage the caller's own session."""
_NVML_FUNCTION = re.compile(r"^nvml[A-Z]")


def nvml_may_write(name: str) -> bool:
    """Whether the NVML function `name` may change a device's or the system's state: any not
    known to only read (a function a later binding adds is refused until it is known)."""
    return not (_READ_CALL.match(name) or name in _READ_OTHER)


@contextlib.contextmanager
def read_only(nvml: Any, refused: list[str]) -> Iterator[None]:
    """Every function of `nvml` that could change a setting raises NVMLError (no permission)
    instead, and its name is appended to `refused`: the read-only run holds to that by
    construction, and this makes a path that did not (powerd's included) a finding."""
    names = [
        n
        for n in dir(nvml)
        if _NVML_FUNCTION.match(n)
        and nvml_may_write(n)
        and callable(getattr(nvml, n, None))
        and not isinstance(getattr(nvml, n), type)
    ]
    own = vars(nvml)  # a module's functions; an object's are its class's, shadowed here
    saved = {n: own[n] for n in names if n in own}

    def refuse(name: str) -> Callable[..., Any]:
        def refused_call(*args: Any, **kwargs: Any) -> Any:
            refused.append(name)
            raise nvml.NVMLError(getattr(nvml, "NVML_ERROR_NO_PERMISSION", 4))

        return refused_call

    for name in names:
        setattr(nvml, name, refuse(name))
    try:
        yield
    finally:
        for name in names:
            if name in saved:
                setattr(nvml, name, saved[name])
            else:
                delattr(nvml, name)


def _call(nvml: Any, errors: dict[str, str], name: str, *args: Any) -> Any:
    """nvml.<name>(*args), or None with the error class, or its absence from the binding,
    recorded (first one per name); its wall and CPU time go to CALL_SECONDS."""
    fn = getattr(nvml, name, None)
    if fn is None:
        errors.setdefault(name, "absent from the binding")
        return None
    started_s, started_cpu_s = time.perf_counter(), time.thread_time()
    try:
        return fn(*args)
    except nvml.NVMLError as exc:
        errors.setdefault(name, type(exc).__name__)
        return None
    finally:
        CALL_SECONDS.setdefault(name, []).append(
            (time.perf_counter() - started_s, time.thread_time() - started_cpu_s)
        )


def call_latency_ms() -> dict[str, dict[str, float]]:
    """Per NVML function timed: calls, median, p99 and max duration, and the median and mean
    CPU time of this thread during the call, in ms."""
    out = {}
    for name, timings in sorted(CALL_SECONDS.items()):
        ms = np.asarray(timings) * 1000.0
        wall, cpu = ms[:, 0], ms[:, 1]
        out[name] = {
            "calls": int(wall.size),
            "median_ms": float(np.median(wall)),
            "p99_ms": float(np.percentile(wall, 99)),
            "max_ms": float(wall.max()),
            "cpu_median_ms": float(np.median(cpu)),
            "cpu_mean_ms": float(cpu.mean()),
        }
    return out


def _power_fields(nvml: Any, handle: Any, errors: dict[str, str]) -> tuple[Any, Any]:
    """(POWER_INSTANT, POWER_AVERAGE) in mW from one GetFieldValues; None for a failed field."""
    fields = _call(
        nvml,
        errors,
        "nvmlDeviceGetFieldValues",
        handle,
        [nvml.NVML_FI_DEV_POWER_INSTANT, nvml.NVML_FI_DEV_POWER_AVERAGE],
    )
    if fields is None:
        return None, None
    instant, average = (
        v.value.uiVal if v.nvmlReturn == nvml.NVML_SUCCESS else None for v in fields
    )
    return instant, average


def _temperature(c: Callable[..., Any], nvml: Any) -> Any:
    """The GPU's temperature as powerd reads it: the versioned call, else the older one (a
    failed call is None or, from a sampler's `c`, NaN)."""
    value = c("nvmlDeviceGetTemperatureV", nvml.NVML_TEMPERATURE_GPU)
    if value is None or value != value:
        return c("nvmlDeviceGetTemperature", nvml.NVML_TEMPERATURE_GPU)
    return value


def inventory(nvml: Any, handle: Any, index: int) -> dict[str, Any]:
    """Every static and slow value the daemon reads, for one GPU."""
    errors: dict[str, str] = {}

    def c(name: str, *args: Any) -> Any:
        return _call(nvml, errors, name, handle, *args)

    mem_clocks = c("nvmlDeviceGetSupportedMemoryClocks") or []
    graphics = c("nvmlDeviceGetSupportedGraphicsClocks", mem_clocks[0]) if mem_clocks else None
    reasons = c("nvmlDeviceGetCurrentClocksEventReasons")
    supported = c("nvmlDeviceGetSupportedClocksEventReasons")
    info: dict[str, Any] = {
        "index": index,
        "name": c("nvmlDeviceGetName"),
        "uuid": c("nvmlDeviceGetUUID"),
        "power_usage_mw": c("nvmlDeviceGetPowerUsage"),
        "energy_mj": c("nvmlDeviceGetTotalEnergyConsumption"),
        "power_limit_mw": c("nvmlDeviceGetPowerManagementLimit"),
        "power_limit_constraints_mw": c("nvmlDeviceGetPowerManagementLimitConstraints"),
        "power_limit_default_mw": c("nvmlDeviceGetPowerManagementDefaultLimit"),
        "enforced_power_limit_mw": c("nvmlDeviceGetEnforcedPowerLimit"),
        "sm_clock_mhz": c("nvmlDeviceGetClockInfo", nvml.NVML_CLOCK_SM),
        "sm_clock_max_mhz": c("nvmlDeviceGetMaxClockInfo", nvml.NVML_CLOCK_SM),
        "mem_clock_mhz": c("nvmlDeviceGetClockInfo", nvml.NVML_CLOCK_MEM),
        "supported_memory_clocks_mhz": mem_clocks,
        "supported_sm_clocks_mhz": graphics,
        "clock_event_reasons": None if reasons is None else hex(reasons),
        "supported_clock_event_reasons": None if supported is None else hex(supported),
        "temperature_c": _temperature(c, nvml),
        "persistence_mode": c("nvmlDeviceGetPersistenceMode"),
        "mig_mode": c("nvmlDeviceGetMigMode"),
    }
    info["power_instant_mw"], info["power_average_mw"] = _power_fields(nvml, handle, errors)
    info["errors"] = errors
    return info


@dataclass
class Series:
    """Samples of one GPU over one phase; t in seconds from the phase start."""

    t: list[float] = field(default_factory=list)
    values: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in SERIES})

    def array(self, key: str) -> np.ndarray:
        return np.asarray(self.values[key], dtype=float)

    def times(self) -> np.ndarray:
        return np.asarray(self.t, dtype=float)


def _read_sample(nvml: Any, handle: Any, errors: dict[str, str]) -> dict[str, float]:
    nan = math.nan

    def c(name: str, *args: Any) -> float:
        value = _call(nvml, errors, name, handle, *args)
        return nan if value is None else float(value)

    out = {
        "usage_mw": c("nvmlDeviceGetPowerUsage"),
        "energy_mj": c("nvmlDeviceGetTotalEnergyConsumption"),
        "sm_mhz": c("nvmlDeviceGetClockInfo", nvml.NVML_CLOCK_SM),
        "temp_c": _temperature(c, nvml),
        "reasons": c("nvmlDeviceGetCurrentClocksEventReasons"),
    }
    instant, average = _power_fields(nvml, handle, errors)
    out["instant_mw"] = nan if instant is None else float(instant)
    out["average_mw"] = nan if average is None else float(average)
    return out


def sample(
    nvml: Any,
    handles: list[Any],
    clock: Clock,
    duration_s: float,
    interval_s: float,
    events: list[tuple[float, Callable[[], None]]] | None = None,
    errors: dict[str, str] | None = None,
) -> list[Series]:
    """Sample every GPU each interval_s for duration_s, running events at their offsets."""
    errors = {} if errors is None else errors
    pending = sorted(events or [], key=lambda e: e[0])
    series = [Series() for _ in handles]
    t0 = clock.now()
    next_t = 0.0
    while True:
        now = clock.now() - t0
        while pending and pending[0][0] <= now + 1e-6:
            pending.pop(0)[1]()
        if now > duration_s:
            break
        for s, h in zip(series, handles, strict=True):
            values = _read_sample(nvml, h, errors)
            s.t.append(clock.now() - t0)
            for key in SERIES:
                s.values[key].append(values[key])
        next_t += interval_s
        wait = next_t - (clock.now() - t0)
        if pending:
            wait = min(wait, pending[0][0] - (clock.now() - t0))
        clock.sleep(max(wait, 0.0))
    for _, action in pending:
        action()
    return series


# ---------------------------------------------------------------------------------------------
# Analysis (pure functions of sampled series)


def _held(t: np.ndarray, values: np.ndarray, grid: np.ndarray) -> np.ndarray:
    idx = np.clip(np.searchsorted(t, grid, side="right") - 1, 0, len(t) - 1)
    return values[idx]


def update_period_s(t: np.ndarray, values: np.ndarray) -> float | None:
    """Median time between changes of a published value (the sensor's publication period)."""
    ok = np.isfinite(values)
    t, values = t[ok], values[ok]
    changes = t[1:][np.diff(values) != 0]
    if len(changes) < 3:
        return None
    return float(np.median(np.diff(changes)))


def estimate_average_window(
    t: np.ndarray, instant_mw: np.ndarray, usage_mw: np.ndarray
) -> tuple[float, float, float] | None:
    """(window_s, lag_s, relative rms) such that usage(t) ≈ mean of instant over
    [t − lag − window, t − lag]; window 0 means usage is the instant reading itself.

    Needs a load step inside the series (the phases sample 2 s of idle before the load)."""
    ok = np.isfinite(instant_mw) & np.isfinite(usage_mw)
    if ok.sum() < 20:
        return None
    t, inst, use = t[ok], instant_mw[ok], usage_mw[ok]
    dt = float(np.median(np.diff(t)))
    grid = np.arange(t[0], t[-1], dt)
    inst_g, use_g = _held(t, inst, grid), _held(t, use, grid)
    csum = np.concatenate(([0.0], np.cumsum(inst_g)))
    max_shift = round(3.0 / dt)
    if len(grid) <= max_shift + 10:
        return None
    target = use_g[max_shift:]
    scale = float(np.mean(np.abs(target))) or 1.0
    best: tuple[float, float, float] | None = None
    for window_s in np.arange(0.0, 2.0001, 0.05):
        k = round(window_s / dt)
        for lag_s in np.arange(0.0, 1.0001, 0.05):
            lag = round(lag_s / dt)
            end = np.arange(max_shift, len(grid)) - lag  # inclusive index of the window's end
            model = inst_g[end] if k == 0 else (csum[end + 1] - csum[end + 1 - k]) / k
            rms = float(np.sqrt(np.mean((model - target) ** 2))) / scale
            if best is None or rms < best[2] - 1e-12:
                best = (float(round(window_s, 2)), float(round(lag_s, 2)), rms)
    return best


def energy_vs_power(
    t: np.ndarray, energy_mj: np.ndarray, power_mw: np.ndarray
) -> tuple[float, float] | None:
    """(counter J, ∫power J) over the span where both are known; power held between samples."""
    ok = np.isfinite(energy_mj) & np.isfinite(power_mw)
    if ok.sum() < 10:
        return None
    t, e, p = t[ok], energy_mj[ok], power_mw[ok]
    counted = (e[-1] - e[0]) / 1000.0
    integral = float(np.sum(p[:-1] * np.diff(t))) / 1000.0
    return float(counted), integral


@dataclass
class PhaseStats:
    power_w: float | None
    """Mean from the energy counter over the load interior (None when unavailable)."""
    usage_w: float | None
    sm_mhz: float | None
    temp_end_c: float | None
    reasons: int
    energy_ratio: float | None
    """Energy counter over ∫POWER_INSTANT dt for the whole phase."""
    window: tuple[float, float, float] | None
    instant_period_s: float | None
    energy_period_s: float | None
    clock_on_table: float | None


def analyse(series: Series, start_s: float, stop_s: float, table: list[int] | None) -> PhaseStats:
    t = series.times()
    interior = (t >= start_s + SETTLE_S) & (t <= stop_s)
    energy = series.array("energy_mj")
    usage = series.array("usage_mw")
    instant = series.array("instant_mw")
    sm = series.array("sm_mhz")

    def mean(values: np.ndarray) -> float | None:
        v = values[interior & np.isfinite(values)]
        return float(np.mean(v)) if len(v) else None

    power_w = None
    ti, ei = t[interior], energy[interior]
    good = np.isfinite(ei)
    if good.sum() >= 2 and ti[good][-1] > ti[good][0]:
        power_w = float((ei[good][-1] - ei[good][0]) / 1000.0 / (ti[good][-1] - ti[good][0]))
    ratio = None
    ev = energy_vs_power(t, energy, instant)
    if ev is not None and ev[1] > 0:
        ratio = ev[0] / ev[1]
    reasons = series.array("reasons")
    bits = 0
    for r in reasons[interior & np.isfinite(reasons)]:
        bits |= int(r)
    on_table = None
    if table:
        v = sm[np.isfinite(sm)]
        on_table = float(np.mean(np.isin(v, table))) if len(v) else None
    temp = series.array("temp_c")
    temp_end = temp[interior & np.isfinite(temp)]
    usage_w = mean(usage)
    sm_mean = mean(sm)
    return PhaseStats(
        power_w=power_w,
        usage_w=None if usage_w is None else usage_w / 1000.0,
        sm_mhz=sm_mean,
        temp_end_c=float(temp_end[-1]) if len(temp_end) else None,
        reasons=bits,
        energy_ratio=ratio,
        window=estimate_average_window(t, instant, usage),
        instant_period_s=update_period_s(t, instant),
        energy_period_s=update_period_s(t, energy),
        clock_on_table=on_table,
    )


def settle_time_s(t: np.ndarray, values: np.ndarray) -> tuple[float, float]:
    """(final value, time after which the 0.5-s running mean stays within max(5 %, 30) of it);
    the final value is the mean of the second half."""
    ok = np.isfinite(values)
    t, values = t[ok], values[ok]
    if len(values) < 4:
        return math.nan, math.nan
    final = float(np.mean(values[len(values) // 2 :]))
    dt = float(np.median(np.diff(t)))
    k = max(round(0.5 / dt), 1)
    smooth = np.convolve(values, np.ones(k) / k, mode="full")[: len(values)]
    smooth[: k - 1] = values[: k - 1]
    off = np.abs(smooth - final) > max(0.05 * abs(final), 30.0)
    return final, float(t[np.nonzero(off)[0][-1]] - t[0]) if off.any() else 0.0


def fit_power_curve(
    clock_mhz: np.ndarray, power_w: np.ndarray, f_max: float
) -> tuple[float, float, float, float] | None:
    """Least-squares fit of P(f) = A + D·g(f), g(f) = (f/f_max)·v(f)² with the §6(b) v(f);
    returns (v_min, f_v_mhz, A_w, D_w) or None with fewer than 4 points."""
    ok = np.isfinite(clock_mhz) & np.isfinite(power_w)
    f, p = clock_mhz[ok], power_w[ok]
    if len(f) < 4:
        return None
    best: tuple[float, float, float, float, float] | None = None
    for v_min in np.arange(0.5, 1.0001, 0.01):
        for f_v in np.arange(0.3 * f_max, 0.96 * f_max, 15.0):
            x = np.clip((f - f_v) / (f_max - f_v), 0.0, 1.0)
            g = f / f_max * (v_min + (1.0 - v_min) * x) ** 2
            design = np.column_stack([np.ones_like(g), g])
            coef, *_ = np.linalg.lstsq(design, p, rcond=None)
            err = float(np.sum((design @ coef - p) ** 2))
            if best is None or err < best[4]:
                best = (float(v_min), float(f_v), float(coef[0]), float(coef[1]), err)
    assert best is not None
    return best[:4]


def fit_roofline_ratio(clock_mhz: np.ndarray, rate_per_s: np.ndarray, f_max: float) -> float | None:
    """t_cs/t_m of t(f) = [t_m^4 + (t_cs·f_max/f)^4]^(1/4) fitted to iteration rates (κ for a
    pure copy kernel, §6(c))."""
    ok = np.isfinite(clock_mhz) & np.isfinite(rate_per_s) & (rate_per_s > 0)
    f, t = clock_mhz[ok], 1.0 / rate_per_s[ok]
    if len(f) < 3:
        return None
    best: tuple[float, float] | None = None
    for ratio in np.arange(0.0, 3.0001, 0.01):
        shape = (1.0 + (ratio * f_max / f) ** 4) ** 0.25
        t_m = float(np.sum(t * shape) / np.sum(shape * shape))
        err = float(np.sum((t_m * shape - t) ** 2))
        if best is None or err < best[1]:
            best = (float(ratio), err)
    return None if best is None else best[0]


# ---------------------------------------------------------------------------------------------
# The check


@dataclass
class CheckResult:
    inventory: list[dict[str, Any]]
    phases: dict[str, list[PhaseStats]]
    rates: dict[str, dict[int, float]]
    notes: list[str]
    errors: dict[str, str]
    sweep: list[dict[str, Any]] | None = None
    backend: dict[str, Any] | None = None
    """The powerd_backend section: powerd's own NVML path next to the raw calls."""
    backend_checks: list[dict[str, Any]] = field(default_factory=list)
    call_latency_ms: dict[str, dict[str, float]] = field(default_factory=dict)
    """The measured run's NVML calls, timed (call_latency_ms)."""
    daemon: dict[str, Any] | None = None
    """The powerd_dry_run section: the daemon run with dry_run on these GPUs."""
    daemon_checks: list[dict[str, Any]] = field(default_factory=list)


def gpus_in_use(load: Load | None) -> list[int] | None:
    """NVML indices on which the load holds a CUDA context; None when unknown."""
    if isinstance(load, TorchLoad):
        return sorted(load.devices)
    if isinstance(load, SimNode):
        return list(range(load.plant.n_gpus))
    return None


def measure(
    nvml: Any,
    *,
    clock: Clock,
    load: Load | None,
    duration_s: float,
    interval_s: float,
    gpus: list[int] | None = None,
    sweep: bool = False,
    log: Callable[[str], None] = print,
    backend: BackendSection | None = None,
) -> CheckResult:
    """Run the whole procedure against one NVML (real or fake). Writes settings only with
    sweep=True, and then restores them before returning or raising. `backend` is compared
    at idle and halfway through the compute load."""
    nvml.nvmlInit()
    try:
        count = nvml.nvmlDeviceGetCount()
        indices = list(range(count)) if gpus is None else [i for i in gpus if i < count]
        handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in indices]
        inv = [inventory(nvml, h, i) for h, i in zip(handles, indices, strict=True)]
        notes: list[str] = []
        errors: dict[str, str] = {}
        phases: dict[str, list[PhaseStats]] = {}
        rates: dict[str, dict[int, float]] = {}
        log(f"{len(handles)} GPU(s): {', '.join(str(g['name']) for g in inv)}")
        if backend is not None:
            backend.check("idle", indices, None)
        log("sampling idle (5 s)")
        idle = sample(nvml, handles, clock, 5.0, interval_s, errors=errors)
        phases["idle"] = [
            analyse(s, 0.0, 5.0, g["supported_sm_clocks_mhz"])
            for s, g in zip(idle, inv, strict=True)
        ]
        if load is None:
            notes.append("no load ran: compute/memory figures are missing")
        else:
            load.open_context()
            log("sampling idle with a CUDA context (3 s)")
            ctx = sample(nvml, handles, clock, 3.0, interval_s, errors=errors)
            phases["ctx_idle"] = [
                analyse(s, 0.0, 3.0, g["supported_sm_clocks_mhz"])
                for s, g in zip(ctx, inv, strict=True)
            ]
            for kind in ("compute", "memory"):
                log(f"{kind} load ({duration_s:.0f} s)")
                out: dict[int, float] = {}
                stop_at = PRE_S + duration_s

                def finish(out: dict[int, float] = out, load: Load = load) -> None:
                    out.update(load.stop())

                events: list[tuple[float, Callable[[], None]]] = [
                    (PRE_S, functools.partial(load.start, kind)),
                    (stop_at, finish),
                ]
                if backend is not None and kind == "compute":
                    check = functools.partial(backend.check, kind, indices, gpus_in_use(load))
                    events.append((PRE_S + duration_s / 2, check))
                series = sample(
                    nvml, handles, clock, stop_at + POST_S, interval_s, events=events, errors=errors
                )
                phases[kind] = [
                    analyse(s, PRE_S, stop_at, g["supported_sm_clocks_mhz"])
                    for s, g in zip(series, inv, strict=True)
                ]
                rates[kind] = {
                    indices[k]: out.get(indices[k], math.nan) for k in range(len(indices))
                }
        result = CheckResult(inv, phases, rates, notes, errors)
        if sweep:
            if load is None:
                notes.append("--sweep needs a load; sweep skipped")
            else:
                result.sweep = run_sweep(nvml, handles, inv, clock, load, interval_s, log)
        return result
    finally:
        nvml.nvmlShutdown()


@contextlib.contextmanager
def _signals_raise(*signums: int) -> Iterator[None]:
    """`signums` (SIGTERM when none is named) raise KeyboardInterrupt like SIGINT, so
    `finally` restores or stops what it must on any of them."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = {s: signal.signal(s, handler) for s in signums or (signal.SIGTERM,)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextlib.contextmanager
def _signals_ignored() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def run_sweep(
    nvml: Any,
    handles: list[Any],
    inv: list[dict[str, Any]],
    clock: Clock,
    load: Load,
    interval_s: float,
    log: Callable[[str], None],
    hold_s: float = 5.0,
) -> list[dict[str, Any]]:
    """Step locked clocks and power limits on every GPU; restore every setting in `finally`."""
    originals = [nvml.nvmlDeviceGetPowerManagementLimit(h) for h in handles]
    rows: list[dict[str, Any]] = []
    table = inv[0]["supported_sm_clocks_mhz"] or []
    f_max = int(inv[0]["sm_clock_max_mhz"])
    fractions = (0.4, 0.55, 0.7, 0.8, 0.9, 1.0)
    picks = sorted({min(table, key=lambda c: abs(c - f_max * x)) for x in fractions})
    touched_clocks = touched_limits = False
    try:
        with _signals_raise():
            for f in picks:
                prev = [nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_SM) for h in handles]
                load.start("compute")
                clock.sleep(1.0)
                before = [nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_SM) for h in handles]
                t_set = clock.now()
                touched_clocks = True
                for h in handles:
                    nvml.nvmlDeviceSetGpuLockedClocks(h, f, f)
                dead = [math.nan] * len(handles)
                while clock.now() - t_set < 1.0 and any(math.isnan(d) for d in dead):
                    for k, h in enumerate(handles):
                        now_mhz = nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_SM)
                        if math.isnan(dead[k]) and now_mhz != before[k]:
                            dead[k] = clock.now() - t_set
                    clock.sleep(0.005)
                compute = _hold(nvml, handles, clock, hold_s, interval_s)
                compute_rate = load.stop()
                load.start("memory")
                memory = _hold(nvml, handles, clock, hold_s, interval_s)
                memory_rate = load.stop()
                for k in range(len(handles)):
                    rows.append(
                        {
                            "gpu": inv[k]["index"],
                            "kind": "clock",
                            "locked_mhz": f,
                            "clock_before_mhz": prev[k],
                            "dead_time_s": dead[k] if f != before[k] else math.nan,
                            "compute_power_w": compute[k][0],
                            "compute_sm_mhz": compute[k][1],
                            "compute_rate_per_s": compute_rate.get(inv[k]["index"], math.nan),
                            "memory_power_w": memory[k][0],
                            "memory_sm_mhz": memory[k][1],
                            "memory_rate_per_s": memory_rate.get(inv[k]["index"], math.nan),
                        }
                    )
                log(f"locked {f} MHz: compute {compute[0][0]:.0f} W at {compute[0][1]:.0f} MHz")
            for h in handles:
                nvml.nvmlDeviceResetGpuLockedClocks(h)
            lo = [g["power_limit_constraints_mw"][0] for g in inv]
            load.start("compute")
            for step, frac in enumerate((1.0, 0.45, 1.0)):
                touched_limits = True
                for k, h in enumerate(handles):
                    target = max(lo[k], int(originals[k] * frac))
                    nvml.nvmlDeviceSetPowerManagementLimit(h, target)
                series = sample(nvml, handles, clock, hold_s, min(interval_s, 0.02))
                for k, s in enumerate(series):
                    final, settle = settle_time_s(s.times(), s.array("sm_mhz"))
                    rows.append(
                        {
                            "gpu": inv[k]["index"],
                            "kind": "power_limit",
                            "step": step,
                            "power_limit_mw": max(lo[k], int(originals[k] * frac)),
                            "settled_sm_mhz": final,
                            "settle_s": settle,
                        }
                    )
            load.stop()
    finally:
        with _signals_ignored():
            with contextlib.suppress(Exception):
                load.stop()
            for k, h in enumerate(handles):
                # NVML cannot read a lock back, so a lock set before the sweep ends up reset.
                if touched_clocks:
                    try:
                        nvml.nvmlDeviceResetGpuLockedClocks(h)
                    except nvml.NVMLError as exc:
                        log(f"GPU {inv[k]['index']}: could not reset locked clocks: {exc}")
                if touched_limits:
                    try:
                        nvml.nvmlDeviceSetPowerManagementLimit(h, originals[k])
                    except nvml.NVMLError as exc:
                        log(f"GPU {inv[k]['index']}: could not restore the power limit: {exc}")
    return rows


def _hold(
    nvml: Any, handles: list[Any], clock: Clock, hold_s: float, interval_s: float
) -> list[tuple[float, float]]:
    """(mean power from the energy counter, mean SM clock) per GPU over hold_s."""
    series = sample(nvml, handles, clock, hold_s, interval_s)
    out = []
    for s in series:
        e, t = s.array("energy_mj"), s.times()
        ok = np.isfinite(e)
        power = (
            (e[ok][-1] - e[ok][0]) / 1000.0 / (t[ok][-1] - t[ok][0]) if ok.sum() > 1 else math.nan
        )
        sm = s.array("sm_mhz")
        out.append((float(power), float(np.nanmean(sm)) if np.isfinite(sm).any() else math.nan))
    return out


# ---------------------------------------------------------------------------------------------
# powerd's own NVML path (NvmlBackend, gpumap) next to the raw calls

CLOCK_EVENT_REASON_SYMBOLS = (
    "nvmlDeviceGetCurrentClocksEventReasons",
    "nvmlDeviceGetCurrentClocksThrottleReasons",
)
"""NvmlBackend's order: drivers before R535 have only the older name."""
PROCESS_SYMBOLS = (
    "nvmlDeviceGetComputeRunningProcesses",
    "nvmlDeviceGetComputeRunningProcesses_v2",
)
"""NvmlBackend's order: the binding's first function calls the C symbol _v3, which R470 and
535.98 lack."""
_FALLBACK_ERRORS = frozenset(
    {
        "absent from the binding",
        "NVMLError_NotSupported",
        "NVMLError_FunctionNotFound",
        "NVMLLibraryMismatchError",
    }
)
"""Failures after which NvmlBackend tries the next symbol of a list."""
PROC_PID_INIT_INO = 0xEFFFFFFC
"""Inode of the initial PID namespace (include/linux/proc_ns.h)."""
READ_ATTEMPTS = 3
"""Bracketed reads per GPU and phase before a disagreement counts: a value published between
two reads disagrees once, a defect every time."""
READ_COST_READS = 10
"""Reads of one GPU timed per phase for powerd_read_cost."""
READ_BUDGET_S = 0.05
"""The longest one GPU's read may take: eight GPUs read one after another then leave more
than half of the default 1-s tick to the servers' scrapes and the kernel (a real H200's read
takes 3-7 ms, its energy counter nearly all of it)."""
POWER_TOLERANCE = 0.01
"""Relative slack for GetPowerUsage, which a driver may compute afresh on every call."""
STRUCT_32_BYTE_DRIVERS = ((535, 43), (535, 86))
"""Drivers whose nvmlProcessInfo_t is 32 bytes, where nvidia-ml-py reads 24-byte entries."""


def _try_call(nvml: Any, name: str, *args: Any) -> tuple[Any, str | None]:
    """(nvml.<name>(*args), None), or (None, why): the error class, or absence."""
    fn = getattr(nvml, name, None)
    if fn is None:
        return None, "absent from the binding"
    mismatch = getattr(nvml, "NVMLLibraryMismatchError", None)
    caught: tuple[type[BaseException], ...] = (nvml.NVMLError,) + (
        (mismatch,) if isinstance(mismatch, type) else ()
    )
    try:
        return fn(*args), None
    except caught as exc:
        return None, type(exc).__name__


def _raw(nvml: Any, errors: dict[str, str], name: str, *args: Any) -> Any:
    """nvml.<name>(*args), or None with why recorded (first one per name)."""
    value, why = _try_call(nvml, name, *args)
    if why is not None:
        errors.setdefault(name, why)
    return value


def _raw_first(
    nvml: Any, errors: dict[str, str], names: tuple[str, ...], *args: Any
) -> tuple[str | None, Any]:
    """(symbol, value) of the first of `names` this driver provides, tried in NvmlBackend's
    order; (symbol, None) when it fails otherwise, (None, None) when none is provided."""
    for name in names:
        value, why = _try_call(nvml, name, *args)
        if why is None:
            return name, value
        errors.setdefault(name, why)
        if why not in _FALLBACK_ERRORS:
            return name, None
    return None, None


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


def in_host_pid_namespace() -> bool | None:
    """Whether this process sees host PIDs, which NVML reports; None when unknown."""
    try:
        return os.readlink("/proc/self/ns/pid") == f"pid:[{PROC_PID_INIT_INO}]"
    except OSError:
        return None


def nvml_versions(nvml: Any, errors: dict[str, str]) -> dict[str, Any]:
    """Driver, NVML and CUDA driver versions as NVML states them, and the binding's version."""
    cuda = _raw(nvml, errors, "nvmlSystemGetCudaDriverVersion_v2")
    if cuda is None:
        cuda = _raw(nvml, errors, "nvmlSystemGetCudaDriverVersion")
    try:
        binding: str | None = importlib.metadata.version("nvidia-ml-py")
    except importlib.metadata.PackageNotFoundError:
        binding = None
    return {
        "driver": _text(_raw(nvml, errors, "nvmlSystemGetDriverVersion")),
        "nvml": _text(_raw(nvml, errors, "nvmlSystemGetNVMLVersion")),
        "cuda_driver": None if cuda is None else f"{int(cuda) // 1000}.{int(cuda) % 1000 // 10}",
        "nvidia_ml_py": binding,
    }


def driver_notes(driver: str | None) -> list[str]:
    """Known defects of this driver that the backend has to survive."""
    try:
        major, minor = (int(x) for x in str(driver).split(".")[:2])
    except ValueError:
        return []
    low, high = STRUCT_32_BYTE_DRIVERS
    if low <= (major, minor) <= high:
        return [
            f"driver {driver}: nvmlProcessInfo_t is 32 bytes here and nvidia-ml-py reads 24, "
            "so every process entry after the first is garbage"
        ]
    return []


def _raw_reading(nvml: Any, handle: Any, errors: dict[str, str]) -> dict[str, Any]:
    """The raw calls behind each GpuReading field, under the field's name."""

    def c(name: str, *args: Any) -> Any:
        return _raw(nvml, errors, name, handle, *args)

    return {
        "power_mw": c("nvmlDeviceGetPowerUsage"),
        "energy_mj": c("nvmlDeviceGetTotalEnergyConsumption"),
        "sm_clock_mhz": c("nvmlDeviceGetClockInfo", nvml.NVML_CLOCK_SM),
        "power_limit_mw": c("nvmlDeviceGetPowerManagementLimit"),
        "enforced_power_limit_mw": c("nvmlDeviceGetEnforcedPowerLimit"),
        "clock_event_reasons": _raw_first(nvml, errors, CLOCK_EVENT_REASON_SYMBOLS, handle)[1],
        "temperature_c": _temperature(c, nvml),
    }


def agreement(field_name: str, raw: list[Any], powerd: Any) -> bool | None:
    """Whether powerd's value matches the raw ones read around it: within their range (power:
    1 % wider), one of them for the reason bits. None when only powerd has a value."""
    known = [int(v) for v in raw if v is not None]
    if powerd is None:
        return not known
    if not known:
        return None
    if field_name == "clock_event_reasons":
        return int(powerd) in known
    slack = POWER_TOLERANCE * max(known) if field_name == "power_mw" else 0.0
    return min(known) - slack <= int(powerd) <= max(known) + slack


def compare_reading(
    backend: Any, nvml: Any, uuid: str, handle: Any, errors: dict[str, str]
) -> dict[str, Any]:
    """backend.read(uuid), as a daemon tick does, between two raw readings; up to
    READ_ATTEMPTS times until no field disagrees."""
    attempts = 0
    while True:
        attempts += 1
        before = _raw_reading(nvml, handle, errors)
        reading = backend.read(uuid)
        after = _raw_reading(nvml, handle, errors)
        fields: dict[str, dict[str, Any]] = {}
        for name in before:
            raw = [before[name], after[name]]
            value = getattr(reading, name)
            fields[name] = {"raw": raw, "powerd": value, "ok": agreement(name, raw, value)}
        if attempts >= READ_ATTEMPTS or not any(f["ok"] is False for f in fields.values()):
            return {"attempts": attempts, "fields": fields}


def compare_device(info: Any, nvml: Any, handle: Any, errors: dict[str, str]) -> dict[str, Any]:
    """GpuInfo from backend.devices() against the raw calls it is built from."""

    def c(name: str, *args: Any) -> Any:
        return _raw(nvml, errors, name, handle, *args)

    constraints = c("nvmlDeviceGetPowerManagementLimitConstraints")
    memory_mhz = c("nvmlDeviceGetSupportedMemoryClocks")
    listed = (
        c("nvmlDeviceGetSupportedGraphicsClocks", max(int(v) for v in memory_mhz))
        if memory_mhz
        else None
    )
    clocks = sorted({int(v) for v in listed}) if listed else None
    raw: dict[str, Any] = {
        "name": _text(c("nvmlDeviceGetName")),
        "power_limit_constraints_mw": None
        if constraints is None
        else [int(v) for v in constraints],
        "power_limit_default_mw": c("nvmlDeviceGetPowerManagementDefaultLimit"),
        "supported_sm_clocks_count": None if clocks is None else len(clocks),
        "supported_sm_clocks_range_mhz": None if clocks is None else [clocks[0], clocks[-1]],
    }
    ours: dict[str, Any] = {
        "name": info.name,
        "power_limit_constraints_mw": [info.power_limit_min_mw, info.power_limit_max_mw],
        "power_limit_default_mw": info.power_limit_default_mw,
        "supported_sm_clocks_count": len(info.supported_sm_clocks_mhz),
        "supported_sm_clocks_range_mhz": [
            info.supported_sm_clocks_mhz[0],
            info.supported_sm_clocks_mhz[-1],
        ],
    }
    return {
        name: {
            "raw": raw[name],
            "powerd": ours[name],
            "ok": None if raw[name] is None else raw[name] == ours[name],
        }
        for name in raw
    }


def _pids(processes: Any) -> list[int] | None:
    return None if processes is None else [int(p.pid) for p in processes]


def compare_processes(
    backend: Any, nvml: Any, uuid: str, handle: Any, errors: dict[str, str], pid_max: int
) -> dict[str, Any]:
    """backend.compute_pids(uuid), the list gpumap intersects with a server's process tree,
    between two raw listings. A raw entry of PID 0 or at or above pid_max is one read with
    another struct layout than the driver's; powerd drops it, so the counts differ."""
    symbol, before = _raw_first(nvml, errors, PROCESS_SYMBOLS, handle)
    powerd = sorted(backend.compute_pids(uuid))
    _, after = _raw_first(nvml, errors, PROCESS_SYMBOLS, handle)
    listings = [p for p in (_pids(before), _pids(after)) if p is not None]
    raw = next((p for p in listings if set(p) == set(powerd)), listings[0] if listings else None)
    invalid = [] if raw is None else [p for p in raw if not 0 < p < pid_max]
    ok: bool | None
    if raw is None:
        ok = None if not powerd else False
        detail = f"NVML lists no processes here ({errors.get(PROCESS_SYMBOLS[0])}); powerd {powerd}"
    else:
        ok = not invalid and set(raw) == set(powerd)
        detail = f"raw {len(raw)} {raw}, powerd {len(powerd)} {powerd}"
        if invalid:
            detail += (
                f"; PIDs {invalid} are 0 or at least pid_max {pid_max}: the process struct "
                "of this driver is not the binding's"
            )
        elif len(raw) != len(powerd) and set(raw) == set(powerd):
            detail += "; the raw list repeats a PID"
    return {
        "raw_symbol": symbol,
        "raw_pids": raw,
        "powerd_pids": powerd,
        "invalid_raw_pids": invalid,
        "count_raw": None if raw is None else len(raw),
        "count_powerd": len(powerd),
        "not_in_proc": [
            p for p in (raw or []) if 0 < p < pid_max and not Path(f"/proc/{p}").exists()
        ],
        "ok": ok,
        "detail": detail,
    }


class BackendSection:
    """powerd's NvmlBackend and GPU-process discovery, read next to the raw calls. Read-only.

    Opened as runtime.open_backend opens it, then only read: devices() once, and per phase
    one read() per GPU, as a daemon tick does, and compute_pids(), the list gpumap uses."""

    def __init__(
        self,
        nvml: Any,
        *,
        pid_max: int,
        own_pid: int | None = None,
        host_pid_namespace: bool | None = None,
    ) -> None:
        self.nvml = nvml
        self.own_pid = os.getpid() if own_pid is None else own_pid
        self.pid_max = pid_max
        self.host_pid_namespace = (
            in_host_pid_namespace() if host_pid_namespace is None else host_pid_namespace
        )
        self.errors: dict[str, str] = {}
        self.checks: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.versions: dict[str, Any] = {}
        self.gpus: dict[int, dict[str, Any]] = {}
        self.discovery: dict[str, Any] = {}
        self.open_error: str | None = None
        self.symbols: dict[str, Any] = {}
        self.error_counts: dict[str, int] = {}
        self._backend: Any = None
        self._discover: Callable[..., list[str]] | None = None
        self._infos: dict[int, Any] = {}
        self._probe_handle: Any = None

    @classmethod
    def create(cls, nvml: Any, **kwargs: Any) -> tuple[BackendSection | None, str]:
        """An opened section, or None and why when powerd is not importable."""
        try:
            from powerd.gpu.nvml import NvmlBackend, pid_max
            from powerd.sources.gpumap import discover_server_gpus
        except ImportError as exc:
            return None, f"powerd_backend skipped: powerd is not importable ({exc})"
        kwargs.setdefault("pid_max", pid_max())  # the bound powerd's backend reads by
        section = cls(nvml, **kwargs)
        section._discover = discover_server_gpus
        try:
            # As runtime.open_backend: NvmlBackend() over the installed pynvml, else the fake.
            section._backend = NvmlBackend(None if isinstance(nvml, ModuleType) else nvml)
            section.versions = nvml_versions(nvml, section.errors)
            section.notes += driver_notes(section.versions["driver"])
            section._infos = {info.index: info for info in section._backend.devices()}
        except Exception as exc:  # a backend that cannot open is the finding
            section.open_error = f"{type(exc).__name__}: {exc}"
            section._add("powerd_backend_open", None, False, section.open_error)
            section.close()
            return section, ""
        section._add(
            "powerd_backend_open", None, True, f"{len(section._infos)} GPU(s) from devices()"
        )
        return section, ""

    def _add(self, name: str, gpu: int | None, ok: bool | None, detail: str) -> None:
        self.checks.append({"check": name, "gpu": gpu, "ok": ok, "detail": detail})

    def check(self, phase: str, indices: list[int], in_use: list[int] | None) -> None:
        """Compare reads and process lists of the GPUs `indices` (NVML must be initialised);
        with `in_use`, the GPUs this process holds a context on, also look for its PID."""
        if self._backend is None:
            return
        try:
            self._check(phase, indices, in_use)
        except Exception as exc:  # a crash in powerd's path is the finding, not the end
            self._add(f"powerd_backend_{phase}", None, False, f"{type(exc).__name__}: {exc}")

    def _check(self, phase: str, indices: list[int], in_use: list[int] | None) -> None:
        nvml, errors = self.nvml, self.errors
        for index in indices:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            if self._probe_handle is None:
                self._probe_handle = handle
            gpu = self.gpus.setdefault(index, {"index": index, "phases": {}})
            info = self._infos.get(index)
            if info is None:
                self._add(
                    "powerd_device_info", index, False, "powerd's devices() left this GPU out"
                )
                continue
            gpu["uuid"] = info.uuid
            if "device" not in gpu:
                gpu["device"] = compare_device(info, nvml, handle, errors)
                self._add_fields("powerd_device_info", index, gpu["device"])
            reads = compare_reading(self._backend, nvml, info.uuid, handle, errors)
            self._add_fields(f"powerd_read_{phase}", index, reads["fields"], reads["attempts"])
            processes = compare_processes(
                self._backend, nvml, info.uuid, handle, errors, self.pid_max
            )
            self._add(f"powerd_processes_{phase}", index, processes["ok"], processes["detail"])
            cost = self._read_cost(info.uuid)
            self._add(
                f"powerd_read_cost_{phase}",
                index,
                cost["wall_max_ms"] <= READ_BUDGET_S * 1000.0,
                f"{cost['reads']} reads: wall median {cost['wall_median_ms']:.2f} ms, max "
                f"{cost['wall_max_ms']:.2f} ms; CPU mean {cost['cpu_mean_ms']:.2f} ms, "
                f"{cost['cpu_mean_ms'] / 10.0:.2f} % of one core at a 1-s tick",
            )
            gpu["phases"][phase] = {"reads": reads, "processes": processes, "read_cost": cost}
        if in_use is not None:
            self._find_own_pid(phase, [i for i in indices if i in in_use])

    def _read_cost(self, uuid: str) -> dict[str, Any]:
        """Wall and CPU time of READ_COST_READS back-to-back reads of one GPU, as a tick makes
        them: what powerd's NVML path costs the node per GPU and tick (the CPU of this thread
        and of the GPU's reader thread, where powerd makes the calls)."""
        wall_ms, cpu_ms = [], []
        reader_cpu_s: dict[str, float] = getattr(self._backend, "read_cpu_s", {})
        for _ in range(READ_COST_READS):
            started_s, started_cpu_s = time.perf_counter(), time.thread_time()
            self._backend.read(uuid)
            wall_ms.append(1000.0 * (time.perf_counter() - started_s))
            spent_s = time.thread_time() - started_cpu_s + reader_cpu_s.get(uuid, 0.0)
            cpu_ms.append(1000.0 * spent_s)
        return {
            "reads": READ_COST_READS,
            "wall_median_ms": float(np.median(wall_ms)),
            "wall_max_ms": float(max(wall_ms)),
            "cpu_median_ms": float(np.median(cpu_ms)),
            "cpu_mean_ms": float(np.mean(cpu_ms)),
        }

    def _add_fields(
        self, name: str, index: int, fields: dict[str, dict[str, Any]], attempts: int = 1
    ) -> None:
        bad = [k for k, f in fields.items() if f["ok"] is False]
        if bad:
            detail = "; ".join(
                f"{k}: raw {fields[k]['raw']} powerd {fields[k]['powerd']}" for k in bad
            )
            self._add(name, index, False, f"{detail} (in each of {attempts} reads)")
            return
        skipped = [k for k, f in fields.items() if f["ok"] is None]
        detail = f"{len(fields) - len(skipped)} fields agree"
        if skipped:
            detail += f"; no raw value for {', '.join(skipped)}"
        self._add(name, index, True, detail)

    def _find_own_pid(self, phase: str, in_use: list[int]) -> None:
        """This process holds a context on `in_use`: powerd's list, and gpumap's discovery
        rooted at this process, should both find it there."""
        assert self._discover is not None
        infos = self._infos
        try:
            found = self._discover(
                "http://localhost/",
                self._backend.compute_pids,
                [info.uuid for info in infos.values()],
                gpu_indices={i: info.uuid for i, info in infos.items()},
                listen_pid=self.own_pid,
            )
            error = None
        except Exception as exc:  # gpumap's SourceError: nothing of this process found
            found, error = [], str(exc)
        discovered = [i for i, info in infos.items() if info.uuid in found]
        self.discovery[phase] = {"gpus": discovered, "error": error}
        for index in in_use:
            entry = self.gpus.get(index, {}).get("phases", {}).get(phase)
            if entry is None:
                continue
            listed = self.own_pid in entry["processes"]["powerd_pids"]
            ok: bool | None = listed and index in discovered
            detail = (
                f"pid {self.own_pid} {'in' if listed else 'not in'} compute_pids; "
                f"discovery found GPUs {discovered}" + (f" ({error})" if error else "")
            )
            if not listed and self.host_pid_namespace is not True:
                ok = None
                detail += "; NVML reports host PIDs and this process is in another PID namespace"
            entry["own_pid"] = {"pid": self.own_pid, "listed": listed, "ok": ok}
            self._add("powerd_finds_own_pid", index, ok, detail)

    def close(self) -> None:
        """Record the symbols the backend used and the errors it counted, then close it (no
        GPU setting changes); a second call does nothing."""
        backend, self._backend = self._backend, None
        if backend is None:
            return
        self.symbols = self._symbols(backend)
        self.error_counts = {f"{op}/{kind}": n for (op, kind), n in backend.error_counts.items()}
        backend.close()

    def _symbols(self, backend: Any) -> dict[str, Any]:
        """Per symbol list: what each symbol answers on the first GPU read, and the one the
        backend settled on (its symbols_used(), else the first symbol that answered)."""
        out: dict[str, Any] = {}
        symbols_used = getattr(backend, "symbols_used", None)
        chosen = symbols_used() if callable(symbols_used) else {}
        for group, names in (
            ("clock_event_reasons", CLOCK_EVENT_REASON_SYMBOLS),
            ("compute_processes", PROCESS_SYMBOLS),
        ):
            probed: dict[str, str] = {}
            if self._probe_handle is not None:
                for name in names:
                    probed[name] = _try_call(self.nvml, name, self._probe_handle)[1] or "ok"
            used = next((v for k, v in chosen.items() if k in names), None)
            source = "backend"
            if used is None:
                used = next((n for n in names if probed.get(n) == "ok"), None)
                source = "probe"
            out[group] = {"probed": probed, "used": used, "used_from": source}
        return out

    def report(self) -> dict[str, Any]:
        """The section for summary.json (its checks go with the tool's other checks)."""
        return {
            "open_error": self.open_error,
            "versions": self.versions,
            "symbols": self.symbols,
            "pid_max": self.pid_max,
            "own_pid": self.own_pid,
            "host_pid_namespace": self.host_pid_namespace,
            "gpus": [self.gpus[i] for i in sorted(self.gpus)],
            "discovery": self.discovery,
            "backend_error_counts": self.error_counts,
            "raw_errors": self.errors,
            "notes": self.notes,
        }

    def lines(self) -> list[str]:
        """A short human-readable account; the checks are printed with the others."""
        v = self.versions
        out = [
            f"powerd backend: driver {v.get('driver')}, NVML {v.get('nvml')}, "
            f"CUDA {v.get('cuda_driver')}, nvidia-ml-py {v.get('nvidia_ml_py')}"
        ]
        if self.open_error:
            out.append(f"  NvmlBackend did not open: {self.open_error}")
        for group, s in self.symbols.items():
            probed = ", ".join(f"{name} {why}" for name, why in s["probed"].items())
            out.append(f"  {group}: used {s['used']} (per the {s['used_from']}); {probed}")
        ns = {True: "host", False: "private", None: "unknown"}[self.host_pid_namespace]
        out.append(f"  pid {self.own_pid}, pid_max {self.pid_max}, PID namespace {ns}")
        bad = sum(1 for c in self.checks if c["ok"] is False)
        out.append(f"  {len(self.checks)} checks, {bad} failed")
        out += [f"  note: {n}" for n in self.notes]
        return out


# ---------------------------------------------------------------------------------------------
# powerd itself: a dry run of the daemon on these GPUs

DAEMON_READY_S = 240.0
"""The longest the daemon may take to report ready: on a cold numba cache it compiles its
kernels first (about 20 s)."""
DAEMON_STOP_S = 60.0
"""The longest the daemon may take to exit after SIGTERM (final_scrape_wait_s is 0 here)."""
DAEMON_INTERVAL_S = 1.0
"""The daemon's tick here, as the default config's."""
DAEMON_TICK_SHARE = 0.8
"""The least share of the window's ticks the daemon must have made."""
DAEMON_SCRAPE_S = 2.0
"""How often the daemon's /metrics is read while it runs."""
DAEMON_POWER_TOLERANCE = 0.10
"""Largest median relative gap between the power powerd exports and GetPowerUsage read beside
it: the export is the last tick's reading, up to one tick old."""
_READY_LINE = re.compile(r"powerd \S+: .*\bmetrics on (\S+):(\d+)")
_PROBLEM_LINE = re.compile(r" (WARNING|ERROR|CRITICAL) |^Traceback|^powerd: ")
_SERVICE_VARIABLES = (
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "INVOCATION_ID",
    "JOURNAL_STREAM",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
)
"""What systemd gives a unit's processes: the daemon would log in journald's form, notify and
feed a watchdog that are the tool's; it runs as the tool's plain child instead."""
_CHILD = """\
import ctypes, os, signal, sys
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
except (AttributeError, OSError):
    pass
if os.getppid() != int(sys.argv[1]):
    sys.exit(70)  # the tool is gone already
sys.path[:0] = [sys.argv[2], sys.argv[3]]
import pynvml
from gpu_check import read_only
refused = []
try:
    with read_only(pynvml, refused):
        from powerd.cli import main
        code = main(sys.argv[5:])
finally:
    with open(sys.argv[4], "w", encoding="utf-8") as out:
        out.write("".join(name + "\\n" for name in refused))
sys.exit(code)
"""
"""The daemon's process: stopped with the tool whatever ends it (the kernel sends SIGTERM when
the tool dies), running the powerd the tool imported, under the tool's read-only guard."""


def _exposition(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Each metric's samples in an exposition, parsed once: name -> [(labels, value)]."""
    from prometheus_client.parser import text_string_to_metric_families

    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((dict(sample.labels), float(sample.value)))
    return samples


def _total(samples: dict[str, list[tuple[dict[str, str], float]]], name: str) -> float:
    return sum(value for _, value in samples.get(name, []))


def _settings(nvml: Any, handle: Any, errors: dict[str, str]) -> dict[str, Any]:
    """The settings an operator would notice changed that NVML reads back (a clock lock it
    cannot: the daemon's journal and the guard stand for it)."""

    def c(name: str, *args: Any) -> Any:
        return _raw(nvml, errors, name, handle, *args)

    return {
        "power_limit_mw": c("nvmlDeviceGetPowerManagementLimit"),
        "enforced_power_limit_mw": c("nvmlDeviceGetEnforcedPowerLimit"),
        "applications_clock_mhz": c("nvmlDeviceGetApplicationsClock", nvml.NVML_CLOCK_GRAPHICS),
        "persistence_mode": c("nvmlDeviceGetPersistenceMode"),
        "compute_mode": c("nvmlDeviceGetComputeMode"),
    }


class DaemonDryRun:
    """`powerd run` with `dry_run: true` on these GPUs, as an operator would start it first.

    A simulated vLLM server per GPU serves /metrics from this process; the daemon reads the
    GPUs through NVML as in production, decides, exports, and writes nothing: it runs under
    the tool's read-only guard, and is stopped with the tool however the tool ends. The load
    (if any) runs for the first half. Compared: the power it exports with GetPowerUsage read
    beside it; the settings `_settings` reads, before and after; its journal, which holds
    every setting powerd makes before it makes it. Measured: the time to ready, its ticks, CPU
    share and peak RSS. `backend="sim"` runs it on simulated GPUs instead (for the tests:
    nothing real to compare with)."""

    def __init__(self, out_dir: Path, *, seconds: float, backend: str = "nvml") -> None:
        self.out_dir = out_dir
        self.seconds = seconds
        self.backend = backend
        self.checks: list[dict[str, Any]] = []
        self.report: dict[str, Any] = {"backend": backend, "seconds": seconds}
        self.errors: dict[str, str] = {}
        self.state_dir = out_dir / "daemon-state"
        self.log_path = out_dir / "daemon.log"
        self.refused_path = out_dir / "daemon-refused-writes.txt"
        self.scrape_problem: str | None = None
        """Why the last scrape that failed did."""

    def _add(self, name: str, gpu: int | None, ok: bool | None, detail: str) -> None:
        self.checks.append({"check": name, "gpu": gpu, "ok": ok, "detail": detail})

    def run(
        self, nvml: Any, inv: list[dict[str, Any]], load: Load | None, log: Callable[[str], None]
    ) -> None:
        """Run it; a failure of any step is a failed check, never an exception (SIGTERM and
        SIGHUP stop the daemon and end the tool as Ctrl-C does)."""
        try:
            import powerd
        except ImportError as exc:
            self.report["skipped"] = f"powerd is not importable ({exc})"
            return
        try:
            import psutil  # noqa: F401  (the phase measures the daemon with it)

            from powerd import runtime  # noqa: F401  (the daemon's own imports)
            from powerd.config import SimConfig
            from powerd.sim.node import RealTimeDriver, serve_node
            from powerd.sim.plant import find_gpu_profile
            from powerd.simulation import build_node
        except ImportError as exc:
            self._add("daemon_dry_run", None, False, f"powerd cannot run here: {exc}")
            return
        self.report["powerd"] = str(Path(powerd.__file__).resolve().parent)
        profile = find_gpu_profile(str(inv[0]["name"]))
        sim = SimConfig(
            gpu_model=profile.name if profile is not None else "h100-sxm",
            gpus=len(inv),
            tp=1,
            trace="diurnal",
            peak_load=0.5,
        )
        with _signals_raise(signal.SIGTERM, signal.SIGHUP):
            node = build_node(sim)
            node.advance(0.1)  # compile the node's kernels before its servers answer
            endpoints = serve_node(node)
            driver = RealTimeDriver(node)
            driver.start()
            try:
                self._run(nvml, inv, load, [e.url for e in endpoints], log)
            finally:
                driver.stop()
                for endpoint in endpoints:
                    endpoint.stop()

    def _config(self, inv: list[dict[str, Any]], urls: list[str]) -> dict[str, Any]:
        servers = [
            {
                "name": f"sim-gpu{g['index']}",
                "url": url,
                "kind": "vllm",
                "gpus": [g["index"] if self.backend == "nvml" else k],
            }
            for k, (g, url) in enumerate(zip(inv, urls, strict=True))
        ]
        config: dict[str, Any] = {
            "interval_s": DAEMON_INTERVAL_S,
            "mode": "efficiency",
            "dry_run": True,
            "state_dir": str(self.state_dir),
            "gpu_backend": self.backend,
            "metrics": {"listen_address": "127.0.0.1", "port": 0, "final_scrape_wait_s": 0},
            "servers": servers,
        }
        if self.backend == "sim":
            config["sim"] = {"gpus": len(inv), "tp": 1}
        return config

    def _start(self, config_path: Path) -> subprocess.Popen[bytes]:
        env = {k: v for k, v in os.environ.items() if k not in _SERVICE_VARIABLES}
        tools = str(Path(__file__).resolve().parent)
        powerd_root = str(Path(self.report["powerd"]).parent)
        with open(self.log_path, "w", encoding="utf-8") as log_file:
            return subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    _CHILD,
                    str(os.getpid()),
                    powerd_root,
                    tools,
                    str(self.refused_path),
                    "--log-level",
                    "info",
                    "run",
                    "--config",
                    str(config_path),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # the terminal's Ctrl-C is the tool's to pass on
            )

    def _run(
        self,
        nvml: Any,
        inv: list[dict[str, Any]],
        load: Load | None,
        urls: list[str],
        log: Callable[[str], None],
    ) -> None:
        import shutil

        import yaml

        self.out_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.state_dir, ignore_errors=True)
        self.refused_path.unlink(missing_ok=True)
        config_path = self.out_dir / "daemon.yaml"
        config_path.write_text(yaml.safe_dump(self._config(inv, urls)), encoding="utf-8")
        nvml.nvmlInit()
        try:
            handles = {g["index"]: nvml.nvmlDeviceGetHandleByIndex(g["index"]) for g in inv}
            before = {i: _settings(nvml, h, self.errors) for i, h in handles.items()}
            log(f"powerd dry run on {len(inv)} GPU(s) ({self.seconds:.0f} s)")
            daemon = self._start(config_path)
            try:
                url = self._wait_ready(daemon, time.monotonic())
                if url is not None:
                    self._watch(nvml, handles, load, daemon, url)
            except Exception as exc:  # the finding; the settings are still compared below
                self._add("daemon_dry_run", None, False, f"{type(exc).__name__}: {exc}")
            finally:
                self._stop(daemon)
            after = {i: _settings(nvml, h, self.errors) for i, h in handles.items()}
        finally:
            nvml.nvmlShutdown()
        self._compare(before, after)
        self._after_exit()

    def _log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def _tail(self) -> str:
        return " | ".join(self._log_text().strip().splitlines()[-3:])

    def _wait_ready(self, daemon: subprocess.Popen[bytes], started_s: float) -> str | None:
        """The daemon's metrics URL once its ready line is logged; None (a failed check) when it
        exits or takes longer than DAEMON_READY_S."""
        while time.monotonic() - started_s < DAEMON_READY_S:
            match = _READY_LINE.search(self._log_text())
            if match:
                ready_s = time.monotonic() - started_s
                self.report["ready_after_s"] = ready_s
                self._add(
                    "daemon_ready", None, True, f"ready after {ready_s:.1f} s: {match.group(0)}"
                )
                return f"http://{match.group(1)}:{match.group(2)}/metrics"
            if daemon.poll() is not None:
                self._add(
                    "daemon_ready", None, False, f"exited with {daemon.returncode}: {self._tail()}"
                )
                return None
            time.sleep(0.25)
        self._add("daemon_ready", None, False, f"no ready line in {DAEMON_READY_S:.0f} s")
        return None

    def _scrape(self, url: str) -> str | None:
        """The daemon's exposition, or None when it does not answer whole (no proxy: the
        daemon is on this host, whatever http_proxy the environment names)."""
        from powerd.sources import SourceError
        from powerd.sources.fetch import http_fetch

        try:
            answer = http_fetch(url, timeout_s=5.0)
        except SourceError as exc:
            self.scrape_problem = str(exc)
            return None
        if answer.status != 200:
            self.scrape_problem = f"HTTP {answer.status} from {url}"
            return None
        return answer.body.decode("utf-8", errors="replace")

    def _watch(
        self,
        nvml: Any,
        handles: dict[int, Any],
        load: Load | None,
        daemon: subprocess.Popen[bytes],
        url: str,
    ) -> None:
        """Scrape the daemon every DAEMON_SCRAPE_S for `seconds`, the load on for the first
        half; pair its power with NVML's; measure its ticks, CPU and RSS."""
        import psutil

        process = psutil.Process(daemon.pid)
        first = _exposition(self._scrape(url) or "")
        cpu_start_s, wall_start_s = sum(process.cpu_times()[:2]), time.monotonic()
        cpu_end_s = cpu_start_s
        pairs: dict[int, list[tuple[float, float]]] = {i: [] for i in handles}
        rss_mib: list[float] = []
        scrapes = failed = 0
        exited = None
        loaded = load is not None
        if load is not None:
            load.start("compute")
        try:
            while time.monotonic() - wall_start_s < self.seconds:
                time.sleep(DAEMON_SCRAPE_S)
                if loaded and time.monotonic() - wall_start_s >= self.seconds / 2:
                    assert load is not None
                    load.stop()
                    loaded = False
                if daemon.poll() is not None:
                    exited = time.monotonic() - wall_start_s
                    break
                cpu_end_s = sum(process.cpu_times()[:2])
                rss_mib.append(process.memory_info().rss / 2**20)
                scrapes += 1
                text = self._scrape(url)
                if text is None:
                    failed += 1
                    continue
                for labels, watts in _exposition(text).get("powerd_gpu_power_watts", []):
                    index = int(labels.get("gpu", "-1"))
                    if index in handles:
                        mw = _raw(nvml, self.errors, "nvmlDeviceGetPowerUsage", handles[index])
                        if mw is not None:
                            pairs[index].append((watts, mw / 1000.0))
        finally:
            if loaded and load is not None:
                load.stop()
        wall_s = time.monotonic() - wall_start_s
        if exited is not None:
            self._add(
                "daemon_ran_through",
                None,
                False,
                f"exited with {daemon.returncode} {exited:.0f} s into the run: {self._tail()}",
            )
        last_text = (self._scrape(url) if exited is None else None) or ""
        (self.out_dir / "daemon_metrics.txt").write_text(last_text, encoding="utf-8")
        last = _exposition(last_text)
        ticks = _total(last, "powerd_loop_duration_seconds_count") - _total(
            first, "powerd_loop_duration_seconds_count"
        )
        loop_s = _total(last, "powerd_loop_duration_seconds_sum") - _total(
            first, "powerd_loop_duration_seconds_sum"
        )
        nvml_errors = _total(last, "powerd_nvml_errors_total")
        cpu_percent = 100.0 * (cpu_end_s - cpu_start_s) / wall_s
        self.report.update(
            {
                "window_s": wall_s,
                "cpu_percent_of_core": cpu_percent,
                "rss_mib_max": max(rss_mib, default=None),
                "ticks": ticks,
                "loop_duration_mean_ms": 1000.0 * loop_s / ticks if ticks > 0 else None,
                "nvml_errors_total": nvml_errors,
                "scrapes": scrapes,
                "failed_scrapes": failed,
                "power_pairs_w": {str(i): p for i, p in pairs.items()},
            }
        )
        if exited is not None:
            return
        expected = DAEMON_TICK_SHARE * wall_s / DAEMON_INTERVAL_S
        self._add(
            "daemon_ticks",
            None,
            ticks >= expected,
            f"{ticks:g} ticks in {wall_s:.0f} s (at least {expected:.0f} expected); "
            f"{cpu_percent:.2f} % of one core, RSS {max(rss_mib, default=0.0):.0f} MiB",
        )
        self._add(
            "daemon_answers_scrapes",
            None,
            failed == 0 and bool(last_text),
            f"{scrapes - failed} of {scrapes} scrapes answered"
            + (f"; the last failure: {self.scrape_problem}" if self.scrape_problem else ""),
        )
        self._add(
            "daemon_nvml_errors",
            None,
            nvml_errors == 0 and bool(last_text),
            f"powerd_nvml_errors_total {nvml_errors:g}",
        )
        for index, pair in pairs.items():
            if self.backend != "nvml":
                self._add("daemon_power_agrees", index, None, "simulated GPUs: nothing to compare")
                continue
            gaps = [abs(w - n) / n for w, n in pair if n > 0]
            gap = float(np.median(gaps)) if gaps else None
            self._add(
                "daemon_power_agrees",
                index,
                gap is not None and gap <= DAEMON_POWER_TOLERANCE,
                "exported no power for this GPU"
                if gap is None
                else f"median gap {100 * gap:.1f} % over {len(gaps)} scrapes (exported power "
                "against GetPowerUsage beside it)",
            )

    def _stop(self, daemon: subprocess.Popen[bytes]) -> None:
        signalled = daemon.poll() is None
        if signalled:
            daemon.send_signal(signal.SIGTERM)
        try:
            rc = daemon.wait(timeout=DAEMON_STOP_S)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
            self._add(
                "daemon_stops_cleanly",
                None,
                False,
                f"still running {DAEMON_STOP_S:.0f} s after SIGTERM (killed)",
            )
            return
        self.report["exit_code"] = rc
        if signalled:
            self._add("daemon_stops_cleanly", None, rc == 0, f"exit code {rc} after SIGTERM")

    def _compare(self, before: dict[int, dict[str, Any]], after: dict[int, dict[str, Any]]) -> None:
        self.report["settings"] = {"before": before, "after": after}
        self.report["nvml_errors"] = dict(self.errors)
        for index in before:
            if self.backend != "nvml":
                self._add(
                    "daemon_changed_nothing",
                    index,
                    None,
                    "simulated GPUs: the daemon drives none of the GPUs read here",
                )
                continue
            changed = {
                k: [before[index][k], after[index][k]]
                for k in before[index]
                if before[index][k] != after[index][k]
            }
            unread = [k for k in before[index] if before[index][k] is None and k not in changed]
            read = len(before[index]) - len(unread)
            detail = f"changed: {changed}" if changed else f"{read} settings as before"
            if unread:
                detail += f"; not readable here: {', '.join(unread)}"
            self._add("daemon_changed_nothing", index, not changed if read else None, detail)

    def _after_exit(self) -> None:
        """What the daemon left: its journal, the writes the guard refused, its log."""
        from powerd.journal import Journal
        from powerd.runtime import JOURNAL_FILE

        journal = Journal(self.state_dir / JOURNAL_FILE, put_corrupt_aside=False)
        entries = journal.entries()
        self._add(
            "daemon_journaled_nothing",
            None,
            not entries and journal.load_error is None,
            f"journal holds {len(entries)} GPU(s)"
            + (f" ({journal.load_error})" if journal.load_error else "")
            + "; powerd journals every setting before it makes it",
        )
        if self.refused_path.exists():
            refused = sorted(set(self.refused_path.read_text(encoding="utf-8").split()))
            self.report["refused_writes"] = refused
            self._add(
                "daemon_read_only_held",
                None,
                not refused,
                f"write calls refused: {refused}" if refused else "no write call was made",
            )
        else:
            self._add("daemon_read_only_held", None, None, "the daemon's process left no account")
        text = self._log_text()
        problems = [line for line in text.splitlines() if _PROBLEM_LINE.search(line)]
        self.report["problem_lines"] = problems[:20]
        self.report["would_set_lines"] = text.count(" would set ")
        self._add(
            "daemon_logged_no_problem",
            None,
            not problems,
            f"{len(problems)} warning or error lines"
            + (f", first: {problems[0]}" if problems else ""),
        )

    def lines(self) -> list[str]:
        r = self.report
        if "skipped" in r:
            return [f"powerd dry run skipped: {r['skipped']}"]
        out = [f"powerd dry run on {r['backend']} GPUs"]
        if "ready_after_s" in r:
            out[0] += f": ready after {r['ready_after_s']:.1f} s"
        if "cpu_percent_of_core" in r:
            loop = r["loop_duration_mean_ms"]
            out.append(
                f"  {r['cpu_percent_of_core']:.2f} % of one core over {r['window_s']:.0f} s, "
                f"RSS {r['rss_mib_max'] or 0:.0f} MiB, {r['ticks']:g} ticks of "
                f"{'?' if loop is None else f'{loop:.1f}'} ms on average"
            )
        return out


# ---------------------------------------------------------------------------------------------
# The simulated counterpart and the outputs


def simulate_like(
    inv: list[dict[str, Any]],
    *,
    duration_s: float,
    interval_s: float,
    sweep: bool,
    notes: list[str],
    seed: int = 0,
) -> CheckResult | None:
    """The same procedure on the plant with the profile matching the device name."""
    try:
        from powerd.sim.fake_nvml import FakeNvml
        from powerd.sim.plant import GpuPlant, find_gpu_profile
    except ImportError as exc:
        notes.append(f"simulated column skipped: powerd's simulator is not importable ({exc})")
        return None
    names = {g["name"] for g in inv}
    profile = find_gpu_profile(str(inv[0]["name"]))
    if profile is None:
        notes.append(f"simulated column skipped: no plant profile for {inv[0]['name']!r}")
        return None
    if len(names) > 1:
        notes.append(f"mixed GPU models {sorted(map(str, names))}; simulated all as {profile.name}")
    plant = GpuPlant(profile, len(inv), seed=seed)
    for k, g in enumerate(inv):
        limit = g.get("power_limit_mw")
        if isinstance(limit, int) and (
            profile.power_limit_min_w * 1000 <= limit <= profile.power_limit_max_w * 1000
        ):
            plant.set_power_limit_mw(k, limit, dead_time_s=0.0)
    fake = FakeNvml(plant)
    node = SimNode(fake)
    return measure(
        fake,
        clock=node,
        load=node,
        duration_s=duration_s,
        interval_s=interval_s,
        sweep=sweep,
        log=lambda _: None,
    )


def _sweep_fits(rows: list[dict[str, Any]], gpu: int, f_max: float) -> dict[str, float | None]:
    clocks = [r for r in rows if r["gpu"] == gpu and r["kind"] == "clock"]
    limits = [r for r in rows if r["gpu"] == gpu and r["kind"] == "power_limit"]
    out: dict[str, float | None] = {}
    f = np.array([r["compute_sm_mhz"] for r in clocks], dtype=float)
    p = np.array([r["compute_power_w"] for r in clocks], dtype=float)
    fit = fit_power_curve(f, p, f_max)
    out["v_min"], out["f_v_mhz"], out["p_rest_w"], out["p_dynamic_compute_w"] = (
        fit if fit is not None else (None, None, None, None)
    )
    fm = np.array([r["memory_sm_mhz"] for r in clocks], dtype=float)
    rate = np.array([r["memory_rate_per_s"] for r in clocks], dtype=float)
    out["kappa_copy"] = fit_roofline_ratio(fm, rate, f_max)
    dead = np.array([r["dead_time_s"] for r in clocks], dtype=float)
    out["lock_dead_time_s"] = float(np.nanmedian(dead)) if np.isfinite(dead).any() else None
    settle = [r["settle_s"] for r in limits if r["step"] > 0]
    out["cap_settle_s"] = float(max(settle)) if settle else None
    return out


CSV_FIELDS = ["gpu", "uuid", "name", "parameter", "measured", "simulated", "unit", "note"]


def calibration_rows(real: CheckResult, sim: CheckResult | None) -> list[dict[str, Any]]:
    """Rows of calibration.csv: each figure in the plant's terms, measured and simulated."""
    rows: list[dict[str, Any]] = []

    def stats(result: CheckResult | None, phase: str, k: int) -> PhaseStats | None:
        if result is None or phase not in result.phases or k >= len(result.phases[phase]):
            return None
        return result.phases[phase][k]

    def r_th(result: CheckResult | None, k: int) -> float | None:
        idle, comp = stats(result, "idle", k), stats(result, "compute", k)
        if not idle or not comp or None in (idle.temp_end_c, comp.temp_end_c):
            return None
        if idle.power_w is None or comp.power_w is None or comp.power_w - idle.power_w < 50:
            return None
        return (comp.temp_end_c - idle.temp_end_c) / (comp.power_w - idle.power_w)  # type: ignore[operator]

    # A getter is the name of a PhaseStats field of the row's phase, or a function of (result, k).
    specs: list[tuple[str, str, str | Callable[[CheckResult | None, int], Any], str, str]] = [
        (
            "p_bare_idle_w",
            "idle",
            "power_w",
            "W",
            "energy-counter mean; bare idle only if no process holds a context (§1)",
        ),
        (
            "p_ctx_idle_w",
            "ctx_idle",
            "power_w",
            "W",
            "P_st + P_clk at f_max (§6(b))",
        ),
        (
            "p_compute_w",
            "compute",
            "power_w",
            "W",
            "BF16 matmul at the current settings; plant a=1.0, m=0.25",
        ),
        (
            "sm_clock_compute_mhz",
            "compute",
            "sm_mhz",
            "MHz",
            "below f_max when the cap binds (§1: 1.59-1.75 GHz on H100 at 700 W)",
        ),
        (
            "reasons_compute",
            "compute",
            lambda r, k: _hex(_get(stats(r, "compute", k), "reasons")),
            "bits",
            "OR of clock-event reasons under load (0x4 SW power cap)",
        ),
        (
            "p_memory_w",
            "memory",
            "power_w",
            "W",
            "1-GiB device copy; plant a=0.15, m=0.85",
        ),
        (
            "sm_clock_memory_mhz",
            "memory",
            "sm_mhz",
            "MHz",
            "",
        ),
        (
            "power_usage_window_s",
            "compute",
            lambda r, k: _win(stats(r, "compute", k), 0),
            "s",
            "boxcar of POWER_INSTANT that best explains GetPowerUsage (§2: 1 s Hopper/Ada, 0 A100)",
        ),
        (
            "power_usage_lag_s",
            "compute",
            lambda r, k: _win(stats(r, "compute", k), 1),
            "s",
            "extra delay of that boxcar",
        ),
        (
            "instant_update_period_s",
            "compute",
            "instant_period_s",
            "s",
            "§2: 100 ms",
        ),
        (
            "energy_update_period_s",
            "compute",
            "energy_period_s",
            "s",
            "§2: about 100 ms",
        ),
        (
            "energy_over_instant_integral",
            "compute",
            "energy_ratio",
            "ratio",
            "counter delta / ∫POWER_INSTANT dt; the per-board gain error is ±5 % (§2 [S8])",
        ),
        (
            "r_th_apparent_k_per_w",
            "compute",
            r_th,
            "K/W",
            "ΔT/ΔP after the load: a lower bound of R_th (slow lag 120 s, §6(d))",
        ),
        (
            "clock_on_table_fraction",
            "compute",
            "clock_on_table",
            "fraction",
            "SM clock read-backs found in the supported-clocks list",
        ),
        ("compute_iterations_per_s", "compute", lambda r, k: _rate(r, "compute", k), "1/s", ""),
        ("memory_iterations_per_s", "memory", lambda r, k: _rate(r, "memory", k), "1/s", ""),
    ]

    def value(
        result: CheckResult | None,
        phase: str,
        getter: str | Callable[[CheckResult | None, int], Any],
        k: int,
    ) -> Any:
        if isinstance(getter, str):
            return _get(stats(result, phase, k), getter)
        return getter(result, k)

    for k, g in enumerate(real.inventory):
        # (parameter, measured, simulated, unit, note)
        found = [
            (name, value(real, phase, getter, k), value(sim, phase, getter, k), unit, note)
            for name, phase, getter, unit, note in specs
            if phase in real.phases
        ]
        if real.sweep is not None:
            f_max = float(g["sm_clock_max_mhz"] or 1.0)
            got = _sweep_fits(real.sweep, g["index"], f_max)
            simulated = _sweep_fits(sim.sweep, k, f_max) if sim and sim.sweep else {}
            for name, unit in (
                ("v_min", "1"),
                ("f_v_mhz", "MHz"),
                ("p_rest_w", "W"),
                ("p_dynamic_compute_w", "W"),
                ("kappa_copy", "1"),
                ("lock_dead_time_s", "s"),
                ("cap_settle_s", "s"),
            ):
                found.append((name, got.get(name), simulated.get(name), unit, "--sweep fit"))
        base = {"gpu": g["index"], "uuid": g["uuid"], "name": g["name"]}
        for name, measured, simulated_value, unit, note in found:
            rows.append(
                {
                    **base,
                    "parameter": name,
                    "measured": measured,
                    "simulated": simulated_value,
                    "unit": unit,
                    "note": note,
                }
            )
    return rows


def _get(obj: Any, name: str) -> Any:
    return None if obj is None else getattr(obj, name)


def _hex(value: Any) -> str | None:
    return None if value is None else hex(int(value))


def _win(stats: PhaseStats | None, k: int) -> float | None:
    return None if stats is None or stats.window is None else stats.window[k]


def _rate(result: CheckResult | None, kind: str, k: int) -> float | None:
    if result is None or kind not in result.rates:
        return None
    values = list(result.rates[kind].values())
    return values[k] if k < len(values) else None


def checks(real: CheckResult, sim: CheckResult | None) -> list[dict[str, Any]]:
    """Pass/fail statements about the sensor semantics the daemon relies on."""
    out: list[dict[str, Any]] = []

    def add(name: str, gpu: int | None, ok: bool | None, detail: str) -> None:
        out.append({"check": name, "gpu": gpu, "ok": ok, "detail": detail})

    expect_window: float | None = None
    if sim is not None:
        expect = _win(sim.phases.get("compute", [None])[0], 0) if "compute" in sim.phases else None
        expect_window = expect
    for k, g in enumerate(real.inventory):
        table, f_max = g.get("supported_sm_clocks_mhz"), g.get("sm_clock_max_mhz")
        add(
            "clock_table_within_max_clock",
            g["index"],
            None if not table or f_max is None else max(table) <= f_max,
            f"table top {max(table) if table else None} MHz, GetMaxClockInfo {f_max} MHz "
            "(powerd cuts the table there)",
        )
        mig = g.get("mig_mode")
        add(
            "mig_mode_off",
            g["index"],
            None if mig is None else not mig[0],
            f"MIG mode [current, pending] {mig}: powerd is unverified on a MIG-enabled GPU",
        )
        for phase in ("compute", "memory"):
            st = real.phases.get(phase)
            if not st:
                continue
            ratio = st[k].energy_ratio
            add(
                f"energy_counter_vs_power_{phase}",
                g["index"],
                None if ratio is None else abs(ratio - 1.0) <= 0.10,
                f"counter/∫instant = {ratio}; within 10 % expected (5 % typical)",
            )
        comp = real.phases.get("compute")
        if comp:
            window = comp[k].window
            if window is not None and expect_window is not None:
                add(
                    "power_usage_window",
                    g["index"],
                    abs(window[0] - expect_window) <= 0.3,
                    f"measured {window[0]} s (lag {window[1]} s), plant {expect_window} s",
                )
            period = comp[k].instant_period_s
            add(
                "instant_publication_period",
                g["index"],
                None if period is None else abs(period - 0.1) <= 0.03,
                f"{period} s; 0.1 s expected",
            )
            on_table = comp[k].clock_on_table
            add(
                "clock_readback_on_table",
                g["index"],
                None if on_table is None else on_table >= 0.99,
                f"{on_table} of samples",
            )
    slowest = max(real.call_latency_ms.items(), key=lambda item: item[1]["max_ms"], default=None)
    costliest = max(
        real.call_latency_ms.items(), key=lambda item: item[1]["cpu_mean_ms"], default=None
    )
    add(
        "nvml_calls_answer_quickly",
        None,
        None if slowest is None else slowest[1]["max_ms"] <= SLOW_CALL_S * 1000.0,
        "slowest call: "
        + ("none timed" if slowest is None else f"{slowest[0]} {slowest[1]['max_ms']:.1f} ms")
        + (
            ""
            if costliest is None
            else f"; most CPU: {costliest[0]} {costliest[1]['cpu_mean_ms']:.2f} ms a call"
        ),
    )
    return out + real.backend_checks + real.daemon_checks


def _jsonable(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, PhaseStats):
        return _jsonable(value.__dict__)
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    return value


def write_outputs(
    out_dir: Path, real: CheckResult, sim: CheckResult | None, meta: dict[str, Any]
) -> dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = calibration_rows(real, sim)
    with open(out_dir / "calibration.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(row.get(k)) for k in CSV_FIELDS})
    summary = {
        **meta,
        "gpus": real.inventory,
        "phases": {k: v for k, v in real.phases.items()},
        "iterations_per_s": real.rates,
        "simulated_phases": None if sim is None else sim.phases,
        "checks": checks(real, sim),
        "notes": real.notes,
        "nvml_errors": real.errors,
        "nvml_call_latency_ms": real.call_latency_ms,
        "sweep": real.sweep,
        "simulated_sweep": None if sim is None else sim.sweep,
        "powerd_backend": real.backend,
        "powerd_dry_run": real.daemon,
    }
    summary = _jsonable(summary)
    with open(out_dir / "summary.json", "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1, sort_keys=True, allow_nan=False)
        f.write("\n")
    return summary


def _csv_value(value: Any) -> Any:
    if isinstance(value, float):
        return "" if not math.isfinite(value) else f"{value:.6g}"
    return "" if value is None else value


def run_check(
    nvml: Any,
    out_dir: Path,
    *,
    clock: Clock,
    load: Load | None,
    sweep: bool = False,
    duration_s: float = 20.0,
    interval_s: float = 0.025,
    gpus: list[int] | None = None,
    simulate: bool = True,
    powerd_backend: bool = True,
    daemon_seconds: float = 0.0,
    daemon_backend: str = "nvml",
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Measure `nvml`, and powerd's own NVML path next to it (`powerd_backend`, skipped with a
    note when powerd is not importable); with `daemon_seconds`, run the daemon itself in dry
    run on the GPUs for that long (DaemonDryRun); run the same procedure on the plant; write
    the outputs. Returns the summary."""
    started = time.time()
    CALL_SECONDS.clear()
    refused: list[str] = []
    guard = contextlib.nullcontext() if sweep else read_only(nvml, refused)
    with guard:
        section, skipped = BackendSection.create(nvml) if powerd_backend else (None, "")
        try:
            real = measure(
                nvml,
                clock=clock,
                load=load,
                duration_s=duration_s,
                interval_s=interval_s,
                gpus=gpus,
                sweep=sweep,
                log=log,
                backend=section,
            )
        finally:
            if section is not None:
                section.close()
    real.call_latency_ms = call_latency_ms()  # before the simulated run's calls join them
    if section is not None:
        if load is None:
            section.notes.append("no load ran: no read under load, no own-PID check")
        real.backend, real.backend_checks = section.report(), section.checks
        for line in section.lines():
            log(line)
    elif skipped:
        real.backend = {"skipped": skipped}
        real.notes.append(skipped)
    if not sweep:
        real.backend_checks.append(
            {
                "check": "read_only_held",
                "gpu": None,
                "ok": not refused,
                "detail": f"write calls refused: {sorted(set(refused))}"
                if refused
                else "no write call was made",
            }
        )
    meta = {
        "tool": "powerd tools/gpu_check.py",
        "host": platform.node(),
        "python": platform.python_version(),
        "started_unix_s": started,
        "read_only": not sweep,
        "duration_s": duration_s,
        "sample_interval_s": interval_s,
    }
    sim = None
    try:
        if daemon_seconds > 0:
            dry_run = DaemonDryRun(out_dir, seconds=daemon_seconds, backend=daemon_backend)
            # The run fills its report and checks in place: an interrupt leaves what it had.
            real.daemon, real.daemon_checks = dry_run.report, dry_run.checks
            dry_run.run(nvml, real.inventory, load if daemon_backend == "nvml" else None, log)
            for line in dry_run.lines():
                log(line)
        if simulate:
            log("running the same procedure on the simulated plant")
            sim = simulate_like(
                real.inventory,
                duration_s=duration_s,
                interval_s=interval_s,
                sweep=sweep,
                notes=real.notes,
            )
    except KeyboardInterrupt:
        # What was measured stays: the summary says where the run was cut short.
        real.notes.append("interrupted: this summary holds what ran before")
        write_outputs(out_dir, real, sim, meta)
        raise
    return write_outputs(out_dir, real, sim, meta)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="out/gpu-check", help="output directory")
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="step locked clocks and power limits (restores them afterwards)",
    )
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per load")
    parser.add_argument("--interval", type=float, default=0.025, help="sampling interval, s")
    parser.add_argument("--gpus", default="", help="comma-separated NVML indices (default all)")
    parser.add_argument("--no-load", action="store_true", help="idle readings only")
    parser.add_argument(
        "--daemon-seconds",
        type=float,
        default=40.0,
        help="run powerd itself in dry run on the GPUs for this long (0: skip)",
    )
    parser.add_argument(
        "--simulate",
        metavar="PROFILE",
        help="check the simulated node (fake NVML) instead of a GPU",
    )
    args = parser.parse_args(argv)
    if not 0.005 <= args.interval <= 0.1:
        parser.error("--interval must lie within [0.005, 0.1] s")
    if args.duration < 5.0:
        parser.error("--duration must be at least 5 s")
    if not (args.daemon_seconds == 0 or 10.0 <= args.daemon_seconds <= 3600.0):
        parser.error("--daemon-seconds must be 0 or within [10, 3600] s")
    try:
        gpus = sorted({int(x) for x in args.gpus.split(",") if x.strip()}) or None
    except ValueError:
        parser.error(f"--gpus takes NVML indices separated by commas, got {args.gpus!r}")
    out_dir = Path(args.out)

    if args.simulate:
        _import_powerd()
        from powerd.sim.fake_nvml import FakeNvml
        from powerd.sim.plant import GpuPlant, load_gpu_profile

        fake = FakeNvml(GpuPlant(load_gpu_profile(args.simulate), 2, seed=1))
        count = 2
        node = SimNode(fake)
        nvml: Any = fake
        clock: Clock = node
        load: Load | None = None if args.no_load else node
    else:
        import pynvml

        nvml = pynvml
        clock = RealClock()
        load = None
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            print(f"gpu_check: NVML is not usable on this machine: {exc}", file=sys.stderr)
            return 2
        try:
            uuids = [
                pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(i))
                for i in range(pynvml.nvmlDeviceGetCount())
            ]
        finally:
            pynvml.nvmlShutdown()
        count = len(uuids)
        note = "loads disabled by --no-load"
        if not args.no_load:
            load, note = TorchLoad.create(uuids)
        if load is None:
            print(f"gpu_check: {note}", file=sys.stderr)
        _import_powerd()
    missing = [i for i in gpus or [] if not 0 <= i < count]
    if missing:
        print(
            f"gpu_check: --gpus names {missing}, which this node lacks (NVML counts {count})",
            file=sys.stderr,
        )
        return 2
    summary = run_check(
        nvml,
        out_dir,
        clock=clock,
        load=load,
        sweep=args.sweep,
        duration_s=args.duration,
        interval_s=args.interval,
        gpus=gpus,
        daemon_seconds=args.daemon_seconds,
        daemon_backend="sim" if args.simulate else "nvml",
    )
    failed = [c for c in summary["checks"] if c["ok"] is False]
    for c in summary["checks"]:
        mark = {True: "ok  ", False: "FAIL", None: "n/a "}[c["ok"]]
        where = "node" if c["gpu"] is None else f"GPU {c['gpu']}"
        print(f"{mark} {where} {c['check']}: {c['detail']}")
    for note in summary["notes"]:
        print(f"note: {note}")
    print(f"wrote {out_dir / 'calibration.csv'} and {out_dir / 'summary.json'}")
    return 1 if failed else 0


def _import_powerd() -> None:
    """Make the repository's powerd importable when run as tools/gpu_check.py from a checkout."""
    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:
        sys.path.append(root)


if __name__ == "__main__":
    sys.exit(main())
