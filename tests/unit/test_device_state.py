"""GPU settings outlive the process that set them (as driver state does) until a reboot."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pynvml
import pytest

from powerd.sim.device_state import (
    DeviceStateError,
    DeviceStateFile,
    GpuSettings,
    simulate_reboot,
)
from powerd.sim.fake_nvml import FakeNvml
from powerd.sim.plant import GpuPlant, load_gpu_profile

H100 = load_gpu_profile("h100-sxm")

_SETTER = textwrap.dedent(
    """
    import sys, time
    from powerd.sim.fake_nvml import FakeNvml
    from powerd.sim.plant import GpuPlant, load_gpu_profile
    nvml = FakeNvml(GpuPlant(load_gpu_profile("h100-sxm"), 2, seed=9), state_file=sys.argv[1])
    nvml.nvmlInit()
    h = nvml.nvmlDeviceGetHandleByIndex(1)
    nvml.nvmlDeviceSetPowerManagementLimit(h, 450000)
    nvml.nvmlDeviceSetGpuLockedClocks(h, 345, 1410)
    nvml.nvmlDeviceSetPersistenceMode(nvml.nvmlDeviceGetHandleByIndex(0), 0)
    print("set", flush=True)
    time.sleep(60)
    """
)


def _fake(state_file: Path, seed: int = 9) -> FakeNvml:
    nvml = FakeNvml(GpuPlant(H100, 2, seed=seed), state_file=str(state_file))
    nvml.nvmlInit()
    return nvml


def test_settings_survive_sigkill_of_the_setter_and_a_reboot_resets_them(tmp_path: Path) -> None:
    state = tmp_path / "gpu-state.json"
    proc = subprocess.Popen(
        [sys.executable, "-c", _SETTER, str(state)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "set"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL

    nvml = _fake(state)
    h0, h1 = nvml.nvmlDeviceGetHandleByIndex(0), nvml.nvmlDeviceGetHandleByIndex(1)
    assert nvml.nvmlDeviceGetPowerManagementLimit(h1) == 450_000
    assert nvml.nvmlDeviceGetEnforcedPowerLimit(h1) == 450_000  # already in force at start
    assert nvml.plant.locked_clocks(1) == (345, 1410)
    assert nvml.nvmlDeviceGetPersistenceMode(h0) == pynvml.NVML_FEATURE_DISABLED
    assert nvml.nvmlDeviceGetPowerManagementLimit(h0) == 700_000
    assert nvml.plant.locked_clocks(0) is None
    with nvml.lock:
        for _ in range(30):
            nvml.plant.step(0.01, np.ones(2), np.full(2, 0.3), np.ones(2))
    assert nvml.nvmlDeviceGetClockInfo(h1, nvml.NVML_CLOCK_SM) <= 1410

    simulate_reboot(state)
    after = _fake(state)
    h0, h1 = after.nvmlDeviceGetHandleByIndex(0), after.nvmlDeviceGetHandleByIndex(1)
    assert after.nvmlDeviceGetPowerManagementLimit(h1) == 700_000
    assert after.plant.locked_clocks(1) is None
    assert after.nvmlDeviceGetPersistenceMode(h0) == pynvml.NVML_FEATURE_ENABLED


def test_a_live_process_sees_another_processes_change(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    daemon, restorer = _fake(state), _fake(state)
    hd = daemon.nvmlDeviceGetHandleByIndex(0)
    daemon.nvmlDeviceSetPowerManagementLimit(hd, 300_000)
    daemon.nvmlDeviceSetGpuLockedClocks(hd, 345, 1200)
    hr = restorer.nvmlDeviceGetHandleByIndex(0)
    assert restorer.nvmlDeviceGetPowerManagementLimit(hr) == 300_000
    restorer.nvmlDeviceSetPowerManagementLimit(hr, 700_000)
    restorer.nvmlDeviceResetGpuLockedClocks(hr)
    assert daemon.nvmlDeviceGetPowerManagementLimit(hd) == 700_000
    assert daemon.plant.locked_clocks(0) is None
    assert restorer.writes == [
        ("nvmlDeviceSetPowerManagementLimit", 0, (700_000,)),
        ("nvmlDeviceResetGpuLockedClocks", 0, ()),
    ]


def test_state_is_keyed_by_uuid_not_index(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    first = FakeNvml(GpuPlant(H100, 2), state_file=str(state), uuids=["GPU-a", "GPU-b"])
    first.nvmlInit()
    first.nvmlDeviceSetPowerManagementLimit(first.nvmlDeviceGetHandleByIndex(0), 250_000)
    # After a reboot the indices may come back in another order (nvml_api.md §3).
    swapped = FakeNvml(GpuPlant(H100, 2), state_file=str(state), uuids=["GPU-b", "GPU-a"])
    swapped.nvmlInit()
    assert swapped.nvmlDeviceGetPowerManagementLimit(swapped.nvmlDeviceGetHandleByIndex(1)) == (
        250_000
    )
    assert swapped.nvmlDeviceGetPowerManagementLimit(swapped.nvmlDeviceGetHandleByIndex(0)) == (
        700_000
    )


def test_file_is_written_atomically_and_leaves_no_temporaries(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    store = DeviceStateFile(path)
    assert store.read() == {}
    assert store.signature() is None
    sig = store.update("GPU-x", GpuSettings(power_limit_mw=400_000, locked_clocks_mhz=(345, 900)))
    assert store.signature() == sig
    assert store.read() == {
        "GPU-x": GpuSettings(power_limit_mw=400_000, locked_clocks_mhz=(345, 900))
    }
    boot = store.boot_id()
    store.update("GPU-y", GpuSettings(persistence_mode=0))
    assert set(store.read()) == {"GPU-x", "GPU-y"}
    assert store.boot_id() == boot
    simulate_reboot(path)
    assert store.read() == {}
    assert store.boot_id() != boot
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json", "state.json.lock"]


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("{not json", "not valid JSON"),
        ('{"format": "other"}', "not a powerd-sim-device-state/1 file"),
        (
            json.dumps({"format": "powerd-sim-device-state/1", "gpus": {"GPU-x": {"volts": 1}}}),
            "unknown key 'volts'",
        ),
        (
            json.dumps(
                {
                    "format": "powerd-sim-device-state/1",
                    "gpus": {"GPU-x": {"locked_clocks_mhz": [1]}},
                }
            ),
            "locked_clocks_mhz",
        ),
    ],
)
def test_a_damaged_state_file_is_a_clear_error(tmp_path: Path, content: str, match: str) -> None:
    path = tmp_path / "state.json"
    path.write_text(content)
    with pytest.raises(DeviceStateError, match=match):
        DeviceStateFile(path).read()


def test_a_state_file_damaged_while_running_surfaces_as_an_nvml_error(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    nvml = _fake(state)
    h = nvml.nvmlDeviceGetHandleByIndex(0)
    nvml.nvmlDeviceSetPowerManagementLimit(h, 500_000)
    state.write_text("{torn")
    with pytest.raises(pynvml.NVMLError_Unknown):
        nvml.nvmlDeviceGetPowerManagementLimit(h)
    assert "not valid JSON" in nvml.state_errors[0]
    with pytest.raises(DeviceStateError, match="not valid JSON"):
        _fake(state)
