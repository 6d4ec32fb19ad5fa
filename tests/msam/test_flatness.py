"""Flatness metrics against exact values: a quadratic with a known Hessian and a tiny network whose
full Hessian comes from ``torch.autograd.functional.hessian``."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from msam.flatness import (
    fixed_sample,
    flatness_report,
    hessian_top_eigenvalue,
    hessian_trace,
    radius_key,
    sam_sharpness,
    sharpness_profile,
    top_eigenvalue,
)

DT = torch.float64


class Quadratic(nn.Module):
    """A "model" whose output is its loss ``0.5 w^T A w + b^T w``: the Hessian is ``A``."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("a", a)
        self.register_buffer("b", b)
        self.w = nn.Parameter(w.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * self.w @ self.a @ self.w + self.b @ self.w


def output_is_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return out


QUAD_BATCHES = [(torch.zeros(3, 1), torch.zeros(3)), (torch.zeros(2, 1), torch.zeros(2))]


def spd(n: int, eigenvalues: list[float], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    return q @ torch.diag(torch.tensor(eigenvalues, dtype=DT)) @ q.T


def quadratic(a: torch.Tensor, seed: int = 1) -> Quadratic:
    g = torch.Generator().manual_seed(seed)
    n = a.shape[0]
    b = torch.randn(n, generator=g, dtype=DT)
    w = torch.randn(n, generator=g, dtype=DT)
    return Quadratic(a, b, w)


def tiny_net(seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DT))
    return net


def tiny_batches(sizes=(5, 3), seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    x = torch.randn(n, 3, generator=g, dtype=DT)
    y = torch.randint(0, 2, (n,), generator=g)
    out, start = [], 0
    for s in sizes:
        out.append((x[start : start + s], y[start : start + s]))
        start += s
    return out


def exact_hessian(net: nn.Module, batches) -> torch.Tensor:
    """The Hessian of the sample's mean cross-entropy over the flattened parameters."""
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for p in net.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])

    def loss(theta: torch.Tensor) -> torch.Tensor:
        params, start = {}, 0
        for name, shape in zip(names, shapes):
            size = math.prod(shape)
            params[name] = theta[start : start + size].view(shape)
            start += size
        return F.cross_entropy(functional_call(net, params, (x,)), y)

    return torch.autograd.functional.hessian(loss, flat)


def largest_magnitude(eigenvalues: torch.Tensor) -> float:
    return float(eigenvalues[eigenvalues.abs().argmax()])


def snapshot(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def assert_bitwise(model: nn.Module, before: list[torch.Tensor]) -> None:
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p.detach(), q)


# --- the quadratic: H = A exactly -------------------------------------------------------------


def test_top_eigenvalue_of_quadratic_is_largest_eigenvalue_of_a():
    a = spd(6, [5.0, 2.0, 1.0, 0.5, 0.2, 0.1])
    model = quadratic(a)
    got = hessian_top_eigenvalue(model, output_is_loss, QUAD_BATCHES, iters=200, tol=1e-12)
    assert got == pytest.approx(5.0, rel=1e-9)


def test_top_eigenvalue_is_signed_largest_magnitude():
    a = spd(5, [-4.0, 1.0, 0.5, 0.3, 2.0], seed=3)
    got = hessian_top_eigenvalue(quadratic(a), output_is_loss, QUAD_BATCHES, iters=300, tol=1e-12)
    assert got == pytest.approx(-4.0, rel=1e-9)


def test_top_eigenvalue_default_tolerance_is_close():
    a = spd(6, [5.0, 2.0, 1.0, 0.5, 0.2, 0.1])
    got = hessian_top_eigenvalue(quadratic(a), output_is_loss, QUAD_BATCHES)
    assert got == pytest.approx(5.0, rel=1e-2)


def test_lanczos_certifies_close_eigenvalues_in_few_products():
    """Top two eigenvalues 2% apart: power iteration needs hundreds of products for 1e-6; Lanczos
    needs at most the dimension, and its residual bounds the error of what it returns."""
    a = spd(40, [5.0, 4.9, *torch.linspace(0.1, 3.0, 38).tolist()], seed=4)
    top = top_eigenvalue(quadratic(a), output_is_loss, QUAD_BATCHES, iters=40, tol=1e-8)
    assert top.converged and top.iters <= 40
    assert top.value == pytest.approx(5.0, rel=1e-7)
    assert abs(top.value - 5.0) <= top.residual + 1e-12


def test_lanczos_says_when_it_ran_out_of_products():
    a = spd(40, [5.0, 4.9, *torch.linspace(0.1, 3.0, 38).tolist()], seed=4)
    top = top_eigenvalue(quadratic(a), output_is_loss, QUAD_BATCHES, iters=3, tol=1e-10)
    assert not top.converged and top.iters == 3
    assert top.residual > 1e-10 * abs(top.value)
    assert abs(top.value - 5.0) <= top.residual + 1e-12  # still a valid bound


def test_one_batch_reuses_its_graph_with_the_same_values():
    """A sample of one batch keeps its gradient graph for every product; split into batches it is
    rebuilt per product: the metrics agree to rounding."""
    net, whole = tiny_net(), tiny_batches((8,))
    split = tiny_batches((5, 3))
    kw = dict(rho=0.1, iters=30, samples=4, seed=2, tol=1e-10)
    one = flatness_report(net, F.cross_entropy, whole, **kw)
    two = flatness_report(net, F.cross_entropy, split, **kw)
    for key in ("hessian_top_eig", "hessian_trace", "hessian_trace_stderr", "sam_sharpness"):
        assert one[key] == pytest.approx(two[key], rel=1e-9), key
    assert one["hessian_top_eig_converged"] and one["hessian_top_eig_iters"] <= 30
    exact = torch.linalg.eigvalsh(exact_hessian(net, whole))
    assert one["hessian_top_eig"] == pytest.approx(largest_magnitude(exact), rel=1e-8)


def test_trace_is_exact_for_diagonal_hessian():
    a = torch.diag(torch.tensor([3.0, 1.0, 0.25, 7.0], dtype=DT))
    got = hessian_trace(quadratic(a), output_is_loss, QUAD_BATCHES, samples=3)
    assert got == pytest.approx(11.25, rel=1e-12)


def test_trace_of_dense_quadratic_within_a_few_percent():
    a = spd(6, [5.0, 2.0, 1.0, 0.5, 0.2, 0.1])
    got = hessian_trace(quadratic(a), output_is_loss, QUAD_BATCHES, samples=2000)
    assert got == pytest.approx(8.8, rel=0.03)


def test_sam_sharpness_of_quadratic_matches_closed_form():
    a = spd(6, [5.0, 2.0, 1.0, 0.5, 0.2, 0.1])
    model = quadratic(a)
    w, b, rho = model.w.detach().clone(), model.b, 0.3
    g = a @ w + b
    eps = rho * g / g.norm()
    expected = float(eps @ g + 0.5 * eps @ a @ eps)  # L(w + eps) - L(w)
    got = sam_sharpness(model, output_is_loss, QUAD_BATCHES, rho=rho)
    assert got == pytest.approx(expected, rel=1e-9)
    assert torch.equal(model.w.detach(), w)


def test_adaptive_sam_sharpness_of_quadratic_matches_closed_form():
    a = spd(4, [3.0, 1.0, 0.5, 0.2])
    model = quadratic(a)
    w, b, rho = model.w.detach().clone(), model.b, 0.2
    g = a @ w + b
    eps = rho * w.abs() ** 2 * g / (w.abs() * g).norm()
    expected = float(eps @ g + 0.5 * eps @ a @ eps)
    got = sam_sharpness(model, output_is_loss, QUAD_BATCHES, rho=rho, adaptive=True)
    assert got == pytest.approx(expected, rel=1e-9)


def test_sam_sharpness_rejects_negative_rho_and_is_zero_at_rho_zero():
    model = quadratic(spd(3, [1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="rho"):
        sam_sharpness(model, output_is_loss, QUAD_BATCHES, rho=-0.1)
    assert sam_sharpness(model, output_is_loss, QUAD_BATCHES, rho=0.0) == 0.0


# --- a tiny network: the full Hessian by autograd ---------------------------------------------


def test_top_eigenvalue_of_tiny_net_matches_full_hessian():
    net, batches = tiny_net(), tiny_batches()
    expected = largest_magnitude(torch.linalg.eigvalsh(exact_hessian(net, batches)))
    got = hessian_top_eigenvalue(net, F.cross_entropy, batches, iters=2000, tol=1e-13)
    assert got == pytest.approx(expected, rel=1e-6)


def test_trace_of_tiny_net_within_hutchinson_error():
    net, batches = tiny_net(), tiny_batches()
    h = exact_hessian(net, batches)
    samples = 400
    # Var(v^T H v) = 2 sum_{i != j} H_ij^2 for Rademacher v.
    off = h - torch.diag(torch.diagonal(h))
    stderr = math.sqrt(2 * float((off**2).sum()) / samples)
    got = hessian_trace(net, F.cross_entropy, batches, samples=samples)
    assert abs(got - float(torch.trace(h))) < 4 * stderr
    assert stderr < 0.2 * abs(float(torch.trace(h)))  # the bound above is informative


def test_sam_sharpness_of_tiny_net_matches_manual_perturbation():
    net, batches = tiny_net(), tiny_batches()
    rho = 0.1
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    params = list(net.parameters())
    loss = F.cross_entropy(net(x), y)
    grads = torch.autograd.grad(loss, params)
    norm = torch.sqrt(sum((g**2).sum() for g in grads))
    with torch.no_grad():
        perturbed = {n: p + rho * g / norm for (n, p), g in zip(net.named_parameters(), grads)}
        expected = float(F.cross_entropy(functional_call(net, perturbed, (x,)), y) - loss)
    got = sam_sharpness(net, F.cross_entropy, batches, rho=rho)
    assert got == pytest.approx(expected, rel=1e-8)
    assert got > 0


def test_batches_are_weighted_by_size():
    net = tiny_net()
    uneven = tiny_batches((5, 3))
    x = torch.cat([b[0] for b in uneven])
    y = torch.cat([b[1] for b in uneven])
    whole = [(x, y)]
    kw = {"iters": 50, "tol": 1e-12}
    assert hessian_top_eigenvalue(net, F.cross_entropy, uneven, **kw) == pytest.approx(
        hessian_top_eigenvalue(net, F.cross_entropy, whole, **kw), rel=1e-10
    )
    assert hessian_trace(net, F.cross_entropy, uneven, samples=5) == pytest.approx(
        hessian_trace(net, F.cross_entropy, whole, samples=5), rel=1e-10
    )
    assert sam_sharpness(net, F.cross_entropy, uneven, rho=0.05) == pytest.approx(
        sam_sharpness(net, F.cross_entropy, whole, rho=0.05), rel=1e-10
    )


def test_frozen_parameters_are_left_out():
    net, batches = tiny_net(), tiny_batches()
    net[0].requires_grad_(False)
    h = exact_hessian(net, batches)[16:, 16:]  # the last layer's 4*2 + 2 parameters
    expected = largest_magnitude(torch.linalg.eigvalsh(h))
    got = hessian_top_eigenvalue(net, F.cross_entropy, batches, iters=1000, tol=1e-13)
    assert got == pytest.approx(expected, rel=1e-6)


# --- side effects -----------------------------------------------------------------------------


def conv_bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    ).to(DT)


def test_report_leaves_model_rng_and_grads_as_they_were():
    net = conv_bn_net().train()
    net[1].eval()  # a mixed-mode model: each module's own mode must come back
    g = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(4, 3, 4, 4, generator=g, dtype=DT), torch.randint(0, 3, (4,), generator=g))
    ]
    params = snapshot(net)
    buffers = [b.clone() for b in net.buffers()]
    modes = [m.training for m in net.modules()]
    rng = torch.get_rng_state()

    report = flatness_report(net, F.cross_entropy, batches, rho=0.5, iters=5, samples=3)

    assert_bitwise(net, params)
    assert all(torch.equal(b, c) for b, c in zip(net.buffers(), buffers))
    assert [m.training for m in net.modules()] == modes
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in net.parameters())
    assert set(report) >= {"hessian_top_eig", "hessian_trace", "sam_sharpness", "rho", "n_images"}
    assert report["n_images"] == 4 and report["rho"] == 0.5
    assert report["hessian_trace_stderr"] is not None and report["hessian_trace_stderr"] > 0


def test_measured_in_eval_mode_and_deterministic_per_seed():
    net = conv_bn_net().train()
    g = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(6, 3, 4, 4, generator=g, dtype=DT), torch.randint(0, 3, (6,), generator=g))
    ]
    kw = {"rho": 0.2, "iters": 5, "samples": 4, "seed": 7}
    first = flatness_report(net, F.cross_entropy, batches, **kw)
    again = flatness_report(net, F.cross_entropy, batches, **kw)
    in_eval = flatness_report(net.eval(), F.cross_entropy, batches, **kw)
    assert first == again == in_eval
    other_seed = flatness_report(net, F.cross_entropy, batches, **{**kw, "seed": 8})
    assert other_seed["hessian_trace"] != first["hessian_trace"]


def test_parameters_restored_bitwise_after_sam_sharpness_in_float32():
    net = tiny_net().float()
    batches = [(x.float(), y) for x, y in tiny_batches()]
    before = snapshot(net)
    sam_sharpness(net, F.cross_entropy, batches, rho=0.7)
    assert_bitwise(net, before)


def test_empty_batches_rejected():
    with pytest.raises(ValueError, match="batches"):
        hessian_trace(tiny_net(), F.cross_entropy, [])


# --- fixed_sample -----------------------------------------------------------------------------


def data(n: int = 50):
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    y = torch.arange(n) % 7
    return x, y


def assert_genuine(batches, x, y):
    for bx, by in batches:
        idx = bx[:, 0, 0, 0].long()
        assert torch.equal(bx, x[idx]) and torch.equal(by, y[idx])


def test_fixed_sample_from_tensors_is_seeded_and_batched():
    x, y = data()
    batches = fixed_sample((x, y), 20, seed=0, batch_size=8)
    assert [len(b[0]) for b in batches] == [8, 8, 4]
    assert_genuine(batches, x, y)
    picked = torch.cat([b[0][:, 0, 0, 0] for b in batches])
    assert len(picked.unique()) == 20 and picked.max() > 20  # a sample, not the head
    again = fixed_sample((x, y), 20, seed=0, batch_size=8)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))
    other = torch.cat([b[0] for b in fixed_sample((x, y), 20, seed=1, batch_size=8)])
    assert not torch.equal(other, torch.cat([b[0] for b in batches]))


def test_fixed_sample_same_from_dataset_and_dataloader():
    x, y = data()
    from_tensors = fixed_sample((x, y), 12, seed=3, batch_size=5)
    dataset = torch.utils.data.TensorDataset(x, y)
    from_dataset = fixed_sample(dataset, 12, seed=3, batch_size=5)
    loader = torch.utils.data.DataLoader(dataset, batch_size=5, shuffle=True)
    from_loader = fixed_sample(loader, 12, seed=3)
    for a, b, c in zip(from_tensors, from_dataset, from_loader, strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[0], c[0])
        assert torch.equal(a[1], b[1]) and torch.equal(a[1], c[1])


def test_fixed_sample_from_a_stream_of_batches():
    x, y = data(60)
    stream = [(x[i : i + 7], y[i : i + 7]) for i in range(0, 60, 7)]
    batches = fixed_sample(stream, 15, seed=0, batch_size=6)
    assert sum(len(b[0]) for b in batches) == 15
    assert_genuine(batches, x, y)
    picked = torch.cat([b[0][:, 0, 0, 0] for b in batches])
    assert len(picked.unique()) == 15 and picked.max() > 30
    again = fixed_sample(iter(stream), 15, seed=0, batch_size=6)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))


def test_fixed_sample_stream_is_uniform():
    # Each of 40 positions should be kept with probability 10/40 over many seeds.
    x, y = data(40)
    stream = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 40, 8)]
    counts = torch.zeros(40)
    trials = 400
    for seed in range(trials):
        picked = fixed_sample(stream, 10, seed=seed)[0][0][:, 0, 0, 0].long()
        counts[picked] += 1
    expected = trials * 10 / 40
    sd = math.sqrt(trials * 0.25 * 0.75)
    assert ((counts - expected).abs() < 5 * sd).all()


def test_fixed_sample_takes_all_when_fewer_available():
    x, y = data(9)
    assert sum(len(b[0]) for b in fixed_sample((x, y), 100)) == 9
    stream = [(x[:5], y[:5]), (x[5:], y[5:])]
    assert sum(len(b[0]) for b in fixed_sample(stream, 100)) == 9
    with pytest.raises(ValueError, match="n_images"):
        fixed_sample((x, y), 0)


# --- the deflated trace ----------------------------------------------------------------------


def test_deflated_trace_is_exact_once_lanczos_spans_the_space():
    """Lanczos on a 6x6 Hessian finds an invariant subspace within 6 products; the probes then
    have nothing left to estimate and the trace is exact (plain Hutchinson is not)."""
    a = spd(6, [5.0, 2.0, 1.0, 0.5, 0.2, 0.1], seed=2)
    model = quadratic(a)
    report = flatness_report(
        model, output_is_loss, QUAD_BATCHES, rho=0.1, iters=6, samples=3, tol=1e-14
    )
    assert report["hessian_trace"] == pytest.approx(8.8, rel=1e-10)
    assert report["hessian_trace_stderr"] == pytest.approx(0.0, abs=1e-9)
    plain = hessian_trace(model, output_is_loss, QUAD_BATCHES, samples=3)
    assert plain != pytest.approx(8.8, rel=1e-6)


def test_deflated_trace_is_unbiased_with_less_spread_than_plain_hutchinson():
    """A spectrum like a network's (a few large eigenvalues over a bulk): over many seeds the
    deflated estimate averages to the exact trace, with a spread several times smaller than
    plain Hutchinson's with the same number of probes."""
    values = [60.0, 35.0, 20.0, *torch.linspace(0.05, 1.5, 37).tolist()]
    model = quadratic(spd(40, values, seed=5))
    exact = sum(values)
    deflated = [
        flatness_report(model, output_is_loss, QUAD_BATCHES, rho=0.1, iters=6, samples=2, seed=s)[
            "hessian_trace"
        ]
        for s in range(200)
    ]
    plain = [
        hessian_trace(model, output_is_loss, QUAD_BATCHES, samples=2, seed=s) for s in range(200)
    ]
    spread = torch.tensor(deflated).std().item()
    assert abs(sum(deflated) / len(deflated) - exact) < 4 * spread / math.sqrt(len(deflated))
    assert spread < 0.25 * torch.tensor(plain).std().item()


# --- sharpness at common radii ---------------------------------------------------------------


def bn_net(scale: float = 1.0) -> nn.Module:
    """conv -> BatchNorm (eval) -> ... : the conv's weights can be rescaled without changing the
    function, as BatchNorm divides by the statistics it was given for the unscaled weights."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    ).to(DT)
    with torch.no_grad():
        net[1].running_var.fill_(2.0)
        net[1].running_mean.normal_()
        net[0].weight.mul_(scale)
        net[1].running_mean.mul_(scale)
        net[1].running_var.mul_(scale**2)
    return net


def bn_batches():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 3, 5, 5, generator=g, dtype=DT)
    return [(x, torch.randint(0, 3, (6,), generator=g))]


def test_adaptive_sharpness_ignores_a_function_preserving_rescaling():
    """Rescaling the conv before BatchNorm by 0.5 and 2 leaves outputs identical: plain sharpness
    and the top eigenvalue move, adaptive sharpness stays (BatchNorm's eps aside)."""
    batches = bn_batches()
    nets = {s: bn_net(s) for s in (0.5, 1.0, 2.0)}
    outs = [net.eval()(batches[0][0]) for net in nets.values()]
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(outs[2], outs[1], rtol=1e-4, atol=1e-6)
    reports = {
        s: flatness_report(
            net, F.cross_entropy, batches, rho=0.05, iters=30, samples=2, radii=[0.1]
        )
        for s, net in nets.items()
    }
    adaptive = [r["adaptive_sharpness"]["0.1"] for r in reports.values()]
    plain = [r["sharpness"]["0.1"] for r in reports.values()]
    assert max(adaptive) == pytest.approx(min(adaptive), rel=1e-3)
    assert max(plain) - min(plain) > 10 * (max(adaptive) - min(adaptive))
    tops = [r["hessian_top_eig"] for r in reports.values()]
    assert max(tops) > 1.05 * min(tops)  # not invariant either
    assert {r["bn_mode"] for r in reports.values()} == {"eval"}
    norms = [r["weight_norm"] for r in reports.values()]
    assert norms[0] < norms[1] < norms[2]


def test_profile_matches_sam_sharpness_at_each_radius_and_restores_weights():
    net, batches = tiny_net(2), tiny_batches((5, 3), seed=2)
    before = snapshot(net)
    radii = [0.01, 0.05, 0.1]
    profile = sharpness_profile(net, F.cross_entropy, batches, radii=radii)
    assert_bitwise(net, before)
    for rho in radii:
        for adaptive in (False, True):
            alone = sam_sharpness(net, F.cross_entropy, batches, rho=rho, adaptive=adaptive)
            assert profile[adaptive][rho] == pytest.approx(alone, rel=1e-12, abs=1e-15)
    assert profile[False][0.01] < profile[False][0.05] < profile[False][0.1]
    report = flatness_report(net, F.cross_entropy, batches, rho=0.05, samples=2, radii=radii)
    assert report["sharpness"] == {radius_key(r): profile[False][r] for r in radii}
    assert report["adaptive_sharpness"] == {radius_key(r): profile[True][r] for r in radii}
