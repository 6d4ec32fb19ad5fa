"""Every YAML the project ships parses, and its model builds for its data set's images."""

from __future__ import annotations

import pytest
from helpers import REPO

from msam.config import load_train_config
from msam.data import dataset_info
from msam.models import check_model


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "train").glob("*.yaml")), ids=str)
def test_train_configs(path):
    cfg = load_train_config(path)
    info = dataset_info(cfg.data.dataset)
    check_model(
        cfg.model.name,
        num_classes=info.num_classes,
        in_chans=info.in_chans,
        img_size=info.img_size,
        small_input=cfg.model.small_input,
        kwargs=cfg.model.kwargs,
    )
