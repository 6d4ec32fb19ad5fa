"""Train config: the YAML schema of ``msam train``, validated before any work starts.

``schema`` holds the pydantic models (one per YAML section), ``loading`` reads YAML and applies
``--set`` overrides, ``messages`` turns pydantic's and PyYAML's reports into one-line
:class:`msam.errors.UserError` messages, and ``checks`` holds the checks that need timm or torch
(imported only when they run). Importing this package imports neither torch nor timm, so a bad
config is reported in a fraction of a second.
"""

from msam.config.checks import *  # noqa: F403 - the package re-exports each module's __all__
from msam.config.checks import __all__ as _checks
from msam.config.loading import *  # noqa: F403
from msam.config.loading import __all__ as _loading
from msam.config.loading import (
    _UniqueKeyLoader,  # noqa: F401 - tests check that every YAML load in the code uses it
)
from msam.config.messages import did_you_mean, user_error_from_validation
from msam.config.schema import *  # noqa: F403
from msam.config.schema import __all__ as _schema

__all__ = [
    *_schema,
    *_loading,
    *_checks,
    "did_you_mean",
    "user_error_from_validation",
]
