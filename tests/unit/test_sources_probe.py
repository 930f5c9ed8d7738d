"""`powerd probe`: two scrapes, one dict, one human text, one-sentence errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from powerd.sources import FetchResponse, SourceError, format_probe, probe

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "sources"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def replay(*names: str, status: int = 200):  # type: ignore[no-untyped-def]
    bodies = [(FIXTURES / n).read_bytes() for n in names]

    def fetch(url: str, timeout_s: float) -> FetchResponse:
        return FetchResponse(status, bodies.pop(0) if bodies else b"", {})

    return fetch


def test_probe_vllm_pair() -> None:
    clock = Clock()
    result = probe(
        "http://127.0.0.1:8000/metrics",
        interval_s=2.0,
        fetch=replay("vllm_v1_a.txt", "vllm_v1_b.txt"),
        sleep=clock.sleep,
        clock=clock,
    )
    assert clock.slept == [2.0]
    assert result == {
        "kind": "vllm",
        "realtime": True,
        "generation_tokens_per_s": pytest.approx(500.0),
        "prompt_tokens_per_s": pytest.approx(800.0),
        "running": 21.0,
        "waiting": 4.0,
        "ttft_p95_s": pytest.approx(0.625),
        "itl_p95_s": pytest.approx(0.0629166, rel=1e-5),
    }
    json.dumps(result)
    text = format_probe(result)
    assert "kind:                 vllm (token counters move per engine step)" in text
    assert "generation tokens/s:  500.0" in text
    assert "TTFT p95:             0.625 s" in text


def test_probe_tgi_reports_request_end_counters() -> None:
    clock = Clock()
    result = probe(
        "http://h:80/metrics",
        "tgi",
        2.0,
        replay("tgi_a.txt", "tgi_b.txt"),
        sleep=clock.sleep,
        clock=clock,
    )
    assert result["realtime"] is False and result["ttft_p95_s"] is None
    text = format_probe(result)
    assert "at request end" in text and "TTFT p95:             n/a" in text


def test_probe_unreadable_or_unknown_server() -> None:
    clock = Clock()
    with pytest.raises(SourceError, match="HTTP 404 from http://h/metrics"):
        probe("http://h/metrics", fetch=replay(status=404), sleep=clock.sleep, clock=clock)
    with pytest.raises(SourceError, match="no metrics of a known inference server"):
        probe("http://h/metrics", fetch=replay("generic_a.txt"), sleep=clock.sleep, clock=clock)
    with pytest.raises(SourceError, match="restarted between the two scrapes"):
        probe(
            "http://h/metrics",
            fetch=replay("vllm_restart_a.txt", "vllm_restart_b.txt"),
            sleep=clock.sleep,
            clock=clock,
        )
    with pytest.raises(SourceError, match="kind generic"):
        probe("http://h/metrics", kind="generic")
    with pytest.raises(SourceError, match="unknown server kind"):
        probe("http://h/metrics", kind="ollama")
    with pytest.raises(SourceError, match="interval"):
        probe("http://h/metrics", interval_s=0)


def test_probe_of_a_refused_port_is_one_sentence() -> None:
    with pytest.raises(SourceError, match=r"^cannot connect to http://127\.0\.0\.1:9/metrics"):
        probe("http://127.0.0.1:9/metrics", interval_s=0.01)
