"""What the torn-tail check costs each time a sweep opens its journal: ``repair_journal`` against
opening the same journal and reading every trial, interleaved, on a journal of N finished trials.

    python benchmarks/journal_repair.py --trials 2000 --repeats 15

Writes ``benchmarks/results/journal-repair-<date>.json``. Needs optuna (the sweep engine's).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import optuna
from optuna.distributions import FloatDistribution
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from sweeps.storage import repair_journal

RESULTS = Path(__file__).resolve().parent / "results"


def make_journal(path: Path, trials: int) -> None:
    """A journal of finished trials written in one go (fsync off: the setup is not measured)."""
    fsync, os.fsync = os.fsync, lambda fd: None
    try:
        study = optuna.create_study(
            study_name="bench", storage=JournalStorage(JournalFileBackend(str(path)))
        )
        rng = random.Random(0)
        study.add_trials(
            [
                optuna.trial.create_trial(
                    params={"lr": rng.uniform(0.01, 1.0)},
                    distributions={"lr": FloatDistribution(0.01, 1.0)},
                    value=rng.random(),
                    intermediate_values={1: 0.1, 2: 0.2},
                    user_attrs={"seconds": {"train": 1.0, "overhead": 0.05}},
                )
                for _ in range(trials)
            ]
        )
    finally:
        os.fsync = fsync


def summary(seconds: list[float]) -> dict[str, float]:
    ms = [s * 1e3 for s in seconds]
    return {"median_ms": statistics.median(ms), "min_ms": min(ms), "max_ms": max(ms)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "optuna.journal"
        make_journal(path, args.trials)
        repair, read = [], []
        for _ in range(args.repeats):  # interleaved, so machine noise hits both alike
            t0 = time.perf_counter()
            repair_journal(path)
            repair.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            storage = JournalStorage(JournalFileBackend(str(path)))
            optuna.load_study(study_name="bench", storage=storage).get_trials(deepcopy=False)
            read.append(time.perf_counter() - t0)
        size = path.stat().st_size
    result = {
        "what": "repair_journal vs opening the journal and reading all trials",
        "trials": args.trials,
        "journal_bytes": size,
        "repeats": args.repeats,
        "repair": summary(repair),
        "open_and_read": summary(read),
        "ratio_repair_to_open": statistics.median(repair) / statistics.median(read),
        "machine": {
            "cpu": platform.machine(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
        },
        "versions": {"optuna": optuna.__version__},
        "date": date.today().isoformat(),
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"journal-repair-{result['date']}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
