"""The run folder has one spelling: ``sweeps.layout.RunFolder`` (and ``msam.files`` for the files
of one training run). Once, "checkpoint.pt" was written out in three modules, "summary.json" in
three, and atomic writes were re-implemented seven times."""

from __future__ import annotations

import ast

import pytest
from helpers import REPO

from sweeps.layout import RunFolder, final_label, parse_final_dir

#: Literal names of run-folder entries; only their two homes may spell them.
NAMES = (
    "checkpoint.pt",
    "metrics.jsonl",
    "summary.json",
    "error.txt",
    "spec.yaml",
    "optuna.journal",
    "final.json",
    "timing.json",
    "leaderboard.md",
    "leaderboard.json",
    "report.html",
)
HOMES = {"sweeps/layout.py", "msam/files.py"}
#: ``os.replace`` calls that are moves, not writes: a dead trial's checkpoint handed to its retry.
MOVES = {"sweeps/engine/trial.py"}


def modules() -> list[tuple[str, ast.Module]]:
    out = []
    for package in ("msam", "sweeps"):
        for path in sorted((REPO / package).rglob("*.py")):
            out.append((path.relative_to(REPO).as_posix(), ast.parse(path.read_text())))
    return out


def test_the_documented_layout(tmp_path):
    folder = RunFolder(tmp_path)
    assert folder.spec == tmp_path / "spec.yaml"
    assert folder.journal == tmp_path / "optuna.journal"
    assert folder.trial("sam", 3) == tmp_path / "trials" / "sam" / "3"
    assert folder.final("msam", 1, 2) == tmp_path / "finals" / "msam" / "seed2"
    assert folder.final("msam", 2, 0) == tmp_path / "finals" / "msam-top2" / "seed0"
    assert folder.leaderboard_md == tmp_path / "leaderboard.md"
    assert folder.leaderboard_json == tmp_path / "leaderboard.json"
    assert folder.report == tmp_path / "report.html"
    assert folder.tuned("fm", "sgd") == tmp_path / "tuned" / "fm-sgd.yaml"
    assert folder.worker_log(1) == tmp_path / "logs" / "worker-1.log"


@pytest.mark.parametrize(("optimizer", "rank", "seed"), [("sgd", 1, 0), ("msam", 3, 12)])
def test_final_folders_round_trip(tmp_path, optimizer, rank, seed):
    path = RunFolder(tmp_path).final(optimizer, rank, seed)
    assert parse_final_dir(path.parent.name, path.name) == (optimizer, rank, seed)
    assert path.parent.name == final_label(optimizer, rank)


def test_final_dirs_skip_what_is_not_a_final(tmp_path):
    folder = RunFolder(tmp_path)
    for optimizer, rank, seed in (("sgd", 1, 0), ("sam", 2, 1)):
        folder.final(optimizer, rank, seed).mkdir(parents=True)
    (folder.stale_finals / "sgd" / "seed0-trial3").mkdir(parents=True)
    (folder.finals / "notes.txt").write_text("x")
    (folder.finals / "sgd" / "seedless").mkdir()
    found = [(o, r, s) for o, r, s, _ in folder.final_dirs()]
    assert found == [("sam", 2, 1), ("sgd", 1, 0)]


def test_no_other_module_spells_a_run_folder_name():
    spelled = [
        f"{name}:{node.lineno} {node.value!r}"
        for name, tree in modules()
        if name not in HOMES
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and node.value in NAMES
    ]
    assert spelled == []


def test_atomic_writes_have_one_implementation():
    def is_replace(node: ast.AST) -> bool:
        return (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "replace"
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "os"
        )

    found = sorted(
        {
            name
            for name, tree in modules()
            if name not in HOMES | MOVES
            for node in ast.walk(tree)
            if is_replace(node)
        }
    )
    assert found == []
