"""The trainer every ``msam train``, sweep trial and final run executes.

SGD, SAM (Foret et al., 2021) and mSAM (Behdin et al., 2023) share one loop: the gradient comes from
:func:`msam.backward` (rho = 0 and one micro-batch for SGD, one micro-batch for SAM), the base
optimizer is timm's ``create_optimizer_v2`` (no weight decay on norms and biases), the schedule is
timm's, stepped per update. The same seed gives the same initial weights and the same batches for
every optimizer, so runs are paired. Progress reaches the outside world only through callbacks.
"""

from __future__ import annotations

import contextlib
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
from msam.optim import grad_evals_per_update as optim_grad_evals

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
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


def _atomic_write(path: Path, data: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(data)
    os.replace(tmp, path)


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


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
    from msam.data import build_data
    from msam.models import create_model

    cfg = with_epochs(cfg, epochs)
    out = Path(out_dir) if out_dir is not None else None
    check_out_dir(out, resume)
    device = resolve_device(cfg.train.device)
    amp = resolve_amp(cfg.train.amp, device)
    dist = _distributed(device)
    if dist is not None:
        device = dist["device"]
    is_main = dist is None or dist["rank"] == 0

    torch.manual_seed(cfg.train.seed)
    channels_last = (
        device.type == "cuda" if cfg.train.channels_last == "auto" else cfg.train.channels_last
    )
    data = build_data(
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
    info = data.info
    model = create_model(
        cfg.model.name,
        num_classes=info.num_classes,
        in_chans=info.in_chans,
        img_size=info.img_size,
        small_input=cfg.model.small_input,
        kwargs=cfg.model.kwargs,
    ).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
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
        world = dist["world"]
        if micro_batches % world and micro_batches > 1:
            raise UserError(
                f"optim.micro_batches {micro_batches} must be a multiple of the {world} processes"
            )
        micro_batches = max(1, micro_batches // world)
    net: nn.Module = model
    if cfg.train.compile:
        net = torch.compile(model)
    if dist is not None:
        net = nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None
        )

    history: list[dict[str, Any]] = []
    start_epoch = 0
    elapsed = 0.0
    ckpt_path = out / CHECKPOINT if out is not None else None
    if out is not None and is_main:
        out.mkdir(parents=True, exist_ok=True)
    if resume and ckpt_path is not None:
        state = load_checkpoint(ckpt_path)
        mismatch = checkpoint_mismatch(state, cfg) if state is not None else None
        if mismatch is not None:
            raise UserError(
                f"{ckpt_path} was written for another config ({mismatch}); resume with the "
                "config it was trained with, or choose another --out"
            )
        if state is not None:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if scaler is not None and state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            torch.set_rng_state(state["rng"])
            history = [json.loads(line) for line in state["history"]]
            start_epoch = int(state["epoch"])
            elapsed = float(state.get("elapsed", 0.0))
    if out is not None and is_main:
        _atomic_write(out / METRICS, "".join(json.dumps(h) + "\n" for h in history))

    n_params = sum(p.numel() for p in model.parameters())
    run_info = {
        "device": str(device),
        "amp": str(amp).replace("torch.", "") if amp else "none",
        "parameters": n_params,
        "updates_per_epoch": updates_per_epoch,
        "train_images": data.train.num_samples,
        "grad_evals_per_update": grad_evals_per_update(cfg),
        "start_epoch": start_epoch,
        "versions": versions(),
    }
    cbs = CallbackList(callbacks if is_main else ())
    cbs.on_train_start(cfg.to_dict(), run_info)
    if history:
        cbs.on_resume(history)
    console = _Console(verbose and is_main, cfg.train.epochs - start_epoch, updates_per_epoch)

    status, reason = "complete", None
    num_updates = start_epoch * updates_per_epoch
    try:
        for epoch in range(start_epoch, cfg.train.epochs):
            model.train()
            data.train.set_epoch(epoch)
            meter = _Meter(device)
            t0 = time.perf_counter()
            for step, (x, y) in enumerate(data.train):
                if dist is not None:
                    x, y = (
                        x.chunk(dist["world"])[dist["rank"]],
                        y.chunk(dist["world"])[dist["rank"]],
                    )
                with _autocast(device, amp):
                    loss = backward(
                        net,
                        loss_fn,
                        x,
                        y,
                        rho=rho,
                        micro_batches=micro_batches,
                        adaptive=cfg.optim.adaptive,
                        strategy=cfg.optim.strategy,
                        scaler=scaler,
                        on_outputs=meter.add_outputs,
                    )
                if cfg.train.grad_clip is not None:
                    if scaler is not None:
                        scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                num_updates += 1
                scheduler.step_update(num_updates)
                meter.add_loss(loss, y.shape[0])
                console.advance(f"epoch {epoch + 1}/{cfg.train.epochs}")
                if (step + 1) % DIVERGENCE_CHECK_EVERY == 0 and not torch.isfinite(meter.loss):
                    break
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - t0
            train_loss, train_acc = meter.result()
            lr = optimizer.param_groups[0]["lr"]
            if not math.isfinite(train_loss):
                status, reason = "diverged", f"diverged at epoch {epoch + 1} (non-finite loss)"
                break
            metrics: dict[str, Any] = {
                "epoch": epoch + 1,
                "train_loss": train_loss,
                "train_acc": train_acc,
                "val_loss": None,
                "val_acc": None,
                "lr": lr,
                "seconds": seconds,
                "images_per_s": meter.count * (dist["world"] if dist else 1) / seconds,
            }
            if data.val is not None:
                metrics["val_loss"], metrics["val_acc"] = evaluate(model, data.val, amp, device)
                if not math.isfinite(metrics["val_loss"]):
                    status, reason = "diverged", f"diverged at epoch {epoch + 1} (non-finite loss)"
            elapsed += seconds
            history.append(metrics)
            console.epoch(metrics)
            if out is not None and is_main:
                with open(out / METRICS, "a") as fh:
                    fh.write(json.dumps(metrics) + "\n")
                if cfg.train.checkpoint:
                    _save_checkpoint(
                        ckpt_path,
                        {
                            "model": model.state_dict(),
                            "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(),
                            "scaler": scaler.state_dict() if scaler is not None else None,
                            "rng": torch.get_rng_state(),
                            "history": [json.dumps(h) for h in history],
                            "epoch": epoch + 1,
                            "elapsed": elapsed,
                            "config": json.dumps(_identity(cfg)),
                        },
                    )
            if status == "diverged":
                break
            stop = cbs.on_epoch_end(epoch + 1, metrics)
            if stop:
                status = "stopped"
                reason = stop if isinstance(stop, str) else f"stopped after epoch {epoch + 1}"
                break
    finally:
        console.close()

    summary: dict[str, Any] = {
        "name": cfg.name,
        "status": status,
        "reason": reason,
        "optimizer": cfg.optim.name,
        "epochs_completed": len(history),
        "train_loss": history[-1]["train_loss"] if history else None,
        "train_acc": history[-1]["train_acc"] if history else None,
        "val_acc": history[-1]["val_acc"] if history else None,
        "val_loss": history[-1]["val_loss"] if history else None,
        "best_val_acc": max(
            (h["val_acc"] for h in history if h["val_acc"] is not None), default=None
        ),
        "test_acc": None,
        "test_loss": None,
        "seconds": elapsed,
        "images_per_s": (
            sum(h["images_per_s"] for h in history) / len(history) if history else None
        ),
        **run_info,
    }
    if status == "complete" and evaluate_test:
        summary["test_loss"], summary["test_acc"] = evaluate(model, data.test, amp, device)
    if out is not None and is_main:
        _atomic_write(out / SUMMARY, json.dumps(summary, indent=2) + "\n")
    cbs.on_train_end(summary)
    result = TrainResult(status, summary, history, reason, model)
    if dist is not None:
        torch.distributed.barrier()
    return result


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
