"""tools/gpu_check.py as a module, for the tests of the real-GPU check (it is a script, not
part of the powerd package)."""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

from tests.conftest import REPO_ROOT


def load_gpu_check() -> ModuleType:
    """The tool's module, loaded once per test session under the name it imports itself by
    (the dry run's child process does `from gpu_check import read_only`)."""
    module = sys.modules.get("gpu_check")
    if module is not None:
        return module
    path = REPO_ROOT / "tools" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module
    spec.loader.exec_module(module)
    return module
