"""Out of memory: a trial whose training raises CUDA's OutOfMemoryError (injected on the CPU by
wrapping the trainer's gradient step) fails with reason "out of memory", what it held is released
before the next trial starts, and the worker goes on to finish the budget."""

from __future__ import annotations

import json
import weakref

import pytest
import torch
from helpers.sweep import check_exact, offline_runs, rerun
from optuna.trial import TrialState

import msam.trainer
from sweeps.faults import is_out_of_memory


def test_out_of_memory_fails_the_trial_releases_memory_and_the_worker_goes_on(
    tmp_path, write_spec, read_trials, monkeypatch
):
    real_backward = msam.trainer.backward
    hook: dict = {"calls": 0, "held": None, "freed_before_next_trial": None}

    def backward_that_runs_out_of_memory(*args, **kwargs):
        hook["calls"] += 1
        if hook["calls"] == 3:  # mid-epoch of the first trial
            held = torch.ones(25_000_000)  # 100 MB that the failing step holds
            hook["held"] = weakref.ref(held)
            raise torch.cuda.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 139.80 GiB total)"
            )
        if hook["held"] is not None and hook["freed_before_next_trial"] is None:
            hook["freed_before_next_trial"] = hook["held"]() is None
        return real_backward(*args, **kwargs)

    monkeypatch.setattr(msam.trainer, "backward", backward_that_runs_out_of_memory)
    spec = write_spec(optimizers=["msam"], budget={"trials": 2})
    out = tmp_path / "run"
    assert rerun(spec, out) == 0

    assert hook["freed_before_next_trial"] is True
    (trials,) = read_trials(out / "optuna.journal", "tiny", ["msam"]).values()
    check_exact({"msam": trials}, 2)
    oom = trials[0]
    assert oom.state == TrialState.FAIL and oom.user_attrs["reason"] == "out of memory"
    assert "CUDA out of memory" in oom.user_attrs["error"]
    assert "OutOfMemoryError" in (out / oom.user_attrs["trial_dir"] / "error.txt").read_text()
    assert not (out / oom.user_attrs["trial_dir"] / "checkpoint.pt").exists()
    (retry,) = [t for t in trials if t.user_attrs.get("retry_of") == 0]
    assert retry.state == TrialState.COMPLETE and retry.params == oom.params
    runs = offline_runs(out)
    run = runs[oom.user_attrs["wandb_run_id"]]
    assert run.summary["status"] == "failed" and run.summary["reason"] == "out of memory"
    assert run.exit_code == 1


def test_a_study_whose_every_trial_runs_out_of_memory_is_given_up(
    tmp_path, write_spec, read_trials, monkeypatch, capsys
):
    def always_out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    monkeypatch.setattr(msam.trainer, "backward", always_out_of_memory)
    spec = write_spec(optimizers=["sgd"], budget={"trials": 2})
    assert rerun(spec, tmp_path / "run") == 1  # not an endless loop of failing trials
    (trials,) = read_trials(tmp_path / "run" / "optuna.journal", "tiny", ["sgd"]).values()
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(failed) == 3 and all(t.user_attrs["reason"] == "out of memory" for t in failed)
    assert not [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.RUNNING)]
    assert "gave up after 3 trials raised errors" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
        (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried 8 GB"), True),
        (RuntimeError("CUDA error: out of memory"), True),
        (MemoryError(), True),
        (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), False),
        (ValueError("out of memory"), False),
    ],
)
def test_what_counts_as_out_of_memory(exc, expected):
    assert is_out_of_memory(exc) is expected


def test_a_final_run_out_of_memory_is_recorded_the_others_go_on_and_a_rerun_retries_it(
    tmp_path, write_spec, monkeypatch
):
    from sweeps.cli import main

    real_backward = msam.trainer.backward
    raised = []

    def backward_out_of_memory_in_seed_1(*args, **kwargs):
        if torch.initial_seed() == 1 and not raised:  # the trainer seeds torch with train.seed
            raised.append(True)
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        return real_backward(*args, **kwargs)

    monkeypatch.setattr(msam.trainer, "backward", backward_out_of_memory_in_seed_1)
    spec = write_spec(
        optimizers=["sgd"], budget={"trials": 1}, base={"train": {"epochs": 1}}, final={"seeds": 2}
    )
    out = tmp_path / "run"
    assert main(["sweep", str(spec), "--out", str(out)]) == 1
    failed = json.loads((out / "finals/sgd/seed1/summary.json").read_text())
    assert failed["status"] == "failed" and failed["reason"] == "out of memory"
    assert json.loads((out / "finals/sgd/seed0/summary.json").read_text())["status"] == "complete"
    assert "1 failed" in (out / "leaderboard.md").read_text()

    assert main(["sweep", str(spec), "--out", str(out)]) == 0
    again = json.loads((out / "finals/sgd/seed1/summary.json").read_text())
    assert again["status"] == "complete" and again["test_acc"] is not None
    board = json.loads((out / "leaderboard.json").read_text())
    assert board["rows"][0]["seeds"] == [0, 1]
