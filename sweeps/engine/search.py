"""What one study searches and how: the sampled space, the baseline point, samplers and pruners.

Every optimizer's study gets the same sampler kind, seed and pruner, so SGD, SAM (Foret et al.,
2021) and mSAM (Behdin et al., 2023) are tuned with equal budgets. The space is conditional on the
optimizer: ``lr`` always, ``rho`` for sam and msam, ``micro_batches`` for msam only.
"""

from __future__ import annotations

import math
import random
import warnings
from itertools import product
from typing import Any

from sweeps import budget
from sweeps.spec import ParamSpace, SweepSpec

__all__ = [
    "baseline_params",
    "grid_points",
    "make_pruner",
    "make_sampler",
    "suggest_params",
]


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


def make_sampler(spec: SweepSpec, optimizer: str, worker_index: int) -> Any:
    """The study's sampler, seeded with ``budget.seed + worker_index`` so workers differ.

    TPE in Optuna 5 is multivariate with constant liar: parallel workers see each other's running
    trials and stop proposing the same point. Its random start-up phase is a third of the budget
    (2 to 10 trials), so small budgets still get some model-guided trials.
    """
    import optuna

    seed = spec.budget.seed + worker_index
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
