"""What a sweep left behind, read back: its Optuna studies and its final runs.

The leaderboard, the HTML report and the tuned-default export all start from the same picture of
a run folder (``spec.yaml``, ``finals/<opt>[-top<r>]/seed<k>/``) and of its studies (named
``<name>/<optimizer>`` in the sweep's storage). This module builds that picture once; nothing here
writes. Storage URLs only ever leave this module with their password masked.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from msam.config import OPTIMIZERS
from msam.errors import UserError

__all__ = [
    "FINALS_DIR",
    "FINAL_JOB",
    "SPEC_FILE",
    "TUNED_DIR",
    "FinalRecord",
    "StudyResult",
    "SweepResults",
    "final_dir",
    "final_label",
    "json_safe",
    "load_spec",
    "load_study",
    "load_sweep",
    "mean_of",
    "open_results_storage",
    "package_versions",
    "ranked_trials",
    "read_finals",
    "read_json",
    "shown_storage",
    "split_study_name",
    "study_name",
    "sweep_names",
]

SPEC_FILE = "spec.yaml"
FINALS_DIR = "finals"
TUNED_DIR = "tuned"
#: Written into a final's folder before it trains: which trial, seed and epochs it stands for.
FINAL_JOB = "final.json"
SUMMARY = "summary.json"
METRICS = "metrics.jsonl"

_LABEL = re.compile(r"^(?P<opt>[a-z]+)(?:-top(?P<rank>\d+))?$")
_SEED = re.compile(r"^seed(?P<seed>\d+)$")


# ----------------------------------------------------------------------------- names and places


def study_name(sweep: str, optimizer: str) -> str:
    """The design's contract: one study per optimizer, ``<name>/<optimizer>``."""
    return f"{sweep}/{optimizer}"


def split_study_name(name: str) -> tuple[str, str] | None:
    """``"fmnist/sam"`` -> ``("fmnist", "sam")``; None for studies that are not ours."""
    sweep, sep, optimizer = name.rpartition("/")
    if not sep or not sweep or optimizer not in OPTIMIZERS:
        return None
    return sweep, optimizer


def final_label(optimizer: str, rank: int) -> str:
    """Folder of a final configuration: ``sam`` for the best, ``sam-top2`` for the runner-up."""
    return optimizer if rank == 1 else f"{optimizer}-top{rank}"


def final_dir(run_dir: str | Path, optimizer: str, rank: int, seed: int) -> Path:
    """``finals/<opt>/seed<k>/`` (rank 1) or ``finals/<opt>-top<r>/seed<k>/`` (rank r > 1)."""
    return Path(run_dir) / FINALS_DIR / final_label(optimizer, rank) / f"seed{seed}"


def shown_storage(url: str | None) -> str | None:
    """A storage as it may appear in files and logs: password masked."""
    if url is None:
        return None
    from sweeps.storage import mask_url

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
    from sweeps.storage import JOURNAL_FILE, open_storage, resolve_storage

    if storage is not None and not isinstance(storage, (str, Path)):
        return storage, None
    if storage is None:
        if run_dir is None or not (Path(run_dir) / JOURNAL_FILE).is_file():
            return None, None
        ref = resolve_storage(None, Path(run_dir))
        return open_storage(ref), JOURNAL_FILE
    ref = resolve_storage(str(storage), Path(run_dir or "."))
    if ref.kind == "journal" and not Path(ref.arg).is_file():
        raise UserError(f"--storage {ref.shown}: no such journal file")
    return open_storage(ref), ref.shown


def sweep_names(storage: Any) -> list[str]:
    """Names of every sweep with at least one ``<name>/<optimizer>`` study in ``storage``."""
    import optuna

    names = {
        parts[0]
        for name in optuna.study.get_all_study_names(storage)
        if (parts := split_study_name(name)) is not None
    }
    return sorted(names)


def _trial_sort_key(trial: Any, maximize: bool) -> tuple[float, int]:
    return (-trial.value if maximize else trial.value, trial.number)


def ranked_trials(trials: Iterable[Any], *, maximize: bool = True, k: int | None = None) -> list:
    """COMPLETE trials with a finite value, best first (ties: the earlier trial), one per
    distinct configuration: a sampler proposing a point twice must not fill two final slots."""
    import optuna

    complete = [
        t
        for t in trials
        if t.state == optuna.trial.TrialState.COMPLETE
        and t.value is not None
        and math.isfinite(t.value)
    ]
    complete.sort(key=lambda t: _trial_sort_key(t, maximize))
    seen: set[tuple] = set()
    out = []
    for trial in complete:
        key = tuple(sorted((name, repr(value)) for name, value in trial.params.items()))
        if key in seen:
            continue
        seen.add(key)
        out.append(trial)
        if k is not None and len(out) >= k:
            break
    return out


@dataclass
class StudyResult:
    """One optimizer's study: every trial, read once (``deepcopy=False``: 2,000 trials are fast)."""

    optimizer: str
    name: str
    study: Any
    trials: list[Any]
    maximize: bool = True

    def counts(self) -> dict[str, int]:
        """Trials per state, the ones a leaderboard shows: complete, pruned, failed, running."""
        out = {"complete": 0, "pruned": 0, "failed": 0, "running": 0}
        for trial in self.trials:
            state = trial.state.name.lower()
            key = {"fail": "failed", "waiting": "running"}.get(state, state)
            if key in out:
                out[key] += 1
        return out

    def complete(self) -> list[Any]:
        """COMPLETE trials with a finite value, in trial order (for plots)."""
        import optuna

        return [
            t
            for t in self.trials
            if t.state == optuna.trial.TrialState.COMPLETE
            and t.value is not None
            and math.isfinite(t.value)
        ]

    def ranked(self, k: int | None = None) -> list[Any]:
        return ranked_trials(self.trials, maximize=self.maximize, k=k)

    def best(self) -> Any | None:
        ranked = self.ranked(1)
        return ranked[0] if ranked else None


def load_study(storage: Any, sweep: str, optimizer: str) -> StudyResult | None:
    """The study of one optimizer, or None when the storage has none by that name."""
    import optuna

    name = study_name(sweep, optimizer)
    try:
        study = optuna.load_study(
            study_name=name, storage=storage, sampler=optuna.samplers.RandomSampler()
        )
    except KeyError:
        return None
    maximize = study.direction != optuna.study.StudyDirection.MINIMIZE
    return StudyResult(optimizer, name, study, study.get_trials(deepcopy=False), maximize)


# ----------------------------------------------------------------------------- finals on disk


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object, or None when missing or unreadable (a run killed mid-write)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


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
    root = Path(run_dir) / FINALS_DIR
    records = []
    if not root.is_dir():
        return records
    for label_dir in sorted(root.iterdir()):
        match = _LABEL.match(label_dir.name)
        if not label_dir.is_dir() or match is None or match["opt"] not in OPTIMIZERS:
            continue
        rank = int(match["rank"] or 1)
        for seed_dir in sorted(label_dir.iterdir()):
            seed_match = _SEED.match(seed_dir.name)
            if seed_match is None:
                continue
            summary = read_json(seed_dir / SUMMARY)
            if summary is None:
                continue
            job = read_json(seed_dir / FINAL_JOB) or summary.get("final") or {}
            records.append(
                FinalRecord(match["opt"], rank, int(seed_match["seed"]), seed_dir, summary, job)
            )
    order = {name: i for i, name in enumerate(OPTIMIZERS)}
    records.sort(key=lambda r: (order[r.optimizer], r.rank, r.seed))
    return records


# ----------------------------------------------------------------------------- the whole picture


def load_spec(run_dir: str | Path | None) -> Any | None:
    """The resolved spec the sweep was launched with, or None if the folder has none."""
    if run_dir is None:
        return None
    path = Path(run_dir) / SPEC_FILE
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
    )


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
