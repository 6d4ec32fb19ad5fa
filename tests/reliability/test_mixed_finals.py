"""Finals of two configurations never meet in one leaderboard row.

Tuning went on (a rerun with a larger budget) and found a better trial; the final stage was
killed after the first new final, so ``finals/sgd/seed0`` is of the new best trial and
``finals/sgd/seed1`` still of the old one. The row, its paired tests and its tuned YAML must use
finals of one trial only; the others are set aside with a note, and the final stage moves every
stale final out of the way before it trains the first new one.
"""

from __future__ import annotations

import json

import pytest
import yaml
from helpers.finals import add_trials, build_tiny_sweep, journal

from sweeps.cli import main
from sweeps.finals import FlatnessSettings, run_final
from sweeps.finals.plan import plan_finals
from sweeps.layout import RunFolder
from sweeps.results.leaderboard import build_leaderboard
from sweeps.results.read import load_sweep


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    return build_tiny_sweep(tmp_path_factory.mktemp("mixed") / "digits-tiny")


def _better_sgd_trial(sweep, tmp_path):
    """A copy of the sweep whose sgd study found a better trial, and the new plan."""
    import shutil

    run_dir = tmp_path / "digits-tiny"
    shutil.copytree(sweep.run_dir, run_dir)
    storage = journal(run_dir)
    add_trials(storage, sweep.spec, "sgd", [(0.3, 0.1, 2, 0.95)], pruned=0, failed=0)
    jobs = [j for j in plan_finals(sweep.spec, storage, RunFolder(run_dir)) if j.optimizer == "sgd"]
    assert [j.trial for j in jobs] == [5, 5]
    return run_dir, storage, jobs


def _killed_after_first_new_final(sweep, tmp_path):
    """Seed 0 of sgd re-trained for the new trial, seed 1 still the old trial's."""
    run_dir, storage, jobs = _better_sgd_trial(sweep, tmp_path)
    with pytest.warns(UserWarning, match="moved the old one"):
        run_final(jobs[0], sweep.spec, RunFolder(run_dir), None, FlatnessSettings(images=0))
    on_disk = {
        seed: json.loads((run_dir / "finals" / "sgd" / f"seed{seed}" / "final.json").read_text())
        for seed in (0, 1)
    }
    assert on_disk[0]["trial"] == 5 and on_disk[1]["trial"] == 1  # the state a kill leaves
    return run_dir, storage


def test_a_row_never_pairs_finals_of_two_trials(swept, tmp_path):
    run_dir, storage = _killed_after_first_new_final(swept, tmp_path)
    with pytest.warns(UserWarning, match="set aside"):
        results = load_sweep(run_dir, storage)
    assert {f.trial for f in results.finals_of("sgd")} == {5}
    board = build_leaderboard(results)
    (row,) = [r for r in board.rows if r.optimizer == "sgd"]
    assert row.trial == 5 and row.params == {"lr": 0.3} and row.seeds == [0]
    assert any("trial 1" in n and "set aside" in n for n in board.notes)
    # sgd has one seed now: the paired tests may only use seeds every optimizer has from one trial
    assert board.compared_seeds == [0]


def test_without_studies_a_row_keeps_one_trial(swept, tmp_path):
    run_dir, _ = _killed_after_first_new_final(swept, tmp_path)
    (run_dir / "optuna.journal").rename(tmp_path / "elsewhere.journal")
    with pytest.warns(UserWarning, match="set aside"):
        results = load_sweep(run_dir)
    assert len({f.trial for f in results.finals_of("sgd")}) == 1


def test_leaderboard_and_tuned_yaml_use_one_trial(swept, tmp_path):
    run_dir, _ = _killed_after_first_new_final(swept, tmp_path)
    assert main(["leaderboard", str(run_dir)]) == 0
    board = json.loads((run_dir / "leaderboard.json").read_text())
    (row,) = [r for r in board["rows"] if r["optimizer"] == "sgd"]
    assert row["trial"] == 5 and row["seeds"] == [0]
    tuned = yaml.safe_load((run_dir / "tuned" / "digits-tiny-sgd.yaml").read_text())
    assert tuned["optim"]["lr"] == pytest.approx(0.3)


def test_final_stage_retires_every_stale_final_before_training(swept, tmp_path):
    """A kill after the first new final cannot leave old and new finals side by side."""
    from sweeps.finals.run import retire_stale

    run_dir, storage, jobs = _better_sgd_trial(swept, tmp_path)
    with pytest.warns(UserWarning, match="moved the old one"):
        retire_stale(jobs, RunFolder(run_dir))
    assert not (run_dir / "finals" / "sgd" / "seed0").exists()
    assert not (run_dir / "finals" / "sgd" / "seed1").exists()
    stale = sorted(p.name for p in (run_dir / "finals" / ".stale" / "sgd").iterdir())
    assert stale == ["seed0-trial1", "seed1-trial1"]
