"""The studies of a sweep and their budgets: naming, creation, counting, lost and retried trials.

One study per optimizer, named ``<sweep>/<optimizer>``, maximizing the last epoch's validation
accuracy. A study is done when exactly ``budget.trials`` of its trials finished (complete or
pruned), however many workers share it. The rule that keeps that exact under concurrency: storages
number a study's trials in creation order, so after ``ask()`` a trial runs only if fewer than
``budget`` trials with a smaller number are not failed; otherwise it is failed as ``surplus``.
Failing only ever lowers that count, so no later check can let a trial too many through, and
failed trials (errors, lost workers, interruptions) are re-enqueued with the same parameters.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import socket
import warnings
from dataclasses import dataclass
from typing import Any

from sweeps.faults import OUT_OF_MEMORY
from sweeps.engine.search import baseline_params, grid_points
from sweeps.spec import SweepSpec

__all__ = [
    "StudyCounts",
    "count_trials",
    "ensure_studies",
    "fail_trial",
    "is_error",
    "load_study",
    "owner_alive",
    "owner_token",
    "reap_lost_trials",
    "requeue",
    "study_name",
]

#: A RUNNING trial without an owner (its worker died between ``ask`` and naming itself) is
#: considered lost after this many seconds.
OWNERLESS_GRACE_S = 300
#: How often a trial is retried after it raised (lost workers and interruptions always retry,
#: up to ``MAX_LOST_RETRIES``, since they are not the trial's fault; a trial that kills its
#: worker, e.g. out of memory, stops there).
MAX_ERROR_RETRIES = 1
MAX_LOST_RETRIES = 3


def study_name(sweep: str, optimizer: str) -> str:
    return f"{sweep}/{optimizer}"


@dataclass
class StudyCounts:
    """Trial states of one study, as the live view, the workers and the summary see them."""

    optimizer: str
    budget: int
    complete: int = 0
    pruned: int = 0
    failed: int = 0  # errors, lost workers, interruptions (retried); not surplus trials
    errors: int = 0  # failed because the trial raised
    surplus: int = 0  # asked beyond the budget by a racing worker, failed before any work
    running: int = 0
    waiting: int = 0
    best: float | None = None
    best_number: int | None = None
    best_params: dict[str, Any] | None = None

    @property
    def finished(self) -> int:
        return self.complete + self.pruned

    @property
    def done(self) -> bool:
        return self.finished >= self.budget

    @property
    def open_slots(self) -> int:
        """Trials still to start: the budget less finished and running ones."""
        return self.budget - self.finished - self.running


def is_error(reason: str) -> bool:
    """The trial itself failed (it raised, or ran out of memory), as opposed to its worker.

    Errors count towards giving a study up; lost workers and interruptions do not.
    """
    return reason.startswith("error") or reason == OUT_OF_MEMORY


def count_trials(trials: list[Any], optimizer: str, budget: int) -> StudyCounts:
    from optuna.trial import TrialState

    counts = StudyCounts(optimizer, budget)
    for t in trials:
        if t.state == TrialState.COMPLETE:
            counts.complete += 1
            if t.value is not None and (counts.best is None or t.value > counts.best):
                counts.best, counts.best_number, counts.best_params = t.value, t.number, t.params
        elif t.state == TrialState.PRUNED:
            counts.pruned += 1
        elif t.state == TrialState.FAIL:
            reason = str(t.user_attrs.get("reason", ""))
            if reason == "surplus":
                counts.surplus += 1
                continue
            counts.failed += 1
            if is_error(reason):
                counts.errors += 1
        elif t.state == TrialState.RUNNING:
            counts.running += 1
        elif t.state == TrialState.WAITING:
            counts.waiting += 1
    return counts


def load_study(
    spec: SweepSpec, optimizer: str, storage: Any, sampler: Any = None, pruner: Any = None
):
    """The optimizer's study (created if missing), with this process's sampler and pruner."""
    import optuna

    return optuna.create_study(
        study_name=study_name(spec.name, optimizer),
        storage=storage,
        sampler=sampler,
        pruner=pruner,
        direction="maximize",
        load_if_exists=True,
    )


def ensure_studies(spec: SweepSpec, storage: Any) -> None:
    """Create every optimizer's study and give a new one its starting points.

    A new study starts from the enqueued baseline (tpe, gp, random) or from its shuffled grid
    points (grid). The launcher calls this before any worker starts, so two workers never both
    seed one study.
    """
    import optuna

    for optimizer in spec.optimizers:
        study = load_study(spec, optimizer, storage, sampler=optuna.samplers.RandomSampler())
        if study.get_trials(deepcopy=False):
            continue
        study.set_user_attr("sweep", spec.name)
        study.set_user_attr("optimizer", optimizer)
        study.set_user_attr("budget", spec.budget.trials)
        if spec.budget.sampler == "grid":
            points = grid_points(spec, optimizer)[: spec.budget.trials]
            if len(points) < spec.budget.trials:
                warnings.warn(
                    f"{optimizer}: the grid has {len(points)} points but budget.trials is "
                    f"{spec.budget.trials}; later trials repeat grid points",
                    stacklevel=2,
                )
            for point in points:
                study.enqueue_trial(point, user_attrs={"origin": "grid"})
        else:
            study.enqueue_trial(baseline_params(spec, optimizer), user_attrs={"origin": "baseline"})


# ----------------------------------------------------------------------------- trial ownership


def _process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (Linux), so a recycled pid is not taken for our worker."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return fields[19]
    except (OSError, IndexError):
        return None


def owner_token() -> dict[str, Any]:
    """Who runs a trial: stored in its user attrs so others can tell whether it still lives."""
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "start": _process_start(pid)}


def owner_alive(owner: dict[str, Any]) -> bool | None:
    """True/False for a worker on this machine; None (unknown) for one elsewhere."""
    if owner.get("host") != socket.gethostname():
        return None
    pid = int(owner.get("pid", -1))
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    start = owner.get("start")
    return start is None or _process_start(pid) == start


# ----------------------------------------------------------------------------- failing and retrying


def fail_trial(study: Any, trial: Any, reason: str, status: str = "failed") -> bool:
    """Fail a running (or waiting) trial with ``reason``; False if it had already finished.

    Exactly one caller wins when several fail the same trial: storages refuse to update a
    finished trial, so only the winner re-enqueues it.
    """
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    storage = study._storage
    trial_id = trial._trial_id
    with contextlib.suppress(UpdateFinishedTrialError, RuntimeError):
        storage.set_trial_user_attr(trial_id, "reason", reason)
        storage.set_trial_user_attr(trial_id, "status", status)
    try:
        return bool(storage.set_trial_state_values(trial_id, TrialState.FAIL))
    except (UpdateFinishedTrialError, RuntimeError):
        return False


def requeue(study: Any, trial: Any, *, lost: bool) -> bool:
    """Enqueue the failed trial's parameters again, unless it used up its retries.

    The new trial records ``retry_of`` (the original trial's number) in its user attrs. A trial
    whose worker was lost or interrupted also records ``resume_from`` (its folder, relative to
    the run folder): the retry continues from that folder's last epoch checkpoint if there is one.
    """
    attrs = trial.user_attrs
    key = "lost_retries" if lost else "error_retries"
    limit = MAX_LOST_RETRIES if lost else MAX_ERROR_RETRIES
    if int(attrs.get(key, 0)) >= limit:
        return False
    params = dict(trial.params) or dict(trial.system_attrs.get("fixed_params") or {})
    if not params and "grid_id" not in trial.system_attrs:
        return False  # nothing was sampled yet: a fresh trial does as well
    user_attrs = {
        "origin": "retry",
        "retry_of": int(attrs.get("retry_of", trial.number)),
        "error_retries": int(attrs.get("error_retries", 0)),
        "lost_retries": int(attrs.get("lost_retries", 0)),
    }
    user_attrs[key] += 1
    if lost and attrs.get("trial_dir"):
        user_attrs["resume_from"] = attrs["trial_dir"]
    study.enqueue_trial(params, user_attrs=user_attrs)
    return True


def _age_s(trial: Any) -> float:
    start = trial.datetime_start
    if start is None:
        return 0.0
    now = dt.datetime.now(start.tzinfo) if start.tzinfo else dt.datetime.now()
    return (now - start).total_seconds()


def reap_lost_trials(study: Any, *, ownerless_grace_s: float = OWNERLESS_GRACE_S) -> list[int]:
    """Fail and retry the RUNNING trials whose worker is gone; returns their numbers.

    A worker on this machine is gone when its process is (journal storages have no heartbeat, so
    this is how a killed worker's trial gets redone). Workers elsewhere are judged by the RDB
    heartbeat (:func:`optuna.storages.fail_stale_trials`, whose callback re-enqueues).
    """
    import optuna
    from optuna.trial import TrialState

    reaped = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = trial.user_attrs.get("worker")
        if owner is None:
            lost = _age_s(trial) > ownerless_grace_s
            why = "worker lost before it started the trial"
        else:
            lost = owner_alive(owner) is False
            why = f"worker lost (process {owner.get('pid')} on {owner.get('host')} ended)"
        if lost and fail_trial(study, trial, why):
            requeue(study, trial, lost=True)
            reaped.append(trial.number)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    return reaped


def make_stale_callback() -> Any:
    """The RDB heartbeat's hook: a trial whose worker stopped beating is retried like a lost one."""

    def retry_stale(study: Any, trial: Any) -> None:
        requeue(study, trial, lost=True)

    return retry_stale


def trials_ahead(study: Any, number: int) -> int:
    """Trials numbered below ``number`` that are not failed: the budget rule's count."""
    from optuna.trial import TrialState

    return sum(
        1
        for t in study.get_trials(deepcopy=False)
        if t.number < number and t.state != TrialState.FAIL
    )
