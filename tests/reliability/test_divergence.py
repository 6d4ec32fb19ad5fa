"""Diverging trials: a huge learning rate or a huge rho makes the loss non-finite. The trial is
pruned with reason "diverged at epoch k" (a bad point is information for the sampler, not a
crash), its W&B run says so, and the sweep goes on to its exact budget."""

from __future__ import annotations

import pytest
from helpers.sweep import check_exact, offline_runs, rerun
from optuna.trial import TrialState

from sweeps.engine.lifecycle import ensure_studies
from sweeps.spec import load_sweep_spec
from sweeps.storage import open_storage, resolve_storage
from sweeps.studies import open_study


@pytest.mark.filterwarnings("ignore:Fixed parameter")  # the diverging points lie off the range
def test_huge_lr_and_huge_rho_are_pruned_as_diverged_and_the_sweep_goes_on(
    tmp_path, write_spec, read_trials
):
    spec_path = write_spec(optimizers=["sam"], budget={"trials": 4})
    out = tmp_path / "run"
    storage = open_storage(resolve_storage(None, out))
    spec = load_sweep_spec(spec_path)
    ensure_studies(spec, storage)  # the baseline comes first
    study = open_study(storage, spec.name, "sam")
    study.enqueue_trial({"lr": 1e5, "rho": 0.05}, user_attrs={"origin": "huge-lr"})
    study.enqueue_trial({"lr": 0.1, "rho": 1e20}, user_attrs={"origin": "huge-rho"})

    assert rerun(spec_path, out) == 0

    (trials,) = read_trials(out / "optuna.journal", "tiny", ["sam"]).values()
    check_exact({"sam": trials}, 4)
    runs = offline_runs(out)
    by_origin = {t.user_attrs.get("origin"): t for t in trials}
    for origin in ("huge-lr", "huge-rho"):
        trial = by_origin[origin]
        assert trial.state == TrialState.PRUNED and trial.user_attrs["status"] == "diverged"
        assert trial.user_attrs["reason"].startswith("diverged at epoch 1"), origin
        run = runs[trial.user_attrs["wandb_run_id"]]
        assert run.summary["status"] == "diverged" and run.exit_code == 1
        assert run.summary["reason"].startswith("diverged at epoch 1")
    completed = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(completed) == 2 and all(t.value is not None for t in completed)
