"""`python -m powerd`: the `powerd` command, where its script is not on the PATH."""

from powerd.cli import main

raise SystemExit(main())
