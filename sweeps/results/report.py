"""``report.html``: one self-contained page of plots for a sweep, readable with no network.

What a reader of a SAM/mSAM comparison wants to see next to the leaderboard: how each study
converged (optimization history), where the good hyperparameters lie (validation accuracy
against lr, rho and the micro-batch count; an lr x rho contour; Optuna's parameter importances,
PED-ANOVA by default in Optuna 5), how the final runs scored on test with their 95% intervals,
whether flatter final models scored better (the mSAM paper's claim, Behdin et al., 2023), and the
final runs' training curves. Plotly's JavaScript is inlined once in the page head, so the file
opens anywhere; every figure is SVG (no WebGL), so a headless browser renders it too.
"""

from __future__ import annotations

import html
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from msam.files import atomic_write
from sweeps.results.leaderboard import flatness_value, sharpness_radius, spec_radii
from sweeps.results.read import SweepResults

__all__ = ["build_figures", "render_report", "write_report"]

COLORS = {"sgd": "#636EFA", "sam": "#EF553B", "msam": "#00CC96"}
#: Complete trials a study needs before its parameter importances mean anything.
MIN_IMPORTANCE_TRIALS = 5
#: Points per axis of the interpolated lr x rho contour.
CONTOUR_GRID = 50
PARAM_TITLES = {"lr": "learning rate", "rho": "rho", "micro_batches": "micro-batches m"}
FLATNESS_TITLES = {
    "hessian_top_eig": "top Hessian eigenvalue",
    "hessian_trace": "Hessian trace",
    "sharpness": "sharpness",
    "adaptive_sharpness": "adaptive sharpness",
}


class Section:
    """One titled part of the page: a figure, or a sentence saying why there is none."""

    def __init__(self, key: str, title: str, figure: Any = None, note: str | None = None) -> None:
        self.key = key
        self.title = title
        self.figure = figure
        self.note = note


def _color(optimizer: str) -> str:
    return COLORS.get(optimizer, "#888888")


def _is_log(results: SweepResults, param: str) -> bool:
    """Log axes for parameters the spec searched in log space (lr, rho usually)."""
    spec = results.spec
    space = getattr(getattr(spec, "search", None), param, None) if spec is not None else None
    if space is not None and hasattr(space, "log"):
        return bool(space.log)
    for study in results.studies.values():
        for trial in study.trials[:50]:
            dist = trial.distributions.get(param)
            if dist is not None:
                return bool(getattr(dist, "log", False))
    return param in ("lr", "rho")


def _params_present(results: SweepResults) -> list[str]:
    """Searched parameters with at least one numeric value: lr, rho, micro_batches first."""
    seen: dict[str, None] = {}
    for study in results.studies.values():
        for trial in study.complete():
            for key, value in trial.params.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    seen.setdefault(key, None)
    order = [k for k in PARAM_TITLES if k in seen]
    return order + sorted(k for k in seen if k not in PARAM_TITLES)


# ----------------------------------------------------------------------------- tuning figures


def history_figure(results: SweepResults) -> Section:
    import plotly.graph_objects as go

    section = Section("history", "Optimization history (validation accuracy per trial)")
    if not any(s.complete() for s in results.studies.values()):
        section.note = "No complete trials yet."
        return section
    fig = go.Figure()
    for optimizer, study in results.studies.items():
        trials = study.complete()
        if not trials:
            continue
        xs = [t.number for t in trials]
        ys = [t.value for t in trials]
        best, running = [], None
        for y in ys:
            better = running is None or (y > running if study.maximize else y < running)
            running = y if better else running
            best.append(running)
        color = _color(optimizer)
        fig.add_trace(
            go.Scatter(
                x=xs,
                y=ys,
                mode="markers",
                name=f"{optimizer} trials",
                legendgroup=optimizer,
                marker={"color": color, "size": 6, "opacity": 0.6},
            )
        )
        fig.add_trace(
            go.Scatter(
                x=xs,
                y=best,
                mode="lines",
                name=f"{optimizer} best so far",
                legendgroup=optimizer,
                line={"color": color, "shape": "hv"},
            )
        )
    fig.update_layout(xaxis_title="trial", yaxis_title="validation accuracy", height=420)
    section.figure = fig
    return section


def params_figure(results: SweepResults) -> Section:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    section = Section("params", "Validation accuracy against the searched hyperparameters")
    params = _params_present(results)
    if not params:
        section.note = "No complete trials with searched parameters yet."
        return section
    fig = make_subplots(rows=1, cols=len(params), subplot_titles=[_title(p) for p in params])
    for col, param in enumerate(params, start=1):
        for optimizer, study in results.studies.items():
            trials = [t for t in study.complete() if param in t.params]
            if not trials:
                continue
            fig.add_trace(
                go.Scatter(
                    x=[t.params[param] for t in trials],
                    y=[t.value for t in trials],
                    mode="markers",
                    name=optimizer,
                    legendgroup=optimizer,
                    showlegend=col == 1,
                    marker={"color": _color(optimizer), "size": 7, "opacity": 0.7},
                    text=[f"trial {t.number}" for t in trials],
                ),
                row=1,
                col=col,
            )
        fig.update_xaxes(
            title_text=_title(param),
            type="log" if _is_log(results, param) else None,
            row=1,
            col=col,
        )
    fig.update_yaxes(title_text="validation accuracy", row=1, col=1)
    fig.update_layout(height=420)
    section.figure = fig
    return section


def _title(param: str) -> str:
    return PARAM_TITLES.get(param, param)


def _contour_grid(
    xs: Sequence[float], ys: Sequence[float], zs: Sequence[float], log_x: bool, log_y: bool
) -> tuple[list[float], list[float], list[list[float | None]]] | None:
    """Linear interpolation of scattered trials onto a grid (in log space where searched so);
    None when the points span no area (fewer than 3, or all on a line)."""
    import numpy as np
    from scipy.interpolate import griddata

    if len(xs) < 3:
        return None
    tx = np.log10(xs) if log_x else np.asarray(xs, dtype=float)
    ty = np.log10(ys) if log_y else np.asarray(ys, dtype=float)
    if np.ptp(tx) == 0 or np.ptp(ty) == 0:
        return None
    gx = np.linspace(tx.min(), tx.max(), CONTOUR_GRID)
    gy = np.linspace(ty.min(), ty.max(), CONTOUR_GRID)
    mx, my = np.meshgrid(gx, gy)
    try:
        z = griddata((tx, ty), np.asarray(zs, dtype=float), (mx, my), method="linear")
    except Exception:  # scipy's Qhull refuses collinear or duplicate-only points
        return None
    back_x = 10**gx if log_x else gx
    back_y = 10**gy if log_y else gy
    rows = [[None if not math.isfinite(v) else float(v) for v in row] for row in z]
    return back_x.tolist(), back_y.tolist(), rows


def contour_figure(results: SweepResults) -> Section:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    section = Section("contour", "Validation accuracy over lr x rho")
    studies = [
        (opt, [t for t in s.complete() if "lr" in t.params and "rho" in t.params])
        for opt, s in results.studies.items()
    ]
    studies = [(opt, trials) for opt, trials in studies if trials]
    if not studies:
        section.note = "No complete trial searched both lr and rho (SAM and mSAM studies do)."
        return section
    log_x, log_y = _is_log(results, "lr"), _is_log(results, "rho")
    fig = make_subplots(rows=1, cols=len(studies), subplot_titles=[opt for opt, _ in studies])
    for col, (optimizer, trials) in enumerate(studies, start=1):
        xs = [float(t.params["lr"]) for t in trials]
        ys = [float(t.params["rho"]) for t in trials]
        zs = [float(t.value) for t in trials]
        grid = _contour_grid(xs, ys, zs, log_x, log_y)
        if grid is not None:
            gx, gy, gz = grid
            fig.add_trace(
                go.Contour(
                    x=gx,
                    y=gy,
                    z=gz,
                    colorscale="Viridis",
                    showscale=col == 1,
                    colorbar={"title": {"text": "val acc"}},
                    connectgaps=False,
                    contours={"coloring": "heatmap"},
                    name=optimizer,
                    zmin=min(zs),
                    zmax=max(zs),
                ),
                row=1,
                col=col,
            )
        fig.add_trace(
            go.Scatter(
                x=xs,
                y=ys,
                mode="markers",
                name=f"{optimizer} trials",
                showlegend=False,
                marker={"color": "white", "size": 6, "line": {"color": "black", "width": 1}},
                text=[f"trial {t.number}: {t.value:.4f}" for t in trials],
            ),
            row=1,
            col=col,
        )
        fig.update_xaxes(title_text="learning rate", type="log" if log_x else None, row=1, col=col)
        fig.update_yaxes(title_text="rho", type="log" if log_y else None, row=1, col=col)
    fig.update_layout(height=440)
    section.figure = fig
    return section


def importances(study: Any) -> tuple[dict[str, float] | None, str | None]:
    """Optuna's parameter importances of one study, or why there are none."""
    import optuna

    n = len(study.complete())
    if n < MIN_IMPORTANCE_TRIALS:
        return None, f"{study.optimizer}: {n} complete trial(s), importances need " + str(
            MIN_IMPORTANCE_TRIALS
        )
    if len({k for t in study.complete() for k in t.params}) == 0:
        return None, f"{study.optimizer}: no searched parameters"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return optuna.importance.get_param_importances(study.study), None
    except Exception as exc:  # degenerate studies (constant values, one point) raise
        return None, f"{study.optimizer}: importances unavailable ({exc})"


def importance_figure(results: SweepResults) -> Section:
    import plotly.graph_objects as go

    section = Section("importance", "Parameter importances (Optuna, per optimizer)")
    fig = go.Figure()
    notes = []
    for optimizer, study in results.studies.items():
        values, why = importances(study)
        if values is None:
            notes.append(why)
            continue
        names = list(values)
        fig.add_trace(
            go.Bar(
                x=[values[n] for n in names],
                y=[_title(n) for n in names],
                orientation="h",
                name=optimizer,
                marker={"color": _color(optimizer)},
            )
        )
    if notes:
        section.note = "; ".join(notes) + "."
    if fig.data:
        fig.update_layout(barmode="group", xaxis_title="importance (sums to 1)", height=360)
        section.figure = fig
    elif not notes:
        section.note = "No studies."
    return section


# ----------------------------------------------------------------------------- final figures


def test_figure(results: SweepResults, board: Any) -> Section:
    import plotly.graph_objects as go

    section = Section("test", "Test accuracy of the final runs (mean, 95% CI, each seed)")
    rows = [r for r in board.rows if r.test is not None]
    if not rows:
        section.note = "No final runs yet."
        return section
    fig = go.Figure()
    for row in rows:
        t = row.test
        up = None if t.ci_high is None else (t.ci_high - t.mean) * 100
        down = None if t.ci_low is None else (t.mean - t.ci_low) * 100
        fig.add_trace(
            go.Bar(
                x=[row.label],
                y=[t.mean * 100],
                name=row.label,
                legendgroup=row.label,
                marker={"color": _color(row.optimizer), "opacity": 0.75},
                error_y={
                    "type": "data",
                    "array": [up or 0.0],
                    "arrayminus": [down or 0.0],
                    "visible": up is not None,
                },
            )
        )
        fig.add_trace(
            go.Scatter(
                x=[row.label] * len(t.values),
                y=[v * 100 for v in t.values],
                mode="markers",
                name=f"{row.label} seeds",
                legendgroup=row.label,
                showlegend=False,
                marker={"color": "black", "size": 7},
                text=[f"seed {s}" for s in row.seeds],
            )
        )
    fig.update_layout(yaxis_title="test accuracy (%)", height=420, showlegend=False)
    section.figure = fig
    return section


def flatness_figure(results: SweepResults) -> Section:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    section = Section("flatness", "Flatness of the final models against test accuracy")
    finals = [f for f in results.finals if f.test_acc is not None and f.flatness]
    if not finals:
        section.note = "No final runs with flatness metrics yet."
        return section
    keys = list(FLATNESS_TITLES)
    radius = sharpness_radius(spec_radii(results))
    titles = [
        f"{FLATNESS_TITLES[k]} at rho {radius:g}" if k.endswith("sharpness") else FLATNESS_TITLES[k]
        for k in keys
    ]
    fig = make_subplots(rows=1, cols=len(keys), subplot_titles=titles)
    shown: set[str] = set()
    for col, key in enumerate(keys, start=1):
        for label in dict.fromkeys(f.label for f in finals):
            group = [
                f
                for f in finals
                if f.label == label and flatness_value(f.flatness, key, radius) is not None
            ]
            if not group:
                continue
            fig.add_trace(
                go.Scatter(
                    x=[flatness_value(f.flatness, key, radius) for f in group],
                    y=[f.test_acc * 100 for f in group],
                    mode="markers",
                    name=label,
                    legendgroup=label,
                    showlegend=label not in shown,
                    marker={"color": _color(group[0].optimizer), "size": 9},
                    text=[f"{label} seed {f.seed}" for f in group],
                ),
                row=1,
                col=col,
            )
            shown.add(label)
        fig.update_xaxes(title_text=titles[col - 1], row=1, col=col)
    fig.update_yaxes(title_text="test accuracy (%)", row=1, col=1)
    fig.update_layout(height=420)
    section.figure = fig
    return section


def curves_figure(results: SweepResults) -> Section:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    section = Section("curves", "Training curves of the final runs")
    runs = [(f, f.history()) for f in results.finals]
    runs = [(f, h) for f, h in runs if h]
    if not runs:
        section.note = "No final runs yet."
        return section
    fig = make_subplots(rows=1, cols=2, subplot_titles=["training loss", "training accuracy"])
    shown: set[str] = set()
    for final, history in runs:
        epochs = [h.get("epoch") for h in history]
        for col, key in enumerate(("train_loss", "train_acc"), start=1):
            fig.add_trace(
                go.Scatter(
                    x=epochs,
                    y=[h.get(key) for h in history],
                    mode="lines+markers",
                    name=final.label,
                    legendgroup=final.label,
                    showlegend=col == 1 and final.label not in shown,
                    line={"color": _color(final.optimizer)},
                    text=[f"{final.label} seed {final.seed}"] * len(history),
                ),
                row=1,
                col=col,
            )
        shown.add(final.label)
    fig.update_xaxes(title_text="epoch")
    fig.update_layout(height=420)
    section.figure = fig
    return section


def build_figures(results: SweepResults, board: Any) -> list[Section]:
    """Every section of the report, in reading order."""
    return [
        history_figure(results),
        params_figure(results),
        contour_figure(results),
        importance_figure(results),
        test_figure(results, board),
        flatness_figure(results),
        curves_figure(results),
    ]


# ----------------------------------------------------------------------------- the page

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto;
       max-width: 1200px; color: #222; padding: 0 1em; }
table { border-collapse: collapse; font-size: 0.85em; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.5em; text-align: right; }
th { background: #f3f3f3; }
td.text { text-align: left; }
p.note { color: #666; font-style: italic; }
footer { color: #888; font-size: 0.8em; margin-top: 3em; }
"""


def _table_html(board: Any) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in board.columns())
    body = []
    for cells in board.cells():
        tds = "".join(
            f'<td class="text">{html.escape(c)}</td>' if i == 1 else f"<td>{html.escape(c)}</td>"
            for i, c in enumerate(cells)
        )
        body.append(f"<tr>{tds}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def render_report(results: SweepResults, board: Any) -> str:
    """The whole page as one string."""
    from plotly.offline import get_plotlyjs

    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>msam report: {html.escape(results.name)}</title>",
        f"<style>{_STYLE}</style>",
        "<script>window.PlotlyConfig = {MathJaxConfig: 'local'};</script>",
        f"<script>{get_plotlyjs()}</script>",
        "</head><body>",
        f"<h1>Sweep {html.escape(results.name)}: SGD vs SAM vs mSAM</h1>",
    ]
    parts += [f"<p>{html.escape(line)}</p>" for line in board.headline()]
    parts.append(_table_html(board))
    if board.comparisons:
        parts.append("<h2>Paired comparisons (by seed)</h2><ul>")
        parts += [f"<li>{html.escape(d.verdict)}</li>" for d in board.comparisons]
        parts.append("</ul>")
    if board.notes:
        parts.append("<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in board.notes) + "</ul>")
    config = {"displaylogo": False, "responsive": True}
    for section in build_figures(results, board):
        parts.append(f'<section id="{section.key}"><h2>{html.escape(section.title)}</h2>')
        if section.note:
            parts.append(f'<p class="note">{html.escape(section.note)}</p>')
        if section.figure is not None:
            section.figure.update_layout(template="plotly_white", margin={"t": 50})
            parts.append(
                section.figure.to_html(
                    full_html=False,
                    include_plotlyjs=False,
                    div_id=f"plot-{section.key}",
                    config=config,
                )
            )
        parts.append("</section>")
    where = f" from {html.escape(board.storage)}" if board.storage else ""
    versions = ", ".join(f"{k} {v}" for k, v in board.versions.items())
    parts.append(
        f"<footer>Generated {html.escape(board.generated)}{where}. {html.escape(versions)}"
        "</footer></body></html>"
    )
    return "\n".join(parts)


def write_report(results: SweepResults, board: Any, path: str | Path) -> Path:
    """Write ``report.html`` atomically (a reader never sees half a page)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, render_report(results, board))
