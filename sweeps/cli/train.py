"""``msam train CONFIG``: one training run from a train config."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sweeps.cli._common import add_set_option, preflight


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train one configuration",
        description="Train one configuration from a train config YAML; writes metrics.jsonl and "
        "summary.json to the output folder.",
    )
    parser.add_argument("config", metavar="CONFIG", help="train config YAML")
    add_set_option(parser)
    parser.add_argument("--out", metavar="DIR", help="output folder (default: runs/<name>)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from msam.config import load_train_config

    cfg = load_train_config(args.config, args.sets)
    preflight(cfg)
    from msam.trainer import run_train

    out_dir = Path(args.out) if args.out else Path("runs") / cfg.name
    callbacks = tracking_callbacks(cfg, out_dir)
    result = run_train(cfg, out_dir=out_dir, resume=args.resume, callbacks=callbacks)
    return report(result, out_dir)


def tracking_callbacks(cfg, out_dir: Path) -> list:
    """A W&B run (job_type train, under ``out_dir/wandb``) when ``tracking.wandb`` asks for one."""
    from sweeps.tracking import WandbCallback, own_service

    if cfg.tracking.wandb.mode == "disabled":
        return []
    own_service()
    return [WandbCallback.from_train_config(cfg, job_type="train", dir=out_dir)]


def report(result, out_dir: Path) -> int:
    """One closing line; a diverged run exits 1 with its reason."""
    s = result.summary
    if result.status == "diverged":
        print(f"msam train: {result.reason}; lower optim.lr or optim.rho", file=sys.stderr)
        return 1
    test = f"test_acc {s['test_acc']:.4f}  " if s.get("test_acc") is not None else ""
    print(
        f"{result.status}: {test}val_acc {s['val_acc'] if s['val_acc'] is not None else '-'}  "
        f"{s['seconds']:.1f} s  -> {out_dir}"
    )
    return 0
