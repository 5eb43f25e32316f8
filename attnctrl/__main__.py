"""``python -m attnctrl``: the ``attnctrl`` command line."""

from attnctrl.cli import main

raise SystemExit(main())
