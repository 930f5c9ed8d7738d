"""Electricity price and carbon intensity in force now, and what a token costs at them.

Each signal comes from the first source that has a value now: grid.file (a live or forecast
value that an operator's job keeps up to date, see powerd.grid.file), the hourly schedule (in
grid.timezone, with its weekend variant on Saturday and Sunday), the flat value. A signal none
of them gives now is None: the daemon then reports no cost, never a made-up zero.
"""

from __future__ import annotations

import logging
import time
import zoneinfo
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from powerd.config import GridConfig
from powerd.grid.file import GridFile
from powerd.model import GRID_SIGNALS, GridSignalStatus

log = logging.getLogger(__name__)

JOULES_PER_KWH = 3.6e6

_SOURCE_WORDS = {"file": "file", "schedule": "hourly schedule", "flat": "flat value"}


def facility_kwh(energy_j: float, pue: float) -> float:
    """kWh the facility draws for `energy_j` joules of GPU energy at power usage effectiveness
    `pue`: what a price or carbon intensity per kWh applies to."""
    return energy_j * pue / JOULES_PER_KWH


def at_facility(per_kwh: float | None, energy_j: float | None, pue: float) -> float | None:
    """What `energy_j` joules of GPU energy cost (or emit) at `per_kwh` of facility energy;
    None when either is unknown."""
    if per_kwh is None or energy_j is None:
        return None
    return facility_kwh(energy_j, pue) * per_kwh


@dataclass(frozen=True, slots=True)
class GridState:
    """The grid signals at one moment. A signal with no source configured is None."""

    price: GridSignalStatus | None = None
    carbon: GridSignalStatus | None = None
    file_errors_total: int | None = None
    """Problems met reading grid.file since it was first read; None without a file."""
    file_problems: int | None = None
    """Problems of grid.file now (GridFile.problems_now); None without a file."""

    @property
    def price_per_kwh(self) -> float | None:
        return None if self.price is None else self.price.value

    @property
    def carbon_g_per_kwh(self) -> float | None:
        return None if self.carbon is None else self.carbon.value

    @property
    def signals(self) -> tuple[GridSignalStatus, ...]:
        return tuple(s for s in (self.price, self.carbon) if s is not None)


class GridSignal:
    """Price (currency per kWh) and carbon (gCO2e per kWh) in force at `clock()` (Unix time)."""

    def __init__(
        self,
        config: GridConfig,
        *,
        clock: Callable[[], float] = time.time,
        previous: GridSignal | None = None,
    ) -> None:
        """`previous` is the signal this one replaces (a reload): its file reader, with the
        last good values and error count, is kept when the file and currency are the same."""
        self.config = config
        self._clock = clock
        self._zone = zoneinfo.ZoneInfo(config.timezone) if config.timezone else None
        self.file: GridFile | None = None
        if config.file is not None:
            kept = previous.file if previous is not None else None
            if kept is not None and (kept.path, kept.currency) == (config.file, config.currency):
                self.file = kept
            else:
                self.file = GridFile(config.file, config.currency)
        self._sources: dict[str, str | None] = dict(previous._sources) if previous else {}
        self._file_stated: set[str] = set(previous._file_stated) if previous else set()
        """Signals grid.file has given a value of (kept across a reload)."""

    def poll(self) -> GridState:
        """The signals in force now; reads grid.file first if it changed (one stat when not),
        waiting for the file system at most a tenth of a second."""
        now_s = self._clock()
        if self.file is not None:
            self.file.refresh_bounded()
        price, carbon = (self._signal(signal, now_s) for signal in GRID_SIGNALS)
        return GridState(
            price=price,
            carbon=carbon,
            file_errors_total=None if self.file is None else self.file.errors_total,
            file_problems=None if self.file is None else self.file.problems_now,
        )

    def price_per_kwh(self) -> float | None:
        return self.poll().price_per_kwh

    def carbon_g_per_kwh(self) -> float | None:
        return self.poll().carbon_g_per_kwh

    def _signal(self, signal: str, now_s: float) -> GridSignalStatus | None:
        config = self.config
        if signal == "price":
            flat = config.price_per_kwh
            weekdays = config.price_schedule_per_kwh
            weekend = config.price_weekend_schedule_per_kwh
        else:
            flat = config.carbon_g_per_kwh
            weekdays = config.carbon_schedule_g_per_kwh
            weekend = config.carbon_weekend_schedule_g_per_kwh
        if weekdays is None and flat is None:
            if self.file is None:
                return None
            if self.file.states(signal):
                self._file_stated.add(signal)
            elif signal not in self._file_stated:
                return None  # only the file could give it, and it never has
        status = GridSignalStatus(signal, None, None)
        from_file = (
            self.file.value(signal, now_s, config.max_age_s) if self.file is not None else None
        )
        if from_file is not None:
            value, age_s = from_file
            status = GridSignalStatus(signal, value, "file", age_s)
        elif weekdays is not None:
            hour, is_weekend = self._local_hour(now_s)
            schedule = weekend if is_weekend and weekend is not None else weekdays
            status = GridSignalStatus(signal, schedule[hour], "schedule")
        elif flat is not None:
            status = GridSignalStatus(signal, flat, "flat")
        self._note_source(signal, status.source)
        return status

    def _local_hour(self, now_s: float) -> tuple[int, bool]:
        """(hour 0-23, whether Saturday or Sunday) at now_s in grid.timezone."""
        if self._zone is None:
            local = time.localtime(now_s)
            return local.tm_hour, local.tm_wday >= 5
        moment = datetime.fromtimestamp(now_s, self._zone)
        return moment.hour, moment.weekday() >= 5

    def _note_source(self, signal: str, source: str | None) -> None:
        """Log when a signal's source changes: a warning when it has no value any more."""
        if signal in self._sources and self._sources[signal] == source:
            return
        self._sources[signal] = source
        why = ""
        if self.file is not None and source != "file":
            why = (
                " (grid.file has no value for it now: none stated, or older than max_age_s "
                f"{self.config.max_age_s:g}, or no interval covers now)"
            )
        if source is None:
            log.warning("grid %s: no value now; its cost or carbon is not counted%s", signal, why)
        else:
            log.info("grid %s: from the %s%s", signal, _SOURCE_WORDS[source], why)
