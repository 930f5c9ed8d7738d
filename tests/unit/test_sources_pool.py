"""Real HTTP on 127.0.0.1: the fetchers' bounds and kept connections, and a hung server that must
not hold the tick."""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import wait
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from powerd.config import ServerConfig
from powerd.sources import (
    Fetcher,
    FetchResponse,
    ScrapePool,
    SourceError,
    http_fetch,
    make_source,
)
from powerd.sources import pool as pool_module
from powerd.sources.base import MAX_BODY_BYTES
from powerd.sources.fetch import KeepAliveFetcher
from tests.unit.clocks import ManualTime
from tests.unit.waiting import wait_until

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "sources"
RELEASE = threading.Event()
HITS: dict[str, int] = {}
PORTS: list[int] = []
"""The client port of each answer sent: one port for several answers is one kept connection."""
HTTP11: set[str] = set()
HANG_S = 60.0
"""How long /hang holds its answer (until RELEASE): far longer than any tick may last, however
slow the machine, so a tick that waited for it could not pass for one that did not."""
DRIP_S = 30.0
"""How long /drip sends its answer, a line every 50 ms (until RELEASE or the client leaves):
a fetch that bounded each read, not the whole exchange, would read that long."""


class Handler(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        HITS[self.path] = HITS.get(self.path, 0) + 1
        if self.path == "/hang":
            RELEASE.wait(HANG_S)
            self._send(b"vllm:generation_tokens_total 1\n")
        elif self.path == "/drip":
            self.send_response(200)
            lines = round(DRIP_S / 0.05)
            self.send_header("Content-Length", str(64 * lines + 1))  # never all sent
            self.end_headers()
            for _ in range(lines):
                if RELEASE.wait(0.05):
                    return
                try:
                    self.wfile.write(b"# " + b"x" * 61 + b"\n")
                    self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    return
        elif self.path == "/big":
            self._send(b"#" * (3 * 1024 * 1024))
        elif self.path == "/missing":
            self.send_response(404)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", "19")
            self.end_headers()
            self.wfile.write(b"404 page not found\n")
        elif self.path == "/moved":
            self.send_response(302)
            self.send_header("Location", "/llamacpp_a.txt")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path == "/once":
            # Answers as if the connection stays open, then closes it (an idle timeout).
            self._send(b"once\n")
            self.close_connection = True
        else:
            name = self.path.strip("/")
            body = (FIXTURES / name).read_bytes()
            self._send(body, {"Process-Start-Time-Unix": "1752000000"})

    def _send(self, body: bytes, headers: dict[str, str] | None = None) -> None:
        PORTS.append(self.client_address[1])
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


class Handler11(Handler):
    protocol_version = "HTTP/1.1"


@pytest.fixture(scope="module", params=[Handler, Handler11], ids=["http1.0", "http1.1"])
def server(request: pytest.FixtureRequest) -> Iterator[str]:
    RELEASE.clear()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), request.param)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    if request.param is Handler11:
        HTTP11.add(url)
    try:
        yield url
    finally:
        RELEASE.set()
        httpd.shutdown()
        httpd.server_close()


FetchFactory = Callable[..., Fetcher]


def _http_fetch(max_bytes: int = MAX_BODY_BYTES) -> Fetcher:
    return functools.partial(http_fetch, max_bytes=max_bytes)


@pytest.fixture(params=[_http_fetch, KeepAliveFetcher], ids=["http_fetch", "keep-alive"])
def make_fetch(request: pytest.FixtureRequest) -> FetchFactory:
    """Both fetchers keep one contract."""
    factory: FetchFactory = request.param
    return factory


def test_fetch_reads_body_and_headers(server: str, make_fetch: FetchFactory) -> None:
    response = make_fetch()(f"{server}/llamacpp_a.txt", 2.0)
    assert response.status == 200
    assert response.body == (FIXTURES / "llamacpp_a.txt").read_bytes()
    assert response.headers["process-start-time-unix"] == "1752000000"


def test_fetch_returns_error_statuses(server: str, make_fetch: FetchFactory) -> None:
    response = make_fetch()(f"{server}/missing", 2.0)
    assert response.status == 404 and response.body == b"404 page not found\n"


def test_fetch_follows_a_redirect(server: str, make_fetch: FetchFactory) -> None:
    response = make_fetch()(f"{server}/moved", 2.0)
    assert response.status == 200
    assert response.body == (FIXTURES / "llamacpp_a.txt").read_bytes()


def test_fetch_bounds_the_size(server: str, make_fetch: FetchFactory) -> None:
    with pytest.raises(SourceError, match="sent more than 1 MiB of metrics"):
        make_fetch(max_bytes=1024 * 1024)(f"{server}/big", 2.0)


def test_fetch_bounds_the_whole_exchange(server: str, make_fetch: FetchFactory) -> None:
    fetch = make_fetch()
    start = time.monotonic()
    with pytest.raises(SourceError, match=r"timed out after 0\.3 s"):
        fetch(f"{server}/drip", 0.3)
    # Every read gets its line within 50 ms: only a bound on the whole exchange ends the fetch
    # before the drip's 30 s. A third of that is a margin no busy machine takes from 0.3 s.
    assert time.monotonic() - start < DRIP_S / 3
    # The half-read answer is not mistaken for the next one.
    assert fetch(f"{server}/llamacpp_a.txt", 2.0).body == (FIXTURES / "llamacpp_a.txt").read_bytes()


def test_fetch_refused_port(make_fetch: FetchFactory) -> None:
    with pytest.raises(SourceError, match=r"cannot connect to http://127\.0\.0\.1:9/metrics"):
        make_fetch()("http://127.0.0.1:9/metrics", 1.0)


def test_fetch_bad_url(make_fetch: FetchFactory) -> None:
    with pytest.raises(SourceError):
        make_fetch()("http://[::1/metrics", 1.0)


def test_keep_alive_reuses_one_connection_on_http_1_1(server: str) -> None:
    fetch = KeepAliveFetcher()
    del PORTS[:]
    for _ in range(3):
        assert fetch(f"{server}/llamacpp_a.txt", 2.0).status == 200
    ports = set(PORTS)
    # HTTP/1.0 answers close the connection: one per read there.
    assert len(ports) == (1 if server in HTTP11 else 3)


def test_keep_alive_retries_once_when_the_server_closed_the_kept_connection(server: str) -> None:
    fetch = KeepAliveFetcher()
    del PORTS[:]
    assert fetch(f"{server}/once", 2.0).body == b"once\n"
    time.sleep(0.05)  # the server's close reaches the client
    assert fetch(f"{server}/llamacpp_a.txt", 2.0).status == 200
    assert len(set(PORTS)) == 2


def test_source_over_http_uses_the_restart_header(server: str) -> None:
    source = make_source(ServerConfig(name="l", url=f"{server}/llamacpp_a.txt"))
    first = source.poll(1.0)
    assert first.up and source.kind == "llamacpp"
    second = source.poll(2.0)
    assert second.generation_tokens_per_s == 0.0


def test_hung_server_does_not_delay_the_tick(server: str) -> None:
    hung = make_source(
        ServerConfig(name="hung", url=f"{server}/hang", kind="vllm", timeout_s=HANG_S)
    )
    body = (FIXTURES / "vllm_v1_a.txt").read_bytes()
    fast = make_source(
        ServerConfig(name="fast", url="http://in-process/metrics", kind="vllm"),
        lambda url, timeout_s: FetchResponse(200, body, {}),
    )
    pool = ScrapePool([hung, fast], max_workers=4)
    hits_before = HITS.get("/hang", 0)
    # Long enough for the in-process answer on a busy machine (a worker thread to start and
    # run), and a small part of the hang: a tick that waited for the hung server would last
    # HANG_S, the fetch's own timeout too.
    deadline_s = 2.0

    def hanging() -> bool:
        pending = pool._inflight.get(0)
        return pending is not None and not pending[0].done()

    try:
        start = time.monotonic()
        samples = pool.poll_all(now_s=100.0, deadline_s=deadline_s)
        elapsed = time.monotonic() - start
        # The tick ended while the hung fetch still ran.
        assert hanging(), "the tick waited for the hung server"
        assert elapsed < HANG_S / 3
        assert [s.server for s in samples] == ["hung", "fast"]
        assert samples[1].up and samples[1].running == 18.0
        assert not samples[0].up
        # The time it has been hanging, at least the deadline (more on a busy machine).
        assert samples[0].error is not None and samples[0].error.startswith("timed out after ")
        assert float(samples[0].error.split()[3]) >= deadline_s
        assert samples[0].timestamp_s == 100.0

        # The hung fetch is still running: the next tick neither waits for it (it waits only
        # for the fetch it started, far from a deadline of half the hang) nor stacks a second
        # request on the server.
        start = time.monotonic()
        again = pool.poll_all(now_s=101.0, deadline_s=HANG_S / 2)
        assert time.monotonic() - start < HANG_S / 6
        assert hanging(), "the hung fetch ended: the tick proves nothing"
        assert not again[0].up and again[0].error is not None
        assert again[0].error.startswith("timed out after")
        assert again[1].up and again[1].generation_tokens_per_s == 0.0
        # The ticks ended at their deadlines, whether or not the worker had yet sent the hung
        # request (a thread started late on a busy machine): wait for it to reach the server.
        assert wait_until(lambda: HITS.get("/hang", 0) > hits_before), "never requested"
        assert HITS.get("/hang") == hits_before + 1
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
        # Until the late fetch has ended in its worker (not merely been let go) the source is
        # still in flight, and the next tick would report it down without fetching.
        late = [future for future, _ in pool._inflight.values()]
        assert late and not wait(late, timeout=10.0).not_done, "the late fetch never ended"
        # The late answer (10 tokens) was discarded; this tick fetches afresh (40 tokens).
        sample = pool.poll_all(2.0, 1.0)[0]
        assert sample.up and sample.generation_tokens_per_s is None
        assert sample.generation_tokens_total == 40.0


def test_many_sources_are_polled_concurrently() -> None:
    # Each fetch answers only once all six are under way: fetched one after another (or a few
    # at a time), the first would wait in vain and every source be down. Not a timing bound,
    # which a busy machine's slow threads would break.
    all_fetching = threading.Barrier(6)

    def slow(url: str, timeout_s: float) -> FetchResponse:
        all_fetching.wait(10.0)
        return FetchResponse(200, b"vllm:generation_tokens_total 1\n", {})

    sources = [
        make_source(ServerConfig(name=f"s{i}", url=f"http://h{i}/metrics", kind="vllm"), slow)
        for i in range(6)
    ]
    with ScrapePool(sources, max_workers=8) as pool:
        samples = pool.poll_all(1.0, 30.0)
        assert all(s.up for s in samples), [s.error for s in samples]


def test_rates_run_between_the_times_the_server_answered(monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM and SGLang serve /metrics from the event loop that runs generation, so an answer
    can come 20 ms into one tick and 300 ms into the next: over the tick clock a steady
    1000 tokens/s would read 1280, 720, 1280."""
    # On the real clock the server's counter and the pool's answer times part by however late
    # a tick or a worker started: 50 ms of it, on a busy machine, is a 5 % rate.
    clock = ManualTime(5000.0)
    monkeypatch.setattr(pool_module, "time", clock)
    latencies_s = iter([0.02, 0.3] * 4)

    def fetch(url: str, timeout_s: float) -> FetchResponse:
        clock.now_s += next(latencies_s)
        tokens = 1000.0 * clock.now_s  # the counter as the server reads it
        return FetchResponse(200, f"vllm:generation_tokens_total {tokens:.3f}\n".encode(), {})

    source = make_source(ServerConfig(name="v", url="http://x/metrics", kind="vllm"), fetch)
    samples = []
    with ScrapePool([source]) as pool:
        for tick in range(5):
            clock.now_s = 5000.0 + tick  # the tick begins, 1 s after the one before
            # The fetch ends as soon as its worker runs: a long deadline costs no time.
            samples.extend(pool.poll_all(100.0 + tick, deadline_s=30.0))
    assert [s.timestamp_s for s in samples] == [100.0, 101.0, 102.0, 103.0, 104.0]
    assert all(s.up for s in samples), [s.error for s in samples]
    rates = [s.generation_tokens_per_s for s in samples[1:]]
    assert rates == [pytest.approx(1000.0, rel=1e-6)] * 4


def test_a_pool_that_replaces_another_waits_for_its_fetch_still_running() -> None:
    """After a reload the kept reader's fetch may still hang in the old pool's thread: the new
    pool must not start a second one on the same reader (and its kept connection)."""
    release = threading.Event()
    calls: list[float] = []

    def hanging(url: str, timeout_s: float) -> FetchResponse:
        calls.append(time.monotonic())
        release.wait(5.0)
        return FetchResponse(200, b"vllm:generation_tokens_total 1\n", {})

    source = make_source(ServerConfig(name="s", url="http://h/metrics", kind="vllm"), hanging)
    old = ScrapePool([source])
    try:
        assert not old.poll_all(0.0, deadline_s=0.05)[0].up
        old.close()
        new = ScrapePool([source], after=old)
        try:
            sample = new.poll_all(1.0, deadline_s=0.05)[0]
            assert not sample.up and len(calls) == 1, "no second fetch while the first runs"
            release.set()
            deadline = time.monotonic() + 5.0
            while len(calls) < 2 and time.monotonic() < deadline:
                new.poll_all(2.0, deadline_s=0.2)
            assert len(calls) == 2, "fetched again once the first one ended"
        finally:
            new.close()
    finally:
        release.set()
        old.close()
