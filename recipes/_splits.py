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
    `Dataset.train_test_split(test_size=fraction, seed=seed, stratify_by_column=stratify)` holds out, the same
    rows by the same functions and generator, taken out whole: datasets reads the stratify labels through a Column
    one row at a time and copies the parts out row by row (flatten_indices)."""
    from datasets.utils.stratify import stratified_shuffle_split_generate_indices

    held = math.ceil(fraction * len(ds))
    rng = np.random.default_rng(seed)
    if stratify is None:
        order = rng.permutation(len(ds))
        return _take(ds, order[held:]), _take(ds, order[:held])
    if not isinstance(ds.features[stratify], datasets.ClassLabel):
        raise ValueError(f"stratifying needs a ClassLabel column; {stratify} is {type(ds.features[stratify]).__name__}")
    labels = ds.with_format("numpy", columns=[stratify])[:][stratify]
    try:
        train, held_out = next(stratified_shuffle_split_generate_indices(labels, len(ds) - held, held, rng=rng))
    except ValueError as e:  # worded as datasets words it
        if str(e) == "Minimum class count error":
            raise ValueError(f"The least populated class in {stratify} column has only 1 member, which is too few. "
                             f"The minimum number of groups for any class cannot be less than 2.") from None
        raise
    return _take(ds, train), _take(ds, held_out)


def _take(ds: datasets.Dataset, indices: np.ndarray) -> datasets.Dataset:
    """The rows of `ds` at `indices`, stored in that order: one Arrow take for a dataset in memory (no row
    by row copy, as select + flatten_indices makes); flatten_indices, which writes to the cache
    rather than memory, for one on disk (decoded images) or one that is itself a selection."""
    if ds.cache_files or ds._indices is not None:
        return ds.select(indices).flatten_indices()
    # A fresh fingerprint: without one the constructor hashes the whole table.
    return datasets.Dataset(InMemoryTable(ds.data.table.take(indices)), info=ds.info.copy(),
                            fingerprint=generate_random_fingerprint())


def split_sizes(rows: int, fraction: float) -> tuple[int, int]:
    """The train and eval sizes `datasets.train_test_split` makes of `rows` with test_size `fraction`."""
    held = math.ceil(rows * fraction)
    return rows - held, held


def image_split(images: np.ndarray, labels: np.ndarray, class_names: list[str]) -> datasets.Dataset:
    """uint8 images [N, C, H, W] and int labels as a compact Arrow dataset."""
    features = datasets.Features({
        "image": datasets.Array3D(shape=tuple(images.shape[1:]), dtype="uint8"),
        "label": datasets.ClassLabel(names=class_names),
    })
    return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)
