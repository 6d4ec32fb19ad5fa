"""The ``msam`` subcommands, one module each; every module offers ``register(subparsers)``."""

from sweeps.commands import bench, results, sweep, train

# Order of appearance in ``msam --help``.
COMMAND_MODULES = (train, sweep, results, bench)

__all__ = ["COMMAND_MODULES"]
