"""``python -m kron …``: the same as the ``kron`` console script."""

from kron.bench.cli import main

raise SystemExit(main())
