"""The sweep engine: studies, search space, workers and their processes, one trial's life, stop
signals, the live view, and the stages of one sweep (``sweep``)."""

from sweeps.engine.sweep import run_sweep, run_worker

__all__ = ["run_sweep", "run_worker"]
