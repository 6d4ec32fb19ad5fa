"""The SAM two-step wrapper and the MSAM whole-update wrapper against plain hand-written updates."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import timm.optim
import timm.scheduler
import torch
from helpers.tinymodels import make_batch, make_model
from torch.nn.functional import cross_entropy

import msam
import msam.optim

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


@pytest.mark.parametrize(
    ("optimizer", "rho", "evals"),
    [("sgd", 0.0, 1), ("sgd", 0.05, 1), ("sam", 0.05, 2), ("msam", 0.05, 2), ("msam", 0.0, 1)],
)
def test_grad_evals_per_update(optimizer, rho, evals):
    from msam.config import parse_train_config
    from msam.trainer import grad_evals_per_update as of_config

    assert msam.optim.grad_evals_per_update(optimizer, rho) == evals
    cfg = parse_train_config(
        {"data": {"dataset": "digits"}, "optim": {"name": optimizer, "rho": rho}}
    )
    assert of_config(cfg) == evals


def test_grad_evals_per_update_refuses_unknown_optimizers_and_needs_no_torch():
    with pytest.raises(ValueError, match="unknown optimizer 'adam'"):
        msam.optim.grad_evals_per_update("adam", 0.05)
    code = (
        "import sys; from msam.optim import grad_evals_per_update as g; "
        "assert g('sam', 0.05) == 2; assert 'torch' not in sys.modules, 'imported torch'"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_sam_two_step_is_msam_backward_with_one_micro_batch():
    """SAM's ascent step is msam.backward's (one shared function): the same update, bitwise."""
    model = make_model("conv_gn")
    twin = copy.deepcopy(model)
    opt = msam.SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=MOMENTUM)
    base = torch.optim.SGD(twin.parameters(), lr=LR, momentum=MOMENTUM)
    for x, y in batches("conv_gn"):
        cross_entropy(model(x), y).backward()
        opt.first_step(zero_grad=True)
        cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)
        msam.backward(twin, cross_entropy, x, y, rho=RHO, micro_batches=1, strategy="loop")
        base.step()
        for p, q in zip(model.parameters(), twin.parameters(), strict=True):
            assert torch.equal(p, q)


@pytest.mark.parametrize("kind", ["nan", "inf", "overflow"])
def test_sam_first_step_with_a_non_finite_gradient_norm_leaves_weights_alone(kind):
    """NaN or inf gradients, or finite ones whose norm overflows: no step, as in msam.backward
    (its perturbation, shared), rather than NaN weights."""
    model = make_model("conv_gn")
    twin = copy.deepcopy(model)
    dtype = next(model.parameters()).dtype
    factor = {"nan": float("nan"), "inf": float("inf")}.get(kind, torch.finfo(dtype).max / 1e3)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = make_batch("conv_gn")

    def loss_fn(out, target):
        return cross_entropy(out, target) * factor

    loss_fn(model(x), y).backward()
    assert not torch.isfinite(
        torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in model.parameters()]))
    )
    opt = msam.SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR)
    opt.first_step()
    msam.backward(twin, loss_fn, x, y, rho=RHO, micro_batches=1, strategy="loop")
    for p, q, b in zip(model.parameters(), twin.parameters(), before, strict=True):
        assert torch.isfinite(p).all()
        assert torch.equal(p, b) and torch.equal(q, b)
    if kind != "overflow":  # the non-finite gradient is not hidden from the base optimizer
        opt.second_step()
        assert not all(torch.isfinite(p).all() for p in model.parameters())


def test_step_with_closure_uses_the_gradient_already_there():
    """davda54/sam's usage: the caller's backward gives the ascent direction, one closure call."""
    model = make_model("mlp")
    twin = copy.deepcopy(model)
    opt = msam.SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=MOMENTUM)
    ref = msam.SAM(twin.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=MOMENTUM)
    calls = []
    for x, y in batches("mlp"):

        def closure(x=x, y=y):
            calls.append(1)
            loss = cross_entropy(model(x), y)
            loss.backward()
            return loss

        cross_entropy(model(x), y).backward()
        perturbed_loss = opt.step(closure)
        opt.zero_grad()
        cross_entropy(twin(x), y).backward()
        ref.first_step(zero_grad=True)
        ref_loss = cross_entropy(twin(x), y)
        ref_loss.backward()
        ref.second_step(zero_grad=True)
        assert torch.equal(perturbed_loss, ref_loss)
        for p, q in zip(model.parameters(), twin.parameters(), strict=True):
            assert torch.equal(p, q)
    assert len(calls) == 3
