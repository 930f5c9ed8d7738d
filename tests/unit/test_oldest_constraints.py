"""tools/oldest_constraints.py: the pins `make test-oldest` installs are pyproject's floors."""

from __future__ import annotations

import sys

import pytest

from tests.conftest import REPO_ROOT
from tools.oldest_constraints import ConstraintError, main, oldest_constraints

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib


def _pyproject(dependencies: list[str], requires_python: str = ">=3.10") -> dict[str, object]:
    return {"project": {"requires-python": requires_python, "dependencies": dependencies}}


def test_every_runtime_dependency_is_pinned_at_its_floor() -> None:
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    dependencies = pyproject["project"]["dependencies"]
    pins = oldest_constraints(pyproject, sys.version_info[:3])
    assert pins == [dependency.replace(">=", "==") for dependency in dependencies]


def test_the_pins_are_printed_one_a_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(REPO_ROOT / "pyproject.toml")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "numba==0.60" in lines and all("==" in line for line in lines)


@pytest.mark.parametrize(
    "dependency",
    ["numpy>=1.23,<3", "numpy", "numpy==1.23.2", "numpy>=1.23; python_version<'3.12'"],
)
def test_a_dependency_without_a_plain_floor_is_refused(dependency: str) -> None:
    with pytest.raises(ConstraintError, match="is not 'name>=version'"):
        oldest_constraints(_pyproject(["psutil>=5.9.4", dependency]), (3, 11, 7))


def test_a_python_outside_requires_python_is_refused() -> None:
    pyproject = _pyproject(["psutil>=5.9.4"], requires_python=">=3.10")
    assert oldest_constraints(pyproject, (3, 10, 0)) == ["psutil==5.9.4"]
    with pytest.raises(ConstraintError, match=r"Python 3\.9\.18 is outside"):
        oldest_constraints(pyproject, (3, 9, 18))
    with pytest.raises(ConstraintError, match="requires-python is not"):
        oldest_constraints(_pyproject([], requires_python=">=3.10,<4"), (3, 11, 7))
