"""The sweep fixtures, registered for every test by ``pytest_plugins`` in tests/conftest.py:
tiny spec files, ``msam`` in subprocesses (one torch thread, offline W&B), throwaway PostgreSQL and
Redis databases (skipped, with the reason, where their servers cannot be reached) and readers of
a sweep's trials."""

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

from helpers import REPO
from helpers.sweep import PG, REDIS, TINY_SPEC, merge, open_storage


@pytest.fixture
def write_spec(tmp_path: Path) -> Callable[..., Path]:
    """``write_spec(budget={"trials": 3}, ...)``: a tiny spec file with those sections merged in
    (``search`` is replaced as a whole)."""

    def write(**changes: Any) -> Path:
        raw = merge(TINY_SPEC, {k: v for k, v in changes.items() if k != "search"})
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
