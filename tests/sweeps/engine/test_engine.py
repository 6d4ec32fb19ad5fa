"""The sweep engine in one process: exact budgets, conditional search spaces, the baseline trial,
pruning, diverging and failing trials, resuming, W&B runs per trial, and input errors (exit 2).

Each sweep here runs a handful of 1-2 s trials on digits with test_resnet."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import yaml
from helpers import REPO
from helpers.sweep import offline_runs
from optuna.trial import TrialState

from sweeps.cli import main
from sweeps.spec import load_sweep_spec
from sweeps.storage import mask_url, resolve_storage

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
SHIPPED = sorted((REPO / "configs" / "sweeps").glob("*.yaml"))


def sweep(spec: Path, out: Path, *extra: str) -> int:
    return main(["sweep", str(spec), "--out", str(out), "--stage", "tune", *extra])


def finished(trials) -> list:
    return [t for t in trials if t.state in FINISHED]


def test_exact_budget_conditional_spaces_baseline_and_resume(tmp_path, write_spec, read_trials):
    spec_path = write_spec(budget={"trials": 2})
    out = tmp_path / "run"
    assert sweep(spec_path, out) == 0

    trials = read_trials(out / "optuna.journal", "tiny", ["sgd", "sam", "msam"])
    expected_keys = {"sgd": {"lr"}, "sam": {"lr", "rho"}, "msam": {"lr", "rho", "micro_batches"}}
    for opt, ts in trials.items():
        assert len(ts) == 2 and len(finished(ts)) == 2, opt  # exactly the budget, nothing else
        for t in ts:
            assert set(t.params) == expected_keys[opt]
            assert 0.02 <= t.params["lr"] <= 0.3
            if "micro_batches" in t.params:
                assert (
                    t.params["micro_batches"] in (2, 4, 8) and 64 % t.params["micro_batches"] == 0
                )
            metrics = (out / t.user_attrs["trial_dir"] / "metrics.jsonl").read_text().splitlines()
            assert len(metrics) == 2
            assert t.value == pytest.approx(yaml.safe_load(metrics[-1])["val_acc"])
            seconds = t.user_attrs["seconds"]
            assert 0 <= seconds["overhead"] < seconds["trial"]
        # every study starts from the same baseline: base lr, rho 0.05, the middle micro-batch count
        baseline = ts[0]
        assert baseline.user_attrs["origin"] == "baseline"
        base_point = {"lr": 0.1, "rho": 0.05, "micro_batches": 4}
        assert baseline.params == {k: v for k, v in base_point.items() if k in expected_keys[opt]}

    # the resolved spec is kept; each trial is one W&B run, found by the id in its user attrs
    assert load_sweep_spec(out / "spec.yaml") == load_sweep_spec(spec_path)
    runs = offline_runs(out)
    assert len(runs) == 6
    for opt, ts in trials.items():
        for t in ts:
            run = runs[t.user_attrs["wandb_run_id"]]
            assert (run.group, run.job_type, run.name) == ("tiny", "tune", f"{opt}-t{t.number}")
            assert run.config["optim"]["name"] == opt
            assert run.config["optim"]["lr"] == t.params["lr"]
            assert run.config["trial"]["study"] == f"tiny/{opt}"
            assert run.config["trial"]["number"] == t.number
            assert run.summary["status"] == "complete" and run.exit_code == 0

    # rerunning the same command resumes: finished trials stay, nothing is run twice
    assert sweep(spec_path, out) == 0
    again = read_trials(out / "optuna.journal", "tiny", ["sgd", "sam", "msam"])
    assert {o: [t.number for t in ts] for o, ts in again.items()} == {
        o: [t.number for t in ts] for o, ts in trials.items()
    }


@pytest.mark.filterwarnings("ignore:Fixed parameter lr")  # the test's points lie off the range
def test_pruned_diverged_and_failed_trials(tmp_path, write_spec, read_trials):
    """A bad lr is pruned early, a huge one diverges (pruned with its reason), a trial that raises
    fails, is retried once with the same parameters, and the budget is still met exactly."""
    from sweeps.engine.lifecycle import ensure_studies
    from sweeps.storage import open_storage
    from sweeps.studies import open_study

    spec_path = write_spec(
        optimizers=["sgd"],
        base={"train": {"epochs": 3}},
        search={"lr": {"low": 0.02, "high": 0.3, "log": True}},
        budget={"trials": 4, "pruner": "median"},
    )
    spec = load_sweep_spec(spec_path)
    out = tmp_path / "run"
    storage = open_storage(resolve_storage(None, out))
    ensure_studies(spec, storage)  # the baseline (lr 0.1) comes first
    study = open_study(storage, spec.name, "sgd")
    study.enqueue_trial({"lr": 1e-4}, user_attrs={"origin": "test-bad"})
    study.enqueue_trial({"lr": 1e5}, user_attrs={"origin": "test-diverge"})
    study.enqueue_trial({"lr": -1.0}, user_attrs={"origin": "test-error"})

    assert sweep(spec_path, out) == 0

    trials = read_trials(out / "optuna.journal", "tiny", ["sgd"])["sgd"]
    by_origin = {t.user_attrs.get("origin"): t for t in trials}
    assert len(finished(trials)) == 4

    bad = by_origin["test-bad"]
    assert bad.state == TrialState.PRUNED and bad.user_attrs["status"] == "pruned"
    assert bad.user_attrs["reason"].startswith("pruned at epoch")
    epochs_run = (out / bad.user_attrs["trial_dir"] / "metrics.jsonl").read_text().splitlines()
    assert len(epochs_run) < 3 and bad.user_attrs["epochs"] == len(epochs_run)

    diverged = by_origin["test-diverge"]
    assert diverged.state == TrialState.PRUNED and diverged.user_attrs["status"] == "diverged"
    assert diverged.user_attrs["reason"].startswith("diverged at epoch 1")

    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(failed) == 2  # the error and its one retry
    assert all(t.user_attrs["reason"].startswith("error: ") for t in failed)
    assert failed[1].user_attrs["retry_of"] == failed[0].number
    retried = [t.params or t.system_attrs["fixed_params"] for t in failed]
    assert retried == [{"lr": -1.0}, {"lr": -1.0}]  # the same point again, not a new sample
    assert (out / "trials" / "sgd" / str(failed[0].number) / "error.txt").exists()
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]

    runs = offline_runs(out)
    assert runs[diverged.user_attrs["wandb_run_id"]].summary["status"] == "diverged"
    assert "diverged at epoch 1" in runs[diverged.user_attrs["wandb_run_id"]].summary["reason"]
    pruned_run = runs[bad.user_attrs["wandb_run_id"]]
    assert pruned_run.summary["status"] == "pruned" and len(pruned_run.history) < 3


def test_grid_sampler_walks_the_grid(tmp_path, write_spec, read_trials):
    spec_path = write_spec(
        optimizers=["sgd"],
        base={"train": {"epochs": 1}},
        search={"lr": {"choices": [0.05, 0.1, 0.2]}},
        budget={"trials": 3, "sampler": "grid"},
    )
    out = tmp_path / "run"
    assert sweep(spec_path, out) == 0
    trials = read_trials(out / "optuna.journal", "tiny", ["sgd"])["sgd"]
    assert sorted(t.params["lr"] for t in trials) == [0.05, 0.1, 0.2]


def test_baseline_moves_into_the_search_space(write_spec):
    from sweeps.engine.search import baseline_params

    spec = load_sweep_spec(
        write_spec(
            base={"optim": {"lr": 5.0, "micro_batches": 8}},
            search={
                "lr": {"choices": [0.01, 0.1, 1.0]},
                "rho": {"low": 0.01, "high": 0.5},
                "micro_batches": {"choices": [2, 4, 8]},
            },
        )
    )
    assert baseline_params(spec, "sgd") == {"lr": 1.0}
    assert baseline_params(spec, "msam") == {"lr": 1.0, "rho": 0.05, "micro_batches": 8}
    spec = load_sweep_spec(write_spec(base={"optim": {"lr": 1e-4}}))
    assert baseline_params(spec, "msam") == {"lr": 0.02, "rho": 0.05, "micro_batches": 4}


@pytest.mark.parametrize(
    ("changes", "extra", "message"),
    [  # the full matrix of bad inputs is tests/reliability/test_bad_input.py
        ({"budget": {"sampler": "bayes"}}, [], "budget.sampler"),
        ({"base": {"data": {"val_fraction": 0.0}}}, [], "validation split"),
    ],
)
def test_input_errors_exit_2_before_any_work(tmp_path, write_spec, capsys, changes, extra, message):
    out = tmp_path / "run"
    assert sweep(write_spec(**changes), out, *extra) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err
    assert "hunter2" not in err
    assert not (out / "trials").exists() and not (out / "spec.yaml").exists()


def test_storage_urls():
    assert mask_url("postgresql://u:secret@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert mask_url("redis://:secret@h:6379/0") == "redis://:***@h:6379/0"
    assert mask_url("postgresql://u@h/db") == "postgresql://u@h/db"
    out = Path("runs/x")
    assert resolve_storage(None, out).arg == str(out / "optuna.journal")
    assert resolve_storage("postgres://u@h/db", out).arg == "postgresql://u@h/db"
    assert resolve_storage("postgresql+psycopg2://u@h/db", out).kind == "rdb"
    assert resolve_storage("redis://h:6379/0", out).kind == "redis"
    assert resolve_storage("other/optuna.journal", out).kind == "journal"


def test_live_view_table_on_a_terminal_and_lines_elsewhere(tmp_path, write_spec, capsys):
    from rich.console import Console

    from sweeps.engine.lifecycle import ensure_studies
    from sweeps.engine.live import LiveView, best_table
    from sweeps.storage import open_storage

    spec = load_sweep_spec(write_spec())
    storage = open_storage(resolve_storage(None, tmp_path))
    ensure_studies(spec, storage)
    console = Console(file=io.StringIO(), width=120)
    with LiveView(spec, storage, interval_s=0.05, console=console) as view:
        view.say("hello")
    lines = capsys.readouterr().out.splitlines()
    assert "hello" in lines
    assert any("sgd 0/2" in line and "msam 0/2" in line for line in lines)
    console.print(best_table("tiny", view.counts))
    assert "best trial per optimizer" in console.file.getvalue()

    terminal = Console(file=io.StringIO(), width=120, force_terminal=True)
    with LiveView(spec, storage, interval_s=0.05, console=terminal) as view:
        view.say("sgd trial 0: complete val_acc 0.5157 [lr=0.1, rho=0.05]")
    shown = terminal.file.getvalue()
    assert "sweep tiny" in shown and "best val" in shown and "msam" in shown
    assert "[lr=0.1, rho=0.05]" in shown  # a trial's parameters are text, not rich markup


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_sweep_specs(path):
    """Every shipped spec validates, its model builds for its images, and every optimizer's
    baseline trial is a valid train config."""
    from msam.data import dataset_info
    from msam.models import check_model
    from sweeps.engine.search import baseline_params

    spec = load_sweep_spec(path)
    info = dataset_info(spec.base.data.dataset)
    check_model(
        spec.base.model.name,
        num_classes=info.num_classes,
        in_chans=info.in_chans,
        img_size=info.img_size,
        small_input=spec.base.model.small_input,
        kwargs=spec.base.model.kwargs,
    )
    for opt in spec.optimizers:
        cfg = spec.train_config(opt, baseline_params(spec, opt))
        assert cfg.optim.name == opt and cfg.optim.lr == spec.base.optim.lr
    assert {p.stem for p in SHIPPED} >= {
        "demo",
        "fmnist-resnet18",
        "cifar10-resnet18",
        "cifar10-vit_tiny",
        "fmnist-vit_tiny",
    }
