"""The stop and reload signals of `powerd run`: handlers that only call back (to set a flag).
A module of its own so the run installs them before it loads the daemon and its kernels."""

from __future__ import annotations

import signal
from collections.abc import Callable
from types import FrameType


def handle_stop_and_reload_signals(stop: Callable[[], None], reload: Callable[[], None]) -> None:
    """Call `stop` on SIGTERM and SIGINT and `reload` on SIGHUP (from the signal handler: each
    must only set a flag)."""

    def on_stop(signum: int, frame: FrameType | None) -> None:
        stop()

    def on_hup(signum: int, frame: FrameType | None) -> None:
        reload()

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, on_hup)
