"""The trainer on real data (digits, in scikit-learn's wheel) with a tiny timm model.

Slow here: ``msam train`` learning all of digits in a subprocess for each optimizer (15 s to over
a minute each) and ``torchrun`` with two gloo ranks (20 s). Fast tests cover them: the in-process
runs below (``test_resume_equals_uninterrupted_run`` checks that mSAM learns), ``msam train`` as
a subprocess in test_cli_diverged_run_exits_1 and tests/sweeps/results/test_export.py, and the
rank logic in tests/msam/test_ddp.py (the trainer's process-group set-up, msam.backward on two
gloo ranks).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO

from msam.callbacks import Callback
from msam.config import parse_train_config
from msam.errors import UserError
from msam.trainer import CHECKPOINT, METRICS, SUMMARY, run_train

TIMING = {"seconds", "images_per_s"}


def config(**overrides) -> dict:
    raw = {
        "name": "digits-tiny",
        "data": {"dataset": "digits", "subset": 640},
        "model": {"name": "test_resnet"},
        "optim": {"name": "msam", "lr": 0.05, "rho": 0.05, "micro_batches": 4},
        "train": {"epochs": 2, "batch_size": 64},
        "tracking": {"wandb": {"mode": "disabled"}},
    }
    for key, value in overrides.items():
        section, field = key.split("__")
        raw[section][field] = value
    return raw


def strip(history):
    return [{k: v for k, v in h.items() if k not in TIMING} for h in history]


class StopAfter(Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_end(self, epoch, metrics):
        return f"asked to stop at {epoch}" if epoch >= self.epoch else None


def test_outputs_and_metrics_schema(tmp_path):
    result = run_train(parse_train_config(config()), out_dir=tmp_path, verbose=False)
    assert result.status == "complete"
    lines = (tmp_path / METRICS).read_text().splitlines()
    assert len(lines) == 2
    expected = {
        "epoch",
        "train_loss",
        "train_acc",
        "val_loss",
        "val_acc",
        "lr",
        "seconds",
        "images_per_s",
    }
    for i, line in enumerate(lines, start=1):
        row = json.loads(line)
        assert set(row) == expected and row["epoch"] == i
    summary = json.loads((tmp_path / SUMMARY).read_text())
    assert summary["status"] == "complete" and 0 <= summary["test_acc"] <= 1
    assert summary["grad_evals_per_update"] == 2
    assert (tmp_path / CHECKPOINT).exists()


SUMMARY_KEYS = [
    "name", "status", "reason", "optimizer", "epochs_completed", "train_loss", "train_acc",
    "val_acc", "val_loss", "best_val_acc", "test_acc", "test_loss", "seconds", "images_per_s",
    "device", "amp", "parameters", "updates_per_epoch", "train_images", "grad_evals_per_update",
    "start_epoch", "versions",
]  # fmt: skip


def test_files_hold_the_returned_records_in_a_fixed_layout(tmp_path):
    """summary.json and metrics.jsonl byte for byte: what readers of run folders rely on."""
    cfg = parse_train_config(config(train__epochs=1, data__val_fraction=0.0))
    result = run_train(cfg, out_dir=tmp_path, verbose=False)
    assert list(result.summary) == SUMMARY_KEYS
    assert (tmp_path / SUMMARY).read_text() == json.dumps(result.summary, indent=2) + "\n"
    lines = "".join(json.dumps(h) + "\n" for h in result.history)
    assert (tmp_path / METRICS).read_text() == lines
    assert result.history[0]["val_loss"] is None and result.summary["best_val_acc"] is None
    assert result.summary["start_epoch"] == 0 and result.summary["epochs_completed"] == 1


def test_same_seed_same_metrics():
    cfg = parse_train_config(config())
    a = run_train(cfg, verbose=False)
    b = run_train(cfg, verbose=False)
    assert strip(a.history) == strip(b.history)
    assert a.summary["test_acc"] == b.summary["test_acc"]
    c = run_train(parse_train_config(config(train__seed=1)), verbose=False)
    assert strip(c.history) != strip(a.history)


def test_resume_equals_uninterrupted_run(tmp_path):
    cfg = parse_train_config(config(train__epochs=3))
    full = run_train(cfg, out_dir=tmp_path / "full", verbose=False)
    part = run_train(cfg, out_dir=tmp_path / "part", callbacks=[StopAfter(1)], verbose=False)
    assert part.status == "stopped" and len(part.history) == 1
    resumed = run_train(cfg, out_dir=tmp_path / "part", resume=True, verbose=False)
    assert resumed.status == "complete"
    assert strip(resumed.history) == strip(full.history)
    assert resumed.summary["test_acc"] == full.summary["test_acc"]
    assert full.summary["test_acc"] > 0.8  # it learns (0.96 after 3 epochs; chance is 0.1)
    rows = [json.loads(x) for x in (tmp_path / "part" / METRICS).read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    for p, q in zip(resumed.model.parameters(), full.model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_corrupt_checkpoint_is_ignored_with_warning(tmp_path):
    cfg = parse_train_config(config(train__epochs=1))
    run_train(cfg, out_dir=tmp_path, verbose=False)
    (tmp_path / CHECKPOINT).write_bytes(b"\x80\x04truncated")
    with pytest.warns(UserWarning, match="ignoring unreadable checkpoint"):
        result = run_train(cfg, out_dir=tmp_path, resume=True, verbose=False)
    assert result.status == "complete" and len(result.history) == 1


def test_resume_refuses_a_checkpoint_of_another_config(tmp_path):
    run_train(parse_train_config(config(train__epochs=1)), out_dir=tmp_path, verbose=False)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    other = parse_train_config(config(train__epochs=1, optim__lr=0.2))
    with pytest.raises(UserError, match=r"another config \(optim\.lr: 0\.05 -> 0\.2\)"):
        run_train(other, out_dir=tmp_path, resume=True, verbose=False)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    renamed = parse_train_config({**config(train__epochs=1), "name": "another-name"})
    assert run_train(renamed, out_dir=tmp_path, resume=True, verbose=False).status == "complete"


def test_existing_run_is_never_overwritten(tmp_path):
    cfg = parse_train_config(config(train__epochs=1))
    run_train(cfg, out_dir=tmp_path, verbose=False)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(UserError, match="already holds a run"):
        run_train(cfg, out_dir=tmp_path, verbose=False)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_divergence_stops_with_status(tmp_path):
    cfg = parse_train_config(config(optim__lr=1e6, optim__name="sgd", optim__micro_batches=1))
    result = run_train(cfg, out_dir=tmp_path, verbose=False)
    assert result.status == "diverged"
    assert result.reason.startswith("diverged at epoch 1")
    summary = json.loads((tmp_path / SUMMARY).read_text())
    assert summary["status"] == "diverged" and summary["test_acc"] is None


def test_callback_can_stop_early():
    result = run_train(
        parse_train_config(config(train__epochs=3)), callbacks=[StopAfter(2)], verbose=False
    )
    assert result.status == "stopped" and result.reason == "asked to stop at 2"
    assert len(result.history) == 2


def test_optimizers_see_identical_batches():
    """Paired runs: the same seed gives the same first batch whatever the optimizer."""
    from msam.data import build_data

    seen = []
    for _ in ("sgd", "sam", "msam"):
        data = build_data("digits", subset=640, batch_size=64, seed=3)
        data.train.set_epoch(0)
        seen.append(next(iter(data.train)))
    for x, y in seen[1:]:
        assert torch.equal(x, seen[0][0]) and torch.equal(y, seen[0][1])


def _cli(*args, cwd=REPO, env=None):
    return subprocess.run(
        [sys.executable, "-m", "sweeps.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        timeout=600,
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sgd", "sam", "msam"])
def test_msam_train_cli_learns_digits(tmp_path, name):
    import yaml

    raw = config(optim__name=name, optim__micro_batches=4 if name == "msam" else 1, train__epochs=4)
    raw["data"]["subset"] = None
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    proc = _cli("train", str(path), "--out", str(tmp_path / "run"))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "run" / SUMMARY).read_text())
    assert summary["optimizer"] == name
    assert summary["test_acc"] > 0.9


def test_cli_diverged_run_exits_1(tmp_path):
    import yaml

    path = tmp_path / "cfg.yaml"
    path.write_text(
        yaml.safe_dump(config(optim__name="sgd", optim__micro_batches=1, optim__lr=1e6))
    )
    proc = _cli("train", str(path), "--out", str(tmp_path / "run"))
    assert proc.returncode == 1
    assert "diverged at epoch 1" in proc.stderr


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_torchrun_ddp_on_gloo(tmp_path):
    import yaml

    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(config(train__epochs=1)))
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run(
        [
            str(torchrun),
            "--nproc_per_node=2",
            "--standalone",
            "-m",
            "msam.train",
            str(path),
            "--out",
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=280,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / SUMMARY).read_text())
    assert summary["status"] == "complete" and summary["test_acc"] is not None
    assert len((tmp_path / "run" / METRICS).read_text().splitlines()) == 1
