"""Train config: the YAML schema of ``msam train``, validated before any work starts.

``schema`` holds the pydantic models (one per YAML section), ``loading`` reads YAML and applies
``--set`` overrides, ``messages`` turns pydantic's and PyYAML's reports into one-line
:class:`msam.errors.UserError` messages, and ``checks`` holds the checks that need timm or torch
(imported only when they run). Importing this package imports neither torch nor timm, so a bad
config is reported in a fraction of a second.
"""

from msam.config.checks import check_optimizer_name, check_strategy
from msam.config.loading import (
    _UniqueKeyLoader,  # noqa: F401 - tests check that every YAML load in the code uses it
    apply_overrides,
    first_difference,
    load_train_config,
    load_yaml,
    parse_train_config,
)
from msam.config.messages import did_you_mean, user_error_from_validation
from msam.config.schema import (
    DATASETS,
    OPTIMIZERS,
    AmpMode,
    AutoBool,
    Bool,
    DataConfig,
    DatasetName,
    Float,
    Int,
    ModelConfig,
    OptimConfig,
    OptimName,
    Section,
    SyntheticConfig,
    TrackingConfig,
    TrainConfig,
    TrainSection,
    WandbConfig,
    check_run_name,
)

__all__ = [
    "DATASETS",
    "OPTIMIZERS",
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
