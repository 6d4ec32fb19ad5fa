"""Flatness of a trained model: Hessian spectrum and SAM sharpness on a fixed training sample.

mSAM's central claim (Behdin et al., 2023, "mSAM: Micro-Batch-Averaged Sharpness-Aware
Minimization") is that it finds flatter minima than SAM (Foret et al., 2021), which in turn finds
flatter minima than SGD. These metrics let a sweep check that claim on its own final models:

- ``hessian_top_eigenvalue``: power iteration on Hessian-vector products, the eigenvalue of largest
  magnitude as a Rayleigh quotient (as in PyHessian, Yao et al., 2020, "PyHessian: Neural Networks
  Through the Lens of the Hessian").
- ``hessian_trace``: Hutchinson's estimator (Hutchinson, 1989) ``tr(H) = E[v^T H v]`` with
  Rademacher vectors ``v``.
- ``sam_sharpness``: SAM's own quantity ``L(w + eps) - L(w)`` with ``eps = rho g / ||g||``
  (Foret et al., 2021), ``g`` the gradient over the whole sample.

The loss is the mean over all images of the sample (batches weighted by size), measured with the
model in eval mode so that BatchNorm uses its running statistics and the loss is a deterministic
function of the weights. Hessian-vector products come from double backpropagation, accumulated
batch by batch, so memory stays that of one batch. Random vectors come from a local
``torch.Generator``: a given seed gives the same numbers, and the global RNG is never touched.
The model's parameters (bitwise), ``.grad`` fields and train/eval modes are left as they were.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from msam._backward import perturbation, trainable_parameters

LossFn = Callable[[Tensor, Tensor], Tensor]
Batch = tuple[Tensor, Tensor]

__all__ = [
    "fixed_sample",
    "flatness_report",
    "hessian_top_eigenvalue",
    "hessian_trace",
    "sam_sharpness",
]


@contextmanager
def _measuring(model: nn.Module) -> Iterator[list[Tensor]]:
    """Eval mode for the duration; yields the trainable parameters; restores every module's mode."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield trainable_parameters(model)
    finally:
        for module, training in modes:
            module.training = training


def _check_batches(batches: Sequence[Batch]) -> list[Batch]:
    batches = list(batches)
    if not batches:
        raise ValueError("batches is empty: flatness needs at least one (x, y) batch")
    return batches


def _weighted_losses(
    model: nn.Module, loss_fn: LossFn, batches: Sequence[Batch]
) -> Iterator[Tensor]:
    """Each batch's mean loss times its share of the images: they sum to the sample's mean loss."""
    total = sum(int(x.shape[0]) for x, _ in batches)
    device = next(iter(model.parameters())).device
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        yield loss_fn(model(x), y) * (x.shape[0] / total)


def _grads(loss: Tensor, params: Sequence[Tensor], *, create_graph: bool = False) -> list[Tensor]:
    """``d loss / d params`` with zeros for parameters the loss does not use."""
    grads = torch.autograd.grad(loss, params, create_graph=create_graph, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


def _hvp_of(
    grads: Sequence[Tensor], params: Sequence[Tensor], vec: Sequence[Tensor]
) -> list[Tensor]:
    """``H v`` from a gradient built with ``create_graph=True``; the graph is kept for reuse."""
    live = [i for i, g in enumerate(grads) if g.requires_grad]
    out = [torch.zeros_like(p) for p in params]
    if live:
        parts = torch.autograd.grad(
            [grads[i] for i in live],
            [params[i] for i in live],
            grad_outputs=[vec[i] for i in live],
            retain_graph=True,
            allow_unused=True,
        )
        for i, part in zip(live, parts):
            if part is not None:
                out[i] = part
    return out


def _hvp(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Batch],
    params: Sequence[Tensor],
    vec: Sequence[Tensor],
) -> list[Tensor]:
    """``H v`` of the sample's mean loss, one batch's graph at a time."""
    total = [torch.zeros_like(p) for p in params]
    with torch.enable_grad():
        for loss in _weighted_losses(model, loss_fn, batches):
            grads = _grads(loss, params, create_graph=True)
            torch._foreach_add_(total, _hvp_of(grads, params, vec))
    return total


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    return float(sum((x.double() * y.double()).sum() for x, y in zip(a, b)))


def _norm(a: Sequence[Tensor]) -> float:
    return math.sqrt(_dot(a, a))


def _random_vector(params: Sequence[Tensor], gen: torch.Generator, kind: str) -> list[Tensor]:
    """A random vector shaped like ``params``, drawn on the CPU so any device gives the same one."""
    out = []
    for p in params:
        if kind == "rademacher":
            v = torch.randint(0, 2, p.shape, generator=gen).to(p.dtype).mul_(2).sub_(1)
        else:
            v = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        out.append(v.to(p.device))
    return out


def hessian_top_eigenvalue(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Batch],
    *,
    iters: int = 20,
    tol: float = 1e-3,
    seed: int = 0,
) -> float:
    """The Hessian eigenvalue of largest magnitude (signed), by power iteration.

    Stops after ``iters`` Hessian-vector products or once the Rayleigh quotient changes by less
    than ``tol`` relative to its previous value. Convergence is geometric in the ratio of the two
    largest eigenvalue magnitudes, so a small ``iters`` underestimates when they are close.
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    batches = _check_batches(batches)
    gen = torch.Generator().manual_seed(int(seed))
    with _measuring(model) as params:
        if not params:
            return 0.0
        vec = _random_vector(params, gen, "gaussian")
        torch._foreach_div_(vec, _norm(vec))
        eig: float | None = None
        for _ in range(iters):
            hv = _hvp(model, loss_fn, batches, params, vec)
            new = _dot(vec, hv)  # Rayleigh quotient: vec has unit norm
            size = _norm(hv)
            if size == 0.0 or not math.isfinite(size):
                return new
            vec = torch._foreach_div(hv, size)
            if eig is not None and abs(new - eig) < tol * abs(eig):
                return new
            eig = new
        assert eig is not None
        return eig


def _hutchinson_samples(
    model: nn.Module, loss_fn: LossFn, batches: Sequence[Batch], samples: int, seed: int
) -> list[float]:
    """One ``v^T H v`` per Rademacher vector ``v``; their mean is the trace estimate.

    Batches run in the outer loop: each batch's gradient graph is built once and serves every
    vector. Vector k is regenerated per batch from its own seed, so only one lives at a time.
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    gen = torch.Generator().manual_seed(int(seed))
    vector_seeds = torch.randint(0, 2**62, (samples,), generator=gen).tolist()
    estimates = [0.0] * samples
    with _measuring(model) as params, torch.enable_grad():
        if not params:
            return estimates
        for loss in _weighted_losses(model, loss_fn, batches):
            grads = _grads(loss, params, create_graph=True)
            for k, vector_seed in enumerate(vector_seeds):
                vec = _random_vector(params, gen.manual_seed(vector_seed), "rademacher")
                estimates[k] += _dot(vec, _hvp_of(grads, params, vec))
    return estimates


def hessian_trace(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Batch],
    *,
    samples: int = 20,
    seed: int = 0,
) -> float:
    """Hutchinson's estimate of the Hessian trace from ``samples`` Rademacher vectors.

    Unbiased; its variance is ``2 * sum_{i != j} H_ij^2 / samples`` (exact for a diagonal Hessian).
    """
    batches = _check_batches(batches)
    estimates = _hutchinson_samples(model, loss_fn, batches, samples, seed)
    return sum(estimates) / len(estimates)


def _sample_loss(model: nn.Module, loss_fn: LossFn, batches: Sequence[Batch]) -> float:
    with torch.no_grad():
        return float(sum(loss.double() for loss in _weighted_losses(model, loss_fn, batches)))


def sam_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Batch],
    *,
    rho: float,
    adaptive: bool = False,
) -> float:
    """``L(w + eps) - L(w)`` with SAM's ascent step from the gradient over the whole sample.

    ``adaptive=True`` uses ASAM's scaled step, as ``msam.backward`` does. The parameters are
    copied back bitwise afterwards; ``.grad`` fields are not touched.
    """
    if rho < 0:
        raise ValueError(f"rho must be >= 0, got {rho}")
    batches = _check_batches(batches)
    with _measuring(model) as params:
        if not params:
            return 0.0
        grads = [torch.zeros_like(p) for p in params]
        with torch.enable_grad():
            for loss in _weighted_losses(model, loss_fn, batches):
                torch._foreach_add_(grads, _grads(loss, params))
        base = _sample_loss(model, loss_fn, batches)
        eps, _ = perturbation(params, grads, rho, adaptive)
        saved = [p.detach().clone() for p in params]
        try:
            with torch.no_grad():
                torch._foreach_add_(params, eps)
            perturbed = _sample_loss(model, loss_fn, batches)
        finally:
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.copy_(s)
    return perturbed - base


def flatness_report(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Batch],
    *,
    rho: float,
    iters: int = 20,
    samples: int = 20,
    seed: int = 0,
    adaptive: bool = False,
) -> dict[str, Any]:
    """All flatness metrics of one model on one sample, as a flat dict ready to log.

    ``hessian_trace_stderr`` is the standard error of the Hutchinson mean (None for one sample):
    two models' traces closer than a few of these are not told apart by this sample of vectors.
    """
    batches = _check_batches(batches)
    estimates = _hutchinson_samples(model, loss_fn, batches, samples, seed)
    mean = sum(estimates) / len(estimates)
    stderr = None
    if len(estimates) > 1:
        var = sum((e - mean) ** 2 for e in estimates) / (len(estimates) - 1)
        stderr = math.sqrt(var / len(estimates))
    return {
        "hessian_top_eig": hessian_top_eigenvalue(model, loss_fn, batches, iters=iters, seed=seed),
        "hessian_trace": mean,
        "hessian_trace_stderr": stderr,
        "sam_sharpness": sam_sharpness(model, loss_fn, batches, rho=rho, adaptive=adaptive),
        "rho": float(rho),
        "n_images": sum(int(x.shape[0]) for x, _ in batches),
    }


def _batched(x: Tensor, y: Tensor, batch_size: int) -> list[Batch]:
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x), batch_size)]


def _chosen_indices(available: int, n_images: int, seed: int) -> Tensor:
    """``min(n_images, available)`` distinct indices, seeded, in increasing order."""
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randperm(available, generator=gen)[:n_images].sort().values


def _reservoir(batches: Iterable[Any], n_images: int, seed: int) -> tuple[Tensor, Tensor]:
    """A uniform seeded sample of ``n_images`` items from one pass over a stream of batches.

    Reservoir sampling (Vitter's algorithm R): item i replaces a kept one with probability
    n / (i + 1). Selection depends only on positions: a deterministic loader gives a fixed sample.
    """
    gen = torch.Generator().manual_seed(int(seed))
    kept_x: Tensor | None = None
    kept_y: Tensor | None = None
    seen = 0
    for x, y in batches:
        b = int(x.shape[0])
        if kept_x is None or kept_y is None:
            kept_x = x.new_empty((n_images, *x.shape[1:]))
            kept_y = y.new_empty((n_images, *y.shape[1:]))
        fill = max(0, min(n_images - seen, b))
        if fill:
            kept_x[seen : seen + fill] = x[:fill]
            kept_y[seen : seen + fill] = y[:fill]
        if fill < b:
            positions = torch.arange(seen + fill, seen + b, dtype=torch.float64)
            draws = torch.rand(len(positions), generator=gen, dtype=torch.float64)
            slots = (draws * (positions + 1)).floor().long()
            for offset, slot in zip(range(fill, b), slots.tolist()):
                if slot < n_images:  # in order: a later item wins a slot drawn twice
                    kept_x[slot] = x[offset]
                    kept_y[slot] = y[offset]
        seen += b
    if kept_x is None or kept_y is None:
        raise ValueError("fixed_sample: the loader yielded no batches")
    return kept_x[: min(seen, n_images)], kept_y[: min(seen, n_images)]


def fixed_sample(
    loader_or_tensors: Any,
    n_images: int,
    seed: int = 0,
    *,
    batch_size: int | None = None,
) -> list[Batch]:
    """A seeded sample of ``n_images`` training examples, as ``(x, y)`` batches.

    Every model of a comparison should be measured on the same sample, so the sample depends only
    on the data and ``seed``. Accepts ``(images, labels)`` tensors, a map-style data set of
    ``(x, y)`` items, a loader with a ``.dataset`` (torch DataLoader, msam's image-folder loader)
    or any other iterable of ``(x, y)`` batches (a list of batches, msam's device loader), which is
    read once.
    Pass the evaluation view of the training split (no augmentation) to measure the training loss
    itself. Fewer available examples than ``n_images`` gives all of them. ``batch_size`` defaults
    to the loader's, else 256.
    """
    if n_images < 1:
        raise ValueError(f"n_images must be >= 1, got {n_images}")
    size = batch_size or getattr(loader_or_tensors, "batch_size", None) or 256
    source = loader_or_tensors
    if (
        isinstance(source, (tuple, list))
        and len(source) == 2
        and all(isinstance(t, Tensor) for t in source)
    ):
        x, y = source
        if len(x) != len(y):
            raise ValueError(f"fixed_sample: {len(x)} images but {len(y)} labels")
        idx = _chosen_indices(len(x), n_images, seed).to(x.device)
        return _batched(x[idx], y[idx.to(y.device)], size)
    dataset = getattr(source, "dataset", source)
    is_batch_list = isinstance(source, (list, tuple))
    if not is_batch_list and hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__"):
        idx = _chosen_indices(len(dataset), n_images, seed).tolist()
        items = [dataset[i] for i in idx]
        x = torch.stack([torch.as_tensor(item[0]) for item in items])
        y = torch.stack([torch.as_tensor(item[1]) for item in items])
        return _batched(x, y, size)
    x, y = _reservoir(source, n_images, seed)
    return _batched(x, y, size)
