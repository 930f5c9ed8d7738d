"""numba-compiled array kernels: the only module that imports numba.

Kernels are pure functions over arrays (no globals, no I/O) compiled with cache=True. Other
layers that need compiled loops (the simulator) use `jit` from here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import numba

F = TypeVar("F", bound=Callable[..., Any])


def jit(func: F) -> F:
    """Compile a pure numerical function with numba (nopython, cached on disk)."""
    return numba.njit(cache=True, nogil=True)(func)  # type: ignore[no-any-return]
