"""Stopping a sweep: Ctrl-C or SIGTERM fail the running trials as ``interrupted`` (exit 130 or
143), finish their W&B runs, and a rerun of the same command redoes them, continuing from their
last epoch checkpoint; in the final stage, the running final stops the same way and resumes.

Only the two-worker SIGTERM run is marked slow (half a minute on two cores): the fast tests here
cover its parts, one worker stopped by Ctrl-C (interrupted, W&B run finished, rerun resumes from
the checkpoint), SIGTERM exiting 143 with a resumable final, and a signal waiting for a shielded
block, and the worker pool passing a stop signal to each of its workers.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time

import pytest
from helpers.sweep import check_exact, finished_states, offline_runs, rerun
from optuna.trial import TrialState

from sweeps.cli import main
from sweeps.engine import launch
from sweeps.engine.launch import WorkerPool
from sweeps.engine.signals import Interrupted, InterruptGuard
from sweeps.layout import RunFolder
from sweeps.run import Slot


def test_ctrl_c_fails_the_trial_as_interrupted_and_a_rerun_continues_it(
    tmp_path, write_spec, start_sweep, running_trials, read_trials
):
    spec = write_spec(optimizers=["sam"], budget={"trials": 2}, base={"train": {"epochs": 3}})
    out = tmp_path / "run"
    sweep = start_sweep(spec, "--out", out, "--stage", "tune")  # one worker, in the launcher
    (running,) = running_trials(out / "optuna.journal", "tiny", ["sam"], out, checkpoint=True)
    os.kill(sweep.pid, signal.SIGINT)
    output, _ = sweep.communicate(timeout=60)
    assert sweep.returncode == 130, output

    (trials,) = read_trials(out / "optuna.journal", "tiny", ["sam"]).values()
    stopped = trials[running.number]
    assert stopped.state == TrialState.FAIL and stopped.user_attrs["reason"] == "interrupted"
    waiting = [t for t in trials if t.state == TrialState.WAITING]
    assert [t.user_attrs["retry_of"] for t in waiting] == [running.number]
    interrupted = offline_runs(out)[stopped.user_attrs["wandb_run_id"]]
    assert interrupted.summary["status"] == "failed"
    assert interrupted.summary["reason"] == "interrupted"
    assert interrupted.exit_code == 1  # the W&B run was finished, not left open
    stopped_dir = out / stopped.user_attrs["trial_dir"]
    done_epochs = (stopped_dir / "metrics.jsonl").read_text().splitlines()
    assert (stopped_dir / "checkpoint.pt").exists()

    assert rerun(spec, out) == 0
    trials = read_trials(out / "optuna.journal", "tiny", ["sam"])
    check_exact(trials, 2)
    (redo,) = [t for t in trials["sam"] if t.user_attrs.get("retry_of") == running.number]
    assert redo.state in finished_states() and redo.params == stopped.params
    k = redo.user_attrs["resumed"]["epoch"]
    assert k >= 1
    history = (out / redo.user_attrs["trial_dir"] / "metrics.jsonl").read_text().splitlines()
    assert history[:k] == done_epochs[:k] and len(history) == 3
    assert redo.value == json.loads(history[-1])["val_acc"]


@pytest.mark.slow
def test_sigterm_stops_every_worker_exits_143_and_a_rerun_resumes(
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
    runs = offline_runs(out)
    assert all(run.run_id for run in runs.values())  # no run was left half started
    for trial in interrupted:  # every W&B run they started was finished with the reason
        run = runs.get(trial.user_attrs["wandb_run_id"])
        if run is None:  # stopped before its W&B run started (while loading data)
            assert not list(out.glob(f"wandb/offline-run-*-{trial.user_attrs['wandb_run_id']}"))
            continue
        assert run.exit_code == 1 and run.summary["reason"] == "interrupted"
    finished = {
        t.user_attrs["trial_dir"]: t.value for t in everything if t.state in finished_states()
    }

    assert rerun(spec, out) == 0
    after = read_trials(out / "optuna.journal", "tiny", optimizers)
    check_exact(after, 3)
    kept = {t.user_attrs["trial_dir"]: t.value for ts in after.values() for t in ts}
    assert {d: kept[d] for d in finished} == finished  # nothing that had finished was redone


def test_a_signal_waits_for_a_shielded_block_then_raises():
    """What keeps a W&B run from being left half started: inside ``raising`` a signal raises at
    once, except within ``shielded``, where it raises as the block ends."""
    steps = []
    with InterruptGuard() as guard, pytest.raises(Interrupted) as stopped, guard.raising():
        with guard.shielded():
            os.kill(os.getpid(), signal.SIGTERM)
            steps.append("the shielded block ran to its end")
        steps.append("never reached")
    assert steps == ["the shielded block ran to its end"]
    assert stopped.value.exit_code == 143


def test_the_worker_pool_passes_a_stop_signal_to_every_worker(tmp_path, monkeypatch):
    popen = launch.subprocess.Popen
    # each "worker" just waits to be stopped: what is checked is who gets the signal
    monkeypatch.setattr(
        launch.subprocess, "Popen", lambda command, **kw: popen(["sleep", "60"], **kw)
    )
    pool = WorkerPool([Slot(0), Slot(1)], RunFolder(tmp_path), "journal")
    pool.start()
    try:
        pool.stop(signal.SIGTERM)
        codes = pool.wait(tick=lambda: None, poll_s=0.05)
    finally:
        for pid in pool.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert codes == {0: -signal.SIGTERM, 1: -signal.SIGTERM}


def test_sigterm_in_the_final_stage_exits_143_and_a_rerun_resumes_the_final(
    tmp_path, write_spec, start_sweep, monkeypatch
):
    spec = write_spec(
        optimizers=["sgd"], budget={"trials": 1}, base={"train": {"epochs": 4}}, final={"seeds": 1}
    )
    out = tmp_path / "run"
    final = out / "finals" / "sgd" / "seed0"
    sweep = start_sweep(spec, "--out", out)
    deadline = time.monotonic() + 120
    while not (final / "checkpoint.pt").exists():
        assert sweep.poll() is None and time.monotonic() < deadline, "no final epoch in time"
        time.sleep(0.1)
    os.kill(sweep.pid, signal.SIGTERM)
    output, _ = sweep.communicate(timeout=60)
    assert sweep.returncode == 143, output
    assert not (final / "summary.json").exists()
    done_epochs = (final / "metrics.jsonl").read_text().splitlines()
    (run,) = [r for r in offline_runs(out).values() if r.job_type == "final"]
    assert run.exit_code == 1 and run.summary["reason"] == "interrupted"  # finished, not left open

    assert main(["sweep", str(spec), "--out", str(out)]) == 0
    summary = json.loads((final / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["start_epoch"] >= 1  # resumed
    history = (final / "metrics.jsonl").read_text().splitlines()
    k = summary["start_epoch"]
    assert len(history) == 4 and history[:k] == done_epochs[:k]
