"""`make golden`: rewrite tests/fixtures/metrics.golden from the seeded simulated run.

Review the change with `git diff tests/fixtures/metrics.golden` before committing it: every
changed line is a changed value or series in powerd's /metrics.
"""

from __future__ import annotations

import difflib
import sys

from tests.golden_run import GOLDEN_PATH, golden_text


def main() -> int:
    fresh = golden_text()
    old = GOLDEN_PATH.read_text(encoding="utf-8") if GOLDEN_PATH.exists() else ""
    if fresh == old:
        print(f"{GOLDEN_PATH}: unchanged")
        return 0
    changed = sum(
        1
        for line in difflib.unified_diff(old.splitlines(), fresh.splitlines(), lineterm="", n=0)
        if line[:1] in "+-" and not line.startswith(("+++", "---"))
    )
    GOLDEN_PATH.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN_PATH.write_text(fresh, encoding="utf-8")
    print(f"{GOLDEN_PATH}: rewritten ({changed} lines changed); review it with `git diff`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
