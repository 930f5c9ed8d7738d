from __future__ import annotations

import time

import pytest

from powerd.config import GridConfig
from powerd.grid.signals import GridSignal


def _at_local_hour(hour: int) -> float:
    now = time.localtime()
    return time.mktime((now.tm_year, now.tm_mon, now.tm_mday, hour, 30, 0, 0, 0, -1))


def test_flat_price_and_carbon_with_pue() -> None:
    grid = GridSignal(GridConfig(price_per_kwh=0.12, carbon_g_per_kwh=400.0, pue=1.5))
    # 3.6 J per token is a millionth of a kWh per token.
    assert grid.cost_per_token(3.6) == pytest.approx(0.12 * 1.5 / 1e6)
    assert grid.carbon_g_per_token(3.6) == pytest.approx(400.0 * 1.5 / 1e6)


def test_time_of_use_schedule_follows_the_local_hour() -> None:
    prices = tuple(0.10 if hour < 17 else 0.30 for hour in range(24))
    carbon = tuple(float(100 + hour) for hour in range(24))
    config = GridConfig(price_schedule_per_kwh=prices, carbon_schedule_g_per_kwh=carbon)
    assert GridSignal(config, clock=lambda: _at_local_hour(9)).price_per_kwh() == 0.10
    evening = GridSignal(config, clock=lambda: _at_local_hour(18))
    assert evening.price_per_kwh() == 0.30
    assert evening.carbon_g_per_kwh() == 118.0


def test_unknown_price_is_none_never_zero() -> None:
    grid = GridSignal(GridConfig())
    assert grid.price_per_kwh() is None
    assert grid.cost_per_token(1.0) is None
    assert grid.carbon_g_per_token(1.0) is None
