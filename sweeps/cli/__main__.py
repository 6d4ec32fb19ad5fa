"""``python -m sweeps.cli``: how the launcher starts its worker processes."""

import sys

from sweeps.cli.main import main

sys.exit(main())
