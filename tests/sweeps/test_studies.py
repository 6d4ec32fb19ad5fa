"""Studies are named, opened and counted in one place, so the live view, the workers, the
leaderboard and the tuned headers agree. Once the leaderboard counted surplus trials (asked by a
racing worker beyond the budget, failed before any work) as failures and the workers did not."""

from __future__ import annotations

import optuna
import pytest
from helpers.sweep import TINY_SPEC, merge
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from sweeps.results.export import tuned_text
from sweeps.results.leaderboard import build_leaderboard
from sweeps.results.read import load_sweep
from sweeps.spec import parse_sweep_spec
from sweeps.studies import (
    count_trials,
    open_study,
    ranked_trials,
    split_study_name,
    study_name,
    sweep_names,
)

LR = {"lr": FloatDistribution(0.02, 0.3, log=True)}


def add(study, state, value=None, lr=0.1, **attrs):
    study.add_trial(
        create_trial(
            state=state, value=value, params={"lr": lr}, distributions=LR, user_attrs=attrs
        )
    )


@pytest.fixture
def sgd_study():
    storage = optuna.storages.InMemoryStorage()
    study = open_study(storage, "tiny", "sgd", create=True)
    add(study, TrialState.COMPLETE, 0.5, lr=0.1)
    add(study, TrialState.COMPLETE, 0.7, lr=0.2)
    add(study, TrialState.PRUNED, lr=0.05, reason="pruned at epoch 1")
    add(study, TrialState.FAIL, lr=0.04, reason="error: boom")
    add(study, TrialState.FAIL, lr=0.03, reason="surplus", status="surplus")
    return storage, study


def test_names_round_trip():
    assert study_name("fm", "msam") == "fm/msam"
    assert split_study_name("a/b/sam") == ("a/b", "sam")
    assert split_study_name("fm/adam") is None and split_study_name("plain") is None


def test_open_study_creates_only_when_asked():
    storage = optuna.storages.InMemoryStorage()
    assert open_study(storage, "tiny", "sam") is None
    created = open_study(storage, "tiny", "sam", create=True)
    assert created.study_name == "tiny/sam"
    assert open_study(storage, "tiny", "sam").study_name == "tiny/sam"
    assert sweep_names(storage) == ["tiny"]


def test_workers_and_leaderboard_count_alike(sgd_study, tmp_path):
    storage, study = sgd_study
    counts = count_trials(study.get_trials(), "sgd", budget=3)
    assert (counts.complete, counts.pruned, counts.failed, counts.surplus) == (2, 1, 1, 1)
    spec = parse_sweep_spec(merge(TINY_SPEC, {"optimizers": ["sgd"], "final": {"seeds": 0}}))
    results = load_sweep(tmp_path, storage, spec=spec)
    assert results.studies["sgd"].counts() == {
        "complete": counts.complete,
        "pruned": counts.pruned,
        "failed": counts.failed,
        "running": counts.running,
    }
    (row,) = build_leaderboard(results).rows
    assert row.trials["failed"] == 1
    assert "2 complete trials; 1 pruned, 1 failed" in tuned_text(results, row)


def test_ranking_takes_the_best_distinct_configurations(sgd_study):
    _, study = sgd_study
    add(study, TrialState.COMPLETE, 0.7, lr=0.2)  # the same point again, later
    ranked = ranked_trials(study.get_trials(), k=3)
    assert [t.value for t in ranked] == [0.7, 0.5]
    assert ranked[0].number == 1  # ties go to the earlier trial
