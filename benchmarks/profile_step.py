"""Where an mSAM update's time goes: ``torch.profiler`` tables of ``msam.backward`` at several m.

Explains a ratio that ``msam bench speed`` shows: the same model and batch, one thread, the
operators' self CPU time summed over ``--steps`` updates after a warm-up, per m. Compare the rows
of one operator across m (convolution forward and backward, the per-parameter element-wise ops
of the ascent step and the restore) to see which part grows with the number of micro-batches.

    python benchmarks/profile_step.py --model resnet10t --small-input off --micro-batches 1,8

Needs neither optuna nor wandb.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet10t")
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--micro-batches", default="1,8")
    parser.add_argument("--small-input", choices=["auto", "on", "off"], default="auto")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", type=int, default=12, help="operators shown per table")
    args = parser.parse_args(argv)

    import torch
    from torch.profiler import ProfilerActivity, profile

    import msam
    from msam.models import create_model

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    small = {"auto": "auto", "on": True, "off": False}[args.small_input]
    model = create_model(
        args.model, num_classes=10, in_chans=3, img_size=args.img_size, small_input=small
    ).train()
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    y = torch.randint(0, 10, (args.batch_size,))
    loss_fn = torch.nn.functional.cross_entropy
    print(
        f"{args.model} small_input={args.small_input} {args.img_size}px batch {args.batch_size}, "
        f"{args.threads} thread(s), torch {torch.__version__}; self CPU over {args.steps} steps"
    )
    for m in (int(v) for v in args.micro_batches.split(",")):
        for _ in range(2):
            msam.backward(model, loss_fn, x, y, rho=0.05, micro_batches=m)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                msam.backward(model, loss_fn, x, y, rho=0.05, micro_batches=m)
        averages = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in averages) / 1e3
        print(f"\n== m = {m}: {total / args.steps:.0f} ms of self CPU per update")
        print(
            averages.table(
                sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=40
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
