"""Running the final stage: each planned final trained on train + validation, scored once on the
test set, and measured for flatness (``sweeps.finals.flatness``).

Each final's folder holds ``final.json`` (which trial, parameters, seed and epochs it stands for),
the trainer's ``metrics.jsonl`` and ``checkpoint.pt``, and ``summary.json`` with ``flatness`` and
``final`` keys added. The stage is resumable: a final whose summary says complete (or diverged,
which a rerun would only repeat) is skipped; an interrupted one resumes from its checkpoint; one
that failed (out of memory, an error) is recorded as ``failed`` with its reason and ``error.txt``,
the other finals go on, and a rerun retries it; a final left over from a different trial (tuning
went on and found a better one) is moved to ``finals/.stale/``.
"""

from __future__ import annotations

import math
import shutil
import sys
import traceback
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from msam.callbacks import Callback
from msam.errors import UserError
from msam.files import read_json, write_json
from sweeps.faults import failure_reason, release_memory
from sweeps.finals.flatness import (
    FlatnessSettings,
    flatness_rho,
    flatness_sample,
    measure_flatness,
)
from sweeps.finals.plan import FinalJob, plan_finals
from sweeps.layout import (
    CHECKPOINT,
    ERROR,
    FINAL_JOB,
    METRICS,
    SUMMARY,
    WANDB_RUN,
    RunFolder,
    final_label,
)
from sweeps.results.read import FinalRecord
from sweeps.run import SweepRun
from sweeps.spec import SweepSpec
from sweeps.tracking import WandbCallback

__all__ = ["FinalsResult", "retire_stale", "run_final", "run_finals"]

#: Measures one trained model's flatness (see ``sweeps.finals.flatness``).
Measure = Callable[[Any], dict[str, Any]]
#: Outcomes a rerun skips: complete, and diverged (deterministic, so a rerun would diverge again).
DONE_STATES = ("complete", "diverged")


@dataclass(frozen=True)
class FinalsResult:
    """What the final stage did: one record per planned final, in the order they ran."""

    records: tuple[FinalRecord, ...] = ()

    @property
    def failed(self) -> list[FinalRecord]:
        return [r for r in self.records if r.outcome == "failed"]


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

    def on_resume(self, history: Sequence[Mapping[str, Any]]) -> None:
        self._call("on_resume", history)

    def on_train_end(self, summary: Mapping[str, Any]) -> None:
        """Held back: see ``finish``."""

    def finish(self, summary: Mapping[str, Any]) -> None:
        self._call("on_train_end", summary)


def final_tracker(
    job: FinalJob, spec: SweepSpec, folder: RunFolder, *, run_id: str | None = None
) -> _Guarded | None:
    """A W&B run (``job_type=final``, ``group=<name>``) for one final; None when tracking is
    disabled or W&B cannot start one (a warning says why). With ``run_id``, the run of that id
    is continued (``resume="allow"``)."""
    if job.cfg.tracking.wandb.mode == "disabled":
        return None
    name = f"{spec.name}-{final_label(job.optimizer, job.rank)}-seed{job.seed}"
    try:
        inner = WandbCallback.from_train_config(
            job.cfg,
            job_type="final",
            name=name,
            group=spec.name,
            tags=["final", job.optimizer, f"seed{job.seed}", *job.cfg.tracking.wandb.tags],
            dir=folder.root,
            extra_config={"sweep": spec.name, "final": job.identity()},
            run_id=run_id,
            resume="allow" if run_id else None,
        )
    except Exception as exc:
        warnings.warn(f"no W&B run for final {name}: {exc}", stacklevel=2)
        return None
    return _Guarded(inner, f"final {name}")


def _note_wandb(folder: Path, tracker: _Guarded | None, *, finished: bool) -> None:
    """``wandb.json``: the final's W&B run id, and whether its run was finished.

    A run that W&B never started or could not finish (a warning said why) is recorded as not
    finished, so the next rerun brings W&B in line with the files instead of trusting it."""
    run_id = getattr(tracker.inner, "run_id", None) if tracker is not None else None
    if isinstance(run_id, str):
        closed = finished and not tracker.broken and getattr(tracker.inner, "closed", True)
        write_json(folder / WANDB_RUN, {"id": run_id, "finished": closed})


def _finish_open_wandb_run(
    job: FinalJob, spec: SweepSpec, run: RunFolder, summary: Mapping[str, Any]
) -> None:
    """A final done on disk whose W&B run was left open (killed after training, while its
    flatness was measured): continue that run, log the epochs and the summary, and finish it, so
    W&B says what the files say."""
    recorded = read_json(job.dir / WANDB_RUN)
    if not isinstance(recorded, dict) or recorded.get("finished") or not recorded.get("id"):
        return
    tracker = final_tracker(job, spec, run, run_id=str(recorded["id"]))
    if tracker is None:
        return
    tracker.on_train_start(job.cfg.to_dict(), {"resumed_to_finish": True})
    history = _record(job, dict(summary), "read").history()
    tracker.on_resume(history)
    tracker.finish(summary)
    _note_wandb(job.dir, tracker, finished=True)


# ----------------------------------------------------------------------------- running


def _model_from_checkpoint(cfg: Any, folder: Path) -> Any | None:
    """The trained model of a finished final, rebuilt from its last checkpoint (None if absent):
    lets a rerun add flatness metrics that a crash after training left out."""
    from msam.data import dataset_info
    from msam.models import model_for
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
    model = model_for(cfg.model, info)
    model.load_state_dict(state["model"])
    return model.to(resolve_device(cfg.train.device))


def _retire(folder: Path, run: RunFolder, job: FinalJob, trial: Any) -> None:
    """Move a final that belongs to another trial out of the way, keeping it for inspection."""
    stale_root = run.stale_finals
    rel = folder.relative_to(run.finals)
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


def retire_stale(jobs: Sequence[FinalJob], run: RunFolder) -> None:
    """Move every final that belongs to another trial out of the way before any trains: a stage
    stopped after its first new final can then never leave finals of two trials under one rank."""
    for job in jobs:
        recorded = read_json(job.dir / FINAL_JOB)
        if job.dir.exists() and not job.owns(recorded):
            _retire(job.dir, run, job, (recorded or {}).get("trial"))


def _record(job: FinalJob, summary: dict[str, Any], outcome: str) -> FinalRecord:
    return FinalRecord(
        job.optimizer, job.rank, job.seed, job.dir, summary, job.identity(), outcome=outcome
    )


def _finish_done(
    job: FinalJob, measure: Measure | None, settings: FlatnessSettings
) -> FinalRecord | None:
    """The record of a final already done, or None when it still has to train.

    Flatness that a crash left out, or that was measured with other ``final.flatness``
    settings, is measured (again) on the model of the final's checkpoint; a done final without
    flatness whose model is gone is cleared to train again.
    """
    folder = job.dir
    summary = read_json(folder / SUMMARY)
    if summary is None or summary.get("status") not in DONE_STATES:
        return None
    flat = summary.get("flatness")
    # Summaries written before the settings were recorded keep their values.
    stale = isinstance(flat, dict) and flat.get("settings", settings.record()) != settings.record()
    if summary["status"] == "diverged" or measure is None or (flat is not None and not stale):
        return _record(job, summary, "skipped")
    model = _model_from_checkpoint(job.cfg, folder)
    if model is not None:
        summary["flatness"] = measure(model)
        summary["final"] = job.identity()
        write_json(folder / SUMMARY, summary)
        return _record(job, summary, "flatness added")
    if stale:
        warnings.warn(
            f"{folder}: flatness was measured with other final.flatness settings and the "
            "checkpoint to measure it again is gone; keeping the old values",
            stacklevel=3,
        )
        return _record(job, summary, "skipped")
    for name in (SUMMARY, METRICS, CHECKPOINT):  # its model is gone: train again
        (folder / name).unlink(missing_ok=True)
    return None


def _train(
    job: FinalJob, spec: SweepSpec, run: RunFolder, measure: Measure | None, verbose: bool
) -> FinalRecord:
    """Train (or resume) one final with its W&B run; a failure is recorded, not raised."""
    from msam.trainer import run_train

    folder = job.dir
    resume = (folder / CHECKPOINT).exists() or (folder / METRICS).exists()
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / FINAL_JOB, job.identity())
    tracker = final_tracker(job, spec, run)
    _note_wandb(folder, tracker, finished=False)
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
        (folder / ERROR).write_text(traceback.format_exc())
        if tracker is not None:
            tracker.finish({"status": "failed", "reason": failure})
    except BaseException:  # interrupted: close its W&B run, then let it propagate
        if tracker is not None:
            tracker.finish({"status": "failed", "reason": "interrupted"})
            _note_wandb(folder, tracker, finished=True)
        raise
    if failure is not None:  # out of the except block: the traceback's frames are unreachable
        release_memory()
        summary = {"name": job.cfg.name, "status": "failed", "reason": failure}
        summary["final"] = job.identity()
        write_json(folder / SUMMARY, summary)  # not a done state: a rerun retries it
        _note_wandb(folder, tracker, finished=True)
        return _record(job, summary, "failed")
    summary = dict(result.summary)
    if result.status == "complete" and measure is not None:
        summary["flatness"] = measure(result.model)
    summary["final"] = job.identity()
    write_json(folder / SUMMARY, summary)
    if tracker is not None:
        tracker.finish(summary)
        _note_wandb(folder, tracker, finished=True)
    return _record(job, summary, "trained")


def run_final(
    job: FinalJob,
    spec: SweepSpec,
    run: RunFolder,
    sample: Sequence[Any] | None,
    settings: FlatnessSettings,
    *,
    verbose: bool = True,
) -> FinalRecord:
    """Train (or resume, or skip) one final and add its flatness metrics to summary.json."""
    measure: Measure | None = None
    if settings.enabled and sample is not None:
        rho, adaptive = flatness_rho(spec, job.cfg), job.cfg.optim.adaptive

        def measure(model: Any) -> dict[str, Any]:
            label = f"final {final_label(job.optimizer, job.rank)} seed{job.seed}"
            if verbose:
                print(
                    f"{label}: measuring flatness ({sum(len(b[1]) for b in sample)} images, at "
                    f"most {settings.iters} Lanczos steps, {settings.samples} trace probes)",
                    file=sys.stderr,
                    flush=True,
                )
            report = measure_flatness(model, sample, rho=rho, adaptive=adaptive, settings=settings)
            if verbose:
                converged = "" if report.get("hessian_top_eig_converged") else ", NOT converged"
                print(
                    f"{label}: flatness in {report['seconds']:.1f} s (top eigenvalue "
                    f"{report['hessian_top_eig']:.4g} after {report['hessian_top_eig_iters']} "
                    f"steps{converged})",
                    file=sys.stderr,
                    flush=True,
                )
            return report

    retire_stale([job], run)
    done = _finish_done(job, measure, settings)
    if done is None:
        return _train(job, spec, run, measure, verbose)
    _finish_open_wandb_run(job, spec, run, done.summary)
    return done


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
    run: SweepRun, storage: Any, *, flatness: FlatnessSettings | None = None, verbose: bool = True
) -> FinalsResult:
    """Run (or finish) the final stage of a sweep from its open Optuna ``storage``.

    ``flatness`` defaults to the spec's ``final.flatness``; ``final.seeds: 0`` skips the stage.
    """
    spec = run.spec
    if spec.final.seeds == 0:
        return FinalsResult()
    settings = flatness or FlatnessSettings.from_spec(spec)
    jobs = plan_finals(spec, storage, run.folder)
    sample = flatness_sample(jobs[0].cfg, settings) if jobs and settings.enabled else None
    retire_stale(jobs, run.folder)
    records = []
    for job in jobs:
        records.append(run_final(job, spec, run.folder, sample, settings, verbose=verbose))
        _announce(records[-1], verbose)
    return FinalsResult(tuple(records))
