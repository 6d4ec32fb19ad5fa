"""Trainer benchmark on Fashion-MNIST: accuracy and wall time of SGD, SAM and mSAM, and the
trainer's data-pipeline overhead against the bare model's forward + backward on the same batches.

    python benchmarks/trainer.py --subset 12000 --epochs 3 --model resnet10t --micro-batches 4

Writes ``benchmarks/results/trainer-<dataset>-<model>-<date>.json`` and a short ``.md`` beside it.
Needs neither optuna nor wandb.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import torch

from msam.config import parse_train_config
from msam.data import build_data
from msam.models import create_model
from msam.trainer import build_optimizer, run_train, versions

RESULTS = Path(__file__).resolve().parent / "results"


def _config(args, optimizer: str, epochs: int, subset: int) -> dict:
    return {
        "name": f"bench-{optimizer}",
        "data": {"dataset": args.dataset, "subset": subset, "val_fraction": 0.1},
        "model": {"name": args.model, "small_input": args.small_input},
        "optim": {
            "name": optimizer,
            "lr": args.lr,
            "rho": args.rho,
            "micro_batches": args.micro_batches if optimizer == "msam" else 1,
        },
        "train": {"epochs": epochs, "batch_size": args.batch_size, "seed": 0, "device": "cpu"},
        "tracking": {"wandb": {"mode": "disabled"}},
    }


def accuracy_runs(args) -> list[dict]:
    rows = []
    for optimizer in ("sgd", "sam", "msam"):
        cfg = parse_train_config(_config(args, optimizer, args.epochs, args.subset))
        t0 = time.perf_counter()
        result = run_train(cfg, verbose=False)
        wall = time.perf_counter() - t0
        s = result.summary
        rows.append(
            {
                "optimizer": optimizer,
                "micro_batches": cfg.optim.micro_batches,
                "test_acc": s["test_acc"],
                "val_acc": s["val_acc"],
                "train_seconds": s["seconds"],
                "wall_seconds": wall,
                "images_per_s": s["images_per_s"],
            }
        )
        print(rows[-1], flush=True)
    return rows


def overhead(args) -> dict:
    """Trainer images/s (SGD, one epoch) against a bare loop over the same pre-made batches."""
    subset = args.batch_size * args.overhead_steps * 10 // 9 + args.batch_size
    cfg = parse_train_config(_config(args, "sgd", 1, subset))
    data = build_data(args.dataset, subset=subset, batch_size=args.batch_size, device="cpu")
    data.train.set_epoch(0)
    batches = list(data.train)
    trainer_ips, bare_ips = [], []
    for _ in range(args.repeats):  # interleaved, so machine noise hits both alike
        result = run_train(cfg, verbose=False, evaluate_test=False)
        trainer_ips.append(result.history[0]["images_per_s"])
        torch.manual_seed(0)
        info = data.info
        model = create_model(
            args.model,
            num_classes=info.num_classes,
            in_chans=info.in_chans,
            img_size=info.img_size,
            small_input=args.small_input,
        )
        opt = build_optimizer(model, cfg)
        loss_fn = torch.nn.CrossEntropyLoss()
        t0 = time.perf_counter()
        for x, y in batches:
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            opt.step()
        bare_ips.append(len(batches) * args.batch_size / (time.perf_counter() - t0))
    t, b = statistics.median(trainer_ips), statistics.median(bare_ips)
    return {
        "trainer_images_per_s": trainer_ips,
        "bare_images_per_s": bare_ips,
        "overhead_fraction_median": 1 - t / b,
        "steps_per_epoch": len(batches),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fashion_mnist")
    parser.add_argument("--model", default="resnet10t")
    parser.add_argument("--subset", type=int, default=12000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--overhead-steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument(
        "--small-input",
        default="auto",
        type=lambda v: v if v == "auto" else v.lower() == "true",
        help="auto | true | false (false keeps timm's stride-4 stem: ~16x cheaper at 28 px)",
    )
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    record = {
        "command": "python benchmarks/trainer.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not False),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "device": "cpu",
        },
        "versions": versions(),
        "date": date.today().isoformat(),
        "overhead": overhead(args),
    }
    print(record["overhead"], flush=True)
    if not args.skip_accuracy:
        record["runs"] = accuracy_runs(args)
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"trainer-{args.dataset}-{args.model}-{record['date']}"
    stem.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {stem}.json")


if __name__ == "__main__":
    main()
