"""Pieces every mSAM strategy shares (Behdin et al., 2023, "mSAM: Micro-Batch-Averaged
Sharpness-Aware Minimization", arXiv:2302.09693): the ascent step, frozen buffers for perturbed
passes, DDP's ``no_sync`` and loss scaling.

A leaf module (it imports nothing from msam), so that strategies and the registry in
``msam._backward`` can both import it without a cycle.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

LossFn = Callable[[Tensor, Tensor], Tensor]
#: Called with (detached outputs, targets) of each unperturbed micro-batch pass, in order.
OutputsHook = Callable[[Tensor, Tensor], None]

#: Added to the gradient norm so a zero gradient gives a zero (not NaN) perturbation.
NORM_EPS = 1e-12


class NotApplicable(Exception):
    """A strategy cannot compute this model's gradient exactly; the message says why.

    ``remember``: the reason lies in the model, so ``auto`` should not try the fused strategies
    on it again (False for reasons of the call: a device, a GradScaler).
    """

    def __init__(self, reason: str, *, remember: bool = True) -> None:
        super().__init__(reason)
        self.remember = remember


def capturing() -> bool:
    """True inside a CUDA graph capture: strategies skip host queries that a capture forbids."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def trainable_parameters(model: nn.Module) -> list[Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def ascent_scale(norm: Tensor, rho: float) -> Tensor:
    """``rho / ||g||``, or 0 where the norm is not finite (the caller flags that step instead).

    ``torch.where`` keeps this free of host synchronisation.
    """
    return torch.where(torch.isfinite(norm), rho / (norm + NORM_EPS), torch.zeros_like(norm))


class AscentGroup(NamedTuple):
    """Parameters that share a radius and a scaling, as in one of an optimizer's param groups."""

    params: Sequence[Tensor]
    grads: Sequence[Tensor]
    rho: float
    adaptive: bool


def group_perturbations(groups: Sequence[AscentGroup]) -> tuple[list[list[Tensor]], Tensor]:
    """The ascent step ``eps`` of every group and the one norm they were all scaled by.

    The norm is taken over all parameters of all groups together (as in the paper), in float32
    or wider, so that bf16/fp16 gradients do not overflow when squared; ASAM groups contribute
    ``|w| g``. A non-finite norm gives a scale of 0 (:func:`ascent_scale`).
    """
    scaled = [
        torch._foreach_mul(g.grads, [p.detach().abs() for p in g.params])
        if g.adaptive
        else list(g.grads)
        for g in groups
    ]
    norms = torch._foreach_norm([s for group in scaled for s in group])
    wide = torch.promote_types(norms[0].dtype, torch.float32)
    norm = torch.linalg.vector_norm(torch.stack([n.to(wide) for n in norms]))
    steps = []
    for group, s in zip(groups, scaled, strict=True):
        scale = ascent_scale(norm, group.rho)
        if group.adaptive:
            eps = torch._foreach_mul(s, [p.detach().abs() for p in group.params])
        else:
            eps = list(group.grads)
        steps.append(torch._foreach_mul(eps, scale.to(eps[0].dtype) if eps else scale))
    return steps, norm


def perturbation(
    params: Sequence[Tensor], grads: Sequence[Tensor], rho: float, adaptive: bool
) -> tuple[list[Tensor], Tensor]:
    """The ascent step ``eps`` for ``grads`` and the norm it was scaled by (one group)."""
    steps, norm = group_perturbations([AscentGroup(params, grads, rho, adaptive)])
    return steps[0], norm


def zero_unless_finite(steps: Sequence[Tensor], norm: Tensor) -> list[Tensor]:
    """``steps``, or exact zeros for all of them when ``norm`` is not finite.

    A scale of 0 still leaves NaN where a gradient entry is inf or NaN (0 * inf). Callers that
    hand the perturbed weights to someone else (``msam.SAM.first_step``) need a zero step there;
    ``msam.backward`` restores the weights itself and flags the gradient instead, and so skips
    this one kernel per tensor. ``torch.where`` keeps it free of host synchronisation.
    """
    finite = torch.isfinite(norm)
    return [
        torch.where(finite.to(s.device), s, torch.zeros((), dtype=s.dtype, device=s.device))
        for s in steps
    ]


def clone_all(tensors: Sequence[Tensor]) -> list[Tensor]:
    """Bitwise copies of ``tensors`` in one multi-tensor launch rather than one per tensor (a
    GPU step of a small model is launch-bound)."""
    copies = [torch.empty_like(t) for t in tensors]
    if copies:
        with torch.no_grad():
            torch._foreach_copy_(copies, [t.detach() for t in tensors])
    return copies


def copy_all(targets: Sequence[Tensor], sources: Sequence[Tensor]) -> None:
    """``targets[i].copy_(sources[i])`` for all i, in one multi-tensor launch."""
    if targets:
        with torch.no_grad():
            torch._foreach_copy_(list(targets), list(sources))


@contextmanager
def frozen_buffers(model: nn.Module) -> Iterator[None]:
    """Run a forward pass that must not change any buffer (BatchNorm running statistics).

    The perturbed pass runs in train mode (batch statistics, as SAM prescribes) but its running
    statistics update and ``num_batches_tracked`` increment are undone by copying the buffers back,
    which is exact, unlike setting momentum to 0 (0 * NaN would still poison the statistics).
    """
    buffers = [b for b in model.buffers() if b is not None]
    if not buffers:
        yield
        return
    saved = clone_all(buffers)
    try:
        yield
    finally:
        copy_all(buffers, saved)


def no_sync(model: nn.Module, skip: bool):
    """DDP's ``no_sync`` for every backward but the last: the final gradient is all-reduced once."""
    if skip and hasattr(model, "no_sync"):
        return model.no_sync()
    return nullcontext()


def weights_changed() -> None:
    """Call after writing parameters in place inside an autocast region.

    Autocast caches the low-precision copy of each leaf parameter until the region ends; without
    this, the perturbed pass would reuse the bf16/fp16 copy of the *unperturbed* weights and the
    SAM gradient would silently equal the plain one.
    """
    torch.clear_autocast_cache()


def scale_loss(loss: Tensor, scaler: Any | None) -> Tensor:
    return scaler.scale(loss) if scaler is not None else loss


def inverse_scale(scaler: Any | None) -> float:
    """1 / the GradScaler's scale (one host read per update), or 1 without a scaler."""
    return 1.0 / float(scaler.get_scale()) if scaler is not None else 1.0


def flag_nonfinite(params: Sequence[Tensor], nonfinite: Tensor) -> None:
    """Make the result non-finite when a first-pass gradient was, so a GradScaler skips the step
    (and lowers its scale) instead of stepping with a half-SAM gradient."""
    if params and params[0].grad is not None:
        g = params[0].grad
        g.add_(torch.where(nonfinite, torch.full_like(g, float("nan")), torch.zeros_like(g)))
