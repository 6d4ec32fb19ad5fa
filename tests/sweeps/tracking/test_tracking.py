"""W&B tracking: what one training run logs (read back from the offline .wandb file and from the
run object), which mode ``auto`` picks, and that W&B trouble is a warning, never a failed run."""

from __future__ import annotations

import pytest
from helpers.wandb_offline import read_offline_run

from msam.config import parse_train_config
from msam.errors import UserError
from msam.trainer import run_train
from sweeps.tracking import (
    HISTORY_KEYS,
    WandbCallback,
    find_offline_runs,
    has_credentials,
    resolve_mode,
    sync_run,
)

CONFIG = {
    "name": "tiny-msam",
    "data": {"dataset": "digits", "subset": 256, "val_fraction": 0.25},
    "model": {"name": "test_resnet"},
    "optim": {"name": "msam", "lr": 0.1, "rho": 0.05, "micro_batches": 2},
    "train": {"epochs": 2, "batch_size": 64, "device": "cpu", "amp": "none"},
    "tracking": {"wandb": {"mode": "offline", "tags": ["smoke"]}},
}


@pytest.fixture
def no_credentials(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))


def test_one_run_per_training_run(tmp_path):
    cfg = parse_train_config(CONFIG)
    tracker = WandbCallback.from_train_config(
        cfg,
        group="tiny",
        job_type="tune",
        name="msam-t0",
        extra_config={"trial": {"study": "tiny/msam", "number": 0, "params": {"lr": 0.1}}},
        dir=tmp_path,
        finish_on_end=False,
    )
    result = run_train(
        cfg, out_dir=tmp_path / "t0", callbacks=[tracker], verbose=False, evaluate_test=False
    )
    # the live run object, before it ends
    run = tracker.run
    assert run.id == tracker.run_id and run.group == "tiny" and run.job_type == "tune"
    assert run.config["optim"]["micro_batches"] == 2 and run.config["trial"]["number"] == 0
    tracker.finish(status="pruned", reason="pruned at epoch 2", summary={"trial": 0})
    tracker.finish(status="complete")  # a second finish changes nothing

    (path,) = find_offline_runs(tmp_path)
    logged = read_offline_run(path)
    assert logged.run_id == tracker.run_id
    assert (logged.group, logged.job_type, logged.name) == ("tiny", "tune", "msam-t0")
    assert logged.project == "msam" and set(logged.tags) == {
        "msam",
        "test_resnet",
        "digits",
        "smoke",
    }
    assert logged.config["optim"] == cfg.to_dict()["optim"]
    assert logged.config["train"]["epochs"] == 2 and logged.config["info"]["device"] == "cpu"
    assert logged.config["trial"] == {"study": "tiny/msam", "number": 0, "params": {"lr": 0.1}}
    assert len(logged.history) == 2
    for row, metrics in zip(logged.history, result.history):
        assert set(HISTORY_KEYS.values()) <= set(row)
        assert row["val/acc"] == pytest.approx(metrics["val_acc"])
        assert row["epoch"] == metrics["epoch"]
    assert logged.summary["status"] == "pruned" and logged.summary["reason"] == "pruned at epoch 2"
    assert logged.summary["epochs_completed"] == 2 and logged.summary["trial"] == 0
    assert logged.exit_code == 0
    assert tracker.seconds > 0


def test_finish_on_end_records_the_trainer_outcome(tmp_path):
    cfg = parse_train_config(CONFIG)
    tracker = WandbCallback.from_train_config(cfg, job_type="train", dir=tmp_path)
    run_train(cfg, out_dir=None, callbacks=[tracker], verbose=False, evaluate_test=False)
    logged = read_offline_run(find_offline_runs(tmp_path)[0])
    assert logged.job_type == "train" and logged.name == "tiny-msam"
    assert logged.summary["status"] == "complete"


def test_wandb_trouble_is_a_warning(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where W&B wants a folder")
    cfg = parse_train_config(CONFIG)
    tracker = WandbCallback.from_train_config(cfg, dir=blocker / "sub")
    with pytest.warns(RuntimeWarning, match="W&B: could not start a run"):
        result = run_train(cfg, out_dir=None, callbacks=[tracker], verbose=False)
    assert result.status == "complete" and tracker.run is None


def test_disabled_mode_logs_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    tracker = WandbCallback.from_train_config(parse_train_config(CONFIG), dir=tmp_path)
    assert tracker.run_id is None
    tracker.on_train_start({}, {})
    tracker.finish(status="complete")
    assert not find_offline_runs(tmp_path)


def test_auto_mode(no_credentials, monkeypatch, tmp_path):
    assert not has_credentials() and resolve_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert has_credentials() and resolve_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")  # the environment wins
    assert resolve_mode("auto") == "offline" and resolve_mode("online") == "offline"
    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.delenv("WANDB_MODE")
    netrc = tmp_path / "netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    assert resolve_mode("auto") == "online" and resolve_mode("disabled") == "disabled"


def test_sync(no_credentials, tmp_path, capsys):
    assert sync_run(tmp_path) == 0
    assert "no offline W&B runs" in capsys.readouterr().err
    (tmp_path / "wandb" / "offline-run-20260101_000000-abcd1234").mkdir(parents=True)
    with pytest.raises(UserError, match="wandb login"):
        sync_run(tmp_path)


def test_msam_train_starts_its_own_wandb_service_not_its_parents(tmp_path):
    """A W&B service inherited from the parent process (``WANDB_SERVICE``; here one that has
    ended with its process) is not used: ``msam train`` starts its own and its run is logged.
    Before, the run was lost with a warning; with a parent still alive, a killed msam process
    left its run open in the parent's service ("run ID ... is in use") for every rerun."""
    import json
    import os
    import subprocess
    import sys

    import yaml
    from helpers import REPO

    ended = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os, wandb; wandb.setup(); print(os.environ['WANDB_SERVICE'])",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "WANDB_MODE": "offline"},
        timeout=120,
    )
    token = ended.stdout.strip().splitlines()[-1]
    assert token, ended.stderr
    config = tmp_path / "train.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "name": "own-service",
                "data": {"dataset": "digits", "subset": 128},
                "model": {"name": "test_resnet"},
                "optim": {"name": "sgd", "lr": 0.1},
                "train": {"epochs": 1, "batch_size": 32, "device": "cpu"},
                "tracking": {"wandb": {"mode": "offline"}},
            }
        )
    )
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "sweeps.cli", "train", str(config), "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "WANDB_MODE": "offline", "WANDB_SERVICE": token},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "could not start a run" not in done.stderr, done.stderr
    (run_dir,) = list((out / "wandb").glob("offline-run-*"))
    logged = read_offline_run(run_dir, wait_s=30)
    assert logged.exit_code == 0
    assert logged.summary["test_acc"] == json.loads((out / "summary.json").read_text())["test_acc"]
