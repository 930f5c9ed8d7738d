"""tools/gpu_check.py against the fake NVML: read-only by default, restores after --sweep."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pynvml
import pytest

from powerd.sim.fake_nvml import FakeNvml
from powerd.sim.plant import GpuPlant, load_gpu_profile

ROOT = Path(__file__).resolve().parents[2]


def _load_tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "tools" / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module
    spec.loader.exec_module(module)
    return module


gpu_check = _load_tool()


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
    fake.inject_error(0, "nvmlDeviceGetTemperature", pynvml.NVMLError_Unknown, persistent=True)
    summary = gpu_check.run_check(
        fake, tmp_path, clock=node, load=None, duration_s=5.0, simulate=False, log=lambda _: None
    )
    assert summary["nvml_errors"]["nvmlDeviceGetTemperature"] == "NVMLError_Unknown"
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
    code = gpu_check.main(
        ["--simulate", "l40s", "--no-load", "--duration", "5", "--out", str(tmp_path)]
    )
    assert code == 0
    assert (tmp_path / "calibration.csv").exists() and (tmp_path / "summary.json").exists()
    assert "wrote" in capsys.readouterr().out
