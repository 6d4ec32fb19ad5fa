"""Reading results back: clear one-line errors instead of tracebacks or quietly wrong files.

- ``msam leaderboard`` on a run folder whose studies live in PostgreSQL, without ``--storage``,
  used to overwrite leaderboard.md/json, report.html and tuned/*.yaml with empty tuning columns;
  it now exits 2 naming the storage recorded at launch (password masked), touching nothing.
- ``msam leaderboard`` on a read-only run folder: exit 2, one line (it was a traceback).
- ``--stage final`` while tuning is incomplete: a warning saying how far each study got.
- Confidence intervals of test accuracy stay within 0-100% (two seeds far apart reached past it).
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from helpers.finals import build_tiny_sweep
from helpers.sweep import snapshot

from sweeps.results.stats import summarize


def _one_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    return build_tiny_sweep(tmp_path_factory.mktemp("results") / "digits-tiny")


def test_leaderboard_of_a_postgres_sweep_without_storage_exits_2_and_keeps_its_files(
    tmp_path, write_spec, msam_cli, pg_url
):
    spec = write_spec(optimizers=["sgd"], budget={"trials": 1}, base={"train": {"epochs": 1}})
    out = tmp_path / "run"
    url = pg_url.replace("postgres@", "postgres:hunter2@")  # trust auth ignores the password
    done = msam_cli("sweep", spec, "--out", out, "--storage", url)
    assert done.returncode == 0, done.stderr
    before = json.loads((out / "leaderboard.json").read_text())
    assert before["rows"][0]["trials"]["complete"] == 1
    files = snapshot(out)

    again = msam_cli("leaderboard", out)
    assert again.returncode == 2
    line = _one_line(again.stderr)
    assert "--storage" in line and "***" in line and "hunter2" not in again.stderr
    assert snapshot(out) == files

    shown = msam_cli("leaderboard", out, "--storage", url)
    assert shown.returncode == 0, shown.stderr


def test_leaderboard_on_a_read_only_run_folder_exits_2(finished, tmp_path, msam_cli):
    source = tmp_path / "source"
    shutil.copytree(finished.run_dir, source)
    mounted = tmp_path / "ro"
    mounted.mkdir()
    bind = subprocess.run(["mount", "--bind", str(source), str(mounted)], capture_output=True)
    if bind.returncode != 0:
        pytest.skip(f"cannot bind-mount here ({bind.stderr.decode().strip()[:80]})")
    try:
        ro = subprocess.run(["mount", "-o", "remount,ro,bind", str(mounted)], capture_output=True)
        if ro.returncode != 0:
            pytest.skip(f"cannot remount read-only here ({ro.stderr.decode().strip()[:80]})")
        result = msam_cli("leaderboard", mounted)
        assert result.returncode == 2
        assert "read-only" in _one_line(result.stderr)
    finally:
        subprocess.run(["umount", str(mounted)], check=False)


def test_stage_final_with_tuning_incomplete_warns(tmp_path, write_spec, msam_cli):
    spec = write_spec(optimizers=["sgd"], budget={"trials": 1}, base={"train": {"epochs": 1}})
    out = tmp_path / "run"
    assert msam_cli("sweep", spec, "--out", out, "--stage", "tune").returncode == 0
    result = msam_cli(
        "sweep", spec, "--out", out, "--stage", "final", "--set", "budget.trials=3",
        "--set", "final.seeds=1", "--set", "final.flatness.images=0",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "tuning is not complete (sgd 1/3 trials finished)" in result.stderr


def test_accuracy_intervals_stay_within_0_and_100_percent(finished, tmp_path, msam_cli):
    run_dir = tmp_path / "digits-tiny"
    shutil.copytree(finished.run_dir, run_dir)
    for seed, acc in ((0, 0.99), (1, 0.40)):
        path = run_dir / "finals" / "sgd" / f"seed{seed}" / "summary.json"
        summary = json.loads(path.read_text())
        path.write_text(json.dumps({**summary, "test_acc": acc}))
    assert msam_cli("leaderboard", run_dir).returncode == 0
    board = json.loads((run_dir / "leaderboard.json").read_text())
    (row,) = [r for r in board["rows"] if r["optimizer"] == "sgd"]
    assert row["test_acc"]["ci_high"] == 1.0 and 0.0 <= row["test_acc"]["ci_low"] < 0.4
    assert "100.00" in (run_dir / "leaderboard.md").read_text()


def test_summarize_cuts_the_interval_to_the_bounds():
    wide = summarize([0.99, 0.40])
    assert wide.ci_high > 1.0 and wide.ci_low < 0.0  # what a 2-seed t-interval gives
    cut = summarize([0.99, 0.40], bounds=(0.0, 1.0))
    assert (cut.ci_low, cut.ci_high) == (0.0, 1.0) and cut.mean == wide.mean


def test_a_rerun_naming_another_storage_exits_2(tmp_path, write_spec, msam_cli, pg_url):
    """With MSAM_STORAGE set for another sweep (or --storage forgotten), a rerun would start the
    studies afresh elsewhere; it exits 2 naming both, and a rerun with the same storage resumes."""
    spec = write_spec(optimizers=["sgd"], budget={"trials": 1}, base={"train": {"epochs": 1}})
    out = tmp_path / "run"
    assert msam_cli("sweep", spec, "--out", out, "--stage", "tune").returncode == 0
    files = snapshot(out)
    other = msam_cli("sweep", spec, "--out", out, "--stage", "tune", "--storage", pg_url)
    assert other.returncode == 2
    line = _one_line(other.stderr)
    assert "the run folder's journal" in line and "postgresql://" in line
    assert snapshot(out) == files
    moved = tmp_path / "moved"
    out.rename(moved)  # a copied or moved folder keeps using its own journal
    again = msam_cli("sweep", spec, "--out", moved, "--stage", "tune", "--set", "budget.trials=2")
    assert again.returncode == 0, again.stderr
