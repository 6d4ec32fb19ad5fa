"""The sharpness-aware gradient: SAM (Foret et al., 2021) and mSAM (Behdin et al., 2023).

mSAM, "mSAM: Micro-Batch-Averaged Sharpness-Aware Minimization" (arXiv:2302.09693): split a
mini-batch of size B into m equal micro-batches; for each micro-batch j take its own ascent
step ``eps_j = rho * g_j / ||g_j||`` (``g_j`` the gradient of micro-batch j's mean loss, the
norm over all parameters together), take the gradient of micro-batch j's loss at
``w + eps_j`` and average those m gradients. m = 1 is SAM; rho = 0 is the plain (micro-batch
averaged) gradient. ``adaptive=True`` is
ASAM's scaling (Kwon et al., 2021): ``eps_j = rho * |w|^2 g_j / || |w| g_j ||``.

The plain loop below is the reference strategy. The faster ones (``msam._strategies``) are listed
in ``STRATEGIES``; each produces the same gradient, restores parameters bitwise and leaves
BatchNorm running statistics exactly as the loop does, or says that it cannot for a given model.
``strategy="auto"`` (:func:`choose_strategy`) picks among those that can.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from msam._strategies import fused as _fused
from msam._strategies import graphed as _graphed_mod
from msam._strategies._common import (
    NORM_EPS,
    LossFn,
    NotApplicable,
    OutputsHook,
    clone_all,
    flag_nonfinite,
    frozen_buffers,
    inverse_scale,
    no_sync,
    perturbation,
    scale_loss,
    trainable_parameters,
    weights_changed,
)

__all__ = [
    "AUTO_ORDER",
    "NORM_EPS",
    "STRATEGIES",
    "LossFn",
    "OutputsHook",
    "Strategy",
    "backward",
    "choose_strategy",
    "perturbation",
    "trainable_parameters",
]


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
            with no_sync(model, j < last):
                out = model(x)
                loss = loss_fn(out, y)
                scale_loss(loss / micro_batches, scaler).backward()
            losses.append(loss.detach())
            if on_outputs is not None:
                on_outputs(out.detach(), y)
        return torch.stack(losses).float().mean()

    originals = clone_all(params)
    nonfinite = torch.zeros((), dtype=torch.bool, device=inputs.device)
    inv_scale = inverse_scale(scaler)
    for j, (x, y) in enumerate(zip(xs, ys, strict=True)):
        # 1) Unperturbed pass: updates BatchNorm statistics, gives g_j. It never all-reduces.
        with no_sync(model, True):
            out = model(x)
            loss = loss_fn(out, y)
            grads = torch.autograd.grad(scale_loss(loss, scaler), params, allow_unused=True)
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
        weights_changed()
        del eps
        # 2) Perturbed pass at w + eps_j: accumulates (1/m) * grad into p.grad; BN frozen.
        with no_sync(model, j < last), frozen_buffers(model):
            loss_p = loss_fn(model(x), y)
            scale_loss(loss_p / micro_batches, scaler).backward()
        with torch.no_grad():
            torch._foreach_copy_(params, originals)
        weights_changed()
    flag_nonfinite(params, nonfinite)
    return torch.stack(losses).float().mean()


def _always(model: nn.Module, inputs: Tensor, micro_batches: int) -> str | None:
    return None


@dataclass(frozen=True)
class Strategy:
    """One way to compute the mSAM gradient. ``check`` returns why it cannot be exact for a
    model (None when it can); ``run`` has the signature of ``_loop``. ``cuda_only`` lets a config
    naming it for another device be refused before any work, not at the first step."""

    name: str
    run: Callable[..., Tensor]
    check: Callable[[nn.Module, Tensor, int], str | None]
    summary: str
    cuda_only: bool = False

    def __call__(self, *args: Any, **kwargs: Any) -> Tensor:
        return self.run(*args, **kwargs)


def _graphed(inner: Strategy) -> Strategy:
    """``inner`` captured once per model and batch shape in a CUDA graph and replayed."""
    check = _graphed_mod.make_check(inner.check)
    return Strategy(
        f"graphed_{inner.name}",
        _graphed_mod.make_run(inner.run, check),
        check,
        f"{inner.name}, replayed as one CUDA graph (CUDA only)",
        cuda_only=True,
    )


_EAGER = (
    Strategy("loop", _loop, _always, "2m passes of B/m samples, in order (the reference)"),
    Strategy(
        "fused",
        _fused.fused,
        _fused.check_fused,
        "1 unperturbed pass of B samples giving all m gradients, m perturbed passes of B/m",
    ),
    Strategy(
        "batched",
        _fused.batched,
        _fused.check_batched,
        "1 unperturbed and 1 perturbed pass of B samples (parameters stacked m times)",
    ),
)
#: name -> strategy. ``auto`` picks among those whose ``check`` passes (see ``choose_strategy``).
STRATEGIES: dict[str, Strategy] = {s.name: s for s in (*_EAGER, *map(_graphed, _EAGER))}

#: What ``auto`` prefers per device type among the strategies exact for the model, fastest first.
#: CPU: the loop. Measured (benchmarks/results/cpu-speed-2026-11-28.md): B/m-sample passes are
#: as fast per sample as B-sample ones on a CPU, so fusing saves nothing and its per-micro-batch
#: weight gradients and stacked gradients cost a few percent. CUDA: a prediction until
#: benchmarks/gpu has run: whole-batch kernels instead of 2m launch-bound small passes.
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cpu": ("loop",),
    "cuda": ("batched", "fused", "loop"),
}


def choose_strategy(
    model: nn.Module, inputs: Tensor, micro_batches: int, *, rho: float | None = None
) -> str:
    """The strategy ``auto`` uses: the fastest one that is exact for this model and input.

    One micro-batch is SAM and ``rho == 0`` plain gradient accumulation: the loop is exactly
    those and nothing is saved by fusing. Otherwise the first strategy of ``AUTO_ORDER`` for the
    input's device whose ``check`` passes.
    """
    if micro_batches == 1 or rho == 0:
        return "loop"
    for name in AUTO_ORDER.get(inputs.device.type, ("loop",)):
        if STRATEGIES[name].check(model, inputs, micro_batches) is None:
            return name
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

    ``strategy`` is a name in ``STRATEGIES`` (ValueError if it is not exact for this model) or
    ``"auto"``: :func:`choose_strategy`'s pick, and the loop wherever a fused strategy turns out
    at run time not to cover the model (remembered per model).
    """
    _check_args(inputs, rho, micro_batches)
    auto = strategy == "auto"
    name = choose_strategy(model, inputs, micro_batches, rho=rho) if auto else strategy
    try:
        chosen = STRATEGIES[name]
    except KeyError:
        raise ValueError(
            f"unknown strategy {name!r}; known: auto, {', '.join(sorted(STRATEGIES))}"
        ) from None
    kwargs = dict(
        rho=rho,
        micro_batches=micro_batches,
        adaptive=adaptive,
        scaler=scaler,
        on_outputs=on_outputs,
    )
    try:
        return chosen.run(model, loss_fn, inputs, targets, **kwargs)
    except NotApplicable as exc:
        # Raised before any gradient or buffer is left changed: the loop starts from scratch.
        if exc.remember:
            _fused.REFUSED[model] = str(exc)
        if not auto:
            raise ValueError(f"strategy {name!r} is not exact for this model: {exc}") from None
        return _loop(model, loss_fn, inputs, targets, **kwargs)
    except Exception as exc:
        if not auto or name == "loop":
            raise
        # A model the rewriting did not foresee (or out of memory for the stacked gradients):
        # the fused strategies restore the model before re-raising, so the loop is still exact.
        _fused.REFUSED[model] = f"{type(exc).__name__}: {exc}"
        warnings.warn(
            f"msam.backward: strategy {name!r} failed ({type(exc).__name__}: {exc}); "
            "using the loop for this model from now on",
            RuntimeWarning,
            stacklevel=2,
        )
        return _loop(model, loss_fn, inputs, targets, **kwargs)
