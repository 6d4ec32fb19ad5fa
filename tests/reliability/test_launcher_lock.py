"""One launcher per run folder: a second ``msam sweep`` on a folder that one is running on exits
2 saying who holds it, before it touches anything; a lock left by a dead launcher is taken over;
``msam worker`` processes may still join. Without the lock, two launchers both ran every final,
in the same folders at the same time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from helpers.sweep import check_exact, snapshot

from sweeps.engine.folder_lock import launcher_lock
from sweeps.layout import RunFolder

HOLD = """
import sys, time
from sweeps.engine.folder_lock import launcher_lock
from sweeps.layout import RunFolder
with launcher_lock(RunFolder(sys.argv[1])):
    print("held", flush=True)
    time.sleep(120)
"""


@pytest.fixture
def holder(env):
    """Another process holding a run folder's launcher lock, as a running launcher does."""
    procs = []

    def hold(out):
        proc = subprocess.Popen(
            [sys.executable, "-c", HOLD, str(out)], env=env, stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout.readline().strip() == "held"
        procs.append(proc)
        return proc

    yield hold
    for proc in procs:
        proc.kill()
        proc.wait()


def test_a_second_launcher_exits_2_naming_the_holder_and_touches_nothing(
    tmp_path, write_spec, msam_cli, holder
):
    spec = write_spec(optimizers=["sgd"], budget={"trials": 1}, base={"train": {"epochs": 1}})
    out = tmp_path / "run"
    assert msam_cli("sweep", spec, "--out", out).returncode == 0
    proc = holder(out)
    before = snapshot(out)
    second = msam_cli("sweep", spec, "--out", out, "--set", "budget.trials=2")
    assert second.returncode == 2, second.stderr
    (line,) = second.stderr.strip().splitlines()
    assert "another msam sweep runs on this run folder" in line and f"pid {proc.pid}" in line
    assert "Traceback" not in second.stderr
    assert _files(snapshot(out)) == _files(before)


def _files(snap):
    """The files of a snapshot, bytes and mtimes (a folder's own mtime moves when Optuna's
    journal lock, a symlink made and removed beside the journal, is taken to read it)."""
    return {path: entry for path, entry in snap.items() if entry[0] is not None}


def test_workers_may_join_while_the_launcher_holds_the_folder(
    tmp_path, write_spec, msam_cli, holder, read_trials
):
    spec = write_spec(optimizers=["sgd"], budget={"trials": 1}, base={"train": {"epochs": 1}})
    out = tmp_path / "run"
    holder(out)
    worker = msam_cli("worker", spec, "--storage", out / "optuna.journal", "--out", out)
    assert worker.returncode == 0, worker.stderr
    check_exact(read_trials(out / "optuna.journal", "tiny", ["sgd"]), 1)


def test_a_dead_launchers_lock_is_taken_over(tmp_path, write_spec, msam_cli):
    spec = write_spec(optimizers=["sgd"], budget={"trials": 1}, base={"train": {"epochs": 1}})
    out = tmp_path / "run"
    out.mkdir()
    ended = subprocess.Popen(["true"])
    ended.wait()
    stale = {"pid": ended.pid, "host": os.uname().nodename, "since": "2026-01-01 00:00:00 UTC"}
    RunFolder(out).launcher_lock.write_text(json.dumps(stale))
    assert msam_cli("sweep", spec, "--out", out).returncode == 0
    who = json.loads(RunFolder(out).launcher_lock.read_text())
    assert who["pid"] != ended.pid


def test_the_lock_is_released_when_the_holder_dies(tmp_path):
    folder = RunFolder(tmp_path / "run")
    # A second descriptor conflicts under flock even in the same process, as launchers do.
    with launcher_lock(folder), pytest.raises(Exception, match="another msam sweep"):
        launcher_lock(folder).__enter__()
    with launcher_lock(folder):  # released on exit: taken again at once
        pass


def _held(folder: RunFolder) -> bool:
    if not folder.launcher_lock.exists():
        return False
    try:
        with launcher_lock(folder):
            return False
    except Exception:
        return True


@pytest.mark.slow
def test_two_launchers_at_once_run_each_final_once(tmp_path, write_spec, start_sweep):
    spec = write_spec(
        optimizers=["sgd", "sam"],
        budget={"trials": 2},
        base={"train": {"epochs": 1}},
        final={"seeds": 2, "flatness": {"images": 0}},
    )
    out = tmp_path / "run"
    first = start_sweep(spec, "--out", out)
    deadline = time.monotonic() + 120
    while not _held(RunFolder(out)):
        assert time.monotonic() < deadline, "the first launcher never took the run folder"
        time.sleep(0.1)
    second = start_sweep(spec, "--out", out)
    second_out, _ = second.communicate(timeout=120)
    assert second.wait() == 2, second_out
    assert "another msam sweep runs on this run folder" in second_out
    first_out, _ = first.communicate(timeout=300)
    assert first.wait() == 0, first_out
    finals = sorted(p.parent.name + "/" + p.name for p in (out / "finals").glob("*/seed*"))
    assert finals == ["sam/seed0", "sam/seed1", "sgd/seed0", "sgd/seed1"]
    assert not (out / "finals" / ".stale").exists()
