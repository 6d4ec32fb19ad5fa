"""Seeded, stratified subset and validation splits of a training set.

Splits are seeded by ``split_seed`` alone, never by the training seed, so every optimizer and every
trial of a sweep tunes on the same validation examples.
"""

from __future__ import annotations

import numpy as np

from msam.errors import UserError


def stratified_order(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random permutation whose every prefix holds the classes in (nearly) their proportions.

    Each example's key is its rank inside its class (in a random order) divided by the class
    size; sorting by that key interleaves the classes evenly, so taking the first k examples is a
    stratified sample of size k, for any k (no minimum per class, unlike scikit-learn's splitter).
    """
    n = len(labels)
    perm = rng.permutation(n)
    _, inverse, counts = np.unique(labels[perm], return_inverse=True, return_counts=True)
    by_class = np.argsort(inverse, kind="stable")
    class_start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty(n, dtype=np.float64)
    rank[by_class] = np.arange(n) - class_start[inverse[by_class]]
    key = (rank + 0.5) / counts[inverse]
    return perm[np.argsort(key, kind="stable")]


def check_split_args(val_fraction: float, subset: int | None) -> None:
    """UserError for values no data set could satisfy (checked before anything is loaded)."""
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)):
        raise UserError(f"data.val_fraction must be a number in [0, 1), got {val_fraction!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
    if subset is not None and (isinstance(subset, bool) or not isinstance(subset, int)):
        raise UserError(f"data.subset must be a positive integer or null, got {subset!r}")
    if subset is not None and subset < 1:
        raise UserError(f"data.subset must be a positive integer or null, got {subset}")


def split_sizes(
    n: int, *, val_fraction: float, subset: int | None, final: bool, name: str = "data set"
) -> tuple[int, int]:
    """(training, validation) example counts that :func:`split_indices` gives a set of ``n``.

    The sizes alone, so that a config can be checked against a data set's known size before
    anything is loaded; UserError when the subset or the split leaves nothing to train on.
    """
    check_split_args(val_fraction, subset)
    if subset is not None and subset > n:
        raise UserError(f"data.subset={subset} exceeds the {n} training examples of {name}")
    kept = n if subset is None else subset
    if final or val_fraction == 0:
        return kept, 0
    n_val = max(1, round(val_fraction * kept))
    if n_val >= kept:
        raise UserError(
            f"data.val_fraction={val_fraction} leaves no training examples out of {kept}"
        )
    return kept - n_val, n_val


def split_indices(
    labels: np.ndarray,
    *,
    val_fraction: float,
    subset: int | None,
    split_seed: int,
    final: bool,
    name: str = "data set",
) -> tuple[np.ndarray, np.ndarray | None]:
    """Sorted training and validation indices into ``labels`` (validation None when empty/final).

    ``subset`` keeps that many examples (stratified, seeded) before the validation split takes
    ``round(val_fraction * kept)`` of them; ``final`` trains on everything kept.
    """
    _, n_val = split_sizes(
        len(labels), val_fraction=val_fraction, subset=subset, final=final, name=name
    )
    pool = np.arange(len(labels))
    if subset is not None:
        order = stratified_order(labels, np.random.default_rng([split_seed, 0]))
        pool = np.sort(order[:subset])
    if n_val == 0:
        return pool, None
    order = stratified_order(labels[pool], np.random.default_rng([split_seed, 1]))
    val = np.sort(pool[order[:n_val]])
    train = np.sort(pool[order[n_val:]])
    return train, val
