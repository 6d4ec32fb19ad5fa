"""SAM as a two-step optimizer wrapper (Foret et al., 2021, "Sharpness-Aware Minimization for
Efficiently Improving Generalization", arXiv:2010.01412), with ASAM's adaptive scaling (Kwon et al.,
2021, arXiv:2102.11600).

A drop-in for the interface most SAM code is written against: ``first_step`` / ``second_step`` /
``step(closure)``, ``.base_optimizer`` and ``param_groups`` shared with it, so torch and timm LR
schedulers drive the base optimizer's learning rate through the wrapper.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from msam._strategies._common import (
    AscentGroup,
    clone_all,
    group_perturbations,
    zero_unless_finite,
)


class SAM(torch.optim.Optimizer):
    """Sharpness-aware minimization around any base optimizer.

    ``base_optimizer`` is an optimizer class (``torch.optim.SGD``; built here on the same
    parameter groups with ``**kwargs``) or an already built optimizer (timm's
    ``create_optimizer_v2`` result), which is then wrapped as it is.
    """

    def __init__(
        self,
        params: Any,
        base_optimizer: type[torch.optim.Optimizer] | torch.optim.Optimizer,
        rho: float = 0.05,
        adaptive: bool = False,
        **kwargs: Any,
    ) -> None:
        if rho < 0:
            raise ValueError(f"rho must be >= 0, got {rho}")
        defaults = dict(rho=rho, adaptive=adaptive, **kwargs)
        if isinstance(base_optimizer, torch.optim.Optimizer):
            if kwargs:
                raise ValueError("pass base optimizer settings when building it, not to SAM")
            super().__init__(base_optimizer.param_groups, defaults)
            self.base_optimizer = base_optimizer
        else:
            super().__init__(params, defaults)
            self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        # One list of groups for both, so a scheduler that sets group["lr"] reaches the base step.
        self.param_groups = self.base_optimizer.param_groups
        for group in self.param_groups:
            group.setdefault("rho", rho)
            group.setdefault("adaptive", adaptive)
        self.defaults.update(self.base_optimizer.defaults)

    def _with_grad(self) -> list[tuple[dict, list[torch.Tensor]]]:
        """Each param group with those of its parameters that have a gradient (if any do)."""
        groups = [(g, [p for p in g["params"] if p.grad is not None]) for g in self.param_groups]
        return [(g, ps) for g, ps in groups if ps]

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Move to ``w + eps`` (the ascent step), remembering ``w`` exactly.

        ``eps`` is ``msam.backward``'s ascent step (one norm over every parameter of every group,
        as in the paper; ASAM scales by ``|w|``), so both give the same perturbation. A non-finite
        gradient norm gives a zero step: the weights stay finite and the non-finite gradient of
        the second pass reaches the base optimizer (or a GradScaler, which skips the step).
        """
        groups = self._with_grad()
        if groups:
            steps, norm = group_perturbations(
                [
                    AscentGroup(ps, [p.grad for p in ps], group["rho"], group["adaptive"])
                    for group, ps in groups
                ]
            )
            # On the CPU reading the norm costs nothing: a non-finite one skips the step outright,
            # saving a pass over every parameter; elsewhere a device-side select avoids a sync.
            on_host = norm.device.type == "cpu"
            finite = bool(torch.isfinite(norm)) if on_host else True
            for (_, ps), eps in zip(groups, steps, strict=True):
                for p, old in zip(ps, clone_all(ps), strict=True):
                    self.state[p]["old_p"] = old
                if not on_host:
                    torch._foreach_add_(ps, zero_unless_finite(eps, norm))
                elif finite:
                    torch._foreach_add_(ps, eps)
        # Autocast caches low-precision weight copies per region: drop them, or a perturbed pass
        # in the same region would run at the unperturbed weights.
        torch.clear_autocast_cache()
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Return to ``w`` bitwise and let the base optimizer step with the gradient at w + eps."""
        moved = [
            (p, self.state[p].pop("old_p", None)) for g in self.param_groups for p in g["params"]
        ]
        moved = [(p, old) for p, old in moved if old is not None]
        if moved:
            targets, sources = zip(*moved, strict=True)
            torch._foreach_copy_(list(targets), list(sources))
        torch.clear_autocast_cache()
        self.base_optimizer.step()
        # The update is done: tell torch's LR schedulers (which watch ``step``) that it happened.
        self._opt_called = True
        if zero_grad:
            self.zero_grad()

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Whole update; ``closure`` does a full forward-backward (``loss.backward()``).

        As in davda54/sam, the ascent step uses the gradient already in ``.grad`` (the caller's
        own ``loss.backward()``) and the closure runs once, at ``w + eps``. When no parameter has
        a gradient (after ``zero_grad()``), the closure first runs at ``w`` to compute it.
        Returns the loss of the closure's first call.
        """
        if closure is None:
            raise RuntimeError("SAM.step needs a closure that recomputes the loss and gradients")
        closure = torch.enable_grad()(closure)
        loss = None if self._with_grad() else closure()
        self.first_step(zero_grad=True)
        perturbed_loss = closure()
        self.second_step()
        return perturbed_loss if loss is None else loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state (momentum etc.) plus rho/adaptive per group."""
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
