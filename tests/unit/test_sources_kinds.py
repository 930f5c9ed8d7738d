"""Every server family on its fixture pair (scrapes 2 s apart), against hand-computed figures.

Quantiles follow Prometheus's histogram_quantile: rank = q x count of the window, linear
interpolation inside the bucket that holds the rank, from the bucket-count deltas of the pair.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from pathlib import Path

import pytest

from powerd.config import GenericMetricsConfig, ServerConfig, SloConfig
from powerd.model import ServerSample
from powerd.sources import FetchResponse, SourceError, detect_kind, make_source

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "sources"
T0, T1 = 100.0, 102.0


def load(name: str) -> tuple[bytes, dict[str, str]]:
    """A fixture body and the response headers its `# fixture-header:` comments name."""
    body = (FIXTURES / name).read_bytes()
    headers = {}
    for line in body.decode().splitlines():
        if line.startswith("# fixture-header: "):
            key, _, value = line.removeprefix("# fixture-header: ").partition(": ")
            headers[key] = value
    return body, headers


class Replay:
    """A fetcher that serves a list of (body, headers) in turn."""

    def __init__(self, responses: list[tuple[bytes, Mapping[str, str]]]) -> None:
        self.responses = list(responses)
        self.urls: list[str] = []

    def __call__(self, url: str, timeout_s: float) -> FetchResponse:
        self.urls.append(url)
        body, headers = self.responses.pop(0)
        return FetchResponse(200, body, headers)


def pair(prefix: str, kind: str = "auto", **config: object) -> tuple[ServerSample, ServerSample]:
    replay = Replay([load(f"{prefix}_a.txt"), load(f"{prefix}_b.txt")])
    cfg = ServerConfig(name=prefix, url="http://127.0.0.1:8000/metrics", kind=kind, **config)  # type: ignore[arg-type]
    source = make_source(cfg, replay)
    return source.poll(T0), source.poll(T1)


def interp(lo: float, hi: float, rank: float, below: float, inside: float) -> float:
    return lo + (hi - lo) * (rank - below) / inside


def test_vllm_v1_data_parallel_sums_engines() -> None:
    first, s = pair("vllm_v1")
    assert first.up and first.generation_tokens_per_s is None
    assert first.running == 18.0 and first.waiting == 2.0
    assert s.kind == "vllm" and s.realtime and s.up and s.error is None
    # V1 counts a whole prompt in the step of its first token.
    assert not s.prompt_per_chunk
    assert s.model_name == "meta-llama/Llama-3.1-8B-Instruct"
    assert s.timestamp_s == T1
    # engine 0: +600, engine 1: +400 generated tokens over 2 s.
    assert s.generation_tokens_per_s == pytest.approx((600 + 400) / 2)
    assert s.prompt_tokens_per_s == pytest.approx((1000 + 600) / 2)
    assert s.running == 12 + 9 and s.waiting == 3 + 1
    assert s.finished_requests == pytest.approx(4 + 1 + 3)
    assert s.window_s == pytest.approx(2.0)
    assert s.generation_tokens_total == 10600 + 8400
    # TTFT: 20 first tokens; cumulative deltas 18 at le=0.5, 20 at le=0.75; rank 19.
    assert s.ttft_q_s == pytest.approx(interp(0.5, 0.75, 0.95 * 20, 18, 2))
    assert s.ttft_mean_s == pytest.approx((2.4 + 1.6) / 20)
    # KV usage is the fullest engine's; preemptions add up over engines.
    assert first.kv_cache_usage == 0.41 and first.preemptions is None
    assert s.kv_cache_usage == 0.62 and s.preemptions == 3.0
    assert s.prefill_busy_s is None  # vLLM does not time its steps
    # ITL comes from inter_token_latency_seconds, not the deprecated TPOT histogram:
    # 980 observations, 900 by le=0.05, 960 by le=0.075; rank 931.
    assert s.itl_q_s == pytest.approx(interp(0.05, 0.075, 0.95 * 980, 900, 60))
    assert s.itl_mean_s == pytest.approx((17.64 + 11.76) / 980)


@pytest.mark.parametrize("usage", ["42", "-0.5", "NaN", "+Inf"])
def test_a_kv_usage_that_is_not_a_share_is_not_read(usage: str) -> None:
    """Read as a share, a percent (or garbage) past 0.9 would hold the clocks at f_max."""
    body, headers = load("vllm_v1_b.txt")
    bad = body.replace(
        b'vllm:kv_cache_usage_perc{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.62',
        b'vllm:kv_cache_usage_perc{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} '
        + usage.encode(),
    )
    assert bad != body
    replay = Replay([load("vllm_v1_a.txt"), (bad, headers)])
    source = make_source(ServerConfig(name="v", url="http://127.0.0.1:8000/metrics"), replay)
    source.poll(T0)
    s = source.poll(T1)
    assert s.up and s.generation_tokens_per_s is not None
    # A NaN series is skipped and a negative one is below the other engine's share, which
    # stands; a value past 1 is the fullest and makes the reading unknown.
    expected = 0.33 if usage in ("-0.5", "NaN") else None
    assert s.kv_cache_usage == expected


def test_openmetrics_body_reads_like_the_text_format() -> None:
    _, text = pair("vllm_v1")
    _, om = pair("vllm_openmetrics")
    for field in (
        "generation_tokens_per_s",
        "prompt_tokens_per_s",
        "running",
        "waiting",
        "ttft_q_s",
        "itl_q_s",
        "finished_requests",
    ):
        assert getattr(om, field) == pytest.approx(getattr(text, field)), field


def test_configured_quantile_is_used() -> None:
    _, s = pair("vllm_v1", slo=SloConfig(quantile=0.5))
    # rank 10 of 20: cumulative 10 at le=0.1 exactly.
    assert s.ttft_q_s == pytest.approx(0.1)
    # rank 490 of 980: 400 by le=0.025, 900 by le=0.05.
    assert s.itl_q_s == pytest.approx(interp(0.025, 0.05, 490, 400, 500))


def test_vllm_v0_names() -> None:
    _, s = pair("vllm_v0")
    assert s.kind == "vllm"
    assert s.generation_tokens_per_s == pytest.approx(600 / 2)
    assert s.prompt_tokens_per_s == pytest.approx(1500 / 2)
    assert s.ttft_q_s == pytest.approx(interp(0.25, 0.5, 0.95 * 3, 1, 2))
    assert s.ttft_mean_s == pytest.approx(1.05 / 3)
    # V0's vllm:time_per_output_token_seconds: 297 tokens all in (0.025, 0.05].
    assert s.itl_q_s == pytest.approx(interp(0.025, 0.05, 0.95 * 297, 0, 297))
    assert s.itl_mean_s == pytest.approx(11.88 / 297)
    assert s.finished_requests == 3


def test_vllm_v0_without_counters_reads_the_throughput_gauges() -> None:
    def strip(name: str) -> bytes:
        body, _ = load(name)
        lines = body.decode().splitlines(keepends=True)
        return "".join(x for x in lines if "_tokens_total" not in x).encode()

    replay = Replay([(strip("vllm_v0_a.txt"), {}), (strip("vllm_v0_b.txt"), {})])
    source = make_source(ServerConfig(name="v0", url="http://h:8000/metrics", kind="vllm"), replay)
    source.poll(T0)
    s = source.poll(T1)
    assert s.generation_tokens_per_s == pytest.approx(310.5)
    assert s.prompt_tokens_per_s == pytest.approx(700.2)
    assert s.generation_tokens_total is None


def test_vllm_prompt_rate_is_the_prefill_computed_not_the_cached() -> None:
    """prompt_tokens_total adds prefix-cache hits (700 + 400 of the 1600 prompt tokens here)
    to the tokens prefilled; prompt_tokens_by_source{source="local_compute"} is the work."""
    _, plain = pair("vllm_v1")
    _, s = pair("vllm_prefix_cache")
    assert s.prompt_tokens_per_s == pytest.approx((300 + 200) / 2)
    assert plain.prompt_tokens_per_s == pytest.approx((1000 + 600) / 2)
    assert s.generation_tokens_per_s == plain.generation_tokens_per_s
    assert s.finished_requests == plain.finished_requests


def _prompt_sources(prefix: str, t: int, by_source: bool, external: bool = False) -> bytes:
    """A vLLM-named body at second t: 10000 prompt tokens/s, 1000 of them computed here (the
    rest prefix-cache hits, or KV transfers from a prefill instance)."""
    labels = 'engine="0",model_name="m"'
    computed = 0 if external else 1000 * t
    body = (
        f"{prefix}generation_tokens_total{{{labels}}} {500 * t}\n"
        f"{prefix}prompt_tokens_total{{{labels}}} {10000 * t}\n"
        f"{prefix}num_requests_running{{{labels}}} 8\n"
    )
    if by_source:
        family = f"{prefix}prompt_tokens_by_source_total"
        body += (
            f'{family}{{{labels},source="local_compute"}} {computed}\n'
            f'{family}{{{labels},source="local_cache_hit"}} {0 if external else 9000 * t}\n'
            f'{family}{{{labels},source="external_kv_transfer"}} {10000 * t if external else 0}\n'
        )
    return body.encode()


@pytest.mark.parametrize(
    ("kind", "prefix"), [("vllm", "vllm:"), ("nim", ""), ("lmdeploy", "lmdeploy:")]
)
def test_prompt_rate_by_source_for_the_servers_with_vllm_names(kind: str, prefix: str) -> None:
    """NIM and LMDeploy read vLLM's names through the same code: the computed prompt where the
    server exports it, every prompt token otherwise."""

    def rates(*bodies: bytes) -> list[float | None]:
        cfg = ServerConfig(name="v", url="http://h/metrics", kind=kind)
        source = make_source(cfg, Replay([(body, {}) for body in bodies]))
        return [source.poll(T0 + t).prompt_tokens_per_s for t in range(len(bodies))]

    assert rates(*(_prompt_sources(prefix, t, True) for t in (1, 2, 3)))[1:] == [1000.0] * 2
    assert rates(*(_prompt_sources(prefix, t, False) for t in (1, 2, 3)))[1:] == [10000.0] * 2
    # A decode instance fed by a prefill instance prefills nothing.
    decode_only = [_prompt_sources(prefix, t, True, external=True) for t in (1, 2)]
    assert rates(*decode_only)[1] == 0.0
    # An upgrade to a build with the sources starts a new baseline rather than rating
    # computed tokens against all of them.
    upgraded = [_prompt_sources(prefix, 1, False)] + [
        _prompt_sources(prefix, t, True) for t in (2, 3)
    ]
    assert rates(*upgraded)[1:] == [None, 1000.0]


def test_nim_unprefixed_vllm_names() -> None:
    _, s = pair("nim")
    assert s.kind == "nim" and s.realtime and not s.prompt_per_chunk
    assert s.model_name == "meta/llama-3.1-8b-instruct"
    assert s.kv_cache_usage == 0.12  # gpu_cache_usage_perc, unprefixed
    assert s.generation_tokens_per_s == pytest.approx(600 / 2)
    assert s.prompt_tokens_per_s == pytest.approx(1000 / 2)
    assert s.ttft_q_s == pytest.approx(interp(0.1, 0.25, 0.95 * 4, 0, 4))
    assert s.itl_q_s == pytest.approx(interp(0.025, 0.05, 0.95 * 596, 100, 496))
    assert s.finished_requests == 4


def test_lmdeploy_sums_engines_and_prefers_iter_token_latency() -> None:
    _, s = pair("lmdeploy")
    assert s.kind == "lmdeploy" and s.realtime and not s.prompt_per_chunk
    assert s.generation_tokens_per_s == pytest.approx((300 + 200) / 2)
    assert s.prompt_tokens_per_s == pytest.approx((800 + 400) / 2)
    assert s.running == 7 and s.waiting == 1
    assert s.kv_cache_usage == 0.2  # lmdeploy:gpu_cache_usage_perc, the fuller engine
    assert s.ttft_q_s == pytest.approx(interp(0.25, 0.5, 0.95 * 2, 0, 2))
    # lmdeploy:iter_token_latency: 498 observations in (0.025, 0.05]; TPOT would say ~0.1.
    assert s.itl_q_s == pytest.approx(interp(0.025, 0.05, 0.95 * 498, 0, 498))
    assert s.itl_mean_s == pytest.approx((11.1 + 7.32) / 498)
    assert s.finished_requests == 2


def test_sglang_tp_mirrors_collapse_and_dp_ranks_sum() -> None:
    _, s = pair("sglang")
    # realtime_tokens_total{mode="prefill_compute"} moves chunk by chunk.
    assert s.kind == "sglang" and s.realtime and s.prompt_per_chunk
    # realtime_tokens_total{mode="decode"}: dp 0 +900, dp 1 +700 (tp 3 lagged at 149950 in the
    # first scrape: the max over mirrors keeps 150000). Summing the TP mirrors would double it.
    assert s.generation_tokens_per_s == pytest.approx((900 + 700) / 2)
    assert s.prompt_tokens_per_s == pytest.approx((1200 + 800) / 2)
    assert s.running == 24 + 20 and s.waiting == 5 + 2
    assert s.finished_requests == 12
    # generation_tokens_total moved by a request-sized step; it is reported, not rated.
    assert s.generation_tokens_total == 7557572 + 3200
    assert s.ttft_q_s == pytest.approx(interp(0.8, 1.0, 0.95 * 12, 11, 1))
    assert s.ttft_mean_s == pytest.approx(4.2 / 12)
    assert s.itl_q_s == pytest.approx(interp(0.03, 0.035, 0.95 * 1600, 1500, 80))
    assert s.itl_mean_s == pytest.approx(40.0 / 1600)
    # token_usage: the fullest DP rank's (its TP mirrors alike).
    assert s.kv_cache_usage == 0.58


def _sglang_decode_plus(body: bytes, tokens: float, idle: bool = False) -> bytes:
    """The fixture with `tokens` more decode tokens on every rank (mirrors alike)."""
    out = []
    for line in body.decode().splitlines(keepends=True):
        if line.startswith("sglang:realtime_tokens_total") and 'mode="decode"' in line:
            head, value = line.rsplit(" ", 1)
            line = f"{head} {float(value) + tokens}\n"
        if idle and line.startswith("sglang:num_running_reqs"):
            line = line.rsplit(" ", 1)[0] + " 0.0\n"
        out.append(line)
    return "".join(out).encode()


def test_sglang_decode_tokens_are_rated_since_the_counter_last_moved() -> None:
    """The scheduler adds decode tokens every 40 steps: a scrape in between says nothing about
    the rate (None while requests run), and the next batch covers the time since the last."""
    body_a, _ = load("sglang_a.txt")
    body_b, _ = load("sglang_b.txt")
    replay = Replay(
        [
            (body_a, {}),
            (body_b, {}),
            (body_b, {}),
            (_sglang_decode_plus(body_b, 1000.0), {}),
            (_sglang_decode_plus(body_b, 1000.0, idle=True), {}),
            (_sglang_decode_plus(body_b, 1300.0), {}),
        ]
    )
    source = make_source(ServerConfig(name="sg", url="http://h:30000/metrics"), replay)
    samples = [source.poll(t) for t in (T0, T1, T1 + 1, T1 + 2, T1 + 3, T1 + 4)]
    rates = [s.generation_tokens_per_s for s in samples]
    assert rates[1] == pytest.approx((900 + 700) / 2)
    assert rates[2] is None  # 44 requests running, no batch counted yet
    assert rates[3] == pytest.approx(2 * 1000.0 / 2)  # two ranks' batches over 2 s
    assert rates[4] == 0.0  # idle and standing still
    assert rates[5] == pytest.approx(2 * 300.0 / 1)  # counted from the idle scrape
    assert all(s.up for s in samples)


def test_sglang_without_realtime_counter_uses_gen_throughput_gated_by_running() -> None:
    body_a, _ = load("sglang_a.txt")
    body_b, _ = load("sglang_b.txt")

    def without_realtime(body: bytes, idle: bool = False) -> bytes:
        lines = body.decode().splitlines(keepends=True)
        kept = [x for x in lines if "realtime_tokens" not in x]
        if idle:
            kept = [
                x.replace("} 24.0", "} 0.0").replace("} 20.0", "} 0.0")
                if x.startswith("sglang:num_running_reqs")
                else x
                for x in kept
            ]
        return "".join(kept).encode()

    replay = Replay(
        [
            (without_realtime(body_a), {}),
            (without_realtime(body_b), {}),
            (without_realtime(body_b, idle=True), {}),
        ]
    )
    cfg = ServerConfig(name="sg", url="http://h:30000/metrics", kind="sglang")
    source = make_source(cfg, replay)
    source.poll(T0)
    busy = source.poll(T1)
    assert busy.generation_tokens_per_s == pytest.approx(430.5 + 361.2)
    assert busy.prompt_tokens_per_s == pytest.approx(2000 / 2)
    # sglang:prompt_tokens_total moves at request end.
    assert not busy.prompt_per_chunk
    idle = source.poll(T1 + 2)
    assert idle.running == 0
    assert idle.generation_tokens_per_s == 0.0


def _sglang_scheduler(
    running: int,
    gen_throughput: float,
    finished: int,
    decode: float | None = None,
    waiting: int = 0,
) -> bytes:
    """An SGLang body: the scheduler's gauges as last logged, the tokenizer's request count
    (live) and, with `decode`, the realtime token counter."""
    labels = 'model_name="m",engine_type="unified",tp_rank="0",pp_rank="0"'
    body = (
        f"sglang:num_running_reqs{{{labels}}} {running}\n"
        f"sglang:num_queue_reqs{{{labels}}} {waiting}\n"
        f"sglang:token_usage{{{labels}}} 0.31\n"
        f"sglang:gen_throughput{{{labels}}} {gen_throughput}\n"
        f'sglang:num_requests_total{{model_name="m"}} {finished}\n'
    )
    if decode is not None:
        body += (
            f'sglang:realtime_tokens_total{{{labels},mode="decode"}} {decode}\n'
            f'sglang:realtime_tokens_total{{{labels},mode="prefill_compute"}} 9000\n'
        )
    return body.encode()


def _sglang_samples(bodies: list[bytes]) -> list[ServerSample]:
    cfg = ServerConfig(name="sg", url="http://h:30000/metrics", kind="sglang")
    source = make_source(cfg, Replay([(body, {}) for body in bodies]))
    return [source.poll(T0 + t) for t in range(len(bodies))]


def _sglang_rates(bodies: list[bytes]) -> list[float | None]:
    return [s.generation_tokens_per_s for s in _sglang_samples(bodies)]


def _report(s: ServerSample) -> tuple[float | None, float | None, float | None]:
    return (s.running, s.waiting, s.kv_cache_usage)


def test_sglang_stale_gauges_after_a_drained_batch_read_idle() -> None:
    """The last scheduler log said 24 requests run at 861.5 tokens/s; they all finished after
    it, and the scheduler has logged nothing since (sglang#26495: for 30 s; older builds: for
    good). Once nothing has moved for STALE_REPORT_S the server reads as idle."""
    from powerd.sources.base import STALE_REPORT_S

    wait = int(STALE_REPORT_S)  # scrapes 1 s apart that still count as "just moved"
    busy = [_sglang_scheduler(24, 850.0, 100), _sglang_scheduler(24, 861.5, 104)]
    drained = [_sglang_scheduler(24, 861.5, 128)] * 10  # the last change: scrape 2
    rates = _sglang_rates(busy + drained)
    assert rates[1 : 3 + wait] == [861.5] * (2 + wait)
    assert rates[3 + wait :] == [0.0] * (len(rates) - 3 - wait)

    # With the realtime counter: unknown (None) while it stands still, then idle.
    busy = [_sglang_scheduler(24, 0.0, 100 + 2 * t, decode=1000 + 850 * t) for t in range(3)]
    drained = [_sglang_scheduler(24, 0.0, 128, decode=1000 + 850 * 3)] * 10  # last change: 3
    after = [_sglang_scheduler(8, 400.0, 128, decode=1000 + 850 * 3 + 400)]
    rates = _sglang_rates(busy + drained + after)
    assert rates[1:4] == [850.0] * 3
    assert rates[4 : 4 + wait] == [None] * wait
    assert rates[4 + wait : -1] == [0.0] * (len(rates) - 5 - wait)
    assert rates[-1] == 400.0  # a new batch, counted from the last idle scrape


def test_sglang_stale_gauges_after_a_drained_batch_read_nothing_running() -> None:
    """The stale report's running, waiting and KV figures reach the sample as an idle
    server's (0) once it is read as stale, not as the last busy log: the daemon takes running
    > 0 as a live server and the controller's per-request ITL estimate divides by it."""
    from powerd.sources.base import STALE_REPORT_S

    wait = int(STALE_REPORT_S)
    busy = [
        _sglang_scheduler(24, 850.0, 100, waiting=2),
        _sglang_scheduler(24, 861.5, 104, waiting=2),
    ]
    drained = [_sglang_scheduler(24, 861.5, 128, waiting=2)] * 10  # the last change: scrape 2
    after = [_sglang_scheduler(8, 400.0, 128, waiting=1)]
    samples = _sglang_samples(busy + drained + after)
    assert [_report(s) for s in samples[: 3 + wait]] == [(24.0, 2.0, 0.31)] * (3 + wait)
    idle = samples[3 + wait : -1]
    assert [_report(s) for s in idle] == [(0.0, 0.0, 0.0)] * len(idle)
    assert all(s.up and s.generation_tokens_per_s == 0.0 for s in idle)
    assert _report(samples[-1]) == (8.0, 1.0, 0.31)  # a new log: read as it is

    # With the realtime counter, likewise.
    busy = [_sglang_scheduler(24, 0.0, 100 + 2 * t, decode=1000 + 850 * t) for t in range(3)]
    drained = [_sglang_scheduler(24, 0.0, 128, decode=1000 + 850 * 3)] * 10  # last change: 3
    samples = _sglang_samples(busy + drained)
    assert [s.running for s in samples[: 4 + wait]] == [24.0] * (4 + wait)
    assert [_report(s) for s in samples[4 + wait :]] == [(0.0, 0.0, 0.0)] * (9 - wait)


def test_sglang_batch_between_two_logs_is_not_read_idle() -> None:
    """A slow batch between two scheduler logs leaves the gauges and the decode counter
    standing still too, but fewer requests finish than run: it stays unknown, never 0, and its
    requests still read as running."""
    busy = [_sglang_scheduler(24, 0.0, 100, decode=1000 + 850 * t) for t in range(2)]
    between = [_sglang_scheduler(24, 0.0, 123, decode=1000 + 850)] * 20
    samples = _sglang_samples(busy + between)
    assert [s.generation_tokens_per_s for s in samples[2:]] == [None] * len(between)
    assert [s.running for s in samples] == [24.0] * len(samples)
    busy = [_sglang_scheduler(24, 850.0, 100), _sglang_scheduler(24, 861.5, 104)]
    between = [_sglang_scheduler(24, 861.5, 127)] * 20
    samples = _sglang_samples(busy + between)
    assert [s.generation_tokens_per_s for s in samples[2:]] == [861.5] * len(between)
    assert [s.running for s in samples] == [24.0] * len(samples)


def test_sglang_v03_name_label_and_old_gauges() -> None:
    _, s = pair("sglang_old")
    assert s.kind == "sglang"
    assert s.model_name == "meta-llama/Llama-3.2-3B-Instruct"
    assert s.generation_tokens_per_s == pytest.approx(251.37)
    assert s.prompt_tokens_per_s == pytest.approx(900 / 2)
    assert s.running == 9 and s.waiting == 2
    assert s.ttft_q_s == pytest.approx(interp(0.1, 0.25, 0.95 * 2, 0, 2))
    assert s.itl_q_s == pytest.approx(interp(0.02, 0.025, 0.95 * 640, 100, 540))
    assert s.finished_requests is None


def without(name: str, family: str) -> tuple[bytes, Mapping[str, str]]:
    """A fixture with one family's lines left out."""
    body, headers = load(name)
    lines = body.decode().splitlines(keepends=True)
    return "".join(line for line in lines if family not in line).encode(), headers


def test_tgi_generations_and_no_ttft() -> None:
    _, s = pair("tgi")
    assert s.kind == "tgi" and s.realtime and not s.prompt_per_chunk
    assert s.model_name == ""
    # 1738 generations sent (a request's tokens from one forward call) and 262 more tokens
    # accepted from speculation (--speculate 2).
    assert s.generation_tokens_per_s == pytest.approx((1738 + 262) / 2)
    assert s.generation_tokens_total == 88738 + 12262
    # 6 finished requests are too few for a prompt mix: prompts as they end.
    assert s.prompt_tokens_per_s == pytest.approx(3000 / 2)
    assert s.finished_requests == 6
    assert s.running == 12 and s.waiting == 3
    assert s.kv_cache_usage == pytest.approx(9216 / 36864)  # the batch's reserved tokens
    assert s.ttft_q_s is None and s.ttft_mean_s is None
    lo, hi = 1e-4 * 1.5**14, 1e-4 * 1.5**15
    assert s.itl_q_s == pytest.approx(interp(lo, hi, 0.95 * 6, 4, 2))
    assert s.itl_mean_s == pytest.approx(0.18 / 6)
    # Its prefill passes are timed: 6.4 - 6.08 s of the 2-s window (decode's are not read).
    assert s.prefill_busy_s == pytest.approx(0.32)


def test_tgi_without_generations_counts_forward_calls_times_the_batch() -> None:
    bodies = [without(name, "tgi_request_skipped_tokens") for name in ("tgi_a.txt", "tgi_b.txt")]
    source = make_source(ServerConfig(name="t", url="http://h/metrics", kind="tgi"), Replay(bodies))
    source.poll(T0)
    s = source.poll(T1)
    assert s.realtime
    # 8 prefill and 150 decode calls, each a token for every request of the batch (10, then 12).
    assert s.generation_tokens_per_s == pytest.approx((8 + 150) * (10 + 12) / 2 / 2)
    assert s.generation_tokens_total == 9323  # the finished requests'


def test_tgi_without_timed_prefill_gives_no_prefill_time() -> None:
    """A TGI that does not time its forward passes (or has not yet run a prefill) gives no
    prefill seconds, not zero: zero would read as a server that never prefills."""
    bodies = [without(name, "tgi_batch_forward_duration") for name in ("tgi_a.txt", "tgi_b.txt")]
    source = make_source(ServerConfig(name="t", url="http://h/metrics", kind="tgi"), Replay(bodies))
    source.poll(T0)
    s = source.poll(T1)
    assert s.up and s.generation_tokens_per_s is not None
    assert s.prefill_busy_s is None


def test_trtllm_serve_counts_at_request_end() -> None:
    first, s = pair("trtllm")
    assert first.up and first.generation_tokens_per_s is None
    assert s.kind == "trtllm" and not s.realtime and not s.prompt_per_chunk
    assert s.model_name == "meta-llama/Llama-3.1-8B-Instruct"
    assert s.generation_tokens_per_s == pytest.approx(3200 / 2)
    # Prompts as requests end (trtllm_prefill_batch_tokens, per iteration, is not read).
    assert s.prompt_tokens_per_s == pytest.approx(16000 / 2)
    assert s.finished_requests == 8 + 2  # over finished_reason
    assert s.running == 11 and s.waiting == 2
    assert s.kv_cache_usage == pytest.approx(0.38)  # trtllm_kv_cache_utilization
    # TTFT: 10 first tokens, 8 by le=1.0, 10 by le=2.5; rank 9.5.
    assert s.ttft_q_s == pytest.approx(interp(1.0, 2.5, 0.95 * 10, 8, 2))
    assert s.ttft_mean_s == pytest.approx((36.3 - 31.5) / 10)
    # Inter-token: each request's mean time per output token.
    assert s.itl_mean_s == pytest.approx((5.68 - 5.1) / 10)
    assert s.exports_ttft and not s.exports_prompt_lengths and not s.first_token_blind
    assert s.generation_tokens_total == 33200


def test_tgi_fresh_server_with_lazy_series_reads_zero() -> None:
    fresh = b"# TYPE tgi_queue_size gauge\ntgi_queue_size 0\n"
    body_b, _ = load("tgi_b.txt")
    replay = Replay([(fresh, {}), (fresh, {}), (body_b, {})])
    source = make_source(ServerConfig(name="t", url="http://h/metrics", kind="tgi"), replay)
    source.poll(T0)
    s = source.poll(T1)
    assert s.up and s.generation_tokens_per_s == 0.0 and s.finished_requests == 0.0
    # Series created since the last scrape count from zero: every generation of b.
    later = source.poll(T1 + 10)
    assert later.generation_tokens_per_s == pytest.approx((88738 + 12262) / 10)
    # 50 finished requests make a prompt mix (mean 33000 / 50): prompts are now the requests
    # admitted to prefill (166) at that mean, not the 33000 tokens of the requests that ended.
    assert later.prompt_tokens_per_s == pytest.approx(166 / 10 * 33000 / 50)
    assert later.prefill_busy_s == pytest.approx(6.4)


@pytest.mark.parametrize(
    "body",
    [b"", load("vllm_v1_a.txt")[0], b"# TYPE node_load1 gauge\nnode_load1 0.5\n"],
    ids=["empty", "vllm", "node_exporter"],
)
def test_tgi_kind_rejects_a_body_without_tgi_series(body: bytes) -> None:
    """A wrong port or server is an error, as for every other kind, not an idle TGI."""
    source = make_source(ServerConfig(name="t", url="http://h/metrics", kind="tgi"), Replay([]))
    sample = source.process(FetchResponse(200, body, {}), T0, 0.0)
    assert not sample.up
    assert sample.error == (
        "http://h/metrics has no tgi_ metrics (is it text-generation-inference, read on its "
        "main port?)"
    )


def test_tgi_with_only_its_warmup_gauge_is_idle() -> None:
    """The v3 router sets tgi_batch_max_total_tokens after warmup, before any request."""
    warm = b"# TYPE tgi_batch_max_total_tokens gauge\ntgi_batch_max_total_tokens 36864\n"
    replay = Replay([(warm, {}), (warm, {})])
    source = make_source(ServerConfig(name="t", url="http://h/metrics", kind="tgi"), replay)
    assert source.poll(T0).up
    s = source.poll(T1)
    assert s.up and s.generation_tokens_per_s == 0.0 and s.finished_requests == 0.0


def test_llamacpp_busy_slot_decodes_and_restart_header() -> None:
    _, s = pair("llamacpp")
    assert s.kind == "llamacpp" and s.realtime
    assert s.generation_tokens_per_s == pytest.approx((20400 * 2.51961 - 20000 * 2.5) / 2)
    assert s.prompt_tokens_per_s == pytest.approx(1000 / 2)
    assert s.running == 3 and s.waiting == 1
    assert s.ttft_q_s is None and s.itl_q_s is None
    assert s.generation_tokens_total == 46778

    body_a, headers = load("llamacpp_a.txt")
    body_b, _ = load("llamacpp_b.txt")
    replay = Replay(
        [
            (body_a, headers),
            (body_b, {"process-start-time-unix": "1752003600"}),
            (body_b, {"Process-Start-Time-Unix": "1752003600"}),
        ]
    )
    source = make_source(ServerConfig(name="l", url="http://h:8080/metrics"), replay)
    source.poll(T0)
    restarted = source.poll(T1)
    assert restarted.up and restarted.generation_tokens_per_s is None
    assert source.poll(T1 + 1).generation_tokens_per_s == 0.0


def test_llamacpp_rounding_of_the_product_is_not_a_restart() -> None:
    body = "llamacpp:n_decode_total {d}\nllamacpp:n_busy_slots_per_decode {p}\n"
    replay = Replay(
        [
            (body.format(d="1.23456e+06", p="3.12346").encode(), {}),
            (body.format(d="1.23456e+06", p="3.12345").encode(), {}),
        ]
    )
    source = make_source(ServerConfig(name="l", url="http://h/metrics", kind="llamacpp"), replay)
    source.poll(T0)
    s = source.poll(T1)
    assert s.generation_tokens_per_s == 0.0


def _llamacpp_printed(decodes: int, busy_slots: int, processing: int) -> bytes:
    """The decode figures as llama-server prints them: n_busy_slots_per_decode is a float32
    ratio, and every value goes through a std::stringstream (6 significant digits)."""

    def f32(x: float) -> float:
        return float(struct.unpack("f", struct.pack("f", x))[0])

    per_decode = f32(f32(busy_slots) / max(f32(decodes), 1.0))
    return (
        f"llamacpp:n_decode_total {decodes:g}\n"
        f"llamacpp:n_busy_slots_per_decode {per_decode:g}\n"
        f"llamacpp:requests_processing {processing}\n"
    ).encode()


@pytest.mark.parametrize(
    ("decodes", "most_s_between_rates"), [(20_000, 1), (1_234_567, 6), (12_345_678, 45)]
)
def test_llamacpp_rounded_product_is_rated_only_when_it_moved_measurably(
    decodes: int, most_s_between_rates: int
) -> None:
    """33 decodes/s with 4 busy slots: 132 tokens/s. Past 1e6 decodes the printed product
    moves in steps of tens (1e6) to hundreds (1e7) of tokens, which made 1-s rates of 0, 123,
    148 or 370 tokens/s; a rate is now given only where the rounding is a tenth of it at most."""
    busy = int(decodes * 3.7)
    responses: list[tuple[bytes, Mapping[str, str]]] = []
    for _ in range(120):
        responses.append((_llamacpp_printed(decodes, busy, 4), {}))
        decodes, busy = decodes + 33, busy + 33 * 4
    responses.append((_llamacpp_printed(decodes, busy, 0), {}))
    cfg = ServerConfig(name="l", url="http://h/metrics", kind="llamacpp")
    source = make_source(cfg, Replay(responses))
    rates = [source.poll(T0 + t).generation_tokens_per_s for t in range(len(responses))]
    rated = [t for t, rate in enumerate(rates[:-1]) if rate is not None]
    assert [rates[t] for t in rated] == [pytest.approx(132.0, rel=0.1)] * len(rated)
    assert rated and max(b - a for a, b in zip([0, *rated], rated, strict=False)) <= (
        most_s_between_rates
    )
    assert rates[-1] is not None  # idle: 0, or the last tokens since the baseline
    assert rates[-1] == 0.0 or rates[-1] == pytest.approx(132.0, rel=0.1)


def test_llamacpp_without_decode_counters_falls_back_to_request_end_counters() -> None:
    body = "llamacpp:tokens_predicted_total {n}\nllamacpp:requests_processing 1\n"
    replay = Replay([(body.format(n=100).encode(), {}), (body.format(n=300).encode(), {})])
    source = make_source(ServerConfig(name="l", url="http://h/metrics", kind="llamacpp"), replay)
    source.poll(T0)
    s = source.poll(T1)
    assert not s.realtime and s.generation_tokens_per_s == pytest.approx(100.0)


def test_triton_trtllm_iterations_times_generation_requests() -> None:
    _, s = pair("triton")
    assert s.kind == "triton" and s.realtime and s.prompt_per_chunk
    assert s.model_name == "tensorrt_llm"
    # 100 iterations in 2 s, generation_requests 30 then 34 (mean 32).
    assert s.generation_tokens_per_s == pytest.approx(100 * 32 / 2)
    assert s.prompt_tokens_per_s == pytest.approx(100 * (0 + 512) / 2 / 2)
    assert s.running == 36 and s.waiting == 5
    assert s.kv_cache_usage == pytest.approx(812 / 6239)  # used of max KV-cache blocks
    # TTFT from the ensemble (the tensorrt_llm model reads 0), in ms: 10 first responses,
    # 8 by le=500 ms, 10 by le=2000 ms.
    assert s.ttft_q_s == pytest.approx(interp(0.5, 2.0, 0.95 * 10, 8, 2))
    assert s.ttft_mean_s == pytest.approx(6.2 / 10)
    assert s.finished_requests == 10
    assert s.generation_tokens_total is None


def _triton_two_models(iterations: int, a_fast: int, b_fast: int, b_slow: int) -> bytes:
    """Two models on one Triton, both serving 50-ms first tokens; llama_b also has b_slow
    4-s first tokens from long ago."""

    def first_response(model: str, fast: int, slow: int) -> str:
        labels = f'model="{model}",version="1"'
        name = "nv_inference_first_response_histogram_ms"
        return (
            f"{name}_count{{{labels}}} {fast + slow}\n"
            f"{name}_sum{{{labels}}} {fast * 50 + slow * 4000}\n"
            f'{name}_bucket{{{labels},le="100"}} {fast}\n'
            f'{name}_bucket{{{labels},le="5000"}} {fast + slow}\n'
            f'{name}_bucket{{{labels},le="+Inf"}} {fast + slow}\n'
        )

    general = "nv_trt_llm_general_metrics"
    return (
        "# TYPE nv_inference_request_success counter\n"
        f'nv_inference_request_success{{model="llama_a",version="1"}} {a_fast}\n'
        f'nv_inference_request_success{{model="llama_b",version="1"}} {b_fast + b_slow}\n'
        "# TYPE nv_inference_first_response_histogram_ms histogram\n"
        + first_response("llama_a", a_fast, 0)
        + first_response("llama_b", b_fast, b_slow)
        + f"# TYPE {general} gauge\n"
        + f'{general}{{general_type="iteration_counter",model="llama_a",version="1"}} '
        + f"{iterations}\n"
        + f'{general}{{general_type="iteration_counter",model="llama_b",version="1"}} '
        + f"{iterations}\n"
    ).encode()


def test_triton_reads_one_model_at_both_ends_of_a_window() -> None:
    """The lifetime counts cross (5000 > 4999, 5010 < 5011, 5025 > 5020): chosen by them, the
    window of each flip held the other model's whole history (p95 3.6 s, 5011 requests)."""
    replay = Replay(
        [
            (_triton_two_models(1000, a_fast=5000, b_fast=4099, b_slow=900), {}),
            (_triton_two_models(1050, a_fast=5010, b_fast=4111, b_slow=900), {}),
            (_triton_two_models(1100, a_fast=5025, b_fast=4120, b_slow=900), {}),
        ]
    )
    source = make_source(ServerConfig(name="t", url="http://h/metrics", kind="triton"), replay)
    source.poll(T0)
    flip, back = source.poll(T0 + 1), source.poll(T0 + 2)
    # The model with the most first responses in each window: llama_b (12), then llama_a (15).
    assert flip.finished_requests == 12 and back.finished_requests == 15
    for s in (flip, back):
        assert s.ttft_mean_s == pytest.approx(0.05)
        assert s.ttft_q_s is not None and s.ttft_q_s < 0.1


def test_generic_kind_from_config() -> None:
    generic = GenericMetricsConfig(
        generation_tokens="myllm_output_tokens_total",
        prompt_tokens="myllm_input_tokens",
        running="myllm_active_requests",
        waiting="myllm_queued_requests",
        ttft_histogram="myllm_first_token_seconds",
        labels={"pool": "prod"},
        realtime=False,
    )
    _, s = pair("generic", kind="generic", generic=generic)
    assert s.kind == "generic" and not s.realtime
    # The canary series (7 -> 999) is filtered out by the label selector.
    assert s.generation_tokens_per_s == pytest.approx((900 + 300) / 2)
    assert s.prompt_tokens_per_s == pytest.approx(2000 / 2)
    assert s.running == 6 + 1 and s.waiting == 0
    assert s.ttft_q_s == pytest.approx(interp(0.5, 1.0, 0.95 * 10, 6, 4))
    assert s.ttft_mean_s == pytest.approx(2.5 / 10)
    assert s.model_name == "qwen2.5-7b"


def test_generic_gauge_rate() -> None:
    generic = GenericMetricsConfig(generation_tokens="tps", generation_tokens_type="gauge")
    replay = Replay([(b"tps 40\n", {}), (b"tps 55.5\n", {})])
    cfg = ServerConfig(name="g", url="http://h/m", kind="generic", generic=generic)
    source = make_source(cfg, replay)
    assert source.poll(T0).generation_tokens_per_s is None
    assert source.poll(T1).generation_tokens_per_s == 55.5


def test_generic_reads_untyped_samples_after_another_family() -> None:
    """A hand-rolled exporter types its process counter and leaves its own figures untyped
    after it: they are new untyped families, not lines of the typed one."""
    generic = GenericMetricsConfig(generation_tokens="tokens_out", running="busy")
    head = b"# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total 3\n"
    replay = Replay(
        [(head + b"tokens_out 100\nbusy 2\n", {}), (head + b"tokens_out 300\nbusy 3\n", {})]
    )
    cfg = ServerConfig(name="g", url="http://h/m", kind="generic", generic=generic)
    source = make_source(cfg, replay)
    assert source.poll(T0).up
    s = source.poll(T1)
    assert s.up and s.generation_tokens_per_s == pytest.approx(100.0) and s.running == 3


def test_generic_missing_metric_is_a_clear_error() -> None:
    generic = GenericMetricsConfig(generation_tokens="nope_total")
    replay = Replay([(b"other 1\n", {})])
    cfg = ServerConfig(name="g", url="http://h/m", kind="generic", generic=generic)
    s = make_source(cfg, replay).poll(T0)
    assert not s.up
    assert s.error == "http://h/m has no nope_total (check generic.generation_tokens)"


@pytest.mark.parametrize(
    ("fixture", "kind"),
    [
        ("vllm_v1_a.txt", "vllm"),
        ("vllm_openmetrics_a.txt", "vllm"),
        ("vllm_v0_a.txt", "vllm"),
        ("vllm_restart_b.txt", "vllm"),
        ("sglang_a.txt", "sglang"),
        ("sglang_old_a.txt", "sglang"),
        ("tgi_a.txt", "tgi"),
        ("llamacpp_a.txt", "llamacpp"),
        ("triton_a.txt", "triton"),
        ("nim_a.txt", "nim"),
        ("lmdeploy_a.txt", "lmdeploy"),
        ("trtllm_a.txt", "trtllm"),
    ],
)
def test_detect_kind(fixture: str, kind: str) -> None:
    assert detect_kind(load(fixture)[0]) == kind


def test_detect_kind_errors() -> None:
    with pytest.raises(SourceError, match="not a Prometheus exposition: line 1"):
        detect_kind(b"<!DOCTYPE html><html></html>")
    with pytest.raises(SourceError, match="no metrics of a known inference server"):
        detect_kind(load("generic_a.txt")[0])
    with pytest.raises(SourceError, match="serves no metrics yet"):
        detect_kind(b"# nothing here\n")
    # An early trtllm-serve: a TTFT histogram under vLLM's unprefixed name and no token counter
    # (which NIM always has).
    with pytest.raises(SourceError, match="early trtllm-serve, which exports no token counter"):
        detect_kind(b'time_to_first_token_seconds_count{model_name="m"} 5\n')


def test_detect_kind_keys_on_the_servers_families_past_a_bad_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A third-party collector's malformed line in the same exposition does not hide the
    server's own families: the kind is found and the line logged, and the source reads the body
    as it would with that kind configured. The per-tick read stays strict where it reads."""
    good, _ = load("vllm_v1_a.txt")
    junk = b'# TYPE thirdparty_queue_depth gauge\nthirdparty_queue_depth{queue="a} 3\n'
    body = good + junk
    with caplog.at_level("WARNING", logger="powerd.sources.detect"):
        assert detect_kind(body, url="http://h/metrics") == "vllm"
    assert "http://h/metrics reads as kind vllm" in caplog.text
    assert "line 326: malformed labels" in caplog.text
    replay = Replay([(body, {}), (load("vllm_v1_b.txt")[0] + junk, {}), (b"<html>\n", {})])
    source = make_source(ServerConfig(name="v", url="http://h/metrics"), replay)
    first, second = source.poll(T0), source.poll(T1)
    assert first.up and second.up and source.kind == "vllm"
    assert second.generation_tokens_per_s is not None
    garbage = source.poll(T1 + 1.0)
    assert not garbage.up
    assert garbage.error == (
        "http://h/metrics is not a Prometheus exposition: line 1: not a sample, comment or blank "
        "line: '<html>'"
    )
    # A bad line in a family the kind reads fails the read, naming the line.
    own = good.replace(b"vllm:num_requests_running{", b"vllm:num_requests_running{x=", 1)
    source = make_source(ServerConfig(name="v", url="http://h/metrics"), Replay([(own, {})]))
    bad = source.poll(T0)
    assert not bad.up and source.kind == "vllm"
    assert bad.error is not None and "malformed labels: 'vllm:num_requests_running{x=" in bad.error
    # Without a known family, the bad line is the error, as before.
    with pytest.raises(SourceError, match="not a Prometheus exposition: line 3: malformed"):
        detect_kind(b"myllm_tokens 5\n" + junk)


def test_triton_vllm_backend_is_vllm() -> None:
    body = (
        b'nv_inference_count{model="vllm_model",version="1"} 5\n'
        b'vllm:generation_tokens_total{model="vllm_model",version="1"} 10\n'
    )
    assert detect_kind(body) == "vllm"


def test_auto_resolves_kind_on_first_scrape() -> None:
    replay = Replay([load("sglang_a.txt"), load("sglang_b.txt")])
    source = make_source(ServerConfig(name="a", url="http://h:30000/metrics"), replay)
    assert source.kind == "auto"
    source.poll(T0)
    assert source.kind == "sglang"
    assert source.poll(T1).generation_tokens_per_s == pytest.approx(800.0)


def test_wrong_kind_is_reported() -> None:
    replay = Replay([load("tgi_a.txt")])
    s = make_source(ServerConfig(name="w", url="http://h/metrics", kind="vllm"), replay).poll(T0)
    assert not s.up
    assert s.error == "http://h/metrics has no vllm:generation_tokens_total (is it a vLLM server?)"


def test_slowest_bucket_mean_places_a_lone_slow_request_by_the_sum() -> None:
    from powerd.sources.base import histogram_quantile, slowest_bucket_mean

    # Nine first tokens in (0.08, 0.1] and one at 1.2 s, in vLLM's wide (1.0, 2.5] bucket.
    buckets = [(0.08, 0.0), (0.1, 9.0), (1.0, 9.0), (2.5, 10.0), (math.inf, 10.0)]
    assert slowest_bucket_mean(9 * 0.09 + 1.2, buckets) == pytest.approx(1.2)
    # The p95 rank (9.5 of 10) reads the same request halfway up the bucket, past 1.7 s.
    assert histogram_quantile(0.95, buckets) == pytest.approx(1.75)
    # Clamped to the bucket's bounds when the midpoints misplace the rest.
    assert slowest_bucket_mean(9 * 0.1 + 0.5, buckets) == pytest.approx(1.0)
    assert slowest_bucket_mean(9 * 0.09 + 9.0, buckets) == pytest.approx(2.5)
    # Two in the +Inf bucket share what is left; never below its lower bound.
    inf_top = [(1.0, 3.0), (2.5, 3.0), (math.inf, 5.0)]
    assert slowest_bucket_mean(3 * 0.5 + 2 * 4.0, inf_top) == pytest.approx(4.0)
    assert slowest_bucket_mean(1.0, inf_top) == pytest.approx(2.5)
    assert slowest_bucket_mean(0.0, [(1.0, 0.0), (math.inf, 0.0)]) is None


def test_sample_carries_the_slowest_first_token_estimate() -> None:
    _, s = pair("vllm_v1")
    assert s.ttft_slowest_s is not None
    assert s.ttft_mean_s is not None
    assert s.ttft_mean_s <= s.ttft_slowest_s


def test_token_weighted_mean_of_a_prompt_length_histogram() -> None:
    from powerd.sources.base import token_weighted_mean

    # Ten prompts spread evenly over (1000, 2000]: E[P^2]/E[P] = (7/3 M) / 1500.
    even = [(1000.0, 0.0), (2000.0, 10.0), (math.inf, 10.0)]
    assert token_weighted_mean(15_000.0, even) == pytest.approx(7e6 / 3 / 1500)
    # Ninety short prompts and ten of 10,000 tokens in the +Inf bucket (placed by the sum): the
    # tail lifts the figure far past the 1450-token mean, to within 1 % of the exact 7052.
    tail = [(1000.0, 90.0), (math.inf, 100.0)]
    weighted = token_weighted_mean(90 * 500.0 + 10 * 10_000.0, tail)
    assert weighted is not None and weighted > 4 * 1450
    assert weighted == pytest.approx((90 * 500.0**2 + 10 * 1e8) / 145_000, rel=0.01)
    assert token_weighted_mean(0.0, [(1000.0, 0.0), (math.inf, 0.0)]) is None


def test_decaying_histogram_halves_old_observations_every_half_life() -> None:
    from powerd.sources.base import DecayingHistogram

    mix = DecayingHistogram(half_life_s=300.0)
    mix.add(1.0, 40.0, 40_000.0, {1000.0: 40.0, math.inf: 40.0})
    mix.add(300.0, 10.0, 50_000.0, {1000.0: 0.0, math.inf: 10.0})
    assert mix.count == pytest.approx(30.0)
    assert mix.sum == pytest.approx(70_000.0)
    assert mix.buckets == pytest.approx({1000.0: 20.0, math.inf: 30.0})
    # A garbage window (NaN sum) is skipped, not carried forever.
    mix.add(1.0, 5.0, math.nan, {math.inf: 5.0})
    assert mix.count == pytest.approx(30.0) and mix.sum == pytest.approx(70_000.0)


@pytest.mark.parametrize("kind", ["vllm", "nim", "lmdeploy", "tgi", "sglang"])
def test_prompt_mix_from_the_simulated_server(kind: str) -> None:
    """A simulated server's prompt-length histogram (request_prompt_tokens, TGI's
    tgi_request_input_length, SGLang's prompt_tokens_histogram), read through a Source, gives
    the finished requests' E[P^2]/E[P] within the bucket approximation."""
    import numpy as np

    from powerd.sim.buckets import histogram_bounds
    from powerd.sim.engine import EngineBank
    from powerd.sim.exposition import render_metrics
    from powerd.sim.models import get_model_profile
    from powerd.sim.plant import load_gpu_profile

    bank = EngineBank(
        load_gpu_profile("h100-sxm"),
        get_model_profile("llama-3.1-8b"),
        1,
        1,
        hist_bounds=histogram_bounds(kind),
        seed=3,
    )
    rng = np.random.default_rng(1)
    t = np.sort(rng.uniform(0.0, 8.0, 200))
    bank.feed(t, rng.integers(50, 4000, t.size), rng.integers(5, 100, t.size))

    def scrape_at(until_s: float) -> tuple[bytes, Mapping[str, str]]:
        while bank.now_s < until_s - 1e-9:
            bank.run_until(min(bank.now_s + 0.05, until_s), 1980.0)
        body, _type, headers = render_metrics(bank.snapshot(0), kind, "m")
        return body, headers

    bodies = [scrape_at(0.5)]
    done_before = len(bank.finished_requests())
    bodies.append(scrape_at(10.0))
    prompts = bank.finished_requests()["prompt_tokens"][done_before:].astype(float)
    assert prompts.size >= 100
    cfg = ServerConfig(name="v", url="http://127.0.0.1:8000/metrics", kind=kind)
    source = make_source(cfg, Replay(bodies))
    assert source.poll(T0).prompt_tokens_weighted_mean is None
    sample = source.poll(T1)
    exact = float((prompts**2).sum() / prompts.sum())
    assert sample.prompt_tokens_weighted_mean == pytest.approx(exact, rel=0.1)
