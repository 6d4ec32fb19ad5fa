"""mSAM as an optimizer object (Behdin et al., 2023, "mSAM: Micro-Batch-Averaged Sharpness-Aware
Minimization", arXiv:2302.09693).

Wraps any base optimizer (torch's, or timm's ``create_optimizer_v2``) and performs a whole update
from a mini-batch through :func:`msam.backward`: m micro-batch ascent steps, the averaged gradient,
optional clipping, then the base optimizer's step. ``param_groups`` are the base optimizer's, so LR
schedulers attach to this object or to ``.base_optimizer`` alike.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from msam._backward import LossFn, backward


class MSAM(torch.optim.Optimizer):
    """``opt.update(x, y)`` is one mSAM update; ``micro_batches=1`` is SAM, ``rho=0`` plain SGD."""

    def __init__(
        self,
        model: nn.Module,
        base_optimizer: torch.optim.Optimizer,
        *,
        loss_fn: LossFn | None = None,
        rho: float = 0.05,
        micro_batches: int = 1,
        adaptive: bool = False,
        strategy: str = "auto",
    ) -> None:
        if rho < 0:
            raise ValueError(f"rho must be >= 0, got {rho}")
        if not isinstance(micro_batches, int) or micro_batches < 1:
            raise ValueError(f"micro_batches must be an integer >= 1, got {micro_batches!r}")
        defaults = dict(rho=rho, micro_batches=micro_batches, adaptive=adaptive)
        super().__init__(base_optimizer.param_groups, defaults)
        self.base_optimizer = base_optimizer
        self.param_groups = base_optimizer.param_groups
        self.defaults.update(base_optimizer.defaults)
        self.model = model
        self.loss_fn = loss_fn or nn.functional.cross_entropy
        self.rho = rho
        self.micro_batches = micro_batches
        self.adaptive = adaptive
        self.strategy = strategy

    def update(
        self,
        inputs: Tensor,
        targets: Tensor,
        *,
        scaler: Any | None = None,
        grad_clip: float | None = None,
    ) -> Tensor:
        """One whole update from a mini-batch; returns the mean unperturbed loss (detached)."""
        loss = backward(
            self.model,
            self.loss_fn,
            inputs,
            targets,
            rho=self.rho,
            micro_batches=self.micro_batches,
            adaptive=self.adaptive,
            strategy=self.strategy,
            scaler=scaler,
        )
        if scaler is not None:
            if grad_clip is not None:
                scaler.unscale_(self.base_optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), grad_clip)
            scaler.step(self.base_optimizer)
            scaler.update()
        else:
            if grad_clip is not None:
                nn.utils.clip_grad_norm_(self.model.parameters(), grad_clip)
            self.base_optimizer.step()
        return loss

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """The base optimizer's step with the gradients already in ``.grad``."""
        return self.base_optimizer.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
