"""``msam sync`` with credentials but no reachable W&B server fails within seconds, one line,
and leaves the run folder as it was (no ``.syncstate``), so a later sync can still upload.

It used to hang (killed after 90 s) on a refused connection and leave ``.syncstate`` behind.
A server that accepts the connection and then never answers is cut off by ``MSAM_SYNC_TIMEOUT``.
"""

from __future__ import annotations

import socket
import time

import pytest
from helpers.sweep import snapshot

from sweeps.tracking import WandbCallback


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    """A run folder holding one real, finished offline W&B run."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    folder = tmp_path / "run"
    tracker = WandbCallback(project="msam", name="one", dir=folder, mode="offline")
    tracker.on_train_start({"lr": 0.1}, {})
    tracker.on_epoch_end(1, {"epoch": 1, "train_loss": 1.0})
    tracker.on_train_end({"status": "complete"})
    assert list((folder / "wandb").glob("offline-run-*"))
    time.sleep(1)  # W&B's writer flushes the log a moment after finish()
    return folder


def _files(folder):
    """Every file's bytes, W&B's own debug logs aside (its service appends to them)."""
    return {k: v[0] for k, v in snapshot(folder).items() if v[0] is not None and "debug" not in k}


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once closed


def test_refused_connection_fails_in_seconds_and_leaves_nothing(run_dir, msam_cli, env):
    env.update(WANDB_API_KEY="x" * 40, WANDB_BASE_URL=f"http://127.0.0.1:{_closed_port()}")
    env.pop("WANDB_MODE", None)
    before = _files(run_dir)
    t0 = time.monotonic()
    result = msam_cli("sync", run_dir, timeout=60)
    elapsed = time.monotonic() - t0
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot reach W&B" in lines[0], result.stderr
    assert elapsed < 20, elapsed
    assert _files(run_dir) == before
    assert not list(run_dir.rglob("*.syncstate"))


def test_a_server_that_never_answers_is_cut_off_by_the_timeout(run_dir, msam_cli, env):
    with socket.socket() as server:  # accepts connections (the kernel does) and says nothing
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        port = server.getsockname()[1]
        env.update(
            WANDB_API_KEY="x" * 40,
            WANDB_BASE_URL=f"http://127.0.0.1:{port}",
            MSAM_SYNC_TIMEOUT="8",
        )
        env.pop("WANDB_MODE", None)
        before = _files(run_dir)
        t0 = time.monotonic()
        result = msam_cli("sync", run_dir, timeout=90)
        elapsed = time.monotonic() - t0
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: wandb sync")
    assert elapsed < 40, elapsed
    assert not list(run_dir.rglob("*.syncstate"))
    assert _files(run_dir) == before


def test_bad_sync_timeout_is_one_line(run_dir, msam_cli, env):
    env.update(WANDB_API_KEY="x" * 40, MSAM_SYNC_TIMEOUT="soon")
    result = msam_cli("sync", run_dir)
    assert result.returncode == 2 and "MSAM_SYNC_TIMEOUT=soon" in result.stderr
