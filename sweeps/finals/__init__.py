"""The final stage: the best tuned configurations re-run over paired seeds, scored once on test.

Tuning picks hyperparameters on a validation split; the final stage measures how good they are
(``plan``: which finals; ``run``: training, resuming and recording them; ``flatness``: the
curvature of every final model).
"""

from sweeps.finals.flatness import (
    FlatnessSettings,
    flatness_rho,
    flatness_sample,
    measure_flatness,
)
from sweeps.finals.plan import FinalJob, plan_finals
from sweeps.finals.run import FinalsResult, run_final, run_finals

__all__ = [
    "FinalJob",
    "FinalsResult",
    "FlatnessSettings",
    "flatness_rho",
    "flatness_sample",
    "measure_flatness",
    "plan_finals",
    "run_final",
    "run_finals",
]
