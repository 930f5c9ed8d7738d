"""Where numba keeps compiled kernels: `<base>/<digest of the modules with jitted code>`.

numba checks a cached kernel against its own file only, so a kernel that calls one in another
module (the simulated node steps the engine and the plant) would keep running the old callee
from the cache after an upgrade or an edit of that module. A folder named by the content of
every module with jitted code starts a fresh cache whenever any of them changes.

`base` is $NUMBA_CACHE_DIR (the unit sets /var/cache/powerd), else the user's cache folder,
else the temporary folder: a service account without a writable home or site-packages must
still start (numba refuses `cache=True` without a writable folder). This module imports no
numba: control/kernels.py applies it before its first kernel.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import tempfile
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent.parent
_JITTED = re.compile(r"^@(jit|numba\.njit)\b", re.M)
_DIGEST_LEN = 16


def jitted_digest(package_dir: Path = PACKAGE_DIR) -> str:
    """16 hex digits from the path and content of every module under `package_dir` (the
    powerd package) that jits code."""
    digest = hashlib.sha256()
    for path in sorted(package_dir.rglob("*.py")):
        text = path.read_bytes()
        if _JITTED.search(text.decode("utf-8", "replace")):
            relative = path.relative_to(package_dir.parent).as_posix()
            digest.update(relative.encode() + b"\0" + text)
    return digest.hexdigest()[:_DIGEST_LEN]


def cache_dir(base: str | Path | None = None, package_dir: Path = PACKAGE_DIR) -> Path:
    """The folder for this code's compiled kernels under `base` (default: as the module says).
    A `base` already named by the digest is used as it is."""
    digest = jitted_digest(package_dir)
    if base is None:
        base = os.environ.get("NUMBA_CACHE_DIR") or _writable_base()
    base = Path(base)
    return base if base.name == digest else base / digest


def _writable_base() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME")
    home = Path(xdg) if xdg else Path.home() / ".cache"
    shared_tmp = Path(tempfile.gettempdir()) / f"powerd-numba-{os.getuid()}"
    for candidate in (home / "powerd" / "numba", shared_tmp):
        try:
            candidate.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError:
            continue
        if _ours_alone(candidate):
            return candidate
    return Path(tempfile.mkdtemp(prefix="powerd-numba-"))


def _ours_alone(folder: Path) -> bool:
    """Whether only this user can put files in `folder`: compiled code loaded from a folder
    another user planted (in /tmp, say) would run as this user, root included."""
    try:
        st = folder.lstat()
    except OSError:
        return False
    return (
        stat.S_ISDIR(st.st_mode)
        and st.st_uid == os.getuid()
        and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        and os.access(folder, os.W_OK | os.X_OK)
    )


def holds_kernels(folder: Path) -> bool:
    """Whether `folder` holds compiled kernels already (a start after the first of this
    version's code loads them in a moment; the first compiles them, which takes a while)."""
    try:
        return any(folder.iterdir())
    except OSError:
        return False
