"""NvmlBackend over the fake NVML (pynvml's names, units and error classes) and the real
pynvml on a machine without a driver."""

from __future__ import annotations

import _thread
import ctypes
import gc
import logging
import signal
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pynvml
import pytest

from powerd.gpu import nvml as nvml_module
from powerd.gpu.errors import (
    GpuError,
    GpuLost,
    GpuUnavailable,
    InvalidArgument,
    NoPermission,
    NotSupported,
)
from powerd.gpu.nvml import NvmlBackend
from powerd.sim.fake_nvml import FakeNvml
from powerd.sim.plant import GpuPlant, load_gpu_profile
from tests.unit.clocks import Hang, ShiftedTime
from tests.unit.test_fake_nvml import fake_nvml_before_12_570

PROFILE = load_gpu_profile("h100-sxm")


def make_fake(n_gpus: int = 2, **kwargs: Any) -> FakeNvml:
    return FakeNvml(GpuPlant(PROFILE, n_gpus, seed=7), **kwargs)


@pytest.fixture
def fake() -> FakeNvml:
    return make_fake()


@pytest.fixture
def backend(fake: FakeNvml) -> NvmlBackend:
    return NvmlBackend(fake, clock=lambda: 1234.5)


# --- devices and reads ----------------------------------------------------------------------


def test_devices_describe_each_gpu(fake: FakeNvml, backend: NvmlBackend) -> None:
    infos = backend.devices()
    assert [i.index for i in infos] == [0, 1]
    assert [i.uuid for i in infos] == fake.uuids
    info = infos[0]
    assert info.name == PROFILE.nvml_name
    assert info.power_limit_min_mw == round(PROFILE.power_limit_min_w * 1000)
    assert info.power_limit_max_mw == round(PROFILE.power_limit_max_w * 1000)
    assert info.power_limit_default_mw == round(PROFILE.power_limit_default_w * 1000)
    clocks = info.supported_sm_clocks_mhz
    assert list(clocks) == sorted(set(PROFILE.supported_sm_clocks_mhz))
    assert (info.sm_clock_min_mhz, info.sm_clock_max_mhz) == (clocks[0], clocks[-1])
    assert info.sm_clock_max_mhz == PROFILE.sm_clock_max_mhz


def test_devices_leave_out_a_lost_gpu(fake: FakeNvml, backend: NvmlBackend) -> None:
    fake.lose_gpu(0)
    assert [i.uuid for i in backend.devices()] == [fake.uuids[1]]
    assert backend.error_counts[("nvmlDeviceGetHandleByIndex", "gpu_lost")] == 1
    unopened = backend.unopened_indices()
    assert list(unopened) == [0] and "lost" in unopened[0]
    fake.restore_gpu(0)
    assert len(backend.devices()) == 2 and backend.unopened_indices() == {}


def test_a_transient_error_describing_a_gpu_changes_nothing_for_good(
    fake: FakeNvml, backend: NvmlBackend
) -> None:
    """devices() runs again while a GPU cannot be opened: a GPU described before keeps its
    description, so one transient error then does not take its settable power limit away for
    the life of the process."""
    first = backend.devices()
    fake.inject_error(0, "nvmlDeviceGetPowerManagementLimitConstraints", pynvml.NVMLError_Unknown)
    assert backend.devices() == first
    assert backend.set_power_limit(fake.uuids[0], 500_000) == 500_000


def test_a_limit_range_unread_when_described_is_read_again_before_a_limit_is_set(
    fake: FakeNvml,
) -> None:
    """One passing error on the range read must not make a GPU one without a settable limit:
    a restore would take the refused write for 'powerd cannot have changed it'."""
    uuid = fake.uuids[0]
    fake.inject_error(0, "nvmlDeviceGetPowerManagementLimitConstraints", pynvml.NVMLError_Unknown)
    backend = NvmlBackend(fake)
    pinned = backend.devices()[0]
    assert pinned.power_limit_min_mw == pinned.power_limit_max_mw, "clamping leaves it alone"
    assert backend.set_power_limit(uuid, 300_000) == 300_000, "the range is read again first"
    backend.reset_power_limit(uuid)
    assert backend.power_limit_mw(uuid) == round(PROFILE.power_limit_default_w * 1000)
    # What was taken for its default then (the limit it enforced) is what a reset puts back,
    # not the device default read since: an operator's 500-W cap stays.
    fake.nvmlDeviceSetPowerManagementLimit(fake.nvmlDeviceGetHandleByIndex(0), 500_000)
    idle = np.zeros(fake.plant.n_gpus)
    fake.plant.step(1.0, idle, idle, idle)  # the board enforces it after its dead time
    capped = NvmlBackend(fake)
    fake.inject_error(0, "nvmlDeviceGetPowerManagementLimitConstraints", pynvml.NVMLError_Unknown)
    assert capped.devices()[0].power_limit_default_mw == 500_000
    capped.reset_power_limit(uuid)
    assert capped.power_limit_mw(uuid) == 500_000
    # An error that lasts is an error, not a missing knob.
    again = NvmlBackend(fake)
    fake.inject_error(
        0, "nvmlDeviceGetPowerManagementLimitConstraints", pynvml.NVMLError_Unknown, persistent=True
    )
    again.devices()
    with pytest.raises(GpuError) as error:
        again.set_power_limit(uuid, 300_000)
    assert not isinstance(error.value, NotSupported)


def test_describe_reads_a_range_left_unread_again(fake: FakeNvml) -> None:
    uuid = fake.uuids[0]
    fake.inject_error(
        0, "nvmlDeviceGetPowerManagementLimitConstraints", pynvml.NVMLError_Unknown, persistent=True
    )
    backend = NvmlBackend(fake)
    pinned = backend.devices()[0]
    assert backend.describe(uuid) == pinned, "still failing: still pinned"
    fake.clear_errors()
    described = backend.describe(uuid)
    assert described.power_limit_min_mw == round(PROFILE.power_limit_min_w * 1000)
    assert described.power_limit_max_mw == round(PROFILE.power_limit_max_w * 1000)
    assert backend.devices()[0] == described
    assert backend.describe(fake.uuids[1]) == backend.devices()[1]


def test_supported_clocks_fall_back_to_the_max_clock(fake: FakeNvml) -> None:
    fake.disable_feature(0, "supported_clocks")
    info = NvmlBackend(fake).devices()[0]
    assert info.supported_sm_clocks_mhz == (PROFILE.sm_clock_max_mhz,)


def test_read_returns_units_as_nvml_gives_them(fake: FakeNvml, backend: NvmlBackend) -> None:
    uuid = fake.uuids[1]
    reading = backend.read(uuid)
    assert reading.uuid == uuid
    assert reading.index == 1
    assert reading.timestamp_s == 1234.5
    assert reading.power_mw == fake.plant.power_usage_mw(1)
    assert reading.energy_mj == fake.plant.energy_mj(1)
    assert reading.sm_clock_mhz == fake.plant.sm_clock_readback_mhz(1)
    assert reading.power_limit_mw == round(PROFILE.power_limit_default_w * 1000)
    assert reading.enforced_power_limit_mw == fake.plant.enforced_power_limit_mw(1)
    assert reading.clock_event_reasons == fake.plant.clock_event_reasons(1)
    assert reading.temperature_c == fake.plant.temperature_c(1)
    assert backend.error_counts == {}


def test_unsupported_reads_are_none_and_counted(fake: FakeNvml, backend: NvmlBackend) -> None:
    uuid = fake.uuids[0]
    fake.disable_feature(0, "energy")
    fake.disable_feature(0, "temperature")
    fake.inject_error(0, "nvmlDeviceGetPowerUsage", pynvml.NVMLError_FunctionNotFound)
    for _ in range(2):
        reading = backend.read(uuid)
        assert reading.energy_mj is None
        assert reading.temperature_c is None
        assert reading.sm_clock_mhz is not None
    assert backend.read(fake.uuids[1]).energy_mj is not None
    counts = backend.error_counts
    assert counts[("nvmlDeviceGetTotalEnergyConsumption", "not_supported")] == 2
    assert counts[("nvmlDeviceGetTemperatureV", "not_supported")] == 2
    assert counts[("nvmlDeviceGetPowerUsage", "not_supported")] == 1


def test_read_of_a_lost_gpu_raises(fake: FakeNvml, backend: NvmlBackend) -> None:
    uuid = fake.uuids[0]
    backend.devices()
    fake.lose_gpu(0)
    with pytest.raises(GpuLost) as caught:
        backend.read(uuid)
    assert caught.value.uuid == uuid
    assert caught.value.operation.startswith("nvmlDevice")
    assert backend.read(fake.uuids[1]).power_mw is not None
    fake.restore_gpu(0)
    assert backend.read(uuid).power_mw is not None


def test_unknown_uuid_is_a_lost_gpu(backend: NvmlBackend) -> None:
    with pytest.raises(GpuLost, match="GPU-nope is not present"):
        backend.read("GPU-nope")
    with pytest.raises(GpuLost):
        backend.reset_locked_clocks("GPU-nope")


def test_compute_pids(fake: FakeNvml, backend: NvmlBackend) -> None:
    fake.set_compute_pids(0, [4242, 17, 4242])
    assert backend.compute_pids(fake.uuids[0]) == [17, 4242]
    assert backend.compute_pids(fake.uuids[1]) == []
    fake.disable_feature(0, "processes")
    assert backend.compute_pids(fake.uuids[0]) == []


# --- writes ---------------------------------------------------------------------------------


def test_locked_clocks_are_clamped_to_supported_clocks(
    fake: FakeNvml, backend: NvmlBackend
) -> None:
    uuid = fake.uuids[0]
    info = backend.devices()[0]
    supported = info.supported_sm_clocks_mhz
    want_low, want_high = supported[10] + 7, supported[50] + 7
    applied = backend.set_locked_clocks(uuid, want_low, want_high)
    assert applied == (supported[10], supported[50])
    assert fake.writes == [("nvmlDeviceSetGpuLockedClocks", 0, applied)]
    assert fake.plant.locked_clocks(0) == applied
    # Out of range and reversed: clamped into the device range, low <= high.
    applied = backend.set_locked_clocks(uuid, 99999, 1)
    assert applied == (supported[0], supported[-1])


def test_a_write_that_changes_nothing_is_skipped(fake: FakeNvml, backend: NvmlBackend) -> None:
    uuid = fake.uuids[0]
    backend.set_locked_clocks(uuid, 1200, 1500)
    backend.set_locked_clocks(uuid, 1200, 1500)
    backend.set_power_limit(uuid, 500_000)
    backend.set_power_limit(uuid, 500_000)
    backend.reset_locked_clocks(uuid)
    backend.reset_locked_clocks(uuid)
    backend.set_power_limit(uuid, round(PROFILE.power_limit_default_w * 1000))
    backend.reset_power_limit(uuid)
    assert [name for name, _, _ in fake.writes] == [
        "nvmlDeviceSetGpuLockedClocks",
        "nvmlDeviceSetPowerManagementLimit",
        "nvmlDeviceResetGpuLockedClocks",
        "nvmlDeviceSetPowerManagementLimit",
    ]


def test_power_limit_is_clamped_and_read_back(fake: FakeNvml, backend: NvmlBackend) -> None:
    uuid = fake.uuids[1]
    low_mw = round(PROFILE.power_limit_min_w * 1000)
    high_mw = round(PROFILE.power_limit_max_w * 1000)
    assert backend.set_power_limit(uuid, 1) == low_mw
    assert fake.plant.power_limit_mw(1) == low_mw
    assert backend.set_power_limit(uuid, 10**9) == high_mw
    assert backend.set_power_limit(uuid, 432_100) == 432_100
    assert [args for _, _, args in fake.writes] == [(low_mw,), (high_mw,), (432_100,)]
    backend.reset_power_limit(uuid)
    assert fake.plant.power_limit_mw(1) == round(PROFILE.power_limit_default_w * 1000)


class _SilentSetterNvml(FakeNvml):
    """A driver whose setter reports success but changes nothing, like the _v2 setter."""

    def nvmlDeviceSetPowerManagementLimit(self, handle: Any, limit: int) -> None:
        with self.lock:
            self._device("nvmlDeviceSetPowerManagementLimit", handle)


def test_power_limit_read_back_mismatch_raises() -> None:
    fake = _SilentSetterNvml(GpuPlant(PROFILE, 1, seed=3))
    backend = NvmlBackend(fake)
    uuid = fake.uuids[0]
    with pytest.raises(GpuError, match="reads back as 700000 mW after setting 450000 mW"):
        backend.set_power_limit(uuid, 450_000)
    assert backend.error_counts[("nvmlDeviceSetPowerManagementLimit", "error")] == 1


class _RoundingNvml(FakeNvml):
    """A driver that keeps the power limit in whole watts."""

    def nvmlDeviceSetPowerManagementLimit(self, handle: Any, limit: int) -> None:
        super().nvmlDeviceSetPowerManagementLimit(handle, round(limit, -3))


def test_power_limit_rounded_by_the_driver_is_accepted() -> None:
    fake = _RoundingNvml(GpuPlant(PROFILE, 1, seed=3))
    backend = NvmlBackend(fake)
    uuid = fake.uuids[0]
    assert backend.set_power_limit(uuid, 432_400) == 432_000
    assert backend.set_power_limit(uuid, 432_400) == 432_000
    assert len(fake.writes) == 1
    assert backend.error_counts == {}


def test_locked_clock_state_is_forgotten_after_a_failed_write(
    fake: FakeNvml, backend: NvmlBackend
) -> None:
    uuid = fake.uuids[0]
    backend.set_locked_clocks(uuid, 1200, 1500)
    fake.inject_error(0, "nvmlDeviceResetGpuLockedClocks", pynvml.NVMLError_Timeout)
    with pytest.raises(GpuError):
        backend.reset_locked_clocks(uuid)
    # Unknown state now: the same lock is sent again rather than assumed.
    backend.set_locked_clocks(uuid, 1200, 1500)
    assert [name for name, _, _ in fake.writes].count("nvmlDeviceSetGpuLockedClocks") == 2


# --- error mapping --------------------------------------------------------------------------


def test_no_permission_when_not_privileged() -> None:
    fake = make_fake(privileged=False)
    backend = NvmlBackend(fake)
    uuid = fake.uuids[0]
    with pytest.raises(NoPermission, match="root or CAP_SYS_ADMIN") as caught:
        backend.set_power_limit(uuid, 400_000)
    assert caught.value.operation == "nvmlDeviceSetPowerManagementLimit"
    assert caught.value.uuid == uuid
    with pytest.raises(NoPermission):
        backend.set_locked_clocks(uuid, 1000, 1500)
    assert fake.writes == []
    assert backend.error_counts[("nvmlDeviceSetPowerManagementLimit", "no_permission")] == 1
    assert backend.error_counts[("nvmlDeviceSetGpuLockedClocks", "no_permission")] == 1
    # Reads still work without privileges.
    assert backend.read(uuid).power_mw is not None


@pytest.mark.parametrize(
    ("nvml_error", "expected", "kind"),
    [
        (pynvml.NVMLError_InvalidArgument, InvalidArgument, "invalid_argument"),
        (pynvml.NVMLError_NotSupported, NotSupported, "not_supported"),
        (pynvml.NVMLError_GpuIsLost, GpuLost, "gpu_lost"),
        (pynvml.NVMLError_Uninitialized, GpuUnavailable, "unavailable"),
        (pynvml.NVMLError_NoPermission, NoPermission, "no_permission"),
        (pynvml.NVMLError_Timeout, GpuError, "error"),
    ],
)
def test_each_nvml_error_maps_to_one_gpu_error(
    fake: FakeNvml,
    backend: NvmlBackend,
    nvml_error: type[pynvml.NVMLError],
    expected: type[GpuError],
    kind: str,
) -> None:
    uuid = fake.uuids[0]
    fake.inject_error(0, "nvmlDeviceSetGpuLockedClocks", nvml_error)
    with pytest.raises(expected) as caught:
        backend.set_locked_clocks(uuid, 1000, 1500)
    assert type(caught.value) is expected
    assert caught.value.kind == kind
    assert caught.value.operation == "nvmlDeviceSetGpuLockedClocks"
    assert caught.value.uuid == uuid
    assert isinstance(caught.value.__cause__, nvml_error)
    assert backend.error_counts == {("nvmlDeviceSetGpuLockedClocks", kind): 1}


def test_disabled_feature_write_is_not_supported(fake: FakeNvml, backend: NvmlBackend) -> None:
    fake.disable_feature(1, "locked_clocks")
    with pytest.raises(NotSupported):
        backend.set_locked_clocks(fake.uuids[1], 1000, 1500)
    assert backend.set_locked_clocks(fake.uuids[0], 1000, 1500)[1] <= 1500


def test_gpu_without_power_limit_control(fake: FakeNvml) -> None:
    fake.disable_feature(0, "power_limit")
    backend = NvmlBackend(fake)
    info = backend.devices()[0]
    assert info.power_limit_min_mw == info.power_limit_max_mw == info.power_limit_default_mw
    assert info.power_limit_default_mw == fake.plant.enforced_power_limit_mw(0)
    with pytest.raises(NotSupported):
        backend.set_power_limit(info.uuid, 300_000)
    backend.reset_power_limit(info.uuid)
    assert fake.writes == []


def test_unknown_error_on_a_gpu_that_is_gone_is_gpu_lost(
    fake: FakeNvml, backend: NvmlBackend
) -> None:
    uuid = fake.uuids[0]
    backend.devices()
    fake.inject_error(0, "nvmlDeviceSetPowerManagementLimit", pynvml.NVMLError_Unknown)
    fake.lose_gpu(0)
    with pytest.raises(GpuLost):
        backend.set_power_limit(uuid, 400_000)
    fake.restore_gpu(0)
    fake.inject_error(0, "nvmlDeviceSetPowerManagementLimit", pynvml.NVMLError_Unknown)
    with pytest.raises(GpuError) as caught:
        backend.set_power_limit(uuid, 400_000)
    assert type(caught.value) is GpuError


def test_calls_after_close_are_unavailable(fake: FakeNvml, backend: NvmlBackend) -> None:
    uuid = fake.uuids[0]
    backend.set_power_limit(uuid, 450_000)
    writes_before = list(fake.writes)
    backend.close()
    backend.close()
    assert fake.writes == writes_before
    assert fake.plant.power_limit_mw(0) == 450_000
    assert fake.call_counts["nvmlShutdown"] == 1
    threads_before = threading.enumerate()
    with pytest.raises(GpuUnavailable, match="not initialised"):
        backend.read(uuid)
    with pytest.raises(GpuUnavailable, match="not initialised"):
        backend.set_locked_clocks(uuid, 1005, 1005)
    assert isinstance(backend.read_all([uuid])[uuid], GpuUnavailable)
    assert threading.enumerate() == threads_before, "no GPU thread started again"


# --- initialisation -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("nvml_error", "sentence"),
    [
        (
            pynvml.NVMLError_LibraryNotFound,
            "NVML is not available: libnvidia-ml.so.1 was not found; "
            "is the NVIDIA driver installed?",
        ),
        (pynvml.NVMLError_DriverNotLoaded, "the NVIDIA kernel driver is not loaded"),
        (pynvml.NVMLError_NoPermission, "no permission to open the GPU devices"),
        (
            pynvml.NVMLError_LibRmVersionMismatch,
            "upgraded without reloading the kernel module; reboot or reload it",
        ),
        (pynvml.NVMLError_Unknown, "NVML is not available: nvmlInit failed (Unknown Error)."),
    ],
)
def test_init_failure_is_one_clear_sentence(
    fake: FakeNvml, nvml_error: type[pynvml.NVMLError], sentence: str
) -> None:
    fake.inject_error(None, "nvmlInit", nvml_error)
    with pytest.raises(GpuUnavailable) as caught:
        NvmlBackend(fake)
    message = str(caught.value)
    assert sentence in message
    assert message.startswith("NVML is not available: ")
    assert "\n" not in message
    assert caught.value.operation == "nvmlInit"


class _NoLibraryModule:
    """A pynvml-like module on a machine without the NVIDIA library."""

    NVMLError = pynvml.NVMLError
    NVMLError_LibraryNotFound = pynvml.NVMLError_LibraryNotFound

    def nvmlInit(self) -> None:
        raise pynvml.NVMLError_LibraryNotFound()


def test_init_failure_of_a_module_like_object() -> None:
    with pytest.raises(GpuUnavailable, match=r"libnvidia-ml\.so\.1 was not found"):
        NvmlBackend(_NoLibraryModule())


def _driver_present() -> bool:
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return False
    return True


@pytest.mark.skipif(_driver_present(), reason="this machine has the NVIDIA library")
def test_real_pynvml_without_a_driver() -> None:
    with pytest.raises(GpuUnavailable) as caught:
        NvmlBackend()
    assert str(caught.value) == (
        "NVML is not available: libnvidia-ml.so.1 was not found; is the NVIDIA driver installed?"
    )


def test_a_driver_before_r535_gives_its_clock_event_reasons_under_the_older_name(
    fake: FakeNvml, backend: NvmlBackend, caplog: pytest.LogCaptureFixture
) -> None:
    """The newer name is tried once and the one that answered kept. A driver older than a
    name is no NVML error: counting it warned at every start and exported an error."""
    uuid = fake.uuids[0]
    fake.inject_error(
        0,
        "nvmlDeviceGetCurrentClocksEventReasons",
        pynvml.NVMLError_FunctionNotFound,
        persistent=True,
    )
    with caplog.at_level(logging.DEBUG, logger="powerd.gpu"):
        assert backend.read(uuid).clock_event_reasons is not None
        assert backend.read(uuid).clock_event_reasons is not None
    assert fake.call_counts["nvmlDeviceGetCurrentClocksEventReasons"] == 1
    assert fake.call_counts["nvmlDeviceGetCurrentClocksThrottleReasons"] == 2
    assert backend.error_counts == {}
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    # nvidia-ml-py before 12.570 has only the older temperature call.
    temperature = next(
        name
        for name in ("nvmlDeviceGetTemperatureV", "nvmlDeviceGetTemperature")
        if hasattr(pynvml, name)
    )
    assert backend.symbols_used() == {
        "nvmlDeviceGetCurrentClocksEventReasons": "nvmlDeviceGetCurrentClocksThrottleReasons",
        "nvmlDeviceGetTemperatureV": temperature,
    }


def test_a_binding_without_the_newer_name_counts_no_nvml_error(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """nvidia-ml-py before 12.570 (pyproject allows 12.535) has no nvmlDeviceGetTemperatureV.
    No NVML call failed, yet each start logged a warning and exported one NVML error, which
    also failed gpu-check's dry run (daemon_nvml_errors, daemon_logged_no_problem)."""
    fake = fake_nvml_before_12_570(monkeypatch).FakeNvml(GpuPlant(PROFILE, 1, seed=3))
    backend = NvmlBackend(fake)
    (info,) = backend.devices()
    with caplog.at_level(logging.DEBUG, logger="powerd.gpu"):
        assert backend.read(info.uuid).temperature_c is not None
        assert backend.read(info.uuid).temperature_c is not None
    assert backend.error_counts == {}
    assert caplog.records == []
    assert backend.symbols_used()["nvmlDeviceGetTemperatureV"] == "nvmlDeviceGetTemperature"


def test_compute_pids_without_the_v3_symbol_and_with_garbage_entries(
    fake: FakeNvml, backend: NvmlBackend
) -> None:
    uuid = fake.uuids[0]
    fake.set_compute_pids(0, [0, 111, 4242, 3_221_225_472])
    assert backend.compute_pids(uuid) == [111, 4242], "0 and a misread PID are left out"
    fake.inject_error(
        0,
        "nvmlDeviceGetComputeRunningProcesses",
        pynvml.NVMLError_FunctionNotFound,
        persistent=True,
    )
    assert NvmlBackend(fake).compute_pids(uuid) == [111, 4242], "the _v2 symbol answers"


def test_compute_pids_are_below_the_machines_pid_max(
    fake: FakeNvml, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    pid_max = tmp_path / "pid_max"
    pid_max.write_text("32768\n")
    monkeypatch.setattr(nvml_module, "_PID_MAX_PATH", pid_max)
    fake.set_compute_pids(0, [111, 32767, 32768, 4_000_000])
    assert NvmlBackend(fake).compute_pids(fake.uuids[0]) == [111, 32767]
    monkeypatch.setattr(nvml_module, "_PID_MAX_PATH", tmp_path / "absent")
    assert NvmlBackend(fake).compute_pids(fake.uuids[0]) == [111, 32767, 32768, 4_000_000]


def test_a_gpu_that_stalls_is_read_no_further_and_taken_for_lost(
    fake: FakeNvml, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The firmware hang's 45 s pass on the backend's clock at once, so the threshold is STALL_S
    # itself: the read after the recovery has 5 s to answer, not a threshold scaled down to
    # 50 ms that one slow read on a busy machine crosses.
    clock = ShiftedTime()
    monkeypatch.setattr(nvml_module, "time", clock)
    backend = NvmlBackend(fake)
    uuid = backend.devices()[1].uuid
    waits: list[float] = []

    def hang(seconds: float) -> None:
        waits.append(seconds)
        clock.ahead_s += seconds

    fake.sleep = hang
    fake.stall_gpu(1, 45.0)
    with pytest.raises(GpuLost, match=r"stopped answering: its reading took 4[5-9]\.\d s"):
        backend.read(uuid)
    assert waits == [45.0], "one call waited; the other six reads were not tried"
    assert backend.error_counts[("nvmlDeviceGetPowerUsage", "gpu_lost")] == 1, (
        "counted under the call that stalled, a series the exporter declares"
    )
    fake.unstall_gpu(1)
    assert backend.read(uuid).power_mw is not None


def _wait_until_read(backend: NvmlBackend, uuid: str) -> None:
    deadline_s = time.monotonic() + 30
    while True:
        try:
            assert backend.read(uuid).power_mw is not None
            return
        except GpuLost:
            assert time.monotonic() < deadline_s, "read again once the hung call returned"
            time.sleep(0.05)


def test_a_gpu_that_hangs_holds_its_reader_and_not_the_caller(fake: FakeNvml) -> None:
    """A GPU whose firmware hangs holds each call for tens of seconds, past the unit's
    WatchdogSec=30: the reading is given up after `stall_s`, the GPU is called no further
    until the call in flight returns, and the other GPUs are read meanwhile."""
    backend = NvmlBackend(fake, stall_s=0.2)
    hung, healthy = backend.devices()[1].uuid, backend.devices()[0].uuid
    hang = Hang()
    fake.sleep = hang
    fake.stall_gpu(1, 45.0)
    try:
        started_s = time.monotonic()
        with pytest.raises(
            GpuLost,
            match=r"stopped answering: no reading within 0\.2 s, in nvmlDeviceGetPowerUsage",
        ):
            backend.read(hung)
        assert time.monotonic() - started_s < 30, "given up long before the hang's 60 s"
        calls = dict(fake.call_counts)
        with pytest.raises(GpuLost, match="has not answered a reading started"):
            backend.read(hung)
        with pytest.raises(GpuLost):
            backend.set_locked_clocks(hung, 1005, 1005)
        assert dict(fake.call_counts) == calls, "no call joins the one in flight"
        assert backend.read(healthy).power_mw is not None

        fake.unstall_gpu(1)
        hang.release()
        _wait_until_read(backend, hung)
        # The hang counted once where the loop gave up, and the call's own failure (the
        # driver's timeout) once; refusals make no call and count nothing.
        assert backend.error_counts == {
            ("nvmlDeviceGetPowerUsage", "gpu_lost"): 1,
            ("nvmlDeviceGetPowerUsage", "error"): 1,
        }

        hang.hold()
        fake.stall_gpu(1, 45.0)
        with pytest.raises(GpuLost):
            backend.read(hung)
        backend.close()
        assert fake.call_counts["nvmlShutdown"] == 0, "not while a thread is inside a call"
    finally:
        hang.release()


def _set_limit(backend: NvmlBackend, uuid: str) -> None:
    backend.set_power_limit(uuid, 500_000)


@pytest.mark.parametrize(
    ("prepare", "call", "function"),
    [
        (None, lambda b, u: b.set_locked_clocks(u, 1005, 1005), "nvmlDeviceSetGpuLockedClocks"),
        (None, lambda b, u: b.reset_locked_clocks(u), "nvmlDeviceResetGpuLockedClocks"),
        (None, _set_limit, "nvmlDeviceSetPowerManagementLimit"),
        # The reset sets the default limit from the same thread: it must not wait on itself.
        (_set_limit, lambda b, u: b.reset_power_limit(u), "nvmlDeviceSetPowerManagementLimit"),
        (None, lambda b, u: b.power_limit_mw(u), "nvmlDeviceGetPowerManagementLimit"),
        (None, lambda b, u: b.compute_pids(u), "nvmlDeviceGetComputeRunningProcesses"),
    ],
    ids=["lock", "unlock", "limit", "limit_reset", "limit_read", "processes"],
)
def test_a_gpu_that_hangs_past_its_reading_holds_its_thread_not_the_caller(
    fake: FakeNvml,
    prepare: Any,
    call: Any,
    function: str,
) -> None:
    """A GPU whose firmware starts to hang after the tick read it (in a clock lock, a limit
    write, the read before it, discovery's process list) holds that call for tens of seconds,
    past the unit's WatchdogSec: the call is given up after `stall_s` as a reading is, counted
    once under the NVML function it hangs in, and the GPU is called no further until it
    returns; then it is read again."""
    backend = NvmlBackend(fake, stall_s=0.2)
    healthy, hung = (info.uuid for info in backend.devices())
    assert backend.read(hung).power_mw is not None
    if prepare is not None:
        prepare(backend, hung)
    hang = Hang()
    fake.sleep = hang
    fake.stall_gpu(1, 45.0, [function])
    try:
        started_s = time.monotonic()
        with pytest.raises(
            GpuLost, match=rf"GPU {hung} stopped answering: no .+ within 0\.2 s, in {function}"
        ):
            call(backend, hung)
        assert time.monotonic() - started_s < 30, "given up long before the hang's 60 s"
        calls = dict(fake.call_counts)
        outcome = backend.read_all([hung])[hung]
        assert isinstance(outcome, GpuLost) and "has not answered a" in str(outcome)
        with pytest.raises(GpuLost, match="has not answered a"):
            call(backend, hung)
        assert dict(fake.call_counts) == calls, "no call joins the one in flight"
        assert backend.error_counts == {(function, "gpu_lost"): 1}
        assert backend.read(healthy).power_mw is not None
        fake.unstall_gpu(1)
    finally:
        hang.release()
    _wait_until_read(backend, hung)


def test_a_description_that_hangs_is_given_up_and_holds_no_other_gpu(fake: FakeNvml) -> None:
    """A fresh process (a restore) describes a GPU on first use: a GPU that hangs then is
    given up after `stall_s`, and another GPU is described meanwhile."""
    backend = NvmlBackend(fake, stall_s=0.2)
    hang = Hang()
    fake.sleep = hang
    fake.stall_gpu(1, 45.0, ["nvmlDeviceGetName"])
    try:
        started_s = time.monotonic()
        with pytest.raises(GpuLost, match=r"no description within 0\.2 s, in nvmlDeviceGetName"):
            backend.describe(fake.uuids[1])
        assert time.monotonic() - started_s < 30
        assert backend.describe(fake.uuids[0]).index == 0
    finally:
        hang.release()


def test_a_wait_interrupted_leaves_nvml_open_under_the_call(fake: FakeNvml) -> None:
    """Ctrl-C while `powerd restore` waits for a GPU leaves the call running on the GPU's
    thread: close() must not shut NVML down under it."""
    backend = NvmlBackend(fake, stall_s=30.0)
    uuid = backend.devices()[1].uuid
    hang = Hang()
    fake.sleep = hang
    fake.stall_gpu(1, 45.0)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C's own (conftest undoes)
    timer = threading.Timer(0.2, _thread.interrupt_main)
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            backend.reset_locked_clocks(uuid, resend=True)
        backend.close()
        assert fake.call_counts["nvmlShutdown"] == 0, "not while a thread is inside a call"
    finally:
        timer.cancel()
        hang.release()


def _four_gpus_hanging(
    stall_s: float, functions: list[str] | None = None
) -> tuple[NvmlBackend, list[str], Hang]:
    """A backend over four GPUs whose calls (those of `functions`) all hang until released."""
    fake4 = FakeNvml(GpuPlant(PROFILE, 4, seed=5))
    backend = NvmlBackend(fake4, stall_s=stall_s)
    uuids = [info.uuid for info in backend.devices()]
    hang = Hang()
    fake4.sleep = hang
    for i in range(4):
        fake4.stall_gpu(i, 45.0, functions)
    return backend, uuids, hang


def test_a_job_of_slow_calls_is_given_up_after_a_few_stall_limits(fake: FakeNvml) -> None:
    """A GPU that answers every call a little under the limit is not hung call by call, but a
    job of a dozen such calls (a fresh description) would hold the loop for a minute: it is
    given up after JOB_CALLS_CAP limits in all."""
    fake.sleep = time.sleep
    fake.stall_gpu(1, 0.15, answer=True)
    backend = NvmlBackend(fake, stall_s=0.2)
    started_s = time.monotonic()
    with pytest.raises(GpuLost, match=r"no description within 0\.6 s in all, (in|after) nvml"):
        backend.describe(fake.uuids[1])
    assert time.monotonic() - started_s < 0.2 * nvml_module.JOB_CALLS_CAP + 0.5
    # Counted under an NVML function, as every other error (not powerd's method name).
    operations = [operation for operation, _ in backend.error_counts]
    assert operations and all(operation.startswith("nvml") for operation in operations)


def test_a_job_given_up_between_two_calls_is_counted_under_its_last_call(
    fake: FakeNvml,
) -> None:
    """A job past its limit in all while in powerd's own code is named and counted by the
    NVML call it made last, a series the exporter knows, not by powerd's method name."""
    backend = NvmlBackend(fake, stall_s=0.2)
    uuid = backend.devices()[0].uuid
    handle = fake.nvmlDeviceGetHandleByUUID(uuid)

    def slow_between_calls() -> None:
        backend._call("nvmlDeviceGetName", uuid, handle)
        time.sleep(1.0)

    job = nvml_module._Job(slow_between_calls, "look", "slow_between_calls")
    with pytest.raises(GpuLost, match=r"no look within 0\.6 s in all, after nvmlDeviceGetName$"):
        backend._within_stall(uuid, job)
    assert dict(backend.error_counts) == {("nvmlDeviceGetName", "gpu_lost"): 1}


def test_an_open_interrupted_leaves_nvml_open_under_the_call(fake: FakeNvml) -> None:
    """Ctrl-C while a look waits for a GPU's open leaves the open running: close() must not
    shut NVML down under it."""
    hang = Hang()
    fake.sleep = hang
    fake.stall_gpu(1, 45.0)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C's own (conftest undoes)
    backend = NvmlBackend(fake, stall_s=30.0)
    timer = threading.Timer(0.2, _thread.interrupt_main)
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            backend.devices()
        backend.close()
        assert fake.call_counts["nvmlShutdown"] == 0, "not while a thread is inside a call"
    finally:
        timer.cancel()
        hang.release()


def test_an_open_that_answers_after_its_look_gave_up_is_taken_at_the_next(fake: FakeNvml) -> None:
    """A GPU whose first open after a reset takes longer than the look's wait is opened from
    that answer at the next look, not tried afresh (which would be as slow again)."""
    fake.sleep = time.sleep
    fake.stall_gpu(1, 0.5, ["nvmlDeviceGetUUID"], answer=True)  # each open: 0.5 s
    backend = NvmlBackend(fake, stall_s=30.0)
    assert [info.index for info in backend.devices(wait_s=0.2)] == [0]
    time.sleep(1.0)  # the open answers meanwhile
    assert [info.index for info in backend.devices(wait_s=0.2)] == [0, 1]
    assert backend.unopened_indices() == {}


def test_a_hung_open_shortens_the_wait_for_other_gpus_calls(
    fake: FakeNvml, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(nvml_module, "WAIT_BESIDE_HANG_S", 0.2)
    hang = Hang()
    fake.sleep = hang
    fake.stall_gpu(1, 45.0)
    backend = NvmlBackend(fake, stall_s=2.0)
    try:
        healthy = backend.devices(wait_s=0.2)[0].uuid  # GPU 1's open is left hanging
        fake.stall_gpu(0, 45.0, ["nvmlDeviceSetGpuLockedClocks"])
        started_s = time.monotonic()
        with pytest.raises(GpuLost, match=r"no clock lock within 0\.2 s"):
            backend.set_locked_clocks(healthy, 1005, 1005)
        assert time.monotonic() - started_s < 1.5
    finally:
        hang.release()


def test_gpus_that_hang_together_cost_one_stall_limit() -> None:
    """Every GPU's reading is waited for at once: four that hang (as they would if a driver
    held every GPU's calls behind one) cost one stall limit, not four, and the watchdog's 30 s
    is never reached by 8 GPUs at 5 s each."""
    backend, uuids, hang = _four_gpus_hanging(1.0)
    try:
        started_s = time.monotonic()
        outcomes = backend.read_all(uuids)
        assert time.monotonic() - started_s < 3.0, "one stall limit, not four"
        assert all(isinstance(outcome, GpuLost) for outcome in outcomes.values())
        assert list(outcomes) == uuids
    finally:
        hang.release()


def test_a_look_at_lost_or_unopened_gpus_may_wait_less_than_the_stall_limit(
    fake: FakeNvml,
) -> None:
    """The look for lost and unopened GPUs every 10 s gives each a shorter wait: a GPU whose
    firmware still hangs hangs again at each look."""
    backend = NvmlBackend(fake, stall_s=30.0)
    healthy, hung = (info.uuid for info in backend.devices())
    hang = Hang()
    fake.sleep = hang
    fake.stall_gpu(1, 45.0)
    try:
        started_s = time.monotonic()
        outcomes = backend.read_all([healthy, hung], wait_s=0.2)
        assert time.monotonic() - started_s < 10, "given up at wait_s, not at stall_s"
        assert isinstance(outcomes[hung], GpuLost)
        assert "no reading within 0.2 s" in str(outcomes[hung])
        assert not isinstance(outcomes[healthy], GpuError)
    finally:
        hang.release()
    hang.hold()
    try:
        fresh = NvmlBackend(fake, stall_s=30.0)
        started_s = time.monotonic()
        assert [info.index for info in fresh.devices(wait_s=0.2)] == [0]
        assert time.monotonic() - started_s < 10, "given up at wait_s, not at stall_s"
        assert "not opened within 0.2 s" in fresh.unopened_indices()[1]
    finally:
        hang.release()


def test_writes_that_hang_on_every_gpu_cost_one_stall_limit_and_a_short_wait_each(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Writes go one GPU at a time: while one GPU hangs the next GPU's call is waited for
    WAIT_BESIDE_HANG_S, so a driver that held every GPU's writes behind one hang does not
    cost a tick the stall limit per GPU (8 x 5 s would pass WatchdogSec=30)."""
    monkeypatch.setattr(nvml_module, "WAIT_BESIDE_HANG_S", 0.2)
    backend, uuids, hang = _four_gpus_hanging(2.0, ["nvmlDeviceSetGpuLockedClocks"])
    try:
        started_s = time.monotonic()
        for uuid in uuids:
            with pytest.raises(GpuLost, match="stopped answering: no clock lock"):
                backend.set_locked_clocks(uuid, 1005, 1005)
        assert time.monotonic() - started_s < 5.0, "one stall limit, then short waits"
        assert len(hang.waits) == 4
    finally:
        hang.release()


def test_a_backend_dropped_without_close_leaves_no_thread() -> None:
    """A finished reading must not keep its backend alive: the backend's finalizer ends its
    reader threads (a test's or a tool's backend is often never closed)."""
    fake = FakeNvml(GpuPlant(PROFILE, 4, seed=5))
    # Threads another test left ending meanwhile must not count: this backend's own are
    # the ones started here.
    before = set(threading.enumerate())
    backend = NvmlBackend(fake)
    for info in backend.devices():
        assert backend.read(info.uuid).power_mw is not None
    started = [t for t in threading.enumerate() if t not in before]
    readers = [t for t in started if t.name.startswith("nvml-gpu-")]
    assert len(readers) == 4, "one thread a GPU"
    dropped = weakref.ref(backend)
    del backend
    gc.collect()
    assert dropped() is None
    for reader in readers:
        reader.join(10)
        assert not reader.is_alive(), "the reader threads ended"


def test_a_gpu_that_hangs_at_start_holds_neither_the_start_nor_later_looks(
    fake: FakeNvml,
) -> None:
    """A GPU still hung when powerd starts (a restart before it is reset) is opened on a
    thread of its own: the start waits `stall_s` for it, each later look while that call is
    in flight calls it not at all, and it opens once it answers."""
    hang = Hang()
    fake.sleep = hang
    fake.stall_gpu(1, 45.0)
    try:
        backend = NvmlBackend(fake, stall_s=0.2)
        started_s = time.monotonic()
        assert [info.index for info in backend.devices()] == [0]
        assert time.monotonic() - started_s < 30, "the start did not wait out the hang"
        why = backend.unopened_indices()[1]
        assert why.startswith("GPU 1 stopped answering: not opened within 0.2 s, in nvmlDevice")
        assert [info.index for info in backend.devices()] == [0]
        assert "has not answered an open started" in backend.unopened_indices()[1]
        assert hang.waits == [45.0], "the later look did not call it"
        fake.unstall_gpu(1)
    finally:
        hang.release()
    deadline_s = time.monotonic() + 30
    while len(backend.devices()) < 2:
        assert time.monotonic() < deadline_s, "opened once the hung call returned"
        time.sleep(0.05)
    assert backend.unopened_indices() == {}


def test_gpus_that_hang_at_start_cost_one_stall_limit_and_a_short_wait_each(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Once one GPU's open has hung, the next ones get WAIT_BESIDE_HANG_S: eight GPUs still
    hung when powerd starts cost the start 5 + 7 s, not 40 s of the unit's TimeoutStartSec."""
    monkeypatch.setattr(nvml_module, "WAIT_BESIDE_HANG_S", 0.2)
    fake4 = FakeNvml(GpuPlant(PROFILE, 4, seed=5))
    hang = Hang()
    fake4.sleep = hang
    for i in range(4):
        fake4.stall_gpu(i, 45.0)
    try:
        backend = NvmlBackend(fake4, stall_s=1.0)
        started_s = time.monotonic()
        assert backend.devices() == []
        assert time.monotonic() - started_s < 3.0, "one stall limit and three short waits"
        unopened = backend.unopened_indices()
        assert sorted(unopened) == [0, 1, 2, 3]
        assert "within 1 s" in unopened[0] and "within 0.2 s" in unopened[3]
        assert len(hang.waits) == 4, "each GPU was tried"
    finally:
        hang.release()


def test_a_gpu_described_late_is_described_alone(fake: FakeNvml) -> None:
    """A fresh process restoring one GPU (powerd restore) touches no other GPU: one that
    stalls would hold every call on it."""
    uuid = NvmlBackend(fake).devices()[0].uuid
    fresh = NvmlBackend(fake)
    fake.stall_gpu(1, 45.0)
    fake.sleep = lambda s: pytest.fail("GPU 1 was called")
    assert fresh.describe(uuid).uuid == uuid
    fresh.reset_locked_clocks(uuid)


@pytest.mark.skipif(
    not hasattr(pynvml, "nvmlDeviceGetTemperatureV"),
    reason="nvidia-ml-py before 12.570 has no nvmlDeviceGetTemperatureV "
    "(test_a_binding_without_the_newer_name_counts_no_nvml_error covers that binding)",
)
def test_temperature_is_read_through_the_versioned_call_and_the_older_one(
    fake: FakeNvml,
) -> None:
    """nvmlDeviceGetTemperature is to leave the binding with CUDA 14; drivers before the
    versioned call lack its symbol."""
    backend = NvmlBackend(fake)
    uuid = backend.devices()[0].uuid
    assert backend.read(uuid).temperature_c == fake.plant.temperature_c(0)
    assert backend.symbols_used()["nvmlDeviceGetTemperatureV"] == "nvmlDeviceGetTemperatureV"
    older = NvmlBackend(fake)
    fake.inject_error(
        1, "nvmlDeviceGetTemperatureV", pynvml.NVMLError_FunctionNotFound, persistent=True
    )
    assert older.read(fake.uuids[1]).temperature_c == fake.plant.temperature_c(1)
    assert older.symbols_used()["nvmlDeviceGetTemperatureV"] == "nvmlDeviceGetTemperature"


def test_a_clock_table_above_the_reachable_maximum_is_cut_there(
    fake: FakeNvml, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Some boards list clocks they cannot reach: f_max is the most the GPU reaches."""
    listed = NvmlBackend(fake).devices()[0].supported_sm_clocks_mhz
    reachable = listed[-4]
    monkeypatch.setattr(fake, "nvmlDeviceGetMaxClockInfo", lambda handle, clock: reachable)
    info = NvmlBackend(fake).devices()[0]
    assert info.sm_clock_max_mhz == reachable
    assert info.supported_sm_clocks_mhz == listed[:-3]


def test_a_gpu_without_clock_event_reasons_reports_none_under_either_name(
    fake: FakeNvml,
) -> None:
    backend = NvmlBackend(fake)
    uuid = backend.devices()[0].uuid
    fake.disable_feature(0, "clock_event_reasons")
    assert backend.read(uuid).clock_event_reasons is None
    assert backend.read(uuid).clock_event_reasons is None
    assert backend.error_counts == {
        ("nvmlDeviceGetCurrentClocksEventReasons", "not_supported"): 2
    }, "one error a read under the first name, not one per name"
