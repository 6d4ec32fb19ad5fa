"""Experiment tracking: one W&B run per training run, offline unless credentials say otherwise.

The sweep engine, the finals, the leaderboard and ``msam train`` attach :class:`WandbCallback` to
the trainer; workers warm W&B's service with :func:`start_service`; ``msam sync`` uploads offline
runs with :func:`sync_run`. Importing this package does not import wandb.
"""

from sweeps.tracking.wandb_runs import (
    HISTORY_KEYS,
    WandbCallback,
    find_offline_runs,
    has_credentials,
    resolve_mode,
    start_service,
    sync_run,
)

__all__ = [
    "HISTORY_KEYS",
    "WandbCallback",
    "find_offline_runs",
    "has_credentials",
    "resolve_mode",
    "start_service",
    "sync_run",
]
