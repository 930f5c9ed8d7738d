"""Dependency-free sd_notify: READY, RELOADING, STOPPING, WATCHDOG, STATUS.

The protocol (sd_notify(3)): newline-separated KEY=VALUE assignments sent as one datagram to
the AF_UNIX socket named by $NOTIFY_SOCKET; a leading '@' names an abstract socket. When the
variable is unset (not started by systemd, or Type= is not notify) every call is a no-op.
A failed send is logged once and never raised: notification must not take the daemon down;
`notify` tells whether a message went out.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger(__name__)


def under_systemd(environ: Mapping[str, str] | None = None) -> bool:
    """True when systemd started this process (it sets INVOCATION_ID; JOURNAL_STREAM for
    stdout/stderr connected to the journal)."""
    env = os.environ if environ is None else environ
    return bool(env.get("INVOCATION_ID") or env.get("JOURNAL_STREAM"))


def _socket_address(value: str) -> str | None:
    if value.startswith("@"):
        # Abstract namespace: Python's AF_UNIX takes it as a leading NUL byte.
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    # vsock addresses (vsock:CID:PORT) are for VMs; powerd runs on the host.
    return None


class Notifier:
    """Sends service-state notifications to systemd, or nothing when not under Type=notify."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET", "")
        self._address = _socket_address(raw) if raw else None
        if raw and self._address is None:
            log.warning("NOTIFY_SOCKET=%r is not a unix socket path; not notifying systemd", raw)
        self._watchdog_usec = _watchdog_usec(env)
        self._socket: socket.socket | None = None
        self._warned = False

    @property
    def enabled(self) -> bool:
        """True when a notification socket is configured."""
        return self._address is not None

    def notify(self, *assignments: str) -> bool:
        """Send KEY=VALUE assignments in one datagram; True when sent, False when disabled or
        the send failed."""
        if self._address is None or not assignments:
            return False
        message = "\n".join(assignments).encode("utf-8")
        try:
            if self._socket is None:
                self._socket = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                )
                # A full receive queue must never stall the loop (and with it the watchdog
                # and the restore on exit): a message that cannot go now is dropped.
                self._socket.setblocking(False)
            self._socket.sendto(message, self._address)
        except OSError as exc:
            if not self._warned:
                log.warning("cannot notify systemd at %s: %s", self._address.lstrip("\0"), exc)
                self._warned = True
            return False
        return True

    def ready(self, status: str | None = None) -> None:
        """Start-up (or a reload) finished; systemd considers the unit active."""
        fields = ["READY=1"]
        if status is not None:
            fields.append(_status_field(status))
        self.notify(*fields)

    def reloading(self) -> None:
        """A reload began; send ready() when it is done.

        MONOTONIC_USEC (CLOCK_MONOTONIC, µs) lets systemd match the reload with the READY=1 that
        follows, as the Type=notify-reload protocol requires (systemd.service(5))."""
        monotonic_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.notify("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec}")

    def stopping(self, status: str | None = None) -> None:
        """Shut-down began (restoring GPU settings may take a moment)."""
        fields = ["STOPPING=1"]
        if status is not None:
            fields.append(_status_field(status))
        self.notify(*fields)

    def watchdog(self) -> None:
        """Keep-alive ping; call from the loop after a good tick."""
        self.notify("WATCHDOG=1")

    def status(self, text: str) -> None:
        """Free-form one-line status shown by `systemctl status`."""
        self.notify(_status_field(text))

    def extend_timeout(self, timeout_s: float) -> None:
        """Ask for timeout_s more seconds for the current start-up, reload or stop phase."""
        self.notify(f"EXTEND_TIMEOUT_USEC={max(0, round(timeout_s * 1e6))}")

    def watchdog_interval_s(self) -> float | None:
        """The watchdog timeout systemd set for this process (WatchdogSec=), or None.

        Ping at least twice per interval (sd_watchdog_enabled(3) recommends half)."""
        if self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 1e6

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def _status_field(text: str) -> str:
    return "STATUS=" + " ".join(text.split())


def _watchdog_usec(env: Mapping[str, str]) -> int | None:
    raw_usec = env.get("WATCHDOG_USEC")
    if not raw_usec:
        return None
    raw_pid = env.get("WATCHDOG_PID")
    # The watchdog belongs to WATCHDOG_PID when set (it may name a parent that exec'd us).
    if raw_pid and raw_pid.strip() != str(os.getpid()):
        return None
    try:
        usec = int(raw_usec)
    except ValueError:
        log.warning("WATCHDOG_USEC=%r is not an integer; watchdog disabled", raw_usec)
        return None
    return usec if usec > 0 else None
