"""``python -m sealedtorch.cli``: the ``sealedtorch`` command without the console script
(what tests, the demo and the subprocess runtime server start)."""

from . import main

raise SystemExit(main())
