"""Source behaviour around the figures: restarts, windows, errors that never escape."""

from __future__ import annotations

from pathlib import Path

import pytest

from powerd.config import GenericMetricsConfig, ServerConfig
from powerd.sources import FetchResponse, SourceError, make_source
from powerd.sources.base import Source

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "sources"
URL = "http://127.0.0.1:8000/metrics"


def body(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def source_of(responses: list[object], kind: str = "vllm", **kw: object) -> Source:
    """A source whose fetcher returns (or raises) the given items in turn."""
    items = list(responses)

    def fetch(url: str, timeout_s: float) -> FetchResponse:
        item = items.pop(0)
        if isinstance(item, BaseException):
            raise item
        if isinstance(item, FetchResponse):
            return item
        assert isinstance(item, bytes)
        return FetchResponse(200, item, {})

    return make_source(ServerConfig(name="s", url=URL, kind=kind, **kw), fetch)  # type: ignore[arg-type]


def test_restart_gives_no_rates_then_counts_from_the_new_baseline() -> None:
    src = source_of(
        [body("vllm_restart_a.txt"), body("vllm_restart_b.txt"), body("vllm_restart_b.txt")]
    )
    assert src.poll(10.0).generation_tokens_per_s is None
    after = src.poll(12.0)
    assert after.up and after.error is None
    assert after.generation_tokens_per_s is None and after.ttft_q_s is None
    assert after.running == 2.0
    assert after.generation_tokens_total == 300.0
    steady = src.poll(14.0)
    assert steady.generation_tokens_per_s == 0.0 and steady.finished_requests == 0.0


def _without(text: bytes, *needles: str) -> bytes:
    lines = text.decode().splitlines(keepends=True)
    return "".join(x for x in lines if not any(n in x for n in needles)).encode()


def test_counter_going_down_alone_is_a_restart() -> None:
    a = _without(body("vllm_restart_a.txt"), "process_start_time", "_created")
    b = _without(body("vllm_restart_b.txt"), "process_start_time", "_created")
    src = source_of([a, b])
    src.poll(10.0)
    assert src.poll(12.0).generation_tokens_per_s is None


GEN = 'vllm:generation_tokens_total{{engine="{e}"}} {v}\n'
CREATED = 'vllm:generation_tokens_created{{engine="{e}"}} {t}\n'


def test_changed_created_timestamp_alone_is_a_restart() -> None:
    a = (GEN.format(e=0, v=5) + CREATED.format(e=0, t="1.0e9")).encode()
    b = (GEN.format(e=0, v=9) + CREATED.format(e=0, t="2.0e9")).encode()
    src = source_of([a, b])
    src.poll(10.0)
    assert src.poll(12.0).generation_tokens_per_s is None


def test_a_new_series_is_not_a_restart() -> None:
    a = (GEN.format(e=0, v=5) + CREATED.format(e=0, t="1e9")).encode()
    b = a + (GEN.format(e=1, v=4) + CREATED.format(e=1, t="3e9")).encode()
    src = source_of([a, b])
    src.poll(10.0)
    assert src.poll(12.0).generation_tokens_per_s == pytest.approx(2.0)


def test_changed_process_start_time_is_a_restart_even_when_counters_grow() -> None:
    a = b"process_start_time_seconds 1.0e9\nvllm:generation_tokens_total 5\n"
    b = b"process_start_time_seconds 1.1e9\nvllm:generation_tokens_total 50\n"
    src = source_of([a, b])
    src.poll(10.0)
    assert src.poll(12.0).generation_tokens_per_s is None


def test_rates_use_the_callers_clock() -> None:
    a = b"vllm:generation_tokens_total 1000\n"
    b = b"vllm:generation_tokens_total 1600\n"
    src = source_of([a, b])
    src.poll(5000.0)
    assert src.poll(5000.25).generation_tokens_per_s == pytest.approx(2400.0)


def test_rates_run_between_the_answers_while_samples_keep_the_tick() -> None:
    """A server answering 20 ms into one tick and 300 ms into the next counted for 1.28 s."""
    src = source_of([])
    counter = "vllm:generation_tokens_total {v}\n"
    answers = [(10.0, 10.02, 0.0), (11.0, 11.30, 1280.0), (12.0, 12.02, 2000.0)]
    samples = [
        src.process(FetchResponse(200, counter.format(v=v).encode(), {}), now_s, 0.01, answered_s)
        for now_s, answered_s, v in answers
    ]
    assert [s.timestamp_s for s in samples] == [10.0, 11.0, 12.0]
    assert samples[1].generation_tokens_per_s == pytest.approx(1000.0)
    assert samples[2].generation_tokens_per_s == pytest.approx(1000.0)


def test_same_instant_keeps_the_older_baseline() -> None:
    src = source_of(
        [
            b"vllm:generation_tokens_total 0\n",
            b"vllm:generation_tokens_total 10\n",
            b"vllm:generation_tokens_total 30\n",
        ]
    )
    src.poll(1.0)
    assert src.poll(1.0).generation_tokens_per_s is None
    assert src.poll(2.0).generation_tokens_per_s == pytest.approx(30.0)


def test_long_gap_is_not_rated() -> None:
    src = source_of(
        [
            b"vllm:generation_tokens_total 0\n",
            b"vllm:generation_tokens_total 600\n",
            b"vllm:generation_tokens_total 700\n",
        ]
    )
    src.poll(0.0)
    assert src.poll(600.0).generation_tokens_per_s is None
    assert src.poll(601.0).generation_tokens_per_s == pytest.approx(100.0)


def test_a_failed_scrape_keeps_the_baseline() -> None:
    src = source_of(
        [
            b"vllm:generation_tokens_total 0\n",
            OSError(111, "Connection refused"),
            b"vllm:generation_tokens_total 300\n",
        ]
    )
    src.poll(0.0)
    down = src.poll(1.0)
    assert not down.up and down.error == "cannot read metrics: Connection refused"
    assert down.generation_tokens_per_s is None and down.timestamp_s == 1.0
    assert src.poll(3.0).generation_tokens_per_s == pytest.approx(100.0)


@pytest.mark.parametrize(
    ("item", "kind", "message"),
    [
        (
            FetchResponse(404, b"Not Found", {}),
            "sglang",
            f"HTTP 404 from {URL} (SGLang serves /metrics only with --enable-metrics)",
        ),
        (
            FetchResponse(501, b'{"error":"metrics disabled"}', {}),
            "llamacpp",
            f"HTTP 501 from {URL} (llama-server serves /metrics only with --metrics)",
        ),
        (FetchResponse(500, b"oops", {}), "vllm", f"HTTP 500 from {URL}"),
        (SourceError("timed out after 0.5 s reading x"), "vllm", "timed out after 0.5 s reading x"),
        (TimeoutError(), "vllm", "timed out after 0.5 s"),
        (RuntimeError("boom"), "vllm", "cannot read metrics: RuntimeError: boom"),
        (
            FetchResponse(200, b"vllm:x 1\n<html>\n", {}),
            "vllm",
            f"{URL} is not a Prometheus exposition: line 2: not a sample, comment or blank line: "
            "'<html>'",
        ),
    ],
)
def test_errors_are_one_sentence(item: object, kind: str, message: str) -> None:
    s = source_of([item], kind=kind).poll(1.0)
    assert not s.up
    assert s.error == message
    assert s.server == "s" and s.kind == kind


def test_malformed_auto_body_names_the_line() -> None:
    bad = b"# HELP x\n# TYPE x gauge\nx{a=1} 2\n"
    s = source_of([bad], kind="auto").poll(1.0)
    assert not s.up and s.kind == "auto"
    assert s.error is not None
    assert s.error.startswith(f"{URL} is not a Prometheus exposition: line 3: ")


def test_huge_body_is_refused() -> None:
    src = source_of([b"#" * (9 * 1024 * 1024)])
    s = src.poll(1.0)
    assert not s.up and s.error == f"{URL} sent more than 8 MiB of metrics"


def test_non_finite_values_never_reach_the_sample() -> None:
    src = source_of(
        [
            b"vllm:generation_tokens_total +Inf\nvllm:num_requests_running NaN\n",
            b"vllm:generation_tokens_total +Inf\nvllm:num_requests_running +Inf\n",
        ]
    )
    src.poll(1.0)
    s = src.poll(2.0)
    assert s.up and s.generation_tokens_per_s is None and s.running is None


def test_make_source_rejects_unknown_kinds() -> None:
    with pytest.raises(SourceError, match="unknown server kind 'ollama'"):
        make_source(ServerConfig(name="o", url=URL, kind="ollama"))
    with pytest.raises(SourceError, match="kind generic needs a generic: section"):
        make_source(ServerConfig(name="g", url=URL, kind="generic"))


def test_scrape_duration_and_identity() -> None:
    cfg = ServerConfig(
        name="gen", url=URL, kind="generic", generic=GenericMetricsConfig(generation_tokens="t")
    )
    src = make_source(cfg, lambda url, timeout_s: FetchResponse(200, b"t 1\n", {}))
    s = src.poll(3.0)
    assert s.server == "gen" and s.kind == "generic" and src.name == "gen"
    assert src.config is cfg
    assert 0.0 <= s.scrape_duration_s < 1.0
