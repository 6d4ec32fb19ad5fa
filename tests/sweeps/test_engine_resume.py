"""Resuming after the whole sweep was killed (SIGKILL, no clean-up at all): a rerun of the same
command fails the trials left RUNNING, redoes them, and ends with exact budgets, nothing twice."""

from __future__ import annotations

import os
import signal

from optuna.trial import TrialState

from sweeps.cli import main

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def rerun(spec, out) -> int:
    return main(["sweep", str(spec), "--out", str(out), "--stage", "tune"])


def check_exact(trials: dict, budget: int) -> None:
    for opt, ts in trials.items():
        states = [t.state for t in ts]
        assert sum(s in FINISHED for s in states) == budget, opt
        assert TrialState.RUNNING not in states and TrialState.WAITING not in states, opt


def test_rerun_after_the_whole_sweep_was_killed(
    tmp_path, write_spec, start_sweep, running_trials, read_trials
):
    optimizers = ["sgd", "msam"]
    spec = write_spec(optimizers=optimizers, budget={"trials": 2}, base={"train": {"epochs": 3}})
    out = tmp_path / "run"
    sweep = start_sweep(spec, "--out", out, "--workers", 2, "--stage", "tune")
    killed = running_trials(out / "optuna.journal", "tiny", optimizers, out)
    os.killpg(sweep.pid, signal.SIGKILL)  # launcher and workers: nobody cleans up
    sweep.wait(timeout=30)

    before = read_trials(out / "optuna.journal", "tiny", optimizers)
    assert any(t.state == TrialState.RUNNING for ts in before.values() for t in ts)

    assert rerun(spec, out) == 0
    after = read_trials(out / "optuna.journal", "tiny", optimizers)
    check_exact(after, 2)
    for trial in killed:
        opt = trial.user_attrs["optimizer"]
        lost = after[opt][trial.number]
        assert lost.state == TrialState.FAIL and lost.user_attrs["reason"].startswith("worker lost")
    for opt, ts in after.items():  # no point was finished twice
        points = [tuple(sorted(t.params.items())) for t in ts if t.state in FINISHED]
        assert len(points) == len(set(points)), opt
