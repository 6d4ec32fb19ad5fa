"""Are the fused mSAM strategies (Behdin et al., 2023, arXiv:2302.09693) exact on this device?

Runs every strategy of ``msam.STRATEGIES`` once on resnet18 and vit_tiny (32 px) and compares its
gradient and BatchNorm statistics with the reference loop's: in float32 without TF32 (should
agree to float rounding) and under bf16 autocast (cosine similarity of the whole gradient).
The CUDA paths (grouped convolutions, channels-last regrouping) run nowhere else.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
from torch.nn.functional import cross_entropy

import msam
from msam.models import create_model


def compare(name: str, device: str, amp: bool, batch: int, m: int) -> list[dict]:
    torch.manual_seed(0)
    base = create_model(name, num_classes=10, in_chans=3, img_size=32).to(device).train()
    if device.startswith("cuda") and "vit" not in name:
        base = base.to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, 32, 32, device=device)
    if device.startswith("cuda") and "vit" not in name:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=device)
    results, ref = [], None
    for strategy in ["loop", *[s for s in msam.STRATEGIES if s != "loop"]]:
        model = copy.deepcopy(base)
        record = {"model": name, "strategy": strategy, "amp": "bf16" if amp else "fp32", "m": m}
        reason = msam.STRATEGIES[strategy].check(model, x, m)
        if reason is not None:  # e.g. the graphed strategies on a CPU dry run
            record["skipped"] = reason
            results.append(record)
            continue
        try:
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
                msam.backward(model, cross_entropy, x, y, rho=0.05, micro_batches=m,
                              strategy=strategy)  # fmt: skip
        except ValueError as exc:
            record["error"] = str(exc)
            results.append(record)
            continue
        g = torch.cat([p.grad.flatten().double() for p in model.parameters()])
        b = [t.double() for t in model.buffers() if t.is_floating_point()]
        if ref is None:
            ref = (g, b)
        rg, rb = ref
        record["grad_rel_err"] = float((g - rg).norm() / rg.norm())
        record["grad_cosine"] = float(torch.nn.functional.cosine_similarity(g, rg, dim=0))
        record["bn_stat_max_rel_err"] = max(
            (float(((s - r).abs() / r.abs().clamp_min(1e-6)).max()) for s, r in zip(b, rb)),
            default=0.0,
        )
        results.append(record)
        print(json.dumps(record), flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--micro-batches", type=int, default=8)
    parser.add_argument("--models", default="resnet18,vit_tiny")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    records = []
    for name in args.models.split(","):
        for amp in (False, True):
            records += compare(name, args.device, amp, args.batch_size, args.micro_batches)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(records, indent=1) + "\n")
    bad = [
        r for r in records
        if "error" in r
        or ("skipped" not in r and r["grad_cosine"] < (0.99 if r["amp"] == "bf16" else 0.99999))
    ]  # fmt: skip
    for r in bad:
        print("NOT CLOSE:", json.dumps(r), file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
