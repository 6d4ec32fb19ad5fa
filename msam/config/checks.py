"""Checks of a train config that need more than its schema: the base optimizer's name against
timm's registry, the mSAM strategy against ``msam.backward``'s. They import timm and torch, so
they run after validation (``msam train``'s pre-flight), never while a bad config is reported.
"""

from __future__ import annotations

from msam.config.messages import did_you_mean
from msam.errors import UserError

__all__ = ["check_optimizer_name", "check_strategy"]


def check_optimizer_name(name: str) -> None:
    """UserError when ``optim.base`` is not a timm optimizer (imports timm, so not in the model)."""
    import timm.optim

    names = timm.optim.list_optimizers()
    # timm reads "lookahead_<opt>" as a wrapper around <opt>; the last part is the optimizer.
    if name.lower().split("_")[-1] not in names:
        raise UserError(f"optim.base: unknown timm optimizer '{name}'{did_you_mean(name, names)}")


def check_strategy(name: str, device_type: str) -> None:
    """UserError when ``optim.strategy`` is unknown, or runs on CUDA only and the run would not;
    ``msam.backward`` would otherwise raise at the first step, after data and model are built."""
    from msam._backward import STRATEGIES

    if name == "auto":
        return
    known = ["auto", *sorted(STRATEGIES)]
    if name not in STRATEGIES:
        raise UserError(
            f"optim.strategy: unknown value '{name}'{did_you_mean(name, known)}; "
            f"expected one of {', '.join(known)}"
        )
    if STRATEGIES[name].cuda_only and device_type != "cuda":
        raise UserError(
            f"optim.strategy {name} runs on CUDA only and this run is on {device_type}; "
            "use optim.strategy=auto"
        )
