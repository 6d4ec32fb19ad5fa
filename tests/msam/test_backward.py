"""msam.backward against the paper's definition, written independently in helpers/reference.py."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers.reference import reference_msam
from helpers.tinymodels import make_batch, make_model
from torch.nn.functional import cross_entropy

import msam


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("rho", [0.0, 0.05, 0.5])
@pytest.mark.parametrize("m", [1, 2, 4, 8])
def test_matches_reference(kind, m, rho, adaptive):
    model = make_model(kind)
    x, y = make_batch(kind)
    expected, expected_buffers = reference_msam(
        copy.deepcopy(model), x, y, rho=rho, m=m, adaptive=adaptive
    )
    loss = msam.backward(model, cross_entropy, x, y, rho=rho, micro_batches=m, adaptive=adaptive)
    for p, e in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, e, rtol=1e-9, atol=1e-11)
    for name, b in model.named_buffers():
        torch.testing.assert_close(b, expected_buffers[name], rtol=1e-12, atol=0)
    assert loss.ndim == 0 and not loss.requires_grad


@pytest.mark.parametrize("adaptive", [False, True])
def test_parameters_restored_bitwise(kind, adaptive):
    model = make_model(kind, dtype=torch.float32)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = make_batch(kind, dtype=torch.float32)
    msam.backward(model, cross_entropy, x, y, rho=0.5, micro_batches=4, adaptive=adaptive)
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, b)


def test_bn_statistics_as_if_micro_batches_forwarded_in_order():
    model = make_model("conv_bn")
    twin = copy.deepcopy(model)
    x, y = make_batch("conv_bn")
    msam.backward(model, cross_entropy, x, y, rho=0.5, micro_batches=4)
    with torch.no_grad():
        for xj in x.chunk(4):
            twin(xj)
    for (name, b), t in zip(model.named_buffers(), twin.buffers(), strict=True):
        assert torch.equal(b, t), name
    assert int(model[1].num_batches_tracked) == 4


def test_m1_is_sam_two_step():
    model = make_model("conv_gn")
    twin = copy.deepcopy(model)
    x, y = make_batch("conv_gn")
    msam.backward(model, cross_entropy, x, y, rho=0.1, micro_batches=1)
    opt = msam.SAM(twin.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    cross_entropy(twin(x), y).backward()
    opt.first_step(zero_grad=True)
    cross_entropy(twin(x), y).backward()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind_", ["mlp", "conv_gn"])
def test_rho_zero_is_plain_gradient(kind_):
    model = make_model(kind_)
    twin = copy.deepcopy(model)
    x, y = make_batch(kind_)
    msam.backward(model, cross_entropy, x, y, rho=0.0, micro_batches=4)
    cross_entropy(twin(x), y).backward()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12)


def test_replaces_existing_grad():
    model = make_model("mlp")
    x, y = make_batch("mlp")
    msam.backward(model, cross_entropy, x, y, rho=0.05, micro_batches=2)
    first = [p.grad.clone() for p in model.parameters()]
    msam.backward(model, cross_entropy, x, y, rho=0.05, micro_batches=2)
    for p, f in zip(model.parameters(), first, strict=True):
        torch.testing.assert_close(p.grad, f)


def test_frozen_parameters_untouched():
    model = make_model("mlp")
    model[1].weight.requires_grad_(False)
    before = model[1].weight.detach().clone()
    x, y = make_batch("mlp")
    msam.backward(model, cross_entropy, x, y, rho=0.5, micro_batches=2)
    assert model[1].weight.grad is None
    assert torch.equal(model[1].weight, before)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rho": 0.05, "micro_batches": 3}, "not divisible by micro_batches=3"),
        ({"rho": 0.05, "micro_batches": 0}, "micro_batches must be an integer >= 1"),
        ({"rho": -0.1}, "rho must be >= 0"),
        ({"rho": 0.05, "strategy": "warp"}, "unknown strategy 'warp'"),
    ],
)
def test_errors(kwargs, message):
    model = make_model("mlp")
    x, y = make_batch("mlp")
    with pytest.raises(ValueError, match=message):
        msam.backward(model, cross_entropy, x, y, **kwargs)


def test_autocast_bf16_close_to_fp32():
    model = make_model("conv_bn", dtype=torch.float32)
    twin = copy.deepcopy(model)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = make_batch("conv_bn", dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = msam.backward(model, cross_entropy, x, y, rho=0.05, micro_batches=2)
    msam.backward(twin, cross_entropy, x, y, rho=0.05, micro_batches=2)
    assert torch.isfinite(loss)
    for p, b in zip(model.parameters(), before, strict=True):
        assert p.grad.dtype == torch.float32
        assert torch.equal(p, b)
    # bf16 keeps ~3 significant digits: compare the whole gradient's direction and size.
    g16 = torch.cat([p.grad.flatten() for p in model.parameters()])
    g32 = torch.cat([p.grad.flatten() for p in twin.parameters()])
    assert torch.nn.functional.cosine_similarity(g16, g32, dim=0) > 0.95
    assert abs(g16.norm() / g32.norm() - 1) < 0.1


def test_autocast_bf16_matches_two_step_sam_under_autocast():
    model = make_model("conv_gn", dtype=torch.float32)
    twin = copy.deepcopy(model)
    x, y = make_batch("conv_gn", dtype=torch.float32)
    opt = msam.SAM(twin.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        msam.backward(model, cross_entropy, x, y, rho=0.05, micro_batches=1)
    # Each pass in its own autocast region: autocast caches the bf16 copies of the weights for
    # the length of a region, so a perturbed pass inside the same region would see stale weights.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cross_entropy(twin(x), y).backward()
    opt.first_step(zero_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cross_entropy(twin(x), y).backward()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-4)


def test_grad_scaler_norm_on_unscaled_gradients():
    model = make_model("conv_gn", dtype=torch.float32)
    twin = copy.deepcopy(model)
    x, y = make_batch("conv_gn", dtype=torch.float32)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    msam.backward(model, cross_entropy, x, y, rho=0.05, micro_batches=2, scaler=scaler)
    scaler.unscale_(opt)
    msam.backward(twin, cross_entropy, x, y, rho=0.05, micro_batches=2)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)


def test_grad_scaler_skips_non_finite_step():
    model = make_model("mlp", dtype=torch.float32)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = make_batch("mlp", dtype=torch.float32)
    x[0, 0] = float("inf")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    msam.backward(model, cross_entropy, x, y, rho=0.05, micro_batches=2, scaler=scaler)
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() < 2.0**12
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, b)


def test_gradient_clipping_composes():
    model = make_model("mlp", dtype=torch.float32)
    x, y = make_batch("mlp", dtype=torch.float32)
    base = torch.optim.SGD(model.parameters(), lr=0.0)
    opt = msam.MSAM(model, base, rho=0.5, micro_batches=4)
    opt.update(x * 100, y, grad_clip=1e-3)
    total = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert total <= 1e-3 * (1 + 1e-5)
