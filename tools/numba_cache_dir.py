"""The numba cache folder for this checkout: `.numba_cache/<hash of the modules with kernels>`.

numba checks a cached kernel against its own file only, so a kernel that calls one in another
module (the simulated node steps the engine and the plant) keeps running the old callee from the
cache after that module changes. A folder named by the content of every module with jitted code
starts a fresh cache whenever any of them changes. `make` and the tests use it; an installed
daemon does not need it (the unit's cache is checked against installed files, which an upgrade
replaces together).

    python tools/numba_cache_dir.py    # prints the folder
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
_JITTED = re.compile(r"^@(jit|numba\.njit)\b", re.M)


def numba_cache_dir(root: Path = REPO_ROOT) -> Path:
    """`root/.numba_cache/<16 hex digits>`, from the modules under root/powerd that jit code."""
    digest = hashlib.sha256()
    for path in sorted((root / "powerd").rglob("*.py")):
        text = path.read_bytes()
        if _JITTED.search(text.decode("utf-8", "replace")):
            digest.update(path.relative_to(root).as_posix().encode() + b"\0" + text)
    return root / ".numba_cache" / digest.hexdigest()[:16]


if __name__ == "__main__":
    print(numba_cache_dir())
