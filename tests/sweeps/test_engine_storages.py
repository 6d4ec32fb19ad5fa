"""Shared storages: three workers on a throwaway PostgreSQL database, one on Redis. Skipped (with
the reason) only where the server cannot be reached."""

from __future__ import annotations

from optuna.trial import TrialState

from sweeps.cli import main

OPTIMIZERS = ["sgd", "sam", "msam"]


def test_three_workers_on_postgresql(tmp_path, write_spec, msam_cli, pg_url, read_trials):
    out = tmp_path / "run"
    spec = write_spec(budget={"trials": 2}, base={"train": {"epochs": 1}})
    done = msam_cli(
        "sweep", spec, "--out", out, "--workers", 3, "--storage", pg_url, "--stage", "tune"
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert not (out / "optuna.journal").exists()  # the database holds the studies

    trials = read_trials(pg_url, "tiny", OPTIMIZERS)
    for opt, ts in trials.items():
        assert len(ts) == 2 and all(t.state == TrialState.COMPLETE for t in ts), opt
        assert all(t.user_attrs["worker"]["index"] in (0, 1, 2) for t in ts)
    assert len({t.user_attrs["worker"]["pid"] for ts in trials.values() for t in ts}) >= 2

    # a worker joining a finished sweep from elsewhere finds nothing to do
    assert (
        main(["worker", str(out / "spec.yaml"), "--storage", pg_url, "--out", str(tmp_path)]) == 0
    )
    assert read_trials(pg_url, "tiny", OPTIMIZERS) == trials


def test_redis_journal(tmp_path, write_spec, redis_url, read_trials):
    out = tmp_path / "run"
    spec = write_spec(optimizers=["msam"], budget={"trials": 2}, base={"train": {"epochs": 1}})
    assert (
        main(["sweep", str(spec), "--out", str(out), "--storage", redis_url, "--stage", "tune"])
        == 0
    )
    (trials,) = read_trials(redis_url, "tiny", ["msam"]).values()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
