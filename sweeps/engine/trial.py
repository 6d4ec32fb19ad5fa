"""One trial: sample its point, train it with pruning and W&B attached, tell Optuna the outcome.

The objective is the validation accuracy of the last epoch (maximized). Each epoch's accuracy is
reported to the pruner; a pruned trial stops through the trainer's callback interface. Outcomes
and how Optuna records them:

- complete: COMPLETE with the last epoch's ``val_acc``;
- pruned: PRUNED, reason "pruned at epoch k";
- diverged (non-finite loss): PRUNED, reason "diverged at epoch k ..." (a bad lr is information,
  not a crash);
- raised: FAIL, reason "error: ...", retried once with the same parameters;
- out of memory (CUDA's or the host's): FAIL, reason "out of memory"; its memory is released
  before the worker takes the next trial, and it is retried once like an error;
- interrupted (Ctrl-C, SIGTERM): FAIL, reason "interrupted", retried when the sweep resumes;
- no progress within ``budget.trial_timeout`` (its worker stopped or hung): FAIL, reason "timed
  out (...)", set by whoever reaps it (:mod:`sweeps.engine.lifecycle`), and retried.

A retry of an interrupted or timed-out trial or of one whose worker died continues from that
trial's last epoch checkpoint (same parameters, same config), instead of starting over; a
finished trial's checkpoint is deleted, so a long sweep does not fill the disk with them.

A trial stamps its progress (:data:`~sweeps.engine.lifecycle.PROGRESS`) at its start and at each
epoch's end. A worker that finds its trial failed by someone else meanwhile (it was stopped and
timed out, or taken for lost) gives the trial up: it tells the storage nothing more, finishes
its W&B run as failed with the recorded reason, writes only into its own trial folder, and
leaves its last checkpoint there for the retry to continue from.

Every trial records in its user attrs the worker running it, its folder, its W&B run id, its
status and reason, and where its time went (``seconds``: train vs the sweep's own overhead).
"""

from __future__ import annotations

import contextlib
import os
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from msam.callbacks import Callback
from msam.files import DISK_FULL, is_disk_full, write_json
from sweeps import budget
from sweeps.engine.lifecycle import PROGRESS, fail_trial, note_slowest, requeue
from sweeps.engine.search import suggest_params
from sweeps.engine.signals import Interrupted, InterruptGuard
from sweeps.faults import OUT_OF_MEMORY, failure_reason, one_line, release_memory
from sweeps.layout import CHECKPOINT, ERROR, TIMING, RunFolder
from sweeps.spec import SweepSpec
from sweeps.storage import heartbeat
from sweeps.studies import study_name
from sweeps.tracking import WandbCallback

__all__ = ["ProgressCallback", "PruningCallback", "TrialRunner"]


class ProgressCallback(Callback):
    """Stamps the trial's progress at its start and at each epoch's end, for the watchdog
    (:func:`sweeps.engine.lifecycle.reap_lost_trials`), with the longest wait between stamps.

    When the trial was failed meanwhile (timed out while this worker was stopped) the stamp
    raises the storage's error, which stops the training; the wait is then recorded at the
    study, so that ``budget.trial_timeout: auto`` learns how long an epoch can take.
    """

    def __init__(self, study: Any, trial: Any) -> None:
        self.study = study
        self.trial = trial
        self.seconds = 0.0  # time in storage calls: sweep overhead, not training
        self.slowest = 0.0
        self._last: float | None = None

    def stamp(self, epoch: int) -> None:
        """Record that the trial is alive after ``epoch`` epochs (0: it starts)."""
        from optuna.exceptions import UpdateFinishedTrialError

        t0 = time.perf_counter()
        now = time.time()
        if self._last is not None:
            self.slowest = max(self.slowest, now - self._last)
        try:
            stamp = {"at": round(now, 3), "epoch": epoch, "slowest_s": round(self.slowest, 3)}
            self.trial.set_user_attr(PROGRESS, stamp)
        except UpdateFinishedTrialError:
            if self._last is not None:
                note_slowest(self.study, now - self._last)
            raise
        finally:
            self.seconds += time.perf_counter() - t0
        self._last = now

    def on_epoch_end(self, epoch: int, metrics: Any) -> None:
        self.stamp(epoch)


class PruningCallback(Callback):
    """Reports each epoch's validation accuracy to Optuna and stops the run when it says prune.

    The last epoch is reported but never pruned: the trial is complete by then, and its value is
    what the sampler should learn from.
    """

    def __init__(self, trial: Any, epochs: int) -> None:
        self.trial = trial
        self.epochs = epochs
        self.seconds = 0.0  # time in storage calls: sweep overhead, not training
        self.pruned_at: int | None = None

    def on_resume(self, history: Any) -> None:
        """A trial continued from a checkpoint reports the epochs done before (no pruning)."""
        for metrics in history:
            if metrics.get("val_acc") is not None:
                self.trial.report(float(metrics["val_acc"]), int(metrics["epoch"]))

    def on_epoch_end(self, epoch: int, metrics: Any) -> str | None:
        value = metrics.get("val_acc")
        if value is None:
            return None
        t0 = time.perf_counter()
        try:
            self.trial.report(float(value), epoch)
            prune = epoch < self.epochs and self.trial.should_prune()
        finally:
            self.seconds += time.perf_counter() - t0
        if prune:
            self.pruned_at = epoch
            return f"pruned at epoch {epoch} (val_acc {value:.4f})"
        return None


@dataclass
class TrialRunner:
    """Runs asked trials of one sweep in this process (one worker)."""

    spec: SweepSpec
    out: Path
    storage: Any  # the storage as opened (the RDB heartbeat needs it, not Optuna's cache)
    guard: InterruptGuard
    worker_index: int = 0
    verbose: bool = False
    timings: list[dict[str, float]] = field(default_factory=list)

    def run(self, study: Any, trial: Any, optimizer: str, started: float) -> str:
        """Run ``trial`` (already asked and owned) to its end; returns the status recorded.

        ``started`` is when this worker began picking the trial (``time.perf_counter()``), so the
        recorded overhead covers sampling and storage round trips too.
        """
        spec = self.spec
        folder = RunFolder(self.out).trial(optimizer, trial.number)
        tracker: WandbCallback | None = None
        epochs = budget.epochs(spec, optimizer)
        pruning = PruningCallback(trial, epochs)
        progress = ProgressCallback(study, trial)
        failure: str | None = None
        try:
            progress.stamp(0)
            params = suggest_params(trial, spec, optimizer)
            from msam.trainer import run_train, with_epochs

            cfg = with_epochs(spec.train_config(optimizer, params), epochs)
            _move_aside(folder)
            trial.set_user_attr("trial_dir", str(folder.relative_to(self.out)))
            resumed = self._take_checkpoint(trial, cfg, folder)
            tracker = self._tracker(study, trial, optimizer, params, cfg, resumed)
            if tracker.run_id is not None:
                trial.set_user_attr("wandb_run_id", tracker.run_id)

            t_train = time.perf_counter()
            callbacks = [progress, pruning, tracker]  # progress first: a lost trial stops there
            with heartbeat(self.storage, trial._trial_id), self.guard.raising():
                result = run_train(
                    cfg,
                    out_dir=folder,
                    resume=resumed is not None,
                    callbacks=[_Shielded(cb, self.guard) for cb in callbacks],
                    evaluate_test=False,
                    verbose=self.verbose,
                )
            own_s = pruning.seconds + tracker.seconds + progress.seconds
            train_s = time.perf_counter() - t_train - own_s
            status, reason, state, value = _outcome(result)
        except (Interrupted, KeyboardInterrupt):
            taken = _taken_reason(study, trial)  # timed out while stopped, then told to stop
            if tracker is not None:
                tracker.finish(status="failed", reason=taken or "interrupted")
            if taken is None and fail_trial(study, trial, "interrupted"):
                requeue(study, _frozen(study, trial), lost=True)
            raise
        except Exception as exc:
            taken = _taken_reason(study, trial)
            if taken is not None:  # failed by a reaper meanwhile: its retry redoes it
                failure = self._give_up(study, trial, folder, tracker, taken)
            else:
                failure = self._record_error(study, trial, folder, tracker, exc)
        if failure is not None:  # out of the except block: the traceback's frames are unreachable
            release_memory()
            if failure == LOST:
                return LOST
            (folder / CHECKPOINT).unlink(missing_ok=True)
            return "failed"
        tracker.finish(
            status=status,
            reason=reason,
            summary={"trial": trial.number, "study": study_name(spec.name, optimizer)},
        )
        total = time.perf_counter() - started
        seconds = {
            "trial": round(total, 4),
            "train": round(train_s, 4),
            "overhead": round(total - train_s, 4),
            "wandb": round(tracker.seconds, 4),
            "pruner": round(pruning.seconds, 4),
            "progress": round(progress.seconds, 4),
        }
        attrs = {"status": status, "reason": reason, "epochs": len(result.history)}
        if not self._tell(study, trial, state, value, attrs, seconds):
            taken = _taken_reason(study, trial) or "lost"
            return self._give_up(study, trial, folder, tracker, taken)
        self.timings.append(seconds)
        write_json(folder / TIMING, seconds)
        (folder / CHECKPOINT).unlink(missing_ok=True)  # finished: nothing will resume it
        if resumed is not None:  # one a stopped worker wrote after this trial took its own
            (self.out / resumed["trial_dir"] / CHECKPOINT).unlink(missing_ok=True)
        return status

    def _give_up(self, study: Any, trial: Any, folder: Path, tracker: Any, reason: str) -> str:
        """A trial someone else failed while this worker ran it (timed out while the worker was
        stopped, or taken for lost): nothing more goes to the storage, the W&B run ends as
        failed with the recorded reason, and the last checkpoint stays in this trial's folder
        while the retry that continues from it has yet to finish."""
        if tracker is not None:
            tracker.finish(status="failed", reason=reason)
        if _checkpoint_unclaimed(study, trial):
            (folder / CHECKPOINT).unlink(missing_ok=True)
        return LOST

    def _record_error(
        self, study: Any, trial: Any, folder: Path, tracker: Any, exc: Exception
    ) -> str:
        """Fail a trial that raised (its traceback in error.txt) and retry it; its reason.

        A full disk ("disk full") refuses error.txt as well, which must not fail this handler; its
        retry is not counted against the trial, like a lost worker's (the disk was not its fault).
        """
        failure = DISK_FULL if is_disk_full(exc) else failure_reason(exc)
        with contextlib.suppress(OSError):  # the reason in the storage says what happened
            folder.mkdir(parents=True, exist_ok=True)
            (folder / ERROR).write_text(traceback.format_exc())
        if tracker is not None:
            tracker.finish(status="failed", reason=failure)
        if failure in (OUT_OF_MEMORY, DISK_FULL):
            with contextlib.suppress(Exception):  # the reason says it even if this fails
                trial.set_user_attr("error", one_line(exc))
        if fail_trial(study, trial, failure):
            requeue(study, _frozen(study, trial), lost=failure == DISK_FULL)
        return failure

    @staticmethod
    def _tell(
        study: Any,
        trial: Any,
        state: Any,
        value: float | None,
        attrs: dict[str, Any],
        seconds: dict[str, float],
    ) -> bool:
        """Record the outcome in the storage; False when another worker took the trial for lost
        (no heartbeat for too long) and retried it meanwhile."""
        from optuna.exceptions import UpdateFinishedTrialError

        try:
            for key, attr in attrs.items():
                if attr is not None:
                    trial.set_user_attr(key, attr)
            trial.set_user_attr("seconds", seconds)
            t_tell = time.perf_counter()
            study.tell(trial, value, state=state)
        except (UpdateFinishedTrialError, ValueError):
            if _frozen(study, trial).state.is_finished():
                return False
            raise
        seconds["tell"] = round(time.perf_counter() - t_tell, 4)
        seconds["overhead"] = round(seconds["overhead"] + seconds["tell"], 4)
        return True

    def _take_checkpoint(self, trial: Any, cfg: Any, folder: Path) -> dict[str, Any] | None:
        """Move the last checkpoint of the trial this one redoes into ``folder``.

        Returns ``{"trial_dir": ..., "epoch": k}`` when the trial will continue after epoch k,
        None when it starts over: nothing to redo, no checkpoint (it died in its first epoch, or
        on another machine), an unreadable one (a warning says so) or one of another config.
        """
        from msam.trainer import checkpoint_mismatch, load_checkpoint

        source = trial.user_attrs.get("resume_from")
        if not source:
            return None
        path = self.out / source / CHECKPOINT
        state = load_checkpoint(path)
        if state is None:
            return None
        mismatch = checkpoint_mismatch(state, cfg)
        if mismatch is not None:
            warnings.warn(
                f"{path} was written for another config ({mismatch}); trial {trial.number} "
                "starts over",
                RuntimeWarning,
                stacklevel=2,
            )
            return None
        folder.mkdir(parents=True, exist_ok=True)
        os.replace(path, folder / CHECKPOINT)
        resumed = {"trial_dir": str(source), "epoch": int(state["epoch"])}
        trial.set_user_attr("resumed", resumed)
        return resumed

    def _tracker(
        self,
        study: Any,
        trial: Any,
        optimizer: str,
        params: dict[str, Any],
        cfg: Any,
        resumed: dict[str, Any] | None = None,
    ) -> WandbCallback:
        spec = self.spec
        name = study_name(spec.name, optimizer)
        return WandbCallback.from_train_config(
            cfg,
            group=spec.name,
            job_type="tune",
            name=f"{optimizer}-t{trial.number}",
            extra_config={
                "trial": {
                    "study": name,
                    "number": trial.number,
                    "id": trial._trial_id,
                    "params": params,
                    "worker": self.worker_index,
                    "retry_of": trial.user_attrs.get("retry_of"),
                    "resumed": resumed,
                },
                "sweep": spec.name,
            },
            dir=self.out,
            finish_on_end=False,
        )


#: What :meth:`TrialRunner.run` returns for a trial another process failed while it ran.
LOST = "lost"


def _frozen(study: Any, trial: Any) -> Any:
    return study._storage.get_trial(trial._trial_id)


def _taken_reason(study: Any, trial: Any) -> str | None:
    """The recorded reason when someone else failed the trial while this worker ran it (a
    reaper, on a timeout or a lost worker), else None."""
    try:
        frozen = _frozen(study, trial)
    except Exception:  # the storage is unreachable: treat the trial as still ours
        return None
    if not frozen.state.is_finished():
        return None
    return str(frozen.user_attrs.get("reason") or "lost")


def _checkpoint_unclaimed(study: Any, trial: Any) -> bool:
    """Whether the trial's folder is its own (it got that far) and no retry continuing from it
    has yet to finish: one that has will take the folder's checkpoint, or has taken it and may
    fail again."""
    try:
        folder = _frozen(study, trial).user_attrs.get("trial_dir")
        return folder is not None and not any(
            t.user_attrs.get("resume_from") == folder and not t.state.is_finished()
            for t in study.get_trials(deepcopy=False)
        )
    except Exception:  # unsure: keep the checkpoint
        return False


class _Shielded(Callback):
    """Runs a callback's hooks where a stop signal waits for them to end: a W&B run is never left
    half started by Ctrl-C (so it can always be finished as interrupted), nor a report half sent
    to the storage."""

    def __init__(self, inner: Callback, guard: InterruptGuard) -> None:
        self.inner = inner
        self.guard = guard

    def on_train_start(self, config: Any, info: Any) -> None:
        with self.guard.shielded():
            self.inner.on_train_start(config, info)

    def on_resume(self, history: Any) -> None:
        with self.guard.shielded():
            self.inner.on_resume(history)

    def on_epoch_end(self, epoch: int, metrics: Any) -> bool | str | None:
        with self.guard.shielded():
            return self.inner.on_epoch_end(epoch, metrics)

    def on_train_end(self, summary: Any) -> None:
        with self.guard.shielded():
            self.inner.on_train_end(summary)


def _outcome(result: Any) -> tuple[str, str | None, Any, float | None]:
    """(status, reason, Optuna state, value) of a finished training run."""
    from optuna.trial import TrialState

    if result.status == "complete":
        value = result.history[-1].get("val_acc") if result.history else None
        if value is None:
            raise RuntimeError("the run has no validation accuracy (data.val_fraction is 0?)")
        return "complete", None, TrialState.COMPLETE, float(value)
    if result.status == "diverged":
        return "diverged", result.reason or "diverged", TrialState.PRUNED, None
    return "pruned", result.reason or "pruned", TrialState.PRUNED, None


def _move_aside(folder: Path) -> None:
    """A folder left by an earlier sweep on other storage: keep it, but out of this trial's way."""
    if not folder.exists():
        return
    k = 1
    while folder.with_name(f"{folder.name}.old{k}").exists():
        k += 1
    folder.rename(folder.with_name(f"{folder.name}.old{k}"))
