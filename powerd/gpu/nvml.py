"""The NVML backend: the only module that talks to pynvml (nvidia-ml-py).

It works over any object with pynvml's functions, constants and NVMLError classes: the real
`pynvml` module, or the simulator's FakeNvml. Every call goes through one choke point
(`_call`) that maps NVML's errors into the GpuError hierarchy once and counts them by
(operation, kind) in `error_counts`, which the exporter publishes.

Each GPU's calls run on a thread of that GPU's own, the caller waiting the stall limit at most
(a GPU whose firmware hangs holds a call for tens of seconds). Reads return None for a value
the device does not report; writes raise. Setters read before
they write (a write that changes nothing is skipped), clamp to the device's constraints, and
verify by reading back. The power limit uses the v1 setter: nvidia-ml-py 13's
`nvmlDeviceSetPowerManagementLimit_v2` ignores the C return code (nvml_api.md §0.3).
"""

from __future__ import annotations

import functools
import logging
import math
import queue
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar, cast

from powerd.gpu.backend import POWER_LIMIT_TOLERANCE_MW, STALL_S, WAIT_BESIDE_HANG_S
from powerd.gpu.errors import (
    GpuError,
    GpuLost,
    GpuUnavailable,
    InvalidArgument,
    NoPermission,
    NotSupported,
)
from powerd.model import GpuInfo, GpuReading

log = logging.getLogger(__name__)

T = TypeVar("T")
K = TypeVar("K")
Method = TypeVar("Method", bound=Callable[..., Any])
_Opened = tuple[str, Any, GpuInfo]
"""An open GPU: its UUID, NVML handle and description."""

_INIT_FAILURES: dict[str, str] = {
    "NVMLError_LibraryNotFound": (
        "NVML is not available: libnvidia-ml.so.1 was not found; is the NVIDIA driver installed?"
    ),
    "NVMLError_DriverNotLoaded": (
        "NVML is not available: the NVIDIA kernel driver is not loaded; "
        "load it (modprobe nvidia) or reinstall the driver."
    ),
    "NVMLError_NoPermission": (
        "NVML is not available: no permission to open the GPU devices (/dev/nvidia*); "
        "run as root, or allow them with DeviceAllow= in the unit."
    ),
    "NVMLError_LibRmVersionMismatch": (
        "NVML is not available: the NVIDIA driver was upgraded without reloading the kernel "
        "module; reboot or reload it."
    ),
}

# NVML error class name -> GpuError subclass. FunctionNotFound means the installed driver
# predates the call, which to powerd is the same as the device lacking the feature.
_ERROR_CLASSES: tuple[tuple[str, type[GpuError]], ...] = (
    ("NVMLError_NotSupported", NotSupported),
    ("NVMLError_FunctionNotFound", NotSupported),
    ("NVMLError_NoPermission", NoPermission),
    ("NVMLError_GpuIsLost", GpuLost),
    ("NVMLError_GpuNotFound", GpuLost),
    ("NVMLError_InvalidArgument", InvalidArgument),
    ("NVMLError_Uninitialized", GpuUnavailable),
    ("NVMLError_DriverNotLoaded", GpuUnavailable),
    ("NVMLError_LibRmVersionMismatch", GpuUnavailable),
)

_CLOCK_EVENT_REASONS = (
    "nvmlDeviceGetCurrentClocksEventReasons",
    "nvmlDeviceGetCurrentClocksThrottleReasons",
)
"""The same bits under two names: drivers before R535 have only the older one."""
_TEMPERATURE = ("nvmlDeviceGetTemperatureV", "nvmlDeviceGetTemperature")
"""The GPU's temperature: the versioned call first (the older one is to leave the binding with
CUDA 14), the older one for drivers without the newer symbol."""
_RUNNING_PROCESSES = (
    "nvmlDeviceGetComputeRunningProcesses",
    "nvmlDeviceGetComputeRunningProcesses_v2",
)
"""The binding's call uses the _v3 symbol, which some drivers lack (R470, 535.98)."""
JOB_CALLS_CAP = 3
"""A job on a GPU's thread (a write, a description) is given up after this many stall limits
in all, however its calls answer: two GPUs' writes in a tick then stay within WatchdogSec=30."""
_PID_MAX_PATH = Path("/proc/sys/kernel/pid_max")
_PID_MAX_LARGEST = 1 << 22
"""Linux's largest pid_max, for a machine whose own cannot be read."""

_HINTS: dict[type[GpuError], str] = {
    NoPermission: " (changing GPU settings needs root or CAP_SYS_ADMIN)",
    GpuLost: " (the GPU fell off the bus or stopped answering)",
    GpuUnavailable: " (NVML is not initialised or the driver went away)",
}


class _Job(Generic[T]):
    """A call handed to a GPU's thread; `done` is set when it returned or raised. `what` names
    it in messages ("reading"), `operation` in the error counts when it hangs outside any NVML
    call."""

    def __init__(self, work: Callable[[], T], what: str, operation: str) -> None:
        self.work = work
        self.what = what
        self.operation = operation
        self.done = threading.Event()
        self.started_s = time.monotonic()
        self.result: T | None = None
        self.error: BaseException | None = None
        self.cpu_s = 0.0
        """CPU time the call took in its thread (a driver may busy-wait in a call)."""

    def run(self) -> None:
        started_cpu_s = time.thread_time()
        try:
            self.result = self.work()
        except BaseException as exc:  # handed to the waiting thread, which raises it
            self.error = exc
        finally:
            self.cpu_s = time.thread_time() - started_cpu_s
            del self.work  # it holds the backend, which a finished job must not keep alive
            self.done.set()

    def outcome(self) -> T:
        if self.error is not None:
            raise self.error
        return cast(T, self.result)  # None where T allows it (a write returns nothing)

    def run_here(self) -> T:
        self.run()
        return self.outcome()


class _Reader:
    """A daemon thread that makes one GPU's calls, so that a GPU whose firmware hangs holds
    it, not the loop (nor the interpreter's exit)."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[_Job[Any] | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._serve, name=f"nvml-{name}", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            job.run()
            del job  # nor the one this thread waits after

    def stop(self) -> None:
        """End the thread once the call in hand (if any) has returned."""
        self._jobs.put(None)

    def submit(self, job: _Job[T]) -> _Job[T]:
        self._jobs.put(job)
        return job

    def is_current(self) -> bool:
        return threading.current_thread() is self.thread


def _wait_s(deadline_s: float) -> float | None:
    """The wait left until `deadline_s` (monotonic), for Event.wait; None for no deadline."""
    return None if math.isinf(deadline_s) else max(0.0, deadline_s - time.monotonic())


def _stop_readers(readers: dict[str, _Reader]) -> None:
    for reader in readers.values():
        reader.stop()
    readers.clear()


def _on_gpu_thread(what: str) -> Callable[[Method], Method]:
    """Make a backend method whose first argument is a GPU's UUID run on that GPU's thread,
    bounded by the stall limit as a reading is (NvmlBackend._within_stall)."""

    def decorate(method: Method) -> Method:
        @functools.wraps(method)
        def bounded(self: NvmlBackend, uuid: str, *args: Any, **kwargs: Any) -> Any:
            work = functools.partial(method, self, uuid, *args, **kwargs)
            return self._within_stall(uuid, _Job(work, what, method.__name__))

        return cast(Method, bounded)

    return decorate


class NvmlBackend:
    """GpuBackend over NVML. `nvml` is a pynvml-compatible module or object (default: the
    installed pynvml). Construction initialises NVML and raises GpuUnavailable with one
    sentence naming the cause when it cannot. `clock` stamps readings (Unix seconds)."""

    def __init__(
        self,
        nvml: Any = None,
        *,
        clock: Callable[[], float] = time.time,
        stall_s: float = STALL_S,
    ) -> None:
        if nvml is None:
            try:
                import pynvml
            except ImportError as exc:
                raise GpuUnavailable(
                    "NVML is not available: the nvidia-ml-py package is not installed.",
                    operation="import pynvml",
                ) from exc
            nvml = pynvml
        self._nvml = nvml
        self._clock = clock
        self._stall_s = stall_s
        self._lock = threading.Lock()
        self.error_counts: dict[tuple[str, str], int] = {}
        """Errors by (NVML function, GpuError kind) since start; read by the exporter."""
        self._handles: dict[str, Any] = {}
        self._chosen: dict[tuple[str, ...], str] = {}
        """Operations tried in order (_optional_first) -> the one this driver answered."""
        self.pid_max = pid_max()
        """Every PID is below it: an entry past it is one read with another struct layout."""
        self._infos: dict[str, GpuInfo] = {}
        self._locked_mhz: dict[str, tuple[int, int] | None] = {}
        """The lock powerd set per GPU (None: unlocked by powerd); absent: unknown, since NVML
        has no getter for locked clocks."""
        self._power_fixed: set[str] = set()
        """GPUs without a settable power limit."""
        self._limits_unread: set[str] = set()
        """GPUs whose power-limit range could not be read when described (an error other
        than NOT_SUPPORTED): read again before their limit is set."""
        self._unopened: dict[int, str] = {}
        self._readers: dict[str, _Reader] = {}
        # A backend dropped without close() (a test's, a tool's) must not leave its threads.
        weakref.finalize(self, _stop_readers, self._readers)
        self._opening: dict[int, _Job[Any]] = {}
        """An open of a GPU (by index) that did not return within `stall_s`, until it does."""
        self._hung: dict[str, _Job[Any]] = {}
        """A call that did not return within `stall_s`, by GPU, until it returns: no other
        call is made on that GPU meanwhile (it would wait as long)."""
        self._calling: dict[int, str] = {}
        """The NVML function each thread is in now, by thread ident."""
        self._call_started_s: dict[int, float] = {}
        """When each thread's latest NVML call started (monotonic), by thread ident."""
        self._last_called: dict[int, str] = {}
        """The NVML function each thread called last, by thread ident."""
        self.read_cpu_s: dict[str, float] = {}
        """CPU seconds of each GPU's last reading that returned, spent in its reader thread."""
        self._closed = False
        self._init()

    # --- lifecycle ------------------------------------------------------------------------

    def _init(self) -> None:
        nvml_error = getattr(self._nvml, "NVMLError", None)
        try:
            self._nvml.nvmlInit()
        except Exception as exc:
            if nvml_error is None or not isinstance(exc, nvml_error):
                raise
            message = _INIT_FAILURES.get(type(exc).__name__)
            if message is None:
                message = f"NVML is not available: nvmlInit failed ({_nvml_text(exc)})."
            raise GpuUnavailable(message, operation="nvmlInit") from exc

    def close(self) -> None:
        """Shut NVML down. Changes no GPU setting; a second call does nothing."""
        if self._closed:
            return
        self._closed = True
        _stop_readers(self._readers)
        if self._still_hung():
            # A thread is still inside a call on a hung GPU: the process exit frees NVML.
            log.debug("nvmlShutdown skipped: a call on a hung GPU has not returned")
            return
        try:
            self._call("nvmlShutdown", None)
        except GpuError as exc:
            log.debug("nvmlShutdown: %s", exc)

    # --- the choke point ------------------------------------------------------------------

    def _call(self, operation: str, uuid: str | None, *args: Any, record: bool = True) -> Any:
        """Call the NVML function named `operation`; NVML errors become GpuErrors, counted
        unless `record` is false (the caller then records what it does not recover from)."""
        fn = getattr(self._nvml, operation, None)
        if fn is None:
            raise self._record(
                NotSupported(
                    f"{operation} is not provided by this NVML binding",
                    operation=operation,
                    uuid=uuid,
                )
            )
        if uuid is not None and uuid in self._hung:
            hung = self._hung_error(uuid)
            if hung is not None:
                raise hung
        thread = threading.get_ident()
        self._call_started_s[thread] = time.monotonic()  # before _calling: see _answers
        self._calling[thread] = operation
        self._last_called[thread] = operation
        try:
            return fn(*args)
        except Exception as exc:
            mapped = self._map(exc, operation, uuid)
            if mapped is None:
                raise
            raise (self._record(mapped) if record else mapped) from exc
        finally:
            self._calling.pop(thread, None)

    def _map(self, exc: Exception, operation: str, uuid: str | None) -> GpuError | None:
        nvml = self._nvml
        mismatch = getattr(nvml, "NVMLLibraryMismatchError", None)
        if mismatch is not None and isinstance(exc, mismatch):
            return NotSupported(
                f"{operation}: the NVML library is older than nvidia-ml-py expects",
                operation=operation,
                uuid=uuid,
            )
        base = getattr(nvml, "NVMLError", None)
        if base is None or not isinstance(exc, base):
            return None
        cls: type[GpuError] = GpuError
        for name, mapped in _ERROR_CLASSES:
            nvml_cls = getattr(nvml, name, None)
            if nvml_cls is not None and isinstance(exc, nvml_cls):
                cls = mapped
                break
        else:
            unknown = getattr(nvml, "NVMLError_Unknown", None)
            if unknown is not None and isinstance(exc, unknown) and self._device_gone(uuid):
                cls = GpuLost
        where = f" on GPU {uuid}" if uuid else ""
        message = f"{operation}{where} failed: {_nvml_text(exc)}{_HINTS.get(cls, '')}"
        return cls(message, operation=operation, uuid=uuid)

    def _device_gone(self, uuid: str | None) -> bool:
        """After NVML_ERROR_UNKNOWN: does the device still answer a fresh handle lookup?"""
        if uuid is None:
            return False
        try:
            handle = self._nvml.nvmlDeviceGetHandleByUUID(uuid)
            self._nvml.nvmlDeviceGetUUID(handle)
        except Exception:
            self._handles.pop(uuid, None)
            return True
        return False

    def _record(self, error: GpuError) -> GpuError:
        if isinstance(error, GpuLost) and error.uuid is not None:
            # A GPU back after a reset needs a fresh handle.
            self._handles.pop(error.uuid, None)
        key = (error.operation, error.kind)
        with self._lock:
            count = self.error_counts.get(key, 0) + 1
            self.error_counts[key] = count
        # The first of each kind is worth a warning; a feature a GPU lacks fails every tick.
        log.log(logging.WARNING if count == 1 else logging.DEBUG, "%s", error)
        return error

    # --- devices --------------------------------------------------------------------------

    def devices(self, *, wait_s: float | None = None) -> list[GpuInfo]:
        """Every GPU NVML can open, in index order. A GPU that cannot be opened (no
        permission, lost, no answer within `stall_s` or `wait_s` when shorter) is left out,
        its error counted and kept for unopened_indices()."""
        count = int(self._call("nvmlDeviceGetCount", None))
        infos: list[GpuInfo] = []
        unopened: dict[int, str] = {}
        hung_indices = {
            info.index
            for uuid, job in list(self._hung.items())
            if not job.done.is_set() and (info := self._infos.get(uuid)) is not None
        }
        for index in range(count):
            if index in hung_indices:
                continue  # a GPU whose reading hangs: the roster holds it as lost
            try:
                uuid, handle, info = self._open_within_stall(index, self._patience_s(wait_s))
            except GpuUnavailable:
                raise
            except GpuError as exc:
                unopened[index] = str(exc)
                continue
            self._handles[uuid] = handle
            self._infos[uuid] = info
            infos.append(info)
        self._unopened = unopened
        return infos

    def _open_within_stall(self, index: int, patience_s: float) -> _Opened:
        """Open the GPU at `index` on a thread of its own, waiting `patience_s` at most
        (WAIT_BESIDE_HANG_S while another GPU or open hangs, as for calls: eight GPUs hung
        after a restart then cost the start 5 + 7 s, not 40): a GPU whose firmware hangs would
        hold the start, and each later look for it, for as long. GpuLost when it does not
        answer in time, or still has not since an earlier try. An earlier open that answered
        after it was given up on is used (a slow first open after a reset need not wait for
        the next look). Opens go one at a time: a driver that serializes first opens would
        make parallel ones wait behind each other and look hung."""
        job = self._opening.pop(index, None)
        if job is not None:
            if not job.done.is_set():
                self._opening[index] = job
                # Not counted: no call is made.
                raise GpuLost(
                    f"GPU {index} has not answered an open started "
                    f"{time.monotonic() - job.started_s:.0f} s ago",
                    operation="open",
                )
            if not isinstance(job.error, GpuError):
                return job.outcome()
        if self._hang_in_flight():
            patience_s = min(patience_s, WAIT_BESIDE_HANG_S)
        opener = _Reader(f"open-{index}")  # one call: the thread ends once it returns
        job = opener.submit(_Job(functools.partial(self._open, index), "open", "open"))
        opener.stop()
        what = f"GPU {index} stopped answering: not opened"
        return self._held_unless_answered(
            self._opening, index, opener, job, time.monotonic(), patience_s, what
        )

    def _hang_in_flight(self, but: str | None = None) -> bool:
        """Whether a call on a GPU (other than `but`) or an open has gone unanswered past its
        wait and has not returned yet."""
        hung = [job for uuid, job in list(self._hung.items()) if uuid != but]
        return any(not job.done.is_set() for job in [*hung, *list(self._opening.values())])

    def _patience_s(self, wait_s: float | None) -> float:
        """How long to wait for a GPU's answer: `stall_s`, or `wait_s` when shorter."""
        return self._stall_s if wait_s is None else min(wait_s, self._stall_s)

    def _hang(
        self,
        thread: _Reader,
        job: _Job[Any],
        what: str,
        patience_s: float,
        uuid: str | None = None,
        *,
        in_all: bool = False,
    ) -> GpuError:
        """GpuLost (counted) for `job`, on `thread`, that did not return within `patience_s`
        for one call, or (`in_all`) within JOB_CALLS_CAP times that in all. Named and counted
        by the NVML function the thread is in, else the one it made last (between two slow
        calls, in powerd's own code)."""
        ident = thread.thread.ident or 0
        calling = self._calling.get(ident)
        operation = calling or self._last_called.get(ident, job.operation)
        where = f"in {operation}" if calling else f"after {operation}"
        within = f"{JOB_CALLS_CAP * patience_s:g} s in all" if in_all else f"{patience_s:g} s"
        return self._record(
            GpuLost(f"{what} within {within}, {where}", operation=operation, uuid=uuid)
        )

    # --- each GPU's thread ----------------------------------------------------------------

    def _submit(self, uuid: str, job: _Job[T]) -> tuple[_Reader, _Job[T]]:
        """Hand `job` to the GPU's thread. GpuLost (not counted: no call is made) while an
        earlier call on the GPU has not returned; GpuUnavailable once closed."""
        if self._closed:  # close() ended the GPUs' threads: start none again
            raise GpuUnavailable(
                f"{job.operation} on GPU {uuid}: NVML is not initialised (powerd closed it)",
                operation=job.operation,
                uuid=uuid,
            )
        hung = self._hung_error(uuid)
        if hung is not None:
            raise hung
        reader = self._readers.get(uuid)
        if reader is None:
            reader = self._readers[uuid] = _Reader(f"gpu-{uuid}")
        return reader, reader.submit(job)

    def _await(
        self, uuid: str, reader: _Reader, job: _Job[T], since_s: float, patience_s: float
    ) -> T:
        """The outcome of a job on the GPU's thread; see _held_unless_answered."""
        what = f"GPU {uuid} stopped answering: no {job.what}"
        return self._held_unless_answered(
            self._hung, uuid, reader, job, since_s, patience_s, what, uuid
        )

    def _held_unless_answered(
        self,
        held: dict[K, _Job[Any]],
        key: K,
        reader: _Reader,
        job: _Job[T],
        since_s: float,
        patience_s: float,
        what: str,
        uuid: str | None = None,
    ) -> T:
        """The job's outcome, or GpuLost (counted, `what` "within ..." and the call) once the
        GPU has left one of its calls unanswered for `patience_s` (see _answers). The job is
        then kept in `held` under `key` until it returns: nothing more is called on that GPU
        meanwhile, and close() does not shut NVML down under it. So is a job whose wait was
        interrupted (Ctrl-C in `powerd restore`), which leaves its call running."""
        try:
            wait = self._answers(reader, job, since_s, patience_s)
        except BaseException:
            held[key] = job
            raise
        if wait != "answered":
            held[key] = job
            raise self._hang(reader, job, what, patience_s, uuid, in_all=wait == "job")
        return job.outcome()

    def _answers(
        self, reader: _Reader, job: _Job[Any], since_s: float, patience_s: float
    ) -> Literal["answered", "call", "job"]:
        """Wait for `job`: "answered" once it is done, "call" once one of its NVML calls has
        gone `patience_s` unanswered (the first counted from `since_s`, monotonic), "job" once
        it has run JOB_CALLS_CAP times `patience_s` in all. The limit is on a call first: a GPU
        that answers each call slowly is not hung (a fresh process's first calls on a GPU may
        take seconds), but a job of a dozen slow calls must not hold the loop past its
        watchdog."""
        thread = reader.thread.ident or 0
        job_deadline_s = since_s + JOB_CALLS_CAP * patience_s
        while True:
            call_started_s = max(since_s, self._call_started_s.get(thread, since_s))
            if job.done.wait(_wait_s(min(call_started_s + patience_s, job_deadline_s))):
                return "answered"
            if time.monotonic() >= job_deadline_s:
                return "job"
            in_call = thread in self._calling  # read first: _call stamps the start first
            if self._call_started_s.get(thread, since_s) > call_started_s:
                continue  # another call started since: the GPU answered the one before
            if not in_call:
                since_s = time.monotonic()  # between two calls, in powerd's own code
                continue
            return "call"

    def _within_stall(self, uuid: str, job: _Job[T]) -> T:
        """Run `job` on the GPU's thread and wait `stall_s` for it. A GPU whose firmware hangs
        holds each call for tens of seconds, past the unit's WatchdogSec: a write, a
        description or a process list is bounded as a reading is. While another GPU hangs
        the wait is WAIT_BESIDE_HANG_S: calls are made one GPU at a time, and a driver that
        held every GPU's calls behind one hang would otherwise cost `stall_s` a GPU. Run in
        place when called from that thread (a reset that sets a limit)."""
        reader = self._readers.get(uuid)
        if reader is not None and reader.is_current():
            return job.run_here()
        reader, job = self._submit(uuid, job)
        patience_s = self._stall_s
        if self._hang_in_flight(but=uuid):
            patience_s = min(patience_s, WAIT_BESIDE_HANG_S)
        return self._await(uuid, reader, job, time.monotonic(), patience_s)

    def _open(self, index: int) -> _Opened:
        handle = self._call("nvmlDeviceGetHandleByIndex", None, index)
        uuid = _text(self._call("nvmlDeviceGetUUID", None, handle))
        # A GPU described before keeps its description: enumerating again (for a GPU that
        # could not be opened) must not let a transient error change it.
        return uuid, handle, self._infos.get(uuid) or self._describe(index, uuid, handle)

    def unopened_indices(self) -> dict[int, str]:
        """The indices NVML counted at the last devices() but could not open, with why."""
        return dict(self._unopened)

    def _limit_range(self, uuid: str, handle: Any) -> tuple[int, int, int]:
        """(min, max, default) power limit in mW."""
        min_mw, max_mw = (
            int(v) for v in self._call("nvmlDeviceGetPowerManagementLimitConstraints", uuid, handle)
        )
        default_mw = int(self._call("nvmlDeviceGetPowerManagementDefaultLimit", uuid, handle))
        return min_mw, max_mw, default_mw

    def _describe(self, index: int, uuid: str, handle: Any) -> GpuInfo:
        name = _text(self._call("nvmlDeviceGetName", uuid, handle))
        clocks = self._supported_sm_clocks(uuid, handle)
        try:
            min_mw, max_mw, default_mw = self._limit_range(uuid, handle)
        except (GpuLost, GpuUnavailable):
            raise
        except GpuError as exc:
            # Pin the range to what the GPU enforces now, so clamping leaves it alone. Without
            # a settable limit (NOT_SUPPORTED) set_power_limit refuses for good; after another
            # error the range is read again before a limit is set (a restore must not take a
            # passing error for a GPU without the knob).
            enforced_mw = self._optional("nvmlDeviceGetEnforcedPowerLimit", uuid, handle)
            min_mw = max_mw = default_mw = int(enforced_mw or 0)
            if isinstance(exc, NotSupported):
                self._power_fixed.add(uuid)
            else:
                self._limits_unread.add(uuid)
        return GpuInfo(
            index=index,
            uuid=uuid,
            name=name,
            power_limit_min_mw=min_mw,
            power_limit_max_mw=max_mw,
            power_limit_default_mw=default_mw,
            sm_clock_min_mhz=clocks[0],
            sm_clock_max_mhz=clocks[-1],
            supported_sm_clocks_mhz=clocks,
        )

    def _supported_sm_clocks(self, uuid: str, handle: Any) -> tuple[int, ...]:
        """Ascending SM clocks supported at the highest memory clock (the one serving runs
        at); the device's maximum SM clock alone when NVML lists none."""
        try:
            memory_mhz = max(
                int(v) for v in self._call("nvmlDeviceGetSupportedMemoryClocks", uuid, handle)
            )
            listed = self._call("nvmlDeviceGetSupportedGraphicsClocks", uuid, handle, memory_mhz)
            clocks = tuple(sorted({int(v) for v in listed}))
        except (GpuLost, GpuUnavailable):
            raise
        except (GpuError, ValueError):
            clocks = ()  # ValueError: an empty memory-clock list
        sm = getattr(self._nvml, "NVML_CLOCK_SM", 1)
        try:
            max_mhz = int(self._call("nvmlDeviceGetMaxClockInfo", uuid, handle, sm))
        except (GpuLost, GpuUnavailable):
            raise
        except GpuError:
            if not clocks:
                raise
            return clocks
        # Some boards (GeForce, some Ada parts) list clocks above the most they can reach:
        # locks there do nothing, and taken for f_max they would skew the models. With nothing
        # below f_max known the actuator does not lock the GPU (a lock at f_max alone would
        # keep it from clocking down when idle).
        return tuple(c for c in clocks if c <= max_mhz) or clocks or (max_mhz,)

    def _handle(self, uuid: str) -> Any:
        handle = self._handles.get(uuid)
        if handle is None:
            try:
                handle = self._call("nvmlDeviceGetHandleByUUID", uuid, uuid)
            except GpuLost:
                raise
            except GpuError as exc:
                raise GpuLost(
                    f"GPU {uuid} is not present: {exc}",
                    operation="nvmlDeviceGetHandleByUUID",
                    uuid=uuid,
                ) from exc
            self._handles[uuid] = handle
        return handle

    def _info(self, uuid: str) -> GpuInfo:
        """The GPU's description, described now if it was not: that GPU alone, so a call for
        one GPU (a restore in a fresh process) waits on no other, a stalled one included.
        Raises GpuLost when it is not present."""
        info = self._infos.get(uuid)
        if info is None:
            handle = self._handle(uuid)
            try:
                index = int(self._call("nvmlDeviceGetIndex", uuid, handle))
            except NotSupported as exc:
                # Every NVML since 2012 has the call. Not NotSupported, which a restore takes
                # for a GPU without the knob, so nothing to put back.
                raise GpuError(
                    f"GPU {uuid} cannot be described: {exc}", operation=exc.operation, uuid=uuid
                ) from exc
            info = self._infos[uuid] = self._describe(index, uuid, handle)
        return info

    # --- reads ----------------------------------------------------------------------------

    def _optional(self, operation: str, uuid: str, *args: Any) -> Any:
        """The call's result, or None when it fails for any reason but a lost GPU or NVML
        going away (those raise)."""
        try:
            return self._call(operation, uuid, *args)
        except (GpuLost, GpuUnavailable):
            raise
        except GpuError:
            return None

    @_on_gpu_thread("power limit read")
    def power_limit_mw(self, uuid: str) -> int | None:
        """The power limit now; None when it cannot be read. Raises GpuLost."""
        handle = self._handle(uuid)
        return _int_or_none(self._optional("nvmlDeviceGetPowerManagementLimit", uuid, handle))

    def read(self, uuid: str) -> GpuReading:
        """One telemetry reading (read_all of one GPU); raises its GpuError."""
        outcome = self.read_all([uuid])[uuid]
        if isinstance(outcome, GpuError):
            raise outcome
        return outcome

    def read_all(
        self, uuids: Sequence[str], *, wait_s: float | None = None
    ) -> dict[str, GpuReading | GpuError]:
        """One telemetry reading of each GPU, or the GpuError that stood in its way (GpuLost
        for a GPU gone); a value a device cannot give is None. A GPU whose firmware hangs
        holds every call on it for tens of seconds, so each GPU is read on a thread of its
        own, all at once, and waited for `stall_s` in all (`wait_s` when shorter): one that
        has not answered by then is taken for lost (its late reading is dropped), and until
        that call returns nothing else is called on it. A reading that took longer than
        `stall_s` is GpuLost too."""
        outcomes: dict[str, GpuReading | GpuError] = {}
        jobs: dict[str, tuple[_Reader, _Job[GpuReading]]] = {}
        for uuid in uuids:
            try:
                jobs[uuid] = self._submit(
                    uuid, _Job(functools.partial(self._read_now, uuid), "reading", "read")
                )
            except GpuError as exc:  # lost, or closed
                outcomes[uuid] = exc
        since_s, patience_s = time.monotonic(), self._patience_s(wait_s)
        try:
            for uuid, (reader, job) in jobs.items():
                try:
                    outcomes[uuid] = self._await(uuid, reader, job, since_s, patience_s)
                except GpuError as exc:
                    outcomes[uuid] = exc
                if job.done.is_set():
                    self.read_cpu_s[uuid] = job.cpu_s
        except BaseException:
            # Interrupted (see _await): every reading still in its call is in flight.
            self._hung.update({u: j for u, (_, j) in jobs.items() if not j.done.is_set()})
            raise
        return {uuid: outcomes[uuid] for uuid in uuids}

    def _hung_error(self, uuid: str) -> GpuLost | None:
        """GpuLost while a call on the GPU given up on has not returned (not counted: no call
        is made), else None; one that has returned is forgotten."""
        job = self._hung.get(uuid)  # the loop's thread may have let it go meanwhile
        if job is None or job.done.is_set():
            self._hung.pop(uuid, None)
            return None
        waited_s = time.monotonic() - job.started_s
        return GpuLost(
            f"GPU {uuid} has not answered a {job.what} started {waited_s:.0f} s ago",
            operation=job.operation,
            uuid=uuid,
        )

    def _still_hung(self) -> bool:
        """Whether a thread is still inside a call on a hung GPU."""
        self._hung = {uuid: job for uuid, job in list(self._hung.items()) if not job.done.is_set()}
        self._opening = {i: job for i, job in list(self._opening.items()) if not job.done.is_set()}
        return bool(self._hung or self._opening)

    def _read_now(self, uuid: str) -> GpuReading:
        info = self._info(uuid)
        handle = self._handle(uuid)
        nvml = self._nvml
        timestamp_s = self._clock()
        started_s = time.monotonic()
        sm, gpu_sensor = getattr(nvml, "NVML_CLOCK_SM", 1), getattr(nvml, "NVML_TEMPERATURE_GPU", 0)
        # (field, the call it comes from, its arguments after the handle)
        reads: tuple[tuple[str, str | tuple[str, ...], tuple[Any, ...]], ...] = (
            ("power_mw", "nvmlDeviceGetPowerUsage", ()),
            ("energy_mj", "nvmlDeviceGetTotalEnergyConsumption", ()),
            ("sm_clock_mhz", "nvmlDeviceGetClockInfo", (sm,)),
            ("power_limit_mw", "nvmlDeviceGetPowerManagementLimit", ()),
            ("enforced_power_limit_mw", "nvmlDeviceGetEnforcedPowerLimit", ()),
            ("clock_event_reasons", _CLOCK_EVENT_REASONS, ()),
            ("temperature_c", _TEMPERATURE, (gpu_sensor,)),
        )
        values: dict[str, int | None] = {}
        for name, operation, args in reads:
            if isinstance(operation, tuple):
                value = self._optional_first(operation, uuid, handle, *args)
                operation = self._chosen.get(operation, operation[0])
            else:
                value = self._optional(operation, uuid, handle, *args)
            values[name] = _int_or_none(value)
            took_s = time.monotonic() - started_s
            if took_s > self._stall_s:
                slow = GpuLost(
                    f"GPU {uuid} stopped answering: its reading took {took_s:.1f} s, up to "
                    f"{operation}",
                    operation=operation,
                    uuid=uuid,
                )
                # One the loop gave up on was counted then.
                raise slow if uuid in self._hung else self._record(slow)
        return GpuReading(uuid=uuid, index=info.index, timestamp_s=timestamp_s, **values)

    @_on_gpu_thread("process list")
    def compute_pids(self, uuid: str) -> list[int]:
        """PIDs with a compute context on the GPU; empty when NVML cannot list them."""
        handle = self._handle(uuid)
        processes = self._optional_first(_RUNNING_PROCESSES, uuid, handle)
        if not processes:
            return []
        # An entry read with another driver's struct layout gives 0 or a garbage PID.
        return sorted({int(p.pid) for p in processes if 0 < int(p.pid) < self.pid_max})

    def symbols_used(self) -> dict[str, str]:
        """NVML functions that have older variants -> the variant this driver answered, for
        those read so far (drivers before R535 lack the newer symbols)."""
        return {operations[0]: chosen for operations, chosen in self._chosen.items()}

    def _optional_first(self, operations: tuple[str, ...], uuid: str, *args: Any) -> Any:
        """The result of the first of `operations` this driver and binding provide, remembered
        once one answered (a driver or binding older than a name lacks it); None as in
        _optional."""
        chosen = self._chosen.get(operations)
        if chosen is not None:
            return self._optional(chosen, uuid, *args)
        unsupported: NotSupported | None = None
        for operation in operations:
            if getattr(self._nvml, operation, None) is None:
                # A binding older than the name (nvidia-ml-py before 12.570 has no
                # nvmlDeviceGetTemperatureV): no NVML call failed, so none is counted.
                continue
            try:
                result = self._call(operation, uuid, *args, record=False)
            except NotSupported as error:
                # A driver older than the name (FunctionNotFound): an error only if no
                # other name answers either, counted under the first name as later reads are.
                unsupported = unsupported or error
                continue
            except GpuError as error:
                self._record(error)
                if isinstance(error, (GpuLost, GpuUnavailable)):
                    raise
                return None
            self._chosen[operations] = operation
            return result
        if unsupported is not None:
            self._record(unsupported)
        self._chosen[operations] = operations[0]  # none is supported: one error a read, not n
        return None

    # --- writes ---------------------------------------------------------------------------

    @_on_gpu_thread("clock lock")
    def set_locked_clocks(
        self, uuid: str, min_mhz: int, max_mhz: int, *, resend: bool = False
    ) -> tuple[int, int]:
        """Lock the SM clock into [min_mhz, max_mhz], each rounded down to a supported clock.
        Returns the range applied. NVML cannot read a lock back, so the range is remembered;
        a request for the range already set is not sent again, unless `resend`."""
        info = self._info(uuid)
        high = info.clamp_clock_mhz(max(min_mhz, max_mhz))
        low = min(info.clamp_clock_mhz(min(min_mhz, max_mhz)), high)
        if not resend and self._locked_mhz.get(uuid, ()) == (low, high):
            return low, high
        handle = self._handle(uuid)
        # If the call fails the driver's state is no longer known: forget it, so the next
        # request is sent whatever it is.
        self._locked_mhz.pop(uuid, None)
        self._call("nvmlDeviceSetGpuLockedClocks", uuid, handle, low, high)
        self._locked_mhz[uuid] = (low, high)
        return low, high

    @_on_gpu_thread("clock unlock")
    def reset_locked_clocks(self, uuid: str, *, resend: bool = False) -> None:
        """Unlock the SM clocks. Skipped only when powerd itself unlocked them last, unless
        `resend`."""
        if not resend and uuid in self._locked_mhz and self._locked_mhz[uuid] is None:
            return
        handle = self._handle(uuid)
        self._locked_mhz.pop(uuid, None)
        self._call("nvmlDeviceResetGpuLockedClocks", uuid, handle)
        self._locked_mhz[uuid] = None

    @_on_gpu_thread("power limit write")
    def set_power_limit(self, uuid: str, power_limit_mw: int) -> int:
        """Set the power limit, clamped to the device's constraints; returns the limit read
        back. Raises GpuError when the read-back differs from what was set by more than
        POWER_LIMIT_TOLERANCE_MW; a current limit that close already is left alone."""
        info = self._info(uuid)
        operation = "nvmlDeviceSetPowerManagementLimit"
        if uuid in self._limits_unread:
            info = self._read_limit_range(uuid, info)
        if uuid in self._power_fixed:
            raise self._record(
                NotSupported(
                    f"GPU {uuid} has no settable power limit", operation=operation, uuid=uuid
                )
            )
        target_mw = info.clamp_power_limit_mw(power_limit_mw)
        handle = self._handle(uuid)
        current_mw = self._optional("nvmlDeviceGetPowerManagementLimit", uuid, handle)
        if current_mw is not None and abs(int(current_mw) - target_mw) <= POWER_LIMIT_TOLERANCE_MW:
            return int(current_mw)
        self._call(operation, uuid, handle, target_mw)
        readback_mw = int(self._call("nvmlDeviceGetPowerManagementLimit", uuid, handle))
        if abs(readback_mw - target_mw) > POWER_LIMIT_TOLERANCE_MW:
            raise self._record(
                GpuError(
                    f"GPU {uuid}: power limit reads back as {readback_mw} mW after setting "
                    f"{target_mw} mW",
                    operation=operation,
                    uuid=uuid,
                )
            )
        return readback_mw

    @_on_gpu_thread("power limit reset")
    def reset_power_limit(self, uuid: str) -> None:
        """Set the power limit back to the device's default (NVML has no reset call)."""
        if uuid in self._power_fixed:
            return
        # The default as described (for a GPU whose range was unread then, the limit it
        # enforced, which is what the callers took for its default).
        self.set_power_limit(uuid, self._info(uuid).power_limit_default_mw)

    @_on_gpu_thread("description")
    def describe(self, uuid: str) -> GpuInfo:
        """The GPU's description as known now, its limit range read again first when a
        passing error kept it unread (the range stays pinned while the read still fails)."""
        info = self._info(uuid)
        if uuid not in self._limits_unread:
            return info
        try:
            return self._read_limit_range(uuid, info)
        except GpuError:
            return self._infos.get(uuid, info)

    def _read_limit_range(self, uuid: str, info: GpuInfo) -> GpuInfo:
        """`info` with the power-limit range read now, for a GPU whose range could not be read
        when it was described. Raises the read's GpuError (NotSupported: none, for good)."""
        try:
            min_mw, max_mw, default_mw = self._limit_range(uuid, self._handle(uuid))
        except NotSupported:
            self._limits_unread.discard(uuid)
            self._power_fixed.add(uuid)
            raise
        self._limits_unread.discard(uuid)
        info = replace(
            info,
            power_limit_min_mw=min_mw,
            power_limit_max_mw=max_mw,
            power_limit_default_mw=default_mw,
        )
        self._infos[uuid] = info
        return info


def _nvml_text(exc: Exception) -> str:
    try:
        return str(exc)
    except Exception:
        return type(exc).__name__


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)


def pid_max() -> int:
    """The kernel's pid_max: every PID is below it (a read of the host's, also in a container)."""
    try:
        return int(_PID_MAX_PATH.read_text(encoding="ascii").strip())
    except (OSError, ValueError):
        return _PID_MAX_LARGEST
