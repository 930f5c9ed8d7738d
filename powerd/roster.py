"""Which GPUs the daemon controls, and giving back those it no longer does.

GpuRoster keeps the GPUs NVML opens (`infos`), those lost while powerd ran (`lost`) and those
NVML counts but cannot open (`unopened`). It finds each server's GPUs, looks again on a
schedule for lost and unopened GPUs and for the GPUs of discovered servers, and hands what it
finds to the groups. It puts back the settings of GPUs no group controls any more (released,
or restored for a dry run), again at every tick while a write fails.

The daemon owns the groups and passes them in; the roster changes their GPUs in place and tells
the daemon when the policy must see them again: through `on_groups_changed` at each loss,
wherever it is met (a read, a write, a release), and through what rediscover() returns.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from powerd.actuator import Actuator
from powerd.config import ConfigError, ServerConfig
from powerd.gpu.backend import GpuBackend, locate_gpu
from powerd.gpu.errors import GpuError, GpuLost
from powerd.groups import Group, controlled_uuids
from powerd.journal import Journal, restore_all
from powerd.logging_setup import ProblemLog
from powerd.model import DISCOVERY_RETRY_S, SHARED_WHY, GpuInfo, GpuReading, GroupDecision
from powerd.sources.gpumap import discover_server_gpus

# Every line carries its logger's name: GPU membership logs as the daemon it was part of, so
# operators' searches of the journal for "powerd.daemon" still find losses and releases.
log = logging.getLogger("powerd.daemon")

GPU_STEADY_S = 600.0
"""A GPU back from a loss counts as steady again after answering this long: until then a new
loss is the same problem (a GPU that flaps logs a reminder every 10 min, not each loss and
return)."""
DISCOVERY_RETRY_MAX_S = 60.0
"""The wait between two discoveries of one server doubles up to this: each scans every
process's sockets (psutil), which costs more the busier the node."""
LOOK_WAIT_S = 1.0
"""How long the look for lost and unopened GPUs every DISCOVERY_RETRY_S waits for each to
answer (s). A GPU back from a reset answers in milliseconds; one whose firmware still hangs
starts a new hang each time its last call returns, which would hold that tick for the whole
stall limit."""


class Claim(NamedTuple):
    """A server's GPUs as the roster finds them."""

    uuids: list[str]
    """Its GPUs, lost ones included; none when they cannot be found or another server has
    them."""
    why: str
    """Why it has none, for the log ("" when it has some)."""
    missing: list[int | str]
    """Its configured GPUs (index or UUID) that NVML counts but cannot open yet."""
    shared: tuple[str, ...] = ()
    """Its GPUs that another server has too (see GpuRoster.shared): left out of `uuids`."""


class Rediscovery(NamedTuple):
    """What one rediscover() changed that the policy must be told of."""

    groups_changed: bool
    """A group's GPUs, or a GPU's description, changed."""
    out_of_reach_changed: bool
    """A lost GPU answers again, or the number of GPUs not opened changed: what a node power
    budget keeps for GPUs out of reach changed."""


@dataclass(slots=True)
class _LossEpisode:
    """A GPU lost and not steady since: the first loss and return are logged, later ones are
    the ProblemLog's reminder."""

    returns: int = 0
    losses: int = 1
    back_since_s: float | None = None
    """When it last came back (the loop's clock); None while it is lost."""
    lost_since_s: float | None = None
    """When it was last lost (the loop's clock); None while it is back."""
    told_still_lost: bool = False


class GpuRoster:
    """The node's GPUs as the daemon knows them, and the groups' share of them."""

    def __init__(
        self,
        backend: GpuBackend,
        actuator: Actuator,
        journal: Journal | None,
        *,
        problems: ProblemLog,
        last_tick_s: Callable[[], float | None],
        on_groups_changed: Callable[[], None],
        on_lost: Callable[[str], object],
    ) -> None:
        """Take in every GPU the backend opens, putting back first what a previous run left on
        it. `problems` is the daemon's log of lasting problems; `last_tick_s` gives the loop's
        clock at the last tick (None before the first). `on_groups_changed` is called where a
        lost GPU leaves its group, `on_lost` with the UUID of each GPU lost."""
        self._backend = backend
        self._actuator = actuator
        self._journal = journal
        self._problems = problems
        self._last_tick_s = last_tick_s
        self._on_groups_changed = on_groups_changed
        self._on_lost = on_lost
        self.infos: dict[str, GpuInfo] = {info.uuid: info for info in backend.devices()}
        self.lost: dict[str, GpuInfo] = {}
        """GPUs that went away while powerd ran; looked for again every DISCOVERY_RETRY_S."""
        self.unopened: dict[int, str] = {}
        """GPUs NVML counts but cannot open (lost before powerd started, no permission), by
        index, with why; opened again every DISCOVERY_RETRY_S."""
        self.restores_total = 0
        self.restore_failures_total = 0
        self._unreleased: dict[str, str] = {}
        """GPUs released whose settings could not be put back yet, and why they were released."""
        self._unrestored: dict[str, tuple[int | None, int | None]] = {}
        """GPUs a switch into a dry run could not restore -> the (clock lock MHz, power limit
        mW) of powerd's they hold; restored again every tick while the dry run lasts."""
        for info in list(self.infos.values()):
            self._take_in(info)
        self._loss_episodes: dict[str, _LossEpisode] = {}
        """GPUs lost and not steady since (GPU_STEADY_S back): one problem to the log."""
        self._next_sweep_s: float | None = None
        """When lost and unopened GPUs are looked for and unread power-limit ranges read again
        next (None: at the first rediscover(), DISCOVERY_RETRY_S from it)."""
        self.shared: dict[str, set[str]] = {}
        """GPUs two servers were found on (configured or discovered), with those servers'
        names: one clock limit cannot keep both servers' latency, and one server's tokens
        cannot price the GPU's energy, so no group controls them until the groups are built
        again (a reload) or a lookup finds all but one of the servers elsewhere."""
        self._note_unopened()

    # ----------------------------------------------------------------- finding a server's GPUs

    def claim(
        self, server: ServerConfig, key: str, claimed: set[str], *, anew: bool = False
    ) -> Claim:
        """The server's GPUs, added to `claimed`, and those configured that cannot be opened
        yet; or none and why, when they cannot be found. Its GPUs in `claimed` already or
        known to be shared (unless `anew`: a build of every group finds them again) are left
        out and listed as `shared` (the caller takes them from their groups: see _share()).
        `key` is where the config lists the server ("servers[2]"), for a ConfigError (see
        _resolve)."""
        uuids, why, missing, _ = self._resolve(server, key)
        known = set() if anew else self.shared
        shared = [uuid for uuid in uuids if uuid in claimed or uuid in known]
        claimed.update(uuids)
        if shared:
            uuids = [uuid for uuid in uuids if uuid not in shared]
            if not uuids:
                why = f"its GPUs {', '.join(shared)} run another server too: {SHARED_WHY}"
        return Claim(uuids, why, missing, tuple(shared))

    def _share(self, uuids: Sequence[str], groups: Sequence[Group], server: str) -> bool:
        """Take GPUs that `server` was found on from the groups that control them (see
        `shared`): they go back as found. True when a group's GPUs changed."""
        changed = False
        for uuid in uuids:
            names = self.shared.setdefault(uuid, set())
            if server not in names:
                names.add(server)
                names.update(g.spec.name for g in groups if uuid in [*g.uuids, *g.lost_uuids])
                log.warning("GPU %s: server %s runs on it too: %s", uuid, server, SHARED_WHY)
        for group in groups:
            taken = [uuid for uuid in group.uuids if uuid in uuids]
            group.lost_uuids = [uuid for uuid in group.lost_uuids if uuid not in uuids]
            if taken:
                group.set_gpus([uuid for uuid in group.uuids if uuid not in taken], self.infos)
                self.release(taken, groups, f"server {group.spec.name} shares it with {server}")
                changed = True
        return changed

    def _resolve(self, server: ServerConfig, key: str) -> Claim:
        """The UUIDs of the server's GPUs (lost ones included), why when there are none, and
        its configured GPUs that NVML counts but cannot open. ConfigError (locate_gpu's, naming
        `key`.gpus[j]) for a configured GPU this node does not have, nor had, when NVML opens
        every GPU it counts (else it may be one of those: a GPU off the bus since before powerd
        started)."""
        by_index = {info.index: info.uuid for info in [*self.infos.values(), *self.lost.values()]}
        if server.gpus is None:
            try:
                found = discover_server_gpus(
                    server.url, self._backend.compute_pids, list(self.infos), gpu_indices=by_index
                )
            except Exception as exc:  # discovery is best effort; the server is still observed
                found, why = [], f"cannot discover them ({exc})"
            else:
                why = "discovery found none"
            if not found:
                return Claim(
                    [],
                    f"{why}; looking again after {DISCOVERY_RETRY_S:g} s, then at most every "
                    f"{DISCOVERY_RETRY_MAX_S:g} s (set `gpus:` for it in the config to skip "
                    "discovery)",
                    [],
                )
            return Claim(found, "", [])
        uuids: list[str] = []
        missing: list[int | str] = []
        for j, gpu in enumerate(server.gpus):
            uuid = locate_gpu(f"{key}.gpus[{j}]", server.name, gpu, by_index, self.unopened)
            if uuid is None:
                missing.append(gpu)
            elif uuid not in uuids:  # named by index and by UUID: one GPU
                uuids.append(uuid)
        why = ""
        if not uuids and missing:
            why = (
                f"its GPUs cannot be opened ({self.unopened_text()}); looking for them every "
                f"{DISCOVERY_RETRY_S:g} s"
            )
        return Claim(uuids, why, missing)

    def _found_elsewhere(self, server: str, found: Sequence[str], groups: Sequence[Group]) -> bool:
        """After a lookup found `server` on `found` (a lookup that found nothing tells
        nothing): a shared GPU it is not on is shared no more once one server is left on it,
        and goes to that server's group. Only the GPUs open now count: a lost one is never
        found (discovery looks at the open ones), which does not say the server left it. True
        when a group's GPUs changed."""
        changed = False
        for uuid, names in list(self.shared.items()):
            if not found or server not in names or uuid in found or uuid not in self.infos:
                continue
            names.discard(server)
            if len(names) > 1:
                continue
            del self.shared[uuid]
            owner = next((group for group in groups if group.spec.name in names), None)
            if owner is None:
                log.info("GPU %s: server %s no longer runs on it", uuid, server)
                continue
            back = sorted([*owner.uuids, uuid], key=lambda u: self.infos[u].index)
            owner.set_gpus(back, self.infos)
            changed = True
            log.info(
                "GPU %s: server %s no longer runs on it; controlling it for %s",
                uuid,
                server,
                owner.spec.name,
            )
        return changed

    def _claimed_by_others(self, groups: Sequence[Group], group: Group) -> set[str]:
        """The GPUs, lost ones included, of every group but `group`."""
        return {
            uuid
            for other in groups
            if other is not group
            for uuid in [*other.uuids, *other.lost_uuids]
        }

    def unopened_text(self) -> str:
        """The GPUs NVML cannot open, for a message: "GPU 1: why; GPU 3: why"."""
        return "; ".join(f"GPU {index}: {why}" for index, why in sorted(self.unopened.items()))

    def _note_unopened(self) -> None:
        """Take the backend's GPUs that could not be opened at its last devices(), and log
        each while it lasts (as a lasting problem: a few lines a day)."""
        known = {info.index for info in [*self.infos.values(), *self.lost.values()]}
        before = self.unopened
        self.unopened = {
            index: why
            for index, why in self._backend.unopened_indices().items()
            if index not in known  # a GPU lost while powerd ran is told of as lost
        }
        for index, why in self.unopened.items():
            self._problems.problem(
                ("unopened", index),
                logging.ERROR,
                "GPU %d cannot be opened (%s); it is left as it is and tried again every %g s",
                index,
                why,
                DISCOVERY_RETRY_S,
            )
        for index in sorted(before.keys() - self.unopened.keys()):
            if index in known:
                self._problems.cleared(("unopened", index), "GPU %d opens now", index, at_once=True)
            else:
                self._problems.cleared(
                    ("unopened", index), "NVML counts no GPU %d now", index, at_once=True
                )

    # ----------------------------------------------------------------- looking again

    def rediscover(self, now_s: float, groups: Sequence[Group]) -> Rediscovery:
        """Every DISCOVERY_RETRY_S, look for the lost GPUs, open again those NVML could not open
        and read again the power-limit ranges left unread; say how loss episodes go on or end;
        look again for the GPUs of servers that have none and are to be discovered (each after
        a wait that doubles up to DISCOVERY_RETRY_MAX_S) and for those of discovered servers
        that restarted. Returns what changed that the policy must be told of."""
        groups_changed = out_of_reach_changed = False
        if self._next_sweep_s is None:
            self._next_sweep_s = now_s + DISCOVERY_RETRY_S
        if now_s >= self._next_sweep_s:
            self._next_sweep_s = now_s + DISCOVERY_RETRY_S
            groups_changed, out_of_reach_changed = self._rejoin_lost(now_s, groups)
            opened = self._open_unopened(groups)
            groups_changed = opened.groups_changed or groups_changed
            out_of_reach_changed = opened.out_of_reach_changed or out_of_reach_changed
            groups_changed = self._describe_again(groups) or groups_changed
        self._age_loss_episodes(now_s)
        waiting = [g for g in groups if not g.controlled and g.source.config.gpus is None]
        for group in waiting:
            if group.controlled:
                continue  # a GPU it shared is its own again (_found_elsewhere, this loop)
            if group.next_lookup_s is None:
                group.next_lookup_s = now_s + group.lookup_wait_s
            if now_s < group.next_lookup_s:
                continue
            claimed = self._claimed_by_others(groups, group)
            uuids, why, _, shared = self.claim(group.source.config, group.config_key, claimed)
            name = group.spec.name
            groups_changed = (
                self._found_elsewhere(name, [*uuids, *shared], groups) or groups_changed
            )
            if shared:
                groups_changed = self._share(shared, groups, name) or groups_changed
            if not uuids:
                group.lookup_wait_s = min(2 * group.lookup_wait_s, DISCOVERY_RETRY_MAX_S)
                group.next_lookup_s = now_s + group.lookup_wait_s
                log.debug("server %s: still observed only: %s", group.spec.name, why)
                continue
            group.set_gpus(uuids, self.infos)
            # The server runs on these now: a GPU of it still lost is no longer its own.
            group.lost_uuids = []
            log.info(
                "server %s: found its GPUs %s; controlling them", group.spec.name, ", ".join(uuids)
            )
            groups_changed = True
        groups_changed = self._follow_restarted_servers(now_s, groups) or groups_changed
        return Rediscovery(groups_changed, out_of_reach_changed)

    def _follow_restarted_servers(self, now_s: float, groups: Sequence[Group]) -> bool:
        """Look up again the GPUs of each discovered server that restarted (a scheduler may
        have started it on others): take its new GPUs and put back those it left. A lookup
        that finds none is tried again after DISCOVERY_RETRY_S. True when a group's GPUs
        changed."""
        changed = False
        for group in groups:
            restarts = group.source.restarts
            if (
                group.source.config.gpus is not None
                or not group.controlled
                or restarts == group.restarts_seen
                or (group.next_lookup_s is not None and now_s < group.next_lookup_s)
            ):
                continue
            uuids, why, _, shared = self.claim(
                group.source.config, group.config_key, self._claimed_by_others(groups, group)
            )
            if not uuids and not shared:
                group.next_lookup_s = now_s + DISCOVERY_RETRY_S
                log.debug("server %s restarted; keeping its GPUs: %s", group.spec.name, why)
                continue
            group.restarts_seen = restarts
            group.next_lookup_s = None
            changed = self._found_elsewhere(group.spec.name, [*uuids, *shared], groups) or changed
            if shared:
                changed = self._share(shared, groups, group.spec.name) or changed
            if set(uuids) == {*group.uuids, *group.lost_uuids}:
                continue
            left = [uuid for uuid in group.uuids if uuid not in uuids]
            if uuids:  # else _share() said why it has none
                log.warning(
                    "server %s restarted on GPUs %s (was %s); controlling those",
                    group.spec.name,
                    ", ".join(uuids),
                    ", ".join([*group.uuids, *group.lost_uuids]),
                )
            group.set_gpus(uuids, self.infos)
            # A GPU it left while lost is no group's when it answers (actuator.rejoin unlocks it).
            group.lost_uuids = []
            self.release(left, groups, f"server {group.spec.name} restarted on other GPUs")
            changed = True
        return changed

    def _describe_again(self, groups: Sequence[Group]) -> bool:
        """Take in the new description of each GPU whose power-limit range a passing error
        kept unread (pinned to the limit it held, its limit out of powerd's reach). True when
        a group's GPU description changed."""
        changed = False
        for uuid, info in list(self.infos.items()):
            if uuid in self.lost:
                continue
            try:
                described = self._backend.describe(uuid)
            except GpuError:
                continue
            if described == info:
                continue
            self.infos[uuid] = described
            self._actuator.redescribe(described)
            log.info(
                "GPU %s: its power limit range reads %.0f-%.0f W now",
                uuid,
                described.power_limit_min_mw / 1000,
                described.power_limit_max_mw / 1000,
            )
            for group in groups:
                if uuid in group.uuids:
                    group.set_gpus(group.uuids, self.infos)
                    changed = True
        return changed

    def _age_loss_episodes(self, now_s: float) -> None:
        """Say once that a GPU lost again after a flapping episode stays lost; end the episode
        of a GPU that has answered for GPU_STEADY_S."""
        for uuid, episode in list(self._loss_episodes.items()):
            lost_s = episode.lost_since_s
            if (
                episode.returns
                and lost_s is not None
                and not episode.told_still_lost
                and now_s - lost_s >= GPU_STEADY_S
            ):
                # After a flapping episode's quiet losses, say that this one lasts.
                episode.told_still_lost = True
                log.error(
                    "GPU %s is still lost, %g min after its last loss (%d losses since it "
                    "first went)",
                    uuid,
                    GPU_STEADY_S / 60,
                    episode.losses,
                )
            back_s = episode.back_since_s
            if back_s is not None and now_s - back_s >= GPU_STEADY_S:
                del self._loss_episodes[uuid]
                self._problems.cleared(
                    ("lost", uuid),
                    "GPU %s has answered for %g min",
                    uuid,
                    GPU_STEADY_S / 60,
                    at_once=True,
                )

    def _open_unopened(self, groups: Sequence[Group]) -> Rediscovery:
        """Enumerate the GPUs again while some could not be opened; give each group its
        configured GPUs that open now."""
        if not self.unopened:
            return Rediscovery(False, False)
        try:
            infos = self._backend.devices(wait_s=LOOK_WAIT_S)
        except GpuError as exc:
            log.debug("enumerating the GPUs again: %s", exc)
            return Rediscovery(False, False)
        for info in infos:
            if info.uuid not in self.infos and info.uuid not in self.lost:
                self._take_in(info)
        unopened_before = len(self.unopened)
        self._note_unopened()
        groups_changed = False
        for group in groups:
            if not group.missing_gpus:
                continue
            try:
                uuids, why, missing, shared = self.claim(
                    group.source.config, group.config_key, self._claimed_by_others(groups, group)
                )
            except ConfigError as exc:
                self._problems.problem(("missing", group.spec.name), logging.ERROR, "%s", exc)
                continue
            if shared:
                groups_changed = self._share(shared, groups, group.spec.name) or groups_changed
            if not uuids and not missing:
                # Named by index here and by UUID there, say: as at start, a GPU another
                # server names is controlled for neither (_share), and this one waits no more.
                log.warning(
                    "server %s: observed only, its GPUs are not controlled: %s",
                    group.spec.name,
                    why,
                )
                group.lost_uuids = []
            group.missing_gpus = missing
            present = [uuid for uuid in uuids if uuid in self.infos]
            # A GPU the group gives up goes back as found, as a reload's release does.
            self.release(
                [uuid for uuid in group.uuids if uuid not in present],
                groups,
                f"server {group.spec.name} is observed only now",
            )
            if present != group.uuids:
                group.set_gpus(present, self.infos)
                log.info(
                    "server %s: its GPUs %s open now; controlling them",
                    group.spec.name,
                    ", ".join(present),
                )
                groups_changed = True
        return Rediscovery(groups_changed, len(self.unopened) != unopened_before)

    def _take_in(self, info: GpuInfo) -> None:
        """Track a GPU, first putting back what a previous run left on it where the restore
        at start could not (the GPU was off the bus then, or opened only after it)."""
        if self._journal is not None and self._journal.get(info.uuid) is not None:
            log.info("GPU %s: restoring what a previous run left on it", info.uuid)
            report = restore_all(self._backend, self._journal, only=[info.uuid])
            self.restores_total += 1
            if not report.ok:
                self.restore_failures_total += 1
        self.infos[info.uuid] = info
        self._actuator.track(info)

    def _rejoin_lost(self, now_s: float, groups: Sequence[Group]) -> Rediscovery:
        """Give each lost GPU that answers again back to its group, with what powerd had set
        on it put back first."""
        groups_changed = back_any = False
        answers = self._backend.read_all(list(self.lost), wait_s=LOOK_WAIT_S)
        for uuid, info in list(self.lost.items()):
            if isinstance(answers[uuid], GpuError):
                continue
            # A GPU that flaps is told of when it first comes back, then by the loss's reminder.
            episode = self._loss_episodes.setdefault(uuid, _LossEpisode())
            level = logging.INFO if episode.returns == 0 else logging.DEBUG
            episode.returns += 1
            episode.back_since_s, episode.lost_since_s = now_s, None
            episode.told_still_lost = False
            del self.lost[uuid]
            self.infos[uuid] = info
            self._actuator.rejoin(uuid)
            back_any = True
            owner = next((g for g in groups if uuid in g.lost_uuids), None)
            if owner is None:
                if uuid in self.shared:
                    log.log(level, "GPU %s is back; two servers run on it: %s", uuid, SHARED_WHY)
                else:
                    log.log(level, "GPU %s is back; no configured server uses it", uuid)
                continue
            owner.lost_uuids.remove(uuid)
            back = sorted([*owner.uuids, uuid], key=lambda u: self.infos[u].index)
            owner.set_gpus(back, self.infos)
            log.log(level, "GPU %s is back; controlling it again for %s", uuid, owner.spec.name)
            groups_changed = True
        return Rediscovery(groups_changed, back_any)

    # ----------------------------------------------------------------- reading, losing

    def read(self, groups: Sequence[Group]) -> dict[str, GpuReading]:
        """One reading of each GPU, by UUID; a GPU that cannot be read has none this time, and
        one that is lost leaves its group (drop)."""
        readings = {}
        for uuid, outcome in self._backend.read_all(list(self.infos)).items():
            if isinstance(outcome, GpuLost):
                self.drop(uuid, outcome, groups)
            elif isinstance(outcome, GpuError):
                self._problems.problem(
                    ("read", uuid), logging.WARNING, "GPU %s: read failed: %s", uuid, outcome
                )
            else:
                readings[uuid] = outcome
                self._problems.cleared(("read", uuid), "GPU %s: read again", uuid)
        return readings

    def drop(self, uuid: str, exc: Exception, groups: Sequence[Group]) -> None:
        """Take a GPU that is lost (`exc` says how) out of its group, keep it among the lost
        until it answers again, and call on_lost and on_groups_changed."""
        episode = self._loss_episodes.get(uuid)
        flapping = episode is not None
        if episode is None:
            episode = self._loss_episodes[uuid] = _LossEpisode()
        else:
            episode.losses += 1
        episode.back_since_s = None
        # The loop's clock at the last tick: this tick's time for a loss met in a tick, the last
        # tick's for one met between ticks (guard, reload, the read after the restore); None
        # before the first tick.
        episode.lost_since_s = self._last_tick_s()
        # The cause without the call that met it: a loss met by a write and one met by a read
        # are the same problem.
        cause = str(exc).split(" failed: ", 1)[-1]
        self._problems.problem(
            ("lost", uuid),
            logging.ERROR,
            "GPU %s is lost (%s); keeping the others, and looking for it every %g s",
            uuid,
            cause,
            DISCOVERY_RETRY_S,
        )
        log.debug("GPU %s: %s", uuid, exc)
        info = self.infos.pop(uuid, None)
        if info is not None:
            self.lost[uuid] = info
        self._actuator.lose(uuid)
        self._on_lost(uuid)
        for group in groups:
            if uuid in group.uuids:
                group.lost_uuids.append(uuid)
                # A group without GPUs leaves the policy: it must not keep a share of a node
                # budget, nor a decision that no GPU takes.
                group.set_gpus([u for u in group.uuids if u != uuid], self.infos)
                if not group.uuids:
                    log.log(
                        logging.DEBUG if flapping else logging.WARNING,
                        "server %s: its last GPU is lost; observed only",
                        group.spec.name,
                    )
        # Also in budget mode, whose budget now reserves what the GPU may still draw.
        self._on_groups_changed()

    # ----------------------------------------------------------------- giving GPUs back

    def release(
        self,
        uuids: list[str],
        groups: Sequence[Group],
        why: str = "no configured server uses it any more",
    ) -> None:
        """Return GPUs powerd no longer controls (`why`) to unlocked clocks and the limit they
        had before powerd. A GPU whose write fails is tried again at every tick (retry) until
        it is back as found, lost, or controlled again. `groups` are those a GPU lost on the
        way leaves."""
        for uuid in uuids:
            info = self.infos.get(uuid)
            if info is None:
                continue
            default = GroupDecision(
                group="", sm_clock_max_mhz=info.sm_clock_max_mhz, power_limit_mw=None, mode="off"
            )
            try:
                self._actuator.apply(default, [uuid])
            except GpuLost as exc:
                self.drop(uuid, exc, groups)
                self._unreleased.pop(uuid, None)
                continue
            if not self._actuator.holds_settings(uuid):
                self._unreleased.pop(uuid, None)
                log.info("GPU %s: %s; back as found", uuid, why)
            elif uuid not in self._unreleased:
                self._unreleased[uuid] = why
                log.warning(
                    "GPU %s: %s, but its settings could not be put back; trying again every tick",
                    uuid,
                    why,
                )

    def restore(self) -> bool:
        """Put back every GPU setting powerd changed. True when all were restored."""
        if self._journal is None:
            return True
        report = restore_all(self._backend, self._journal)
        self.restores_total += 1
        if not report.ok:
            self.restore_failures_total += 1
        # A GPU that could not be restored keeps what powerd last set of the knobs that were
        # not put back, and says so; a lost one keeps both.
        kept = set(report.failed) | set(report.lost)
        for uuid in [uuid for uuid in self._unrestored if uuid not in kept]:
            del self._unrestored[uuid]
        for uuid, state in self._actuator.states.items():
            held = ("clocks", "power_limit") if uuid in report.lost else report.held.get(uuid, ())
            state.lock_max_mhz, state.power_limit_mw = _still_held(
                state.lock_max_mhz, state.power_limit_mw, held
            )
        return report.ok

    def restore_for_dry_run(self) -> None:
        """Put back what the wet run changed (a dry run promises untouched GPUs); a GPU whose
        restore failed is tried again every tick (retry)."""
        self.restore()
        for uuid, state in self._actuator.states.items():
            if state.observe_only_reason == "gpu_lost" or not self._actuator.holds_settings(uuid):
                continue  # a lost GPU's settings are put back when it returns (rejoin)
            self._unrestored[uuid] = (state.lock_max_mhz, state.power_limit_mw)
            log.warning(
                "GPU %s: its settings could not be put back for the dry run; trying again "
                "every tick",
                uuid,
            )

    def hand_unrestored_to_wet_run(self, claimed: set[str], groups: Sequence[Group]) -> None:
        """Leaving a dry run: the GPUs it could not restore hold the settings of the wet run
        before it, which the actuator is told of; those no server uses (not in `claimed`) are
        released."""
        unrestored, self._unrestored = self._unrestored, {}
        for uuid, (lock_max_mhz, power_limit_mw) in unrestored.items():
            self._problems.forget(("unrestored", uuid))
            self._actuator.note_held_settings(uuid, lock_max_mhz, power_limit_mw)
        self.release([uuid for uuid in unrestored if uuid not in claimed], groups)

    def retry(self, groups: Sequence[Group]) -> None:
        """Release again the GPUs whose release failed, unless a group controls them again;
        restore again those a switch into the dry run could not restore."""
        self._retry_releases(groups)
        self._retry_restores()

    def _retry_releases(self, groups: Sequence[Group]) -> None:
        """Release again the GPUs whose release failed, unless a group controls them again."""
        if not self._unreleased:
            return
        controlled = controlled_uuids(groups)
        for uuid in [uuid for uuid in self._unreleased if uuid in controlled]:
            del self._unreleased[uuid]
        for uuid, why in list(self._unreleased.items()):
            self.release([uuid], groups, why)

    def _retry_restores(self) -> None:
        """Restore again the GPUs a switch into the dry run could not restore (a lost one when
        it is back). A failure every tick is one problem in the log."""
        if not self._unrestored or self._journal is None:
            return
        states = self._actuator.states
        retried = [
            uuid
            for uuid in self._unrestored
            if uuid not in states or states[uuid].observe_only_reason != "gpu_lost"
        ]
        if not retried:
            return
        report = restore_all(self._backend, self._journal, only=retried, log_each=False)
        for uuid in report.restored + report.dropped:
            del self._unrestored[uuid]
            self._problems.forget(("unrestored", uuid))
            log.info("GPU %s: restored for the dry run; back as found", uuid)
        for uuid, why in report.failed.items():
            self._unrestored[uuid] = _still_held(*self._unrestored[uuid], report.held[uuid])
            self._problems.problem(
                ("unrestored", uuid),
                logging.ERROR,
                "GPU %s: still not restored for the dry run: %s",
                uuid,
                why,
            )

    def device_settings(self, uuid: str) -> tuple[int | None, int | None]:
        """(locked clock maximum MHz, power limit mW) powerd has set on the GPU, None for each
        left at its default. A dry run sets nothing (its decisions are the groups' figures),
        but a GPU it could not restore still holds the wet run's."""
        if self._actuator.dry_run:
            return self._unrestored.get(uuid, (None, None))
        state = self._actuator.states.get(uuid)
        if state is None:
            return None, None
        return state.lock_max_mhz, state.power_limit_mw


def _still_held(
    lock_max_mhz: int | None, power_limit_mw: int | None, held: Sequence[str]
) -> tuple[int | None, int | None]:
    """(lock, limit) of powerd's a GPU holds after a restore that put back all but the knobs
    `held` names ("clocks", "power_limit"): None for each put back."""
    return (
        lock_max_mhz if "clocks" in held else None,
        power_limit_mw if "power_limit" in held else None,
    )
