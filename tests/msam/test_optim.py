"""The SAM two-step wrapper and the MSAM whole-update wrapper against plain hand-written updates."""

from __future__ import annotations

import copy

import pytest
import timm.optim
import timm.scheduler
import torch
from helpers.tinymodels import make_batch, make_model
from torch.nn.functional import cross_entropy

import msam

LR, MOMENTUM, RHO, WD = 0.1, 0.9, 0.05, 1e-3


def hand_sam_run(model, batches, adaptive=False):
    """Three SAM steps of SGD with momentum and weight decay, written out plainly."""
    params = list(model.parameters())
    bufs = [None] * len(params)
    for x, y in batches:
        g = torch.autograd.grad(cross_entropy(model(x), y), params)
        if adaptive:
            norm = torch.sqrt(sum(((p.abs() * gi) ** 2).sum() for p, gi in zip(params, g)))
            eps = [RHO * p.detach() ** 2 * gi / norm for p, gi in zip(params, g)]
        else:
            norm = torch.sqrt(sum((gi**2).sum() for gi in g))
            eps = [RHO * gi / norm for gi in g]
        w = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, e in zip(params, eps):
                p.add_(e)
        h = torch.autograd.grad(cross_entropy(model(x), y), params)
        with torch.no_grad():
            for i, (p, wi, hi) in enumerate(zip(params, w, h)):
                d = hi + WD * wi
                bufs[i] = d.clone() if bufs[i] is None else MOMENTUM * bufs[i] + d
                p.copy_(wi - LR * bufs[i])
    return model


def batches(kind, n=3):
    return [make_batch(kind, seed=s) for s in range(n)]


@pytest.mark.parametrize("adaptive", [False, True])
def test_two_step_interface_three_steps(adaptive):
    model = make_model("conv_gn")
    expected = hand_sam_run(copy.deepcopy(model), batches("conv_gn"), adaptive)
    opt = msam.SAM(
        model.parameters(),
        torch.optim.SGD,
        rho=RHO,
        adaptive=adaptive,
        lr=LR,
        momentum=MOMENTUM,
        weight_decay=WD,
    )
    for x, y in batches("conv_gn"):
        cross_entropy(model(x), y).backward()
        opt.first_step(zero_grad=True)
        cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)
    for p, q in zip(model.parameters(), expected.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_step_with_closure_equals_two_step():
    model = make_model("mlp")
    expected = hand_sam_run(copy.deepcopy(model), batches("mlp"))
    opt = msam.SAM(
        model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=MOMENTUM, weight_decay=WD
    )
    for x, y in batches("mlp"):

        def closure(x=x, y=y):
            loss = cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.zero_grad()
        opt.step(closure)
    for p, q in zip(model.parameters(), expected.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_param_groups_shared_and_torch_scheduler_drives_base():
    model = make_model("mlp")
    opt = msam.SAM(model.parameters(), torch.optim.SGD, lr=1.0, momentum=0.9)
    assert opt.param_groups is opt.base_optimizer.param_groups
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = make_batch("mlp")
    for _ in range(2):
        cross_entropy(model(x), y).backward()
        opt.first_step(zero_grad=True)
        cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)
        sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.25)


def test_timm_scheduler_and_timm_optimizer():
    model = make_model("conv_gn")
    base = timm.optim.create_optimizer_v2(model, opt="sgd", lr=0.5, momentum=0.9, weight_decay=1e-4)
    opt = msam.SAM(None, base, rho=RHO)
    sched, _ = timm.scheduler.create_scheduler_v2(
        opt,
        sched="cosine",
        num_epochs=4,
        warmup_epochs=0,
        step_on_epochs=False,
        updates_per_epoch=1,
    )
    assert len(opt.param_groups) == 2  # timm splits off norms and biases (no weight decay)
    lrs = []
    for step in range(4):
        sched.step_update(step)
        lrs.append(base.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(0.5) and lrs[-1] < lrs[1] < lrs[0]


def test_state_dict_round_trip():
    model = make_model("mlp")
    opt = msam.SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=MOMENTUM)

    def run(m, o, data):
        for x, y in data:
            cross_entropy(m(x), y).backward()
            o.first_step(zero_grad=True)
            cross_entropy(m(x), y).backward()
            o.second_step(zero_grad=True)

    run(model, opt, batches("mlp", 2))
    state = copy.deepcopy(opt.state_dict())
    assert any("momentum_buffer" in s for s in state["state"].values())
    twin = copy.deepcopy(model)
    opt2 = msam.SAM(twin.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=MOMENTUM)
    opt2.load_state_dict(state)
    more = [make_batch("mlp", seed=9)]
    run(model, opt, more)
    run(twin, opt2, more)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)


def test_msam_update_equals_backward_then_base_step():
    model = make_model("conv_bn")
    twin = copy.deepcopy(model)
    x, y = make_batch("conv_bn")
    opt = msam.MSAM(
        model,
        torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM),
        rho=RHO,
        micro_batches=4,
    )
    loss = opt.update(x, y)
    base = torch.optim.SGD(twin.parameters(), lr=LR, momentum=MOMENTUM)
    ref_loss = msam.backward(twin, cross_entropy, x, y, rho=RHO, micro_batches=4)
    base.step()
    assert torch.equal(loss, ref_loss)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)
    assert opt.param_groups is opt.base_optimizer.param_groups


def test_msam_wraps_timm_optimizer_and_rejects_bad_args():
    model = make_model("conv_gn")
    base = timm.optim.create_optimizer_v2(model, opt="adamw", lr=1e-3, weight_decay=0.05)
    opt = msam.MSAM(model, base, rho=RHO, micro_batches=2)
    x, y = make_batch("conv_gn")
    before = [p.detach().clone() for p in model.parameters()]
    opt.update(x, y)
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    with pytest.raises(ValueError, match="rho must be >= 0"):
        msam.MSAM(model, base, rho=-1.0)
    with pytest.raises(ValueError, match="micro_batches"):
        msam.MSAM(model, base, micro_batches=0)
    with pytest.raises(ValueError, match="rho must be >= 0"):
        msam.SAM(model.parameters(), torch.optim.SGD, rho=-1.0, lr=0.1)
