"""``python -m anchorlearn``: the same command line as the ``anchorlearn`` script."""

from anchorlearn.cli import main

raise SystemExit(main())
