"""Sweep spec: the YAML schema of ``msam sweep``, validated before any study or run starts.

A spec holds one base train config and the search space; every optimizer gets the same trial
budget, so SGD, SAM (Foret et al., 2021) and mSAM (Behdin et al., 2023) are compared on equal
terms. ``SweepSpec.train_config`` turns a sampled point into a validated ``TrainConfig``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from msam.config import (
    MAX_BATCH,
    MAX_EPOCHS,
    MAX_FILE_NAME,
    OPTIMIZERS,
    Bool,
    DataConfig,
    Float,
    Int,
    ModelConfig,
    OptimConfig,
    OptimName,
    Section,
    Seed,
    TrackingConfig,
    TrainConfig,
    TrainSection,
    check_run_name,
    load_config,
    parse_config,
    parse_train_config,
    user_error_from_validation,
)
from msam.optim import grad_evals_per_update
from sweeps.layout import RunFolder

__all__ = [
    "MAX_NAME_LENGTH",
    "Budget",
    "FinalStage",
    "Flatness",
    "MicroBatchChoices",
    "ParamSpace",
    "SearchSpace",
    "SweepBase",
    "SweepSpec",
    "load_sweep_spec",
    "parse_sweep_spec",
]

#: Most trials per optimizer and final runs per configuration: far beyond any sweep's budget.
MAX_TRIALS = 10_000
MAX_FINAL_SEEDS = 1_000
MAX_TOP_K = 100


def _longest_name() -> int:
    """The longest sweep name whose every derived file fits in :data:`MAX_FILE_NAME` bytes: the
    longest is ``tuned/<name>-<optimizer>.yaml``, written through ``<file>.tmp``
    (``msam.files.atomic_write``)."""
    folder = RunFolder(Path())
    suffix = max(len(folder.tuned("", optimizer).name) for optimizer in OPTIMIZERS)
    return MAX_FILE_NAME - suffix - len(".tmp")


#: Longest sweep name (241 characters with the optimizers msam has).
MAX_NAME_LENGTH = _longest_name()

# Which optimizers each searched hyperparameter applies to.
SEARCHED_BY: dict[str, tuple[str, ...]] = {
    "lr": OPTIMIZERS,
    "rho": ("sam", "msam"),
    "micro_batches": ("msam",),
}


class SweepOptim(OptimConfig):
    """``optim`` of the base: the optimizer itself comes from ``optimizers``, so name is ignored."""

    name: OptimName | None = Field(
        None, description="ignored: each optimizer in the spec's `optimizers` list is swept"
    )


class SweepBase(Section):
    """A train config without ``name``: trials are named after the sweep."""

    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    optim: SweepOptim = Field(default_factory=SweepOptim)
    train: TrainSection = Field(default_factory=TrainSection)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="before")
    @classmethod
    def _no_name(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and "name" in data:
            raise ValueError("base.name is not used: runs are named after the sweep's name")
        return data


class ParamSpace(Section):
    """A float range (``low``, ``high``, ``log``) or a list of ``choices`` (needed for grid)."""

    low: Float | None = Field(None, description="smallest value (inclusive)")
    high: Float | None = Field(None, description="largest value (inclusive)")
    log: Bool = Field(False, description="sample uniformly in log space (for scale parameters)")
    choices: list[Float] | None = Field(None, description="explicit values instead of a range")

    @model_validator(mode="after")
    def _range_or_choices(self) -> ParamSpace:
        has_range = self.low is not None or self.high is not None
        if self.choices is not None:
            if has_range:
                raise ValueError("give either low/high or choices, not both")
            _check_choices(self.choices, "choices: ")
        elif self.low is None or self.high is None:
            raise ValueError("needs low and high (or choices)")
        elif not self.low < self.high:
            raise ValueError(f"low {self.low} must be below high {self.high}")
        elif self.log and self.low <= 0:
            raise ValueError(f"low must be > 0 with log: true (got {self.low})")
        return self

    def values(self) -> list[float]:
        """The values the space can produce at its edges (or all of its choices)."""
        return list(self.choices) if self.choices is not None else [self.low, self.high]


class MicroBatchChoices(Section):
    """mSAM micro-batch counts to try; each must divide the base batch size."""

    choices: list[Int] = Field(description="micro-batches per mini-batch (each >= 1)")

    @field_validator("choices")
    @classmethod
    def _valid(cls, choices: list[int]) -> list[int]:
        _check_choices(choices)
        bad = [c for c in choices if c < 1]
        if bad:
            raise ValueError(f"each choice must be >= 1 (got {bad[0]})")
        return choices


def _check_choices(choices: Sequence[Any], what: str = "") -> None:
    """Empty or repeated choices: a grid would be empty, a sampler would weigh one value twice."""
    if not choices:
        raise ValueError(f"{what}must not be empty")
    repeated = [c for i, c in enumerate(choices) if c in choices[:i]]
    if repeated:
        raise ValueError(f"{what}{repeated[0]!r} is listed twice")


class SearchSpace(Section):
    """What Optuna samples; a parameter left out stays at its value in ``base.optim``."""

    lr: ParamSpace | None = Field(None, description="peak learning rate, all optimizers")
    rho: ParamSpace | None = Field(None, description="SAM radius (L2 length), sam and msam")
    micro_batches: MicroBatchChoices | None = Field(None, description="mSAM micro-batches, msam")

    @model_validator(mode="after")
    def _in_range(self) -> SearchSpace:
        if self.lr is not None and min(self.lr.values()) <= 0:
            raise ValueError(f"search.lr values must be > 0 (got {min(self.lr.values())})")
        if self.rho is not None and min(self.rho.values()) < 0:
            raise ValueError(f"search.rho values must be >= 0 (got {min(self.rho.values())})")
        return self

    def searched(self, optimizer: str) -> list[str]:
        """The parameters sampled for ``optimizer`` (in a fixed order)."""
        return [
            key
            for key, users in SEARCHED_BY.items()
            if optimizer in users and getattr(self, key) is not None
        ]


class Budget(Section):
    trials: Int = Field(
        30,
        ge=1,
        le=MAX_TRIALS,
        description=f"trials per optimizer (equal budgets, <= {MAX_TRIALS})",
    )
    sampler: Literal["tpe", "gp", "random", "grid"] = Field("tpe", description="Optuna sampler")
    pruner: Literal["median", "hyperband", "none"] = Field(
        "median", description="Optuna pruner stopping weak trials early; none = run all to the end"
    )
    seed: Seed = Field(
        0,
        description="sampler seed of a fresh sweep's first worker (resumes and other "
        "workers mix it with a nonce of their own, so none replays another; < 2**31)",
    )
    match: Literal["epochs", "grad_evals"] = Field(
        "epochs",
        description="what equal budgets mean: equal epochs, or equal gradient evaluations "
        "(SGD then trains twice the epochs of SAM/mSAM, whose updates cost two passes)",
    )
    trial_timeout: Literal["auto"] | Float | None = Field(
        "auto",
        description="seconds a running trial may go without progress (its start or an epoch's "
        "end) before it is failed as 'timed out' and redone from its last checkpoint, as a lost "
        "worker's trial is; auto = 10 x the slowest such wait the study has recorded, at least "
        "600 s, and 3600 s for the first epoch before the study has timed any (data loading, "
        "compilation); null = no limit (<= 2592000, 30 days)",
    )

    @field_validator("pruner", mode="before")
    @classmethod
    def _null_is_none(cls, value: Any) -> Any:
        return "none" if value is None or value is False else value

    @field_validator("trial_timeout", mode="before")
    @classmethod
    def _timeout_seconds(cls, value: Any) -> Any:
        if value is None or value == "auto":
            return value
        try:
            seconds = float(value) if not isinstance(value, bool) else None
        except (TypeError, ValueError):
            seconds = None
        if seconds is None or not 0 < seconds <= 2_592_000:
            raise ValueError(
                f"expected auto, null or seconds above 0 and at most 2592000 (got {value!r})"
            )
        return seconds


class Flatness(Section):
    """How hard the final stage looks at each final model's curvature (``msam.flatness``)."""

    images: Int = Field(
        512,
        ge=0,
        le=1_000_000,
        description="fixed, unaugmented training images measured (0 = no flatness; <= 1 million)",
    )
    batch_size: Int = Field(
        256,
        ge=1,
        le=MAX_BATCH,
        description="images per Hessian-vector-product batch (memory, not the result)",
    )
    iters: Int = Field(
        20,
        ge=1,
        le=10_000,
        description="at most this many Lanczos steps (Hessian-vector products) for the top "
        "eigenvalue; fewer once it is certified to tol; each step keeps one copy of the "
        "parameters for the deflated trace (<= 10000)",
    )
    tol: Float = Field(
        1e-3,
        gt=0,
        lt=1,
        description="relative accuracy at which the top eigenvalue counts as converged "
        "(Lanczos residual bound)",
    )
    samples: Int = Field(
        10, ge=1, le=10_000, description="Rademacher probes of Hutchinson's trace (<= 10000)"
    )
    radii: list[Float] = Field(
        [0.01, 0.05, 0.1],
        min_length=1,
        max_length=16,
        description="radii at which every final's sharpness is measured, plain and adaptive, "
        "the same for all optimizers (each > 0; 1 to 16 of them)",
    )
    seed: Seed = Field(0, description="picks the images and probes; the same for every run")

    @field_validator("radii")
    @classmethod
    def _positive_radii(cls, value: list[float]) -> list[float]:
        if any(r <= 0 for r in value):
            raise ValueError(f"every radius must be > 0, got {value}")
        return sorted(set(value))


class FinalStage(Section):
    top_k: Int = Field(
        1,
        ge=1,
        le=MAX_TOP_K,
        description=f"best configurations per optimizer re-run on test (<= {MAX_TOP_K})",
    )
    seeds: Int = Field(
        3,
        ge=0,
        le=MAX_FINAL_SEEDS,
        description=f"seeds per configuration (0 skips the final stage; <= {MAX_FINAL_SEEDS})",
    )
    epochs: Int | None = Field(
        None,
        ge=1,
        le=MAX_EPOCHS,
        description=f"epochs of final runs; null = base's (<= {MAX_EPOCHS})",
    )
    flatness: Flatness = Field(
        default_factory=Flatness, description="flatness measured on every final model"
    )


class SweepSpec(Section):
    """One sweep: SGD vs SAM vs mSAM on one model and data set, with equal budgets."""

    name: str = Field(description="sweep name: run folder runs/<name>, study <name>/<optimizer>")
    base: SweepBase
    optimizers: list[OptimName] = Field(
        default_factory=lambda: list(OPTIMIZERS), description="optimizers compared"
    )
    search: SearchSpace = Field(default_factory=SearchSpace)
    budget: Budget = Field(default_factory=Budget)
    final: FinalStage = Field(default_factory=FinalStage)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        return check_run_name(value, MAX_NAME_LENGTH)

    @field_validator("optimizers")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("must list at least one of sgd, sam, msam")
        _check_choices(value)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> SweepSpec:
        batch = self.base.train.batch_size
        if self.search.micro_batches is not None and "msam" in self.optimizers:
            for m in self.search.micro_batches.choices:
                if batch % m:
                    raise ValueError(
                        f"search.micro_batches: choice {m} does not divide "
                        f"base.train.batch_size {batch}"
                    )
        if self.budget.sampler == "grid":
            for optimizer in self.optimizers:
                for key in self.search.searched(optimizer):
                    if getattr(self.search, key).choices is None:
                        raise ValueError(
                            f"budget.sampler=grid needs search.{key} as {{choices: [...]}}, "
                            f"not a range"
                        )
        self._check_epochs()
        for optimizer in self.optimizers:  # every optimizer's trial config must validate
            raw = self._raw_train_config(optimizer, self._edge_params(optimizer))
            try:
                TrainConfig.model_validate(raw)
            except ValidationError as exc:
                raise ValueError(
                    str(user_error_from_validation(exc, TrainConfig, f"base (as {optimizer})"))
                ) from None
        return self

    def _check_epochs(self) -> None:
        """Finals and trials that ``sweeps.budget.epochs`` derives stay valid train configs: no
        more warm-up than epochs, and no more than MAX_EPOCHS once ``budget.match: grad_evals``
        gives the cheaper optimizers more epochs."""
        warmup, final = self.base.train.warmup_epochs, self.final.epochs
        if final is not None and final < warmup:
            raise ValueError(
                f"final.epochs {final} is less than base.train.warmup_epochs {warmup}: final "
                "runs would never reach the peak learning rate"
            )
        if self.budget.match != "grad_evals":
            return
        costs = {o: grad_evals_per_update(o, 0.0 if o == "sgd" else 1.0) for o in self.optimizers}
        cheapest = min(costs, key=costs.__getitem__)
        for key, value in (("base.train.epochs", self.base.train.epochs), ("final.epochs", final)):
            longest = (value or 0) * max(costs.values()) // costs[cheapest]
            if longest > MAX_EPOCHS:
                raise ValueError(
                    f"budget.match=grad_evals trains {cheapest} {longest} epochs for {key} "
                    f"{value}, more than the {MAX_EPOCHS} a run may train"
                )

    def _edge_params(self, optimizer: str) -> dict[str, Any]:
        return {
            key: getattr(self.search, key).choices[0]
            if key == "micro_batches"
            else getattr(self.search, key).values()[0]
            for key in self.search.searched(optimizer)
        }

    def train_config(self, optimizer: str, params: Mapping[str, Any]) -> TrainConfig:
        """The validated train config of one trial or final run.

        ``params`` holds sampled ``lr``/``rho``/``micro_batches``, and may hold dotted overrides
        such as ``train.seed`` or ``train.epochs`` (for final runs). SGD runs record rho 0 and one
        micro-batch, SAM runs one micro-batch, so logged configs never show unused values.
        """
        raw = self._raw_train_config(optimizer, params)
        return parse_train_config(raw, source=f"{self.name}/{optimizer}")

    def _raw_train_config(self, optimizer: str, params: Mapping[str, Any]) -> dict[str, Any]:
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {optimizer!r}; expected one of {OPTIMIZERS}")
        raw: dict[str, Any] = copy.deepcopy(self.base.model_dump(mode="json"))
        raw["name"] = f"{self.name}-{optimizer}"
        optim = raw["optim"]
        optim["name"] = optimizer
        if optimizer == "sgd":
            optim.update(rho=0.0, micro_batches=1)
        elif optimizer == "sam":
            optim["micro_batches"] = 1
        sets: list[tuple[list[str], Any]] = []
        for key, value in params.items():
            if key in SEARCHED_BY:
                optim[key] = value
            elif "." in key:
                sets.append((key.split("."), value))
            else:
                raise ValueError(f"unknown parameter {key!r}; expected lr, rho, micro_batches")
        for path, value in sets:
            node = raw
            for part in path[:-1]:
                node = node.setdefault(part, {})
            node[path[-1]] = value
        return raw

    def to_dict(self) -> dict[str, Any]:
        """The resolved spec as plain YAML/JSON types (written to the run folder as spec.yaml)."""
        return self.model_dump(mode="json")


def parse_sweep_spec(raw: Any, *, source: str = "spec") -> SweepSpec:
    """Validate a raw mapping; problems become a one-line UserError naming the key."""
    return parse_config(SweepSpec, raw, source=source)


def load_sweep_spec(path: str | Path, sets: Sequence[str] = ()) -> SweepSpec:
    """Read, override (``--set base.train.epochs=3``) and validate a sweep spec file."""
    return load_config(SweepSpec, path, sets)
