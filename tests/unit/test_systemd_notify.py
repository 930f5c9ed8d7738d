"""sd_notify over a real AF_UNIX datagram socket, as systemd's manager receives it."""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from powerd.systemd import Notifier, under_systemd


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2.0)
    yield sock, path
    sock.close()


def _fields(sock: socket.socket) -> dict[str, str]:
    data = sock.recv(4096).decode()
    return dict(line.split("=", 1) for line in data.split("\n"))


def test_ready_status_watchdog_stopping(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    notifier = Notifier({"NOTIFY_SOCKET": path})
    assert notifier.enabled
    notifier.ready(status="controlling 8 GPUs")
    assert _fields(sock) == {"READY": "1", "STATUS": "controlling 8 GPUs"}
    notifier.watchdog()
    assert _fields(sock) == {"WATCHDOG": "1"}
    notifier.status("tick 12\nmode efficiency")
    assert _fields(sock) == {"STATUS": "tick 12 mode efficiency"}
    notifier.extend_timeout(90)
    assert _fields(sock) == {"EXTEND_TIMEOUT_USEC": "90000000"}
    notifier.stopping()
    assert _fields(sock) == {"STOPPING": "1"}
    notifier.close()


def test_reloading_carries_monotonic_usec(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    notifier = Notifier({"NOTIFY_SOCKET": path})
    before_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.reloading()
    after_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    fields = _fields(sock)
    assert fields["RELOADING"] == "1"
    assert before_usec <= int(fields["MONOTONIC_USEC"]) <= after_usec
    notifier.close()


def test_abstract_socket() -> None:
    name = f"powerd-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2.0)
    try:
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name})
        notifier.ready()
        assert _fields(sock) == {"READY": "1"}
        notifier.close()
    finally:
        sock.close()


def test_unset_socket_is_a_no_op() -> None:
    notifier = Notifier({})
    assert not notifier.enabled
    assert not notifier.notify("READY=1")
    notifier.ready()
    notifier.watchdog()
    assert notifier.watchdog_interval_s() is None


def test_send_failure_is_logged_once_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens.sock")})
    assert notifier.enabled
    notifier.ready()
    assert not notifier.notify("WATCHDOG=1")
    warnings = [r for r in caplog.records if "cannot notify systemd" in r.getMessage()]
    assert len(warnings) == 1


def test_watchdog_interval() -> None:
    own = {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}
    assert Notifier(own).watchdog_interval_s() == pytest.approx(30.0)
    assert Notifier({"WATCHDOG_USEC": "5000000"}).watchdog_interval_s() == pytest.approx(5.0)
    other_pid = {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}
    assert Notifier(other_pid).watchdog_interval_s() is None
    assert Notifier({"WATCHDOG_USEC": "soon"}).watchdog_interval_s() is None
    assert Notifier({"WATCHDOG_USEC": "0"}).watchdog_interval_s() is None


def test_under_systemd() -> None:
    assert under_systemd({"INVOCATION_ID": "0123456789abcdef"})
    assert under_systemd({"JOURNAL_STREAM": "8:12345"})
    assert not under_systemd({})
    assert not under_systemd({"INVOCATION_ID": ""})


def test_a_full_notify_queue_never_blocks(tmp_path) -> None:
    import socket as socket_module
    import threading

    from powerd.systemd import Notifier

    path = tmp_path / "full.sock"
    receiver = socket_module.socket(socket_module.AF_UNIX, socket_module.SOCK_DGRAM)
    receiver.bind(str(path))
    notifier = Notifier({"NOTIFY_SOCKET": str(path)})
    done = threading.Event()

    def flood() -> None:
        for i in range(500):
            notifier.status(f"tick {i}")
        done.set()

    thread = threading.Thread(target=flood, daemon=True)
    thread.start()
    assert done.wait(5.0), "sending to a socket nobody reads must not block"
    receiver.close()
