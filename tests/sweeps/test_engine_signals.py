"""Stopping a sweep: Ctrl-C or SIGTERM fail the running trials as ``interrupted`` (exit 130 or
143), finish their W&B runs, and a rerun of the same command redoes them."""

from __future__ import annotations

import os
import signal

from optuna.trial import TrialState

from sweeps.cli import main
from sweeps.tracking import find_offline_runs, read_offline_run

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def rerun(spec, out) -> int:
    return main(["sweep", str(spec), "--out", str(out), "--stage", "tune"])


def check_exact(trials: dict, budget: int) -> None:
    for opt, ts in trials.items():
        states = [t.state for t in ts]
        assert sum(s in FINISHED for s in states) == budget, opt
        assert TrialState.RUNNING not in states and TrialState.WAITING not in states, opt


def test_ctrl_c_fails_the_trial_as_interrupted_and_a_rerun_redoes_it(
    tmp_path, write_spec, start_sweep, running_trials, read_trials
):
    spec = write_spec(optimizers=["sam"], budget={"trials": 2}, base={"train": {"epochs": 3}})
    out = tmp_path / "run"
    sweep = start_sweep(spec, "--out", out, "--stage", "tune")  # one worker, in the launcher
    (running,) = running_trials(out / "optuna.journal", "tiny", ["sam"], out)
    os.kill(sweep.pid, signal.SIGINT)
    output, _ = sweep.communicate(timeout=60)
    assert sweep.returncode == 130, output

    (trials,) = read_trials(out / "optuna.journal", "tiny", ["sam"]).values()
    stopped = trials[running.number]
    assert stopped.state == TrialState.FAIL and stopped.user_attrs["reason"] == "interrupted"
    waiting = [t for t in trials if t.state == TrialState.WAITING]
    assert [t.user_attrs["retry_of"] for t in waiting] == [running.number]
    runs = {r.run_id: r for r in map(read_offline_run, find_offline_runs(out))}
    interrupted = runs[stopped.user_attrs["wandb_run_id"]]
    assert (
        interrupted.summary["status"] == "failed" and interrupted.summary["reason"] == "interrupted"
    )
    assert interrupted.exit_code == 1  # the W&B run was finished, not left open

    assert rerun(spec, out) == 0
    trials = read_trials(out / "optuna.journal", "tiny", ["sam"])
    check_exact(trials, 2)
    (redo,) = [t for t in trials["sam"] if t.user_attrs.get("retry_of") == running.number]
    assert redo.state in FINISHED and redo.params == stopped.params


def test_sigterm_stops_every_worker_and_exits_143(
    tmp_path, write_spec, start_sweep, running_trials, read_trials
):
    optimizers = ["sgd", "sam"]
    spec = write_spec(optimizers=optimizers, budget={"trials": 3}, base={"train": {"epochs": 3}})
    out = tmp_path / "run"
    sweep = start_sweep(spec, "--out", out, "--workers", 2, "--stage", "tune")
    running_trials(out / "optuna.journal", "tiny", optimizers, out)
    os.kill(sweep.pid, signal.SIGTERM)  # the launcher only: it passes the signal on
    output, _ = sweep.communicate(timeout=90)
    assert sweep.returncode == 143, output

    trials = read_trials(out / "optuna.journal", "tiny", optimizers)
    everything = [t for ts in trials.values() for t in ts]
    assert not [t for t in everything if t.state == TrialState.RUNNING]
    interrupted = [t for t in everything if t.user_attrs.get("reason") == "interrupted"]
    assert interrupted and all(t.state == TrialState.FAIL for t in interrupted)
