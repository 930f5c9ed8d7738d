"""Bodies cut short on the wire (a server or proxy that closes early) are errors, never scrapes.

A raw-socket server on 127.0.0.1 sends each canned answer on its own terms: a Content-Length it
does not honour, a chunked body without its last chunk, a kept connection that breaks mid-body,
a body with neither a length nor chunks that the close cuts inside a line.
"""

from __future__ import annotations

import functools
import http.client
import socket
import threading
from collections.abc import Callable, Iterator

import pytest

from powerd.config import ServerConfig
from powerd.sources import Fetcher, SourceError, http_fetch, make_source
from powerd.sources.fetch import KeepAliveFetcher
from powerd.sources.loads import PromptBacklogProbe

FULL = (
    b"# TYPE vllm:generation_tokens_total counter\n"
    b'vllm:generation_tokens_total{engine="0",model_name="m"} 123456.0\n'
    b'vllm:generation_tokens_total{engine="1",model_name="m"} 654321.0\n'
)
CUT = FULL.index(b"123456") + 2
"""Inside the first value: parsed, the cut body would read that counter as 12."""
LATER = FULL.replace(b"123456.0", b"124456.0").replace(b"654321.0", b"655321.0")


def fixed(body: bytes, sent: int | None = None) -> bytes:
    """An answer with Content-Length len(body) of which `sent` bytes are sent (all by default)."""
    head = f"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body[:sent]


def chunked(*chunks: bytes, last: bool = True) -> bytes:
    """A chunked answer; last=False leaves out the closing zero-length chunk."""
    out = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
    for chunk in chunks:
        out += f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
    return out + (b"0\r\n\r\n" if last else b"")


class Server:
    """Serves queued (answer, close-after) pairs, several per connection while none closes."""

    def __init__(self) -> None:
        self.answers: list[tuple[bytes, bool]] = []
        self.connections = 0
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(8)
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}/metrics"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                while True:
                    request = b""
                    while b"\r\n\r\n" not in request:
                        data = conn.recv(65536)
                        if not data:
                            return
                        request += data
                    answer, close = self.answers.pop(0)
                    conn.sendall(answer)
                    if close:
                        return
            except OSError:
                return  # the client closed or reset its kept connection

    def close(self) -> None:
        self._sock.close()


@pytest.fixture
def server() -> Iterator[Server]:
    srv = Server()
    try:
        yield srv
    finally:
        srv.close()


FETCHERS: list[Callable[[], Fetcher]] = [lambda: functools.partial(http_fetch), KeepAliveFetcher]


@pytest.fixture(params=FETCHERS, ids=["http_fetch", "keep-alive"])
def fetch(request: pytest.FixtureRequest) -> Fetcher:
    factory: Callable[[], Fetcher] = request.param
    return factory()


def test_a_body_short_of_its_content_length_is_an_error(server: Server, fetch: Fetcher) -> None:
    server.answers = [(fixed(FULL, CUT), True)]
    with pytest.raises(SourceError) as caught:
        fetch(server.url, 2.0)
    assert str(caught.value) == (
        f"{server.url} closed the connection after {CUT} of {len(FULL)} bytes"
    )


@pytest.mark.parametrize(
    "answer",
    [
        chunked(FULL)[: -len(b"0\r\n\r\n") - 20],  # inside the chunk's data
        chunked(FULL, last=False),  # after a whole chunk, before the next size line
        chunked(FULL[:CUT], FULL[CUT:], last=False)[:-2],  # without the chunk's CRLF
    ],
    ids=["mid-chunk", "between-chunks", "before-crlf"],
)
def test_a_chunked_body_without_its_last_chunk_is_an_error(
    server: Server, fetch: Fetcher, answer: bytes
) -> None:
    server.answers = [(answer, True)]
    with pytest.raises(SourceError) as caught:
        fetch(server.url, 2.0)
    message = str(caught.value)
    assert message.startswith(f"{server.url} closed the connection after ")
    assert "bytes of a chunked body, before its end" in message


def test_a_whole_chunked_body_is_read(server: Server, fetch: Fetcher) -> None:
    server.answers = [(chunked(FULL[:CUT], FULL[CUT:]), True)]
    assert fetch(server.url, 2.0).body == FULL


def test_keep_alive_closes_a_connection_cut_mid_body(server: Server) -> None:
    fetch = KeepAliveFetcher()
    server.answers = [(fixed(FULL), False), (fixed(FULL, CUT), True), (fixed(LATER), False)]
    assert fetch(server.url, 2.0).body == FULL
    with pytest.raises(SourceError, match=f"after {CUT} of {len(FULL)} bytes"):
        fetch(server.url, 2.0)
    assert fetch._connection is None
    assert fetch(server.url, 2.0).body == LATER
    assert server.connections == 2


def test_a_cut_scrape_is_down_and_leaves_the_baseline_alone(server: Server) -> None:
    """Parsed, the cut body would read engine 0's counter as 12: a restart, then a rate of
    hundreds of thousands of tokens per second from that baseline."""
    server.answers = [(fixed(FULL), False), (fixed(FULL, CUT), True), (fixed(LATER), False)]
    config = ServerConfig(name="v", url=server.url, kind="vllm")
    source = make_source(config, KeepAliveFetcher())
    assert source.poll(0.0).up
    cut = source.poll(1.0)
    assert not cut.up and cut.error is not None and f"{CUT} of {len(FULL)} bytes" in cut.error
    assert source.poll(2.0).generation_tokens_per_s == pytest.approx(2000.0 / 2.0)


def unframed(body: bytes) -> bytes:
    """An answer with neither Content-Length nor chunked encoding: the close ends its body."""
    return b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n" + body


def test_a_body_ended_only_by_the_close_is_marked_so(server: Server, fetch: Fetcher) -> None:
    server.answers = [(unframed(FULL), True), (fixed(FULL), True), (chunked(FULL), True)]
    assert [fetch(server.url, 2.0).close_delimited for _ in range(3)] == [True, False, False]


@pytest.mark.parametrize("fetcher", FETCHERS, ids=["http_fetch", "keep-alive"])
def test_a_body_without_a_length_cut_inside_a_line_is_down(
    server: Server, fetcher: Callable[[], Fetcher]
) -> None:
    """Neither a length nor chunks tell the cut: the line it stops in does."""
    server.answers = [(unframed(FULL), True), (unframed(FULL[:CUT]), True), (unframed(LATER), True)]
    source = make_source(ServerConfig(name="v", url=server.url, kind="vllm"), fetcher())
    assert source.poll(0.0).up
    cut = source.poll(1.0)
    assert not cut.up
    assert cut.error == (
        f"{server.url} closed the connection after {CUT} bytes of a body without a length, "
        "inside a line"
    )
    assert source.poll(2.0).generation_tokens_per_s == pytest.approx(2000.0 / 2.0)


OPENMETRICS = (
    b"# TYPE vllm:generation_tokens counter\n"
    b'vllm:generation_tokens_total{engine="0",model_name="m"} 123456.0\n'
    b"# EOF"
)


@pytest.mark.parametrize(
    "body",
    [FULL, OPENMETRICS, OPENMETRICS + b"\n", FULL.replace(b"\n", b"\r\n")],
    ids=["text", "openmetrics-eof-without-lf", "openmetrics", "crlf"],
)
def test_a_whole_body_without_a_length_is_read(server: Server, body: bytes) -> None:
    server.answers = [(unframed(body), True)]
    source = make_source(ServerConfig(name="v", url=server.url, kind="vllm"), KeepAliveFetcher())
    assert source.poll(0.0).up


def test_only_a_body_without_a_length_is_held_to_whole_lines(server: Server) -> None:
    """A server that frames its body and leaves out the last line feed sent all it meant to."""
    server.answers = [(fixed(FULL.rstrip(b"\n")), True), (chunked(FULL.rstrip(b"\n")), True)]
    source = make_source(ServerConfig(name="v", url=server.url, kind="vllm"), KeepAliveFetcher())
    assert source.poll(0.0).up
    assert source.poll(1.0).up


def test_an_empty_body_without_a_length_is_no_cut(server: Server) -> None:
    server.answers = [(unframed(b""), True)]
    source = make_source(ServerConfig(name="v", url=server.url, kind="vllm"), KeepAliveFetcher())
    error = source.poll(0.0).error or ""
    assert "closed the connection" not in error


def test_a_json_answer_without_a_length_is_left_to_its_reader(server: Server) -> None:
    """SGLang's /v1/loads goes through the same fetcher; JSON needs no final line feed."""
    server.answers = [(unframed(b'{"loads":[{"num_waiting_uncached_tokens":42}]}'), True)]
    probe = PromptBacklogProbe("s", server.url, KeepAliveFetcher(), 2.0)
    assert probe.read(0.0) == 42.0


def _read1_closing_at_its_length(self: http.client.HTTPResponse, n: int = -1) -> bytes:
    """HTTPResponse.read1 as Python 3.12.2+ and 3.11.8+ have it (gh-113199): the answer closes
    as its last Content-Length byte is read."""
    if self.fp is None or self._method == "HEAD":  # type: ignore[attr-defined]
        return b""
    if self.chunked:
        return self._read1_chunked(n)  # type: ignore[attr-defined,no-any-return]
    if self.length is not None and (n < 0 or n > self.length):
        n = self.length
    result: bytes = self.fp.read1(n)
    if not result and n:
        self._close_conn()  # type: ignore[attr-defined]
    elif self.length is not None:
        self.length -= len(result)
        if not self.length:
            self._close_conn()  # type: ignore[attr-defined]
    return result


@pytest.mark.parametrize("read1", ["installed", "closing at its length"])
@pytest.mark.parametrize("pieces", [1, 3])
def test_a_whole_body_with_a_content_length_is_read_on_every_python(
    server: Server, fetch: Fetcher, monkeypatch: pytest.MonkeyPatch, read1: str, pieces: int
) -> None:
    """A server that keeps the connection open after an answer with a Content-Length (every
    inference server, powerd's own exporter): on a Python whose read1 closes the answer at its
    last byte, the next read met a closed file and every scrape through http_fetch (probe,
    https, a redirect) failed with "Bad file descriptor"."""
    if read1 != "installed":
        monkeypatch.setattr(http.client.HTTPResponse, "read1", _read1_closing_at_its_length)
    body = FULL * 40_000 if pieces > 1 else FULL  # several recv's: past _CHUNK_BYTES
    server.answers += [(fixed(body), False), (fixed(LATER), False)]
    assert fetch(server.url, 5.0).body == body
    assert fetch(server.url, 5.0).body == LATER  # a kept connection takes the next request
    server.answers.append((fixed(body, sent=CUT), True))
    with pytest.raises(SourceError, match="closed the connection after"):
        fetch(server.url, 5.0)
