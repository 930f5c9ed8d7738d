"""The restore journal over the fake NVML: save before the first write, restore newest first,
survive corrupt files, lost GPUs and a SIGKILL of the process that made the changes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pynvml
import pytest

from powerd import journal as journal_module
from powerd.gpu.nvml import NvmlBackend
from powerd.journal import Journal, JournalError, OriginalUnreadable, restore_all
from powerd.model import GpuInfo
from powerd.sim.fake_nvml import FakeNvml
from powerd.sim.plant import GpuPlant, load_gpu_profile
from tests.unit.clocks import Hang

PROFILE = load_gpu_profile("h100-sxm")
DEFAULT_MW = round(PROFILE.power_limit_default_w * 1000)
REPO_ROOT = Path(__file__).resolve().parents[2]


def make_node(n_gpus: int = 3, **kwargs: Any) -> tuple[FakeNvml, NvmlBackend, list[GpuInfo]]:
    fake = FakeNvml(GpuPlant(PROFILE, n_gpus, seed=11), **kwargs)
    backend = NvmlBackend(fake)
    return fake, backend, backend.devices()


def change(backend: NvmlBackend, journal: Journal, info: GpuInfo, limit_mw: int) -> None:
    """What the actuator does: remember, then write."""
    journal.remember(backend, info.uuid, info)
    backend.set_locked_clocks(info.uuid, info.sm_clock_min_mhz, 1500)
    backend.set_power_limit(info.uuid, limit_mw)


@pytest.fixture
def boot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[str | None], None]:
    """Sets the kernel boot id a Journal made next reads; None: it cannot be read."""
    path = tmp_path / "boot_id"
    monkeypatch.setattr(journal_module, "BOOT_ID_FILE", path)

    def set_boot(boot_id: str | None) -> None:
        if boot_id is None:
            path.unlink(missing_ok=True)
        else:
            path.write_text(boot_id + "\n")

    return set_boot


def test_save_then_restore(tmp_path: Path) -> None:
    fake, backend, infos = make_node()
    path = tmp_path / "state" / "journal.json"
    journal = Journal(path)
    assert not journal.pending()
    for info in infos:
        change(backend, journal, info, 400_000)
    assert path.exists()
    assert journal.pending()
    assert [fake.plant.locked_clocks(i) for i in range(3)] == [(345, 1500)] * 3
    assert all(fake.plant.power_limit_mw(i) == 400_000 for i in range(3))

    report = restore_all(backend, journal)

    assert report.ok, report.summary()
    assert sorted(report.restored) == sorted(i.uuid for i in infos)
    assert [fake.plant.locked_clocks(i) for i in range(3)] == [None] * 3
    assert all(fake.plant.power_limit_mw(i) == DEFAULT_MW for i in range(3))
    assert not path.exists()
    assert not journal.pending()
    assert not Journal(path).pending()


def test_original_non_default_limit_comes_back(tmp_path: Path) -> None:
    fake, backend, infos = make_node(1)
    backend.set_power_limit(infos[0].uuid, 550_000)  # set by the site before powerd ran
    journal = Journal(tmp_path / "journal.json")
    change(backend, journal, infos[0], 300_000)
    (entry,) = journal.entries()
    assert entry.power_limit_mw == 550_000
    assert entry.sm_clocks == "unknown"
    assert restore_all(backend, journal).ok
    assert fake.plant.power_limit_mw(0) == 550_000


def test_remember_is_idempotent(tmp_path: Path) -> None:
    _, backend, infos = make_node(1)
    path = tmp_path / "journal.json"
    journal = Journal(path)
    assert journal.remember(backend, infos[0].uuid, infos[0])
    first = path.read_bytes()
    backend.set_power_limit(infos[0].uuid, 333_000)
    assert not journal.remember(backend, infos[0].uuid, infos[0])
    assert path.read_bytes() == first
    # A new process reading the same journal keeps the first original too.
    again = Journal(path)
    assert not again.remember(backend, infos[0].uuid, infos[0])
    assert again.entries()[0].power_limit_mw == DEFAULT_MW


def test_restore_unlocks_every_gpu_newest_first_then_puts_limits_back(tmp_path: Path) -> None:
    fake, backend, infos = make_node(3)
    journal = Journal(tmp_path / "journal.json")
    order = [infos[1], infos[0], infos[2]]
    for info in order:
        change(backend, journal, info, 450_000)
    fake.writes.clear()

    assert restore_all(backend, journal).ok

    assert [(name, index) for name, index, _ in fake.writes] == [
        ("nvmlDeviceResetGpuLockedClocks", 2),
        ("nvmlDeviceResetGpuLockedClocks", 0),
        ("nvmlDeviceResetGpuLockedClocks", 1),
        ("nvmlDeviceSetPowerManagementLimit", 2),
        ("nvmlDeviceSetPowerManagementLimit", 0),
        ("nvmlDeviceSetPowerManagementLimit", 1),
    ]


def test_an_unreadable_power_limit_is_not_saved_as_unknown_but_read_again(tmp_path: Path) -> None:
    fake, backend, infos = make_node(1)
    uuid = infos[0].uuid
    backend.set_power_limit(uuid, 400_000)  # set by the site before powerd ran
    path = tmp_path / "journal.json"
    journal = Journal(path)
    fake.inject_error(0, "nvmlDeviceGetPowerManagementLimit", pynvml.NVMLError_Timeout)
    with pytest.raises(OriginalUnreadable, match="power limit"):
        journal.remember(backend, uuid, infos[0])
    assert journal.entries() == [] and not path.exists()

    assert journal.remember(backend, uuid, infos[0]), "the timeout has cleared"
    assert journal.entries()[0].power_limit_mw == 400_000
    backend.set_power_limit(uuid, 250_000)
    assert restore_all(backend, journal).ok
    assert fake.plant.power_limit_mw(0) == 400_000, "the original, not the default"


def test_clocks_are_saved_without_the_power_limit_and_restore_leaves_it(tmp_path: Path) -> None:
    fake, backend, infos = make_node(2)
    path = tmp_path / "journal.json"
    journal = Journal(path)
    backend.set_power_limit(infos[0].uuid, 400_000)
    change(backend, journal, infos[1], 300_000)
    fake.inject_error(
        0, "nvmlDeviceGetPowerManagementLimit", pynvml.NVMLError_Timeout, persistent=True
    )
    assert journal.remember(backend, infos[0].uuid, infos[0], power_limit=False)
    backend.set_locked_clocks(infos[0].uuid, infos[0].sm_clock_min_mhz, 1500)
    assert Journal(path).get(infos[0].uuid) == journal.get(infos[0].uuid)
    assert journal.entries()[1].power_limit_mw is None
    with pytest.raises(OriginalUnreadable):
        journal.remember(backend, infos[0].uuid, infos[0])
    fake.clear_errors()

    report = restore_all(backend, journal)

    assert report.ok, report.summary()
    assert fake.plant.locked_clocks(0) is None
    assert fake.plant.power_limit_mw(0) == 400_000, "powerd never changed it: left as found"
    assert fake.plant.power_limit_mw(1) == DEFAULT_MW


def test_an_operators_limit_change_while_powerd_only_locks_clocks_is_kept(
    tmp_path: Path,
) -> None:
    fake, backend, infos = make_node(1)
    journal = Journal(tmp_path / "journal.json")
    uuid = infos[0].uuid
    assert journal.remember(backend, uuid, infos[0], power_limit=False)
    backend.set_locked_clocks(uuid, infos[0].sm_clock_min_mhz, 1500)
    backend.set_power_limit(uuid, 500_000)  # nvidia-smi -pl 500 while powerd runs

    assert restore_all(backend, journal).ok
    assert fake.plant.locked_clocks(0) is None
    assert fake.plant.power_limit_mw(0) == 500_000, "powerd never changed the limit"


def test_a_power_limit_read_later_is_saved_in_the_gpus_first_place(tmp_path: Path) -> None:
    fake, backend, infos = make_node(2)
    path = tmp_path / "journal.json"
    journal = Journal(path)
    journal.remember(backend, infos[0].uuid, infos[0], power_limit=False)
    journal.remember(backend, infos[1].uuid, infos[1])
    assert [e.power_limit_mw for e in journal.entries()] == [None, DEFAULT_MW]
    saved_at_s = journal.entries()[0].saved_at_s

    fake.inject_error(0, "nvmlDeviceGetPowerManagementLimit", pynvml.NVMLError_Timeout)
    with pytest.raises(OriginalUnreadable):
        journal.remember(backend, infos[0].uuid, infos[0])
    assert journal.remember(backend, infos[0].uuid, infos[0])
    assert not journal.remember(backend, infos[0].uuid, infos[0])

    entries = Journal(path).entries()
    assert [e.uuid for e in entries] == [infos[0].uuid, infos[1].uuid], "first-write order kept"
    assert [e.power_limit_mw for e in entries] == [DEFAULT_MW, DEFAULT_MW]
    assert entries[0].saved_at_s == saved_at_s


def test_a_version_1_journal_restores_the_default_for_an_unknown_limit(tmp_path: Path) -> None:
    fake, backend, infos = make_node(1)
    uuid = infos[0].uuid
    backend.set_power_limit(uuid, 250_000)
    path = tmp_path / "journal.json"
    entry = {
        "uuid": uuid,
        "index": 0,
        "name": infos[0].name,
        "power_limit_mw": None,
        "power_limit_default_mw": DEFAULT_MW,
        "sm_clocks": "unknown",
        "saved_at_s": 1.0,
    }
    path.write_text(json.dumps({"format": "powerd-journal", "version": 1, "entries": [entry]}))
    journal = Journal(path)
    assert journal.load_error is None
    assert restore_all(backend, journal).ok
    assert fake.plant.power_limit_mw(0) == DEFAULT_MW, "what version 1 promised for it"


def test_lost_gpu_is_reported_and_kept(tmp_path: Path) -> None:
    fake, backend, infos = make_node(3)
    path = tmp_path / "journal.json"
    journal = Journal(path)
    for info in infos:
        change(backend, journal, info, 400_000)
    fake.lose_gpu(1)

    report = restore_all(backend, journal)

    assert not report.ok
    assert report.lost == [infos[1].uuid]
    assert report.restored == [infos[2].uuid, infos[0].uuid]
    assert "1 gone" in report.summary()
    assert fake.plant.power_limit_mw(0) == fake.plant.power_limit_mw(2) == DEFAULT_MW
    assert [e.uuid for e in Journal(path).entries()] == [infos[1].uuid]

    fake.restore_gpu(1)
    report = restore_all(backend, Journal(path))
    assert report.ok
    assert report.restored == [infos[1].uuid]
    assert not path.exists()


def test_each_entry_records_the_boot_it_was_saved_in(
    tmp_path: Path, boot: Callable[[str | None], None]
) -> None:
    """In a key the previous powerd ignores: the version stays the one it reads."""
    _, backend, infos = make_node(1)
    path = tmp_path / "journal.json"
    boot("boot-a")
    change(backend, Journal(path), infos[0], 400_000)
    document = json.loads(path.read_text())
    assert document["version"] == 2
    assert [entry["boot_id"] for entry in document["entries"]] == ["boot-a"]
    boot(None)
    change(backend, Journal(tmp_path / "other.json"), infos[0], 400_000)
    assert Journal(tmp_path / "other.json").entries()[0].boot_id is None


@pytest.mark.parametrize(
    ("saved_in", "restored_in", "dropped"),
    [
        ("boot-a", "boot-b", True),
        ("boot-a", "boot-a", False),
        ("boot-a", None, False),
        (None, "boot-b", False),
    ],
    ids=["rebooted", "same-boot", "boot-unreadable-now", "boot-unreadable-then"],
)
def test_a_gone_gpu_is_dropped_only_when_saved_before_a_reboot(
    tmp_path: Path,
    boot: Callable[[str | None], None],
    caplog: pytest.LogCaptureFixture,
    saved_in: str | None,
    restored_in: str | None,
    dropped: bool,
) -> None:
    """A reboot reset the GPU, and a card replaced or taken out never comes back: its entry
    would fail every restore for good. Gone in the same boot (or not known), it may return."""
    fake, backend, infos = make_node(3)
    path = tmp_path / "journal.json"
    boot(saved_in)
    journal = Journal(path)
    for info in infos:
        change(backend, journal, info, 400_000)
    fake.lose_gpu(1)
    boot(restored_in)

    caplog.clear()  # the restore's lines only: an earlier test may leave INFO on for the saves
    with caplog.at_level("INFO", logger="powerd.journal"):
        report = restore_all(backend, Journal(path))

    assert report.restored == [infos[2].uuid, infos[0].uuid]
    if dropped:
        assert report.ok, report.summary()
        assert report.dropped == [infos[1].uuid] and not report.lost
        assert "1 gone since a reboot reset them, dropped" in report.summary()
        assert not path.exists()
        [line] = [
            r
            for r in caplog.records
            if r.name == "powerd.journal" and infos[1].uuid in r.getMessage()
        ]
        assert line.levelname == "INFO"
        assert "saved before the node rebooted (boot boot-a, now boot-b)" in line.getMessage()
    else:
        assert not report.ok
        assert report.lost == [infos[1].uuid] and not report.dropped
        assert [e.uuid for e in Journal(path).entries()] == [infos[1].uuid]
        assert any(r.levelname == "ERROR" for r in caplog.records if r.name == "powerd.journal")


def test_an_entry_without_a_boot_id_from_the_previous_powerd_is_kept_as_before(
    tmp_path: Path, boot: Callable[[str | None], None]
) -> None:
    fake, backend, infos = make_node(2)
    path = tmp_path / "journal.json"
    boot("boot-a")
    journal = Journal(path)
    for info in infos:
        change(backend, journal, info, 400_000)
    document = json.loads(path.read_text())
    for entry in document["entries"]:
        del entry["boot_id"]
    path.write_text(json.dumps(document))
    fake.lose_gpu(1)
    boot("boot-b")

    report = restore_all(backend, Journal(path))

    assert report.restored == [infos[0].uuid]
    assert fake.plant.power_limit_mw(0) == DEFAULT_MW
    assert report.lost == [infos[1].uuid] and not report.ok
    assert [e.uuid for e in Journal(path).entries()] == [infos[1].uuid]


def test_an_entry_kept_from_an_earlier_boot_counts_as_this_boots_once_changed_again(
    tmp_path: Path, boot: Callable[[str | None], None]
) -> None:
    """An entry kept past a reboot (its restore failed) and powerd changing the GPU again:
    lost now, the GPU may come back in this boot with powerd's settings on it."""
    fake, backend, infos = make_node(1)
    path = tmp_path / "journal.json"
    boot("boot-a")
    change(backend, Journal(path), infos[0], 400_000)
    boot("boot-b")
    journal = Journal(path)
    change(backend, journal, infos[0], 350_000)
    assert Journal(path).entries()[0].boot_id == "boot-b"
    assert Journal(path).entries()[0].power_limit_mw == DEFAULT_MW, "the original, not re-read"
    fake.lose_gpu(0)

    report = restore_all(backend, journal)

    assert report.lost == [infos[0].uuid] and not report.dropped
    assert path.exists()


def test_refused_restore_is_kept_for_later(tmp_path: Path) -> None:
    fake, backend, infos = make_node(2)
    path = tmp_path / "journal.json"
    journal = Journal(path)
    for info in infos:
        change(backend, journal, info, 400_000)
    fake.set_privileged(False)
    report = restore_all(backend, journal)
    assert set(report.failed) == {i.uuid for i in infos}
    assert all("CAP_SYS_ADMIN" in why for why in report.failed.values())
    assert len(Journal(path).entries()) == 2
    fake.set_privileged(True)
    assert restore_all(backend, Journal(path)).ok


def test_a_failed_clock_reset_does_not_keep_the_limit_from_coming_back(tmp_path: Path) -> None:
    fake, backend, infos = make_node(1)
    journal = Journal(tmp_path / "journal.json")
    change(backend, journal, infos[0], 400_000)
    fake.inject_error(0, "nvmlDeviceResetGpuLockedClocks", pynvml.NVMLError_Unknown)
    report = restore_all(backend, journal)
    assert set(report.failed) == {infos[0].uuid}
    assert fake.plant.power_limit_mw(0) == DEFAULT_MW, "the limit came back all the same"
    assert restore_all(backend, Journal(tmp_path / "journal.json")).ok, "kept for the next try"


def test_gpu_without_a_knob_counts_as_restored(tmp_path: Path) -> None:
    fake, backend, infos = make_node(1)
    journal = Journal(tmp_path / "journal.json")
    journal.remember(backend, infos[0].uuid, infos[0])
    backend.set_power_limit(infos[0].uuid, 300_000)
    fake.disable_feature(0, "locked_clocks")
    report = restore_all(backend, journal)
    assert report.ok
    assert fake.plant.power_limit_mw(0) == DEFAULT_MW


@pytest.mark.parametrize(
    "content",
    [
        b'{"format": "powerd-journal", "version": 1, "entries": [{"uuid": ',
        b"\xff\xfe not text",
        b"[]",
        b'{"format": "powerd-journal", "version": 99, "entries": []}',
        b'{"format": "powerd-journal", "version": 1, "entries": [{"uuid": "GPU-1"}]}',
    ],
)
def test_corrupt_journal_is_kept_aside(tmp_path: Path, content: bytes) -> None:
    fake, backend, infos = make_node(2)
    backend.set_locked_clocks(infos[0].uuid, 345, 1200)
    backend.set_power_limit(infos[0].uuid, 300_000)
    path = tmp_path / "journal.json"
    path.write_bytes(content)

    journal = Journal(path)

    assert journal.load_error is not None
    assert "corrupt" in journal.load_error
    assert journal.pending()
    assert not path.exists()
    assert (tmp_path / "journal.json.corrupt").read_bytes() == content
    load_error = journal.load_error

    report = restore_all(backend, journal)

    assert not report.ok
    assert report.errors == [load_error]
    assert "corrupt" in report.summary()
    # Clocks reset everywhere; power limits left alone (their originals were lost), and the
    # one below its default named: a later run would take it for the original.
    assert report.clocks_reset == [i.uuid for i in infos]
    assert fake.plant.locked_clocks(0) is None
    assert fake.plant.power_limit_mw(0) == 300_000
    assert report.limits_below_default == {infos[0].uuid: 300_000}
    assert f"{infos[0].uuid} at 300 W" in report.summary()
    assert infos[1].uuid not in report.summary()
    assert not journal.pending()


def test_a_saved_limit_no_gpu_has_is_not_applied(tmp_path: Path) -> None:
    """A damaged or edited entry (1 mW) would be clamped to the GPU's minimum and reported as
    restored; it is refused, named, and kept, and the clocks are still reset."""
    fake, backend, infos = make_node(2)
    path = tmp_path / "journal.json"
    journal = Journal(path)
    for info in infos:
        change(backend, journal, info, 400_000)
    document = json.loads(path.read_text())
    document["entries"][0]["power_limit_mw"] = 1
    path.write_text(json.dumps(document))

    report = restore_all(backend, Journal(path))

    assert not report.ok
    assert report.restored == [infos[1].uuid]
    assert "outside the GPU's range" in report.failed[infos[0].uuid]
    assert fake.plant.power_limit_mw(0) == 400_000, "left as it is, not set to the minimum"
    assert fake.plant.locked_clocks(0) is None
    assert fake.plant.power_limit_mw(1) == DEFAULT_MW


def test_a_gpu_without_power_management_keeps_the_others_restorable(tmp_path: Path) -> None:
    """NVML reports no limit for GPU 0 (described with a 0 W default, 'unknown'): its clock
    lock is journaled, and that entry must not void the journal holding GPU 1's original."""
    fake = FakeNvml(GpuPlant(PROFILE, 2, seed=11))
    fake.disable_feature(0, "power_limit")
    fake.disable_feature(0, "enforced_power_limit")
    backend = NvmlBackend(fake)
    infos = backend.devices()
    assert infos[0].power_limit_default_mw == 0
    path = tmp_path / "journal.json"
    journal = Journal(path)
    journal.remember(backend, infos[0].uuid, infos[0], power_limit=False)
    backend.set_locked_clocks(infos[0].uuid, infos[0].sm_clock_min_mhz, 1500)
    change(backend, journal, infos[1], 400_000)

    report = restore_all(backend, Journal(path))

    assert report.ok, report.summary()
    assert fake.plant.locked_clocks(0) is None
    assert fake.plant.power_limit_mw(1) == DEFAULT_MW


def test_the_state_folder_is_private_and_a_planted_temp_file_is_not_written_through(
    tmp_path: Path,
) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep")
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    # A temp name an earlier writer would have used, linked to another file.
    (state / f".journal.json.{os.getpid()}.tmp").symlink_to(victim)
    _, backend, infos = make_node(1)
    Journal(state / "journal.json").remember(backend, infos[0].uuid, infos[0])
    assert victim.read_text() == "keep"
    fresh = tmp_path / "fresh" / "state"
    Journal(fresh / "journal.json").remember(backend, infos[0].uuid, infos[0])
    assert fresh.stat().st_mode & 0o077 == 0


def test_a_second_corrupt_journal_keeps_the_first_aside(tmp_path: Path) -> None:
    path = tmp_path / "journal.json"
    path.write_bytes(b"first")
    Journal(path)
    path.write_bytes(b"second")
    assert Journal(path).load_error is not None
    kept = sorted(p.read_bytes() for p in tmp_path.iterdir())
    assert kept == [b"first", b"second"]


def test_write_failure_leaves_the_previous_file_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, backend, infos = make_node(2)
    path = tmp_path / "journal.json"
    journal = Journal(path)
    journal.remember(backend, infos[0].uuid, infos[0])
    before = path.read_bytes()

    real_write = os.write

    def short_then_full_disk(fd: int, data: Any) -> int:
        if len(data) > 8:
            real_write(fd, bytes(data[:8]))
            raise OSError(28, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", short_then_full_disk)
    with pytest.raises(JournalError, match="No space left on device"):
        journal.remember(backend, infos[1].uuid, infos[1])
    monkeypatch.undo()

    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["journal.json"]
    assert [e.uuid for e in journal.entries()] == [infos[0].uuid]
    assert json.loads(before)["entries"][0]["uuid"] == infos[0].uuid


def test_unwritable_location_is_a_clear_error(tmp_path: Path) -> None:
    _, backend, infos = make_node(1)
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    journal = Journal(blocker / "journal.json")
    with pytest.raises(JournalError, match="cannot save GPU settings to"):
        journal.remember(backend, infos[0].uuid, infos[0])
    assert journal.entries() == []


CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from powerd.gpu.nvml import NvmlBackend
    from powerd.journal import Journal
    from powerd.sim.fake_nvml import FakeNvml
    from powerd.sim.plant import GpuPlant, load_gpu_profile

    fake = FakeNvml(GpuPlant(load_gpu_profile("h100-sxm"), 2, seed=11), state_file=sys.argv[1])
    backend = NvmlBackend(fake)
    journal = Journal(Path(sys.argv[2]))
    for info in backend.devices():
        journal.remember(backend, info.uuid, info)
        backend.set_locked_clocks(info.uuid, info.sm_clock_min_mhz, 1395)
        backend.set_power_limit(info.uuid, 350000)
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_restore_after_sigkill_of_the_writer(tmp_path: Path) -> None:
    state_file = tmp_path / "devices.json"
    journal_path = tmp_path / "journal.json"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(state_file), str(journal_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr

    # A new process: the driver kept the settings, the journal kept the originals.
    fake, backend, _ = make_node(2, state_file=str(state_file))
    assert [fake.plant.power_limit_mw(i) for i in range(2)] == [350_000, 350_000]
    assert fake.plant.locked_clocks(0) is not None
    journal = Journal(journal_path)
    assert journal.pending()
    assert [e.power_limit_mw for e in journal.entries()] == [DEFAULT_MW, DEFAULT_MW]

    report = restore_all(backend, journal)

    assert report.ok, report.summary()
    assert [fake.plant.power_limit_mw(i) for i in range(2)] == [DEFAULT_MW, DEFAULT_MW]
    assert [fake.plant.locked_clocks(i) for i in range(2)] == [None, None]
    assert not journal_path.exists()
    # And a third process sees the restored state.
    fresh, _, _ = make_node(2, state_file=str(state_file))
    assert fresh.plant.power_limit_mw(1) == DEFAULT_MW
    assert fresh.plant.locked_clocks(1) is None


def test_a_gpu_that_hangs_until_after_the_restore_costs_it_one_stall_limit(
    tmp_path: Path,
) -> None:
    """A GPU whose firmware still hangs when the settings are put back (ExecStopPost=, or a
    start after a crash) holds a call for about 45 s: the restore gives it up after the
    backend's stall limit, keeps its entry for the next restore, and puts every other GPU
    back."""
    fake, backend, infos = make_node(4)
    journal = Journal(tmp_path / "journal.json")
    for info in infos:
        change(backend, journal, info, 450_000)
    hang = Hang()
    fake.sleep = hang
    fake.stall_gpu(1, 45.0)
    try:
        started_s = time.monotonic()
        report = restore_all(NvmlBackend(fake, stall_s=0.2), Journal(journal.path))
        assert time.monotonic() - started_s < 30, "not waited out"
    finally:
        hang.release()
    assert report.lost == [infos[1].uuid]
    assert sorted(report.restored) == sorted(info.uuid for i, info in enumerate(infos) if i != 1)
    assert [entry.uuid for entry in Journal(journal.path).entries()] == [infos[1].uuid]
    for i in (0, 2, 3):
        assert fake.plant.locked_clocks(i) is None
        assert fake.plant.power_limit_mw(i) == DEFAULT_MW


def test_a_gpu_that_answers_slowly_is_restored_all_the_same(tmp_path: Path) -> None:
    """A fresh process's first calls on a GPU may take seconds (a busy node): the stall limit
    is on one call, not on a restore's dozen, so a GPU that answers each is put back."""
    fake, backend, infos = make_node(2)
    journal = Journal(tmp_path / "journal.json")
    for info in infos:
        change(backend, journal, info, 450_000)
    fake.sleep = time.sleep
    fake.stall_gpu(0, 0.1, answer=True)  # every call on GPU 0: 0.1 s, then the answer
    report = restore_all(NvmlBackend(fake, stall_s=0.5), Journal(journal.path))
    assert report.ok and sorted(report.restored) == sorted(info.uuid for info in infos)
    assert fake.call_counts["nvmlDeviceGetName"] >= 3, "GPU 0 described again, slowly"
    assert fake.plant.locked_clocks(0) is None
    assert fake.plant.power_limit_mw(0) == DEFAULT_MW


def test_a_gpu_that_cannot_be_described_is_not_taken_for_restored(tmp_path: Path) -> None:
    """Without nvmlDeviceGetIndex a fresh process cannot describe the GPU: its restore fails
    and keeps the entry (a NotSupported would read as a GPU without the knob), and no other
    GPU is called to learn the index (one that hangs would hold this GPU's restore)."""
    fake, backend, infos = make_node(2)
    journal = Journal(tmp_path / "journal.json")
    change(backend, journal, infos[0], 450_000)
    fake.inject_error(0, "nvmlDeviceGetIndex", pynvml.NVMLError_FunctionNotFound, persistent=True)
    fake.stall_gpu(1, 45.0)
    fake.sleep = lambda seconds: pytest.fail("GPU 1 was called")
    report = restore_all(NvmlBackend(fake), Journal(journal.path))
    assert not report.ok and infos[0].uuid in report.failed
    assert "cannot be described" in report.failed[infos[0].uuid]
    assert [entry.uuid for entry in Journal(journal.path).entries()] == [infos[0].uuid]


def test_a_restore_that_puts_back_one_knob_of_two_says_which_is_held(tmp_path: Path) -> None:
    fake, backend, infos = make_node(2)
    journal = Journal(tmp_path / "journal.json")
    for info in infos:
        change(backend, journal, info, 450_000)
    fake.inject_error(0, "nvmlDeviceResetGpuLockedClocks", pynvml.NVMLError_Timeout)
    fake.inject_error(1, "nvmlDeviceSetPowerManagementLimit", pynvml.NVMLError_Timeout)
    report = restore_all(NvmlBackend(fake), Journal(journal.path))
    assert report.held == {infos[0].uuid: ("clocks",), infos[1].uuid: ("power_limit",)}
    assert fake.plant.locked_clocks(0) is not None and fake.plant.power_limit_mw(0) == DEFAULT_MW
    assert fake.plant.locked_clocks(1) is None and fake.plant.power_limit_mw(1) == 450_000
