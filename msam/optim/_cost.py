"""What an update costs, in the unit equal budgets are matched in: gradient evaluations, i.e.
forward-backward passes over the whole mini-batch.

SAM (Foret et al., 2021, arXiv:2010.01412) takes one pass at ``w`` and one at ``w + eps``; mSAM
(Behdin et al., 2023, arXiv:2302.09693) does the same per micro-batch, m passes of B/m images
each, so it costs what SAM costs. rho = 0 leaves the plain gradient: one pass. Imports nothing
heavy, so that sweep specs and leaderboards can ask without loading torch.
"""

from __future__ import annotations

__all__ = ["grad_evals_per_update"]

_SHARPNESS_AWARE = ("sam", "msam")


def grad_evals_per_update(optimizer: str, rho: float) -> int:
    """Whole-mini-batch forward-backward passes per update: SGD (or rho = 0) 1, SAM and mSAM 2."""
    if optimizer != "sgd" and optimizer not in _SHARPNESS_AWARE:
        raise ValueError(f"unknown optimizer {optimizer!r}; expected sgd, sam or msam")
    return 1 if optimizer == "sgd" or rho == 0 else 2
