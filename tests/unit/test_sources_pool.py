"""Real HTTP on 127.0.0.1: http_fetch's bounds, and a hung server that must not hold the tick."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from powerd.config import ServerConfig
from powerd.sources import FetchResponse, ScrapePool, SourceError, http_fetch, make_source

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "sources"
RELEASE = threading.Event()
HITS: dict[str, int] = {}


class Handler(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        HITS[self.path] = HITS.get(self.path, 0) + 1
        if self.path == "/hang":
            RELEASE.wait(10.0)
            self._send(b"vllm:generation_tokens_total 1\n")
        elif self.path == "/drip":
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            for _ in range(100):
                if RELEASE.wait(0.05):
                    return
                self.wfile.write(b"# " + b"x" * 60 + b"\n")
                self.wfile.flush()
        elif self.path == "/big":
            self._send(b"#" * (3 * 1024 * 1024))
        elif self.path == "/missing":
            self.send_response(404)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            self.wfile.write(b"404 page not found\n")
        else:
            name = self.path.strip("/")
            body = (FIXTURES / name).read_bytes()
            self._send(body, {"Process-Start-Time-Unix": "1752000000"})

    def _send(self, body: bytes, headers: dict[str, str] | None = None) -> None:
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    RELEASE.clear()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        RELEASE.set()
        httpd.shutdown()
        httpd.server_close()


def test_http_fetch_reads_body_and_headers(server: str) -> None:
    response = http_fetch(f"{server}/llamacpp_a.txt", 2.0)
    assert response.status == 200
    assert response.body == (FIXTURES / "llamacpp_a.txt").read_bytes()
    assert response.headers["process-start-time-unix"] == "1752000000"


def test_http_fetch_returns_error_statuses(server: str) -> None:
    response = http_fetch(f"{server}/missing", 2.0)
    assert response.status == 404 and response.body == b"404 page not found\n"


def test_http_fetch_bounds_the_size(server: str) -> None:
    with pytest.raises(SourceError, match="sent more than 1 MiB of metrics"):
        http_fetch(f"{server}/big", 2.0, max_bytes=1024 * 1024)


def test_http_fetch_bounds_the_whole_exchange(server: str) -> None:
    start = time.monotonic()
    with pytest.raises(SourceError, match=r"timed out after 0\.3 s"):
        http_fetch(f"{server}/drip", 0.3)
    assert time.monotonic() - start < 1.5


def test_http_fetch_refused_port() -> None:
    with pytest.raises(SourceError, match=r"cannot connect to http://127\.0\.0\.1:9/metrics"):
        http_fetch("http://127.0.0.1:9/metrics", 1.0)


def test_http_fetch_bad_url() -> None:
    with pytest.raises(SourceError):
        http_fetch("http://[::1/metrics", 1.0)


def test_source_over_http_uses_the_restart_header(server: str) -> None:
    source = make_source(ServerConfig(name="l", url=f"{server}/llamacpp_a.txt"))
    first = source.poll(1.0)
    assert first.up and source.kind == "llamacpp"
    second = source.poll(2.0)
    assert second.generation_tokens_per_s == 0.0


def test_hung_server_does_not_delay_the_tick(server: str) -> None:
    hung = make_source(ServerConfig(name="hung", url=f"{server}/hang", kind="vllm", timeout_s=5.0))
    body = (FIXTURES / "vllm_v1_a.txt").read_bytes()
    fast = make_source(
        ServerConfig(name="fast", url="http://in-process/metrics", kind="vllm"),
        lambda url, timeout_s: FetchResponse(200, body, {}),
    )
    pool = ScrapePool([hung, fast], max_workers=4)
    try:
        start = time.monotonic()
        samples = pool.poll_all(now_s=100.0, deadline_s=0.3)
        elapsed = time.monotonic() - start
        assert elapsed < 0.8
        assert [s.server for s in samples] == ["hung", "fast"]
        assert samples[1].up and samples[1].running == 18.0
        assert not samples[0].up
        assert samples[0].error is not None and samples[0].error.startswith("timed out after 0.3")
        assert samples[0].timestamp_s == 100.0

        # The hung fetch is still running: the next tick neither waits for it nor stacks a
        # second request on the server.
        start = time.monotonic()
        again = pool.poll_all(now_s=101.0, deadline_s=0.3)
        assert time.monotonic() - start < 0.8
        assert not again[0].up and again[0].error is not None
        assert again[0].error.startswith("timed out after")
        assert again[1].up and again[1].generation_tokens_per_s == 0.0
        assert HITS.get("/hang") == 1
    finally:
        RELEASE.set()
        pool.close()


def test_late_answer_is_dropped_and_the_source_recovers() -> None:
    gate = threading.Event()
    values = iter([b"vllm:generation_tokens_total 10\n", b"vllm:generation_tokens_total 40\n"])

    def fetch(url: str, timeout_s: float) -> FetchResponse:
        gate.wait(5.0)
        return FetchResponse(200, next(values), {})

    source = make_source(ServerConfig(name="slow", url="http://x/metrics", kind="vllm"), fetch)
    with ScrapePool([source]) as pool:
        assert not pool.poll_all(1.0, 0.05)[0].up
        gate.set()
        time.sleep(0.05)
        # The late answer (10 tokens) was discarded; this tick fetches afresh (40 tokens).
        sample = pool.poll_all(2.0, 1.0)[0]
        assert sample.up and sample.generation_tokens_per_s is None
        assert sample.generation_tokens_total == 40.0


def test_many_sources_are_polled_concurrently() -> None:
    def slow(url: str, timeout_s: float) -> FetchResponse:
        time.sleep(0.2)
        return FetchResponse(200, b"vllm:generation_tokens_total 1\n", {})

    sources = [
        make_source(ServerConfig(name=f"s{i}", url=f"http://h{i}/metrics", kind="vllm"), slow)
        for i in range(6)
    ]
    with ScrapePool(sources, max_workers=8) as pool:
        start = time.monotonic()
        samples = pool.poll_all(1.0, 2.0)
        assert time.monotonic() - start < 0.9
        assert all(s.up for s in samples)
