"""report.html of a real tiny sweep: one self-contained page (plotly.js inlined once, nothing
fetched), every section present, graceful notes where data is too thin, and (slow) plots that
really render in headless Chromium."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers.finals import (
    POINTS,
    add_trials,
    copy_sweep,
    journal,
    make_sweep,
    spec_of,
)

from sweeps.results.leaderboard import build_leaderboard
from sweeps.results.read import load_sweep
from sweeps.results.report import build_figures, importances, write_report

SECTIONS = ["history", "params", "contour", "importance", "test", "flatness", "curves"]


def report_of(run_dir: Path) -> tuple[Path, str]:
    results = load_sweep(run_dir)
    path = write_report(results, build_leaderboard(results), run_dir / "report.html")
    return path, path.read_text(encoding="utf-8")


def plot_ids(page: str) -> list[str]:
    return re.findall(r'<div id="(plot-[a-z]+)" class="plotly-graph-div"', page)


def test_self_contained_page_with_every_section(tiny_sweep, tmp_path):
    run_dir = copy_sweep(tiny_sweep, tmp_path)
    _, page = report_of(run_dir)
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert page.count("window.PlotlyConfig") == 1  # plotly.js inlined exactly once
    assert len(page) > 1_000_000  # ... and it is the whole library, not a link to it
    assert not re.search(r"<script[^>]+src=", page)
    assert not re.search(r"<link[^>]+href=", page)
    for key in SECTIONS:
        assert f'<section id="{key}">' in page
    # 3 complete trials per study: no importances, said so instead of a misleading plot
    assert plot_ids(page) == [f"plot-{k}" for k in SECTIONS if k != "importance"]
    assert "importances need 5" in page
    for optimizer in ("sgd", "sam", "msam"):
        assert f'<td class="text">{optimizer}</td>' in page


def test_figures_hold_the_sweep_data(tiny_sweep):
    results = load_sweep(tiny_sweep.run_dir)
    board = build_leaderboard(results)
    sections = {s.key: s for s in build_figures(results, board)}
    history = sections["history"].figure
    assert {t.name for t in history.data} >= {"sgd trials", "sam best so far", "msam trials"}
    sam_trials = next(t for t in history.data if t.name == "sam trials")
    assert list(sam_trials.y) == [0.80, 0.90, 0.70]
    contour = sections["contour"].figure
    assert [t.name for t in contour.data if t.type == "scatter"] == ["sam trials", "msam trials"]
    test = sections["test"].figure
    bars = {t.name: t for t in test.data if t.type == "bar"}
    for row in board.rows:
        assert bars[row.label].y[0] == pytest.approx(row.test.mean * 100)
        assert bars[row.label].error_y.array[0] == pytest.approx(
            (row.test.ci_high - row.test.mean) * 100
        )
    flat = sections["flatness"].figure
    assert sum(len(t.x) for t in flat.data) == 4 * 6  # 4 metrics x 6 final runs
    titles = [a.text for a in flat.layout.annotations]
    assert "sharpness at rho 0.05" in titles and "adaptive sharpness at rho 0.05" in titles
    sharp = [t for t in flat.data if t.xaxis == "x3"]  # sharpness at the common radius
    by_label = {t.name: list(t.x) for t in sharp}
    for label, xs in by_label.items():
        finals = [f for f in results.finals if f.label == label]
        assert xs == [f.flatness["sharpness"]["0.05"] for f in finals]
    curves = sections["curves"].figure
    assert len(curves.data) == 2 * 6  # loss and accuracy of each final run


def test_importances_and_tuning_only(tmp_path):
    points = [
        (lr, rho, m, 0.5 + 0.4 * lr)
        for lr, rho, m in [(0.01, 0.01, 2), (0.05, 0.2, 4), (0.1, 0.05, 2), (0.2, 0.1, 4)]
        + [(0.3, 0.02, 2), (0.4, 0.15, 4), (0.5, 0.03, 2), (0.02, 0.08, 4)]
    ]
    make_sweep(tmp_path, points=points)
    results = load_sweep(tmp_path)
    values, why = importances(results.studies["msam"])
    assert why is None and set(values) == {"lr", "rho", "micro_batches"}
    assert sum(values.values()) == pytest.approx(1.0)
    _, page = report_of(tmp_path)
    assert "plot-importance" in plot_ids(page)
    assert page.count("No final runs yet") >= 2  # headline and the final-run sections
    assert "plot-test" not in plot_ids(page)


def test_studies_with_one_or_no_complete_trial(tmp_path):
    spec = spec_of()
    storage = journal(tmp_path)
    add_trials(storage, spec, "sgd", POINTS[:1])
    add_trials(storage, spec, "sam", [], pruned=2, failed=1)
    add_trials(storage, spec, "msam", POINTS[:2])
    results = load_sweep(tmp_path, spec=spec)
    board = build_leaderboard(results)
    sections = {s.key: s for s in build_figures(results, board)}
    assert sections["importance"].figure is None
    assert "sgd: 1 complete trial(s)" in sections["importance"].note
    assert sections["contour"].figure is not None  # msam's 2 points: scatter, no contour
    assert all(t.type == "scatter" for t in sections["contour"].figure.data)
    sam = next(r for r in board.rows if r.optimizer == "sam")
    assert sam.trials == {"complete": 0, "pruned": 2, "failed": 1, "running": 0}
    assert sam.params == {} and sam.tuning_val_acc is None


# ----------------------------------------------------------------------------- a real browser


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
@pytest.mark.skipif(chromium() is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_plots_render_in_headless_chromium(tiny_sweep, tmp_path):
    run_dir = copy_sweep(tiny_sweep, tmp_path)
    path, page = report_of(run_dir)
    expected = plot_ids(page)
    proc = subprocess.run(
        [
            chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--virtual-time-budget=15000",
            "--dump-dom",
            path.resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout
    starts = [dom.index(f'id="{plot}"') for plot in expected]
    for plot, start, end in zip(expected, starts, [*starts[1:], len(dom)]):
        assert 'class="main-svg"' in dom[start:end], f"{plot} did not render"
