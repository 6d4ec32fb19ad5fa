"""The trainer every ``msam train``, sweep trial and final run executes.

SGD, SAM (Foret et al., 2021) and mSAM (Behdin et al., 2023) share one loop: the gradient comes from
:func:`msam.backward` (rho = 0 and one micro-batch for SGD, one micro-batch for SAM), the base
optimizer is timm's ``create_optimizer_v2`` (no weight decay on norms and biases), the schedule is
timm's, stepped per update. The same seed gives the same initial weights and the same batches for
every optimizer, so runs are paired. Progress reaches the outside world only through callbacks.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import platform
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from msam._backward import backward
from msam.callbacks import Callback, CallbackList
from msam.config import TrainConfig, first_difference
from msam.errors import UserError
from msam.files import CHECKPOINT, METRICS, SUMMARY, append_text, atomic_write
from msam.optim import grad_evals_per_update as optim_grad_evals

#: Updates between checks for a non-finite loss (each check is one host synchronisation).
DIVERGENCE_CHECK_EVERY = 25


@dataclass
class TrainResult:
    """What a run ended with. ``status``: complete | stopped | diverged."""

    status: str
    summary: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    reason: str | None = None
    model: nn.Module | None = None  # the trained model (flatness metrics of final runs use it)


# ----------------------------------------------------------------------------- set-up helpers


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"train.device is {name} but no CUDA device is available")
    return device


def resolve_amp(mode: str, device: torch.device) -> torch.dtype | None:
    """auto = bf16 on CUDA devices that support it, full precision elsewhere."""
    if mode == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[mode]


def grad_evals_per_update(cfg: TrainConfig) -> int:
    """Forward-backward passes over the whole mini-batch per update of ``cfg``'s optimizer
    (:func:`msam.optim.grad_evals_per_update`): SGD 1, SAM and mSAM 2."""
    return optim_grad_evals(cfg.optim.name, cfg.optim.rho)


def _sharpness_args(cfg: TrainConfig) -> tuple[float, int]:
    if cfg.optim.name == "sgd":
        return 0.0, 1
    if cfg.optim.name == "sam":
        return cfg.optim.rho, 1
    return cfg.optim.rho, cfg.optim.micro_batches


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    import timm.optim

    kwargs: dict[str, Any] = {}
    if cfg.optim.momentum and cfg.optim.base.lower() in ("sgd", "momentum", "nesterov"):
        kwargs["momentum"] = cfg.optim.momentum
    try:
        return timm.optim.create_optimizer_v2(
            model,
            opt=cfg.optim.base,
            lr=cfg.optim.lr,
            weight_decay=cfg.optim.weight_decay,
            filter_bias_and_bn=True,
            **kwargs,
        )
    except (ValueError, AssertionError, KeyError) as exc:
        raise UserError(f"optim.base: timm cannot build '{cfg.optim.base}' ({exc})") from None


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, updates_per_epoch: int):
    """timm's scheduler, stepped per update; warm-up is linear from 1e-6 of the peak."""
    import timm.scheduler

    epochs, warmup = cfg.train.epochs, cfg.train.warmup_epochs
    common = dict(
        num_epochs=epochs,
        warmup_epochs=warmup,
        warmup_lr=cfg.optim.lr * 1e-6 if warmup else 0.0,
        step_on_epochs=False,
        updates_per_epoch=updates_per_epoch,
        min_lr=0.0,
    )
    if cfg.train.schedule == "cosine":
        sched, _ = timm.scheduler.create_scheduler_v2(optimizer, sched="cosine", **common)
    elif cfg.train.schedule == "step":
        milestones = sorted({max(1, epochs // 2), max(1, (3 * epochs) // 4)})
        sched, _ = timm.scheduler.create_scheduler_v2(
            optimizer, sched="multistep", decay_milestones=milestones, decay_rate=0.1, **common
        )
    else:  # constant after warm-up
        sched, _ = timm.scheduler.create_scheduler_v2(
            optimizer, sched="step", decay_epochs=epochs + 1, decay_rate=1.0, **common
        )
    return sched


def versions() -> dict[str, str]:
    import timm

    return {
        "msam": __import__("msam").__version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
    }


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write(path, buffer.getvalue())


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    """The checkpoint, or None (with a warning) when it is missing, truncated or corrupt."""
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated file raises many kinds of errors
        warnings.warn(
            f"ignoring unreadable checkpoint {path} ({type(exc).__name__}); starting over",
            stacklevel=2,
        )
        return None


def _identity(cfg: TrainConfig) -> dict[str, Any]:
    """What a checkpoint must agree on to be resumed: everything but the name and tracking."""
    resolved = cfg.to_dict()
    return {k: v for k, v in resolved.items() if k not in ("name", "tracking")}


def checkpoint_mismatch(state: dict[str, Any], cfg: TrainConfig) -> str | None:
    """The first setting on which a checkpoint and ``cfg`` differ (``a.b: old -> new``), or None.

    Checkpoints written before configs were recorded in them carry no config and always match.
    """
    if "config" not in state:
        return None
    stored, wanted = json.loads(state["config"]), json.loads(json.dumps(_identity(cfg)))
    found = first_difference(stored, wanted)
    return None if found is None else f"{found[0]}: {found[1]!r} -> {found[2]!r}"


def check_out_dir(out_dir: Path | None, resume: bool) -> None:
    """Refuse to overwrite a started run unless resuming it (exit 2, nothing touched)."""
    if out_dir is None or resume:
        return
    existing = [name for name in (SUMMARY, METRICS, CHECKPOINT) if (out_dir / name).exists()]
    if existing:
        raise UserError(
            f"{out_dir} already holds a run ({', '.join(existing)}); pass --resume to continue it "
            "or choose another --out"
        )


# ----------------------------------------------------------------------------- the loop


class _Meter:
    """Loss and accuracy sums kept on the device: no host synchronisation per step."""

    def __init__(self, device: torch.device) -> None:
        self.loss = torch.zeros((), device=device, dtype=torch.float64)
        self.correct = torch.zeros((), device=device, dtype=torch.int64)
        self.count = 0

    def add_outputs(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        self.correct += (outputs.argmax(dim=1) == targets).sum()

    def add_loss(self, loss: torch.Tensor, n: int) -> None:
        self.loss += loss.double() * n
        self.count += n

    def result(self) -> tuple[float, float]:
        n = max(self.count, 1)
        return float(self.loss) / n, float(self.correct) / n


@torch.no_grad()
def evaluate(
    model: nn.Module, loader, amp: torch.dtype | None, device: torch.device
) -> tuple[float, float]:
    """Mean loss and accuracy over a loader, in eval mode (BatchNorm running statistics)."""
    was_training = model.training
    model.eval()
    meter = _Meter(device)
    eval_loss = nn.CrossEntropyLoss()  # no label smoothing: the plain loss is what users compare
    with _autocast(device, amp):
        for x, y in loader:
            out = model(x)
            meter.add_outputs(out, y)
            meter.add_loss(eval_loss(out.float(), y), y.shape[0])
    model.train(was_training)
    return meter.result()


def _autocast(device: torch.device, amp: torch.dtype | None):
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=amp)


class _Console:
    """A rich progress bar on a terminal; one plain line per epoch otherwise; nothing if quiet."""

    def __init__(self, enabled: bool, total_epochs: int, updates_per_epoch: int) -> None:
        self.enabled = enabled
        self.progress = None
        if enabled and sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

            self.progress = Progress(
                "[progress.description]{task.description}",
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                transient=True,
            )
            self.progress.start()
            self.task = self.progress.add_task("epoch 1", total=total_epochs * updates_per_epoch)

    def advance(self, description: str | None = None) -> None:
        if self.progress is not None:
            self.progress.update(self.task, advance=1, description=description)

    def epoch(self, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        parts = [f"epoch {metrics['epoch']}"]
        for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
            if metrics.get(key) is not None:
                parts.append(f"{key} {metrics[key]:.4f}")
        parts.append(f"{metrics['images_per_s']:.0f} img/s")
        line = "  ".join(parts)
        if self.progress is not None:
            self.progress.console.print(line)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


def with_epochs(cfg: TrainConfig, epochs: int | None) -> TrainConfig:
    """``cfg`` training for ``epochs`` instead (None: as it is)."""
    if epochs is None or epochs == cfg.train.epochs:
        return cfg
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": epochs})})


@dataclass(frozen=True)
class _Run:
    """What a run is built from once, before its first epoch: the pieces every later step uses."""

    cfg: TrainConfig
    out: Path | None
    device: torch.device
    amp: torch.dtype | None
    dist: dict[str, Any] | None  # rank, world and device under torchrun; None in one process
    data: Any  # msam.data's train/val/test loaders and the data set's info
    model: nn.Module  # the module whose state is saved and evaluated
    net: nn.Module  # what the gradient runs through: the model, compiled and/or DDP-wrapped
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler | None
    loss_fn: nn.Module
    rho: float
    micro_batches: int  # per process
    updates_per_epoch: int

    @property
    def is_main(self) -> bool:
        return self.dist is None or self.dist["rank"] == 0

    @property
    def writes(self) -> bool:
        """Whether this process writes the run's files (one process does, and only with --out)."""
        return self.out is not None and self.is_main


@dataclass
class _Progress:
    """Where a run stands: restored from a checkpoint or fresh, advanced epoch by epoch."""

    history: list[dict[str, Any]] = field(default_factory=list)
    start_epoch: int = 0
    elapsed: float = 0.0  # training seconds over all epochs, resumed ones included
    num_updates: int = 0
    status: str = "complete"
    reason: str | None = None

    def end(self, status: str, reason: str) -> None:
        self.status, self.reason = status, reason


def run_train(
    cfg: TrainConfig,
    *,
    out_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    callbacks: Sequence[Callback] = (),
    final: bool = False,
    evaluate_test: bool = True,
    verbose: bool = True,
    epochs: int | None = None,
) -> TrainResult:
    """Train one configuration; write ``metrics.jsonl``, ``summary.json`` and a checkpoint.

    ``final=True`` trains on train + validation and reports only the test set. ``epochs``
    overrides ``cfg.train.epochs`` (the final stage and budget matching use it). A non-finite loss
    ends the run with status ``diverged``; a callback asking to stop ends it with ``stopped``.
    """
    cfg = with_epochs(cfg, epochs)
    out = Path(out_dir) if out_dir is not None else None
    check_out_dir(out, resume)
    run = _set_up(cfg, out, final)
    progress = _start(run, resume)
    run_info = _run_info(run, progress.start_epoch)
    cbs = CallbackList(callbacks if run.is_main else ())
    cbs.on_train_start(cfg.to_dict(), run_info)
    if progress.history:
        cbs.on_resume(progress.history)
    remaining = cfg.train.epochs - progress.start_epoch
    console = _Console(verbose and run.is_main, remaining, run.updates_per_epoch)
    try:
        _run_epochs(run, progress, cbs, console)
    finally:
        console.close()
    summary = _summary(run, progress, run_info, evaluate_test)
    if run.writes:
        atomic_write(out / SUMMARY, json.dumps(summary, indent=2) + "\n")
    cbs.on_train_end(summary)
    result = TrainResult(progress.status, summary, progress.history, progress.reason, run.model)
    if run.dist is not None:
        torch.distributed.barrier()
    return result


# ----------------------------------------------------------------------------- set-up


def _set_up(cfg: TrainConfig, out: Path | None, final: bool) -> _Run:
    """Device, data, model, optimizer and schedule; the seed is set before data and weights."""
    device = resolve_device(cfg.train.device)
    amp = resolve_amp(cfg.train.amp, device)
    dist = _distributed(device)
    if dist is not None:
        device = dist["device"]
    torch.manual_seed(cfg.train.seed)
    channels_last = (
        device.type == "cuda" if cfg.train.channels_last == "auto" else cfg.train.channels_last
    )
    data = _build_data(cfg, device, final, channels_last)
    model = _build_model(cfg, data.info, device, channels_last)
    optimizer = build_optimizer(model, cfg)
    updates_per_epoch = len(data.train)
    if updates_per_epoch == 0:
        raise UserError(
            f"train.batch_size {cfg.train.batch_size} exceeds the {data.train.num_samples} "
            "training images: no full batch to train on"
        )
    scheduler = build_scheduler(optimizer, cfg, updates_per_epoch)
    scaler = torch.amp.GradScaler(device.type) if amp == torch.float16 else None
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing)
    rho, micro_batches = _sharpness_args(cfg)
    if dist is not None:
        micro_batches = _micro_batches_per_process(micro_batches, dist["world"])
    return _Run(
        cfg=cfg,
        out=out,
        device=device,
        amp=amp,
        dist=dist,
        data=data,
        model=model,
        net=_gradient_net(model, cfg, dist, device),
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        loss_fn=loss_fn,
        rho=rho,
        micro_batches=micro_batches,
        updates_per_epoch=updates_per_epoch,
    )


def _build_data(cfg: TrainConfig, device: torch.device, final: bool, channels_last: bool):
    from msam.data import build_data

    return build_data(
        cfg.data.dataset,
        root=cfg.data.root,
        val_fraction=cfg.data.val_fraction,
        subset=cfg.data.subset,
        augment=cfg.data.augment,
        batch_size=cfg.train.batch_size,
        eval_batch_size=cfg.train.eval_batch_size,
        seed=cfg.train.seed,
        split_seed=cfg.data.split_seed,
        device=device,
        final=final,
        channels_last=channels_last,
        synthetic=cfg.data.synthetic.model_dump() if cfg.data.synthetic else None,
        img_size=cfg.data.img_size,
    )


def _build_model(cfg: TrainConfig, info, device: torch.device, channels_last: bool) -> nn.Module:
    from msam.models import model_for

    model = model_for(cfg.model, info).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _micro_batches_per_process(micro_batches: int, world: int) -> int:
    """Each of ``world`` processes perturbs with its own share of the m micro-batches."""
    if micro_batches % world and micro_batches > 1:
        raise UserError(
            f"optim.micro_batches {micro_batches} must be a multiple of the {world} processes"
        )
    return max(1, micro_batches // world)


def _gradient_net(
    model: nn.Module, cfg: TrainConfig, dist: dict[str, Any] | None, device: torch.device
) -> nn.Module:
    net: nn.Module = model
    if cfg.train.compile:
        net = torch.compile(model)
    if dist is not None:
        net = nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None
        )
    return net


def _start(run: _Run, resume: bool) -> _Progress:
    """A fresh start, or the state of the checkpoint being resumed; rewrites ``metrics.jsonl``
    to the epochs the run starts from."""
    progress = _Progress()
    if run.writes:
        run.out.mkdir(parents=True, exist_ok=True)
    if resume and run.out is not None:
        _resume(run, run.out / CHECKPOINT, progress)
    progress.num_updates = progress.start_epoch * run.updates_per_epoch
    if run.writes:
        atomic_write(run.out / METRICS, "".join(json.dumps(h) + "\n" for h in progress.history))
    return progress


def _resume(run: _Run, ckpt_path: Path, progress: _Progress) -> None:
    """Load model, optimizer, schedule, loss scale and RNG from a checkpoint written for the same
    config (another config's is refused); a missing or unreadable one means starting over."""
    state = load_checkpoint(ckpt_path)
    if state is None:
        return
    mismatch = checkpoint_mismatch(state, run.cfg)
    if mismatch is not None:
        raise UserError(
            f"{ckpt_path} was written for another config ({mismatch}); resume with the "
            "config it was trained with, or choose another --out"
        )
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    if run.scaler is not None and state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"])
    progress.history = [json.loads(line) for line in state["history"]]
    progress.start_epoch = int(state["epoch"])
    progress.elapsed = float(state.get("elapsed", 0.0))


def _run_info(run: _Run, start_epoch: int) -> dict[str, Any]:
    """What the run is, beside its config: logged at the start and repeated in the summary."""
    return {
        "device": str(run.device),
        "amp": str(run.amp).replace("torch.", "") if run.amp else "none",
        "parameters": sum(p.numel() for p in run.model.parameters()),
        "updates_per_epoch": run.updates_per_epoch,
        "train_images": run.data.train.num_samples,
        "grad_evals_per_update": grad_evals_per_update(run.cfg),
        "start_epoch": start_epoch,
        "versions": versions(),
    }


# ----------------------------------------------------------------------------- epochs


def _run_epochs(run: _Run, progress: _Progress, cbs: CallbackList, console: _Console) -> None:
    """Train the remaining epochs; sets ``progress.status`` when a run diverges or is stopped."""
    for epoch in range(progress.start_epoch, run.cfg.train.epochs):
        meter, seconds = _train_epoch(run, epoch, progress, console)
        metrics = _epoch_metrics(run, epoch, meter, seconds)
        if metrics is None:  # a non-finite training loss: nothing of the epoch is kept
            progress.end("diverged", f"diverged at epoch {epoch + 1} (non-finite loss)")
            break
        if metrics["val_loss"] is not None and not math.isfinite(metrics["val_loss"]):
            # the epoch is recorded (and checkpointed) before the run ends
            progress.end("diverged", f"diverged at epoch {epoch + 1} (non-finite loss)")
        progress.elapsed += seconds
        progress.history.append(metrics)
        console.epoch(metrics)
        if run.writes:
            _record_epoch(run, progress, metrics, epoch)
        if progress.status == "diverged":
            break
        stop = cbs.on_epoch_end(epoch + 1, metrics)
        if stop:
            progress.end(
                "stopped", stop if isinstance(stop, str) else f"stopped after epoch {epoch + 1}"
            )
            break


def _train_epoch(
    run: _Run, epoch: int, progress: _Progress, console: _Console
) -> tuple[_Meter, float]:
    """One pass over the training set; ends early once the running loss is non-finite."""
    run.model.train()
    run.data.train.set_epoch(epoch)
    meter = _Meter(run.device)
    t0 = time.perf_counter()
    for step, (x, y) in enumerate(run.data.train):
        if run.dist is not None:
            world, rank = run.dist["world"], run.dist["rank"]
            x, y = x.chunk(world)[rank], y.chunk(world)[rank]
        loss = _update(run, x, y, meter)
        progress.num_updates += 1
        run.scheduler.step_update(progress.num_updates)
        meter.add_loss(loss, y.shape[0])
        console.advance(f"epoch {epoch + 1}/{run.cfg.train.epochs}")
        if (step + 1) % DIVERGENCE_CHECK_EVERY == 0 and not torch.isfinite(meter.loss):
            break
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)
    return meter, time.perf_counter() - t0


def _update(run: _Run, x: torch.Tensor, y: torch.Tensor, meter: _Meter) -> torch.Tensor:
    """The (m)SAM gradient of one mini-batch, clipped if asked, and the base optimizer's step."""
    cfg, scaler, optimizer = run.cfg, run.scaler, run.optimizer
    with _autocast(run.device, run.amp):
        loss = backward(
            run.net,
            run.loss_fn,
            x,
            y,
            rho=run.rho,
            micro_batches=run.micro_batches,
            adaptive=cfg.optim.adaptive,
            strategy=cfg.optim.strategy,
            scaler=scaler,
            on_outputs=meter.add_outputs,
        )
    if cfg.train.grad_clip is not None:
        if scaler is not None:
            scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(run.model.parameters(), cfg.train.grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return loss


def _epoch_metrics(run: _Run, epoch: int, meter: _Meter, seconds: float) -> dict[str, Any] | None:
    """One line of ``metrics.jsonl``, validation included; None when the training loss is not
    finite (the run diverged, nothing of the epoch is kept)."""
    train_loss, train_acc = meter.result()
    lr = run.optimizer.param_groups[0]["lr"]
    if not math.isfinite(train_loss):
        return None
    metrics: dict[str, Any] = {
        "epoch": epoch + 1,
        "train_loss": train_loss,
        "train_acc": train_acc,
        "val_loss": None,
        "val_acc": None,
        "lr": lr,
        "seconds": seconds,
        "images_per_s": meter.count * (run.dist["world"] if run.dist else 1) / seconds,
    }
    if run.data.val is not None:
        metrics["val_loss"], metrics["val_acc"] = evaluate(
            run.model, run.data.val, run.amp, run.device
        )
    return metrics


# ----------------------------------------------------------------------------- files and summary


def _record_epoch(run: _Run, progress: _Progress, metrics: dict[str, Any], epoch: int) -> None:
    """Append the epoch to ``metrics.jsonl`` and, if enabled, replace the checkpoint."""
    append_text(run.out / METRICS, json.dumps(metrics) + "\n")
    if run.cfg.train.checkpoint:
        _save_checkpoint(run.out / CHECKPOINT, _checkpoint_state(run, progress, epoch + 1))


def _checkpoint_state(run: _Run, progress: _Progress, epochs_done: int) -> dict[str, Any]:
    """Everything a resume needs, and the config it must agree with."""
    return {
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict() if run.scaler is not None else None,
        "rng": torch.get_rng_state(),
        "history": [json.dumps(h) for h in progress.history],
        "epoch": epochs_done,
        "elapsed": progress.elapsed,
        "config": json.dumps(_identity(run.cfg)),
    }


def _summary(
    run: _Run, progress: _Progress, run_info: dict[str, Any], evaluate_test: bool
) -> dict[str, Any]:
    """``summary.json``: the outcome, the last epoch's metrics, cost, and the test set's result
    (measured only for a complete run, and only if asked)."""
    history = progress.history
    last = history[-1] if history else {}
    summary: dict[str, Any] = {
        "name": run.cfg.name,
        "status": progress.status,
        "reason": progress.reason,
        "optimizer": run.cfg.optim.name,
        "epochs_completed": len(history),
        "train_loss": last.get("train_loss"),
        "train_acc": last.get("train_acc"),
        "val_acc": last.get("val_acc"),
        "val_loss": last.get("val_loss"),
        "best_val_acc": max(
            (h["val_acc"] for h in history if h["val_acc"] is not None), default=None
        ),
        "test_acc": None,
        "test_loss": None,
        "seconds": progress.elapsed,
        "images_per_s": (
            sum(h["images_per_s"] for h in history) / len(history) if history else None
        ),
        **run_info,
    }
    if progress.status == "complete" and evaluate_test:
        summary["test_loss"], summary["test_acc"] = evaluate(
            run.model, run.data.test, run.amp, run.device
        )
    return summary


def _distributed(device: torch.device) -> dict[str, Any] | None:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    import torch.distributed as tdist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not tdist.is_initialized():
        tdist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return {"rank": rank, "world": world, "device": device}
