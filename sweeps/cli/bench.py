"""``msam bench speed`` (step time of SGD, SAM and mSAM strategies, from ``msam.bench``) and
``msam bench claims`` (the mSAM paper's claims, checked on a sweep spec's base config)."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from sweeps.cli._common import add_set_option


def register(subparsers: argparse._SubParsersAction) -> None:
    bench = subparsers.add_parser(
        "bench", help="benchmarks", description="Speed of the update rules; the paper's claims."
    )
    kinds = bench.add_subparsers(dest="bench", metavar="{speed,claims}", required=True)

    speed = kinds.add_parser(
        "speed",
        help="time SGD, SAM and mSAM updates (see `msam bench speed --help`)",
        description="Times whole updates of SGD, SAM and mSAM for each m on synthetic data.",
    )
    speed.set_defaults(func=run_speed)

    claims = kinds.add_parser(
        "claims",
        help="check the paper's claims",
        description="Test accuracy and flatness of SGD, SAM and mSAM over m, paired seeds.",
    )
    claims.add_argument("spec", metavar="SPEC", help="sweep spec YAML (its base is trained)")
    add_set_option(claims)
    claims.add_argument("--out", metavar="DIR", help="results folder (default: runs/claims-...)")
    from sweeps.claims import add_arguments

    add_arguments(claims)
    claims.set_defaults(func=run_claims)


def run_speed(args: argparse.Namespace) -> int:
    """Only reached without options (``sweeps.cli`` hands ``bench speed ...`` to msam.bench)."""
    from msam.bench import main

    return main(["speed"])


def run_claims(args: argparse.Namespace) -> int:
    from sweeps.claims import run_from_args
    from sweeps.spec import load_sweep_spec

    spec = load_sweep_spec(args.spec, args.sets)
    base = spec.base
    out = Path(args.out or Path("runs") / f"claims-{base.data.dataset}-{base.model.name}")
    return run_from_args(spec, args, out, "msam bench claims " + shlex.join(sys.argv[3:]))
