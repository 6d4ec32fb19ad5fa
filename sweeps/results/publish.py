"""Publishing a sweep's results: every output of the results layer, written from one place.

For one sweep: the leaderboard in the terminal, ``leaderboard.md`` and ``leaderboard.json``,
``report.html`` (``sweeps.results.report``), ``tuned/<name>-<opt>.yaml``
(``sweeps.results.export``) and, at the end of a sweep, a W&B run with ``job_type=leaderboard``
holding the leaderboard and the paired comparisons as tables.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from msam.errors import UserError
from msam.files import atomic_write
from sweeps.layout import RunFolder
from sweeps.results.export import write_tuned
from sweeps.results.leaderboard import FLATNESS_KEYS, PARAM_KEYS, Leaderboard, build_leaderboard
from sweeps.results.read import (
    SweepResults,
    load_spec,
    load_sweep,
    open_results_storage,
    shown_storage,
)
from sweeps.results.report import write_report
from sweeps.studies import sweep_names
from sweeps.tracking import WandbCallback

__all__ = ["log_leaderboard_to_wandb", "publish", "run_leaderboard", "write_leaderboard"]


def write_leaderboard(board: Leaderboard, run_dir: str | Path) -> list[Path]:
    """``leaderboard.md`` and ``leaderboard.json`` in the run folder."""
    folder = RunFolder(run_dir)
    folder.root.mkdir(parents=True, exist_ok=True)
    md = atomic_write(folder.leaderboard_md, board.to_markdown())
    js = atomic_write(folder.leaderboard_json, json.dumps(board.to_json(), indent=2) + "\n")
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
    radii = {r.sharpness_radius for r in board.rows if r.sharpness_radius is not None}
    summary["sharpness_radius"] = radii.pop() if len(radii) == 1 else None
    summary["headline"] = " ".join(board.headline())
    return {k: v for k, v in summary.items() if v is not None}


def log_leaderboard_to_wandb(board: Leaderboard, results: SweepResults) -> str | None:
    """One W&B run (``job_type=leaderboard``, ``group=<name>``) holding the leaderboard and the
    comparisons as ``wandb.Table``s and the key numbers in its summary.

    Made through ``sweeps.tracking.WandbCallback`` (same modes, settings and run folder as every
    other run of the sweep). Returns the run's folder; W&B trouble is a warning and gives None.
    """
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
    try:
        write_leaderboard(board, run_dir)
        if report:
            write_report(results, board, RunFolder(run_dir).report)
        if tuned and results.spec is not None:
            write_tuned(results, board, run_dir)
    except OSError as exc:  # a full disk, a folder gone read-only mid-way
        raise UserError(
            f"{run_dir}: cannot write the leaderboard's files ({exc.strerror or exc}); the "
            "table above is all that was produced"
        ) from None
    if wandb:
        log_leaderboard_to_wandb(board, results)
    return board


def check_writable(run_dir: Path) -> None:
    """Refuse, before reading anything, a run folder the leaderboard's files cannot go into."""
    if run_dir.is_dir() and not os.access(run_dir, os.W_OK):
        raise UserError(
            f"{run_dir}: the run folder is read-only; msam leaderboard writes leaderboard.md, "
            "leaderboard.json, report.html and tuned/ there: copy it somewhere writable first"
        )


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
    check_writable(run_dir)
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
