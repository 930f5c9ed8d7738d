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
        "url": "http://127.0.0.1:8000/metrics",
        "kv_cache_usage": pytest.approx(0.62),
        "exports_ttft": True,
        "exports_prompt_lengths": False,
        "first_token_blind": False,
        "prefill_busy_share": None,
    }
    json.dumps(result)
    text = format_probe(result)
    assert "kind:                 vllm (token counters move per engine step)" in text
    assert "generation tokens/s:  500.0" in text
    assert "TTFT p95:             0.625 s" in text
    assert "KV cache in use:      62.0 %" in text
    assert "prompt-length mix:    not exported" in text
    assert "prefill passes:       not timed" in text
    assert "warning" not in text  # its TTFT histogram shows first tokens


def test_probe_tgi_counts_tokens_per_forward_call() -> None:
    clock = Clock()
    result = probe(
        "http://h:80/metrics",
        "tgi",
        2.0,
        replay("tgi_a.txt", "tgi_b.txt"),
        sleep=clock.sleep,
        clock=clock,
    )
    assert result["realtime"] is True and result["ttft_p95_s"] is None
    text = format_probe(result)
    assert "per engine step" in text and "TTFT p95:             not exported" in text
    # Its prompt-length histogram sizes the prefill headroom: nothing to warn about.
    assert "prompt-length mix:    exported" in text and "warning" not in text
    # It times its prefill passes (0.32 s of the 2 s), from which the capacity is learned.
    assert result["prefill_busy_share"] == pytest.approx(0.16)
    assert "prefill passes:       16.0 % of the time" in text


def triton_fetch(with_first_response: bool):  # type: ignore[no-untyped-def]
    """Triton's scrapes, as served without `--metrics-config histogram_latencies=true`."""
    bodies = []
    for name in ("triton_a.txt", "triton_b.txt"):
        lines = (FIXTURES / name).read_text().splitlines(keepends=True)
        if not with_first_response:
            lines = [line for line in lines if "first_response" not in line]
        bodies.append("".join(lines).encode())
    return lambda url, timeout_s: FetchResponse(200, bodies.pop(0), {})


@pytest.mark.parametrize(
    ("fetch", "hint"),
    [
        (triton_fetch(with_first_response=False), "--metrics-config histogram_latencies=true"),
        (replay("llamacpp_a.txt", "llamacpp_b.txt"), "llama-server exports neither"),
    ],
)
def test_probe_warns_where_first_tokens_can_be_neither_seen_nor_modelled(
    fetch: object, hint: str
) -> None:
    clock = Clock()
    result = probe("http://h/metrics", fetch=fetch, sleep=clock.sleep, clock=clock)  # type: ignore[arg-type]
    assert result["exports_ttft"] is False and result["exports_prompt_lengths"] is False
    assert result["first_token_blind"] is True
    text = format_probe(result)
    assert "TTFT p95:             not exported" in text
    warning = text.splitlines()[-1]
    assert warning.startswith(
        f"warning: server http://h/metrics ({result['kind']}) exports no time-to-first-token "
        "histogram and no prompt-length histogram"
    )
    assert "at or above 70 % of their maximum" in warning and hint in warning


def test_probe_of_triton_with_its_latency_histograms_does_not_warn() -> None:
    clock = Clock()
    result = probe("http://h/metrics", fetch=triton_fetch(True), sleep=clock.sleep, clock=clock)
    assert result["exports_ttft"] is True
    assert "warning" not in format_probe(result)


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


SGLANG = (
    'sglang:num_running_reqs{{model_name="m",tp_rank="0"}} 24\n'
    'sglang:realtime_tokens_total{{model_name="m",tp_rank="0",mode="decode"}} {decode}\n'
    'sglang:realtime_tokens_total{{model_name="m",tp_rank="0",mode="prefill_compute"}} 9000\n'
)
LLAMACPP = "llamacpp:n_decode_total {d}\nllamacpp:n_busy_slots_per_decode {p}\n" + (
    "llamacpp:requests_processing 4\n"
)


@pytest.mark.parametrize(
    ("bodies", "reason"),
    [
        (
            ["vllm_restart_a.txt", "vllm_restart_b.txt"],
            "the server restarted between the two scrapes (its start marker changed or a "
            "counter went down): probe again",
        ),
        (
            [SGLANG.format(decode=5000)] * 2,
            "its token counter has not moved while requests ran (the server adds to it in "
            "batches): probe again with a longer --interval",
        ),
        (
            [LLAMACPP.format(d="1.23457e+07", p="3.7"), LLAMACPP.format(d="1.23458e+07", p="3.7")],
            "its token counter has not moved past its rounding while requests ran: probe again "
            "with a longer --interval",
        ),
    ],
    ids=["restart", "batched-counter", "rounded-counter"],
)
def test_probe_says_why_it_has_no_generation_rate(bodies: list[str], reason: str) -> None:
    """Not every missing rate is a restart: a counter the server adds to in batches, or one
    printed rounded, may not have moved between two scrapes with requests running."""
    texts = [(FIXTURES / b).read_bytes() if b.endswith(".txt") else b.encode() for b in bodies]

    def fetch(url: str, timeout_s: float) -> FetchResponse:
        return FetchResponse(200, texts.pop(0), {})

    clock = Clock()
    with pytest.raises(SourceError) as caught:
        probe("http://h/metrics", fetch=fetch, sleep=clock.sleep, clock=clock)
    assert (
        str(caught.value) == f"http://h/metrics gave no generation rate from two scrapes: {reason}"
    )


def test_source_says_why_a_sample_has_no_generation_rate() -> None:
    from powerd.config import ServerConfig
    from powerd.sources import make_source

    bodies = [b"vllm:generation_tokens_total 1\n", b"vllm:generation_tokens_total 2\n"]
    source = make_source(
        ServerConfig(name="v", url="http://h/metrics", kind="vllm"),
        lambda url, timeout_s: FetchResponse(200, bodies.pop(0), {}),
    )
    source.poll(0.0)
    assert source.no_rate_reason == "there is no earlier scrape to compare with"
    source.poll(61.0)
    assert source.no_rate_reason == "the scrapes were more than 60 s apart"


def test_probe_of_a_refused_port_is_one_sentence() -> None:
    with pytest.raises(SourceError, match=r"^cannot connect to http://127\.0\.0\.1:9/metrics"):
        probe("http://127.0.0.1:9/metrics", interval_s=0.01)


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://127.0.0.1:99999/metrics", "not a URL (Port out of range 0-65535)"),
        ("http://exa mple/metrics", "must not contain spaces or control characters"),
        ("ftp://h/metrics", "must start with http:// or https://"),
        ("http:///metrics", "names no host"),
    ],
)
def test_probe_of_a_url_a_config_would_refuse_says_why_and_reads_nothing(
    url: str, problem: str
) -> None:
    """As the config words it, where a port past 65535 read as 'Connection refused'."""
    fetched: list[str] = []

    def fetch(*args: object, **kwargs: object) -> object:
        fetched.append(str(args[0]))
        raise AssertionError("nothing should be read")

    with pytest.raises(SourceError) as caught:
        probe(url, fetch=fetch, interval_s=0.01)  # type: ignore[arg-type]
    assert str(caught.value).startswith(f"url: {problem}") and repr(url) in str(caught.value)
    assert fetched == []
