"""Tuned defaults: complete train configs with provenance comments, runnable by ``msam train``
as they are, copied by ``msam export`` without ever silently replacing a different file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import REPO
from helpers.finals import (
    NAME,
    copy_sweep,
    make_sweep,
)

from msam.config import TrainConfig, parse_train_config
from msam.errors import UserError
from sweeps.cli import main
from sweeps.results.export import export_tuned
from sweeps.results.publish import run_leaderboard


@pytest.fixture
def exported(tiny_sweep, tmp_path) -> Path:
    """A copy of the tiny sweep whose leaderboard (and so tuned/) has been written."""
    run_dir = copy_sweep(tiny_sweep, tmp_path)
    run_leaderboard(run_dir, report=False)
    return run_dir


def comments(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if line.startswith("#"))


def test_tuned_configs_are_complete_with_provenance(exported):
    for optimizer, params in {
        "sgd": {"lr": 0.2},
        "sam": {"lr": 0.2, "rho": 0.1},
        "msam": {"lr": 0.2, "rho": 0.1, "micro_batches": 2},
    }.items():
        path = exported / "tuned" / f"{NAME}-{optimizer}.yaml"
        text = path.read_text()
        raw = yaml.safe_load(text)
        assert set(raw) == set(TrainConfig.model_fields)  # complete, and no extra keys
        cfg = parse_train_config(raw)
        assert cfg.name == f"{NAME}-{optimizer}" and cfg.optim.name == optimizer
        for key, value in params.items():
            assert getattr(cfg.optim, key) == value
        assert cfg.train.seed == 0 and cfg.train.epochs == 1
        head = comments(text)
        assert text.startswith("# Tuned default for")
        for needle in (
            f"msam sweep {NAME}",
            f"study: {NAME}/{optimizer} (storage: optuna.journal)",
            "trial: 1, validation accuracy 90.00%",
            "best of 3 complete trials; 1 pruned, 1 failed",
            "test accuracy over 2 seed(s) [0, 1]",
            "95% CI",
            "versions: msam ",
            "optuna 5",
            "date: 20",
        ):
            assert needle in head, needle


def test_tuned_yaml_runs_with_msam_train(exported, tmp_path):
    config = exported / "tuned" / f"{NAME}-msam.yaml"
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "sweeps.cli", "train", str(config), "--out", str(tmp_path / "run")]
        + ["--set", "train.epochs=1"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "run" / "summary.json").exists()


def test_export_copies_then_keeps_identical_and_refuses_different(exported, tmp_path, capsys):
    dest = tmp_path / "configs" / "tuned"
    assert main(["export", str(exported), "--to", str(dest)]) == 0
    names = sorted(p.name for p in dest.iterdir())
    assert names == [f"{NAME}-msam.yaml", f"{NAME}-sam.yaml", f"{NAME}-sgd.yaml"]
    assert capsys.readouterr().out.count("wrote: ") == 3
    for name in names:
        assert (dest / name).read_bytes() == (exported / "tuned" / name).read_bytes()

    # a later leaderboard rewrites tuned/ with a new date: same configs, so nothing to do
    run_leaderboard(exported, report=False)
    assert main(["export", str(exported), "--to", str(dest)]) == 0
    assert capsys.readouterr().out.count("unchanged: ") == 3

    # a file holding a different config is never replaced silently, and nothing is written
    changed = dest / f"{NAME}-sam.yaml"
    changed.write_text(changed.read_text().replace("lr: 0.2", "lr: 0.3"))
    (dest / f"{NAME}-sgd.yaml").unlink()
    assert main(["export", str(exported), "--to", str(dest)]) == 2
    assert "different config" in capsys.readouterr().err
    assert not (dest / f"{NAME}-sgd.yaml").exists()
    assert "lr: 0.3" in changed.read_text()
    assert export_tuned(exported, dest, force=True) == 0
    assert "lr: 0.2" in changed.read_text() and (dest / f"{NAME}-sgd.yaml").exists()


def test_export_writes_tuned_when_missing(tmp_path):
    run_dir = tmp_path / "run"
    make_sweep(run_dir)  # tuning only: no finals, no leaderboard yet
    assert export_tuned(run_dir, tmp_path / "out") == 0
    text = (tmp_path / "out" / f"{NAME}-sam.yaml").read_text()
    assert "test accuracy: no final runs yet" in text
    assert parse_train_config(yaml.safe_load(text)).optim.rho == 0.1


def test_export_without_a_sweep_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no spec.yaml, optuna.journal or finals"):
        export_tuned(tmp_path, tmp_path / "out")
