"""msam: sharpness-aware training (SAM and mSAM) for timm models.

The core is :func:`backward`, which writes the mSAM gradient (Behdin et al., 2023) into ``.grad``;
:class:`SAM` and :class:`MSAM` wrap any base optimizer around it. This package never imports optuna
or wandb: the sweep engine in ``sweeps`` plugs them in through the trainer's callbacks.
"""

from msam._backward import STRATEGIES, backward
from msam.errors import UserError
from msam.optim import MSAM, SAM

__version__ = "0.1.0"

__all__ = ["MSAM", "SAM", "STRATEGIES", "UserError", "__version__", "backward"]
