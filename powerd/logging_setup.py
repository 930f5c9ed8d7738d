"""Log format: one line per event.

Under systemd, stderr goes to journald, which stamps each line itself and reads a leading
`<N>` as the syslog priority (sd-daemon(3)), so lines carry that prefix and no timestamp.
Elsewhere lines start with an ISO-8601 timestamp and the level name.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
import traceback
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import TextIO

LEVEL_NAMES = ("debug", "info", "warning", "error", "critical")
LEVEL_ALIASES = {"warn": "warning", "fatal": "critical"}
"""Other names the logging module gives two of LEVEL_NAMES, taken for them."""
LEVEL_ENV = "POWERD_LOG_LEVEL"
"""The log level when --log-level is not given."""

# sd-daemon(3) SD_* priorities.
_SD_PRIORITY = (
    (logging.CRITICAL, 2),  # SD_CRIT
    (logging.ERROR, 3),  # SD_ERR
    (logging.WARNING, 4),  # SD_WARNING
    (logging.INFO, 6),  # SD_INFO
)
_SD_DEBUG = 7


def syslog_priority(levelno: int) -> int:
    """The sd-daemon priority for a logging level (DEBUG and below are 7)."""
    for threshold, priority in _SD_PRIORITY:
        if levelno >= threshold:
            return priority
    return _SD_DEBUG


def level_name(level: str) -> str:
    """The one of LEVEL_NAMES that `level` names, in any case and with LEVEL_ALIASES ('WARN'
    is 'warning'); otherwise `level` lowered, which is none of them."""
    name = level.strip().lower()
    return LEVEL_ALIASES.get(name, name)


def parse_level(level: str | int) -> int:
    """A logging level from one of LEVEL_NAMES or LEVEL_ALIASES in any case ('info', 'WARN') or
    a number; ValueError otherwise (logging's NOTSET too: it would log everything)."""
    if isinstance(level, int):
        return level
    name = level_name(level)
    if name not in LEVEL_NAMES:
        raise ValueError(f"log level {level!r} is not one of {', '.join(LEVEL_NAMES)}")
    return int(logging.getLevelName(name.upper()))


class OneLineFormatter(logging.Formatter):
    """Formats a record as one line: newlines in the message are escaped, and an exception is
    summarised as its type, message and innermost frame. With `full_traceback` the traceback
    follows on extra lines, each with the same prefix."""

    def __init__(self, fmt: str, *, priority_prefix: bool, full_traceback: bool) -> None:
        super().__init__(fmt, datefmt="%Y-%m-%dT%H:%M:%S%z")
        self._priority_prefix = priority_prefix
        self._full_traceback = full_traceback

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage().replace("\r", "").replace("\n", "\\n")
        summary = ""
        extra_lines: list[str] = []
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            summary = " [" + _exception_summary(exc) + "]"
            if self._full_traceback:
                extra_lines = "".join(traceback.format_exception(exc)).rstrip("\n").split("\n")
        elif record.exc_text:
            summary = " [" + record.exc_text.strip().splitlines()[-1] + "]"
        saved_msg, saved_args = record.msg, record.args
        record.msg, record.args = message + summary, None
        try:
            line = logging.Formatter.format(self, _without_exc(record))
        finally:
            record.msg, record.args = saved_msg, saved_args
        prefix = f"<{syslog_priority(record.levelno)}>" if self._priority_prefix else ""
        lines = [prefix + line] + [prefix + "  " + extra for extra in extra_lines]
        return "\n".join(lines)


def _without_exc(record: logging.LogRecord) -> logging.LogRecord:
    clone = logging.makeLogRecord(record.__dict__)
    clone.exc_info = None
    clone.exc_text = None
    clone.stack_info = None
    return clone


def _exception_summary(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", "\\n")
    frames = traceback.extract_tb(exc.__traceback__)
    if frames:
        last = frames[-1]
        text += f" at {last.filename.rsplit('/', 1)[-1]}:{last.lineno} in {last.name}"
    return text


class _PowerdHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Marks the handler setup_logging installed, so a second call replaces it."""


def setup_logging(
    level: str | int | None = "info",
    *,
    under_systemd: bool,
    stream: TextIO | None = None,
    environ: Mapping[str, str] | None = None,
) -> logging.Handler:
    """Configure the root logger; returns the handler installed.

    `level` None takes $POWERD_LOG_LEVEL, or INFO when it is unset; a value there that is no
    level is logged as a warning and INFO used, so a typo in the unit's environment never
    stops a command (`powerd restore` least of all). A bad `level` raises ValueError.
    Calling it again (on reload) replaces the previous handler rather than adding one.
    """
    problem = None
    if level is None:
        raw = (os.environ if environ is None else environ).get(LEVEL_ENV, "").strip()
        try:
            levelno = parse_level(raw) if raw else logging.INFO
        except ValueError as exc:
            levelno = logging.INFO
            problem = f"{LEVEL_ENV}: {exc}; logging at info"
    else:
        levelno = parse_level(level)
    if under_systemd:
        fmt = "%(name)s: %(message)s"
    else:
        fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    handler = _PowerdHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(
        OneLineFormatter(
            fmt, priority_prefix=under_systemd, full_traceback=levelno <= logging.DEBUG
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _PowerdHandler)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(levelno)
    # numba's compiler logs at DEBUG per pass: thousands of lines that say nothing about powerd.
    logging.getLogger("numba").setLevel(max(levelno, logging.INFO))
    if problem is not None:
        logging.getLogger("powerd").warning("%s", problem)
    return handler


class ProblemLog:
    """Logs a recurring problem (a read that fails every tick) as episodes: a fault that lasts
    a day, or comes and goes all day, writes a few lines, not one a tick.

    Keys name what has the problem (a GPU's reads, a server); the formatted message is the
    problem, its numbers aside ("timed out after 0.52 s" and "... 0.61 s" are one text). An
    episode is logged when it starts; while it lasts, a text already logged in it is not
    logged again, and the first MAX_TEXTS texts are logged when first met, later ones only
    named in the reminder. The reminder comes every `remind_s` while the problem recurs, with
    how many times and which texts since the last line. The episode ends, with one INFO line,
    once the problem has stayed away `quiet_s` (or at once where `cleared` says so); a problem
    back before that is the same episode, so a fault that fails one call in ten is one episode.
    Times are `clock`'s, in seconds.
    """

    MAX_TEXTS = 3
    """Distinct texts an episode logs when first met. Two or three are how real faults show
    (a server that times out, then refuses while it restarts; a proxy's 502 between resets);
    beyond that a text is churn, and the reminder names it: an episode writes at most this
    many lines plus one per `remind_s` and its end (a handful an hour), whatever its texts."""

    def __init__(
        self,
        logger: logging.Logger,
        *,
        remind_s: float = 600.0,
        quiet_s: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = logger
        self._remind_s = remind_s
        self._quiet_s = quiet_s
        self._clock = clock
        self._open: dict[Hashable, _Problem] = {}

    def problem(
        self, key: Hashable, level: int, message: str, *args: object, after: int = 1
    ) -> None:
        """`key` has this problem now. A new episode is logged at `level` once `key` has had a
        problem `after` times in a row, at once from there; see the class for the rest."""
        text = message % args if args else message
        same = _NUMBERS.sub("#", text)
        now_s = self._clock()
        known = self._open.get(key)
        if known is not None and known.away_s is not None:
            if now_s - known.away_s >= self._quiet_s:
                # Away long enough, but no one said so since: end the old episode first.
                self._end(key, known, now_s)
                known = None
            else:
                known.away_fails += 1
                if known.away_fails < after:
                    return
                known.away_s = None
                known.away_fails = 0
        if known is None:
            known = self._open[key] = _Problem(now_s)
        known.count += 1
        known.since_line += 1
        seen = known.unsaid.get(same)
        known.unsaid[same] = (text, 1 if seen is None else seen[1] + 1)
        if known.logged_s is None:
            if known.count >= after:
                self._say(known, level, text, same, now_s)
        elif same not in known.said and len(known.said) < self.MAX_TEXTS:
            self._say(known, level, text, same, now_s)
        elif now_s - known.logged_s >= self._remind_s:
            self._log.log(level, "%s", self._reminder(known, text, same, now_s))
            known.said.update(known.unsaid)
            known.unsaid.clear()
            known.since_line = 0
            known.logged_s = now_s

    def cleared(self, key: Hashable, message: str, *args: object, at_once: bool = False) -> None:
        """`key` works now. An episode that was logged ends with `message` at INFO once `key`
        has had no problem for `quiet_s` (callers say so each time it works), or now with
        `at_once` (an event that ends the problem for sure, or one with a wait of its own)."""
        known = self._open.get(key)
        if known is None:
            return
        if known.logged_s is None:
            del self._open[key]  # never logged: a blip, and the count in a row starts again
            return
        now_s = self._clock()
        known.clear_line = message % args if args else message
        known.away_fails = 0
        if known.away_s is None:
            known.away_s = now_s
        if at_once or now_s - known.away_s >= self._quiet_s:
            self._end(key, known, now_s)

    def forget(self, key: Hashable) -> None:
        """Drop `key` (it is gone) without a line."""
        self._open.pop(key, None)

    def _say(self, known: _Problem, level: int, text: str, same: str, now_s: float) -> None:
        self._log.log(level, "%s", text)
        known.said.add(same)
        known.unsaid.clear()
        known.since_line = 0
        known.logged_s = now_s

    def _reminder(self, known: _Problem, text: str, same: str, now_s: float) -> str:
        last_min = (now_s - (now_s if known.logged_s is None else known.logged_s)) / 60.0
        line = f"{text} (still, {known.since_line} times in the last {last_min:.0f} min"
        if now_s - known.since_s >= 2 * self._remind_s:
            line += f", for {(now_s - known.since_s) / 60.0:.0f} min now"
        # Texts never logged first: they are what no line has named yet.
        others = [
            (t, n)
            for key, (t, n) in sorted(known.unsaid.items(), key=lambda item: item[0] in known.said)
            if key != same
        ]
        if others:
            named = "; ".join(f"{n}x {t}" for t, n in others[: self.MAX_TEXTS])
            more = len(others) - self.MAX_TEXTS
            line += f"; also {named}" + (f"; and {more} other texts" if more > 0 else "")
        return line + ")"

    def _end(self, key: Hashable, known: _Problem, now_s: float) -> None:
        del self._open[key]
        notes = []
        if known.away_s is not None and now_s - known.away_s >= 60.0:
            notes.append(f"no problem for {(now_s - known.away_s) / 60.0:.0f} min")
        if known.since_line:
            notes.append(f"{known.since_line} more times since the last line")
        line = known.clear_line or ""
        self._log.info("%s", f"{line} ({'; '.join(notes)})" if notes else line)


_NUMBERS = re.compile(r"\d+(?:\.\d+)?")


@dataclass(slots=True)
class _Problem:
    """One episode of a key's problem."""

    since_s: float
    """When it started."""
    logged_s: float | None = None
    """When it was last logged; None while it has not been."""
    count: int = 0
    """Times met in the episode."""
    since_line: int = 0
    """Times met since it was last logged."""
    said: set[str] = field(default_factory=set)
    """Texts (numbers aside) logged in the episode."""
    unsaid: dict[str, tuple[str, int]] = field(default_factory=dict)
    """Texts (numbers aside) met since the last line -> the latest in full, and how often."""
    away_s: float | None = None
    """Since when `key` has worked (its episode ends after the quiet period); None while not."""
    clear_line: str | None = None
    """The line that ends the episode, as `cleared` last gave it."""
    away_fails: int = 0
    """Problems in a row since `key` last worked, while away: fewer than `after` do not bring
    the episode back (a lone failed read is not worth a line)."""
