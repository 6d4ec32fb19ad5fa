"""Sharpness-aware optimizers: the two-step SAM wrapper and the whole-update mSAM wrapper."""

from msam.optim._msam import MSAM
from msam.optim._sam import SAM

__all__ = ["MSAM", "SAM"]
