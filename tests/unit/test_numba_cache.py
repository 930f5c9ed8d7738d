"""The numba cache folder: fresh for every change of jitted code, never another user's."""

from __future__ import annotations

import os
import pwd
import time
from pathlib import Path
from typing import Any

import pytest

from powerd.control import numba_cache


def _package(tmp_path: Path) -> Path:
    package = tmp_path / "powerd"
    (package / "sim").mkdir(parents=True)
    (package / "sim" / "plant.py").write_text("@jit\ndef step(x):\n    return x\n")
    (package / "cli.py").write_text("def main():\n    pass\n")
    return package


def test_the_folder_changes_with_any_jitted_module_and_only_with_one(tmp_path: Path) -> None:
    package = _package(tmp_path)
    before = numba_cache.cache_dir(tmp_path / "cache", package_dir=package)
    (package / "cli.py").write_text("def main():\n    return 1\n")
    assert numba_cache.cache_dir(tmp_path / "cache", package_dir=package) == before
    (package / "sim" / "plant.py").write_text("@jit\ndef step(x):\n    return 2 * x\n")
    after = numba_cache.cache_dir(tmp_path / "cache", package_dir=package)
    assert after != before and after.parent == before.parent == tmp_path / "cache"
    assert numba_cache.cache_dir(after, package_dir=package) == after, "not nested twice"


def test_numba_cache_dir_is_the_base(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = _package(tmp_path)
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "unit-cache"))
    assert numba_cache.cache_dir(package_dir=package).parent == tmp_path / "unit-cache"


@pytest.mark.skipif(os.getuid() != 0, reason="planting a folder for another user needs root")
def test_a_folder_planted_by_another_user_is_not_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no writable home, the cache goes to the temporary folder: one there that another
    user made would let them hand root compiled code."""
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "unwritable" / "cache"))
    (tmp_path / "unwritable").write_text("")  # not a folder: nothing can be made under it
    monkeypatch.setattr(numba_cache.tempfile, "tempdir", str(tmp_path / "tmp"))
    planted = tmp_path / "tmp" / f"powerd-numba-{os.getuid()}"
    planted.mkdir(parents=True)
    os.chown(planted, 65534, 65534)
    package = _package(tmp_path)
    chosen = numba_cache.cache_dir(package_dir=package)
    assert planted not in chosen.parents and chosen.parent.parent == tmp_path / "tmp"
    assert chosen.parent.stat().st_uid == 0
    planted.rmdir()
    chosen = numba_cache.cache_dir(package_dir=package)
    assert chosen.parent == planted, "the user's own folder there is used again"


def test_a_constant_a_kernel_imports_changes_the_folder(tmp_path: Path) -> None:
    """A kernel compiles in the constants it reads from another module."""
    package = _package(tmp_path)
    (package / "model.py").write_text("REASON = 4\n")
    (package / "sim" / "plant.py").write_text(
        "from powerd.model import REASON\n\n@jit\ndef step(x):\n    return x | REASON\n"
    )
    before = numba_cache.cache_dir(tmp_path / "cache", package_dir=package)
    (package / "model.py").write_text("REASON = 8\n")
    assert numba_cache.cache_dir(tmp_path / "cache", package_dir=package) != before


def test_no_home_and_no_passwd_entry_still_gets_a_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A container's arbitrary UID: Path.home() raises, and every command (restore
    included) imports the kernels."""
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv("HOME", raising=False)

    def no_entry(uid: int) -> Any:
        raise KeyError(uid)

    monkeypatch.setattr(pwd, "getpwuid", no_entry)
    monkeypatch.setattr(numba_cache.tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    chosen = numba_cache.cache_dir(package_dir=_package(tmp_path))
    assert chosen.parent == tmp_path / "tmp" / f"powerd-numba-{os.getuid()}"


def test_a_folder_under_one_another_user_may_swap_is_not_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # no sticky bit: anyone may rename what is in it
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(shared))
    monkeypatch.setattr(numba_cache.tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    chosen = numba_cache.cache_dir(package_dir=_package(tmp_path))
    assert shared not in chosen.parents
    assert chosen.parent == tmp_path / "tmp" / f"powerd-numba-{os.getuid()}"


def test_folders_made_under_umask_002_are_private(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ubuntu users' umask leaves new folders group-writable, which the check refuses: the
    folders made for the cache must not be, or every run would fall back to /tmp."""
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home" / ".cache"))
    (tmp_path / "home").mkdir(mode=0o755)
    old = os.umask(0o002)
    try:
        chosen = numba_cache.cache_dir(package_dir=_package(tmp_path))
    finally:
        os.umask(old)
    assert chosen.parent == tmp_path / "home" / ".cache" / "powerd" / "numba"


def test_a_folder_reached_through_a_link_another_user_may_swap_is_not_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # holds the link: anyone may replace it
    (tmp_path / "real").mkdir(mode=0o700)
    (shared / "cache").symlink_to(tmp_path / "real")
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(shared / "cache"))
    monkeypatch.setattr(numba_cache.tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    chosen = numba_cache.cache_dir(package_dir=_package(tmp_path))
    assert chosen.parent == tmp_path / "tmp" / f"powerd-numba-{os.getuid()}"


def _aged(folder: Path, age_s: float, *, marked: bool = True) -> Path:
    """A kernel folder last used age_s ago (by powerd, where `marked`)."""
    folder.mkdir(parents=True)
    (folder / "kernel.nbi").write_bytes(b"")
    then_s = time.time() - age_s
    if marked:
        (folder / numba_cache.USED_MARK).touch()
        os.utime(folder / numba_cache.USED_MARK, (then_s, then_s))
    os.utime(folder, (then_s, then_s))
    return folder


def test_folders_of_earlier_versions_unused_for_a_month_are_removed(tmp_path: Path) -> None:
    """Each upgrade leaves its compiled kernels behind: /var/cache/powerd would only grow."""
    month_s = numba_cache.STALE_AFTER_S
    ours = _aged(tmp_path / "0123456789abcdef", 2 * month_s)
    gone = _aged(tmp_path / "fedcba9876543210", month_s + 3600)
    recent = _aged(tmp_path / "00000000000000aa", month_s - 3600)
    not_a_digest = _aged(tmp_path / "notes-kept-here", 2 * month_s)
    elsewhere = _aged(tmp_path / "elsewhere" / "fedcba9876543211", 2 * month_s)
    linked = tmp_path / "00000000000000bb"
    linked.symlink_to(elsewhere)

    assert numba_cache.prune_stale(ours) == [gone]
    assert not gone.exists() and (ours / "kernel.nbi").exists()
    assert recent.exists() and not_a_digest.exists()
    assert linked.is_symlink() and (elsewhere / "kernel.nbi").exists(), "a link is not followed"
    used_s = (ours / numba_cache.USED_MARK).stat().st_mtime
    assert time.time() - used_s < 3600, "the folder in use is marked as used"
    assert numba_cache.prune_stale(recent) == [], "ours, just used, is no longer stale"


def test_a_folder_powerd_did_not_mark_is_left(tmp_path: Path) -> None:
    """NUMBA_CACHE_DIR may name a folder other programs use too, or a digest folder whose
    parent is not powerd's: a folder named like a digest is not enough."""
    theirs = _aged(tmp_path / "5f2b9c0d1e3a4b6c", 2 * numba_cache.STALE_AFTER_S, marked=False)
    assert numba_cache.prune_stale(tmp_path / "0123456789abcdef") == []
    assert (theirs / "kernel.nbi").exists()


def test_only_a_folder_marked_compiled_by_the_same_numba_holds_the_kernels(
    tmp_path: Path,
) -> None:
    """Kernel files alone may be a compile cut short (a child killed part-way) or another
    numba's or CPU's: such a start compiles again, in a child, rather than in the daemon."""
    folder = tmp_path / "0123456789abcdef"
    stamp = "numba 0.68.1; Python 3.11.7; CPU sapphirerapids"
    numba_cache.prune_stale(folder)
    assert (folder / numba_cache.USED_MARK).is_file()
    assert not numba_cache.holds_kernels(folder, stamp), "the first start still says it compiles"
    (folder / "kernel.nbi").write_bytes(b"")
    assert not numba_cache.holds_kernels(folder, stamp), "a compile cut short"
    numba_cache.mark_compiled(folder, stamp)
    assert numba_cache.holds_kernels(folder, stamp)
    assert not numba_cache.holds_kernels(folder, stamp.replace("0.68.1", "0.69.0"))
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [numba_cache.USED_MARK, numba_cache.COMPILED_MARK, "kernel.nbi"]
    ), "written whole, nothing left beside it"


@pytest.mark.skipif(os.getuid() != 0, reason="a folder of another user needs root to make")
def test_another_users_stale_folder_is_left(tmp_path: Path) -> None:
    theirs = _aged(tmp_path / "fedcba9876543210", 2 * numba_cache.STALE_AFTER_S)
    os.chown(theirs, 65534, 65534)
    assert numba_cache.prune_stale(tmp_path / "0123456789abcdef") == []
    assert theirs.exists()


def test_a_base_that_cannot_be_made_prunes_nothing(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    assert numba_cache.prune_stale(tmp_path / "a-file" / "0123456789abcdef") == []


def test_a_folder_from_before_the_mark_holding_numba_files_alone_is_removed(
    tmp_path: Path,
) -> None:
    """The release before the mark left its folder unmarked: the first upgrade would keep it
    for good. Its files tell it: numba's index and data files, in numba's folders."""
    month_s = numba_cache.STALE_AFTER_S
    older = _aged(tmp_path / "fedcba9876543210", 2 * month_s, marked=False)
    (older / "work_main_powerd").mkdir()
    for name in ("kernels.step-100.py311.nbi", "kernels.step-100.py311.1.nbc"):
        (older / "work_main_powerd" / name).write_bytes(b"")
    then_s = time.time() - 2 * month_s
    for path in [*older.rglob("*"), older]:
        os.utime(path, (then_s, then_s))
    recent = _aged(tmp_path / "00000000000000aa", 2 * month_s, marked=False)
    (recent / "kernels.step-100.py311.nbc").write_bytes(b"")  # compiled again a moment ago
    theirs = _aged(tmp_path / "00000000000000bb", 2 * month_s, marked=False)
    (theirs / "notes.txt").write_text("not numba's")
    os.utime(theirs / "notes.txt", (then_s, then_s))

    assert numba_cache.prune_stale(tmp_path / "0123456789abcdef") == [older]
    assert recent.exists() and theirs.exists()
