"""Saved original GPU settings, and their restore after an exit, a crash or a kill.

Before powerd first changes a GPU it records that GPU's original power limit and clock state
in a JSON file under the state directory, written atomically (temporary file, fsync, rename,
fsync of the directory), so a SIGKILL at any instant leaves either the old or the new file.
`powerd restore` (ExecStopPost=) and the next start read it back and undo the changes in the
reverse order of the first writes. The file is removed only once every GPU was restored.

NVML has no getter for locked clocks, so the original clock state is recorded as "unknown" and
restored by resetting the lock (the driver default, which is also the state after a reboot):
locking clocks needs nothing read first. Changing the power limit does: its original must be
read and saved before the first write, and a limit that could not be read yet is saved as
unknown only while powerd has not changed it, so restore leaves it as found. A limit someone
else sets while powerd runs (`nvidia-smi -pl`) replaces the saved one (adopt_power_limit), and
restore leaves a limit it finds changed since powerd's last write where the operator put it.

Each entry records the kernel's boot id. A reboot resets clocks and power limits, so the entry
of a GPU that is gone at restore and was saved in an earlier boot protects nothing (the card
was replaced or taken out): it is dropped. One gone in the same boot may come back and is kept.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from powerd.gpu.backend import POWER_LIMIT_TOLERANCE_MW, GpuBackend
from powerd.gpu.errors import GpuError, GpuLost, NotSupported
from powerd.model import GpuInfo
from powerd.wording import counted

log = logging.getLogger(__name__)

FORMAT = "powerd-journal"
VERSION = 2
"""Version 1 saved an unreadable power limit as null and restored the default limit for it;
since version 2 a null limit is one powerd has not changed. The entries' boot_id came later
within version 2 (readers ignore keys they do not know); an entry without one is never dropped
for a reboot."""
READABLE_VERSIONS = (1, VERSION)
BOOT_ID_FILE = Path("/proc/sys/kernel/random/boot_id")
CLOCK_STATES = ("unknown", "unlocked")


class JournalError(Exception):
    """The journal cannot be written; powerd must not change a GPU it cannot restore."""


class OriginalUnreadable(Exception):
    """A setting's original value cannot be read now, so it is not saved; powerd must not
    change that setting until it is."""


@dataclass(frozen=True, slots=True)
class JournalEntry:
    """The settings one GPU had before powerd first changed it."""

    uuid: str
    index: int
    name: str
    power_limit_mw: int | None
    """Requested power limit before powerd first changed it, or the one an operator set since
    (adopt_power_limit); None while it could not be read, which powerd never changes (restore
    leaves it as found)."""
    power_limit_default_mw: int
    sm_clocks: str
    """'unknown' (NVML cannot read a lock; restore resets it) or 'unlocked'."""
    saved_at_s: float
    """Wall-clock time (Unix seconds) of the save."""
    boot_id: str | None = None
    """The kernel's boot id when powerd last saved the entry, which it does before it first
    changes the GPU in each boot; None when unknown (unreadable, or an older powerd's entry)."""


@dataclass(slots=True)
class RestoreReport:
    """What restore_all did. Every list holds GPU UUIDs, in the order they were handled."""

    restored: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    """GPUs that were gone; their entries stay in the journal for the next attempt."""
    dropped: list[str] = field(default_factory=list)
    """GPUs that were gone and saved in an earlier boot, which reset them; their entries were
    removed. Not a failure."""
    failed: dict[str, str] = field(default_factory=dict)
    """UUID -> one-sentence reason; their entries stay in the journal."""
    held: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """For each failed GPU, what it still holds as powerd left it: "clocks", "power_limit"
    or both (a knob put back, or one powerd never changed, is not named)."""
    clocks_reset: list[str] = field(default_factory=list)
    """GPUs whose clocks were reset because the journal was corrupt."""
    limits_below_default: dict[str, int] = field(default_factory=dict)
    """UUID -> power limit (mW) found below the GPU's default after a corrupt journal: it
    may be powerd's, whose original is lost, and a later run would take it for the original."""
    errors: list[str] = field(default_factory=list)
    """Problems not tied to one GPU: a corrupt journal (renamed to *.corrupt, its power limits
    lost), a journal that cannot be rewritten, a device list that cannot be read."""

    @property
    def ok(self) -> bool:
        return not self.lost and not self.failed and not self.errors

    def summary(self) -> str:
        """One line for the log and for `powerd restore`."""
        parts = [f"restored {counted(len(self.restored), 'GPU')}"]
        if self.lost:
            parts.append(f"{len(self.lost)} gone ({', '.join(self.lost)})")
        if self.failed:
            parts.append(
                f"{len(self.failed)} failed ("
                + "; ".join(f"{uuid}: {why}" for uuid, why in self.failed.items())
                + ")"
            )
        if self.dropped:
            parts.append(
                f"{len(self.dropped)} gone since a reboot reset them, dropped "
                f"({', '.join(self.dropped)})"
            )
        parts.extend(self.errors)
        if self.clocks_reset:
            parts.append(f"clocks reset on {counted(len(self.clocks_reset), 'GPU')}")
        if self.limits_below_default:
            held = ", ".join(
                f"{uuid} at {mw / 1000:.0f} W" for uuid, mw in self.limits_below_default.items()
            )
            parts.append(
                f"power limits below their defaults left as they are ({held}): powerd's or an "
                "operator's; put back with nvidia-smi -pl what is not an operator's"
            )
        return ", ".join(parts)


class Journal:
    """The saved original settings of every GPU powerd has changed, persisted at `path`.

    A corrupt file is renamed to `<path>.corrupt` when first read (left where it is with
    `put_corrupt_aside` False, for a caller that only edits a sound journal) and reported
    through `load_error`; it never raises. `boot_id` is the kernel's boot id now, None when
    it cannot be read.
    """

    def __init__(self, path: Path, *, put_corrupt_aside: bool = True) -> None:
        self.path = Path(path)
        self.boot_id = read_boot_id()
        self._put_corrupt_aside = put_corrupt_aside
        self.load_error: str | None = None
        self._entries: list[JournalEntry] = []
        self._left_mw: dict[str, int] = {}
        """UUID -> the power limit this process last left on the GPU (not persisted)."""
        self._load()

    def pending(self) -> bool:
        """True when a previous run left settings to restore (or a corrupt journal): the
        daemon restores before it changes anything."""
        return bool(self._entries) or self.load_error is not None

    def entries(self) -> list[JournalEntry]:
        """Saved entries in the order of their first write."""
        return list(self._entries)

    def get(self, uuid: str) -> JournalEntry | None:
        for entry in self._entries:
            if entry.uuid == uuid:
                return entry
        return None

    def remember(
        self, backend: GpuBackend, uuid: str, info: GpuInfo, *, power_limit: bool = True
    ) -> bool:
        """Save the GPU's current settings as its originals, unless already saved.

        Call before every write, with `power_limit` False when the write is a clock lock (whose
        original needs no read) and True when it may change the power limit, whose original
        must then be saved: it is read now unless saved already. A limit powerd has not
        changed is not saved, so restore leaves it as found, an operator's change included.
        Returns True when it wrote the file. Raises OriginalUnreadable when that power limit
        cannot be read (then do not write it; call again later) and JournalError when the file
        cannot be written (then do not write to the GPU)."""
        entry = self.get(uuid)
        if (
            entry is not None
            and entry.boot_id == self.boot_id
            and (entry.power_limit_mw is not None or not power_limit)
        ):
            return False
        power_limit_mw = entry.power_limit_mw if entry is not None else None
        if power_limit and power_limit_mw is None:
            power_limit_mw, problem = read_power_limit_mw(backend, uuid)
            if power_limit_mw is None:
                raise OriginalUnreadable(f"cannot read its power limit ({problem})")
        if entry is None:
            entry = JournalEntry(
                uuid=uuid,
                index=info.index,
                name=info.name,
                power_limit_mw=power_limit_mw,
                power_limit_default_mw=info.power_limit_default_mw,
                sm_clocks="unknown",
                saved_at_s=time.time(),
                boot_id=self.boot_id,
            )
            entries = [*self._entries, entry]
        else:
            # An entry of an earlier boot (kept when its restore failed) now stands for this
            # boot's changes, which no reboot has undone yet.
            entry = replace(entry, power_limit_mw=power_limit_mw, boot_id=self.boot_id)
            entries = [entry if e.uuid == uuid else e for e in self._entries]
        self._write(entries)
        self._entries = entries
        log.info(
            "GPU %s: saved original settings (power limit %s, clocks %s)",
            uuid,
            "unchanged, left as found" if power_limit_mw is None else f"{power_limit_mw} mW",
            entry.sm_clocks,
        )
        return True

    def adopt_power_limit(self, uuid: str, power_limit_mw: int) -> None:
        """Save power_limit_mw as the GPU's original power limit: it was set outside powerd
        while powerd ran (an operator's `nvidia-smi -pl`), so it is the GPU's ceiling now and
        what restore puts back. Raises KeyError when no power limit of the GPU is saved and
        JournalError when the file cannot be written (the saved limit then stays)."""
        entry = self.get(uuid)
        if entry is None or entry.power_limit_mw is None:
            raise KeyError(uuid)
        if entry.power_limit_mw == power_limit_mw:
            return
        entry = replace(entry, power_limit_mw=power_limit_mw)
        entries = [entry if e.uuid == uuid else e for e in self._entries]
        self._write(entries)
        self._entries = entries
        log.info("GPU %s: saved %s mW as the power limit to restore", uuid, power_limit_mw)

    def note_power_limit_left(self, uuid: str, power_limit_mw: int | None) -> None:
        """Remember (in memory only) the power limit this process last left on the GPU, None
        when it does not know it. restore_all leaves a limit that differs from it as found: it
        was set outside powerd after powerd's last write."""
        if power_limit_mw is None:
            self._left_mw.pop(uuid, None)
        else:
            self._left_mw[uuid] = power_limit_mw

    def power_limit_left_mw(self, uuid: str) -> int | None:
        """What note_power_limit_left last recorded for the GPU, None if nothing."""
        return self._left_mw.get(uuid)

    def _load(self) -> None:
        try:
            self._entries = _parse(self.path.read_bytes())
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            problem = f"{self.path} cannot be read ({exc.strerror or exc})"
        except ValueError as exc:
            problem = f"{self.path} is corrupt ({exc})"
        if not self._put_corrupt_aside:
            self.load_error = problem
            return
        # Keep the evidence, out of the way of the next run's journal.
        aside = self.path.with_name(self.path.name + ".corrupt")
        if aside.exists():
            aside = self.path.with_name(f"{self.path.name}.corrupt.{time.time_ns()}")
        try:
            os.replace(self.path, aside)
            _fsync_dir(self.path.parent)
            where = f"kept as {aside}"
        except OSError as move_exc:
            where = f"could not be moved aside: {move_exc.strerror or move_exc}"
        self.load_error = f"{problem}; {where}"
        log.error("restore journal: %s", self.load_error)

    def _write(self, entries: list[JournalEntry]) -> None:
        document = {
            "format": FORMAT,
            "version": VERSION,
            "pid": os.getpid(),
            "entries": [asdict(entry) for entry in entries],
        }
        data = (json.dumps(document, indent=1, sort_keys=True) + "\n").encode()
        try:
            _atomic_write(self.path, data)
        except OSError as exc:
            raise JournalError(
                f"cannot save GPU settings to {self.path}: {exc.strerror or exc}"
            ) from exc

    def retain(self, remaining: list[JournalEntry]) -> None:
        """Keep only `remaining` (in first-write order); remove the file when nothing is left.
        Raises JournalError when the file cannot be rewritten."""
        if remaining:
            self._write(remaining)
        else:
            try:
                self.path.unlink(missing_ok=True)
            except OSError as exc:
                raise JournalError(f"cannot remove {self.path}: {exc.strerror or exc}") from exc
            with contextlib.suppress(OSError):
                _fsync_dir(self.path.parent)
        self._entries = list(remaining)
        kept = {entry.uuid for entry in remaining}
        self._left_mw = {uuid: mw for uuid, mw in self._left_mw.items() if uuid in kept}

    def saved_in_earlier_boot(self, entry: JournalEntry) -> bool:
        """Whether `entry` was saved before the node last rebooted, which reset the GPU's
        clocks and power limit (False when either boot id is unknown)."""
        return None not in (entry.boot_id, self.boot_id) and entry.boot_id != self.boot_id

    def forget(self, uuids: Collection[str]) -> list[JournalEntry]:
        """Remove these GPUs' entries without touching the GPUs, all or none; the removed
        entries. KeyError naming the first UUID not in the journal (nothing removed then);
        JournalError when the file cannot be rewritten."""
        for uuid in uuids:
            if self.get(uuid) is None:
                raise KeyError(uuid)
        forgotten = [entry for entry in self._entries if entry.uuid in uuids]
        self.retain([entry for entry in self._entries if entry.uuid not in uuids])
        return forgotten


def read_boot_id() -> str | None:
    """The kernel's boot id (changes at every boot), None when it cannot be read."""
    try:
        return BOOT_ID_FILE.read_text(encoding="ascii").strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def restore_all(
    backend: GpuBackend,
    journal: Journal,
    *,
    only: Collection[str] | None = None,
    log_each: bool = True,
) -> RestoreReport:
    """Put back every saved setting (with `only`, those of these GPUs, the others kept as they
    are); never raises.

    Every GPU's locked clocks are reset first, newest entry first, then every saved power
    limit: the unlock matters most, and no GPU's limit waits for another's clocks. A saved
    limit unknown (powerd never changed it) is left as it is; so is one that differs from
    what this process last left on the GPU (see Journal.note_power_limit_left: someone else
    set it since). A GPU that is gone (one that does not answer within the backend's stall
    limit too: then tried no further) or refuses is reported and kept in the journal, except
    one gone whose entry was saved in an earlier boot (the reboot reset it): that entry is
    dropped and reported in `dropped`. The journal file is removed once every GPU was
    restored. If the journal was corrupt, every GPU's clocks are reset (locking is powerd's
    doing, a reset is always safe) and power limits are left as they are, since their
    originals are lost. Logs each GPU unless not `log_each` (a caller retrying every tick logs
    the outcome itself); the caller logs `report.summary()`.
    """
    report = RestoreReport()
    if journal.load_error is not None and only is None:
        report.errors.append(journal.load_error)
        _reset_all_clocks(backend, report)
        journal.load_error = None

    remaining: list[JournalEntry] = []
    restoring: list[_Restoring] = []
    for entry in reversed(journal.entries()):
        if only is not None and entry.uuid not in only:
            remaining.append(entry)
        else:
            restoring.append(_Restoring(entry, journal.power_limit_left_mw(entry.uuid)))
    for gpu in restoring:
        reset = functools.partial(backend.reset_locked_clocks, gpu.entry.uuid)
        gpu.attempt("clocks", reset)
    for gpu in restoring:
        if gpu.lost is None:
            gpu.attempt("power_limit", functools.partial(gpu.put_limit_back, backend))
        elif gpu.entry.power_limit_mw is not None:
            gpu.held.append("power_limit")  # not tried: the GPU is gone or hung

    for gpu in restoring:
        entry = gpu.entry
        if gpu.lost is None and not gpu.failures:
            report.restored.append(entry.uuid)
            if log_each:
                log.info(
                    "GPU %s: restored (clocks unlocked, power limit %s)",
                    entry.uuid,
                    gpu.limit_text,
                )
            continue
        if gpu.lost is not None and journal.saved_in_earlier_boot(entry):
            report.dropped.append(entry.uuid)
            log.info(
                "GPU %s: gone, and saved before the node rebooted (boot %s, now %s), which "
                "reset its clocks and power limit: its saved settings are dropped",
                entry.uuid,
                entry.boot_id,
                journal.boot_id,
            )
            continue
        if gpu.lost is not None:
            reason = gpu.lost
            report.lost.append(entry.uuid)
        else:
            reason = "; ".join(gpu.failures)
            report.failed[entry.uuid] = reason
            report.held[entry.uuid] = tuple(gpu.held)
        remaining.append(entry)
        if log_each:
            log.error("GPU %s: not restored: %s", entry.uuid, reason)
    remaining.reverse()
    try:
        journal.retain(remaining)
    except JournalError as exc:
        report.errors.append(str(exc))
        log.error("restore journal: %s", exc)
    return report


@dataclass
class _Restoring:
    """One GPU's restore: each knob is tried whatever the other's outcome (a clock reset that
    fails must not keep the power limit from coming back), unless the GPU is gone or hung.
    `left_mw` is the limit this process last left on the GPU, None if not known."""

    entry: JournalEntry
    left_mw: int | None
    failures: list[str] = field(default_factory=list)
    lost: str | None = None
    """Why the GPU is gone (or hung), once a call said so: nothing more is tried."""
    held: list[str] = field(default_factory=list)
    """The knobs not put back ("clocks", "power_limit")."""
    limit_text: str = ""
    """What the log says of the power limit once restored."""

    def __post_init__(self) -> None:
        limit_mw = self.entry.power_limit_mw
        self.limit_text = f"{limit_mw} mW" if limit_mw is not None else "left as found"

    def attempt(self, name: str, knob: Callable[[], None]) -> None:
        """Run one knob's restore (`name`) and note its outcome."""
        try:
            knob()
        except NotSupported:
            pass  # the GPU lacks the knob, so powerd cannot have changed it
        except GpuLost as exc:
            self.lost = str(exc)
            self.held.append(name)
        except GpuError as exc:
            self.failures.append(str(exc))
            self.held.append(name)
        except Exception as exc:  # a backend bug must not stop the other GPUs' restore
            log.exception("GPU %s: unexpected error while restoring", self.entry.uuid)
            self.failures.append(f"{type(exc).__name__}: {exc}")
            self.held.append(name)

    def put_limit_back(self, backend: GpuBackend) -> None:
        """Set the saved power limit again, unless none was saved or one set outside powerd
        since its last write is on the GPU. Raises GpuError."""
        entry = self.entry
        if entry.power_limit_mw is None:
            return
        if self.left_mw is not None:
            now_mw, _ = read_power_limit_mw(backend, entry.uuid)
            if now_mw is not None and abs(now_mw - self.left_mw) > POWER_LIMIT_TOLERANCE_MW:
                # Set outside powerd after powerd's last write: the operator's, kept.
                self.limit_text = f"left at {now_mw} mW, set outside powerd since it last wrote one"
                return
        info = backend.describe(entry.uuid)
        low_mw, high_mw = info.power_limit_min_mw, info.power_limit_max_mw
        if info.power_limit_range_known and not (
            low_mw - POWER_LIMIT_TOLERANCE_MW
            <= entry.power_limit_mw
            <= high_mw + POWER_LIMIT_TOLERANCE_MW
        ):
            # No GPU had it: the journal was edited or damaged, and clamping it would set the
            # GPU's minimum (or maximum) as its original.
            raise GpuError(
                f"the saved power limit {entry.power_limit_mw} mW is outside the GPU's range "
                f"{low_mw}-{high_mw} mW; left as it is (set it with nvidia-smi -pl)"
            )
        backend.set_power_limit(entry.uuid, entry.power_limit_mw)


def read_power_limit_mw(backend: GpuBackend, uuid: str) -> tuple[int | None, str]:
    """(the GPU's power limit now, mW, or None with why it could not be read). Raises GpuLost."""
    try:
        power_limit_mw = backend.power_limit_mw(uuid)
    except GpuLost:
        raise
    except GpuError as exc:
        return None, str(exc)
    return power_limit_mw, "" if power_limit_mw is not None else "the read gave no value"


def _reset_all_clocks(backend: GpuBackend, report: RestoreReport) -> None:
    try:
        infos = backend.devices()
    except GpuError as exc:
        report.errors.append(f"cannot list the GPUs to reset their clocks: {exc}")
        return
    for info in infos:
        try:
            backend.reset_locked_clocks(info.uuid)
        except NotSupported:
            continue
        except GpuLost as exc:
            report.lost.append(info.uuid)
            log.error("GPU %s: gone: %s", info.uuid, exc)
            continue
        except GpuError as exc:
            report.failed[info.uuid] = str(exc)
            continue
        report.clocks_reset.append(info.uuid)
        try:
            limit_mw, _ = read_power_limit_mw(backend, info.uuid)
        except GpuLost:
            continue
        if limit_mw is not None and (
            limit_mw < info.power_limit_default_mw - POWER_LIMIT_TOLERANCE_MW
        ):
            report.limits_below_default[info.uuid] = limit_mw
            log.warning(
                "GPU %s: power limit %.0f W, below its default %.0f W, left as it is: the "
                "corrupt journal held its original",
                info.uuid,
                limit_mw / 1000,
                info.power_limit_default_mw / 1000,
            )


def _parse(raw: bytes) -> list[JournalEntry]:
    """Entries from the file's bytes; ValueError with a short reason when malformed."""
    try:
        document = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not JSON: {exc}") from exc
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise ValueError(f"not a {FORMAT} file")
    version = document.get("version")
    if isinstance(version, bool) or version not in READABLE_VERSIONS:
        raise ValueError(f"version {version!r}, expected {VERSION}")
    items = document.get("entries")
    if not isinstance(items, list):
        raise ValueError("'entries' is not a list")
    entries = [_parse_entry(item, n, version) for n, item in enumerate(items)]
    uuids = [entry.uuid for entry in entries]
    if len(set(uuids)) != len(uuids):
        raise ValueError("a GPU appears twice")
    return entries


def _parse_entry(item: Any, n: int, version: int) -> JournalEntry:
    if not isinstance(item, dict):
        raise ValueError(f"entry {n} is not an object")

    def need(key: str, kinds: tuple[type, ...], optional: bool = False) -> Any:
        value = item.get(key)
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise ValueError(f"entry {n}: {key!r} is missing or not a {kinds[0].__name__}")
        return value

    sm_clocks = need("sm_clocks", (str,))
    if sm_clocks not in CLOCK_STATES:
        raise ValueError(f"entry {n}: 'sm_clocks' is {sm_clocks!r}")
    uuid = need("uuid", (str,))
    if not uuid:
        raise ValueError(f"entry {n}: empty 'uuid'")
    power_limit_mw = need("power_limit_mw", (int,), optional=True)
    power_limit_default_mw = need("power_limit_default_mw", (int,))
    if power_limit_mw is None and version == 1:
        power_limit_mw = power_limit_default_mw
    boot_id = need("boot_id", (str,), optional=True)
    return JournalEntry(
        uuid=uuid,
        index=need("index", (int,)),
        name=need("name", (str,)),
        power_limit_mw=power_limit_mw,
        power_limit_default_mw=power_limit_default_mw,
        sm_clocks=sm_clocks,
        saved_at_s=float(need("saved_at_s", (float, int))),
        boot_id=boot_id or None,
    )


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    # A name of its own, created exclusively (0600): nothing already there is written through.
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
