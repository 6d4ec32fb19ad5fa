"""One forward pass of a whole mini-batch that computes as m independent micro-batches.

mSAM (Behdin et al., 2023, "mSAM: Micro-Batch-Averaged Sharpness-Aware Minimization",
arXiv:2302.09693) needs, per micro-batch j, the gradient ``g_j`` of its own loss and later the
gradient of its loss at its own perturbed weights ``w + eps_j``. A plain loop runs 2m small passes;
small batches starve the hardware. This module runs the model once on all B samples under a
``TorchFunctionMode`` that rewrites the few operations that touch parameters or couple samples:

* BatchNorm in train mode normalises each micro-batch with its own statistics ("ghost" batch
  norm), by calling the same ``F.batch_norm`` on each micro-batch in order, so running statistics
  end exactly as the loop leaves them;
* in the *gradient* pass, convolutions and linear layers run as one dense operation on the whole
  batch, and their backward computes the input gradient once and the weight gradient per
  micro-batch (B/m samples each, the same arithmetic as one whole-batch weight gradient); other
  parameter uses (norm affines, ``x + pos_embed``, ``cls_token.expand``) see per-micro-batch
  copies of the parameter, so autograd yields one gradient per micro-batch;
* in the *perturbed* pass every parameter is replaced by its stack ``w + eps_j`` (one row per
  micro-batch): grouped convolutions or one convolution per micro-batch, batched matrix products,
  per-micro-batch affines. Gradients flow back to ``w`` summed over j.

Everything else runs untouched: it acts per sample, so the m micro-batches do not see each other.
A parameter used by any other operation makes the pass raise ``NotApplicable`` (and in the
gradient pass, a parameter that still receives a ``.grad`` gives it away), so callers fall back to
the loop instead of computing an inexact gradient. Random operations (dropout, stochastic depth)
would draw differently from the loop and are refused the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from msam._strategies._common import NotApplicable

# Signatures of the functions the mode rewrites: names and defaults of the trailing arguments.
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}
_LINEAR_ARGS = ("input", "weight", "bias")
_BN_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
_BN_DEFAULTS = {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5}
_LN_ARGS = ("input", "normalized_shape", "weight", "bias", "eps")
_GN_ARGS = ("input", "num_groups", "weight", "bias", "eps")
_NORM_DEFAULTS = {"weight": None, "bias": None, "eps": 1e-5}

_CONVS = {torch.conv1d: 1, torch.conv2d: 2, torch.conv3d: 3}
_ELEMENTWISE = {
    Tensor.add,
    Tensor.add_,
    Tensor.__add__,
    Tensor.__radd__,
    Tensor.__iadd__,
    torch.add,
    Tensor.mul,
    Tensor.mul_,
    Tensor.__mul__,
    Tensor.__rmul__,
    Tensor.__imul__,
    torch.mul,
}
_INPLACE = {Tensor.add_, Tensor.__iadd__, Tensor.mul_, Tensor.__imul__}
# Read-only uses of a parameter that need no rewriting.
_METADATA = {
    "__get__",
    "size",
    "dim",
    "ndimension",
    "numel",
    "nelement",
    "stride",
    "is_contiguous",
    "is_floating_point",
    "element_size",
    "storage_offset",
    "__len__",
    "__hash__",
    "__format__",
    "__repr__",
}
_DROPOUTS = {
    F.dropout,
    F.dropout1d,
    F.dropout2d,
    F.dropout3d,
    F.alpha_dropout,
    F.feature_alpha_dropout,
}
_RANDOM = {
    torch.rand,
    torch.rand_like,
    torch.randn,
    torch.randn_like,
    torch.randint,
    torch.randint_like,
    torch.randperm,
    torch.bernoulli,
    torch.normal,
    torch.poisson,
    torch.multinomial,
    torch.dropout,
    torch.dropout_,
    torch.alpha_dropout,
    torch.feature_dropout,
    torch.feature_alpha_dropout,
    Tensor.bernoulli,
    Tensor.bernoulli_,
    Tensor.normal_,
    Tensor.uniform_,
    Tensor.exponential_,
    Tensor.geometric_,
    Tensor.cauchy_,
    Tensor.log_normal_,
    Tensor.random_,
    Tensor.multinomial,
    F.rrelu,
    F.gumbel_softmax,
}


def _bind(
    names: Sequence[str], defaults: dict[str, Any], args: tuple, kwargs: dict[str, Any]
) -> dict[str, Any]:
    bound = dict(defaults)
    bound.update(zip(names, args, strict=False))
    bound.update(kwargs)
    return bound


def _tuple(value: Any, n: int) -> list[int]:
    return list(value) if isinstance(value, (tuple, list)) else [int(value)] * n


def _channels_last(t: Tensor) -> bool:
    return (
        t.dim() in (4, 5)
        and not t.is_contiguous()
        and t.is_contiguous(
            memory_format=torch.channels_last if t.dim() == 4 else torch.channels_last_3d
        )
    )


def to_groups(x: Tensor, m: int) -> Tensor:
    """``[m*n, C, *S] -> [n, m*C, *S]``: micro-batch j becomes channel group j, in one copy that
    keeps a channels-last layout channels-last (cuDNN's fast path)."""
    n = x.shape[0] // m
    if _channels_last(x):
        # Memory order [m, n, *S, C] -> [n, *S, m, C]; then view channels (m, C) as m*C.
        k = x.dim() - 2
        mem = x.movedim(1, -1).unflatten(0, (m, n))  # [m, n, *S, C], a view
        order = [1, *range(2, 2 + k), 0, 2 + k]
        grouped = mem.permute(order).contiguous().flatten(-2)  # [n, *S, m*C]
        return grouped.movedim(-1, 1)
    return x.unflatten(0, (m, n)).transpose(0, 1).flatten(1, 2)


def from_groups(y: Tensor, m: int) -> Tensor:
    """The inverse of :func:`to_groups`: ``[n, m*C, *S] -> [m*n, C, *S]``."""
    if _channels_last(y):
        k = y.dim() - 2
        mem = y.movedim(1, -1).unflatten(-1, (m, -1))  # [n, *S, m, C]
        order = [1 + k, 0, *range(1, 1 + k), 2 + k]
        return mem.permute(order).contiguous().flatten(0, 1).movedim(-1, 1)
    return y.unflatten(1, (m, -1)).transpose(0, 1).flatten(0, 1)


def _detached(t: Tensor | None, dtype: torch.dtype | None) -> Tensor | None:
    if t is None:
        return None
    return t.detach() if dtype is None else t.detach().to(dtype)


def compute_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast would run a convolution or matrix product in, or None."""
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


class GradSlot:
    """Where the m gradients of one parameter go: copied on its first use, added on later ones
    (a parameter used twice), zeroed if never used. Saves zero-filling ``m x params``."""

    __slots__ = ("view", "written")

    def __init__(self, view: Tensor) -> None:
        self.view, self.written = view, False

    def put(self, value: Tensor, j: int | None = None) -> None:
        target = self.view if j is None else self.view[j]
        if self.written:
            target.add_(value)
        else:
            target.copy_(value)

    def close(self) -> None:
        """One use of the parameter is fully written."""
        self.written = True

    def finish(self) -> None:
        if not self.written:
            self.view.zero_()


class _ConvChunkGrad(torch.autograd.Function):
    """A dense convolution whose backward writes the weight gradient of each micro-batch."""

    @staticmethod
    def forward(ctx, x, weight, bias, anchor, slots, spec):
        stride, padding, dilation, groups, m, grouped = spec
        with torch.autocast(x.device.type, enabled=False):
            out = torch.convolution(
                x, weight, bias, stride, padding, dilation, False, [0] * len(stride), groups
            )
        ctx.save_for_backward(x, weight)
        ctx.slots, ctx.spec, ctx.has_bias = slots, spec, bias is not None
        return out

    @staticmethod
    def backward(ctx, go):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups, m, grouped = ctx.spec
        stash_w, stash_b = ctx.slots
        bias_sizes = [weight.shape[0]] if ctx.has_bias else None
        zeros = [0] * len(stride)
        gx = None
        if ctx.needs_input_grad[0]:
            gx = torch.ops.aten.convolution_backward(
                go, x, weight, None, stride, padding, dilation, False, zeros, groups,
                [True, False, False],
            )[0]  # fmt: skip
        mask = [False, stash_w is not None, stash_b is not None]
        if grouped:
            # One grouped convolution computes all m weight gradients at once (GPU-friendly).
            xg, gog = to_groups(x, m), to_groups(go, m)
            wg = weight.repeat(m, *[1] * (weight.dim() - 1))
            sizes = [m * weight.shape[0]] if mask[2] else None
            _, gw, gb = torch.ops.aten.convolution_backward(
                gog, xg, wg, sizes, stride, padding, dilation, False, zeros, groups * m, mask
            )
            if stash_w is not None:
                stash_w.put(gw.unflatten(0, (m, weight.shape[0])))
            if stash_b is not None:
                stash_b.put(gb.unflatten(0, (m, weight.shape[0])))
        else:
            for j, (xj, goj) in enumerate(zip(x.chunk(m), go.chunk(m), strict=True)):
                _, gw, gb = torch.ops.aten.convolution_backward(
                    goj, xj, weight, bias_sizes, stride, padding, dilation, False, zeros,
                    groups, mask,
                )  # fmt: skip
                if stash_w is not None:
                    stash_w.put(gw, j)
                if stash_b is not None:
                    stash_b.put(gb, j)
        for slot in ctx.slots:
            if slot is not None:
                slot.close()
        return gx, None, None, None, None, None


class _LinearChunkGrad(torch.autograd.Function):
    """A dense linear layer whose backward writes the weight gradient of each micro-batch."""

    @staticmethod
    def forward(ctx, x, weight, bias, anchor, slots, m):
        with torch.autocast(x.device.type, enabled=False):
            out = F.linear(x, weight, bias)
        ctx.save_for_backward(x, weight)
        ctx.slots, ctx.m = slots, m
        return out

    @staticmethod
    def backward(ctx, go):
        x, weight = ctx.saved_tensors
        stash_w, stash_b = ctx.slots
        gx = go @ weight if ctx.needs_input_grad[0] else None
        go3 = go.reshape(ctx.m, -1, go.shape[-1])
        if stash_w is not None:
            stash_w.put(torch.bmm(go3.transpose(1, 2), x.reshape(ctx.m, -1, x.shape[-1])))
            stash_w.close()
        if stash_b is not None:
            stash_b.put(go3.sum(1))
            stash_b.close()
        return gx, None, None, None, None, None


class ChunkedForward(TorchFunctionMode):
    """Run ``model(inputs)`` once as ``micro_batches`` independent micro-batches.

    ``kind="grads"``: the unperturbed pass. BatchNorm running statistics update per micro-batch
    in order; after ``backward`` of the summed micro-batch losses, ``stash[id(p)]`` (shape
    ``[m, *p.shape]``, uninitialised memory is fine) holds each micro-batch's gradient once
    :meth:`harvest` has run.

    ``kind="perturbed"``: parameter p acts as ``p + eps[id(p)][j]`` on micro-batch j and no
    running statistic changes (the caller restores buffers); the backward of the summed losses
    accumulates ``sum_j grad_j`` into ``p.grad``.
    """

    def __init__(
        self,
        *,
        batch: int,
        micro_batches: int,
        params: Sequence[Tensor],
        kind: str,
        stash: dict[int, Tensor] | None = None,
        eps: dict[int, Tensor] | None = None,
        grouped_conv: bool = False,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        if kind not in ("grads", "perturbed"):
            raise ValueError(f"unknown kind {kind!r}")
        self.batch, self.m = batch, micro_batches
        self.n = batch // micro_batches
        self.params = {id(p): p for p in params}
        self.kind = kind
        self.slots = {key: GradSlot(view) for key, view in (stash or {}).items()}
        self.eps = eps or {}
        self.grouped_conv = grouped_conv
        self._stacks: dict[int, Tensor] = {}
        self._leaves: list[tuple[Tensor, Tensor]] = []
        # Makes the rewritten layers' outputs require grad even where neither input does (the
        # first layer), so their backward runs; on the batch's device, so autograd's streams and
        # CUDA graph capture see one device.
        self.anchor = torch.zeros((), device=device, requires_grad=True)
        self._handlers: dict[Callable, Callable] = {
            torch.conv1d: self._conv,
            torch.conv2d: self._conv,
            torch.conv3d: self._conv,
            F.linear: self._linear,
            F.batch_norm: self._batch_norm,
            F.layer_norm: self._layer_norm,
            F.group_norm: self._group_norm,
            Tensor.expand: self._expand,
        }
        for func in _ELEMENTWISE:
            self._handlers[func] = self._elementwise

    # -- bookkeeping -------------------------------------------------------------------------

    def _is_param(self, t: Any) -> bool:
        return isinstance(t, Tensor) and id(t) in self.params

    def stack(self, p: Tensor) -> Tensor:
        """``[m, *p.shape]``: row j is what micro-batch j sees of parameter p."""
        key = id(p)
        if key not in self._stacks:
            if self.kind == "grads":
                leaf = p.detach().expand(self.m, *p.shape).requires_grad_()
                self._leaves.append((leaf, self.slots[key]))
                self._stacks[key] = leaf
            else:
                self._stacks[key] = p.unsqueeze(0) + self.eps[key]
        return self._stacks[key]

    def rows(self, t: Tensor | None) -> list[Tensor | None]:
        """Per-micro-batch versions of an argument: stack rows for parameters, else itself."""
        if self._is_param(t):
            return list(self.stack(t).unbind(0))
        return [t] * self.m

    def harvest(self) -> None:
        """After backward: the gradients of the per-micro-batch copies go into the stash, and
        parameters that were never used get zeros."""
        for leaf, slot in self._leaves:
            if leaf.grad is not None:
                slot.put(leaf.grad)
                slot.close()
        for slot in self.slots.values():
            slot.finish()
        self._leaves.clear()
        self._stacks.clear()

    def _check_batch(self, t: Tensor, what: str) -> None:
        if t.dim() == 0 or t.shape[0] != self.batch:
            raise NotApplicable(
                f"{what} on a tensor whose first dimension ({tuple(t.shape)}) is not the batch"
            )

    # -- dispatch ----------------------------------------------------------------------------

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = self._handlers.get(func)
        if handler is not None:
            return handler(func, args, kwargs)
        if func in _DROPOUTS:
            bound = _bind(("input", "p", "training"), {"p": 0.5, "training": True}, args, kwargs)
            if bound["training"] and bound["p"] > 0:
                raise NotApplicable("dropout in train mode draws different masks than the loop")
        elif func is F.scaled_dot_product_attention:
            if kwargs.get("dropout_p", args[4] if len(args) > 4 else 0.0):
                raise NotApplicable("attention dropout draws different masks than the loop")
        elif func in _RANDOM:
            name = getattr(func, "__name__", str(func))
            raise NotApplicable(f"random operation {name} draws differently than the loop")
        elif getattr(func, "__name__", "") not in _METADATA:
            for a in (*args, *kwargs.values()):
                if self._is_param(a) or (
                    isinstance(a, (list, tuple)) and any(self._is_param(b) for b in a)
                ):
                    name = getattr(func, "__name__", str(func))
                    raise NotApplicable(f"a parameter is used by {name}, which is not rewritten")
        return func(*args, **kwargs)

    # -- handlers ----------------------------------------------------------------------------

    def _conv(self, func, args, kwargs):
        a = _bind(_CONV_ARGS, _CONV_DEFAULTS, args, kwargs)
        x, weight, bias = a["input"], a["weight"], a["bias"]
        w_param, b_param = self._is_param(weight), self._is_param(bias)
        if not (w_param or b_param):
            return func(*args, **kwargs)
        self._check_batch(x, "a convolution")
        k = _CONVS[func]
        stride, dilation = _tuple(a["stride"], k), _tuple(a["dilation"], k)
        padding = a["padding"]
        if isinstance(padding, str):
            if padding == "valid":
                padding = 0
            else:  # 'same': symmetric padding only (odd effective kernel sizes)
                total = [d * (s - 1) for d, s in zip(dilation, weight.shape[2:], strict=True)]
                if any(t % 2 for t in total):
                    raise NotApplicable("asymmetric 'same' padding is not rewritten")
                padding = [t // 2 for t in total]
        padding, groups = _tuple(padding, k), int(a["groups"])
        if self.kind == "grads":
            dtype = compute_dtype(x.device.type)
            if dtype is not None and x.is_floating_point():
                x = x.to(dtype)
            w, b = _detached(weight, dtype), _detached(bias, dtype)
            slots = (
                self.slots[id(weight)] if w_param else None,
                self.slots[id(bias)] if b_param else None,
            )
            spec = (stride, padding, dilation, groups, self.m, self.grouped_conv)
            return _ConvChunkGrad.apply(x, w, b, self.anchor, slots, spec)
        if self.grouped_conv:
            m = self.m
            xg = to_groups(x, m)
            ones = [1] * (weight.dim() - 1)
            wg = self.stack(weight).flatten(0, 1) if w_param else weight.repeat(m, *ones)
            bg = None
            if bias is not None:
                bg = self.stack(bias).flatten(0, 1) if b_param else bias.repeat(m)
            out = func(xg, wg, bg, stride, padding, dilation, groups * m)
            return from_groups(out, m)
        ws, bs = self.rows(weight), self.rows(bias)
        outs = [
            func(xj, wj, bj, stride, padding, dilation, groups)
            for xj, wj, bj in zip(x.chunk(self.m), ws, bs, strict=True)
        ]
        return torch.cat(outs)

    def _linear(self, func, args, kwargs):
        a = _bind(_LINEAR_ARGS, {"bias": None}, args, kwargs)
        x, weight, bias = a["input"], a["weight"], a["bias"]
        w_param, b_param = self._is_param(weight), self._is_param(bias)
        if not (w_param or b_param):
            return func(*args, **kwargs)
        self._check_batch(x, "a linear layer")
        if self.kind == "grads":
            dtype = compute_dtype(x.device.type)
            if dtype is not None and x.is_floating_point():
                x = x.to(dtype)
            w, b = _detached(weight, dtype), _detached(bias, dtype)
            slots = (
                self.slots[id(weight)] if w_param else None,
                self.slots[id(bias)] if b_param else None,
            )
            return _LinearChunkGrad.apply(x, w, b, self.anchor, slots, self.m)
        x3 = x.reshape(self.m, -1, x.shape[-1])
        w3 = self.stack(weight) if w_param else weight.unsqueeze(0).expand(self.m, -1, -1)
        if bias is None:
            out = torch.bmm(x3, w3.transpose(1, 2))
        else:
            b3 = self.stack(bias) if b_param else bias.unsqueeze(0).expand(self.m, -1)
            out = torch.baddbmm(b3.unsqueeze(1), x3, w3.transpose(1, 2))
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def _batch_norm(self, func, args, kwargs):
        a = _bind(_BN_ARGS, _BN_DEFAULTS, args, kwargs)
        x, training = a["input"], a["training"]
        params = self._is_param(a["weight"]) or self._is_param(a["bias"])
        if not training and not params:
            return func(*args, **kwargs)  # running statistics only: a per-sample operation
        self._check_batch(x, "batch norm")
        running_mean, running_var = a["running_mean"], a["running_var"]
        if self.kind == "perturbed" and training:
            running_mean = running_var = None  # batch statistics, no running update
        ws, bs = self.rows(a["weight"]), self.rows(a["bias"])
        outs = [
            func(xj, running_mean, running_var, wj, bj, training, a["momentum"], a["eps"])
            for xj, wj, bj in zip(x.chunk(self.m), ws, bs, strict=True)
        ]
        return torch.cat(outs)

    def _affine(self, y: Tensor, weight: Any, bias: Any, param_shape: list[int]) -> Tensor:
        """``y * weight + bias`` with per-micro-batch parameters, ``param_shape`` broadcastable
        against one sample of ``y``; the result keeps ``y``'s dtype as the fused kernel does."""
        m = self.m
        ym = y.unflatten(0, (m, self.n))

        def shaped(t: Any) -> Any:
            if t is None:
                return None
            if self._is_param(t):
                return self.stack(t).reshape(m, 1, *param_shape)
            return t.reshape(param_shape)

        w, b = shaped(weight), shaped(bias)
        if w is not None:
            ym = ym * w
        if b is not None:
            ym = ym + b
        return ym.flatten(0, 1).to(y.dtype)

    def _layer_norm(self, func, args, kwargs):
        a = _bind(_LN_ARGS, _NORM_DEFAULTS, args, kwargs)
        x, weight, bias = a["input"], a["weight"], a["bias"]
        if not (self._is_param(weight) or self._is_param(bias)):
            return func(*args, **kwargs)
        self._check_batch(x, "layer norm")
        shape = list(a["normalized_shape"])
        y = func(x, shape, None, None, a["eps"])
        return self._affine(y, weight, bias, [1] * (x.dim() - 1 - len(shape)) + shape)

    def _group_norm(self, func, args, kwargs):
        a = _bind(_GN_ARGS, _NORM_DEFAULTS, args, kwargs)
        x, weight, bias = a["input"], a["weight"], a["bias"]
        if not (self._is_param(weight) or self._is_param(bias)):
            return func(*args, **kwargs)
        self._check_batch(x, "group norm")
        y = func(x, a["num_groups"], None, None, a["eps"])
        return self._affine(y, weight, bias, [x.shape[1]] + [1] * (x.dim() - 2))

    def _elementwise(self, func, args, kwargs):
        """``x + p`` / ``x * p`` with p broadcast over the batch (position embeddings, layer
        scales): p becomes per-micro-batch rows."""
        positions = [i for i, t in enumerate(args) if self._is_param(t)]
        if not positions and not any(self._is_param(v) for v in kwargs.values()):
            return func(*args, **kwargs)
        others = [i for i, t in enumerate(args) if isinstance(t, Tensor) and i not in positions]
        if len(positions) != 1 or len(others) != 1 or (func in _INPLACE and positions[0] == 0):
            raise NotApplicable("a parameter is combined with something other than one batch")
        p, t = args[positions[0]], args[others[0]]
        if (
            t.dim() < p.dim()
            or t.shape[0] != self.batch
            or (p.dim() == t.dim() and p.shape[0] != 1)
        ):
            raise NotApplicable("a parameter is not broadcast over the batch")
        full = [1] * (t.dim() - p.dim()) + list(p.shape)
        new = list(args)
        new[positions[0]] = self.stack(p).reshape(self.m, 1, *full[1:])
        new[others[0]] = t.unflatten(0, (self.m, self.n))
        out = func(*new, **kwargs)
        return t if func in _INPLACE else out.flatten(0, 1)

    def _expand(self, func, args, kwargs):
        p = args[0]
        if not self._is_param(p):
            return func(*args, **kwargs)
        sizes = args[1:] if len(args) > 2 or not isinstance(args[1], (tuple, list)) else args[1]
        target = p.expand(*sizes, **kwargs).shape
        if target[0] != self.batch or (len(target) == p.dim() and p.shape[0] != 1):
            raise NotApplicable("a parameter is expanded to something other than the batch")
        full = [1] * (len(target) - p.dim()) + list(p.shape)
        rows = self.stack(p).reshape(self.m, 1, *full[1:])
        return rows.expand(self.m, self.n, *target[1:]).flatten(0, 1)
