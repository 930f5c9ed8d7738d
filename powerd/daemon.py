"""The composition root and the loop: sense -> decide -> act -> publish.

`Daemon.tick(now_s)` is one pass and takes its time from the caller, so the same code runs in
real time (`run_forever`) and in virtual time (the benchmark). Signal handlers only set flags;
the loop acts on them between ticks. Which GPUs each group controls, and giving back those no
group does, is the roster's (powerd.roster); the groups are powerd.groups'.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import select
import time
import weakref
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

from powerd.actuator import Actuator
from powerd.config import Config, ConfigError, load_config
from powerd.control.policy import Controller, GroupSpec, Policy
from powerd.gpu.backend import GpuBackend, check_clock_settings
from powerd.gpu.errors import GpuError, GpuLost
from powerd.grid.signals import GridSignal, GridState, at_facility, facility_kwh
from powerd.groups import (
    EFFICIENCY_WINDOW_TICKS,
    SLO_WINDOW_TICKS,
    Group,
    close_connections,
    controlled_uuids,
)
from powerd.journal import Journal
from powerd.logging_setup import ProblemLog
from powerd.model import (
    POWER_CAP_REASONS,
    SHARED_WHY,
    TARGET_LOST_BELOW,
    TARGET_REACHED_AT,
    TARGET_WINDOW_S,
    GpuInfo,
    GpuReading,
    GpuStatus,
    GroupDecision,
    GroupObservation,
    GroupStatus,
    ServerSample,
    Snapshot,
)
from powerd.roster import GpuRoster
from powerd.signals import handle_stop_and_reload_signals
from powerd.sources import (
    Fetcher,
    InlineScrapePool,
    ScrapePool,
    first_token_blind_warning,
    make_source,
)
from powerd.sources.fetch import KeepAliveFetcher
from powerd.sources.loads import PromptBacklogProbe
from powerd.wording import counted

log = logging.getLogger(__name__)

BLIND_WARN_READS = 3
"""Reads of a generating server without either latency histogram before that is logged."""
_MAX_POWER_SHARE = 2.0
"""An energy delta above this many times the GPU's largest power limit over the interval is
a counter read wrong (a reading that dipped and came back would count the counter's whole
history in one tick), not energy: the limit holds the power's average within a second."""
_UNLIMITED_GPU_MAX_W = 1500.0
"""The most a GPU that reports no power-limit range is taken to draw (today's largest boards
are limited to 1,000-1,200 W)."""
SERVER_DOWN_READS = 3
"""Failed reads in a row after which a server is logged as unreadable."""


class WakeFlag:
    """A flag that a signal handler may set, and a wait that it ends.

    threading.Event.set() takes a lock that Event.wait() holds for a moment in the main thread,
    where Python runs signal handlers: a signal landing there would deadlock the daemon. set()
    here takes no lock; a byte on a non-blocking pipe wakes wait().
    """

    def __init__(self) -> None:
        self._set = False
        self._read_fd, self._write_fd = os.pipe()
        for fd in (self._read_fd, self._write_fd):
            os.set_blocking(fd, False)
        weakref.finalize(self, _close_fds, self._read_fd, self._write_fd)

    def set(self) -> None:
        self._set = True
        with contextlib.suppress(BlockingIOError):  # the pipe is full of wake-ups already
            os.write(self._write_fd, b"\0")

    def clear(self) -> None:
        self._set = False

    def is_set(self) -> bool:
        return self._set

    def wait(self, timeout_s: float) -> bool:
        """Block until set or timeout_s elapsed; True when set."""
        if not self._set:
            # A handler that runs during select() leaves its byte: select() retries and returns.
            select.select([self._read_fd], [], [], max(0.0, timeout_s))
        with contextlib.suppress(BlockingIOError):
            while os.read(self._read_fd, 4096):
                pass
        return self._set


def _close_fds(*fds: int) -> None:
    for fd in fds:
        os.close(fd)


def _drop_older(window: deque[Any], now_s: float, span_s: float) -> None:
    """Remove from the left of `window` (entries (time, ...), oldest first) those span_s or
    more before now_s."""
    while window and window[0][0] <= now_s - span_s:
        window.popleft()


class Daemon:
    """Owns the groups, their sources, the controller and the roster of GPUs of one node, and
    runs the loop."""

    def __init__(
        self,
        config: Config,
        backend: GpuBackend,
        *,
        journal: Journal | None = None,
        publish: Callable[[Snapshot], None] | None = None,
        fetch: Fetcher | None = None,
        policy_factory: Callable[[Config, Sequence[GroupSpec]], Policy] | None = None,
        notifier: _Notifier | None = None,
        inline_scrape: bool = False,
        config_transform: Callable[[Config], Config] | None = None,
    ) -> None:
        """`fetch` answers every read of a server (tests, the benchmark's in-process servers);
        without it each server's /metrics and each SGLang backlog probe are read over HTTP, on
        a connection of their own kept open between reads. `inline_scrape` polls the sources
        one after another in the calling thread, for virtual time with in-process fetchers;
        otherwise they are scraped concurrently. `config_transform` is applied to every config
        read on reload, so what the command line or the environment added at start-up
        (--dry-run, simulated servers) stays."""
        self.config = config
        self.backend = backend
        self.journal = journal
        self._publish = publish
        self._fetch = fetch
        self._policy_factory = policy_factory
        self._notifier = notifier
        self._inline_scrape = inline_scrape
        self._config_transform = config_transform
        self._prev_tick_s: float | None = None
        self.actuator = Actuator(backend, journal, dry_run=config.dry_run, clock=self._log_clock)
        self._limits_out_of_reach_mw: dict[str, int] = {}
        """GPUs whose power limit powerd cannot set -> the limit reserved in budget mode."""
        self._prev_energy_mj: dict[str, int] = {}
        self._problems = ProblemLog(log, clock=self._log_clock)
        self.roster = GpuRoster(
            backend,
            self.actuator,
            journal,
            problems=self._problems,
            last_tick_s=lambda: self._prev_tick_s,
            # A GPU lost leaves the policy at once, with the config in force then.
            on_groups_changed=lambda: self._reconfigure_policy(self.config),
            # Its counter's next reading, after a return, must not count the loss's time.
            on_lost=lambda uuid: self._prev_energy_mj.pop(uuid, None),
        )
        self.ticks_total = 0
        self.grid = GridSignal(config.grid)
        # Grid totals by group (and currency); kept across reloads, which rebuild the groups.
        self._energy_cost_total: dict[tuple[str, str], float] = {}
        self._energy_credit_total: dict[tuple[str, str], float] = {}
        self._carbon_g_total: dict[str, float] = {}
        self.groups: list[Group] = self._build_groups(config)
        self.policy: Policy = self._make_policy(config)
        self._pool = self._make_pool()
        self._stop = WakeFlag()
        self._reload = WakeFlag()
        self._last_tick_ok = False
        self.last_snapshot: Snapshot | None = None

    @property
    def infos(self) -> dict[str, GpuInfo]:
        """The GPUs NVML opens, by UUID (the roster's)."""
        return self.roster.infos

    # ----------------------------------------------------------------- construction

    def _make_policy(self, config: Config) -> Policy:
        """A policy over the controlled groups of self.groups under `config` (its budget less
        what the GPUs out of reach may draw)."""
        config = self._budget_less_reserve(config)
        specs = [group.spec for group in self.groups if group.controlled]
        if self._policy_factory is not None:
            return self._policy_factory(config, specs)
        return Controller(config, specs)

    def _reconfigure_policy(self, config: Config) -> None:
        """Give the policy the controlled groups of self.groups under `config`; the controller
        keeps what it learned of groups that stay."""
        if isinstance(self.policy, Controller) and self._policy_factory is None:
            self.policy.reconfigure(
                self._budget_less_reserve(config),
                [group.spec for group in self.groups if group.controlled],
            )
        else:
            # A factory is its caller's say over which policy runs under each config and set
            # of groups (the tests' recorder keeps one per reload), and the daemon does not own
            # what its policy keeps: the factory is asked again rather than its policy
            # reconfigured, so that policy's learning is not carried over.
            self.policy = self._make_policy(config)

    def _judge_target(
        self,
        group: Group,
        now_s: float,
        tokens_per_s: float | None,
        interval_s: float,
        energy_j: float | None,
    ) -> None:
        """Set group.target_reached: in target mode, whether the group's tokens per joule over
        the last TARGET_WINDOW_S reach the target (with hysteresis). None outside target mode
        and after a window with nothing measured; a verdict (None at first) holds until half a
        window is in."""
        target = self.config.target_tokens_per_joule
        if self.config.mode != "target" or target is None:
            group.target_window.clear()
            group.target_reached = None
            return
        window = group.target_window
        if energy_j is not None and tokens_per_s is not None:
            window.append((now_s, tokens_per_s * interval_s, energy_j))
        _drop_older(window, now_s, TARGET_WINDOW_S)
        if not window:
            group.target_reached = None  # nothing measured for a whole window: no verdict
            return
        joules = sum(j for _, _, j in window)
        if now_s - window[0][0] < TARGET_WINDOW_S / 2 or joules <= 0:
            return  # the last verdict holds until half a window is in
        tokens_per_joule = sum(t for _, t, _ in window) / joules
        if tokens_per_joule >= TARGET_REACHED_AT * target:
            group.target_reached = True
        elif tokens_per_joule < TARGET_LOST_BELOW * target or group.target_reached is None:
            group.target_reached = False

    def budget_feasible(self) -> bool | None:
        """In budget mode, whether the last decision could keep within the budget; else None."""
        if self.config.mode != "budget":
            return None
        return self.policy.budget_feasible

    def _log_clock(self) -> float:
        """The loop's clock for the problem logs' reminders and quiet periods: the last tick's
        now_s (virtual time in a simulation), monotonic before the first tick."""
        return time.monotonic() if self._prev_tick_s is None else self._prev_tick_s

    def _note_budget_feasibility(self) -> None:
        """Log, once per episode, a node budget the GPUs' minimum limits alone exceed."""
        if self.budget_feasible() is not False:
            self._problems.cleared(
                "budget", "node_power_budget_w: enough for the GPUs again", at_once=True
            )
            return
        budget_w = self.config.node_power_budget_w or 0.0
        kept_w = self._budget_reserve_w()
        limited = controlled_uuids(self.groups) - set(self._limits_out_of_reach_mw)
        floor_w = sum(self.infos[uuid].power_limit_min_mw for uuid in limited) / 1000.0
        self._problems.problem(
            "budget",
            logging.ERROR,
            "node_power_budget_w: %g W is below the %g W the controlled GPUs draw at their "
            "minimum power limits%s; every GPU is held at its minimum and the node draws more "
            "than the budget",
            budget_w,
            floor_w,
            f" plus the {kept_w:g} W kept for GPUs out of reach" if kept_w > 0 else "",
        )

    def _reserve_limits_out_of_reach(self, readings: Mapping[str, GpuReading]) -> None:
        """Keep the limit of each server's GPU whose limit powerd cannot set (refused, not
        reported, or observed only) or that two servers share (controlled for neither) out of
        the node budget, at the limit each tick reads (an operator may raise it); the policy
        is given the smaller budget at once."""
        reserved: dict[str, int] = {}
        out_of_reach = self.actuator.limits_out_of_reach() & controlled_uuids(self.groups)
        shared = {uuid for uuid in self.roster.shared if uuid in self.infos}
        for uuid in out_of_reach | shared:
            reading = readings.get(uuid)
            # The enforced limit; where it was not read this tick, the last one kept (a
            # passing read error must not move the others' limits).
            limit_mw = (
                (reading.enforced_power_limit_mw if reading else None)
                or self._limits_out_of_reach_mw.get(uuid)
                or (reading.power_limit_mw if reading else None)
            )
            reserved[uuid] = limit_mw or self.infos[uuid].power_limit_default_mw
            if uuid not in self._limits_out_of_reach_mw and uuid not in shared:
                unsaved = self.actuator.states[uuid].observe_only_reason == "journal_error"
                log.warning(
                    "GPU %s: %s; its %.0f W are kept out of the node power budget",
                    uuid,
                    "its settings cannot be saved to the state folder"
                    if unsaved
                    else "its power limit cannot be set",
                    reserved[uuid] / 1000.0,
                )
        if reserved == self._limits_out_of_reach_mw:
            return
        self._limits_out_of_reach_mw = reserved
        self._reconfigure_policy(self.config)

    def _budget_less_reserve(self, config: Config) -> Config:
        """`config` with its node power budget less what the GPUs out of reach may still draw:
        a lost GPU may still run at the limit it had (powerd's last, else its own), one never
        opened at the node's largest default limit, one whose limit cannot be set at the limit
        it has (one two servers share among them)."""
        budget_w = config.node_power_budget_w
        if config.mode != "budget" or budget_w is None:
            return config
        reserved_w = self._budget_reserve_w()
        if reserved_w == 0.0:
            return config
        return replace(config, node_power_budget_w=max(0.0, budget_w - reserved_w))

    def _budget_reserve_w(self) -> float:
        """What the GPUs out of powerd's reach may draw, kept out of a node power budget."""
        roster = self.roster
        reserved_w = (
            sum(
                limit_mw
                for uuid, limit_mw in self._limits_out_of_reach_mw.items()
                if uuid not in roster.lost  # reserved below, once
            )
            / 1000.0
        )
        for uuid, info in roster.lost.items():
            state = self.actuator.states.get(uuid)
            limit_mw = state.power_limit_mw if state is not None else None
            if limit_mw is None:
                entry = self.journal.get(uuid) if self.journal is not None else None
                limit_mw = entry.power_limit_mw if entry is not None else None
            reserved_w += (limit_mw or info.power_limit_default_mw) / 1000.0
        if roster.unopened:
            # A GPU never opened is taken to run at the node's largest default limit.
            known = [*roster.infos.values(), *roster.lost.values()]
            default_mw = max((info.power_limit_default_mw for info in known), default=0)
            reserved_w += len(roster.unopened) * default_mw / 1000.0
        return reserved_w

    def _make_pool(
        self, after: ScrapePool | InlineScrapePool | None = None
    ) -> ScrapePool | InlineScrapePool:
        """A pool over the groups' readers; `after` is the pool it replaces (a reload)."""
        sources = [group.source for group in self.groups]
        if self._inline_scrape:
            return InlineScrapePool(sources)
        return ScrapePool(sources, after=after if isinstance(after, ScrapePool) else None)

    def _build_groups(self, config: Config) -> list[Group]:
        """One group per server. A server whose GPUs are unknown (discovery failed) is
        observed only: it has no GPUs and the policy never sees it. A GPU two servers are
        found on is controlled for neither (GpuRoster.shared), from now until the next build.
        ConfigError for a server's GPU the node lacks and control clocks the GPUs cannot take."""
        check_clock_settings(config.control, self.roster.infos.values())
        claimed: set[str] = set()
        claims = [
            self.roster.claim(server, f"servers[{i}]", claimed, anew=True)
            for i, server in enumerate(config.servers)
        ]
        servers_on: dict[str, set[str]] = {}
        for server, claim in zip(config.servers, claims, strict=True):
            for uuid in [*claim.uuids, *claim.shared]:
                servers_on.setdefault(uuid, set()).add(server.name)
        shared = {uuid: servers_on[uuid] for claim in claims for uuid in claim.shared}
        groups = []
        for i, (server, claim) in enumerate(zip(config.servers, claims, strict=True)):
            claimed_uuids = [uuid for uuid in claim.uuids if uuid not in shared]
            uuids = [uuid for uuid in claimed_uuids if uuid in self.roster.infos]
            lost = [uuid for uuid in claimed_uuids if uuid in self.roster.lost]
            why = claim.why
            if lost and not uuids:
                why = f"its GPUs {', '.join(lost)} are lost; they rejoin it when they answer"
            mine = [uuid for uuid in [*claim.uuids, *claim.shared] if uuid in shared]
            if mine:
                shared_why = f"its GPUs {', '.join(mine)} run another server too: {SHARED_WHY}"
                if uuids:
                    log.warning("server %s: %s; controlling the others", server.name, shared_why)
                else:
                    why = f"{why}; {shared_why}" if claimed_uuids else shared_why
            if claim.missing:
                log.warning(
                    "server %s: its GPUs %s cannot be opened (%s); they join it once they do",
                    server.name,
                    ", ".join(str(gpu) for gpu in claim.missing),
                    self.roster.unopened_text(),
                )
            if not uuids:
                log.warning(
                    "server %s: observed only, its GPUs are not controlled: %s", server.name, why
                )
            spec = GroupSpec(
                name=server.name,
                server=server.name,
                gpus=tuple(self.roster.infos[uuid] for uuid in uuids),
                slo=server.slo,
            )
            source = make_source(server, self._new_fetcher())
            key = f"servers[{i}]"
            groups.append(
                Group(spec, source, uuids, key, lost_uuids=lost, missing_gpus=claim.missing)
            )
        self.roster.shared = shared
        return groups

    def _new_fetcher(self) -> Fetcher:
        """For one reader of a server: the fetcher given, else a connection of its own kept
        open between reads (closed with the reader)."""
        return self._fetch if self._fetch is not None else KeepAliveFetcher()

    # ----------------------------------------------------------------- one tick

    def warmup(self) -> None:
        """Compile the controller's kernels (before READY=1)."""
        self.policy.warmup()

    def tick(self, now_s: float, *, unix_time_s: float | None = None) -> Snapshot:
        """One pass: read GPUs and servers, decide, act, publish. Returns the snapshot.

        now_s is the loop's clock (monotonic, or a simulation's virtual time): intervals and
        rates come from it. The snapshot is stamped with unix_time_s, else now_s."""
        started = time.perf_counter()
        # Rates run between the times servers answered: a slow GPU read or lookup before the
        # scrape (an NVML call can hang for seconds) is time the servers' counters ran on.
        taken_s = time.monotonic()
        interval_s = (
            self.config.interval_s if self._prev_tick_s is None else now_s - self._prev_tick_s
        )
        self._prev_tick_s = now_s
        found = self.roster.rediscover(now_s, self.groups)
        if found.groups_changed or (found.out_of_reach_changed and self.config.mode == "budget"):
            # In budget mode the GPUs out of reach hold a reserve of the budget.
            self._reconfigure_policy(self.config)
        readings = self.roster.read(self.groups)
        if self.config.mode == "budget":
            # Before the observations count each group's limited GPUs: a refusal met by the
            # last tick's writes, a GPU back from a loss with what it keeps out of the budget.
            self._reserve_limits_out_of_reach(readings)
        samples = self._pool.poll_all(
            now_s, deadline_s=max(0.05, self.config.interval_s * 0.6), taken_s=taken_s
        )
        observations = [
            self._observe(group, sample, readings, now_s, interval_s)
            for group, sample in zip(self.groups, samples, strict=True)
        ]
        # Counted before acting: a write that fails later does not unspend the energy.
        grid = self.grid.poll()
        self._count_grid(observations, grid)
        controlled = [
            (group, observation)
            for group, observation in zip(self.groups, observations, strict=True)
            if group.controlled
        ]
        decisions = self.policy.decide(now_s, [observation for _, observation in controlled])
        for (group, _), decision in zip(controlled, decisions, strict=True):
            group.decision = decision
        self._note_budget_feasibility()
        self.roster.retry(self.groups)
        # A backlog the decision does not know about is still there: the guard's raise holds
        # from the tick on, not from its next read.
        raised = self._raised_caps(now_s)
        for (group, observation), decision in zip(controlled, decisions, strict=True):
            cap_mhz = raised.get(group.spec.name)
            applied = decision
            if cap_mhz is not None:
                if not self.actuator.dry_run:
                    applied = _raised(decision, cap_mhz)
                self._note_raise(group, cap_mhz, now_s)
            self._act(group, applied, observation, readings)
        self.ticks_total += 1
        stamp_s = now_s if unix_time_s is None else unix_time_s
        snapshot = self._snapshot(stamp_s, readings, samples, observations, grid)
        snapshot = _with_duration(snapshot, time.perf_counter() - started)
        self.last_snapshot = snapshot
        if self._publish is not None:
            self._publish(snapshot)
        return snapshot

    def _observe(
        self,
        group: Group,
        sample: ServerSample,
        readings: dict[str, GpuReading],
        now_s: float,
        interval_s: float,
    ) -> GroupObservation:
        group.last_sample = sample
        self._log_server_problem(group, sample)
        # A server running requests whose token counter has not moved this tick (SGLang counts
        # a batch every 40 steps, seconds apart on a slow model) is live, not stale.
        if sample.up and (sample.generation_tokens_per_s is not None or sample.running):
            group.last_good_sample_s = now_s
        stale = (
            group.last_good_sample_s is None
            or now_s - group.last_good_sample_s > self.config.stale_after_s
        )
        energy_j: float | None = 0.0
        power_w: float | None = 0.0
        clocks = []
        reasons = 0
        held_by_lowered_cap = False
        for uuid in group.uuids:
            reading = readings.get(uuid)
            delta_j = self._energy_delta_j(uuid, reading, interval_s)
            if reading is None:
                energy_j = power_w = None
                continue
            # A powered GPU never draws 0 W: a 0 is a sensor that failed to read.
            power_mw = reading.power_mw or None
            if energy_j is not None:
                if delta_j is None and power_mw is not None:
                    delta_j = power_mw / 1000.0 * interval_s
                energy_j = None if delta_j is None else energy_j + delta_j
            if power_w is not None:
                power_w = None if power_mw is None else power_w + power_mw / 1e3
            if reading.sm_clock_mhz is not None:
                clocks.append(reading.sm_clock_mhz)
            reasons |= reading.clock_event_reasons or 0
            limit_mw = reading.enforced_power_limit_mw or reading.power_limit_mw
            if (reading.clock_event_reasons or 0) & POWER_CAP_REASONS and limit_mw is not None:
                held_by_lowered_cap |= limit_mw < self.infos[uuid].power_limit_default_mw
        if not group.uuids:
            energy_j = power_w = None
            group.efficiency_window.clear()  # no GPUs left: no efficiency to report
        sm_clock_mhz = sum(clocks) / len(clocks) if clocks else None
        interval_cap_mhz = None
        if sm_clock_mhz is not None and group.guard_raises and group.decision is not None:
            # The reading is an instant under the last raise for the backlog. The controller
            # judges the cap it chose (its latency model, the clocks misses blame); the prompt
            # work of the interval was done at the caps in force over it.
            chosen_mhz = group.decision.sm_clock_max_mhz
            interval_cap_mhz = min(
                sm_clock_mhz,
                _mean_cap_mhz(chosen_mhz, group.guard_raises, now_s - interval_s, now_s),
            )
            sm_clock_mhz = min(sm_clock_mhz, chosen_mhz)
        group.guard_raises.clear()
        tokens_per_s = sample.generation_tokens_per_s if sample.up else None
        if energy_j is not None and tokens_per_s is not None:
            group.efficiency_window.append((now_s, tokens_per_s * interval_s, energy_j))
        _drop_older(
            group.efficiency_window, now_s, EFFICIENCY_WINDOW_TICKS * self.config.interval_s
        )
        self._judge_target(group, now_s, tokens_per_s, interval_s, energy_j)
        if sample.up and not stale:
            group.slo_history.append((now_s, self._slo_met(group, sample) is not False))
        _drop_older(group.slo_history, now_s, SLO_WINDOW_TICKS * self.config.interval_s)
        return GroupObservation(
            group=group.spec.name,
            interval_s=interval_s,
            gpu_count=len(group.uuids),
            energy_j=energy_j,
            power_w=power_w,
            generation_tokens_per_s=tokens_per_s,
            prompt_tokens_per_s=sample.prompt_tokens_per_s if sample.up else None,
            running=sample.running if sample.up else None,
            waiting=sample.waiting if sample.up else None,
            ttft_q_s=sample.ttft_q_s if sample.up else None,
            itl_q_s=sample.itl_q_s if sample.up else None,
            sm_clock_mhz=sm_clock_mhz,
            clock_event_reasons=reasons,
            held_by_lowered_cap=held_by_lowered_cap,
            limited_gpu_count=(
                sum(uuid not in self._limits_out_of_reach_mw for uuid in group.uuids)
                if self._limits_out_of_reach_mw
                else None
            ),
            stale=stale,
            realtime=sample.realtime,
            prompt_per_chunk=sample.prompt_per_chunk,
            ttft_slowest_s=sample.ttft_slowest_s if sample.up else None,
            kv_cache_usage=sample.kv_cache_usage if sample.up else None,
            preemptions=sample.preemptions if sample.up else None,
            prefill_busy_s=_over_tick(sample.prefill_busy_s, sample.window_s, interval_s)
            if sample.up
            else None,
            prompt_tokens_weighted_mean=sample.prompt_tokens_weighted_mean if sample.up else None,
            first_token_blind=self._first_token_blind(group, sample),
            interval_clock_cap_mhz=interval_cap_mhz,
            finished_requests_per_s=_per_s(sample.finished_requests, sample.window_s)
            if sample.up
            else None,
        )

    @staticmethod
    def _first_token_blind(group: Group, sample: ServerSample) -> bool:
        """sample.first_token_blind, logged once a server that generates tokens has gone
        BLIND_WARN_READS reads without either histogram (a fresh server may create its series
        at its first request)."""
        blind = sample.first_token_blind
        if not blind:
            group.blind_reads = 0
        elif (sample.generation_tokens_per_s or 0.0) > 0.0:
            group.blind_reads += 1
            if group.blind_reads == BLIND_WARN_READS:
                log.warning("%s", first_token_blind_warning(group.spec.name, sample.kind))
        return blind

    def _log_server_problem(self, group: Group, sample: ServerSample) -> None:
        """A server unreadable for SERVER_DOWN_READS reads in a row is logged with why, and
        again once it has been read for the problem log's quiet period (a lone failed scrape
        is not: it is in powerd_source_up, which also shows at once that it is back)."""
        key = ("server", group.spec.name)
        if sample.up:
            self._problems.cleared(key, "server %s: read again", group.spec.name)
            return
        self._problems.problem(
            key,
            logging.WARNING,
            "server %s: %s",
            group.spec.name,
            sample.error or "cannot read its metrics",
            after=SERVER_DOWN_READS,
        )

    def _energy_delta_j(
        self, uuid: str, reading: GpuReading | None, interval_s: float
    ) -> float | None:
        """The GPU's energy over this tick of interval_s from its counter; None when the
        counter cannot say (the caller then takes power x interval). A delta the GPU could not
        have drawn in the interval (a counter read wrong once) is not believed."""
        if reading is None or reading.energy_mj is None:
            # The next delta would span two ticks and be taken for one.
            self._prev_energy_mj.pop(uuid, None)
            return None
        previous = self._prev_energy_mj.get(uuid)
        if previous is not None and reading.energy_mj == previous:
            # A powered GPU never uses 0 J in a tick: the counter is stuck, and the delta when
            # it moves again would hold the ticks already counted as power x interval.
            self._prev_energy_mj.pop(uuid)
            return None
        self._prev_energy_mj[uuid] = reading.energy_mj
        if previous is None or reading.energy_mj < previous:
            return None  # first reading, or the counter restarted with a driver reload
        delta_j = (reading.energy_mj - previous) / 1000.0
        info = self.infos.get(uuid)
        max_w = _UNLIMITED_GPU_MAX_W
        if info is not None and info.power_limit_max_mw > 0:
            max_w = info.power_limit_max_mw / 1000.0
        if delta_j > _MAX_POWER_SHARE * max_w * interval_s:
            return None
        return delta_j

    @staticmethod
    def _slo_met(group: Group, sample: ServerSample) -> bool | None:
        slo = group.spec.slo
        checks = []
        if sample.ttft_q_s is not None:
            checks.append(sample.ttft_q_s <= slo.ttft_s)
        if sample.itl_q_s is not None:
            checks.append(sample.itl_q_s <= slo.itl_s)
        if sample.waiting is not None:
            checks.append(sample.waiting <= slo.max_waiting)
        return all(checks) if checks else None

    def _act(
        self,
        group: Group,
        decision: GroupDecision,
        observation: GroupObservation,
        readings: dict[str, GpuReading],
    ) -> None:
        per_gpu_power_w = (
            observation.power_w / observation.gpu_count
            if observation.power_w is not None and observation.gpu_count
            else None
        )
        # The tick's reading shows an operator's limit even when powerd writes none.
        limits_mw = {
            uuid: readings[uuid].power_limit_mw for uuid in group.uuids if uuid in readings
        }
        try:
            self.actuator.apply(
                decision,
                list(group.uuids),
                per_gpu_power_w,
                observation.sm_clock_mhz,
                limits_mw=limits_mw,
            )
        except GpuLost as exc:
            self.roster.drop(exc.uuid or "", exc, self.groups)

    # ----------------------------------------------------------------- between ticks

    def guard(self, now_s: float) -> int:
        """Read the prompt backlog of servers that report one and raise at once the cap of
        groups whose backlog would not be prefilled in time at the cap last decided. Only
        raises; the next tick decides again. Returns the number of groups raised."""
        raised = self._raised_caps(now_s)
        count = 0
        for group in self.groups:
            cap_mhz = raised.get(group.spec.name)
            decision = group.decision
            if cap_mhz is None or decision is None:
                continue
            # A dry run counts the raises it would make (exported) without logging each one:
            # at four reads a second they would bury the tick's decisions.
            if not self.actuator.dry_run:
                try:
                    self.actuator.apply(_raised(decision, cap_mhz), list(group.uuids))
                except GpuLost as exc:
                    self.roster.drop(exc.uuid or "", exc, self.groups)
                    continue
            self._note_raise(group, cap_mhz, now_s)
            count += 1
        return count

    def _note_raise(self, group: Group, cap_mhz: int, now_s: float) -> None:
        """Count a raise for the backlog; keep it for the next observation where it was applied
        (a dry run applies none)."""
        group.guard_raises_total += 1
        if not self.actuator.dry_run:
            group.guard_raises.append((now_s, cap_mhz))

    def _raised_caps(self, now_s: float) -> dict[str, int]:
        """Read the prompt backlogs and return the cap each group whose backlog would not be
        prefilled in time at its decided cap needs, by group name."""
        if not self.guards_backlog:
            return {}
        backlogs: dict[str, float] = {}
        for group in self.groups:
            probe = self._backlog_probe(group)
            decision = group.decision
            if probe is None or decision is None or not group.uuids:
                continue
            if decision.sm_clock_max_mhz >= min(gpu.sm_clock_max_mhz for gpu in group.spec.gpus):
                # Already at f_max: nothing to raise, no read needed, and no stale figure kept.
                group.prompt_backlog_tokens = None
                continue
            backlog = probe.read(now_s)
            group.prompt_backlog_tokens = backlog
            if backlog is not None:
                backlogs[group.spec.name] = backlog
        return self.policy.prefill_guard(backlogs) if backlogs else {}

    def _backlog_probe(self, group: Group) -> PromptBacklogProbe | None:
        if group.backlog_probe is None and group.source.kind == "sglang":
            server = group.source.config
            # A read that takes longer than the interval between reads is of no use.
            timeout_s = min(server.timeout_s, self.config.control.prefill_guard_interval_s)
            probe = PromptBacklogProbe(server.name, server.url, self._new_fetcher(), timeout_s)
            group.backlog_probe = probe
        return group.backlog_probe

    @property
    def guards_backlog(self) -> bool:
        """Whether guard() can act: it is on, fits twice between ticks, the policy has a
        prefill guard, and a server is, or may turn out to be, SGLang."""
        if not self.policy.guards_prefill:
            return False
        guard_s = self.config.control.prefill_guard_interval_s
        return 0 < guard_s <= self.config.interval_s / 2 and any(
            group.source.kind in ("sglang", "auto") for group in self.groups
        )

    # ----------------------------------------------------------------- publishing

    def _count_grid(self, observations: Sequence[GroupObservation], grid: GridState) -> None:
        """Add each group's GPU energy of the tick, times PUE, at the price and carbon
        intensity in force, to its totals. A total starts at the first tick with a value in
        force and the group's energy measured (a group with no GPUs has none: its tokens cost
        nothing powerd counts); a tick without either adds nothing. Energy at a negative price
        is a credit, kept apart so that both totals only grow (Prometheus counters)."""
        currency, pue = self.config.grid.currency, self.config.grid.pue
        price, carbon = grid.price_per_kwh, grid.carbon_g_per_kwh
        for observation in observations:
            if observation.energy_j is None:
                continue
            kwh = facility_kwh(observation.energy_j, pue)
            if price is not None:
                key = (observation.group, currency)
                cost = self._energy_cost_total.setdefault(key, 0.0)
                credit = self._energy_credit_total.setdefault(key, 0.0)
                if price >= 0:
                    self._energy_cost_total[key] = cost + kwh * price
                else:
                    self._energy_credit_total[key] = credit - kwh * price
            if carbon is not None:
                grams = self._carbon_g_total.setdefault(observation.group, 0.0)
                self._carbon_g_total[observation.group] = grams + kwh * carbon

    def _snapshot(
        self,
        timestamp_s: float,
        readings: dict[str, GpuReading],
        samples: list[ServerSample],
        observations: list[GroupObservation],
        grid: GridState,
    ) -> Snapshot:
        gpus = []
        for uuid, state in self.actuator.states.items():
            # A GPU that could not be read, or is lost, stays in view with what powerd set.
            reading = readings.get(uuid) or _unread(state.info, timestamp_s)
            lock_mhz, limit_mw = self.roster.device_settings(uuid)
            gpus.append(
                GpuStatus(
                    reading=reading,
                    info=state.info,
                    configured_power_limit_mw=limit_mw,
                    sm_clock_lock_max_mhz=lock_mhz,
                    observe_only=state.observe_only or self.actuator.dry_run,
                    observe_only_reason=state.observe_only_reason
                    or ("dry_run" if self.actuator.dry_run else ""),
                )
            )
        states = {s["group"]: s for s in self.policy.group_state()}
        groups = []
        for group, observation in zip(self.groups, observations, strict=True):
            # A stale server's windows describe the time before it went quiet: its figures are
            # absent, as its own series are, rather than frozen at their last values.
            efficiency = () if observation.stale else group.efficiency_window
            slo_history = () if observation.stale else group.slo_history
            tokens = sum(t for _, t, _ in efficiency)
            joules = sum(j for _, _, j in efficiency)
            energy_per_token_j = joules / tokens if tokens > 0 else None
            policy_state = states.get(group.spec.name, {})
            decision = group.decision
            sample = group.last_sample
            grid_key = (group.spec.name, self.config.grid.currency)
            groups.append(
                GroupStatus(
                    group=group.spec.name,
                    server=group.spec.server,
                    model_name=sample.model_name if sample else "",
                    gpu_uuids=tuple(group.uuids),
                    mode=decision.mode if decision else self.config.mode,
                    sm_clock_max_mhz=decision.sm_clock_max_mhz if decision else None,
                    power_limit_mw=decision.power_limit_mw if decision else None,
                    tokens_per_joule=tokens / joules if joules > 0 else None,
                    energy_per_token_j=energy_per_token_j,
                    generation_tokens_per_s=observation.generation_tokens_per_s,
                    power_w=observation.power_w,
                    ttft_q_s=observation.ttft_q_s,
                    itl_q_s=observation.itl_q_s,
                    ttft_slo_s=group.spec.slo.ttft_s,
                    itl_slo_s=group.spec.slo.itl_s,
                    slo_quantile=group.spec.slo.quantile,
                    slo_met=self._slo_met(group, sample) if sample and sample.up else None,
                    slo_attainment=(
                        sum(met for _, met in slo_history) / len(slo_history)
                        if slo_history
                        else None
                    ),
                    target_tokens_per_joule=policy_state.get("target_tokens_per_joule"),
                    target_reached=group.target_reached,
                    observe_only=not group.uuids
                    or all(self.actuator.states[u].observe_only for u in group.uuids),
                    dry_run=self.actuator.dry_run,
                    cost_per_million_tokens=_per_million(
                        grid.price_per_kwh, energy_per_token_j, self.config.grid.pue
                    ),
                    carbon_g_per_million_tokens=_per_million(
                        grid.carbon_g_per_kwh, energy_per_token_j, self.config.grid.pue
                    ),
                    energy_cost_total=self._energy_cost_total.get(grid_key),
                    energy_credit_total=self._energy_credit_total.get(grid_key),
                    carbon_g_total=self._carbon_g_total.get(group.spec.name),
                    decision_reason=decision.reason_label if decision else "",
                    prompt_backlog_tokens=group.prompt_backlog_tokens,
                    prefill_guard_raises_total=(
                        group.guard_raises_total
                        if group.backlog_probe is not None and group.backlog_probe.supported
                        else None
                    ),
                )
            )
        return Snapshot(
            timestamp_s=timestamp_s,
            gpus=tuple(gpus),
            servers=tuple(samples),
            groups=tuple(groups),
            nvml_errors=dict(self.backend.error_counts),
            gpus_unopened=len(self.roster.unopened),
            gpus_shared=len(self.roster.shared),
            restores_total=self.roster.restores_total,
            restore_failures_total=self.roster.restore_failures_total,
            ticks_total=self.ticks_total,
            mode=self.config.mode,
            dry_run=self.actuator.dry_run,
            grid_price_per_kwh=grid.price_per_kwh,
            grid_carbon_g_per_kwh=grid.carbon_g_per_kwh,
            grid_currency=self.config.grid.currency,
            grid_pue=self.config.grid.pue,
            grid_signals=grid.signals,
            grid_file_errors_total=grid.file_errors_total,
            grid_file_problems=grid.file_problems,
            node_power_budget_w=(
                self.config.node_power_budget_w if self.config.mode == "budget" else None
            ),
            node_power_budget_feasible=self.budget_feasible(),
        )

    # ----------------------------------------------------------------- lifecycle

    def restore(self) -> bool:
        """Put back every GPU setting powerd changed. True when all were restored."""
        return self.roster.restore()

    def publish_restored(self, now_s: float, *, unix_time_s: float | None = None) -> None:
        """Publish the last snapshot again with the GPUs read anew after restore(): a final
        scrape then shows what the GPUs were left with. Stamped as tick() stamps."""
        last = self.last_snapshot
        if last is None or self._publish is None:
            return
        readings = self.roster.read(self.groups)
        gpus = []
        for gpu in last.gpus:
            uuid = gpu.info.uuid
            lock_mhz, limit_mw = self.roster.device_settings(uuid)
            gpus.append(
                replace(
                    gpu,
                    reading=readings.get(uuid, gpu.reading),
                    configured_power_limit_mw=limit_mw,
                    sm_clock_lock_max_mhz=lock_mhz,
                )
            )
        self._publish(
            replace(
                last,
                timestamp_s=now_s if unix_time_s is None else unix_time_s,
                gpus=tuple(gpus),
                restores_total=self.roster.restores_total,
                restore_failures_total=self.roster.restore_failures_total,
                loop_duration_s=None,
            )
        )

    def reload(self, config_path: str | Path) -> bool:
        """Re-read the config; apply it when valid, keep the old one otherwise (whatever the
        error: a reload must never stop the daemon). state_dir, gpu_backend and sim keep their
        running values, and metrics its running server: they change only at restart."""
        groups: list[Group] = []
        try:
            config = load_config(config_path)
            if self._config_transform is not None:
                config = self._config_transform(config)
            config = self._keep_start_up_settings(config)
            groups = self._build_groups(config)
        except ConfigError as exc:
            log.error("reload: invalid config, keeping the running one: %s", exc)
            close_connections(groups)
            return False
        except Exception:
            log.exception("reload: cannot apply %s, keeping the running config", config_path)
            close_connections(groups)
            return False
        groups = self._keep_unchanged_groups(config, groups)
        self._pool.close()
        close_connections([old for old in self.groups if all(old is not g for g in groups)])
        claimed = {uuid for group in groups for uuid in group.uuids}
        leaving_dry_run = self.actuator.dry_run and not config.dry_run
        if config.dry_run and not self.actuator.dry_run:
            self.roster.restore_for_dry_run()
        else:
            released = [u for g in self.groups for u in g.uuids if u not in claimed]
            self.roster.release(released, self.groups)
        self.config = config
        self.actuator.dry_run = config.dry_run
        if leaving_dry_run:
            self.roster.hand_unrestored_to_wet_run(claimed, self.groups)
        self.actuator.retry_power_limits()
        self.grid = GridSignal(config.grid, previous=self.grid)
        self.groups = groups
        names = {group.spec.name for group in groups}
        for totals in (self._energy_cost_total, self._energy_credit_total):
            for key in [key for key in totals if key[0] not in names]:
                del totals[key]
        for name in [name for name in self._carbon_g_total if name not in names]:
            del self._carbon_g_total[name]
        self._reconfigure_policy(config)
        self._pool = self._make_pool(after=self._pool)
        log.info(
            "reload: applied %s (mode %s, %s)",
            config_path,
            config.mode,
            counted(len(groups), "server"),
        )
        return True

    def _keep_unchanged_groups(self, config: Config, groups: list[Group]) -> list[Group]:
        """`groups`, in which each server whose config and GPUs a reload left as they were keeps
        its running group (closing the new one's connection): its reader's rates, staleness and
        SLO history carry on. A new reader has no rate until its second read, so the group
        would read as stale for a tick and start again from f_max. A changed server's new group
        carries on its running group's count of guard raises."""
        servers_before = {server.name: server for server in self.config.servers}
        servers_now = {server.name: server for server in config.servers}
        running = {group.spec.name: group for group in self.groups}
        result = []
        for group in groups:
            name = group.spec.name
            old = running.get(name)
            if (
                old is not None
                and servers_before.get(name) == servers_now[name]
                and (old.spec, old.uuids, old.lost_uuids, old.missing_gpus)
                == (group.spec, group.uuids, group.lost_uuids, group.missing_gpus)
            ):
                close_connections([group])
                old.config_key = group.config_key  # the server may have moved in the list
                result.append(old)
            else:
                if old is not None:
                    # A counter must not go back within a process: Prometheus reads a drop as
                    # a restart.
                    group.guard_raises_total = old.guard_raises_total
                result.append(group)
        return result

    def _keep_start_up_settings(self, config: Config) -> Config:
        """`config` with the running state_dir, gpu_backend, sim and metrics endpoint (address,
        port, web config), and a warning for each that differs: the journal, the backend, the
        simulated node and the metrics server stay as started. The final scrape wait is the
        new one (the next stop reads it)."""
        running = self.config
        metrics = replace(running.metrics, final_scrape_wait_s=config.metrics.final_scrape_wait_s)
        if config.metrics != metrics:
            log.warning(
                "reload: metrics.listen_address, port and web_config_file change only at restart"
            )
        if config.state_dir != running.state_dir:
            log.warning(
                "reload: state_dir changes only at restart; the saved GPU settings stay in %s "
                "until then (`powerd restore --state-dir %s` reads them)",
                running.state_dir,
                running.state_dir,
            )
        if config.gpu_backend != running.gpu_backend:
            log.warning(
                "reload: gpu_backend changes only at restart; keeping %s", running.gpu_backend
            )
        if running.gpu_backend == "sim" and config.sim != running.sim:
            log.warning("reload: sim settings change only at restart")
        return replace(
            config,
            state_dir=running.state_dir,
            gpu_backend=running.gpu_backend,
            sim=running.sim,
            metrics=metrics,
        )

    def request_stop(self) -> None:
        """Stop the loop (GPUs restored) at its next wait; safe from a signal handler."""
        self._stop.set()

    def request_reload(self) -> None:
        """Read the config again at the next tick; safe from a signal handler."""
        self._reload.set()

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT stop the loop, SIGHUP reloads."""
        handle_stop_and_reload_signals(self.request_stop, self.request_reload)

    def run_forever(
        self,
        *,
        config_path: str | Path | None = None,
        on_tick: Callable[[Snapshot], None] | None = None,
        duration_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        unix_clock: Callable[[], float] = time.time,
    ) -> bool:
        """Tick every interval on `clock` until stopped (a signal, or duration_s elapsed), then
        restore; True when every GPU was restored. Snapshots are stamped with `unix_clock`
        (what Prometheus compares to time())."""
        started = clock()
        next_tick = started
        restored = False
        try:
            while not self._stop.is_set():
                if self._reload.is_set():
                    self._reload.clear()
                    if self._notifier:
                        self._notifier.reloading()
                    if config_path is not None:
                        self.reload(config_path)
                    if self._notifier:
                        self._notifier.ready()
                now = clock()
                if duration_s is not None and now - started >= duration_s:
                    break
                try:
                    snapshot = self.tick(now, unix_time_s=unix_clock())
                except GpuError as exc:
                    self._last_tick_ok = False
                    log.error("tick failed: %s", exc)
                else:
                    self._last_tick_ok = True
                    if self._notifier:
                        self._notifier.watchdog()
                        self._notifier.status(_status_line(snapshot))
                    if on_tick is not None:
                        on_tick(snapshot)
                next_tick += self.config.interval_s
                if next_tick < clock():
                    next_tick = clock()
                self._wait_until(next_tick, clock)
        finally:
            if self._notifier:
                self._notifier.stopping()
            self._pool.close()
            close_connections(self.groups)
            restored = self.restore()
            self.publish_restored(clock(), unix_time_s=unix_clock())
        return restored

    def _wait_until(self, deadline_s: float, clock: Callable[[], float]) -> None:
        """Sleep until deadline_s on `clock` or a stop, running guard() every guard interval
        and, after a good tick, pinging the watchdog every half of its timeout
        (sd_watchdog_enabled(3)), so no tick interval is too long for WatchdogSec."""
        guard_step_s = self.config.control.prefill_guard_interval_s if self.guards_backlog else 0.0
        ping_step_s = self._watchdog_step_s() if self._last_tick_ok else None
        now_s = clock()
        next_guard_s = now_s + guard_step_s
        next_ping_s = now_s + ping_step_s if ping_step_s else math.inf
        while not self._stop.is_set():
            left_s = deadline_s - now_s
            if left_s <= 0:
                return
            wake_s = min(deadline_s, next_ping_s)
            # A guard read due in the last half step before the tick is left to the tick.
            if guard_step_s and left_s > guard_step_s / 2:
                wake_s = min(wake_s, next_guard_s)
            if self._stop.wait(max(0.0, wake_s - now_s)) or wake_s == deadline_s:
                return
            now_s = clock()
            if ping_step_s and now_s >= next_ping_s and self._notifier:
                self._notifier.watchdog()
                next_ping_s = now_s + ping_step_s
            if guard_step_s and now_s >= next_guard_s:
                next_guard_s = now_s + guard_step_s
                if deadline_s - now_s > guard_step_s / 2:
                    try:
                        self.guard(now_s)
                    except GpuError as exc:
                        log.error("guard failed: %s", exc)
                    now_s = clock()

    def _watchdog_step_s(self) -> float | None:
        """Half the systemd watchdog timeout, or None without a watchdog."""
        timeout_s = self._notifier.watchdog_interval_s() if self._notifier else None
        return timeout_s / 2 if timeout_s else None


class _Notifier(Protocol):
    """The part of powerd.systemd.Notifier the loop uses."""

    def ready(self) -> None: ...
    def reloading(self) -> None: ...
    def stopping(self) -> None: ...
    def watchdog(self) -> None: ...
    def status(self, text: str) -> None: ...
    def watchdog_interval_s(self) -> float | None: ...


def _raised(decision: GroupDecision, cap_mhz: int) -> GroupDecision:
    """The decision with its cap raised for a backlog. Outside budget mode a limit comes from
    tracking the drawn power, which prefill at the raised clock would exceed: it goes."""
    limit_mw = decision.power_limit_mw if decision.mode == "budget" else None
    return replace(decision, sm_clock_max_mhz=cap_mhz, power_limit_mw=limit_mw)


def _unread(info: GpuInfo, timestamp_s: float) -> GpuReading:
    """The reading of a GPU that could not be read: every figure unknown."""
    return GpuReading(
        uuid=info.uuid,
        index=info.index,
        timestamp_s=timestamp_s,
        power_mw=None,
        energy_mj=None,
        sm_clock_mhz=None,
        power_limit_mw=None,
        enforced_power_limit_mw=None,
        clock_event_reasons=None,
        temperature_c=None,
    )


def _mean_cap_mhz(
    chosen_mhz: float, raises: Sequence[tuple[float, int]], start_s: float, end_s: float
) -> float:
    """The time-weighted clock cap over [start_s, end_s]: chosen_mhz, then each raise's cap
    from its time on."""
    if end_s <= start_s:
        return float(raises[-1][1]) if raises else chosen_mhz
    total = 0.0
    since_s, cap_mhz = start_s, float(chosen_mhz)
    for when_s, raised_mhz in raises:
        when_s = min(max(when_s, since_s), end_s)
        total += cap_mhz * (when_s - since_s)
        since_s, cap_mhz = when_s, float(raised_mhz)
    total += cap_mhz * (end_s - since_s)
    return total / (end_s - start_s)


def _per_million(
    per_kwh: float | None, energy_per_token_j: float | None, pue: float
) -> float | None:
    """Cost or carbon of a million tokens at `per_kwh` of facility energy; None when either
    is unknown."""
    per_token = at_facility(per_kwh, energy_per_token_j, pue)
    return None if per_token is None else per_token * 1e6


def _per_s(count: float | None, window_s: float | None) -> float | None:
    """A count over a window of window_s seconds, per second; None when either is unknown."""
    if count is None or window_s is None or not window_s > 0:
        return None
    return count / window_s


def _over_tick(amount: float | None, window_s: float | None, interval_s: float) -> float | None:
    """An amount counted over a window of window_s seconds, as over the tick's interval_s (the
    controller sets it beside the tick's rates x interval_s); None when either is unknown."""
    if amount is None or window_s is None or not window_s > 0:
        return None
    return amount * (interval_s / window_s)


def _with_duration(snapshot: Snapshot, duration_s: float) -> Snapshot:
    return replace(snapshot, loop_duration_s=duration_s)


def _status_line(snapshot: Snapshot) -> str:
    parts = []
    for group in snapshot.groups:
        tpj = f"{group.tokens_per_joule:.2f}" if group.tokens_per_joule is not None else "-"
        parts.append(f"{group.group}: {group.sm_clock_max_mhz} MHz {tpj} tok/J")
    return "; ".join(parts) or "no servers"
