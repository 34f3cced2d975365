"""Entry point for ``python -m trio_replica``."""

import sys

from .cli import main

sys.exit(main())
