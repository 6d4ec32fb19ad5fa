"""A rerun into a run folder resumes only the sweep that is there: a spec that changes what is
tuned (model, data, search space, epochs, ...) exits 2 before any work and touches nothing,
while a larger budget or other final-stage settings carry on the same studies."""

from __future__ import annotations

from helpers.sweep import check_exact, snapshot

from sweeps.cli import main


def test_a_different_spec_is_refused_and_a_larger_budget_resumes(
    tmp_path, write_spec, read_trials, capsys
):
    spec = write_spec(optimizers=["sgd"], budget={"trials": 1}, base={"train": {"epochs": 1}})
    out = tmp_path / "run"
    assert main(["sweep", str(spec), "--out", str(out), "--stage", "tune"]) == 0
    before = snapshot(out)
    capsys.readouterr()

    for change in ("base.train.epochs=2", "search.lr.high=0.5", "base.model.name=resnet10t"):
        code = main(["sweep", str(spec), "--out", str(out), "--set", change])
        err = capsys.readouterr().err
        assert code == 2, change
        assert err.startswith("error: ") and err.count("\n") == 1, err
        assert change.split("=")[0] in err and "choose another --out" in err
        assert snapshot(out) == before, change

    more = ["--set", "budget.trials=2", "--set", "final.seeds=0", "--stage", "tune"]
    assert main(["sweep", str(spec), "--out", str(out), *more]) == 0
    check_exact(read_trials(out / "optuna.journal", "tiny", ["sgd"]), 2)
    assert "trials: 2" in (out / "spec.yaml").read_text()


def test_a_worker_with_another_spec_cannot_join_the_studies(
    tmp_path, write_spec, read_trials, capsys
):
    """The studies record the spec that made them: a worker started with another model, from
    another folder, is refused before it runs a trial; one with a larger budget joins."""
    spec = write_spec(optimizers=["sgd"], budget={"trials": 1}, base={"train": {"epochs": 1}})
    journal = tmp_path / "shared.journal"
    storage = ["--storage", str(journal)]
    assert (
        main(["sweep", str(spec), "--out", str(tmp_path / "run"), *storage, "--stage", "tune"]) == 0
    )
    before = journal.read_bytes()
    capsys.readouterr()
    other = ["worker", str(spec), *storage, "--out", str(tmp_path / "elsewhere")]
    assert main([*other, "--set", "base.model.name=resnet10t"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: study tiny/sgd") and "base.model.name" in err, err
    assert err.count("\n") == 1 and journal.read_bytes() == before
    assert main([*other, "--set", "budget.trials=2"]) == 0
    check_exact(read_trials(journal, "tiny", ["sgd"]), 2)
