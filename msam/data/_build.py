"""The data entry point of the trainer: name + options -> train/val/test loaders + metadata."""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from msam.data._datasets import load_arrays, load_synthetic, locate, synthetic_info
from msam.data._imagefolder import (
    ImageFolderLoader,
    build_imagefolder_loaders,
    imagefolder_info,
    locate_imagefolder,
)
from msam.data._info import DatasetInfo, canonical_name, static_info
from msam.data._loader import DeviceLoader
from msam.data._splits import check_split_args, split_indices, split_sizes
from msam.errors import UserError

Loader = DeviceLoader | ImageFolderLoader


@dataclass
class DataBundle:
    """Loaders of one run. ``val`` is None when ``final`` (train on train+val) or val_fraction=0."""

    train: Loader
    val: Loader | None
    test: Loader
    info: DatasetInfo


def dataset_info(
    dataset: str,
    root: str | os.PathLike[str] | None = None,
    *,
    synthetic: Mapping[str, Any] | None = None,
    img_size: int | None = None,
) -> DatasetInfo:
    """Metadata without loading images (imagefolder lists its class folders, nothing more)."""
    name = canonical_name(dataset)
    if name == "synthetic":
        return synthetic_info(synthetic)
    if name == "imagefolder":
        return imagefolder_info(root, img_size)
    info = static_info(name)
    assert info is not None, name
    return info


def check_data_available(
    dataset: str,
    root: str | os.PathLike[str] | None = None,
    *,
    synthetic: Mapping[str, Any] | None = None,
) -> None:
    """Raise the UserError a missing/unknown data set would cause, cheaply (no decoding)."""
    name = canonical_name(dataset)
    if name == "synthetic":
        synthetic_info(synthetic)
    elif name == "imagefolder":
        locate_imagefolder(root)
    else:
        locate(name, _root_str(root))


def check_data_fits(
    dataset: str,
    root: str | os.PathLike[str] | None = None,
    *,
    val_fraction: float,
    subset: int | None,
    batch_size: int,
    synthetic: Mapping[str, Any] | None = None,
    img_size: int | None = None,
) -> None:
    """UserError when the subset, validation split or batch size cannot fit the data set.

    Uses the data set's known size (no loading), so a sweep stops here rather than in every
    trial; a data set whose size only its files tell (imagefolder) is checked when loaded.
    """
    name = canonical_name(dataset)
    info = dataset_info(name, root, synthetic=synthetic, img_size=img_size)
    if info.num_train is None:
        return
    n_train, _ = split_sizes(
        info.num_train, val_fraction=val_fraction, subset=subset, final=False, name=name
    )
    if n_train < batch_size:
        raise UserError(_no_full_batch(batch_size, n_train, name))


def _no_full_batch(batch_size: int, n_train: int, name: str) -> str:
    return (
        f"batch_size={batch_size} exceeds the {n_train} training examples of {name} "
        "(every step uses a full batch); lower batch_size or raise data.subset"
    )


def _root_str(root: str | os.PathLike[str] | None) -> str | None:
    return None if root is None or root == "" else os.fspath(root)


def _resolve_augment(augment: bool | str) -> bool:
    if isinstance(augment, bool):
        return augment
    if isinstance(augment, str) and augment.lower() in ("auto", "none"):
        return augment.lower() == "auto"
    raise UserError(f"data.augment must be auto, none, true or false, got {augment!r}")


def _resolve_device(device: str | torch.device) -> torch.device:
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{what} must be a positive integer, got {value!r}")
    return value


def _as_tensors(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Tensors that own their memory: the cached arrays are shared and read-only."""
    return tuple(  # type: ignore[return-value]
        torch.from_numpy(a if a.flags.writeable and a.flags.c_contiguous else np.array(a))
        for a in (x, y)
    )


def build_data(
    dataset: str,
    *,
    root: str | os.PathLike[str] | None = None,
    val_fraction: float = 0.1,
    subset: int | None = None,
    augment: bool | str = "auto",
    batch_size: int,
    eval_batch_size: int | None = None,
    seed: int = 0,
    split_seed: int = 0,
    device: str | torch.device = "cpu",
    final: bool = False,
    channels_last: bool = False,
    synthetic: Mapping[str, Any] | None = None,
    img_size: int | None = None,
    num_workers: int | None = None,
) -> DataBundle:
    """Loaders for training (shuffled, augmented, drop_last), validation and test.

    ``seed`` drives batch order and augmentation; ``split_seed`` the subset/validation split, so
    all runs of a sweep share one split. ``augment="auto"`` applies the data set's crop/flip
    (DatasetInfo), False/"none" nothing. ``eval_batch_size`` defaults to 2 * ``batch_size``.
    ``img_size`` and ``num_workers`` (default min(8, CPUs)) apply to imagefolder only.
    """
    name = canonical_name(dataset)
    batch_size = _positive_int(batch_size, "batch_size")
    eval_bs = _positive_int(eval_batch_size or 2 * batch_size, "eval_batch_size")
    do_augment = _resolve_augment(augment)
    check_split_args(val_fraction, subset)
    dev = _resolve_device(device)
    info = dataset_info(name, root, synthetic=synthetic, img_size=img_size)
    split = functools.partial(
        split_indices,
        val_fraction=val_fraction,
        subset=subset,
        split_seed=split_seed,
        final=final,
        name=name,
    )

    if name == "imagefolder":
        workers = min(8, os.cpu_count() or 1) if num_workers is None else num_workers
        train, val, test = build_imagefolder_loaders(
            root,
            info=info,
            split=split,
            augment=do_augment,
            batch_size=batch_size,
            eval_batch_size=eval_bs,
            seed=seed,
            device=dev,
            channels_last=channels_last,
            num_workers=workers,
        )
    else:
        arrays = (
            load_synthetic(synthetic) if name == "synthetic" else load_arrays(name, _root_str(root))
        )
        train_idx, val_idx = split(arrays.train_y)
        norm = {"mean": info.mean, "std": info.std, "device": dev, "channels_last": channels_last}
        train = DeviceLoader(
            *_as_tensors(arrays.train_x[train_idx], arrays.train_y[train_idx]),
            batch_size,
            shuffle=True,
            drop_last=True,
            crop_pad=info.crop_pad if do_augment else 0,
            flip=info.flip and do_augment,
            seed=seed,
            **norm,
        )
        val = None
        if val_idx is not None:
            val = DeviceLoader(
                *_as_tensors(arrays.train_x[val_idx], arrays.train_y[val_idx]), eval_bs, **norm
            )
        test = DeviceLoader(*_as_tensors(arrays.test_x, arrays.test_y), eval_bs, **norm)

    if len(train) == 0:
        raise UserError(_no_full_batch(batch_size, train.num_samples, name))
    return DataBundle(train=train, val=val, test=test, info=info)
