"""A fast, selective parser for the Prometheus text format 0.0.4 and OpenMetrics 1.0.

A source needs a handful of families out of a scrape that can run to hundreds of kilobytes, so
the parser splits the body at `# TYPE` lines and skips every family it was not asked for, and
the bucket lines of a histogram read only for its sum or count. A skipped family's lines are not
parsed: they are only counted, to find any line that does not start with the family's name. Such
a line is an untyped sample of another family (the text format starts a new family at a sample
whose name does not belong to the current one), and it is read when its name is wanted. The
other lines of the wanted families, any line naming a wanted sample, and any lines before the
first `# TYPE` are parsed strictly: a line that is not a comment, a blank or a well-formed sample
is an error that names the line.

Both formats are accepted as they are found in the wild:
- counters typed with `_total` (prometheus_client text format), without it (OpenMetrics, where
  the family drops the suffix) or with no suffix at all (Rust metrics-exporter-prometheus: TGI);
- `_created` series, `# EOF`, exemplars after ` # `, sample timestamps (ignored);
- escaped label values (`\\\\`, `\\"`, `\\n`), NaN, +Inf and -Inf.
"""

from __future__ import annotations

import math
import re
from bisect import bisect_left
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import islice

SeriesKey = tuple[tuple[str, str], ...]
"""A series' labels, sorted, without `le`."""

LabelInfo = tuple[dict[str, str], SeriesKey, float]
"""(labels, series key without `le`, `le` as a float or NaN when absent). Shared: never mutate."""

Samples = dict[str, list[tuple[LabelInfo, float]]]
"""Sample name -> [(label info, value)], in body order."""

MAX_LABEL_CACHE = 4096
"""Label texts a parse cache keeps. The families a source reads carry about 280 distinct label
texts in a 2,100-line vLLM scrape (3 engines, 2 model names) and at most 138 in the real bodies
of tests/fixtures/sources, so a steady server's texts all stay cached. Texts that keep changing
(a model renamed at each restart) add entries; at the cap the oldest half is dropped, which
keeps a cache under about 4 MiB."""

_NO_LABELS: LabelInfo = ({}, (), math.nan)

# Fast path: label sets without `}` inside a value; the slow pattern handles quoted `}`.
_SAMPLE_FAST = re.compile(
    r"[ \t]*([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{([^}]*)\})?[ \t]+([^ \t\r#]+)"
    r"(?:[ \t]+[^ \t\r#]+)?[ \t\r]*(?:#.*)?$"
)
_NAME = re.compile(r"[ \t]*([a-zA-Z_:][a-zA-Z0-9_:]*)")
_SAMPLE_SLOW = re.compile(
    r'[ \t]*([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{((?:[^"}]|"(?:[^"\\]|\\.)*")*)\})?[ \t]+([^ \t\r#]+)'
    r"(?:[ \t]+[^ \t\r#]+)?[ \t\r]*(?:#.*)?$"
)
_LABELS_FULL = re.compile(
    r'[ \t]*(?:[a-zA-Z_][a-zA-Z0-9_]*[ \t]*=[ \t]*"(?:[^"\\]|\\.)*"[ \t]*(?:,[ \t]*)?)*'
)
_LABEL_PAIR = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)[ \t]*=[ \t]*"((?:[^"\\]|\\.)*)"')
_ESCAPE = re.compile(r"\\(.)")
_ESCAPES = {"n": "\n", "\\": "\\", '"': '"'}
_TYPE_SPLIT = "\n# TYPE "
_SUFFIXES = ("_total", "_bucket", "_sum", "_count", "_created")


class ExpositionError(ValueError):
    """The body is not a Prometheus exposition; the message names the first bad line."""


@dataclass(frozen=True, slots=True)
class Wanted:
    """The sample names a parse keeps, and the `# TYPE` family names that can hold them."""

    samples: frozenset[str]
    families: frozenset[str]
    ordered: tuple[str, ...]
    """The sample names, sorted (to find those that start with a family's name)."""

    @classmethod
    def of(cls, names: Iterable[str]) -> Wanted:
        samples = frozenset(names)
        families = set(samples)
        for name in samples:
            for suffix in _SUFFIXES:
                if name.endswith(suffix):
                    families.add(name[: -len(suffix)])
        return cls(samples, frozenset(families), tuple(sorted(samples)))

    def named_after(self, family: str) -> bool:
        """Whether a wanted sample name starts with `family` (and so is not told from the
        family's own lines by its first characters)."""
        i = bisect_left(self.ordered, family)
        return i < len(self.ordered) and self.ordered[i].startswith(family)


def _unescape(value: str) -> str:
    return _ESCAPE.sub(lambda m: _ESCAPES.get(m.group(1), "\\" + m.group(1)), value)


def parse_labels(raw: str) -> dict[str, str] | None:
    """The label set inside `{...}`, or None when it is malformed."""
    if _LABELS_FULL.fullmatch(raw) is None:
        return None
    if "\\" in raw:
        return {k: _unescape(v) for k, v in _LABEL_PAIR.findall(raw)}
    return dict(_LABEL_PAIR.findall(raw))


def _label_info(raw: str, cache: dict[str, LabelInfo]) -> LabelInfo | None:
    info = cache.get(raw)
    if info is not None:
        return info
    labels = parse_labels(raw)
    if labels is None:
        return None
    le_text = labels.get("le")
    if le_text is None:
        le = math.nan
        key: SeriesKey = tuple(sorted(labels.items()))
    else:
        try:
            le = float(le_text)
        except ValueError:
            return None
        key = tuple(sorted(item for item in labels.items() if item[0] != "le"))
    if len(cache) >= MAX_LABEL_CACHE:
        for stale in list(islice(cache, len(cache) // 2)):
            del cache[stale]
    info = (labels, key, le)
    cache[raw] = info
    return info


def _line_number(text: str, line: str) -> int:
    pos = text.find(line)
    return text.count("\n", 0, pos) + 1 if pos >= 0 else 0


def _bad(text: str, line: str, why: str) -> ExpositionError:
    shown = line if len(line) <= 120 else line[:117] + "..."
    return ExpositionError(f"line {_line_number(text, line)}: {why}: {shown!r}")


def _parse_lines(
    text: str,
    lines: list[str],
    wanted: frozenset[str] | None,
    cache: dict[str, LabelInfo],
    out: Samples,
    unread_prefix: str | None = None,
) -> bool:
    """Parse sample lines into out; returns False once `# EOF` was read. Lines that start with
    `unread_prefix` (the buckets of a histogram read only for its sum or count) are skipped."""
    fast = _SAMPLE_FAST.match
    for line in lines:
        if not line or line[0] == "#":
            if line.startswith("# EOF"):
                return False
            continue
        if unread_prefix is not None and line.startswith(unread_prefix):
            continue
        m = fast(line)
        if m is None:
            m = _SAMPLE_SLOW.match(line)
            if m is None:
                if line.isspace():
                    continue
                raise _bad(text, line, "not a sample, comment or blank line")
        name, raw, value_text = m.groups()
        if wanted is not None and name not in wanted:
            continue
        if raw is None or not raw.strip():
            info = _NO_LABELS
        else:
            found = cache.get(raw) or _label_info(raw, cache)
            if found is None:
                m = _SAMPLE_SLOW.match(line)
                raw = m.group(2) if m is not None else None
                found = _label_info(raw, cache) if raw is not None else None
                if m is None or found is None:
                    raise _bad(text, line, "malformed labels")
                value_text = m.group(3)
            info = found
        try:
            value = float(value_text)
        except ValueError:
            raise _bad(text, line, "value is not a number") from None
        samples = out.get(name)
        if samples is None:
            out[name] = [(info, value)]
        else:
            samples.append((info, value))
    return True


def _foreign_lines(chunk: str, family: str, wanted: Wanted) -> bool:
    """Whether a skipped family's chunk may hold a wanted sample of another family: a line that
    is not a comment or a blank and does not start with the family's name, or any line where a
    wanted name starts with it. Counts the family's lines without splitting them; only the lines
    after its last one (the next family's `# HELP`) are looked at."""
    if not family or wanted.named_after(family):
        return True
    own = "\n" + family
    rest = chunk.count("\n") - chunk.count(own)
    if rest == 0:
        return False
    start = chunk.find("\n", chunk.rfind(own) + 1)
    if start < 0:
        return True
    tail = chunk[start + 1 :].split("\n")
    return len(tail) != rest or any(line and line[0] != "#" and not line.isspace() for line in tail)


def _parse_foreign(
    text: str,
    lines: list[str],
    names: frozenset[str],
    cache: dict[str, LabelInfo],
    out: Samples,
) -> bool:
    """Parse the lines of a skipped family's chunk that name a wanted sample; returns False once
    `# EOF` was read."""
    name = _NAME.match
    keep: list[str] = []
    for line in lines:
        if line.startswith("# EOF"):
            _parse_lines(text, keep, names, cache, out)
            return False
        m = name(line)
        if m is not None and m.group(1) in names:
            keep.append(line)
    return _parse_lines(text, keep, names, cache, out)


def _text(body: bytes | str) -> str:
    """The body as text; raises ExpositionError for a NUL byte (a binary body)."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    if "\x00" in text:
        raise ExpositionError(f"line {text.count(chr(10), 0, text.find(chr(0))) + 1}: NUL byte")
    return text


def ends_mid_line(body: bytes) -> bool:
    """True when body stops inside a line, so it cannot be a whole exposition: the text format
    ends every line with a line feed, its last one included, and OpenMetrics ends with `# EOF`
    (its line feed optional). An empty body is whole: a server with no samples yet."""
    if not body or body.endswith(b"\n"):
        return False
    return body[body.rfind(b"\n") + 1 :].strip() != b"# EOF"


def parse_exposition(
    body: bytes | str,
    wanted: Wanted | None = None,
    cache: dict[str, LabelInfo] | None = None,
) -> Samples:
    """Parse the samples of the wanted families (all samples when wanted is None).

    Raises ExpositionError("line N: why: 'line'") for a line of a read family, or a line that
    names a wanted sample, that is not a sample, a comment or a blank. `cache` maps raw label
    text to parsed labels across scrapes of one server (at most MAX_LABEL_CACHE entries, the
    oldest dropped first); pass the same dict on every call to skip re-parsing labels.
    """
    text = _text(body)
    if cache is None:
        cache = {}
    out: Samples = {}
    names = None if wanted is None else wanted.samples
    chunks = ("\n" + text if text.startswith("# TYPE ") else text).split(_TYPE_SPLIT)
    if not _parse_lines(text, chunks[0].split("\n"), names, cache, out):
        return out
    for chunk in chunks[1:]:
        first = chunk.find("\n")
        if first < 0:
            continue
        end = chunk.find(" ", 0, first)
        family = chunk[: first if end < 0 else end]
        if wanted is not None and family not in wanted.families:
            if _foreign_lines(chunk, family, wanted) and not _parse_foreign(
                text, chunk[first + 1 :].split("\n"), wanted.samples, cache, out
            ):
                return out
            continue
        unread = None if names is None or family + "_bucket" in names else family + "_bucket{"
        if not _parse_lines(text, chunk[first + 1 :].split("\n"), names, cache, out, unread):
            return out
    return out


def scan_names(body: bytes | str) -> tuple[set[str], ExpositionError | None]:
    """The name of every well-formed sample in a body (up to `# EOF`), and the error for its
    first line that is not a sample, a comment or a blank (None when every line is one).

    For kind detection, which keys on the names a server family owns whatever else the body
    holds. A NUL byte makes the whole body unreadable, as for parse_exposition: no names.
    """
    try:
        text = _text(body)
    except ExpositionError as exc:
        return set(), exc
    out: Samples = {}
    cache: dict[str, LabelInfo] = {}
    first: ExpositionError | None = None
    for line in text.split("\n"):
        try:
            if not _parse_lines(text, [line], None, cache, out):
                break
        except ExpositionError as exc:
            if first is None:
                first = exc
    return set(out), first
