"""Several worker processes on one journal file: exact budgets, and a worker killed mid-trial is
noticed by the others, its trial failed and redone with the same parameters."""

from __future__ import annotations

import os
import signal

from optuna.trial import TrialState

OPTIMIZERS = ["sgd", "sam", "msam"]


def test_two_workers_keep_exact_budgets_when_one_is_killed(
    tmp_path, write_spec, start_sweep, running_trials, read_trials
):
    spec = write_spec(base={"train": {"epochs": 3}}, budget={"trials": 2})
    out = tmp_path / "run"
    journal = out / "optuna.journal"
    sweep = start_sweep(spec, "--out", out, "--workers", 2, "--stage", "tune")

    victim = running_trials(journal, "tiny", OPTIMIZERS, out)[0]
    os.kill(victim.user_attrs["worker"]["pid"], signal.SIGKILL)
    output, _ = sweep.communicate(timeout=150)
    assert sweep.returncode == 0, output
    assert "exited with status -9" in output

    trials = read_trials(journal, "tiny", OPTIMIZERS)
    for opt, ts in trials.items():
        states = [t.state for t in ts]
        assert states.count(TrialState.COMPLETE) + states.count(TrialState.PRUNED) == 2, opt
        assert TrialState.RUNNING not in states and TrialState.WAITING not in states
    assert len({t.user_attrs["worker"]["pid"] for ts in trials.values() for t in ts}) == 2

    lost = next(t for t in trials[victim.user_attrs["optimizer"]] if t.number == victim.number)
    assert lost.state == TrialState.FAIL and lost.user_attrs["reason"].startswith("worker lost")
    (redo,) = [
        t
        for t in trials[victim.user_attrs["optimizer"]]
        if t.user_attrs.get("retry_of") == lost.number
    ]
    assert redo.state in (TrialState.COMPLETE, TrialState.PRUNED) and redo.params == lost.params
    assert (out / "spec.yaml").exists()
    assert sorted(p.name for p in (out / "logs").iterdir()) == ["worker-0.log", "worker-1.log"]
