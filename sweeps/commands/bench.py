"""``msam bench speed`` (updates/s of SGD, SAM and mSAM strategies) and ``msam bench claims``
(the mSAM paper's claims, checked with a sweep spec)."""

from __future__ import annotations

import argparse

from sweeps.commands._common import add_set_option, load_entry, not_built


def register(subparsers: argparse._SubParsersAction) -> None:
    bench = subparsers.add_parser(
        "bench", help="benchmarks", description="Speed of the update rules; the paper's claims."
    )
    kinds = bench.add_subparsers(dest="bench", metavar="{speed,claims}", required=True)

    speed = kinds.add_parser(
        "speed",
        help="time SGD, SAM and mSAM updates",
        description="Updates/s and images/s of SGD, SAM and mSAM (each strategy) on one config.",
    )
    speed.add_argument("config", metavar="CONFIG", nargs="?", help="train config YAML to time")
    add_set_option(speed)
    speed.add_argument("--out", metavar="DIR", help="where to write the results")
    speed.set_defaults(func=run_speed)

    claims = kinds.add_parser(
        "claims",
        help="check the paper's claims",
        description="Flatness, accuracy and cost of SGD vs SAM vs mSAM, run from a sweep spec.",
    )
    claims.add_argument("spec", metavar="SPEC", help="sweep spec YAML")
    add_set_option(claims)
    claims.add_argument("--out", metavar="DIR", help="where to write the results")
    claims.set_defaults(func=run_claims)


def run_speed(args: argparse.Namespace) -> int:
    cfg = None
    if args.config:
        from msam.config import load_train_config

        cfg = load_train_config(args.config, args.sets)
    speed = load_entry("sweeps.bench", "run_speed")
    if speed is None:
        return not_built("bench speed", "the speed benchmark")
    return int(speed(cfg, args) or 0)


def run_claims(args: argparse.Namespace) -> int:
    from sweeps.spec import load_sweep_spec

    spec = load_sweep_spec(args.spec, args.sets)
    claims = load_entry("sweeps.bench", "run_claims")
    if claims is None:
        return not_built("bench claims", "the claims benchmark")
    return int(claims(spec, args) or 0)
