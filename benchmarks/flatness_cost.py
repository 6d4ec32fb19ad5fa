"""What the final stage's flatness measurement costs next to the final's own training.

Trains the finals of a sweep spec (its base config; SGD and, per ``--optimizers``, SAM and mSAM
at the base rho and the given m) on train + validation as the final stage does, then measures
their flatness with the spec's ``final.flatness`` settings on the sample the final stage uses.
Prints and writes, per final: training seconds, flatness seconds and their ratio, with the
flatness values. Repeats each measurement ``--repeats`` times (spread reported).

    python benchmarks/flatness_cost.py configs/sweeps/demo.yaml --json out.json

Imports neither optuna nor wandb beyond what ``sweeps.spec`` needs to read the spec.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec")
    parser.add_argument("--optimizers", default="sgd,sam,msam")
    parser.add_argument("--micro-batches", type=int, default=4, help="m of the mSAM final")
    parser.add_argument("--repeats", type=int, default=3, help="flatness measurements per final")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    import torch

    from msam.bench.machine import machine_info
    from msam.trainer import run_train
    from sweeps.finals.flatness import (
        FlatnessSettings,
        flatness_rho,
        flatness_sample,
        measure_flatness,
    )
    from sweeps.spec import load_sweep_spec

    spec = load_sweep_spec(args.spec, args.sets)
    settings = FlatnessSettings.from_spec(spec)
    records = []
    for optimizer in args.optimizers.split(","):
        params = {"micro_batches": args.micro_batches} if optimizer == "msam" else {}
        cfg = spec.train_config(optimizer, params)
        with tempfile.TemporaryDirectory() as out:
            result = run_train(cfg, out_dir=out, final=True, verbose=False)
        train_s = float(result.summary["seconds"])
        sample = flatness_sample(cfg, settings)
        rho = flatness_rho(spec, cfg)
        seconds, report = [], {}
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            report = measure_flatness(
                result.model, sample, rho=rho, adaptive=cfg.optim.adaptive, settings=settings
            )
            seconds.append(time.perf_counter() - t0)
        flat_s = statistics.median(seconds)
        record = {
            "optimizer": optimizer,
            "micro_batches": cfg.optim.micro_batches,
            "train_seconds": train_s,
            "flatness_seconds": seconds,
            "flatness_seconds_median": flat_s,
            "ratio": flat_s / train_s,
            "flatness": {k: v for k, v in report.items() if k not in ("settings", "seconds")},
            "settings": asdict(settings),
        }
        records.append(record)
        print(
            f"{optimizer:5s} m={cfg.optim.micro_batches:<2d} train {train_s:6.1f} s  flatness "
            f"{flat_s:6.2f} s (min {min(seconds):.2f}, max {max(seconds):.2f}, n={len(seconds)})"
            f"  ratio {flat_s / train_s:.3f}  top eig {report.get('hessian_top_eig'):.4g}"
            f" (iters {report.get('hessian_top_eig_iters', report.get('iters'))},"
            f" converged {report.get('hessian_top_eig_converged', '-')})"
            f"  trace {report.get('hessian_trace'):.4g}"
            f" +- {report.get('hessian_trace_stderr'):.2g}",
            flush=True,
        )
    out = {
        "spec": args.spec,
        "sets": args.sets,
        "threads": torch.get_num_threads(),
        "machine": machine_info(torch.device("cpu")),
        "records": records,
    }
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
