"""FakeNvml: pynvml's names, types, units and errors over the simulated plant."""

from __future__ import annotations

import importlib.util
import sys
import threading
from types import ModuleType

import numpy as np
import pynvml
import pytest

from powerd.gpu.nvml import NvmlBackend
from powerd.model import REASON_SW_POWER_CAP
from powerd.sim import fake_nvml
from powerd.sim.fake_nvml import (
    FEATURES,
    WRITE_LOG_MAX_ENTRIES,
    DroppedEntriesError,
    EntryLog,
    FakeNvml,
    fake_uuid,
)
from powerd.sim.plant import S_SHUTDOWN, GpuPlant, load_gpu_profile

H100 = load_gpu_profile("h100-sxm")


def _advance(fake: FakeNvml, seconds: float, a: float = 0.5, m: float = 0.3, ctx: float = 1.0):
    n = fake.plant.n_gpus
    with fake.lock:
        for _ in range(round(seconds / 0.01)):
            fake.plant.step(0.01, np.full(n, a), np.full(n, m), np.full(n, ctx))


@pytest.fixture
def fake() -> FakeNvml:
    nvml = FakeNvml(GpuPlant(H100, 2, seed=1))
    nvml.nvmlInit()
    return nvml


def test_every_call_before_init_raises_uninitialized() -> None:
    nvml = FakeNvml(GpuPlant(H100, 1))
    for call in (
        nvml.nvmlDeviceGetCount,
        nvml.nvmlSystemGetDriverVersion,
        lambda: nvml.nvmlDeviceGetHandleByIndex(0),
        nvml.nvmlShutdown,
    ):
        with pytest.raises(pynvml.NVMLError_Uninitialized):
            call()
    nvml.nvmlInit()
    handle = nvml.nvmlDeviceGetHandleByIndex(0)
    nvml.nvmlShutdown()
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        nvml.nvmlDeviceGetPowerUsage(handle)


def test_init_is_reference_counted(fake: FakeNvml) -> None:
    fake.nvmlInitWithFlags(0)
    fake.nvmlShutdown()
    assert fake.nvmlDeviceGetCount() == 2
    fake.nvmlShutdown()
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        fake.nvmlDeviceGetCount()


def test_identity_and_handles(fake: FakeNvml) -> None:
    assert fake.nvmlSystemGetDriverVersion() == "590.48.01"
    h0, h0_again = fake.nvmlDeviceGetHandleByIndex(0), fake.nvmlDeviceGetHandleByIndex(0)
    assert h0 != h0_again  # like ctypes pointers
    uuid = fake.nvmlDeviceGetUUID(h0)
    assert uuid == fake_uuid(1, 0, "h100-sxm")
    assert uuid.startswith("GPU-") and len(uuid) == 40
    assert fake.nvmlDeviceGetUUID(fake.nvmlDeviceGetHandleByIndex(1)) != uuid
    assert fake.nvmlDeviceGetIndex(fake.nvmlDeviceGetHandleByUUID(uuid.encode())) == 0
    assert fake.nvmlDeviceGetName(h0) == "NVIDIA H100 80GB HBM3"
    with pytest.raises(pynvml.NVMLError_NotFound):
        fake.nvmlDeviceGetHandleByUUID("GPU-00000000-0000-0000-0000-000000000000")
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        fake.nvmlDeviceGetHandleByIndex(2)
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        fake.nvmlDeviceGetPowerUsage(object())
    other = FakeNvml(GpuPlant(H100, 2, seed=1), uuids=["GPU-a", "GPU-b"])
    other.nvmlInit()
    assert other.nvmlDeviceGetUUID(other.nvmlDeviceGetHandleByIndex(1)) == "GPU-b"
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        other.nvmlDeviceGetName(h0)  # a handle of another NVML


def test_readings_have_pynvml_types_and_units(fake: FakeNvml) -> None:
    _advance(fake, 2.0, a=1.1)
    h = fake.nvmlDeviceGetHandleByIndex(0)
    power_mw = fake.nvmlDeviceGetPowerUsage(h)
    assert isinstance(power_mw, int) and 600_000 < power_mw < 760_000
    assert isinstance(fake.nvmlDeviceGetTotalEnergyConsumption(h), int)
    assert fake.nvmlDeviceGetPowerManagementLimit(h) == 700_000
    assert fake.nvmlDeviceGetPowerManagementLimitConstraints(h) == [200_000, 700_000]
    assert fake.nvmlDeviceGetPowerManagementDefaultLimit(h) == 700_000
    assert fake.nvmlDeviceGetEnforcedPowerLimit(h) == 700_000
    clock = fake.nvmlDeviceGetClockInfo(h, fake.NVML_CLOCK_SM)
    assert clock % 15 == 0 and 1500 <= clock <= 1980
    assert fake.nvmlDeviceGetClockInfo(h, fake.NVML_CLOCK_GRAPHICS) == clock
    assert fake.nvmlDeviceGetClockInfo(h, fake.NVML_CLOCK_MEM) == 2619
    assert fake.nvmlDeviceGetMaxClockInfo(h, fake.NVML_CLOCK_SM) == 1980
    assert fake.nvmlDeviceGetSupportedMemoryClocks(h) == [2619]
    clocks = fake.nvmlDeviceGetSupportedGraphicsClocks(h, 2619)
    assert clocks[0] == 1980 and clocks[-1] == 345 and len(clocks) == 110
    with pytest.raises(pynvml.NVMLError_NotFound):
        fake.nvmlDeviceGetSupportedGraphicsClocks(h, 1000)
    assert fake.nvmlDeviceGetCurrentClocksEventReasons(h) & REASON_SW_POWER_CAP
    assert fake.nvmlDeviceGetSupportedClocksEventReasons(h) == 0x1FF
    assert 30 <= fake.nvmlDeviceGetTemperature(h, fake.NVML_TEMPERATURE_GPU) <= 89
    assert (
        fake.nvmlDeviceGetTemperatureThreshold(h, pynvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN) == 89
    )
    util = fake.nvmlDeviceGetUtilizationRates(h)
    assert util.gpu > 50 and 0 < util.memory <= 100
    assert fake.nvmlDeviceGetPersistenceMode(h) == pynvml.NVML_FEATURE_ENABLED


def test_field_values_match_the_sensors_and_flag_unknown_fields(fake: FakeNvml) -> None:
    _advance(fake, 1.5, a=0.8)
    h = fake.nvmlDeviceGetHandleByIndex(1)
    values = fake.nvmlDeviceGetFieldValues(
        h,
        [
            fake.NVML_FI_DEV_POWER_INSTANT,
            fake.NVML_FI_DEV_POWER_AVERAGE,
            fake.NVML_FI_DEV_ENERGY,
            (pynvml.NVML_FI_DEV_POWER_CURRENT_LIMIT, 0),
            (fake.NVML_FI_DEV_POWER_INSTANT, 1),  # module scope: not on this board
            9999,
        ],
    )
    assert [v.fieldId for v in values] == [186, 185, 191, 190, 186, 9999]
    assert [v.nvmlReturn for v in values[:4]] == [pynvml.NVML_SUCCESS] * 4
    assert values[0].value.uiVal == fake.plant.power_instant_mw(1)
    assert values[1].value.uiVal == fake.nvmlDeviceGetPowerUsage(h)
    assert values[2].value.ullVal == fake.nvmlDeviceGetTotalEnergyConsumption(h)
    assert values[3].value.uiVal == 700_000
    assert values[4].nvmlReturn == values[5].nvmlReturn == pynvml.NVML_ERROR_NOT_SUPPORTED
    assert values[0].timestamp == pytest.approx(fake.plant.now_s * 1e6, abs=0.1e6 + 1)


def test_power_limit_setter_validates_and_records_the_write(fake: FakeNvml) -> None:
    h = fake.nvmlDeviceGetHandleByIndex(1)
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        fake.nvmlDeviceSetPowerManagementLimit(h, 150_000)
    with pytest.raises(TypeError):
        fake.nvmlDeviceSetPowerManagementLimit(h, 350_000.0)  # type: ignore[arg-type]
    assert fake.writes == []
    assert fake.failed_writes[0][:3] == ("nvmlDeviceSetPowerManagementLimit", 1, (150_000,))
    fake.nvmlDeviceSetPowerManagementLimit(h, 350_000)
    assert fake.writes == [("nvmlDeviceSetPowerManagementLimit", 1, (350_000,))]
    assert fake.nvmlDeviceGetPowerManagementLimit(h) == 350_000
    _advance(fake, 3.0, a=1.1)
    assert fake.nvmlDeviceGetEnforcedPowerLimit(h) == 350_000
    assert fake.nvmlDeviceGetPowerUsage(h) == pytest.approx(350_000, rel=0.05)
    assert fake.nvmlDeviceGetCurrentClocksEventReasons(h) & REASON_SW_POWER_CAP
    assert fake.nvmlDeviceGetClockInfo(h, fake.NVML_CLOCK_SM) < 1400


def test_enforced_limit_follows_an_out_of_band_cap(fake: FakeNvml) -> None:
    h = fake.nvmlDeviceGetHandleByIndex(0)
    fake.plant.set_out_of_band_limit_mw(0, 500_000)
    assert fake.nvmlDeviceGetPowerManagementLimit(h) == 700_000
    assert fake.nvmlDeviceGetEnforcedPowerLimit(h) == 500_000


def test_locked_clocks_validate_like_hardware(fake: FakeNvml) -> None:
    h = fake.nvmlDeviceGetHandleByIndex(0)
    for lo, hi in ((1500, 1200), (300, 1200), (345, 2000), (fake.NVML_CLOCK_LIMIT_ID_TDP, 1500)):
        with pytest.raises(pynvml.NVMLError_InvalidArgument):
            fake.nvmlDeviceSetGpuLockedClocks(h, lo, hi)
    fake.nvmlDeviceSetGpuLockedClocks(h, 345, 1410)
    _advance(fake, 0.3)
    assert fake.nvmlDeviceGetClockInfo(h, fake.NVML_CLOCK_SM) == 1410
    assert fake.plant.locked_clocks(0) == (345, 1410)
    tdp, unlimited = fake.NVML_CLOCK_LIMIT_ID_TDP, fake.NVML_CLOCK_LIMIT_ID_UNLIMITED
    fake.nvmlDeviceSetGpuLockedClocks(h, tdp, unlimited)  # both symbols: unlocked
    assert fake.plant.locked_clocks(0) is None
    fake.nvmlDeviceSetGpuLockedClocks(h, 900, 900)
    fake.nvmlDeviceResetGpuLockedClocks(h)
    _advance(fake, 0.3)
    assert fake.nvmlDeviceGetClockInfo(h, fake.NVML_CLOCK_SM) == 1980
    assert [w[0] for w in fake.writes] == [
        "nvmlDeviceSetGpuLockedClocks",
        "nvmlDeviceSetGpuLockedClocks",
        "nvmlDeviceSetGpuLockedClocks",
        "nvmlDeviceResetGpuLockedClocks",
    ]
    assert fake.writes[0] == ("nvmlDeviceSetGpuLockedClocks", 0, (345, 1410))


def test_the_write_log_is_bounded_and_keeps_absolute_positions() -> None:
    fake = FakeNvml(GpuPlant(H100, 1), write_log_entries=4)
    fake.nvmlInit()
    h = fake.nvmlDeviceGetHandleByIndex(0)
    for mhz in range(1000, 1006):
        fake.nvmlDeviceSetGpuLockedClocks(h, 345, mhz)
    log = fake.writes
    assert len(log) == 6 and log.dropped == 2
    assert log[2] == ("nvmlDeviceSetGpuLockedClocks", 0, (345, 1002))
    assert log[-1] == ("nvmlDeviceSetGpuLockedClocks", 0, (345, 1005))
    assert [args[1] for _, _, args in log[3:]] == [1003, 1004, 1005]
    assert [args[1] for _, _, args in log[5:1:-2]] == [1005, 1003]
    assert log[6:] == []
    assert log != [], "six entries are not none, whatever was dropped"
    for ask in (lambda: log[1], lambda: log[1:], lambda: list(log), lambda: log == [None] * 6):
        with pytest.raises(DroppedEntriesError, match=r"entry [01] of this log was dropped"):
            ask()
    with pytest.raises(IndexError, match="out of range"):
        log[6]
    log.clear()
    fake.nvmlDeviceResetGpuLockedClocks(h)
    assert log == [("nvmlDeviceResetGpuLockedClocks", 0, ())]


def test_a_long_running_fake_keeps_a_bounded_write_log(fake: FakeNvml) -> None:
    h = fake.nvmlDeviceGetHandleByIndex(0)
    n = WRITE_LOG_MAX_ENTRIES + 500
    for k in range(n):
        fake.nvmlDeviceSetGpuLockedClocks(h, 345, 1000 + k % 2)
    fake.set_privileged(False)
    for _ in range(n):
        with pytest.raises(pynvml.NVMLError_NoPermission):
            fake.nvmlDeviceResetGpuLockedClocks(h)
    for log in (fake.writes, fake.failed_writes):
        assert len(log) == n and log.dropped == n - WRITE_LOG_MAX_ENTRIES
    since = len(fake.writes) - 3
    assert len(fake.writes[since:]) == 3


def test_an_entry_log_compares_like_a_list() -> None:
    log: EntryLog[int] = EntryLog(3)
    other: EntryLog[int] = EntryLog(5)
    assert log == [] and log == other and not log and log != ()
    log.append(1)
    other.append(1)
    assert log == [1] and log == other and 1 in log and log.index(1) == 0
    for k in range(2, 6):
        log.append(k)
    assert (
        log != [1, 2] and log[2:] == [3, 4, 5] and repr(log) == "EntryLog(<2 dropped>, [3, 4, 5])"
    )
    with pytest.raises(ValueError, match="at least 1"):
        EntryLog(0)


def test_setters_need_privilege(fake: FakeNvml) -> None:
    fake.set_privileged(False)
    h = fake.nvmlDeviceGetHandleByIndex(0)
    for call in (
        lambda: fake.nvmlDeviceSetPowerManagementLimit(h, 400_000),
        lambda: fake.nvmlDeviceSetGpuLockedClocks(h, 345, 1500),
        lambda: fake.nvmlDeviceResetGpuLockedClocks(h),
        lambda: fake.nvmlDeviceSetPersistenceMode(h, 0),
    ):
        with pytest.raises(pynvml.NVMLError_NoPermission):
            call()
    assert fake.writes == []
    assert fake.nvmlDeviceGetPowerManagementLimit(h) == 700_000  # reads still work


def test_disabled_features_raise_not_supported(fake: FakeNvml) -> None:
    h = fake.nvmlDeviceGetHandleByIndex(0)
    fake.disable_feature(0, "energy")
    fake.disable_feature(0, "locked_clocks")
    with pytest.raises(pynvml.NVMLError_NotSupported):
        fake.nvmlDeviceGetTotalEnergyConsumption(h)
    with pytest.raises(pynvml.NVMLError_NotSupported):
        fake.nvmlDeviceSetGpuLockedClocks(h, 345, 1500)
    (energy,) = fake.nvmlDeviceGetFieldValues(h, [fake.NVML_FI_DEV_ENERGY])
    assert energy.nvmlReturn == pynvml.NVML_ERROR_NOT_SUPPORTED
    other = fake.nvmlDeviceGetHandleByIndex(1)
    assert fake.nvmlDeviceGetTotalEnergyConsumption(other) > 0
    fake.enable_feature(0, "energy")
    assert fake.nvmlDeviceGetTotalEnergyConsumption(h) > 0
    with pytest.raises(ValueError, match="unknown feature"):
        fake.disable_feature(0, "rgb_leds")
    assert "power_limit" in FEATURES


def test_a_lost_gpu_fails_every_call(fake: FakeNvml) -> None:
    h = fake.nvmlDeviceGetHandleByIndex(1)
    uuid = fake.nvmlDeviceGetUUID(h)
    fake.lose_gpu(1)
    for call in (
        lambda: fake.nvmlDeviceGetPowerUsage(h),
        lambda: fake.nvmlDeviceGetUUID(h),
        lambda: fake.nvmlDeviceGetHandleByIndex(1),
        lambda: fake.nvmlDeviceGetHandleByUUID(uuid),
        lambda: fake.nvmlDeviceSetPowerManagementLimit(h, 400_000),
        lambda: fake.nvmlDeviceGetFieldValues(h, [fake.NVML_FI_DEV_ENERGY]),
    ):
        with pytest.raises(pynvml.NVMLError_GpuIsLost):
            call()
    assert fake.nvmlDeviceGetCount() == 2
    assert fake.nvmlDeviceGetPowerUsage(fake.nvmlDeviceGetHandleByIndex(0)) > 0
    fake.restore_gpu(1)
    assert fake.nvmlDeviceGetPowerUsage(h) > 0


def test_injected_errors_are_one_shot_or_persistent(fake: FakeNvml) -> None:
    h = fake.nvmlDeviceGetHandleByIndex(0)
    fake.inject_error(0, "nvmlDeviceGetPowerUsage", pynvml.NVMLError_Unknown)
    with pytest.raises(pynvml.NVMLError_Unknown):
        fake.nvmlDeviceGetPowerUsage(h)
    assert fake.nvmlDeviceGetPowerUsage(h) > 0
    fake.inject_error(0, "nvmlDeviceGetTemperature", pynvml.NVMLError_Timeout, persistent=True)
    for _ in range(3):
        with pytest.raises(pynvml.NVMLError_Timeout):
            fake.nvmlDeviceGetTemperature(h, 0)
    fake.clear_errors()
    assert fake.nvmlDeviceGetTemperature(h, 0) > 0
    fake.inject_error(None, "nvmlInit", pynvml.NVMLError_DriverNotLoaded, persistent=True)
    with pytest.raises(pynvml.NVMLError_DriverNotLoaded):
        fake.nvmlInit()
    with pytest.raises(TypeError):
        fake.inject_error(0, "nvmlDeviceGetPowerUsage", RuntimeError)  # type: ignore[arg-type]
    # An error in a call nothing makes would never fire: the test that injected it would pass.
    with pytest.raises(ValueError, match="the fake NVML has no nvmlDeviceGetPowerUsageX"):
        fake.inject_error(0, "nvmlDeviceGetPowerUsageX", pynvml.NVMLError_Unknown)


def test_processes_and_unmodelled_functions(fake: FakeNvml) -> None:
    h = fake.nvmlDeviceGetHandleByIndex(0)
    assert fake.nvmlDeviceGetComputeRunningProcesses(h) == []
    fake.set_compute_pids(0, [4242, 4343], used_memory_bytes=1 << 30)
    procs = fake.nvmlDeviceGetComputeRunningProcesses(h)
    assert [p.pid for p in procs] == [4242, 4343]
    assert procs[0].usedGpuMemory == 1 << 30
    with pytest.raises(pynvml.NVMLError_FunctionNotFound):
        fake.nvmlDeviceGetEncoderUtilization(h)
    with pytest.raises(AttributeError):
        fake.nvmlDeviceGetNoSuchThing(h)  # type: ignore[attr-defined]


def test_reexports_pynvml_constants_and_error_classes(fake: FakeNvml) -> None:
    assert fake.NVMLError is pynvml.NVMLError
    assert fake.NVMLError_NoPermission is pynvml.NVMLError_NoPermission
    assert fake.NVMLError_InsufficientSize is pynvml.NVMLError_InsufficientSize  # type: ignore[attr-defined]
    assert fake.NVML_FI_DEV_POWER_INSTANT == 186 and fake.NVML_FI_DEV_ENERGY == 191
    assert fake.NVML_CLOCK_LIMIT_ID_UNLIMITED == 0xFFFFFF02
    assert fake.nvmlClocksEventReasonSwPowerCap == 0x4  # type: ignore[attr-defined]


def test_a_thermal_shutdown_looks_like_a_lost_gpu(fake: FakeNvml) -> None:
    h = fake.nvmlDeviceGetHandleByIndex(0)
    fake.plant.state[0, S_SHUTDOWN] = 1.0
    with pytest.raises(pynvml.NVMLError_GpuIsLost):
        fake.nvmlDeviceGetPowerUsage(h)


def test_concurrent_stepping_and_reading_is_safe(fake: FakeNvml) -> None:
    stop = threading.Event()

    def node() -> None:
        while not stop.is_set():
            _advance(fake, 0.05)

    thread = threading.Thread(target=node)
    thread.start()
    try:
        h = fake.nvmlDeviceGetHandleByIndex(0)
        last = fake.nvmlDeviceGetTotalEnergyConsumption(h)
        for _ in range(200):
            energy = fake.nvmlDeviceGetTotalEnergyConsumption(h)
            assert energy >= last
            last = energy
            fake.nvmlDeviceGetPowerUsage(h)
    finally:
        stop.set()
        thread.join()


def fake_nvml_before_12_570(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """powerd.sim.fake_nvml loaded anew over a pynvml as nvidia-ml-py before 12.570 has it
    (pyproject allows 12.535.108): without nvmlDeviceGetTemperatureV and nvmlTemperature_v1."""
    monkeypatch.delattr(pynvml, "nvmlDeviceGetTemperatureV", raising=False)
    monkeypatch.delattr(pynvml, "nvmlTemperature_v1", raising=False)
    spec = importlib.util.spec_from_file_location("fake_nvml_before_12_570", fake_nvml.__file__)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def test_the_fake_loads_and_reads_on_a_binding_before_12_570(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The simulated node, and with it the demo, the benchmark and a simulated `powerd run`,
    failed at import on such a binding."""
    nvml = fake_nvml_before_12_570(monkeypatch).FakeNvml(GpuPlant(H100, 1))
    assert not hasattr(nvml, "nvmlDeviceGetTemperatureV")
    backend = NvmlBackend(nvml)
    (info,) = backend.devices()
    assert backend.read(info.uuid).temperature_c is not None
    assert backend.symbols_used()["nvmlDeviceGetTemperatureV"] == "nvmlDeviceGetTemperature"


def test_a_stall_of_some_functions_holds_those_alone() -> None:
    fake = FakeNvml(GpuPlant(load_gpu_profile("h100-sxm"), 1, seed=1))
    fake.nvmlInit()
    handle = fake.nvmlDeviceGetHandleByIndex(0)
    waits: list[float] = []
    fake.sleep = waits.append
    fake.stall_gpu(0, 45.0, ["nvmlDeviceSetGpuLockedClocks"])
    assert fake.nvmlDeviceGetPowerUsage(handle) > 0
    with pytest.raises(pynvml.NVMLError_Timeout):
        fake.nvmlDeviceSetGpuLockedClocks(handle, 1005, 1005)
    assert waits == [45.0]
    with pytest.raises(ValueError, match="no nvmlDeviceSetClocks"):
        fake.stall_gpu(0, 45.0, ["nvmlDeviceSetClocks"])
