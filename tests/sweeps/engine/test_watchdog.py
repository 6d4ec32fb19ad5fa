"""The hung-trial watchdog in pieces: ``budget.trial_timeout`` (its values, its ``auto`` rule, a
rerun may change it, specs recorded without it still rerun), the progress a trial records, the
reaper failing a trial without progress as timed out, and the worker pool stopping a worker that
hangs once every other worker is done."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import time

import optuna
import pytest
import yaml
from helpers import REPO
from helpers.sweep import TINY_SPEC, check_exact, merge, open_storage, rerun
from optuna.trial import TrialState

from msam.config import first_difference
from msam.errors import UserError
from sweeps.engine import launch, lifecycle
from sweeps.engine.launch import WorkerPool
from sweeps.engine.lifecycle import (
    AUTO_TIMEOUT_FACTOR,
    AUTO_TIMEOUT_FLOOR_S,
    FIRST_EPOCH_TIMEOUT_S,
    PROGRESS,
    hung_workers,
    owner_token,
    reap_lost_trials,
    trial_timeout_s,
)
from sweeps.engine.sweep import RERUN_MAY_CHANGE, check_same_sweep
from sweeps.layout import RunFolder
from sweeps.run import Slot
from sweeps.spec import Budget, load_sweep_spec, parse_sweep_spec

RECORDED = REPO / "tests" / "fixtures" / "run-9abd481"


def tiny_spec(**budget):
    return parse_sweep_spec(merge(TINY_SPEC, {"budget": budget}))


def memory_study():
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(direction="maximize")


# ----------------------------------------------------------------------------- the setting


def test_trial_timeout_takes_auto_null_or_seconds():
    assert tiny_spec().budget.trial_timeout == "auto"
    assert tiny_spec(trial_timeout=None).budget.trial_timeout is None
    assert tiny_spec(trial_timeout=90).budget.trial_timeout == 90.0
    assert tiny_spec(trial_timeout=2.5).to_dict()["budget"]["trial_timeout"] == 2.5
    for bad in (0, -5, True, "soon", 10**9):
        with pytest.raises(UserError, match="budget.trial_timeout") as info:
            tiny_spec(trial_timeout=bad)
        assert "\n" not in str(info.value)


def test_the_auto_rule_is_what_the_setting_says():
    text = Budget.model_fields["trial_timeout"].description
    for number in (AUTO_TIMEOUT_FACTOR, AUTO_TIMEOUT_FLOOR_S, FIRST_EPOCH_TIMEOUT_S):
        assert str(number) in text


def test_auto_is_a_multiple_of_the_slowest_recorded_gap_with_a_floor():
    spec = tiny_spec()
    study = memory_study()
    # nothing timed yet: only the first epoch's cap
    assert trial_timeout_s(spec, study) == FIRST_EPOCH_TIMEOUT_S
    for slowest in (1.0, 7.5):
        trial = study.ask()
        trial.set_user_attr(PROGRESS, {"at": time.time(), "epoch": 2, "slowest_s": slowest})
        study.tell(trial, 0.5)
    assert trial_timeout_s(spec, study) == AUTO_TIMEOUT_FLOOR_S  # 10 x 7.5 s is below the floor
    slow = study.ask()
    slow.set_user_attr(PROGRESS, {"at": time.time(), "epoch": 1, "slowest_s": 300.0})
    assert trial_timeout_s(spec, study) == AUTO_TIMEOUT_FACTOR * 300.0
    # a worker whose trial was taken from it records its epoch in the study
    study.set_user_attr("slowest_progress_s", 1000.0)
    assert trial_timeout_s(spec, study) == AUTO_TIMEOUT_FACTOR * 1000.0
    assert trial_timeout_s(tiny_spec(trial_timeout=None), study) is None
    assert trial_timeout_s(tiny_spec(trial_timeout=42), study) == 42.0


# ----------------------------------------------------------------------------- the reaper


def running_trial(study, *, progress_age_s=None, owner=None):
    trial = study.ask()
    trial.suggest_float("lr", 0.02, 0.3, log=True)
    trial.set_user_attr("worker", owner or owner_token())
    if progress_age_s is not None:
        stamp = {"at": time.time() - progress_age_s, "epoch": 1, "slowest_s": 1.0}
        trial.set_user_attr(PROGRESS, stamp)
    return trial


def test_the_reaper_fails_and_redoes_a_trial_without_progress_only():
    study = memory_study()
    fresh = running_trial(study, progress_age_s=1)
    stale = running_trial(study, progress_age_s=100)
    unstamped = running_trial(study)  # no progress yet: judged from its start
    reaped = reap_lost_trials(study, timeout_s=50)
    assert [(r.number, r.reason) for r in reaped] == [
        (stale.number, "timed out (no epoch finished in 50 s)")
    ]
    states = {t.number: t.state for t in study.get_trials()}
    assert states[fresh.number] == states[unstamped.number] == TrialState.RUNNING
    assert states[stale.number] == TrialState.FAIL
    (redo,) = [t for t in study.get_trials() if t.state == TrialState.WAITING]
    assert redo.user_attrs["retry_of"] == stale.number and redo.user_attrs["lost_retries"] == 1
    assert reap_lost_trials(study, timeout_s=None) == []  # off: nothing else is reaped


def test_hung_workers_are_those_whose_latest_trial_timed_out():
    study = memory_study()
    me = owner_token()
    earlier = running_trial(study, progress_age_s=100, owner=me)
    reap_lost_trials(study, timeout_s=50)
    assert hung_workers([study]) == {
        me["pid"]: f"trial {earlier.number} timed out (no epoch finished in 50 s)"
    }
    running_trial(study, progress_age_s=1, owner=me)  # it went on with another trial
    assert hung_workers([study]) == {}
    elsewhere = {"host": socket.gethostname() + "-not", "pid": 1, "start": None}
    running_trial(study, progress_age_s=100, owner=elsewhere)
    reap_lost_trials(study, timeout_s=50)
    assert hung_workers([study]) == {}  # not a process of this machine


# ----------------------------------------------------------------------------- reruns


def test_specs_recorded_without_trial_timeout_still_rerun():
    recorded = yaml.safe_load((RECORDED / "spec.yaml").read_text())
    assert "trial_timeout" not in recorded["budget"]
    now = load_sweep_spec(RECORDED / "spec.yaml").to_dict()
    assert now["budget"]["trial_timeout"] == "auto"
    assert first_difference(recorded, now, ignore=RERUN_MAY_CHANGE) is None
    assert "budget.trial_timeout" in RERUN_MAY_CHANGE


def test_a_rerun_may_change_trial_timeout(tmp_path, write_spec, read_trials):
    spec = write_spec(optimizers=["sgd"], budget={"trials": 1}, base={"train": {"epochs": 1}})
    out = tmp_path / "run"
    assert rerun(spec, out) == 0
    # studies made before the setting existed recorded their spec without it
    study = optuna.load_study(study_name="tiny/sgd", storage=open_storage(out / "optuna.journal"))
    old = study.user_attrs["spec"]
    del old["budget"]["trial_timeout"]
    study.set_user_attr("spec", old)
    check_same_sweep(load_sweep_spec(spec, ["budget.trial_timeout=60"]), RunFolder(out))
    assert rerun(spec, out, "--set", "budget.trials=2", "--set", "budget.trial_timeout=60") == 0
    trials = read_trials(out / "optuna.journal", "tiny", ["sgd"])
    check_exact(trials, 2)
    # every trial recorded its progress: its start and each epoch's end
    for trial in trials["sgd"]:
        progress = trial.user_attrs[PROGRESS]
        assert progress["epoch"] == 1 and 0 < progress["slowest_s"] < 600
        assert progress["at"] <= time.time()


# ----------------------------------------------------------------------------- the worker pool


@pytest.fixture
def sleeping_pool(tmp_path, monkeypatch):
    """A pool whose two "workers" are given commands: what is checked is who the pool stops."""
    popen = launch.subprocess.Popen
    ready = tmp_path / "ignoring-sigterm"
    commands = iter(
        [
            [sys.executable, "-c", "import time; time.sleep(3)"],  # finishes its work
            [  # hangs, and would not even end on SIGTERM
                sys.executable,
                "-c",
                "import pathlib, signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
                " pathlib.Path(sys.argv[1]).touch(); time.sleep(120)",
                str(ready),
            ],
        ]
    )
    monkeypatch.setattr(
        launch.subprocess, "Popen", lambda command, **kw: popen(next(commands), **kw)
    )
    monkeypatch.setattr(launch, "HUNG_STOP_S", 1.0)
    monkeypatch.setattr(launch, "WATCH_S", 0.1)
    pool = WorkerPool([Slot(0), Slot(1)], RunFolder(tmp_path), "journal")
    pool.start()
    deadline = time.monotonic() + 30
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    yield pool
    for pid in pool.pids():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for proc in pool.procs.values():
        proc.wait()


def test_the_pool_stops_a_hung_worker_once_the_others_are_done(sleeping_pool):
    pool = sleeping_pool
    hung_pid = pool.procs[1].pid
    os.kill(hung_pid, signal.SIGSTOP)
    seen = []

    def watch():
        seen.append({i: p.poll() for i, p in pool.procs.items()})
        return {hung_pid: "sgd trial 3 timed out (no epoch finished in 5 s)"}

    t0 = time.monotonic()
    codes = pool.wait(tick=lambda: None, poll_s=0.05, watch=watch)
    assert time.monotonic() - t0 < 30
    assert codes == {0: 0, 1: -signal.SIGKILL}
    assert pool.stopped_hung == {1: "sgd trial 3 timed out (no epoch finished in 5 s)"}
    # while the other worker still ran, the hung one was left alone
    assert any(s[0] is None and s[1] is None for s in seen)


def test_the_pool_leaves_a_worker_that_no_longer_hangs(sleeping_pool):
    pool = sleeping_pool
    calls = []

    def watch():
        calls.append(1)
        if len(calls) > 20:  # it ended on its own meanwhile
            os.kill(pool.procs[1].pid, signal.SIGKILL)
        return {}

    codes = pool.wait(tick=lambda: None, poll_s=0.05, watch=watch)
    assert codes[0] == 0 and pool.stopped_hung == {}


def test_no_watch_keeps_the_pool_as_it_was(tmp_path, monkeypatch):
    popen = launch.subprocess.Popen
    monkeypatch.setattr(
        launch.subprocess, "Popen", lambda command, **kw: popen(["sleep", "0.2"], **kw)
    )
    pool = WorkerPool([Slot(0)], RunFolder(tmp_path), "journal")
    pool.start()
    assert pool.wait(tick=lambda: None, poll_s=0.05) == {0: 0}


def test_the_timed_out_reason_names_the_limit():
    assert lifecycle.timed_out_reason(5).startswith(lifecycle.TIMED_OUT)
    assert lifecycle.timed_out_reason(600.0) == "timed out (no epoch finished in 600 s)"
    assert lifecycle.timed_out_reason(2.5) == "timed out (no epoch finished in 2.5 s)"


def test_a_watch_that_fails_leaves_the_pool_waiting(tmp_path, monkeypatch):
    """The storage away for a while: the launcher's look at the trials fails, the workers go on."""
    popen = launch.subprocess.Popen
    monkeypatch.setattr(
        launch.subprocess, "Popen", lambda command, **kw: popen(["sleep", "0.5"], **kw)
    )
    monkeypatch.setattr(launch, "WATCH_S", 0.05)
    calls = []

    def watch():
        calls.append(1)
        raise RuntimeError("could not reach the database")

    pool = WorkerPool([Slot(0)], RunFolder(tmp_path), "journal")
    pool.start()
    assert pool.wait(tick=lambda: None, poll_s=0.05, watch=watch) == {0: 0}
    assert len(calls) >= 2 and pool.stopped_hung == {}
