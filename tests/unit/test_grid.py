from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import yaml

from powerd.cli import EX_CONFIG, main
from powerd.config import Config, GridConfig, load_config
from powerd.grid.file import GridFile
from powerd.grid.signals import JOULES_PER_KWH, GridSignal, at_facility
from powerd.model import GridSignalStatus
from powerd.sim.node import SimNode
from powerd.simulation import server_configs
from tests.conftest import REPO_ROOT
from tests.unit.daemon_helpers import (
    HTTP_PREFIX,
    SMALL_NODE,
    Rig,
    make_rig,
    metric_lines,
    metric_value,
)
from tests.unit.waiting import wait_until

MONDAY_NOON = datetime(2025, 6, 2, 12, 30, tzinfo=timezone.utc)
"""A Monday, 12:30 UTC: 14:30 in Berlin, 21:30 in Tokyo, 08:30 in New York."""


def _local_hour_ts(hour: int) -> float:
    now = time.localtime()
    return time.mktime((now.tm_year, now.tm_mon, now.tm_mday, hour, 30, 0, 0, 0, -1))


class Clock:
    """A settable Unix-time clock."""

    def __init__(self, moment: datetime = MONDAY_NOON) -> None:
        self.now_s = moment.timestamp()

    def __call__(self) -> float:
        return self.now_s

    def advance(self, seconds: float) -> None:
        self.now_s += seconds


def iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def write_json(path: Path, data: Any) -> None:
    """Replace the file at once (a new inode), as an operator's job should."""
    text = data if isinstance(data, str) else json.dumps(data)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def hourly(values: dict[int, float], default: float) -> tuple[float, ...]:
    return tuple(values.get(hour, default) for hour in range(24))


# ------------------------------------------------------------------------ config values


def test_flat_price_and_carbon_with_pue() -> None:
    grid = GridSignal(GridConfig(price_per_kwh=0.12, carbon_g_per_kwh=400.0, pue=1.5))
    state = grid.poll()
    # 3.6 J per token is a millionth of a kWh per token.
    assert at_facility(state.price_per_kwh, 3.6, 1.5) == pytest.approx(0.12 * 1.5 / 1e6)
    assert at_facility(state.carbon_g_per_kwh, 3.6, 1.5) == pytest.approx(400.0 * 1.5 / 1e6)
    assert at_facility(None, 3.6, 1.5) is None and at_facility(0.12, None, 1.5) is None
    assert state.price == GridSignalStatus("price", 0.12, "flat")
    assert state.file_errors_total is None


def test_time_of_use_schedule_follows_the_local_hour() -> None:
    prices = tuple(0.10 if hour < 17 else 0.30 for hour in range(24))
    carbon = tuple(float(100 + hour) for hour in range(24))
    config = GridConfig(price_schedule_per_kwh=prices, carbon_schedule_g_per_kwh=carbon)
    assert GridSignal(config, clock=lambda: _local_hour_ts(9)).price_per_kwh() == 0.10
    evening = GridSignal(config, clock=lambda: _local_hour_ts(18))
    assert evening.price_per_kwh() == 0.30
    assert evening.carbon_g_per_kwh() == 118.0
    assert evening.poll().price == GridSignalStatus("price", 0.30, "schedule")


@pytest.mark.parametrize(
    ("zone", "hour"), [("Europe/Berlin", 14), ("Asia/Tokyo", 21), ("UTC", 12), ("Etc/GMT+5", 7)]
)
def test_schedule_hour_is_the_hour_in_the_configured_timezone(zone: str, hour: int) -> None:
    config = GridConfig(timezone=zone, price_schedule_per_kwh=tuple(float(h) for h in range(24)))
    assert GridSignal(config, clock=Clock()).price_per_kwh() == hour


def test_weekend_schedule_applies_on_saturday_and_sunday_in_the_timezone() -> None:
    config = GridConfig(
        timezone="America/New_York",
        price_schedule_per_kwh=hourly({}, 0.30),
        price_weekend_schedule_per_kwh=hourly({}, 0.08),
        carbon_schedule_g_per_kwh=hourly({}, 400.0),
    )
    # Monday 03:00 UTC, Sunday 23:00 in New York.
    clock = Clock(datetime(2025, 6, 2, 3, 0, tzinfo=timezone.utc))
    grid = GridSignal(config, clock=clock)
    assert grid.price_per_kwh() == 0.08
    assert grid.carbon_g_per_kwh() == 400.0  # no weekend carbon schedule: every day alike
    clock.advance(3600)  # Monday 00:00 in New York
    assert grid.price_per_kwh() == 0.30
    clock.advance(5 * 86400)  # Saturday
    assert grid.price_per_kwh() == 0.08


def test_unknown_price_is_none_never_zero() -> None:
    grid = GridSignal(GridConfig())
    assert grid.price_per_kwh() is None
    state = grid.poll()
    assert at_facility(state.price_per_kwh, 1.0, grid.config.pue) is None
    assert at_facility(state.carbon_g_per_kwh, 1.0, grid.config.pue) is None
    assert state.signals == ()


# ------------------------------------------------------------------------ the live file

HURRIED_REFRESH = GridFile.refresh_bounded
"""The production poll's read of grid.file, waited for at most READ_WAIT_S (0.1 s)."""


def unhurried_refresh(self: GridFile, wait_s: float = 30.0) -> None:
    """A poll's read of grid.file, waited for up to 30 s (a ceiling: a small local file is read
    at once). With the production 0.1 s, a read that merely starts late on a busy machine (a
    thread not scheduled, a throttled CI container) leaves the poll with the last values and
    counts as a hung file system; only the hang test wants that, while its file system hangs."""
    HURRIED_REFRESH(self, wait_s)


@pytest.fixture(autouse=True)
def unhurried_file_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(GridFile, "refresh_bounded", unhurried_refresh)


def file_grid(tmp_path: Path, clock: Clock, **config: Any) -> tuple[GridSignal, Path]:
    path = tmp_path / "grid.json"
    return GridSignal(GridConfig(file=str(path), **config), clock=clock), path


def test_file_number_with_updated_at(tmp_path: Path) -> None:
    clock = Clock()
    grid, path = file_grid(tmp_path, clock, price_per_kwh=0.5)
    stated = MONDAY_NOON - timedelta(minutes=10)
    write_json(path, {"updated_at": iso(stated), "price_per_kwh": 0.21, "carbon_g_per_kwh": 380})
    state = grid.poll()
    assert state.price == GridSignalStatus("price", 0.21, "file", 600.0)
    assert state.carbon == GridSignalStatus("carbon", 380.0, "file", 600.0)
    assert state.file_errors_total == 0


_ISOFORMAT_3_10 = re.compile(
    r"\d{4}-\d{2}-\d{2}(.\d{2}(:\d{2}(:\d{2}(\.(\d{3}|\d{6}))?)?)?"
    r"([+-]\d{2}:\d{2}(:\d{2}(\.\d{6})?)?)?)?"
)


class _Datetime310(datetime):
    """datetime as Python 3.10 has it: fromisoformat reads only what isoformat() writes
    (fractions of 3 or 6 digits, offsets as +HH:MM); 3.11 reads most of ISO 8601 (gh-80010)."""

    @classmethod
    def fromisoformat(cls, date_string: str) -> _Datetime310:
        if not _ISOFORMAT_3_10.fullmatch(date_string):
            raise ValueError(f"Invalid isoformat string: {date_string!r}")
        return super().fromisoformat(date_string)


@pytest.mark.parametrize("fromisoformat", ["installed", "3.10's"])
@pytest.mark.parametrize(
    "stated",
    [
        "2025-06-02T12:20:00Z",
        "2025-06-02T12:20:00.000Z",
        "2025-06-02T14:20:00+02:00",
        "2025-06-02T12:20z",
        "2025-06-02T12:20:00.0Z",  # one digit: Go's RFC3339Nano drops trailing zeros
        "2025-06-02T14:20:00,000000000+02:00",  # date --iso-8601=ns
        "2025-06-02 14:20:00+0200",
        "2025-06-02T14:20+02",
    ],
)
def test_times_with_a_utc_offset_in_the_forms_feeds_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stated: str, fromisoformat: str
) -> None:
    """Each form is read on every Python: 3.10's fromisoformat refused four of them, which
    3.11's reads, so a feed that worked on the development Python failed on 3.10."""
    if fromisoformat != "installed":
        monkeypatch.setattr("powerd.grid.file.datetime", _Datetime310)
    grid, path = file_grid(tmp_path, Clock())
    write_json(path, {"updated_at": stated, "price_per_kwh": 0.3})
    assert grid.poll().price == GridSignalStatus("price", 0.3, "file", 600.0)


def test_file_number_without_updated_at_is_as_old_as_the_file(tmp_path: Path) -> None:
    clock = Clock()
    grid, path = file_grid(tmp_path, clock)
    write_json(path, {"carbon_g_per_kwh": 250.5})
    os.utime(path, (clock.now_s - 90, clock.now_s - 90))
    assert grid.poll().carbon == GridSignalStatus("carbon", 250.5, "file", 90.0)
    # Only the file could give a price, and it never has: not a signal of this node (yet).
    assert grid.poll().price is None


def test_a_signal_the_file_stopped_stating_is_reported_without_a_value(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    grid, path = file_grid(tmp_path, clock)
    with caplog.at_level(logging.WARNING, logger="powerd.grid"):
        write_json(path, {"updated_at": iso(MONDAY_NOON), "carbon_g_per_kwh": 250.5})
        assert grid.poll().price is None and caplog.records == [], "no price ever: no warning"
        write_json(path, {"updated_at": iso(MONDAY_NOON), "price_per_kwh": 0.3})
        assert grid.poll().carbon == GridSignalStatus("carbon", None, None)
    assert [r.getMessage().split(";")[0] for r in caplog.records] == ["grid carbon: no value now"]


def test_removing_the_file_stops_its_feed(tmp_path: Path) -> None:
    clock = Clock()
    grid, path = file_grid(tmp_path, clock, price_per_kwh=0.5)
    stated = MONDAY_NOON - timedelta(hours=1)
    spans = [{"start": iso(stated), "end": iso(stated + timedelta(days=2)), "value": 0.2}]
    write_json(path, {"price_per_kwh": spans})
    assert grid.poll().price == GridSignalStatus("price", 0.2, "file", 3600.0)
    path.unlink()
    state = grid.poll()
    assert state.price == GridSignalStatus("price", 0.5, "flat")
    assert (state.file_errors_total, state.file_problems) == (0, 0)


def test_an_updated_at_after_the_file_was_written_is_not_believed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    grid, path = file_grid(tmp_path, clock)
    written_s = clock.now_s - 60
    ahead = datetime.fromtimestamp(written_s + 3 * 3600, timezone.utc)
    write_json(path, {"updated_at": iso(ahead), "price_per_kwh": 0.3})
    os.utime(path, (written_s, written_s))
    with caplog.at_level(logging.WARNING, logger="powerd.grid"):
        price = grid.poll().price
    assert price == GridSignalStatus("price", 0.3, "file", 60.0), "as old as the file"
    assert "updated_at is after the file was written" in caplog.text


def test_an_updated_at_after_the_file_was_written_is_warned_of_once_over_rewrites(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A job that writes local time marked Z every 5 minutes: one warning while it lasts, not
    one a rewrite (the mtime taken, which changes each time, is only at debug)."""
    clock = Clock()
    grid, path = file_grid(tmp_path, clock)
    with caplog.at_level(logging.WARNING, logger="powerd.grid"):
        for rewrite in range(12):
            clock.advance(300.0)
            written_s = clock.now_s - 1
            ahead = datetime.fromtimestamp(written_s + 3600, timezone.utc)
            write_json(path, {"updated_at": iso(ahead), "price_per_kwh": 0.2 + rewrite / 100})
            os.utime(path, (written_s, written_s))
            assert grid.poll().price == GridSignalStatus("price", 0.2 + rewrite / 100, "file", 1.0)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "updated_at is after the file was written" in warnings[0]


@pytest.mark.parametrize(
    ("ahead_min", "age_s", "believed"), [(4, 6 * 60.0, True), (6, 10 * 60.0, False)]
)
def test_an_updated_at_up_to_five_minutes_after_the_file_was_written_is_believed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, ahead_min: int, age_s: float, believed: bool
) -> None:
    """README: only an updated_at more than 5 minutes after the mtime is not believed; a job's
    clock a few minutes ahead of the node's must not lose its stated time."""
    clock = Clock()
    grid, path = file_grid(tmp_path, clock)
    written_s = clock.now_s - 10 * 60
    stated = datetime.fromtimestamp(written_s + ahead_min * 60, timezone.utc)
    write_json(path, {"updated_at": iso(stated), "price_per_kwh": 0.3})
    os.utime(path, (written_s, written_s))
    with caplog.at_level(logging.WARNING, logger="powerd.grid"):
        price = grid.poll().price
    assert price == GridSignalStatus("price", 0.3, "file", age_s)
    assert ("updated_at is after the file was written" in caplog.text) is not believed


def test_file_intervals_pick_the_one_covering_now(tmp_path: Path) -> None:
    clock = Clock()
    grid, path = file_grid(tmp_path, clock, price_per_kwh=0.25)
    start = MONDAY_NOON.replace(minute=0) - timedelta(hours=1)
    prices = [0.11, 0.31, -0.02]
    write_json(
        path,
        {
            "price_per_kwh": [
                {
                    "start": iso(start + timedelta(hours=i)),
                    "end": iso(start + timedelta(hours=i + 1)),
                    "value": value,
                }
                # Given out of order: the file need not be sorted.
                for i, value in reversed(list(enumerate(prices)))
            ]
        },
    )
    assert grid.poll().price == GridSignalStatus("price", 0.31, "file", 1800.0)
    clock.advance(3600)
    assert grid.poll().price == GridSignalStatus("price", -0.02, "file", 1800.0)
    clock.advance(3600)  # past the last interval: the flat price again
    assert grid.poll().price == GridSignalStatus("price", 0.25, "flat")
    clock.advance(-4 * 3600)  # before the first
    assert grid.poll().price == GridSignalStatus("price", 0.25, "flat")


def test_an_empty_list_of_intervals_is_no_value_now_not_a_problem(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A feed writes [] when its source has published no forecast yet (day-ahead prices
    before the auction): the next source applies, as past the last interval, unwarned."""
    clock = Clock()
    grid, path = file_grid(tmp_path, clock, price_per_kwh=0.25)
    write_json(path, {"price_per_kwh": 0.4})
    assert grid.poll().price == GridSignalStatus("price", 0.4, "file", 0.0)
    write_json(path, {"price_per_kwh": []})
    clock.advance(1)
    with caplog.at_level(logging.WARNING, logger="powerd.grid"):
        state = grid.poll()
    assert state.price == GridSignalStatus("price", 0.25, "flat")
    assert state.file_errors_total == 0 and caplog.records == []


def test_intervals_with_offsets_and_a_gap(tmp_path: Path) -> None:
    clock = Clock()
    grid, path = file_grid(tmp_path, clock)
    write_json(
        path,
        {
            "carbon_g_per_kwh": [
                # 12:00-12:15 UTC, then 12:45-13:00 UTC: 12:30 falls in the gap.
                {"start": "2025-06-02T14:00:00+02:00", "end": "2025-06-02T14:15+02:00", "value": 1},
                {"start": "2025-06-02T12:45:00Z", "end": "2025-06-02T13:00:00Z", "value": 2},
            ]
        },
    )
    assert grid.poll().carbon == GridSignalStatus("carbon", None, None)
    clock.advance(15 * 60)
    assert grid.poll().carbon == GridSignalStatus("carbon", 2.0, "file", 0.0)


def test_stale_value_falls_back_to_the_schedule_and_then_to_none(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    schedule = hourly({14: 0.40}, 0.20)
    grid, path = file_grid(
        tmp_path, clock, timezone="Europe/Berlin", price_schedule_per_kwh=schedule, max_age_s=600
    )
    write_json(path, {"updated_at": iso(MONDAY_NOON), "price_per_kwh": 0.05})
    assert grid.poll().price == GridSignalStatus("price", 0.05, "file", 0.0)
    clock.advance(600)
    assert grid.poll().price == GridSignalStatus("price", 0.05, "file", 600.0)
    with caplog.at_level(logging.INFO, logger="powerd.grid"):
        clock.advance(1)
        assert grid.poll().price == GridSignalStatus("price", 0.40, "schedule")
    assert "grid price: from the hourly schedule (grid.file has no value" in caplog.text

    no_fallback = GridSignal(GridConfig(file=str(path), max_age_s=600), clock=clock)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="powerd.grid"):
        state = no_fallback.poll()
        assert state.price == GridSignalStatus("price", None, None)
        assert at_facility(state.price_per_kwh, 1.0, 1.0) is None
    assert "grid price: no value now" in caplog.text


@pytest.mark.parametrize(
    ("stated", "problem"),
    [
        (0, "carbon_g_per_kwh: 0 is missing data, not clean power"),
        (-5, "carbon_g_per_kwh: -5 is missing data, not clean power"),
        (None, "carbon_g_per_kwh: null is missing data"),
        ("NaN", "carbon_g_per_kwh: NaN is missing data"),
        ("380", "carbon_g_per_kwh: expected a number, got '380'"),
        (True, "carbon_g_per_kwh: expected a number, got true"),
        ([{"start": "2025-06-02T12:00Z", "end": "2025-06-02T13:00Z", "value": 0.0}], "[0].value"),
    ],
)
def test_carbon_zero_or_missing_is_missing_data_never_clean_power(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, stated: object, problem: str
) -> None:
    clock = Clock()
    grid, path = file_grid(tmp_path, clock, carbon_g_per_kwh=420.0)
    text = json.dumps({"carbon_g_per_kwh": stated}).replace('"NaN"', "NaN")
    write_json(path, text)
    with caplog.at_level(logging.WARNING, logger="powerd.grid"):
        state = grid.poll()
    assert state.carbon == GridSignalStatus("carbon", 420.0, "flat")
    assert state.file_errors_total == 1
    assert problem in caplog.text


def test_negative_price_is_accepted(tmp_path: Path) -> None:
    clock = Clock()
    grid, path = file_grid(tmp_path, clock, price_per_kwh=0.2)
    write_json(path, {"updated_at": iso(MONDAY_NOON), "price_per_kwh": -0.035})
    state = grid.poll()
    assert state.price == GridSignalStatus("price", -0.035, "file", 0.0)
    assert state.file_errors_total == 0
    assert at_facility(state.price_per_kwh, 3.6, grid.config.pue) == pytest.approx(-0.035 / 1e6)


def test_garbage_warns_once_and_keeps_the_last_good_value_until_max_age(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    grid, path = file_grid(tmp_path, clock, price_per_kwh=0.9, max_age_s=3600)
    write_json(path, {"updated_at": iso(MONDAY_NOON), "price_per_kwh": 0.12})
    assert grid.poll().price_per_kwh == 0.12
    with caplog.at_level(logging.WARNING, logger="powerd.grid"):
        write_json(path, '{"price_per_kwh": 0.1')
        for _ in range(5):
            clock.advance(60)
            state = grid.poll()
            age_s = clock.now_s - MONDAY_NOON.timestamp()
            assert state.price == GridSignalStatus("price", 0.12, "file", age_s)
        write_json(path, '{"price_per_kwh": 0.1')  # rewritten, still the same garbage
        assert grid.poll().price_per_kwh == 0.12
    warnings = [r for r in caplog.records if "not JSON" in r.getMessage()]
    assert len(warnings) == 1
    assert str(path) in warnings[0].getMessage()
    assert grid.poll().file_errors_total == 2  # two reads, each a problem
    clock.advance(3600 - 5 * 60 + 1)  # the last good value is now older than max_age_s
    assert grid.poll().price == GridSignalStatus("price", 0.9, "flat")


def test_the_file_changing_is_picked_up_and_not_read_while_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    grid, path = file_grid(tmp_path, clock)
    reads: list[str] = []
    real_parse = GridFile._parse

    def counting_parse(self: GridFile, raw: bytes, mtime_s: float) -> Any:
        reads.append(raw.decode())
        return real_parse(self, raw, mtime_s)

    monkeypatch.setattr(GridFile, "_parse", counting_parse)
    with caplog.at_level(logging.INFO, logger="powerd.grid"):
        assert grid.poll().price_per_kwh is None  # no file yet: no feed, and no problem
        assert grid.poll().file_errors_total == 0
        write_json(path, {"updated_at": iso(MONDAY_NOON), "price_per_kwh": 0.12})
        for _ in range(3):
            assert grid.poll().price_per_kwh == 0.12
        write_json(path, {"updated_at": iso(MONDAY_NOON), "price_per_kwh": 0.31})
        assert grid.poll().price_per_kwh == 0.31
    assert len(reads) == 2
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING].count(
        f"grid.file {path}: absent; no values from it until it is written"
    ) == 1
    assert "read without problems again" in caplog.text


def test_a_hung_file_system_does_not_hold_the_tick(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A stat on a dead NFS server blocks until it answers: the poll goes on with the last
    values, says so once, and takes the file in when the file system answers."""
    clock = Clock()
    grid, path = file_grid(tmp_path, clock, price_per_kwh=0.9)
    write_json(path, {"updated_at": iso(MONDAY_NOON), "price_per_kwh": 0.12})
    assert grid.poll().price_per_kwh == 0.12
    answer = threading.Event()
    real_stat = os.stat

    def hung_stat(name: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        if str(name) == str(path):
            answer.wait(timeout=30.0)
        return real_stat(name, *args, **kwargs)

    monkeypatch.setattr("powerd.grid.file.os.stat", hung_stat)
    # A hung read must leave the poll after the production wait, not the fixture's.
    monkeypatch.setattr(GridFile, "refresh_bounded", HURRIED_REFRESH)
    write_json(path, {"updated_at": iso(MONDAY_NOON), "price_per_kwh": 0.31})
    polls: list[float | None] = []
    with caplog.at_level(logging.INFO, logger="powerd.grid"):
        poller = threading.Thread(
            target=lambda: polls.extend(grid.poll().price_per_kwh for _ in range(3))
        )
        poller.start()
        poller.join(timeout=10.0)
        assert not poller.is_alive(), "a poll waited for the hung file system"
        assert polls == [0.12, 0.12, 0.12]
        assert grid.poll().file_errors_total == 1  # one hang, one problem
        assert grid.poll().file_problems == 1  # for as long as it lasts
        answer.set()
        # The file system answers again: a read from now on is slow at most, not hung.
        monkeypatch.setattr(GridFile, "refresh_bounded", unhurried_refresh)
        # The hung read returns and is taken in, however late a busy machine runs its thread.
        assert wait_until(lambda: grid.poll().price_per_kwh == 0.31, 30.0)
    hung = [
        r.getMessage() for r in caplog.records if "no answer from the file system" in r.getMessage()
    ]
    assert len(hung) == 1 and str(path) in hung[0]
    assert "the file system answered after" in caplog.text


@pytest.mark.parametrize(
    ("doc", "problem"),
    [
        ([1, 2], "expected a JSON object at the top, got a list"),
        ({"updated_at": "yesterday", "price_per_kwh": 1}, "updated_at: not an ISO-8601 time"),
        ({"updated_at": "2025-06-02T12:00:00", "price_per_kwh": 1}, "updated_at: needs a UTC"),
        ({"updated_at": "20250602T120000Z", "price_per_kwh": 1}, "updated_at: not an ISO"),
        ({"updated_at": "2025-06-31T12:00Z", "price_per_kwh": 1}, "updated_at: not an ISO"),
        ({"price_per_kwh": 1e400}, "price_per_kwh: expected a finite number, got inf"),
        ({"price_per_kwh": [{"start": "2025-06-02T12:00Z"}]}, "price_per_kwh[0]: needs end, value"),
        ({"price_per_kwh": [5]}, 'price_per_kwh[0]: expected {"start", "end", "value"}, got 5'),
        (
            {
                "price_per_kwh": [
                    {"start": "2025-06-02T13:00Z", "end": "2025-06-02T12:00Z", "value": 1}
                ]
            },
            "price_per_kwh[0]: end 2025-06-02T12:00Z is not after start",
        ),
        (
            {
                "price_per_kwh": [
                    {"start": "2025-06-02T12:00Z", "end": "2025-06-02T13:00Z", "value": 1},
                    {"start": "2025-06-02T12:30Z", "end": "2025-06-02T13:30Z", "value": 2},
                ]
            },
            "price_per_kwh[0] and price_per_kwh[1]: the intervals overlap",
        ),
        ({"currency": "EUR", "price_per_kwh": 0.2}, "the file's prices are in 'EUR'"),
        ('{"price_per_kwh": 0.2, "price_per_kwh": 0.9}', "key 'price_per_kwh' is given twice"),
        (
            '{"price_per_kwh": [{"start": "2025-06-02T12:00Z", "end": "2025-06-02T13:00Z", '
            '"value": 0.9, "value": 0.2}]}',
            "key 'value' is given twice in one object",
        ),
        ("[" * 100_000 + "]" * 100_000, "not JSON: nested too deeply"),
    ],
)
def test_bad_file_contents_are_problems_that_say_where(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, doc: object, problem: str
) -> None:
    clock = Clock()
    grid, path = file_grid(tmp_path, clock, price_per_kwh=0.2, currency="USD")
    write_json(path, doc)
    with caplog.at_level(logging.WARNING, logger="powerd.grid"):
        state = grid.poll()
    assert state.price == GridSignalStatus("price", 0.2, "flat")
    assert state.file_errors_total == 1
    assert problem in caplog.text


def test_a_bad_signal_does_not_spoil_the_other_and_unknown_keys_only_warn(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    grid, path = file_grid(tmp_path, clock, currency="EUR")
    doc = {
        "updated_at": iso(MONDAY_NOON),
        "currency": "EUR",
        "zone": "DE",
        "price_per_kwh": 0.08,
        "carbon_g_per_kwh": 0,
    }
    write_json(path, doc)
    with caplog.at_level(logging.WARNING, logger="powerd.grid"):
        state = grid.poll()
    assert state.price_per_kwh == 0.08 and state.carbon_g_per_kwh is None
    assert state.file_errors_total == 1  # the carbon; the unknown key is not an error
    assert "ignoring unknown keys: zone" in caplog.text
    # A key left out: the file no longer gives that signal.
    write_json(path, {"updated_at": iso(MONDAY_NOON), "carbon_g_per_kwh": 300})
    state = grid.poll()
    assert state.price_per_kwh is None and state.carbon_g_per_kwh == 300


def test_an_intervals_unknown_keys_are_noted_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A per-interval currency is not read (every value is in grid.currency): say so, once
    for the signal, rather than price each hour silently in another currency."""
    clock = Clock()
    grid, path = file_grid(tmp_path, clock, currency="EUR")
    hour = timedelta(hours=1)
    start = MONDAY_NOON - timedelta(minutes=30)
    spans = [
        {"start": iso(start + i * hour), "end": iso(start + (i + 1) * hour), "value": v, **extra}
        for i, (v, extra) in enumerate(
            [(0.3, {"currency": "USD"}), (0.2, {"currency": "USD", "unit": "kWh"}), (0.1, {})]
        )
    ]
    write_json(path, {"updated_at": iso(MONDAY_NOON), "price_per_kwh": spans})
    with caplog.at_level(logging.WARNING, logger="powerd.grid"):
        state = grid.poll()
    assert state.price_per_kwh == 0.3
    assert state.file_errors_total == 0
    warnings = [r.getMessage() for r in caplog.records]
    assert [w for w in warnings if "unknown keys" in w] == [
        f"grid.file {path}: price_per_kwh: ignoring unknown keys in its intervals: currency, unit"
    ]


def test_a_reload_keeps_what_the_file_gave_when_the_file_is_the_same(tmp_path: Path) -> None:
    clock = Clock()
    grid, path = file_grid(tmp_path, clock)
    write_json(path, '{"price_per_kwh": ')
    grid.poll()
    again = GridSignal(GridConfig(file=str(path), pue=1.4), clock=clock, previous=grid)
    assert again.file is grid.file and again.poll().file_errors_total == 1
    other = GridSignal(GridConfig(file=str(path), currency="EUR"), clock=clock, previous=grid)
    assert other.file is not grid.file


# ------------------------------------------------------------------------ in the daemon


def servers_data(node: SimNode) -> list[dict[str, Any]]:
    return [
        {"name": s.name, "url": f"{HTTP_PREFIX}{s.name}/metrics", "gpus": list(s.gpu_indices)}
        for s in node.servers
    ]


def grid_rig(tmp_path: Path, grid: GridConfig, clock: Clock) -> Rig:
    """A daemon over the small simulated node whose grid signal runs on `clock`."""
    rig = make_rig(
        tmp_path,
        record=True,
        configure=lambda node: Config(servers=server_configs(node), sim=SMALL_NODE, grid=grid),
    )
    rig.daemon.grid = GridSignal(grid, clock=clock)
    return rig


def group_energy_j(rig: Rig, ticks: slice) -> dict[str, float]:
    """Each group's GPU energy over the given ticks, as the controller saw it."""
    energy: dict[str, float] = {}
    for observations in rig.recorder.observations[ticks]:
        for observation in observations:
            assert observation.energy_j is not None and observation.energy_j > 0
            energy[observation.group] = energy.get(observation.group, 0.0) + observation.energy_j
    return energy


def test_a_price_change_mid_run_is_priced_tick_by_tick(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "grid.json"
    grid = GridConfig(file=str(path), pue=1.25, currency="EUR", max_age_s=600)
    rig = grid_rig(tmp_path, grid, clock)
    rig.run(3)  # no file yet: nothing is priced
    text = rig.metrics()
    assert not metric_lines(text, "powerd_group_energy_cost_total")
    assert not metric_lines(text, "powerd_group_carbon_grams_total")
    assert [g.energy_cost_total for g in rig.snapshots[-1].groups] == [None, None]

    expected_eur: dict[str, float] = {}
    expected_g: dict[str, float] = {}
    for price, carbon in ((0.10, 300.0), (0.10, 300.0), (0.30, 500.0), (0.30, 500.0)):
        clock.advance(1)
        stated = datetime.fromtimestamp(clock.now_s, timezone.utc)
        write_json(
            path, {"updated_at": iso(stated), "price_per_kwh": price, "carbon_g_per_kwh": carbon}
        )
        rig.run(1)
        for group, energy_j in group_energy_j(rig, slice(-1, None)).items():
            kwh = energy_j * 1.25 / JOULES_PER_KWH
            expected_eur[group] = expected_eur.get(group, 0.0) + kwh * price
            expected_g[group] = expected_g.get(group, 0.0) + kwh * carbon
    text = rig.metrics()
    for group, eur in expected_eur.items():
        (line,) = metric_lines(text, "powerd_group_energy_cost_total", group=group, currency="EUR")
        assert metric_value(line) == pytest.approx(eur, rel=1e-12)
        (line,) = metric_lines(text, "powerd_group_carbon_grams_total", group=group)
        assert metric_value(line) == pytest.approx(expected_g[group], rel=1e-12)
        (line,) = metric_lines(text, "powerd_group_energy_credit_total", group=group)
        assert metric_value(line) == 0.0
    (line,) = metric_lines(text, "powerd_grid_signal_source", signal="price", source="file")
    assert metric_value(line) == 1.0
    (line,) = metric_lines(text, "powerd_grid_signal_age_seconds", signal="carbon")
    assert metric_value(line) == 0.0
    # No file for the first ticks was no problem: removing it is how the feed stops.
    assert metric_value(metric_lines(text, "powerd_grid_file_errors_total")[0]) == 0.0
    assert metric_value(metric_lines(text, "powerd_grid_file_problems")[0]) == 0.0

    # The file's last value ages out, with no other source: the totals stay, and stop growing.
    clock.advance(601)
    rig.run(2)
    text = rig.metrics()
    for group, eur in expected_eur.items():
        (line,) = metric_lines(text, "powerd_group_energy_cost_total", group=group)
        assert metric_value(line) == pytest.approx(eur, rel=1e-12)
    assert not metric_lines(text, "powerd_grid_signal_age_seconds")
    assert not metric_lines(text, "powerd_grid_price_per_kwh")
    assert all(
        metric_value(line) == 0.0 for line in metric_lines(text, "powerd_grid_signal_source")
    )


def test_a_file_bad_from_the_start_is_a_problem_until_it_is_fixed(tmp_path: Path) -> None:
    """The alert reads the gauge: the error counter of a file already bad at the first tick
    is 1 at the first scrape and never moves while the file stays as it is."""
    clock = Clock()
    path = tmp_path / "grid.json"
    write_json(path, '{"price_per_kwh": 0.1')
    rig = grid_rig(tmp_path, GridConfig(file=str(path), price_per_kwh=0.2), clock)
    for _ in range(3):
        rig.run(1)
        text = rig.metrics()
        assert metric_value(metric_lines(text, "powerd_grid_file_problems")[0]) == 1.0
        assert metric_value(metric_lines(text, "powerd_grid_file_errors_total")[0]) == 1.0
    write_json(path, {"price_per_kwh": 0.1})
    rig.run(1)
    text = rig.metrics()
    assert metric_value(metric_lines(text, "powerd_grid_file_problems")[0]) == 0.0
    assert metric_value(metric_lines(text, "powerd_grid_price_per_kwh")[0]) == 0.1


def test_energy_at_a_negative_price_is_a_credit(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "grid.json"
    rig = grid_rig(tmp_path, GridConfig(file=str(path)), clock)
    write_json(path, {"updated_at": iso(MONDAY_NOON), "price_per_kwh": -0.05})
    snapshot = rig.run(2)
    energy = group_energy_j(rig, slice(None))
    assert [g.energy_credit_total for g in snapshot.groups] == pytest.approx(
        [energy[g.group] / JOULES_PER_KWH * 0.05 for g in snapshot.groups], rel=1e-12
    )
    assert [g.energy_cost_total for g in snapshot.groups] == [0.0, 0.0]


def test_no_price_ever_means_no_cost_series(tmp_path: Path) -> None:
    rig = grid_rig(tmp_path, GridConfig(carbon_g_per_kwh=350.0), Clock())
    rig.run(3)
    text = rig.metrics()
    assert not metric_lines(text, "powerd_group_energy_cost_total")
    assert not metric_lines(text, "powerd_group_energy_credit_total")
    assert len(metric_lines(text, "powerd_group_carbon_grams_total")) == 2
    assert not metric_lines(text, "powerd_grid_signal_source", signal="price")
    assert metric_lines(text, "powerd_grid_signal_source", signal="carbon", source="flat")
    assert not metric_lines(text, "powerd_grid_file_errors_total")


def test_reload_applies_new_grid_settings_and_keeps_the_totals(tmp_path: Path) -> None:
    path = tmp_path / "powerd.yaml"

    def write(node: SimNode, grid: dict[str, Any]) -> None:
        path.write_text(yaml.safe_dump({"servers": servers_data(node), "grid": grid}))

    def configure(node: SimNode) -> Config:
        write(node, {"price_per_kwh": 0.10})
        return load_config(path)

    rig = make_rig(tmp_path, configure=configure)
    before = [g.energy_cost_total for g in rig.run(3).groups]
    assert all(total is not None and total > 0 for total in before)
    write(rig.node, {"price_per_kwh": 0.20, "timezone": "Europe/Paris"})
    assert rig.daemon.reload(path) is True
    assert rig.daemon.grid.config.timezone == "Europe/Paris"
    snapshot = rig.run(1)
    assert snapshot.grid_price_per_kwh == 0.20
    after = [g.energy_cost_total for g in snapshot.groups]
    assert all(
        a is not None and b is not None and a > b for a, b in zip(after, before, strict=True)
    )
    write(rig.node, {"timezone": "Mars/Olympus"})
    assert rig.daemon.reload(path) is False
    assert rig.daemon.grid.config.price_per_kwh == 0.20


def test_check_config_refuses_a_grid_that_run_would_refuse(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "powerd.yaml"
    path.write_text(
        yaml.safe_dump({"grid": {"file": "/run/powerd/grid.json", "timezone": "CET+1"}})
    )
    assert main(["check-config", str(path)]) == EX_CONFIG
    assert "grid.timezone: not an IANA time zone name" in capsys.readouterr().err
    # A file that does not exist yet is no error: the operator's job may write it later.
    path.write_text(yaml.safe_dump({"grid": {"file": str(tmp_path / "later.json")}}))
    assert main(["check-config", str(path)]) == 0


def test_the_example_configs_grid_section_and_file_format_are_valid(tmp_path: Path) -> None:
    """What config/powerd.yaml shows commented out under `# grid:` loads as it is written, and
    its grid.json example reads without a problem."""
    lines = (REPO_ROOT / "config" / "powerd.yaml").read_text().splitlines()
    start = lines.index("# grid:")
    section = []
    for line in lines[start + 1 :]:
        if not line.startswith("#"):
            break
        section.append(line)
    keyed = re.compile(r"^#   ([a-z_]+): (.*)$")
    uncommented = ["grid:"]
    for line in section:
        match = keyed.match(line)
        if match and "[...]" not in match[2]:
            uncommented.append(f"  {match[1]}: {match[2]}")
        elif line.startswith("#     0."):  # the schedule's second line
            uncommented.append("    " + line[6:])
    path = tmp_path / "powerd.yaml"
    path.write_text("\n".join(uncommented) + "\n")
    grid = load_config(path).grid
    assert grid.file == "/run/powerd/grid.json" and grid.max_age_s == 7200
    assert grid.timezone == "America/Chicago"
    assert grid.price_schedule_per_kwh is not None and grid.price_schedule_per_kwh[18] == 0.30

    example = json.loads(
        " ".join(line[6:] for line in section if line.startswith("#     ") and '"' in line)
    )
    grid_json = tmp_path / "grid.json"
    write_json(grid_json, example)
    state = GridSignal(GridConfig(file=str(grid_json)), clock=Clock()).poll()
    assert state.file_errors_total == 0
    assert state.price == GridSignalStatus("price", 0.094, "file", 1800.0)
    assert state.carbon == GridSignalStatus("carbon", 312.0, "file", 1500.0)
