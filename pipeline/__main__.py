"""`python -m pipeline ...` is the same as the `ganpipe` console script."""

from pipeline.cli import main

raise SystemExit(main())
