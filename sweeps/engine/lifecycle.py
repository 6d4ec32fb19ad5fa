"""Trial lifecycle in a running sweep: new studies' starting points, who owns a trial, and failing
and retrying the trials of workers that died, raised or were interrupted.

Failed trials (errors, lost workers, interruptions) are re-enqueued with the same parameters; a
retry of a lost or interrupted trial records ``resume_from`` so it continues from that trial's
last epoch checkpoint. Exactly one caller wins when several fail the same trial.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import socket
import warnings
from typing import Any

from sweeps.engine.search import baseline_params, grid_points
from sweeps.spec import SweepSpec
from sweeps.studies import open_study

__all__ = [
    "MAX_ERROR_RETRIES",
    "MAX_LOST_RETRIES",
    "OWNERLESS_GRACE_S",
    "ensure_studies",
    "fail_trial",
    "make_stale_callback",
    "owner_alive",
    "owner_token",
    "reap_lost_trials",
    "requeue",
]

#: A RUNNING trial without an owner (its worker died between ``ask`` and naming itself) is
#: considered lost after this many seconds.
OWNERLESS_GRACE_S = 300
#: How often a trial is retried after it raised (lost workers and interruptions always retry,
#: up to ``MAX_LOST_RETRIES``, since they are not the trial's fault; a trial that kills its
#: worker, e.g. out of memory, stops there).
MAX_ERROR_RETRIES = 1
MAX_LOST_RETRIES = 3


def ensure_studies(spec: SweepSpec, storage: Any) -> None:
    """Create every optimizer's study and give a new one its starting points.

    A new study starts from the enqueued baseline (tpe, gp, random) or from its shuffled grid
    points (grid). The launcher calls this before any worker starts, so two workers never both
    seed one study.
    """
    import optuna

    for optimizer in spec.optimizers:
        study = open_study(
            storage, spec.name, optimizer, sampler=optuna.samplers.RandomSampler(), create=True
        )
        if study.get_trials(deepcopy=False):
            continue
        study.set_user_attr("sweep", spec.name)
        study.set_user_attr("spec", spec.to_dict())  # who may join: see check_same_studies
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
