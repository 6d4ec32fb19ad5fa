"""Code the tests share (as ``optuna.testing`` is for Optuna): tiny models and the paper's mSAM
reference, tiny sweep specs and the fixtures that run them, a tiny finished sweep for the
final-stage and results tests, and a reader for what W&B logged offline.

Importable as ``helpers`` because pytest puts ``tests/`` on ``sys.path`` (``pythonpath`` in
pyproject.toml). Test modules import from here, never from one another.
"""

from __future__ import annotations

from pathlib import Path

#: The repository's root: the working directory for ``msam`` subprocesses and shipped configs.
REPO = Path(__file__).resolve().parents[2]
