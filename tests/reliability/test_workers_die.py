"""Workers killed with SIGKILL (no clean-up at all): the sweep loses nothing.

A rerun of the same command fails the trials left RUNNING, redoes them with the same parameters,
continuing from the dead trial's last epoch checkpoint, and ends with exact budgets; trials that
had finished, and their W&B runs, are untouched. While a sweep runs, the other workers notice a
dead one and redo its trial themselves.

Both SIGKILL runs start real two-worker sweeps and take half a minute to over a minute on two
cores, so they are marked slow. The fast ``test_a_dead_workers_trial_is_failed_as_lost_and_redone``
covers what they rely on in a second: a RUNNING trial whose worker process is gone is failed as
``worker lost`` and redone with the same parameters, and the budget comes out exact; continuing
from the dead trial's checkpoint is covered fast by the Ctrl-C test in test_signals.py.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess

import optuna
import pytest
from helpers.sweep import check_exact, finished_states, offline_runs, open_storage, rerun
from optuna.trial import TrialState

OPTIMIZERS = ["sgd", "sam", "msam"]


def metrics_lines(out, trial) -> list[str]:
    return (out / trial.user_attrs["trial_dir"] / "metrics.jsonl").read_text().splitlines()


def test_a_dead_workers_trial_is_failed_as_lost_and_redone(tmp_path, write_spec, read_trials):
    spec = write_spec(optimizers=["sgd"], budget={"trials": 1}, base={"train": {"epochs": 1}})
    out = tmp_path / "run"
    assert rerun(spec, out) == 0
    # a trial a worker took and then died in: RUNNING, owned by a process that has ended
    study = optuna.load_study(study_name="tiny/sgd", storage=open_storage(out / "optuna.journal"))
    trial = study.ask()
    lr = trial.suggest_float("lr", 0.02, 0.3, log=True)
    ended = subprocess.Popen(["true"])
    ended.wait()
    trial.set_user_attr("optimizer", "sgd")
    trial.set_user_attr("worker", {"pid": ended.pid, "host": socket.gethostname(), "index": 0})

    assert rerun(spec, out, "--set", "budget.trials=2") == 0
    trials = read_trials(out / "optuna.journal", "tiny", ["sgd"])
    check_exact(trials, 2)
    lost = trials["sgd"][trial.number]
    assert lost.state == TrialState.FAIL and lost.user_attrs["reason"].startswith("worker lost")
    (redo,) = [t for t in trials["sgd"] if t.user_attrs.get("retry_of") == trial.number]
    assert redo.state in finished_states() and redo.params == {"lr": lr}


@pytest.mark.slow
def test_killed_sweep_resumes_and_dead_trials_continue_from_their_checkpoints(
    tmp_path, write_spec, start_sweep, running_trials, read_trials
):
    optimizers = ["sgd", "msam"]
    epochs = 4
    spec = write_spec(optimizers=optimizers, budget={"trials": 3}, base={"train": {"epochs": 4}})
    out = tmp_path / "run"
    journal = out / "optuna.journal"
    sweep = start_sweep(spec, "--out", out, "--workers", 2, "--stage", "tune")
    running_trials(journal, "tiny", optimizers, out, checkpoint=True)
    os.killpg(sweep.pid, signal.SIGKILL)  # launcher and workers: nobody cleans up
    sweep.wait(timeout=30)

    before = read_trials(journal, "tiny", optimizers)
    dead = [t for ts in before.values() for t in ts if t.state == TrialState.RUNNING]
    with_checkpoint = {
        t.user_attrs["trial_dir"]
        for t in dead
        if (out / t.user_attrs["trial_dir"] / "checkpoint.pt").exists()
    }
    assert with_checkpoint, "no trial had an epoch checkpoint when it was killed"
    dead_metrics = {t.user_attrs["trial_dir"]: metrics_lines(out, t) for t in dead}
    done = {
        (o, t.number): t for o, ts in before.items() for t in ts if t.state in finished_states()
    }
    runs_before = offline_runs(out)

    assert rerun(spec, out) == 0
    after = read_trials(journal, "tiny", optimizers)
    check_exact(after, 3)

    # what had finished is exactly as it was, and so are its W&B runs
    runs_after = offline_runs(out)
    for (opt, number), trial in done.items():
        again = after[opt][number]
        assert (again.state, again.value, again.params) == (trial.state, trial.value, trial.params)
        run_id = trial.user_attrs["wandb_run_id"]
        assert runs_after[run_id].summary == runs_before[run_id].summary
        assert runs_after[run_id].exit_code == 0

    for trial in dead:
        opt = trial.user_attrs["optimizer"]
        lost = after[opt][trial.number]
        assert lost.state == TrialState.FAIL and lost.user_attrs["reason"].startswith("worker lost")
        (redo,) = [t for t in after[opt] if t.user_attrs.get("retry_of") == trial.number]
        assert redo.state == TrialState.COMPLETE and redo.params == lost.params
        history = metrics_lines(out, redo)
        assert len(history) == epochs
        assert redo.value == json.loads(history[-1])["val_acc"]
        run = runs_after[redo.user_attrs["wandb_run_id"]]
        assert len(run.history) == epochs and run.exit_code == 0  # resumed epochs logged too
        assert not (out / redo.user_attrs["trial_dir"] / "checkpoint.pt").exists()
        if trial.user_attrs["trial_dir"] not in with_checkpoint:
            assert "resumed" not in redo.user_attrs
            continue
        resumed = redo.user_attrs["resumed"]
        assert resumed["trial_dir"] == trial.user_attrs["trial_dir"] and resumed["epoch"] >= 1
        k = resumed["epoch"]
        # continued, not started over: the first k epochs are the dead trial's own
        assert history[:k] == dead_metrics[trial.user_attrs["trial_dir"]][:k]
        assert run.config["trial"]["resumed"] == resumed


@pytest.mark.slow
def test_other_workers_redo_the_trial_of_a_killed_one(
    tmp_path, write_spec, start_sweep, running_trials, read_trials
):
    spec = write_spec(base={"train": {"epochs": 3}}, budget={"trials": 2})
    out = tmp_path / "run"
    journal = out / "optuna.journal"
    sweep = start_sweep(spec, "--out", out, "--workers", 2, "--stage", "tune")

    victim = running_trials(journal, "tiny", OPTIMIZERS, out, checkpoint=True)[0]
    os.kill(victim.user_attrs["worker"]["pid"], signal.SIGKILL)
    output, _ = sweep.communicate(timeout=150)
    assert sweep.returncode == 0, output
    assert "exited with status -9" in output

    trials = read_trials(journal, "tiny", OPTIMIZERS)
    check_exact(trials, 2)
    assert len({t.user_attrs["worker"]["pid"] for ts in trials.values() for t in ts}) == 2

    study = trials[victim.user_attrs["optimizer"]]
    lost = study[victim.number]
    assert lost.state == TrialState.FAIL and lost.user_attrs["reason"].startswith("worker lost")
    (redo,) = [t for t in study if t.user_attrs.get("retry_of") == lost.number]
    assert redo.state in finished_states() and redo.params == lost.params
    assert redo.user_attrs["resumed"]["trial_dir"] == lost.user_attrs["trial_dir"]
    assert (out / "spec.yaml").exists()
    assert sorted(p.name for p in (out / "logs").iterdir()) == ["worker-0.log", "worker-1.log"]
