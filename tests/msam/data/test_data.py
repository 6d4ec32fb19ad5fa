"""Tests of msam.data: data sets, splits, the on-device loader and its augmentation, errors."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import msam.data._datasets as datasets_mod
from msam.data import (
    DATASETS,
    DatasetInfo,
    DeviceLoader,
    build_data,
    check_data_available,
    check_data_fits,
    crop_and_flip,
    dataset_info,
)
from msam.data._datasets import load_arrays, load_synthetic, locate
from msam.data._splits import split_indices, stratified_order
from msam.errors import UserError

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
HAS_FASHION = (FASHION_DIR / "train-images-idx3-ubyte.gz").is_file()
SMALL_SYNTH = {"num_train": 200, "num_test": 40, "img_size": 8, "in_chans": 1, "num_classes": 4}


@pytest.fixture
def no_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An environment where no data set can be found: empty HOME, no MSAM_DATA, no system dir."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("MSAM_DATA", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setattr(datasets_mod, "SYSTEM_DATA_DIRS", [tmp_path / "system"])
    return tmp_path


def write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)


def write_fake_idx(folder: Path, n_train: int = 30, n_test: int = 10, offset: int = 0, gz=True):
    rng = np.random.default_rng(offset)
    parts = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": (np.arange(n_train) + offset) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": np.arange(n_test) % 10,
    }
    for stem, array in parts.items():
        write_idx(folder / stem, array, gz)
    return parts


def write_fake_cifar10(folder: Path, per_batch: int = 10) -> np.ndarray:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        batch = {
            "data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            "labels": list(rng.integers(0, 10, per_batch)),
        }
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    return batch["data"].reshape(-1, 3, 32, 32)  # the test batch


def denormalise(x: torch.Tensor, info: DatasetInfo) -> torch.Tensor:
    mean = torch.tensor(info.mean).view(1, -1, 1, 1)
    std = torch.tensor(info.std).view(1, -1, 1, 1)
    return (x * std + mean).mul(255).round().to(torch.uint8)


def batches(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in loader]


# ------------------------------------------------------------------------------- metadata


@pytest.mark.parametrize("name", ["digits", "mnist", "fashion_mnist", "cifar10", "cifar100"])
def test_static_info_is_consistent(name: str) -> None:
    info = dataset_info(name)
    assert info.name == name
    assert len(info.mean) == len(info.std) == info.in_chans
    assert info.crop_pad == {8: 0, 28: 2, 32: 4}[info.img_size]
    assert info.flip == (name not in ("digits", "mnist"))


@pytest.mark.parametrize(
    "name",
    [
        "digits",
        "synthetic",
        pytest.param(
            "fashion_mnist",
            marks=pytest.mark.skipif(
                not HAS_FASHION, reason="apt-get install dataset-fashion-mnist"
            ),
        ),
    ],
)
def test_known_training_set_sizes_match_the_files(name: str) -> None:
    synthetic = SMALL_SYNTH if name == "synthetic" else None
    info = dataset_info(name, synthetic=synthetic)
    arrays = load_synthetic(synthetic) if name == "synthetic" else load_arrays(name, None)
    assert info.num_train == len(arrays.train_y)


def test_names_are_normalised_and_unknown_names_rejected() -> None:
    assert dataset_info("Fashion-MNIST").name == "fashion_mnist"
    with pytest.raises(UserError, match="did you mean 'cifar10'") as err:
        dataset_info("cifar11")
    assert "\n" not in str(err.value)
    assert set(DATASETS) >= {"digits", "mnist", "fashion_mnist", "cifar10", "synthetic"}


# ------------------------------------------------------------------------------- data sets


def test_digits_shapes_and_splits() -> None:
    bundle = build_data("digits", batch_size=32, val_fraction=0.1)
    assert bundle.info.num_classes == 10 and bundle.info.in_chans == 1
    assert bundle.test.num_samples == 360  # fixed 80/20 split of 1,797
    assert bundle.train.num_samples + bundle.val.num_samples == 1437
    assert bundle.val.num_samples == 144
    x, y = next(iter(bundle.train))
    assert x.shape == (32, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert int(y.min()) >= 0 and int(y.max()) < 10
    # evaluation batches are the raw pixels, only normalised (0..16 scaled to 0..255)
    xt, _ = next(iter(bundle.test))
    raw = denormalise(xt, bundle.info)
    assert int(raw.max()) == 255 and int(raw.min()) == 0
    assert torch.equal(raw, bundle.test.images[: len(xt)])


def test_digits_test_split_is_fixed_across_split_seeds() -> None:
    a = build_data("digits", batch_size=32, split_seed=0)
    b = build_data("digits", batch_size=32, split_seed=5)
    assert torch.equal(a.test.images, b.test.images)
    assert not torch.equal(a.val.images, b.val.images)


@pytest.mark.skipif(not HAS_FASHION, reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist_from_the_debian_package(no_data: Path, monkeypatch) -> None:
    monkeypatch.setattr(datasets_mod, "SYSTEM_DATA_DIRS", [FASHION_DIR.parent])
    bundle = build_data("fashion_mnist", batch_size=256, eval_batch_size=1000)
    assert (bundle.train.num_samples, bundle.val.num_samples) == (54_000, 6_000)
    assert bundle.test.num_samples == 10_000 and len(bundle.test) == 10
    x, y = next(iter(bundle.train))
    assert x.shape == (256, 1, 28, 28) and x.dtype == torch.float32
    assert torch.equal(torch.bincount(bundle.test.labels), torch.full((10,), 1000))
    assert load_arrays("fashion_mnist", None) is load_arrays("fashion_mnist", None)  # decoded once


@pytest.mark.parametrize(
    ("layout", "gz"), [("", True), ("FashionMNIST/raw", False), ("fashion-mnist", True)]
)
def test_idx_layouts_are_found(no_data: Path, layout: str, gz: bool) -> None:
    root = no_data / "root"
    parts = write_fake_idx(root / layout, gz=gz)
    bundle = build_data("fashion_mnist", root=root, batch_size=4, val_fraction=0.2)
    assert bundle.train.num_samples == 24 and bundle.val.num_samples == 6
    assert torch.equal(bundle.test.images[:, 0], torch.from_numpy(parts["t10k-images-idx3-ubyte"]))
    assert torch.equal(bundle.test.labels, torch.from_numpy(parts["t10k-labels-idx1-ubyte"]))


def test_root_resolution_order(no_data: Path, monkeypatch) -> None:
    explicit, env = no_data / "explicit", no_data / "env"
    write_fake_idx(explicit / "MNIST" / "raw", offset=1)
    write_fake_idx(env, offset=2)
    monkeypatch.setenv("MSAM_DATA", str(env))
    assert locate("mnist", str(explicit)) == str(explicit / "MNIST" / "raw")
    assert locate("mnist", None) == str(env)
    assert locate("mnist", str(no_data / "elsewhere")) == str(env)  # falls through to MSAM_DATA
    monkeypatch.delenv("MSAM_DATA")
    cache = no_data / "home" / ".cache" / "msam" / "data"
    write_fake_idx(cache / "mnist", offset=3)
    assert locate("mnist", None) == str(cache / "mnist")


def test_fake_cifar10(no_data: Path) -> None:
    test_images = write_fake_cifar10(no_data / "root" / "cifar-10-batches-py")
    bundle = build_data("cifar10", root=no_data / "root", batch_size=8, val_fraction=0.1)
    assert (bundle.train.num_samples, bundle.val.num_samples, bundle.test.num_samples) == (
        45,
        5,
        10,
    )
    x, y = next(iter(bundle.train))
    assert x.shape == (8, 3, 32, 32) and y.shape == (8,)
    xt, _ = next(iter(bundle.test))
    assert torch.equal(denormalise(xt, bundle.info), torch.from_numpy(test_images))


def test_synthetic_is_seeded_configurable_and_learnable() -> None:
    bundle = build_data("synthetic", batch_size=16, synthetic=SMALL_SYNTH)
    info = bundle.info
    assert (info.num_classes, info.in_chans, info.img_size) == (4, 1, 8)
    again = build_data("synthetic", batch_size=16, synthetic=dict(SMALL_SYNTH))
    assert torch.equal(bundle.test.images, again.test.images)
    other = build_data("synthetic", batch_size=16, synthetic={**SMALL_SYNTH, "seed": 1})
    assert not torch.equal(bundle.test.images, other.test.images)
    # learnable: the nearest class mean (estimated on train) classifies the test set
    train_x = bundle.train.images.float().flatten(1)
    means = torch.stack([train_x[bundle.train.labels == k].mean(0) for k in range(4)])
    pred = torch.cdist(bundle.test.images.float().flatten(1), means).argmin(1)
    assert (pred == bundle.test.labels).float().mean() > 0.9
    with pytest.raises(UserError, match="unknown synthetic data option 'size'"):
        build_data("synthetic", batch_size=16, synthetic={"size": 8})


def _write_imagefolder(root: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, per_class in (("train", 6), ("val", 2)):
        for cls in ("cat", "dog"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")


def test_imagefolder(no_data: Path) -> None:
    root = no_data / "images"
    _write_imagefolder(root)
    assert dataset_info("imagefolder", root).num_classes == 2
    kw = {"root": root, "batch_size": 4, "img_size": 16, "num_workers": 0, "val_fraction": 0.25}
    bundle = build_data("imagefolder", **kw)
    assert (bundle.train.num_samples, bundle.val.num_samples, bundle.test.num_samples) == (9, 3, 4)
    assert len(bundle.train) == 2  # drop_last
    torch.manual_seed(0)
    first = batches(bundle.train)
    after = torch.rand(3)
    assert [x.shape for x, _ in first] == [(4, 3, 16, 16)] * 2
    assert sorted(torch.cat([y for _, y in batches(bundle.test)]).tolist()) == [0, 0, 1, 1]
    torch.manual_seed(0)
    second = batches(build_data("imagefolder", **kw).train)
    assert torch.equal(after, torch.rand(3))  # neither loader touched the global RNG
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, second))
    bundle.train.set_epoch(1)
    assert not torch.equal(batches(bundle.train)[0][0], first[0][0])


# ------------------------------------------------------------------------------- errors


def test_missing_data_is_one_line_naming_where_it_looked(no_data: Path) -> None:
    empty = no_data / "empty"
    empty.mkdir()
    with pytest.raises(UserError) as err:
        check_data_available("fashion_mnist", empty)
    message = str(err.value)
    assert "\n" not in message
    for where in (empty, no_data / "home" / ".cache" / "msam" / "data", no_data / "system"):
        assert str(where) in message
    assert "apt-get install dataset-fashion-mnist" in message
    with pytest.raises(UserError, match="fashion_mnist not found"):
        build_data("fashion_mnist", root=empty, batch_size=8)
    with pytest.raises(UserError, match="cifar-10-batches-py"):
        check_data_available("cifar10", empty)
    with pytest.raises(UserError, match="imagefolder needs data.root"):
        check_data_available("imagefolder")
    with pytest.raises(UserError, match="train"):
        build_data("imagefolder", root=empty, batch_size=8)
    check_data_available("digits")  # ships with scikit-learn
    check_data_available("synthetic")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"val_fraction": -0.1}, "val_fraction"),
        ({"subset": 0}, "subset"),
        ({"subset": 10**6}, "exceeds"),
        ({"batch_size": 5000}, "batch_size=5000 exceeds"),
        ({"augment": "heavy"}, "augment"),
    ],
)
def test_bad_arguments_raise_user_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(UserError, match=match) as err:
        build_data("digits", **{"batch_size": 32, **kwargs})
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"subset": 10**6},
        {"batch_size": 5000},
        {"subset": 40, "batch_size": 37},  # 36 training examples after the split
        {"subset": 1},  # the validation split takes the only example
    ],
)
def test_size_checks_before_loading_say_what_loading_says(kwargs: dict) -> None:
    args = {"val_fraction": 0.1, "subset": None, "batch_size": 32, **kwargs}
    with pytest.raises(UserError) as early:
        check_data_fits("digits", **args)
    with pytest.raises(UserError) as loaded:
        build_data("digits", **args)
    assert str(early.value) == str(loaded.value)


def test_size_checks_before_loading_pass_what_loading_takes() -> None:
    check_data_fits("digits", val_fraction=0.1, subset=40, batch_size=36)
    assert len(build_data("digits", val_fraction=0.1, subset=40, batch_size=36).train) == 1
    check_data_fits(
        "synthetic", val_fraction=0.5, subset=None, batch_size=100, synthetic=SMALL_SYNTH
    )


# ------------------------------------------------------------------------------- splits


def test_val_split_is_disjoint_deterministic_and_independent_of_the_training_seed() -> None:
    labels = np.repeat(np.arange(5), 40)
    train, val = split_indices(labels, val_fraction=0.2, subset=None, split_seed=3, final=False)
    assert len(val) == 40 and len(np.intersect1d(train, val)) == 0
    assert np.array_equal(np.union1d(train, val), np.arange(200))
    assert np.array_equal(np.bincount(labels[val]), [8] * 5)  # stratified
    again = split_indices(labels, val_fraction=0.2, subset=None, split_seed=3, final=False)
    assert np.array_equal(val, again[1])
    other = split_indices(labels, val_fraction=0.2, subset=None, split_seed=4, final=False)
    assert not np.array_equal(val, other[1])
    a = build_data("digits", batch_size=32, seed=0)
    b = build_data("digits", batch_size=32, seed=1)
    assert torch.equal(a.val.images, b.val.images) and torch.equal(a.val.labels, b.val.labels)


def test_subset_and_final() -> None:
    bundle = build_data("digits", batch_size=8, subset=100, val_fraction=0.1)
    assert (bundle.train.num_samples, bundle.val.num_samples) == (90, 10)
    counts = torch.bincount(torch.cat([bundle.train.labels, bundle.val.labels]), minlength=10)
    assert int(counts.min()) >= 9 and int(counts.max()) <= 11  # stratified subset
    final = build_data("digits", batch_size=8, subset=100, final=True)
    assert final.val is None and final.train.num_samples == 100
    merged = torch.cat([bundle.train.images, bundle.val.images]).flatten(1)
    assert sorted(map(bytes, merged.numpy())) == sorted(
        map(bytes, final.train.images.flatten(1).numpy())
    )
    full = build_data("digits", batch_size=8, final=True)
    assert full.val is None and full.train.num_samples == 1437
    assert build_data("digits", batch_size=8, val_fraction=0.0).val is None


def test_stratified_order_prefixes_keep_class_proportions() -> None:
    labels = np.repeat(np.arange(3), [10, 20, 70])
    order = stratified_order(labels, np.random.default_rng(0))
    assert np.array_equal(np.sort(order), np.arange(100))
    assert np.array_equal(np.bincount(labels[order[:10]]), [1, 2, 7])


# ------------------------------------------------------------------------------- loader


def synthetic_loader(seed: int = 0, **kwargs) -> DeviceLoader:
    gen = torch.Generator().manual_seed(123)
    images = torch.randint(0, 256, (50, 1, 6, 6), dtype=torch.uint8, generator=gen)
    labels = torch.arange(50) % 7
    options = {"shuffle": True, "drop_last": True, "crop_pad": 1, "flip": True, "seed": seed}
    return DeviceLoader(images, labels, 8, **{**options, **kwargs})


def test_same_seed_same_batches_and_different_seeds_differ() -> None:
    a, b, c = synthetic_loader(0), synthetic_loader(0), synthetic_loader(1)
    for epoch in (0, 3):
        for loader in (a, b, c):
            loader.set_epoch(epoch)
        ba, bb, bc = batches(a), batches(b), batches(c)
        assert all(
            torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(ba, bb)
        )
        assert not torch.equal(torch.cat([x for x, _ in ba]), torch.cat([x for x, _ in bc]))
        assert torch.equal(torch.cat([x for x, _ in ba]), torch.cat([x for x, _ in batches(a)]))
    a.set_epoch(0)
    first = batches(a)
    a.set_epoch(1)
    assert not torch.equal(first[0][1], batches(a)[0][1])


def test_loader_never_touches_the_global_rng() -> None:
    torch.manual_seed(7)
    torch.rand(2)
    control = torch.rand(5)
    torch.manual_seed(7)
    torch.rand(2)
    loader = synthetic_loader()
    for epoch in range(2):
        loader.set_epoch(epoch)
        batches(loader)
    build_data("synthetic", batch_size=16, synthetic={**SMALL_SYNTH, "seed": 9})
    assert torch.equal(torch.rand(5), control)


def test_augmentation_moves_pixels_and_keeps_labels() -> None:
    loader = synthetic_loader()
    loader.set_epoch(2)
    order = loader.epoch_order()
    changed = 0
    for i, (x, y) in enumerate(loader):
        idx = order[i * 8 : (i + 1) * 8]
        assert torch.equal(y, loader.labels[idx])
        source = loader.images[idx]
        out = (x * 255).round().to(torch.uint8)  # mean 0, std 1: x is the pixel value / 255
        candidates = [
            crop_and_flip(
                source, torch.full((8,), dy), torch.full((8,), dx), torch.full((8,), f), 1
            )
            for dy in range(3)
            for dx in range(3)
            for f in (False, True)
        ]
        for k in range(8):
            assert any(torch.equal(out[k], cand[k]) for cand in candidates), (i, k)
        changed += int((out != source).flatten(1).any(1).sum())
    assert changed > 0  # the augmentation really ran


def test_crop_and_flip_moves_pixels_exactly() -> None:
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.uint8).view(2, 3, 4, 5)
    pad = 2
    centre = torch.full((2,), pad)
    no_flip = torch.zeros(2, dtype=torch.bool)
    assert torch.equal(crop_and_flip(x, centre, centre, no_flip, pad), x)
    assert torch.equal(crop_and_flip(x, centre, centre, ~no_flip, pad), x.flip(3))
    down = crop_and_flip(x, centre + 1, centre, no_flip, pad)  # window one row lower
    assert torch.equal(down[:, :, :-1], x[:, :, 1:]) and int(down[:, :, -1].abs().sum()) == 0
    mixed = crop_and_flip(x, torch.tensor([pad, pad]), torch.tensor([pad, pad - 2]), no_flip, pad)
    assert torch.equal(mixed[0], x[0])
    assert torch.equal(mixed[1, :, :, 2:], x[1, :, :, :-2]) and int(mixed[1, :, :, :2].sum()) == 0


def test_drop_last_for_training_not_for_evaluation() -> None:
    train = synthetic_loader()
    assert len(train) == 6 and train.num_samples == 50
    assert [len(y) for _, y in train] == [8] * 6
    evaluation = synthetic_loader(shuffle=False, drop_last=False, crop_pad=0, flip=False)
    got = batches(evaluation)
    assert len(evaluation) == 7 and [len(y) for _, y in got] == [8] * 6 + [2]
    assert torch.equal(torch.cat([y for _, y in got]), evaluation.labels)  # all, in order
    assert torch.equal(
        torch.cat([x for x, _ in got]).mul(255).round().to(torch.uint8), evaluation.images
    )


def test_no_augment_and_channels_last() -> None:
    bundle = build_data(
        "synthetic",
        batch_size=16,
        augment=False,
        synthetic={**SMALL_SYNTH, "in_chans": 3},
        channels_last=True,
    )
    loader = bundle.train
    assert loader.crop_pad == 0 and not loader.flip
    order = loader.epoch_order()
    x, y = next(iter(loader))
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(denormalise(x, bundle.info), loader.images[order[:16]])
    assert torch.equal(y, loader.labels[order[:16]])
