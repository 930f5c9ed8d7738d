"""Imports flow one way: the daemon's collaborators never import the daemon."""

from __future__ import annotations

import subprocess
import sys

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
