"""The leaderboard of a real tiny sweep: rows and comparisons in markdown and JSON, the tuning-only
view before finals, ``msam leaderboard`` (also over a whole storage), the W&B leaderboard run read
back from its offline log, and masked secrets (the 2,000-trial scale budget is in
tests/reliability/test_scale.py)."""

from __future__ import annotations

import glob
import json
import math
import shutil
from pathlib import Path

import pytest
from helpers.finals import (
    NAME,
    add_trials,
    copy_sweep,
    journal,
    make_sweep,
    spec_of,
)
from helpers.wandb_offline import read_offline_run

from sweeps.cli import main
from sweeps.results.leaderboard import build_leaderboard
from sweeps.results.publish import log_leaderboard_to_wandb, run_leaderboard
from sweeps.results.read import load_sweep


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_markdown_and_json_rows_and_comparisons(tiny_sweep, tmp_path, capsys):
    run_dir = copy_sweep(tiny_sweep, tmp_path)
    assert run_leaderboard(run_dir) == 0
    printed = capsys.readouterr().out
    board = read_json(run_dir / "leaderboard.json")
    assert board["sweep"] == NAME and board["has_finals"] and board["storage"] == "optuna.journal"
    rows = {row["optimizer"]: row for row in board["rows"]}
    assert set(rows) == {"sgd", "sam", "msam"}
    for optimizer, row in rows.items():
        assert row["rank"] == 1 and row["trial"] == 1 and row["tuning_val_acc"] == 0.90
        assert row["trials"] == {"complete": 3, "pruned": 1, "failed": 1, "running": 0}
        test = row["test_acc"]
        assert test["n"] == 2 and row["seeds"] == [0, 1]
        assert test["ci_low"] <= test["mean"] <= test["ci_high"]
        finals = [read_json(run_dir / f"finals/{optimizer}/seed{s}/summary.json") for s in (0, 1)]
        assert test["mean"] == pytest.approx(sum(f["test_acc"] for f in finals) / 2)
        assert row["grad_evals_per_update"] == (1 if optimizer == "sgd" else 2)
        assert row["flatness"]["hessian_top_eig"] == pytest.approx(
            sum(f["flatness"]["hessian_top_eig"] for f in finals) / 2
        )
        # Sharpness at one radius for every optimizer, plain and adaptive, from the finals.
        assert row["flatness"]["sharpness_radius"] == 0.05
        for key in ("sharpness", "adaptive_sharpness"):
            assert row["flatness"][key] == pytest.approx(
                sum(f["flatness"][key]["0.05"] for f in finals) / 2
            )
        assert all(f["flatness"]["bn_mode"] == "eval" for f in finals)
        assert row["seconds"] > 0 and row["images_per_s"] > 0
    assert rows["sgd"]["params"] == {"lr": 0.2}
    assert rows["msam"]["params"] == {"lr": 0.2, "rho": 0.1, "micro_batches": 2}
    pairs = [(c["a"], c["b"]) for c in board["comparisons"]]
    assert pairs == [("msam", "sam"), ("sam", "sgd"), ("msam", "sgd")]
    assert board["compared_seeds"] == [0, 1]
    for c in board["comparisons"]:
        assert c["n"] == 2 and c["p_value"] is not None and c["p_adjusted"] is not None
        assert ("not significant" in c["verdict"]) == (not c["significant"])

    # Flatness per optimizer on the log scale, and paired ratios with Holm over the family.
    summaries = board["flatness_summaries"]
    assert set(summaries) == {"sgd", "sam", "msam"}
    for optimizer, metrics in summaries.items():
        finals = [read_json(run_dir / f"finals/{optimizer}/seed{s}/summary.json") for s in (0, 1)]
        traces = [f["flatness"]["hessian_trace"] for f in finals]
        if all(t > 0 for t in traces):
            geo = math.exp(sum(math.log(t) for t in traces) / 2)
            assert metrics["trace"]["geo_mean"] == pytest.approx(geo)
        assert set(metrics) <= {"top eig", "trace", "sharpness@0.05", "adaptive@0.05"}
    ratios = board["flatness_comparisons"]
    assert ratios and all(r["n"] == 2 for r in ratios)
    tested = [r for r in ratios if r["p_value"] is not None]
    assert all(r["p_adjusted"] is not None for r in tested) or len(tested) < 2

    md = (run_dir / "leaderboard.md").read_text()
    assert md.startswith(f"# Leaderboard: {NAME}")
    assert "## Flatness (geometric means over the paired seeds" in md
    assert all(f"- {r['verdict']}" in md for r in ratios)
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| # | optimizer | lr | rho | m | val acc % | trials c/p/f")
    assert "| sharpness@0.05 | adaptive@0.05 |" in table[0]
    assert len(table) == 4  # header + one row per optimizer
    for optimizer in ("sgd", "sam", "msam"):
        assert any(f"| {optimizer} |" in line and "| 3/1/1 |" in line for line in table)
    for c in board["comparisons"]:
        assert f"- {c['verdict']}" in md
        assert c["verdict"] in printed
    if not any(c["significant"] for c in board["comparisons"]):
        assert "No difference is significant at 5%" in md
    assert "final runs" in printed and "trials c/p/f" in printed
    assert (run_dir / "report.html").exists()
    assert sorted(p.name for p in (run_dir / "tuned").iterdir()) == [
        f"{NAME}-msam.yaml",
        f"{NAME}-sam.yaml",
        f"{NAME}-sgd.yaml",
    ]


def test_tuning_only_before_finals(tmp_path, capsys):
    make_sweep(tmp_path)
    assert main(["leaderboard", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "No final runs yet: tuning results only" in out
    board = read_json(tmp_path / "leaderboard.json")
    assert board["has_finals"] is False and board["comparisons"] == []
    assert all(row["test_acc"] is None and row["seeds"] == [] for row in board["rows"])
    assert {row["optimizer"] for row in board["rows"]} == {"sgd", "sam", "msam"}
    md = (tmp_path / "leaderboard.md").read_text()
    assert "No final runs yet: tuning results only" in md
    assert "Best validation accuracy in tuning" in md


def test_storage_lists_every_sweep(tiny_sweep, tmp_path, capsys):
    run_dir = copy_sweep(tiny_sweep, tmp_path)
    other = spec_of(name="other-sweep")
    storage = journal(run_dir)
    for optimizer in ("sgd", "sam"):
        add_trials(storage, other, optimizer, [(0.1, 0.1, 2, 0.5)])
    assert main(["leaderboard", str(run_dir), "--storage", str(run_dir / "optuna.journal")]) == 0
    out = capsys.readouterr().out
    assert f"{NAME}: tuning" in out and f"{NAME}: final runs" in out
    assert "other-sweep: tuning" in out
    board = read_json(run_dir / "leaderboard.json")  # the run folder's own sweep only
    assert board["sweep"] == NAME and board["has_finals"]


def test_not_a_run_folder_is_a_user_error(tmp_path, capsys):
    assert main(["leaderboard", str(tmp_path)]) == 2
    assert "no spec.yaml, optuna.journal or finals/" in capsys.readouterr().err


# ----------------------------------------------------------------------------- W&B and secrets


def test_wandb_leaderboard_run_offline(tiny_sweep, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)  # a key in the environment must not leak
    run_dir = copy_sweep(tiny_sweep, tmp_path)
    results = load_sweep(run_dir)
    board = build_leaderboard(results)
    folder = log_leaderboard_to_wandb(board, results)
    assert folder is not None and Path(folder).parent == run_dir / "wandb"
    run = read_offline_run(folder, wait_s=30)  # W&B may flush after finish() returns
    assert run.job_type == "leaderboard" and run.group == NAME
    assert run.name == f"{NAME}-leaderboard" and run.config["sweep"] == NAME
    summary = run.summary
    for row in board.rows:
        assert summary[f"{row.optimizer}/test_acc_mean"] == pytest.approx(row.test.mean)
        assert summary[f"{row.optimizer}/seeds"] == 2
    assert summary["msam-sam/verdict"] == board.comparisons[0].verdict
    assert summary["msam-sam/significant"] is board.comparisons[0].significant
    assert summary["leaderboard._type"] == "table-file"
    (table_file,) = glob.glob(f"{folder}/files/media/table/leaderboard_*.table.json")
    table = json.loads(Path(table_file).read_text())
    assert table["columns"][:2] == ["optimizer", "rank"]
    assert sorted(row[0] for row in table["data"]) == ["msam", "sam", "sgd"]
    logged = Path(folder, f"run-{run.run_id}.wandb").read_bytes()
    assert b"k" * 40 not in logged


def test_secrets_never_reach_the_files(tiny_sweep, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "s3cr3tkey" * 5)
    run_dir = copy_sweep(tiny_sweep, tmp_path)
    url = "postgresql://alice:hunter2@db.example/optuna"
    assert run_leaderboard(run_dir, journal(run_dir), storage_url=url) == 0
    written = [run_dir / "leaderboard.md", run_dir / "leaderboard.json", run_dir / "report.html"]
    written += list((run_dir / "tuned").glob("*.yaml"))
    for path in written:
        text = path.read_text()
        assert "hunter2" not in text and "s3cr3tkey" not in text, path
    assert "postgresql://alice:***@db.example/optuna" in (run_dir / "leaderboard.md").read_text()
    tuned = (run_dir / "tuned" / f"{NAME}-sam.yaml").read_text()
    assert "alice:***@db.example" in tuned


def test_runner_up_rows_and_incomplete_finals(tiny_sweep, tmp_path):
    run_dir = copy_sweep(tiny_sweep, tmp_path)
    # a second-best sam configuration (as top_k: 2 leaves it) ...
    shutil.copytree(run_dir / "finals" / "sam", run_dir / "finals" / "sam-top2")
    for seed in (0, 1):
        job_file = run_dir / "finals" / "sam-top2" / f"seed{seed}" / "final.json"
        job = read_json(job_file)
        job_file.write_text(json.dumps({**job, "rank": 2, "trial": 0, "val_acc": 0.8}))
    # ... and an msam final that diverged
    diverged = run_dir / "finals" / "msam" / "seed1" / "summary.json"
    diverged.write_text(json.dumps({**read_json(diverged), "status": "diverged", "test_acc": None}))
    board = build_leaderboard(load_sweep(run_dir))
    labels = [row.label for row in board.rows]
    assert sorted(labels) == ["msam", "sam", "sam (top2)", "sgd"]
    top2 = next(row for row in board.rows if row.rank == 2)
    assert top2.trial == 0 and top2.tuning_val_acc == 0.8 and top2.test.n == 2
    msam = next(row for row in board.rows if row.label == "msam")
    assert msam.seeds == [0] and msam.not_complete == {"diverged": 1}
    assert board.compared_seeds == [0]  # pairs only where every optimizer finished
    assert all(d.n == 1 and "no test possible" in d.verdict for d in board.comparisons)
    assert any("no test is possible" in line for line in board.headline())
    md = board.to_markdown()
    assert "| sam (top2) |" in md and "| 1 (1 diverged) |" in md


def test_finals_without_storage(tiny_sweep, tmp_path):
    run_dir = copy_sweep(tiny_sweep, tmp_path)
    (run_dir / "optuna.journal").unlink()
    board = build_leaderboard(load_sweep(run_dir))
    assert board.has_finals and all(row.trials is None for row in board.rows)
    assert all(row.trial == 1 and row.tuning_val_acc == 0.90 for row in board.rows)
    assert any("no Optuna storage found" in note for note in board.notes)
