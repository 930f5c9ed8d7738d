"""Applies group decisions to GPUs: journal first, degrade per GPU, never the whole node.

The actuator is the only place that writes GPU settings. Before the first write to a GPU it
saves the GPU's original settings in the journal, so any later exit (clean, crash, SIGKILL)
can restore them. A GPU that refuses a write is degraded on its own:

- NoPermission: that GPU becomes observe-only (logged once, exported as a metric).
- NotSupported for locked clocks: that GPU is controlled through its power limit instead.
- GpuLost: the daemon drops the GPU (raised to the caller, which owns the GPU list).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from powerd.gpu.backend import GpuBackend
from powerd.gpu.errors import GpuError, GpuLost, NoPermission, NotSupported
from powerd.journal import Journal, JournalError
from powerd.model import GpuInfo, GroupDecision

log = logging.getLogger(__name__)


@dataclass(slots=True)
class GpuControlState:
    """What powerd has set on one GPU, and how far it may go."""

    info: GpuInfo
    lock_max_mhz: int | None = None
    """Upper end of the locked range we set; None when unlocked."""
    power_limit_mw: int | None = None
    """Limit we set; None when at the default."""
    observe_only_reason: str = ""
    """Non-empty when writes are off for this GPU (e.g. no_permission)."""
    clock_lock_supported: bool = True
    would_set: str = ""
    """In dry-run mode, the last setting that would have been written."""

    @property
    def observe_only(self) -> bool:
        return bool(self.observe_only_reason)


class Actuator:
    """Writes decisions to GPUs through a GpuBackend, journaled, or only logs them (dry run)."""

    def __init__(self, backend: GpuBackend, journal: Journal | None, *, dry_run: bool) -> None:
        self._backend = backend
        self._journal = journal
        self.dry_run = dry_run
        self.states: dict[str, GpuControlState] = {}

    def track(self, info: GpuInfo) -> GpuControlState:
        """Start tracking a GPU (idempotent)."""
        state = self.states.get(info.uuid)
        if state is None:
            state = self.states[info.uuid] = GpuControlState(info)
        return state

    def forget(self, uuid: str) -> None:
        self.states.pop(uuid, None)

    def apply(
        self,
        decision: GroupDecision,
        uuids: list[str],
        power_w: float | None = None,
        clock_mhz: float | None = None,
    ) -> None:
        """Apply one group decision to each of the group's GPUs.

        `power_w` and `clock_mhz` are the group's mean per-GPU power and SM clock now, used
        to derive a power limit for GPUs whose clocks cannot be locked. Raises GpuLost for a
        GPU that vanished; other GPU errors degrade that GPU and are logged.
        """
        for uuid in uuids:
            state = self.states[uuid]
            if state.observe_only:
                continue
            try:
                self._apply_one(state, decision, power_w, clock_mhz)
            except GpuLost:
                raise
            except JournalError as exc:
                # Without its originals saved, a GPU must not be changed: nothing could undo it.
                state.observe_only_reason = "journal_error"
                log.error("GPU %s: %s; observing only", uuid, exc)
            except NoPermission as exc:
                state.observe_only_reason = "no_permission"
                log.error(
                    "GPU %s: no permission to change settings (%s); observing only. "
                    "powerd needs root or CAP_SYS_ADMIN.",
                    uuid,
                    exc,
                )
            except GpuError as exc:
                log.warning("GPU %s: %s failed: %s", uuid, exc.operation or "write", exc)

    def _apply_one(
        self,
        state: GpuControlState,
        decision: GroupDecision,
        power_w: float | None,
        clock_mhz: float | None,
    ) -> None:
        info = state.info
        unlocked = decision.sm_clock_max_mhz >= info.sm_clock_max_mhz
        want_lock = None if unlocked else info.clamp_clock_mhz(decision.sm_clock_max_mhz)
        want_limit = decision.power_limit_mw
        if want_limit is not None:
            want_limit = info.clamp_power_limit_mw(want_limit)
            if want_limit >= info.power_limit_default_mw:
                want_limit = None
        if not state.clock_lock_supported and want_lock is not None:
            # Without locked clocks, a power limit is the only way to lower the clock: the
            # dynamic power falls roughly with f^3 along the voltage curve above the knee.
            fallback = _power_limit_for_clock(info, want_lock, power_w, clock_mhz)
            if fallback is not None:
                want_limit = fallback if want_limit is None else min(want_limit, fallback)
            want_lock = None

        if self.dry_run:
            state.would_set = f"clock<={want_lock or info.sm_clock_max_mhz} MHz, " + (
                f"limit {want_limit / 1000:.0f} W" if want_limit else "default limit"
            )
            if want_lock != state.lock_max_mhz or want_limit != state.power_limit_mw:
                log.info("dry run: GPU %s would set %s", info.uuid, state.would_set)
            state.lock_max_mhz, state.power_limit_mw = want_lock, want_limit
            return

        if want_lock != state.lock_max_mhz and state.clock_lock_supported:
            self._remember(info)
            try:
                if want_lock is None:
                    self._backend.reset_locked_clocks(info.uuid)
                else:
                    self._backend.set_locked_clocks(info.uuid, info.sm_clock_min_mhz, want_lock)
                state.lock_max_mhz = want_lock
            except NotSupported:
                state.clock_lock_supported = False
                log.warning("GPU %s cannot lock clocks; falling back to its power limit", info.uuid)
                self._apply_one(state, decision, power_w, clock_mhz)
                return
        if want_limit != state.power_limit_mw:
            self._remember(info)
            try:
                if want_limit is None:
                    self._backend.reset_power_limit(info.uuid)
                else:
                    self._backend.set_power_limit(info.uuid, want_limit)
                state.power_limit_mw = want_limit
            except NotSupported:
                if not state.clock_lock_supported:
                    state.observe_only_reason = "not_supported"
                    log.error(
                        "GPU %s supports neither locked clocks nor power limits; observing only",
                        info.uuid,
                    )

    def _remember(self, info: GpuInfo) -> None:
        if self._journal is not None:
            self._journal.remember(self._backend, info.uuid, info)


def _power_limit_for_clock(
    info: GpuInfo, want_clock_mhz: int, power_w: float | None, clock_mhz: float | None
) -> int | None:
    """A power limit that should hold the GPU near want_clock_mhz, from its power now.

    The 10 % headroom keeps the cap from biting below the wanted clock at steady state.
    """
    if power_w is None or power_w <= 0 or clock_mhz is None or clock_mhz <= 0:
        return None
    ratio = min(want_clock_mhz / clock_mhz, 1.0)
    return info.clamp_power_limit_mw(power_w * 1000.0 * ratio**3 * 1.1)
