"""Applies group decisions to GPUs: journal first, degrade per GPU, never the whole node.

The actuator is the only place that writes GPU settings. Before the first write to a GPU it
saves the GPU's original settings in the journal, so any later exit (clean, crash, SIGKILL)
can restore them. The power limit a GPU had before powerd (an operator's `nvidia-smi -pl`, a
rack budget) is the ceiling of every limit powerd sets and what it puts back when it wants none.
Once powerd has written a GPU's limit it looks at the limit in each tick's reading and reads
it again before each limit write: one that differs from what powerd last left there was set by
someone else while powerd ran, and becomes the GPU's ceiling and what restore puts back
(journaled, warned once per change); powerd never raises a GPU above it, nor puts back the
limit it replaced.
While that original cannot be read and saved, the GPU's power limit is left alone (its clocks
need no original read) and the save is tried again at the next decision; so is a GPU whose
journal could not be written. A GPU that refuses a write is degraded on its own:

- NoPermission: that GPU becomes observe-only (logged once, exported as a metric), after one
  attempt to put back what powerd had set on it, so no throttle outlives its control.
- NotSupported for locked clocks: that GPU is controlled through its power limit instead.
- GpuLost: the daemon drops the GPU (raised to the caller, which owns the GPU list, once the
  group's other GPUs have had the decision).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from powerd.gpu.backend import POWER_LIMIT_TOLERANCE_MW, GpuBackend
from powerd.gpu.errors import GpuError, GpuLost, NoPermission, NotSupported
from powerd.journal import Journal, JournalError, OriginalUnreadable, read_power_limit_mw
from powerd.logging_setup import ProblemLog
from powerd.model import GpuInfo, GroupDecision

log = logging.getLogger(__name__)

LOCK_RESEND_S = 60.0
"""A clock setting held unchanged is sent to the GPU again this often (s): one changed outside
powerd (NVML cannot read a lock back) lasts at most this long, for one call a minute."""
DRY_RUN_LOG_S = 60.0
"""In a dry run, each GPU's "would set" is logged at INFO at most this often (the latest;
every change at DEBUG): the controller moves a settled clock every tick or two, and a day's
dry run would otherwise log a line per GPU per tick."""


@dataclass(slots=True)
class GpuControlState:
    """What powerd has set on one GPU, and how far it may go."""

    info: GpuInfo
    lock_max_mhz: int | None = None
    """Upper end of the locked range we set; None when unlocked."""
    power_limit_mw: int | None = None
    """Limit we set; None when at the limit the GPU had before powerd."""
    baseline_limit_mw: int | None = None
    """The limit read from the GPU before the journal held one, or (without a journal) the
    one an operator set since; None until read."""
    left_limit_mw: int | None = None
    """The power limit powerd last left on the GPU (read back after its write), against which
    an operator's change is told; None while not known (before powerd's first limit write,
    after a loss), when nothing is taken for an operator's."""
    power_limit_unsaved: bool = False
    """True while the original power limit cannot be read or saved (warned once): powerd
    leaves the limit as found until it can."""
    observe_only_reason: str = ""
    """Non-empty when writes are off for this GPU (e.g. no_permission). journal_error is
    tried again at each decision."""
    reason_before_loss: str = ""
    """The observe-only reason the GPU had when it was lost, given back when it rejoins."""
    clock_lock_supported: bool = True
    power_limit_refused: bool = False
    """A limit write was refused as not supported (the clocks still are controlled); until
    one succeeds the GPU's limit counts as out of powerd's reach."""
    power_limit_retry: bool = False
    """Try a refused limit once more at the next write (after a loss and return, a reload)."""
    lock_sent_s: float | None = None
    """When the clock setting (a lock, or none) was last sent to the GPU or, before the first
    send, first decided (the actuator's clock); the setting is sent again LOCK_RESEND_S on."""
    would_set: str = ""
    """In dry-run mode, the last setting that would have been written."""
    would_set_logged_s: float | None = None
    """When a "would set" of this GPU was last logged at INFO (the actuator's clock)."""
    would_set_unlogged: bool = False
    """A change since then was logged at DEBUG only: the setting held is due at INFO."""

    @property
    def observe_only(self) -> bool:
        return bool(self.observe_only_reason)


class Actuator:
    """Writes decisions to GPUs through a GpuBackend, journaled, or only logs them (dry run)."""

    def __init__(
        self,
        backend: GpuBackend,
        journal: Journal | None,
        *,
        dry_run: bool,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`clock` (seconds) times the clock settings sent again, the dry run's "would set"
        lines, and the write problems' reminders and quiet periods."""
        self._backend = backend
        self._journal = journal
        self._dry_run = dry_run
        self.states: dict[str, GpuControlState] = {}
        self._clock = clock
        self._write_problems = ProblemLog(log, clock=clock)

    @property
    def dry_run(self) -> bool:
        return self._dry_run

    @dry_run.setter
    def dry_run(self, dry_run: bool) -> None:
        if self._dry_run and not dry_run:
            # A dry run wrote nothing: the GPUs are as found, whatever it would have set.
            for state in self.states.values():
                if state.observe_only_reason == "gpu_lost":
                    continue  # what a wet run set before it went, which it may still hold
                state.lock_max_mhz = state.power_limit_mw = None
                state.would_set = ""
                self._left(state, None)
        self._dry_run = dry_run

    def track(self, info: GpuInfo) -> GpuControlState:
        """Start tracking a GPU (idempotent)."""
        state = self.states.get(info.uuid)
        if state is None:
            # With no supported clock known below f_max, a lock could only pin the GPU there.
            lockable = len(info.supported_sm_clocks_mhz) > 1
            state = self.states[info.uuid] = GpuControlState(info, clock_lock_supported=lockable)
            if not lockable:
                log.warning(
                    "GPU %s lists no supported clocks; controlled through its power limit",
                    info.uuid,
                )
        return state

    def redescribe(self, info: GpuInfo) -> None:
        """A tracked GPU's description changed (its limit range read at last): its limits are
        judged by the new one from now on."""
        state = self.states.get(info.uuid)
        if state is not None:
            state.info = info

    def limits_out_of_reach(self) -> set[str]:
        """GPUs whose power limit powerd cannot set while it controls (observed only for a
        reason other than a dry run or a loss, a limit write refused as not supported, or a
        limit range NVML does not report): a node power budget cannot count on a share for
        them."""
        return {
            uuid
            for uuid, state in self.states.items()
            if (state.observe_only and state.observe_only_reason not in ("dry_run", "gpu_lost"))
            or state.power_limit_refused
            or not state.info.power_limit_range_known
        }

    def holds_settings(self, uuid: str) -> bool:
        """Whether a clock lock or power limit of powerd's is on the GPU, as far as it knows."""
        state = self.states.get(uuid)
        return state is not None and (
            state.lock_max_mhz is not None or state.power_limit_mw is not None
        )

    def note_held_settings(
        self, uuid: str, lock_max_mhz: int | None, power_limit_mw: int | None
    ) -> None:
        """The GPU still holds these settings of powerd's (their restore failed): its next
        decision, or a release, is written against them rather than against the defaults."""
        state = self.states.get(uuid)
        if state is None:
            return
        state.lock_max_mhz, state.power_limit_mw = lock_max_mhz, power_limit_mw
        if power_limit_mw is not None:
            self._left(state, power_limit_mw)

    def lose(self, uuid: str) -> None:
        """The GPU is gone: nothing is written to it, and what powerd last set on it (which it
        may still hold) is kept until it is back (rejoin) or restored."""
        state = self.states.get(uuid)
        if state is not None:
            if state.observe_only_reason != "gpu_lost":
                state.reason_before_loss = state.observe_only_reason
            state.observe_only_reason = "gpu_lost"
            # It may come back reset to its default limit, which is no operator's change.
            self._left(state, None)
            if self.dry_run:
                # A dry run only would have set them: the GPU holds what it was found with.
                state.lock_max_mhz = state.power_limit_mw = None
        self._write_problems.forget(uuid)

    def rejoin(self, uuid: str) -> None:
        """A lost GPU answers again: put back what powerd had set on it (it may have been reset
        or not; a dry run puts it back too, as a switch into one does) and control it from
        there."""
        state = self.states.get(uuid)
        if state is None or state.observe_only_reason != "gpu_lost":
            return
        state.observe_only_reason, state.reason_before_loss = state.reason_before_loss, ""
        state.power_limit_retry = True  # a GPU back from a reset may take limits again
        if not state.observe_only:
            self._put_back(state)
        if state.power_limit_mw is None and state.left_limit_mw is None:
            # Nothing of powerd's on it: what it holds now is what a later change outside
            # powerd is told from (an operator's raise after its return), unless a reset while
            # it was lost lifted it above the limit it had before powerd: that is put back.
            try:
                limit_mw, _ = read_power_limit_mw(self._backend, uuid)
                original_mw = self._saved_limit_mw(uuid)
                if (
                    limit_mw is not None
                    and original_mw is not None
                    and not state.observe_only
                    and not self.dry_run
                    and limit_mw > original_mw + POWER_LIMIT_TOLERANCE_MW
                ):
                    self._write_limit(state, None)
                    log.info(
                        "GPU %s came back at %.0f W, above the %.0f W it had before powerd; "
                        "put back",
                        uuid,
                        limit_mw / 1000,
                        original_mw / 1000,
                    )
                    return
            except GpuError as exc:
                log.warning("GPU %s: its power limit after its return: %s", uuid, exc)
                return
            if limit_mw is not None:
                self._left(state, limit_mw)

    def retry_power_limits(self) -> None:
        """Try the power limit again on GPUs that refused it as not supported (a reload: the
        operator may have changed the GPU's mode)."""
        for state in self.states.values():
            state.power_limit_retry = True

    def apply(
        self,
        decision: GroupDecision,
        uuids: list[str],
        power_w: float | None = None,
        clock_mhz: float | None = None,
        limits_mw: Mapping[str, int | None] | None = None,
    ) -> None:
        """Apply one group decision to each of the group's GPUs.

        `power_w` and `clock_mhz` are the group's mean per-GPU power and SM clock now, used
        to derive a power limit for GPUs whose clocks cannot be locked. `limits_mw` are the
        GPUs' power limits as the tick read them, in which a limit set outside powerd is
        looked for even when nothing is to be written (every limit write also reads it first).
        Raises GpuLost for the first GPU that vanished, after the others had the decision;
        other GPU errors degrade that GPU and are logged.
        """
        lost: GpuLost | None = None
        for uuid in uuids:
            state = self.states[uuid]
            if state.observe_only and state.observe_only_reason != "journal_error":
                continue
            try:
                if limits_mw is not None and limits_mw.get(uuid) is not None and not self.dry_run:
                    self._follow_operator(state, limits_mw[uuid])
                self._apply_one(state, decision, power_w, clock_mhz)
                # Every decision the GPU holds counts toward the quiet period that ends a write
                # problem, whether or not it needed a write.
                self._write_problems.cleared(uuid, "GPU %s: settings are written again", uuid)
            except GpuLost as exc:
                lost = lost or exc
            except JournalError as exc:
                # Without its originals saved, a GPU must not be changed: nothing could undo it.
                if state.observe_only_reason != "journal_error":
                    state.observe_only_reason = "journal_error"
                    log.error("GPU %s: %s; observing only until it can be saved", uuid, exc)
                # A lock it holds would stay while nothing controls it; its reset saves nothing
                # (the journal keeps the clocks to restore).
                self._unlock_observed(state)
            except NoPermission as exc:
                state.observe_only_reason = "no_permission"
                log.error(
                    "GPU %s: no permission to change settings (%s); observing only. "
                    "powerd needs root or CAP_SYS_ADMIN.",
                    uuid,
                    exc,
                )
                self._put_back(state)
            except GpuError as exc:
                # Tried again at the next decision. A write that fails now and then is one
                # problem until a quiet period passes without a failure.
                self._write_problems.problem(
                    uuid,
                    logging.WARNING,
                    "GPU %s: %s failed: %s",
                    uuid,
                    exc.operation or "write",
                    exc,
                )
        if lost is not None:
            raise lost

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
        if not state.clock_lock_supported and want_lock is not None:
            # Without locked clocks, a power limit is the only way to lower the clock: the
            # dynamic power falls roughly with f^3 along the voltage curve above the knee.
            fallback = _power_limit_for_clock(info, want_lock, power_w, clock_mhz)
            if fallback is not None:
                want_limit = fallback if want_limit is None else min(want_limit, fallback)
            want_lock = None
        want_limit = self._capped_mw(state, want_limit)

        if self.dry_run:
            state.would_set = f"clock<={want_lock or info.sm_clock_max_mhz} MHz, " + (
                f"limit {want_limit / 1000:.0f} W" if want_limit else "default limit"
            )
            changed = want_lock != state.lock_max_mhz or want_limit != state.power_limit_mw
            if changed or state.would_set_unlogged:
                now_s = self._clock()
                logged_s = state.would_set_logged_s
                if logged_s is None or now_s - logged_s >= DRY_RUN_LOG_S:
                    state.would_set_logged_s, state.would_set_unlogged = now_s, False
                    log.info("dry run: GPU %s would set %s", info.uuid, state.would_set)
                elif changed:
                    state.would_set_unlogged = True
                    log.debug("dry run: GPU %s would set %s", info.uuid, state.would_set)
            state.lock_max_mhz, state.power_limit_mw = want_lock, want_limit
            return

        now_s = self._clock()
        if state.lock_sent_s is None:
            state.lock_sent_s = now_s
        # NVML cannot read a lock back, and anyone with root can change it (nvidia-smi -lgc,
        # -rgc): a setting held unchanged is sent again, so one changed outside powerd lasts
        # at most LOCK_RESEND_S. A release (mode off), or a GPU observed only, gets only changes.
        resend = (
            decision.mode != "off"
            and not state.observe_only
            and now_s - state.lock_sent_s >= LOCK_RESEND_S
        )
        if (want_lock != state.lock_max_mhz or resend) and state.clock_lock_supported:
            if want_lock is not None or state.lock_max_mhz is not None:
                self._remember(state, power_limit=False)  # a reset alone changes nothing saved
            try:
                if want_lock is None:
                    self._backend.reset_locked_clocks(info.uuid, resend=resend)
                else:
                    self._backend.set_locked_clocks(
                        info.uuid, info.sm_clock_min_mhz, want_lock, resend=resend
                    )
                state.lock_max_mhz = want_lock
                state.lock_sent_s = now_s
            except GpuLost:
                # A write given up on as hung may still land when its call returns: the lock
                # counts as set, so the GPU's return puts it back (an unlock given up on
                # leaves the lock counted as it was).
                if want_lock is not None:
                    state.lock_max_mhz = want_lock
                raise
            except NotSupported:
                state.clock_lock_supported = False
                log.warning("GPU %s cannot lock clocks; falling back to its power limit", info.uuid)
                self._apply_one(state, decision, power_w, clock_mhz)
                return
        if state.power_limit_refused and not state.power_limit_retry:
            return
        state.power_limit_retry = False
        if want_limit != state.power_limit_mw and self._save_limit(state):
            self._follow_operator(state)
            # The saved original (or the operator's since), not an earlier read, is the ceiling.
            want_limit = self._capped_mw(state, want_limit)
            if want_limit == state.power_limit_mw:
                return
            try:
                self._write_limit(state, want_limit)
                state.power_limit_refused = False
            except NotSupported:
                state.power_limit_refused = True
                if not state.clock_lock_supported:
                    state.observe_only_reason = "not_supported"
                    log.error(
                        "GPU %s supports neither locked clocks nor power limits; observing only",
                        info.uuid,
                    )
                else:
                    log.warning(
                        "GPU %s cannot set its power limit; controlling its clocks only",
                        info.uuid,
                    )

    def _follow_operator(self, state: GpuControlState, now_mw: int | None = None) -> None:
        """Take a power limit set outside powerd since its last write (`nvidia-smi -pl`) as
        the GPU's new ceiling and the limit to restore. `now_mw` is the limit as the tick read
        it (which shows a change while powerd writes nothing); without it the limit is read
        now (one call), as before every limit write on any path (a tick, the prefill guard, a
        reload's release, a put-back), so an operator's limit set after the tick's read is not
        overwritten unseen. Only while powerd knows what it left there. Raises JournalError
        when the new limit cannot be saved: then nothing is written to the GPU (the caller
        observes it only) until it can."""
        uuid = state.info.uuid
        left_mw = state.left_limit_mw
        if left_mw is None:
            if now_mw is not None and self._saved_limit_mw(uuid) is None:
                # Nothing of powerd's on it: the limit it has now is the one it had before
                # powerd (an operator's raise of a GPU powerd never wrote lifts its ceiling).
                state.baseline_limit_mw = state.info.clamp_power_limit_mw(now_mw)
            return
        if self._journal is not None and self._saved_limit_mw(uuid) is None:
            self._left(state, None)  # restored since: the limit is as found again
            return
        if now_mw is None:
            now_mw, _ = read_power_limit_mw(self._backend, uuid)
        if now_mw is None or abs(now_mw - left_mw) <= POWER_LIMIT_TOLERANCE_MW:
            return
        if self._journal is not None:
            self._journal.adopt_power_limit(uuid, now_mw)
        else:
            state.baseline_limit_mw = state.info.clamp_power_limit_mw(now_mw)
        log.warning(
            "GPU %s: power limit changed outside powerd to %.0f W (powerd had left %.0f W); "
            "it is the GPU's ceiling now and what restore puts back",
            uuid,
            now_mw / 1000,
            left_mw / 1000,
        )
        state.power_limit_mw = None  # the GPU holds the operator's limit, none of powerd's
        self._left(state, now_mw)
        if state.observe_only_reason == "journal_error":
            state.observe_only_reason = ""
            log.info("GPU %s: power limit to restore saved; controlling it again", uuid)

    def _left(self, state: GpuControlState, limit_mw: int | None) -> None:
        """Note the power limit powerd leaves on the GPU (None: not known)."""
        state.left_limit_mw = limit_mw
        if self._journal is not None:
            self._journal.note_power_limit_left(state.info.uuid, limit_mw)

    def _remember(self, state: GpuControlState, *, power_limit: bool) -> None:
        """Journal the GPU's originals before a write (see Journal.remember)."""
        if self._journal is None:
            return
        self._journal.remember(self._backend, state.info.uuid, state.info, power_limit=power_limit)
        if state.observe_only_reason == "journal_error":
            state.observe_only_reason = ""
            log.info("GPU %s: original settings saved; controlling it again", state.info.uuid)

    def _save_limit(self, state: GpuControlState) -> bool:
        """Make sure the GPU's original power limit is saved before a limit write. False while
        it cannot be read or saved, warned once; then the limit must stay as found."""
        uuid = state.info.uuid
        problem = ""
        try:
            self._remember(state, power_limit=True)
        except OriginalUnreadable as exc:
            problem = str(exc)
        except JournalError as exc:
            if self._journal is None or self._journal.get(uuid) is None:
                raise  # nothing saved, so nothing written: the whole GPU waits for the journal
            problem = str(exc)
        if not problem and self._baseline_limit_mw(state) is None:
            problem = "cannot read its power limit"
        if problem:
            if not state.power_limit_unsaved:
                state.power_limit_unsaved = True
                log.warning(
                    "GPU %s: %s; its power limit stays as found until its original is saved "
                    "(tried again at each decision)",
                    uuid,
                    problem,
                )
            return False
        if state.power_limit_unsaved:
            state.power_limit_unsaved = False
            log.info("GPU %s: original power limit saved; controlling it", uuid)
        return True

    def _capped_mw(self, state: GpuControlState, limit_mw: int | None) -> int | None:
        """limit_mw, or None (no limit of powerd's) when it is not below the limit the GPU had
        before powerd. Kept while that limit is unknown: _save_limit stops the write then."""
        if limit_mw is None or limit_mw >= state.info.power_limit_max_mw:
            return None
        baseline_mw = self._baseline_limit_mw(state)
        if baseline_mw is not None and limit_mw >= baseline_mw:
            return None
        return limit_mw

    def _saved_limit_mw(self, uuid: str) -> int | None:
        """The power limit the journal saved as the GPU's original; None when none is saved."""
        entry = self._journal.get(uuid) if self._journal is not None else None
        return entry.power_limit_mw if entry is not None else None

    def _baseline_limit_mw(self, state: GpuControlState) -> int | None:
        """The limit the GPU had before powerd, clamped to its range: as saved in the journal,
        read from the GPU while the journal holds none; None while it cannot be read."""
        uuid = state.info.uuid
        saved_mw = self._saved_limit_mw(uuid)
        if saved_mw is not None:
            return state.info.clamp_power_limit_mw(saved_mw)
        if state.baseline_limit_mw is None:
            limit_mw, _ = read_power_limit_mw(self._backend, uuid)
            if limit_mw is not None:
                state.baseline_limit_mw = state.info.clamp_power_limit_mw(limit_mw)
        return state.baseline_limit_mw

    def _write_limit(self, state: GpuControlState, limit_mw: int | None) -> None:
        """Set limit_mw, or with None the limit the GPU had before powerd (known by then: no
        limit is written before it is)."""
        uuid = state.info.uuid
        target_mw = limit_mw if limit_mw is not None else self._baseline_limit_mw(state)
        if target_mw is None:
            raise GpuError(
                f"GPU {uuid}: its power limit before powerd is not known",
                operation="set_power_limit",
                uuid=uuid,
            )
        try:
            if limit_mw is None and target_mw == state.info.power_limit_default_mw:
                self._backend.reset_power_limit(uuid)
                left_mw = target_mw
            else:
                left_mw = self._backend.set_power_limit(uuid, target_mw)
        except GpuLost:
            # Nothing written, or (a write given up on as hung) written when its call returns:
            # the new limit counts as set, so the GPU's return puts the limit back, and what
            # powerd left there is unknown, so a late one is not taken for an operator's.
            if limit_mw is not None:
                state.power_limit_mw = limit_mw
            self._left(state, None)
            raise
        except (NotSupported, NoPermission):
            raise  # nothing written
        except GpuError:
            # It may hold the new limit, the old one or another: what is there now is powerd's.
            self._left(state, read_power_limit_mw(self._backend, uuid)[0])
            raise
        state.power_limit_mw = limit_mw
        self._left(state, left_mw)

    def _put_back(self, state: GpuControlState) -> None:
        """One attempt to undo what powerd set on a GPU it can no longer control."""
        uuid = state.info.uuid
        if state.lock_max_mhz is None and state.power_limit_mw is None:
            return
        try:
            self._reset_lock(state)
            if state.power_limit_mw is not None:
                self._follow_operator(state)  # the operator's limit since, if any, stays
            if state.power_limit_mw is not None:
                self._write_limit(state, None)
        except (GpuError, JournalError) as exc:
            log.error(
                "GPU %s: cannot put back its settings (%s); `powerd restore` does at exit",
                uuid,
                exc,
            )
            return
        log.info("GPU %s: its clocks and power limit are back as found", uuid)

    def _reset_lock(self, state: GpuControlState) -> None:
        """Unlock the GPU's clocks where powerd locked them. Raises GpuError."""
        if state.lock_max_mhz is not None:
            self._backend.reset_locked_clocks(state.info.uuid)
            state.lock_max_mhz = None

    def _unlock_observed(self, state: GpuControlState) -> None:
        """Unlock a GPU powerd has stopped controlling; a failure is logged when it starts or
        changes and tried again at the next decision."""
        uuid = state.info.uuid
        try:
            self._reset_lock(state)
            self._write_problems.cleared(uuid, "GPU %s: its clocks are unlocked", uuid)
        except GpuLost:
            return  # the tick's reading drops it
        except GpuError as exc:
            self._write_problems.problem(
                uuid, logging.WARNING, "GPU %s: cannot unlock its clocks: %s", uuid, exc
            )


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
