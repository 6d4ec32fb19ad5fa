"""The benchmark scripts that the results under benchmarks/results/ were made with still run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import yaml
from helpers import REPO


def _run(*argv: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, *argv], capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout
    )


def test_flatness_cost_measures_flatness_against_training(tmp_path):
    spec = yaml.safe_load((REPO / "configs/sweeps/demo.yaml").read_text())
    spec["base"]["data"] = {"dataset": "digits", "subset": 400, "val_fraction": 0.25}
    spec["base"]["train"].update({"epochs": 1, "batch_size": 32})
    spec["search"]["micro_batches"] = {"choices": [2]}
    spec["final"]["flatness"].update({"images": 64, "batch_size": 64, "samples": 2, "iters": 4})
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "cost.json"
    done = _run(
        "benchmarks/flatness_cost.py", str(path), "--optimizers", "sgd,msam",
        "--micro-batches", "2", "--repeats", "2", "--json", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    records = json.loads(out.read_text())["records"]
    assert [(r["optimizer"], r["micro_batches"]) for r in records] == [("sgd", 1), ("msam", 2)]
    for r in records:
        assert len(r["flatness_seconds"]) == 2 and r["train_seconds"] > 0
        assert r["ratio"] == r["flatness_seconds_median"] / r["train_seconds"]
        assert r["flatness"]["n_images"] == 64 and "hessian_top_eig_converged" in r["flatness"]
        assert set(r["flatness"]["sharpness"]) == {"0.01", "0.05", "0.1"}


def test_profile_step_prints_a_table_per_m():
    done = _run(
        "benchmarks/profile_step.py", "--model", "test_resnet", "--img-size", "16",
        "--batch-size", "8", "--micro-batches", "1,2", "--steps", "1",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "== m = 1:" in done.stdout and "== m = 2:" in done.stdout
    assert "aten::convolution_backward" in done.stdout
