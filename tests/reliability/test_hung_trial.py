"""A trial that stops making progress (its worker stopped with SIGSTOP, or a hung main thread
beside a live heartbeat thread) is failed as "timed out" once ``budget.trial_timeout`` seconds
pass without an epoch finishing, and redone with the same parameters from its last checkpoint;
the launcher stops a hung worker of its own once the other workers are done, and a worker that
wakes up after its trial was taken from it records nothing more into the storage or the redo.

The SIGSTOP run starts a real two-worker sweep (about half a minute on two cores), so it is
marked slow; the fast tests cover its parts: a RUNNING trial with stale progress redone by a
rerun, and a worker whose trial is timed out mid-training giving it up at its next epoch.
"""

from __future__ import annotations

import json
import os
import signal
import time

import optuna
import pytest
from helpers.sweep import check_exact, finished_states, offline_runs, open_storage, rerun
from optuna.trial import TrialState

from sweeps.engine import trial as trial_module
from sweeps.engine.lifecycle import PROGRESS, owner_token, reap_lost_trials

OPTIMIZERS = ["sgd", "sam"]


def lines(out, trial, name="metrics.jsonl") -> list[str]:
    return (out / trial.user_attrs["trial_dir"] / name).read_text().splitlines()


@pytest.mark.timeout(180)  # without the watchdog the rerun would wait for the trial for ever
@pytest.mark.parametrize("kind", ["journal", "postgresql"])
def test_a_trial_without_progress_is_failed_as_timed_out_and_redone(
    tmp_path, write_spec, read_trials, request, kind
):
    """On PostgreSQL the trial's heartbeat is fresh, as a hung main thread's would be while its
    heartbeat thread beats on: only the progress stamp tells that it hangs."""
    spec = write_spec(optimizers=["sgd"], budget={"trials": 1}, base={"train": {"epochs": 1}})
    out = tmp_path / "run"
    url = request.getfixturevalue("pg_url") if kind == "postgresql" else out / "optuna.journal"
    storage = ["--storage", str(url)] if kind == "postgresql" else []
    assert rerun(spec, out, *storage) == 0
    # a trial whose worker lives on but made no progress for 100 s (stopped, or hung)
    study = optuna.load_study(study_name="tiny/sgd", storage=open_storage(url))
    trial = study.ask()
    lr = trial.suggest_float("lr", 0.02, 0.3, log=True)
    trial.set_user_attr("optimizer", "sgd")
    trial.set_user_attr("worker", {**owner_token(), "index": 1})
    trial.set_user_attr(PROGRESS, {"at": time.time() - 100, "epoch": 0, "slowest_s": 0.0})
    if kind == "postgresql":
        study._storage.record_heartbeat(trial._trial_id)

    more = ["--set", "budget.trials=2", "--set", "budget.trial_timeout=30"]
    assert rerun(spec, out, *storage, *more) == 0
    trials = read_trials(url, "tiny", ["sgd"])
    check_exact(trials, 2)
    timed_out = trials["sgd"][trial.number]
    assert timed_out.state == TrialState.FAIL
    assert timed_out.user_attrs["reason"] == "timed out (no epoch finished in 30 s)"
    (redo,) = [t for t in trials["sgd"] if t.user_attrs.get("retry_of") == trial.number]
    assert redo.state in finished_states() and redo.params == {"lr": lr}
    assert redo.user_attrs["lost_retries"] == 1


def test_a_worker_whose_trial_timed_out_gives_it_up_and_leaves_the_redo_alone(
    tmp_path, write_spec, read_trials, monkeypatch
):
    """What a stopped worker does when it resumes: at its next epoch it finds its trial failed
    as timed out, tells nothing, finishes its W&B run as timed out and leaves its checkpoint to
    the redo, which continues from it in its own folder."""
    spec = write_spec(
        optimizers=["sgd"],
        budget={"trials": 1, "trial_timeout": 50},
        base={"train": {"epochs": 3}},
    )
    out = tmp_path / "run"
    report = trial_module.PruningCallback.on_epoch_end
    taken = []

    def then_time_out(self, epoch, metrics):
        answer = report(self, epoch, metrics)
        if not taken:  # after epoch 1, the worker "stops" for 100 s and a reaper fails its trial
            study, trial = self.trial.study, self.trial
            old = {"at": time.time() - 100, "epoch": 1, "slowest_s": 1.0}
            study._storage.set_trial_user_attr(trial._trial_id, PROGRESS, old)
            taken.extend(reap_lost_trials(study, timeout_s=50))
        return answer

    monkeypatch.setattr(trial_module.PruningCallback, "on_epoch_end", then_time_out)
    assert rerun(spec, out) == 0
    assert [r.number for r in taken] == [0]

    (trials,) = read_trials(out / "optuna.journal", "tiny", ["sgd"]).values()
    check_exact({"sgd": trials}, 1)
    first, redo = trials
    assert first.state == TrialState.FAIL
    assert first.user_attrs["reason"] == "timed out (no epoch finished in 50 s)"
    assert first.user_attrs["status"] == "failed" and "seconds" not in first.user_attrs
    assert redo.state == TrialState.COMPLETE and redo.params == first.params
    assert redo.user_attrs["retry_of"] == 0
    # the stopped worker trained epoch 2 before it noticed: the redo continues after it
    assert redo.user_attrs["resumed"] == {"trial_dir": first.user_attrs["trial_dir"], "epoch": 2}
    assert redo.user_attrs["trial_dir"] != first.user_attrs["trial_dir"]
    old_dir, new_dir = out / first.user_attrs["trial_dir"], out / redo.user_attrs["trial_dir"]
    assert sorted(p.name for p in old_dir.iterdir()) == ["metrics.jsonl"]  # no error, no timing
    history = lines(out, redo)
    assert len(history) == 3 and history[:2] == lines(out, first)
    assert redo.value == json.loads(history[-1])["val_acc"]
    assert not (new_dir / "checkpoint.pt").exists()

    runs = offline_runs(out)
    assert len(runs) == 2
    given_up = runs[first.user_attrs["wandb_run_id"]]
    assert given_up.summary["status"] == "failed" and given_up.exit_code == 1
    assert given_up.summary["reason"] == first.user_attrs["reason"]
    assert runs[redo.user_attrs["wandb_run_id"]].summary["status"] == "complete"


@pytest.mark.slow
def test_a_stopped_worker_is_timed_out_its_trial_redone_and_the_worker_stopped(
    tmp_path, write_spec, start_sweep, running_trials, read_trials
):
    timeout = 12  # well above a tiny epoch on two busy cores, well below the test's patience
    spec = write_spec(
        optimizers=OPTIMIZERS,
        budget={"trials": 2, "trial_timeout": timeout},
        base={"train": {"epochs": 3}},
    )
    out = tmp_path / "run"
    journal = out / "optuna.journal"
    sweep = start_sweep(spec, "--out", out, "--workers", 2, "--stage", "tune")
    victim = running_trials(journal, "tiny", OPTIMIZERS, out, checkpoint=True)[0]
    index = victim.user_attrs["worker"]["index"]
    os.kill(victim.user_attrs["worker"]["pid"], signal.SIGSTOP)  # hangs mid-trial, alive

    output, _ = sweep.communicate(timeout=150)
    assert sweep.returncode == 0, output
    assert f"worker {index} hung" in output and "stopped" in output, output

    trials = read_trials(journal, "tiny", OPTIMIZERS)
    check_exact(trials, 2)
    study = trials[victim.user_attrs["optimizer"]]
    stopped = study[victim.number]
    assert stopped.state == TrialState.FAIL
    assert stopped.user_attrs["reason"] == f"timed out (no epoch finished in {timeout} s)"
    (redo,) = [t for t in study if t.user_attrs.get("retry_of") == victim.number]
    assert redo.state in finished_states() and redo.params == stopped.params
    assert redo.user_attrs["resumed"]["trial_dir"] == stopped.user_attrs["trial_dir"]
    assert len(lines(out, redo)) == 3
    # the stopped worker was ended with its W&B run finished, as timed out
    run = offline_runs(out)[stopped.user_attrs["wandb_run_id"]]
    assert run.exit_code == 1 and run.summary["reason"] == stopped.user_attrs["reason"]
