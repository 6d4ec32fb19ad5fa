"""The train config's schema: the YAML of ``msam train``, validated before any work starts.

One pydantic model per YAML section, every one closed (``extra="forbid"``) so a typo is an error,
not a silently ignored key. Each hyperparameter's description gives its unit and meaning. The
resolved config is one plain dict (``TrainConfig.to_dict()``), logged as is. The small value types
(``Int``, ``Float``, ``Seed``, ``AutoBool``, ...) are shared with the sweep spec in ``sweeps.spec``.

Sizes are bounded generously (:data:`MAX_EPOCHS`, :data:`MAX_BATCH`, ...): far beyond any real
run, but a typo such as ``epochs: 100000`` or a 4 TB synthetic data set is refused before it runs
for weeks or takes the machine's memory.
"""

from __future__ import annotations

import re
import typing
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AllowInfNan,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    ValidationInfo,
    field_validator,
    model_validator,
)

from msam.config.messages import show

__all__ = [
    "DATASETS",
    "MAX_BATCH",
    "MAX_EPOCHS",
    "MAX_FILE_NAME",
    "OPTIMIZERS",
    "SEED_LIMIT",
    "AmpMode",
    "AutoBool",
    "Bool",
    "DataConfig",
    "DatasetName",
    "Float",
    "Int",
    "ModelConfig",
    "OptimConfig",
    "OptimName",
    "Section",
    "Seed",
    "SyntheticConfig",
    "TrackingConfig",
    "TrainConfig",
    "TrainSection",
    "WandbConfig",
    "check_run_name",
]

DatasetName = Literal[
    "digits", "fashion_mnist", "mnist", "cifar10", "cifar100", "imagefolder", "synthetic"
]
OptimName = Literal["sgd", "sam", "msam"]
DATASETS: tuple[str, ...] = typing.get_args(DatasetName)
OPTIMIZERS: tuple[str, ...] = typing.get_args(OptimName)

_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")

#: Most epochs a run may train: a typo of a few zeros must not run for months.
MAX_EPOCHS = 10_000
#: Largest mini-batch (images), evaluation batch and micro-batch count.
MAX_BATCH = 65_536
#: Seeds are below 2**31: numpy and torch take seeds in [0, 2**32), and a sweep adds each worker's
#: index (and the final stage a seed's number) to the seeds it is given.
SEED_LIMIT = 2**31
#: Longest file name (bytes) on Linux, macOS and Windows file systems; run names become file names.
MAX_FILE_NAME = 255
#: Most memory the synthetic data set's arrays may take (bytes).
_MAX_SYNTHETIC_BYTES = 4 << 30
#: Characters W&B refuses in a project name (and that no entity, a path segment of every W&B
#: URL, holds), and its longest project name and tag.
_WANDB_FORBIDDEN = "/\\#?%:"
_WANDB_MAX_PROJECT = 128
_WANDB_MAX_TAG = 64


# ----------------------------------------------------------------------------- small value types


def _auto_or_bool(value: Any) -> Any:
    """Accept ``auto``/true/false only: a union error from pydantic would be two confusing lines."""
    if value == "auto" or isinstance(value, bool):
        return value
    raise ValueError(f"expected auto, true or false (got {show(value)})")


def _amp_mode(value: Any) -> Any:
    """``amp: false`` reads naturally in YAML; it means no mixed precision, as does null."""
    if value is False or value is None:
        return "none"
    if value is True:
        return "auto"
    return value


def _number_not_bool(value: Any) -> Any:
    """YAML true/false are not numbers, though pydantic's lax mode would read them as 1.0/0.0."""
    if isinstance(value, bool):
        raise ValueError(f"expected a number (got {show(value)})")
    return value


# Integers and booleans come typed from YAML, so they are strict (no `epochs: true`, no `"10"`);
# floats stay lax so that `lr: 1e-3` (a string to YAML 1.1) still reads as a number, but finite:
# `rho: .inf` would pass `ge=0` and only show as a diverged run.
Int = Annotated[int, Strict()]
Seed = Annotated[int, Strict(), Field(ge=0, lt=SEED_LIMIT)]
Bool = Annotated[bool, Strict()]
Float = Annotated[float, BeforeValidator(_number_not_bool), AllowInfNan(False)]
AutoBool = Annotated[Literal["auto"] | bool, BeforeValidator(_auto_or_bool)]
AmpMode = Annotated[Literal["auto", "bf16", "fp16", "none"], BeforeValidator(_amp_mode)]


def check_run_name(value: str, max_length: int = MAX_FILE_NAME) -> str:
    """Names become folders, W&B groups and Optuna study names (``<name>/<optimizer>``): no '/';
    and file names, so at most ``max_length`` characters (ASCII: one byte each), which a sweep
    lowers by the longest suffix it adds (``tuned/<name>-msam.yaml.tmp``)."""
    if not _NAME_PATTERN.fullmatch(value):
        raise ValueError(
            f"use letters, digits, '.', '_' and '-', starting with a letter or digit "
            f"(got {show(value)})"
        )
    if len(value) > max_length:
        raise ValueError(
            f"at most {max_length} characters, so that every file named after it fits in "
            f"{MAX_FILE_NAME} bytes (got {len(value)})"
        )
    return value


def _wandb_tag(value: str) -> str:
    if not 1 <= len(value) <= _WANDB_MAX_TAG:
        raise ValueError(
            f"W&B tags are 1 to {_WANDB_MAX_TAG} characters (got {len(value)}: {show(value)})"
        )
    return value


WandbTag = Annotated[str, AfterValidator(_wandb_tag)]


class Section(BaseModel):
    """Base of every config section: closed, so unknown keys are errors rather than no-ops."""

    model_config = ConfigDict(extra="forbid")


# ----------------------------------------------------------------------------- sections


class SyntheticConfig(Section):
    """Random but learnable images (a smooth mean image per class plus noise): a data set that
    needs no files, for benchmarks and tests. Defaults match ``msam.data.SYNTHETIC_DEFAULTS``."""

    num_classes: Int = Field(10, ge=2, le=100_000, description="number of label classes")
    in_chans: Int = Field(3, ge=1, le=64, description="image channels (1 grey, 3 RGB; <= 64)")
    img_size: Int = Field(32, ge=1, le=1024, description="image height = width (pixels, <= 1024)")
    num_train: Int = Field(
        10_000,
        ge=1,
        le=10_000_000,
        description="training images, before the validation split (<= 10 million)",
    )
    num_test: Int = Field(2_000, ge=1, le=10_000_000, description="test images (<= 10 million)")
    noise: Float = Field(48.0, ge=0.0, description="std of per-pixel Gaussian noise (uint8 units)")
    seed: Seed = Field(0, description="seed of the class means and samples (not train.seed)")

    @model_validator(mode="after")
    def _fits_in_memory(self) -> SyntheticConfig:
        # uint8 images, and a float32 mean image per class (torch builds them all at once)
        pixels = self.in_chans * self.img_size**2
        size = (self.num_train + self.num_test + 4 * self.num_classes) * pixels
        if size > _MAX_SYNTHETIC_BYTES:
            raise ValueError(
                f"{self.num_train + self.num_test} images of {self.in_chans}x{self.img_size}x"
                f"{self.img_size} (and {self.num_classes} class means) take "
                f"{size / (1 << 30):.1f} GiB; at most {_MAX_SYNTHETIC_BYTES >> 30} GiB"
            )
        return self


class DataConfig(Section):
    dataset: DatasetName = Field(
        description="data set: digits | fashion_mnist | mnist | cifar10 | cifar100 | "
        "imagefolder | synthetic"
    )
    root: str | None = Field(
        None,
        min_length=1,
        max_length=4096,
        description="folder holding the data set's files; null = the data set's default place",
    )
    val_fraction: Float = Field(
        0.1,
        ge=0.0,
        lt=1.0,
        description="share of the training set held out for validation (seeded split; 0 = none)",
    )
    subset: Int | None = Field(
        None, gt=0, description="use only this many training images (seeded), for quick runs"
    )
    augment: AutoBool = Field(
        "auto", description="train-time augmentation; auto = the data set's usual (flip/crop)"
    )
    split_seed: Seed = Field(
        0, description="seed of the train/validation split and subset, kept apart from train.seed"
    )
    img_size: Int | None = Field(
        None,
        ge=1,
        le=4096,
        description="imagefolder only: resize images to this many pixels per side (<= 4096)",
    )
    synthetic: SyntheticConfig | None = Field(
        None, description="shape of the synthetic data set (only with dataset: synthetic)"
    )

    @model_validator(mode="after")
    def _dataset_specific(self) -> DataConfig:
        if self.dataset == "synthetic" and self.synthetic is None:
            self.synthetic = SyntheticConfig()
        if self.dataset != "synthetic" and self.synthetic is not None:
            raise ValueError(
                f"data.synthetic is only used with data.dataset=synthetic "
                f"(dataset is {self.dataset}); remove it"
            )
        if self.dataset == "imagefolder" and self.root is None:
            raise ValueError("data.root is required for data.dataset=imagefolder")
        if self.dataset != "imagefolder" and self.img_size is not None:
            raise ValueError(
                f"data.img_size is only used with data.dataset=imagefolder "
                f"({self.dataset} has a fixed size); remove it"
            )
        return self


class ModelConfig(Section):
    name: str = Field(
        "resnet18", min_length=1, max_length=200, description="timm model name (never pretrained)"
    )
    small_input: AutoBool = Field(
        "auto",
        description="adapt the stem to small images (3x3 stride-1 ResNet stem, small ViT patches); "
        "auto = when images are under 64 px",
    )
    kwargs: dict[str, Any] = Field(
        default_factory=dict, description="extra keyword arguments for timm.create_model"
    )


class OptimConfig(Section):
    name: OptimName = Field(
        "sgd",
        description="sgd = plain gradient; sam = SAM (Foret et al.); msam = mSAM (Behdin et al.)",
    )
    base: str = Field(
        "sgd",
        min_length=1,
        max_length=100,
        description="timm optimizer stepping with the (m)SAM gradient (sgd, momentum, adamw, ...)",
    )
    lr: Float = Field(0.1, gt=0.0, description="peak learning rate (per update, after warm-up)")
    momentum: Float = Field(0.9, ge=0.0, lt=1.0, description="base optimizer momentum (0 = none)")
    weight_decay: Float = Field(
        5.0e-4, ge=0.0, description="L2 penalty coefficient of the base optimizer"
    )
    rho: Float = Field(
        0.05, ge=0.0, description="SAM radius: L2 length of the ascent step (ignored for sgd)"
    )
    micro_batches: Int = Field(
        1,
        ge=1,
        le=MAX_BATCH,
        description="mSAM micro-batches per mini-batch, each with its own ascent step "
        "(1 = SAM; must divide train.batch_size)",
    )
    adaptive: Bool = Field(False, description="ASAM scaling of the ascent step by |w|")
    strategy: str = Field(
        "auto",
        min_length=1,
        max_length=100,
        description="how the m perturbed passes run; auto = fastest exact one",
    )

    @model_validator(mode="after")
    def _sam_is_one_micro_batch(self) -> OptimConfig:
        if self.name == "sam" and self.micro_batches != 1:
            raise ValueError(
                f"optim.micro_batches is {self.micro_batches} but optim.name=sam uses one "
                f"micro-batch; use optim.name=msam for micro_batches > 1"
            )
        return self


class TrainSection(Section):
    epochs: Int = Field(
        10, ge=1, le=MAX_EPOCHS, description=f"passes over the training set (<= {MAX_EPOCHS})"
    )
    batch_size: Int = Field(
        128, ge=1, le=MAX_BATCH, description=f"images per update (the mini-batch B, <= {MAX_BATCH})"
    )
    eval_batch_size: Int | None = Field(
        None,
        ge=1,
        le=MAX_BATCH,
        description="images per evaluation batch; null = 2 x train.batch_size",
    )
    schedule: Literal["cosine", "step", "none"] = Field(
        "cosine", description="learning-rate schedule after warm-up"
    )
    warmup_epochs: Int = Field(
        0, ge=0, description="epochs of linear learning-rate warm-up (at most train.epochs)"
    )
    label_smoothing: Float = Field(
        0.0, ge=0.0, lt=1.0, description="probability mass spread over all classes in the loss"
    )
    grad_clip: Float | None = Field(
        None, gt=0.0, description="max L2 norm of the final gradient; null = no clipping"
    )
    amp: AmpMode = Field(
        "auto", description="mixed precision: auto (bf16 on capable GPUs) | bf16 | fp16 | none"
    )
    seed: Seed = Field(0, description="seed of weights, batch order and augmentation (< 2**31)")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    compile: Bool = Field(False, description="torch.compile the model")
    channels_last: AutoBool = Field(
        "auto", description="channels-last memory format; auto = on CUDA for conv nets"
    )
    checkpoint: Bool = Field(True, description="save a checkpoint each epoch so --resume works")

    @field_validator("warmup_epochs")
    @classmethod
    def _warmup_within_run(cls, value: int, info: ValidationInfo) -> int:
        epochs = info.data.get("epochs")  # absent when epochs itself is invalid
        if epochs is not None and value > epochs:
            raise ValueError(
                f"{value} is more than the run's epochs ({epochs}); the learning rate would "
                "never reach its peak"
            )
        return value

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if not _DEVICE_PATTERN.match(value):
            raise ValueError(f"expected auto, cpu, cuda or cuda:N (got {show(value)})")
        return value


class WandbConfig(Section):
    """Checked as W&B checks them when a run starts, which would otherwise leave every run of a
    sweep untracked, each with a warning."""

    project: str = Field(
        "msam",
        min_length=1,
        max_length=_WANDB_MAX_PROJECT,
        description=f"W&B project (at most {_WANDB_MAX_PROJECT} characters, none of / \\ # ? % :)",
    )
    mode: Literal["auto", "online", "offline", "disabled"] = Field(
        "auto", description="auto = online with credentials, else offline; WANDB_MODE overrides"
    )
    entity: str | None = Field(None, description="W&B team or user; null = the default")
    tags: list[WandbTag] = Field(
        default_factory=list,
        description=f"tags added to every run (each 1 to {_WANDB_MAX_TAG} characters)",
    )

    @field_validator("project", "entity")
    @classmethod
    def _wandb_characters(cls, value: str | None) -> str | None:
        found = [c for c in _WANDB_FORBIDDEN if value is not None and c in value]
        if found:
            listed = " ".join(_WANDB_FORBIDDEN)
            raise ValueError(f"W&B refuses {listed} in names; found {found[0]!r} in {show(value)}")
        return value


class TrackingConfig(Section):
    wandb: WandbConfig = Field(default_factory=WandbConfig)


class TrainConfig(Section):
    """One training run: ``msam train`` runs it; a sweep builds one per trial."""

    name: str = Field("run", description="run name: default output folder runs/<name>, W&B name")
    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainSection = Field(default_factory=TrainSection)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        return check_run_name(value)

    @model_validator(mode="after")
    def _micro_batches_divide_batch(self) -> TrainConfig:
        m, b = self.optim.micro_batches, self.train.batch_size
        if self.optim.name == "msam" and b % m != 0:
            raise ValueError(
                f"train.batch_size {b} is not divisible by optim.micro_batches {m} "
                f"(mSAM splits each batch into equal micro-batches)"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain YAML/JSON types, the single record logged with a run."""
        return self.model_dump(mode="json")
