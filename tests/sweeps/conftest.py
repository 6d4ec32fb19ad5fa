"""The tiny finished sweep the final-stage and results tests share (tests/helpers/finals.py)."""

from __future__ import annotations

import pytest
from helpers.finals import TinySweep, build_tiny_sweep


@pytest.fixture(scope="session")
def tiny_sweep(tmp_path_factory: pytest.TempPathFactory) -> TinySweep:
    """Built once per test session (real finals take a while); read it, or change a copy made
    with ``helpers.finals.copy_sweep``."""
    return build_tiny_sweep(tmp_path_factory.mktemp("sweep") / "digits-tiny")
