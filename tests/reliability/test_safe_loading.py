"""Nothing msam reads can run code: YAML through a SafeLoader only, checkpoints with
``weights_only=True``, CIFAR batch files (pickles) through an unpickler that builds NumPy arrays
and nothing else. Each is tried with a file that would create ``PWNED`` if it were executed."""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import REPO

from msam.config import parse_train_config
from msam.data import build_data
from msam.errors import UserError
from msam.trainer import CHECKPOINT, load_checkpoint, run_train


class Payload:
    """Unpickling this runs a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "PWNED"
    cfg = parse_train_config(
        {
            "name": "t",
            "data": {"dataset": "digits", "subset": 256},
            "model": {"name": "test_resnet"},
            "train": {"epochs": 1, "batch_size": 64, "device": "cpu"},
            "tracking": {"wandb": {"mode": "disabled"}},
        }
    )
    torch.save({"model": Payload(marker), "epoch": 1}, tmp_path / CHECKPOINT)
    with pytest.warns(UserWarning, match="ignoring unreadable checkpoint"):
        assert load_checkpoint(tmp_path / CHECKPOINT) is None
    with pytest.warns(UserWarning, match="ignoring unreadable checkpoint"):
        result = run_train(cfg, out_dir=tmp_path, resume=True, verbose=False)
    assert result.status == "complete" and len(result.history) == 1  # started over
    assert not marker.exists()


def test_a_cifar_batch_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "PWNED"
    folder = tmp_path / "root" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), "labels": [1, 2, 3, 4]}
        if name == "data_batch_3":
            batch["labels"] = Payload(marker)
        (folder / name).write_bytes(pickle.dumps(batch))
    with pytest.raises(UserError, match="refusing to load posix.system"):
        build_data("cifar10", root=tmp_path / "root", batch_size=4, val_fraction=0.0)
    assert not marker.exists()


def test_yaml_tags_that_would_run_code_are_refused(tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / "config.yaml"
    path.write_text(f'name: !!python/object/apply:os.system ["touch {marker}"]\n')
    from msam.config import load_train_config

    with pytest.raises(UserError):
        load_train_config(path)
    assert not marker.exists()


def test_every_loader_in_the_code_is_a_safe_one():
    """A new ``torch.load`` without ``weights_only=True``, or an unsafe YAML or pickle load,
    fails here before it ships."""
    from msam.config import _UniqueKeyLoader

    assert issubclass(_UniqueKeyLoader, yaml.SafeLoader)
    unsafe = []
    for path in sorted((REPO / "msam").rglob("*.py")) + sorted((REPO / "sweeps").rglob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            where = f"{path.relative_to(REPO)}:{number}: {line.strip()}"
            if "torch.load(" in line and "weights_only=True" not in line:
                unsafe.append(where)
            if re.search(r"yaml\.(unsafe_load|full_load|load)\(", line) and (
                "Loader=_UniqueKeyLoader" not in line
            ):
                unsafe.append(where)
            if re.search(r"pickle\.loads?\(|dill|marshal\.load", line):
                unsafe.append(where)
    assert not unsafe, "\n".join(unsafe)
