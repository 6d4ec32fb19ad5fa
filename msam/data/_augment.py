"""Batched, on-device augmentation of uint8 images (the cifar10-airbench recipe: crop + flip).

Everything is tensor ops on the whole batch, so the cost is a few kernel launches per batch, not
python work per sample.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def crop_and_flip(
    images: torch.Tensor,
    dy: torch.Tensor | None,
    dx: torch.Tensor | None,
    flip: torch.Tensor | None,
    pad: int,
) -> torch.Tensor:
    """Mirror the samples where ``flip``, then crop each to its window of the zero-padded image.

    ``images`` is [B, C, H, W]; ``dy``/``dx`` are int64 [B] offsets in [0, 2 * pad] into the
    padded image (``pad`` leaves a sample in place); ``flip`` is bool [B]. Pass None (or pad=0)
    to skip a step. Output has the shape and dtype of ``images``.
    """
    if flip is not None:
        images = torch.where(flip.view(-1, 1, 1, 1), images.flip(3), images)
    if pad <= 0 or dy is None or dx is None:
        return images
    b, c, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad))
    rows = dy.view(b, 1) + torch.arange(h, device=images.device)
    cols = dx.view(b, 1) + torch.arange(w, device=images.device)
    out = padded.gather(2, rows.view(b, 1, h, 1).expand(b, c, h, w + 2 * pad))
    return out.gather(3, cols.view(b, 1, 1, w).expand(b, c, h, w))
