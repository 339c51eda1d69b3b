"""Train/eval splits that several recipes share: stratified hold-out as datasets makes it, by an Arrow take;
uint8 image arrays as a compact dataset."""

from __future__ import annotations

import math

import datasets
import numpy as np
from datasets.fingerprint import generate_random_fingerprint
from datasets.table import InMemoryTable


def split_train_eval(ds: datasets.Dataset, fraction: float, seed: int, stratify: str | None = "label"):
    """Holds out `fraction` of `ds` for evaluation, stratified by a ClassLabel column when given: the rows
    `Dataset.train_test_split(test_size=fraction, seed=seed, stratify_by_column=stratify)` holds out (see
    `split_indices`), taken out whole: datasets copies the parts out row by row (flatten_indices)."""
    if stratify is not None and not isinstance(ds.features[stratify], datasets.ClassLabel):
        raise ValueError(f"stratifying needs a ClassLabel column; {stratify} is {type(ds.features[stratify]).__name__}")
    labels = None if stratify is None else ds.with_format("numpy", columns=[stratify])[:][stratify]
    train, held_out = split_indices(len(ds), fraction, seed, labels)
    return _take(ds, train), _take(ds, held_out)


def split_indices(rows: int, fraction: float, seed: int, labels: np.ndarray | None = None):
    """The (train, eval) row indices `Dataset.train_test_split(test_size=fraction, seed=seed)` makes, stratified
    by the class indices `labels` when given: the same generator drawn in the same order as datasets' stratified
    split, with arrays where datasets extends Python lists one row at a time (tens of bytes a row)."""
    from datasets.utils.stratify import approximate_mode

    held = math.ceil(fraction * rows)
    rng = np.random.default_rng(seed)
    if labels is None:
        order = rng.permutation(rows)
        return order[held:], order[:held]
    classes, at = np.unique(labels, return_inverse=True)
    counts = np.bincount(at)
    if counts.min() < 2:  # worded as datasets words it
        raise ValueError(
            "The least populated class in label column has only 1 member, which is too few. "
            "The minimum number of groups for any class cannot be less than 2."
        )
    for part, size in (("train_size", rows - held), ("test_size", held)):
        if size < len(classes):
            raise ValueError(
                f"The {part} = {size} should be greater or equal to the number of classes = {len(classes)}"
            )
    by_class = np.split(np.argsort(at, kind="mergesort"), np.cumsum(counts)[:-1])
    del at
    n_train = approximate_mode(counts, rows - held, rng)
    n_test = approximate_mode(counts - n_train, held, rng)
    train, test = [], []
    for i in range(len(classes)):
        mine = by_class[i].take(rng.permutation(counts[i]), mode="clip")
        train.append(mine[: n_train[i]])
        test.append(mine[n_train[i] : n_train[i] + n_test[i]])
    # In place: rng.permutation of an array is a shuffled copy, by the same draws.
    train, test = np.concatenate(train), np.concatenate(test)
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def _take(ds: datasets.Dataset, indices: np.ndarray) -> datasets.Dataset:
    """The rows of `ds` at `indices`, stored in that order: one Arrow take for a dataset in memory (no row
    by row copy, as select + flatten_indices makes); flatten_indices, which writes to the cache
    rather than memory, for one on disk (decoded images) or one that is itself a selection."""
    if ds.cache_files or ds._indices is not None:
        return ds.select(indices).flatten_indices()
    # A fresh fingerprint: without one the constructor hashes the whole table.
    return datasets.Dataset(
        InMemoryTable(ds.data.table.take(indices)), info=ds.info.copy(), fingerprint=generate_random_fingerprint()
    )


def split_sizes(rows: int, fraction: float) -> tuple[int, int]:
    """The train and eval sizes `datasets.train_test_split` makes of `rows` with test_size `fraction`."""
    held = math.ceil(rows * fraction)
    return rows - held, held


def image_split(images: np.ndarray, labels: np.ndarray, class_names: list[str]) -> datasets.Dataset:
    """uint8 images [N, C, H, W] and int labels as a compact Arrow dataset."""
    features = datasets.Features(
        {
            "image": datasets.Array3D(shape=tuple(images.shape[1:]), dtype="uint8"),
            "label": datasets.ClassLabel(names=class_names),
        }
    )
    return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)
