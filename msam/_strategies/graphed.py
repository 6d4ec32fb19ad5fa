"""CUDA-graph replay of a whole mSAM gradient computation (Behdin et al., 2023, "mSAM:
Micro-Batch-Averaged Sharpness-Aware Minimization", arXiv:2302.09693).

At 32 px a GPU runs the kernels of a micro-batch pass faster than Python can launch them: the m
small passes of the loop, and the m small BatchNorm calls per layer of the fused strategies, are
launch-bound. ``graphed_<inner>`` captures ``<inner>`` once per model and batch shape (after two
eager warm-up runs on a side stream, whose BatchNorm updates are undone) and afterwards replays
the graph: the same kernels on the same memory, so the same gradient, with one launch.

What changes on each call is copied into the captured input buffers; parameters, BatchNorm
buffers and ``p.grad`` stay at the addresses the graph was captured with (the key includes them,
so ``model.to()`` or new parameters lead to a new capture). A GradScaler (its scale is read on
the host), DDP and non-CUDA inputs are refused; a capture that fails leaves the inner strategy
to run eagerly for that key from then on. The graph's memory pool keeps one update's
activations allocated between calls.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from msam._strategies._common import (
    LossFn,
    NotApplicable,
    OutputsHook,
    clone_all,
    copy_all,
    trainable_parameters,
)

Check = Callable[[nn.Module, Tensor, int], "str | None"]

#: Eager runs before capture: autotuning, allocator growth and autograd's streams settle.
WARMUP = 2
#: Captured graphs kept per strategy and model (one per batch shape and m); beyond that, calls
#: run eagerly rather than hold another memory pool.
MAX_GRAPHS = 8


@dataclass
class _Captured:
    graph: Any
    inputs: Tensor
    targets: Tensor
    loss: Tensor
    grads: list[Tensor | None]
    outputs: list[tuple[Tensor, Tensor]] = field(default_factory=list)


def make_check(inner: Check) -> Check:
    def check(model: nn.Module, inputs: Tensor, micro_batches: int) -> str | None:
        if inputs.device.type != "cuda":
            return "CUDA graphs need the batch on a CUDA device"
        if hasattr(model, "no_sync"):
            return "the model is wrapped for data parallelism"
        return inner(model, inputs, micro_batches)

    return check


def make_run(inner: Callable[..., Tensor], check: Check) -> Callable[..., Tensor]:
    # model -> {key: captured graph, or why capturing failed}; one cache per inner strategy.
    cache: weakref.WeakKeyDictionary[nn.Module, dict[tuple, _Captured | str]] = (
        weakref.WeakKeyDictionary()
    )

    def run(
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
        kw = dict(rho=rho, micro_batches=micro_batches, adaptive=adaptive, scaler=scaler)
        if scaler is not None:
            raise NotApplicable(
                "a GradScaler's scale is read on the host, outside any graph", remember=False
            )
        reason = check(model, inputs, micro_batches)
        if reason is not None:
            raise NotApplicable(reason, remember=False)
        params = trainable_parameters(model)
        graphs = cache.setdefault(model, {})
        key = _key(model, params, loss_fn, inputs, targets, kw, on_outputs is not None)
        entry = graphs.get(key)
        if entry is None and len(graphs) < MAX_GRAPHS:
            entry = graphs[key] = _capture(
                inner, model, params, loss_fn, inputs, targets, kw, on_outputs
            )
        if not isinstance(entry, _Captured):
            return inner(model, loss_fn, inputs, targets, on_outputs=on_outputs, **kw)
        entry.inputs.copy_(inputs)
        entry.targets.copy_(targets)
        entry.graph.replay()
        for p, g in zip(params, entry.grads, strict=True):
            p.grad = g
        if on_outputs is not None:
            for out, y in entry.outputs:
                on_outputs(out.clone(), y.clone())
        return entry.loss.clone()

    run.graphs = cache  # type: ignore[attr-defined]  # for benchmarks: what was captured
    return run


def _key(
    model: nn.Module,
    params: list[Tensor],
    loss_fn: LossFn,
    inputs: Tensor,
    targets: Tensor,
    kw: dict[str, Any],
    hooked: bool,
) -> tuple:
    """Everything a replay silently depends on (m first: benchmarks look it up)."""
    dev = inputs.device.type
    autocast = torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev)
    return (
        kw["micro_batches"],
        tuple(inputs.shape), inputs.dtype, inputs.stride(), inputs.device,
        tuple(targets.shape), targets.dtype, targets.stride(),
        id(loss_fn), kw["rho"], kw["adaptive"], hooked, autocast,
        torch.is_grad_enabled(),
        tuple(m.training for m in model.modules()),
        tuple((id(p), p.data_ptr()) for p in params),
        tuple(b.data_ptr() for b in model.buffers()),
    )  # fmt: skip


def _capture(
    inner: Callable[..., Tensor],
    model: nn.Module,
    params: list[Tensor],
    loss_fn: LossFn,
    inputs: Tensor,
    targets: Tensor,
    kw: dict[str, Any],
    on_outputs: OutputsHook | None,
) -> _Captured | str:
    buffers = [b for b in model.buffers() if b is not None]
    saved = clone_all(buffers)

    def restore() -> None:
        copy_all(buffers, saved)

    static_x = inputs.clone(memory_format=torch.preserve_format)
    static_y = targets.clone(memory_format=torch.preserve_format)
    outputs: list[tuple[Tensor, Tensor]] = []
    record = (lambda out, y: outputs.append((out, y))) if on_outputs is not None else None
    try:
        side = torch.cuda.Stream(device=inputs.device)
        side.wait_stream(torch.cuda.current_stream(inputs.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP):
                inner(model, loss_fn, static_x, static_y, on_outputs=None, **kw)
                restore()
        torch.cuda.current_stream(inputs.device).wait_stream(side)
        for p in params:
            p.grad = None
        graph = torch.cuda.CUDAGraph()
        # Casts cached by autocast before the capture would be read, not recomputed, by replays.
        torch.clear_autocast_cache()
        try:
            with torch.cuda.graph(graph):
                loss = inner(model, loss_fn, static_x, static_y, on_outputs=record, **kw)
        finally:
            torch.clear_autocast_cache()  # casts made in the graph's pool must not leak out
    except (RuntimeError, NotApplicable) as exc:
        restore()
        for p in params:
            p.grad = None
        return (
            f"capture failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        )
    restore()
    return _Captured(graph, static_x, static_y, loss, [p.grad for p in params], outputs)
