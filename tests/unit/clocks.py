"""Stand-ins for a module's `time` that tests patch in (monkeypatch.setattr(module, "time",
clock)): deadlines and stalls pass when the test says, however slowly a busy machine runs."""

from __future__ import annotations

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
