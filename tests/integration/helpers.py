"""Running `powerd` as a separate process on a simulated node, as systemd would."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

import yaml

from powerd.sim.device_state import DeviceStateFile
from tests.conftest import REPO_ROOT
from tools.numba_cache_dir import numba_cache_dir


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
    env.setdefault("NUMBA_CACHE_DIR", str(numba_cache_dir(REPO_ROOT)))
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
    """A unix datagram socket standing in for systemd's NOTIFY_SOCKET.

    A thread drains it as systemd does: powerd drops a notification rather than block when the
    receive queue is full (net.unix.max_dgram_qlen, often 10), so a reader that only reads
    while waiting would lose what was sent in between.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.messages: list[str] = []
        self._seen = 0
        self._arrived = threading.Condition()
        self._closed = threading.Event()
        self._reader = threading.Thread(target=self._read, name="notify-socket", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while not self._closed.is_set():
            try:
                data = self.sock.recv(4096).decode()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._arrived:
                self.messages.append(data)
                self._arrived.notify_all()

    def wait_for(self, field: str, timeout_s: float = 90.0) -> str:
        """The next datagram, after the one last returned, that contains `field` (e.g.
        READY=1)."""
        deadline = time.monotonic() + timeout_s
        with self._arrived:
            while True:
                while self._seen < len(self.messages):
                    data = self.messages[self._seen]
                    self._seen += 1
                    if field in data.split("\n"):
                        return data
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"no {field} within {timeout_s} s; got {self.messages}")
                self._arrived.wait(remaining)

    def close(self) -> None:
        self._closed.set()
        self._reader.join(timeout=2.0)
        self.sock.close()


class ProcessOutput:
    """What a process started by start_powerd writes (stdout, stderr merged into it), read by
    a thread as it comes: a test can wait for a line while the process runs, however late a
    busy machine writes it."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None, "start_powerd pipes the output"
        self._lines: list[str] = []
        self._arrived = threading.Condition()
        self._reader = threading.Thread(
            target=self._read, args=(process.stdout,), name="powerd-output", daemon=True
        )
        self._reader.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            with self._arrived:
                self._lines.append(line)
                self._arrived.notify_all()

    def wait_for(self, text: str, timeout_s: float = 60.0) -> None:
        """Return once a line containing `text` was written; AssertionError after timeout_s."""
        deadline = time.monotonic() + timeout_s
        with self._arrived:
            while not any(text in line for line in self._lines):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"no {text!r} within {timeout_s} s: {self._lines}")
                self._arrived.wait(remaining)

    def text(self, timeout_s: float = 60.0) -> str:
        """All of it, once the process has closed its output (exited)."""
        self._reader.join(timeout_s)
        with self._arrived:
            return "".join(self._lines)
