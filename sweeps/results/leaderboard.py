"""The leaderboard of a sweep: SGD vs SAM vs mSAM, tuned on validation, scored on test.

One row per optimizer (and per extra configuration when ``final.top_k > 1``): the best tuned
hyperparameters and their validation accuracy, how many trials finished, were pruned or failed,
the final runs' test accuracy over seeds (mean ± std, 95% t-interval), flatness of the final
models (msam.flatness) and their cost (wall seconds, gradient evaluations per update, images/s).
Below it, paired comparisons by seed (mSAM−SAM, SAM−SGD, mSAM−SGD) with Holm-adjusted p-values
(sweeps.results.stats) and a verdict that says plainly when a gap is not significant: the mSAM paper
(Behdin et al., 2023) claims mSAM > SAM (Foret et al., 2021) > SGD, and a handful of seeds often
cannot tell.

Outputs: a rich table in the terminal, ``leaderboard.md`` and ``leaderboard.json`` in the run
folder, ``report.html`` (sweeps.results.report), ``tuned/*.yaml`` (sweeps.results.export) and, at the end of a
sweep, a W&B run with ``job_type=leaderboard``. Without finals it shows tuning results only and
says so.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sweeps.results.read import (
    FinalRecord,
    SweepResults,
    json_safe,
    load_spec,
    load_sweep,
    mean_of,
    open_results_storage,
    package_versions,
    shown_storage,
    sweep_names,
)
from sweeps.results.stats import PairedDiff, Summary, compare_optimizers, summarize

__all__ = [
    "FLATNESS_KEYS",
    "Leaderboard",
    "Row",
    "build_leaderboard",
    "log_leaderboard_to_wandb",
    "run_leaderboard",
    "write_leaderboard",
]

MARKDOWN = "leaderboard.md"
JSON = "leaderboard.json"
REPORT = "report.html"
#: Flatness metrics shown, with their column titles (means over a configuration's seeds).
FLATNESS_KEYS: dict[str, str] = {
    "hessian_top_eig": "top eig",
    "hessian_trace": "trace",
    "sam_sharpness": "SAM sharpness",
}
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
            "flatness": {**self.flatness, "rho": self.flatness_rho},
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
        cols += list(FLATNESS_KEYS.values())
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
            "complete/pruned/failed. Flatness: means over seeds on a fixed training sample "
            "(top Hessian eigenvalue, Hutchinson trace, SAM sharpness L(w+eps)-L(w) at the run's "
            "rho; SGD at base.optim.rho). Seconds: wall time of one final run."
        )
        if self.comparisons:
            lines += ["", "## Paired comparisons (by seed)", ""]
            lines += [f"- {d.verdict}" for d in self.comparisons]
        if self.notes:
            lines += ["", "## Notes", ""]
            lines += [f"- {note}" for note in self.notes]
        lines += [
            "",
            f"Generated {self.generated}" + (f" from {self.storage}" if self.storage else ""),
        ]
        versions = ", ".join(f"{k} {v}" for k, v in self.versions.items())
        lines += ["", f"Versions: {versions}", ""]
        return "\n".join(lines)

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


def _final_block(row: Row, finals: Sequence[FinalRecord]) -> None:
    """Fill a row's test, flatness and cost columns from its final runs."""
    done = [f for f in finals if f.test_acc is not None]
    row.seeds = sorted(f.seed for f in done)
    for f in finals:
        if f.test_acc is None:
            row.not_complete[f.status] = row.not_complete.get(f.status, 0) + 1
    if done:
        row.test = summarize([f.test_acc for f in sorted(done, key=lambda f: f.seed)])
        for key in FLATNESS_KEYS:
            row.flatness[key] = mean_of(f.flatness.get(key) for f in done)
        rhos = {f.flatness.get("rho") for f in done if f.flatness.get("rho") is not None}
        row.flatness_rho = rhos.pop() if len(rhos) == 1 else None
        row.seconds = mean_of(f.summary.get("seconds") for f in done)
        row.images_per_s = mean_of(f.summary.get("images_per_s") for f in done)
        evals = {f.summary.get("grad_evals_per_update") for f in done}
        row.grad_evals_per_update = evals.pop() if len(evals) == 1 else None
        epochs = {f.job.get("epochs") or f.summary.get("epochs_completed") for f in done}
        row.epochs = epochs.pop() if len(epochs) == 1 else None


def _grad_evals(optimizer: str, params: Mapping[str, Any]) -> int:
    """Gradient evaluations per update without a final to read it from: SGD 1, (m)SAM 2."""
    return 1 if optimizer == "sgd" or params.get("rho") == 0 else 2


def build_leaderboard(results: SweepResults, *, confidence: float = 0.95) -> Leaderboard:
    """Rows, paired comparisons and notes from a sweep's studies and finals."""
    rows: list[Row] = []
    notes: list[str] = []
    for optimizer in results.optimizers:
        study = results.studies.get(optimizer)
        ranks = results.ranks(optimizer) or [1]
        ranked = study.ranked(max(ranks)) if study is not None else []
        if study is None and results.storage_shown is not None:
            notes.append(f"no study named {results.name}/{optimizer} in {results.storage_shown}")
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
                grad_evals_per_update=_grad_evals(optimizer, params),
            )
            if trial is not None and finals and job.get("trial") not in (None, trial.number):
                notes.append(
                    f"{row.label}: finals are of trial {job.get('trial')}, but the study's rank "
                    f"{rank} is now trial {trial.number}; rerun the final stage to update them"
                )
            _final_block(row, finals)
            rows.append(row)
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
    )


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


# ----------------------------------------------------------------------------- writing


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_leaderboard(board: Leaderboard, run_dir: str | Path) -> list[Path]:
    """``leaderboard.md`` and ``leaderboard.json`` in the run folder."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    md, js = run_dir / MARKDOWN, run_dir / JSON
    _atomic_write(md, board.to_markdown())
    _atomic_write(js, json.dumps(board.to_json(), indent=2) + "\n")
    return [md, js]


#: Columns of the W&B leaderboard table (raw numbers, so W&B can sort and plot them).
TABLE_COLUMNS: tuple[str, ...] = (
    "optimizer",
    "rank",
    *PARAM_KEYS,
    "tuning_val_acc",
    "trials_complete",
    "trials_pruned",
    "trials_failed",
    "test_acc_mean",
    "test_acc_std",
    "test_acc_ci_low",
    "test_acc_ci_high",
    "seeds",
    *FLATNESS_KEYS,
    "seconds",
    "grad_evals_per_update",
    "images_per_s",
)
COMPARISON_FIELDS = (
    "a",
    "b",
    "n",
    "mean",
    "ci_low",
    "ci_high",
    "p_value",
    "p_adjusted",
    "significant",
    "verdict",
)


def _table_record(row: Mapping[str, Any]) -> dict[str, Any]:
    """One leaderboard.json row flattened to ``TABLE_COLUMNS``."""
    test, trials = row["test_acc"] or {}, row["trials"] or {}
    record: dict[str, Any] = {"optimizer": row["optimizer"], "rank": row["rank"]}
    record.update({k: row["params"].get(k) for k in PARAM_KEYS})
    record["tuning_val_acc"] = row["tuning_val_acc"]
    record.update({f"trials_{k}": trials.get(k) for k in ("complete", "pruned", "failed")})
    record.update({f"test_acc_{k}": test.get(k) for k in ("mean", "std", "ci_low", "ci_high")})
    record["seeds"] = len(row["seeds"])
    record.update({k: row["flatness"].get(k) for k in FLATNESS_KEYS})
    record.update({k: row[k] for k in ("seconds", "grad_evals_per_update", "images_per_s")})
    return record


def _wandb_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> Any:
    import wandb

    table = wandb.Table(columns=list(columns))
    for row in rows:
        table.add_data(*row)
    return table


def _wandb_summary(board: Leaderboard, data: Mapping[str, Any]) -> dict[str, Any]:
    """Key numbers as flat summary values: ``<opt>/test_acc_mean``, ``msam-sam/p_value``, ..."""
    summary: dict[str, Any] = {"has_finals": board.has_finals}
    for row in data["rows"]:
        if row["rank"] != 1:
            continue
        prefix = row["optimizer"]
        summary[f"{prefix}/tuning_val_acc"] = row["tuning_val_acc"]
        for key, value in row["params"].items():
            summary[f"{prefix}/{key}"] = value
        if row["test_acc"]:
            summary[f"{prefix}/test_acc_mean"] = row["test_acc"]["mean"]
            summary[f"{prefix}/test_acc_std"] = row["test_acc"]["std"]
            summary[f"{prefix}/seeds"] = row["test_acc"]["n"]
        for key in FLATNESS_KEYS:
            summary[f"{prefix}/{key}"] = row["flatness"].get(key)
    for d in board.comparisons:
        key = f"{d.a}-{d.b}"
        summary[f"{key}/mean"] = d.mean
        summary[f"{key}/p_value"] = d.p_adjusted if d.p_adjusted is not None else d.p_value
        summary[f"{key}/significant"] = d.significant
        summary[f"{key}/verdict"] = d.verdict
    summary["headline"] = " ".join(board.headline())
    return {k: v for k, v in summary.items() if v is not None}


def log_leaderboard_to_wandb(board: Leaderboard, results: SweepResults) -> str | None:
    """One W&B run (``job_type=leaderboard``, ``group=<name>``) holding the leaderboard and the
    comparisons as ``wandb.Table``s and the key numbers in its summary.

    Made through ``sweeps.tracking.WandbCallback`` (same modes, settings and run folder as every
    other run of the sweep). Returns the run's folder; W&B trouble is a warning and gives None.
    """
    try:
        from sweeps.tracking.wandb_runs import WandbCallback
    except ImportError:
        return None
    spec = results.spec
    wb = spec.base.tracking.wandb if spec is not None else None
    tracker = WandbCallback(
        project=wb.project if wb is not None else "msam",
        entity=wb.entity if wb is not None else None,
        mode=wb.mode if wb is not None else "auto",
        group=results.name,
        job_type="leaderboard",
        name=f"{results.name}-leaderboard",
        tags=[*(wb.tags if wb is not None else []), "leaderboard"],
        dir=results.run_dir,
        finish_on_end=False,
    )
    if not tracker.enabled:
        return None
    data = board.to_json()
    config = {"sweep": results.name, "spec": spec.to_dict() if spec is not None else None}
    tracker.on_train_start(config, {"storage": board.storage})
    if tracker.run is None:
        return None  # the callback already warned
    try:
        records = [_table_record(row) for row in data["rows"]]
        table = _wandb_table(TABLE_COLUMNS, [[r[c] for c in TABLE_COLUMNS] for r in records])
        comparisons = _wandb_table(
            COMPARISON_FIELDS,
            [[getattr(d, f) for f in COMPARISON_FIELDS] for d in board.comparisons],
        )
        tracker.run.log({"leaderboard": table, "comparisons": comparisons})
        folder = str(Path(tracker.run.dir).parent)
    except Exception as exc:  # W&B trouble never hides the leaderboard
        warnings.warn(f"W&B leaderboard tables not logged: {exc}", RuntimeWarning, stacklevel=2)
        folder = None
    tracker.finish(status="complete", summary=_wandb_summary(board, data))
    return folder


def publish(
    results: SweepResults,
    *,
    wandb: bool = False,
    report: bool = True,
    tuned: bool = True,
    console: Any = None,
) -> Leaderboard:
    """Build the leaderboard of one sweep; print it; write its files into the run folder."""
    board = build_leaderboard(results)
    board.print(console)
    run_dir = results.run_dir
    if run_dir is None:
        return board
    write_leaderboard(board, run_dir)
    if report:
        from sweeps.results.report import write_report

        write_report(results, board, run_dir / REPORT)
    if tuned and results.spec is not None:
        from sweeps.results.export import write_tuned

        write_tuned(results, board, run_dir)
    if wandb:
        log_leaderboard_to_wandb(board, results)
    return board


def run_leaderboard(
    run_dir: str | Path,
    storage: Any = None,
    *,
    spec: Any = None,
    storage_url: str | None = None,
    wandb: bool = False,
    report: bool = True,
    console: Any = None,
) -> int:
    """``msam leaderboard RUN_DIR [--storage URL]``, and the last step of ``msam sweep``.

    Without ``storage``: the run folder's ``optuna.journal`` (if any) and its finals. With a
    storage URL: every sweep in that storage is shown; the run folder's own sweep (its
    ``spec.yaml`` name, or the only sweep there) also gets its files written. ``wandb=True``
    logs a ``job_type=leaderboard`` run (the sweep does; a reprint does not). Returns 0.
    """
    run_dir = Path(run_dir)
    if storage is None or not isinstance(storage, (str, Path)):
        results = load_sweep(run_dir, storage, spec=spec, storage_url=storage_url)
        publish(results, wandb=wandb, report=report, console=console)
        return 0
    opened, shown = open_results_storage(run_dir, storage)
    shown = shown_storage(storage_url) if storage_url is not None else shown
    names = sweep_names(opened)
    spec = spec if spec is not None else load_spec(run_dir)
    own = spec.name if spec is not None else (names[0] if len(names) == 1 else None)
    if own is not None and own not in names:
        names.append(own)  # its finals may be here even if its studies are not
    if not names:
        print(f"no sweeps (studies named <name>/<optimizer>) in {shown}", file=sys.stderr)
        return 1
    for name in names:
        mine = name == own
        results = load_sweep(
            run_dir if mine else None,
            opened,
            name=name,
            spec=spec if mine else None,
            storage_url=str(storage) if storage_url is None else storage_url,
        )
        publish(results, wandb=wandb and mine, report=report and mine, tuned=mine, console=console)
    return 0
