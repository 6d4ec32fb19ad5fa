"""What one study searches and how: the sampled space, the baseline point, samplers and pruners.

Every optimizer's study gets the same sampler kind, seed and pruner, so SGD, SAM (Foret et al.,
2021) and mSAM (Behdin et al., 2023) are tuned with equal budgets. The space is conditional on the
optimizer: ``lr`` always, ``rho`` for sam and msam, ``micro_batches`` for msam only.

No point of a continuous space is tried twice: each worker's sampler is seeded anew unless it is
the first of a fresh study (which draws what ``budget.seed`` gives, so a fresh one-worker sweep is
reproducible), and a proposal that repeats a trial of the study is discarded before it costs any
budget (:func:`ask_trial`).
"""

from __future__ import annotations

import hashlib
import math
import random
import secrets
import warnings
from itertools import product
from typing import Any

from sweeps import budget
from sweeps.spec import ParamSpace, SweepSpec
from sweeps.studies import SURPLUS

__all__ = [
    "DUPLICATE",
    "MAX_RESAMPLES",
    "ask_trial",
    "baseline_params",
    "checks_duplicates",
    "grid_points",
    "make_pruner",
    "make_sampler",
    "sampler_seed",
    "started_trials",
    "suggest_params",
]

#: Status of a proposal that repeated a trial of its study, failed before any work. Its reason is
#: ``surplus``, so like a trial asked beyond the budget it counts as neither a trial nor a failure.
DUPLICATE = "duplicate"
#: Proposals discarded in a row before a repeated point is run after all (a continuous space
#: makes even a second one all but impossible once the sampler is seeded anew).
MAX_RESAMPLES = 5


def suggest_params(trial: Any, spec: SweepSpec, optimizer: str) -> dict[str, Any]:
    """Sample (or read back, for an enqueued trial) this optimizer's searched parameters."""
    params: dict[str, Any] = {}
    for key in spec.search.searched(optimizer):
        space = getattr(spec.search, key)
        if space.choices is not None:
            params[key] = trial.suggest_categorical(key, list(space.choices))
        else:
            params[key] = trial.suggest_float(key, space.low, space.high, log=space.log)
    if "micro_batches" in params:
        params["micro_batches"] = int(params["micro_batches"])
    return params


def _closest(value: float, space: ParamSpace) -> float:
    """``value`` moved into the space: clamped to a range, or the nearest choice (log distance)."""
    if space.choices is None:
        return min(max(value, space.low), space.high)
    choices = list(space.choices)
    if value > 0 and all(c > 0 for c in choices):
        return min(choices, key=lambda c: abs(math.log(c) - math.log(value)))
    return min(choices, key=lambda c: abs(c - value))


def baseline_params(spec: SweepSpec, optimizer: str) -> dict[str, Any]:
    """The point every study tries first: the base config's lr and rho (0.05 unless set), and
    the base micro-batch count if it is a choice, else the middle choice.

    Starting each optimizer from the same sensible point means none is judged on unlucky samples.
    """
    base = spec.base.optim
    params: dict[str, Any] = {}
    for key in spec.search.searched(optimizer):
        space = getattr(spec.search, key)
        if key == "micro_batches":
            choices = sorted(space.choices)
            params[key] = (
                base.micro_batches if base.micro_batches in choices else choices[len(choices) // 2]
            )
        else:
            params[key] = _closest(float(getattr(base, key)), space)
    return params


def grid_points(spec: SweepSpec, optimizer: str) -> list[dict[str, Any]]:
    """Every combination of the searched choices, shuffled with the budget's seed.

    A grid smaller than the budget is walked once in full; a larger one is cut at the budget, and
    shuffling makes that cut a random subset rather than the first corner of the grid.
    """
    keys = spec.search.searched(optimizer)
    values = [list(getattr(spec.search, key).choices) for key in keys]
    points = [dict(zip(keys, combo)) for combo in product(*values)]
    random.Random(spec.budget.seed).shuffle(points)
    return points


def _grid_space(spec: SweepSpec, optimizer: str) -> dict[str, list[Any]]:
    return {key: list(getattr(spec.search, key).choices) for key in spec.search.searched(optimizer)}


def started_trials(study: Any) -> int:
    """Trials of the study a sampler has seen start (every state but WAITING): 0 for a fresh
    study, whose only trials are the enqueued baseline or grid points."""
    from optuna.trial import TrialState

    return sum(1 for t in study.get_trials(deepcopy=False) if t.state != TrialState.WAITING)


def sampler_seed(spec: SweepSpec, worker_index: int, started: int) -> int:
    """The seed of a worker's sampler: ``budget.seed`` for worker 0 starting a fresh study, so
    the first process of a fresh one-worker sweep draws exactly what that seed gives; any other
    (a resume, a second launcher, more workers, a worker joining later) mixes ``budget.seed``,
    its index and the trials already started with a nonce of its own. Seeded from the index
    alone, a resumed worker replayed the draws of the first run, and two launchers (or two
    workers given one index) proposed the same points in lockstep.
    """
    if worker_index == 0 and started == 0:
        return spec.budget.seed
    nonce = secrets.randbits(64)
    key = f"{spec.budget.seed}:{worker_index}:{started}:{nonce}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=4).digest(), "little")


def make_sampler(spec: SweepSpec, optimizer: str, worker_index: int = 0, started: int = 0) -> Any:
    """The study's sampler for one worker, seeded by :func:`sampler_seed`.

    TPE in Optuna 5 is multivariate with constant liar: parallel workers see each other's running
    trials and stop proposing the same point. Its random start-up phase is a third of the budget
    (2 to 10 trials), so small budgets still get some model-guided trials.
    """
    import optuna

    seed = sampler_seed(spec, worker_index, started)
    kind = spec.budget.sampler
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if kind == "tpe":
            startup = max(2, min(10, spec.budget.trials // 3))
            return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup)
        if kind == "gp":
            startup = max(2, min(10, spec.budget.trials // 3))
            return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup)
        if kind == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if kind == "grid":
            return optuna.samplers.GridSampler(_grid_space(spec, optimizer), seed=seed)
    raise ValueError(f"unknown sampler {kind!r}")


def checks_duplicates(spec: SweepSpec, optimizer: str) -> bool:
    """Whether a repeated point is discarded: for any sampler but grid, in a space with at least
    one range (``low``/``high``), where an exact repeat can only be a replayed random stream.

    A grid, or a space of choices only, is a finite set of points: a point comes again
    legitimately (a grid smaller than the budget is walked again, as the launcher warns; TPE
    returns to the best of a few choices), and once every point is taken no other is left to
    ask for. Finals take each configuration once whatever the sampler did
    (:func:`sweeps.studies.ranked_trials`).
    """
    if spec.budget.sampler == "grid":
        return False
    return any(getattr(spec.search, key).choices is None for key in spec.search.searched(optimizer))


def _twin(study: Any, trial: Any) -> Any | None:
    """A trial of the study (finished, running or waiting to run) with ``trial``'s point."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)  # fresh from the storage: other workers' too
    mine = next(t for t in trials if t.number == trial.number)
    for other in trials:
        if other.number == mine.number:
            continue
        if other.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING):
            point = other.params
        elif other.state == TrialState.WAITING:
            point = other.system_attrs.get("fixed_params") or {}
        else:
            continue
        if point == mine.params:
            return other
    return None


def _ask_sampled(
    study: Any, spec: SweepSpec, optimizer: str, sampler: Any = None
) -> tuple[Any, bool]:
    """Ask a trial and sample its whole point now (with ``sampler`` if given); the trial, and
    False when it was enqueued (a baseline, a grid point, a retry): that one repeats a point on
    purpose and reads it back when it runs, as before (an invalid point fails the trial then)."""
    own = study.sampler
    if sampler is not None:
        study.sampler = sampler
    try:
        trial = study.ask()
        if "fixed_params" in study._storage.get_trial(trial._trial_id).system_attrs:
            return trial, False
        suggest_params(trial, spec, optimizer)
        return trial, True
    finally:
        study.sampler = own


def ask_trial(study: Any, spec: SweepSpec, optimizer: str, worker_index: int = 0) -> Any:
    """Ask the study for a trial; never one whose sampled point repeats a trial of the study in a
    continuous space (:func:`checks_duplicates`). Enqueued trials (the baseline, grid points,
    retries of failed trials) repeat a point on purpose and are not checked.

    A repeated proposal is failed at once with reason ``surplus`` (status ``duplicate``,
    ``duplicate_of`` its twin's number): it never runs and counts as neither a trial nor a
    failure, so budgets stay exact. The worker's sampler is then seeded anew, since its stream
    runs in lockstep with another's, and the next proposal is a fresh random point of the space
    (a model-guided sampler may well propose the same optimum again). After
    :data:`MAX_RESAMPLES` repeats in a row the point is run after all.
    """
    import optuna
    from optuna.trial import TrialState

    if not checks_duplicates(spec, optimizer):
        return study.ask()
    trial, sampled = _ask_sampled(study, spec, optimizer)
    for _ in range(MAX_RESAMPLES):
        twin = _twin(study, trial) if sampled else None
        if twin is None:
            return trial
        for key, value in (
            ("optimizer", optimizer),
            ("reason", SURPLUS),
            ("status", DUPLICATE),
            ("duplicate_of", twin.number),
        ):
            trial.set_user_attr(key, value)
        study.tell(trial, state=TrialState.FAIL)
        study.sampler = make_sampler(spec, optimizer, worker_index, started_trials(study))
        fresh = optuna.samplers.RandomSampler(seed=secrets.randbits(32))
        trial, sampled = _ask_sampled(study, spec, optimizer, fresh)
    return trial


def make_pruner(spec: SweepSpec, optimizer: str) -> Any:
    """The study's pruner; it sees validation accuracy once per epoch.

    median: a trial stops when its accuracy at an epoch is below the median of earlier trials at
    that epoch, once a fifth of the budget (1 to 5 trials) has finished and past the first third
    of its epochs (first-epoch accuracy says little). hyperband: successive halving brackets from
    1 epoch up to the study's epochs, reduction factor 3.
    """
    import optuna

    kind = spec.budget.pruner
    if kind == "median":
        startup = max(1, min(5, spec.budget.trials // 5))
        # Steps are epochs counted from 1; Optuna never prunes at a step below n_warmup_steps.
        warmup = budget.epochs(spec, optimizer) // 3 + 1
        return optuna.pruners.MedianPruner(n_startup_trials=startup, n_warmup_steps=warmup)
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=1, max_resource=budget.epochs(spec, optimizer), reduction_factor=3
        )
    return optuna.pruners.NopPruner()
