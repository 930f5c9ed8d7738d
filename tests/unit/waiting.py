"""Waiting in real time for what another thread or process does: poll until it holds, with a
ceiling that only a broken product reaches."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until(condition: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    """Poll condition until it holds (True) or timeout_s passes (False)."""
    deadline_s = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline_s:
            return False
        time.sleep(0.01)
    return True
