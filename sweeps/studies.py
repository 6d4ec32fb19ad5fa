"""The studies of a sweep: their names, opening them, counting their trials against the budget,
and ranking their trials. The one place every layer (workers, live view, finals, leaderboard)
asks about studies, so they all count and name alike.

One study per optimizer, named ``<sweep>/<optimizer>``, maximizing the last epoch's validation
accuracy. A study is done when exactly ``budget.trials`` of its trials finished (complete or
pruned), however many workers share it. The rule that keeps that exact under concurrency: storages
number a study's trials in creation order, so after ``ask()`` a trial runs only if fewer than
``budget`` trials with a smaller number are not failed; otherwise it is failed as ``surplus``
(never run, so no count of failures includes it). Failing only ever lowers that count, so no later
check can let a trial too many through.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from msam.config import OPTIMIZERS
from sweeps.faults import OUT_OF_MEMORY

__all__ = [
    "SURPLUS",
    "StudyCounts",
    "count_trials",
    "finite_complete",
    "is_error",
    "open_study",
    "ranked_trials",
    "split_study_name",
    "study_name",
    "sweep_names",
    "trials_ahead",
]

#: Reason of a trial asked beyond the budget by a racing worker and failed before any work.
SURPLUS = "surplus"


def study_name(sweep: str, optimizer: str) -> str:
    """The design's contract: one study per optimizer, ``<name>/<optimizer>``."""
    return f"{sweep}/{optimizer}"


def split_study_name(name: str) -> tuple[str, str] | None:
    """``"fmnist/sam"`` -> ``("fmnist", "sam")``; None for studies that are not ours."""
    sweep, sep, optimizer = name.rpartition("/")
    if not sep or not sweep or optimizer not in OPTIMIZERS:
        return None
    return sweep, optimizer


def sweep_names(storage: Any) -> list[str]:
    """Names of every sweep with at least one ``<name>/<optimizer>`` study in ``storage``."""
    import optuna

    names = {
        parts[0]
        for name in optuna.study.get_all_study_names(storage)
        if (parts := split_study_name(name)) is not None
    }
    return sorted(names)


def open_study(
    storage: Any,
    sweep: str,
    optimizer: str,
    *,
    sampler: Any = None,
    pruner: Any = None,
    create: bool = False,
) -> Any | None:
    """The optimizer's study with this process's sampler and pruner (a random sampler when only
    reading). ``create=True`` makes a missing study; otherwise a missing one gives None."""
    import optuna

    name = study_name(sweep, optimizer)
    if create:
        return optuna.create_study(
            study_name=name,
            storage=storage,
            sampler=sampler,
            pruner=pruner,
            direction="maximize",
            load_if_exists=True,
        )
    try:
        return optuna.load_study(
            study_name=name,
            storage=storage,
            sampler=sampler or optuna.samplers.RandomSampler(),
            pruner=pruner,
        )
    except KeyError:
        return None


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
            if reason == SURPLUS:
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


def trials_ahead(study: Any, number: int) -> int:
    """Trials numbered below ``number`` that are not failed: the budget rule's count."""
    from optuna.trial import TrialState

    return sum(
        1
        for t in study.get_trials(deepcopy=False)
        if t.number < number and t.state != TrialState.FAIL
    )


def finite_complete(trials: Iterable[Any]) -> list[Any]:
    """COMPLETE trials with a finite value, in trial order."""
    from optuna.trial import TrialState

    return [
        t
        for t in trials
        if t.state == TrialState.COMPLETE and t.value is not None and math.isfinite(t.value)
    ]


def ranked_trials(trials: Iterable[Any], *, maximize: bool = True, k: int | None = None) -> list:
    """COMPLETE trials with a finite value, best first (ties: the earlier trial), one per
    distinct configuration: a sampler proposing a point twice must not fill two final slots."""
    complete = finite_complete(trials)
    complete.sort(key=lambda t: (-t.value if maximize else t.value, t.number))
    seen: set[tuple] = set()
    out = []
    for trial in complete:
        key = tuple(sorted((name, repr(value)) for name, value in trial.params.items()))
        if key in seen:
            continue
        seen.add(key)
        out.append(trial)
        if k is not None and len(out) >= k:
            break
    return out
