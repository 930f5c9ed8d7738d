"""tools/gpu_check.py against the fake NVML: read-only by default, restores after --sweep,
and compares powerd's own NVML path with the raw calls."""

from __future__ import annotations

import contextlib
import csv
import ctypes
import dataclasses
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pynvml
import pytest

from powerd.model import GpuReading
from powerd.sim.fake_nvml import FakeNvml
from powerd.sim.plant import GpuPlant, load_gpu_profile
from tests.unit.gpu_check_tool import load_gpu_check
from tests.unit.test_fake_nvml import fake_nvml_before_12_570

ROOT = Path(__file__).resolve().parents[2]


gpu_check = load_gpu_check()


def _node(profile: str, n: int = 2) -> tuple[FakeNvml, Any]:
    fake = FakeNvml(GpuPlant(load_gpu_profile(profile), n, seed=1))
    return fake, gpu_check.SimNode(fake)


def _csv(path: Path) -> dict[tuple[str, str], dict[str, str]]:
    with open(path, newline="") as f:
        return {(row["gpu"], row["parameter"]): row for row in csv.DictReader(f)}


def test_default_run_reads_everything_and_writes_nothing(tmp_path: Path) -> None:
    fake, node = _node("h100-sxm")
    summary = gpu_check.run_check(
        fake, tmp_path, clock=node, load=node, duration_s=5.0, log=lambda _: None
    )
    assert fake.writes == [] and fake.failed_writes == []
    assert not any(name.startswith("nvmlDeviceSet") for name in fake.call_counts)
    assert summary["read_only"] is True
    assert summary["gpus"][0]["name"] == "NVIDIA H100 80GB HBM3"
    assert summary["gpus"][1]["power_limit_constraints_mw"] == [200_000, 700_000]
    assert [c for c in summary["checks"] if c["ok"] is not True] == []
    rows = _csv(tmp_path / "calibration.csv")
    window = rows[("0", "power_usage_window_s")]
    assert float(window["measured"]) == pytest.approx(1.0, abs=0.15)
    assert float(window["simulated"]) == pytest.approx(1.0, abs=0.15)
    assert float(rows[("1", "energy_over_instant_integral")]["measured"]) == pytest.approx(
        1.0, abs=0.06
    )
    assert float(rows[("0", "instant_update_period_s")]["measured"]) == pytest.approx(0.1, abs=0.03)
    compute = float(rows[("0", "p_compute_w")]["measured"])
    assert 600.0 <= compute <= 760.0
    assert 1500.0 <= float(rows[("0", "sm_clock_compute_mhz")]["measured"]) <= 1900.0
    assert int(rows[("0", "reasons_compute")]["measured"], 16) & 0x4
    assert float(rows[("0", "p_ctx_idle_w")]["simulated"]) == pytest.approx(121.7, rel=0.1)
    assert json.loads((tmp_path / "summary.json").read_text())["checks"]


def test_a100_power_usage_is_the_instant_reading(tmp_path: Path) -> None:
    fake, node = _node("a100-sxm4-80gb", n=1)
    gpu_check.run_check(
        fake, tmp_path, clock=node, load=node, duration_s=5.0, simulate=False, log=lambda _: None
    )
    rows = _csv(tmp_path / "calibration.csv")
    assert float(rows[("0", "power_usage_window_s")]["measured"]) == 0.0
    assert rows[("0", "power_usage_window_s")]["simulated"] == ""
    assert fake.writes == []


def test_sweep_restores_every_setting_it_touched() -> None:
    fake, node = _node("h100-sxm", n=1)
    fake.plant.set_power_limit_mw(0, 650_000, dead_time_s=0.0)
    result = gpu_check.measure(
        fake,
        clock=node,
        load=node,
        duration_s=5.0,
        interval_s=0.025,
        sweep=True,
        log=lambda _: None,
    )
    names = [w[0] for w in fake.writes]
    assert names.count("nvmlDeviceSetGpuLockedClocks") == 6
    assert fake.writes[-1] == ("nvmlDeviceSetPowerManagementLimit", 0, (650_000,))
    assert fake.plant.power_limit_mw(0) == 650_000
    assert fake.plant.locked_clocks(0) is None
    fits = gpu_check._sweep_fits(result.sweep, 0, 1980.0)
    profile = fake.plant.profile
    assert fits["lock_dead_time_s"] == pytest.approx(0.125, abs=0.09)
    assert fits["kappa_copy"] == pytest.approx(profile.kappa0, abs=0.1)
    assert fits["cap_settle_s"] < 1.5
    print(f"sweep fits on the simulated H100: {fits}")


def test_sweep_restores_after_an_interrupt() -> None:
    fake, node = _node("h100-sxm", n=2)

    class Interrupting:
        def __init__(self) -> None:
            self.starts = 0

        def open_context(self) -> None:
            node.open_context()

        def start(self, kind: str) -> None:
            self.starts += 1
            if self.starts == 3:
                raise KeyboardInterrupt
            node.start(kind)

        def stop(self) -> dict[int, float]:
            return node.stop()

    fake.nvmlInit()
    handles = [fake.nvmlDeviceGetHandleByIndex(i) for i in range(2)]
    inv = [gpu_check.inventory(fake, h, i) for i, h in enumerate(handles)]
    with pytest.raises(KeyboardInterrupt):
        gpu_check.run_sweep(fake, handles, inv, node, Interrupting(), 0.025, lambda _: None)
    assert [fake.plant.locked_clocks(i) for i in range(2)] == [None, None]
    assert [fake.plant.power_limit_mw(i) for i in range(2)] == [700_000, 700_000]
    assert fake.writes[-1][0] == "nvmlDeviceResetGpuLockedClocks"  # the limit was never touched
    assert any(w[0] == "nvmlDeviceSetGpuLockedClocks" for w in fake.writes)


def test_nvml_errors_are_recorded_not_fatal(tmp_path: Path) -> None:
    fake, node = _node("h100-sxm", n=1)
    fake.disable_feature(0, "field_values")
    # The first temperature call this binding has (nvidia-ml-py before 12.570: the older one).
    temperature = next(
        name
        for name in ("nvmlDeviceGetTemperatureV", "nvmlDeviceGetTemperature")
        if hasattr(pynvml, name)
    )
    fake.inject_error(0, temperature, pynvml.NVMLError_Unknown, persistent=True)
    summary = gpu_check.run_check(
        fake, tmp_path, clock=node, load=None, duration_s=5.0, simulate=False, log=lambda _: None
    )
    assert summary["nvml_errors"][temperature] == "NVMLError_Unknown"
    assert summary["gpus"][0]["power_instant_mw"] is None
    assert "no load ran" in summary["notes"][0]


def test_fits_recover_known_parameters() -> None:
    profile = load_gpu_profile("a100-sxm4-80gb")
    f = np.arange(600.0, 1411.0, 90.0)
    x = np.clip((f - profile.f_v_mhz) / (1410.0 - profile.f_v_mhz), 0.0, 1.0)
    p = 80.0 + 300.0 * f / 1410.0 * (profile.v_min + (1 - profile.v_min) * x) ** 2
    v_min, f_v, _rest, dynamic = gpu_check.fit_power_curve(f, p, 1410.0)
    assert v_min == pytest.approx(0.70, abs=0.02)
    assert f_v == pytest.approx(900.0, abs=45.0)
    assert dynamic == pytest.approx(300.0, rel=0.05)
    t = (1.0 + (0.6 * 1410.0 / f) ** 4) ** 0.25
    assert gpu_check.fit_roofline_ratio(f, 1.0 / t, 1410.0) == pytest.approx(0.6, abs=0.02)
    # A 1-s boxcar of a step, published 0.5 s late, sampled every 25 ms.
    ts = np.arange(0.0, 8.0, 0.025)
    inst = np.where(ts >= 4.0, 500.0, 100.0)
    usage = np.clip((ts - 4.5) / 1.0, 0.0, 1.0) * 400.0 + 100.0
    window, lag, rms = gpu_check.estimate_average_window(ts, inst, usage)
    assert window == pytest.approx(1.0, abs=0.051)  # one 25-ms sample of discretisation
    assert lag == pytest.approx(0.5, abs=0.051)
    assert rms < 0.02


def test_main_simulate_writes_the_outputs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The daemon's dry-run phase (40 s by default) has its own test: test_gpu_check_daemon.
    args = ["--simulate", "l40s", "--no-load", "--duration", "5", "--daemon-seconds", "0"]
    code = gpu_check.main([*args, "--out", str(tmp_path)])
    assert code == 0
    assert (tmp_path / "calibration.csv").exists() and (tmp_path / "summary.json").exists()
    assert "wrote" in capsys.readouterr().out


# powerd's own NVML path (the powerd_backend section)


class _ProcessInfo32(ctypes.Structure):
    """nvmlProcessInfo_t as drivers 535.43-535.86 write it: 32 bytes."""

    _fields_: ClassVar[list[tuple[str, Any]]] = [
        ("pid", ctypes.c_uint),
        ("usedGpuMemory", ctypes.c_ulonglong),
        ("gpuInstanceId", ctypes.c_uint),
        ("computeInstanceId", ctypes.c_uint),
        ("usedGpuCcProtectedMemory", ctypes.c_ulonglong),
    ]


def _as_binding_reads_them(pids: list[int]) -> list[Any]:
    """Those drivers' process array as nvidia-ml-py reads it, with 24-byte entries."""
    # The binding's struct for _v3 entries; before 12.550 it has no _v3 name and uses the plain one.
    entry = getattr(pynvml, "c_nvmlProcessInfo_v3_t", pynvml.c_nvmlProcessInfo_t)
    assert ctypes.sizeof(_ProcessInfo32) == 32
    assert ctypes.sizeof(entry) == 24
    written = (_ProcessInfo32 * len(pids))(
        *(_ProcessInfo32(pid, 1 << 30, 0xFFFFFFFF, 0xFFFFFFFF, 0) for pid in pids)
    )
    read = (entry * len(pids)).from_buffer(written)
    return [pynvml.nvmlStructToFriendlyObject(entry) for entry in read]


def _backend_run(fake: FakeNvml, node: Any, tmp_path: Path) -> dict[str, Any]:
    return gpu_check.run_check(
        fake, tmp_path, clock=node, load=node, duration_s=5.0, simulate=False, log=lambda _: None
    )


def _backend_checks(summary: dict[str, Any]) -> dict[tuple[str, int | None], dict[str, Any]]:
    return {
        (c["check"], c["gpu"]): c for c in summary["checks"] if c["check"].startswith("powerd_")
    }


@pytest.fixture
def host_pids(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process sees the PIDs NVML reports, so a missing own PID is a failure."""
    monkeypatch.setattr(gpu_check, "in_host_pid_namespace", lambda: True)


def test_powerd_backend_agrees_with_raw_reads(tmp_path: Path, host_pids: None) -> None:
    fake, node = _node("h100-sxm")
    summary = _backend_run(fake, node, tmp_path)
    assert fake.writes == [] and fake.failed_writes == []
    assert not any(name.startswith("nvmlDeviceSet") for name in fake.call_counts)
    section = summary["powerd_backend"]
    assert section["versions"]["driver"] == fake.driver_version
    assert section["versions"]["nvidia_ml_py"] == importlib.metadata.version("nvidia-ml-py")
    assert section["symbols"]["clock_event_reasons"]["used"] == (
        "nvmlDeviceGetCurrentClocksEventReasons"
    )
    assert section["symbols"]["compute_processes"]["used"] == "nvmlDeviceGetComputeRunningProcesses"
    assert section["symbols"]["compute_processes"]["used_from"] == "backend"
    assert [g["index"] for g in section["gpus"]] == [0, 1]
    for gpu in section["gpus"]:
        assert all(f["ok"] is True for f in gpu["device"].values())
        assert gpu["device"]["supported_sm_clocks_count"]["powerd"] > 50
        assert set(gpu["phases"]) == {"idle", "compute"}
        for phase in gpu["phases"].values():
            assert phase["reads"]["attempts"] == 1
            for name, f in phase["reads"]["fields"].items():
                assert f["ok"] is True and f["raw"] == [f["powerd"], f["powerd"]], name
        idle, compute = gpu["phases"]["idle"], gpu["phases"]["compute"]
        assert idle["reads"]["fields"]["power_mw"]["powerd"] < 150_000
        assert compute["reads"]["fields"]["power_mw"]["powerd"] > 500_000
        assert compute["reads"]["fields"]["clock_event_reasons"]["powerd"] & 0x4
        assert idle["processes"]["raw_pids"] == idle["processes"]["powerd_pids"] == []
        assert compute["processes"]["raw_pids"] == [os.getpid()]
        assert compute["processes"]["powerd_pids"] == [os.getpid()]
        assert compute["own_pid"]["ok"] is True
    assert section["discovery"]["compute"] == {"gpus": [0, 1], "error": None}
    checks = _backend_checks(summary)
    for gpu in (0, 1):
        for name in (
            "powerd_device_info",
            "powerd_read_idle",
            "powerd_read_compute",
            "powerd_processes_idle",
            "powerd_processes_compute",
            "powerd_finds_own_pid",
        ):
            assert checks[(name, gpu)]["ok"] is True, checks[(name, gpu)]
    assert checks[("powerd_backend_open", None)]["ok"] is True


def test_a_server_behind_garbled_process_entries_is_flagged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, host_pids: None
) -> None:
    fake, node = _node("h100-sxm")
    listed = fake.nvmlDeviceGetComputeRunningProcesses
    other_pid = 1  # another process, first on each GPU, present from the start

    def driver_535_54(handle: Any) -> list[Any]:
        return _as_binding_reads_them([other_pid, *(p.pid for p in listed(handle))])

    monkeypatch.setattr(fake, "nvmlDeviceGetComputeRunningProcesses", driver_535_54)
    summary = _backend_run(fake, node, tmp_path)
    checks = _backend_checks(summary)
    for gpu in summary["powerd_backend"]["gpus"]:
        idle, compute = gpu["phases"]["idle"]["processes"], gpu["phases"]["compute"]["processes"]
        assert idle["ok"] is True and idle["raw_pids"] == [other_pid]
        assert compute["raw_pids"] == [other_pid, 0]
        assert compute["powerd_pids"] == [other_pid]
        assert compute["invalid_raw_pids"] == [0]
        assert (compute["count_raw"], compute["count_powerd"]) == (2, 1)
        assert compute["ok"] is False
        assert checks[("powerd_processes_compute", gpu["index"])]["ok"] is False
        own = checks[("powerd_finds_own_pid", gpu["index"])]
        assert own["ok"] is False and "not in compute_pids" in own["detail"]
        assert checks[("powerd_read_compute", gpu["index"])]["ok"] is True


def test_the_second_garbled_entry_reads_as_an_oversize_pid(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake, _ = _node("h100-sxm", n=1)
    monkeypatch.setattr(
        fake,
        "nvmlDeviceGetComputeRunningProcesses",
        lambda handle: _as_binding_reads_them([1, 2, 3]),
    )
    section, note = gpu_check.BackendSection.create(fake, own_pid=os.getpid(), pid_max=32768)
    assert section is not None and note == ""
    fake.nvmlInit()
    try:
        section.check("idle", [0], None)
    finally:
        section.close()
        fake.nvmlShutdown()
    processes = section.report()["gpus"][0]["phases"]["idle"]["processes"]
    assert processes["raw_pids"] == [1, 0, 0xFFFFFFFF]
    assert processes["invalid_raw_pids"] == [0, 0xFFFFFFFF]
    assert processes["powerd_pids"] == [1]
    assert "pid_max 32768" in processes["detail"]
    assert [c["ok"] for c in section.checks if c["check"] == "powerd_processes_idle"] == [False]


def test_old_driver_symbols_are_recorded_and_still_agree(tmp_path: Path, host_pids: None) -> None:
    fake, node = _node("h100-sxm")
    for i in (0, 1):
        for name in (
            "nvmlDeviceGetCurrentClocksEventReasons",
            "nvmlDeviceGetComputeRunningProcesses",
        ):
            fake.inject_error(i, name, pynvml.NVMLError_FunctionNotFound, persistent=True)
    summary = _backend_run(fake, node, tmp_path)
    symbols = summary["powerd_backend"]["symbols"]
    assert symbols["clock_event_reasons"]["used"] == "nvmlDeviceGetCurrentClocksThrottleReasons"
    assert symbols["clock_event_reasons"]["probed"] == {
        "nvmlDeviceGetCurrentClocksEventReasons": "NVMLError_FunctionNotFound",
        "nvmlDeviceGetCurrentClocksThrottleReasons": "ok",
    }
    assert symbols["compute_processes"]["used"] == "nvmlDeviceGetComputeRunningProcesses_v2"
    for gpu in summary["powerd_backend"]["gpus"]:
        compute = gpu["phases"]["compute"]
        reasons = compute["reads"]["fields"]["clock_event_reasons"]
        assert reasons["ok"] is True and reasons["powerd"] is not None
        assert compute["processes"]["raw_symbol"] == "nvmlDeviceGetComputeRunningProcesses_v2"
        assert compute["processes"]["powerd_pids"] == [os.getpid()]
    assert all(c["ok"] is True for c in _backend_checks(summary).values())


def test_a_binding_before_12_570_reads_the_temperature_through_the_older_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, host_pids: None
) -> None:
    """nvidia-ml-py before 12.570 (pyproject allows 12.535) has no nvmlDeviceGetTemperatureV:
    the check stopped with an AttributeError at its first inventory, before reading anything.
    A driver without the symbol answers FunctionNotFound instead, and then the samples kept
    no temperature: the older call was never tried."""
    fake = fake_nvml_before_12_570(monkeypatch).FakeNvml(
        GpuPlant(load_gpu_profile("h100-sxm"), 2, seed=1)
    )
    fake.nvmlInit()
    handle = fake.nvmlDeviceGetHandleByIndex(0)
    info = gpu_check.inventory(fake, handle, 0)
    assert info["temperature_c"] is not None
    assert info["errors"]["nvmlDeviceGetTemperatureV"] == "absent from the binding"
    assert math.isfinite(gpu_check._read_sample(fake, handle, {})["temp_c"])
    summary = _backend_run(fake, gpu_check.SimNode(fake), tmp_path)
    assert [c for c in summary["checks"] if c["ok"] is not True] == []


@pytest.mark.skipif(
    not hasattr(pynvml, "nvmlDeviceGetTemperatureV"),
    reason="nvidia-ml-py before 12.570 has no nvmlDeviceGetTemperatureV for a driver to lack",
)
def test_a_driver_without_the_versioned_temperature_call_is_read_through_the_older_one() -> None:
    driver, _ = _node("h100-sxm", n=1)
    driver.nvmlInit()
    driver.inject_error(
        0, "nvmlDeviceGetTemperatureV", pynvml.NVMLError_FunctionNotFound, persistent=True
    )
    handle = driver.nvmlDeviceGetHandleByIndex(0)
    assert math.isfinite(gpu_check._read_sample(driver, handle, {})["temp_c"])


def test_a_backend_read_that_disagrees_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from powerd.gpu.nvml import NvmlBackend

    read = NvmlBackend.read

    def in_watts(self: NvmlBackend, uuid: str) -> GpuReading:
        reading = read(self, uuid)
        assert reading.power_mw is not None
        return dataclasses.replace(reading, power_mw=reading.power_mw // 1000)

    monkeypatch.setattr(NvmlBackend, "read", in_watts)
    fake, node = _node("h100-sxm", n=1)
    summary = _backend_run(fake, node, tmp_path)
    checks = _backend_checks(summary)
    for phase in ("idle", "compute"):
        check = checks[(f"powerd_read_{phase}", 0)]
        assert check["ok"] is False and "power_mw" in check["detail"]
        fields = summary["powerd_backend"]["gpus"][0]["phases"][phase]["reads"]
        assert fields["attempts"] == gpu_check.READ_ATTEMPTS
        assert [k for k, f in fields["fields"].items() if f["ok"] is not True] == ["power_mw"]


def test_main_fails_on_garbled_process_entries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    listed = FakeNvml.nvmlDeviceGetComputeRunningProcesses

    def driver_535_54(self: FakeNvml, handle: Any) -> list[Any]:
        return _as_binding_reads_them([1, *(p.pid for p in listed(self, handle))])

    monkeypatch.setattr(FakeNvml, "nvmlDeviceGetComputeRunningProcesses", driver_535_54)
    args = ["--simulate", "l40s", "--duration", "5", "--daemon-seconds", "0"]
    code = gpu_check.main([*args, "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 1
    assert "FAIL GPU 0 powerd_processes_compute" in out
    assert "powerd backend: driver" in out
    summary = json.loads((tmp_path / "summary.json").read_text())
    failed = {c["check"] for c in summary["checks"] if c["ok"] is False}
    assert "powerd_processes_compute" in failed
    assert "powerd_read_idle" not in failed


def test_a_backend_that_cannot_open_fails_and_the_rest_runs(tmp_path: Path) -> None:
    fake, node = _node("h100-sxm", n=1)
    fake.inject_error(None, "nvmlInit", pynvml.NVMLError_DriverNotLoaded)  # once: the backend's
    summary = _backend_run(fake, node, tmp_path)
    open_check = _backend_checks(summary)[("powerd_backend_open", None)]
    assert open_check["ok"] is False and "GpuUnavailable" in open_check["detail"]
    assert "kernel driver is not loaded" in summary["powerd_backend"]["open_error"]
    assert summary["powerd_backend"]["gpus"] == []
    assert summary["phases"]["compute"][0]["power_w"] > 500.0


def test_without_powerd_the_section_is_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake, node = _node("h100-sxm", n=1)
    monkeypatch.setitem(sys.modules, "powerd.gpu.nvml", None)
    summary = _backend_run(fake, node, tmp_path)
    assert "powerd is not importable" in summary["powerd_backend"]["skipped"]
    assert any("powerd_backend skipped" in n for n in summary["notes"])
    assert _backend_checks(summary) == {}
    assert [c for c in summary["checks"] if c["ok"] is not True] == []


def test_agreement_brackets_racing_values() -> None:
    agreement = gpu_check.agreement
    assert agreement("energy_mj", [100, 120], 110) is True
    assert agreement("energy_mj", [100, 120], 121) is False
    assert agreement("sm_clock_mhz", [1980, 1980], 1965) is False
    assert agreement("power_mw", [500_000, 500_000], 504_000) is True
    assert agreement("power_mw", [500_000, 500_000], 500) is False
    assert agreement("clock_event_reasons", [0x1, 0x5], 0x4) is False
    assert agreement("clock_event_reasons", [0x1, 0x5], 0x5) is True
    assert agreement("temperature_c", [None, None], None) is True
    assert agreement("temperature_c", [40, 41], None) is False
    assert agreement("temperature_c", [None, None], 40) is None


def test_driver_notes_name_the_32_byte_process_struct() -> None:
    assert gpu_check.driver_notes("535.54.03")
    assert gpu_check.driver_notes("535.86.10")
    assert gpu_check.driver_notes("535.104.05") == []
    assert gpu_check.driver_notes("590.48.01") == []
    assert gpu_check.driver_notes(None) == []


def test_slow_calls_an_unreachable_clock_table_and_mig_are_flagged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the simulated node never shows and a real one may: an NVML call that stalls (the
    tick makes seven a GPU), a clock table listing clocks past the board's maximum (some
    GeForce and Ada parts), a GPU in MIG mode."""
    fake, node = _node("h100-sxm")
    monkeypatch.setattr(gpu_check, "CALL_SECONDS", {})
    monkeypatch.setattr(gpu_check, "SLOW_CALL_S", 0.01)
    named = fake.nvmlDeviceGetName

    def slow_name(handle: Any) -> str:
        time.sleep(0.02)
        return named(handle)

    monkeypatch.setattr(fake, "nvmlDeviceGetName", slow_name)
    monkeypatch.setattr(fake, "nvmlDeviceGetMaxClockInfo", lambda handle, clock: 1755)
    monkeypatch.setattr(fake, "nvmlDeviceGetMigMode", lambda handle: [1, 1])
    summary = gpu_check.run_check(
        fake, tmp_path, clock=node, load=node, duration_s=5.0, log=lambda _: None
    )
    failed = {(c["check"], c["gpu"]) for c in summary["checks"] if c["ok"] is False}
    assert ("nvml_calls_answer_quickly", None) in failed
    assert {("clock_table_within_max_clock", 0), ("mig_mode_off", 0)} <= failed
    latency = summary["nvml_call_latency_ms"]["nvmlDeviceGetName"]
    assert latency["max_ms"] >= 20.0 and latency["calls"] >= 1


def test_a_call_that_spins_in_the_driver_shows_its_cpu_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A driver may busy-wait inside a call (a real H200's energy counter takes about 3 ms of
    CPU a read): the call's CPU time is what the daemon pays every tick, and a sleeping call
    of the same length costs none."""
    fake, node = _node("h100-sxm", n=1)
    monkeypatch.setattr(gpu_check, "CALL_SECONDS", {})
    energy, name = fake.nvmlDeviceGetTotalEnergyConsumption, fake.nvmlDeviceGetName

    def spinning_energy(handle: Any) -> int:
        until = time.thread_time() + 0.004
        while time.thread_time() < until:
            pass
        return int(energy(handle))

    def sleeping_name(handle: Any) -> str:
        time.sleep(0.004)
        return str(name(handle))

    monkeypatch.setattr(fake, "nvmlDeviceGetTotalEnergyConsumption", spinning_energy)
    monkeypatch.setattr(fake, "nvmlDeviceGetName", sleeping_name)
    summary = gpu_check.run_check(
        fake, tmp_path, clock=node, load=node, duration_s=5.0, log=lambda _: None
    )
    latency = summary["nvml_call_latency_ms"]
    assert latency["nvmlDeviceGetTotalEnergyConsumption"]["cpu_median_ms"] >= 3.5
    assert latency["nvmlDeviceGetName"]["median_ms"] >= 3.5
    assert latency["nvmlDeviceGetName"]["cpu_median_ms"] < 2.0
    quick = next(c for c in summary["checks"] if c["check"] == "nvml_calls_answer_quickly")
    assert "most CPU: nvmlDeviceGetTotalEnergyConsumption" in quick["detail"]
    costs = [c for c in summary["checks"] if c["check"].startswith("powerd_read_cost_")]
    assert {c["check"] for c in costs} == {"powerd_read_cost_idle", "powerd_read_cost_compute"}
    assert all(c["ok"] for c in costs)
    read_cost = summary["powerd_backend"]["gpus"][0]["phases"]["idle"]["read_cost"]
    assert read_cost["cpu_mean_ms"] >= 3.5  # powerd's read makes the energy call once


def test_a_read_slower_than_its_share_of_the_tick_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake, node = _node("h100-sxm", n=1)
    monkeypatch.setattr(gpu_check, "READ_BUDGET_S", 0.002)
    clocks = fake.nvmlDeviceGetClockInfo

    def slow_clock(handle: Any, clock: int) -> int:
        time.sleep(0.005)
        return int(clocks(handle, clock))

    monkeypatch.setattr(fake, "nvmlDeviceGetClockInfo", slow_clock)
    summary = gpu_check.run_check(
        fake, tmp_path, clock=node, load=node, duration_s=5.0, log=lambda _: None
    )
    failed = {c["check"] for c in summary["checks"] if c["ok"] is False}
    assert {"powerd_read_cost_idle", "powerd_read_cost_compute"} <= failed


def test_a_write_in_the_read_only_run_is_refused_and_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The read-only run holds to it by construction; a path that did not (here a read that
    sets persistence mode first) reaches no GPU and fails the check by name."""
    fake, node = _node("h100-sxm", n=1)
    name = fake.nvmlDeviceGetName

    def name_after_a_write(handle: Any) -> str:
        with contextlib.suppress(pynvml.NVMLError_NoPermission):
            fake.nvmlDeviceSetPersistenceMode(handle, 1)
        return str(name(handle))

    monkeypatch.setattr(fake, "nvmlDeviceGetName", name_after_a_write)
    summary = gpu_check.run_check(
        fake, tmp_path, clock=node, load=node, duration_s=5.0, log=lambda _: None
    )
    held = next(c for c in summary["checks"] if c["check"] == "read_only_held")
    assert held["ok"] is False and "nvmlDeviceSetPersistenceMode" in held["detail"]
    assert fake.writes == [] and fake.failed_writes == []
    assert "nvmlDeviceSetPersistenceMode" not in vars(fake)  # the class's method again


def test_read_only_puts_a_module_s_functions_back() -> None:
    set_limit = pynvml.nvmlDeviceSetPowerManagementLimit
    refused: list[str] = []
    with gpu_check.read_only(pynvml, refused):
        assert pynvml.nvmlDeviceSetPowerManagementLimit is not set_limit
        with pytest.raises(pynvml.NVMLError_NoPermission):
            pynvml.nvmlDeviceSetGpuLockedClocks(None, 210, 1980)
        assert pynvml.nvmlDeviceGetPowerUsage is not None
    assert pynvml.nvmlDeviceSetPowerManagementLimit is set_limit
    assert refused == ["nvmlDeviceSetGpuLockedClocks"]


@pytest.mark.parametrize(
    "name",
    [
        "nvmlDeviceSetGpuLockedClocks",
        "nvmlDeviceResetGpuLockedClocks",
        "nvmlDeviceSetPowerManagementLimit_v2",
        "nvmlDevicePowerSmoothingActivatePresetProfile",
        "nvmlDevicePowerSmoothingUpdatePresetProfileParam",
        "nvmlDeviceWorkloadPowerProfileUpdateProfiles_v1",
        "nvmlDeviceReadWritePRM_v1",
        "nvmlDeviceFreezeNvLinkUtilizationCounter",
        "nvmlDeviceVgpuForceGspUnload",
        "nvmlDeviceFrobnicateClocks",  # one a later binding might add
    ],
)
def test_a_function_not_known_to_only_read_is_refused(name: str) -> None:
    assert gpu_check.nvml_may_write(name)


def test_every_read_powerd_and_the_check_make_is_allowed() -> None:
    source = (ROOT / "powerd" / "gpu" / "nvml.py").read_text() + (
        ROOT / "tools" / "gpu_check.py"
    ).read_text()
    called = set(re.findall(r'"(nvml[A-Z]\w*)"', source)) | {"nvmlInit", "nvmlShutdown"}
    writes = {n for n in called if gpu_check.nvml_may_write(n)}
    assert writes == {
        "nvmlDeviceSetGpuLockedClocks",
        "nvmlDeviceResetGpuLockedClocks",
        "nvmlDeviceSetPowerManagementLimit",
    }
    for name in dir(pynvml):
        if name.startswith("nvmlDeviceGet") or name.startswith("nvmlSystemGet"):
            assert not gpu_check.nvml_may_write(name), name


def test_the_settings_comparison_names_a_change_and_what_it_could_not_read(
    tmp_path: Path,
) -> None:
    dry_run = gpu_check.DaemonDryRun(tmp_path, seconds=10.0, backend="nvml")
    before: dict[int, dict[str, int | None]] = {
        0: {"power_limit_mw": 700_000, "compute_mode": None, "persistence_mode": 1},
        1: {"power_limit_mw": 700_000, "compute_mode": None, "persistence_mode": 1},
        2: {"power_limit_mw": None, "compute_mode": None, "persistence_mode": None},
    }
    after = {
        0: {"power_limit_mw": 650_000, "compute_mode": None, "persistence_mode": 1},
        1: dict(before[1]),
        2: dict(before[2]),
    }
    dry_run._compare(before, after)
    checks = {c["gpu"]: c for c in dry_run.checks if c["check"] == "daemon_changed_nothing"}
    assert checks[0]["ok"] is False and "'power_limit_mw': [700000, 650000]" in checks[0]["detail"]
    assert checks[1]["ok"] is True
    assert checks[1]["detail"] == "2 settings as before; not readable here: compute_mode"
    assert checks[2]["ok"] is None  # nothing could be read: nothing is shown unchanged


@pytest.mark.parametrize(("gpus", "code"), [("5", 2), ("0,7", 2), ("x", 2)])
def test_gpus_the_node_lacks_are_refused_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], gpus: str, code: int
) -> None:
    argv = ["--simulate", "h100-sxm", "--gpus", gpus, "--out", str(tmp_path)]
    if gpus == "x":
        with pytest.raises(SystemExit) as exit_info:
            gpu_check.main(argv)
        assert exit_info.value.code == code
        assert "--gpus takes NVML indices" in capsys.readouterr().err
        return
    assert gpu_check.main(argv) == code
    assert "which this node lacks (NVML counts 2)" in capsys.readouterr().err
    assert not (tmp_path / "summary.json").exists()


def test_an_interrupted_run_keeps_what_it_measured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C (or SIGTERM) during the dry run: the measurements before it are written, with a
    note, and the interrupt goes on to end the tool."""
    fake, node = _node("h100-sxm", n=1)

    def interrupted(self: Any, *args: Any) -> None:
        self._add("daemon_ready", None, True, "ready after 1.0 s")
        raise KeyboardInterrupt

    monkeypatch.setattr(gpu_check.DaemonDryRun, "run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        gpu_check.run_check(
            fake,
            tmp_path,
            clock=node,
            load=node,
            duration_s=5.0,
            daemon_seconds=30.0,
            daemon_backend="sim",
            log=lambda _: None,
        )
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert "interrupted: this summary holds what ran before" in summary["notes"]
    assert summary["gpus"][0]["name"] == "NVIDIA H100 80GB HBM3"
    checks = {c["check"] for c in summary["checks"]}
    assert {"energy_counter_vs_power_compute", "daemon_ready"} <= checks
    assert (tmp_path / "calibration.csv").exists()
