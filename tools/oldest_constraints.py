"""A pip constraints file that pins every runtime dependency in pyproject.toml to its lower
bound: `make test-oldest` installs powerd with it and runs the tests, so the versions pyproject
claims to support are the versions tested. Dev tools are not pinned.

Each dependency must read `name>=version` (a bound pip can pin as written); anything else, or
a Python outside `requires-python`, is refused with exit status 1.

    python tools/oldest_constraints.py [PYPROJECT] > constraints.txt
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
_LOWER_BOUND = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*>=\s*([0-9][0-9A-Za-z.]*)\s*$")
_REQUIRES_PYTHON = re.compile(r"^\s*>=\s*(\d+(?:\.\d+)*)\s*$")


class ConstraintError(ValueError):
    """pyproject states something this script cannot turn into a pin."""


def oldest_constraints(pyproject: dict[str, object], python: tuple[int, ...]) -> list[str]:
    """`name==version` for each of `project.dependencies`, in their order, from its `>=` bound.
    Raises ConstraintError for a dependency of any other form, or when `python` (a version
    tuple, as sys.version_info) is outside `project.requires-python` (`>=X.Y` only)."""
    project = pyproject.get("project")
    if not isinstance(project, dict):
        raise ConstraintError("pyproject has no [project] table")
    requires = _REQUIRES_PYTHON.match(str(project.get("requires-python", "")))
    if requires is None:
        raise ConstraintError(f"requires-python is not '>=X.Y': {project.get('requires-python')!r}")
    floor = tuple(int(part) for part in requires.group(1).split("."))
    if tuple(python[: len(floor)]) < floor:
        running = ".".join(str(part) for part in python[:3])
        raise ConstraintError(f"Python {running} is outside requires-python >={requires.group(1)}")
    pins = []
    for dependency in project.get("dependencies", []):
        bound = _LOWER_BOUND.match(dependency)
        if bound is None:
            raise ConstraintError(f"dependency {dependency!r} is not 'name>=version'")
        pins.append(f"{bound.group(1)}=={bound.group(2)}")
    return pins


def main(argv: list[str]) -> int:
    path = Path(argv[0]) if argv else PYPROJECT
    try:
        pins = oldest_constraints(
            tomllib.loads(path.read_text(encoding="utf-8")), sys.version_info[:3]
        )
    except ConstraintError as error:
        print(f"{path}: {error}", file=sys.stderr)
        return 1
    print("\n".join(pins))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
