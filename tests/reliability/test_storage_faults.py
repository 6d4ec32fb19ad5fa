"""Storages and destinations that are wrong or contended: one line and exit 2 before any work
(nothing left behind), or, where nothing is wrong but timing, success.

- ``--storage`` naming a folder, or an existing file that is not a journal (a journal's reader
  skips damaged lines, so it must never take a spec or a log for a journal and append to it).
- ``redis://host/abc``: redis-py took the database for 0 without a word.
- Two processes opening the same fresh PostgreSQL database at once both create Optuna's schema;
  the loser used to exit 2 with "cannot reach the database (duplicate key ...)".
- ``msam export --to`` a read-only folder: a traceback before.
- ``--gpus`` on a machine without a CUDA GPU: workers would have trained on the CPU, unsaid.
- ``--workers`` far above the CPU cores: a warning, and the sweep still runs.
"""

from __future__ import annotations

import os
import subprocess
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from helpers.sweep import PG, check_exact, snapshot

from sweeps.cli import main
from sweeps.storage import open_storage, resolve_storage


def one_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("what", ["folder", "spec file", "log file"])
def test_a_storage_that_is_not_a_journal_is_refused_untouched(tmp_path, write_spec, capsys, what):
    spec = write_spec()
    target = tmp_path / "target"
    if what == "folder":
        target.mkdir()
        (target / "keep.txt").write_text("mine\n")
    elif what == "spec file":
        target = spec
    else:
        target.write_text("epoch 1 loss 0.3\nepoch 2 loss 0.2\n")
    before = snapshot(tmp_path)
    out = tmp_path / "run"
    assert main(["sweep", str(spec), "--out", str(out), "--storage", str(target)]) == 2
    line = one_line(capsys.readouterr().err)
    expected = "is a folder, not a journal file" if what == "folder" else "not an Optuna journal"
    assert str(target) in line and expected in line, line
    assert snapshot(tmp_path) == before and not out.exists()


# Port 1: nothing listens, so even a check that let these through would write nowhere; the
# refusal comes before any connection.
@pytest.mark.parametrize("url", ["redis://127.0.0.1:1/abc", "redis://127.0.0.1:1/1?db=x"])
def test_a_redis_database_that_is_not_a_number_is_refused(tmp_path, write_spec, capsys, url):
    out = tmp_path / "run"
    assert main(["sweep", str(write_spec()), "--out", str(out), "--storage", url]) == 2
    line = one_line(capsys.readouterr().err)
    assert "the Redis database must be a number" in line, line
    assert not out.exists()


@pytest.fixture
def fresh_pg_db():
    """The name of a new, empty PostgreSQL database (no Optuna schema yet), dropped after."""
    psycopg2 = pytest.importorskip("psycopg2")
    try:
        admin = psycopg2.connect(dbname="postgres", connect_timeout=3, **PG)
    except psycopg2.OperationalError as exc:
        pytest.skip(f"PostgreSQL not reachable at 127.0.0.1:5432 ({str(exc).strip()[:80]})")
    admin.autocommit = True
    names: list[str] = []

    def make() -> str:
        name = f"msam_race_{uuid.uuid4().hex[:10]}"
        with admin.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        names.append(name)
        return f"postgresql://{PG['user']}@{PG['host']}:{PG['port']}/{name}"

    yield make
    with admin.cursor() as cur:
        for name in names:
            cur.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (name,),
            )
            cur.execute(f'DROP DATABASE IF EXISTS "{name}"')
    admin.close()


def test_processes_creating_a_fresh_databases_schema_at_once_all_succeed(fresh_pg_db):
    """Three openers released together on each of two fresh databases (without the retry one
    of them failed in every try): every one gets a working storage."""
    import optuna

    for _ in range(2):
        url = fresh_pg_db()
        start = threading.Barrier(3)

        def open_it(index: int, url: str = url, start: threading.Barrier = start) -> int:
            start.wait()
            storage = open_storage(resolve_storage(url, Path(".")))
            study = optuna.create_study(
                study_name=f"s{index}", storage=storage, direction="maximize"
            )
            study.tell(study.ask(), float(index))
            return len(optuna.get_all_study_names(storage))

        with ThreadPoolExecutor(3) as pool:
            found = list(pool.map(open_it, range(3)))
        assert all(n >= 1 for n in found)
        storage = open_storage(resolve_storage(url, Path(".")))
        assert sorted(optuna.get_all_study_names(storage)) == ["s0", "s1", "s2"]


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder nothing can be written into, even by root (a read-only bind mount), with one
    file in it."""
    folder = tmp_path / "ro"
    folder.mkdir()
    (folder / "other.yaml").write_text("mine: 1\n")
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    bind = subprocess.run(["mount", "--bind", str(folder), str(folder)], capture_output=True)
    if bind.returncode != 0:
        pytest.skip(f"cannot bind-mount here ({bind.stderr.decode().strip()[:80]})")
    try:
        ro = subprocess.run(["mount", "-o", "remount,ro,bind", str(folder)], capture_output=True)
        if ro.returncode != 0:
            pytest.skip(f"cannot remount read-only here ({ro.stderr.decode().strip()[:80]})")
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False)


def test_export_to_a_read_only_folder_exits_2(tmp_path, read_only_folder, msam_cli):
    from helpers.finals import make_sweep

    run_dir = tmp_path / "sweep"
    make_sweep(run_dir)  # studies, no finals: tuned/ holds each optimizer's best trial
    assert msam_cli("leaderboard", run_dir).returncode == 0
    assert list((run_dir / "tuned").glob("*.yaml"))
    before = snapshot(run_dir)
    for to in (read_only_folder, read_only_folder / "new"):
        result = msam_cli("export", run_dir, "--to", to)
        assert result.returncode == 2, result.stdout + result.stderr
        line = one_line(result.stderr)
        assert f"--to {to}" in line and "cannot write" in line, line
        assert sorted(p.name for p in read_only_folder.iterdir()) == ["other.yaml"]
    assert snapshot(run_dir) == before


def test_gpus_without_a_cuda_gpu_are_refused(tmp_path, write_spec, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    out = tmp_path / "run"
    for gpus in ("0", "0,1"):
        assert main(["sweep", str(write_spec()), "--out", str(out), "--gpus", gpus]) == 2
        line = one_line(capsys.readouterr().err)
        assert f"--gpus {gpus}" in line and "no CUDA GPU" in line, line
    assert not out.exists()


def test_gpus_beyond_the_machines_are_refused(tmp_path, write_spec, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    out = tmp_path / "run"
    assert main(["sweep", str(write_spec()), "--out", str(out), "--gpus", "1,2,5"]) == 2
    line = one_line(capsys.readouterr().err)
    assert "no GPU 2, 5 on this machine (2 CUDA GPU(s): 0-1)" in line, line
    assert not out.exists()


def cpu_warnings(recwarn) -> list[str]:
    return [str(w.message) for w in recwarn if "CPU core" in str(w.message)]


def test_far_more_workers_than_cores_warn(tmp_path, write_spec, monkeypatch, recwarn):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})  # a two-core machine
    monkeypatch.setenv("MSAM_WORKER_THREADS", "1")
    spec = str(write_spec())
    # Nobody listens on port 1: the sweep stops when it opens the storage, after the checks.
    url = "postgresql://u@127.0.0.1:1/db"
    warned = (
        "64 worker(s) on 2 CPU core(s): they share the cores, so every trial runs slower and "
        "its timings mean less; fewer workers would finish about as soon"
    )
    for workers, expected in (("2", []), ("64", [warned])):
        recwarn.clear()
        args = ["--out", str(tmp_path / "r"), "--workers", workers, "--storage", url]
        assert main(["sweep", spec, *args]) == 2
        assert cpu_warnings(recwarn) == expected, workers
    assert not (tmp_path / "r").exists()


def test_a_sweep_with_more_threads_than_cores_warns_and_still_runs(
    tmp_path, write_spec, read_trials, monkeypatch, recwarn
):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})  # a one-core machine
    monkeypatch.setenv("MSAM_WORKER_THREADS", "2")
    spec = write_spec(optimizers=["sgd"], budget={"trials": 1}, base={"train": {"epochs": 1}})
    out = tmp_path / "run"
    try:
        assert main(["sweep", str(spec), "--out", str(out), "--stage", "tune"]) == 0
    finally:
        import torch

        torch.set_num_threads(1)  # the sweep set two for this process
    assert cpu_warnings(recwarn) == [
        "1 worker(s) x 2 torch threads on 1 CPU core(s): they share the cores, so every trial "
        "runs slower and its timings mean less; fewer workers would finish about as soon"
    ]
    check_exact(read_trials(out / "optuna.journal", "tiny", ["sgd"]), 1)
