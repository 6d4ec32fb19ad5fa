"""The final stage on real tiny runs (digits, test_resnet): which trials it re-runs, where the
results land, that seeds pair runs across optimizers, that reruns resume instead of redoing, and
that flatness and W&B hooks are attached to each final.

``tiny_sweep`` (a sweep folder with studies made by ``create_trial`` and real finals, 2 seeds per
optimizer) is shared with the leaderboard, report and export tests, which import it from here.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import types
import warnings
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from msam.callbacks import Callback
from sweeps.results.read import FINAL_JOB, final_dir, ranked_trials, read_finals
from sweeps.finals.run import (
    FlatnessSettings,
    final_epochs,
    flatness_sample,
    plan_finals,
    run_final,
    run_finals,
)
from sweeps.spec import parse_sweep_spec

optuna.logging.set_verbosity(optuna.logging.WARNING)

NAME = "digits-tiny"
SPEC = {
    "name": NAME,
    "base": {
        "data": {"dataset": "digits", "subset": 320},
        "model": {"name": "test_resnet"},
        "train": {"epochs": 1, "batch_size": 64, "device": "cpu"},
        "tracking": {"wandb": {"mode": "disabled"}},
    },
    "optimizers": ["sgd", "sam", "msam"],
    "search": {
        "lr": {"low": 0.01, "high": 0.5, "log": True},
        "rho": {"low": 0.01, "high": 0.2, "log": True},
        "micro_batches": {"choices": [2, 4]},
    },
    "budget": {"trials": 5},
    "final": {"top_k": 1, "seeds": 2, "epochs": 1},
}
DISTRIBUTIONS = {
    "lr": FloatDistribution(0.01, 0.5, log=True),
    "rho": FloatDistribution(0.01, 0.2, log=True),
    "micro_batches": CategoricalDistribution([2, 4]),
}
# (lr, rho, micro_batches, validation accuracy) of the complete trials of every study
POINTS = [(0.05, 0.05, 2, 0.80), (0.2, 0.1, 2, 0.90), (0.02, 0.02, 4, 0.70)]
#: Small enough for a CPU test, large enough to exercise every metric.
FLATNESS = FlatnessSettings(n_images=64, batch_size=32, iters=2, samples=2)


def spec_of(**changes) -> object:
    raw = json.loads(json.dumps(SPEC))
    for dotted, value in changes.items():
        node = raw
        *parents, last = dotted.split(".")
        for key in parents:
            node = node[key]
        node[last] = value
    return parse_sweep_spec(raw)


def journal(run_dir: Path) -> JournalStorage:
    return JournalStorage(JournalFileBackend(str(run_dir / "optuna.journal")))


def add_trials(storage, spec, optimizer: str, points, *, pruned: int = 1, failed: int = 1):
    """A study ``<name>/<optimizer>`` as a sweep leaves it: complete, pruned and failed trials."""
    study = optuna.create_study(
        storage=storage,
        study_name=f"{spec.name}/{optimizer}",
        direction="maximize",
        load_if_exists=True,
    )
    keys = spec.search.searched(optimizer)
    for lr, rho, m, value in points:
        params = {k: v for k, v in {"lr": lr, "rho": rho, "micro_batches": m}.items() if k in keys}
        study.add_trial(
            optuna.trial.create_trial(
                params=params,
                distributions={k: DISTRIBUTIONS[k] for k in keys},
                value=value,
                intermediate_values={1: value},
                user_attrs={"epochs": 1},
            )
        )
    for _ in range(pruned):
        study.add_trial(
            optuna.trial.create_trial(
                params={k: DISTRIBUTIONS[k].low for k in keys if k != "micro_batches"},
                distributions={k: DISTRIBUTIONS[k] for k in keys if k != "micro_batches"},
                state=optuna.trial.TrialState.PRUNED,
                intermediate_values={1: 0.1},
            )
        )
    for _ in range(failed):
        study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL))
    return study


def make_sweep(run_dir: Path, spec=None, points=POINTS) -> tuple[object, JournalStorage]:
    """A run folder as tuning leaves it: spec.yaml and a journal with one study per optimizer."""
    spec = spec or spec_of()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "spec.yaml").write_text(yaml.safe_dump(spec.to_dict(), sort_keys=False))
    storage = journal(run_dir)
    for optimizer in spec.optimizers:
        add_trials(storage, spec, optimizer, points)
    return spec, storage


@dataclass
class TinySweep:
    spec: object
    run_dir: Path
    records: list


_BUILT: dict[str, TinySweep] = {}


def shared_tiny_sweep(tmp_path_factory) -> TinySweep:
    """A finished tiny sweep: 3 studies and 2 seeds x 3 optimizers of real final runs.

    Built once per session for every test module that asks (each wraps this in its own
    ``tiny_sweep`` fixture). Tests that change it work on a copy (``copy_sweep``).
    """
    if "sweep" not in _BUILT:
        run_dir = tmp_path_factory.mktemp("sweep") / NAME
        spec, _ = make_sweep(run_dir)
        args = argparse.Namespace(out=run_dir, storage=None)
        records = run_finals(spec, args, None, flatness=FLATNESS, verbose=False)
        _BUILT["sweep"] = TinySweep(spec, run_dir, records)
    return _BUILT["sweep"]


@pytest.fixture(scope="session")
def tiny_sweep(tmp_path_factory) -> TinySweep:
    return shared_tiny_sweep(tmp_path_factory)


def copy_sweep(sweep: TinySweep, dest: Path) -> Path:
    target = dest / NAME
    shutil.copytree(sweep.run_dir, target)
    return target


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
    jobs = plan_finals(spec, storage, tmp_path)
    assert len(jobs) == 3 * 2 * 3
    assert [j.seed for j in jobs[:6]] == [0] * 6  # seed-major: complete pairs come first
    best = {(j.optimizer, j.rank): j for j in jobs if j.seed == 2}
    assert best["sam", 1].params == {"lr": 0.2, "rho": 0.1}
    assert best["msam", 2].params == {"lr": 0.05, "rho": 0.05, "micro_batches": 2}
    assert best["msam", 2].dir == tmp_path / "finals" / "msam-top2" / "seed2"
    assert best["sgd", 1].dir == final_dir(tmp_path, "sgd", 1, 2)
    assert best["sgd", 1].cfg.train.seed == 2 and best["sgd", 1].cfg.optim.rho == 0.0
    # equal gradient evaluations: SGD (1 per update) gets twice SAM's and mSAM's epochs
    assert best["sgd", 1].epochs == 2 and best["sam", 1].epochs == 1
    assert best["msam", 1].cfg.train.epochs == 1
    assert final_epochs(spec_of(), best["sgd", 1].cfg) == 1


def test_plan_without_complete_trials_warns(tmp_path):
    spec = spec_of()
    storage = journal(tmp_path)
    add_trials(storage, spec, "sgd", POINTS)
    add_trials(storage, spec, "sam", [], pruned=2)
    with pytest.warns(UserWarning, match="no complete trial"):
        jobs = plan_finals(spec, storage, tmp_path)
    assert {j.optimizer for j in jobs} == {"sgd"}


# ----------------------------------------------------------------------------- pairing


def test_same_seed_same_first_batch_and_weights_across_optimizers(tmp_path):
    from msam.data import build_data
    from msam.models import create_model

    spec, storage = make_sweep(tmp_path)
    jobs = [j for j in plan_finals(spec, storage, tmp_path) if j.seed == 1]
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
    jobs = plan_finals(spec, storage, tmp_path)
    a = flatness_sample(jobs[0].cfg, FLATNESS)
    b = flatness_sample(jobs[-1].cfg, FLATNESS)
    assert sum(len(y) for _, y in a) == FLATNESS.n_images
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
        flat = summary["flatness"]
        assert flat["n_images"] == FLATNESS.n_images
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
    records = run_finals(
        tiny_sweep.spec, argparse.Namespace(out=run_dir), flatness=FLATNESS, verbose=False
    )
    assert len(records) == 6
    assert [r.outcome for r in records].count("skipped") == 5
    assert next(r for r in records if r.outcome != "skipped").dir == lost.parent
    assert {p: p.stat().st_mtime_ns for p in metrics} == metrics  # nothing retrained
    again = json.loads(lost.read_text())["flatness"]
    assert again["hessian_top_eig"] == pytest.approx(before["hessian_top_eig"], rel=1e-4)
    assert again["sam_sharpness"] == pytest.approx(before["sam_sharpness"], rel=1e-4, abs=1e-7)


def test_better_trial_replaces_a_stale_final(tiny_sweep, tmp_path):
    run_dir = copy_sweep(tiny_sweep, tmp_path)
    spec = tiny_sweep.spec
    storage = journal(run_dir)
    add_trials(storage, spec, "sgd", [(0.3, 0.1, 2, 0.95)], pruned=0, failed=0)
    job = next(j for j in plan_finals(spec, storage, run_dir) if j.optimizer == "sgd")
    assert job.trial == 5
    with pytest.warns(UserWarning, match="moved the old one"):
        record = run_final(job, spec, run_dir, None, FlatnessSettings(n_images=0))
    assert record.status == "complete" and record.trial == 5 and record.outcome == "trained"
    assert json.loads((job.dir / FINAL_JOB).read_text())["params"] == {"lr": 0.3}
    stale = list((run_dir / "finals" / ".stale").glob("sgd/seed0-trial1"))
    assert stale and (stale[0] / "summary.json").exists()
    assert {(r.optimizer, r.seed) for r in read_finals(run_dir)} == {
        (o, s) for o in ("sgd", "sam", "msam") for s in (0, 1)
    }


def test_seeds_zero_skips_the_stage(tmp_path):
    spec, _ = make_sweep(tmp_path, spec_of(**{"final.seeds": 0}))
    assert run_finals(spec, argparse.Namespace(out=tmp_path), verbose=False) == []
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
    module = types.ModuleType("sweeps.tracking.wandb_runs")
    module.WandbCallback = callback_class
    monkeypatch.setitem(sys.modules, "sweeps.tracking.wandb_runs", module)


def test_final_logs_a_wandb_run_with_flatness(tmp_path, monkeypatch):
    tracking = pytest.importorskip("sweeps.tracking.wandb_runs")
    monkeypatch.setenv("WANDB_MODE", "offline")
    spec, storage = make_sweep(tmp_path, spec_of(**{"base.tracking.wandb.mode": "offline"}))
    job = next(j for j in plan_finals(spec, storage, tmp_path) if j.optimizer == "sgd")
    run_final(job, spec, tmp_path, flatness_sample(job.cfg, FLATNESS), FLATNESS, verbose=False)
    (folder,) = tracking.find_offline_runs(tmp_path)
    deadline = time.monotonic() + 30  # W&B's writer may flush a moment after finish() returns
    while (run := tracking.read_offline_run(folder)).exit_code is None:
        assert time.monotonic() < deadline, "the offline run log never completed"
        time.sleep(0.2)
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
    job = next(j for j in plan_finals(spec, storage, tmp_path) if j.optimizer == "sgd")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        record = run_final(job, spec, tmp_path, None, FlatnessSettings(n_images=0), verbose=False)
    assert record.status == "complete"
    assert any("W&B is down" in str(w.message) for w in caught)
