"""The mSAM gradient from the paper's definition (Behdin et al., 2023), written plainly with
``torch.func.functional_call`` and independent of ``msam``: what every strategy is checked
against."""

from __future__ import annotations

import torch
from torch.func import functional_call
from torch.nn.functional import cross_entropy


def reference_msam(model, x, y, *, rho, m, adaptive):
    """The mSAM gradient and the BN statistics it must leave, from the paper's definition."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    w = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    total = [torch.zeros_like(t) for t in w]
    for xj, yj in zip(x.chunk(m), y.chunk(m), strict=True):
        wj = [t.clone().requires_grad_() for t in w]
        out = functional_call(model, {**dict(zip(names, wj, strict=True)), **buffers}, (xj,))
        g = torch.autograd.grad(cross_entropy(out, yj), wj)
        if adaptive:
            norm = torch.sqrt(sum(((t.abs() * gi) ** 2).sum() for t, gi in zip(w, g, strict=True)))
            eps = [
                rho * t * t * gi / norm if rho else torch.zeros_like(t)
                for t, gi in zip(w, g, strict=True)
            ]
        else:
            norm = torch.sqrt(sum((gi**2).sum() for gi in g))
            eps = [rho * gi / norm if rho else torch.zeros_like(gi) for gi in g]
        wp = [(t + e).requires_grad_() for t, e in zip(w, eps, strict=True)]
        scratch = {n: b.clone() for n, b in buffers.items()}  # perturbed pass: stats discarded
        out = functional_call(model, {**dict(zip(names, wp, strict=True)), **scratch}, (xj,))
        h = torch.autograd.grad(cross_entropy(out, yj), wp)
        total = [t + hi / m for t, hi in zip(total, h, strict=True)]
    return total, buffers
