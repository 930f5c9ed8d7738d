"""A pynvml-compatible NVML driven by the simulated GPU plant.

`FakeNvml` has pynvml's function names, argument order, return types and units (mW, mJ, MHz,
°C) and raises pynvml's own error classes, so the NVML backend runs unchanged against it
(`nvml = FakeNvml(plant)` in place of `import pynvml`). It rejects what hardware rejects
(nvml_api.md §2, §3): every call before nvmlInit raises Uninitialized; setters raise
NoPermission when not privileged and InvalidArgument outside the device's constraints; a
pulled GPU raises GpuIsLost on every call. Tests add faults (`disable_feature`, `lose_gpu`,
`inject_error`) and read `writes`, the record of every successful setting change (an
`EntryLog`: bounded, so a long-running simulated node does not grow, yet indexed like a list
from the first write). It fills the gaps of the surveyed fakes (§9): power follows the cap,
enforced can differ from requested, the SwPowerCap bit, clocks fall under a cap, privilege
errors, settings surviving a restart (`state_file`) and an energy counter that integrates the
power.

Every method holds `lock`; the simulated node advances the plant under the same lock.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import operator
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar, overload

import pynvml  # noqa: TID251  raises pynvml's own error classes

from powerd.sim.device_state import DeviceStateError, DeviceStateFile, GpuSettings, Signature
from powerd.sim.plant import GpuPlant

DRIVER_VERSION = "590.48.01"
"""The driver of the H100/H200 captures in nvml_api.md §6."""

SUPPORTED_CLOCK_EVENT_REASONS = 0x1FF
"""Real H100/H200 report 0x1FF (nvml_api.md §3)."""

FEATURES = frozenset(
    {
        "power_usage",
        "energy",
        "power_limit",
        "enforced_power_limit",
        "locked_clocks",
        "clock_info",
        "supported_clocks",
        "clock_event_reasons",
        "temperature",
        "field_values",
        "processes",
        "persistence_mode",
        "utilization",
    }
)
"""Names accepted by disable_feature."""

WRITE_LOG_MAX_ENTRIES = 10_000
"""Entries FakeNvml's `writes`, `failed_writes` and `state_errors` keep unless its
`write_log_entries` says otherwise (`writes` grows by about 20,000 an hour on a 6-GPU
simulated node at 1-s ticks)."""

_FEATURE_OF: dict[str, str] = {
    "nvmlDeviceGetPowerUsage": "power_usage",
    "nvmlDeviceGetTotalEnergyConsumption": "energy",
    "nvmlDeviceGetPowerManagementLimit": "power_limit",
    "nvmlDeviceGetPowerManagementLimitConstraints": "power_limit",
    "nvmlDeviceGetPowerManagementDefaultLimit": "power_limit",
    "nvmlDeviceSetPowerManagementLimit": "power_limit",
    "nvmlDeviceGetEnforcedPowerLimit": "enforced_power_limit",
    "nvmlDeviceSetGpuLockedClocks": "locked_clocks",
    "nvmlDeviceResetGpuLockedClocks": "locked_clocks",
    "nvmlDeviceGetClockInfo": "clock_info",
    "nvmlDeviceGetMaxClockInfo": "clock_info",
    "nvmlDeviceGetSupportedMemoryClocks": "supported_clocks",
    "nvmlDeviceGetSupportedGraphicsClocks": "supported_clocks",
    "nvmlDeviceGetCurrentClocksEventReasons": "clock_event_reasons",
    "nvmlDeviceGetSupportedClocksEventReasons": "clock_event_reasons",
    "nvmlDeviceGetCurrentClocksThrottleReasons": "clock_event_reasons",
    "nvmlDeviceGetTemperature": "temperature",
    "nvmlDeviceGetTemperatureV": "temperature",
    "nvmlDeviceGetTemperatureThreshold": "temperature",
    "nvmlDeviceGetFieldValues": "field_values",
    "nvmlDeviceGetComputeRunningProcesses": "processes",
    "nvmlDeviceGetPersistenceMode": "persistence_mode",
    "nvmlDeviceSetPersistenceMode": "persistence_mode",
    "nvmlDeviceGetUtilizationRates": "utilization",
}

_FIELD_FEATURE: dict[int, str] = {
    pynvml.NVML_FI_DEV_POWER_AVERAGE: "power_usage",
    pynvml.NVML_FI_DEV_POWER_INSTANT: "power_usage",
    pynvml.NVML_FI_DEV_ENERGY: "energy",
    pynvml.NVML_FI_DEV_POWER_MIN_LIMIT: "power_limit",
    pynvml.NVML_FI_DEV_POWER_MAX_LIMIT: "power_limit",
    pynvml.NVML_FI_DEV_POWER_DEFAULT_LIMIT: "power_limit",
    pynvml.NVML_FI_DEV_POWER_CURRENT_LIMIT: "enforced_power_limit",
    pynvml.NVML_FI_DEV_POWER_REQUESTED_LIMIT: "power_limit",
}
"""Field ids nvmlDeviceGetFieldValues answers, and the feature each belongs to."""

_UNSET = 0xFFFFFFFF
"""gpuInstanceId / computeInstanceId of a process on a GPU without MIG."""


T = TypeVar("T")


class DroppedEntriesError(IndexError):
    """An EntryLog was asked for an entry it no longer keeps."""


class EntryLog(Sequence[T]):
    """An append-only log that keeps its last `max_entries` entries under their absolute
    positions.

    len() counts every entry ever appended, and log[i] and log[i:] index from the first, as on
    a list, so `since = len(log)` taken before an action finds that action's entries in
    `log[since:]`. Asking for an entry that was dropped (iterating or comparing the whole log
    included) raises DroppedEntriesError rather than answering from what is left. clear() starts
    over from position 0.
    """

    def __init__(self, max_entries: int = WRITE_LOG_MAX_ENTRIES) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}")
        self.max_entries = max_entries
        self._tail: collections.deque[T] = collections.deque(maxlen=max_entries)
        self._count = 0

    @property
    def dropped(self) -> int:
        """How many of the first entries are no longer kept."""
        return self._count - len(self._tail)

    def append(self, entry: T) -> None:
        self._tail.append(entry)
        self._count += 1

    def clear(self) -> None:
        self._tail.clear()
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def _check_kept(self, first: int) -> None:
        if first < self.dropped:
            raise DroppedEntriesError(
                f"entry {first} of this log was dropped: it keeps the last {self.max_entries} "
                f"of {self._count} entries (positions {self.dropped}..{self._count - 1})"
            )

    @overload
    def __getitem__(self, index: int) -> T: ...

    @overload
    def __getitem__(self, index: slice) -> list[T]: ...

    def __getitem__(self, index: int | slice) -> T | list[T]:
        if isinstance(index, slice):
            positions = range(*index.indices(self._count))
            if not positions:
                return []
            first = min(positions[0], positions[-1])
            self._check_kept(first)
            start = first - self.dropped
            kept = list(
                itertools.islice(self._tail, start, start + abs(positions[-1] - positions[0]) + 1)
            )
            return [kept[p - first] for p in positions]
        position = operator.index(index)
        if position < 0:
            position += self._count
        if not 0 <= position < self._count:
            raise IndexError(f"log index {index} out of range ({self._count} entries)")
        self._check_kept(position)
        return self._tail[position - self.dropped]

    def __iter__(self) -> Iterator[T]:
        self._check_kept(0)
        return iter(list(self._tail))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, EntryLog):
            return len(self) == len(other) and list(self) == list(other)
        if isinstance(other, list):
            return len(self) == len(other) and list(self) == other
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        dropped = f"<{self.dropped} dropped>, " if self.dropped else ""
        return f"EntryLog({dropped}{list(self._tail)!r})"


class FakeHandle:
    """An opaque device handle. Like NVML's ctypes pointers, two handles to one GPU are not
    equal; compare UUIDs instead."""

    __slots__ = ("_index", "_owner")

    def __init__(self, owner: FakeNvml, index: int) -> None:
        self._owner = owner
        self._index = index

    def __repr__(self) -> str:
        return f"<FakeNvml device handle {self._index}>"


def fake_uuid(seed: int, index: int, profile_name: str = "") -> str:
    """A deterministic "GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx" UUID."""
    digest = hashlib.sha256(f"powerd-sim:{profile_name}:{seed}:{index}".encode()).hexdigest()
    return f"GPU-{digest[:8]}-{digest[8:12]}-{digest[12:16]}-{digest[16:20]}-{digest[20:32]}"


def _c_uint(value: Any) -> int:
    """What ctypes.c_uint accepts: integers only (a float is a TypeError, as in pynvml)."""
    if isinstance(value, bool):
        return int(value)
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"int expected instead of {type(value).__name__}") from None


def _field_ids(field_ids: Iterable[Any]) -> list[tuple[int, int]]:
    out = []
    for entry in field_ids:
        if isinstance(entry, tuple):
            out.append((int(entry[0]), int(entry[1])))
        else:
            out.append((int(entry), 0))
    return out


class FakeNvml:
    """pynvml over a GpuPlant; see the module docstring."""

    # pynvml's error classes and constants, re-exported so `nvml.X` works for either object.
    NVMLError = pynvml.NVMLError
    NVMLError_Uninitialized = pynvml.NVMLError_Uninitialized
    NVMLError_InvalidArgument = pynvml.NVMLError_InvalidArgument
    NVMLError_NotSupported = pynvml.NVMLError_NotSupported
    NVMLError_NoPermission = pynvml.NVMLError_NoPermission
    NVMLError_NotFound = pynvml.NVMLError_NotFound
    NVMLError_GpuIsLost = pynvml.NVMLError_GpuIsLost
    NVMLError_Unknown = pynvml.NVMLError_Unknown
    NVMLError_FunctionNotFound = pynvml.NVMLError_FunctionNotFound
    NVMLError_DriverNotLoaded = pynvml.NVMLError_DriverNotLoaded
    NVMLError_LibraryNotFound = pynvml.NVMLError_LibraryNotFound
    NVMLError_Timeout = pynvml.NVMLError_Timeout
    NVML_SUCCESS = pynvml.NVML_SUCCESS
    NVML_CLOCK_GRAPHICS = pynvml.NVML_CLOCK_GRAPHICS
    NVML_CLOCK_SM = pynvml.NVML_CLOCK_SM
    NVML_CLOCK_MEM = pynvml.NVML_CLOCK_MEM
    NVML_CLOCK_VIDEO = pynvml.NVML_CLOCK_VIDEO
    NVML_TEMPERATURE_GPU = pynvml.NVML_TEMPERATURE_GPU
    NVML_FI_DEV_POWER_AVERAGE = pynvml.NVML_FI_DEV_POWER_AVERAGE
    NVML_FI_DEV_POWER_INSTANT = pynvml.NVML_FI_DEV_POWER_INSTANT
    NVML_FI_DEV_ENERGY = pynvml.NVML_FI_DEV_ENERGY
    NVML_CLOCK_LIMIT_ID_TDP = pynvml.NVML_CLOCK_LIMIT_ID_TDP
    NVML_CLOCK_LIMIT_ID_UNLIMITED = pynvml.NVML_CLOCK_LIMIT_ID_UNLIMITED
    NVML_FEATURE_DISABLED = pynvml.NVML_FEATURE_DISABLED
    NVML_FEATURE_ENABLED = pynvml.NVML_FEATURE_ENABLED

    def __init__(
        self,
        plant: GpuPlant,
        *,
        lock: threading.RLock | None = None,
        privileged: bool = True,
        state_file: str | None = None,
        uuids: list[str] | None = None,
        persistence_mode: int = pynvml.NVML_FEATURE_ENABLED,
        driver_version: str = DRIVER_VERSION,
        write_log_entries: int = WRITE_LOG_MAX_ENTRIES,
    ) -> None:
        n = plant.n_gpus
        if uuids is not None and (len(uuids) != n or len(set(uuids)) != n):
            raise ValueError(f"uuids must name {n} distinct GPUs, got {uuids!r}")
        self.plant = plant
        self.lock = lock if lock is not None else threading.RLock()
        self.privileged = privileged
        self.driver_version = driver_version
        self.uuids: list[str] = (
            list(uuids)
            if uuids
            else [fake_uuid(plant.seed, i, plant.profile.name) for i in range(n)]
        )
        self.writes: EntryLog[tuple[str, int, tuple[Any, ...]]] = EntryLog(write_log_entries)
        """Every successful setting change: (function name, GPU index, arguments after handle)."""
        self.failed_writes: EntryLog[tuple[str, int, tuple[Any, ...], str]] = EntryLog(
            write_log_entries
        )
        """Setter calls that raised: (function name, index, arguments, error class name)."""
        self.call_counts: collections.Counter[str] = collections.Counter()
        self.state_errors: EntryLog[str] = EntryLog(write_log_entries)
        """Why the state file could not be read during a call (surfaced as NVMLError_Unknown)."""
        self._init_count = 0
        self._lost: set[int] = set()
        self._disabled: dict[int, set[str]] = collections.defaultdict(set)
        self._injected: dict[tuple[int | None, str], tuple[type[pynvml.NVMLError], bool]] = {}
        self._stalled: dict[int, tuple[float, frozenset[str] | None, bool]] = {}
        """GPU index -> (how long its calls wait, the functions that do (None: all), whether
        they answer after the wait rather than time out)."""
        self.sleep: Callable[[float], None] = time.sleep
        """How a stalled GPU's calls wait (a test may count the time instead)."""
        self._pids: dict[int, list[tuple[int, int | None]]] = {}
        self._default_persistence = persistence_mode
        self._persistence = [persistence_mode] * n
        self._state: DeviceStateFile | None = None
        self._state_sig: Signature | None = None
        if state_file is not None:
            self._state = DeviceStateFile(state_file)
            self._sync_state(immediate=True)

    # -- test controls ------------------------------------------------------------------------

    def disable_feature(self, i: int, feature: str) -> None:
        """Make GPU i raise NotSupported for a feature (one of FEATURES)."""
        if feature not in FEATURES:
            raise ValueError(f"unknown feature {feature!r}; known: {', '.join(sorted(FEATURES))}")
        with self.lock:
            self._disabled[self._check_index(i)].add(feature)

    def enable_feature(self, i: int, feature: str) -> None:
        with self.lock:
            self._disabled[self._check_index(i)].discard(feature)

    def lose_gpu(self, i: int) -> None:
        """Pull GPU i off the bus: every call on it raises GpuIsLost."""
        with self.lock:
            self._lost.add(self._check_index(i))

    def restore_gpu(self, i: int) -> None:
        with self.lock:
            self._lost.discard(self._check_index(i))

    def stall_gpu(
        self,
        i: int,
        seconds: float,
        functions: Sequence[str] | None = None,
        *,
        answer: bool = False,
    ) -> None:
        """Make every call on GPU i (or only those of `functions`) wait `seconds`, then raise
        Timeout, as on a GPU whose firmware hangs (Xid 119: each call waits out the driver's
        RPC timeout); with `answer`, then answer as usual (a slow GPU, or a write that lands
        late)."""
        for function in functions or ():
            self._check_function(function)
        with self.lock:
            self._stalled[self._check_index(i)] = (
                seconds,
                None if functions is None else frozenset(functions),
                answer,
            )

    def unstall_gpu(self, i: int) -> None:
        with self.lock:
            self._stalled.pop(self._check_index(i), None)

    def inject_error(
        self,
        i: int | None,
        function: str,
        error: type[pynvml.NVMLError],
        *,
        persistent: bool = False,
    ) -> None:
        """Make `function` raise `error` (a pynvml error class) on GPU i (None: calls that take
        no handle, e.g. nvmlInit) once, or on every call when persistent."""
        if not (isinstance(error, type) and issubclass(error, pynvml.NVMLError)):
            raise TypeError(f"error must be a pynvml NVMLError class, got {error!r}")
        if not function.startswith("nvml"):
            raise ValueError(f"not an NVML function name: {function!r}")
        self._check_function(function)
        with self.lock:
            self._injected[(None if i is None else self._check_index(i), function)] = (
                error,
                persistent,
            )

    def clear_errors(self) -> None:
        with self.lock:
            self._injected.clear()

    def set_compute_pids(
        self, i: int, pids: Sequence[int], used_memory_bytes: int | None = None
    ) -> None:
        """Processes nvmlDeviceGetComputeRunningProcesses reports on GPU i."""
        with self.lock:
            self._pids[self._check_index(i)] = [(int(p), used_memory_bytes) for p in pids]

    def set_privileged(self, privileged: bool) -> None:
        with self.lock:
            self.privileged = privileged

    def handle_index(self, handle: Any) -> int:
        """The GPU index behind a handle this object gave out."""
        if not isinstance(handle, FakeHandle) or handle._owner is not self:
            raise pynvml.NVMLError_InvalidArgument()
        return handle._index

    # -- internals ------------------------------------------------------------------------------

    def _check_function(self, function: str) -> None:
        """ValueError for a function the fake does not have: a fault set on a call nothing
        makes would never fire, and the test that set it would pass without testing anything."""
        if not callable(getattr(self, function, None)):
            raise ValueError(f"the fake NVML has no {function}")

    def _check_index(self, i: int) -> int:
        if not 0 <= i < self.plant.n_gpus:
            raise IndexError(f"GPU index {i} out of range 0..{self.plant.n_gpus - 1}")
        return i

    def _raise_injected(self, i: int | None, function: str) -> None:
        entry = self._injected.get((i, function))
        if entry is None:
            return
        error, persistent = entry
        if not persistent:
            del self._injected[(i, function)]
        raise error()

    def _begin(self, function: str) -> None:
        self.call_counts[function] += 1
        if self._init_count <= 0:
            raise pynvml.NVMLError_Uninitialized()
        self._raise_injected(None, function)

    def _wait_unlocked(self, seconds: float) -> None:
        """Wait as a hung GPU's call does, the fake's lock let go meanwhile: the hang holds
        that GPU's calls, not every GPU's nor the simulated node's (whether a real driver
        holds other GPUs' calls too is not known here)."""
        try:
            saved = self.lock._release_save()  # type: ignore[attr-defined]
        except RuntimeError:  # not held by this thread
            self.sleep(seconds)
            return
        try:
            self.sleep(seconds)
        finally:
            self.lock._acquire_restore(saved)  # type: ignore[attr-defined]

    def _device(self, function: str, handle: Any) -> int:
        self._begin(function)
        i = self.handle_index(handle)
        self._raise_injected(i, function)
        stalled = self._stalled.get(i)
        if stalled is not None and (stalled[1] is None or function in stalled[1]):
            seconds, _, answer = stalled
            self._wait_unlocked(seconds)
            if not answer:
                raise pynvml.NVMLError_Timeout()
        if i in self._lost or self.plant.is_shut_down(i):
            raise pynvml.NVMLError_GpuIsLost()
        feature = _FEATURE_OF.get(function)
        if feature is not None and feature in self._disabled.get(i, ()):
            raise pynvml.NVMLError_NotSupported()
        try:
            self._sync_state(immediate=False)
        except (DeviceStateError, OSError) as exc:
            # A damaged state file is the fake's problem, never the caller's: report it as
            # an NVML error the backend already handles.
            self.state_errors.append(str(exc))
            raise pynvml.NVMLError_Unknown() from exc
        return i

    def _setter(
        self, function: str, handle: Any, args: tuple[Any, ...], apply: Callable[[int], None]
    ) -> None:
        index = handle._index if isinstance(handle, FakeHandle) else -1
        try:
            i = self._device(function, handle)
            if not self.privileged:
                raise pynvml.NVMLError_NoPermission()
            apply(i)
        except pynvml.NVMLError as exc:
            self.failed_writes.append((function, index, args, type(exc).__name__))
            raise
        self.writes.append((function, i, args))
        self._save_state(i)

    def _settings(self, i: int) -> GpuSettings:
        plant = self.plant
        limit = plant.power_limit_mw(i)
        default = round(plant.profile.power_limit_default_w * 1000)
        persistence = self._persistence[i]
        return GpuSettings(
            power_limit_mw=None if limit == default else limit,
            locked_clocks_mhz=plant.locked_clocks(i),
            persistence_mode=None if persistence == self._default_persistence else persistence,
        )

    def _save_state(self, i: int) -> None:
        if self._state is not None:
            self._state_sig = self._state.update(self.uuids[i], self._settings(i))

    def _sync_state(self, *, immediate: bool) -> None:
        """Adopt settings another process left in the state file (at once when starting)."""
        if self._state is None:
            return
        sig = self._state.signature()
        if sig == self._state_sig:
            return
        saved = self._state.read()
        self._state_sig = sig
        dead_time = 0.0 if immediate else None
        plant = self.plant
        for i, uuid in enumerate(self.uuids):
            s = saved.get(uuid, GpuSettings())
            limit = (
                s.power_limit_mw
                if s.power_limit_mw is not None
                else round(plant.profile.power_limit_default_w * 1000)
            )
            if plant.power_limit_mw(i) != limit:
                plant.set_power_limit_mw(i, limit, dead_time_s=dead_time)
            if plant.locked_clocks(i) != s.locked_clocks_mhz:
                if s.locked_clocks_mhz is None:
                    plant.reset_locked_clocks(i, dead_time_s=dead_time)
                else:
                    lo, hi = s.locked_clocks_mhz
                    plant.set_locked_clocks(i, lo, hi, dead_time_s=dead_time)
            mode = s.persistence_mode
            self._persistence[i] = self._default_persistence if mode is None else mode

    # -- lifecycle --------------------------------------------------------------------------------

    def nvmlInit(self) -> None:
        self.nvmlInitWithFlags(0)

    def nvmlInitWithFlags(self, flags: int) -> None:
        with self.lock:
            self.call_counts["nvmlInit"] += 1
            self._raise_injected(None, "nvmlInit")
            self._init_count += 1
            self._sync_state(immediate=False)

    def nvmlShutdown(self) -> None:
        with self.lock:
            self._begin("nvmlShutdown")
            self._init_count -= 1

    def nvmlSystemGetDriverVersion(self) -> str:
        with self.lock:
            self._begin("nvmlSystemGetDriverVersion")
            return self.driver_version

    def nvmlDeviceGetCount(self) -> int:
        with self.lock:
            self._begin("nvmlDeviceGetCount")
            return self.plant.n_gpus

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeHandle:
        with self.lock:
            self._begin("nvmlDeviceGetHandleByIndex")
            index = _c_uint(index)
            if not 0 <= index < self.plant.n_gpus:
                raise pynvml.NVMLError_InvalidArgument()
            self._raise_injected(index, "nvmlDeviceGetHandleByIndex")
            if index in self._lost:
                raise pynvml.NVMLError_GpuIsLost()
            return FakeHandle(self, index)

    def nvmlDeviceGetHandleByUUID(self, uuid: str | bytes) -> FakeHandle:
        with self.lock:
            self._begin("nvmlDeviceGetHandleByUUID")
            text = uuid.decode() if isinstance(uuid, bytes) else str(uuid)
            if text not in self.uuids:
                raise pynvml.NVMLError_NotFound()
            index = self.uuids.index(text)
            self._raise_injected(index, "nvmlDeviceGetHandleByUUID")
            if index in self._lost:
                raise pynvml.NVMLError_GpuIsLost()
            return FakeHandle(self, index)

    # -- identity ---------------------------------------------------------------------------------

    def nvmlDeviceGetUUID(self, handle: Any) -> str:
        with self.lock:
            return self.uuids[self._device("nvmlDeviceGetUUID", handle)]

    def nvmlDeviceGetName(self, handle: Any) -> str:
        with self.lock:
            self._device("nvmlDeviceGetName", handle)
            return self.plant.profile.nvml_name

    def nvmlDeviceGetIndex(self, handle: Any) -> int:
        with self.lock:
            return self._device("nvmlDeviceGetIndex", handle)

    # -- power and energy -------------------------------------------------------------------------

    def nvmlDeviceGetPowerUsage(self, handle: Any) -> int:
        """mW: the 1-s average on Hopper/Ada, the instant reading on A100 (§2)."""
        with self.lock:
            return self.plant.power_usage_mw(self._device("nvmlDeviceGetPowerUsage", handle))

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: Any) -> int:
        """mJ since driver load, updated every 100 ms."""
        with self.lock:
            return self.plant.energy_mj(self._device("nvmlDeviceGetTotalEnergyConsumption", handle))

    def nvmlDeviceGetPowerManagementLimit(self, handle: Any) -> int:
        with self.lock:
            return self.plant.power_limit_mw(
                self._device("nvmlDeviceGetPowerManagementLimit", handle)
            )

    def nvmlDeviceGetPowerManagementLimitConstraints(self, handle: Any) -> list[int]:
        with self.lock:
            self._device("nvmlDeviceGetPowerManagementLimitConstraints", handle)
            p = self.plant.profile
            return [round(p.power_limit_min_w * 1000), round(p.power_limit_max_w * 1000)]

    def nvmlDeviceGetPowerManagementDefaultLimit(self, handle: Any) -> int:
        with self.lock:
            self._device("nvmlDeviceGetPowerManagementDefaultLimit", handle)
            return round(self.plant.profile.power_limit_default_w * 1000)

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: Any) -> int:
        with self.lock:
            return self.plant.enforced_power_limit_mw(
                self._device("nvmlDeviceGetEnforcedPowerLimit", handle)
            )

    def nvmlDeviceSetPowerManagementLimit(self, handle: Any, limit: int) -> None:
        """mW; root; InvalidArgument outside the constraints."""

        def apply(i: int) -> None:
            p = self.plant.profile
            value = _c_uint(limit)
            if not p.power_limit_min_w * 1000 <= value <= p.power_limit_max_w * 1000:
                raise pynvml.NVMLError_InvalidArgument()
            self.plant.set_power_limit_mw(i, value)

        with self.lock:
            self._setter("nvmlDeviceSetPowerManagementLimit", handle, (limit,), apply)

    # -- clocks -----------------------------------------------------------------------------------

    def nvmlDeviceGetClockInfo(self, handle: Any, clock_type: int) -> int:
        with self.lock:
            i = self._device("nvmlDeviceGetClockInfo", handle)
            if clock_type in (pynvml.NVML_CLOCK_SM, pynvml.NVML_CLOCK_GRAPHICS):
                return self.plant.sm_clock_readback_mhz(i)
            if clock_type == pynvml.NVML_CLOCK_MEM:
                return self.plant.profile.mem_clock_mhz
            if clock_type == pynvml.NVML_CLOCK_VIDEO:
                raise pynvml.NVMLError_NotSupported()
            raise pynvml.NVMLError_InvalidArgument()

    def nvmlDeviceGetMaxClockInfo(self, handle: Any, clock_type: int) -> int:
        with self.lock:
            self._device("nvmlDeviceGetMaxClockInfo", handle)
            if clock_type in (pynvml.NVML_CLOCK_SM, pynvml.NVML_CLOCK_GRAPHICS):
                return self.plant.profile.sm_clock_max_mhz
            if clock_type == pynvml.NVML_CLOCK_MEM:
                return self.plant.profile.mem_clock_mhz
            if clock_type == pynvml.NVML_CLOCK_VIDEO:
                raise pynvml.NVMLError_NotSupported()
            raise pynvml.NVMLError_InvalidArgument()

    def nvmlDeviceGetSupportedMemoryClocks(self, handle: Any) -> list[int]:
        with self.lock:
            self._device("nvmlDeviceGetSupportedMemoryClocks", handle)
            return [self.plant.profile.mem_clock_mhz]

    def nvmlDeviceGetSupportedGraphicsClocks(self, handle: Any, memory_clock_mhz: int) -> list[int]:
        """Every SM clock, highest first (81 values 1410..210 on A100, §1)."""
        with self.lock:
            self._device("nvmlDeviceGetSupportedGraphicsClocks", handle)
            if memory_clock_mhz != self.plant.profile.mem_clock_mhz:
                raise pynvml.NVMLError_NotFound()
            return list(self.plant.profile.supported_sm_clocks_mhz)

    def nvmlDeviceSetGpuLockedClocks(
        self, handle: Any, min_gpu_clock_mhz: int, max_gpu_clock_mhz: int
    ) -> None:
        """root; both NVML_CLOCK_LIMIT_ID_* symbols mean unlocked; mixing a symbol with MHz,
        min > max or a clock outside the device range is InvalidArgument."""
        symbols = (pynvml.NVML_CLOCK_LIMIT_ID_TDP, pynvml.NVML_CLOCK_LIMIT_ID_UNLIMITED)

        def apply(i: int) -> None:
            lo, hi = _c_uint(min_gpu_clock_mhz), _c_uint(max_gpu_clock_mhz)
            if lo in symbols and hi in symbols:
                self.plant.reset_locked_clocks(i)
                return
            p = self.plant.profile
            if (
                lo in symbols
                or hi in symbols
                or lo > hi
                or lo < p.sm_clock_min_mhz
                or hi > p.sm_clock_max_mhz
            ):
                raise pynvml.NVMLError_InvalidArgument()
            self.plant.set_locked_clocks(i, lo, hi)

        with self.lock:
            self._setter(
                "nvmlDeviceSetGpuLockedClocks",
                handle,
                (min_gpu_clock_mhz, max_gpu_clock_mhz),
                apply,
            )

    def nvmlDeviceResetGpuLockedClocks(self, handle: Any) -> None:
        with self.lock:
            self._setter(
                "nvmlDeviceResetGpuLockedClocks", handle, (), self.plant.reset_locked_clocks
            )

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: Any) -> int:
        with self.lock:
            return self.plant.clock_event_reasons(
                self._device("nvmlDeviceGetCurrentClocksEventReasons", handle)
            )

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, handle: Any) -> int:
        """The name drivers before R535 give the same bits."""
        with self.lock:
            return self.plant.clock_event_reasons(
                self._device("nvmlDeviceGetCurrentClocksThrottleReasons", handle)
            )

    def nvmlDeviceGetSupportedClocksEventReasons(self, handle: Any) -> int:
        with self.lock:
            self._device("nvmlDeviceGetSupportedClocksEventReasons", handle)
            return SUPPORTED_CLOCK_EVENT_REASONS

    # -- thermal, utilisation, processes, persistence --------------------------------------------

    def nvmlDeviceGetTemperature(self, handle: Any, sensor: int) -> int:
        with self.lock:
            i = self._device("nvmlDeviceGetTemperature", handle)
            if sensor != pynvml.NVML_TEMPERATURE_GPU:
                raise pynvml.NVMLError_InvalidArgument()
            return self.plant.temperature_c(i)

    # The call and its version constant came with nvidia-ml-py 12.570; pyproject allows 12.535,
    # whose binding the fake mirrors by lacking the call too.
    if hasattr(pynvml, "nvmlTemperature_v1"):

        def nvmlDeviceGetTemperatureV(
            self, handle: Any, sensor: int, version: int = pynvml.nvmlTemperature_v1
        ) -> int:
            with self.lock:
                i = self._device("nvmlDeviceGetTemperatureV", handle)
                if version != pynvml.nvmlTemperature_v1:
                    raise pynvml.NVMLError_ArgumentVersionMismatch()
                if sensor != pynvml.NVML_TEMPERATURE_GPU:
                    raise pynvml.NVMLError_InvalidArgument()
                return self.plant.temperature_c(i)

    def nvmlDeviceGetMigMode(self, handle: Any) -> list[int]:
        """[current, pending]: the simulated GPUs run without MIG."""
        with self.lock:
            self._device("nvmlDeviceGetMigMode", handle)
            return [pynvml.NVML_DEVICE_MIG_DISABLE, pynvml.NVML_DEVICE_MIG_DISABLE]

    def nvmlDeviceGetTemperatureThreshold(self, handle: Any, threshold: int) -> int:
        with self.lock:
            self._device("nvmlDeviceGetTemperatureThreshold", handle)
            p = self.plant.profile
            values = {
                pynvml.NVML_TEMPERATURE_THRESHOLD_SHUTDOWN: p.t_shutdown_c,
                pynvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN: p.t_slowdown_c,
                pynvml.NVML_TEMPERATURE_THRESHOLD_GPU_MAX: p.t_max_operating_c,
            }
            value = values.get(threshold)
            if value is None:
                raise pynvml.NVMLError_NotSupported()
            return int(value)

    def nvmlDeviceGetUtilizationRates(self, handle: Any) -> Any:
        """A c_nvmlUtilization_t with .gpu and .memory in percent."""
        with self.lock:
            gpu, memory = self.plant.utilization_percent(
                self._device("nvmlDeviceGetUtilizationRates", handle)
            )
            return pynvml.c_nvmlUtilization_t(gpu=gpu, memory=memory)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: Any) -> list[Any]:
        """Objects with .pid, .usedGpuMemory (bytes or None), .gpuInstanceId, .computeInstanceId."""
        return self._processes("nvmlDeviceGetComputeRunningProcesses", handle)

    def nvmlDeviceGetComputeRunningProcesses_v2(self, handle: Any) -> list[Any]:
        """The call under the symbol drivers without _v3 (R470, 535.98) have."""
        return self._processes("nvmlDeviceGetComputeRunningProcesses_v2", handle)

    def _processes(self, function: str, handle: Any) -> list[Any]:
        with self.lock:
            i = self._device(function, handle)
            return [
                pynvml.nvmlFriendlyObject(
                    {
                        "pid": pid,
                        "usedGpuMemory": used,
                        "gpuInstanceId": _UNSET,
                        "computeInstanceId": _UNSET,
                    }
                )
                for pid, used in self._pids.get(i, [])
            ]

    def nvmlDeviceGetPersistenceMode(self, handle: Any) -> int:
        with self.lock:
            return self._persistence[self._device("nvmlDeviceGetPersistenceMode", handle)]

    def nvmlDeviceSetPersistenceMode(self, handle: Any, mode: int) -> None:
        def apply(i: int) -> None:
            if mode not in (pynvml.NVML_FEATURE_DISABLED, pynvml.NVML_FEATURE_ENABLED):
                raise pynvml.NVMLError_InvalidArgument()
            self._persistence[i] = mode

        with self.lock:
            self._setter("nvmlDeviceSetPersistenceMode", handle, (mode,), apply)

    # -- field values -----------------------------------------------------------------------------

    def nvmlDeviceGetFieldValues(self, handle: Any, field_ids: Sequence[Any]) -> Any:
        """A ctypes array of c_nvmlFieldValue_t, as pynvml returns; check each .nvmlReturn.
        Power fields in .value.uiVal (mW), energy in .value.ullVal (mJ); .timestamp in µs of
        simulated time of the last sensor publication."""
        with self.lock:
            i = self._device("nvmlDeviceGetFieldValues", handle)
            ids = _field_ids(field_ids)
            values = (pynvml.c_nvmlFieldValue_t * len(ids))()
            disabled = self._disabled.get(i, set())
            stamp = self.plant.sensor_timestamp_us(i)
            for k, (field_id, scope_id) in enumerate(ids):
                v = values[k]
                v.fieldId = field_id
                v.scopeId = scope_id
                v.timestamp = stamp
                v.latencyUsec = 0
                feature = _FIELD_FEATURE.get(field_id)
                if feature is None or scope_id != 0 or feature in disabled:
                    v.nvmlReturn = pynvml.NVML_ERROR_NOT_SUPPORTED
                    continue
                v.nvmlReturn = pynvml.NVML_SUCCESS
                if field_id == pynvml.NVML_FI_DEV_ENERGY:
                    v.valueType = pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG
                    v.value.ullVal = self.plant.energy_mj(i)
                else:
                    v.valueType = pynvml.NVML_VALUE_TYPE_UNSIGNED_INT
                    v.value.uiVal = self._power_field_mw(i, field_id)
            return values

    def _power_field_mw(self, i: int, field_id: int) -> int:
        plant = self.plant
        p = plant.profile
        if field_id == pynvml.NVML_FI_DEV_POWER_AVERAGE:
            return plant.power_average_mw(i)
        if field_id == pynvml.NVML_FI_DEV_POWER_INSTANT:
            return plant.power_instant_mw(i)
        if field_id == pynvml.NVML_FI_DEV_POWER_MIN_LIMIT:
            return round(p.power_limit_min_w * 1000)
        if field_id == pynvml.NVML_FI_DEV_POWER_MAX_LIMIT:
            return round(p.power_limit_max_w * 1000)
        if field_id == pynvml.NVML_FI_DEV_POWER_DEFAULT_LIMIT:
            return round(p.power_limit_default_w * 1000)
        if field_id == pynvml.NVML_FI_DEV_POWER_CURRENT_LIMIT:
            return plant.enforced_power_limit_mw(i)
        return plant.power_limit_mw(i)

    # -- everything else --------------------------------------------------------------------------

    def __getattr__(self, name: str) -> Callable[..., Any]:
        """NVML functions the fake does not model behave as on a driver that lacks them."""
        if name.startswith("nvml") and callable(getattr(pynvml, name, None)):

            def missing(*args: Any, **kwargs: Any) -> Any:
                with self.lock:
                    self._begin(name)
                    raise pynvml.NVMLError_FunctionNotFound()

            return missing
        raise AttributeError(f"{type(self).__name__!s} has no attribute {name!r}")


_REEXPORT_PREFIXES = ("NVML_", "NVMLError", "nvmlClocksEventReason", "nvmlClocksThrottleReason")
for _name in dir(pynvml):
    if _name.startswith(_REEXPORT_PREFIXES) and not hasattr(FakeNvml, _name):
        setattr(FakeNvml, _name, getattr(pynvml, _name))
FakeNvml.nvmlExceptionClass = staticmethod(pynvml.nvmlExceptionClass)  # type: ignore[attr-defined]
