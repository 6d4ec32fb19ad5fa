"""What a sweep left behind, read back: its Optuna studies and its final runs.

The leaderboard, the HTML report and the tuned-default export all start from the same picture of
a run folder (``spec.yaml``, ``finals/<opt>[-top<r>]/seed<k>/``) and of its studies (named
``<name>/<optimizer>`` in the sweep's storage). This module builds that picture once; nothing here
writes. Storage URLs only ever leave this module with their password masked.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from msam.config import OPTIMIZERS
from msam.errors import UserError
from msam.files import read_json
from sweeps.layout import FINAL_JOB, METRICS, SUMMARY, RunFolder, final_label
from sweeps.storage import mask_url, open_storage, resolve_storage
from sweeps.studies import (
    StudyCounts,
    count_trials,
    finite_complete,
    open_study,
    ranked_trials,
    study_name,
    sweep_names,
)

__all__ = [
    "FinalRecord",
    "StudyResult",
    "SweepResults",
    "json_safe",
    "load_spec",
    "load_study",
    "load_sweep",
    "one_trial_per_row",
    "mean_of",
    "open_results_storage",
    "package_versions",
    "read_finals",
    "shown_storage",
]


# ----------------------------------------------------------------------------- names and places


def shown_storage(url: str | None) -> str | None:
    """A storage as it may appear in files and logs: password masked."""
    if url is None:
        return None
    return mask_url(str(url))


def package_versions() -> dict[str, str]:
    """Versions for provenance, read from package metadata (no heavy imports)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str] = {}
    for package in ("msam", "torch", "timm", "optuna", "wandb"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = "unknown"
    out["python"] = platform.python_version()
    return out


# ----------------------------------------------------------------------------- storage and studies


def open_results_storage(run_dir: str | Path | None, storage: Any = None) -> tuple[Any, str | None]:
    """The sweep's Optuna storage and how to show it: ``(storage or None, masked name)``.

    ``storage`` may be an open Optuna storage, a URL or journal path (``--storage``), or None for
    ``<run_dir>/optuna.journal`` — None is returned when that file does not exist, so a folder
    holding only finals still gives a leaderboard.
    """
    if storage is not None and not isinstance(storage, (str, Path)):
        return storage, None
    if storage is None:
        if run_dir is None or not RunFolder(run_dir).journal.is_file():
            _refuse_if_studies_elsewhere(run_dir)
            return None, None
        ref = resolve_storage(None, Path(run_dir))
        return open_storage(ref), RunFolder(run_dir).journal.name
    ref = resolve_storage(str(storage), Path(run_dir or "."))
    if ref.kind == "journal" and not Path(ref.arg).is_file():
        raise UserError(f"--storage {ref.shown}: no such journal file")
    return open_storage(ref), ref.shown


def _refuse_if_studies_elsewhere(run_dir: str | Path | None) -> None:
    """A run folder whose studies live in a database: without ``--storage`` its leaderboard
    would lose every tuning column (and overwrite the files that had them), so say where."""
    if run_dir is None:
        return
    folder = RunFolder(run_dir)
    recorded = read_json(folder.storage_record) or {}
    shown = recorded.get("shown") if recorded.get("kind") not in (None, "journal") else None
    if shown is None:  # folders from before storage.json: the last leaderboard says it
        last = (read_json(folder.leaderboard_json) or {}).get("storage")
        shown = last if isinstance(last, str) and "://" in last else None
    if shown is not None:
        raise UserError(
            f"{run_dir}: this sweep's studies live in {mask_url(str(shown))}, not in the run "
            "folder; pass --storage URL (the same one the sweep used)"
        )


@dataclass
class StudyResult:
    """One optimizer's study: every trial, read once (``deepcopy=False``: 2,000 trials are fast)."""

    optimizer: str
    name: str
    study: Any
    trials: list[Any]
    maximize: bool = True

    def counts(self) -> dict[str, int]:
        """Trials per state, the ones a leaderboard shows (complete, pruned, failed, running),
        counted as the workers count them: surplus trials (asked beyond the budget by a racing
        worker, failed before any work) are not failures."""
        c: StudyCounts = count_trials(self.trials, self.optimizer, budget=0)
        return {
            "complete": c.complete,
            "pruned": c.pruned,
            "failed": c.failed,
            "running": c.running + c.waiting,
        }

    def complete(self) -> list[Any]:
        """COMPLETE trials with a finite value, in trial order (for plots)."""
        return finite_complete(self.trials)

    def ranked(self, k: int | None = None) -> list[Any]:
        return ranked_trials(self.trials, maximize=self.maximize, k=k)

    def best(self) -> Any | None:
        ranked = self.ranked(1)
        return ranked[0] if ranked else None


def load_study(storage: Any, sweep: str, optimizer: str) -> StudyResult | None:
    """The study of one optimizer, or None when the storage has none by that name."""
    import optuna

    study = open_study(storage, sweep, optimizer)
    if study is None:
        return None
    maximize = study.direction != optuna.study.StudyDirection.MINIMIZE
    return StudyResult(
        optimizer, study_name(sweep, optimizer), study, study.get_trials(deepcopy=False), maximize
    )


# ----------------------------------------------------------------------------- finals on disk


@dataclass
class FinalRecord:
    """One final run as found on disk: its job (trial, params, seed) and its summary."""

    optimizer: str
    rank: int
    seed: int
    dir: Path
    summary: dict[str, Any]
    job: dict[str, Any] = field(default_factory=dict)
    #: What the final stage did this time: trained, skipped (done before), flatness added.
    outcome: str = "read"

    @property
    def label(self) -> str:
        return final_label(self.optimizer, self.rank)

    @property
    def status(self) -> str:
        return str(self.summary.get("status", "unknown"))

    @property
    def test_acc(self) -> float | None:
        value = self.summary.get("test_acc")
        if self.status != "complete" or value is None or not math.isfinite(value):
            return None
        return float(value)

    @property
    def flatness(self) -> dict[str, Any]:
        return self.summary.get("flatness") or {}

    @property
    def trial(self) -> int | None:
        return self.job.get("trial")

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.job.get("params") or {})

    def history(self) -> list[dict[str, Any]]:
        """The per-epoch metrics (metrics.jsonl); torn last lines are skipped."""
        rows = []
        try:
            lines = (self.dir / METRICS).read_text().splitlines()
        except OSError:
            return rows
        for line in lines:
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
        return rows


def read_finals(run_dir: str | Path) -> list[FinalRecord]:
    """Every final under ``run_dir/finals`` that wrote a summary, in (optimizer, rank, seed) order.

    Folders that do not follow the layout (``.stale``, stray files) are ignored.
    """
    records = []
    for optimizer, rank, seed, folder in RunFolder(run_dir).final_dirs():
        if optimizer not in OPTIMIZERS:
            continue
        summary = read_json(folder / SUMMARY)
        if summary is None:
            continue
        job = read_json(folder / FINAL_JOB) or summary.get("final") or {}
        records.append(FinalRecord(optimizer, rank, seed, folder, summary, job))
    order = {name: i for i, name in enumerate(OPTIMIZERS)}
    records.sort(key=lambda r: (order[r.optimizer], r.rank, r.seed))
    return records


# ----------------------------------------------------------------------------- the whole picture


def load_spec(run_dir: str | Path | None) -> Any | None:
    """The resolved spec the sweep was launched with, or None if the folder has none."""
    if run_dir is None:
        return None
    path = RunFolder(run_dir).spec
    if not path.is_file():
        return None
    from sweeps.spec import load_sweep_spec

    try:
        return load_sweep_spec(path)
    except UserError as exc:
        warnings.warn(f"ignoring {path}: {exc}", stacklevel=2)
        return None


@dataclass
class SweepResults:
    """A sweep's studies (by optimizer) and finals, plus where they came from."""

    name: str
    run_dir: Path | None
    storage_shown: str | None
    optimizers: list[str]
    studies: dict[str, StudyResult]
    finals: list[FinalRecord]
    spec: Any | None = None
    #: Finals left out because their row holds finals of another trial (see ``one_trial_per_row``).
    set_aside: list[FinalRecord] = field(default_factory=list)

    def finals_of(self, optimizer: str, rank: int = 1) -> list[FinalRecord]:
        return [f for f in self.finals if f.optimizer == optimizer and f.rank == rank]

    def ranks(self, optimizer: str) -> list[int]:
        return sorted({f.rank for f in self.finals if f.optimizer == optimizer})


def _ordered(optimizers: Iterable[str], preferred: Sequence[str] = ()) -> list[str]:
    present = set(optimizers)
    first = [o for o in preferred if o in present]
    return first + [o for o in OPTIMIZERS if o in present and o not in first]


def load_sweep(
    run_dir: str | Path | None,
    storage: Any = None,
    *,
    name: str | None = None,
    spec: Any = None,
    storage_url: str | None = None,
) -> SweepResults:
    """Read one sweep: its spec (given or ``spec.yaml``), studies and finals.

    ``name`` defaults to the spec's; with neither, the storage must hold exactly one sweep.
    ``storage_url`` is how to show an already opened ``storage`` (it is masked).
    """
    spec = spec if spec is not None else load_spec(run_dir)
    opened, shown = open_results_storage(run_dir, storage)
    if storage_url is not None:
        shown = shown_storage(storage_url)
    if name is None:
        if spec is not None:
            name = spec.name
        elif opened is not None:
            names = sweep_names(opened)
            if len(names) != 1:
                found = ", ".join(names) or "none"
                raise UserError(
                    f"{run_dir}: no spec.yaml says which sweep this is, and the storage holds "
                    f"{len(names)} sweeps ({found})"
                )
            name = names[0]
        else:
            raise UserError(
                f"{run_dir}: no spec.yaml, optuna.journal or finals/ here; is this a sweep's run "
                "folder? (pass --storage URL if its studies live elsewhere)"
            )
    candidates = list(spec.optimizers) if spec is not None else list(OPTIMIZERS)
    studies: dict[str, StudyResult] = {}
    if opened is not None:
        for optimizer in candidates:
            result = load_study(opened, name, optimizer)
            if result is not None:
                studies[optimizer] = result
    finals = read_finals(run_dir) if run_dir is not None else []
    if spec is not None:
        finals = [f for f in finals if f.optimizer in spec.optimizers]
    finals, set_aside = one_trial_per_row(finals, studies)
    optimizers = _ordered(
        list(studies) + [f.optimizer for f in finals] + (list(spec.optimizers) if spec else []),
        spec.optimizers if spec is not None else (),
    )
    if not studies and not finals and spec is None:
        raise UserError(
            f"{run_dir}: no studies named {name}/<optimizer> and no finals/ found; nothing to show"
        )
    return SweepResults(
        name=name,
        run_dir=Path(run_dir) if run_dir is not None else None,
        storage_shown=shown,
        optimizers=optimizers,
        studies=studies,
        finals=finals,
        spec=spec,
        set_aside=set_aside,
    )


def one_trial_per_row(
    finals: Sequence[FinalRecord], studies: Mapping[str, StudyResult]
) -> tuple[list[FinalRecord], list[FinalRecord]]:
    """``(kept, set_aside)``: the finals of each optimizer and rank, all of one trial.

    A final stage stopped after tuning found a better trial leaves finals of two trials under
    one rank; pairing them would compare two configurations as if they were one. The trial kept
    is the study's current one at that rank when it has finals, else the trial with the most
    finals (the later trial on a tie). Each set-aside group is named in a warning.
    """
    groups: dict[tuple[str, int], dict[Any, list[FinalRecord]]] = {}
    for record in finals:
        groups.setdefault((record.optimizer, record.rank), {}).setdefault(record.trial, [])
        groups[(record.optimizer, record.rank)][record.trial].append(record)
    kept: list[FinalRecord] = []
    set_aside: list[FinalRecord] = []
    for (optimizer, rank), by_trial in groups.items():
        if len(by_trial) == 1:
            kept.extend(next(iter(by_trial.values())))
            continue
        study = studies.get(optimizer)
        ranked = study.ranked(rank) if study is not None else []
        current = ranked[rank - 1].number if len(ranked) >= rank else None
        if current not in by_trial:
            current = max(by_trial, key=lambda t: (len(by_trial[t]), -1 if t is None else t))
        for trial, records in by_trial.items():
            (kept if trial == current else set_aside).extend(records)
            if trial != current:
                seeds = ", ".join(str(r.seed) for r in records)
                warnings.warn(
                    f"{records[0].label}: set aside the final(s) of trial {trial} (seed "
                    f"{seeds}): rank {rank} holds finals of trial {current}; rerun the final "
                    "stage to replace them",
                    stacklevel=3,
                )
    order = {id(r): i for i, r in enumerate(finals)}
    return sorted(kept, key=lambda r: order[id(r)]), sorted(set_aside, key=lambda r: order[id(r)])


def mean_of(values: Iterable[Any]) -> float | None:
    """Mean of the finite numbers among ``values``; None when there are none."""
    nums = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return math.fsum(nums) / len(nums) if nums else None


def json_safe(value: Any) -> Any:
    """NaN/inf become None, so leaderboard.json stays valid JSON for every reader."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
