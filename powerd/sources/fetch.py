"""HTTP GET of a metrics URL with an overall deadline and a size bound (urllib only)."""

from __future__ import annotations

import http.client
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from email.message import Message

from powerd.sources.base import MAX_BODY_BYTES, FetchResponse, SourceError

# Text 0.0.4 only: prometheus_client 0.22+ answers an OpenMetrics request with sample names whose
# ':' became '_' while # TYPE keeps it (prometheus/client_python#1177), breaking `vllm:` names.
ACCEPT = "text/plain;version=0.0.4;q=1,*/*;q=0.1"
_CHUNK_BYTES = 64 * 1024

# Inference servers run on this node: never send their scrapes through an http_proxy.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_REQUEST_HEADERS = {"Accept": ACCEPT, "User-Agent": "powerd"}


def _headers(message: Message | None) -> dict[str, str]:
    if message is None:
        return {}
    return {key.lower(): value for key, value in message.items()}


def _socket(response: object) -> socket.socket | None:
    raw = getattr(getattr(response, "fp", None), "raw", None)
    sock = getattr(raw, "_sock", None)
    return sock if isinstance(sock, socket.socket) else None


def _close_delimited(response: object) -> bool:
    """True when nothing but the server's close will end the body (no Content-Length, not
    chunked), so _read cannot tell a cut body from a whole one. Ask before reading: the
    response's length counts down as it is read."""
    return getattr(response, "length", 0) is None and not getattr(response, "chunked", False)


def _read(response: object, url: str, deadline: float, timeout_s: float, max_bytes: int) -> bytes:
    # read1 returns after one recv, so a server that drips bytes cannot hold the read past the
    # deadline; each recv waits at most the time left.
    read = getattr(response, "read1", None) or response.read  # type: ignore[attr-defined]
    sock = _socket(response)
    parts: list[bytes] = []
    size = 0
    while True:
        if getattr(response, "isclosed", lambda: False)():
            # Python 3.12.2+ and 3.11.8+ close the answer as soon as read1 has its last
            # Content-Length byte (gh-113199), and with it the socket urllib let go of: it is
            # whole, and one more read would meet a closed file.
            return b"".join(parts)
        left = deadline - time.monotonic()
        if left <= 0:
            raise SourceError(f"timed out after {timeout_s:g} s reading {url}")
        if sock is not None:
            sock.settimeout(left)
        try:
            chunk = read(_CHUNK_BYTES)
        except http.client.IncompleteRead:
            # A chunked body that ends before its last (empty) chunk.
            raise SourceError(
                f"{url} closed the connection after {size} bytes of a chunked body, before its end"
            ) from None
        if not chunk:
            # read1 returns b"" at end of stream even when Content-Length bytes are missing
            # (read() would raise IncompleteRead): a cut body must not be parsed as a whole one.
            missing = getattr(response, "length", None)
            if missing:
                raise SourceError(
                    f"{url} closed the connection after {size} of {size + missing} bytes"
                )
            return b"".join(parts)
        size += len(chunk)
        if size > max_bytes:
            raise SourceError(f"{url} sent more than {max_bytes // (1024 * 1024)} MiB of metrics")
        parts.append(chunk)


def http_fetch(url: str, timeout_s: float, max_bytes: int = MAX_BODY_BYTES) -> FetchResponse:
    """GET url as given; the whole exchange is bounded by timeout_s and the body by max_bytes.

    Returns non-2xx answers as responses (the source words the error); raises SourceError when
    there is no whole answer: refused, unresolvable, timed out, too big, cut short (fewer bytes
    than Content-Length, or a chunked body without its last chunk). A body that only the
    connection's close ended comes back marked close_delimited: its format must tell whether
    it is whole.
    """
    deadline = time.monotonic() + timeout_s
    try:
        request = urllib.request.Request(url, headers=_REQUEST_HEADERS)
        with _OPENER.open(request, timeout=timeout_s) as response:
            close_delimited = _close_delimited(response)
            body = _read(response, url, deadline, timeout_s, max_bytes)
            return FetchResponse(response.status, body, _headers(response.headers), close_delimited)
    except urllib.error.HTTPError as exc:
        try:
            body = exc.read(min(max_bytes, 64 * 1024))
        except (OSError, ValueError):
            body = b""
        return FetchResponse(exc.code, body, _headers(exc.headers))
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, (socket.timeout, TimeoutError)):
            raise SourceError(f"timed out after {timeout_s:g} s connecting to {url}") from None
        text = getattr(reason, "strerror", None) or str(reason)
        raise SourceError(f"cannot connect to {url}: {text}") from None
    except (TimeoutError, http.client.HTTPException, ValueError, OSError) as exc:
        raise _no_answer(exc, url, timeout_s) from None


def _no_answer(
    exc: OSError | http.client.HTTPException | ValueError, url: str, timeout_s: float
) -> SourceError:
    """The sentence for an exchange with url that brought no usable answer."""
    if isinstance(exc, TimeoutError):
        return SourceError(f"timed out after {timeout_s:g} s reading {url}")
    if isinstance(exc, http.client.HTTPException):
        return SourceError(f"broken HTTP answer from {url}: {type(exc).__name__}")
    if isinstance(exc, ValueError):
        return SourceError(f"bad metrics URL {url!r}: {exc}")
    refused = isinstance(exc, (ConnectionRefusedError, socket.gaierror))
    return SourceError(f"cannot {'connect to' if refused else 'read'} {url}: {exc.strerror or exc}")


_REDIRECTS = frozenset({301, 302, 303, 307, 308})


class KeepAliveFetcher:
    """A Fetcher that keeps one HTTP/1.1 connection open between calls, for small answers read
    several times a second from one thread: a new connection per read costs more CPU than the
    read itself. Same contract as http_fetch. A kept connection the server has closed meanwhile
    is retried once on a new one; any other failure closes it. https URLs and redirects are
    left to http_fetch."""

    def __init__(self, max_bytes: int = MAX_BODY_BYTES) -> None:
        self.max_bytes = max_bytes
        self._connection: http.client.HTTPConnection | None = None
        self._netloc = ""

    def __call__(self, url: str, timeout_s: float) -> FetchResponse:
        try:
            parts = urllib.parse.urlsplit(url)
        except ValueError as exc:
            raise _no_answer(exc, url, timeout_s) from None
        if parts.scheme != "http":
            return http_fetch(url, timeout_s, self.max_bytes)
        deadline = time.monotonic() + timeout_s
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        try:
            if self._connection is not None and self._netloc == parts.netloc:
                try:
                    return self._exchange(url, target, deadline, timeout_s)
                except (ConnectionResetError, BrokenPipeError, http.client.BadStatusLine):
                    # The server closed the kept connection (idle timeout, restart).
                    self.close()
            self.close()
            connect_s = max(deadline - time.monotonic(), 1e-3)
            self._connection = http.client.HTTPConnection(parts.netloc, timeout=connect_s)
            self._netloc = parts.netloc
            return self._exchange(url, target, deadline, timeout_s)
        except (TimeoutError, http.client.HTTPException, ValueError, OSError) as exc:
            self.close()
            raise _no_answer(exc, url, timeout_s) from None
        except SourceError:
            self.close()
            raise

    def _exchange(self, url: str, target: str, deadline: float, timeout_s: float) -> FetchResponse:
        connection = self._connection
        assert connection is not None
        if connection.sock is not None:
            connection.sock.settimeout(max(deadline - time.monotonic(), 1e-3))
        connection.request("GET", target, headers=_REQUEST_HEADERS)
        response = connection.getresponse()
        close_delimited = _close_delimited(response)
        body = _read(response, url, deadline, timeout_s, self.max_bytes)
        # Done with this answer: the connection takes the next request.
        response.close()
        if response.will_close:
            self.close()
        if response.status in _REDIRECTS:
            self.close()
            return http_fetch(url, max(deadline - time.monotonic(), 1e-3), self.max_bytes)
        return FetchResponse(response.status, body, _headers(response.headers), close_delimited)

    def close(self) -> None:
        """Close the kept connection, if any (the next call opens a new one)."""
        if self._connection is not None:
            self._connection.close()
            self._connection = None
