"""`python -m dreamd` is the `dreamd` command."""

from dreamd.cli import main

raise SystemExit(main())
