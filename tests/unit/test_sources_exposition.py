"""The selective exposition parser: both formats, odd but legal lines, clear errors."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from powerd.sources.exposition import (
    ExpositionError,
    Wanted,
    parse_exposition,
    parse_labels,
    scan_names,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "sources"


def values(samples: dict, name: str) -> dict[tuple, float]:
    return {key: value for (_labels, key, _le), value in samples[name]}


def test_text_format_counter_gauge_histogram() -> None:
    body = b"""# HELP x_total Things.
# TYPE x_total counter
x_total{a="1"} 3
x_total{a="2"} 4.5e+02
# TYPE g gauge
g 7
# TYPE h histogram
h_bucket{le="0.1"} 1
h_bucket{le="+Inf"} 2
h_sum 0.3
h_count 2
"""
    samples = parse_exposition(body)
    assert values(samples, "x_total") == {(("a", "1"),): 3.0, (("a", "2"),): 450.0}
    assert values(samples, "g") == {(): 7.0}
    les = [le for (_l, _k, le), _v in samples["h_bucket"]]
    assert les == [0.1, math.inf]
    assert all(key == () for (_l, key, _le), _v in samples["h_bucket"])


def test_openmetrics_family_without_total_and_eof() -> None:
    body = b"""# TYPE c counter
# HELP c Things.
c_total 5.0
c_created 1.7e9
# EOF
c_total 99
"""
    samples = parse_exposition(body, Wanted.of(["c_total", "c_created"]))
    assert values(samples, "c_total") == {(): 5.0}
    assert values(samples, "c_created") == {(): 1.7e9}


def test_wanted_skips_other_families_and_unwanted_names() -> None:
    body = b"""# TYPE junk gauge
junk{this is not parsed at all
# TYPE keep gauge
keep 1
"""
    samples = parse_exposition(body, Wanted.of(["keep"]))
    assert set(samples) == {"keep"}
    with pytest.raises(ExpositionError, match="line 2"):
        parse_exposition(body)


def test_untyped_sample_after_a_skipped_family_is_read() -> None:
    """A sample whose name does not belong to the current `# TYPE` family starts a new untyped
    family (a hand-rolled exporter read with kind: generic), whether or not the family before
    it is read."""
    body = b"# TYPE foo_total counter\nfoo_total 3\nbar_requests 7\n"
    for wanted in (["bar_requests"], ["foo_total", "bar_requests"]):
        samples = parse_exposition(body, Wanted.of(wanted))
        assert values(samples, "bar_requests") == {(): 7.0}
    assert "bar_requests" in parse_exposition(body.rstrip(), Wanted.of(["bar_requests"]))
    odd = [
        # after HELP lines, and with the skipped family's histogram lines around it
        b'# HELP h x\n# TYPE h histogram\nh_bucket{le="+Inf"} 1\n# HELP bar_requests y\n'
        b"bar_requests 7\nh_sum 1\nh_count 1\n",
        # a name that starts with the skipped family's name
        b"# TYPE bar gauge\nbar 1\nbar_requests 7\n",
        # CRLF, and a `# TYPE` line with two spaces or no type
        b"# TYPE foo gauge\r\nfoo 1\r\n\r\nbar_requests 7\r\n",
        b"# TYPE  bar_requests gauge\nbar_requests 7\n",
        b"# TYPE bar_requests\nbar_requests 7\n",
    ]
    for text in odd:
        assert values(parse_exposition(text, Wanted.of(["bar_requests"])), "bar_requests") == {
            (): 7.0
        }, text
    # The skipped family's own lines stay unread; a line naming a wanted sample is strict.
    junk = b"# TYPE junk gauge\njunk{not parsed\nbar_requests 7\n"
    assert set(parse_exposition(junk, Wanted.of(["bar_requests"]))) == {"bar_requests"}
    bad = body.replace(b"bar_requests 7", b'bar_requests{a="1} 7')
    with pytest.raises(ExpositionError, match="line 3: malformed labels"):
        parse_exposition(bad, Wanted.of(["bar_requests"]))
    # Past `# EOF`, nothing is read.
    ended = b"# TYPE foo gauge\nfoo 1\n# EOF\nbar_requests 7\n"
    assert parse_exposition(ended, Wanted.of(["bar_requests"])) == {}


_NAMES = ["a", "a_total", "a_b", "ab", "b", "b_bucket", "b_sum", "b_count", "c"]


@st.composite
def _expositions(draw: st.DrawFn) -> str:
    """Well-formed bodies whose samples often do not belong to the `# TYPE` family above."""
    lines = []
    for _ in range(draw(st.integers(0, 6))):
        family = draw(st.sampled_from([None, *_NAMES]))
        if family is not None:
            if draw(st.booleans()):
                lines.append(f"# HELP {family} doc")
            lines.append(f"# TYPE {family} {draw(st.sampled_from(['gauge', 'counter']))}")
        for _ in range(draw(st.integers(0, 4))):
            name = draw(st.sampled_from(_NAMES))
            label = draw(st.sampled_from(["", '{x="1"}', '{x="2",y="}"}']))
            if name.endswith("_bucket"):
                label = '{le="0.5"}'
            lines.append(f"{name}{label} {draw(st.integers(0, 9))}")
            if draw(st.integers(0, 5)) == 0:
                lines.append("")
    return "\n".join(lines) + draw(st.sampled_from(["", "\n"]))


@settings(max_examples=400, deadline=None)
@given(_expositions(), st.sets(st.sampled_from(_NAMES), min_size=1))
def test_selective_parse_reads_what_a_full_parse_reads(text: str, wanted: set[str]) -> None:
    full = parse_exposition(text)
    selective = parse_exposition(text, Wanted.of(wanted))
    assert selective == {name: rows for name, rows in full.items() if name in wanted}


def test_buckets_of_a_histogram_read_for_its_sum_are_skipped() -> None:
    body = b"""# TYPE h histogram
h_bucket{le="1"} 2
h_bucket{le="not parsed"
h_bucket{le="+Inf"} 3
h_sum 4.5
h_count 3
"""
    samples = parse_exposition(body, Wanted.of(["h_sum", "h_count"]))
    assert set(samples) == {"h_sum", "h_count"}
    assert samples["h_sum"][0][1] == 4.5
    # Read for its buckets, the same histogram is parsed line by line.
    with pytest.raises(ExpositionError, match="line 3"):
        parse_exposition(body, Wanted.of(["h_bucket", "h_sum"]))
    bad_sum = body.replace(b"h_sum 4.5", b"h_sum{ 4.5")
    with pytest.raises(ExpositionError, match="line 5"):
        parse_exposition(bad_sum, Wanted.of(["h_sum"]))


def test_escaped_label_values_braces_and_spaces() -> None:
    body = (
        'm{path="C:\\\\dir",quote="say \\"hi\\"",nl="a\\nb",brace="}{",space="a b"} 1\n'
        'm{trailing="comma",} 2\n'
    )
    samples = parse_exposition(body)
    labels = [lab for (lab, _k, _le), _v in samples["m"]]
    assert labels[0] == {
        "path": "C:\\dir",
        "quote": 'say "hi"',
        "nl": "a\nb",
        "brace": "}{",
        "space": "a b",
    }
    assert labels[1] == {"trailing": "comma"}


def test_nan_inf_timestamps_exemplars_crlf_and_whitespace() -> None:
    body = (
        "a NaN\r\n"
        "b +Inf 1700000000000\r\n"
        "c -Inf\n"
        'd_bucket{le="1"} 4 # {trace_id="abc"} 0.5 1700000000.1\n'
        "e\t\t2\n"
        "\n"
        "   \n"
    )
    samples = parse_exposition(body)
    assert math.isnan(values(samples, "a")[()])
    assert values(samples, "b")[()] == math.inf
    assert values(samples, "c")[()] == -math.inf
    assert samples["d_bucket"][0][1] == 4.0
    assert values(samples, "e")[()] == 2.0


@pytest.mark.parametrize(
    ("body", "line", "why"),
    [
        (b"ok 1\nok 2\n<html><body>502</body></html>\n", 3, "not a sample"),
        (b'# TYPE m gauge\nm{a="1} 2\n', 2, "malformed labels"),
        (b"ok 1\nbad_value one\n", 2, "value is not a number"),
        (b'm{le="x"} 1\n', 1, "malformed labels"),
        (b'm{1a="x"} 1\n', 1, ""),
        (b"ok 1\x00\n", 1, "NUL"),
    ],
)
def test_errors_name_the_line(body: bytes, line: int, why: str) -> None:
    with pytest.raises(ExpositionError, match=f"line {line}: {why}"):
        parse_exposition(body)


def test_json_error_body_is_rejected() -> None:
    with pytest.raises(ExpositionError, match="line 1"):
        parse_exposition(
            b'{"error": {"code": 501, "message": "This server does not support metrics"}}'
        )


def test_parse_labels_rejects_garbage() -> None:
    assert parse_labels('a="1",b="2"') == {"a": "1", "b": "2"}
    assert parse_labels('a="1" junk') is None
    assert parse_labels('a="unterminated') is None


def test_label_cache_is_reused_and_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    import powerd.sources.exposition as exposition

    cache: dict = {}
    body = "".join(f'm{{i="{i}"}} {i}\n' for i in range(50))
    first = parse_exposition(body, cache=cache)
    assert len(cache) == 50
    second = parse_exposition(body, cache=cache)
    assert first["m"][7][0] is second["m"][7][0]
    monkeypatch.setattr(exposition, "MAX_LABEL_CACHE", 10)
    other = "".join(f'm{{j="{i}"}} {i}\n' for i in range(50))
    assert len(parse_exposition(other, cache=cache)["m"]) == 50
    assert len(cache) <= 10


def test_a_label_that_keeps_changing_neither_grows_the_cache_nor_evicts_the_current_labels(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import powerd.sources.exposition as exposition

    real = (FIXTURES / "vllm_v1_a.txt").read_text()
    served = "meta-llama/Llama-3.1-8B-Instruct"
    cache: dict = {}
    for restart in range(200):  # a served-model name that changes at every restart
        parse_exposition(real.replace(served, f"model-{restart}"), cache=cache)
    assert len(cache) <= 8192, "a few thousand entries at most, not one set per restart"
    parsed: list[str] = []

    def counting(raw: str) -> dict[str, str] | None:
        parsed.append(raw)
        return parse_labels(raw)

    monkeypatch.setattr(exposition, "parse_labels", counting)
    parse_exposition(real.replace(served, "model-199"), cache=cache)
    assert parsed == [], "the current scrape's labels are all still cached"


@pytest.mark.parametrize("path", sorted(FIXTURES.glob("*.txt")), ids=lambda p: p.name)
def test_fixtures_agree_with_prometheus_client(path: Path) -> None:
    """Every sample of every fixture parses to prometheus_client's own reading of it.

    prometheus_client appends `_total` to counters written without it (TGI's style), so names
    are compared without that suffix.
    """
    text = path.read_text()
    ours = parse_exposition(text)
    theirs: dict[tuple[str, tuple], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            theirs[(s.name.removesuffix("_total"), tuple(sorted(s.labels.items())))] = s.value
    mine = {
        (name.removesuffix("_total"), tuple(sorted(labels.items()))): value
        for name, rows in ours.items()
        for (labels, _key, _le), value in rows
    }
    assert mine.keys() == theirs.keys()
    for key, value in mine.items():
        assert value == theirs[key] or (math.isnan(value) and math.isnan(theirs[key]))


def test_scan_names_checks_every_line_and_keeps_the_good_ones() -> None:
    assert scan_names(b"# TYPE a gauge\na 1\nb 2\n") == ({"a", "b"}, None)
    names, bad = scan_names(b"# TYPE a gauge\na 1\n# TYPE b gauge\nb two\nc{ 3\nd 4\n")
    assert names == {"a", "d"}
    assert str(bad) == "line 4: value is not a number: 'b two'"
    assert scan_names(b"a 1\n# EOF\nb{ 2\n") == ({"a"}, None)
    names, bad = scan_names(b"a 1\n\x00")
    assert names == set() and str(bad) == "line 2: NUL byte"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_arbitrary_bytes_raise_only_exposition_errors(body: bytes) -> None:
    with contextlib.suppress(ExpositionError):
        parse_exposition(body)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from('ab_:{}="\\ ,#\n\t+-.0123456789eINfa'), max_size=200))
def test_exposition_like_text_raises_only_exposition_errors(text: str) -> None:
    try:
        samples = parse_exposition(text, Wanted.of(["a", "a_total", "b_bucket"]))
    except ExpositionError:
        return
    for rows in samples.values():
        for (labels, key, _le), value in rows:
            assert isinstance(value, float)
            assert isinstance(labels, dict)
            assert isinstance(key, tuple)
