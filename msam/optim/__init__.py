"""Sharpness-aware optimizers: the two-step SAM wrapper and the whole-update mSAM wrapper, and
the cost of an update in gradient evaluations (:func:`grad_evals_per_update`).

The optimizers load torch on first use (PEP 562), so that ``grad_evals_per_update`` answers a
sweep spec or a leaderboard without importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from msam._lazy import lazy_exports
from msam.optim._cost import grad_evals_per_update

if TYPE_CHECKING:
    from msam.optim._msam import MSAM
    from msam.optim._sam import SAM

__all__ = ["MSAM", "SAM", "grad_evals_per_update"]

_LAZY = {"MSAM": "msam.optim._msam", "SAM": "msam.optim._sam"}


__getattr__, __dir__ = lazy_exports(globals(), _LAZY)
