"""Concurrent scraping under a deadline, so one slow or hung server never delays the tick."""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from types import TracebackType

from powerd.model import ServerSample
from powerd.sources.base import FetchResponse, Source

_FetchResult = tuple["FetchResponse | BaseException", float, float]
"""(answer or error, seconds the fetch took, time.monotonic() when it ended)."""


def _timed_fetch(source: Source) -> _FetchResult:
    start = time.perf_counter()
    try:
        result: FetchResponse | BaseException = source.fetch_response()
    except Exception as exc:
        result = exc
    return result, time.perf_counter() - start, time.monotonic()


class ScrapePool:
    """Fetches every source in worker threads and interprets the answers in the caller's thread.

    poll_all waits at most deadline_s wall-clock seconds. A source whose fetch has not answered
    by then is reported down ("timed out after X s") and is not fetched again until that fetch
    ends; an answer that arrives after its deadline is dropped, so rates only ever use scrapes
    stamped with the tick they belong to. Each sample is stamped now_s; its rates are taken
    between the times the server answered (now_s plus the time from when now_s was taken to
    the end of the fetch), as the server's counters were read then.
    """

    def __init__(
        self, sources: list[Source], max_workers: int = 8, *, after: ScrapePool | None = None
    ) -> None:
        """`after`: the pool this one replaces (a reload). A fetch of one of `sources` still
        running there counts as in flight here, so one server's reader (and its kept
        connection) is never used by two threads at once."""
        self.sources = list(sources)
        workers = max(1, min(max_workers, len(self.sources) or 1))
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="powerd-scrape")
        self._inflight: dict[int, tuple[Future[_FetchResult], float]] = {}
        if after is not None:
            running = {
                id(after.sources[i]): pending
                for i, pending in after._inflight.items()
                if not pending[0].done()
            }
            for i, source in enumerate(self.sources):
                if id(source) in running:
                    self._inflight[i] = running[id(source)]

    def poll_all(
        self, now_s: float, deadline_s: float, *, taken_s: float | None = None
    ) -> list[ServerSample]:
        """One sample per source, in order, within deadline_s seconds of wall time. taken_s:
        time.monotonic() when now_s was taken (a tick's start; the work before the poll may
        take seconds), else when poll_all begins."""
        start = time.monotonic()
        if taken_s is None:
            taken_s = start
        fresh: dict[int, Future[_FetchResult]] = {}
        for i, source in enumerate(self.sources):
            pending = self._inflight.get(i)
            if pending is not None:
                if not pending[0].done():
                    continue
                del self._inflight[i]
            submitted = self._executor.submit(_timed_fetch, source)
            fresh[i] = submitted
            self._inflight[i] = (submitted, start)
        if fresh:
            wait(fresh.values(), timeout=max(0.0, deadline_s))
        samples = []
        for i, source in enumerate(self.sources):
            future = fresh.get(i)
            if future is not None and future.done():
                del self._inflight[i]
                result, duration, ended = future.result()
                answered_s = now_s + (ended - taken_s)
                samples.append(source.process(result, now_s, duration, answered_s))
                continue
            elapsed = time.monotonic() - self._inflight[i][1]
            samples.append(source.down(now_s, f"timed out after {elapsed:.3g} s", elapsed))
        return samples

    def close(self) -> None:
        """Stop the workers; fetches still hanging end on their own timeout."""
        self._executor.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> ScrapePool:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class InlineScrapePool:
    """ScrapePool's interface, polling each source in the caller's thread, in order.

    For virtual time (the benchmark, golden runs): with in-process fetchers there is nothing
    to wait for, and no wall-clock deadline can make a run depend on the machine's load.
    """

    def __init__(self, sources: Sequence[Source]) -> None:
        self.sources = list(sources)

    def poll_all(
        self, now_s: float, deadline_s: float, *, taken_s: float | None = None
    ) -> list[ServerSample]:
        return [source.poll(now_s) for source in self.sources]

    def close(self) -> None:
        pass
