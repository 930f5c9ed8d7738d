"""`powerd demo` end to end: a real process, real HTTP /metrics, the summary at the end."""

from __future__ import annotations

import re

import pytest

from tests.integration.helpers import powerd

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("kind", ["sglang", "llamacpp"])
def test_demo_runs_through_a_server_kind_and_compares(kind: str) -> None:
    result = powerd(
        "demo", "--duration", "6", "--metrics-port", "0", "--server-kind", kind, "--gpus", "2"
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"{kind} servers" in out
    assert re.search(r"^\[\s*\d+\] ", out, re.MULTILINE), "a line per tick"
    match = re.search(r"tokens per joule\s+([\d.]+)\s+([\d.]+)", out)
    assert match, out
    controlled, uncontrolled = map(float, match.groups())
    assert controlled > 0 and uncontrolled > 0
    assert "requests within SLO" in out
