"""A tiny finished sweep for the final-stage and results tests: a run folder as tuning leaves it
(spec.yaml and a journal whose studies are made with ``optuna.trial.create_trial``, no training),
and the same folder after real final runs (digits, test_resnet, 2 seeds per optimizer)."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import optuna
import yaml
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.storages import JournalStorage

from sweeps.finals import FlatnessSettings, run_finals
from sweeps.run import SweepRun
from sweeps.spec import parse_sweep_spec
from sweeps.storage import JournalFile

optuna.logging.set_verbosity(optuna.logging.WARNING)

NAME = "digits-tiny"
SPEC = {
    "name": NAME,
    "base": {
        "data": {"dataset": "digits", "subset": 320},
        "model": {"name": "test_resnet"},
        "train": {"epochs": 1, "batch_size": 64, "device": "cpu"},
        "tracking": {"wandb": {"mode": "disabled"}},
    },
    "optimizers": ["sgd", "sam", "msam"],
    "search": {
        "lr": {"low": 0.01, "high": 0.5, "log": True},
        "rho": {"low": 0.01, "high": 0.2, "log": True},
        "micro_batches": {"choices": [2, 4]},
    },
    "budget": {"trials": 5},
    "final": {
        "top_k": 1,
        "seeds": 2,
        "epochs": 1,
        # Small enough for a CPU test, large enough to exercise every metric.
        "flatness": {"images": 64, "batch_size": 32, "iters": 2, "samples": 2},
    },
}
DISTRIBUTIONS = {
    "lr": FloatDistribution(0.01, 0.5, log=True),
    "rho": FloatDistribution(0.01, 0.2, log=True),
    "micro_batches": CategoricalDistribution([2, 4]),
}
# (lr, rho, micro_batches, validation accuracy) of the complete trials of every study
POINTS = [(0.05, 0.05, 2, 0.80), (0.2, 0.1, 2, 0.90), (0.02, 0.02, 4, 0.70)]


def spec_of(**changes) -> object:
    raw = json.loads(json.dumps(SPEC))
    for dotted, value in changes.items():
        node = raw
        *parents, last = dotted.split(".")
        for key in parents:
            node = node[key]
        node[last] = value
    return parse_sweep_spec(raw)


#: The flatness settings of ``SPEC`` (its ``final.flatness``).
FLATNESS = FlatnessSettings.from_spec(spec_of())


def journal(run_dir: Path) -> JournalStorage:
    return JournalStorage(JournalFile(str(run_dir / "optuna.journal")))


def add_trials(storage, spec, optimizer: str, points, *, pruned: int = 1, failed: int = 1):
    """A study ``<name>/<optimizer>`` as a sweep leaves it: complete, pruned and failed trials."""
    study = optuna.create_study(
        storage=storage,
        study_name=f"{spec.name}/{optimizer}",
        direction="maximize",
        load_if_exists=True,
    )
    keys = spec.search.searched(optimizer)
    for lr, rho, m, value in points:
        params = {k: v for k, v in {"lr": lr, "rho": rho, "micro_batches": m}.items() if k in keys}
        study.add_trial(
            optuna.trial.create_trial(
                params=params,
                distributions={k: DISTRIBUTIONS[k] for k in keys},
                value=value,
                intermediate_values={1: value},
                user_attrs={"epochs": 1},
            )
        )
    for _ in range(pruned):
        study.add_trial(
            optuna.trial.create_trial(
                params={k: DISTRIBUTIONS[k].low for k in keys if k != "micro_batches"},
                distributions={k: DISTRIBUTIONS[k] for k in keys if k != "micro_batches"},
                state=optuna.trial.TrialState.PRUNED,
                intermediate_values={1: 0.1},
            )
        )
    for _ in range(failed):
        study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL))
    return study


def make_sweep(run_dir: Path, spec=None, points=POINTS) -> tuple[object, JournalStorage]:
    """A run folder as tuning leaves it: spec.yaml and a journal with one study per optimizer."""
    spec = spec or spec_of()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "spec.yaml").write_text(yaml.safe_dump(spec.to_dict(), sort_keys=False))
    storage = journal(run_dir)
    for optimizer in spec.optimizers:
        add_trials(storage, spec, optimizer, points)
    return spec, storage


@dataclass(frozen=True)
class TinySweep:
    """A finished tiny sweep: its spec, its folder and the records of its finals."""

    spec: object
    run_dir: Path
    records: list


def build_tiny_sweep(run_dir: Path) -> TinySweep:
    """A finished tiny sweep in ``run_dir``: 3 studies and 2 seeds x 3 optimizers of real final
    runs (a few seconds on one CPU thread). The ``tiny_sweep`` fixture builds it once per session;
    tests that change it work on a copy (``copy_sweep``)."""
    spec, storage = make_sweep(run_dir)
    result = run_finals(SweepRun.create(spec, out=run_dir), storage, verbose=False)
    return TinySweep(spec, run_dir, list(result.records))


def copy_sweep(sweep: TinySweep, dest: Path) -> Path:
    target = dest / NAME
    shutil.copytree(sweep.run_dir, target)
    return target
