"""Which final runs a sweep asks for: the ``final.top_k`` best configurations per optimizer
(one per distinct configuration, by validation accuracy), each under ``final.seeds`` seeds.

Seed ``k`` gives every optimizer the same initial weights and the same batches, so SGD, SAM
(Foret et al., 2021) and mSAM (Behdin et al., 2023) pair by seed (``sweeps.results.stats``).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sweeps import budget
from sweeps.layout import RunFolder
from sweeps.spec import SweepSpec
from sweeps.studies import open_study, ranked_trials, study_name

__all__ = ["FinalJob", "plan_finals"]


@dataclass(frozen=True)
class FinalJob:
    """One final run to do: a ranked configuration of one optimizer under one seed."""

    optimizer: str
    rank: int
    seed: int
    trial: int
    value: float
    params: Mapping[str, Any]
    epochs: int
    study: str
    dir: Path
    cfg: Any  # msam.config.TrainConfig

    def identity(self) -> dict[str, Any]:
        """What makes a result on disk this job's: written as final.json before training."""
        return {
            "study": self.study,
            "optimizer": self.optimizer,
            "rank": self.rank,
            "trial": self.trial,
            "val_acc": self.value,
            "params": dict(self.params),
            "seed": self.seed,
            "epochs": self.epochs,
        }

    def owns(self, on_disk: Mapping[str, Any] | None) -> bool:
        """Whether a recorded ``final.json`` (None: nothing recorded yet) is this job's."""
        if on_disk is None:
            return True
        mine = json.loads(json.dumps(self.identity()))  # compare as stored (JSON types)
        keys = ("study", "trial", "params", "seed", "epochs")
        return all(on_disk.get(k) == mine.get(k) for k in keys)


def ranked_configurations(spec: SweepSpec, storage: Any) -> dict[str, list[Any]]:
    """Each optimizer's ``final.top_k`` best COMPLETE trials (a warning where there is none)."""
    out: dict[str, list[Any]] = {}
    for optimizer in spec.optimizers:
        study = open_study(storage, spec.name, optimizer) if storage is not None else None
        trials = study.get_trials(deepcopy=False) if study is not None else []
        out[optimizer] = ranked_trials(trials, k=spec.final.top_k)
        if not out[optimizer]:
            warnings.warn(
                f"no complete trial in study {study_name(spec.name, optimizer)}: no final runs "
                f"for {optimizer}",
                stacklevel=2,
            )
    return out


def plan_finals(spec: SweepSpec, storage: Any, folder: RunFolder) -> list[FinalJob]:
    """Every final the spec asks for, seed-major: seed 0 of all optimizers comes first, so an
    interrupted stage still leaves complete pairs to compare."""
    ranked = ranked_configurations(spec, storage)
    jobs = []
    for seed in range(spec.final.seeds):
        for rank in range(1, spec.final.top_k + 1):
            for optimizer, trials in ranked.items():
                if rank > len(trials):
                    continue
                trial = trials[rank - 1]
                epochs = budget.epochs(spec, optimizer, final=True)
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
                        study=study_name(spec.name, optimizer),
                        dir=folder.final(optimizer, rank, seed),
                        cfg=cfg,
                    )
                )
    return jobs
