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
from dataclasses import dataclass
from typing import TextIO

LEVEL_NAMES = ("debug", "info", "warning", "error", "critical")
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


def parse_level(level: str | int) -> int:
    """A logging level from a name ('info', 'DEBUG') or a number; ValueError otherwise."""
    if isinstance(level, int):
        return level
    value = logging.getLevelName(level.strip().upper())
    if not isinstance(value, int):
        raise ValueError(f"log level {level!r} is not one of {', '.join(LEVEL_NAMES)}")
    return value


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
    """Logs a recurring problem (a read that fails every tick) when it starts or changes, a
    reminder with the count every `remind_s` while it lasts, and one line when it clears: a
    fault that lasts a day writes a few lines, not one a tick. Keys name what has the problem
    (a GPU's reads, a server); the formatted message is the problem, its numbers aside ("timed
    out after 0.52 s" and "... 0.61 s" are one problem)."""

    def __init__(
        self,
        logger: logging.Logger,
        *,
        remind_s: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = logger
        self._remind_s = remind_s
        self._clock = clock
        self._open: dict[Hashable, _Problem] = {}

    def problem(
        self, key: Hashable, level: int, message: str, *args: object, after: int = 1
    ) -> None:
        """`key` has this problem now. Logged at `level` once `key` has had a problem `after`
        times in a row, and again when the problem's text changes."""
        text = message % args if args else message
        now_s = self._clock()
        known = self._open.get(key)
        if known is None:
            known = self._open[key] = _Problem(text, now_s)
        else:
            known.count += 1
        if known.logged_s is None:
            if known.count >= after:
                known.text, known.logged_s = text, now_s
                self._log.log(level, "%s", text)
        elif _NUMBERS.sub("#", known.text) != _NUMBERS.sub("#", text):
            known.text, known.since_s, known.logged_s, known.count = text, now_s, now_s, 1
            self._log.log(level, "%s", text)
        elif now_s - known.logged_s >= self._remind_s:
            minutes = (now_s - known.since_s) / 60.0
            self._log.log(level, "%s (still, %d times in %.0f min)", text, known.count, minutes)
            known.logged_s = now_s

    def cleared(self, key: Hashable, message: str, *args: object) -> None:
        """`key` works again: logged at INFO if its problem was logged."""
        known = self._open.pop(key, None)
        if known is not None and known.logged_s is not None:
            self._log.info(message, *args)

    def forget(self, key: Hashable) -> None:
        """Drop `key` (it is gone) without a line."""
        self._open.pop(key, None)


_NUMBERS = re.compile(r"\d+(?:\.\d+)?")


@dataclass(slots=True)
class _Problem:
    text: str
    since_s: float
    logged_s: float | None = None
    """When it was last logged; None while it has not been."""
    count: int = 1
