"""Stand-ins for a module's `time` that tests patch in (monkeypatch.setattr(module, "time",
clock)), and for the fake NVML's sleep: deadlines and stalls pass when the test says, however
slowly a busy machine runs."""

from __future__ import annotations

import threading
import time


class ShiftedTime:
    """`time` whose monotonic() runs ahead of the real one by ahead_s: the test moves it on,
    and it goes on running in real time between."""

    def __init__(self) -> None:
        self.ahead_s = 0.0

    def monotonic(self) -> float:
        return time.monotonic() + self.ahead_s

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)


class ManualTime:
    """`time` whose monotonic() moves only when the test moves it (now_s; from the real
    monotonic time when not given)."""

    def __init__(self, now_s: float | None = None) -> None:
        self.now_s = time.monotonic() if now_s is None else now_s

    def monotonic(self) -> float:
        return self.now_s

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)


class Hang:
    """A stand-in for FakeNvml.sleep: a stalled call waits until release() (60 s at most),
    as a call on a GPU whose firmware hangs waits out the driver's timeout. `waits` lists the
    stalls asked for."""

    def __init__(self) -> None:
        self.waits: list[float] = []
        self._released = threading.Event()

    def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        self._released.wait(60)

    def release(self) -> None:
        self._released.set()

    def hold(self) -> None:
        """Hold the stalls again after a release."""
        self._released.clear()
