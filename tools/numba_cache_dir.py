"""The numba cache folder for this checkout: `.numba_cache/<digest of the modules with kernels>`
(powerd/control/numba_cache.py says why). powerd picks the same folder when NUMBA_CACHE_DIR
is this folder; `make` and the tests set it, so a checkout's compiled kernels stay in the
checkout. Runs without powerd's dependencies (make calls it before the venv exists).

    python tools/numba_cache_dir.py    # prints the folder
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def numba_cache_dir(root: Path = REPO_ROOT) -> Path:
    """`root/.numba_cache/<16 hex digits>`, from the modules under root/powerd that jit code."""
    # By its file, not as powerd.control.numba_cache: the package imports numba.
    spec = importlib.util.spec_from_file_location(
        "_powerd_numba_cache", root / "powerd" / "control" / "numba_cache.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.cache_dir(root / ".numba_cache", package_dir=root / "powerd")


if __name__ == "__main__":
    print(numba_cache_dir())
