"""``python -m msam.train CONFIG`` — the trainer without the sweep layer (no optuna, no wandb).

For images that lack the sweep dependencies and for data-parallel runs:
``torchrun --nproc_per_node=2 -m msam.train CONFIG --out DIR`` trains with DDP (gloo on CPUs,
NCCL on GPUs); each rank perturbs with its own micro-batches (mSAM with m/world per rank).
"""

from __future__ import annotations

import argparse
import sys

from msam.errors import UserError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m msam.train", description=__doc__)
    parser.add_argument("config", help="train config YAML")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", help="output folder (default: runs/<name>)")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    try:
        from msam.config import load_train_config
        from msam.trainer import run_train

        cfg = load_train_config(args.config, args.sets)
        out = args.out or f"runs/{cfg.name}"
        result = run_train(cfg, out_dir=out, resume=args.resume)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if result.status == "diverged":
        print(f"msam.train: {result.reason}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
