"""The claims benchmark end to end on digits: paired seeds, flatness, tables, resumable runs."""

from __future__ import annotations

import json

import pytest

from msam.errors import UserError
from sweeps.claims import methods, run
from sweeps.spec import parse_sweep_spec

SPEC = {
    "name": "claims-digits",
    "base": {
        "data": {"dataset": "digits", "subset": 320},
        "model": {"name": "test_resnet"},
        "optim": {"base": "sgd", "lr": 0.05, "rho": 0.05},
        "train": {"epochs": 1, "batch_size": 32},
        "tracking": {"wandb": {"mode": "disabled"}},
    },
    "optimizers": ["sgd", "sam", "msam"],
    "search": {"lr": {"low": 0.01, "high": 1.0, "log": True}},
    "budget": {"trials": 1},
    "final": {"flatness": {"images": 32, "iters": 2, "samples": 2}},
}


def test_claims_run_writes_tables_and_resumes(tmp_path):
    spec = parse_sweep_spec(SPEC)
    result = run(spec, out=tmp_path, micro_batches=[2], seeds=2)
    # Flatness is measured as in the final stage, with the spec's final.flatness.
    assert result["flatness"] == {
        "images": 32,
        "batch_size": 256,
        "iters": 2,
        "tol": 1e-3,
        "samples": 2,
        "radii": [0.01, 0.05, 0.1],
        "seed": 0,
    }
    assert {r["flatness_images"] for r in result["runs"]} == {32}
    assert [e["method"] for e in result["summary"]["table"]] == ["sgd", "sam", "msam-m2"]
    assert all(e["n"] == 2 and "hessian_top_eig" in e for e in result["summary"]["table"])
    diffs = result["summary"]["paired_vs_sam"]
    assert {(d["method"], d["metric"]) for d in diffs} == {
        (m, k)
        for m in ("sgd", "msam-m2")
        for k in ("test_acc", "hessian_top_eig", "hessian_trace", "sam_sharpness")
    }
    for name in ("results.json", "README.md", "claims.html"):
        assert (tmp_path / name).exists()
    # Paired: the same seed gives SGD and SAM the same initial weights and batches, so a rerun
    # reads the stored runs instead of training again.
    stored = json.loads((tmp_path / "runs" / "sam-seed1.json").read_text())
    again = run(spec, out=tmp_path, micro_batches=[2], seeds=2)
    assert stored in again["runs"]


def test_claims_without_flatness(tmp_path):
    spec = parse_sweep_spec({**SPEC, "final": {"flatness": {"images": 0}}})
    result = run(spec, out=tmp_path, micro_batches=[2], seeds=2, epochs=1)
    assert all("hessian_top_eig" not in r and r["status"] == "complete" for r in result["runs"])


def test_bad_micro_batches_are_user_errors():
    with pytest.raises(UserError, match="divides batch_size"):
        methods(32, [3, 5])
    with pytest.raises(UserError, match="m >= 2"):
        methods(32, [1])


def test_epochs_below_the_warmup_are_refused_before_any_run(tmp_path):
    base = {**SPEC["base"], "train": {"epochs": 3, "batch_size": 32, "warmup_epochs": 2}}
    spec = parse_sweep_spec({**SPEC, "base": base})
    out = tmp_path / "claims"
    with pytest.raises(UserError, match="warmup_epochs"):
        run(spec, out=out, micro_batches=[2], seeds=2, epochs=1)
    assert not out.exists()
