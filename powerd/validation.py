"""Predicates on the values the config, the command line and the bench take; each layer words
its own refusal (a config key, an option, a bench option) around them."""

from __future__ import annotations

import math


def is_positive_finite(value: float) -> bool:
    """Whether value is a number above 0 and below infinity (NaN is not)."""
    return 0 < value < math.inf
