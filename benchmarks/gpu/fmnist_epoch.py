"""Wall time of one Fashion-MNIST epoch of resnet18 with SGD, SAM and mSAM (Behdin et al., 2023,
"mSAM: Micro-Batch-Averaged Sharpness-Aware Minimization", arXiv:2302.09693) through the real
trainer (``msam.trainer.run_train``: device-resident loader, on-device augmentation, autocast).

One JSON record per run: optimizer, micro-batches, strategy, the run's wall time (model build,
data to device, one epoch, validation) and the epoch's own seconds and images/s from
``metrics.jsonl``. A run that fails records its error and the others still run.

    python benchmarks/gpu/fmnist_epoch.py --root .gpu-carry --device cuda --json out.json
    python benchmarks/gpu/fmnist_epoch.py --root /usr/share/datasets --device cpu --small ...
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

RUNS = [  # (optimizer, micro-batches, strategy)
    ("sgd", 1, "auto"),
    ("sam", 1, "auto"),
    ("msam", 8, "auto"),
    ("msam", 8, "loop"),
    ("msam", 8, "fused"),
    ("msam", 8, "batched"),
]
CUDA_ONLY = [("msam", 8, "graphed_loop"), ("msam", 8, "graphed_batched")]


def one_run(optimizer: str, m: int, strategy: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from msam.config import parse_train_config
    from msam.trainer import run_train

    raw = {
        "name": f"fmnist-{args.model}-{optimizer}-m{m}-{strategy}",
        "data": {"dataset": "fashion_mnist", "root": args.root, "subset": args.subset},
        "model": {"name": args.model},
        "optim": {
            "name": optimizer,
            "lr": 0.05,
            "rho": 0.05,
            "micro_batches": m,
            "strategy": strategy,
        },
        "train": {
            "epochs": 1,
            "batch_size": args.batch_size,
            "amp": args.amp,
            "device": args.device,
            "checkpoint": False,
        },
        "tracking": {"wandb": {"mode": "disabled"}},
    }
    record: dict[str, Any] = {
        "optimizer": optimizer,
        "micro_batches": m,
        "strategy": strategy,
        "model": args.model,
        "batch_size": args.batch_size,
        "amp": args.amp,
        "subset": args.subset,
    }
    try:
        cfg = parse_train_config(raw)
        with tempfile.TemporaryDirectory() as out:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
            run_train(cfg, out_dir=Path(out) / "run", verbose=False, evaluate_test=False)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            record["wall_s"] = time.perf_counter() - start
            lines = (Path(out) / "run" / "metrics.jsonl").read_text().splitlines()
            metrics = json.loads(lines[-1])
        record.update(
            epoch_s=metrics.get("seconds"),
            images_per_s=metrics.get("images_per_s"),
            train_loss=metrics.get("train_loss"),
            val_acc=metrics.get("val_acc"),
        )
    except Exception as exc:  # one failed run must not hide the others
        record["error"] = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    print(json.dumps(record), file=sys.stderr, flush=True)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, help="folder holding fashion-mnist/ IDX files")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=256, help="images per update")
    parser.add_argument("--amp", default="auto", help="auto | bf16 | fp16 | none")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--subset", type=int, default=None, help="training images (dry runs)")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args(argv)
    runs = RUNS + (CUDA_ONLY if args.device.startswith("cuda") else [])
    records = [one_run(o, m, s, args) for o, m, s in runs]
    sgd = next((r.get("epoch_s") for r in records if r["optimizer"] == "sgd"), None)
    sam = next((r.get("epoch_s") for r in records if r["optimizer"] == "sam"), None)
    for r in records:
        if r.get("epoch_s"):
            r["ratio_to_sgd"] = r["epoch_s"] / sgd if sgd else None
            r["ratio_to_sam"] = r["epoch_s"] / sam if sam else None
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(records, indent=1) + "\n")
    for r in records:
        print(
            f"{r['optimizer']:5} m={r['micro_batches']:<2} {r['strategy']:8} "
            + (
                f"epoch {r['epoch_s']:.1f} s  wall {r['wall_s']:.1f} s  "
                f"x SGD {r.get('ratio_to_sgd') or 0:.2f}  x SAM {r.get('ratio_to_sam') or 0:.2f}"
                if "error" not in r
                else "ERROR " + r["error"]
            )
        )
    return 0 if all("error" not in r for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
