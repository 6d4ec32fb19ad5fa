"""A sweep worker: take the study furthest from its budget, ask a trial, run it, repeat.

Any number of workers, in any number of processes and machines, share a sweep through its
storage. Picking the study with the most open slots keeps all optimizers progressing together; the
budget rule of :mod:`sweeps.studies` keeps each study at exactly ``budget.trials`` finished
trials. A worker ends when every study is done (or gave up after repeated errors), and stops at
a full disk (``msam.files.DiskFullError``: one line, exit 2), where every next trial would fail
alike; the trial that met it fails as "disk full" and a rerun redoes it.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from msam.files import DISK_FULL, DiskFullError, disk_full_as_error
from sweeps.engine.lifecycle import owner_token, reap_lost_trials, trial_timeout_s
from sweeps.engine.search import ask_trial, make_pruner, make_sampler, started_trials
from sweeps.engine.signals import InterruptGuard
from sweeps.engine.trial import TrialRunner
from sweeps.spec import SweepSpec
from sweeps.studies import SURPLUS, StudyCounts, count_trials, open_study, trials_ahead
from sweeps.tracking import start_service

__all__ = ["Worker", "error_limit"]

#: Seconds between looks at the storage while other workers finish the last trials.
POLL_S = 1.0


def error_limit(budget: int) -> int:
    """Errors (trials that raised) after which a study is given up: a broken config stops."""
    return max(3, budget)


@dataclass
class Worker:
    spec: SweepSpec
    storage: Any
    out: Path
    index: int = 0
    guard: InterruptGuard = field(default_factory=InterruptGuard)
    say: Callable[[str], None] = print
    poll_s: float = POLL_S

    def __post_init__(self) -> None:
        self.studies = {
            opt: open_study(
                self.storage, self.spec.name, opt, pruner=make_pruner(self.spec, opt), create=True
            )
            for opt in self.spec.optimizers
        }
        for opt, study in self.studies.items():  # seeded by what the study has seen: no replay
            study.sampler = make_sampler(self.spec, opt, self.index, started_trials(study))
        start_service(self.spec.base.tracking.wandb.mode)
        self.runner = TrialRunner(self.spec, Path(self.out), self.storage, self.guard, self.index)
        self.owner = {**owner_token(), "index": self.index}

    def counts(self) -> dict[str, StudyCounts]:
        """Each study's trial states, after failing and retrying trials of vanished or hung
        workers."""
        budget = self.spec.budget.trials
        result = {}
        for opt, study in self.studies.items():
            for gone in reap_lost_trials(study, timeout_s=trial_timeout_s(self.spec, study)):
                self.say(f"{opt}: trial {gone.number} failed ({gone.reason}) and re-enqueued")
            result[opt] = count_trials(study.get_trials(deepcopy=False), opt, budget)
        return result

    def _pick(self, counts: dict[str, StudyCounts]) -> str | None:
        limit = error_limit(self.spec.budget.trials)
        order = list(self.studies)
        candidates = [
            opt
            for opt, c in counts.items()
            if c.errors < limit and (c.open_slots > 0 or c.waiting > 0)
        ]
        if not candidates:
            return None

        def priority(opt: str) -> tuple[int, int]:
            # Most open slots first; ties rotate with the worker index so workers spread out.
            return -max(counts[opt].open_slots, 0), (order.index(opt) - self.index) % len(order)

        return min(candidates, key=priority)

    def run(self) -> int:
        """Work until every study is done; 0, or 1 when a study was given up after errors."""
        limit = error_limit(self.spec.budget.trials)
        while True:
            self.guard.check()
            started = time.perf_counter()
            counts = self.counts()
            opt = self._pick(counts)
            if opt is None:
                if all(c.done or c.errors >= limit for c in counts.values()):
                    break
                time.sleep(self.poll_s)  # others are running the last trials; theirs may fail
                continue
            with disk_full_as_error():  # the journal's disk, say: one line, not a traceback
                self.run_one(opt, started)
        given_up = [opt for opt, c in self.counts().items() if not c.done]
        for opt in given_up:
            self.say(
                f"{opt}: gave up after {limit} trials raised errors; see trials/{opt}/*/error.txt"
            )
        return 1 if given_up else 0

    def run_one(self, optimizer: str, started: float) -> str:
        """Ask one trial of ``optimizer``'s study; run it unless it is beyond the budget."""
        study = self.studies[optimizer]
        with warnings.catch_warnings():  # ask/tell beats via storage.heartbeat(), not optimize()
            warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed")
            trial = ask_trial(study, self.spec, optimizer, self.index)
        trial.set_user_attr("worker", self.owner)
        trial.set_user_attr("optimizer", optimizer)
        if trials_ahead(study, trial.number) >= self.spec.budget.trials:
            trial.set_user_attr("reason", SURPLUS)
            trial.set_user_attr("status", SURPLUS)
            from optuna.trial import TrialState

            study.tell(trial, state=TrialState.FAIL)
            time.sleep(0.05)
            return SURPLUS
        status = self.runner.run(study, trial, optimizer, started)
        frozen = study._storage.get_trial(trial._trial_id)
        self.say(_trial_line(optimizer, frozen, status))
        if frozen.user_attrs.get("reason") == DISK_FULL:  # every next trial would fail alike
            where = Path(self.out) / frozen.user_attrs.get("trial_dir", "")
            raise DiskFullError(where, f" ({optimizer} trial {frozen.number} failed)")
        return status


def _trial_line(optimizer: str, frozen: Any, status: str) -> str:
    number = frozen.number
    value = f" val_acc {frozen.value:.4f}" if frozen.value is not None else ""
    reason = frozen.user_attrs.get("reason")
    params = ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in frozen.params.items()
    )
    tail = f" ({reason})" if reason and status != "complete" else ""
    return f"{optimizer} trial {number}: {status}{value} [{params}]{tail}"
