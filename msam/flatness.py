"""Flatness of a trained model: Hessian spectrum and SAM sharpness on a fixed training sample.

mSAM's central claim (Behdin et al., 2023, "mSAM: Micro-Batch-Averaged Sharpness-Aware
Minimization") is that it finds flatter minima than SAM (Foret et al., 2021), which in turn finds
flatter minima than SGD. These metrics let a sweep check that claim on its own final models:

- ``hessian_top_eigenvalue``: the Hessian eigenvalue of largest magnitude by the Lanczos method
  (Lanczos, 1950) on Hessian-vector products, stopped once the Ritz value's residual bound says
  it is accurate (``tol``). Lanczos needs far fewer products than the power iteration of PyHessian
  (Yao et al., 2020) for the same accuracy, and its residual certifies the value it returns.
- ``hessian_trace``: Hutchinson's estimator (Hutchinson, 1989) ``tr(H) = E[v^T H v]`` with
  Rademacher vectors ``v``. ``flatness_report`` deflates it by the Lanczos vectors it already has
  (their part of the trace is exact, the probes estimate the rest), which cuts its standard error
  several times for the same number of probes (Meyer et al., 2021, "Hutch++").
- ``sam_sharpness``: SAM's own quantity ``L(w + eps) - L(w)`` with ``eps = rho g / ||g||``
  (Foret et al., 2021), ``g`` the gradient over the whole sample; ``sharpness_profile`` measures
  it at common radii, plain and adaptive (scale-invariant), so that models compare.

The loss is the mean over all images of the sample (batches weighted by size), measured with the
model in eval mode so that BatchNorm uses its running statistics and the loss is a deterministic
function of the weights. Hessian-vector products come from double backpropagation, accumulated
batch by batch, so memory stays that of one batch; a sample of one batch keeps its gradient graph
and builds it once for every product (the eigenvalue's and the trace's). Random vectors come
from a local ``torch.Generator``: a given seed gives the same numbers, and the global RNG is
never touched.
The model's parameters (bitwise), ``.grad`` fields and train/eval modes are left as they were.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from msam._backward import perturbation, trainable_parameters

LossFn = Callable[[Tensor, Tensor], Tensor]
Batch = tuple[Tensor, Tensor]

__all__ = [
    "TopEigenvalue",
    "fixed_sample",
    "flatness_report",
    "hessian_top_eigenvalue",
    "hessian_trace",
    "radius_key",
    "sam_sharpness",
    "sharpness_profile",
    "top_eigenvalue",
    "weight_norm",
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


class _Hessian:
    """``v -> H v`` for the sample's mean loss (call it with the model in eval mode).

    A sample of one batch keeps that batch's gradient graph and reuses it for every product: the
    graph costs about half a product to build. Several batches are rebuilt one at a time per
    product, so memory stays that of one batch.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batches: Sequence[Batch],
        params: Sequence[Tensor],
    ) -> None:
        self.model, self.loss_fn, self.batches, self.params = model, loss_fn, batches, params
        self._kept: list[Tensor] | None = None
        if len(batches) == 1:
            with torch.enable_grad():
                (loss,) = _weighted_losses(model, loss_fn, batches)
                self._kept = _grads(loss, params, create_graph=True)

    @property
    def holds_graph(self) -> bool:
        return self._kept is not None

    def __call__(self, vec: Sequence[Tensor]) -> list[Tensor]:
        if self._kept is not None:
            with torch.enable_grad():
                return _hvp_of(self._kept, self.params, vec)
        total = [torch.zeros_like(p) for p in self.params]
        with torch.enable_grad():
            for loss in _weighted_losses(self.model, self.loss_fn, self.batches):
                grads = _grads(loss, self.params, create_graph=True)
                torch._foreach_add_(total, _hvp_of(grads, self.params, vec))
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
    """The Hessian eigenvalue of largest magnitude (signed), by the Lanczos method.

    Stops after ``iters`` Hessian-vector products, or once the Ritz value is certified to within
    ``tol`` relative (see :func:`top_eigenvalue`, which also says whether it converged).
    """
    return top_eigenvalue(model, loss_fn, batches, iters=iters, tol=tol, seed=seed).value


class TopEigenvalue(NamedTuple):
    """The Lanczos estimate of the top Hessian eigenvalue and how far to trust it.

    ``residual`` is ``||H y - value y||`` for the unit Ritz vector ``y``: some eigenvalue of H
    lies within it of ``value`` (for a symmetric H). ``converged``: ``residual <= tol * |value|``
    (or an invariant subspace was found) before ``iters`` products ran out.
    """

    value: float
    iters: int
    residual: float
    converged: bool


def top_eigenvalue(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Batch],
    *,
    iters: int = 20,
    tol: float = 1e-3,
    seed: int = 0,
) -> TopEigenvalue:
    """Lanczos (three-term recurrence, started from a seeded Gaussian vector) on ``H``.

    After each product the tridiagonal matrix's eigenvalue of largest magnitude is the estimate,
    and ``beta_k * |last entry of its eigenvector|`` the residual of its Ritz vector; it stops
    once that residual is at most ``tol`` times the estimate. Without reorthogonalisation a
    converged eigenvalue may reappear as a copy, which leaves the largest one unchanged, and only
    three vectors are kept.
    """
    batches = _check_batches(batches)
    with _measuring(model) as params:
        if not params:
            return TopEigenvalue(0.0, 0, 0.0, True)
        hessian = _Hessian(model, loss_fn, batches, params)
        return _lanczos(hessian, params, iters=iters, tol=tol, seed=seed).top


class _Krylov(NamedTuple):
    top: TopEigenvalue
    #: Orthonormal Lanczos vectors (only when kept) and ``q_i^T H q_i`` for each of them.
    basis: list[list[Tensor]]
    alphas: list[float]


def _lanczos(
    hessian: Callable[[Sequence[Tensor]], list[Tensor]],
    params: Sequence[Tensor],
    *,
    iters: int,
    tol: float,
    seed: int,
    keep_basis: bool = False,
) -> _Krylov:
    """The Lanczos iteration behind :func:`top_eigenvalue`. ``keep_basis`` keeps every Lanczos
    vector, reorthogonalised against all earlier ones (twice, which is enough in floating
    point), so that they are orthonormal to rounding and can deflate the trace estimate."""
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    gen = torch.Generator().manual_seed(int(seed))
    q = _random_vector(params, gen, "gaussian")
    torch._foreach_div_(q, _norm(q))
    basis: list[list[Tensor]] = [q]
    q_prev: list[Tensor] | None = None
    alphas: list[float] = []
    betas: list[float] = []
    top = TopEigenvalue(math.nan, 0, math.inf, False)
    for k in range(iters):
        w = hessian(q)
        alpha = _dot(w, q)
        if not math.isfinite(alpha):
            return _Krylov(TopEigenvalue(alpha, k + 1, math.inf, False), [], [])
        alphas.append(alpha)
        torch._foreach_add_(w, q, alpha=-alpha)
        if q_prev is not None:
            torch._foreach_add_(w, q_prev, alpha=-betas[-1])
        if keep_basis:
            for _ in range(2):
                for v in basis:
                    torch._foreach_add_(w, v, alpha=-_dot(w, v))
        beta = _norm(w)
        value, last = _ritz_top(alphas, betas)
        if not math.isfinite(value) or not math.isfinite(beta):
            return _Krylov(TopEigenvalue(value, k + 1, math.inf, False), [], [])
        residual = beta * abs(last)
        invariant = beta <= 1e-12 * max(abs(value), 1e-30)
        top = TopEigenvalue(value, k + 1, residual, residual <= tol * abs(value) or invariant)
        if top.converged or k == iters - 1:
            break
        betas.append(beta)
        q_prev, q = q, torch._foreach_div(w, beta)
        if keep_basis:
            basis.append(q)
    return _Krylov(top, basis if keep_basis else [], alphas)


def _ritz_top(alphas: Sequence[float], betas: Sequence[float]) -> tuple[float, float]:
    """The largest-magnitude eigenvalue of the Lanczos tridiagonal matrix and the last entry of
    its unit eigenvector."""
    n = len(alphas)
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if n > 1:
        off = torch.tensor(betas[: n - 1], dtype=torch.float64)
        t += torch.diag(off, 1) + torch.diag(off, -1)
    values, vectors = torch.linalg.eigh(t)
    i = int(values.abs().argmax())
    return float(values[i]), float(vectors[-1, i])


def _hutchinson_samples(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Batch],
    samples: int,
    seed: int,
    hessian: _Hessian | None = None,
    basis: Sequence[Sequence[Tensor]] = (),
) -> list[float]:
    """One ``v^T H v`` per Rademacher vector ``v``; their mean is the trace estimate.

    Batches run in the outer loop: each batch's gradient graph is built once and serves every
    vector. Vector k is regenerated per batch from its own seed, so only one lives at a time.
    ``hessian`` (built on the same model and batches) lends a graph it already holds.

    ``basis`` (orthonormal vectors ``Q``, e.g. Lanczos's) is projected out of every probe: the
    samples are then of ``(P v)^T H (P v)`` with ``P = I - Q Q^T``, unbiased for
    ``tr(H) - tr(Q^T H Q)`` as long as ``Q`` does not depend on the probes. With the top
    eigen-directions in ``Q``, which dominate plain Hutchinson's variance, the same number of
    probes gives a smaller standard error (a Krylov variant of Hutch++, Meyer et al., 2021,
    "Hutch++: Optimal Stochastic Trace Estimation").
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    gen = torch.Generator().manual_seed(int(seed))
    vector_seeds = torch.randint(0, 2**62, (samples,), generator=gen).tolist()
    estimates = [0.0] * samples
    with _measuring(model) as params, torch.enable_grad():
        if not params:
            return estimates

        def probe(k: int) -> list[Tensor]:
            vec = _random_vector(params, gen.manual_seed(vector_seeds[k]), "rademacher")
            for _ in range(2 if basis else 0):  # twice: orthogonal to rounding
                for q in basis:
                    torch._foreach_add_(vec, q, alpha=-_dot(vec, q))
            return vec

        if hessian is not None and hessian.holds_graph:
            for k in range(samples):
                vec = probe(k)
                estimates[k] = _dot(vec, hessian(vec))
            return estimates
        for loss in _weighted_losses(model, loss_fn, batches):
            grads = _grads(loss, params, create_graph=True)
            for k in range(samples):
                vec = probe(k)
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
    profile = sharpness_profile(model, loss_fn, batches, radii=[rho], adaptive=[adaptive])
    return profile[adaptive][float(rho)]


def sharpness_profile(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Batch],
    *,
    radii: Sequence[float],
    adaptive: Sequence[bool] = (False, True),
) -> dict[bool, dict[float, float]]:
    """SAM sharpness ``L(w + eps) - L(w)`` at each radius, plain and/or adaptive.

    The same radii for every model make the values comparable: at its own tuned rho each model's
    sharpness says more about rho than about the minimum. Adaptive sharpness (ASAM's step,
    ``eps = rho |w|^2 g / || |w| g ||``) does not change when a BatchNorm-followed layer's
    weights are rescaled, which leaves the function unchanged but moves the Hessian and the plain
    sharpness (Kwon et al., 2021; Andriushchenko et al., 2023, "A Modern Look at the
    Relationship between Sharpness and Generalization"). One gradient and one unperturbed loss
    serve every radius; the parameters are copied back bitwise, ``.grad`` is not touched.
    Returns ``{adaptive: {rho: sharpness}}``.
    """
    if any(r < 0 for r in radii):
        raise ValueError(f"radii must be >= 0, got {list(radii)}")
    batches = _check_batches(batches)
    out: dict[bool, dict[float, float]] = {bool(a): {} for a in adaptive}
    with _measuring(model) as params:
        if not params:
            return {a: {float(r): 0.0 for r in radii} for a in out}
        grads = [torch.zeros_like(p) for p in params]
        with torch.enable_grad():
            for loss in _weighted_losses(model, loss_fn, batches):
                torch._foreach_add_(grads, _grads(loss, params))
        base = _sample_loss(model, loss_fn, batches)
        saved = [p.detach().clone() for p in params]
        try:
            for scaled in out:
                for rho in radii:
                    eps, _ = perturbation(params, grads, float(rho), scaled)
                    with torch.no_grad():
                        torch._foreach_add_(params, eps)
                    out[scaled][float(rho)] = _sample_loss(model, loss_fn, batches) - base
                    with torch.no_grad():
                        torch._foreach_copy_(params, saved)
        finally:
            with torch.no_grad():
                torch._foreach_copy_(params, saved)
    return out


def radius_key(rho: float) -> str:
    """How a radius names its sharpness in reports and summaries: ``0.05`` -> ``"0.05"``."""
    return f"{float(rho):g}"


def weight_norm(model: nn.Module) -> float:
    """The L2 norm of all trainable parameters together (sharpness grows as it shrinks)."""
    params = trainable_parameters(model)
    return _norm([p.detach() for p in params]) if params else 0.0


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
    tol: float = 1e-3,
    radii: Sequence[float] = (),
) -> dict[str, Any]:
    """All flatness metrics of one model on one sample, as a flat dict ready to log.

    ``sam_sharpness`` is measured at ``rho`` (with ``adaptive``); ``radii`` adds ``sharpness``
    and ``adaptive_sharpness`` at each of those radii (``{"0.05": value}``), the same for every
    model, with the ``weight_norm`` and the BatchNorm mode the curvature was measured in
    (``bn_mode``: eval, running statistics).

    ``hessian_trace_stderr`` is the standard error of the Hutchinson mean (None for one sample):
    two models' traces closer than a few of these are not told apart by this sample of vectors.
    ``hessian_top_eig_converged`` says whether Lanczos certified the eigenvalue to ``tol``
    (relative) within ``iters`` products; ``hessian_top_eig_iters`` how many it took.
    """
    batches = _check_batches(batches)
    with _measuring(model) as params:
        if params:
            hessian = _Hessian(model, loss_fn, batches, params)
            krylov = _lanczos(hessian, params, iters=iters, tol=tol, seed=seed, keep_basis=True)
            top, deflated = krylov.top, len(krylov.basis)
            # tr(H) = tr(Q^T H Q) (the alphas, exact) + Hutchinson on the rest; a non-finite
            # eigenvalue leaves no basis and no alphas: plain Hutchinson.
            outside = _hutchinson_samples(
                model, loss_fn, batches, samples, seed, hessian, krylov.basis
            )
            estimates = [sum(krylov.alphas) + value for value in outside]
            del hessian, krylov  # the graph and the Lanczos vectors
        else:
            top, deflated = TopEigenvalue(0.0, 0, 0.0, True), 0
            estimates = [0.0] * max(samples, 1)
    mean = sum(estimates) / len(estimates)
    stderr = None
    if len(estimates) > 1:
        var = sum((e - mean) ** 2 for e in estimates) / (len(estimates) - 1)
        stderr = math.sqrt(var / len(estimates))
    # One gradient and one unperturbed loss serve the run's own rho and the common radii.
    modes = (False, True) if radii else (adaptive,)
    everywhere = sorted({float(rho), *map(float, radii)})
    profile = sharpness_profile(model, loss_fn, batches, radii=everywhere, adaptive=modes)
    report: dict[str, Any] = {
        "hessian_top_eig": top.value,
        "hessian_top_eig_iters": top.iters,
        "hessian_top_eig_converged": top.converged,
        "hessian_trace": mean,
        "hessian_trace_stderr": stderr,
        "hessian_trace_deflated": deflated,
        "sam_sharpness": profile[adaptive][float(rho)],
        "rho": float(rho),
        "n_images": sum(int(x.shape[0]) for x, _ in batches),
        "bn_mode": "eval",
        "weight_norm": weight_norm(model),
    }
    if radii:
        for scaled, key in ((False, "sharpness"), (True, "adaptive_sharpness")):
            report[key] = {radius_key(r): profile[scaled][float(r)] for r in radii}
    return report


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
