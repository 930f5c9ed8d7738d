"""tools/gpu_check.py's dry run of the daemon itself: started, watched and stopped as on a
GPU node, here on simulated GPUs (the NVML the check reads is the fake's)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pynvml
import pytest

from powerd.sim.fake_nvml import FakeNvml
from powerd.sim.plant import GpuPlant, load_gpu_profile
from tests.conftest import REPO_ROOT
from tests.unit.gpu_check_tool import load_gpu_check
from tests.unit.waiting import wait_until

pytestmark = pytest.mark.slow


gpu_check = load_gpu_check()


def _fake(n: int = 2) -> tuple[FakeNvml, list[dict[str, Any]]]:
    fake = FakeNvml(GpuPlant(load_gpu_profile("h100-sxm"), n, seed=1))
    fake.nvmlInit()
    try:
        handles = [fake.nvmlDeviceGetHandleByIndex(i) for i in range(n)]
        return fake, [gpu_check.inventory(fake, h, i) for i, h in enumerate(handles)]
    finally:
        fake.nvmlShutdown()


def _by_check(checks: list[dict[str, Any]]) -> dict[tuple[str, int | None], dict[str, Any]]:
    return {(c["check"], c["gpu"]): c for c in checks}


def test_the_dry_run_starts_watches_and_stops_the_daemon(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run from a systemd unit or behind an http_proxy, as an operator may: the daemon logs
    as a plain child and the tool reads it without the proxy."""
    for name, value in (
        ("INVOCATION_ID", "0123456789abcdef0123456789abcdef"),
        ("JOURNAL_STREAM", "8:12345"),
        ("NOTIFY_SOCKET", str(tmp_path / "nobody-listens")),
        ("http_proxy", "http://127.0.0.1:9"),
    ):
        monkeypatch.setenv(name, value)
    fake, inv = _fake()
    dry_run = gpu_check.DaemonDryRun(tmp_path, seconds=6.0, backend="sim")
    dry_run.run(fake, inv, None, lambda _: None)
    checks = _by_check(dry_run.checks)
    for name in (
        "daemon_ready",
        "daemon_ticks",
        "daemon_answers_scrapes",
        "daemon_nvml_errors",
        "daemon_stops_cleanly",
        "daemon_journaled_nothing",
        "daemon_read_only_held",
        "daemon_logged_no_problem",
    ):
        assert checks[(name, None)]["ok"] is True, (checks[(name, None)], dry_run.report)
    assert checks[("daemon_power_agrees", 0)]["ok"] is None  # simulated GPUs
    assert checks[("daemon_changed_nothing", 1)]["ok"] is None
    report = dry_run.report
    assert report["exit_code"] == 0 and report["ticks"] >= 3 and report["failed_scrapes"] == 0
    assert report["loop_duration_mean_ms"] > 0 and report["cpu_percent_of_core"] > 0
    assert report["rss_mib_max"] > 50 and report["refused_writes"] == []
    assert "dry_run: true" in (tmp_path / "daemon.yaml").read_text()
    assert "powerd_gpu_power_watts" in (tmp_path / "daemon_metrics.txt").read_text()
    assert not (tmp_path / "daemon.log").read_text().startswith("<")


class _DeadServers(gpu_check.DaemonDryRun):  # type: ignore[name-defined,misc]
    def _run(self, nvml: Any, inv: Any, load: Any, urls: list[str], log: Any) -> None:
        super()._run(nvml, inv, load, ["http://127.0.0.1:9/metrics"] * len(urls), log)


def test_a_warning_is_seen_when_the_tool_runs_under_systemd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under a unit the daemon would log `<4>powerd...` for journald, which the check would
    not read as a warning; it runs as a plain child instead."""
    monkeypatch.setenv("INVOCATION_ID", "0123456789abcdef0123456789abcdef")
    monkeypatch.setenv("JOURNAL_STREAM", "8:12345")
    fake, inv = _fake(1)
    dry_run = _DeadServers(tmp_path, seconds=8.0, backend="sim")
    dry_run.run(fake, inv, None, lambda _: None)
    logged = _by_check(dry_run.checks)[("daemon_logged_no_problem", None)]
    assert logged["ok"] is False and " WARNING " in logged["detail"], logged


class _DiesAfterReady(gpu_check.DaemonDryRun):  # type: ignore[name-defined,misc]
    def _wait_ready(self, daemon: subprocess.Popen[bytes], started_s: float) -> str | None:
        url = super()._wait_ready(daemon, started_s)
        daemon.kill()
        return url


def test_a_daemon_that_dies_mid_run_still_has_what_it_left_checked(tmp_path: Path) -> None:
    fake, inv = _fake(1)
    dry_run = _DiesAfterReady(tmp_path, seconds=6.0, backend="sim")
    dry_run.run(fake, inv, None, lambda _: None)
    checks = _by_check(dry_run.checks)
    ran = checks[("daemon_ran_through", None)]
    assert ran["ok"] is False and f"exited with {-signal.SIGKILL}" in ran["detail"]
    assert ("daemon_stops_cleanly", None) not in checks  # nothing was asked of it
    assert checks[("daemon_journaled_nothing", None)]["ok"] is True
    assert ("daemon_logged_no_problem", None) in checks
    assert ("daemon_changed_nothing", 0) in checks


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
    fake, inv = _fake(1)
    dry_run = gpu_check.DaemonDryRun(tmp_path, seconds=6.0, backend="nvml")
    dry_run.run(fake, inv, None, lambda _: None)
    checks = _by_check(dry_run.checks)
    ready = checks[("daemon_ready", None)]
    assert ready["ok"] is False and "exited with" in ready["detail"]
    assert "NVML is not available" in ready["detail"]
    assert "ready_after_s" not in dry_run.report
    assert checks[("daemon_changed_nothing", 0)]["ok"] is True


def _daemons_of(config: Path) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if str(config) in (process.info["cmdline"] or []):
            found.append(process)
    return found


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGKILL])
def test_the_daemon_does_not_outlive_the_tool(tmp_path: Path, signum: int) -> None:
    """Whatever ends the tool (a scheduler's SIGTERM, an ssh session's SIGHUP, SIGKILL), its
    daemon goes with it: none is left running dry with nobody to read it."""
    tool = subprocess.Popen(
        [
            sys.executable,
            str(REPO_ROOT / "tools" / "gpu_check.py"),
            "--simulate",
            "h100-sxm",
            "--no-load",
            "--duration",
            "5",
            "--daemon-seconds",
            "120",
            "--out",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    config = tmp_path / "daemon.yaml"
    try:
        log = tmp_path / "daemon.log"
        assert wait_until(
            lambda: log.exists() and "metrics on" in log.read_text(), timeout_s=180
        ), "no ready line from the daemon"
        assert _daemons_of(config)
        tool.send_signal(signum)
        tool.wait(timeout=90)
        assert wait_until(lambda: not _daemons_of(config), timeout_s=60), "the daemon runs on"
    finally:
        tool.kill()
        tool.wait()
        for process in _daemons_of(config):
            process.kill()
