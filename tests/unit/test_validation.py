"""One predicate behind the config's, the command line's and the bench's "positive" checks."""

from __future__ import annotations

import argparse
import math

import pytest

from powerd.bench.runner import positive_finite
from powerd.cli import _positive_float
from powerd.config import ConfigError, SloConfig
from powerd.validation import is_positive_finite

VALUES = [1.0, 1e-9, 5, 0.0, -1.0, math.nan, math.inf, -math.inf]


@pytest.mark.parametrize("value", VALUES)
def test_every_layer_takes_what_the_predicate_takes(value: float) -> None:
    """A positive, finite number; NaN and the infinities are refused alike."""
    taken = is_positive_finite(value)
    assert taken == (value > 0 and math.isfinite(value))
    assert _config_takes(value) is taken
    assert _command_line_takes(value) is taken
    assert _bench_takes(value) is taken


def _config_takes(value: float) -> bool:
    try:
        SloConfig(ttft_s=value).validate("slo")
    except ConfigError:
        return False
    return True


def _command_line_takes(value: float) -> bool:
    try:
        _positive_float(repr(value))
    except argparse.ArgumentTypeError:
        return False
    return True


def _bench_takes(value: float) -> bool:
    try:
        positive_finite("--duration", value)
    except ValueError:
        return False
    return True
