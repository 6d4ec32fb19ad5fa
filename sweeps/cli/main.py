"""The ``msam`` command line: train, sweep, worker, leaderboard, export, sync, bench.

Each subcommand lives in its own module under ``sweeps.cli``. Errors a user causes print
``error: <one line>`` on stderr and exit with status 2 before any work starts; Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from typing import NoReturn

from msam.config.messages import bounded
from msam.errors import UserError

__all__ = ["build_parser", "main"]


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage mistakes like any other user error: one line, exit 2."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{self.prog}: {message} (see {self.prog} --help)")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("msam")
    except PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    from sweeps.cli import bench, results, sweep, train

    parser = _Parser(
        prog="msam",
        description="Sharpness-aware training (SGD vs SAM vs mSAM) on timm models, with Optuna "
        "sweeps and W&B tracking.",
    )
    parser.add_argument("--version", action="version", version=f"msam {_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (train, sweep, results, bench):  # order of ``msam --help``
        module.register(subparsers)
    return parser


def _one_line_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    line: str | None = None,
) -> str:
    """Warnings as users read them: ``warning: <message>``, not a source location."""
    return f"warning: {bounded(str(message))}\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``msam`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    warnings.formatwarning = _one_line_warning
    try:
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"error: {bounded(str(exc))}", file=sys.stderr)  # one line, however long the cause
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except SystemExit as exc:  # --help and --version
        return exc.code if isinstance(exc.code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
