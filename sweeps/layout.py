"""The run folder of a sweep: every path in it is named here and nowhere else.

```
spec.yaml             the resolved spec as launched
storage.json          which storage holds the studies (kind, URL with its password masked)
.launcher.lock        held by the one `msam sweep` running on this folder (who: pid, host, since)
optuna.journal        the default storage
wandb/                W&B runs
logs/worker-<k>.log   output of the launcher's worker processes
trials/<opt>/<n>/     a trial's metrics.jsonl, summary.json, timing.json (error.txt if it raised;
                      checkpoint.pt while it runs)
finals/<opt>/seed<k>/ a final's final.json, metrics.jsonl, summary.json, wandb.json (<opt>-top<r>
                      for rank r)
finals/.stale/        finals of trials that are no longer the best, kept for inspection
leaderboard.md/.json, report.html, tuned/<name>-<opt>.yaml
```
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from msam.files import CHECKPOINT, ERROR, METRICS, SUMMARY

__all__ = [
    "CHECKPOINT",
    "ERROR",
    "FINAL_JOB",
    "JOURNAL_FILE",
    "METRICS",
    "SUMMARY",
    "TIMING",
    "WANDB_RUN",
    "RunFolder",
    "final_label",
    "parse_final_dir",
]

JOURNAL_FILE = "optuna.journal"
#: Written into a final's folder before it trains: which trial, seed and epochs it stands for.
FINAL_JOB = "final.json"
#: A final's W&B run: its id and whether it was finished (a rerun finishes one a kill left open).
WANDB_RUN = "wandb.json"
#: Where a finished trial's time went (train vs the sweep's own overhead).
TIMING = "timing.json"

_LABEL = re.compile(r"^(?P<opt>[a-z]+)(?:-top(?P<rank>\d+))?$")
_SEED = re.compile(r"^seed(?P<seed>\d+)$")


def final_label(optimizer: str, rank: int) -> str:
    """Folder of a final configuration: ``sam`` for the best, ``sam-top2`` for the runner-up."""
    return optimizer if rank == 1 else f"{optimizer}-top{rank}"


def parse_final_dir(label: str, seed_dir: str) -> tuple[str, int, int] | None:
    """``("sam-top2", "seed1")`` -> ``("sam", 2, 1)``; None for folders outside the layout."""
    label_match, seed_match = _LABEL.match(label), _SEED.match(seed_dir)
    if label_match is None or seed_match is None:
        return None
    return label_match["opt"], int(label_match["rank"] or 1), int(seed_match["seed"])


@dataclass(frozen=True)
class RunFolder:
    """A sweep's run folder (``--out``, default ``runs/<name>``)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def spec(self) -> Path:
        return self.root / "spec.yaml"

    @property
    def journal(self) -> Path:
        return self.root / JOURNAL_FILE

    @property
    def storage_record(self) -> Path:
        """Where the studies live, recorded at launch (``{"kind", "shown"}``, no password)."""
        return self.root / "storage.json"

    @property
    def launcher_lock(self) -> Path:
        return self.root / ".launcher.lock"

    @property
    def wandb(self) -> Path:
        """Where W&B writes its runs when given the run folder as its ``dir``."""
        return self.root / "wandb"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def worker_log(self, index: int) -> Path:
        return self.logs / f"worker-{index}.log"

    def trial(self, optimizer: str, number: int) -> Path:
        return self.root / "trials" / optimizer / str(number)

    @property
    def finals(self) -> Path:
        return self.root / "finals"

    @property
    def stale_finals(self) -> Path:
        return self.finals / ".stale"

    def final(self, optimizer: str, rank: int, seed: int) -> Path:
        """``finals/<opt>/seed<k>/`` (rank 1) or ``finals/<opt>-top<r>/seed<k>/`` (rank r)."""
        return self.finals / final_label(optimizer, rank) / f"seed{seed}"

    def final_dirs(self) -> Iterator[tuple[str, int, int, Path]]:
        """``(optimizer, rank, seed, folder)`` of every folder under ``finals/`` that follows
        the layout (``.stale`` and stray files are skipped), in name order."""
        if not self.finals.is_dir():
            return
        for label_dir in sorted(self.finals.iterdir()):
            if not label_dir.is_dir():
                continue
            for seed_dir in sorted(label_dir.iterdir()):
                parsed = parse_final_dir(label_dir.name, seed_dir.name)
                if parsed is not None and seed_dir.is_dir():
                    yield (*parsed, seed_dir)

    @property
    def leaderboard_md(self) -> Path:
        return self.root / "leaderboard.md"

    @property
    def leaderboard_json(self) -> Path:
        return self.root / "leaderboard.json"

    @property
    def report(self) -> Path:
        return self.root / "report.html"

    @property
    def tuned_dir(self) -> Path:
        return self.root / "tuned"

    def tuned(self, sweep: str, optimizer: str) -> Path:
        return self.tuned_dir / f"{sweep}-{optimizer}.yaml"
