"""The leaderboard of a sweep: SGD vs SAM vs mSAM, tuned on validation, scored on test.

One row per optimizer (and per extra configuration when ``final.top_k > 1``): the best tuned
hyperparameters and their validation accuracy, how many trials finished, were pruned or failed,
the final runs' test accuracy over seeds (mean ± std, 95% t-interval), flatness of the final
models (msam.flatness) and their cost (wall seconds, gradient evaluations per update, images/s).
Below it, paired comparisons by seed (mSAM−SAM, SAM−SGD, mSAM−SGD) with Holm-adjusted p-values
(sweeps.results.stats) and a verdict that says plainly when a gap is not significant: the mSAM paper
(Behdin et al., 2023) claims mSAM > SAM (Foret et al., 2021) > SGD, and a handful of seeds often
cannot tell.

This module is the model and its views (terminal, markdown, JSON); ``sweeps.results.publish``
writes them with the report, the tuned defaults and the W&B leaderboard run. Without finals it
shows tuning results only and says so.
"""

from __future__ import annotations

import datetime as _dt
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from sweeps.budget import grad_evals_of
from sweeps.results.read import FinalRecord, SweepResults, json_safe, mean_of, package_versions
from sweeps.results.stats import (
    LogSummary,
    PairedDiff,
    PairedRatio,
    Summary,
    compare_optimizers,
    compare_ratios,
    summarize,
    summarize_log,
)
from sweeps.spec import Flatness
from sweeps.studies import study_name

__all__ = [
    "FLATNESS_KEYS",
    "PARAM_KEYS",
    "Leaderboard",
    "Row",
    "build_leaderboard",
    "flatness_titles",
    "flatness_value",
    "markdown_text",
    "sharpness_radius",
    "spec_radii",
    "text_line",
]

#: Flatness metrics shown, with their column titles (means over a configuration's seeds).
#: Sharpness is shown at one radius common to every optimizer (``SHARPNESS_RADIUS`` when the spec
#: measures it): at each run's own rho it would say more about rho than about the minimum.
FLATNESS_KEYS: dict[str, str] = {
    "hessian_top_eig": "top eig",
    "hessian_trace": "trace",
    "sharpness": "sharpness",
    "adaptive_sharpness": "adaptive",
}
#: Recorded in leaderboard.json beside FLATNESS_KEYS, not shown: SAM sharpness at each run's rho.
RECORDED_FLATNESS_KEYS: tuple[str, ...] = ("sam_sharpness",)
SHARPNESS_RADIUS = 0.05
PARAM_KEYS: dict[str, str] = {"lr": "lr", "rho": "rho", "micro_batches": "m"}
NO_FINALS = (
    "No final runs yet: tuning results only (validation accuracy; the test set is untouched)."
)


@dataclass
class Row:
    """One configuration of one optimizer: its tuning and, when run, its finals."""

    optimizer: str
    rank: int
    study: str | None
    trial: int | None
    params: dict[str, Any]
    tuning_val_acc: float | None
    trials: dict[str, int] | None
    test: Summary | None = None
    seeds: list[int] = field(default_factory=list)
    not_complete: dict[str, int] = field(default_factory=dict)
    flatness: dict[str, float | None] = field(default_factory=dict)
    flatness_rho: float | None = None
    sharpness_radius: float | None = None
    seconds: float | None = None
    grad_evals_per_update: int | None = None
    images_per_s: float | None = None
    epochs: int | None = None

    @property
    def label(self) -> str:
        return self.optimizer if self.rank == 1 else f"{self.optimizer} (top{self.rank})"

    def to_json(self) -> dict[str, Any]:
        test = None
        if self.test is not None:
            test = {
                "mean": self.test.mean,
                "std": self.test.std,
                "ci_low": self.test.ci_low,
                "ci_high": self.test.ci_high,
                "confidence": self.test.confidence,
                "n": self.test.n,
                "values": list(self.test.values),
                "text": self.test.text(scale=100, unit="%"),
            }
        return {
            "optimizer": self.optimizer,
            "rank": self.rank,
            "label": self.label,
            "study": self.study,
            "trial": self.trial,
            "params": self.params,
            "tuning_val_acc": self.tuning_val_acc,
            "trials": self.trials,
            "test_acc": test,
            "seeds": self.seeds,
            "finals_not_complete": self.not_complete,
            "flatness": {
                **self.flatness,
                "rho": self.flatness_rho,
                "sharpness_radius": self.sharpness_radius,
            },
            "seconds": self.seconds,
            "grad_evals_per_update": self.grad_evals_per_update,
            "images_per_s": self.images_per_s,
            "epochs": self.epochs,
        }


@dataclass
class Leaderboard:
    """Everything the terminal, markdown, JSON, W&B and HTML views show."""

    sweep: str
    generated: str
    storage: str | None
    has_finals: bool
    rows: list[Row]
    comparisons: list[PairedDiff]
    compared_seeds: list[int]
    notes: list[str]
    versions: dict[str, str]
    #: Per optimizer (best configuration), each flatness metric's geometric mean over the paired
    #: seeds with its interval on the log scale; and the paired ratios between optimizers.
    flatness_summaries: dict[str, dict[str, LogSummary | None]] = field(default_factory=dict)
    flatness_comparisons: list[PairedRatio] = field(default_factory=list)

    # ------------------------------------------------------------------ views

    def headline(self) -> list[str]:
        """The verdict in sentences: the best optimizer, then whether any gap is real."""
        if not self.has_finals:
            lines = [NO_FINALS]
            best = max(
                (r for r in self.rows if r.tuning_val_acc is not None),
                key=lambda r: r.tuning_val_acc,
                default=None,
            )
            if best is not None:
                lines.append(
                    f"Best validation accuracy in tuning: {best.label} "
                    f"({_pct(best.tuning_val_acc)}, trial {best.trial})."
                )
            return lines
        scored = [r for r in self.rows if r.rank == 1 and r.test is not None]
        lines = []
        if scored:
            best = max(scored, key=lambda r: r.test.mean)
            lines.append(
                f"Highest mean test accuracy: {best.label} {best.test.text(scale=100, unit='%')}."
            )
        tested = [d for d in self.comparisons if d.p_value is not None]
        if self.comparisons and not tested:
            lines.append(
                f"Paired comparisons have {len(self.compared_seeds)} seed(s) in common: no test "
                "is possible; run final.seeds >= 2 for intervals and p-values."
            )
        elif tested and not any(d.significant for d in tested):
            lines.append(
                f"No difference is significant at {_alpha(tested)}: with "
                f"{len(self.compared_seeds)} paired seeds these optimizers are not told apart."
            )
        elif tested:
            winners = [d.verdict.split(": ", 1)[0] for d in tested if d.significant]
            lines.append(f"Significant at {_alpha(tested)}: {'; '.join(winners)}.")
        return lines

    def columns(self) -> list[str]:
        cols = ["#", "optimizer", "lr", "rho", "m", "val acc %", "trials c/p/f"]
        cols += ["test acc %", "95% CI", "seeds"]
        radius = next((r.sharpness_radius for r in self.rows if r.sharpness_radius), None)
        cols += list(flatness_titles(radius).values())
        cols += ["seconds", "grad evals/update", "images/s"]
        return cols

    def cells(self) -> list[list[str]]:
        """Formatted rows, the same for the terminal, markdown and HTML."""
        out = []
        for i, row in enumerate(self.rows, start=1):
            counts = row.trials
            trials = (
                f"{counts['complete']}/{counts['pruned']}/{counts['failed']}" if counts else "-"
            )
            test, ci = "-", "-"
            if row.test is not None:
                test = f"{row.test.mean * 100:.2f}"
                if row.test.std is not None:
                    test += f" ± {row.test.std * 100:.2f}"
                if row.test.ci_low is not None and row.test.ci_high is not None:
                    ci = f"{row.test.ci_low * 100:.2f} to {row.test.ci_high * 100:.2f}"
            seeds = str(len(row.seeds)) if row.seeds or self.has_finals else "-"
            if row.not_complete:
                seeds += " (" + ", ".join(f"{n} {s}" for s, n in row.not_complete.items()) + ")"
            cells = [
                str(i),
                row.label,
                _num(row.params.get("lr")),
                _num(row.params.get("rho")),
                _num(row.params.get("micro_batches")),
                _pct(row.tuning_val_acc),
                trials,
                test,
                ci,
                seeds,
            ]
            cells += [_num(row.flatness.get(key)) for key in FLATNESS_KEYS]
            cells += [
                _num(row.seconds, 1),
                "-" if row.grad_evals_per_update is None else str(row.grad_evals_per_update),
                _num(row.images_per_s, 0),
            ]
            out.append(cells)
        return out

    def to_json(self) -> dict[str, Any]:
        return json_safe(
            {
                "sweep": self.sweep,
                "generated": self.generated,
                "storage": self.storage,
                "has_finals": self.has_finals,
                "headline": self.headline(),
                "rows": [row.to_json() for row in self.rows],
                "compared_seeds": self.compared_seeds,
                "comparisons": [_diff_json(d) for d in self.comparisons],
                "flatness_summaries": {
                    opt: {k: None if v is None else asdict(v) for k, v in metrics.items()}
                    for opt, metrics in self.flatness_summaries.items()
                },
                "flatness_comparisons": [asdict(r) for r in self.flatness_comparisons],
                "notes": self.notes,
                "versions": self.versions,
            }
        )

    def to_markdown(self) -> str:
        cols = self.columns()
        lines = [f"# Leaderboard: {self.sweep}", ""]
        lines += [f"{line}" for line in self.headline()]
        lines += ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for cells in self.cells():
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        lines.append("")
        lines.append(
            "Test accuracy in %: mean ± std over seeds, 95% t-interval of the mean. Trials: "
            "complete/pruned/failed. Flatness: means over seeds on a fixed training sample, "
            "BatchNorm in eval mode (top Hessian eigenvalue, Hutchinson trace, sharpness "
            "L(w+eps)-L(w) and adaptive sharpness at one radius for every optimizer). Seconds: "
            "wall time of one final run."
        )
        if self.comparisons:
            lines += ["", "## Paired comparisons (by seed)", ""]
            lines += [f"- {d.verdict}" for d in self.comparisons]
        lines += self._flatness_markdown()
        if self.notes:
            lines += ["", "## Notes", ""]
            lines += [f"- {markdown_text(note)}" for note in self.notes]
        where = f" from {markdown_text(self.storage)}" if self.storage else ""
        lines += ["", f"Generated {self.generated}{where}"]
        versions = ", ".join(f"{k} {v}" for k, v in self.versions.items())
        lines += ["", f"Versions: {versions}", ""]
        return "\n".join(lines)

    def _flatness_markdown(self) -> list[str]:
        """Flatness per optimizer on the log scale, and its paired ratios (Holm over all)."""
        if not self.flatness_summaries:
            return []
        lines = ["", "## Flatness (geometric means over the paired seeds, 95% CI on the log scale)"]
        lines.append("")
        for label, metrics in self.flatness_summaries.items():
            shown = [f"{name} {s.text()}" for name, s in metrics.items() if s is not None]
            if shown:
                lines.append(f"- {label}: " + "; ".join(shown))
        if self.flatness_comparisons:
            lines += ["", "Paired ratios (lower is flatter; Holm across every metric and pair):"]
            lines += [""] + [f"- {r.verdict}" for r in self.flatness_comparisons]
        return lines

    def print(self, console: Any = None) -> None:
        """Two rich tables (tuning, then finals: 16 columns do not fit a terminal) and the
        verdicts, on stdout (or ``console``)."""
        from rich.console import Console
        from rich.table import Table

        if console is None:
            console = Console(width=None if sys.stdout.isatty() else 160)
        cols = self.columns()
        split = cols.index("test acc %")
        parts = [("tuning", list(range(split))), ("final runs", [0, 1, *range(split, len(cols))])]
        if not self.has_finals:
            parts = parts[:1]
        for title, picked in parts:
            table = Table(title=f"{self.sweep}: {title}", title_justify="left")
            for i in picked:
                table.add_column(cols[i], justify="left" if i == 1 else "right")
            for cells in self.cells():
                table.add_row(*(cells[i] for i in picked))
            console.print(table)
        for line in self.headline():
            console.print(line, markup=False, highlight=False)
        for d in self.comparisons:
            console.print(f"  {d.verdict}", markup=False, highlight=False)
        for note in self.notes:
            console.print(f"note: {note}", markup=False, highlight=False)


def _alpha(diffs: Sequence[PairedDiff]) -> str:
    return f"{diffs[0].alpha * 100:g}%"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.2f}"


def _num(value: Any, digits: int | None = None) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, (bool, int)):
        return str(value)
    if isinstance(value, float):
        if digits is not None:
            return f"{value:,.{digits}f}" if digits == 0 else f"{value:.{digits}f}"
        return f"{value:.4g}"
    return str(value)


def _diff_json(d: PairedDiff) -> dict[str, Any]:
    data = asdict(d)
    data["differences"] = list(d.differences)
    return data


# ----------------------------------------------------------------------------- building


def flatness_titles(radius: float | None) -> dict[str, str]:
    """``FLATNESS_KEYS``' titles, the sharpness ones with the radius they are shown at."""
    return {
        key: f"{title}@{radius:g}" if key.endswith("sharpness") and radius else title
        for key, title in FLATNESS_KEYS.items()
    }


def spec_radii(results: SweepResults) -> list[float]:
    """The radii the sweep's finals measure sharpness at (the spec's default without a spec)."""
    spec = results.spec
    return list(spec.final.flatness.radii if spec is not None else Flatness().radii)


def sharpness_radius(radii: Sequence[float]) -> float:
    """The radius the leaderboard shows sharpness at: ``SHARPNESS_RADIUS`` if the spec measures
    it, else the middle one of the spec's radii."""
    ordered = sorted(radii)
    return SHARPNESS_RADIUS if SHARPNESS_RADIUS in ordered else ordered[len(ordered) // 2]


def flatness_value(flatness: dict[str, Any], key: str, radius: float | None) -> Any:
    """A final's flatness metric; sharpness (recorded per radius) at ``radius``."""
    if key in ("sharpness", "adaptive_sharpness"):
        by_radius = flatness.get(key)
        if not isinstance(by_radius, dict) or radius is None:
            return None
        # Keys are the radii as text ("0.05"): matched as numbers, not by spelling.
        return next((v for k, v in by_radius.items() if _same_radius(k, radius)), None)
    return flatness.get(key)


def _same_radius(key: str, radius: float) -> bool:
    try:
        return math.isclose(float(key), radius, rel_tol=1e-9)
    except ValueError:
        return False


def _final_block(row: Row, finals: Sequence[FinalRecord], radius: float | None = None) -> None:
    """Fill a row's test, flatness and cost columns from its final runs."""
    done = [f for f in finals if f.test_acc is not None]
    row.seeds = sorted(f.seed for f in done)
    for f in finals:
        if f.test_acc is None:
            row.not_complete[f.status] = row.not_complete.get(f.status, 0) + 1
    if done:
        accuracies = [f.test_acc for f in sorted(done, key=lambda f: f.seed)]
        row.test = summarize(accuracies, bounds=(0.0, 1.0))
        for key in (*FLATNESS_KEYS, *RECORDED_FLATNESS_KEYS):
            row.flatness[key] = mean_of(flatness_value(f.flatness, key, radius) for f in done)
        if row.flatness.get("sharpness") is not None:
            row.sharpness_radius = radius
        rhos = {f.flatness.get("rho") for f in done if f.flatness.get("rho") is not None}
        row.flatness_rho = rhos.pop() if len(rhos) == 1 else None
        row.seconds = mean_of(f.summary.get("seconds") for f in done)
        row.images_per_s = mean_of(f.summary.get("images_per_s") for f in done)
        evals = {f.summary.get("grad_evals_per_update") for f in done}
        row.grad_evals_per_update = evals.pop() if len(evals) == 1 else None
        epochs = {f.job.get("epochs") or f.summary.get("epochs_completed") for f in done}
        row.epochs = epochs.pop() if len(epochs) == 1 else None


def build_leaderboard(results: SweepResults, *, confidence: float = 0.95) -> Leaderboard:
    """Rows, paired comparisons and notes from a sweep's studies and finals."""
    rows: list[Row] = []
    notes: list[str] = []
    radius = sharpness_radius(spec_radii(results))
    for optimizer in results.optimizers:
        study = results.studies.get(optimizer)
        ranks = results.ranks(optimizer) or [1]
        ranked = study.ranked(max(ranks)) if study is not None else []
        if study is None and results.storage_shown is not None:
            name = study_name(results.name, optimizer)
            notes.append(f"no study named {name} in {results.storage_shown}")
        for rank in ranks:
            finals = results.finals_of(optimizer, rank)
            trial = ranked[rank - 1] if rank <= len(ranked) else None
            job = finals[0].job if finals else {}
            params = dict(job.get("params") or (trial.params if trial is not None else {}))
            if not params and trial is None and not finals:
                rows.append(
                    Row(
                        optimizer,
                        rank,
                        getattr(study, "name", None),
                        None,
                        {},
                        None,
                        study.counts() if study is not None else None,
                    )
                )
                continue
            row = Row(
                optimizer=optimizer,
                rank=rank,
                study=job.get("study") or getattr(study, "name", None),
                trial=job.get("trial", trial.number if trial is not None else None),
                params=params,
                tuning_val_acc=job.get("val_acc", trial.value if trial is not None else None),
                trials=study.counts() if study is not None else None,
                grad_evals_per_update=grad_evals_of(results.spec, optimizer, params),
            )
            if trial is not None and finals and job.get("trial") not in (None, trial.number):
                notes.append(
                    f"{row.label}: finals are of trial {job.get('trial')}, but the study's rank "
                    f"{rank} is now trial {trial.number}; rerun the final stage to update them"
                )
            _final_block(row, finals, radius)
            rows.append(row)
    for label, trial in dict.fromkeys((f.label, f.trial) for f in results.set_aside):
        seeds = [f.seed for f in results.set_aside if (f.label, f.trial) == (label, trial)]
        notes.append(
            f"{label}: the final(s) of trial {trial} (seed {', '.join(map(str, seeds))}) are set "
            "aside, not mixed with the row's trial; rerun the final stage to replace them"
        )
    if not results.studies and results.storage_shown is None:
        notes.append(
            "no Optuna storage found (no optuna.journal in the run folder): tuning columns are "
            "empty; pass --storage URL if the studies live elsewhere"
        )
    has_finals = any(r.test is not None for r in rows)
    if has_finals:
        rows.sort(key=lambda r: (r.test is None, -(r.test.mean if r.test else 0.0), r.rank))
    else:
        rows.sort(key=lambda r: (r.tuning_val_acc is None, -(r.tuning_val_acc or 0.0)))
    comparisons, seeds = _comparisons(results, confidence)
    flat_summaries, flat_comparisons = _flatness_comparisons(results, seeds, radius, confidence)
    missing = [o for o in results.optimizers if not any(r.test for r in rows if r.optimizer == o)]
    if has_finals and missing:
        notes.append(f"no complete final run for {', '.join(missing)}")
    return Leaderboard(
        sweep=results.name,
        generated=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        storage=results.storage_shown,
        has_finals=has_finals,
        rows=rows,
        comparisons=comparisons,
        compared_seeds=seeds,
        notes=notes,
        versions=package_versions(),
        flatness_summaries=flat_summaries,
        flatness_comparisons=flat_comparisons,
    )


def _flatness_comparisons(
    results: SweepResults, seeds: Sequence[int], radius: float, confidence: float
) -> tuple[dict[str, dict[str, LogSummary | None]], list[PairedRatio]]:
    """Each optimizer's flatness on the seeds every optimizer completed (its best configuration),
    summarised on the log scale, and the paired ratios between optimizers."""
    if not seeds:
        return {}, []
    titles = flatness_titles(radius)
    per_metric: dict[str, dict[str, list[float]]] = {title: {} for title in titles.values()}
    for optimizer in results.optimizers:
        by_seed = {f.seed: f for f in results.finals_of(optimizer) if f.test_acc is not None}
        for key, title in titles.items():
            values = [flatness_value(by_seed[s].flatness, key, radius) for s in seeds]
            if all(isinstance(v, (int, float)) for v in values):
                per_metric[title][optimizer] = [float(v) for v in values]
    summaries = {
        optimizer: {
            title: summarize_log(per_metric[title][optimizer], confidence)
            for title in titles.values()
            if optimizer in per_metric[title]
        }
        for optimizer in results.optimizers
    }
    summaries = {opt: m for opt, m in summaries.items() if m}
    return summaries, compare_ratios(per_metric, confidence=confidence)


def _comparisons(results: SweepResults, confidence: float) -> tuple[list[PairedDiff], list[int]]:
    """Paired tests of the best configurations on the seeds every optimizer completed."""
    by_seed: dict[str, dict[int, float]] = {}
    for optimizer in results.optimizers:
        accs = {f.seed: f.test_acc for f in results.finals_of(optimizer) if f.test_acc is not None}
        if accs:
            by_seed[optimizer] = accs
    if len(by_seed) < 2:
        return [], []
    seeds = sorted(set.intersection(*(set(v) for v in by_seed.values())))
    if not seeds:
        return [], []
    values = {opt: [accs[s] for s in seeds] for opt, accs in by_seed.items()}
    return compare_optimizers(values, confidence=confidence), seeds


def text_line(text: Any) -> str:
    """``text`` (a storage path, a note) as one line of printable characters.

    Whitespace runs, line breaks included (YAML's ``\\x85``, Unicode's line and paragraph
    separators), become one space; any other control or format character (a terminal escape, a
    bidi override) is written as its ``\\x1b``-style escape. So a folder name can neither end a
    YAML comment, nor start a Markdown heading, nor recolour a terminal.
    """
    return "".join(
        char if char.isprintable() else char.encode("unicode_escape").decode("ascii")
        for char in " ".join(str(text).split())
    )


#: What turns text into HTML, a link or a code span in Markdown: entities for HTML's characters
#: (they read the same in every renderer), a backslash for Markdown's.
_MARKDOWN_ESCAPES = str.maketrans(
    {"&": "&amp;", "<": "&lt;", ">": "&gt;", **{c: "\\" + c for c in "\\`[]|"}}
)


def markdown_text(text: Any) -> str:
    """``text`` as inline Markdown that renders as exactly that text: no HTML, no link."""
    return text_line(text).translate(_MARKDOWN_ESCAPES)
