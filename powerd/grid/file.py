"""Live grid values from a JSON file that an operator's own job keeps up to date.

The file (grid.file) holds, at the top level, `price_per_kwh` and/or `carbon_g_per_kwh`, each
either a number (the value now, stated at `updated_at` or else at the file's mtime) or a list
of intervals `[{"start": ISO-8601, "end": ISO-8601, "value": x}, ...]` (day-ahead prices,
forecasts), of which the one covering now applies. Optional: `updated_at` (ISO-8601 with a UTC
offset) and `currency` (must equal grid.currency). Values are already normalised: price in
grid.currency per kWh (a market's per-MWh price / 1000), carbon in gCO2e per kWh.

Missing data is never taken for a value: null, NaN, a non-number and a carbon intensity <= 0
are problems, as is a key given twice in one object. An empty list of intervals, like one with
no interval covering now, gives no value now (a feed with no forecast yet). Negative prices
are real (day-ahead markets) and are kept. A signal the file states badly keeps its last good
value (which still ages out); a key left out of the file means the file gives no value for it.
"""

from __future__ import annotations

import bisect
import errno
import itertools
import json
import logging
import math
import os
import re
import stat
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

log = logging.getLogger(__name__)

MAX_FILE_BYTES = 4 * 1024 * 1024
"""Larger files are refused: a year of 15-minute intervals takes under 4 MiB."""

FILE_KEYS: dict[str, str] = {"price": "price_per_kwh", "carbon": "carbon_g_per_kwh"}
"""The file's key of each grid signal."""

_OTHER_KEYS = ("updated_at", "currency")
_INTERVAL_KEYS = ("start", "end", "value")
_CLOCK_SKEW_S = 300.0
"""How far `updated_at` may be after the file's mtime (clocks of two hosts) before it is not
believed."""
READ_WAIT_S = 0.1
"""How long a poll waits for the file system: a stat or read on a hung network mount blocks
until the server answers, and the tick must not."""


class _Bad(ValueError):
    """A problem with what the file states; the message says where and what."""


@dataclass(frozen=True, slots=True)
class _Point:
    """One value, stated at stated_s (Unix time)."""

    value: float
    stated_s: float

    def at(self, now_s: float, max_age_s: float) -> tuple[float, float] | None:
        age_s = max(0.0, now_s - self.stated_s)
        return (self.value, age_s) if age_s <= max_age_s else None


@dataclass(frozen=True, slots=True)
class _Intervals:
    """Values over [start, end) intervals (Unix times), sorted and not overlapping."""

    starts_s: tuple[float, ...]
    ends_s: tuple[float, ...]
    values: tuple[float, ...]

    def at(self, now_s: float, max_age_s: float) -> tuple[float, float] | None:
        i = bisect.bisect_right(self.starts_s, now_s) - 1
        if i < 0 or now_s >= self.ends_s[i]:
            return None
        return self.values[i], now_s - self.starts_s[i]


class GridFile:
    """Reads grid.file whenever it changes (checked with one stat per refresh) and keeps the
    last good value of each signal. Each distinct problem is logged once, as a warning, for as
    long as it lasts; every problem met at a read counts in errors_total."""

    def __init__(self, path: str, currency: str) -> None:
        self.path = path
        self.currency = currency
        self.errors_total = 0
        self._problems_now = 0
        self._key: object = None
        self._signals: dict[str, _Point | _Intervals] = {}
        self._warned: set[str] = set()
        self._reader: threading.Thread | None = None
        self._reader_started_s = 0.0
        self._hung = False

    @property
    def problems_now(self) -> int:
        """Problems of the file as last read, plus one while the file system does not answer:
        0 when it was read without one (or is absent: removing it stops the feed)."""
        return self._problems_now + self._hung

    def refresh_bounded(self, wait_s: float = READ_WAIT_S) -> None:
        """refresh() on a thread of its own, waited for at most `wait_s`. A read that takes
        longer goes on in the background (its values are taken in when it returns) and no
        other starts until it has; one still not back at the next call is a problem, counted
        and warned of once per hang. Never raises."""
        reader = self._reader
        if reader is not None and reader.is_alive():
            if not self._hung:
                self._hung = True
                self.errors_total += 1
                log.warning(
                    "grid.file %s: no answer from the file system for %.1f s (a hung mount?); "
                    "keeping the last values read",
                    self.path,
                    time.monotonic() - self._reader_started_s,
                )
            return
        if self._hung:
            self._hung = False
            log.info(
                "grid.file %s: the file system answered after %.1f s",
                self.path,
                time.monotonic() - self._reader_started_s,
            )
        reader = threading.Thread(target=self.refresh, name="powerd-grid-file", daemon=True)
        self._reader, self._reader_started_s = reader, time.monotonic()
        reader.start()
        reader.join(wait_s)

    def states(self, signal: str) -> bool:
        """Whether the file holds a value of `signal` (in force now or not)."""
        return signal in self._signals

    def value(self, signal: str, now_s: float, max_age_s: float) -> tuple[float, float] | None:
        """(value, age_s) of `signal` in force at now_s; None when the file gives none now
        (never read, left out, stale, or no interval covers now)."""
        stated = self._signals.get(signal)
        return None if stated is None else stated.at(now_s, max_age_s)

    def refresh(self) -> None:
        """Read the file again if it changed since the last refresh; blocks while the file
        system does (see refresh_bounded). Never raises."""
        try:
            st = os.stat(self.path)
        except OSError as exc:
            key: object = ("stat", exc.errno)
            if key != self._key:
                self._key = key
                if exc.errno == errno.ENOENT:
                    # Removing the file is how an operator stops the feed: no problem.
                    self._signals = {}
                    self._report([], ["absent; no values from it until it is written"])
                else:
                    self._report([f"cannot read it: {exc.strerror or exc}"])
            return
        key = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)
        if key == self._key:
            return
        self._key = key
        if not stat.S_ISREG(st.st_mode):
            self._report(["not a regular file"])
            return
        if st.st_size > MAX_FILE_BYTES:
            self._report([f"larger than {MAX_FILE_BYTES // (1024 * 1024)} MiB"])
            return
        try:
            with open(self.path, "rb") as f:
                raw = f.read(MAX_FILE_BYTES + 1)
        except OSError as exc:
            self._report([f"cannot read it: {exc.strerror or exc}"])
            return
        self._report(*self._parse(raw, st.st_mtime))

    def _parse(self, raw: bytes, mtime_s: float) -> tuple[list[str], list[str]]:
        """Take in the signals `raw` states well; return the problems and notes met."""
        if len(raw) > MAX_FILE_BYTES:
            return [f"larger than {MAX_FILE_BYTES // (1024 * 1024)} MiB"], []
        try:
            doc = json.loads(raw, object_pairs_hook=_unique_keys)
        except _Bad as exc:
            return [str(exc)], []
        except RecursionError:
            return ["not JSON: nested too deeply"], []
        except ValueError as exc:
            return [f"not JSON: {exc}"], []
        if not isinstance(doc, dict):
            return [f"expected a JSON object at the top, got {_kind(doc)}"], []
        unknown = sorted(str(key) for key in doc if key not in (*FILE_KEYS.values(), *_OTHER_KEYS))
        # Not counted as an error: a job may add notes of its own. A misspelt key still shows,
        # as the signal's source not being the file.
        notes = [f"ignoring unknown keys: {', '.join(unknown)}"] if unknown else []
        stated_s = mtime_s
        if "updated_at" in doc:
            try:
                stated_s = _timestamp("updated_at", doc["updated_at"])
            except _Bad as exc:
                return [str(exc)], notes
            if stated_s > mtime_s + _CLOCK_SKEW_S:
                # Nothing is stated after it is written (a local time marked Z, a skewed clock):
                # such a value would stay fresh for as long as it is ahead.
                # The times stay out of the note: a note is warned of once while it lasts,
                # and they change at every rewrite.
                notes.append(
                    f"updated_at is after the file was written (by more than {_CLOCK_SKEW_S:g} "
                    "s); taking the file's mtime"
                )
                log.debug(
                    "grid.file %s: updated_at %s, mtime %s taken",
                    self.path,
                    _iso(stated_s),
                    _iso(mtime_s),
                )
                stated_s = mtime_s
        problems = []
        # Built aside and swapped in whole: value() reads from the tick's thread.
        signals = dict(self._signals)
        for signal, key in FILE_KEYS.items():
            if key not in doc:
                signals.pop(signal, None)
                continue
            try:
                if signal == "price" and "currency" in doc and doc["currency"] != self.currency:
                    raise _Bad(
                        f"currency: the file's prices are in {doc['currency']!r}, grid.currency "
                        f"is {self.currency!r}; ignoring {key}"
                    )
                signals[signal] = _parse_signal(signal, key, doc[key], stated_s, notes)
            except _Bad as exc:
                problems.append(str(exc))
        self._signals = signals
        return problems, notes

    def _report(self, problems: list[str], notes: Sequence[str] = ()) -> None:
        """Count each problem and warn of each problem or note not warned of since it last
        went away; say so when the problems are gone."""
        self.errors_total += len(problems)
        self._problems_now = len(problems)
        current = set(problems) | set(notes)
        for message in (*problems, *notes):
            if message not in self._warned:
                log.warning("grid.file %s: %s", self.path, message)
        solved = self._warned - current
        self._warned = current
        if solved and not problems:
            log.info("grid.file %s: read without problems again", self.path)


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """A JSON object's members; _Bad for a key given twice, of which json keeps the last
    silently (and other readers the first)."""
    doc: dict[str, object] = {}
    for key, value in pairs:
        if key in doc:
            raise _Bad(f"key {key[:40]!r} is given twice in one object")
        doc[key] = value
    return doc


def _parse_signal(
    signal: str, key: str, stated: object, stated_s: float, notes: list[str]
) -> _Point | _Intervals:
    """One signal's value or intervals; _Bad for what cannot be taken. Keys an interval has
    beyond start, end and value are added to `notes`, once per signal."""
    if not isinstance(stated, list):
        return _Point(_value(signal, key, stated), stated_s)
    spans = []
    unknown: set[str] = set()
    for i, item in enumerate(stated):
        where = f"{key}[{i}]"
        if not isinstance(item, dict):
            raise _Bad(f'{where}: expected {{"start", "end", "value"}}, got {_kind(item)}')
        missing = [name for name in _INTERVAL_KEYS if name not in item]
        if missing:
            raise _Bad(f"{where}: needs {', '.join(missing)}")
        unknown.update(str(name) for name in item if name not in _INTERVAL_KEYS)
        start_s = _timestamp(f"{where}.start", item["start"])
        end_s = _timestamp(f"{where}.end", item["end"])
        if end_s <= start_s:
            raise _Bad(f"{where}: end {item['end']} is not after start {item['start']}")
        spans.append((start_s, end_s, _value(signal, f"{where}.value", item["value"]), i))
    if unknown:
        # Like the file's own unknown keys: noted, not an error. A per-interval "currency"
        # or "unit" would otherwise go unseen while each value is read in grid.currency.
        notes.append(f"{key}: ignoring unknown keys in its intervals: {', '.join(sorted(unknown))}")
    spans.sort()
    for before, after in itertools.pairwise(spans):
        if after[0] < before[1]:
            raise _Bad(f"{key}[{before[3]}] and {key}[{after[3]}]: the intervals overlap")
    return _Intervals(
        starts_s=tuple(span[0] for span in spans),
        ends_s=tuple(span[1] for span in spans),
        values=tuple(span[2] for span in spans),
    )


def _value(signal: str, where: str, value: object) -> float:
    if value is None:
        raise _Bad(f"{where}: null is missing data")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Bad(f"{where}: expected a number, got {_kind(value)}")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if math.isnan(number):
        raise _Bad(f"{where}: NaN is missing data")
    if math.isinf(number):
        raise _Bad(f"{where}: expected a finite number, got {number}")
    if signal == "carbon" and number <= 0:
        raise _Bad(f"{where}: {number:g} is missing data, not clean power (must be > 0)")
    return number


_ISO_TIME = re.compile(
    r"(?P<date>\d{4}-\d{2}-\d{2})[Tt ](?P<minute>\d{2}:\d{2})(?P<second>:\d{2})?"
    r"(?:[.,](?P<fraction>\d+))?(?:(?P<utc>[Zz])|(?P<hours>[+-]\d{2}):?(?P<minutes>\d{2})?)?"
)
"""An ISO-8601 date and time: seconds, their fraction (any digits, '.' or ',') and the offset
(Z, +HH, +HHMM, +HH:MM) optional."""


def _timestamp(where: str, value: object) -> float:
    """Unix time of an ISO-8601 time with a UTC offset (_ISO_TIME's forms)."""
    if not isinstance(value, str):
        raise _Bad(f"{where}: expected an ISO-8601 time, got {_kind(value)}")
    # Written out as isoformat() writes it: Python 3.10's fromisoformat reads nothing else,
    # 3.11's most of ISO 8601, and a feed must read the same on both.
    parts = _ISO_TIME.fullmatch(value.strip())
    try:
        if parts is None:
            raise ValueError(value)
        offset = ""
        if parts["utc"]:
            offset = "+00:00"
        elif parts["hours"]:
            offset = f"{parts['hours']}:{parts['minutes'] or '00'}"
        fraction = (parts["fraction"] or "")[:6].ljust(6, "0")
        moment = datetime.fromisoformat(
            f"{parts['date']}T{parts['minute']}{parts['second'] or ':00'}.{fraction}{offset}"
        )
    except ValueError:
        raise _Bad(f"{where}: not an ISO-8601 time, got {value[:40]!r}") from None
    if moment.tzinfo is None:
        raise _Bad(f"{where}: needs a UTC offset (Z or +01:00), got {value[:40]!r}")
    return moment.timestamp()


def _iso(unix_s: float) -> str:
    return datetime.fromtimestamp(unix_s, timezone.utc).isoformat(timespec="seconds")


def _kind(value: object) -> str:
    """A short description of a JSON value, for messages."""
    if value is None:
        return "null"
    if isinstance(value, str):
        return repr(value[:40])
    if isinstance(value, (bool, int, float)):
        return json.dumps(value)
    if isinstance(value, dict):
        return "an object"
    return "a list" if isinstance(value, list) else type(value).__name__
