"""Simulated GPU settings that outlive the process that set them, kept in a file.

On real hardware the power limit, locked clocks and persistence mode are driver state: they
survive the exit (or SIGKILL) of the process that set them and are lost at reboot
(nvml_api.md §5). The fake NVML keeps them in a JSON file so a second process (a restarted
daemon, `powerd restore`) sees what the first one left. Writes are atomic (temporary file,
fsync, rename) under an fcntl lock on a sibling ".lock" file, so concurrent processes never
read a torn file nor lose each other's updates.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
import uuid as uuid_module
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORMAT = "powerd-sim-device-state/1"

Signature = tuple[int, int, int]
"""(inode, mtime_ns, size) of the state file: changes whenever any process rewrites it."""


class DeviceStateError(ValueError):
    """The state file cannot be used (unreadable, not ours, or malformed)."""


@dataclass(frozen=True, slots=True)
class GpuSettings:
    """One GPU's persistent settings. None means the device default."""

    power_limit_mw: int | None = None
    locked_clocks_mhz: tuple[int, int] | None = None
    persistence_mode: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "power_limit_mw": self.power_limit_mw,
            "locked_clocks_mhz": list(self.locked_clocks_mhz) if self.locked_clocks_mhz else None,
            "persistence_mode": self.persistence_mode,
        }

    @classmethod
    def from_json(cls, data: Any, where: str) -> GpuSettings:
        if not isinstance(data, dict):
            raise DeviceStateError(f"{where}: expected an object, got {type(data).__name__}")
        unknown = set(data) - {"power_limit_mw", "locked_clocks_mhz", "persistence_mode"}
        if unknown:
            raise DeviceStateError(f"{where}: unknown key {sorted(unknown)[0]!r}")
        limit = data.get("power_limit_mw")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)):
            raise DeviceStateError(f"{where}.power_limit_mw: expected an integer, got {limit!r}")
        clocks = data.get("locked_clocks_mhz")
        locked: tuple[int, int] | None = None
        if clocks is not None:
            if (
                not isinstance(clocks, list)
                or len(clocks) != 2
                or not all(isinstance(c, int) and not isinstance(c, bool) for c in clocks)
            ):
                raise DeviceStateError(
                    f"{where}.locked_clocks_mhz: expected [min_mhz, max_mhz], got {clocks!r}"
                )
            locked = (clocks[0], clocks[1])
        mode = data.get("persistence_mode")
        if mode not in (None, 0, 1) or isinstance(mode, bool):
            raise DeviceStateError(f"{where}.persistence_mode: expected 0 or 1, got {mode!r}")
        return cls(power_limit_mw=limit, locked_clocks_mhz=locked, persistence_mode=mode)


class DeviceStateFile:
    """Settings of every simulated GPU on a node, keyed by UUID (index order is not stable)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")

    @contextlib.contextmanager
    def _locked(self, exclusive: bool) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)

    def signature(self) -> Signature | None:
        """Identity of the file's current content; None when it does not exist."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _read_unlocked(self) -> dict[str, Any]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {"format": FORMAT, "boot_id": "", "gpus": {}}
        except OSError as exc:
            raise DeviceStateError(f"cannot read device state {self.path}: {exc.strerror}") from exc
        except UnicodeDecodeError:
            raise DeviceStateError(f"device state {self.path} is not UTF-8") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DeviceStateError(f"device state {self.path} is not valid JSON: {exc}") from exc
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise DeviceStateError(f"device state {self.path} is not a {FORMAT} file")
        if not isinstance(data.get("gpus"), dict):
            raise DeviceStateError(f"device state {self.path}: 'gpus' must be an object")
        return data

    def _write_unlocked(self, data: dict[str, Any]) -> Signature:
        fd, tmp = tempfile.mkstemp(
            dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp"
        )
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=1, sort_keys=True)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
                st = os.fstat(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        with contextlib.suppress(OSError):
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def read(self) -> dict[str, GpuSettings]:
        """Every GPU's settings; a missing file means every GPU is at its defaults."""
        with self._locked(exclusive=False):
            data = self._read_unlocked()
        return self._settings(data)

    def check(self) -> None:
        """DeviceStateError when the file exists but cannot be read as one. Takes no lock and
        creates nothing, for a config check."""
        self._settings(self._read_unlocked())

    def _settings(self, data: dict[str, Any]) -> dict[str, GpuSettings]:
        return {
            str(uuid): GpuSettings.from_json(entry, f"{self.path}: gpus[{uuid!r}]")
            for uuid, entry in data["gpus"].items()
        }

    def boot_id(self) -> str:
        """Changes at every simulated reboot (empty before the first write)."""
        with self._locked(exclusive=False):
            return str(self._read_unlocked().get("boot_id", ""))

    def update(self, uuid: str, settings: GpuSettings) -> Signature:
        """Replace one GPU's settings atomically; returns the new file's signature."""
        with self._locked(exclusive=True):
            data = self._read_unlocked()
            if not data.get("boot_id"):
                data["boot_id"] = uuid_module.uuid4().hex
            data["gpus"][uuid] = settings.to_json()
            return self._write_unlocked(data)

    def reset(self) -> Signature:
        """Forget every setting (a reboot or driver reload)."""
        with self._locked(exclusive=True):
            return self._write_unlocked(
                {"format": FORMAT, "boot_id": uuid_module.uuid4().hex, "gpus": {}}
            )


def simulate_reboot(state_file: str | os.PathLike[str]) -> None:
    """Reset every GPU setting kept in `state_file` to the device defaults, as a reboot does."""
    DeviceStateFile(state_file).reset()
