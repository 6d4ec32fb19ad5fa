"""W&B failures are warnings, never failed trials: with ``wandb.init`` raising, or the run
folder's ``wandb/`` unwritable, a whole sweep (tuning, finals, leaderboard) completes and every
result is on disk and in the storage."""

from __future__ import annotations

import pytest
import wandb
from helpers.sweep import check_exact
from optuna.trial import TrialState

from sweeps.cli import main


def run_whole_sweep(write_spec, out) -> int:
    spec = write_spec(
        optimizers=["sgd", "sam"],
        budget={"trials": 2},
        base={"train": {"epochs": 1}},
        final={"seeds": 1},
    )
    return main(["sweep", str(spec), "--out", str(out)])


def check_results(out, read_trials) -> None:
    trials = read_trials(out / "optuna.journal", "tiny", ["sgd", "sam"])
    check_exact(trials, 2)
    assert all(t.state == TrialState.COMPLETE for ts in trials.values() for t in ts)
    for opt in ("sgd", "sam"):
        assert (out / "finals" / opt / "seed0" / "summary.json").exists()
    assert (out / "leaderboard.md").exists() and (out / "report.html").exists()


def test_wandb_init_raising_is_a_warning(tmp_path, write_spec, read_trials, monkeypatch):
    def init(*args, **kwargs):
        raise wandb.errors.CommError("could not reach api.wandb.ai")

    monkeypatch.setattr(wandb, "init", init)
    out = tmp_path / "run"
    with pytest.warns(RuntimeWarning, match="W&B: could not start a run"):
        assert run_whole_sweep(write_spec, out) == 0
    check_results(out, read_trials)
    assert not list(out.glob("wandb/offline-run-*"))


def test_an_unwritable_wandb_folder_is_a_warning(tmp_path, write_spec, read_trials):
    out = tmp_path / "run"
    out.mkdir()
    (out / "wandb").write_text("a file where W&B wants its folder")
    with pytest.warns(RuntimeWarning, match="W&B"):
        assert run_whole_sweep(write_spec, out) == 0
    check_results(out, read_trials)
    assert (out / "wandb").read_text() == "a file where W&B wants its folder"
