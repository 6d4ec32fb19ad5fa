"""Experiment tracking: one W&B run per training run, offline unless credentials say otherwise.

The sweep engine, the finals, the leaderboard and ``msam train`` attach :class:`WandbCallback` to
the trainer; workers warm W&B's service with :func:`start_service`; ``msam sync`` uploads offline
runs with :func:`sync_run`. Importing this package does not import wandb.
"""

from sweeps.tracking.wandb_runs import *  # noqa: F403 - the package is its module's __all__
from sweeps.tracking.wandb_runs import __all__ as __all__
