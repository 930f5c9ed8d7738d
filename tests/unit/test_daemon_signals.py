"""The daemon's stop flag under signals: the handler must never wait on a lock the interrupted
main thread holds (threading.Event.set() does, inside Event.wait())."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

from powerd.daemon import WakeFlag
from tests.unit.daemon_helpers import make_rig

_SIGNALS = textwrap.dedent(
    """
    import faulthandler, os, signal, subprocess, sys, time
    from powerd.daemon import WakeFlag
    flag = WakeFlag()
    signal.signal(signal.SIGTERM, lambda signum, frame: flag.set())

    def signal_at(n, call):
        # Run call() with SIGTERM raised before its n-th line (counting the lines of every
        # Python function it calls): the handler runs right there, as it does when a signal
        # lands between those two lines. Whether call() ran that many lines.
        seen = 0
        def tracer(frame, event, arg):
            nonlocal seen
            if event == "line":
                seen += 1
                if seen == n:
                    signal.raise_signal(signal.SIGTERM)  # runs the handler before it returns
            return tracer
        sys.settrace(tracer)
        try:
            call()
        finally:
            sys.settrace(None)
        return seen >= n

    # A signal at every line of each method, one after another: the lines that hold a lock
    # the handler needs (threading.Event's, in its wait(), set() and clear()) are few and
    # brief, so a storm lands on them by chance; here each is hit once, in order.
    lines = {}
    for name, call in (
        ("wait", lambda: flag.wait(0.0)),
        ("set", flag.set),
        ("clear", flag.clear),
        ("is_set", flag.is_set),
    ):
        n = 1
        while True:
            flag.clear()
            # A handler stuck on a lock the code it interrupted holds hangs for good: end the
            # child then, with where each thread stood.
            faulthandler.dump_traceback_later(30.0, exit=True)
            signalled = signal_at(n, call)
            faulthandler.cancel_dump_traceback_later()
            if not signalled:
                break
            if name != "clear":  # a signal just before clear() clears is cleared with it
                assert flag.is_set(), f"the signal before line {n} of {name}() was lost"
            n += 1
        lines[name] = n - 1

    # Then a storm of real signals, landing where they may (in select() too).
    flag.clear()
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
        # At least 2 s and 1000 wake-ups, fewer only past 20 s on a crawling machine.
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
    print(lines["wait"], lines["set"], passes, woken)
    """
)


def test_a_signal_at_any_line_or_a_storm_of_them_neither_hangs_nor_breaks_the_wait() -> None:
    """The handler must never wait on a lock the interrupted main thread holds. First a
    signal before each line of the flag's methods in turn, so a lock held for a single line
    is met every run; then a storm of real signals."""
    done = subprocess.run(
        [sys.executable, "-c", _SIGNALS], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    wait_lines, set_lines, passes, woken = map(int, done.stdout.split())
    assert wait_lines > 0 and set_lines > 0, "the methods were signalled between their lines"
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


def test_the_daemon_stops_and_reloads_through_wake_flags(tmp_path: Path) -> None:
    """The tests above prove WakeFlag; the daemon's signal handlers must set those, not a
    threading.Event, or a signal landing inside the loop's wait can deadlock it."""
    daemon = make_rig(tmp_path).daemon
    assert type(daemon._stop) is WakeFlag and type(daemon._reload) is WakeFlag
    daemon.request_reload()
    daemon.request_stop()
    assert daemon._reload.is_set() and daemon._stop.is_set()
