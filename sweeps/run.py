"""A typed, frozen description of one ``msam sweep`` / ``msam worker`` invocation.

The command line builds it once; the engine's stages take it and return typed results. Nothing
below the CLI sees argv or an argparse Namespace.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sweeps.layout import RunFolder
from sweeps.spec import SweepSpec
from sweeps.storage import StorageRef, resolve_storage

__all__ = ["STAGES", "Slot", "Stage", "SweepRun", "plan_slots"]

Stage = Literal["all", "tune", "final"]
#: ``--stage`` values: everything, tuning only, or finals and leaderboard only.
STAGES: tuple[Stage, ...] = ("all", "tune", "final")


@dataclass(frozen=True)
class Slot:
    """Where one worker process runs: its index (seed offset) and GPU (None: the CPU)."""

    index: int
    gpu: int | None = None


def plan_slots(
    workers: int | None = None, gpus: tuple[int, ...] | None = None, per_gpu: int | None = None
) -> tuple[Slot, ...]:
    """``--workers N`` -> N CPU slots; ``--gpus 0,1 --per-gpu K`` -> K slots on each GPU."""
    if gpus:
        per = per_gpu or 1
        return tuple(Slot(i, gpu) for i, gpu in enumerate(g for g in gpus for _ in range(per)))
    return tuple(Slot(i) for i in range(workers or 1))


@dataclass(frozen=True)
class SweepRun:
    """One sweep as launched: the spec, its run folder, its storage and how to run it."""

    spec: SweepSpec
    folder: RunFolder
    storage: StorageRef
    slots: tuple[Slot, ...] = (Slot(0),)
    stage: Stage = "all"
    #: ``msam worker`` only: the seed offset of its sampler (None: derived from host and pid).
    worker_index: int | None = None

    @classmethod
    def create(
        cls,
        spec: SweepSpec,
        out: str | Path | None = None,
        storage: str | None = None,
        *,
        slots: tuple[Slot, ...] | None = None,
        stage: Stage = "all",
        worker_index: int | None = None,
    ) -> SweepRun:
        """The defaults of the command line: ``runs/<name>`` and its ``optuna.journal``."""
        folder = RunFolder(Path(out) if out else Path("runs") / spec.name)
        return cls(
            spec=spec,
            folder=folder,
            storage=resolve_storage(storage, folder.root),
            slots=slots or (Slot(0),),
            stage=stage,
            worker_index=worker_index,
        )

    @property
    def out(self) -> Path:
        return self.folder.root

    @property
    def in_process(self) -> bool:
        """One CPU worker: tuning runs in this process, with no worker processes to start."""
        return len(self.slots) == 1 and self.slots[0].gpu is None
