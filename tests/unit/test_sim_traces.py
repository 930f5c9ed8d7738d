"""Arrival streams: the Azure trace, rate and time scaling, synthetic patterns, sizing."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from powerd.sim import traces
from powerd.sim.models import get_model_profile
from powerd.sim.plant import load_gpu_profile
from powerd.sim.traces import (
    Arrivals,
    capacity_tokens_per_s,
    compress_time,
    find_trace_file,
    load_azure_trace,
    resolve_trace,
    scale_for_peak_load,
    scale_rate,
    service_costs,
    split_arrivals,
    synthetic,
    tile,
    window_loads,
)

H100 = load_gpu_profile("h100-sxm")
LLAMA_8B = get_model_profile("llama-3.1-8b")

SAMPLE = """TIMESTAMP,ContextTokens,GeneratedTokens
2023-11-16 18:15:46.6805900,374,44
2023-11-16 18:15:50.9951690,396,109
2023-11-16 18:15:51.2224670,879,55
2023-11-16 18:16:51.2224670,10,1
"""


@pytest.fixture
def sample_csv(tmp_path: Path) -> Path:
    path = tmp_path / "azure_conv_2023.csv"
    path.write_text(SAMPLE)
    return path


def test_parses_datetimes_to_seconds_from_the_first(sample_csv: Path) -> None:
    a = load_azure_trace(sample_csv)
    assert len(a) == 4
    np.testing.assert_allclose(a.time_s, [0.0, 4.314579, 4.541877, 64.541877], atol=1e-9)
    assert a.prompt_tokens.tolist() == [374, 396, 879, 10]
    assert a.gen_tokens.tolist() == [44, 109, 55, 1]
    # One mean gap past the last request.
    assert a.duration_s == pytest.approx(64.541877 * 4 / 3)


def test_real_azure_trace() -> None:
    path = find_trace_file()
    if path is None:
        pytest.skip("the Azure conversation trace is not available here")
    a = load_azure_trace(path)
    assert len(a) == 19366
    assert a.time_s[0] == 0.0
    assert a.time_s[-1] == pytest.approx(3501.72, abs=0.01)
    assert (a.prompt_tokens[0], a.gen_tokens[0]) == (374, 44)
    assert np.median(a.prompt_tokens) == 1020 and np.median(a.gen_tokens) == 129
    half = load_azure_trace(path, rate_scale=0.5, time_compression=60.0)
    assert len(half) == 19366 // 2
    assert half.time_s[-1] == pytest.approx(3501.72 / 60.0, abs=0.5)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("time,a,b\n1,2,3\n", "header"),
        ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.68,x,3\n", "line 2"),
        ("TIMESTAMP,ContextTokens,GeneratedTokens\nyesterday,1,3\n", "TIMESTAMP"),
        ("TIMESTAMP,ContextTokens,GeneratedTokens\n", "no requests"),
        ("", "empty"),
    ],
)
def test_bad_trace_files_get_a_clear_error(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_azure_trace(path)


HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            (SAMPLE + "2023-11-16 18:17:00,1\xe9,3\n").encode("latin-1"),
            ": not UTF-8 (byte 0xe9 on line 6)",
        ),
        (
            (SAMPLE + "2023-11-16 18:17:00,-5,3\n").encode(),
            ", line 6: a negative token count in ['2023-11-16 18:17:00', '-5', '3']",
        ),
        (
            (SAMPLE + "2023-11-16 18:17:00,1" + "0" * 20 + ",3\n").encode(),
            ", line 6: cannot read",
        ),
        (
            (SAMPLE + ",5,3\n").encode(),
            ", line 6: TIMESTAMP '' is not a date and time in the years 1678-2261 (such as",
        ),
        (
            (SAMPLE + "2300-01-01 00:00:00,5,3\n").encode(),
            ", line 6: TIMESTAMP '2300-01-01 00:00:00' is not a date and time in the years",
        ),
        (
            (SAMPLE + "1500-01-01 00:00:00+02:00,5,3\n").encode(),
            ", line 6: TIMESTAMP '1500-01-01 00:00:00+02:00' is not a date and time in the",
        ),
        (
            (SAMPLE + "2023-11-16T18:17:00+0x:00,5,3\n").encode(),
            ", line 6: TIMESTAMP '2023-11-16T18:17:00+0x:00' is not a date and time",
        ),
        (
            (HEADER + "2023-11-16 18:15:46.68,5,3\n").encode(),
            ": no time passes between its first and last request (1 request at 2023-11-16 "
            "18:15:46.68); a replay needs",
        ),
    ],
    ids=[
        "not-utf8",
        "negative",
        "overflow",
        "no-time",
        "past-ns-range",
        "past-ns-range-zoned",
        "bad-zone",
        "one-instant",
    ],
)
def test_a_bad_row_names_the_file_and_line(tmp_path: Path, content: bytes, message: str) -> None:
    """One sentence naming the file (and the line), never a numpy warning or an error that
    names neither; a negative count is refused rather than counted as one token, and a time
    numpy would wrap into another century rather than replayed there."""
    path = tmp_path / "trace.csv"
    path.write_bytes(content)
    with pytest.raises(ValueError) as info:
        load_azure_trace(path)
    assert str(info.value).startswith(f"trace {path}{message}")


def test_a_bad_record_is_named_by_the_line_it_starts_on(tmp_path: Path) -> None:
    """A quoted field may run over lines: the error names where its record begins."""
    path = tmp_path / "trace.csv"
    path.write_text(SAMPLE + '"2023-11-16\n18:17:00",x,3\n')
    with pytest.raises(ValueError, match=r", line 6: cannot read"):
        load_azure_trace(path)


def test_times_with_a_utc_offset_are_read_as_utc(tmp_path: Path) -> None:
    """The Azure traces of 2024 write +00:00 after each time; other offsets, Z and times
    without one (UTC) mix in one file, each placed on the UTC time line."""
    path = tmp_path / "zoned.csv"
    path.write_text(
        HEADER
        + "2024-05-10 00:00:00.009930+00:00,100,20\n"
        + "2024-05-10T02:00:01+02:00,200,30\n"
        + "2024-05-10 00:00:02.5Z,300,40\n"
        + "2024-05-09 19:00:04-0500,400,50\n"
        + "2024-05-10 00:00:05,500,60\n"
    )
    arrivals = load_azure_trace(path)
    np.testing.assert_allclose(arrivals.time_s, [0.0, 0.99007, 2.49007, 3.99007, 4.99007])
    np.testing.assert_array_equal(arrivals.prompt_tokens, [100, 200, 300, 400, 500])
    for offset in ("+24:00", "+01:75"):
        path.write_text(
            HEADER + "2024-05-10 00:00:00+00:00,1,1\n" + f"2024-05-10 00:00:01{offset},1,1\n"
        )
        with pytest.raises(ValueError, match=f"line 3: TIMESTAMP '2024-05-10 00:00:01\\{offset}'"):
            load_azure_trace(path)


def test_a_spreadsheet_export_reads_as_the_plain_file(tmp_path: Path, sample_csv: Path) -> None:
    """A byte-order mark, Windows line ends and blank lines at the end are how spreadsheets
    save a CSV; they change nothing."""
    path = tmp_path / "exported.csv"
    path.write_bytes(b"\xef\xbb\xbf" + SAMPLE.replace("\n", "\r\n").encode() + b"\r\n,,\r\n")
    exported, plain = load_azure_trace(path), load_azure_trace(sample_csv)
    np.testing.assert_array_equal(exported.time_s, plain.time_s)
    np.testing.assert_array_equal(exported.prompt_tokens, plain.prompt_tokens)


def test_missing_file_is_a_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read trace"):
        load_azure_trace(tmp_path / "nope.csv")


@pytest.mark.parametrize("k", [0.25, 0.5, 1.0, 2.0, 3.7])
def test_rate_scale_thins_or_replicates_exactly(k: float) -> None:
    base = synthetic("constant", duration_s=600.0, mean_rate_per_s=10.0, seed=1)
    scaled = scale_rate(base, k)
    assert len(scaled) == int(np.floor(len(base) * k + 1e-9))
    assert np.all(np.diff(scaled.time_s) >= 0)
    assert scaled.duration_s == base.duration_s
    assert scaled.prompt_tokens.mean() == pytest.approx(base.prompt_tokens.mean(), rel=0.1)
    # Evenly spread: every minute scales by about k.
    per_min_base = np.bincount((base.time_s // 60).astype(int), minlength=10)
    per_min = np.bincount((scaled.time_s // 60).astype(int), minlength=10)
    np.testing.assert_allclose(per_min, per_min_base * k, atol=2 + k)
    assert scale_rate(base, k).time_s.tolist() == scaled.time_s.tolist()


def test_time_compression_divides_times() -> None:
    base = synthetic("diurnal", duration_s=3600.0, seed=2)
    fast = compress_time(base, 60.0)
    np.testing.assert_allclose(fast.time_s, base.time_s / 60.0)
    assert fast.duration_s == pytest.approx(60.0)
    assert fast.mean_rate_per_s == pytest.approx(base.mean_rate_per_s * 60.0)
    with pytest.raises(ValueError, match="time_compression"):
        compress_time(base, 0.0)


def test_synthetic_patterns_follow_their_shape() -> None:
    d = 3600.0
    counts = {}
    for pattern in traces.SYNTHETIC_PATTERNS:
        a = synthetic(pattern, duration_s=d, mean_rate_per_s=20.0, seed=5)
        counts[pattern] = a
        assert len(a) == pytest.approx(20.0 * d, rel=0.05)
        np.testing.assert_array_equal(
            a.time_s, synthetic(pattern, duration_s=d, mean_rate_per_s=20.0, seed=5).time_s
        )
    diurnal = counts["diurnal"].time_s
    assert np.sum((diurnal > 0.4 * d) & (diurnal < 0.6 * d)) > 2.5 * np.sum(diurnal < 0.2 * d)
    step = counts["step"].time_s
    assert np.sum((step > d / 3) & (step < 2 * d / 3)) > 2 * np.sum(step < d / 3)
    burst = counts["burst"].time_s
    in_burst = np.mod(burst, 600.0) >= 540.0
    assert in_burst.sum() / 60.0 > 2.5 * (~in_burst).sum() / 540.0
    a = counts["constant"]
    assert np.median(a.prompt_tokens) == pytest.approx(traces.PROMPT_MEDIAN_TOKENS, rel=0.05)
    assert np.median(a.gen_tokens) == pytest.approx(traces.GEN_MEDIAN_TOKENS, rel=0.05)
    with pytest.raises(ValueError, match="unknown load pattern"):
        synthetic("sawtooth")


def test_resolve_finds_the_trace_through_the_env(
    sample_csv: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(traces.TRACE_DIR_ENV, str(sample_csv.parent))
    a = resolve_trace("azure-conv")
    assert len(a) == 4
    b = resolve_trace(str(sample_csv), time_compression=2.0)
    np.testing.assert_allclose(b.time_s, a.time_s / 2.0)


def test_resolve_falls_back_to_diurnal_when_the_trace_is_absent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(traces.TRACE_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(traces, "_repo_root", lambda: tmp_path / "repo")
    with caplog.at_level(logging.INFO, logger="powerd.sim.traces"):
        a = resolve_trace("azure-conv", duration_s=600.0)
    assert a.name == "diurnal"
    assert a.duration_s == 600.0
    assert "diurnal" in caplog.text


def test_resolve_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="neither a file nor"):
        resolve_trace("no-such-trace")


def test_resolve_duration_cuts_or_repeats(sample_csv: Path) -> None:
    a = resolve_trace(str(sample_csv), duration_s=200.0)
    span = load_azure_trace(sample_csv).duration_s
    assert a.duration_s == 200.0
    assert len(a) == 4 * 2 + np.sum(load_azure_trace(sample_csv).time_s + 2 * span < 200.0)
    assert np.all(np.diff(a.time_s) >= 0)
    assert len(tile(a, 10.0)) == 3


def test_split_covers_every_request_once() -> None:
    a = synthetic("constant", duration_s=300.0, mean_rate_per_s=10.0, seed=3)
    for policy in ("round_robin", "least_loaded"):
        parts = split_arrivals(a, 3, policy)
        assert sum(len(p) for p in parts) == len(a)
        merged = np.sort(np.concatenate([p.time_s for p in parts]))
        np.testing.assert_array_equal(merged, a.time_s)
        sizes = [len(p) for p in parts]
        assert max(sizes) - min(sizes) <= (1 if policy == "round_robin" else 0.2 * len(a))
    with pytest.raises(ValueError, match="policy"):
        split_arrivals(a, 2, "random")


def test_capacity_and_peak_load_sizing() -> None:
    costs = service_costs(H100, LLAMA_8B, 1)
    # A prefill token costs 2·params FLOPs at ~60 % of 989 TFLOPS (about 27 µs for 8B); a
    # decode token at a saturated batch costs more, its share of streaming weights and KV.
    assert 0 < costs.prefill_s_per_token < 1e-4
    assert costs.decode_s_per_token > costs.prefill_s_per_token
    cap1 = capacity_tokens_per_s(H100, LLAMA_8B, 1, 1)
    cap4 = capacity_tokens_per_s(H100, LLAMA_8B, 1, 4)
    assert cap4 == pytest.approx(4 * cap1)
    assert 1000 < cap1 < 50000

    base = synthetic("diurnal", duration_s=3600.0, seed=4)
    sized = scale_for_peak_load(base, 0.7, profile=H100, model=LLAMA_8B, tp=1, n_servers=4)
    costs = service_costs(
        H100,
        LLAMA_8B,
        1,
        prompt_tokens_mean=float(base.prompt_tokens.mean()),
        gen_tokens_mean=float(base.gen_tokens.mean()),
    )
    assert window_loads(sized, costs, 4).max() == pytest.approx(0.7, rel=0.05)
    assert len(sized) > len(base)


def test_arrivals_validate() -> None:
    with pytest.raises(ValueError, match="sorted"):
        Arrivals(np.array([1.0, 0.0]), np.array([1, 1]), np.array([1, 1]), 2.0)
    with pytest.raises(ValueError, match="at least one"):
        Arrivals(np.array([0.0]), np.array([0]), np.array([1]), 1.0)
    a = Arrivals(np.array([0.0, 5.0, 9.0]), np.array([1, 2, 3]), np.array([1, 1, 1]), 10.0)
    w = a.window(4.0, 10.0)
    assert w.time_s.tolist() == [1.0, 5.0] and w.duration_s == 6.0
