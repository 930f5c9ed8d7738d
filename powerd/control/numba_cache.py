"""Where numba keeps compiled kernels: `<base>/<digest of the modules with jitted code>`.

numba checks a cached kernel against its own file only, so a kernel that calls one in another
module (the simulated node steps the engine and the plant) would keep running the old callee
from the cache after an upgrade or an edit of that module. A folder named by the content of
every module with jitted code starts a fresh cache whenever any of them changes.

`base` is $NUMBA_CACHE_DIR (the unit sets /var/cache/powerd), else the user's cache folder,
else the temporary folder: a service account without a writable home or site-packages must
still start (numba refuses `cache=True` without a writable folder). This module imports no
numba: control/kernels.py applies it before its first kernel, and prunes the folders that
earlier versions left beside it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent.parent
_JITTED = re.compile(r"^@(jit|numba\.njit)\b", re.M)
_PACKAGE_IMPORT = re.compile(r"^\s*(?:from|import)\s+(powerd(?:\.\w+)*)", re.M)
_DIGEST_LEN = 16
_DIGEST_NAME = re.compile(rf"^[0-9a-f]{{{_DIGEST_LEN}}}$")
STALE_AFTER_S = 30 * 86400.0
"""A sibling folder no powerd has used for this long belongs to a version gone by."""
COMPILED_MARK = ".powerd-compiled"
"""The file that says the folder holds every kernel, and what compiled them (holds_kernels)."""
USED_MARK = ".powerd-used"
"""The file that marks a kernel folder as powerd's; its time is the last start that used it
(numba writes only when it compiles)."""


def jitted_digest(package_dir: Path = PACKAGE_DIR) -> str:
    """16 hex digits from the path and content of every module under `package_dir` (the
    powerd package) that jits code, and of the package's modules those import: a kernel
    compiles in the constants it reads from them."""
    root = package_dir.parent
    sources = set()
    for path in package_dir.rglob("*.py"):
        text = path.read_text(encoding="utf-8", errors="replace")
        if _JITTED.search(text):
            sources.add(path)
            sources.update(_imported(text, root))
    digest = hashlib.sha256()
    for path in sorted(sources):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:_DIGEST_LEN]


def _imported(text: str, root: Path) -> set[Path]:
    """The files of the package modules `text` imports by name, under `root`."""
    found = set()
    for module in _PACKAGE_IMPORT.findall(text):
        base = root.joinpath(*module.split("."))
        for path in (base.with_suffix(".py"), base / "__init__.py"):
            if path.is_file():
                found.add(path)
    return found


def cache_dir(base: str | Path | None = None, package_dir: Path = PACKAGE_DIR) -> Path:
    """The folder for this code's compiled kernels under `base` (default: as the module says).
    A `base` already named by the digest is used as it is."""
    digest = jitted_digest(package_dir)
    if base is None:
        base = os.environ.get("NUMBA_CACHE_DIR") or _writable_base()
    base = Path(base)
    return base if base.name == digest else base / digest


def _writable_base() -> Path:
    candidates = []
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        candidates.append(Path(xdg) / "powerd" / "numba")
    else:
        with contextlib.suppress(RuntimeError):  # no HOME and no passwd entry (a container)
            candidates.append(Path.home() / ".cache" / "powerd" / "numba")
    candidates.append(Path(tempfile.gettempdir()) / f"powerd-numba-{os.getuid()}")
    for candidate in candidates:
        try:
            _make_private(candidate)
        except OSError:
            continue
        if _ours_alone(candidate):
            return candidate
    return Path(tempfile.mkdtemp(prefix="powerd-numba-"))


def _make_private(folder: Path) -> None:
    """Make `folder` and each missing folder above it with mode 0700 (mkdir's parents take
    the umask's mode, which 002 leaves group-writable)."""
    missing = [folder, *(p for p in folder.parents if not p.exists())]
    for level in reversed(missing):
        level.mkdir(mode=0o700, exist_ok=True)


def _ours_alone(folder: Path) -> bool:
    """Whether only this user (and root) can put files in `folder` or swap it: compiled code
    loaded from a folder another user planted (in /tmp, say) would run as this user, root
    included. The folder must be this user's and writable by no one else; every folder above
    it this user's or root's, and writable by no one else unless sticky (as /tmp is)."""
    uid = os.getuid()
    try:
        st = folder.lstat()
        if not (stat.S_ISDIR(st.st_mode) and st.st_uid == uid and not _others_write(st)):
            return False
        # Above the folder as named (a symlink's own folder) and as it resolves.
        for parent in {*folder.absolute().parents, *folder.resolve().parents}:
            up = parent.stat()
            if up.st_uid not in (uid, 0) or (_others_write(up) and not up.st_mode & stat.S_ISVTX):
                return False
    except OSError:
        return False
    return os.access(folder, os.W_OK | os.X_OK)


def _others_write(st: os.stat_result) -> bool:
    return bool(st.st_mode & (stat.S_IWGRP | stat.S_IWOTH))


def prune_stale(folder: Path, stale_after_s: float = STALE_AFTER_S) -> list[Path]:
    """Mark `folder` (this code's) as used now, and remove the folders beside it that are
    powerd's under another digest and no start has used for `stale_after_s`: each upgrade or
    edit of the kernels leaves one behind (a few MB). powerd's are those with its mark, and
    those of releases before the mark that hold numba's cache files alone. A folder of another
    program (in a base it shares), a link, or another user's is left, as is one that cannot be
    removed. Returns those removed."""
    _mark_used(folder)
    removed: list[Path] = []
    cutoff_s = time.time() - stale_after_s
    try:
        siblings = list(folder.parent.iterdir())
    except OSError:
        return removed
    for sibling in siblings:
        if sibling.name == folder.name or not _DIGEST_NAME.match(sibling.name):
            continue
        try:
            st = sibling.lstat()
        except OSError:
            continue
        if not (stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid()):
            continue
        used_s = _last_used_s(sibling)
        if used_s is not None and used_s < cutoff_s:
            shutil.rmtree(sibling, ignore_errors=True)
            if not sibling.exists():
                removed.append(sibling)
    return removed


def _last_used_s(folder: Path) -> float | None:
    """When powerd last used `folder`: its mark's time; for a folder from before the mark, the
    newest time in it, where it holds numba's index and data files alone (as folders under
    it). None when it is not powerd's, or cannot be read."""
    uid = os.getuid()
    try:
        mark = (folder / USED_MARK).lstat()
        if stat.S_ISREG(mark.st_mode) and mark.st_uid == uid:
            return mark.st_mtime
    except OSError:
        pass
    newest_s = 0.0
    found = False
    try:
        for path in folder.rglob("*"):
            st = path.lstat()
            if st.st_uid != uid:
                return None
            if stat.S_ISREG(st.st_mode) and path.suffix in (".nbi", ".nbc"):
                found = True
            elif not stat.S_ISDIR(st.st_mode):
                return None
            newest_s = max(newest_s, st.st_mtime)
    except OSError:
        return None
    return newest_s if found else None


def _mark_used(folder: Path) -> None:
    """Make `folder` if need be and set its USED_MARK's time to now (best effort: a folder
    powerd cannot write is numba's problem to report)."""
    with contextlib.suppress(OSError):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / USED_MARK).touch()


def holds_kernels(folder: Path, stamp: str) -> bool:
    """Whether `folder` holds every kernel, compiled by what `stamp` names (a start after the
    first of this version's code loads them in a moment; the first compiles them, which takes
    a while). A folder a compile left partial (a child killed part-way), or that another numba
    or CPU filled, does not: it is compiled into again, numba keeping what is still valid."""
    try:
        return (folder / COMPILED_MARK).read_text(encoding="utf-8") == stamp
    except (OSError, UnicodeDecodeError):
        return False


def mark_compiled(folder: Path, stamp: str) -> None:
    """Record that `folder` holds every kernel, compiled by what `stamp` names (best effort,
    as _mark_used; written whole or not at all)."""
    partial = folder / f"{COMPILED_MARK}.{os.getpid()}"
    with contextlib.suppress(OSError):
        partial.write_text(stamp, encoding="utf-8")
        partial.replace(folder / COMPILED_MARK)


COMPILE_APART_TIMEOUT_S = 90.0
"""How long a child may take to compile the kernels (under a minute on a small machine): well
inside the unit's TimeoutStartSec=180, so that compiling here after it still fits."""


def compile_apart(folder: Path, code: str, timeout_s: float = COMPILE_APART_TIMEOUT_S) -> bool:
    """Run `code`, which compiles kernels into `folder`, in a child interpreter of this
    powerd; True when it exited cleanly. The compiler's memory stays with the process that
    compiled (about 110 MiB that a long-running daemon would keep to its end); the caller then
    loads the kernels from `folder`. On False (logged) the caller compiles them itself."""
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code],
            # `-c` puts the working folder first on sys.path: the folder this powerd is in,
            # never another checkout or version the daemon happened to start in.
            cwd=PACKAGE_DIR.parent,
            env={**os.environ, "NUMBA_CACHE_DIR": str(folder)},
            # Its own session: a Ctrl-C meant for the daemon does not end the compile.
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired:
        why = f"it took longer than {timeout_s:g} s"
    except (OSError, subprocess.SubprocessError) as exc:
        why = str(exc)
    else:
        if proc.returncode == 0:
            return True
        why = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1][:300]
    log.warning("compiling the kernels in a child process failed (%s); compiling here", why)
    return False
