"""Every strategy in msam.STRATEGIES against the paper's definition (``reference_msam``) and
against the reference loop: gradients, BatchNorm statistics, bitwise restore, hooks, scaling,
autocast; and ``auto`` never picking a strategy that is not exact for the model."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers.reference import reference_msam
from helpers.tinymodels import make_batch, make_model
from torch import nn
from torch.nn.functional import cross_entropy

import msam
import msam._backward
from msam._backward import choose_strategy
from msam._strategies import fused
from msam.models import create_model

#: The strategies that run on a CPU (the graphed ones need CUDA).
NAMES = sorted(
    name
    for name, s in msam.STRATEGIES.items()
    if s.check(make_model("mlp"), make_batch("mlp")[0], 2) is None
)


@pytest.fixture(params=NAMES)
def strategy(request) -> str:
    return request.param


@pytest.fixture(params=[False, True], ids=["per-chunk-conv", "grouped-conv"])
def grouped(request, monkeypatch) -> bool:
    """Both convolution paths of the fused strategies: the CPU one and the CUDA one."""
    monkeypatch.setattr(fused, "GROUPED_CONV", request.param)
    return request.param


def _grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("rho", [0.0, 0.05, 0.5])
@pytest.mark.parametrize("m", [1, 2, 4, 8])
def test_matches_reference(strategy, kind, m, rho, adaptive):
    _check_reference(strategy, kind, m, rho, adaptive)


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("m", [1, 4])
@pytest.mark.parametrize("kind_", ["conv_bn", "conv_gn"])
@pytest.mark.parametrize("strategy_", [s for s in NAMES if s != "loop"])
def test_grouped_convolutions_match_reference(strategy_, kind_, m, adaptive, grouped):
    _check_reference(strategy_, kind_, m, 0.5, adaptive)


def _check_reference(strategy: str, kind: str, m: int, rho: float, adaptive: bool) -> None:
    model = make_model(kind)
    x, y = make_batch(kind)
    expected, expected_buffers = reference_msam(
        copy.deepcopy(model), x, y, rho=rho, m=m, adaptive=adaptive
    )
    loss = msam.backward(
        model, cross_entropy, x, y, rho=rho, micro_batches=m, adaptive=adaptive, strategy=strategy
    )
    for p, e in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, e, rtol=1e-9, atol=1e-11)
    for name, b in model.named_buffers():
        torch.testing.assert_close(b, expected_buffers[name], rtol=1e-12, atol=0)
    assert loss.ndim == 0 and not loss.requires_grad


@pytest.mark.parametrize("m", [2, 4])
def test_same_as_loop_including_statistics_and_loss(strategy, kind, m):
    model = make_model(kind)
    twin = copy.deepcopy(model)
    x, y = make_batch(kind)
    loss = msam.backward(model, cross_entropy, x, y, rho=0.1, micro_batches=m, strategy=strategy)
    ref = msam.backward(twin, cross_entropy, x, y, rho=0.1, micro_batches=m, strategy="loop")
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)
    for a, b in zip(_grads(model), _grads(twin), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    # BatchNorm runs the same kernel on the same micro-batches in the same order: bit for bit.
    for (name, b), t in zip(model.named_buffers(), twin.buffers(), strict=True):
        assert torch.equal(b, t), name


@pytest.mark.parametrize("adaptive", [False, True])
def test_parameters_restored_bitwise(strategy, kind, adaptive):
    model = make_model(kind, dtype=torch.float32)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = make_batch(kind, dtype=torch.float32)
    msam.backward(
        model, cross_entropy, x, y, rho=0.5, micro_batches=4, adaptive=adaptive, strategy=strategy
    )
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, b)


def _append(into: list):
    return lambda outputs, targets: into.append((outputs, targets))


def test_on_outputs_sees_the_loops_outputs(strategy, kind):
    model = make_model(kind)
    twin = copy.deepcopy(model)
    x, y = make_batch(kind)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    ref: list[tuple[torch.Tensor, torch.Tensor]] = []
    kw = dict(rho=0.05, micro_batches=4)
    msam.backward(model, cross_entropy, x, y, strategy=strategy, on_outputs=_append(seen), **kw)
    msam.backward(twin, cross_entropy, x, y, strategy="loop", on_outputs=_append(ref), **kw)
    assert len(seen) == len(ref) == 4
    for (o, t), (ro, rt) in zip(seen, ref, strict=True):
        assert not o.requires_grad
        assert torch.equal(t, rt)
        torch.testing.assert_close(o, ro, rtol=1e-12, atol=1e-14)


def test_grad_scaler_norm_on_unscaled_gradients(strategy):
    model = make_model("conv_bn", dtype=torch.float32)
    twin = copy.deepcopy(model)
    x, y = make_batch("conv_bn", dtype=torch.float32)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    kw = dict(rho=0.05, micro_batches=2)
    msam.backward(model, cross_entropy, x, y, scaler=scaler, strategy=strategy, **kw)
    scaler.unscale_(opt)
    msam.backward(twin, cross_entropy, x, y, strategy="loop", **kw)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)


def test_grad_scaler_skips_non_finite_step(strategy):
    model = make_model("conv_gn", dtype=torch.float32)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = make_batch("conv_gn", dtype=torch.float32)
    x[0, 0] = float("inf")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    msam.backward(
        model, cross_entropy, x, y, rho=0.05, micro_batches=2, scaler=scaler, strategy=strategy
    )
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() < 2.0**12
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, b)


def test_autocast_bf16_close_to_loop(strategy, kind):
    model = make_model(kind, dtype=torch.float32)
    twin = copy.deepcopy(model)
    x, y = make_batch(kind, dtype=torch.float32)
    kw = dict(rho=0.05, micro_batches=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = msam.backward(model, cross_entropy, x, y, strategy=strategy, **kw)
        ref = msam.backward(twin, cross_entropy, x, y, strategy="loop", **kw)
    torch.testing.assert_close(loss, ref, rtol=2e-2, atol=1e-3)
    g = torch.cat([p.grad.flatten() for p in model.parameters()])
    r = torch.cat([p.grad.flatten() for p in twin.parameters()])
    assert g.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(g, r, dim=0) > 0.99
    for (name, b), t in zip(model.named_buffers(), twin.buffers(), strict=True):
        torch.testing.assert_close(b, t, rtol=2e-2, atol=1e-3, msg=name)


def test_autocast_does_not_drop_the_perturbation(strategy):
    """Autocast caches the bf16 copy of each weight: after ``w += eps`` in place it must be
    recast, or the perturbed pass silently runs at w and SAM's gradient equals the plain one."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(20, 20), nn.Tanh(), nn.Linear(20, 3))
    x, y = torch.randn(64, 20), torch.randint(0, 3, (64,))

    def grad(rho: float, amp: bool) -> torch.Tensor:
        model = copy.deepcopy(base)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            msam.backward(model, cross_entropy, x, y, rho=rho, micro_batches=2, strategy=strategy)
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    exact, plain, amp = grad(0.5, False), grad(0.0, False), grad(0.5, True)
    assert (exact - plain).norm() > 0.3 * plain.norm()  # the perturbation matters here
    assert (amp - exact).norm() < 0.02 * exact.norm()


def _timm(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return create_model(name, num_classes=3, in_chans=3, img_size=16, **kwargs)


@pytest.mark.parametrize("name", ["test_resnet", "test_vit"])
def test_timm_models_match_loop(strategy, name):
    model = _timm(name).double().train()
    twin = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 16, 16, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (8,), generator=g)
    kw = dict(rho=0.1, micro_batches=4, adaptive=True)
    msam.backward(model, cross_entropy, x, y, strategy=strategy, **kw)
    msam.backward(twin, cross_entropy, x, y, strategy="loop", **kw)
    for (name_, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-8, atol=1e-10, msg=name_)
    for (name_, b), t in zip(model.named_buffers(), twin.buffers(), strict=True):
        torch.testing.assert_close(b, t, rtol=1e-12, atol=0, msg=name_)


class _TiedAndUnused(nn.Module):
    """One layer applied twice (its gradients add up) and one parameter never used."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(12, 12)
        self.head = nn.Linear(12, 3)
        self.unused = nn.Parameter(torch.ones(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.shared(x.flatten(1)))
        return self.head(torch.tanh(self.shared(h)))


@pytest.mark.parametrize("m", [1, 4])
def test_tied_and_unused_parameters(strategy, m):
    torch.manual_seed(0)
    model = _TiedAndUnused().double()
    twin = copy.deepcopy(model)
    x, y = make_batch("mlp")
    msam.backward(model, cross_entropy, x, y, rho=0.2, micro_batches=m, strategy=strategy)
    msam.backward(twin, cross_entropy, x, y, rho=0.2, micro_batches=m, strategy="loop")
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        if q.grad is None:
            assert p.grad is None or not p.grad.any(), name
        else:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=name)


class _MatmulHead(nn.Module):
    """A parameter used through torch.matmul, which the fused rewriting does not cover."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.Tanh())
        self.w = nn.Parameter(torch.randn(6, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) @ self.w


def test_auto_on_cpu_is_the_loop():
    x, _ = make_batch("conv_bn")
    assert msam._backward.AUTO_ORDER["cpu"] == ("loop",)  # measured fastest there
    assert choose_strategy(make_model("conv_bn"), x, 4, rho=0.05) == "loop"


@pytest.fixture
def prefer_fused(monkeypatch):
    """Let auto prefer the fused strategies on the CPU too, as it does on CUDA."""
    monkeypatch.setitem(msam._backward.AUTO_ORDER, "cpu", ("fused", "loop"))


def test_auto_picks_fused_only_when_exact(prefer_fused):
    x, y = make_batch("conv_bn")
    model = make_model("conv_bn")
    assert choose_strategy(model, x, 4, rho=0.05) == "fused"
    assert choose_strategy(model, x, 1, rho=0.05) == "loop"  # SAM: nothing to fuse
    assert choose_strategy(model, x, 4, rho=0.0) == "loop"  # plain gradient accumulation
    dropout = nn.Sequential(make_model("mlp"), nn.Dropout(0.1)).double()
    assert choose_strategy(dropout, x, 4, rho=0.05) == "loop"
    assert choose_strategy(dropout.eval(), x, 4, rho=0.05) == "fused"  # no masks drawn in eval
    momentum_none = make_model("conv_bn")
    momentum_none[1].momentum = None
    assert choose_strategy(momentum_none, x, 4, rho=0.05) == "loop"

    class Wrapped(nn.Module):  # looks like DistributedDataParallel to the strategies
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self.module = module

        def no_sync(self):  # pragma: no cover - only its presence matters
            raise NotImplementedError

    assert choose_strategy(Wrapped(model), x, 4, rho=0.05) == "loop"


def test_refused_at_run_time_falls_back_to_loop_exactly(prefer_fused):
    torch.manual_seed(0)
    model = _MatmulHead().double()
    twin = copy.deepcopy(model)
    x, y = make_batch("mlp")
    assert choose_strategy(model, x, 4, rho=0.1) == "fused"  # nothing static gives it away
    msam.backward(model, cross_entropy, x, y, rho=0.1, micro_batches=4)
    msam.backward(twin, cross_entropy, x, y, rho=0.1, micro_batches=4, strategy="loop")
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=0)
    assert choose_strategy(model, x, 4, rho=0.1) == "loop"  # remembered
    with pytest.raises(ValueError, match="not exact for this model"):
        msam.backward(model, cross_entropy, x, y, rho=0.1, micro_batches=4, strategy="batched")


def test_random_operation_refused_at_run_time():
    class Noisy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(12, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x.flatten(1) + 0.1 * torch.randn_like(x.flatten(1)))

    model = Noisy().double()
    x, y = make_batch("mlp")
    with pytest.raises(ValueError, match="random operation randn_like"):
        msam.backward(model, cross_entropy, x, y, rho=0.1, micro_batches=2, strategy="fused")
    assert all(p.grad is None for p in model.parameters())


def test_every_strategy_is_described():
    assert {"loop", "fused", "batched"} <= set(NAMES)
    for name, s in msam.STRATEGIES.items():
        assert s.name == name and s.summary
        assert s.cuda_only == name.startswith("graphed_")  # configs are refused on other devices


@pytest.mark.parametrize("name", [n for n in msam.STRATEGIES if n.startswith("graphed_")])
def test_graphed_strategies_need_cuda(name):
    model = make_model("conv_bn")
    x, y = make_batch("conv_bn")
    assert "CUDA" in msam.STRATEGIES[name].check(model, x, 2)
    assert not choose_strategy(model, x, 2, rho=0.1).startswith("graphed_")
    with pytest.raises(ValueError, match="CUDA graphs need"):
        msam.backward(model, cross_entropy, x, y, rho=0.1, micro_batches=2, strategy=name)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("kind_", ["conv_bn", "conv_gn"])
@pytest.mark.parametrize("strategy_", [s for s in NAMES if s != "loop"])
def test_channels_last_inputs(strategy_, grouped, kind_):
    strategy = strategy_
    model = make_model(kind_).to(memory_format=torch.channels_last)
    twin = copy.deepcopy(model)
    x, y = make_batch(kind_, batch=8)
    x = torch.nn.functional.interpolate(x, size=(5, 5))
    x = x.contiguous(memory_format=torch.channels_last)
    kw = dict(rho=0.1, micro_batches=4)
    msam.backward(model, cross_entropy, x, y, strategy=strategy, **kw)
    msam.backward(twin, cross_entropy, x, y, strategy="loop", **kw)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-11)


def test_unexpected_failure_under_auto_falls_back_to_an_exact_loop(monkeypatch, prefer_fused):
    """A failure half-way (BatchNorm statistics already updated by the fused first pass) leaves
    the model as it was; auto warns and the loop gives the reference result."""
    model = make_model("conv_bn")
    twin = copy.deepcopy(model)
    x, y = make_batch("conv_bn")

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(fused, "_ascent_steps", boom)
    with pytest.warns(RuntimeWarning, match="'fused' failed .*boom"):
        msam.backward(model, cross_entropy, x, y, rho=0.1, micro_batches=4)
    msam.backward(twin, cross_entropy, x, y, rho=0.1, micro_batches=4, strategy="loop")
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)
    for b, t in zip(model.buffers(), twin.buffers(), strict=True):
        assert torch.equal(b, t)
    assert choose_strategy(model, x, 4, rho=0.1) == "loop"
    with pytest.raises(RuntimeError, match="boom"):
        msam.backward(twin, cross_entropy, x, y, rho=0.1, micro_batches=4, strategy="fused")


def test_ascent_norms_accurate_over_millions_of_float32_entries():
    """One float32 norm over a 4M-entry row loses ~1e-4 relative on the CPU; the fused
    strategies' ascent steps must not (the loop's per-parameter norms do not)."""
    g = torch.Generator().manual_seed(0)
    flat = torch.randn(2, 4_000_000, generator=g) * 1e-3
    params = [torch.ones(4_000_000)]
    expected = flat.double() * (0.05 / torch.linalg.vector_norm(flat.double(), dim=1, keepdim=True))
    fused._ascent_steps(flat, params, rho=0.05, adaptive=False, inv_scale=1.0)
    torch.testing.assert_close(flat.double(), expected, rtol=1e-6, atol=0)
