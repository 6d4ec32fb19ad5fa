"""Sharpness-aware optimizers: the two-step SAM wrapper and the whole-update mSAM wrapper, and
the cost of an update in gradient evaluations (:func:`grad_evals_per_update`).

The optimizers load torch on first use (PEP 562), so that ``grad_evals_per_update`` answers a
sweep spec or a leaderboard without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from msam.optim._cost import grad_evals_per_update

if TYPE_CHECKING:
    from msam.optim._msam import MSAM
    from msam.optim._sam import SAM

__all__ = ["MSAM", "SAM", "grad_evals_per_update"]

_LAZY = {"MSAM": "msam.optim._msam", "SAM": "msam.optim._sam"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'msam.optim' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
