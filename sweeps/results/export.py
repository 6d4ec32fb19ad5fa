"""Tuned defaults: each optimizer's best configuration as a train config ``msam train`` runs as is.

A sweep's most reusable output is not its table but its winning hyperparameters. For every
optimizer, ``tuned/<name>-<optimizer>.yaml`` in the run folder is the complete train config of its
best trial (validated by ``msam.config.parse_train_config``), with the epochs the final runs used
and seed 0. Its provenance (sweep, study, trial, validation accuracy, test accuracy over seeds,
versions, date) sits in YAML comments at the top, because train configs accept no extra keys.

``msam export RUN_DIR --to configs/tuned/`` copies them. It never silently replaces a file: one
holding the same config is left alone, one holding a different config is an error unless forced.
"""

from __future__ import annotations

import datetime as _dt
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from msam.config import load_yaml
from msam.errors import UserError
from msam.files import atomic_write
from sweeps import budget
from sweeps.layout import RunFolder
from sweeps.results.leaderboard import Leaderboard, Row, build_leaderboard, text_line
from sweeps.results.read import SweepResults, load_sweep, package_versions

__all__ = ["export_tuned", "tuned_config", "tuned_path", "tuned_text", "write_tuned"]


def tuned_path(run_dir: str | Path, name: str, optimizer: str) -> Path:
    return RunFolder(run_dir).tuned(name, optimizer)


def tuned_config(results: SweepResults, row: Row) -> Any:
    """The TrainConfig of a leaderboard row's configuration, as the final runs trained it."""
    spec = results.spec
    epochs = row.epochs or budget.epochs(spec, row.optimizer, final=True)
    return spec.train_config(row.optimizer, {**row.params, "train.seed": 0, "train.epochs": epochs})


def tuned_text(results: SweepResults, row: Row, *, date: str | None = None) -> str:
    """The YAML file: provenance comments, then the config."""
    cfg = tuned_config(results, row)
    date = date or _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    counts = row.trials or {}
    searched = ", ".join(f"{k}={v}" for k, v in row.params.items()) or "none"
    lines = [
        f"Tuned default for {row.optimizer}, from msam sweep {results.name}.",
        f"study: {row.study or results.name + '/' + row.optimizer}"
        + (f" (storage: {results.storage_shown})" if results.storage_shown else ""),
        f"trial: {row.trial}, validation accuracy "
        + (f"{row.tuning_val_acc * 100:.2f}%" if row.tuning_val_acc is not None else "unknown")
        + (
            f" (best of {counts.get('complete')} complete trials; {counts.get('pruned')} pruned, "
            f"{counts.get('failed')} failed)"
            if counts
            else ""
        ),
        f"searched: {searched}",
    ]
    if row.test is not None:
        lines.append(
            f"test accuracy over {row.test.n} seed(s) {row.seeds} (trained on train+validation, "
            f"{cfg.train.epochs} epochs): {row.test.text(scale=100, unit='%')}"
        )
    else:
        lines.append("test accuracy: no final runs yet (validation accuracy only)")
    versions = ", ".join(f"{k} {v}" for k, v in package_versions().items())
    lines += [
        f"versions: {versions}",
        f"date: {date}",
        f"run: msam train {results.name}-{row.optimizer}.yaml [--set train.seed=1]",
    ]
    # Comment-safe: no line break (YAML's or Unicode's) may end a comment and start YAML, and no
    # control character may make the file unloadable or recolour the terminal that shows it.
    header = "".join(f"# {text_line(line)}\n" for line in lines)
    body = yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=False)
    return header + body


def write_tuned(results: SweepResults, board: Leaderboard, run_dir: str | Path) -> list[Path]:
    """``tuned/<name>-<optimizer>.yaml`` for each optimizer's best configuration."""
    written = []
    for row in board.rows:
        if row.rank != 1 or not row.params:
            continue
        path = tuned_path(run_dir, results.name, row.optimizer)
        path.parent.mkdir(parents=True, exist_ok=True)
        written.append(atomic_write(path, tuned_text(results, row)))
    return written


def _config_of(path: Path) -> Any:
    """A file already in ``--to``, read with the config loader's limits (None if unreadable)."""
    try:
        return load_yaml(path)
    except UserError:
        return None


def export_tuned(run_dir: str | Path, to: str | Path, *, force: bool = False) -> int:
    """Copy a run folder's tuned configs into ``to`` (``msam export``); 0 on success.

    The run folder's ``tuned/`` is made first when missing (from its spec, studies and finals).
    A file already in ``to`` with the same config (comments aside) is kept; one with a different
    config stops the export before anything is written (UserError), unless ``force``.
    """
    run_dir, to = Path(run_dir), Path(to)
    source = RunFolder(run_dir).tuned_dir
    files = sorted(source.glob("*.yaml")) if source.is_dir() else []
    if not files:
        results = load_sweep(run_dir)
        if results.spec is None:
            raise UserError(f"{run_dir}: no spec.yaml, so no train config can be written")
        files = write_tuned(results, build_leaderboard(results), run_dir)
        if not files:
            raise UserError(f"{run_dir}: no complete trial in any study; nothing to export")
    if to.exists() and not to.is_dir():
        raise UserError(f"--to {to}: exists and is not a folder")
    plan: list[tuple[Path, Path, str]] = []
    conflicts = []
    for src in files:
        dest = to / src.name
        if not dest.exists():
            plan.append((src, dest, "wrote"))
        elif _config_of(dest) == _config_of(src):
            plan.append((src, dest, "unchanged"))
        elif force:
            plan.append((src, dest, "replaced"))
        else:
            conflicts.append(str(dest))
    if conflicts:
        raise UserError(
            f"{', '.join(conflicts)} already exist(s) with a different config; remove or rename "
            "them first (nothing was exported)"
        )
    _check_writable(to)
    for src, dest, action in plan:
        if action != "unchanged":
            try:
                atomic_write(dest, src.read_bytes())
            except OSError as exc:
                dest.with_name(dest.name + ".tmp").unlink(missing_ok=True)
                raise UserError(f"--to {to}: cannot write {dest.name} ({_reason(exc)})") from None
        print(f"{action}: {dest}", file=sys.stdout)
    return 0


def _reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def _check_writable(to: Path) -> None:
    """Make ``to`` and refuse, before the first file, a folder no file can go into."""
    try:
        to.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--to {to}: cannot write there ({_reason(exc)})") from None
    if not os.access(to, os.W_OK | os.X_OK):  # a read-only mount refuses root as well
        raise UserError(f"--to {to}: cannot write there (the folder is read-only)")
