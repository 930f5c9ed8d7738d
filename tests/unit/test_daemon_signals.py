"""The daemon's stop flag under a storm of signals: the handler must never wait on a lock the
interrupted main thread holds (threading.Event.set() does, inside Event.wait())."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

from powerd.daemon import WakeFlag

_STORM = textwrap.dedent(
    """
    import os, signal, subprocess, time
    from powerd.daemon import WakeFlag
    flag = WakeFlag()
    signal.signal(signal.SIGTERM, lambda signum, frame: flag.set())
    killer = subprocess.Popen(
        ["sh", "-c", f"while kill -TERM {os.getpid()} 2>/dev/null; do sleep 0.0005; done"]
    )
    passes = woken = 0
    try:
        # The storm begins with the killer's first signal: starting sh takes a busy machine
        # long, and a window that ran on the clock from here might end before it.
        begun = time.monotonic()
        while not flag.wait(0.01):
            if time.monotonic() - begun > 20.0:
                raise SystemExit("the killer sent no signal in 20 s")
        flag.clear()
        # At least 2 s and 1000 wake-ups (an Event-based flag deadlocks within a few
        # thousand passes), fewer only past 20 s on a crawling machine.
        start = time.monotonic()
        while True:
            elapsed = time.monotonic() - start
            if elapsed > 20.0 or (elapsed >= 2.0 and woken >= 1000):
                break
            woken += flag.wait(0.0005)
            flag.clear()
            passes += 1
    finally:
        killer.kill()
    print(passes, woken)
    """
)


def test_a_storm_of_signals_neither_hangs_nor_breaks_the_wait() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _STORM], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr[-2000:]
    passes, woken = map(int, done.stdout.split())
    assert passes > 100 and woken > 0, done.stdout


def test_wait_returns_at_once_when_set_and_after_the_timeout_when_not() -> None:
    flag = WakeFlag()
    start = time.monotonic()
    assert flag.wait(0.05) is False
    assert time.monotonic() - start >= 0.04
    flag.set()
    start = time.monotonic()
    # At once: within a third of the timeout, a margin no busy machine takes.
    assert flag.wait(30.0) is True
    assert time.monotonic() - start < 10.0
    flag.clear()
    assert not flag.is_set() and flag.wait(0.0) is False, "a cleared flag's wake-ups are drained"
