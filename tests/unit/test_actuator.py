"""The actuator over a recording backend: journal first, per-GPU degradation, dry run."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from powerd.actuator import LOCK_RESEND_S, Actuator
from powerd.gpu.errors import GpuError, GpuLost, NoPermission, NotSupported
from powerd.gpu.nvml import NvmlBackend
from powerd.journal import Journal, restore_all
from powerd.model import GpuInfo, GpuReading, GroupDecision
from powerd.sim.fake_nvml import FakeNvml
from powerd.sim.plant import GpuPlant, load_gpu_profile

CLOCKS = tuple(range(345, 1981, 15))


def _info(index: int) -> GpuInfo:
    return GpuInfo(
        index=index,
        uuid=f"GPU-{index}",
        name="NVIDIA H100 80GB HBM3",
        power_limit_min_mw=200_000,
        power_limit_max_mw=700_000,
        power_limit_default_mw=700_000,
        sm_clock_min_mhz=345,
        sm_clock_max_mhz=1980,
        supported_sm_clocks_mhz=CLOCKS,
    )


class RecordingBackend:
    """Implements GpuBackend in memory and records every write; errors can be armed."""

    def __init__(self, n: int) -> None:
        self.infos = [_info(i) for i in range(n)]
        self.writes: list[tuple[str, str, tuple[int, ...]]] = []
        self.limits = {info.uuid: info.power_limit_default_mw for info in self.infos}
        self.fail: dict[tuple[str, str], Exception] = {}
        self.unreadable: set[str] = set()
        """GPUs whose power limit reads as None, as NvmlBackend.read gives on a timeout."""
        self.error_counts: dict[tuple[str, str], int] = {}

    def devices(self, *, wait_s: float | None = None) -> list[GpuInfo]:
        return list(self.infos)

    def unopened_indices(self) -> dict[int, str]:
        return {}

    def describe(self, uuid: str) -> GpuInfo:
        return next(info for info in self.infos if info.uuid == uuid)

    def power_limit_mw(self, uuid: str) -> int | None:
        return None if uuid in self.unreadable else self.limits[uuid]

    def read(self, uuid: str) -> GpuReading:
        limit_mw = None if uuid in self.unreadable else self.limits[uuid]
        return GpuReading(uuid, 0, 0.0, 300_000, 0, 1980, limit_mw, None, 0, 50)

    def read_all(
        self, uuids: Sequence[str], *, wait_s: float | None = None
    ) -> dict[str, GpuReading | GpuError]:
        return {uuid: self.read(uuid) for uuid in uuids}

    def _write(self, op: str, uuid: str, *args: int) -> None:
        error = self.fail.get((op, uuid))
        if error is not None:
            raise error
        self.writes.append((op, uuid, args))

    def set_locked_clocks(
        self, uuid: str, min_mhz: int, max_mhz: int, *, resend: bool = False
    ) -> tuple[int, int]:
        self._write("lock", uuid, min_mhz, max_mhz)
        return min_mhz, max_mhz

    def reset_locked_clocks(self, uuid: str, *, resend: bool = False) -> None:
        self._write("unlock", uuid)

    def set_power_limit(self, uuid: str, power_limit_mw: int) -> int:
        self._write("limit", uuid, power_limit_mw)
        self.limits[uuid] = power_limit_mw
        return power_limit_mw

    def reset_power_limit(self, uuid: str) -> None:
        self._write("reset_limit", uuid)
        self.limits[uuid] = 700_000

    def compute_pids(self, uuid: str) -> list[int]:
        return []

    def close(self) -> None:
        pass


def _actuator(
    tmp_path: Path, n: int = 2, dry_run: bool = False, clock: Callable[[], float] = time.monotonic
):
    backend = RecordingBackend(n)
    journal = Journal(tmp_path / "journal.json")
    actuator = Actuator(backend, journal, dry_run=dry_run, clock=clock)
    for info in backend.infos:
        actuator.track(info)
    return backend, journal, actuator


def _decision(clock_mhz: int, limit_mw: int | None = None) -> GroupDecision:
    return GroupDecision("g", clock_mhz, limit_mw, "efficiency")


def test_journal_is_written_before_the_first_write(tmp_path: Path) -> None:
    backend, journal, actuator = _actuator(tmp_path)
    assert not journal.pending()
    actuator.apply(_decision(1600), ["GPU-0", "GPU-1"])
    assert journal.pending()
    assert {entry.uuid for entry in journal.entries()} == {"GPU-0", "GPU-1"}
    assert backend.writes == [
        ("lock", "GPU-0", (345, 1590)),
        ("lock", "GPU-1", (345, 1590)),
    ], "clock caps are clamped down to a supported clock"


def test_unchanged_decision_writes_nothing_and_max_clock_unlocks(tmp_path: Path) -> None:
    backend, _, actuator = _actuator(tmp_path, n=1)
    actuator.apply(_decision(1605), ["GPU-0"])
    actuator.apply(_decision(1605), ["GPU-0"])
    assert len(backend.writes) == 1
    actuator.apply(_decision(1980), ["GPU-0"])
    assert backend.writes[-1] == ("unlock", "GPU-0", ())
    assert actuator.states["GPU-0"].lock_max_mhz is None


def test_power_limit_is_clamped_and_default_means_reset(tmp_path: Path) -> None:
    backend, _, actuator = _actuator(tmp_path, n=1)
    actuator.apply(_decision(1980, 100_000), ["GPU-0"])
    assert backend.writes == [("limit", "GPU-0", (200_000,))]
    actuator.apply(_decision(1980, 900_000), ["GPU-0"])
    assert backend.writes[-1] == ("reset_limit", "GPU-0", ())


def test_no_permission_degrades_only_that_gpu(tmp_path: Path, caplog) -> None:
    backend, _, actuator = _actuator(tmp_path)
    backend.fail[("lock", "GPU-0")] = NoPermission("Insufficient Permissions", uuid="GPU-0")
    actuator.apply(_decision(1500), ["GPU-0", "GPU-1"])
    assert actuator.states["GPU-0"].observe_only_reason == "no_permission"
    assert not actuator.states["GPU-1"].observe_only
    assert ("lock", "GPU-1", (345, 1500)) in backend.writes
    assert "observing only" in caplog.text
    actuator.apply(_decision(1400), ["GPU-0", "GPU-1"])
    assert not any(w[1] == "GPU-0" for w in backend.writes)


def test_a_gpu_refused_before_it_was_lost_stays_observed_only_when_back(tmp_path: Path) -> None:
    backend, _, actuator = _actuator(tmp_path, n=1)
    backend.fail[("lock", "GPU-0")] = NoPermission("Insufficient Permissions", uuid="GPU-0")
    actuator.apply(_decision(1500), ["GPU-0"])
    del backend.fail[("lock", "GPU-0")]
    actuator.lose("GPU-0")
    assert actuator.states["GPU-0"].observe_only_reason == "gpu_lost"
    actuator.rejoin("GPU-0")
    assert actuator.states["GPU-0"].observe_only_reason == "no_permission"
    before = len(backend.writes)
    actuator.apply(_decision(1400), ["GPU-0"])
    assert len(backend.writes) == before, "no write retried after the loss"


def test_clock_lock_not_supported_falls_back_to_power_limit(tmp_path: Path) -> None:
    backend, _, actuator = _actuator(tmp_path, n=1)
    backend.fail[("lock", "GPU-0")] = NotSupported("no locked clocks", uuid="GPU-0")
    actuator.apply(_decision(1500), ["GPU-0"], power_w=400.0, clock_mhz=1980.0)
    state = actuator.states["GPU-0"]
    assert not state.clock_lock_supported
    ops = [w[0] for w in backend.writes]
    assert ops == ["limit"]
    limit_mw = backend.writes[0][2][0]
    assert 200_000 <= limit_mw < 400_000, "a lower clock means a limit below today's power"


def test_gpu_lost_is_raised_to_the_daemon(tmp_path: Path) -> None:
    backend, _, actuator = _actuator(tmp_path, n=1)
    backend.fail[("lock", "GPU-0")] = GpuLost("fell off the bus", uuid="GPU-0")
    with pytest.raises(GpuLost):
        actuator.apply(_decision(1500), ["GPU-0"])


def test_dry_run_writes_nothing_and_keeps_the_journal_empty(tmp_path: Path, caplog) -> None:
    backend, journal, actuator = _actuator(tmp_path, n=1, dry_run=True)
    with caplog.at_level("INFO"):
        actuator.apply(_decision(1500, 400_000), ["GPU-0"])
    assert backend.writes == []
    assert not journal.pending()
    assert "would set" in caplog.text
    assert "1500 MHz" in actuator.states["GPU-0"].would_set


def test_dry_run_logs_the_setting_held_at_info_once_a_minute(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = [1000.0]
    _, _, actuator = _actuator(tmp_path, n=1, dry_run=True, clock=lambda: clock[0])
    with caplog.at_level("DEBUG", logger="powerd.actuator"):
        for at_s, mhz in ((0.0, 1500), (10.0, 1410), (20.0, 1410), (70.0, 1410), (80.0, 1410)):
            clock[0] = 1000.0 + at_s
            actuator.apply(_decision(mhz), ["GPU-0"])
    info = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert len(info) == 2 and "1500 MHz" in info[0]
    assert "1410 MHz" in info[1], "the setting held since, once the minute is up"
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert len(debug) == 1 and "1410 MHz" in debug[0]


def test_a_limit_set_before_powerd_is_the_ceiling_and_what_comes_back(tmp_path: Path) -> None:
    backend, journal, actuator = _actuator(tmp_path, n=1)
    backend.limits["GPU-0"] = 400_000  # an operator's cap, set before powerd started
    actuator.apply(_decision(1980, 600_000), ["GPU-0"])
    assert backend.writes == [], "a share above the operator's cap changes nothing"
    actuator.apply(_decision(1980, 300_000), ["GPU-0"])
    assert backend.writes == [("limit", "GPU-0", (300_000,))]
    assert journal.get("GPU-0") is not None
    assert journal.get("GPU-0").power_limit_mw == 400_000
    actuator.apply(_decision(1980, None), ["GPU-0"])
    assert backend.writes[-1] == ("limit", "GPU-0", (400_000,)), "back to the cap, not 700 W"
    assert backend.limits["GPU-0"] == 400_000


def test_a_refused_gpu_is_unlocked_and_its_limit_put_back_at_once(tmp_path: Path) -> None:
    backend, _, actuator = _actuator(tmp_path, n=1)
    actuator.apply(_decision(1500, 300_000), ["GPU-0"])
    backend.fail[("limit", "GPU-0")] = NoPermission("Insufficient Permissions", uuid="GPU-0")
    actuator.apply(_decision(1500, 250_000), ["GPU-0"])
    state = actuator.states["GPU-0"]
    assert state.observe_only_reason == "no_permission"
    assert backend.writes[-1] == ("reset_limit", "GPU-0", ())
    assert ("unlock", "GPU-0", ()) in backend.writes, "no lock outlives its control"
    assert state.lock_max_mhz is None and state.power_limit_mw is None


def test_a_lost_gpu_does_not_keep_the_decision_from_the_rest_of_its_group(tmp_path: Path) -> None:
    backend, _, actuator = _actuator(tmp_path, n=3)
    backend.fail[("lock", "GPU-0")] = GpuLost("fell off the bus", uuid="GPU-0")
    with pytest.raises(GpuLost) as raised:
        actuator.apply(_decision(1500), ["GPU-0", "GPU-1", "GPU-2"])
    assert raised.value.uuid == "GPU-0"
    assert [w[1] for w in backend.writes] == ["GPU-1", "GPU-2"]


def test_leaving_dry_run_writes_what_the_dry_run_only_would_have(tmp_path: Path) -> None:
    backend, _, actuator = _actuator(tmp_path, n=1, dry_run=True)
    actuator.apply(_decision(1500), ["GPU-0"])
    actuator.dry_run = False
    actuator.apply(_decision(1500), ["GPU-0"])
    assert backend.writes == [("lock", "GPU-0", (345, 1500))]


def test_a_gpu_that_lists_no_clocks_is_not_pinned_at_f_max(tmp_path: Path) -> None:
    backend = RecordingBackend(1)
    only_max = dataclasses.replace(backend.infos[0], supported_sm_clocks_mhz=(1980,))
    backend.infos = [only_max]
    actuator = Actuator(backend, Journal(tmp_path / "journal.json"), dry_run=False)
    actuator.track(only_max)
    actuator.apply(_decision(1400), ["GPU-0"], power_w=400.0, clock_mhz=1980.0)
    assert [op for op, _, _ in backend.writes] == ["limit"], "its power limit, never a lock"


def test_a_power_limit_read_that_fails_is_tried_again_and_the_real_original_restored(
    tmp_path: Path,
) -> None:
    backend, journal, actuator = _actuator(tmp_path, n=1)
    backend.limits["GPU-0"] = 400_000  # an operator's cap, set before powerd started
    backend.unreadable.add("GPU-0")
    actuator.apply(_decision(1500, 300_000), ["GPU-0"])
    assert backend.writes == [("lock", "GPU-0", (345, 1500))], "clocks need no original read"
    assert journal.get("GPU-0").power_limit_mw is None

    backend.unreadable.clear()
    actuator.apply(_decision(1500, 300_000), ["GPU-0"])
    assert backend.writes[-1] == ("limit", "GPU-0", (300_000,))
    assert journal.get("GPU-0").power_limit_mw == 400_000
    actuator.apply(_decision(1500, None), ["GPU-0"])
    assert backend.writes[-1] == ("limit", "GPU-0", (400_000,)), "back to the cap, not 700 W"

    actuator.apply(_decision(1500, 250_000), ["GPU-0"])
    assert restore_all(backend, journal).ok
    assert backend.writes[-1] == ("limit", "GPU-0", (400_000,))
    assert backend.limits["GPU-0"] == 400_000


def test_an_unread_original_is_not_taken_for_the_default_ceiling(tmp_path: Path) -> None:
    backend, journal, actuator = _actuator(tmp_path, n=1)
    backend.limits["GPU-0"] = 400_000
    backend.unreadable.add("GPU-0")
    for _ in range(3):
        actuator.apply(_decision(1980, 600_000), ["GPU-0"])
    assert backend.writes == [], "600 W is above the operator's 400 W cap"
    backend.unreadable.clear()
    actuator.apply(_decision(1980, 600_000), ["GPU-0"])
    assert backend.writes == []
    assert not journal.pending()


def test_an_unreadable_power_limit_is_warned_about_once(tmp_path: Path, caplog) -> None:
    backend, _, actuator = _actuator(tmp_path)
    backend.unreadable.add("GPU-0")
    with caplog.at_level("INFO", logger="powerd.actuator"):
        for _ in range(5):
            actuator.apply(_decision(1980, 300_000), ["GPU-0", "GPU-1"])
        backend.unreadable.clear()
        actuator.apply(_decision(1980, 300_000), ["GPU-0", "GPU-1"])
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert "GPU-0" in warnings[0] and "cannot read its power limit" in warnings[0]
    assert any("GPU-0" in r.getMessage() and "saved" in r.getMessage() for r in caplog.records)
    assert [w for w in backend.writes if w[0] == "limit"] == [
        ("limit", "GPU-1", (300_000,)),
        ("limit", "GPU-0", (300_000,)),
    ]


def test_a_gpu_whose_journal_failed_is_tried_again(tmp_path: Path, caplog) -> None:
    backend, journal, actuator = _actuator(tmp_path)
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    journal.path = blocker / "journal.json"
    with caplog.at_level("ERROR", logger="powerd.actuator"):
        for _ in range(3):
            actuator.apply(_decision(1500, 300_000), ["GPU-0", "GPU-1"])
    assert backend.writes == []
    assert all(s.observe_only_reason == "journal_error" for s in actuator.states.values())
    assert len(caplog.records) == 2, "one line per GPU, not one per try"

    blocker.unlink()  # the journal's directory can be made now
    actuator.apply(_decision(1500, 300_000), ["GPU-0", "GPU-1"])
    assert not any(s.observe_only for s in actuator.states.values())
    assert sorted(backend.writes) == [
        ("limit", "GPU-0", (300_000,)),
        ("limit", "GPU-1", (300_000,)),
        ("lock", "GPU-0", (345, 1500)),
        ("lock", "GPU-1", (345, 1500)),
    ]
    assert [e.power_limit_mw for e in journal.entries()] == [700_000, 700_000]


def test_a_gpu_whose_operator_limit_cannot_be_saved_does_not_keep_powerds_lock(
    tmp_path: Path,
) -> None:
    backend, journal, actuator = _actuator(tmp_path)
    actuator.apply(_decision(1500, 300_000), ["GPU-0", "GPU-1"])
    journal.path = tmp_path / "not-a-directory" / "journal.json"
    (tmp_path / "not-a-directory").write_text("")  # the state folder's disk is full, say
    backend.limits["GPU-0"] = 250_000  # nvidia-smi -pl
    before = len(backend.writes)
    for _ in range(3):
        actuator.apply(
            _decision(1200, 300_000),
            ["GPU-0", "GPU-1"],
            limits_mw={"GPU-0": 250_000, "GPU-1": 300_000},
        )
    assert actuator.states["GPU-0"].observe_only_reason == "journal_error"
    assert [w for w in backend.writes[before:] if w[1] == "GPU-0"] == [("unlock", "GPU-0", ())], (
        "unlocked once: nothing controls its clocks while its new limit cannot be saved"
    )
    assert ("lock", "GPU-1", (345, 1200)) in backend.writes[before:]


class _Clock:
    def __init__(self) -> None:
        self.now_s = 0.0

    def __call__(self) -> float:
        return self.now_s


def test_a_write_that_fails_now_and_then_is_one_problem_not_two_lines_a_failure(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """One lock write in ten fails, for an hour of 1-s decisions that each write: a warning
    and a reminder every 10 min, and 'written again' once no write failed for 10 min."""
    backend = RecordingBackend(1)
    clock = _Clock()
    actuator = Actuator(backend, Journal(tmp_path / "journal.json"), dry_run=False, clock=clock)
    actuator.track(backend.infos[0])
    timeout = GpuError("Timeout", operation="nvmlDeviceSetGpuLockedClocks", uuid="GPU-0")
    with caplog.at_level(logging.INFO, logger="powerd.actuator"):
        for tick in range(3600):
            if tick % 10 == 5:
                backend.fail[("lock", "GPU-0")] = timeout
            actuator.apply(_decision(1500 + 15 * (tick % 2)), ["GPU-0"])
            backend.fail.clear()
            clock.now_s += 1.0
        assert [r.levelno for r in caplog.records] == [logging.WARNING] * 6
        for tick in range(601):
            actuator.apply(_decision(1500 + 15 * (tick % 2)), ["GPU-0"])
            clock.now_s += 1.0
    assert [r.levelno for r in caplog.records] == [logging.WARNING] * 6 + [logging.INFO]
    cleared = caplog.records[-1].getMessage()
    assert cleared.startswith("GPU GPU-0: settings are written again (no problem for 10 min")


def test_a_write_that_failed_once_under_a_steady_decision_is_cleared_after_the_quiet_period(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The retry holds and then nothing needs writing: the decisions the GPU holds still count
    toward the quiet period, so the warning gets its closing line."""
    backend = RecordingBackend(1)
    clock = _Clock()
    actuator = Actuator(backend, Journal(tmp_path / "journal.json"), dry_run=False, clock=clock)
    actuator.track(backend.infos[0])
    backend.fail[("lock", "GPU-0")] = GpuError(
        "Timeout", operation="nvmlDeviceSetGpuLockedClocks", uuid="GPU-0"
    )
    with caplog.at_level(logging.INFO, logger="powerd.actuator"):
        actuator.apply(_decision(1500), ["GPU-0"])
        backend.fail.clear()
        for _ in range(700):
            clock.now_s += 1.0
            actuator.apply(_decision(1500), ["GPU-0"])
    assert [r.levelno for r in caplog.records] == [logging.WARNING, logging.INFO]
    assert "settings are written again" in caplog.records[-1].getMessage()


def test_a_clock_setting_held_unchanged_is_sent_again_every_minute(tmp_path: Path) -> None:
    """NVML cannot read a lock back: one reset or set outside powerd (nvidia-smi -rgc, -lgc)
    lasts until the setting is sent again."""
    backend = RecordingBackend(2)
    now_s = [0.0]
    journal = Journal(tmp_path / "journal.json")
    actuator = Actuator(backend, journal, dry_run=False, clock=lambda: now_s[0])
    for info in backend.infos:
        actuator.track(info)
    f_max = backend.infos[1].sm_clock_max_mhz

    def apply_at(t_s: float) -> list[tuple[str, str, tuple[int, ...]]]:
        now_s[0] = t_s
        before = len(backend.writes)
        actuator.apply(_decision(1500), ["GPU-0"])
        actuator.apply(_decision(f_max), ["GPU-1"])
        return [(op, uuid, args) for op, uuid, args in backend.writes[before:] if op != "limit"]

    assert apply_at(0.0) == [("lock", "GPU-0", (345, 1500))]
    assert apply_at(30.0) == []
    assert apply_at(LOCK_RESEND_S) == [
        ("lock", "GPU-0", (345, 1500)),
        ("unlock", "GPU-1", ()),
    ], "the lock held, and the unlocked GPU's reset, sent again"
    assert apply_at(LOCK_RESEND_S + 30.0) == []
    assert [e.uuid for e in journal.entries()] == ["GPU-0"], "a reset sent again saves nothing"


def test_a_release_sends_only_what_changes(tmp_path: Path) -> None:
    backend = RecordingBackend(1)
    now_s = [0.0]
    actuator = Actuator(
        backend, Journal(tmp_path / "journal.json"), dry_run=False, clock=lambda: now_s[0]
    )
    actuator.track(backend.infos[0])
    f_max = backend.infos[0].sm_clock_max_mhz
    released = GroupDecision("", f_max, None, "off")
    actuator.apply(_decision(1500), ["GPU-0"])
    actuator.apply(released, ["GPU-0"])
    before = len(backend.writes)
    for t_s in (100.0, 200.0):
        now_s[0] = t_s
        actuator.apply(released, ["GPU-0"])
    assert backend.writes[before:] == []


def test_a_gpu_observed_only_is_sent_nothing_again(tmp_path: Path) -> None:
    """A GPU whose settings cannot be journaled is observed only: the minute's resend must
    not reset its clocks (it would undo an operator's lock on it)."""
    backend = RecordingBackend(1)
    now_s = [0.0]
    journal = Journal(tmp_path / "journal.json")
    actuator = Actuator(backend, journal, dry_run=False, clock=lambda: now_s[0])
    actuator.track(backend.infos[0])
    (tmp_path / "not-a-directory").write_text("")  # the state disk is full, say
    journal.path = tmp_path / "not-a-directory" / "journal.json"
    actuator.apply(_decision(1500), ["GPU-0"])
    assert actuator.states["GPU-0"].observe_only_reason == "journal_error"
    f_max = backend.infos[0].sm_clock_max_mhz
    for t_s in (30.0, LOCK_RESEND_S, 2 * LOCK_RESEND_S):
        now_s[0] = t_s
        actuator.apply(_decision(f_max), ["GPU-0"])
    assert actuator.states["GPU-0"].observe_only_reason == "journal_error"
    assert backend.writes == []


def _wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline_s = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline_s, what
        time.sleep(0.05)


@pytest.mark.parametrize(
    ("setter", "decision"),
    [
        ("nvmlDeviceSetGpuLockedClocks", GroupDecision("g", 1200, None, "efficiency")),
        ("nvmlDeviceSetPowerManagementLimit", GroupDecision("g", 1980, 400_000, "efficiency")),
    ],
    ids=["clocks", "power_limit"],
)
def test_a_write_given_up_on_that_lands_late_is_put_back_when_the_gpu_returns(
    tmp_path: Path, setter: str, decision: GroupDecision
) -> None:
    """A write the backend gave up on as hung may still land when its call returns: the
    actuator counts it as set, so the GPU's return puts it back rather than leaving a lock or
    limit that powerd does not know of."""
    fake = FakeNvml(GpuPlant(load_gpu_profile("h100-sxm"), 1, seed=11))
    backend = NvmlBackend(fake, stall_s=0.2)
    info = backend.devices()[0]
    actuator = Actuator(backend, Journal(tmp_path / "journal.json"), dry_run=False)
    actuator.track(info)
    fake.sleep = time.sleep
    fake.stall_gpu(0, 0.5, [setter], answer=True)  # lands 0.5 s on, past the 0.2-s limit
    with pytest.raises(GpuLost):
        actuator.apply(decision, [info.uuid])
    actuator.lose(info.uuid)
    _wait_for(
        lambda: fake.plant.locked_clocks(0) is not None or fake.plant.power_limit_mw(0) == 400_000,
        "the write landed after it was given up on",
    )
    _wait_for(
        lambda: not isinstance(backend.read_all([info.uuid])[info.uuid], GpuLost),
        "the GPU answers once the late call returned",
    )
    fake.unstall_gpu(0)
    actuator.rejoin(info.uuid)
    assert fake.plant.locked_clocks(0) is None
    assert fake.plant.power_limit_mw(0) == info.power_limit_default_mw
    assert not actuator.holds_settings(info.uuid)


def test_a_late_limit_write_is_not_taken_for_an_operators(tmp_path: Path) -> None:
    """A limit write given up on that lands before the GPU's next reading must not read as a
    limit set outside powerd: the journal's original stays, and restore puts it back."""
    fake = FakeNvml(GpuPlant(load_gpu_profile("h100-sxm"), 1, seed=11))
    backend = NvmlBackend(fake, stall_s=0.2)
    info = backend.devices()[0]
    journal = Journal(tmp_path / "journal.json")
    actuator = Actuator(backend, journal, dry_run=False)
    actuator.track(info)
    actuator.apply(GroupDecision("g", info.sm_clock_max_mhz, 500_000, "efficiency"), [info.uuid])
    decision = GroupDecision("g", info.sm_clock_max_mhz, 400_000, "efficiency")
    fake.sleep = time.sleep
    fake.stall_gpu(0, 0.5, ["nvmlDeviceSetPowerManagementLimit"], answer=True)
    with pytest.raises(GpuLost):
        actuator.apply(decision, [info.uuid])
    _wait_for(lambda: fake.plant.power_limit_mw(0) == 400_000, "the write landed late")
    _wait_for(
        lambda: not isinstance(backend.read_all([info.uuid])[info.uuid], GpuLost),
        "the GPU answers once the late call returned",
    )
    fake.unstall_gpu(0)
    # The next tick reads the GPU still in its group, at the limit that landed.
    actuator.apply(decision, [info.uuid], limits_mw={info.uuid: 400_000})
    entry = journal.get(info.uuid)
    assert entry is not None and entry.power_limit_mw == info.power_limit_default_mw
    assert restore_all(backend, journal).ok
    assert fake.plant.power_limit_mw(0) == info.power_limit_default_mw
