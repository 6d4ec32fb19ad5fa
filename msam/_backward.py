"""The sharpness-aware gradient: SAM (Foret et al., 2021) and mSAM (Behdin et al., 2023).

mSAM, "mSAM: Micro-Batch-Averaged Sharpness-Aware Minimization" (arXiv:2302.09693): split a
mini-batch of size B into m equal micro-batches; for each micro-batch j take its own ascent
step ``eps_j = rho * g_j / ||g_j||`` (``g_j`` the gradient of micro-batch j's mean loss, the
norm over all parameters together), take the gradient of micro-batch j's loss at
``w + eps_j`` and average those m gradients. m = 1 is SAM; rho = 0 is the plain (micro-batch
averaged) gradient. ``adaptive=True`` is
ASAM's scaling (Kwon et al., 2021): ``eps_j = rho * |w|^2 g_j / || |w| g_j ||``.

The plain loop below is the reference strategy. Faster strategies register themselves in
``STRATEGIES`` and must produce the same gradient, restore parameters bitwise and leave BatchNorm
running statistics exactly as the loop does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn

LossFn = Callable[[Tensor, Tensor], Tensor]
#: Called with (detached outputs, targets) of each unperturbed micro-batch pass, in order.
OutputsHook = Callable[[Tensor, Tensor], None]

#: Added to the gradient norm so a zero gradient gives a zero (not NaN) perturbation.
NORM_EPS = 1e-12


def _check_args(inputs: Tensor, rho: float, micro_batches: int) -> None:
    if not isinstance(micro_batches, int) or micro_batches < 1:
        raise ValueError(f"micro_batches must be an integer >= 1, got {micro_batches!r}")
    if rho < 0:
        raise ValueError(f"rho must be >= 0, got {rho}")
    batch = inputs.shape[0]
    if batch % micro_batches != 0:
        raise ValueError(
            f"batch size {batch} is not divisible by micro_batches={micro_batches}: "
            "mSAM needs equal micro-batches"
        )


def trainable_parameters(model: nn.Module) -> list[Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def perturbation(
    params: Sequence[Tensor], grads: Sequence[Tensor], rho: float, adaptive: bool
) -> tuple[list[Tensor], Tensor]:
    """The ascent step ``eps`` for ``grads`` and the norm it was scaled by.

    The norm is taken over all parameters together, in float32 or wider, so that bf16/fp16
    gradients do not overflow when squared.
    """
    if adaptive:
        scaled = torch._foreach_mul(grads, [p.detach().abs() for p in params])
    else:
        scaled = list(grads)
    norms = torch._foreach_norm(scaled)
    wide = torch.promote_types(norms[0].dtype, torch.float32)
    norm = torch.linalg.vector_norm(torch.stack([n.to(wide) for n in norms]))
    # A non-finite norm (fp16 overflow) gives no perturbation; the caller flags the step instead.
    # torch.where keeps this free of host synchronisation.
    scale = torch.where(torch.isfinite(norm), rho / (norm + NORM_EPS), torch.zeros_like(norm))
    if adaptive:
        eps = torch._foreach_mul(scaled, [p.detach().abs() for p in params])
    else:
        eps = list(grads)
    eps = torch._foreach_mul(eps, scale.to(eps[0].dtype) if eps else scale)
    return eps, norm


@contextmanager
def _frozen_buffers(model: nn.Module) -> Iterator[None]:
    """Run a forward pass that must not change any buffer (BatchNorm running statistics).

    The perturbed pass runs in train mode (batch statistics, as SAM prescribes) but its running
    statistics update and ``num_batches_tracked`` increment are undone by copying the buffers back,
    which is exact, unlike setting momentum to 0 (0 * NaN would still poison the statistics).
    """
    buffers = [b for b in model.buffers() if b is not None]
    if not buffers:
        yield
        return
    saved = [b.detach().clone() for b in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, s in zip(buffers, saved, strict=True):
                b.copy_(s)


def _no_sync(model: nn.Module, skip: bool):
    """DDP's ``no_sync`` for every backward but the last: the final gradient is all-reduced once."""
    if skip and hasattr(model, "no_sync"):
        return model.no_sync()
    return nullcontext()


def _scale(loss: Tensor, scaler: Any | None) -> Tensor:
    return scaler.scale(loss) if scaler is not None else loss


def _loop(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Tensor,
    targets: Tensor,
    *,
    rho: float,
    micro_batches: int,
    adaptive: bool,
    scaler: Any | None,
    on_outputs: OutputsHook | None = None,
) -> Tensor:
    """Reference strategy: one unperturbed and one perturbed pass per micro-batch, in order."""
    params = trainable_parameters(model)
    for p in params:
        p.grad = None
    xs = inputs.chunk(micro_batches)
    ys = targets.chunk(micro_batches)
    losses: list[Tensor] = []
    last = micro_batches - 1

    if rho == 0:
        # Plain gradient accumulation: the mean of the m micro-batch gradients.
        for j, (x, y) in enumerate(zip(xs, ys, strict=True)):
            with _no_sync(model, j < last):
                out = model(x)
                loss = loss_fn(out, y)
                _scale(loss / micro_batches, scaler).backward()
            losses.append(loss.detach())
            if on_outputs is not None:
                on_outputs(out.detach(), y)
        return torch.stack(losses).float().mean()

    originals = [p.detach().clone() for p in params]
    nonfinite = torch.zeros((), dtype=torch.bool, device=inputs.device)
    inv_scale = 1.0 / float(scaler.get_scale()) if scaler is not None else 1.0
    for j, (x, y) in enumerate(zip(xs, ys, strict=True)):
        # 1) Unperturbed pass: updates BatchNorm statistics, gives g_j. It never all-reduces.
        with _no_sync(model, True):
            out = model(x)
            loss = loss_fn(out, y)
            grads = torch.autograd.grad(_scale(loss, scaler), params, allow_unused=True)
        losses.append(loss.detach())
        if on_outputs is not None:
            on_outputs(out.detach(), y)
        del out
        grads = [
            torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)
        ]
        if inv_scale != 1.0:
            grads = torch._foreach_mul(grads, inv_scale)  # norms on unscaled gradients
        eps, norm = perturbation(params, grads, rho, adaptive)
        del grads
        nonfinite = nonfinite | ~torch.isfinite(norm)
        with torch.no_grad():
            torch._foreach_add_(params, eps)
        del eps
        # 2) Perturbed pass at w + eps_j: accumulates (1/m) * grad into p.grad; BN frozen.
        with _no_sync(model, j < last), _frozen_buffers(model):
            loss_p = loss_fn(model(x), y)
            _scale(loss_p / micro_batches, scaler).backward()
        with torch.no_grad():
            torch._foreach_copy_(params, originals)
    if params and params[0].grad is not None:
        # A non-finite first-pass gradient makes the result non-finite, so that a GradScaler
        # skips the step (and lowers its scale) instead of stepping with a half-SAM gradient.
        g = params[0].grad
        g.add_(torch.where(nonfinite, torch.full_like(g, float("nan")), torch.zeros_like(g)))
    return torch.stack(losses).float().mean()


#: name -> implementation with the signature of ``_loop``. ``auto`` picks among exact ones.
STRATEGIES: dict[str, Callable[..., Tensor]] = {"loop": _loop}


def choose_strategy(model: nn.Module, inputs: Tensor, micro_batches: int) -> str:
    """The strategy ``auto`` uses: the fastest one that is exact for this model and input."""
    return "loop"


def backward(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Tensor,
    targets: Tensor,
    *,
    rho: float,
    micro_batches: int = 1,
    adaptive: bool = False,
    strategy: str = "auto",
    scaler: Any | None = None,
    on_outputs: OutputsHook | None = None,
) -> Tensor:
    """Write the (m)SAM gradient into ``p.grad`` of every trainable parameter of ``model``.

    Replaces whatever ``p.grad`` held. Returns the mean unperturbed loss over the micro-batches, a
    detached scalar. Parameters are restored bitwise; buffers (BatchNorm running statistics) change
    only through the unperturbed passes, in micro-batch order. With a ``GradScaler`` the gradients
    are left scaled, ready for ``scaler.step(optimizer)``, and a non-finite gradient makes that step
    skip. Under DistributedDataParallel each rank perturbs with its own micro-batches and the final
    gradient is all-reduced once. Call it inside ``torch.autocast`` for mixed precision.
    ``on_outputs(outputs, targets)`` sees each unperturbed pass's detached outputs (for training
    accuracy without another forward pass).
    """
    _check_args(inputs, rho, micro_batches)
    if strategy == "auto":
        strategy = choose_strategy(model, inputs, micro_batches)
    try:
        impl = STRATEGIES[strategy]
    except KeyError:
        raise ValueError(
            f"unknown strategy {strategy!r}; known: auto, {', '.join(sorted(STRATEGIES))}"
        ) from None
    return impl(
        model,
        loss_fn,
        inputs,
        targets,
        rho=rho,
        micro_batches=micro_batches,
        adaptive=adaptive,
        scaler=scaler,
        on_outputs=on_outputs,
    )
