"""Run the demo: ``python -m keyedpool --help``."""

import sys

from ._demo import main

sys.exit(main())
