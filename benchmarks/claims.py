"""Does mSAM find flatter minima and generalize better? Accuracy and flatness against m.

    python benchmarks/claims.py configs/sweeps/claims-fmnist.yaml --seeds 3

Trains SGD, SAM and mSAM (m in --micro-batches) with one lr and rho over paired seeds, measures
test accuracy and flatness (top Hessian eigenvalue, Hessian trace, SAM sharpness), and writes
``benchmarks/results/claims-<dataset>-<model>/`` (results.json, README.md, PNG + HTML plots).
The same runs as ``msam bench claims SPEC``. Needs neither optuna nor wandb.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from msam.errors import UserError
from sweeps.cli.bench import add_claims_arguments, run_claims_from
from sweeps.spec import load_sweep_spec

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", help="sweep spec YAML (its base config is what is trained)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", help="results folder (default: results/claims-<data>-<model>)")
    add_claims_arguments(parser)
    args = parser.parse_args(argv)
    try:
        spec = load_sweep_spec(args.spec, args.sets)
        base = spec.base
        out = Path(args.out or RESULTS / f"claims-{base.data.dataset}-{base.model.name}")
        command = "python benchmarks/claims.py " + shlex.join(argv or sys.argv[1:])
        return run_claims_from(spec, args, out, command)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
