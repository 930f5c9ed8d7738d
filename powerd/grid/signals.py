"""Electricity price and carbon intensity at the current hour.

A flat value or a 24-hour schedule in local time (a time-of-use tariff) from the config. A
missing value is None: the daemon then reports no cost, never a made-up zero.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from powerd.config import GridConfig

JOULES_PER_KWH = 3.6e6


class GridSignal:
    """Price (currency per kWh) and carbon (gCO2e per kWh) now, with PUE applied per token."""

    def __init__(self, config: GridConfig, *, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self._clock = clock

    def _hour(self) -> int:
        return time.localtime(self._clock()).tm_hour

    def price_per_kwh(self) -> float | None:
        if self.config.price_schedule_per_kwh is not None:
            return self.config.price_schedule_per_kwh[self._hour()]
        return self.config.price_per_kwh

    def carbon_g_per_kwh(self) -> float | None:
        if self.config.carbon_schedule_g_per_kwh is not None:
            return self.config.carbon_schedule_g_per_kwh[self._hour()]
        return self.config.carbon_g_per_kwh

    def cost_per_token(self, energy_per_token_j: float) -> float | None:
        """Cost of one token at the facility (GPU energy x PUE), in the config's currency."""
        price = self.price_per_kwh()
        if price is None:
            return None
        return energy_per_token_j * self.config.pue / JOULES_PER_KWH * price

    def carbon_g_per_token(self, energy_per_token_j: float) -> float | None:
        carbon = self.carbon_g_per_kwh()
        if carbon is None:
            return None
        return energy_per_token_j * self.config.pue / JOULES_PER_KWH * carbon
