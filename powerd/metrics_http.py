"""The metrics endpoint's HTTP(S) server: serves what a MetricsSource renders, within limits.

Anyone who can reach the port can connect, before any credentials are asked for, so the server
bounds what a client can take: connections held at once (MAX_CONNECTIONS, evicting the one that
has waited longest for a request), the time and bytes a request line and its headers may take
(REQUEST_HEAD_DEADLINE_S, MAX_REQUEST_HEAD_BYTES), and how long a kept connection may idle
(KEEP_ALIVE_IDLE_S). TLS handshakes run in each connection's own thread; TLS and basic auth
come from the web-config file (powerd/webconfig.py). The limits are read from this module when
used (MAX_CONNECTIONS when a server is made), so a test patches them here.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import logging
import math
import socket
import ssl
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol
from urllib.parse import urlsplit

from powerd.webconfig import BasicAuth

# The exporter's logger, not this module's: every log line carries its logger's name, and
# operators' journal filters and logging settings know the endpoint's lines as powerd.exporter
# from before the server had a module of its own.
log = logging.getLogger("powerd.exporter")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""Prometheus text exposition format 0.0.4."""

MAX_CONNECTIONS = 16
"""Connections the metrics endpoint holds at once. At the cap a new connection takes the place
of the one that has waited longest for a request (closed), or is closed itself when every one
is being answered. Prometheus holds one per scraping server, so a node sees a few; without a
cap every connection costs a thread and its buffers, from clients that need no credentials
to connect, and without the eviction a few silent ones would keep every scrape out."""

KEEP_ALIVE_IDLE_S = 90.0
"""How long a kept connection may wait for its next request's first byte: a scrape every 15-60 s
reuses its connection (and its TLS session) instead of connecting anew."""

REQUEST_HEAD_DEADLINE_S = 10.0
"""Time a connection has to deliver a whole request line and headers, counted from its accept
(the TLS handshake included) or, on a kept connection, from the request's first byte. A timeout
per read alone lets a client that sends a byte now and then hold its connection for ever."""

MAX_REQUEST_HEAD_BYTES = 64 * 1024
"""The most bytes a request line and its headers may take together; more is answered 431 and
the connection closed. A scrape sends well under 1 KiB; Python's own limits (100 lines of
64 KiB) let one connection make the server hold about 6 MB."""

_REFUSED_LOG_INTERVAL_S = 60.0


class MetricsSource(Protocol):
    """What the endpoint serves at /metrics."""

    def scrape(self) -> bytes:
        """The exposition to answer one scrape with (text format 0.0.4, uncompressed)."""
        ...


def bind(
    host: str,
    port: int,
    source: MetricsSource,
    *,
    ssl_context: ssl.SSLContext | None,
    auth: BasicAuth,
    extra_headers: dict[str, str],
) -> MetricsServer:
    """A server bound to host:port (IPv6 where host has a colon), not yet serving: call its
    serve_forever(), then shutdown(), close_waiting() and server_close(). Raises OSError when
    the address cannot be bound."""
    server_class = MetricsServer6 if ":" in host else MetricsServer
    return server_class(
        (host, port), source, ssl_context=ssl_context, auth=auth, extra_headers=extra_headers
    )


_Request = socket.socket | tuple[bytes, socket.socket]


class MetricsServer(ThreadingHTTPServer):
    """Serves each connection in its own thread, at most MAX_CONNECTIONS at once."""

    daemon_threads = True
    # Python 3.14.0a1-b2's HTTPServer set SO_REUSEPORT (gh-120485, undone by gh-127319), with
    # which a second server bound the port too and took a share of the scrapes.
    allow_reuse_port = False

    def __init__(
        self,
        address: tuple[str, int],
        source: MetricsSource,
        *,
        ssl_context: ssl.SSLContext | None,
        auth: BasicAuth,
        extra_headers: dict[str, str],
    ) -> None:
        self.source = source
        self.ssl_context = ssl_context
        self.auth = auth
        self.extra_headers = extra_headers
        self._max_connections = MAX_CONNECTIONS
        self._open = 0
        self._open_lock = threading.Lock()
        self._waiting: dict[socket.socket, float] = {}
        """Open connections waiting for a request (from their accept or last answer), since."""
        self.stopping = False
        """Set by close_waiting(): kept connections are not waited on again."""
        self._refused = 0
        self._refused_logged_s = -math.inf
        super().__init__(address, _Handler)

    @property
    def open_connections(self) -> int:
        with self._open_lock:
            return self._open

    def get_request(self) -> tuple[socket.socket, object]:
        sock, address = self.socket.accept()
        if self.ssl_context is not None:
            # The handshake runs in the request's own thread (see _Handler.setup), so a slow
            # or silent client cannot hold up accept().
            sock = self.ssl_context.wrap_socket(
                sock, server_side=True, do_handshake_on_connect=False
            )
        return sock, address

    def process_request(self, request: _Request, client_address: Any) -> None:
        assert isinstance(request, socket.socket)
        evicted: socket.socket | None = None
        with self._open_lock:
            accepted = self._open < self._max_connections
            if not accepted and self._waiting:
                evicted = min(self._waiting, key=self._waiting.__getitem__)
                del self._waiting[evicted]
                accepted = True
            if accepted:
                self._open += 1
                self._waiting[request] = time.monotonic()
            if evicted is not None:
                # Under the lock: the connection's own thread takes it out of _waiting under it
                # before closing it, so its descriptor cannot be another's by now. Its thread,
                # blocked reading, sees the end of the stream and exits.
                _hang_up(evicted)
        if evicted is not None:
            self._note_refused()
        if not accepted:
            self._note_refused()
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._release(request)
            raise

    def process_request_thread(self, request: _Request, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            assert isinstance(request, socket.socket)
            self._release(request)

    def shutdown_request(self, request: _Request) -> None:
        if isinstance(request, socket.socket):
            with self._open_lock:
                self._waiting.pop(request, None)
        super().shutdown_request(request)

    def close_waiting(self) -> None:
        """Hang up every connection waiting for a request (a stop): kept connections would
        otherwise be served by a stopped exporter until their idle wait ends."""
        with self._open_lock:
            self.stopping = True
            for connection in self._waiting:
                _hang_up(connection)
            self._waiting.clear()

    def mark_waiting(self, connection: socket.socket, waiting: bool) -> bool:
        """Whether the connection waits for a request (evictable) or is being answered. False
        when the exporter stops: the connection is hung up and is to wait for nothing more."""
        with self._open_lock:
            if not waiting:
                self._waiting.pop(connection, None)
            elif self.stopping:
                _hang_up(connection)
                return False
            elif connection not in self._waiting:
                self._waiting[connection] = time.monotonic()
        return True

    def _release(self, request: socket.socket) -> None:
        with self._open_lock:
            self._open -= 1
            self._waiting.pop(request, None)

    def _note_refused(self) -> None:
        """Count a connection closed unanswered; warn at most once per _REFUSED_LOG_INTERVAL_S."""
        self._refused += 1
        now_s = time.monotonic()
        if now_s - self._refused_logged_s >= _REFUSED_LOG_INTERVAL_S:
            log.warning(
                "metrics endpoint: at its %d connections, closed %d waiting or new one(s) "
                "unanswered since the last such warning",
                self._max_connections,
                self._refused,
            )
            self._refused = 0
            self._refused_logged_s = now_s

    def handle_error(self, request: object, client_address: object) -> None:
        log.debug("metrics request from %s failed", client_address, exc_info=True)


def _hang_up(connection: socket.socket) -> None:
    """End both directions of a connection another thread may be reading (a plain socket
    shutdown, also under TLS: the SSL object is its reader's to touch)."""
    with contextlib.suppress(OSError):
        socket.socket.shutdown(connection, socket.SHUT_RDWR)


class _HeadTooLarge(Exception):
    """A request line and headers longer than their byte limit."""


class _HeadReader(io.BufferedIOBase):
    """readline() of a request line and headers from a connection's buffered stream, within a
    deadline (monotonic seconds; TimeoutError after it) and a byte limit over all lines
    (_HeadTooLarge past it). Leaves bytes beyond the last line read in the stream."""

    def __init__(
        self,
        stream: io.BufferedReader,
        sock: socket.socket,
        deadline_s: float,
        limit_bytes: int,
    ) -> None:
        super().__init__()
        self._stream = stream
        self._sock = sock
        self._deadline_s = deadline_s
        self._left_bytes = limit_bytes

    def readable(self) -> bool:
        return True

    def readline(self, size: int | None = -1, /) -> bytes:
        limit = -1 if size is None else size
        line = bytearray()
        while limit < 0 or len(line) < limit:
            left_s = self._deadline_s - time.monotonic()
            if left_s <= 0:
                raise TimeoutError("request line and headers not received in time")
            self._sock.settimeout(left_s)
            # peek() receives at most once, so no read outlasts the deadline however slowly
            # the bytes come.
            buffered = self._stream.peek(1)
            if not buffered:
                break
            want = len(buffered) if limit < 0 else min(len(buffered), limit - len(line))
            newline = buffered.find(b"\n", 0, want)
            take = newline + 1 if newline >= 0 else want
            if take > self._left_bytes:
                raise _HeadTooLarge
            self._left_bytes -= take
            line += self._stream.read(take)
            if newline >= 0:
                break
        return bytes(line)


class MetricsServer6(MetricsServer):
    address_family = socket.AF_INET6


_INDEX_HTML = (
    b"<!DOCTYPE html><html><head><title>powerd</title></head><body>"
    b'<h1>powerd</h1><p><a href="/metrics">Metrics</a></p></body></html>\n'
)


class _Handler(BaseHTTPRequestHandler):
    server: MetricsServer
    protocol_version = "HTTP/1.1"
    timeout = 30.0
    """Bounds each send of a response; the request's head has REQUEST_HEAD_DEADLINE_S."""
    server_version = "powerd"
    _head_deadline_s: float | None = None

    def setup(self) -> None:
        self._head_deadline_s = time.monotonic() + REQUEST_HEAD_DEADLINE_S
        super().setup()
        if isinstance(self.request, ssl.SSLSocket):
            # A handshake's timeout spans the whole handshake, not each read.
            self.request.settimeout(max(self._head_deadline_s - time.monotonic(), 1e-3))
            self.request.do_handshake()

    def handle_one_request(self) -> None:
        stream = self.rfile
        assert isinstance(stream, io.BufferedReader)
        deadline_s = self._head_deadline_s
        self._head_deadline_s = None
        if deadline_s is None:
            # A kept connection: the head's deadline runs from the next request's first byte.
            self.connection.settimeout(KEEP_ALIVE_IDLE_S)
            try:
                if not stream.peek(1):
                    self.close_connection = True
                    return
            except OSError:
                self.close_connection = True
                return
            deadline_s = time.monotonic() + REQUEST_HEAD_DEADLINE_S
        self.rfile = _HeadReader(stream, self.connection, deadline_s, MAX_REQUEST_HEAD_BYTES)
        # What send_error() needs when the request line itself is cut short.
        self.requestline, self.request_version, self.command = "", "", ""
        try:
            super().handle_one_request()
        except _HeadTooLarge:
            self.send_error(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE)
            self.close_connection = True
        finally:
            self.rfile = stream

    def parse_request(self) -> bool:
        parsed = super().parse_request()
        self.connection.settimeout(self.timeout)
        self.server.mark_waiting(self.connection, False)
        return parsed

    def handle(self) -> None:
        self.close_connection = True
        self.handle_one_request()
        while not self.close_connection and self.server.mark_waiting(self.connection, True):
            self.handle_one_request()

    def do_GET(self) -> None:
        self._reply(send_body=True)

    def do_HEAD(self) -> None:
        self._reply(send_body=False)

    def _reply(self, *, send_body: bool) -> None:
        if not self.server.auth.check(self.headers.get("Authorization")):
            self._send(
                401,
                b"Unauthorized\n",
                "text/plain; charset=utf-8",
                send_body,
                {"WWW-Authenticate": 'Basic realm="powerd"'},
            )
            return
        path = urlsplit(self.path).path
        if path == "/metrics":
            body = self.server.source.scrape()
            extra = {}
            if "gzip" in self.headers.get("Accept-Encoding", ""):
                body = gzip.compress(body, compresslevel=6)
                extra["Content-Encoding"] = "gzip"
            self._send(200, body, CONTENT_TYPE, send_body, extra)
        elif path == "/":
            self._send(200, _INDEX_HTML, "text/html; charset=utf-8", send_body, {})
        else:
            self._send(404, b"Not found\n", "text/plain; charset=utf-8", send_body, {})

    def _send(
        self,
        status: int,
        body: bytes,
        content_type: str,
        send_body: bool,
        headers: dict[str, str],
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in {**self.server.extra_headers, **headers}.items():
            self.send_header(name, value)
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        log.debug("%s %s", self.address_string(), format % args)
