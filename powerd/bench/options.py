"""What `powerd bench` takes, apart from what runs it: the policies' names, the oracle's
options and the default worker count. The command line is built from these alone, so the
other subcommands (`powerd restore` among them) load no simulator and no numba."""

from __future__ import annotations

import os
from dataclasses import dataclass

POLICY_NAMES: tuple[str, ...] = (
    "default",
    "static-power-cap",
    "util-governor",
    "static-clock",
    "slo-lowest-clock",
    "powerd",
    "oracle",
)


def parse_policies(text: str) -> list[str]:
    """Comma-separated policy names, validated and de-duplicated in the given order.

    Raises ValueError naming the unknown policy.
    """
    names: list[str] = []
    for raw in text.split(","):
        name = raw.strip()
        if not name:
            continue
        if name not in POLICY_NAMES:
            raise ValueError(f"unknown policy {name!r}; known: {', '.join(POLICY_NAMES)}")
        if name not in names:
            names.append(name)
    if not names:
        raise ValueError(f"no policy given; known: {', '.join(POLICY_NAMES)}")
    return names


@dataclass(frozen=True, slots=True)
class OracleOptions:
    """How the oracle searches (bench/oracle.py says how each is used)."""

    window_s: float = 30.0
    tail_s: float = 15.0
    coarse: int = 10
    refine_per_side: int = 2
    low_fraction: float = 0.35
    """Lowest candidate as a share of f_max."""
    slack: float = 0.004
    """Misses allowed beyond default's, as a share of default's finished requests."""
    miss_price: float = 0.5
    """Energy one extra miss must save, in units of default's energy per finished request."""


def workers_default() -> int:
    """Processes the benchmark runs its policies in: the CPUs, at most two."""
    return max(1, min(2, os.cpu_count() or 1))
