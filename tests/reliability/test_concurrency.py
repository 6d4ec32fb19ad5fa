"""Workers racing for the same studies: four processes on one journal file, three on a throwaway
PostgreSQL database, one on Redis. Every study ends with exactly its budget, trial numbers are
distinct, and no result is lost: each finished trial has its folder, its metrics and its W&B run,
and the value in the storage is the last epoch's on disk. The databases are skipped (with the
reason) only where their servers cannot be reached.

The multi-worker runs (four on a journal, three on PostgreSQL) take half a minute each on two
cores and are marked slow. Fast tests keep each storage covered end to end: one worker on
PostgreSQL and one on Redis, in this process (exact budget, nothing lost), and the single-worker
journal sweeps of tests/sweeps/engine/test_engine.py. Only racing workers need the slow runs.
"""

from __future__ import annotations

import json

import pytest
from helpers.sweep import check_exact, offline_runs
from optuna.trial import TrialState

from sweeps.cli import main

OPTIMIZERS = ["sgd", "sam", "msam"]


def check_nothing_lost(trials: dict, out) -> None:
    runs = offline_runs(out)
    folders = set()
    for opt, ts in trials.items():
        assert [t.number for t in ts] == list(range(len(ts))), opt  # distinct, none skipped
        for t in ts:
            if t.state != TrialState.COMPLETE:
                continue
            folder = t.user_attrs["trial_dir"]
            assert folder not in folders
            folders.add(folder)
            last = json.loads((out / folder / "metrics.jsonl").read_text().splitlines()[-1])
            assert t.value == last["val_acc"], (opt, t.number)
            run = runs[t.user_attrs["wandb_run_id"]]
            assert run.exit_code == 0 and run.config["trial"]["number"] == t.number


@pytest.mark.slow
def test_four_workers_on_one_journal_file(tmp_path, write_spec, msam_cli, read_trials):
    out = tmp_path / "run"
    spec = write_spec(budget={"trials": 3}, base={"train": {"epochs": 1}})
    done = msam_cli("sweep", spec, "--out", out, "--workers", 4, "--stage", "tune", timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr

    trials = read_trials(out / "optuna.journal", "tiny", OPTIMIZERS)
    check_exact(trials, 3)
    check_nothing_lost(trials, out)
    workers = {t.user_attrs["worker"]["index"] for ts in trials.values() for t in ts}
    assert len(workers) >= 3 and workers <= {0, 1, 2, 3}
    surplus = [t for ts in trials.values() for t in ts if t.user_attrs.get("reason") == "surplus"]
    assert all(t.state == TrialState.FAIL for t in surplus)  # raced past the budget: never run
    assert not any(
        (out / f"trials/{t.user_attrs['optimizer']}/{t.number}").exists() for t in surplus
    )


@pytest.mark.slow
def test_three_workers_on_postgresql(tmp_path, write_spec, msam_cli, pg_url, read_trials):
    out = tmp_path / "run"
    spec = write_spec(budget={"trials": 2}, base={"train": {"epochs": 1}})
    done = msam_cli(
        "sweep", spec, "--out", out, "--workers", 3, "--storage", pg_url, "--stage", "tune"
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert not (out / "optuna.journal").exists()  # the database holds the studies

    trials = read_trials(pg_url, "tiny", OPTIMIZERS)
    check_exact(trials, 2)
    check_nothing_lost(trials, out)
    assert {t.user_attrs["worker"]["index"] for ts in trials.values() for t in ts} <= {0, 1, 2}
    assert len({t.user_attrs["worker"]["pid"] for ts in trials.values() for t in ts}) >= 2

    # a worker joining a finished sweep from elsewhere finds nothing to do
    assert (
        main(["worker", str(out / "spec.yaml"), "--storage", pg_url, "--out", str(tmp_path)]) == 0
    )
    assert read_trials(pg_url, "tiny", OPTIMIZERS) == trials


def test_one_worker_on_postgresql(tmp_path, write_spec, pg_url, read_trials):
    out = tmp_path / "run"
    spec = write_spec(optimizers=["sam"], budget={"trials": 2}, base={"train": {"epochs": 1}})
    assert (
        main(["sweep", str(spec), "--out", str(out), "--storage", pg_url, "--stage", "tune"]) == 0
    )
    assert not (out / "optuna.journal").exists()  # the database holds the studies
    trials = read_trials(pg_url, "tiny", ["sam"])
    check_exact(trials, 2)
    check_nothing_lost(trials, out)


def test_redis_journal(tmp_path, write_spec, redis_url, read_trials):
    out = tmp_path / "run"
    spec = write_spec(optimizers=["msam"], budget={"trials": 2}, base={"train": {"epochs": 1}})
    assert (
        main(["sweep", str(spec), "--out", str(out), "--storage", redis_url, "--stage", "tune"])
        == 0
    )
    trials = read_trials(redis_url, "tiny", ["msam"])
    check_exact(trials, 2)
    check_nothing_lost(trials, out)
