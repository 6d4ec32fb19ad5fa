"""Tiny sweeps for the engine and reliability tests: a spec whose trials take a second or two
(digits, test_resnet, one CPU thread), the throwaway database servers, and checks on what a sweep
left behind (trial states, W&B runs, a folder's bytes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from helpers.wandb_offline import find_offline_runs, read_offline_run

PG = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}
REDIS = "redis://127.0.0.1:6379"

TINY_SPEC: dict[str, Any] = {
    "name": "tiny",
    "base": {
        "data": {"dataset": "digits", "subset": 768, "val_fraction": 0.25},
        "model": {"name": "test_resnet"},
        "optim": {"base": "sgd", "momentum": 0.9, "lr": 0.1},
        "train": {"epochs": 2, "batch_size": 64, "device": "cpu", "amp": "none"},
        "tracking": {"wandb": {"mode": "offline"}},
    },
    "optimizers": ["sgd", "sam", "msam"],
    "search": {
        "lr": {"low": 0.02, "high": 0.3, "log": True},
        "rho": {"low": 0.01, "high": 0.2, "log": True},
        "micro_batches": {"choices": [2, 4, 8]},
    },
    "budget": {"trials": 2, "sampler": "random", "pruner": "none", "seed": 0},
    # Final models are measured on a few images: enough to exercise every flatness metric.
    "final": {"seeds": 0, "flatness": {"images": 64, "batch_size": 32, "iters": 2, "samples": 2}},
}


def merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``changes`` merged in, nested dicts key by key (neither is modified)."""
    out = dict(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def open_storage(url_or_path: str | Path) -> Any:
    """The Optuna storage a sweep would open for this URL or journal path."""
    from sweeps.storage import open_storage as _open
    from sweeps.storage import resolve_storage

    return _open(resolve_storage(str(url_or_path), Path(".")))


def finished_states() -> tuple[Any, ...]:
    from optuna.trial import TrialState

    return (TrialState.COMPLETE, TrialState.PRUNED)


def check_exact(trials: dict[str, list[Any]], budget: int) -> None:
    """Every study has exactly ``budget`` finished trials, none left running or waiting, and
    each trial number once."""
    from optuna.trial import TrialState

    for opt, ts in trials.items():
        states = [t.state for t in ts]
        assert sum(s in finished_states() for s in states) == budget, (opt, states)
        assert TrialState.RUNNING not in states and TrialState.WAITING not in states, opt
        numbers = [t.number for t in ts]
        assert numbers == sorted(set(numbers)), opt


def rerun(spec: Path, out: Path, *extra: str) -> int:
    """The same ``msam sweep`` command again, in this process (tuning only)."""
    from sweeps.cli import main

    return main(["sweep", str(spec), "--out", str(out), "--stage", "tune", *extra])


def offline_runs(out: Path) -> dict[str, Any]:
    """The W&B runs a sweep wrote offline under ``out``, read back from their logs, by run id."""
    return {r.run_id: r for r in map(read_offline_run, find_offline_runs(out))}


def snapshot(folder: Path) -> dict[str, tuple[bytes | None, int]]:
    """Every entry under ``folder`` (and itself): its bytes (None for a folder) and its mtime."""
    return {
        str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns)
        for p in sorted([folder, *folder.rglob("*")])
    }
