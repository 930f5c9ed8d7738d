"""Words of what powerd prints and logs that depend on a count."""

from __future__ import annotations


def plural(noun: str, *counts: int) -> str:
    """`noun` as it reads after these counts: singular only when every one is 1 ("1 GPU",
    "1 vs 1 request"), else with an -s ("0 GPUs", "90 vs 1 requests"). For regular nouns, or
    phrases that end in one ("simulated h100-sxm GPU")."""
    return noun if all(count == 1 for count in counts) else f"{noun}s"


def counted(count: int, noun: str) -> str:
    """The count and its noun: "1 server", "4 servers"."""
    return f"{count} {plural(noun, count)}"
