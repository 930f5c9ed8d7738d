"""Running `powerd` as a separate process on a simulated node, as systemd would."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

from powerd.sim.device_state import DeviceStateFile
from tests.conftest import REPO_ROOT


def write_sim_config(tmp_path: Path, **overrides: object) -> Path:
    """A config for `powerd run` on a 2-GPU simulated node with state in tmp_path."""
    data: dict[str, object] = {
        "gpu_backend": "sim",
        "interval_s": 0.25,
        "state_dir": str(tmp_path / "state"),
        "metrics": {"port": 0},
        "sim": {
            "gpus": 2,
            "tp": 1,
            "model": "llama-3.1-8b",
            "trace": "constant",
            "peak_load": 0.3,
            "state_file": str(tmp_path / "gpus.json"),
        },
    }
    data.update(overrides)
    path = tmp_path / "powerd.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def powerd_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("NUMBA_CACHE_DIR", str(REPO_ROOT / ".numba_cache"))
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def powerd(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "powerd.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=powerd_env() if env is None else env,
        cwd=REPO_ROOT,
        check=False,
    )


def start_powerd(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "powerd.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env or powerd_env(),
        cwd=REPO_ROOT,
    )


def device_settings(state_file: Path) -> dict[str, tuple[int | None, tuple[int, int] | None]]:
    """Each simulated GPU's (power limit mW, locked clocks) as the device state file holds them.

    None means the device default: what a GPU has after a reboot, or after a full restore.
    """
    settings = DeviceStateFile(state_file).read()
    return {uuid: (gpu.power_limit_mw, gpu.locked_clocks_mhz) for uuid, gpu in settings.items()}


def changed_gpus(state_file: Path) -> dict[str, tuple[int | None, tuple[int, int] | None]]:
    """The GPUs whose settings differ from the defaults (700 W limit, unlocked clocks)."""
    return {
        uuid: value
        for uuid, value in device_settings(state_file).items()
        if value[1] is not None or (value[0] is not None and value[0] != 700_000)
    }


class NotifySocket:
    """A unix datagram socket standing in for systemd's NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[str] = []

    def wait_for(self, field: str, timeout_s: float = 90.0) -> str:
        """Collect datagrams until one contains `field` (e.g. READY=1); return it."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                data = self.sock.recv(4096).decode()
            except TimeoutError:
                break
            self.messages.append(data)
            if field in data.split("\n"):
                return data
        raise AssertionError(f"no {field} within {timeout_s} s; got {self.messages}")

    def close(self) -> None:
        self.sock.close()
