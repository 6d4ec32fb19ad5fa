"""``kill -9`` while a final measures its flatness: the rerun finishes the files and W&B alike.

The kill leaves ``summary.json`` complete but without flatness, and the final's W&B run open
(never finished). The rerun measures flatness on the final's checkpoint, and continues the same
W&B run (its id is in ``wandb.json``), logging the epochs and the full summary before finishing
it; ``wandb.json`` then says it was finished.
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
from helpers.sweep import find_offline_runs, read_offline_run, rerun

FLATNESS_SLOW = {"images": 256, "batch_size": 64, "iters": 400, "samples": 200}


def _flat(summary):
    return summary.get("flatness") or {
        k.split(".", 1)[1]: v for k, v in summary.items() if k.startswith("flatness.")
    }


@pytest.mark.slow
def test_kill_during_flatness_then_rerun_finishes_the_wandb_run(
    tmp_path, write_spec, start_sweep, msam_cli
):
    spec = write_spec(
        optimizers=["sgd"],
        budget={"trials": 1},
        base={"train": {"epochs": 1}},
        final={"seeds": 1, "flatness": FLATNESS_SLOW},
    )
    out = tmp_path / "run"
    assert rerun(spec, out) == 0  # tuning only
    final = out / "finals" / "sgd" / "seed0"
    sweep = start_sweep(spec, "--out", out, "--stage", "final")
    deadline = time.monotonic() + 120
    while True:  # trained, summary written, flatness not yet: the kill window
        summary = _read(final / "summary.json")
        if summary and summary.get("status") == "complete" and "flatness" not in summary:
            break
        assert sweep.poll() is None and time.monotonic() < deadline, "missed the flatness step"
        time.sleep(0.05)
    time.sleep(0.5)
    os.killpg(sweep.pid, signal.SIGKILL)
    sweep.wait(timeout=30)
    recorded = json.loads((final / "wandb.json").read_text())
    assert recorded["finished"] is False

    again = msam_cli(
        "sweep", spec, "--out", out, "--stage", "final",
        "--set", "final.flatness.iters=2", "--set", "final.flatness.samples=2",
        timeout=300,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    summary = json.loads((final / "summary.json").read_text())
    assert "hessian_trace" in summary["flatness"]
    assert json.loads((final / "wandb.json").read_text()) == {
        "id": recorded["id"],
        "finished": True,
    }, again.stderr
    finished = _finished_runs(out, recorded["id"], again.stderr)
    last = finished[-1]
    assert last.summary["test_acc"] == summary["test_acc"]
    assert "hessian_trace" in _flat(last.summary)
    assert [row["epoch"] for row in last.history if "epoch" in row] == [1]


def _finished_runs(out, run_id, stderr, wait_s=60.0):
    """The first offline run of ``run_id`` that W&B finished with exit code 0 (in a list),
    waiting for its service to write it. The killed run's log may hold only its header."""
    deadline = time.monotonic() + wait_s
    while True:
        seen = []
        for path in find_offline_runs(out):
            if not list(path.glob("run-*.wandb")):
                seen.append((path.name, "no log"))
                continue
            run = read_offline_run(path, wait_s=0)
            seen.append((path.name, run.run_id, run.exit_code))
            if run.run_id == run_id and run.exit_code == 0:
                return [run]
        if time.monotonic() >= deadline:
            raise AssertionError(f"no finished W&B run {run_id}: {seen}; rerun said: {stderr}")
        time.sleep(0.5)


def _read(path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _done_final_with_an_open_run(tmp_path, monkeypatch):
    """An SGD final trained (flatness off) whose wandb.json is then made to say its W&B run was
    left open; returns a function that reruns it, and the recorded id."""
    from helpers.finals import make_sweep, spec_of

    from sweeps.finals import FlatnessSettings, run_final
    from sweeps.finals.plan import plan_finals
    from sweeps.layout import RunFolder

    monkeypatch.setenv("WANDB_MODE", "offline")
    spec, storage = make_sweep(tmp_path, spec_of(**{"base.tracking.wandb.mode": "offline"}))
    job = next(j for j in plan_finals(spec, storage, RunFolder(tmp_path)) if j.optimizer == "sgd")
    off = FlatnessSettings(images=0)

    def rerun_final():
        return run_final(job, spec, RunFolder(tmp_path), None, off, verbose=False)

    assert rerun_final().outcome == "trained"
    recorded = json.loads((job.dir / "wandb.json").read_text())
    assert recorded["finished"] is True
    (job.dir / "wandb.json").write_text(json.dumps({**recorded, "finished": False}))
    return job, rerun_final, recorded


def test_a_done_final_with_an_open_wandb_run_is_finished_by_the_rerun(tmp_path, monkeypatch):
    """The same, in a second: a done final whose wandb.json says its run was left open."""
    job, rerun_final, recorded = _done_final_with_an_open_run(tmp_path, monkeypatch)

    again = rerun_final()
    assert again.outcome == "skipped"  # nothing retrained
    assert json.loads((job.dir / "wandb.json").read_text())["finished"] is True
    runs = [read_offline_run(p, wait_s=30) for p in find_offline_runs(tmp_path)]
    assert [r.run_id for r in runs] == [recorded["id"]] * 2
    summary = json.loads((job.dir / "summary.json").read_text())
    assert runs[-1].exit_code == 0 and runs[-1].summary["test_acc"] == summary["test_acc"]
    assert [row["epoch"] for row in runs[-1].history if "epoch" in row] == [1]
    third = rerun_final()
    assert third.outcome == "skipped" and len(find_offline_runs(tmp_path)) == 2  # in line now


def test_a_finishing_run_that_wandb_cannot_start_stays_open_for_the_next_rerun(
    tmp_path, monkeypatch
):
    """wandb.init failing while a rerun finishes a final's open run (a busy machine, a broken
    service) is a warning, and wandb.json keeps saying the run is open: the rerun after it
    finishes the run, instead of the files claiming a W&B run that was never written."""
    from sweeps.tracking import WandbCallback

    job, rerun_final, recorded = _done_final_with_an_open_run(tmp_path, monkeypatch)

    def refuse(self, config):
        raise TimeoutError("the service did not answer")

    with monkeypatch.context() as patch:
        patch.setattr(WandbCallback, "_init", refuse)
        with pytest.warns(RuntimeWarning, match="could not start a run"):
            rerun_final()
    assert json.loads((job.dir / "wandb.json").read_text())["finished"] is False

    rerun_final()
    assert json.loads((job.dir / "wandb.json").read_text())["finished"] is True
    runs = [read_offline_run(p, wait_s=30) for p in find_offline_runs(tmp_path)]
    assert [r.run_id for r in runs] == [recorded["id"]] * 2 and runs[-1].exit_code == 0
