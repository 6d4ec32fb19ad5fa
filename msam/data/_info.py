"""Per-data-set metadata: what a model and the augmentation need to know, without loading images."""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from msam.errors import UserError

DATASETS: tuple[str, ...] = (
    "digits",
    "mnist",
    "fashion_mnist",
    "cifar10",
    "cifar100",
    "imagefolder",
    "synthetic",
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DatasetInfo:
    """What the model factory and the loaders need: shapes, classes, normalisation, augmentation.

    ``mean``/``std`` are per channel on the [0, 1] scale (timm's convention). ``flip`` says whether
    a horizontal flip preserves the label; ``crop_pad`` is the zero padding (pixels per side) of
    the random-crop augmentation, 0 for none. ``num_train`` is the size of the training set before
    any subset or validation split, so that sizes can be checked before loading; None where only
    reading the files would tell (imagefolder).
    """

    name: str
    num_classes: int
    in_chans: int
    img_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    flip: bool
    crop_pad: int = 0
    num_train: int | None = None


# Fixed statistics, computed once on each training set, so that `dataset_info` needs no load.
# Fashion-MNIST flips: every class (tops, trousers, bags, shoes) keeps its label when mirrored,
# and random flips are the usual Fashion-MNIST augmentation; digits and MNIST do not flip
# (a mirrored 2 or 7 is not a digit).
_STATIC: dict[str, DatasetInfo] = {
    # digits: 1797 images, of which the fixed stratified 80/20 split trains on 1437.
    "digits": DatasetInfo(
        "digits", 10, 1, 8, (0.3053,), (0.3759,), flip=False, crop_pad=0, num_train=1437
    ),
    "mnist": DatasetInfo(
        "mnist", 10, 1, 28, (0.1307,), (0.3081,), flip=False, crop_pad=2, num_train=60_000
    ),
    "fashion_mnist": DatasetInfo(
        "fashion_mnist", 10, 1, 28, (0.2860,), (0.3530,), flip=True, crop_pad=2, num_train=60_000
    ),
    "cifar10": DatasetInfo(
        "cifar10",
        10,
        3,
        32,
        (0.4914, 0.4822, 0.4465),
        (0.2470, 0.2435, 0.2616),
        flip=True,
        crop_pad=4,
        num_train=50_000,
    ),
    "cifar100": DatasetInfo(
        "cifar100",
        100,
        3,
        32,
        (0.5071, 0.4865, 0.4409),
        (0.2673, 0.2564, 0.2762),
        flip=True,
        crop_pad=4,
        num_train=50_000,
    ),
}

_ALIASES = {
    "fmnist": "fashion_mnist",
    "fashionmnist": "fashion_mnist",
    "image_folder": "imagefolder",
}


def canonical_name(dataset: str) -> str:
    """Normalise a user-written name (``Fashion-MNIST`` -> ``fashion_mnist``) or raise UserError."""
    if not isinstance(dataset, str) or not dataset.strip():
        raise UserError(f"data set name must be a non-empty string, got {dataset!r}")
    name = dataset.strip().lower().replace("-", "_")
    name = _ALIASES.get(name, name)
    if name not in DATASETS:
        close = difflib.get_close_matches(name, DATASETS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise UserError(f"unknown data set {dataset!r} (known: {', '.join(DATASETS)}){hint}")
    return name


def static_info(name: str) -> DatasetInfo | None:
    """The fixed record of a data set whose shape does not depend on options or files."""
    return _STATIC.get(name)
