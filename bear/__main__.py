"""``python -m bear``: see bear.cli."""

import sys

from bear.cli import main

sys.exit(main())
