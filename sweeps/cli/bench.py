"""``msam bench speed`` (step time of SGD, SAM and mSAM strategies, ``msam.bench``) and
``msam bench claims`` (the mSAM paper's claims, checked on a sweep spec's base config).

``bench speed`` needs neither optuna nor wandb: the GPU image runs it as
``python -m sweeps.cli bench speed ...``.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from pathlib import Path
from typing import Any

from msam.bench.settings import AMP_MODES, CHANNELS_LAST_MODES, SMALL_INPUT_MODES, defaults
from msam.errors import UserError
from sweeps.cli._common import add_set_option


def register(subparsers: argparse._SubParsersAction) -> None:
    bench = subparsers.add_parser(
        "bench", help="benchmarks", description="Speed of the update rules; the paper's claims."
    )
    kinds = bench.add_subparsers(dest="bench", metavar="{speed,claims}", required=True)

    speed = kinds.add_parser(
        "speed",
        help="time SGD, SAM and mSAM updates (see `msam bench speed --help`)",
        description="Times whole updates of SGD, SAM and mSAM for each m on synthetic data "
        "(msam.bench.measure_speed).",
        formatter_class=_SpeedHelp,
    )
    _add_speed_options(speed)
    speed.set_defaults(func=run_speed)

    claims = kinds.add_parser(
        "claims",
        help="check the paper's claims",
        description="Test accuracy and flatness of SGD, SAM and mSAM over m, paired seeds.",
    )
    claims.add_argument("spec", metavar="SPEC", help="sweep spec YAML (its base is trained)")
    add_set_option(claims)
    claims.add_argument("--out", metavar="DIR", help="results folder (default: runs/claims-...)")
    add_claims_arguments(claims)
    claims.set_defaults(func=run_claims)


def _ints(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


class _SpeedHelp(argparse.HelpFormatter):
    """Lists the strategies by name, loading torch only when ``--help`` is asked for."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help
        if action.dest == "strategy" and text:
            from msam import STRATEGIES

            text += ", ".join(STRATEGIES)
        return text


def _add_speed_options(sp: argparse.ArgumentParser) -> None:
    """The options of ``msam bench speed``; defaults are ``msam.bench.SpeedSettings``'s."""
    d = defaults()
    sp.add_argument("--model", required=True, help="timm model name or alias (vit_tiny, ...)")
    sp.add_argument("--img-size", type=int, default=d["img_size"], help="image side in pixels")
    sp.add_argument("--in-chans", type=int, default=d["in_chans"], help="image channels")
    sp.add_argument(
        "--num-classes", type=int, default=d["num_classes"], help="classes of the synthetic labels"
    )
    sp.add_argument("--batch-size", type=int, required=True, help="images per update (B)")
    sp.add_argument(
        "--micro-batches",
        type=_ints,
        default=list(d["micro_batches"]),
        help="mSAM m values, e.g. 1,2,4,8",
    )
    sp.add_argument("--steps", type=int, default=d["steps"], help="timed updates per configuration")
    sp.add_argument(
        "--warmup", type=int, default=d["warmup"], help="untimed updates per configuration"
    )
    sp.add_argument("--device", default=d["device"], help="cpu | cuda | cuda:N")
    sp.add_argument("--amp", default=d["amp"], choices=sorted(AMP_MODES), help="autocast dtype")
    sp.add_argument(
        "--strategy",
        default=d["strategy"],
        help="mSAM strategies: all | auto | a comma-separated list of ",
    )
    sp.add_argument("--rho", type=float, default=d["rho"], help="SAM radius")
    sp.add_argument(
        "--channels-last", default=d["channels_last"], choices=list(CHANNELS_LAST_MODES)
    )
    sp.add_argument(
        "--small-input",
        default=d["small_input"],
        choices=list(SMALL_INPUT_MODES),
        help="ResNet stem: auto = small-input stem below 64 px; off = timm's default stem",
    )
    sp.add_argument(
        "--threads", type=int, default=d["threads"], help="torch CPU threads (default: torch's)"
    )
    sp.add_argument("--no-memory", action="store_true", help="skip the peak-memory step")
    sp.add_argument("--seed", type=int, default=d["seed"])
    sp.add_argument("--json", type=Path, default=None, help="write the records here")


def run_speed(args: argparse.Namespace) -> int:
    """Measure, print the table, write ``--json``; a bad setting exits 2 with one line."""
    from msam.bench import SpeedSettings, measure_speed, print_table, write_records

    try:
        settings = SpeedSettings(
            model=args.model,
            batch_size=args.batch_size,
            micro_batches=tuple(args.micro_batches),
            img_size=args.img_size,
            in_chans=args.in_chans,
            num_classes=args.num_classes,
            steps=args.steps,
            warmup=args.warmup,
            device=args.device,
            amp=args.amp,
            strategy=args.strategy,
            rho=args.rho,
            channels_last=args.channels_last,
            small_input=args.small_input,
            threads=args.threads,
            memory=not args.no_memory,
            seed=args.seed,
        )
        records = measure_speed(settings, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    except (ValueError, UserError) as exc:
        print(f"msam bench speed: {exc}", file=sys.stderr)
        return 2
    print_table(records)
    if args.json is not None:
        write_records(args.json, records)
    return 0


def add_claims_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``msam bench claims``, shared with ``benchmarks/claims.py``."""
    parser.add_argument("--lr", type=float, help="learning rate (default: the spec's base lr)")
    parser.add_argument("--rho", type=float, help="SAM radius (default: the spec's base rho)")
    parser.add_argument(
        "--tuned", metavar="RUN_DIR", help="take lr and rho from a sweep's tuned/<name>-sam.yaml"
    )
    parser.add_argument("--micro-batches", default="2,4,8,16,32", metavar="M,M,...")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, help="override the spec's epochs")
    for what in ("images", "iters", "samples"):
        parser.add_argument(
            f"--flatness-{what}", type=int, help="default: the spec's final.flatness." + what
        )


def _claims_flatness(spec: Any, args: argparse.Namespace) -> Any:
    """The spec's ``final.flatness``, with the ``--flatness-*`` options given."""
    from sweeps.finals.flatness import FlatnessSettings

    settings = FlatnessSettings.from_spec(spec)
    given = {
        "images": args.flatness_images,
        "iters": args.flatness_iters,
        "samples": args.flatness_samples,
    }
    for key, value in given.items():
        if value is not None and value < (0 if key == "images" else 1):
            raise UserError(f"--flatness-{key}: must be positive (got {value})")
    return dataclasses.replace(settings, **{k: v for k, v in given.items() if v is not None})


def run_claims_from(spec: Any, args: argparse.Namespace, out: Path, command: str) -> int:
    """Run the claims experiment from parsed options (``msam bench claims``, the script)."""
    from sweeps import claims

    try:
        ms = [int(v) for v in str(args.micro_batches).split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--micro-batches {args.micro_batches!r}: expected e.g. 2,4,8") from None
    lr, rho = args.lr, args.rho
    if args.tuned:
        tuned_lr, tuned_rho = claims.tuned_lr_rho(args.tuned)
        lr, rho = lr or tuned_lr, rho or tuned_rho
    result = claims.run(
        spec,
        out=out,
        lr=lr,
        rho=rho,
        micro_batches=ms,
        seeds=args.seeds,
        epochs=args.epochs,
        flatness=_claims_flatness(spec, args),
        command=command,
    )
    print(claims.markdown(result))
    print(f"results in {out}")
    return 0


def run_claims(args: argparse.Namespace) -> int:
    from sweeps.spec import load_sweep_spec

    spec = load_sweep_spec(args.spec, args.sets)
    base = spec.base
    out = Path(args.out or Path("runs") / f"claims-{base.data.dataset}-{base.model.name}")
    return run_claims_from(spec, args, out, "msam bench claims " + shlex.join(sys.argv[3:]))
