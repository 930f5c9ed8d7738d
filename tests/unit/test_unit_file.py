"""systemd/powerd.service: systemd accepts it, and its exposure stays at 2.5 or lower.

Without systemd-analyze the checks are skipped, except under CI=true where they must run.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from powerd.config import FINAL_SCRAPE_WAIT_MAX_S, MetricsConfig
from powerd.metrics_http import MAX_CONNECTIONS
from tests.conftest import require_program

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "powerd.service"
MAX_EXPOSURE = 2.5
INSTALLED_BINARY = "/usr/local/bin/powerd"


def _systemd_analyze() -> str:
    return require_program("systemd-analyze", "systemd")


def _directives() -> list[tuple[str, str, str]]:
    """(section, key, value) for every assignment, in file order (keys may repeat)."""
    section = ""
    found: list[tuple[str, str, str]] = []
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        found.append((section, key.strip(), value.strip()))
    return found


def _values(key: str, section: str = "Service") -> list[str]:
    return [v for s, k, v in _directives() if s == section and k == key]


@pytest.fixture
def installable_copy(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at an executable that exists on this machine, since
    verify checks that every command is executable."""
    stand_in = tmp_path / "powerd"
    stand_in.write_text("#!/bin/sh\nexit 0\n")
    stand_in.chmod(0o755)
    text = UNIT.read_text().replace(INSTALLED_BINARY, str(stand_in))
    kill = shutil.which("kill") or "/bin/kill"
    if not Path("/bin/kill").exists():
        text = text.replace("/bin/kill", kill)
    copy = tmp_path / "powerd.service"
    copy.write_text(text)
    return copy


def test_systemd_analyze_verify(installable_copy: Path) -> None:
    analyze = _systemd_analyze()
    result = subprocess.run(
        [analyze, "verify", "--man=no", "--generators=no", str(installable_copy)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # verify exits 0 on unknown keys and bad values; it names the file in those warnings.
    complaints = [line for line in output.splitlines() if installable_copy.name in line]
    assert complaints == []


def test_security_exposure_is_low(installable_copy: Path) -> None:
    analyze = _systemd_analyze()
    result = subprocess.run(
        [analyze, "security", "--offline=true", "--no-pager", str(installable_copy)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = result.stdout + result.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", output)
    assert match is not None, output
    exposure = float(match.group(1))
    assert exposure <= MAX_EXPOSURE, output


def test_service_contract() -> None:
    assert _values("Type") == ["notify"]
    assert _values("NotifyAccess") == ["main"]
    (exec_start,) = _values("ExecStart")
    assert exec_start.split()[:2] == [INSTALLED_BINARY, "run"]
    (stop_post,) = _values("ExecStopPost")
    assert stop_post.split()[:2] == [INSTALLED_BINARY, "restore"]
    # The restore must read the same configuration (state directory) as the run.
    assert exec_start.split()[2:] == stop_post.split()[2:]
    assert _values("ExecReload") == ["/bin/kill -HUP $MAINPID"]
    assert _values("Restart") == ["on-failure"]
    assert int(_values("WatchdogSec")[0]) > 0
    assert _values("StateDirectory") == ["powerd"]
    assert _values("CacheDirectory") == ["powerd"]
    assert "NUMBA_CACHE_DIR=/var/cache/powerd" in _values("Environment")


def test_a_stop_has_time_for_the_longest_final_scrape_wait() -> None:
    """systemd kills a stop that outlasts TimeoutStopSec: the wait for the last scrape of the
    restored GPUs, at its largest, must fit with time to spare for the restore before it."""
    (timeout,) = _values("TimeoutStopSec")
    assert int(timeout) >= FINAL_SCRAPE_WAIT_MAX_S + 5
    # The default wait covers Prometheus's default 1-min scrape_interval.
    assert 60 * 1.25 <= MetricsConfig().final_scrape_wait_s <= FINAL_SCRAPE_WAIT_MAX_S


def test_hardening_choices() -> None:
    assert _values("CapabilityBoundingSet") == ["CAP_SYS_ADMIN"]
    assert _values("NoNewPrivileges") == ["yes"]
    assert _values("ProtectSystem") == ["strict"]
    assert _values("DevicePolicy") == ["closed"]
    assert any(v.startswith("char-nvidiactl ") for v in _values("DeviceAllow"))
    # numba's JIT maps pages writable then executable.
    assert _values("MemoryDenyWriteExecute") == []
    # powerd scrapes servers over TCP and serves /metrics.
    assert _values("PrivateNetwork") in ([], ["no"])
    assert _values("PrivateDevices") in ([], ["no"])
    families = " ".join(_values("RestrictAddressFamilies")).split()
    assert {"AF_UNIX", "AF_INET", "AF_INET6"} <= set(families)
    after = " ".join(_values("After", section="Unit")).split()
    assert "nvidia-persistenced.service" in after
    # Ordering alone starts nothing: the daemon that keeps the GPUs initialised (and their
    # device nodes made) must be pulled in, not only waited for when something else starts it.
    wants = " ".join(_values("Wants", section="Unit")).split()
    assert "nvidia-persistenced.service" in wants


def _size_bytes(value: str) -> int:
    """A systemd size (a number with an optional K, M, G or T suffix, base 1024) in bytes."""
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    if value[-1:].upper() in units:
        return int(float(value[:-1]) * units[value[-1].upper()])
    return int(value)


def test_resource_limits_leave_headroom() -> None:
    """MemoryMax= and TasksMax= stop a leak or a flood, well above what powerd uses: about
    160 MB running and 370 MB at its peak (a cold start: the daemon with numba imported and
    the child compiling its kernels), and about 10 threads, an OpenBLAS pool of up to 64, 16
    scrape workers during a reload and one thread per metrics connection."""
    (memory_max,) = _values("MemoryMax")
    assert _size_bytes(memory_max) >= 2.5 * 370 * 2**20
    (tasks_max,) = _values("TasksMax")
    assert int(tasks_max) >= 3 * (10 + 64 + 16 + MAX_CONNECTIONS)
