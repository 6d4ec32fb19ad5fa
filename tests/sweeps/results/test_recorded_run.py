"""Run folders written by earlier versions keep loading: ``tests/fixtures/run-9abd481`` was made
by msam at commit 9abd481, before sweeps/ was split into packages (see tests/fixtures/README.md).
"""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from helpers import REPO

from sweeps.cli import main

RECORDED = REPO / "tests" / "fixtures" / "run-9abd481"


@pytest.fixture
def recorded(tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(RECORDED, folder)
    return folder


def config_of(text: str) -> dict:
    return yaml.safe_load(text)  # comments (provenance, its date) aside


#: Flatness measured at common radii came later: a recorded run's finals have none of it.
LATER_FLATNESS = ("sharpness", "adaptive_sharpness", "sharpness_radius")


def _uncut(board: dict) -> dict:
    """The leaderboard without its accuracy intervals (and the text that quotes them), and
    without the flatness columns added since (empty for a recorded run)."""
    rows = [
        {
            **r,
            "test_acc": {
                k: v for k, v in r["test_acc"].items() if k not in ("ci_low", "ci_high", "text")
            },
            "flatness": {k: v for k, v in r["flatness"].items() if k not in LATER_FLATNESS},
        }
        for r in board["rows"]
    ]
    return {**board, "rows": rows, "headline": board["headline"][1:]}


def test_leaderboard_of_a_recorded_run_is_unchanged(recorded, capsys):
    before = json.loads((RECORDED / "leaderboard.json").read_text())
    assert main(["leaderboard", str(recorded)]) == 0
    after = json.loads((recorded / "leaderboard.json").read_text())
    assert "Highest mean test accuracy" in capsys.readouterr().out
    skip = {"generated", "versions", "storage"}  # storage: named as the command was given it
    skip |= {"flatness_summaries", "flatness_comparisons"}  # added since: checked below
    assert set(after["flatness_summaries"]) == {row["optimizer"] for row in after["rows"]}
    # Intervals are cut to 0-100% now (the recorded ones reached -108% to 149%); all else stays.
    for row in after["rows"]:
        assert 0.0 <= row["test_acc"]["ci_low"] <= row["test_acc"]["ci_high"] <= 1.0
        assert all(row["flatness"][k] is None for k in LATER_FLATNESS)
    assert {k: v for k, v in _uncut(after).items() if k not in skip} == {
        k: v for k, v in _uncut(before).items() if k not in skip
    }
    assert (recorded / "report.html").stat().st_size > 10_000
    for path in sorted((RECORDED / "tuned").glob("*.yaml")):
        assert config_of((recorded / "tuned" / path.name).read_text()) == config_of(
            path.read_text()
        )


def test_export_of_a_recorded_run(recorded, tmp_path, capsys):
    shutil.rmtree(recorded / "tuned")  # export makes them again from the spec, studies, finals
    out = tmp_path / "tuned"
    assert main(["export", str(recorded), "--to", str(out)]) == 0
    names = sorted(p.name for p in out.glob("*.yaml"))
    assert names == ["recorded-msam.yaml", "recorded-sam.yaml", "recorded-sgd.yaml"]
    for name in names:
        assert config_of((out / name).read_text()) == config_of(
            (RECORDED / "tuned" / name).read_text()
        )
    assert capsys.readouterr().out.count("wrote: ") == 3
