"""Waiting in real time for what another thread or process does: poll until it holds, with a
ceiling that only a broken product reaches."""

from __future__ import annotations

import socket
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


def read_reply(sock: socket.socket, timeout_s: float = 10.0) -> tuple[bytes, bool]:
    """What the server sends on sock until it closes it (True) or timeout_s passes (False)."""
    sock.settimeout(timeout_s)
    reply = b""
    try:
        while chunk := sock.recv(65536):
            reply += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        return reply, False
    return reply, True


def drip_until_closed(sock: socket.socket, byte: bytes, tries: int = 100) -> bool:
    """Send byte every 0.1 s (far within any timeout per read) until the server closes sock
    without answering (True), or for tries times 0.1 s (False)."""
    for _ in range(tries):
        reply, closed = read_reply(sock, 0.1)
        if closed:
            return reply == b""
        assert reply == b"", reply
        try:
            sock.sendall(byte)
        except OSError:
            return True
    return False
