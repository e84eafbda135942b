"""``python -m fastddpm`` is the ``fastddpm`` console script."""
from .cli import main

raise SystemExit(main())
