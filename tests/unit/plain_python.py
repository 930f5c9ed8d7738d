"""Run a test module's scenario as plain Python, for tests that compare it with the jitted run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def run_without_jit(module: str) -> dict[str, Any]:
    """The JSON that `python -m module` prints with NUMBA_DISABLE_JIT=1, in a subprocess: numba
    reads the variable when it is first imported."""
    env = {**os.environ, "NUMBA_DISABLE_JIT": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", module],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    return result
