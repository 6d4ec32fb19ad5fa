"""ImageNet-style folders (``root/train/<class>/*``, ``root/val|test/<class>/*``) through timm.

Images are decoded and augmented by timm's ``create_transform`` in DataLoader workers; the loader
offers the DeviceLoader interface. Randomness is seeded per (seed, epoch, index) inside a forked
RNG, so batches are reproducible for any worker count and the caller's global RNG is untouched.
"""

from __future__ import annotations

import copy
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, SequentialSampler, Subset

from msam.data._info import IMAGENET_MEAN, IMAGENET_STD, DatasetInfo
from msam.data._loader import epoch_seed
from msam.errors import UserError

DEFAULT_IMG_SIZE = 224
_TEST_DIRS = ("val", "test")


def _class_dirs(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def locate_imagefolder(root: str | os.PathLike[str] | None) -> tuple[Path, Path, list[str]]:
    """(train dir, test dir, class names) of an image folder root, or a one-line UserError."""
    how = "set data.root to a folder holding train/<class>/ and val/<class>/ (or test/<class>/)"
    if not root:
        raise UserError(f"imagefolder needs data.root; {how}")
    base = Path(root).expanduser()
    train = base / "train"
    if not train.is_dir():
        raise UserError(f"imagefolder: {train} is not a folder; {how}")
    tests = [base / d for d in _TEST_DIRS if (base / d).is_dir()]
    if not tests:
        raise UserError(f"imagefolder: neither {base / 'val'} nor {base / 'test'} exists; {how}")
    classes = _class_dirs(train)
    if len(classes) < 2:
        raise UserError(f"imagefolder: {train} has {len(classes)} class folders, need >= 2; {how}")
    unknown = sorted(set(_class_dirs(tests[0])) - set(classes))
    if unknown:
        raise UserError(f"imagefolder: {tests[0]} has classes missing from {train}: {unknown[:5]}")
    return train, tests[0], classes


def imagefolder_info(root: str | os.PathLike[str] | None, img_size: int | None) -> DatasetInfo:
    _, _, classes = locate_imagefolder(root)
    return DatasetInfo(
        name="imagefolder",
        num_classes=len(classes),
        in_chans=3,
        img_size=img_size or DEFAULT_IMG_SIZE,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        flip=True,
        crop_pad=0,  # timm's RandomResizedCrop does the cropping
    )


def _folder(path: Path, classes: list[str], transform: Any) -> Dataset:
    """A torchvision ImageFolder whose label ids follow the training folder's classes."""
    from torchvision.datasets import ImageFolder

    class _Fixed(ImageFolder):
        def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
            return classes, {c: i for i, c in enumerate(classes)}

    try:
        return _Fixed(str(path), transform=transform, allow_empty=True)
    except (FileNotFoundError, OSError) as exc:
        raise UserError(f"imagefolder: cannot read {path}: {exc}") from exc


class _SeededSamples(Dataset):
    """Runs the wrapped data set's random transforms under a seed of (seed, epoch, index)."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        s = epoch_seed(self.seed, self.epoch, index)
        py_state = random.getstate()  # timm's crops use python's random
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s)
            random.seed(s)
            try:
                return self.dataset[index]
            finally:
                random.setstate(py_state)


class ImageFolderLoader:
    """A DataLoader over image files with the DeviceLoader interface (set_epoch, len, iter)."""

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        *,
        shuffle: bool,
        drop_last: bool,
        seed: int = 0,
        device: str | torch.device = "cpu",
        channels_last: bool = False,
        num_workers: int = 0,
    ) -> None:
        self.device = torch.device(device)
        self.dataset = _SeededSamples(dataset, seed)
        self.num_samples = len(self.dataset)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.channels_last = channels_last
        self.epoch = 0
        # Also feeds DataLoader's worker base seed, which would otherwise come from the global RNG.
        self._gen = torch.Generator().manual_seed(epoch_seed(seed, 0))
        sampler = (
            RandomSampler(self.dataset, generator=self._gen)
            if shuffle
            else SequentialSampler(self.dataset)
        )
        self.loader = DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=drop_last,
            num_workers=num_workers,
            pin_memory=self.device.type == "cuda",
            generator=self._gen,
        )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.dataset.epoch = self.epoch
        self._gen.manual_seed(epoch_seed(self.seed, self.epoch))

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.set_epoch(self.epoch)  # the same epoch iterated twice yields the same batches
        for x, y in self.loader:
            x = x.to(self.device, non_blocking=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y.to(self.device, non_blocking=True)


def build_imagefolder_loaders(
    root: str | os.PathLike[str] | None,
    *,
    info: DatasetInfo,
    split: Any,
    augment: bool,
    batch_size: int,
    eval_batch_size: int,
    seed: int,
    device: torch.device,
    channels_last: bool,
    num_workers: int,
) -> tuple[ImageFolderLoader, ImageFolderLoader | None, ImageFolderLoader]:
    """Train/val/test loaders; ``split(labels) -> (train_idx, val_idx | None)``."""
    from timm.data import create_transform

    train_dir, test_dir, classes = locate_imagefolder(root)
    size, mean, std = info.img_size, info.mean, info.std
    eval_tf = create_transform(size, is_training=False, mean=mean, std=std)
    train_tf = create_transform(size, is_training=True, mean=mean, std=std) if augment else eval_tf
    train_full = _folder(train_dir, classes, train_tf)
    if len(train_full) == 0:  # type: ignore[arg-type]
        raise UserError(f"imagefolder: no images found under {train_dir}")
    val_full = copy.copy(train_full)  # same file list, evaluation transform
    val_full.transform = eval_tf  # type: ignore[attr-defined]
    train_idx, val_idx = split(np.asarray(train_full.targets, dtype=np.int64))  # type: ignore[attr-defined]
    common: dict[str, Any] = {
        "seed": seed,
        "device": device,
        "channels_last": channels_last,
        "num_workers": num_workers,
    }
    train = ImageFolderLoader(
        Subset(train_full, train_idx.tolist()), batch_size, shuffle=True, drop_last=True, **common
    )
    val = None
    if val_idx is not None:
        val = ImageFolderLoader(
            Subset(val_full, val_idx.tolist()),
            eval_batch_size,
            shuffle=False,
            drop_last=False,
            **common,
        )
    test = ImageFolderLoader(
        _folder(test_dir, classes, eval_tf),
        eval_batch_size,
        shuffle=False,
        drop_last=False,
        **common,
    )
    return train, val, test
