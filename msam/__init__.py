"""msam: sharpness-aware training (SAM and mSAM) for timm models.

The core is :func:`backward`, which writes the mSAM gradient (Behdin et al., 2023) into ``.grad``;
:class:`SAM` and :class:`MSAM` wrap any base optimizer around it. This package never imports optuna
or wandb: the sweep engine in ``sweeps`` plugs them in through the trainer's callbacks.

The names below load torch on first use (PEP 562), so ``msam.config`` and ``msam.errors`` answer
a bad config in a fraction of a second instead of after torch's import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from msam._lazy import lazy_exports
from msam.errors import UserError

if TYPE_CHECKING:
    from msam._backward import STRATEGIES, backward
    from msam.optim import MSAM, SAM

__version__ = "0.1.0"

__all__ = ["MSAM", "SAM", "STRATEGIES", "UserError", "__version__", "backward"]

_LAZY = {
    "backward": "msam._backward",
    "STRATEGIES": "msam._backward",
    "MSAM": "msam.optim",
    "SAM": "msam.optim",
}


__getattr__, __dir__ = lazy_exports(globals(), _LAZY)
