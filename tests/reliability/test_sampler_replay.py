"""Samplers never replay: a resumed sweep, a second launcher or two workers with the same index
draw new points, and no budget is spent on a point a study has already tried, while the first
worker of a fresh one-worker sweep still draws exactly what ``budget.seed`` gives.

Each sweep here trains 1 s trials of SGD (lr only, a continuous space) without W&B. The two
launchers started at once are real processes and marked slow; the fast in-process test with two
workers of the same index, built before either runs a trial, covers the same collision.
"""

from __future__ import annotations

import time

import optuna
import pytest
from helpers.sweep import check_exact, finished_states, open_storage, rerun
from optuna.trial import TrialState

from sweeps.engine.lifecycle import ensure_studies
from sweeps.engine.worker import Worker
from sweeps.spec import load_sweep_spec
from sweeps.studies import count_trials

SGD_ONLY = {
    "optimizers": ["sgd"],
    "base": {"train": {"epochs": 1}, "tracking": {"wandb": {"mode": "disabled"}}},
}


def sampled(trials: list) -> list:
    """Finished trials whose point a sampler chose: not the baseline, a grid point or a retry."""
    return [
        t
        for t in trials
        if t.state in finished_states()
        and "fixed_params" not in t.system_attrs
        and t.user_attrs.get("origin") is None
    ]


def points(trials: list) -> list[tuple]:
    return [tuple(sorted(t.params.items())) for t in trials]


def discarded(trials: list) -> list:
    """Proposals failed as duplicates before any work."""
    return [t for t in trials if t.user_attrs.get("status") == "duplicate"]


def test_a_resumed_sweep_draws_new_points(tmp_path, write_spec, read_trials):
    spec = write_spec(budget={"trials": 4}, **SGD_ONLY)
    out = tmp_path / "run"
    assert rerun(spec, out) == 0
    assert rerun(spec, out, "--set", "budget.trials=8") == 0

    trials = read_trials(out / "optuna.journal", "tiny", ["sgd"])
    check_exact(trials, 8)
    lrs = [t.params["lr"] for t in sampled(trials["sgd"])]
    assert len(lrs) == 7 and len(set(lrs)) == 7, lrs  # the baseline, then 7 distinct draws
    assert not discarded(trials["sgd"])  # the resumed sampler did not even propose a replay


def _worker(spec, storage, out, index=0) -> Worker:
    return Worker(spec, storage, out, index=index, say=lambda line: None)


def test_a_tpe_sweep_stopped_mid_startup_resumes_with_new_points(tmp_path, write_spec):
    """The reported case: TPE stopped during its random start-up phase replayed its first
    draws after the resume. A new worker process on the same studies stands in for the resume."""
    path = write_spec(budget={"trials": 12, "sampler": "tpe"}, **SGD_ONLY)
    spec = load_sweep_spec(path)
    journal = tmp_path / "run" / "optuna.journal"
    journal.parent.mkdir()
    storage = open_storage(journal)
    ensure_studies(spec, storage)
    first = _worker(spec, storage, tmp_path / "run")
    for _ in range(3):  # the baseline and two random start-up draws, then the sweep stops
        first.run_one("sgd", time.perf_counter())
    resumed = _worker(spec, storage, tmp_path / "run")
    for _ in range(2):
        resumed.run_one("sgd", time.perf_counter())

    trials = optuna.load_study(study_name="tiny/sgd", storage=storage).get_trials()
    lrs = [t.params["lr"] for t in sampled(trials)]
    assert len(lrs) == 4 and len(set(lrs)) == 4, lrs
    assert not discarded(trials)


def test_two_workers_with_one_index_never_run_the_same_point(tmp_path, write_spec):
    """Two workers built with the same index before either ran a trial (two launchers started at
    once, or two ``msam worker --worker-index 0``) get the same seed; the second proposal of a
    point already taken is discarded without spending budget, and each runs distinct points."""
    path = write_spec(budget={"trials": 5}, **SGD_ONLY)
    spec = load_sweep_spec(path)
    out = tmp_path / "run"
    out.mkdir()
    storage = open_storage(out / "optuna.journal")
    ensure_studies(spec, storage)
    a, b = _worker(spec, storage, out), _worker(spec, storage, out)
    for worker in (a, b, a, b, a):
        worker.run_one("sgd", time.perf_counter())

    trials = optuna.load_study(study_name="tiny/sgd", storage=storage).get_trials()
    check_exact({"sgd": trials}, 5)
    chosen = sampled(trials)
    assert len(chosen) == 4 and len(set(points(chosen))) == 4, points(chosen)
    dupes = discarded(trials)
    assert dupes, "the same seed should have proposed a taken point"
    counts = count_trials(trials, "sgd", 5)  # no budget spent on them, and no failure counted
    assert counts.finished == 5 and counts.failed == 0 and counts.surplus == len(dupes)
    for t in dupes:  # never run, and each names the trial it repeated
        assert t.state == TrialState.FAIL
        assert points([t]) == points([trials[t.user_attrs["duplicate_of"]]])
        assert not (out / "trials" / "sgd" / str(t.number)).exists()


@pytest.mark.slow
def test_two_launchers_at_once_on_one_journal(tmp_path, write_spec, start_sweep, read_trials):
    spec = write_spec(budget={"trials": 4}, **SGD_ONLY)
    journal = tmp_path / "shared.journal"
    procs = [
        start_sweep(spec, "--out", tmp_path / f"run{k}", "--storage", journal, "--stage", "tune")
        for k in (0, 1)
    ]
    for proc in procs:
        output = proc.communicate(timeout=300)[0]
        assert proc.returncode == 0, output

    trials = read_trials(journal, "tiny", ["sgd"])
    check_exact(trials, 4)
    chosen = sampled(trials["sgd"])
    assert len(set(points(chosen))) == len(chosen), points(chosen)


@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_a_fresh_one_worker_sweep_is_reproducible(tmp_path, write_spec, read_trials, sampler):
    spec = write_spec(budget={"trials": 3, "sampler": sampler}, **SGD_ONLY)
    params = []
    for k in (0, 1):
        out = tmp_path / f"run{k}"
        assert rerun(spec, out) == 0
        trials = read_trials(out / "optuna.journal", "tiny", ["sgd"])
        params.append([t.params for t in trials["sgd"]])
    assert params[0] == params[1]
    assert len(params[0]) == 3

    # exactly what a sampler seeded with budget.seed draws after the baseline
    make = {"random": optuna.samplers.RandomSampler, "tpe": optuna.samplers.TPESampler}[sampler]
    study = optuna.create_study(sampler=make(seed=0), direction="maximize")
    study.enqueue_trial({"lr": 0.1})
    expected = []
    for _ in range(2):  # the baseline and the first (random start-up) draw
        trial = study.ask()
        expected.append({"lr": trial.suggest_float("lr", 0.02, 0.3, log=True)})
        study.tell(trial, 0.5)
    assert params[0][:2] == expected


class _OnePoint(optuna.samplers.BaseSampler):
    """Proposes the same value whatever its seed: a model-guided sampler stuck at one optimum
    (a GP at the edge of the range)."""

    def infer_relative_search_space(self, study, trial):
        return {}

    def sample_relative(self, study, trial, search_space):
        return {}

    def sample_independent(self, study, trial, name, distribution):
        return distribution.high if hasattr(distribution, "high") else distribution.choices[0]


def _stuck_study(monkeypatch, spec):
    from sweeps.engine import search

    monkeypatch.setattr(search, "make_sampler", lambda *args, **kwargs: _OnePoint())
    return optuna.create_study(sampler=_OnePoint(), direction="maximize")


def _ask_and_tell(study, spec) -> None:
    """What a worker does, without training: ask, read the point as the trial would, tell."""
    from sweeps.engine.search import ask_trial, suggest_params

    trial = ask_trial(study, spec, "sgd")
    suggest_params(trial, spec, "sgd")
    study.tell(trial, 0.5)


def test_a_sampler_stuck_on_one_point_gets_a_fresh_random_one(monkeypatch, write_spec):
    spec = load_sweep_spec(write_spec(**SGD_ONLY))
    study = _stuck_study(monkeypatch, spec)
    for _ in range(3):
        _ask_and_tell(study, spec)
    trials = study.get_trials()
    chosen = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(chosen) == 3 and len({t.params["lr"] for t in chosen}) == 3
    assert chosen[0].params["lr"] == 0.3  # the sampler's own first proposal is kept
    assert all(0.02 <= t.params["lr"] <= 0.3 for t in chosen)
    assert len(discarded(trials)) == 2  # one repeat each time, then a random point


@pytest.mark.parametrize(
    "changes",
    [
        {"search": {"lr": {"choices": [0.05, 0.1]}}},  # a space of choices only
        {"budget": {"sampler": "grid"}, "search": {"lr": {"choices": [0.05, 0.1]}}},
    ],
    ids=["choices", "grid"],
)
def test_finite_spaces_may_repeat_a_point(monkeypatch, write_spec, changes):
    spec = load_sweep_spec(write_spec(**{**SGD_ONLY, **changes}))
    study = _stuck_study(monkeypatch, spec)
    for _ in range(2):
        _ask_and_tell(study, spec)
    trials = study.get_trials()
    assert [t.params for t in trials] == [{"lr": 0.05}] * 2 and not discarded(trials)
