"""The daemon's groups: the GPUs one inference server spans, with what the daemon remembers of
them (the last sample and decision, the report windows, the schedule of their GPUs' lookups).

The daemon builds and replaces the groups; the roster (powerd.roster) changes their GPUs.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from powerd.control.policy import GroupSpec
from powerd.model import DISCOVERY_RETRY_S, GpuInfo, GroupDecision, ServerSample
from powerd.sources import Source
from powerd.sources.loads import PromptBacklogProbe

SLO_WINDOW_TICKS = 300
"""Ticks over which a group's SLO attainment is reported (5 minutes at the default 1 s); a
tick older than this many intervals no longer counts."""
EFFICIENCY_WINDOW_TICKS = 10
"""Ticks over which tokens per joule is reported, to smooth counter quantisation; a tick
older than this many intervals no longer counts."""


@dataclass(slots=True)
class Group:
    """The GPUs one inference server spans, with what the daemon remembers of them."""

    spec: GroupSpec
    source: Source
    uuids: list[str]
    config_key: str
    """Where the config lists its server ("servers[2]"), for messages that name the key."""
    last_good_sample_s: float | None = None
    last_sample: ServerSample | None = None
    slo_history: deque[tuple[float, bool]] = field(
        default_factory=lambda: deque(maxlen=SLO_WINDOW_TICKS)
    )
    """(time, SLO met) per tick the server was read, within SLO_WINDOW_TICKS intervals."""
    efficiency_window: deque[tuple[float, float, float]] = field(
        default_factory=lambda: deque(maxlen=EFFICIENCY_WINDOW_TICKS)
    )
    """(time, tokens, joules) per tick, within EFFICIENCY_WINDOW_TICKS intervals."""
    target_window: deque[tuple[float, float, float]] = field(default_factory=deque)
    """(time, tokens, joules) per tick over TARGET_WINDOW_S, in target mode."""
    target_reached: bool | None = None
    decision: GroupDecision | None = None
    backlog_probe: PromptBacklogProbe | None = None
    """Reads the server's prompt backlog (SGLang only; None until its kind is known to be
    one)."""
    prompt_backlog_tokens: float | None = None
    """The backlog at the last read."""
    guard_raises: list[tuple[float, int]] = field(default_factory=list)
    """(time, cap) of each raise for the backlog applied since the last tick's observation."""
    guard_raises_total: int = 0
    blind_reads: int = 0
    """Consecutive reads of a generating server that exported neither latency histogram."""
    lost_uuids: list[str] = field(default_factory=list)
    """Its GPUs that are lost for now: they rejoin it when they answer again."""
    missing_gpus: list[int | str] = field(default_factory=list)
    """Its configured GPUs (index or UUID) that NVML counts but could not open: looked for
    every DISCOVERY_RETRY_S, they join it once they open."""
    lookup_wait_s: float = DISCOVERY_RETRY_S
    """The wait before its discovered GPUs are looked up again while it has none: doubles after
    each lookup that finds none, up to DISCOVERY_RETRY_MAX_S."""
    next_lookup_s: float | None = None
    """When its discovered GPUs are looked up again: while it has none, or after a restart whose
    lookup found none (None: not scheduled). The sweep of lost and unopened GPUs keeps its own
    schedule (GpuRoster._next_sweep_s)."""
    restarts_seen: int = 0
    """The source's restart count when its discovered GPUs were last looked up."""

    @property
    def controlled(self) -> bool:
        """Whether the group has GPUs to control: only those are the policy's groups (a group
        whose last GPU is lost leaves them)."""
        return bool(self.spec.gpus)

    def set_gpus(self, uuids: list[str], infos: dict[str, GpuInfo]) -> None:
        """Control `uuids` from now on: the group's GPUs and its spec's, which the policy sees."""
        self.uuids = uuids
        self.spec = replace(self.spec, gpus=tuple(infos[uuid] for uuid in uuids))


def controlled_uuids(groups: Sequence[Group]) -> set[str]:
    """The GPUs the groups control now (lost ones are not among them)."""
    return {uuid for group in groups for uuid in group.uuids}


def close_connections(groups: Sequence[Group]) -> None:
    """Close each group's connections to its server (its reader and its backlog probe)."""
    for group in groups:
        group.source.close()
        if group.backlog_probe is not None:
            group.backlog_probe.close()
