"""The final stage: the best tuned configurations re-run over seeds and scored once on test.

Tuning picks hyperparameters on a validation split; the final stage measures how good they are.
For each optimizer the ``final.top_k`` best COMPLETE trials (by validation accuracy, one per
distinct configuration) are retrained with ``train.seed = k`` for ``k in range(final.seeds)`` on
the training set including the validation part, then evaluated on the test set once. Seed ``k``
gives every optimizer the same initial weights and the same batches, so SGD, SAM (Foret et al.,
2021) and mSAM (Behdin et al., 2023) runs pair by seed (see ``sweeps.results.stats``).

Each final model is also measured for flatness on one fixed, unaugmented sample of the training
data, the same for every run (``msam.flatness``): the top Hessian eigenvalue, the Hessian trace and
SAM's sharpness ``L(w + eps) - L(w)``. SAM and mSAM models are measured at their own rho; SGD
models at ``base.optim.rho`` of the spec (0.05 unless set), since SGD has no rho of its own.

Layout: ``finals/<opt>/seed<k>/`` for each optimizer's best configuration and
``finals/<opt>-top<r>/seed<k>/`` for its r-th best (``top_k > 1``). Each folder holds
``final.json`` (which trial, parameters, seed and epochs it stands for), the trainer's
``metrics.jsonl`` and ``checkpoint.pt``, and ``summary.json`` with ``flatness`` and ``final`` keys
added. The stage is resumable: a final whose summary says complete (or diverged, which a rerun
would only repeat) is skipped; an interrupted one resumes from its checkpoint; one that failed
(out of memory, an error) is recorded as ``failed`` with its reason and ``error.txt``, the other
finals go on, and a rerun retries it; a final left over from a different trial (tuning went on and
found a better one) is moved to ``finals/.stale/``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import shutil
import sys
import time
import traceback
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from msam.callbacks import Callback
from msam.errors import UserError
from sweeps.faults import failure_reason, release_memory
from sweeps.results.read import (
    FINAL_JOB,
    FINALS_DIR,
    FinalRecord,
    final_dir,
    final_label,
    load_study,
    open_results_storage,
    read_json,
)

__all__ = [
    "FlatnessSettings",
    "FinalJob",
    "final_epochs",
    "flatness_rho",
    "flatness_sample",
    "plan_finals",
    "run_finals",
]

SUMMARY = "summary.json"
CHECKPOINT = "checkpoint.pt"
#: Outcomes a rerun skips: complete, and diverged (deterministic, so a rerun would diverge again).
DONE_STATES = ("complete", "diverged")


@dataclass(frozen=True)
class FlatnessSettings:
    """How hard to look at each final model's curvature; small values suit CPU tests."""

    n_images: int = 512  # fixed, unaugmented training images measured (0 = no flatness metrics)
    batch_size: int = 256  # images per Hessian-vector-product batch (memory, not the result)
    iters: int = 20  # power-iteration steps (Hessian-vector products) for the top eigenvalue
    samples: int = 10  # Rademacher vectors of Hutchinson's trace estimate
    seed: int = 0  # picks the sample of images and the random vectors; same for every run

    @classmethod
    def from_sources(cls, spec: Any = None, args: Any = None) -> FlatnessSettings:
        """Defaults, then ``spec.final.flatness`` (if the spec has one), then ``args``
        attributes ``flatness_images``, ``flatness_iters``, ``flatness_samples``."""
        values: dict[str, Any] = {}
        section = getattr(getattr(spec, "final", None), "flatness", None)
        if section is not None:
            raw = section.model_dump() if hasattr(section, "model_dump") else dict(section)
            values.update({k: v for k, v in raw.items() if k in cls.__dataclass_fields__})
        for attr, key in (
            ("flatness_images", "n_images"),
            ("flatness_batch_size", "batch_size"),
            ("flatness_iters", "iters"),
            ("flatness_samples", "samples"),
            ("flatness_seed", "seed"),
        ):
            value = getattr(args, attr, None)
            if value is not None:
                values[key] = int(value)
        return cls(**values)

    @property
    def enabled(self) -> bool:
        return self.n_images > 0


@dataclass
class FinalJob:
    """One final run to do: a ranked configuration of one optimizer under one seed."""

    optimizer: str
    rank: int
    seed: int
    trial: int
    value: float
    params: dict[str, Any]
    epochs: int
    study: str
    dir: Path
    cfg: Any  # TrainConfig

    def identity(self) -> dict[str, Any]:
        """What makes a result on disk this job's: written as final.json before training."""
        return {
            "study": self.study,
            "optimizer": self.optimizer,
            "rank": self.rank,
            "trial": self.trial,
            "val_acc": self.value,
            "params": self.params,
            "seed": self.seed,
            "epochs": self.epochs,
        }


def final_epochs(spec: Any, cfg: Any) -> int:
    """Epochs of a final run: ``final.epochs`` or the base's; with ``budget.match: grad_evals``
    runs costing one gradient evaluation per update (SGD) get twice the epochs when the sweep
    also has SAM/mSAM, so every optimizer spends the same number of gradient evaluations."""
    from msam.trainer import grad_evals_per_update

    epochs = spec.final.epochs or spec.base.train.epochs
    if spec.budget.match == "grad_evals":
        most = max(1 if name == "sgd" else 2 for name in spec.optimizers)
        epochs = epochs * most // grad_evals_per_update(cfg)
    return int(epochs)


def flatness_rho(spec: Any, cfg: Any) -> float:
    """Radius of SAM sharpness: the run's own rho; for SGD the spec's ``base.optim.rho``."""
    if cfg.optim.name == "sgd" or cfg.optim.rho == 0:
        return float(spec.base.optim.rho)
    return float(cfg.optim.rho)


def plan_finals(spec: Any, storage: Any, run_dir: str | Path) -> list[FinalJob]:
    """Every final the spec asks for, seed-major: seed 0 of all optimizers comes first, so an
    interrupted stage still leaves complete pairs to compare."""
    per_optimizer: dict[str, list[Any]] = {}
    for optimizer in spec.optimizers:
        study = load_study(storage, spec.name, optimizer) if storage is not None else None
        ranked = study.ranked(spec.final.top_k) if study is not None else []
        if not ranked:
            warnings.warn(
                f"no complete trial in study {spec.name}/{optimizer}: no final runs for "
                f"{optimizer}",
                stacklevel=2,
            )
        per_optimizer[optimizer] = ranked
    jobs = []
    for seed in range(spec.final.seeds):
        for rank in range(1, spec.final.top_k + 1):
            for optimizer, ranked in per_optimizer.items():
                if rank > len(ranked):
                    continue
                trial = ranked[rank - 1]
                base = spec.train_config(optimizer, {**trial.params, "train.seed": seed})
                epochs = final_epochs(spec, base)
                cfg = spec.train_config(
                    optimizer, {**trial.params, "train.seed": seed, "train.epochs": epochs}
                )
                jobs.append(
                    FinalJob(
                        optimizer=optimizer,
                        rank=rank,
                        seed=seed,
                        trial=trial.number,
                        value=float(trial.value),
                        params=dict(trial.params),
                        epochs=epochs,
                        study=f"{spec.name}/{optimizer}",
                        dir=final_dir(run_dir, optimizer, rank, seed),
                        cfg=cfg,
                    )
                )
    return jobs


# ----------------------------------------------------------------------------- flatness


def flatness_sample(cfg: Any, settings: FlatnessSettings) -> list[tuple[Any, Any]]:
    """The fixed sample every final model is measured on: ``settings.n_images`` images of the
    final training set (train + validation), chosen by ``settings.seed``, never augmented.

    It depends only on the data config and the settings, so all runs of a sweep share it.
    """
    import torch

    from msam.data import DeviceLoader, build_data
    from msam.flatness import fixed_sample

    data = build_data(
        cfg.data.dataset,
        root=cfg.data.root,
        val_fraction=cfg.data.val_fraction,
        subset=cfg.data.subset,
        augment=False,
        batch_size=1,
        seed=settings.seed,
        split_seed=cfg.data.split_seed,
        device="cpu",
        final=True,
        synthetic=cfg.data.synthetic.model_dump() if cfg.data.synthetic else None,
        img_size=cfg.data.img_size,
    )
    train = data.train
    if isinstance(train, DeviceLoader):
        gen = torch.Generator().manual_seed(settings.seed)
        n = min(settings.n_images, train.num_samples)
        idx = torch.randperm(train.num_samples, generator=gen)[:n].sort().values
        view = DeviceLoader(
            train.images[idx],
            train.labels[idx],
            settings.batch_size,
            mean=data.info.mean,
            std=data.info.std,
        )
        return list(view)
    return fixed_sample(train, settings.n_images, settings.seed, batch_size=settings.batch_size)


def measure_flatness(
    model: Any, batches: Sequence[Any], cfg: Any, spec: Any, settings: FlatnessSettings
) -> dict[str, Any]:
    """``msam.flatness.flatness_report`` of one final model, with the seconds it took."""
    from torch import nn

    from msam.flatness import flatness_report

    start = time.perf_counter()
    report = flatness_report(
        model,
        nn.CrossEntropyLoss(),
        batches,
        rho=flatness_rho(spec, cfg),
        iters=settings.iters,
        samples=settings.samples,
        seed=settings.seed,
        adaptive=cfg.optim.adaptive,
    )
    report["iters"] = settings.iters
    report["samples"] = settings.samples
    report["seconds"] = time.perf_counter() - start
    return report


def _model_from_checkpoint(cfg: Any, folder: Path) -> Any | None:
    """The trained model of a finished final, rebuilt from its last checkpoint (None if absent):
    lets a rerun add flatness metrics that a crash after training left out."""
    from msam.data import dataset_info
    from msam.models import create_model
    from msam.trainer import load_checkpoint, resolve_device

    state = load_checkpoint(folder / CHECKPOINT)
    if state is None:
        return None
    info = dataset_info(
        cfg.data.dataset,
        cfg.data.root,
        synthetic=cfg.data.synthetic.model_dump() if cfg.data.synthetic else None,
        img_size=cfg.data.img_size,
    )
    model = create_model(
        cfg.model.name,
        num_classes=info.num_classes,
        in_chans=info.in_chans,
        img_size=info.img_size,
        small_input=cfg.model.small_input,
        kwargs=cfg.model.kwargs,
    )
    model.load_state_dict(state["model"])
    return model.to(resolve_device(cfg.train.device))


# ----------------------------------------------------------------------------- W&B


class _Guarded(Callback):
    """Runs a tracking callback so that its trouble is a warning, never a failed final; holds its
    ``on_train_end`` back until the flatness metrics are known, so they reach the same run."""

    def __init__(self, inner: Callback, what: str) -> None:
        self.inner = inner
        self.what = what
        self.broken = False

    def _call(self, hook: str, *args: Any) -> Any:
        if self.broken:
            return None
        try:
            return getattr(self.inner, hook)(*args)
        except Exception as exc:  # W&B has many ways to fail; none should stop a final
            self.broken = True
            warnings.warn(f"W&B logging of {self.what} stopped: {exc}", stacklevel=3)
            return None

    def on_train_start(self, config: Mapping[str, Any], info: Mapping[str, Any]) -> None:
        self._call("on_train_start", config, info)

    def on_epoch_end(self, epoch: int, metrics: Mapping[str, Any]) -> bool | str | None:
        self._call("on_epoch_end", epoch, metrics)
        return None  # tracking never stops a final

    def on_train_end(self, summary: Mapping[str, Any]) -> None:
        """Held back: see ``finish``."""

    def finish(self, summary: Mapping[str, Any]) -> None:
        self._call("on_train_end", summary)


def _construct(factory: Any, cfg: Any, **wanted: Any) -> Any:
    """Call ``factory`` with the train config and those of ``wanted`` it accepts."""
    params = inspect.signature(factory).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs = {k: v for k, v in wanted.items() if takes_any or k in params}
    for key in ("config", "cfg", "train_config"):
        if key in params:
            return factory(**{key: cfg}, **kwargs)
    return factory(cfg, **kwargs)


def final_tracker(job: FinalJob, spec: Any, run_dir: Path) -> _Guarded | None:
    """A W&B run (``job_type=final``, ``group=<name>``) for one final, through
    ``sweeps.tracking.WandbCallback.from_train_config``; None when tracking is disabled."""
    if job.cfg.tracking.wandb.mode == "disabled":
        return None
    try:
        from sweeps.tracking.wandb_runs import WandbCallback
    except ImportError:
        return None
    name = f"{spec.name}-{final_label(job.optimizer, job.rank)}-seed{job.seed}"
    wb = job.cfg.tracking.wandb
    factory = getattr(WandbCallback, "from_train_config", WandbCallback)
    try:
        inner = _construct(
            factory,
            job.cfg,
            job_type="final",
            name=name,
            group=spec.name,
            tags=["final", job.optimizer, f"seed{job.seed}", *wb.tags],
            dir=run_dir,
            extra_config={"sweep": spec.name, "final": job.identity()},
        )
    except Exception as exc:
        warnings.warn(f"no W&B run for final {name}: {exc}", stacklevel=2)
        return None
    return _Guarded(inner, f"final {name}")


# ----------------------------------------------------------------------------- running


def _atomic_write_json(path: Path, data: Mapping[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _same_job(on_disk: Mapping[str, Any] | None, job: FinalJob) -> bool:
    if on_disk is None:
        return True  # nothing recorded yet: the folder is this job's to fill
    mine = json.loads(json.dumps(job.identity()))  # compare as stored (JSON types)
    keys = ("study", "trial", "params", "seed", "epochs")
    return all(on_disk.get(k) == mine.get(k) for k in keys)


def _retire(folder: Path, run_dir: Path, job: FinalJob, trial: Any) -> None:
    """Move a final that belongs to another trial out of the way, keeping it for inspection."""
    stale_root = run_dir / FINALS_DIR / ".stale"
    rel = folder.relative_to(run_dir / FINALS_DIR)
    target = stale_root / rel.parent / f"{rel.name}-trial{trial}"
    n = 1
    while target.exists():
        n += 1
        target = stale_root / rel.parent / f"{rel.name}-trial{trial}-{n}"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(folder), str(target))
    warnings.warn(
        f"{folder} held a final of trial {trial}, but rank {job.rank} of {job.study} is now "
        f"trial {job.trial}; moved the old one to {target}",
        stacklevel=3,
    )


def run_final(
    job: FinalJob,
    spec: Any,
    run_dir: Path,
    sample: list[Any] | None,
    settings: FlatnessSettings,
    *,
    verbose: bool = True,
) -> FinalRecord:
    """Train (or resume, or skip) one final and add its flatness metrics to summary.json."""
    from msam.trainer import run_train

    folder = job.dir
    identity = job.identity()

    def record(summary: dict[str, Any], outcome: str) -> FinalRecord:
        return FinalRecord(
            job.optimizer, job.rank, job.seed, folder, summary, identity, outcome=outcome
        )

    recorded = read_json(folder / FINAL_JOB)
    if folder.exists() and not _same_job(recorded, job):
        _retire(folder, run_dir, job, (recorded or {}).get("trial"))
    summary = read_json(folder / SUMMARY)
    wants_flatness = settings.enabled and sample is not None
    resume = (folder / CHECKPOINT).exists() or (folder / "metrics.jsonl").exists()
    if summary is not None and summary.get("status") in DONE_STATES:
        if summary["status"] == "diverged" or not wants_flatness or "flatness" in summary:
            return record(summary, "skipped")
        model = _model_from_checkpoint(job.cfg, folder)  # trained, but flatness never written
        if model is not None:
            summary["flatness"] = measure_flatness(model, sample, job.cfg, spec, settings)
            summary["final"] = identity
            _atomic_write_json(folder / SUMMARY, summary)
            return record(summary, "flatness added")
        for name in (SUMMARY, "metrics.jsonl", CHECKPOINT):  # its model is gone: train again
            (folder / name).unlink(missing_ok=True)
        resume = False
    folder.mkdir(parents=True, exist_ok=True)
    _atomic_write_json(folder / FINAL_JOB, identity)
    tracker = final_tracker(job, spec, run_dir)
    failure: str | None = None
    try:
        result = run_train(
            job.cfg,
            out_dir=folder,
            resume=resume,
            callbacks=[tracker] if tracker is not None else [],
            final=True,
            verbose=verbose,
        )
    except UserError:
        if tracker is not None:
            tracker.finish({"status": "failed"})
        raise
    except Exception as exc:  # this final failed (out of memory, a bug): record it, go on
        failure = failure_reason(exc)
        (folder / "error.txt").write_text(traceback.format_exc())
        if tracker is not None:
            tracker.finish({"status": "failed", "reason": failure})
    except BaseException:  # interrupted: close its W&B run, then let it propagate
        if tracker is not None:
            tracker.finish({"status": "failed", "reason": "interrupted"})
        raise
    if failure is not None:  # out of the except block: the traceback's frames are unreachable
        release_memory()
        summary = {"name": job.cfg.name, "status": "failed", "reason": failure, "final": identity}
        _atomic_write_json(folder / SUMMARY, summary)  # not a done state: a rerun retries it
        return record(summary, "failed")
    summary = dict(result.summary)
    if result.status == "complete" and wants_flatness:
        summary["flatness"] = measure_flatness(result.model, sample, job.cfg, spec, settings)
    summary["final"] = identity
    _atomic_write_json(folder / SUMMARY, summary)
    if tracker is not None:
        tracker.finish(summary)
    return record(summary, "trained")


def _announce(record: FinalRecord, verbose: bool) -> None:
    if not verbose:
        return
    s = record.summary
    acc = s.get("test_acc")
    acc_text = f"test_acc {acc:.4f}" if isinstance(acc, float) and math.isfinite(acc) else "-"
    if record.outcome == "failed":
        print(
            f"final {record.label} seed{record.seed} (trial {record.trial}) failed: "
            f"{s.get('reason')}; see {record.dir}/error.txt, rerun the same command to retry it",
            file=sys.stderr,
            flush=True,
        )
        return
    done = " (done before)" if record.outcome == "skipped" else ""
    print(
        f"final {record.label} seed{record.seed} (trial {record.trial}): {record.status}{done}, "
        f"{acc_text}, {s.get('seconds', 0.0):.1f} s -> {record.dir}",
        file=sys.stderr,
        flush=True,
    )


def run_finals(
    spec: Any,
    args: argparse.Namespace | None = None,
    storage: Any = None,
    *,
    flatness: FlatnessSettings | None = None,
    verbose: bool | None = None,
) -> list[FinalRecord]:
    """Run (or finish) the final stage of a sweep; returns its records, each with its
    ``outcome`` (trained, skipped, flatness added).

    ``args.out`` is the run folder (default ``runs/<name>``). ``storage`` is the sweep's open
    Optuna storage, a URL or journal path, or None: then ``args.storage``, else
    ``<out>/optuna.journal``. ``flatness`` defaults to :meth:`FlatnessSettings.from_sources`.
    ``final.seeds: 0`` skips the stage.
    """
    run_dir = Path(getattr(args, "out", None) or Path("runs") / spec.name)
    verbose = bool(getattr(args, "verbose", True)) if verbose is None else verbose
    if spec.final.seeds == 0:
        return []
    if storage is None:
        storage = getattr(args, "storage", None)
    opened, _ = open_results_storage(run_dir, storage)
    settings = flatness or FlatnessSettings.from_sources(spec, args)
    jobs = plan_finals(spec, opened, run_dir)
    sample = flatness_sample(jobs[0].cfg, settings) if jobs and settings.enabled else None
    records = []
    for job in jobs:
        records.append(run_final(job, spec, run_dir, sample, settings, verbose=verbose))
        _announce(records[-1], verbose)
    return records
