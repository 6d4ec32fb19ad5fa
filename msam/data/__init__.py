"""Data for sharpness-aware training: named data sets, seeded splits and on-device loaders.

In-memory data sets (digits, mnist, fashion_mnist, cifar10, cifar100, synthetic) live on the
training device as uint8 and are augmented there in batch (the cifar10-airbench recipe), so the
loader costs next to nothing next to the model; imagefolder goes through timm's transforms and a
DataLoader behind the same interface. Nothing is downloaded.
"""

from msam.data._augment import crop_and_flip
from msam.data._build import (
    DataBundle,
    Loader,
    build_data,
    check_data_available,
    check_data_fits,
    dataset_info,
)
from msam.data._datasets import SYNTHETIC_DEFAULTS, search_roots
from msam.data._imagefolder import ImageFolderLoader
from msam.data._info import DATASETS, DatasetInfo
from msam.data._loader import DeviceLoader

__all__ = [
    "DATASETS",
    "SYNTHETIC_DEFAULTS",
    "DataBundle",
    "DatasetInfo",
    "DeviceLoader",
    "ImageFolderLoader",
    "Loader",
    "build_data",
    "check_data_available",
    "check_data_fits",
    "crop_and_flip",
    "dataset_info",
    "search_roots",
]
