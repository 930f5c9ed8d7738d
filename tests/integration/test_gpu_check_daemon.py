"""tools/gpu_check.py's dry run of the daemon itself: started, watched and stopped as on a
GPU node, here on simulated GPUs (the NVML the check reads is the fake's)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pynvml
import pytest

from powerd.sim.fake_nvml import FakeNvml
from powerd.sim.plant import GpuPlant, load_gpu_profile
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow


def _load_tool() -> ModuleType:
    module = sys.modules.get("gpu_check")
    if module is not None:
        return module
    spec = importlib.util.spec_from_file_location("gpu_check", REPO_ROOT / "tools" / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module
    spec.loader.exec_module(module)
    return module


gpu_check = _load_tool()


def _inventory(fake: FakeNvml) -> list[dict[str, Any]]:
    fake.nvmlInit()
    try:
        handles = [fake.nvmlDeviceGetHandleByIndex(i) for i in range(fake.nvmlDeviceGetCount())]
        return [gpu_check.inventory(fake, h, i) for i, h in enumerate(handles)]
    finally:
        fake.nvmlShutdown()


def _by_check(checks: list[dict[str, Any]]) -> dict[tuple[str, int | None], dict[str, Any]]:
    return {(c["check"], c["gpu"]): c for c in checks}


def test_the_dry_run_starts_watches_and_stops_the_daemon_and_sees_a_changed_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GPU 0's power limit reads 50 W lower once the daemon runs (another tool, or a daemon
    that wrote in a dry run): the check names it; GPU 1 reads as before."""
    fake = FakeNvml(GpuPlant(load_gpu_profile("h100-sxm"), 2, seed=1))
    inv = _inventory(fake)
    limit = fake.nvmlDeviceGetPowerManagementLimit
    reads = {"n": 0}

    def limit_lowered_later(handle: Any) -> int:
        value = int(limit(handle))
        if fake.nvmlDeviceGetIndex(handle) == 0:
            reads["n"] += 1
            if reads["n"] > 1:
                return value - 50_000
        return value

    monkeypatch.setattr(fake, "nvmlDeviceGetPowerManagementLimit", limit_lowered_later)
    dry_run = gpu_check.DaemonDryRun(tmp_path, seconds=6.0, backend="sim")
    dry_run.run(fake, inv, None, lambda _: None)
    checks = _by_check(dry_run.checks)
    for name in ("daemon_ready", "daemon_nvml_errors", "daemon_stops_cleanly"):
        assert checks[(name, None)]["ok"] is True, checks[(name, None)]
    assert checks[("daemon_logged_no_problem", None)]["ok"] is True, dry_run.report
    assert checks[("daemon_changed_nothing", 1)]["ok"] is True
    changed = checks[("daemon_changed_nothing", 0)]
    assert changed["ok"] is False and "power_limit_mw" in changed["detail"]
    assert checks[("daemon_power_agrees", 0)]["ok"] is None  # simulated GPUs: nothing to compare
    report = dry_run.report
    assert report["exit_code"] == 0 and report["ticks"] >= 3
    assert report["loop_duration_mean_ms"] > 0 and report["cpu_percent_of_core"] > 0
    assert report["rss_mib_max"] > 50
    assert "dry_run: true" in (tmp_path / "daemon.yaml").read_text()
    assert "powerd_gpu_power_watts" in (tmp_path / "daemon_metrics.txt").read_text()
    assert fake.writes == []


def test_a_daemon_that_cannot_start_is_a_failed_check_not_a_hang(tmp_path: Path) -> None:
    """On a machine without the NVIDIA driver the daemon on NVML exits at once: the check
    says so with its last lines and goes on."""
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        pass
    else:
        pynvml.nvmlShutdown()
        pytest.skip("this machine has NVML: the daemon would start on its GPUs")
    fake = FakeNvml(GpuPlant(load_gpu_profile("h100-sxm"), 1, seed=1))
    dry_run = gpu_check.DaemonDryRun(tmp_path, seconds=6.0, backend="nvml")
    dry_run.run(fake, _inventory(fake), None, lambda _: None)
    checks = _by_check(dry_run.checks)
    ready = checks[("daemon_ready", None)]
    assert ready["ok"] is False and "exited with" in ready["detail"]
    assert "ready_after_s" not in dry_run.report
    assert checks[("daemon_changed_nothing", 0)]["ok"] is True
