"""Train config: the YAML schema of ``msam train``, validated before any work starts.

One pydantic model per YAML section, every one closed (``extra="forbid"``) so a typo is an error,
not a silently ignored key. Each hyperparameter's description gives its unit and meaning. The
resolved config is one plain dict (``TrainConfig.to_dict()``), logged as is.

Errors a user causes come back as one-line :class:`msam.errors.UserError` messages that name the
key, the value and, for typos, the closest valid name.
"""

from __future__ import annotations

import copy
import difflib
import re
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AllowInfNan,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    field_validator,
    model_validator,
)

from msam.errors import UserError

__all__ = [
    "DATASETS",
    "OPTIMIZERS",
    "AmpMode",
    "AutoBool",
    "Bool",
    "DatasetName",
    "Float",
    "Int",
    "OptimName",
    "DataConfig",
    "ModelConfig",
    "OptimConfig",
    "Section",
    "SyntheticConfig",
    "TrackingConfig",
    "TrainConfig",
    "TrainSection",
    "WandbConfig",
    "apply_overrides",
    "check_optimizer_name",
    "check_run_name",
    "check_strategy",
    "did_you_mean",
    "first_difference",
    "load_train_config",
    "load_yaml",
    "parse_train_config",
    "user_error_from_validation",
]

DatasetName = Literal[
    "digits", "fashion_mnist", "mnist", "cifar10", "cifar100", "imagefolder", "synthetic"
]
OptimName = Literal["sgd", "sam", "msam"]
DATASETS: tuple[str, ...] = typing.get_args(DatasetName)
OPTIMIZERS: tuple[str, ...] = typing.get_args(OptimName)

_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


# ----------------------------------------------------------------------------- small value types


def _auto_or_bool(value: Any) -> Any:
    """Accept ``auto``/true/false only: a union error from pydantic would be two confusing lines."""
    if value == "auto" or isinstance(value, bool):
        return value
    raise ValueError(f"expected auto, true or false (got {_show(value)})")


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
        raise ValueError(f"expected a number (got {_show(value)})")
    return value


# Integers and booleans come typed from YAML, so they are strict (no `epochs: true`, no `"10"`);
# floats stay lax so that `lr: 1e-3` (a string to YAML 1.1) still reads as a number, but finite:
# `rho: .inf` would pass `ge=0` and only show as a diverged run.
Int = Annotated[int, Strict()]
Bool = Annotated[bool, Strict()]
Float = Annotated[float, BeforeValidator(_number_not_bool), AllowInfNan(False)]
AutoBool = Annotated[Literal["auto"] | bool, BeforeValidator(_auto_or_bool)]
AmpMode = Annotated[Literal["auto", "bf16", "fp16", "none"], BeforeValidator(_amp_mode)]


def check_run_name(value: str) -> str:
    """Names become folders, W&B groups and Optuna study names (``<name>/<optimizer>``): no '/'."""
    if not _NAME_PATTERN.match(value):
        raise ValueError(
            f"use letters, digits, '.', '_' and '-', starting with a letter or digit "
            f"(got {_show(value)})"
        )
    return value


class Section(BaseModel):
    """Base of every config section: closed, so unknown keys are errors rather than no-ops."""

    model_config = ConfigDict(extra="forbid")


# ----------------------------------------------------------------------------- sections


class SyntheticConfig(Section):
    """Random but learnable images (a smooth mean image per class plus noise): a data set that
    needs no files, for benchmarks and tests. Defaults match ``msam.data.SYNTHETIC_DEFAULTS``."""

    num_classes: Int = Field(10, ge=2, description="number of label classes")
    in_chans: Int = Field(3, ge=1, description="image channels (1 grey, 3 RGB)")
    img_size: Int = Field(32, ge=1, description="image height = width (pixels)")
    num_train: Int = Field(10_000, ge=1, description="training images, before the validation split")
    num_test: Int = Field(2_000, ge=1, description="test images")
    noise: Float = Field(48.0, ge=0.0, description="std of per-pixel Gaussian noise (uint8 units)")
    seed: Int = Field(0, ge=0, description="seed of the class means and samples (not train.seed)")


class DataConfig(Section):
    dataset: DatasetName = Field(
        description="data set: digits | fashion_mnist | mnist | cifar10 | cifar100 | "
        "imagefolder | synthetic"
    )
    root: str | None = Field(
        None, description="folder holding the data set's files; null = the data set's default place"
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
    split_seed: Int = Field(
        0, description="seed of the train/validation split and subset, kept apart from train.seed"
    )
    img_size: Int | None = Field(
        None, ge=1, description="imagefolder only: resize images to this many pixels per side"
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
    name: str = Field("resnet18", min_length=1, description="timm model name (never pretrained)")
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
        description="mSAM micro-batches per mini-batch, each with its own ascent step "
        "(1 = SAM; must divide train.batch_size)",
    )
    adaptive: Bool = Field(False, description="ASAM scaling of the ascent step by |w|")
    strategy: str = Field(
        "auto", min_length=1, description="how the m perturbed passes run; auto = fastest exact one"
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
    epochs: Int = Field(10, ge=1, description="passes over the training set")
    batch_size: Int = Field(128, ge=1, description="images per update (the mini-batch B)")
    eval_batch_size: Int | None = Field(
        None, ge=1, description="images per evaluation batch; null = 2 x train.batch_size"
    )
    schedule: Literal["cosine", "step", "none"] = Field(
        "cosine", description="learning-rate schedule after warm-up"
    )
    warmup_epochs: Int = Field(0, ge=0, description="epochs of linear learning-rate warm-up")
    label_smoothing: Float = Field(
        0.0, ge=0.0, lt=1.0, description="probability mass spread over all classes in the loss"
    )
    grad_clip: Float | None = Field(
        None, gt=0.0, description="max L2 norm of the final gradient; null = no clipping"
    )
    amp: AmpMode = Field(
        "auto", description="mixed precision: auto (bf16 on capable GPUs) | bf16 | fp16 | none"
    )
    seed: Int = Field(0, description="seed of weights, batch order and augmentation")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    compile: Bool = Field(False, description="torch.compile the model")
    channels_last: AutoBool = Field(
        "auto", description="channels-last memory format; auto = on CUDA for conv nets"
    )
    checkpoint: Bool = Field(True, description="save a checkpoint each epoch so --resume works")

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if not _DEVICE_PATTERN.match(value):
            raise ValueError(f"expected auto, cpu, cuda or cuda:N (got {_show(value)})")
        return value


class WandbConfig(Section):
    project: str = Field("msam", min_length=1, description="W&B project")
    mode: Literal["auto", "online", "offline", "disabled"] = Field(
        "auto", description="auto = online with credentials, else offline; WANDB_MODE overrides"
    )
    entity: str | None = Field(None, description="W&B team or user; null = the default")
    tags: list[str] = Field(default_factory=list, description="tags added to every run")


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


# ----------------------------------------------------------------------------- YAML and overrides


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that rejects duplicate keys, which plain YAML silently resolves to the last one."""


def _construct_unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict:
    seen: dict[Any, yaml.Node] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if isinstance(key, Iterable) and not isinstance(key, str):
            continue  # unhashable keys: let the normal constructor report them
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen[key] = key_node
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping
)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML file whose top level is a mapping; any problem is a one-line UserError."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        raise UserError(f"{path}: is a folder, expected a YAML file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read: {_one_line(str(exc))}") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise UserError(_yaml_error_message(path, exc)) from None
    if data is None:
        raise UserError(f"{path}: file is empty")
    if not isinstance(data, dict):
        raise UserError(f"{path}: top level must be a mapping of keys (got a {_kind(data)})")
    return data


def _yaml_error_message(path: Path, exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or getattr(exc, "context", None) or str(exc)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    return f"{where}: invalid YAML: {_one_line(str(problem))}"


_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _parse_value(text: str) -> Any:
    """YAML scalar rules, plus '1e-3' as a float (YAML 1.1 reads it as a string)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str) and _NUMBER.match(value.strip()):
        return float(value)
    return value


def apply_overrides(raw: Mapping[str, Any], sets: Sequence[str]) -> dict[str, Any]:
    """Apply ``--set a.b=value`` overrides to a copy of ``raw``; values are parsed as YAML.

    Unknown paths are created as given so that validation reports them with a did-you-mean.
    """
    out = copy.deepcopy(dict(raw))
    for item in sets:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(part.strip() for part in parts):
            raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. optim.lr=0.1")
        node = out
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                where = ".".join(parts[: depth + 1])
                raise UserError(f"--set {item!r}: {where} is a value, not a section")
            node = child
        node[parts[-1]] = _parse_value(text)
    return out


# ----------------------------------------------------------------------------- error messages


def _dotted(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; an empty mapping stays a value of its own."""
    if not isinstance(tree, Mapping) or not tree:
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(_dotted(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def first_difference(
    before: Mapping[str, Any], after: Mapping[str, Any], *, ignore: Iterable[str] = ()
) -> tuple[str, Any, Any] | None:
    """The first dotted key (in sorted order) where two resolved configs differ, with both
    values; keys under ``ignore`` (``"final"`` covers ``final.seeds``) do not count."""
    ignored = tuple(ignore)
    old, new = _dotted(before), _dotted(after)
    for key in sorted(set(old) | set(new)):
        if any(key == k or key.startswith(k + ".") for k in ignored):
            continue
        if old.get(key) != new.get(key):
            return key, old.get(key), new.get(key)
    return None


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest choice, or an empty string."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _kind(value: Any) -> str:
    return {list: "list", dict: "mapping", str: "string"}.get(type(value), type(value).__name__)


def _show(value: Any) -> str:
    """A value as the user wrote it in YAML, short."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _loc_path(loc: Sequence[str | int]) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def _unwrap(annotation: Any) -> list[Any]:
    """The concrete types inside Optional/Union/Annotated/list annotations."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType, list):
        return [t for arg in typing.get_args(annotation) for t in _unwrap(arg)]
    return [annotation]


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    return [t for t in _unwrap(annotation) if isinstance(t, type) and issubclass(t, BaseModel)]


def _annotation_at(model: type[BaseModel], loc: Sequence[str | int]) -> Any:
    """Follow ``loc`` through nested models to the field's annotation (None if it leaves models)."""
    annotation: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        models = _models_in(annotation)
        if not models or part not in models[0].model_fields:
            return None
        annotation = models[0].model_fields[part].annotation
    return annotation


def _literal_choices(annotation: Any) -> list[Any]:
    return [
        value
        for t in _unwrap(annotation)
        if typing.get_origin(t) is Literal
        for value in typing.get_args(t)
    ]


def _describe(error: Mapping[str, Any], model: type[BaseModel]) -> str:
    loc = tuple(error["loc"])
    path = _loc_path(loc)
    kind = error["type"]
    value = error.get("input")
    if kind == "extra_forbidden":
        sections = _models_in(_annotation_at(model, loc[:-1]))
        allowed = list(sections[0].model_fields) if sections else []
        hint = did_you_mean(loc[-1], allowed)
        if not hint and allowed:
            hint = f" (allowed: {', '.join(allowed)})"
        return f"unknown key '{path}'{hint}"
    prefix = f"{path}: " if path else ""
    if kind == "missing":
        return f"{prefix}required key is missing"
    if kind == "literal_error":
        choices = _literal_choices(_annotation_at(model, loc))
        hint = did_you_mean(value, choices) if isinstance(value, str) else ""
        listed = ", ".join(str(c) for c in choices) or error["msg"]
        return f"{prefix}unknown value {_show(value)}{hint}; expected one of {listed}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"{prefix}expected a mapping of keys (got {_show(value)})"
    if kind in ("value_error", "assertion_error"):
        message = str(error["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
        # Section-level checks name their keys themselves ("optim.micro_batches is 4 ...").
        return message if path and message.startswith(f"{path}.") else prefix + message
    return f"{prefix}{error['msg']} (got {_show(value)})"


def user_error_from_validation(
    exc: ValidationError, model: type[BaseModel], source: str
) -> UserError:
    """Turn pydantic's multi-line report into one line: the first problem, plus a count."""
    errors = exc.errors(include_url=False)
    message = f"{source}: {_describe(errors[0], model)}"
    if len(errors) > 1:
        message += f" (+{len(errors) - 1} more)"
    return UserError(_one_line(message))


# ----------------------------------------------------------------------------- entry points


def parse_train_config(raw: Any, *, source: str = "config") -> TrainConfig:
    """Validate a raw mapping (from YAML plus overrides); problems become a one-line UserError."""
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as exc:
        raise user_error_from_validation(exc, TrainConfig, source) from None


def load_train_config(path: str | Path, sets: Sequence[str] = ()) -> TrainConfig:
    """Read, override and validate a train config file in one step, as ``msam train`` does."""
    raw = apply_overrides(load_yaml(path), sets)
    return parse_train_config(raw, source=str(path))


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
