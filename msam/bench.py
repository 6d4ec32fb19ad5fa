"""Speed of one whole update of SGD, SAM and mSAM (Behdin et al., 2023, "mSAM: Micro-Batch-Averaged
Sharpness-Aware Minimization", arXiv:2302.09693) on synthetic data, per strategy.

The paper's claim is that mSAM costs what SAM costs. An update here is ``msam.backward`` (or one
plain forward-backward for SGD) plus the base optimizer's step, timed after warm-up; CUDA steps
are timed with events and a synchronisation. Configurations are measured round-robin, one step
each per round, in a rotating order, so that noise from other processes lands on all of them
alike; ratios to SGD and to SAM come from the medians of this one run.

Peak memory is what a step allocates above what was allocated before it (model, optimizer state,
data): ``torch.cuda.max_memory_allocated`` on CUDA; on the CPU the allocations and frees recorded
by one extra step under ``torch.profiler`` with ``profile_memory`` (torch tensors only, not the
allocator's cache or Python objects).

    python -m msam.bench speed --model resnet10t --img-size 32 --batch-size 128 \\
        --micro-batches 1,2,4,8 --steps 5 --device cpu --strategy all --json out.json

Imports neither optuna nor wandb: it runs on machines that have only torch and timm.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from msam._backward import STRATEGIES, backward, choose_strategy
from msam.errors import UserError

__all__ = ["machine_info", "main", "markdown_table", "print_table", "speed"]

AMP = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def machine_info(device: torch.device) -> dict[str, Any]:
    """What the numbers depend on, without the host's name."""
    import timm

    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "device": str(device),
        "device_name": _cpu_model(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            device_name=props.name,
            device_memory_gb=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            cudnn_benchmark=torch.backends.cudnn.benchmark,
        )
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class _Setup:
    """One model, optimizer and batch shared by every configuration, so that memory baselines
    and weights are the same for all of them."""

    def __init__(
        self,
        *,
        model: str,
        img_size: int,
        in_chans: int,
        num_classes: int,
        batch_size: int,
        device: torch.device,
        amp: torch.dtype | None,
        channels_last: bool,
        seed: int,
    ) -> None:
        from msam.models import create_model

        torch.manual_seed(seed)
        net = create_model(model, num_classes=num_classes, in_chans=in_chans, img_size=img_size)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.model = net.to(device, memory_format=fmt).train()
        self.optimizer = torch.optim.SGD(
            self.model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4
        )
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(batch_size, in_chans, img_size, img_size, generator=gen)
        self.x = x.to(device, memory_format=fmt)
        self.y = torch.randint(0, num_classes, (batch_size,), generator=gen).to(device)
        self.device, self.amp = device, amp
        self.scaler = torch.amp.GradScaler(device.type) if amp == torch.float16 else None
        self.loss_fn = nn.functional.cross_entropy

    def autocast(self):
        if self.amp is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp)

    def step_fn(self, optimizer: str, micro_batches: int, strategy: str, rho: float) -> Callable:
        model, opt, x, y, scaler = self.model, self.optimizer, self.x, self.y, self.scaler

        def finish() -> None:
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()

        if optimizer == "sgd":

            def sgd() -> None:
                opt.zero_grad(set_to_none=True)
                with self.autocast():
                    loss = self.loss_fn(model(x), y)
                (scaler.scale(loss) if scaler is not None else loss).backward()
                finish()

            return sgd

        def sharp() -> None:
            with self.autocast():
                backward(
                    model,
                    self.loss_fn,
                    x,
                    y,
                    rho=rho,
                    micro_batches=micro_batches,
                    strategy=strategy,
                    scaler=scaler,
                )
            finish()

        return sharp

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def clear_grads(self) -> None:
        for p in self.model.parameters():
            p.grad = None


def _configs(
    setup: _Setup, micro_batches: Sequence[int], strategy: str, rho: float
) -> list[dict[str, Any]]:
    """SGD, SAM, then mSAM for each m > 1 and each requested strategy that is exact here."""
    configs: list[dict[str, Any]] = [
        {"optimizer": "sgd", "micro_batches": 1, "strategy": "none"},
        {"optimizer": "sam", "micro_batches": 1, "strategy": "loop"},
    ]
    if strategy == "all":
        names = list(STRATEGIES)
    else:
        names = [s.strip() for s in strategy.split(",") if s.strip()]
    if (
        "graphed_loop" in names
        and STRATEGIES["graphed_loop"].check(setup.model, setup.x, 1) is None
    ):
        # SAM replayed as a CUDA graph too, so that graphed mSAM rows have their like to compare
        # with; ratios stay relative to the eager SAM above.
        configs.append({"optimizer": "sam", "micro_batches": 1, "strategy": "graphed_loop"})
    for m in micro_batches:
        if m == 1:
            continue
        auto = choose_strategy(setup.model, setup.x, m, rho=rho)
        chosen = [auto if n == "auto" else n for n in names]
        for name in dict.fromkeys(chosen):
            if name not in STRATEGIES:
                raise ValueError(f"unknown strategy {name!r}; known: all, auto, {list(STRATEGIES)}")
            reason = STRATEGIES[name].check(setup.model, setup.x, m)
            if reason is not None and strategy == "all":
                continue  # "all" means all that apply here (graphed ones only on CUDA)
            configs.append(
                {
                    "optimizer": "msam",
                    "micro_batches": m,
                    "strategy": name,
                    "auto_choice": name == auto,
                    "skipped": reason,
                }
            )
    return configs


def _peak_memory(setup: _Setup, step: Callable[[], None]) -> int | None:
    """Bytes a step allocates above what was allocated before it."""
    setup.clear_grads()
    if setup.device.type == "cuda":
        setup.sync()
        base = torch.cuda.memory_allocated(setup.device)
        torch.cuda.reset_peak_memory_stats(setup.device)
        step()
        setup.sync()
        return torch.cuda.max_memory_allocated(setup.device) - base
    if setup.device.type != "cpu":
        return None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    # Allocations and frees as the profiler attributes them: to an op itself (self_* excludes
    # its children) or to "[memory]" events outside any op; the running sum's maximum is the peak.
    deltas = sorted(
        (e.time_range.start, e.self_cpu_memory_usage)
        for e in prof.events()
        if e.self_cpu_memory_usage
    )
    current = peak = 0
    for _, delta in deltas:
        current += delta
        peak = max(peak, current)
    return peak


def speed(
    *,
    model: str,
    batch_size: int,
    micro_batches: Sequence[int] = (1, 2, 4, 8),
    img_size: int = 32,
    in_chans: int = 3,
    num_classes: int = 10,
    steps: int = 10,
    warmup: int = 2,
    device: str = "cpu",
    amp: str = "none",
    strategy: str = "all",
    rho: float = 0.05,
    channels_last: str = "auto",
    memory: bool = True,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Time SGD, SAM and mSAM updates; one record per configuration (see the module docstring)."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA device is available")
    bad = [m for m in micro_batches if m < 1 or batch_size % m]
    if bad:
        raise ValueError(f"micro-batches {bad} do not divide the batch size {batch_size}")
    if amp not in AMP:
        raise ValueError(f"amp must be one of {sorted(AMP)}, got {amp!r}")
    last = dev.type == "cuda" if channels_last == "auto" else channels_last in ("on", "true", "1")
    if dev.type == "cuda":
        # Let cuDNN pick the fastest kernel per shape during warm-up (grouped ones included).
        torch.backends.cudnn.benchmark = True
    setup = _Setup(
        model=model,
        img_size=img_size,
        in_chans=in_chans,
        num_classes=num_classes,
        batch_size=batch_size,
        device=dev,
        amp=AMP[amp],
        channels_last=last,
        seed=seed,
    )
    configs = _configs(setup, micro_batches, strategy, rho)
    say = log or (lambda _msg: None)
    steps_of = {
        i: setup.step_fn(c["optimizer"], c["micro_batches"], c["strategy"], rho)
        for i, c in enumerate(configs)
        if not c.get("skipped")
    }

    for w in range(max(warmup, 1)):  # at least one: a strategy refused at run time shows here
        for i in list(steps_of):
            try:
                steps_of[i]()
            except ValueError as exc:  # an explicit strategy that is not exact for this model
                if "not exact" not in str(exc):
                    raise
                configs[i]["skipped"] = str(exc)
                del steps_of[i]
        setup.sync()
        say(f"warm-up {w + 1}/{max(warmup, 1)} done")

    times: dict[int, list[float]] = {i: [] for i in steps_of}
    cpu_times: dict[int, list[float]] = {i: [] for i in steps_of}
    order = list(steps_of)
    for r in range(steps):
        shift = r % len(order)
        for i in order[shift:] + order[:shift]:
            times[i].append(_time_step(setup, steps_of[i], cpu_times[i]))
        say(f"round {r + 1}/{steps} done")

    peaks = {i: _peak_memory(setup, steps_of[i]) if memory else None for i in steps_of}
    info = machine_info(dev)
    base = {
        "model": model,
        "img_size": img_size,
        "in_chans": in_chans,
        "batch_size": batch_size,
        "device": str(dev),
        "amp": amp,
        "channels_last": last,
        "rho": rho,
        "steps": steps,
        "warmup": warmup,
        "param_count": sum(p.numel() for p in setup.model.parameters()),
    }
    medians = {i: statistics.median(t) for i, t in times.items()}
    sgd = next((medians[i] for i, c in enumerate(configs) if c["optimizer"] == "sgd"), None)
    sam = next(
        (medians[i] for i, c in enumerate(configs) if c["optimizer"] == "sam" and i in medians),
        None,
    )
    records = []
    for i, c in enumerate(configs):
        rec: dict[str, Any] = {**base, **c, "skipped": c.get("skipped")}
        rec.setdefault("auto_choice", c["optimizer"] != "msam")
        if i in times:
            t = times[i]
            med = medians[i]
            rec.update(
                step_ms_median=med * 1e3,
                step_ms_min=min(t) * 1e3,
                step_ms_max=max(t) * 1e3,
                step_ms=[round(s * 1e3, 3) for s in t],
                cpu_time_ms_median=(
                    statistics.median(cpu_times[i]) * 1e3 if dev.type == "cpu" else None
                ),
                images_per_s=batch_size / med,
                ratio_to_sgd=med / sgd if sgd else None,
                ratio_to_sam=med / sam if sam else None,
                peak_mem_mb=None if peaks[i] is None else peaks[i] / 2**20,
                peak_mem_method=_memory_method(dev) if memory else None,
            )
        if c["strategy"].startswith("graphed_"):
            rec["graph_status"] = _graph_status(setup.model, c["strategy"], c["micro_batches"])
            rec["peak_mem_note"] = "a replay reuses the graph's pool, allocated at capture"
        rec["machine"] = info
        records.append(rec)
    return records


def _graph_status(model: nn.Module, strategy: str, m: int) -> str:
    """Whether a graphed row really replayed a graph (a failed capture runs eagerly)."""
    graphs = getattr(STRATEGIES[strategy].run, "graphs", {}).get(model, {})
    states = [v for k, v in graphs.items() if k[0] == m]
    failed = [v for v in states if isinstance(v, str)]
    if failed:
        return failed[0]
    return "replayed" if states else "not captured (too many graphs: ran eagerly)"


def _memory_method(device: torch.device) -> str | None:
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated minus allocated before the step"
    if device.type == "cpu":
        return "torch.profiler profile_memory: peak of torch allocations during one step"
    return None


def _time_step(setup: _Setup, step: Callable[[], None], cpu_times: list[float]) -> float:
    if setup.device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    c0, t0 = time.process_time(), time.perf_counter()
    step()
    elapsed = time.perf_counter() - t0
    cpu_times.append(time.process_time() - c0)
    return elapsed


COLUMNS = ["optimizer", "m", "strategy", "ms/step median", "min-max", "img/s", "xSGD", "xSAM"]
COLUMNS += ["peak MB"]


def _title(records: Sequence[dict[str, Any]]) -> str:
    head = records[0] if records else {}
    return (
        f"{head.get('model')} {head.get('img_size')}px batch {head.get('batch_size')} "
        f"on {head.get('machine', {}).get('device_name')} amp={head.get('amp')}"
    )


def table_rows(records: Sequence[dict[str, Any]]) -> list[list[str]]:
    """One row of strings per record, in ``COLUMNS`` order; ratios as recorded (same run)."""
    rows = []
    for r in records:
        auto = r.get("auto_choice") and r["optimizer"] == "msam"
        name = r["strategy"] + (" (auto)" if auto else "")
        if r.get("skipped"):
            rows.append([r["optimizer"], str(r["micro_batches"]), name, "skipped: " + r["skipped"]])
            continue
        rows.append(
            [
                r["optimizer"],
                str(r["micro_batches"]),
                name,
                f"{r['step_ms_median']:.1f}",
                f"{r['step_ms_min']:.1f}-{r['step_ms_max']:.1f}",
                f"{r['images_per_s']:.0f}",
                f"{r['ratio_to_sgd']:.2f}" if r.get("ratio_to_sgd") else "-",
                f"{r['ratio_to_sam']:.2f}" if r.get("ratio_to_sam") else "-",
                "-" if r.get("peak_mem_mb") is None else f"{r['peak_mem_mb']:.0f}",
            ]
        )
    return rows


def markdown_table(records: Sequence[dict[str, Any]]) -> str:
    """The table as GitHub markdown, for the ``.md`` beside a results file."""
    lines = [f"**{_title(records)}**", "", "| " + " | ".join(COLUMNS) + " |"]
    lines.append("|" + "|".join(" --- " for _ in COLUMNS) + "|")
    for row in table_rows(records):
        lines.append("| " + " | ".join(row + [""] * (len(COLUMNS) - len(row))) + " |")
    return "\n".join(lines) + "\n"


def print_table(records: Sequence[dict[str, Any]], file: Any = None) -> None:
    """A table with each row's ratio to SGD and to SAM (rich if installed, else plain text)."""
    rows = table_rows(records)
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        out = file or sys.stdout
        print(_title(records), file=out)
        print(" | ".join(COLUMNS), file=out)
        for row in rows:
            print(" | ".join(row), file=out)
        return
    table = Table(title=_title(records))
    for c in COLUMNS:
        table.add_column(c, justify="left" if c in ("optimizer", "strategy") else "right")
    for row in rows:
        table.add_row(*row)
    console = Console(file=file)
    if not console.is_terminal:
        console = Console(file=file, width=140)
    console.print(table)


def _ints(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m msam.bench", description=__doc__.split("\n\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sp = sub.add_parser("speed", help="time SGD, SAM and mSAM updates on synthetic data")
    sp.add_argument("--model", required=True, help="timm model name or alias (vit_tiny, ...)")
    sp.add_argument("--img-size", type=int, default=32, help="image side in pixels")
    sp.add_argument("--in-chans", type=int, default=3, help="image channels")
    sp.add_argument("--num-classes", type=int, default=10, help="classes of the synthetic labels")
    sp.add_argument("--batch-size", type=int, required=True, help="images per update (B)")
    sp.add_argument(
        "--micro-batches", type=_ints, default=[1, 2, 4, 8], help="mSAM m values, e.g. 1,2,4,8"
    )
    sp.add_argument("--steps", type=int, default=10, help="timed updates per configuration")
    sp.add_argument("--warmup", type=int, default=2, help="untimed updates per configuration")
    sp.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    sp.add_argument("--amp", default="none", choices=sorted(AMP), help="autocast dtype")
    sp.add_argument(
        "--strategy",
        default="all",
        help="mSAM strategies: all | auto | a comma-separated list of " + ", ".join(STRATEGIES),
    )
    sp.add_argument("--rho", type=float, default=0.05, help="SAM radius")
    sp.add_argument("--channels-last", default="auto", choices=["auto", "on", "off"])
    sp.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's)"
    )
    sp.add_argument("--no-memory", action="store_true", help="skip the peak-memory step")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--json", type=Path, default=None, help="write the records here")
    tp = sub.add_parser("table", help="print the table of a results file (--markdown for .md)")
    tp.add_argument("json", type=Path, help="a JSON file written by `speed --json`")
    tp.add_argument("--markdown", action="store_true", help="GitHub markdown instead of rich")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m msam.bench speed ...``; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.command == "table":
        records = json.loads(args.json.read_text())
        if args.markdown:
            print(markdown_table(records), end="")
        else:
            print_table(records)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        records = speed(
            model=args.model,
            batch_size=args.batch_size,
            micro_batches=args.micro_batches,
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
            memory=not args.no_memory,
            seed=args.seed,
            log=lambda msg: print(msg, file=sys.stderr, flush=True),
        )
    except (ValueError, UserError) as exc:
        print(f"msam bench speed: {exc}", file=sys.stderr)
        return 2
    print_table(records)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(records, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
