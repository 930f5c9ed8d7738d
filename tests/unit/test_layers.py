"""Imports flow one way: the daemon's collaborators never import the daemon."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

DAEMON_COLLABORATORS = ("powerd.groups", "powerd.roster")


@pytest.mark.parametrize("module", DAEMON_COLLABORATORS)
def test_a_daemon_collaborator_does_not_import_the_daemon(module: str) -> None:
    """In a fresh interpreter, so that what this session imported already does not hide an
    import made anywhere below the module."""
    code = f"import sys, {module}; print('powerd.daemon' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.strip() == "False", f"{module} imports powerd.daemon"


def test_restore_loads_no_numba(tmp_path: Path) -> None:
    """`powerd restore` (ExecStopPost=) puts the GPUs back with NVML alone: neither the
    command line nor the restore loads the daemon's kernels, so a broken numba or LLVM, or no
    cache folder for them, cannot stop it, and it starts in a fraction of a second."""
    result = subprocess.run(
        [
            sys.executable,
            "-X",
            "importtime",
            "-m",
            "powerd",
            "restore",
            "--state-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()}
    assert "powerd.journal" in imported
    assert not {"numba", "powerd.control.kernels", "powerd.daemon"} & imported
