"""Test settings: W&B offline and quiet, one torch thread (tiny models), the ``kind`` fixture,
and the sweep fixtures of tests/helpers/fixtures.py for every test."""

from __future__ import annotations

import os

import pytest
import torch
from helpers.tinymodels import MODELS

pytest_plugins = ["helpers.fixtures"]

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(1)  # tiny models: threads cost more than they give


@pytest.fixture(params=sorted(MODELS))
def kind(request) -> str:
    return request.param
