"""Shared pieces of the subcommands: the ``--set`` option, pre-flight checks, folder checks.

Heavy modules (torch, timm, optuna, wandb) are imported only inside these functions, so that
``msam --help`` and config errors answer at once.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from msam.errors import UserError


def add_set_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set optim.lr=0.05 (repeatable; YAML values)",
    )


def preflight(cfg: Any) -> None:
    """Catch a wrong model, optimizer, strategy or device, a missing data set, or a subset,
    validation split or batch that does not fit the data, before any work (UserError, exit 2).

    ``cfg`` is a train config or a sweep spec's ``base`` (both have data, model, optim, train).
    The model is also built and run on the meta device, so a model that cannot take these
    images fails here rather than after data loading.
    """
    from msam.config import check_optimizer_name, check_strategy
    from msam.data import check_data_available, check_data_fits, dataset_info
    from msam.models import check_model, check_model_name
    from msam.trainer import resolve_device

    data, model = cfg.data, cfg.model
    synthetic = data.synthetic.model_dump() if data.synthetic else None
    check_model_name(model.name)
    check_optimizer_name(cfg.optim.base)
    check_strategy(cfg.optim.strategy, resolve_device(cfg.train.device).type)
    check_data_available(data.dataset, data.root, synthetic=synthetic)
    check_data_fits(
        data.dataset,
        data.root,
        val_fraction=data.val_fraction,
        subset=data.subset,
        batch_size=cfg.train.batch_size,
        synthetic=synthetic,
        img_size=data.img_size,
    )
    info = dataset_info(data.dataset, data.root, synthetic=synthetic, img_size=data.img_size)
    check_model(
        model.name,
        num_classes=info.num_classes,
        in_chans=info.in_chans,
        img_size=info.img_size,
        small_input=model.small_input,
        kwargs=model.kwargs,
    )


def existing_dir(path: str, what: str) -> Path:
    folder = Path(path)
    if not folder.is_dir():
        raise UserError(f"{path}: no such {what} folder")
    return folder
