"""Commands on a finished or running sweep's folder: ``leaderboard``, ``export``, ``sync``."""

from __future__ import annotations

import argparse

from sweeps.cli._common import existing_dir


def register(subparsers: argparse._SubParsersAction) -> None:
    board = subparsers.add_parser(
        "leaderboard",
        help="show and write a sweep's leaderboard",
        description="Rank the optimizers of a sweep; writes leaderboard.md/json and report.html.",
    )
    board.add_argument("run_dir", metavar="RUN_DIR", help="the sweep's run folder")
    board.add_argument("--storage", metavar="URL", help="Optuna storage if not in RUN_DIR")
    board.set_defaults(func=run_leaderboard)

    export = subparsers.add_parser(
        "export",
        help="write tuned-default train configs",
        description="Write each optimizer's best configuration as a train config with provenance.",
    )
    export.add_argument("run_dir", metavar="RUN_DIR", help="the sweep's run folder")
    export.add_argument("--to", metavar="DIR", required=True, help="folder for the YAML files")
    export.set_defaults(func=run_export)

    sync = subparsers.add_parser(
        "sync",
        help="upload a sweep's offline W&B runs",
        description="Upload the offline W&B runs under RUN_DIR/wandb once a network is available.",
    )
    sync.add_argument("run_dir", metavar="RUN_DIR", help="the sweep's run folder")
    sync.set_defaults(func=run_sync)


def run_leaderboard(args: argparse.Namespace) -> int:
    from sweeps.results import run_leaderboard as show

    return show(existing_dir(args.run_dir, "run"), storage=args.storage)


def run_export(args: argparse.Namespace) -> int:
    from sweeps.results import export_tuned

    return export_tuned(existing_dir(args.run_dir, "run"), to=args.to)


def run_sync(args: argparse.Namespace) -> int:
    from sweeps.tracking import sync_run

    return sync_run(existing_dir(args.run_dir, "run"))
