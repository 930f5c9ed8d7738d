"""A simulated server's endpoints on real HTTP (a ThreadingHTTPServer in a daemon thread)."""

from __future__ import annotations

import contextlib
import logging
import socket
import sys
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

log = logging.getLogger(__name__)

RenderFn = Callable[[], tuple[bytes, str, dict[str, str]]]


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that goes away mid-exchange is routine for a server, not a traceback on
        # stderr; anything else still is.
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            log.debug("client %s went away", client_address)
            return
        super().handle_error(request, client_address)


class SimServerHttp:
    """Serves `render()` (body, content type, extra headers) on GET `path` and each of
    `extra_routes` on its own path; 404 elsewhere. Routing ignores the query string.

    port 0 picks a free port; `url` (of `path`) is valid after start(). `restart()` calls
    `on_restart` (the simulated server restarts: its counters start again from zero).
    `requests_served` counts the GETs answered 200, on any path; `connections_accepted` the
    connections they came on (HTTP/1.1: a client may keep one open between requests). stop()
    closes the open ones too, as a server that exits does.
    """

    def __init__(
        self,
        render: RenderFn,
        host: str = "127.0.0.1",
        port: int = 0,
        path: str = "/metrics",
        on_restart: Callable[[], None] | None = None,
        extra_routes: Mapping[str, RenderFn] | None = None,
    ) -> None:
        extra = dict(extra_routes or {})
        for route in (path, *extra):
            if not route.startswith("/"):
                raise ValueError(f"path must start with '/', got {route!r}")
        if path in extra:
            raise ValueError(f"path {path!r} is also in extra_routes")
        self.render = render
        self.host = host
        self.port = port
        self.path = path
        self.on_restart = on_restart
        self.extra_routes: dict[str, RenderFn] = extra
        self.requests_served = 0
        self.connections_accepted = 0
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{self.path}"

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> SimServerHttp:
        """Bind and serve in a daemon thread; returns self. A second start is a no-op."""
        if self._server is not None:
            return self
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body go out in two writes: with Nagle the body waits for the client's
            # delayed ACK of the headers (~40 ms) on a kept-alive connection.
            disable_nagle_algorithm = True

            def setup(self) -> None:
                super().setup()
                with owner._open_lock:
                    owner.connections_accepted += 1
                    owner._open.add(self.connection)

            def finish(self) -> None:
                with owner._open_lock:
                    owner._open.discard(self.connection)
                super().finish()

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                render = owner.render if path == owner.path else owner.extra_routes.get(path)
                if render is None:
                    self._send(404, b"404 page not found\n", "text/plain; charset=utf-8", {})
                    return
                try:
                    body, content_type, headers = render()
                except Exception as exc:  # a broken render must not kill the server thread
                    log.exception("rendering %s of %s failed", path, owner.url)
                    self._send(500, f"{exc}\n".encode(), "text/plain; charset=utf-8", {})
                    return
                owner.requests_served += 1
                self._send(200, body, content_type, headers)

            def _send(self, code: int, body: bytes, ctype: str, headers: dict[str, str]) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                log.debug("%s %s", owner.url, format % args)

        server = _QuietServer((self.host, self.port), Handler)
        server.daemon_threads = True
        self.port = int(server.server_address[1])
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, name=f"sim-http-{self.port}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket (idempotent)."""
        server, thread = self._server, self._thread
        self._server = None
        self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        with self._open_lock:
            kept = list(self._open)
        for connection in kept:
            # Wakes the handler blocked on the kept connection's next request, which then ends.
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        if thread is not None:
            thread.join(timeout=5.0)

    def restart(self) -> None:
        """Simulate a server process restart (counters reset); the endpoint stays up."""
        if self.on_restart is not None:
            self.on_restart()

    def __enter__(self) -> SimServerHttp:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
