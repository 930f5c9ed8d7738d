"""Log lines: sd-daemon priority prefixes under systemd, timestamps elsewhere, one line each."""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Iterator

import pytest

from powerd.logging_setup import ProblemLog, parse_level, setup_logging, syslog_priority


@pytest.fixture(autouse=True)
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


def test_systemd_lines_carry_priority_and_no_timestamp() -> None:
    out = io.StringIO()
    setup_logging("debug", under_systemd=True, stream=out)
    log = logging.getLogger("powerd.test")
    log.debug("d")
    log.info("i")
    log.warning("w")
    log.error("e")
    log.critical("c")
    lines = out.getvalue().splitlines()
    assert lines == [
        "<7>powerd.test: d",
        "<6>powerd.test: i",
        "<4>powerd.test: w",
        "<3>powerd.test: e",
        "<2>powerd.test: c",
    ]


def test_plain_lines_are_timestamped() -> None:
    out = io.StringIO()
    setup_logging("info", under_systemd=False, stream=out)
    logging.getLogger("powerd.test").info("gpu %s ready", "GPU-1")
    logging.getLogger("powerd.test").debug("hidden")
    (line,) = out.getvalue().splitlines()
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} INFO powerd.test: gpu GPU-1 ready", line
    )


def test_one_line_per_event_with_exception_summary() -> None:
    out = io.StringIO()
    setup_logging("info", under_systemd=True, stream=out)
    try:
        raise ValueError("bad\nvalue")
    except ValueError:
        logging.getLogger("powerd.test").exception("tick failed\nbadly")
    (line,) = out.getvalue().splitlines()
    assert line.startswith("<3>powerd.test: tick failed\\nbadly [ValueError: bad\\nvalue at ")
    assert "test_one_line_per_event_with_exception_summary" in line


def test_debug_adds_traceback_lines_with_the_same_priority() -> None:
    out = io.StringIO()
    setup_logging("debug", under_systemd=True, stream=out)
    try:
        raise KeyError("x")
    except KeyError:
        logging.getLogger("powerd.test").error("lookup", exc_info=True)
    lines = out.getvalue().splitlines()
    assert len(lines) > 2
    assert all(line.startswith("<3>") for line in lines)
    assert "Traceback" in lines[1]


def test_second_setup_replaces_the_handler() -> None:
    first, second = io.StringIO(), io.StringIO()
    setup_logging("info", under_systemd=False, stream=first)
    setup_logging("info", under_systemd=True, stream=second)
    logging.getLogger("powerd.test").info("once")
    assert first.getvalue() == ""
    assert second.getvalue() == "<6>powerd.test: once\n"


def test_levels() -> None:
    assert parse_level("warning") == logging.WARNING
    assert parse_level(" DEBUG ") == logging.DEBUG
    assert parse_level(15) == 15
    with pytest.raises(ValueError, match="log level 'loud'"):
        parse_level("loud")
    with pytest.raises(ValueError, match="log level 'notset'"):
        parse_level("notset")  # logging's name for level 0: every record, tracebacks in full
    # logging's other names for two of the five, as a unit's Environment= may say them
    assert parse_level("WARN") == logging.WARNING
    assert parse_level("fatal") == logging.CRITICAL
    assert syslog_priority(5) == 7
    assert syslog_priority(logging.WARNING + 5) == 4


@pytest.mark.parametrize(
    ("environ", "level", "warned"),
    [
        ({}, logging.INFO, False),
        ({"POWERD_LOG_LEVEL": "debug"}, logging.DEBUG, False),
        ({"POWERD_LOG_LEVEL": "loud"}, logging.INFO, True),
        ({"POWERD_LOG_LEVEL": " "}, logging.INFO, False),
        ({"POWERD_LOG_LEVEL": "NotSet"}, logging.INFO, True),
    ],
)
def test_the_environment_level_falls_back_to_info_with_a_warning(
    environ: dict[str, str], level: int, warned: bool
) -> None:
    """A typo in the unit's Environment= must not stop `powerd restore` (ExecStopPost)."""
    stream = io.StringIO()
    setup_logging(None, under_systemd=True, stream=stream, environ=environ)
    assert logging.getLogger().level == level
    expected = (
        f"<4>powerd: POWERD_LOG_LEVEL: log level {environ.get('POWERD_LOG_LEVEL')!r} is not one "
        "of debug, info, warning, error, critical; logging at info\n"
    )
    assert stream.getvalue() == (expected if warned else "")


class _Clock:
    def __init__(self) -> None:
        self.now_s = 0.0

    def __call__(self) -> float:
        return self.now_s


def test_a_lasting_problem_is_logged_when_it_starts_changes_is_recalled_and_clears(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = _Clock()
    problems = ProblemLog(logging.getLogger("powerd.test"), remind_s=600.0, clock=clock)
    with caplog.at_level(logging.INFO, logger="powerd.test"):
        for _ in range(300):
            problems.problem("gpu0", logging.WARNING, "GPU %s: read failed: %s", 0, "Timeout")
            clock.now_s += 1.0
        problems.problem("gpu0", logging.WARNING, "GPU %s: read failed: %s", 0, "Timeout")
        assert [r.getMessage() for r in caplog.records] == ["GPU 0: read failed: Timeout"]
        clock.now_s = 600.0
        problems.problem("gpu0", logging.WARNING, "GPU %s: read failed: %s", 0, "Timeout")
        problems.problem("gpu0", logging.WARNING, "GPU %s: read failed: %s", 0, "Unknown")
        problems.cleared("gpu0", "GPU %s: read again", 0)
        clock.now_s = 1199.0
        problems.cleared("gpu0", "GPU %s: read again", 0)
        assert len(caplog.records) == 3, "not cleared before it has stayed away quiet_s"
        clock.now_s = 1200.0
        problems.cleared("gpu0", "GPU %s: read again", 0)
        problems.cleared("gpu0", "GPU %s: read again", 0)
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.WARNING, "GPU 0: read failed: Timeout"),
        (logging.WARNING, "GPU 0: read failed: Timeout (still, 301 times in the last 10 min)"),
        (logging.WARNING, "GPU 0: read failed: Unknown"),
        (logging.INFO, "GPU 0: read again (no problem for 10 min)"),
    ]


def test_a_problem_is_logged_only_once_it_has_lasted_the_reads_asked_for(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = _Clock()
    problems = ProblemLog(logging.getLogger("powerd.test"), clock=clock)
    with caplog.at_level(logging.INFO, logger="powerd.test"):
        problems.problem("a", logging.WARNING, "server a: timed out", after=3)
        problems.problem("a", logging.WARNING, "server a: refused", after=3)
        problems.cleared("a", "server a: read again")
        assert caplog.records == [], "a short blip is not logged, nor its end"
        for _ in range(3):
            problems.problem("a", logging.WARNING, "server a: refused", after=3)
        problems.cleared("a", "server a: read again")
        clock.now_s += 600.0
        problems.cleared("a", "server a: read again")
    assert [r.getMessage() for r in caplog.records] == [
        "server a: refused",
        "server a: read again (no problem for 10 min)",
    ]


def test_numbers_in_a_problem_do_not_make_it_another(caplog: pytest.LogCaptureFixture) -> None:
    problems = ProblemLog(logging.getLogger("powerd.test"), clock=_Clock())
    with caplog.at_level(logging.INFO, logger="powerd.test"):
        for elapsed_s in (0.512, 0.61, 0.7, 1.25):
            problems.problem("a", logging.WARNING, "server a: timed out after %.3g s", elapsed_s)
        problems.problem("a", logging.WARNING, "server a: cannot read metrics: refused")
    assert [r.getMessage() for r in caplog.records] == [
        "server a: timed out after 0.512 s",
        "server a: cannot read metrics: refused",
    ]


def test_a_problem_whose_text_alternates_logs_a_handful_of_lines_an_hour(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A proxy answering 502 one scrape and resetting the next, for an hour of 1-s ticks: each
    text once, then a reminder every 10 min naming both."""
    clock = _Clock()
    problems = ProblemLog(logging.getLogger("powerd.test"), clock=clock)
    texts = ("server a: HTTP 502 from %s", "server a: cannot read %s: Connection reset by peer")
    with caplog.at_level(logging.INFO, logger="powerd.test"):
        for tick in range(3600):
            problems.problem("a", logging.WARNING, texts[tick % 2], "http://a/metrics", after=3)
            clock.now_s += 1.0
    lines = [r.getMessage() for r in caplog.records]
    assert lines[:2] == [
        "server a: HTTP 502 from http://a/metrics",
        "server a: cannot read http://a/metrics: Connection reset by peer",
    ]
    assert len(lines) == 2 + 5, lines
    assert lines[2] == (
        "server a: cannot read http://a/metrics: Connection reset by peer (still, 600 times in "
        "the last 10 min; also 300x server a: HTTP 502 from http://a/metrics)"
    )


def test_new_texts_beyond_the_first_few_wait_for_the_reminder(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = _Clock()
    problems = ProblemLog(logging.getLogger("powerd.test"), clock=clock)
    with caplog.at_level(logging.INFO, logger="powerd.test"):
        for tick in range(600):
            problems.problem("a", logging.WARNING, "a: error %s", "abcdefghij"[tick % 10])
            clock.now_s += 1.0
        clock.now_s += 2.0
        problems.problem("a", logging.WARNING, "a: error %s", "z")
    lines = [r.getMessage() for r in caplog.records]
    assert lines[:3] == ["a: error a", "a: error b", "a: error c"]
    assert len(lines) == ProblemLog.MAX_TEXTS + 1
    assert lines[3].startswith("a: error z (still, 598 times in the last 10 min; also ")
    assert "also 60x a: error d; 60x a: error e; 60x a: error f; and 7 other texts)" in lines[3]


def test_a_problem_back_within_the_quiet_period_is_the_same_episode(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A write failing one call in ten, for an hour of 1-s ticks: one warning, reminders, and
    no 'cleared' while it keeps coming back."""
    clock = _Clock()
    problems = ProblemLog(logging.getLogger("powerd.test"), clock=clock)
    with caplog.at_level(logging.INFO, logger="powerd.test"):
        for tick in range(3600):
            if tick % 10 == 3:
                problems.problem("gpu0", logging.WARNING, "GPU 0: set failed: Timeout")
            else:
                problems.cleared("gpu0", "GPU 0: settings are written again")
            clock.now_s += 1.0
        assert [r.levelno for r in caplog.records] == [logging.WARNING] * 6
        assert caplog.records[1].getMessage() == (
            "GPU 0: set failed: Timeout (still, 60 times in the last 10 min)"
        )
        for _ in range(601):
            problems.cleared("gpu0", "GPU 0: settings are written again")
            clock.now_s += 1.0
    assert caplog.records[-1].getMessage() == (
        "GPU 0: settings are written again (no problem for 10 min; 59 more times since the "
        "last line)"
    )
    assert len(caplog.records) == 7


def test_a_new_episode_after_the_quiet_period_is_logged_at_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = _Clock()
    problems = ProblemLog(logging.getLogger("powerd.test"), clock=clock)
    with caplog.at_level(logging.INFO, logger="powerd.test"):
        problems.problem("gpu0", logging.WARNING, "GPU 0: set failed: Timeout")
        clock.now_s = 5.0
        problems.cleared("gpu0", "GPU 0: settings are written again")
        clock.now_s = 605.0
        # Back after the quiet period, with no cleared() to end the old episode since.
        problems.problem("gpu0", logging.WARNING, "GPU 0: set failed: Timeout")
        problems.problem("gpu0", logging.WARNING, "GPU 0: set failed: Timeout")
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.WARNING, "GPU 0: set failed: Timeout"),
        (logging.INFO, "GPU 0: settings are written again (no problem for 10 min)"),
        (logging.WARNING, "GPU 0: set failed: Timeout"),
    ]


def test_a_clear_at_once_is_logged_without_the_quiet_period(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = _Clock()
    problems = ProblemLog(logging.getLogger("powerd.test"), clock=clock)
    with caplog.at_level(logging.INFO, logger="powerd.test"):
        problems.problem("gpu0", logging.ERROR, "GPU 0 is lost")
        problems.cleared("gpu0", "GPU 0 has answered for 10 min", at_once=True)
        problems.problem("gpu0", logging.ERROR, "GPU 0 is lost")
    assert [r.getMessage() for r in caplog.records] == [
        "GPU 0 is lost",
        "GPU 0 has answered for 10 min",
        "GPU 0 is lost",
    ]


def test_a_lone_problem_while_away_does_not_bring_back_an_episode_that_needs_several(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A server read that fails once in a while after an outage (three in a row make a
    problem): no 'still' line, and the outage's end is logged after the quiet period."""
    clock = _Clock()
    problems = ProblemLog(logging.getLogger("powerd.test"), clock=clock)
    with caplog.at_level(logging.INFO, logger="powerd.test"):
        for _ in range(5):
            problems.problem("srv", logging.WARNING, "server: refused", after=3)
            clock.now_s += 1.0
        for tick in range(3600):
            if tick % 540 == 0:
                problems.problem("srv", logging.WARNING, "server: refused", after=3)
            else:
                problems.cleared("srv", "server: read again")
            clock.now_s += 1.0
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == [
        "server: refused",
        "server: read again",
    ]
