"""An operator's `nvidia-smi -pl` while powerd controls a GPU's power limit (budget mode).

The limit the operator sets is the GPU's new ceiling and what a stop puts back: powerd never
raises the GPU above it and never puts back the limit it replaced.
"""

from __future__ import annotations

import statistics
from dataclasses import replace
from pathlib import Path

from powerd.actuator import Actuator
from powerd.gpu.backend import GpuBackend
from powerd.gpu.errors import GpuError
from powerd.gpu.nvml import NvmlBackend
from powerd.journal import Journal, restore_all
from powerd.model import REASON_SW_POWER_CAP, GroupDecision
from powerd.sim.fake_nvml import FakeNvml
from powerd.sim.plant import GpuPlant, load_gpu_profile
from tests.unit.daemon_helpers import SMALL_NODE, make_rig
from tests.unit.test_actuator import RecordingBackend, _actuator, _decision


def _saved_mw(journal: Journal) -> int | None:
    entry = journal.get("GPU-0")
    assert entry is not None
    return entry.power_limit_mw


def _tick(
    actuator: Actuator, backend: GpuBackend, decision: GroupDecision, uuids: list[str]
) -> None:
    """Apply a decision as a tick does: with the GPUs' limits read before it."""
    limits_mw = {uuid: backend.read(uuid).power_limit_mw for uuid in uuids}
    actuator.apply(decision, uuids, limits_mw=limits_mw)


def _limits(backend: RecordingBackend) -> list[int]:
    return [args[0] for op, _, args in backend.writes if op == "limit"]


def test_an_operator_who_lowers_the_cap_is_never_raised_above(tmp_path: Path) -> None:
    backend, journal, actuator = _actuator(tmp_path, n=1)
    _tick(actuator, backend, _decision(1980, 400_000), ["GPU-0"])  # powerd's share of a node budget
    backend.limits["GPU-0"] = 300_000  # nvidia-smi -pl 300
    _tick(actuator, backend, _decision(1980, 400_000), ["GPU-0"])
    _tick(actuator, backend, _decision(1980, 420_000), ["GPU-0"])
    assert _limits(backend) == [400_000], "a larger share must not lift the operator's cap"
    assert backend.limits["GPU-0"] == 300_000
    assert _saved_mw(journal) == 300_000
    assert _saved_mw(Journal(journal.path)) == 300_000, "saved for a crash"

    _tick(actuator, backend, _decision(1980, 250_000), ["GPU-0"])
    assert backend.limits["GPU-0"] == 250_000, "below the operator's cap powerd still acts"
    _tick(actuator, backend, _decision(1980, None), ["GPU-0"])
    assert backend.limits["GPU-0"] == 300_000, "no limit of powerd's: the operator's, not 700 W"
    _tick(actuator, backend, _decision(1980, 260_000), ["GPU-0"])
    assert restore_all(backend, journal).ok
    assert backend.limits["GPU-0"] == 300_000


def test_an_operator_who_lifts_the_cap_sets_the_new_ceiling_and_what_stop_restores(
    tmp_path: Path,
) -> None:
    backend, journal, actuator = _actuator(tmp_path, n=1)
    backend.limits["GPU-0"] = 400_000  # a cap set before powerd started
    _tick(actuator, backend, _decision(1980, 300_000), ["GPU-0"])
    backend.limits["GPU-0"] = 600_000  # the operator lifts it while powerd runs
    _tick(actuator, backend, _decision(1980, 300_000), ["GPU-0"])
    assert backend.limits["GPU-0"] == 300_000, "powerd's share holds again under the new cap"
    _tick(actuator, backend, _decision(1980, 500_000), ["GPU-0"])
    assert backend.limits["GPU-0"] == 500_000, "not held to the 400 W cap the operator lifted"
    assert _saved_mw(journal) == 600_000
    _tick(actuator, backend, _decision(1980, 650_000), ["GPU-0"])
    assert backend.limits["GPU-0"] == 600_000, "a share above the new cap puts that cap back"
    _tick(actuator, backend, _decision(1980, 300_000), ["GPU-0"])
    assert restore_all(backend, journal).ok
    assert backend.limits["GPU-0"] == 600_000, "stop puts back the operator's limit, not 400 W"


def test_an_operators_change_is_warned_about_once(tmp_path: Path, caplog) -> None:
    backend, _, actuator = _actuator(tmp_path, n=1)
    _tick(actuator, backend, _decision(1980, 400_000), ["GPU-0"])
    backend.limits["GPU-0"] = 300_000
    with caplog.at_level("INFO", logger="powerd.actuator"):
        for share_mw in (400_000, 420_000, 380_000, 400_000):
            _tick(actuator, backend, _decision(1980, share_mw), ["GPU-0"])
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1, warnings
    assert "GPU-0" in warnings[0] and "300 W" in warnings[0] and "400 W" in warnings[0]


def test_a_limit_set_after_powerds_last_write_is_kept_at_stop(tmp_path: Path) -> None:
    fake = FakeNvml(GpuPlant(load_gpu_profile("h100-sxm"), 1, seed=11))
    backend = NvmlBackend(fake)
    (info,) = backend.devices()
    journal = Journal(tmp_path / "journal.json")
    actuator = Actuator(backend, journal, dry_run=False)
    actuator.track(info)
    budget = GroupDecision("g", info.sm_clock_max_mhz, 400_000, "budget")
    _tick(actuator, backend, budget, [info.uuid])
    assert fake.plant.power_limit_mw(0) == 400_000
    # nvidia-smi -pl 550, then systemctl stop powerd before the next tick
    fake.nvmlDeviceSetPowerManagementLimit(fake.nvmlDeviceGetHandleByIndex(0), 550_000)
    assert restore_all(backend, journal).ok
    assert fake.plant.power_limit_mw(0) == 550_000


def test_after_a_crash_restore_puts_back_the_saved_limit(tmp_path: Path) -> None:
    """A new process knows nothing of what the last one left on the GPU: the saved limit
    (the operator's, once adopted) comes back."""
    backend, journal, actuator = _actuator(tmp_path, n=1)
    _tick(actuator, backend, _decision(1980, 400_000), ["GPU-0"])
    backend.limits["GPU-0"] = 500_000
    _tick(actuator, backend, _decision(1980, 400_000), ["GPU-0"])  # adopted; 400 W written again
    assert restore_all(backend, Journal(journal.path)).ok
    assert backend.limits["GPU-0"] == 500_000


class ReadBackOff(RecordingBackend):
    """While off_mw is set, takes a power limit that far off the one asked for, and says so
    (the backend's read-back check)."""

    off_mw = 0

    def set_power_limit(self, uuid: str, power_limit_mw: int) -> int:
        if not self.off_mw:
            return super().set_power_limit(uuid, power_limit_mw)
        self.limits[uuid] = power_limit_mw + self.off_mw
        raise GpuError(f"reads back as {self.limits[uuid]} mW", uuid=uuid)


def test_a_limit_that_reads_back_off_after_a_failed_write_is_no_operators(
    tmp_path: Path,
) -> None:
    backend = ReadBackOff(1)
    journal = Journal(tmp_path / "journal.json")
    actuator = Actuator(backend, journal, dry_run=False)
    actuator.track(backend.infos[0])
    _tick(actuator, backend, _decision(1980, 400_000), ["GPU-0"])
    backend.off_mw = 5_000
    _tick(actuator, backend, _decision(1980, 300_000), ["GPU-0"])
    assert backend.limits["GPU-0"] == 305_000
    backend.off_mw = 0
    _tick(actuator, backend, _decision(1980, 300_000), ["GPU-0"])
    assert backend.limits["GPU-0"] == 300_000
    assert _saved_mw(journal) == 700_000, "still the limit found at start"


def test_a_gpu_reset_while_it_was_lost_is_no_operators_change(tmp_path: Path) -> None:
    backend, journal, actuator = _actuator(tmp_path, n=1)
    backend.limits["GPU-0"] = 400_000
    _tick(actuator, backend, _decision(1980, 300_000), ["GPU-0"])
    _tick(actuator, backend, _decision(1980, None), ["GPU-0"])  # back at the 400 W cap
    actuator.lose("GPU-0")
    backend.limits["GPU-0"] = 700_000  # the reset that brought it back
    actuator.rejoin("GPU-0")
    _tick(actuator, backend, _decision(1980, None), ["GPU-0"])
    assert _saved_mw(journal) == 400_000
    assert restore_all(backend, journal).ok
    assert backend.limits["GPU-0"] == 400_000


def test_without_a_journal_the_operators_limit_is_the_ceiling(tmp_path: Path) -> None:
    backend = RecordingBackend(1)
    actuator = Actuator(backend, None, dry_run=False)
    actuator.track(backend.infos[0])
    _tick(actuator, backend, _decision(1980, 400_000), ["GPU-0"])
    backend.limits["GPU-0"] = 300_000
    _tick(actuator, backend, _decision(1980, 450_000), ["GPU-0"])
    _tick(actuator, backend, _decision(1980, None), ["GPU-0"])
    assert backend.limits["GPU-0"] == 300_000
    assert _limits(backend) == [400_000]


def test_a_limit_set_after_the_ticks_read_is_seen_before_powerd_writes(tmp_path: Path) -> None:
    """The tick reads the GPUs before it scrapes the servers and decides; an operator's limit
    set in between, or between ticks when the prefill guard or a reload writes, is read again
    right before the write, and kept."""
    backend, journal, actuator = _actuator(tmp_path, n=1)
    _tick(actuator, backend, _decision(1980, 400_000), ["GPU-0"])
    read_at_tick = {"GPU-0": backend.limits["GPU-0"]}
    backend.limits["GPU-0"] = 300_000  # nvidia-smi -pl 300 while the tick scrapes
    actuator.apply(_decision(1980, 450_000), ["GPU-0"], limits_mw=read_at_tick)
    assert backend.limits["GPU-0"] == 300_000 and _saved_mw(journal) == 300_000
    backend.limits["GPU-0"] = 350_000  # and again; then a write between ticks
    actuator.apply(_decision(1980, 250_000), ["GPU-0"])
    actuator.apply(_decision(1980, None), ["GPU-0"])
    assert backend.limits["GPU-0"] == 350_000, "back to the operator's latest, not 300 or 700 W"
    assert restore_all(backend, journal).ok
    assert backend.limits["GPU-0"] == 350_000


def test_after_a_binding_power_cap_the_clock_comes_down_again(tmp_path: Path) -> None:
    """While a cap holds the GPU, its power is the cap's and its clock falls as the load
    rises: those ticks taught the power fit that lower clocks draw more, and the group then
    held its top clock ("hold_energy") at low load for good, drawing 60 % more. Ticks whose
    clock a power limit below the default held are kept out of the fit."""
    sim = replace(SMALL_NODE, trace="step", peak_load=0.7)
    rig = make_rig(tmp_path, sim=sim, duration_s=600.0)
    for i in range(2):  # an operator's cap, set before powerd starts
        rig.fake.nvmlDeviceSetPowerManagementLimit(rig.fake.nvmlDeviceGetHandleByIndex(i), 300_000)
    rig.run(400)  # low, then high load: the cap binds
    assert any(
        (gpu.reading.clock_event_reasons or 0) & REASON_SW_POWER_CAP
        for snapshot in rig.snapshots[200:400]
        for gpu in snapshot.gpus
    ), "the cap binds at high load"
    rig.run(200)  # low load again: the backlog drains within about 100 s
    caps_mhz = [g.sm_clock_max_mhz for s in rig.snapshots[-50:] for g in s.groups]
    reasons = [g.decision_reason for s in rig.snapshots[-50:] for g in s.groups]
    f_max = rig.node.plant.profile.sm_clock_max_mhz
    assert statistics.median(c or f_max for c in caps_mhz) < f_max - 500, caps_mhz
    assert reasons.count("hold_energy") < len(reasons) / 4, reasons
