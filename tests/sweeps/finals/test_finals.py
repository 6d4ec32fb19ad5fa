"""The final stage on real tiny runs (digits, test_resnet): which trials it re-runs, where the
results land, that seeds pair runs across optimizers, that reruns resume instead of redoing, and
that flatness and W&B hooks are attached to each final.

``tiny_sweep`` (tests/sweeps/conftest.py: a sweep folder with studies made by ``create_trial``
and real finals, 2 seeds per optimizer) is shared with the results tests.
"""

from __future__ import annotations

import json
import warnings

import optuna
import pytest
import torch
from helpers.finals import (
    FLATNESS,
    NAME,
    POINTS,
    add_trials,
    copy_sweep,
    journal,
    make_sweep,
    spec_of,
)
from helpers.wandb_offline import find_offline_runs, read_offline_run

import sweeps.finals.run
import sweeps.tracking
import sweeps.tracking.wandb_runs
from msam.callbacks import Callback
from sweeps import budget
from sweeps.finals import FlatnessSettings, flatness_sample, plan_finals, run_final, run_finals
from sweeps.layout import FINAL_JOB, RunFolder
from sweeps.results.read import read_finals
from sweeps.run import SweepRun
from sweeps.studies import ranked_trials

# ----------------------------------------------------------------------------- selection


def test_ranked_trials_best_complete_distinct(tmp_path):
    spec = spec_of()
    study = add_trials(
        optuna.storages.InMemoryStorage(), spec, "sam", [*POINTS, (0.2, 0.1, 2, 0.90)]
    )
    ranked = ranked_trials(study.get_trials(), k=3)
    assert [t.value for t in ranked] == [0.90, 0.80, 0.70]  # the duplicate point counts once
    assert ranked[0].number == 1  # ties go to the earlier trial
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in ranked)


def test_plan_top_k_layout_seeds_and_grad_eval_budget(tmp_path):
    spec = spec_of(**{"final.top_k": 2, "final.seeds": 3, "budget.match": "grad_evals"})
    _, storage = make_sweep(tmp_path, spec)
    jobs = plan_finals(spec, storage, RunFolder(tmp_path))
    assert len(jobs) == 3 * 2 * 3
    assert [j.seed for j in jobs[:6]] == [0] * 6  # seed-major: complete pairs come first
    best = {(j.optimizer, j.rank): j for j in jobs if j.seed == 2}
    assert best["sam", 1].params == {"lr": 0.2, "rho": 0.1}
    assert best["msam", 2].params == {"lr": 0.05, "rho": 0.05, "micro_batches": 2}
    assert best["msam", 2].dir == tmp_path / "finals" / "msam-top2" / "seed2"
    assert best["sgd", 1].dir == RunFolder(tmp_path).final("sgd", 1, 2)
    assert best["sgd", 1].cfg.train.seed == 2 and best["sgd", 1].cfg.optim.rho == 0.0
    # equal gradient evaluations: SGD (1 per update) gets twice SAM's and mSAM's epochs
    assert best["sgd", 1].epochs == 2 and best["sam", 1].epochs == 1
    assert best["msam", 1].cfg.train.epochs == 1
    assert budget.epochs(spec_of(), "sgd", final=True) == 1  # match: epochs


def test_plan_without_complete_trials_warns(tmp_path):
    spec = spec_of()
    storage = journal(tmp_path)
    add_trials(storage, spec, "sgd", POINTS)
    add_trials(storage, spec, "sam", [], pruned=2)
    with pytest.warns(UserWarning, match="no complete trial"):
        jobs = plan_finals(spec, storage, RunFolder(tmp_path))
    assert {j.optimizer for j in jobs} == {"sgd"}


# ----------------------------------------------------------------------------- pairing


def test_same_seed_same_first_batch_and_weights_across_optimizers(tmp_path):
    from msam.data import build_data
    from msam.models import create_model

    spec, storage = make_sweep(tmp_path)
    jobs = [j for j in plan_finals(spec, storage, RunFolder(tmp_path)) if j.seed == 1]
    first, inits = {}, {}
    for job in jobs:
        cfg = job.cfg
        torch.manual_seed(cfg.train.seed)  # what the trainer does before data and model
        data = build_data(
            cfg.data.dataset,
            subset=cfg.data.subset,
            batch_size=cfg.train.batch_size,
            seed=cfg.train.seed,
            final=True,
        )
        info = data.info
        model = create_model(
            cfg.model.name,
            num_classes=info.num_classes,
            in_chans=info.in_chans,
            img_size=info.img_size,
        )
        data.train.set_epoch(0)
        first[job.optimizer] = next(iter(data.train))
        inits[job.optimizer] = torch.cat([p.detach().flatten() for p in model.parameters()])
    for optimizer in ("sam", "msam"):
        assert torch.equal(first[optimizer][0], first["sgd"][0])
        assert torch.equal(first[optimizer][1], first["sgd"][1])
        assert torch.equal(inits[optimizer], inits["sgd"])
    other = build_data("digits", subset=320, batch_size=64, seed=0, final=True)
    other.train.set_epoch(0)
    assert not torch.equal(next(iter(other.train))[1], first["sgd"][1])


def test_flatness_sample_is_fixed_and_unaugmented(tmp_path):
    spec, storage = make_sweep(tmp_path)
    jobs = plan_finals(spec, storage, RunFolder(tmp_path))
    a = flatness_sample(jobs[0].cfg, FLATNESS)
    b = flatness_sample(jobs[-1].cfg, FLATNESS)
    assert sum(len(y) for _, y in a) == FLATNESS.images
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))


# ----------------------------------------------------------------------------- the stage


def test_finals_layout_summary_flatness_and_cost(tiny_sweep):
    run_dir = tiny_sweep.run_dir
    records = tiny_sweep.records
    assert [(r.optimizer, r.seed, r.outcome) for r in records] == [
        (o, s, "trained") for s in (0, 1) for o in ("sgd", "sam", "msam")
    ]
    for record in records:
        folder = run_dir / "finals" / record.optimizer / f"seed{record.seed}"
        assert record.dir == folder
        assert {"metrics.jsonl", "summary.json", FINAL_JOB} <= {p.name for p in folder.iterdir()}
        summary = json.loads((folder / "summary.json").read_text())
        assert summary["status"] == "complete" and 0.0 <= summary["test_acc"] <= 1.0
        assert summary["val_acc"] is None  # trained on train + validation
        assert summary["train_images"] == 320  # the whole subset, validation part included
        job = summary["final"]
        assert job["trial"] == 1 and job["val_acc"] == 0.90 and job["seed"] == record.seed
        assert job["study"] == f"{NAME}/{record.optimizer}"
        flat = summary["flatness"]  # measured as the spec's final.flatness says
        assert flat["n_images"] == tiny_sweep.spec.final.flatness.images == 64
        assert (flat["iters"], flat["samples"]) == (2, 2)
        for key in ("hessian_top_eig", "hessian_trace", "sam_sharpness"):
            assert isinstance(flat[key], float)
        assert flat["rho"] == (0.05 if record.optimizer == "sgd" else 0.1)  # SGD: base rho
        assert summary["grad_evals_per_update"] == (1 if record.optimizer == "sgd" else 2)
        assert summary["seconds"] > 0 and summary["images_per_s"] > 0


def test_rerun_skips_complete_and_adds_missing_flatness(tiny_sweep, tmp_path):
    run_dir = copy_sweep(tiny_sweep, tmp_path)
    metrics = {p: p.stat().st_mtime_ns for p in run_dir.glob("finals/*/seed*/metrics.jsonl")}
    # a crash after training, before flatness: summary.json says complete but has no flatness
    lost = run_dir / "finals" / "sam" / "seed1" / "summary.json"
    summary = json.loads(lost.read_text())
    before = summary.pop("flatness")
    lost.write_text(json.dumps(summary))
    run = SweepRun.create(tiny_sweep.spec, out=run_dir)
    records = run_finals(run, journal(run_dir), verbose=False).records
    assert len(records) == 6
    assert [r.outcome for r in records].count("skipped") == 5
    assert next(r for r in records if r.outcome != "skipped").dir == lost.parent
    assert {p: p.stat().st_mtime_ns for p in metrics} == metrics  # nothing retrained
    again = json.loads(lost.read_text())["flatness"]
    assert again["hessian_top_eig"] == pytest.approx(before["hessian_top_eig"], rel=1e-4)
    assert again["sam_sharpness"] == pytest.approx(before["sam_sharpness"], rel=1e-4, abs=1e-7)


def test_other_flatness_settings_measure_again_without_training(tiny_sweep, tmp_path):
    run_dir = copy_sweep(tiny_sweep, tmp_path)
    metrics = {p: p.stat().st_mtime_ns for p in run_dir.glob("finals/*/seed*/metrics.jsonl")}
    spec = spec_of(**{"final.flatness.iters": 3})
    run = SweepRun.create(spec, out=run_dir)
    records = run_finals(run, journal(run_dir), verbose=False).records
    assert [r.outcome for r in records] == ["flatness added"] * 6
    assert {p: p.stat().st_mtime_ns for p in metrics} == metrics  # nothing retrained
    assert {r.summary["flatness"]["iters"] for r in records} == {3}
    again = run_finals(run, journal(run_dir), verbose=False).records
    assert [r.outcome for r in again] == ["skipped"] * 6


def test_flatness_shows_its_progress_and_cost(tiny_sweep, tmp_path, capsys):
    """Measuring flatness is announced before it starts and reported with its seconds and the
    Lanczos outcome, so a long measurement never looks like a hang."""
    run_dir = copy_sweep(tiny_sweep, tmp_path)
    spec = spec_of(**{"final.flatness.iters": 4})
    run_finals(SweepRun.create(spec, out=run_dir), journal(run_dir))
    err = capsys.readouterr().err
    starts = [line for line in err.splitlines() if "measuring flatness" in line]
    ends = [line for line in err.splitlines() if ": flatness in " in line]
    assert len(starts) == len(ends) == 6
    assert "final sgd seed0: measuring flatness (" in err and "at most 4 Lanczos steps" in err
    assert all("top eigenvalue" in line and "after" in line for line in ends)


def test_better_trial_replaces_a_stale_final(tiny_sweep, tmp_path):
    run_dir = copy_sweep(tiny_sweep, tmp_path)
    spec = tiny_sweep.spec
    storage = journal(run_dir)
    add_trials(storage, spec, "sgd", [(0.3, 0.1, 2, 0.95)], pruned=0, failed=0)
    job = next(j for j in plan_finals(spec, storage, RunFolder(run_dir)) if j.optimizer == "sgd")
    assert job.trial == 5
    with pytest.warns(UserWarning, match="moved the old one"):
        record = run_final(job, spec, RunFolder(run_dir), None, FlatnessSettings(images=0))
    assert record.status == "complete" and record.trial == 5 and record.outcome == "trained"
    assert json.loads((job.dir / FINAL_JOB).read_text())["params"] == {"lr": 0.3}
    stale = list((run_dir / "finals" / ".stale").glob("sgd/seed0-trial1"))
    assert stale and (stale[0] / "summary.json").exists()
    assert {(r.optimizer, r.seed) for r in read_finals(run_dir)} == {
        (o, s) for o in ("sgd", "sam", "msam") for s in (0, 1)
    }


def test_seeds_zero_skips_the_stage(tmp_path):
    spec, _ = make_sweep(tmp_path, spec_of(**{"final.seeds": 0}))
    result = run_finals(SweepRun.create(spec, out=tmp_path), journal(tmp_path), verbose=False)
    assert result.records == () and result.failed == []
    assert not (tmp_path / "finals").exists()


# ----------------------------------------------------------------------------- W&B hook


class BrokenCallback(Callback):
    """A tracker whose service is down: every call raises."""

    @classmethod
    def from_train_config(cls, config, **kwargs):
        return cls()

    def on_train_start(self, config, info):
        raise RuntimeError("W&B is down")


def _with_tracking(monkeypatch, callback_class) -> None:
    """Finals make their tracker from ``WandbCallback``: replace it wherever it is imported from."""
    monkeypatch.setattr(sweeps.tracking.wandb_runs, "WandbCallback", callback_class)
    monkeypatch.setattr(sweeps.tracking, "WandbCallback", callback_class)
    monkeypatch.setattr(sweeps.finals.run, "WandbCallback", callback_class, raising=False)


def test_final_logs_a_wandb_run_with_flatness(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    spec, storage = make_sweep(tmp_path, spec_of(**{"base.tracking.wandb.mode": "offline"}))
    job = next(j for j in plan_finals(spec, storage, RunFolder(tmp_path)) if j.optimizer == "sgd")
    run_final(
        job, spec, RunFolder(tmp_path), flatness_sample(job.cfg, FLATNESS), FLATNESS, verbose=False
    )
    (folder,) = find_offline_runs(tmp_path)
    run = read_offline_run(folder, wait_s=30)  # W&B's writer may flush after finish() returns
    assert run.exit_code is not None, "the offline run log never completed"
    assert run.job_type == "final" and run.group == NAME and run.name == f"{NAME}-sgd-seed0"
    assert {"final", "sgd", "seed0"} <= set(run.tags)
    assert run.config["final"]["trial"] == 1 and run.config["optim"]["name"] == "sgd"
    assert [row.get("epoch") for row in run.history if "epoch" in row] == [1]
    flat = run.summary.get("flatness") or {
        k.split(".", 1)[1]: v for k, v in run.summary.items() if k.startswith("flatness.")
    }
    assert "hessian_trace" in flat  # the run was held open until flatness was known
    assert run.summary["test_acc"] == json.loads((job.dir / "summary.json").read_text())["test_acc"]


def test_wandb_trouble_is_a_warning(tmp_path, monkeypatch):
    _with_tracking(monkeypatch, BrokenCallback)
    spec, storage = make_sweep(tmp_path, spec_of(**{"base.tracking.wandb.mode": "offline"}))
    job = next(j for j in plan_finals(spec, storage, RunFolder(tmp_path)) if j.optimizer == "sgd")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        record = run_final(
            job, spec, RunFolder(tmp_path), None, FlatnessSettings(images=0), verbose=False
        )
    assert record.status == "complete"
    assert any("W&B is down" in str(w.message) for w in caught)
