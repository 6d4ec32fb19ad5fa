"""The ``msam`` command line: the only layer that knows about argv.

One module per subcommand (``train``, ``sweep``/``worker``, ``leaderboard``/``export``/``sync``,
``bench``); each builds a typed description of the work and calls the layer below.
"""

from sweeps.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
