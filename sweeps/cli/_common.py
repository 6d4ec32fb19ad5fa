"""Shared pieces of the subcommands: pre-flight checks and lazily loaded implementations.

Heavy modules (torch, timm, optuna, wandb) are imported only inside these functions, so that
``msam --help`` and config errors answer at once.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
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


def load_entry(module: str, attr: str) -> Callable[..., Any] | None:
    """``module.attr`` if that module exists; None while it is not written yet.

    Only the absence of the module itself counts as "not built": an import error inside it is a
    bug and propagates.
    """
    try:
        loaded = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (module == exc.name or module.startswith(exc.name + ".")):
            return None
        raise
    return getattr(loaded, attr, None)


def not_built(command: str, what: str) -> int:
    print(f"msam {command}: {what} is not built yet", file=sys.stderr)
    return 1


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
    resolve_device = load_entry("msam.trainer", "resolve_device")
    if resolve_device is not None:
        check_strategy(strategy, resolve_device(device).type)
    check_data = load_entry("msam.data", "check_data_available")
    if check_data is None:
        return
    check_data(dataset, root, synthetic=synthetic)
    check_fits = load_entry("msam.data", "check_data_fits")
    if check_fits is not None:
        check_fits(
            dataset,
            root,
            val_fraction=val_fraction,
            subset=subset,
            batch_size=batch_size,
            synthetic=synthetic,
            img_size=img_size,
        )
    dataset_info = load_entry("msam.data", "dataset_info")
    if dataset_info is None:
        return
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
