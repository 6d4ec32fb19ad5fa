"""Sweep fixtures, shared by tests/sweeps and tests/reliability: tiny specs (digits,
test_resnet, one CPU thread; a trial takes a second or two), throwaway PostgreSQL and Redis
databases, sweeps started in subprocesses, and a reader for a sweep's trials."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
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
    "final": {"seeds": 0},
}


def _merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


@pytest.fixture
def write_spec(tmp_path: Path) -> Callable[..., Path]:
    """``write_spec(budget={"trials": 3}, ...)``: a tiny spec file with those sections merged in
    (``search`` is replaced as a whole)."""

    def write(**changes: Any) -> Path:
        raw = _merge(TINY_SPEC, {k: v for k, v in changes.items() if k != "search"})
        raw["search"] = changes.get("search", TINY_SPEC["search"])  # a new space, not a merge
        path = tmp_path / f"spec-{uuid.uuid4().hex[:6]}.yaml"
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        return path

    return write


@pytest.fixture
def env() -> dict[str, str]:
    """Environment for ``msam`` subprocesses: offline W&B, one torch thread, this repo first."""
    return dict(
        os.environ,
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        MSAM_WORKER_THREADS="1",
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )


@pytest.fixture
def msam_cli(env: dict[str, str]) -> Callable[..., subprocess.CompletedProcess]:
    """Run ``msam ARGS`` in a subprocess (as a user would) and return the finished process."""

    def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "sweeps.cli", *map(str, args)],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    return run


def open_storage(url_or_path: str | Path) -> Any:
    from sweeps.storage import open_storage as _open
    from sweeps.storage import resolve_storage

    return _open(resolve_storage(str(url_or_path), Path(".")))


@pytest.fixture
def read_trials() -> Callable[..., dict[str, list[Any]]]:
    """``read_trials(storage_url_or_journal, spec_name, optimizers)`` -> trials by optimizer."""
    import optuna

    def read(storage: Any, name: str, optimizers: list[str]) -> dict[str, list[Any]]:
        if isinstance(storage, (str, Path)):
            storage = open_storage(storage)
        return {
            opt: optuna.load_study(study_name=f"{name}/{opt}", storage=storage).get_trials()
            for opt in optimizers
        }

    return read


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for one test, dropped afterwards."""
    psycopg2 = pytest.importorskip("psycopg2")
    try:
        admin = psycopg2.connect(dbname="postgres", connect_timeout=3, **PG)
    except psycopg2.OperationalError as exc:
        pytest.skip(f"PostgreSQL not reachable at 127.0.0.1:5432 ({str(exc).strip()[:80]})")
    admin.autocommit = True
    db = f"msam_test_{uuid.uuid4().hex[:10]}"
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{db}"')
    try:
        yield f"postgresql://{PG['user']}@{PG['host']}:{PG['port']}/{db}"
    finally:
        with admin.cursor() as cur:
            cur.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (db,)
            )
            time.sleep(0.2)
            cur.execute(f'DROP DATABASE IF EXISTS "{db}"')
        admin.close()


@pytest.fixture
def redis_url() -> Iterator[str]:
    """An empty Redis database (of the 16) for one test, emptied afterwards."""
    redis = pytest.importorskip("redis")
    try:
        for db in range(15, 0, -1):
            client = redis.Redis.from_url(f"{REDIS}/{db}", socket_connect_timeout=3)
            if client.dbsize() == 0:
                break
        else:
            pytest.skip("no empty Redis database to use")
    except redis.RedisError as exc:
        pytest.skip(f"Redis not reachable at 127.0.0.1:6379 ({exc})")
    try:
        yield f"{REDIS}/{db}"
    finally:
        client.flushdb()
        client.close()


@pytest.fixture
def start_sweep(env: dict[str, str]) -> Iterator[Callable[..., subprocess.Popen]]:
    """Start ``msam sweep ARGS`` in its own process group; stopped at the end of the test."""
    procs: list[subprocess.Popen] = []

    def start(*args: str) -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sweeps.cli", "sweep", *map(str, args)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()


@pytest.fixture
def running_trials() -> Callable[..., list[Any]]:
    """``running_trials(journal, name, optimizers, run_dir)``: wait until trials are mid-training
    (RUNNING, owned by a worker, at least one epoch written) and return them. With
    ``checkpoint=True``, until a running trial's epoch checkpoint is on disk as well."""
    from optuna.trial import TrialState

    def wait(
        journal: Path,
        name: str,
        optimizers: list[str],
        run_dir: Path,
        timeout: float = 90,
        checkpoint: bool = False,
    ) -> list[Any]:
        import optuna

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            time.sleep(0.2)
            if not journal.exists():
                continue
            storage = open_storage(journal)
            found = []
            for opt in optimizers:
                try:
                    study = optuna.load_study(study_name=f"{name}/{opt}", storage=storage)
                except KeyError:
                    continue
                for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                    folder = run_dir / t.user_attrs.get("trial_dir", "-")
                    metrics = folder / "metrics.jsonl"
                    if "worker" not in t.user_attrs or not metrics.exists():
                        continue
                    if metrics.read_text() and (
                        not checkpoint or (folder / "checkpoint.pt").exists()
                    ):
                        found.append(t)
            if found:
                return found
        raise TimeoutError("no trial reached its second epoch in time")

    return wait


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
    from sweeps.tracking.wandb_runs import find_offline_runs, read_offline_run

    return {r.run_id: r for r in map(read_offline_run, find_offline_runs(out))}


def snapshot(folder: Path) -> dict[str, tuple[bytes | None, int]]:
    """Every entry under ``folder`` (and itself): its bytes (None for a folder) and its mtime."""
    return {
        str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns)
        for p in sorted([folder, *folder.rglob("*")])
    }
