"""Fused mSAM strategies (Behdin et al., 2023, "mSAM: Micro-Batch-Averaged Sharpness-Aware
Minimization", arXiv:2302.09693): the same gradient as the reference loop in fewer, larger passes.

``fused``:   one unperturbed pass of the whole mini-batch yields all m micro-batch gradients
             ``g_j`` (see ``_chunked``); the m perturbed passes run one micro-batch at a time.
``batched``: the perturbed passes run as one pass too, every parameter replaced by its stack of
             m perturbed copies (grouped convolutions on CUDA, one convolution per micro-batch on
             the CPU; batched matrix products; per-micro-batch norm affines).

Both keep all m gradients at once: ``m x (number of parameters)`` extra memory (for
``batched``, twice that: the perturbed stacks too), the price of not running m small passes.
Both are exact for models whose samples interact only through BatchNorm and that draw no random
numbers in train mode; ``check`` says why a model is refused, and a parameter use that the
rewriting does not cover is caught at run time (``NotApplicable``), after which the caller falls
back to the loop.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor, nn

from msam._strategies._chunked import ChunkedForward
from msam._strategies._common import (
    LossFn,
    NotApplicable,
    OutputsHook,
    ascent_scale,
    capturing,
    clone_all,
    copy_all,
    flag_nonfinite,
    frozen_buffers,
    inverse_scale,
    scale_loss,
    trainable_parameters,
    weights_changed,
)

#: Models a fused strategy refused at run time (weakly held): auto does not try them again.
REFUSED: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()

_RANDOM_ATTRS = ("p", "drop_prob", "prob", "drop_rate")

#: Weight gradients per micro-batch in one grouped convolution (True), one convolution per
#: micro-batch (False), or by device (None: grouped on CUDA, where a launch per micro-batch costs
#: more than the arithmetic; per micro-batch on the CPU, where grouped kernels are slow).
GROUPED_CONV: bool | None = None


def _grouped(inputs: Tensor) -> bool:
    return inputs.device.type == "cuda" if GROUPED_CONV is None else GROUPED_CONV


#: Share of the memory still available that the m stacked gradients (and for ``batched`` the m
#: stacked perturbed parameters) may take; beyond it the strategy declines rather than risk OOM.
MEMORY_SHARE = 0.5


def check_fused(model: nn.Module, inputs: Tensor, micro_batches: int) -> str | None:
    """Why ``fused`` cannot run exactly for this model and batch (None: it can)."""
    return check_model(model) or _check_memory(model, micro_batches, copies=1)


def check_batched(model: nn.Module, inputs: Tensor, micro_batches: int) -> str | None:
    """Why ``batched`` cannot run exactly for this model and batch (None: it can)."""
    return check_model(model) or _check_memory(model, micro_batches, copies=2)


def _check_memory(model: nn.Module, m: int, copies: int) -> str | None:
    if capturing():  # checked before the capture; memory queries are not allowed during it
        return None
    params = trainable_parameters(model)
    need = copies * m * sum(p.numel() for p in params) * params[0].element_size()
    available = _available_bytes(params[0].device)
    if available is not None and need > MEMORY_SHARE * available:
        gib = 2.0**30
        return (
            f"{copies * m} stacked copies of the parameters need {need / gib:.1f} GiB, more than "
            f"{MEMORY_SHARE:.0%} of the {available / gib:.1f} GiB available"
        )
    return None


def _available_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as info:
                for line in info:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def check_model(model: nn.Module) -> str | None:
    """Why the fused strategies cannot be exact for this model (None: they can).

    The static part of the test; the rewriting itself refuses unknown parameter uses at run time.
    """
    if hasattr(model, "no_sync") or isinstance(model, nn.DataParallel):
        return "the model is wrapped for data parallelism (each rank runs the loop)"
    if type(model).__name__ == "OptimizedModule":
        return "the model is compiled with torch.compile"
    if model in REFUSED:
        return REFUSED[model]
    params = trainable_parameters(model)
    if not params:
        return "the model has no trainable parameters"
    if len({(p.dtype, p.device) for p in params}) > 1:
        return "trainable parameters differ in dtype or device"
    for name, module in model.named_modules():
        if module.training and _draws_random(module):
            return f"{name or type(module).__name__} draws random numbers in train mode"
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            if isinstance(module, nn.SyncBatchNorm):
                return f"{name} is a SyncBatchNorm"
            if module.training and module.track_running_stats and module.momentum is None:
                return f"{name} averages cumulatively (momentum=None)"
        elif any(b is not None and b.is_floating_point() for b in module._buffers.values()):
            return f"{name or type(module).__name__} keeps floating-point buffers (not BatchNorm)"
    return None


def _draws_random(module: nn.Module) -> bool:
    if isinstance(module, (nn.modules.dropout._DropoutNd, nn.RReLU)):
        return isinstance(module, nn.RReLU) or module.p > 0
    if "drop" in type(module).__name__.lower():
        return any(float(getattr(module, a, 0) or 0) > 0 for a in _RANDOM_ATTRS)
    return False


def _stash_views(params: list[Tensor], m: int) -> tuple[Tensor, list[Tensor]]:
    """One ``[m, total]`` buffer and its ``[m, *p.shape]`` view per parameter."""
    sizes = [p.numel() for p in params]
    flat = torch.empty(m, sum(sizes), dtype=params[0].dtype, device=params[0].device)
    views = [v.view(m, *p.shape) for v, p in zip(flat.split(sizes, dim=1), params, strict=True)]
    return flat, views


def _ascent_steps(
    flat: Tensor, params: list[Tensor], rho: float, adaptive: bool, inv_scale: float
) -> Tensor:
    """Turn the m gradients in ``flat`` into the m ascent steps, in place; returns the flag
    "some norm was not finite"."""
    if inv_scale != 1.0:
        flat.mul_(inv_scale)
    absw = None
    if adaptive:
        absw = torch.cat([p.detach().abs().flatten() for p in params])
        flat.mul_(absw)
    # Accumulated in float64: a float32 norm over millions of entries in one row loses ~1e-4
    # relative on the CPU (measured), enough to move every perturbed gradient by as much.
    norms = torch.linalg.vector_norm(flat, dim=1, dtype=torch.float64)
    if absw is not None:
        flat.mul_(absw)
    flat.mul_(ascent_scale(norms, rho).to(flat.dtype).unsqueeze(1))
    return ~torch.isfinite(norms).all()


def _unperturbed_pass(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Tensor,
    targets: Tensor,
    params: list[Tensor],
    views: list[Tensor],
    m: int,
    scaler: Any | None,
) -> tuple[list[Tensor], Tensor]:
    """One pass over the whole batch; fills ``views`` with the m scaled gradients ``g_j``."""
    counters = {
        mod: mod.num_batches_tracked.clone()
        for mod in model.modules()
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.num_batches_tracked is not None
    }
    mode = ChunkedForward(
        batch=inputs.shape[0],
        micro_batches=m,
        params=params,
        kind="grads",
        stash={id(p): v for p, v in zip(params, views, strict=True)},
        grouped_conv=_grouped(inputs),
        device=inputs.device,
    )
    with mode:
        out = model(inputs)
    outs = out.chunk(m)
    losses = [loss_fn(o, y) for o, y in zip(outs, targets.chunk(m), strict=True)]
    scale_loss(torch.stack(losses).sum(), scaler).backward()
    mode.harvest()
    if any(p.grad is not None for p in params):
        raise NotApplicable("a parameter reaches the loss through an operation not rewritten")
    with torch.no_grad():
        # The module counted one forward; the loop counts one per micro-batch.
        for mod, before in counters.items():
            mod.num_batches_tracked.copy_(before + (mod.num_batches_tracked - before) * m)
    return [loss.detach() for loss in losses], out.detach()


def _fused(
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
    batched_second: bool,
) -> Tensor:
    check = check_batched if batched_second else check_fused
    reason = check(model, inputs, micro_batches)
    if reason is not None:
        raise NotApplicable(reason)
    m = micro_batches
    params = trainable_parameters(model)
    buffers = [b for b in model.buffers() if b is not None]
    saved = clone_all(buffers)
    for p in params:
        p.grad = None
    try:
        flat, views = _stash_views(params, m)
        losses, out = _unperturbed_pass(model, loss_fn, inputs, targets, params, views, m, scaler)
        if rho == 0:
            # The plain gradient: the mean of the m micro-batch gradients.
            for p, v in zip(params, views, strict=True):
                p.grad = v.sum(0).div_(m)
            nonfinite = None
        else:
            nonfinite = _ascent_steps(flat, params, rho, adaptive, inverse_scale(scaler))
            if batched_second:
                _batched_perturbed_pass(model, loss_fn, inputs, targets, params, views, m, scaler)
            else:
                _looped_perturbed_passes(model, loss_fn, inputs, targets, params, views, m, scaler)
    except BaseException:
        # Leave the model as it was, so that the loop can start from scratch.
        copy_all(buffers, saved)
        for p in params:
            p.grad = None
        raise
    if on_outputs is not None:
        for o, y in zip(out.chunk(m), targets.chunk(m), strict=True):
            on_outputs(o, y)
    if nonfinite is not None:
        flag_nonfinite(params, nonfinite)
    return torch.stack(losses).float().mean()


def _looped_perturbed_passes(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Tensor,
    targets: Tensor,
    params: list[Tensor],
    eps: list[Tensor],
    m: int,
    scaler: Any | None,
) -> None:
    """Micro-batch j at ``w + eps_j``, one at a time; parameters restored bitwise after each."""
    originals = clone_all(params)
    for j, (x, y) in enumerate(zip(inputs.chunk(m), targets.chunk(m), strict=True)):
        with torch.no_grad():
            torch._foreach_add_(params, [e[j] for e in eps])
        weights_changed()
        try:
            with frozen_buffers(model):
                loss = loss_fn(model(x), y)
                scale_loss(loss / m, scaler).backward()
        finally:
            copy_all(params, originals)
            weights_changed()


def _batched_perturbed_pass(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Tensor,
    targets: Tensor,
    params: list[Tensor],
    eps: list[Tensor],
    m: int,
    scaler: Any | None,
) -> None:
    """All m perturbed passes as one; parameters are never written, so nothing to restore."""
    mode = ChunkedForward(
        batch=inputs.shape[0],
        micro_batches=m,
        params=params,
        kind="perturbed",
        eps={id(p): e for p, e in zip(params, eps, strict=True)},
        grouped_conv=_grouped(inputs),
        device=inputs.device,
    )
    with frozen_buffers(model):
        with mode:
            out = model(inputs)
        losses = [loss_fn(o, y) for o, y in zip(out.chunk(m), targets.chunk(m), strict=True)]
        scale_loss(torch.stack(losses).sum() / m, scaler).backward()


def fused(model: nn.Module, loss_fn: LossFn, inputs: Tensor, targets: Tensor, **kw: Any) -> Tensor:
    """One unperturbed pass of the whole batch, then m perturbed micro-batch passes."""
    return _fused(model, loss_fn, inputs, targets, batched_second=False, **kw)


def batched(
    model: nn.Module, loss_fn: LossFn, inputs: Tensor, targets: Tensor, **kw: Any
) -> Tensor:
    """One unperturbed and one perturbed pass, each of the whole batch."""
    return _fused(model, loss_fn, inputs, targets, batched_second=True, **kw)
