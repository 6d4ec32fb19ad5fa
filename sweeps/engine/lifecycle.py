"""Trial lifecycle in a running sweep: new studies' starting points, who owns a trial, and failing
and retrying the trials of workers that died, hung, raised or were interrupted.

Failed trials (errors, lost workers, timeouts, interruptions) are re-enqueued with the same
parameters; a retry of a lost, timed-out or interrupted trial records ``resume_from`` so it
continues from that trial's last epoch checkpoint. Exactly one caller wins when several fail the
same trial.

The watchdog: a running trial stamps its progress (its start, each epoch's end) in its user attrs
(:data:`PROGRESS`); a trial whose last stamp is older than ``budget.trial_timeout``
(:func:`trial_timeout_s`) is failed as timed out and redone, though its worker still lives: a
process stopped with SIGSTOP, or a main thread hung while the RDB heartbeat thread beats on,
would otherwise hold the trial RUNNING for ever.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import socket
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sweeps.engine.search import baseline_params, grid_points
from sweeps.spec import SweepSpec
from sweeps.studies import open_study

__all__ = [
    "AUTO_TIMEOUT_FACTOR",
    "AUTO_TIMEOUT_FLOOR_S",
    "FIRST_EPOCH_TIMEOUT_S",
    "MAX_ERROR_RETRIES",
    "MAX_LOST_RETRIES",
    "OWNERLESS_GRACE_S",
    "PROGRESS",
    "SLOWEST_PROGRESS",
    "TIMED_OUT",
    "Reaped",
    "ensure_studies",
    "fail_trial",
    "hung_workers",
    "make_stale_callback",
    "note_slowest",
    "owner_alive",
    "owner_token",
    "reap_lost_trials",
    "requeue",
    "timed_out_reason",
    "trial_timeout_s",
]

#: A RUNNING trial without an owner (its worker died between ``ask`` and naming itself) is
#: considered lost after this many seconds.
OWNERLESS_GRACE_S = 300
#: How often a trial is retried after it raised (lost workers and interruptions always retry,
#: up to ``MAX_LOST_RETRIES``, since they are not the trial's fault; a trial that kills its
#: worker, e.g. out of memory, stops there).
MAX_ERROR_RETRIES = 1
MAX_LOST_RETRIES = 3

#: The user attr a running trial stamps at its start and at each epoch's end:
#: ``{"at": unix seconds, "epoch": epochs done, "slowest_s": longest wait between two stamps}``.
PROGRESS = "progress"
#: The study user attr where a worker whose trial was taken from it records how long its wait
#: between two stamps was (it can no longer write to the trial), so ``auto`` learns it too.
SLOWEST_PROGRESS = "slowest_progress_s"
#: ``budget.trial_timeout: auto``: this many times the slowest wait between two stamps that the
#: study has recorded, never below ``AUTO_TIMEOUT_FLOOR_S`` seconds; before the study has timed
#: any wait, a trial's first epoch (with data loading and compilation) gets
#: ``FIRST_EPOCH_TIMEOUT_S`` seconds. Keep the numbers in ``Budget.trial_timeout``'s description.
AUTO_TIMEOUT_FACTOR = 10
AUTO_TIMEOUT_FLOOR_S = 600
FIRST_EPOCH_TIMEOUT_S = 3600
#: How the reason of a timed-out trial starts (:func:`timed_out_reason`).
TIMED_OUT = "timed out"


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


# ----------------------------------------------------------------------------- the watchdog


def timed_out_reason(limit_s: float) -> str:
    """The reason of a trial failed for making no progress within ``limit_s`` seconds."""
    shown = f"{limit_s:.0f}" if limit_s >= 10 or float(limit_s).is_integer() else f"{limit_s:g}"
    return f"{TIMED_OUT} (no epoch finished in {shown} s)"


def _slowest_s(trial: Any) -> float | None:
    progress = trial.user_attrs.get(PROGRESS)
    if not isinstance(progress, dict):
        return None
    slowest = progress.get("slowest_s")
    return float(slowest) if isinstance(slowest, (int, float)) and slowest > 0 else None


def note_slowest(study: Any, seconds: float) -> None:
    """Record at the study a wait between two progress stamps of a trial that can no longer
    take it (it was failed meanwhile), if it is the longest the study has seen."""
    with contextlib.suppress(Exception):  # a lost measurement only keeps the limit lower
        if seconds > float(study.user_attrs.get(SLOWEST_PROGRESS) or 0):
            study.set_user_attr(SLOWEST_PROGRESS, round(seconds, 3))


def trial_timeout_s(spec: SweepSpec, study: Any) -> float | None:
    """Seconds a trial of ``study`` may go without progress, from ``budget.trial_timeout``
    (None: no limit). ``auto``: :data:`AUTO_TIMEOUT_FACTOR` times the slowest wait between two
    stamps recorded by any trial of the study (or at the study), at least
    :data:`AUTO_TIMEOUT_FLOOR_S`; :data:`FIRST_EPOCH_TIMEOUT_S` while none was recorded."""
    setting = spec.budget.trial_timeout
    if setting is None:
        return None
    if setting != "auto":
        return float(setting)
    waits = [s for s in map(_slowest_s, study.get_trials(deepcopy=False)) if s is not None]
    noted = study.user_attrs.get(SLOWEST_PROGRESS)
    if isinstance(noted, (int, float)) and noted > 0:
        waits.append(float(noted))
    if not waits:
        return float(FIRST_EPOCH_TIMEOUT_S)
    return max(float(AUTO_TIMEOUT_FLOOR_S), AUTO_TIMEOUT_FACTOR * max(waits))


def _since_progress_s(trial: Any) -> float:
    """Seconds since the trial's last progress stamp (its start, when it has none yet)."""
    progress = trial.user_attrs.get(PROGRESS)
    at = progress.get("at") if isinstance(progress, dict) else None
    if isinstance(at, (int, float)):
        return time.time() - float(at)
    return _age_s(trial)


@dataclass(frozen=True)
class Reaped:
    """A running trial the reaper failed (and re-enqueued, unless out of retries)."""

    number: int
    reason: str


def reap_lost_trials(
    study: Any, *, ownerless_grace_s: float = OWNERLESS_GRACE_S, timeout_s: float | None = None
) -> list[Reaped]:
    """Fail and retry the RUNNING trials whose worker is gone or hangs; returns them.

    A worker on this machine is gone when its process is (journal storages have no heartbeat, so
    this is how a killed worker's trial gets redone). Workers elsewhere are judged by the RDB
    heartbeat (:func:`optuna.storages.fail_stale_trials`, whose callback re-enqueues). A trial
    whose worker lives (or lives elsewhere) but has stamped no progress for ``timeout_s``
    seconds (:func:`trial_timeout_s`; None: never) is failed as timed out and redone the same
    way, from its last checkpoint.
    """
    import optuna
    from optuna.trial import TrialState

    reaped = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = trial.user_attrs.get("worker")
        if owner is None:
            lost = _age_s(trial) > ownerless_grace_s
            why = "worker lost before it started the trial"
        elif owner_alive(owner) is False:
            lost = True
            why = f"worker lost (process {owner.get('pid')} on {owner.get('host')} ended)"
        else:
            lost = timeout_s is not None and _since_progress_s(trial) > timeout_s
            why = timed_out_reason(timeout_s) if timeout_s is not None else ""
        if lost and fail_trial(study, trial, why):
            requeue(study, trial, lost=True)
            reaped.append(Reaped(trial.number, why))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    return reaped


def hung_workers(studies: Iterable[Any]) -> dict[int, str]:
    """Worker processes of this machine, still alive, whose latest trial in these studies was
    failed as timed out: ``{pid: "trial N timed out (...)"}``. A worker that woke up and went on
    to another trial is not among them."""
    from optuna.trial import TrialState

    latest: dict[int, tuple[dt.datetime, Any, dict[str, Any]]] = {}
    for study in studies:
        for trial in study.get_trials(deepcopy=False):
            owner = trial.user_attrs.get("worker")
            if not isinstance(owner, dict) or owner.get("host") != socket.gethostname():
                continue
            start = trial.datetime_start
            if start is None:
                continue
            start = start.replace(tzinfo=None) - (start.utcoffset() or dt.timedelta())
            pid = int(owner.get("pid", -1))
            if pid not in latest or start > latest[pid][0]:
                latest[pid] = (start, trial, owner)
    hung = {}
    for pid, (_, trial, owner) in latest.items():
        reason = str(trial.user_attrs.get("reason", ""))
        if trial.state == TrialState.FAIL and reason.startswith(TIMED_OUT) and owner_alive(owner):
            optimizer = trial.user_attrs.get("optimizer")
            hung[pid] = " ".join(filter(None, [optimizer, f"trial {trial.number} {reason}"]))
    return hung


def make_stale_callback() -> Any:
    """The RDB heartbeat's hook: a trial whose worker stopped beating is retried like a lost one."""

    def retry_stale(study: Any, trial: Any) -> None:
        requeue(study, trial, lost=True)

    return retry_stale
