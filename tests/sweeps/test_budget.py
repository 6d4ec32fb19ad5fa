"""Equal budgets: one rule for the epochs of trials, finals, the pruner and tuned configs.

These disagreed once: under ``budget.match: grad_evals`` a sweep of SGD alone trained its trials
twice as long as its finals, and the spec's help text said SAM/mSAM get fewer epochs.
"""

from __future__ import annotations

import pytest
from helpers.sweep import TINY_SPEC, merge

from sweeps import budget
from sweeps.engine.search import make_pruner
from sweeps.finals.plan import plan_finals
from sweeps.layout import RunFolder
from sweeps.spec import Budget, parse_sweep_spec


def spec_of(optimizers, match="grad_evals", **final):
    return parse_sweep_spec(
        merge(
            TINY_SPEC,
            {"optimizers": optimizers, "budget": {"match": match}, "final": {"seeds": 1, **final}},
        )
    )


@pytest.mark.parametrize(
    ("optimizers", "expected"),
    [
        (["sgd", "sam", "msam"], {"sgd": 4, "sam": 2, "msam": 2}),
        (["sgd", "msam"], {"sgd": 4, "msam": 2}),
        (["sgd"], {"sgd": 2}),  # nothing costs more than SGD: equal evaluations, equal epochs
        (["sam", "msam"], {"sam": 2, "msam": 2}),
    ],
)
def test_trials_and_finals_train_the_same_epochs(optimizers, expected):
    spec = spec_of(optimizers)  # base.train.epochs is 2
    assert {o: budget.epochs(spec, o) for o in optimizers} == expected
    assert {o: budget.epochs(spec, o, final=True) for o in optimizers} == expected


def test_final_epochs_follow_the_same_rule():
    spec = spec_of(["sgd", "sam"], epochs=3)
    assert budget.epochs(spec, "sgd", final=True) == 6
    assert budget.epochs(spec, "sam", final=True) == 3
    assert budget.epochs(spec, "sgd") == 4  # trials keep the base's epochs


def test_match_epochs_gives_everyone_the_base_epochs():
    spec = spec_of(["sgd", "sam", "msam"], match="epochs")
    assert {budget.epochs(spec, o) for o in spec.optimizers} == {2}


def test_the_pruner_and_the_planned_finals_use_the_rule(tmp_path):
    import optuna

    spec = parse_sweep_spec(
        merge(
            TINY_SPEC,
            {
                "optimizers": ["sgd"],
                "budget": {"match": "grad_evals", "pruner": "hyperband"},
                "final": {"seeds": 1},
            },
        )
    )
    assert make_pruner(spec, "sgd")._max_resource == budget.epochs(spec, "sgd") == 2
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(storage=storage, study_name="tiny/sgd", direction="maximize")
    study.add_trial(
        optuna.trial.create_trial(
            params={"lr": 0.1},
            distributions={"lr": optuna.distributions.FloatDistribution(0.02, 0.3, log=True)},
            value=0.5,
        )
    )
    (job,) = plan_finals(spec, storage, RunFolder(tmp_path))
    assert job.epochs == job.cfg.train.epochs == 2


def test_the_help_text_says_what_the_code_does():
    help_text = Budget.model_fields["match"].description
    assert "SGD" in help_text and "twice" in help_text


@pytest.mark.parametrize(
    ("optimizer", "rho", "evals"), [("sgd", 0.0, 1), ("sam", 0.05, 2), ("msam", 0.05, 2)]
)
def test_gradient_evaluations_per_update(optimizer, rho, evals):
    assert budget.grad_evals_per_update(optimizer, rho) == evals
    assert budget.grad_evals_per_update(optimizer, 0.0) == 1  # rho 0 is the plain gradient


def test_the_cost_of_a_tuned_configuration_without_a_searched_rho():
    spec = spec_of(["sgd", "sam", "msam"])
    assert budget.grad_evals_of(spec, "sam", {"lr": 0.1}) == 2  # base.optim.rho, not 0
    assert budget.grad_evals_of(spec, "msam", {"lr": 0.1, "rho": 0.0}) == 1
    assert budget.grad_evals_of(spec, "sgd", {"lr": 0.1}) == 1
    assert budget.grad_evals_of(None, "sam", {}) == 2
