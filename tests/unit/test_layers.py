"""Imports flow one way: the daemon's collaborators never import the daemon."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from powerd.journal import FORMAT, VERSION

DAEMON_COLLABORATORS = ("powerd.exporter", "powerd.groups", "powerd.metrics_http", "powerd.roster")


@pytest.mark.parametrize("module", DAEMON_COLLABORATORS)
def test_a_daemon_collaborator_does_not_import_the_daemon(module: str) -> None:
    """In a fresh interpreter, so that what this session imported already does not hide an
    import made anywhere below the module."""
    assert not _imports(module, "powerd.daemon"), f"{module} imports powerd.daemon"


def test_the_metrics_server_does_not_import_the_exporter() -> None:
    """metrics_http serves any MetricsSource; the exporter imports it, never the reverse."""
    assert not _imports("powerd.metrics_http", "powerd.exporter")


def _imports(module: str, other: str) -> bool:
    """Whether importing module in a fresh interpreter imports other."""
    code = f"import sys, {module}; print({other!r} in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    return result.stdout.strip() == "True"


def _imported_by(*command: str) -> tuple[int, set[str]]:
    """(exit status, modules imported) of `python -m powerd COMMAND...` in a fresh process."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "powerd", *command],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return result.returncode, {
        line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()
    }


def test_restore_and_check_config_load_no_numba(tmp_path: Path) -> None:
    """`powerd restore` (ExecStopPost=) puts the GPUs back with NVML alone, and check-config
    checks a config with it: neither loads the daemon's kernels, so a broken numba or LLVM, or
    no cache folder for them, cannot stop them, and they start in a fraction of a second. Here
    NVML cannot open (no driver), so restore goes as far as naming the GPUs left changed."""
    entry = {
        "uuid": "GPU-0",
        "index": 0,
        "name": "NVIDIA H100",
        "power_limit_mw": 700_000,
        "power_limit_default_mw": 700_000,
        "sm_clocks": "unknown",
        "saved_at_s": 0.0,
    }
    (tmp_path / "journal.json").write_text(
        json.dumps({"format": FORMAT, "version": VERSION, "entries": [entry]})
    )
    status, imported = _imported_by("restore", "--state-dir", str(tmp_path))
    assert status == 1 and {"powerd.journal", "powerd.runtime"} <= imported
    assert not {"numba", "powerd.control.kernels", "powerd.daemon"} & imported
    config = tmp_path / "powerd.yaml"
    config.write_text(
        yaml.safe_dump({"servers": [{"name": "a", "url": "http://127.0.0.1:1/m", "gpus": [0]}]})
    )
    status, imported = _imported_by("check-config", str(config))
    assert status == 0 and "powerd.config" in imported
    assert not {"numba", "powerd.control.kernels", "powerd.daemon"} & imported
