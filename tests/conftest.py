"""Shared test set-up: a private numba cache, untimed property tests, logging and signal
handlers as each test found them, and the repository's paths."""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from tools.numba_cache_dir import numba_cache_dir

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DIR = REPO_ROOT.parent / "shared"

os.environ.setdefault("NUMBA_CACHE_DIR", str(numba_cache_dir(REPO_ROOT)))

# Speed is measured in benchmarks/: a property test is judged by its result, not by how long
# one example took on a busy machine (the first may also load or compile a numba kernel).
settings.register_profile("untimed", deadline=None)
settings.load_profile("untimed")


@pytest.fixture(autouse=True)
def _signal_handlers_as_found() -> Iterator[None]:
    """A test that runs the daemon in-process installs its stop and reload handlers: undone
    after it, or Ctrl-C (and a later test's KeyboardInterrupt) only sets a stop flag."""
    signums = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    handlers = {signum: signal.getsignal(signum) for signum in signums}
    yield
    for signum, handler in handlers.items():
        if handler is not None:  # None: installed from C, which no test does
            signal.signal(signum, handler)


@pytest.fixture(autouse=True)
def _logging_as_found(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A test that runs a command in-process (powerd.cli.main) configures the root logger as
    the command does: undone after it, or every later test's caplog sees INFO records it
    does not expect, depending on the order the tests ran in. No level from the environment."""
    monkeypatch.delenv("POWERD_LOG_LEVEL", raising=False)
    root, numba_logger = logging.getLogger(), logging.getLogger("numba")
    handlers, level, numba_level = list(root.handlers), root.level, numba_logger.level
    yield
    for handler in list(root.handlers):
        # pytest's own capture handler of this phase came after the snapshot: it removes it.
        if handler not in handlers and not type(handler).__module__.startswith("_pytest"):
            root.removeHandler(handler)
    root.setLevel(level)
    numba_logger.setLevel(numba_level)


def require_program(name: str, package: str | None = None) -> str:
    """The path of a system program, or skip; under CI=true a missing program fails (.ci/run
    installs each from its Debian `package`, by default named as the program)."""
    import shutil

    path = shutil.which(name)
    if path is None:
        missing = f"{name} is not installed (apt-get install {package or name})"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{missing}; CI must run this test")
        pytest.skip(missing)
    return path
