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


def preflight(
    *,
    model: str,
    base_optimizer: str,
    dataset: str,
    root: str | None,
    synthetic: dict[str, Any] | None,
    val_fraction: float,
    subset: int | None,
    batch_size: int,
    device: str = "auto",
    strategy: str = "auto",
    img_size: int | None = None,
    small_input: bool | str = "auto",
    model_kwargs: dict[str, Any] | None = None,
) -> None:
    """Catch a wrong model, optimizer, strategy or device, a missing data set, or a subset,
    validation split or batch that does not fit the data, before any work (UserError, exit 2).

    Where the data layer can say the image shape, the model is also built and run on the meta
    device, so a model that cannot take these images fails here rather than after data loading.
    """
    from msam.config import check_optimizer_name, check_strategy
    from msam.models import check_model, check_model_name

    check_model_name(model)
    check_optimizer_name(base_optimizer)
    from msam.data import check_data_available, check_data_fits, dataset_info
    from msam.trainer import resolve_device

    check_strategy(strategy, resolve_device(device).type)
    check_data_available(dataset, root, synthetic=synthetic)
    check_data_fits(
        dataset,
        root,
        val_fraction=val_fraction,
        subset=subset,
        batch_size=batch_size,
        synthetic=synthetic,
        img_size=img_size,
    )
    info = dataset_info(dataset, root, synthetic=synthetic, img_size=img_size)
    check_model(
        model,
        num_classes=info.num_classes,
        in_chans=info.in_chans,
        img_size=info.img_size,
        small_input=small_input,
        kwargs=model_kwargs,
    )


def existing_dir(path: str, what: str) -> Path:
    folder = Path(path)
    if not folder.is_dir():
        raise UserError(f"{path}: no such {what} folder")
    return folder
