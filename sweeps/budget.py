"""Equal budgets: how many epochs each optimizer trains, in trials and in finals alike.

``budget.match: epochs`` gives every optimizer the same epochs. ``budget.match: grad_evals`` gives
every optimizer the same number of gradient evaluations (forward-backward passes over a whole
mini-batch): an optimizer costing fewer per update (SGD: 1, against SAM's and mSAM's 2; Foret et
al., 2021; Behdin et al., 2023) trains proportionally more epochs, relative to the costliest
optimizer of the sweep. A sweep of SGD alone therefore trains its base epochs either way.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from msam.optim import grad_evals_per_update
from sweeps.spec import SweepSpec

__all__ = ["epochs", "grad_evals_of", "grad_evals_per_update", "nominal_grad_evals"]


def nominal_grad_evals(optimizer: str) -> int:
    """Gradient evaluations per update of an optimizer at a positive rho (SGD 1, (m)SAM 2)."""
    return grad_evals_per_update(optimizer, 0.0 if optimizer == "sgd" else 1.0)


def grad_evals_of(spec: SweepSpec | None, optimizer: str, params: Mapping[str, Any]) -> int:
    """Gradient evaluations per update of a tuned configuration: its searched rho, else the
    spec's ``base.optim.rho`` (rho not searched), else the optimizer's nominal cost."""
    if "rho" in params:
        return grad_evals_per_update(optimizer, float(params["rho"]))
    if spec is not None and optimizer != "sgd":
        return grad_evals_per_update(optimizer, float(spec.base.optim.rho))
    return nominal_grad_evals(optimizer)


def epochs(spec: SweepSpec, optimizer: str, *, final: bool = False) -> int:
    """Epochs of one trial (``final=False``) or one final run of ``optimizer`` in ``spec``.

    Finals train ``final.epochs`` when set, else the base's epochs; both then follow
    ``budget.match``.
    """
    base = (spec.final.epochs if final else None) or spec.base.train.epochs
    if spec.budget.match != "grad_evals":
        return int(base)
    most = max(nominal_grad_evals(name) for name in spec.optimizers)
    return int(base * most // nominal_grad_evals(optimizer))
