"""No body, however broken, makes Source.poll raise or report a non-finite figure."""

from __future__ import annotations

import math
from dataclasses import fields
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from powerd.config import SERVER_KINDS, GenericMetricsConfig, ServerConfig
from powerd.model import ServerSample
from powerd.sources import FetchResponse, make_source

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "sources"
BODIES = {p.name: p.read_bytes() for p in sorted(FIXTURES.glob("*.txt"))}
KINDS = list(SERVER_KINDS)
GENERIC = GenericMetricsConfig(
    generation_tokens="vllm:generation_tokens_total",
    prompt_tokens="myllm_input_tokens",
    running="vllm:num_requests_running",
    ttft_histogram="vllm:time_to_first_token_seconds",
    itl_histogram="myllm_first_token_seconds",
)
FLOAT_FIELDS = [f.name for f in fields(ServerSample) if f.name not in ("server", "kind")]


def check(sample: ServerSample, now_s: float) -> None:
    assert isinstance(sample, ServerSample)
    assert sample.timestamp_s == now_s
    assert sample.up == (sample.error is None)
    for name in FLOAT_FIELDS:
        value = getattr(sample, name)
        if isinstance(value, float) and name != "timestamp_s":
            assert math.isfinite(value), (name, value)


def poll_all(kind: str, bodies: list[bytes], headers: list[dict[str, str]]) -> None:
    items = list(zip(bodies, headers, strict=True))

    def fetch(url: str, timeout_s: float) -> FetchResponse:
        body, header = items.pop(0)
        return FetchResponse(200, body, header)

    config = ServerConfig(name="fuzz", url="http://127.0.0.1:1/metrics", kind=kind, generic=GENERIC)
    source = make_source(config, fetch)
    for i in range(len(bodies)):
        now_s = 10.0 + i
        check(source.poll(now_s), now_s)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A fixture with a few lines deleted, duplicated, cut, or with numbers and bytes changed."""
    name = draw(st.sampled_from(sorted(BODIES)))
    lines = BODIES[name].split(b"\n")
    for _ in range(draw(st.integers(0, 6))):
        if not lines:
            break
        i = draw(st.integers(0, len(lines) - 1))
        op = draw(st.sampled_from(["delete", "duplicate", "cut", "number", "bytes", "swap"]))
        line = lines[i]
        if op == "delete":
            del lines[i]
        elif op == "duplicate":
            lines.insert(i, line)
        elif op == "cut":
            lines[i] = line[: draw(st.integers(0, max(0, len(line))))]
        elif op == "number":
            number = draw(
                st.sampled_from([b"-1", b"NaN", b"+Inf", b"-Inf", b"1e308", b"0", b"1e-300", b"x"])
            )
            head, _, _ = line.rpartition(b" ")
            lines[i] = head + b" " + number
        elif op == "bytes":
            lines[i] = line + draw(st.binary(max_size=12))
        else:
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], line
    return b"\n".join(lines)


FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.sampled_from(KINDS), st.lists(st.binary(max_size=300), min_size=1, max_size=3))
def test_arbitrary_bytes(kind: str, bodies: list[bytes]) -> None:
    poll_all(kind, bodies, [{}] * len(bodies))


@FUZZ
@given(
    st.sampled_from(KINDS),
    st.lists(mutated(), min_size=2, max_size=3),
    st.lists(st.sampled_from(["1", "2", "", "x"]), min_size=3, max_size=3),
)
def test_mutated_fixtures(kind: str, bodies: list[bytes], starts: list[str]) -> None:
    headers = [{"Process-Start-Time-Unix": s} for s in starts[: len(bodies)]]
    poll_all(kind, bodies, headers)


@FUZZ
@given(st.sampled_from(sorted(BODIES)), st.sampled_from(sorted(BODIES)))
def test_any_pair_of_fixtures_under_auto(first: str, second: str) -> None:
    """A server that changes family between scrapes is read or reported, never crashes."""
    poll_all("auto", [BODIES[first], BODIES[second], BODIES[first]], [{}, {}, {}])
