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

    msam bench speed --model resnet10t --img-size 32 --batch-size 128 \\
        --micro-batches 1,2,4,8 --steps 5 --device cpu --strategy all --json out.json

or, from Python, ``measure_speed(SpeedSettings(model="resnet10t", batch_size=128))``.
Imports neither optuna nor wandb: it runs on machines that have only torch and timm.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from msam._backward import STRATEGIES, backward, choose_strategy
from msam.bench.machine import machine_info
from msam.bench.settings import SpeedSettings

__all__ = ["measure_speed"]

_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}

Log = Callable[[str], None]


class _Setup:
    """One model, optimizer and batch shared by every configuration, so that memory baselines
    and weights are the same for all of them."""

    def __init__(self, settings: SpeedSettings, device: torch.device, channels_last: bool) -> None:
        from msam.models import create_model

        s = settings
        torch.manual_seed(s.seed)
        small = {"auto": "auto", "on": True, "off": False}[s.small_input]
        net = create_model(
            s.model,
            num_classes=s.num_classes,
            in_chans=s.in_chans,
            img_size=s.img_size,
            small_input=small,
        )
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.model = net.to(device, memory_format=fmt).train()
        self.optimizer = torch.optim.SGD(
            self.model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4
        )
        gen = torch.Generator().manual_seed(s.seed)
        x = torch.randn(s.batch_size, s.in_chans, s.img_size, s.img_size, generator=gen)
        self.x = x.to(device, memory_format=fmt)
        self.y = torch.randint(0, s.num_classes, (s.batch_size,), generator=gen).to(device)
        self.device, self.amp = device, _DTYPES[s.amp]
        self.scaler = torch.amp.GradScaler(device.type) if self.amp == torch.float16 else None
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

        if strategy == PLAIN_SAM:
            return self._plain_sam(rho)
        if strategy == SAM_OPTIMIZER:
            return self._sam_optimizer(rho)
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

    def _plain_sam(self, rho: float) -> Callable[[], None]:
        """SAM's two steps written the obvious way (as most SAM code does it): the floor a user
        would write by hand. BatchNorm statistics are updated by both passes and there is no
        loss scaling or non-finite guard: it does less than ``msam.backward`` promises."""
        model, opt, x, y = self.model, self.optimizer, self.x, self.y
        params = [p for p in model.parameters() if p.requires_grad]

        def plain() -> None:
            opt.zero_grad(set_to_none=True)
            with self.autocast():
                loss = self.loss_fn(model(x), y)
            loss.backward()
            with torch.no_grad():
                grads = [p.grad for p in params]
                norm = torch.norm(torch.stack([g.norm(2) for g in grads]), 2)
                scale = rho / (norm + 1e-12)
                old = [p.clone() for p in params]
                for p, g in zip(params, grads, strict=True):
                    p.add_(g * scale)
            opt.zero_grad(set_to_none=True)
            with self.autocast():
                loss = self.loss_fn(model(x), y)
            loss.backward()
            with torch.no_grad():
                for p, o in zip(params, old, strict=True):
                    p.copy_(o)
            opt.step()

        return plain

    def _sam_optimizer(self, rho: float) -> Callable[[], None]:
        """``msam.SAM``'s two steps, used as davda54/sam's example uses its ``SAM``."""
        from msam.optim import SAM

        model, x, y = self.model, self.x, self.y
        sam = SAM(model.parameters(), torch.optim.SGD, rho=rho, **self.optimizer.defaults)

        def two_step() -> None:
            sam.zero_grad(set_to_none=True)
            with self.autocast():
                loss = self.loss_fn(model(x), y)
            loss.backward()
            sam.first_step(zero_grad=True)
            with self.autocast():
                loss = self.loss_fn(model(x), y)
            loss.backward()
            sam.second_step(zero_grad=True)

        return two_step

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def clear_grads(self) -> None:
        for p in self.model.parameters():
            p.grad = None


#: The SAM rows besides ``msam.backward(m=1)``: two-step SAM written the obvious way (the floor
#: every other row is compared with, ``ratio_to_plain_sam``) and ``msam.SAM``'s two steps.
PLAIN_SAM = "plain two-step"
SAM_OPTIMIZER = "msam.SAM two-step"


def _configs(
    setup: _Setup, micro_batches: Sequence[int], strategy: str, rho: float
) -> list[dict[str, Any]]:
    """SGD, SAM (``msam.backward``, plain two-step, ``msam.SAM``), then mSAM for each m > 1 and
    each requested strategy that is exact here."""
    configs: list[dict[str, Any]] = [
        {"optimizer": "sgd", "micro_batches": 1, "strategy": "none"},
        {"optimizer": "sam", "micro_batches": 1, "strategy": "loop"},
        {"optimizer": "sam", "micro_batches": 1, "strategy": PLAIN_SAM},
        {"optimizer": "sam", "micro_batches": 1, "strategy": SAM_OPTIMIZER},
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


def measure_speed(settings: SpeedSettings, *, log: Log | None = None) -> list[dict[str, Any]]:
    """Time SGD, SAM and mSAM updates; one record per configuration (see the module docstring).

    ``log`` hears about progress (warm-up and timed rounds done). ``settings.threads`` holds for
    the measurement only.
    """
    dev = torch.device(settings.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA device is available")
    threads = torch.get_num_threads()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    try:
        return _measure(settings, dev, log or (lambda _msg: None))
    finally:
        torch.set_num_threads(threads)


def _measure(settings: SpeedSettings, dev: torch.device, say: Log) -> list[dict[str, Any]]:
    mode = settings.channels_last
    last = dev.type == "cuda" if mode == "auto" else mode == "on"
    if dev.type == "cuda":
        # Let cuDNN pick the fastest kernel per shape during warm-up (grouped ones included).
        torch.backends.cudnn.benchmark = True
    setup = _Setup(settings, dev, last)
    configs = _configs(setup, settings.micro_batches, settings.strategy, settings.rho)
    steps_of = {
        i: setup.step_fn(c["optimizer"], c["micro_batches"], c["strategy"], settings.rho)
        for i, c in enumerate(configs)
        if not c.get("skipped")
    }
    _warm_up(setup, configs, steps_of, settings.warmup, say)
    times: dict[int, list[float]] = {i: [] for i in steps_of}
    cpu_times: dict[int, list[float]] = {i: [] for i in steps_of}
    order = list(steps_of)
    for r in range(settings.steps):
        shift = r % len(order)
        for i in order[shift:] + order[:shift]:
            times[i].append(_time_step(setup, steps_of[i], cpu_times[i]))
        say(f"round {r + 1}/{settings.steps} done")
    peaks = {i: _peak_memory(setup, steps_of[i]) if settings.memory else None for i in steps_of}
    return _records(settings, setup, last, configs, times, cpu_times, peaks)


def _warm_up(
    setup: _Setup,
    configs: list[dict[str, Any]],
    steps_of: dict[int, Callable[[], None]],
    warmup: int,
    say: Log,
) -> None:
    """Untimed updates; at least one, so that a strategy refused at run time shows here (its
    configuration is then marked skipped and dropped from ``steps_of``)."""
    for w in range(max(warmup, 1)):
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


def _records(
    settings: SpeedSettings,
    setup: _Setup,
    channels_last: bool,
    configs: list[dict[str, Any]],
    times: dict[int, list[float]],
    cpu_times: dict[int, list[float]],
    peaks: dict[int, int | None],
) -> list[dict[str, Any]]:
    """One record per configuration: the settings, the timings and the ratios to this run's SGD
    and SAM medians."""
    dev, s = setup.device, settings
    info = machine_info(dev)
    base = {
        "model": s.model,
        "img_size": s.img_size,
        "in_chans": s.in_chans,
        "batch_size": s.batch_size,
        "device": str(dev),
        "amp": s.amp,
        "channels_last": channels_last,
        "small_input": s.small_input,
        "rho": s.rho,
        "steps": s.steps,
        "warmup": s.warmup,
        "param_count": sum(p.numel() for p in setup.model.parameters()),
    }
    medians = {i: statistics.median(t) for i, t in times.items()}
    sgd = next((medians[i] for i, c in enumerate(configs) if c["optimizer"] == "sgd"), None)
    sam = _median_of(configs, medians, "loop")
    plain = _median_of(configs, medians, PLAIN_SAM)
    records = []
    for i, c in enumerate(configs):
        rec: dict[str, Any] = {**base, **c, "skipped": c.get("skipped")}
        rec.setdefault("auto_choice", c["optimizer"] != "msam")
        if i in times:
            rec.update(_timing(times[i], medians[i], cpu_times[i], sgd, sam, peaks[i], s, dev))
            rec["ratio_to_plain_sam"] = medians[i] / plain if plain else None
        if c["strategy"].startswith("graphed_"):
            rec["graph_status"] = _graph_status(setup.model, c["strategy"], c["micro_batches"])
            rec["peak_mem_note"] = "a replay reuses the graph's pool, allocated at capture"
        rec["machine"] = info
        records.append(rec)
    return records


def _median_of(
    configs: list[dict[str, Any]], medians: dict[int, float], strategy: str
) -> float | None:
    """The median step time of the (first) SAM row of ``strategy``, if it was timed."""
    return next(
        (
            medians[i]
            for i, c in enumerate(configs)
            if c["optimizer"] == "sam" and c["strategy"] == strategy and i in medians
        ),
        None,
    )


def _timing(
    t: list[float],
    med: float,
    cpu: list[float],
    sgd: float | None,
    sam: float | None,
    peak: int | None,
    settings: SpeedSettings,
    dev: torch.device,
) -> dict[str, Any]:
    """A configuration's step times (ms), throughput, ratios and peak memory."""
    return dict(
        step_ms_median=med * 1e3,
        step_ms_min=min(t) * 1e3,
        step_ms_max=max(t) * 1e3,
        step_ms=[round(s * 1e3, 3) for s in t],
        cpu_time_ms_median=statistics.median(cpu) * 1e3 if dev.type == "cpu" else None,
        images_per_s=settings.batch_size / med,
        ratio_to_sgd=med / sgd if sgd else None,
        ratio_to_sam=med / sam if sam else None,
        peak_mem_mb=None if peak is None else peak / 2**20,
        peak_mem_method=_memory_method(dev) if settings.memory else None,
    )


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
