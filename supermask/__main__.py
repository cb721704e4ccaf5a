"""``python -m supermask``: the same as the ``supermask`` console script."""

import sys

from supermask.cli import main

sys.exit(main())
